"""The admin API: limits CRUD (persisted, applied without restart), usage, reset, 422s."""

from __future__ import annotations

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
    gw.plugin("ratelimiter").clock = lambda: T0
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
        ({"id": "a", "rate": "10/s", "algorithm": "sliding_window", "sync": "lease"}, "sync"),
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
    gw.plugin("ratelimiter").clock = lambda: T0
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
    p = gw.plugin("ratelimiter")
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


async def test_limit_reads_show_the_revision_and_writes_honour_if_match(
        lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(BASE.format(url=upstream.url))
    status, body = await call(gw, "POST", "/limits", json={"id": "tenant", "rate": "5/s"})
    assert status == 201 and body["revision"] >= 1
    revision = body["revision"]
    status, body = await call(gw, "GET", "/limits")
    assert [(x["id"], x["revision"]) for x in body["limits"]] == [
        ("static", 0), ("tenant", revision)]
    assert (await call(gw, "GET", "/limits/tenant"))[1]["revision"] == revision
    status, body = await call(gw, "PUT", "/limits/tenant", json={"rate": "6/s"},
                              headers={"If-Match": str(revision + 1)})
    assert status == 412 and body["revision"] == revision
    assert (await call(gw, "GET", "/limits/tenant"))[1]["rate"] == "5/s"  # unchanged
    status, body = await call(gw, "PUT", "/limits/tenant", json={"rate": "6/s"},
                              headers={"If-Match": f'"{revision}"'})
    assert status == 200 and body["rate"] == "6/s" and body["revision"] > revision
    status, body = await call(gw, "DELETE", "/limits/tenant",
                              headers={"If-Match": str(revision)})
    assert status == 412
    status, body = await call(gw, "DELETE", "/limits/tenant",
                              headers={"If-Match": str(body["revision"])})
    assert status == 200 and body == {"deleted": "tenant"}


async def test_counters_carry_over_when_another_definition_is_written(
        lucid_upstream, lucid_gateway):
    """Any write makes a new generation; limits it does not change keep counting."""
    upstream = await lucid_upstream()
    gw = await lucid_gateway(BASE.format(url=upstream.url))
    gw.plugin("ratelimiter").clock = lambda: T0
    assert (await call(gw, "POST", "/limits", json={
        "id": "tenant", "rate": "2/minute", "key": "header", "header": "x-tenant"}))[0] == 201
    assert [await proxied(gw, {"X-Tenant": "a"}) for _ in range(2)] == [200, 200]
    generation = gw.runtime.generation.number
    other = {"id": "other", "rate": "1/s", "key": "header", "header": "x-other"}
    assert (await call(gw, "POST", "/limits", json=other))[0] == 201
    async with gw.session.post(gw.admin_url + "/gateway/route", json={
            "id": "extra", "prefix": "/extra", "service": "svc"}) as r:
        assert r.status == 201
    assert gw.runtime.generation.number == generation + 2
    assert await proxied(gw, {"X-Tenant": "a"}) == 429


async def test_limits_an_older_lucid_kept_are_imported_once(lucid_upstream, tmp_path):
    """Upgrading: limits an older Lucid stored in ratelimiter.db's ``limits`` table move
    to the core's definitions store on the first start; their quota counters (still in
    ratelimiter.db) keep counting; a limit deleted after the upgrade stays deleted."""
    import json
    import sqlite3
    import time

    from lucid_ratelimiter import signature
    from lucid_ratelimiter.config import Limit

    from lucid.testing import run_gateway

    upstream = await lucid_upstream()
    data_dir = tmp_path / "old-data"
    data_dir.mkdir()
    hourly = Limit(id="hourly", rate="3/day", algorithm="fixed_window")
    now = time.time()
    window = now - now % 86400  # today's: counters of another window are not restored
    with sqlite3.connect(data_dir / "ratelimiter.db") as conn:  # the older schema
        conn.execute("CREATE TABLE limits (id TEXT PRIMARY KEY, body TEXT NOT NULL, "
                     "updated_at REAL NOT NULL)")
        conn.execute("CREATE TABLE counters (limit_id TEXT NOT NULL, signature TEXT NOT NULL, "
                     "key TEXT NOT NULL, window REAL NOT NULL, value REAL NOT NULL, "
                     "previous REAL NOT NULL, PRIMARY KEY (limit_id, key))")
        for spec in (hourly, Limit(id="in-flight", algorithm="concurrency", max_in_flight=2)):
            conn.execute("INSERT INTO limits VALUES (?, ?, 0)",
                         (spec.id, json.dumps(spec.model_dump())))  # as it was written
        conn.execute("INSERT INTO counters VALUES (?, ?, ?, ?, 2, 0)",
                     ("hourly", signature(hourly), "127.0.0.1", window))
    text = BASE.format(url=upstream.url)
    async with run_gateway(text, tmp_path / "first", data_dir=str(data_dir)) as gw:
        status, body = await call(gw, "GET", "/limits")
        assert [(x["id"], x["source"], x["revision"]) for x in body["limits"]] == [
            ("static", "static", 0), ("hourly", "dynamic", 1), ("in-flight", "dynamic", 1)]
        assert body["limits"][2]["max_in_flight"] == 2
        with sqlite3.connect(data_dir / "definitions.db") as conn:
            assert conn.execute("SELECT kind, id FROM definitions ORDER BY id").fetchall() == [
                ("limit", "hourly"), ("limit", "in-flight")]
        assert [await proxied(gw) for _ in range(2)] == [200, 429]  # 2 of 3 were used
        assert (await call(gw, "DELETE", "/limits/hourly"))[0] == 200
    async with run_gateway(text, tmp_path / "second", data_dir=str(data_dir)) as gw:
        status, body = await call(gw, "GET", "/limits")
        assert [x["id"] for x in body["limits"]] == ["static", "in-flight"]
