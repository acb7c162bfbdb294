"""The registry's admin API end to end: registration, discovery, routing, bad input,
static services, maintenance, blocking queries and the SSE stream."""

from __future__ import annotations

import asyncio
import json

from lucid_registry.testing import next_event

from lucid.testing import wait_until

ROUTES = """
[gateway.services.legacy]
instances = ["{legacy}"]

[[gateway.routes]]
prefix = "/users"
service = "users"

[[gateway.routes]]
prefix = "/legacy"
service = "legacy"

[[gateway.routes]]
prefix = "/ghost"
service = "ghost"
"""


async def register(gw, body, status=201):
    async with gw.session.post(gw.admin_url + "/registry/services", json=body) as r:
        assert r.status == status, await r.text()
        return await r.json()


async def get(gw, path, status=200):
    async with gw.session.get(gw.admin_url + path) as r:
        assert r.status == status, await r.text()
        return await r.json()


async def ports_seen(gw, path, n):
    seen = []
    for _ in range(n):
        async with gw.session.get(gw.proxy_url + path) as r:
            assert r.status == 200, await r.text()
            seen.append((await r.json())["port"])
    return seen


async def test_registered_instances_serve_routes_and_static_services_still_resolve(
        lucid_upstream, lucid_gateway):
    a, b, legacy = await lucid_upstream(), await lucid_upstream(), await lucid_upstream()
    gw = await lucid_gateway(ROUTES.format(legacy=legacy.url))
    # A route to a service nobody registered answers 503, not a config error.
    async with gw.session.get(gw.proxy_url + "/users/1") as r:
        assert r.status == 503
    async with gw.session.get(gw.proxy_url + "/ghost") as r:
        assert r.status == 503
    created = await register(gw, {
        "id": "users", "tags": ["v2"], "metadata": {"team": "id"},
        "instances": [{"id": "a", "url": a.url, "zone": "z1"}, {"url": b.url, "zone": "z2"}],
    })
    assert [i["id"] for i in created["instances"]] == ["a", f"127.0.0.1:{b.port}"]
    assert {i["status"] for i in created["instances"]} == {"passing"}
    assert set(await ports_seen(gw, "/users/1", 4)) == {a.port, b.port}
    assert set(await ports_seen(gw, "/legacy", 2)) == {legacy.port}
    # A single instance registered into the existing service gets traffic too.
    c = await lucid_upstream()
    async with gw.session.post(gw.admin_url + "/registry/services/users/instances",
                               json={"id": "c", "url": c.url, "weight": 3}) as r:
        assert r.status == 201
    assert set(await ports_seen(gw, "/users/1", 6)) == {a.port, b.port, c.port}
    # Deregistering removes it from routing at once.
    async with gw.session.delete(gw.admin_url + "/registry/services/users/instances/c") as r:
        assert r.status == 200
    assert c.port not in await ports_seen(gw, "/users/1", 4)
    async with gw.session.delete(gw.admin_url + "/registry/services/users") as r:
        assert r.status == 200
    await get(gw, "/registry/services/users", 404)
    async with gw.session.get(gw.proxy_url + "/users/1") as r:
        assert r.status == 503


async def test_bad_input_is_refused_and_changes_nothing(lucid_gateway):
    gw = await lucid_gateway("")
    await register(gw, {"id": "users", "instances": ["http://127.0.0.1:9001"]})
    before = await get(gw, "/registry/services/users")
    cases = [
        ({"id": "users", "instances": [{"url": "ftp://x"}]}, 422, {"instances[0].url"}),
        ({"id": "other", "instances": [{"url": "http://h:1", "weight": -2}]}, 422,
         {"instances[0].weight"}),
        ({"id": "other", "instances": [{"url": "http://h:1"}], "colour": "red"}, 422,
         {"colour"}),
        ({"id": "other", "instances": [{"url": "http://h:1/path"}]}, 422, {"instances[0].url"}),
        ({"id": "other", "instances": ["http://h:1", "http://h:1"]}, 422, {"instances"}),
        ({"id": 5}, 422, {"id"}),
        ({"id": "x", "check": {"ttl": "0.5s"}}, 422, {"check.ttl"}),
        ({"id": "x", "check": {"deregister_after": "soon"}}, 422, {"check.deregister_after"}),
    ]
    for body, status, fields in cases:
        async with gw.session.post(gw.admin_url + "/registry/services", json=body) as r:
            assert r.status == status, body
            answer = await r.json()
            assert {f["field"] for f in answer["fields"]} == fields, answer
    async with gw.session.post(gw.admin_url + "/registry/services", data=b"{not json",
                               headers={"content-type": "application/json"}) as r:
        assert r.status == 422
        assert (await r.json())["fields"][0]["field"] == "body"
    # Duplicates: 409; unknown service: 404 -- and nothing was written.
    answer = await register(gw, {"id": "users"}, status=409)
    assert "already exists" in answer["error"]
    async with gw.session.post(gw.admin_url + "/registry/services/users/instances",
                               json={"url": "http://127.0.0.1:9001"}) as r:
        assert r.status == 409
    async with gw.session.post(gw.admin_url + "/registry/services/nope/instances",
                               json={"url": "http://127.0.0.1:9001"}) as r:
        assert r.status == 404
    async with gw.session.post(gw.admin_url + "/registry/services/users/health",
                               json={"instance": "nope"}) as r:
        assert r.status == 404
    async with gw.session.post(gw.admin_url + "/registry/services/users/health",
                               json={"instance": "127.0.0.1:9001", "status": "dead"}) as r:
        assert r.status == 422
    async with gw.session.get(gw.admin_url + "/registry/services/users/instances?index=x") as r:
        assert r.status == 422
        assert (await r.json())["fields"][0]["field"] == "query.index"
    assert (await get(gw, "/registry/services"))["services"] == [
        {k: v for k, v in before.items() if k != "instances"}]
    assert await get(gw, "/registry/services/users") == before


async def test_static_services_are_loaded_and_cannot_be_deleted(lucid_upstream, lucid_gateway):
    up = await lucid_upstream()
    gw = await lucid_gateway(f"""
        [registry.services.billing]
        tags = ["core"]
        instances = ["{up.url}"]
        [[gateway.routes]]
        prefix = "/billing"
        service = "billing"
    """)
    service = await get(gw, "/registry/services/billing")
    assert service["static"] and service["instances"][0]["static"]
    assert set(await ports_seen(gw, "/billing", 2)) == {up.port}
    for method, path in [("DELETE", "/registry/services/billing"),
                         ("DELETE", f"/registry/services/billing/instances/127.0.0.1:{up.port}")]:
        async with gw.session.request(method, gw.admin_url + path) as r:
            assert r.status == 409
            answer = await r.json()
            assert answer["static"] is True and "config file" in answer["error"]
    async with gw.session.put(gw.admin_url + "/registry/services/billing", json={}) as r:
        assert r.status == 409
    # Instances may still be registered into a static service.
    async with gw.session.post(gw.admin_url + "/registry/services/billing/instances",
                               json={"id": "extra", "url": "http://127.0.0.1:9"}) as r:
        assert r.status == 201
    assert len((await get(gw, "/registry/services/billing"))["instances"]) == 2


async def test_filters_on_services_and_instances(lucid_gateway):
    gw = await lucid_gateway("")
    await register(gw, {"id": "a", "tags": ["web"], "metadata": {"tier": "gold"}, "instances": [
        {"id": "a1", "url": "http://127.0.0.1:9001", "zone": "z1", "tags": ["canary"]},
        {"id": "a2", "url": "http://127.0.0.1:9002", "zone": "z2",
         "metadata": {"v": "2"}, "status": "critical"},
    ]})
    await register(gw, {"id": "b", "tags": ["db"], "metadata": {"tier": "silver"}})
    names = lambda answer: [s["id"] for s in answer["services"]]  # noqa: E731
    assert names(await get(gw, "/registry/services")) == ["a", "b"]
    assert names(await get(gw, "/registry/services?tag=web")) == ["a"]
    assert names(await get(gw, "/registry/services?meta=tier:silver")) == ["b"]
    assert names(await get(gw, "/registry/services?health=critical")) == ["a"]
    await get(gw, "/registry/services?health=sick", 422)
    await get(gw, "/registry/services?meta=nocolon", 422)
    ids = lambda answer: [i["id"] for i in answer["instances"]]  # noqa: E731
    base = "/registry/services/a/instances"
    assert ids(await get(gw, base)) == ["a1", "a2"]
    assert ids(await get(gw, base + "?healthy=true")) == ["a1"]
    assert ids(await get(gw, base + "?healthy=false")) == ["a2"]
    assert ids(await get(gw, base + "?zone=z2")) == ["a2"]
    assert ids(await get(gw, base + "?tag=canary")) == ["a1"]
    assert ids(await get(gw, base + "?meta=v:2")) == ["a2"]
    await get(gw, base + "?healthy=maybe", 422)
    await get(gw, "/registry/services/nope/instances", 404)


async def test_update_replaces_description_and_keeps_instances(lucid_gateway):
    gw = await lucid_gateway("")
    await register(gw, {"id": "a", "tags": ["x"], "instances": ["http://127.0.0.1:9001"]})
    async with gw.session.put(gw.admin_url + "/registry/services/a",
                              json={"tags": ["y"], "metadata": {"k": "v"},
                                    "check": {"ttl": 30}}) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["tags"] == ["y"] and answer["metadata"] == {"k": "v"}
    assert answer["check"] == {"ttl": 30.0} and len(answer["instances"]) == 1
    async with gw.session.put(gw.admin_url + "/registry/services/a",
                              json={"tags": "y"}) as r:
        assert r.status == 422
    async with gw.session.put(gw.admin_url + "/registry/services/nope", json={}) as r:
        assert r.status == 404


async def test_maintenance_drains_an_instance_and_brings_it_back(lucid_upstream, lucid_gateway):
    a, b = await lucid_upstream(), await lucid_upstream()
    gw = await lucid_gateway(ROUTES.format(legacy=a.url))
    await register(gw, {"id": "users", "instances": [{"id": "a", "url": a.url},
                                                     {"id": "b", "url": b.url}]})
    url = gw.admin_url + "/registry/services/users/instances/a/maintenance"
    async with gw.session.put(url, json={"enabled": True, "reason": "deploy"}) as r:
        assert r.status == 200
        answer = await r.json()
        assert answer["status"] == "maintenance" and answer["maintenance_reason"] == "deploy"
    assert set(await ports_seen(gw, "/users", 4)) == {b.port}
    healthy = await get(gw, "/registry/services/users/instances?healthy=true")
    assert [i["id"] for i in healthy["instances"]] == ["b"]
    # what the core answers other plugins and admin endpoints: every instance, any health
    listed = {i.id: i.status for i in gw.runtime.instances("users")}
    assert listed == {"a": "maintenance", "b": "passing"}
    assert [i.url for i in gw.runtime.instances("legacy")] == [a.url]  # the gateway's own
    services = {s["name"]: s for s in (await get(gw, "/gateway/services"))["services"]}
    assert services["users"]["instance_count"] == 2 and services["users"]["healthy"] == 1
    async with gw.session.put(url, json={"enabled": False}) as r:
        assert (await r.json())["status"] == "passing"
    assert set(await ports_seen(gw, "/users", 4)) == {a.port, b.port}
    async with gw.session.put(url, json={"enabled": "soon"}) as r:
        assert r.status == 422


async def test_blocking_query_returns_on_change_with_a_new_index(lucid_gateway):
    gw = await lucid_gateway("")
    await register(gw, {"id": "users"})
    path = gw.admin_url + "/registry/services/users/instances"
    async with gw.session.get(path) as r:
        index = int(r.headers["X-Lucid-Index"])
    # An index older than the service's answers at once.
    async with gw.session.get(f"{path}?index={index - 1}&wait=60s") as r:
        assert int(r.headers["X-Lucid-Index"]) == index

    async def blocked():
        async with gw.session.get(f"{path}?index={index}&wait=60s") as r:
            return int(r.headers["X-Lucid-Index"]), await r.json()

    waiting = asyncio.create_task(blocked())
    plugin = gw.runtime.plugin_set.pm.get_plugin("registry")
    service = plugin.registry.services["users"]
    await wait_until(lambda: service.watchers == 1, message="the query to block")
    assert not waiting.done()
    async with gw.session.post(path, json={"id": "new", "url": "http://127.0.0.1:9001"}) as r:
        assert r.status == 201
    new_index, answer = await waiting
    assert new_index > index
    assert [i["id"] for i in answer["instances"]] == ["new"]
    # With nothing changing, the wait ends with the same index.
    async with gw.session.get(f"{path}?index={new_index}&wait=50ms") as r:
        assert int(r.headers["X-Lucid-Index"]) == new_index


async def test_sse_stream_sends_the_list_then_every_change(lucid_gateway):
    gw = await lucid_gateway("")
    await register(gw, {"id": "users", "instances": [{"id": "a", "url": "http://127.0.0.1:9001"}]})
    async with gw.session.get(gw.admin_url + "/registry/services/users/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")

        first = await next_event(stream)
        assert first["event"] == "instances"
        assert [i["id"] for i in json.loads(first["data"])["instances"]] == ["a"]
        async with gw.session.post(gw.admin_url + "/registry/services/users/instances",
                                   json={"id": "b", "url": "http://127.0.0.1:9002"}) as r:
            assert r.status == 201
        second = await next_event(stream)
        assert int(second["id"]) > int(first["id"])
        assert [i["id"] for i in json.loads(second["data"])["instances"]] == ["a", "b"]
        async with gw.session.delete(gw.admin_url + "/registry/services/users") as r:
            assert r.status == 200
        assert (await next_event(stream))["event"] == "deleted"


async def test_inert_without_config_or_registrations(lucid_upstream, lucid_gateway):
    up = await lucid_upstream()
    gw = await lucid_gateway(ROUTES.format(legacy=up.url))
    async with gw.session.get(gw.proxy_url + "/legacy") as r:
        assert r.status == 200
    assert not (gw.runtime.data_dir / "registry.db").exists()
    assert (await get(gw, "/registry/services"))["services"] == []


async def test_events_for_registration_and_deregistration(lucid_gateway):
    gw = await lucid_gateway("")
    events = []
    emit = gw.runtime.emit
    gw.runtime.emit = lambda event: (events.append(event), emit(event))[1]
    await register(gw, {"id": "users", "instances": [{"id": "a", "url": "http://127.0.0.1:9001"}]})
    async with gw.session.delete(gw.admin_url + "/registry/services/users/instances/a") as r:
        assert r.status == 200
    assert [(e.kind, e.data["service"], e.data["instance"]) for e in events] == [
        ("instance_registered", "users", "a"), ("instance_deregistered", "users", "a")]
    assert events[1].data["reason"] == "deregistered"


async def test_update_an_instance_moves_its_traffic(lucid_upstream, lucid_gateway):
    a, b = await lucid_upstream(), await lucid_upstream()
    gw = await lucid_gateway(ROUTES.format(legacy=a.url))
    await register(gw, {"id": "users", "instances": [{"id": "x", "url": a.url}]})
    assert set(await ports_seen(gw, "/users", 2)) == {a.port}
    url = gw.admin_url + "/registry/services/users/instances/x"
    async with gw.session.put(url, json={"url": b.url, "weight": 4, "zone": "z9"}) as r:
        assert r.status == 200
        answer = await r.json()
    assert (answer["url"], answer["weight"], answer["zone"]) == (b.url, 4, "z9")
    assert set(await ports_seen(gw, "/users", 2)) == {b.port}
    async with gw.session.put(url, json={"url": b.url, "weight": 0}) as r:
        assert r.status == 422
    async with gw.session.put(url + "y", json={"url": b.url}) as r:
        assert r.status == 404
    assert (await get(gw, "/registry/services/users/instances/x"))["weight"] == 4


async def test_warning_instances_serve_only_when_none_is_passing(lucid_upstream, lucid_gateway):
    a, b = await lucid_upstream(), await lucid_upstream()
    gw = await lucid_gateway(ROUTES.format(legacy=a.url))
    await register(gw, {"id": "users", "instances": [
        {"id": "a", "url": a.url, "status": "warning"}, {"id": "b", "url": b.url}]})
    assert set(await ports_seen(gw, "/users", 4)) == {b.port}
    async with gw.session.post(gw.admin_url + "/registry/services/users/health",
                               json={"instance": "b", "status": "critical"}) as r:
        assert (await r.json())["status"] == "critical"
    assert set(await ports_seen(gw, "/users", 4)) == {a.port}
