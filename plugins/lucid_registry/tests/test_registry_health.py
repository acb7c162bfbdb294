"""Health end to end: TTL expiry and deregistration, active HTTP checks, passive ejection
from the proxy's own failures, and the observation events each change emits."""

from __future__ import annotations

import asyncio

from aiohttp import web

from lucid.testing import wait_until

ROUTE = """
[registry.passive]
eject_for = "{eject}"
{extra}

[[gateway.routes]]
prefix = "/users"
service = "users"
"""


def spy_events(gw):
    events = []
    emit = gw.runtime.emit
    gw.runtime.emit = lambda event: (events.append(event), emit(event))[1]
    return events


def registry(gw):
    return gw.runtime.plugin_set.pm.get_plugin("registry").registry


async def status_of(gw, service, instance):
    async with gw.session.get(
            f"{gw.admin_url}/registry/services/{service}/instances/{instance}") as r:
        if r.status == 404:
            return None
        return (await r.json())["status"]


async def test_ttl_expiry_goes_critical_then_deregisters(lucid_gateway):
    gw = await lucid_gateway("")
    events = spy_events(gw)
    async with gw.session.post(gw.admin_url + "/registry/services", json={
        "id": "users", "check": {"ttl": "1s", "deregister_after": "1s"},
        "instances": [{"id": "a", "url": "http://127.0.0.1:9001"},
                      {"id": "b", "url": "http://127.0.0.1:9002"}],
    }) as r:
        assert r.status == 201
    heartbeat = gw.admin_url + "/registry/services/users/health"
    service = registry(gw).services["users"]
    # "b" keeps renewing, as a live instance does, while "a" lapses and is removed.
    for _ in range(100):  # at most ~20 s
        if "a" not in service.records:
            break
        async with gw.session.post(heartbeat, json={"instance": "b"}) as r:
            assert r.status == 200
        await next_change(service)
    assert "a" not in service.records
    kinds = [(e.kind, e.data["instance"], e.data.get("new")) for e in events]
    assert ("instance_health_changed", "a", "critical") in kinds
    assert ("instance_deregistered", "a", None) in kinds
    assert kinds.index(("instance_health_changed", "a", "critical")) < kinds.index(
        ("instance_deregistered", "a", None))
    assert await status_of(gw, "users", "b") == "passing"
    deregistered = [e for e in events if e.kind == "instance_deregistered"][0]
    assert "deregister_after" in deregistered.data["reason"]


async def next_change(service):
    """Wait for the service's next change, or 200 ms: a heartbeat client's pace."""
    try:
        await asyncio.wait_for(service.changed.wait(), 0.2)
    except TimeoutError:
        pass


async def test_a_heartbeat_brings_a_lapsed_instance_back_and_reports_warning(lucid_gateway):
    gw = await lucid_gateway("")
    async with gw.session.post(gw.admin_url + "/registry/services", json={
        "id": "users", "check": {"ttl": "1s"},
        "instances": [{"id": "a", "url": "http://127.0.0.1:9001"}]}) as r:
        assert r.status == 201
    service = registry(gw).services["users"]
    await wait_until(lambda: service.records["a"].status == "critical", timeout=10,
                     message="the TTL to lapse")
    heartbeat = gw.admin_url + "/registry/services/users/health"
    async with gw.session.post(heartbeat, json={"instance": "a"}) as r:
        assert (await r.json())["status"] == "passing"
    async with gw.session.post(heartbeat, json={"instance": "a", "status": "warning",
                                                "note": "disk 91%"}) as r:
        assert (await r.json())["status"] == "warning"
    async with gw.session.get(gw.admin_url + "/registry/services/users/instances/a") as r:
        assert (await r.json())["note"] == "disk 91%"


async def test_active_http_check_follows_the_instance(lucid_upstream, lucid_gateway):
    state = {"healthy": True}

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/ready":
            return web.Response(status=200 if state["healthy"] else 503)
        return web.json_response({"path": request.path})

    a, b = await lucid_upstream(handler), await lucid_upstream(handler)
    gw = await lucid_gateway(ROUTE.format(eject="10s", extra=""))
    events = spy_events(gw)
    async with gw.session.post(gw.admin_url + "/registry/services", json={
        "id": "users",
        "check": {"http": {"path": "/ready", "interval": "100ms", "timeout": "1s",
                           "unhealthy_threshold": 2, "healthy_threshold": 2}},
        "instances": [{"id": "a", "url": a.url}],
    }) as r:
        assert r.status == 201
    await wait_until(lambda: [p for p in a.requests if p.path == "/ready"],
                     message="a first check")
    state["healthy"] = False
    await wait_until(lambda: registry(gw).services["users"].records["a"].status == "critical",
                     message="the check to fail twice")
    async with gw.session.get(gw.proxy_url + "/users") as r:
        assert r.status == 503
    state["healthy"] = True
    await wait_until(lambda: registry(gw).services["users"].records["a"].status == "passing",
                     message="the check to pass twice")
    async with gw.session.get(gw.proxy_url + "/users") as r:
        assert r.status == 200
    changes = [(e.data["old"], e.data["new"], e.data["source"]) for e in events
               if e.kind == "instance_health_changed"]
    assert changes == [("passing", "critical", "http"), ("critical", "passing", "http")]
    assert not b.requests  # unregistered instances are never checked


async def test_a_killed_instance_is_ejected_by_the_proxy_s_own_failures(
        lucid_upstream, lucid_gateway):
    a, b = await lucid_upstream(), await lucid_upstream()
    gw = await lucid_gateway(ROUTE.format(eject="1s", extra=""))
    events = spy_events(gw)
    async with gw.session.post(gw.admin_url + "/registry/services", json={
        "id": "users", "instances": [{"id": "a", "url": a.url}, {"id": "b", "url": b.url}],
    }) as r:
        assert r.status == 201
    await a.close()  # the instance dies without deregistering
    # Every request still succeeds: the connect error is retried on "b" ...
    for _ in range(6):
        async with gw.session.get(gw.proxy_url + "/users") as r:
            assert r.status == 200
            assert (await r.json())["port"] == b.port
    # ... and the first one ejected "a", so the later ones never tried it.
    record = registry(gw).services["users"].records["a"]
    assert record.status == "critical" and record.note == "passive: connect_error"
    ejections = [e for e in events if e.kind == "instance_health_changed"]
    assert [(e.data["instance"], e.data["new"], e.data["source"]) for e in ejections] == [
        ("a", "critical", "passive")]
    # After eject_for it is offered traffic again (and ejected again while still dead).
    await wait_until(lambda: len([e for e in events if e.kind == "instance_health_changed"])
                     >= 2, message="the ejection to end")
    assert events[-1].data["new"] == "passing"


async def test_repeated_5xx_eject_after_the_threshold(lucid_upstream, lucid_gateway):
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)

    a, b = await lucid_upstream(broken), await lucid_upstream()
    gw = await lucid_gateway(ROUTE.format(eject="1m", extra="consecutive_failures = 3"))
    async with gw.session.post(gw.admin_url + "/registry/services", json={
            "id": "users", "instances": [{"id": "a", "url": a.url},
                                         {"id": "b", "url": b.url}]}) as r:
        assert r.status == 201
    record = registry(gw).services["users"].records["a"]
    statuses = []
    for _ in range(12):  # 500 is not retried: one attempt each, "a" every other one
        async with gw.session.get(gw.proxy_url + "/users") as r:
            statuses.append(r.status)
    assert statuses.count(500) == 3 and statuses[-6:] == [200] * 6
    await wait_until(lambda: record.status == "critical", message="the status to follow")
    assert record.note == "passive: error_status (500)"


async def test_the_last_instance_is_never_ejected(lucid_upstream, lucid_gateway):
    """Ejecting a service's only instance would turn its 500s into 503s and hide its
    recovery: passive health keeps it (a circuit breaker is the tool for that)."""
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)

    a = await lucid_upstream(broken)
    gw = await lucid_gateway(ROUTE.format(eject="1m", extra="consecutive_failures = 3"))
    async with gw.session.post(gw.admin_url + "/registry/services", json={
            "id": "users", "instances": [{"id": "a", "url": a.url}]}) as r:
        assert r.status == 201
    statuses = []
    for _ in range(6):
        async with gw.session.get(gw.proxy_url + "/users") as r:
            statuses.append(r.status)
    assert statuses == [500] * 6 and len(a.requests) == 6
    assert registry(gw).services["users"].records["a"].status == "passing"
    assert not gw.runtime.passive.ejected


async def test_batched_heartbeats_are_all_or_nothing(lucid_gateway):
    gw = await lucid_gateway("")
    for name in ("a", "b"):
        async with gw.session.post(gw.admin_url + "/registry/services", json={
            "id": name, "check": {"ttl": "1h"},
            "instances": [{"id": "x", "url": "http://127.0.0.1:9001"}]}) as r:
            assert r.status == 201
    url = gw.admin_url + "/registry/health"
    async with gw.session.post(url, json={"heartbeats": [
            {"service": "a", "instance": "x", "status": "critical"},
            {"service": "b", "instance": "nope", "status": "critical"}]}) as r:
        assert r.status == 404
        assert (await r.json())["unknown"] == ["b/nope"]
    assert registry(gw).services["a"].records["x"].status == "passing"  # nothing applied
    async with gw.session.post(url, json={"heartbeats": [
            {"service": "a", "instance": "x", "status": "critical", "note": "oom"},
            {"service": "b", "instance": "x"}]}) as r:
        assert r.status == 200
        assert (await r.json())["statuses"] == [["a", "x", "critical"], ["b", "x", "passing"]]
    async with gw.session.post(url, json={"heartbeats": []}) as r:
        assert r.status == 422
    async with gw.session.get(gw.admin_url + "/registry/services/a/instances/x") as r:
        assert (await r.json())["note"] == "oom"
