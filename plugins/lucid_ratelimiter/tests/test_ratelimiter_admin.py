"""The admin API: limits CRUD (persisted, applied without restart), usage, reset, 422s."""

from __future__ import annotations

from lucid_ratelimiter import RateLimiterPlugin

from lucid.testing import PluginAdmin

T0 = 1_800_000_000.0

BASE = '''
[gateway.services.svc]
instances = ["{url}"]

[[gateway.routes]]
id = "main"
prefix = "/"
service = "svc"

[[ratelimiter.limits]]
id = "static"
rate = "1000/s"
'''


def plugin(gw) -> RateLimiterPlugin:
    return gw.runtime.plugin_set.pm.get_plugin("ratelimiter")


async def call(gw, method, path, **kw):
    return await PluginAdmin(gw, "/ratelimiter")(method, path, **kw)


async def proxied(gw, headers=None):
    async with gw.session.get(gw.proxy_url + "/x", headers=headers or {}) as r:
        await r.read()
        return r.status


async def test_limits_are_created_replaced_deleted_and_applied_at_once(
        lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(BASE.format(url=upstream.url))
    plugin(gw).clock = lambda: T0
    status, body = await call(gw, "POST", "/limits", json={
        "id": "tenant", "rate": "2/minute", "key": "header", "header": "X-Tenant"})
    assert status == 201, body
    assert body["source"] == "dynamic" and body["header"] == "x-tenant"
    assert [await proxied(gw, {"X-Tenant": "a"}) for _ in range(3)] == [200, 200, 429]
    status, body = await call(gw, "POST", "/limits", json={"id": "tenant", "rate": "1/s"})
    assert status == 409
    status, body = await call(gw, "PUT", "/limits/tenant", json={
        "rate": "3/minute", "key": "header", "header": "x-tenant"})
    assert status == 200 and body["rate"] == "3/minute"
    assert await proxied(gw, {"X-Tenant": "a"}) == 200  # new definition, counters start over
    status, body = await call(gw, "GET", "/limits")
    assert [(x["id"], x["source"]) for x in body["limits"]] == [
        ("static", "static"), ("tenant", "dynamic")]
    status, body = await call(gw, "DELETE", "/limits/tenant")
    assert status == 200
    assert [await proxied(gw, {"X-Tenant": "a"}) for _ in range(5)] == [200] * 5
    assert (await call(gw, "DELETE", "/limits/tenant"))[0] == 404
    assert (await call(gw, "PUT", "/limits/tenant", json={"rate": "1/s"}))[0] == 404


async def test_static_limits_cannot_be_changed_through_the_api(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(BASE.format(url=upstream.url))
    status, body = await call(gw, "DELETE", "/limits/static")
    assert status == 409 and "config file" in body["error"]
    status, body = await call(gw, "PUT", "/limits/static", json={"rate": "1/s"})
    assert status == 409 and "config file" in body["error"]
    assert (await call(gw, "POST", "/limits", json={"id": "static", "rate": "1/s"}))[0] == 409


async def test_bad_input_is_refused_naming_each_field_and_changes_nothing(
        lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(BASE.format(url=upstream.url))
    cases = [
        ({"id": "a", "rate": "0/s"}, "rate"),
        ({"id": "a", "rate": "-5/s"}, "rate"),
        ({"id": "a", "rate": "10/fortnight"}, "rate"),
        ({"id": "a", "rate": "10/s", "algorithm": "leaky_bucket"}, "algorithm"),
        ({"id": "a", "rate": "10/s", "key": "cookie"}, "key"),
        ({"id": "a", "rate": "10/s", "colour": "red"}, "colour"),
        ({"id": "a b", "rate": "10/s"}, "id"),
        ({"id": "a"}, "rate"),
    ]
    for payload, field in cases:
        status, body = await call(gw, "POST", "/limits", json=payload)
        assert status == 422, payload
        assert field in [f["field"] for f in body["fields"]], body
    status, body = await call(gw, "POST", "/limits", data=b"{not json",
                              headers={"Content-Type": "application/json"})
    assert status == 422 and body["fields"][0]["field"] == "body"
    status, body = await call(gw, "PUT", "/limits/static", json={"rate": "1/fortnight"})
    assert status == 422 and body["fields"][0]["field"] == "rate"
    status, body = await call(gw, "GET", "/limits")
    assert [x["id"] for x in body["limits"]] == ["static"]
    status, body = await call(gw, "GET", "/usage?top=0")
    assert status == 422


async def test_usage_reports_the_most_limited_keys_and_a_key_can_be_reset(
        lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(BASE.format(url=upstream.url))
    plugin(gw).clock = lambda: T0
    assert (await call(gw, "POST", "/limits", json={
        "id": "tenant", "rate": "2/minute", "key": "header", "header": "x-tenant"}))[0] == 201
    for tenant, count in (("a", 5), ("b", 3), ("c", 1)):
        for _ in range(count):
            await proxied(gw, {"X-Tenant": tenant})
    status, body = await call(gw, "GET", "/usage?limit=tenant&top=2")
    assert status == 200 and body["total"] == 3
    assert [(r["key"], r["used"], r["remaining"], r["rejections"]) for r in body["usage"]] == [
        ("h:a", 2, 0, 3), ("h:b", 2, 0, 1)]
    assert body["usage"][0]["reset"] == 60.0
    status, body = await call(gw, "GET", "/usage?key=h:c")
    assert [(r["limit"], r["used"]) for r in body["usage"]] == [("tenant", 1), ("static", 0)]
    assert (await call(gw, "GET", "/usage?limit=nope"))[0] == 404
    status, body = await call(gw, "POST", "/usage/reset", json={"key": "h:a", "limit": "tenant"})
    assert status == 200 and body["limits"] == ["tenant"]
    assert await proxied(gw, {"X-Tenant": "a"}) == 200
    assert (await call(gw, "POST", "/usage/reset", json={"key": ""}))[0] == 422
    assert (await call(gw, "POST", "/usage/reset", json={"key": "x", "limit": "nope"}))[0] == 404


async def test_health_and_status(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(BASE.format(url=upstream.url))
    await proxied(gw)
    status, body = await call(gw, "GET", "/health")
    assert status == 200 and body == {"status": "ok", "store": "memory",
                                      "persistence": "sqlite", "limits": 1}
    status, body = await call(gw, "GET", "/status")
    assert status == 200
    assert body["admitted"] == 1 and body["rejected"] == 0 and body["keys"] == {"static": 1}
    assert body["quota"]["flush_interval"] == 1.0


async def test_replacing_a_quota_keeps_its_counters_unless_what_they_count_changed(
        lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(BASE.format(url=upstream.url))
    p = plugin(gw)
    p.clock = lambda: T0
    daily = {"id": "daily", "rate": "5/day", "algorithm": "fixed_window"}
    assert (await call(gw, "POST", "/limits", json=daily))[0] == 201
    assert [await proxied(gw) for _ in range(2)] == [200, 200]
    await p.flush()
    assert [(r[0], r[2], r[4]) for r in await p.store.load_counters()] == [
        ("daily", "127.0.0.1", 2.0)]
    assert (await call(gw, "PUT", "/limits/daily", json={**daily, "routes": ["main"]}))[0] == 200
    assert [r[4] for r in await p.store.load_counters()] == [2.0]
    assert (await call(gw, "GET", "/usage?limit=daily"))[1]["usage"][0]["used"] == 2
    assert (await call(gw, "PUT", "/limits/daily", json={**daily, "rate": "6/day"}))[0] == 200
    assert await p.store.load_counters() == []
    assert (await call(gw, "GET", "/usage?limit=daily"))[1]["usage"] == []
