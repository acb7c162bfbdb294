"""The limiter through a real gateway: decisions, headers, keys, stacking, routes, tiers.

The plugin's clock is injectable: tests that count requests against time drive it by
hand, so they assert on counts, never on timing.
"""

from __future__ import annotations

import tomllib

import tomli_w

from lucid.model import Exchange

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(upstream, limits: str, extra: str = "", routes: str = "") -> str:
    return f'''
[gateway.services.svc]
instances = ["{upstream.url}"]
{routes}
[[gateway.routes]]
id = "main"
prefix = "/"
service = "svc"

[ratelimiter]
{extra}
{limits}
'''


async def start(lucid_upstream, lucid_gateway, limits, **kw):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream, limits, **kw))
    clock = Clock()
    gw.plugin("ratelimiter").clock = clock
    return gw, clock, upstream


async def get(gw, path="/x", headers=None):
    async with gw.session.get(gw.proxy_url + path, headers=headers or {}) as r:
        await r.read()
        return r.status, r.headers


async def test_inert_without_limits(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream, ""))
    for _ in range(3):
        status, headers = await get(gw)
        assert status == 200
        assert "ratelimit" not in headers and "x-ratelimit-limit" not in headers
    assert gw.plugin("ratelimiter").admitted == 0


async def test_twice_the_limit_for_ten_seconds_through_the_gateway(lucid_upstream, lucid_gateway):
    gw, clock, upstream = await start(lucid_upstream, lucid_gateway, '''
[[ratelimiter.limits]]
id = "per-ip"
rate = "50/s"
burst = 10
''')
    statuses = []
    for i in range(1000):  # 100 req/s of simulated time for 10 s: twice the limit
        clock.now = T0 + i / 100
        statuses.append((await get(gw))[0])
    admitted = statuses.count(200)
    assert abs(admitted - (50 * 10 + 10)) <= 5, admitted
    assert statuses.count(429) == 1000 - admitted
    assert len(upstream.requests) == admitted


async def test_headers_on_admitted_and_rejected_responses(lucid_upstream, lucid_gateway):
    gw, clock, _ = await start(lucid_upstream, lucid_gateway, '''
[[ratelimiter.limits]]
id = "per-ip"
rate = "2/10s"
algorithm = "fixed_window"
''')
    clock.now = T0 - T0 % 10 + 4
    status, headers = await get(gw)
    assert status == 200
    assert headers["RateLimit-Policy"] == '"per-ip";q=2;w=10'
    assert headers["RateLimit"] == '"per-ip";r=1;t=6'
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"],
            headers["X-RateLimit-Reset"]) == ("2", "1", "6")
    assert (await get(gw))[0] == 200
    status, headers = await get(gw)
    assert status == 429
    assert headers["Retry-After"] == "6"
    assert headers["RateLimit"] == '"per-ip";r=0;t=6'
    assert headers["X-RateLimit-Remaining"] == "0"
    async with gw.session.get(gw.proxy_url + "/x") as r:
        body = await r.json()
    assert body["limit"] == "per-ip" and body["retry_after"] == 6
    clock.now += 6
    assert (await get(gw))[0] == 200


async def test_header_style_is_configurable_globally_and_per_route(lucid_upstream, lucid_gateway):
    gw, clock, _ = await start(lucid_upstream, lucid_gateway, '''
[[ratelimiter.limits]]
id = "per-ip"
rate = "100/s"
''', extra='headers = "ietf"', routes='''
[[gateway.routes]]
id = "quiet"
prefix = "/quiet"
service = "svc"
plugins = { ratelimiter = { headers = "none" } }

[[gateway.routes]]
id = "legacy"
prefix = "/legacy"
service = "svc"
plugins = { ratelimiter = { headers = "x" } }
''')
    _, headers = await get(gw, "/x")
    assert "RateLimit" in headers and "X-RateLimit-Limit" not in headers
    _, headers = await get(gw, "/quiet")
    assert "RateLimit" not in headers and "X-RateLimit-Limit" not in headers
    _, headers = await get(gw, "/legacy")
    assert "RateLimit" not in headers and headers["X-RateLimit-Limit"] == "100"


async def test_stacked_limits_the_strictest_decides_and_refusals_cost_nothing(
        lucid_upstream, lucid_gateway):
    gw, clock, _ = await start(lucid_upstream, lucid_gateway, '''
[[ratelimiter.limits]]
id = "second"
rate = "3/s"

[[ratelimiter.limits]]
id = "day"
rate = "5/day"
algorithm = "fixed_window"
''')
    results = []
    for step in range(4):
        clock.now = T0 + step * 10
        for _ in range(4):
            status, headers = await get(gw)
            results.append((status, headers.get("RateLimit")))
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 5  # 3 in the first second, 2 more in the next
    assert statuses[:4] == [200, 200, 200, 429]  # the per-second limit refused the 4th
    assert results[3][1].startswith('"second"')
    assert results[6][1].startswith('"day"')  # the strictest (fewest left) is announced
    assert results[-1][1].startswith('"day";r=0')
    usage = await (await gw.session.get(gw.admin_url + "/ratelimiter/usage?limit=day")).json()
    assert usage["usage"][0]["used"] == 5  # the refused requests were not counted


async def test_keys_header_api_key_route_and_global(lucid_upstream, lucid_gateway):
    gw, clock, _ = await start(lucid_upstream, lucid_gateway, '''
[[ratelimiter.limits]]
id = "tenant"
rate = "1/minute"
key = "header"
header = "X-Tenant"
routes = ["tenants"]

[[ratelimiter.limits]]
id = "keys"
rate = "1/minute"
key = "api_key"
routes = ["keys"]

[[ratelimiter.limits]]
id = "everyone"
rate = "2/minute"
key = "global"
routes = ["global"]
''', routes='''
[[gateway.routes]]
id = "tenants"
prefix = "/t"
service = "svc"

[[gateway.routes]]
id = "keys"
prefix = "/k"
service = "svc"

[[gateway.routes]]
id = "global"
prefix = "/g"
service = "svc"
''')
    assert (await get(gw, "/t", {"X-Tenant": "a"}))[0] == 200
    assert (await get(gw, "/t", {"X-Tenant": "a"}))[0] == 429
    assert (await get(gw, "/t", {"X-Tenant": "b"}))[0] == 200
    assert (await get(gw, "/t"))[0] == 200  # no header: keyed by client IP instead
    assert (await get(gw, "/t"))[0] == 429
    assert (await get(gw, "/k", {"X-API-Key": "k1"}))[0] == 200
    assert (await get(gw, "/k", {"X-API-Key": "k2"}))[0] == 200
    assert (await get(gw, "/k", {"X-API-Key": "k1"}))[0] == 429
    assert [(await get(gw, "/g", {"X-Tenant": t}))[0] for t in "abc"] == [200, 200, 429]
    assert (await get(gw, "/x"))[0] == 200  # no limit applies to the main route
    assert "RateLimit" not in (await get(gw, "/x"))[1]


async def test_route_cost_and_switch(lucid_upstream, lucid_gateway):
    gw, clock, _ = await start(lucid_upstream, lucid_gateway, '''
[[ratelimiter.limits]]
id = "per-ip"
rate = "10/minute"
algorithm = "fixed_window"
''', routes='''
[[gateway.routes]]
id = "expensive"
prefix = "/report"
service = "svc"
plugins = { ratelimiter = { cost = 4 } }

[[gateway.routes]]
id = "free"
prefix = "/health"
service = "svc"
plugins = { ratelimiter = { enabled = false } }
''')
    clock.now = T0 - T0 % 60
    assert (await get(gw, "/report"))[1]["X-RateLimit-Remaining"] == "6"
    assert (await get(gw, "/report"))[1]["X-RateLimit-Remaining"] == "2"
    assert (await get(gw, "/report"))[0] == 429
    assert (await get(gw, "/x"))[1]["X-RateLimit-Remaining"] == "1"
    for _ in range(5):
        status, headers = await get(gw, "/health")
        assert status == 200 and "X-RateLimit-Remaining" not in headers


async def test_tiers_follow_a_claim_with_a_default(lucid_upstream, lucid_gateway):
    """Identity comes from the auth plugin; here the exchange carries verified claims."""
    gw, clock, _ = await start(lucid_upstream, lucid_gateway, '''
[[ratelimiter.limits]]
id = "free"
rate = "1/minute"
key = "user"
tiers = ["free"]

[[ratelimiter.limits]]
id = "pro"
rate = "3/minute"
key = "user"
tiers = ["pro"]
''', extra='tier_claim = "plan"\ndefault_tier = "free"')
    plugin = gw.plugin("ratelimiter")

    def admit(identity):
        exchange = Exchange(
            request_id="r", method="GET", path="/x", query="", host="h", scheme="http",
            client_ip="192.0.2.1", headers={}, started=0.0,
            generation=gw.runtime.generation, route_id="main", service="svc",
            identity=identity,
        )
        return plugin.lucid_admit_request(exchange)

    alice = {"sub": "alice", "plan": "pro"}
    bob = {"sub": "bob", "plan": "free"}
    carol = {"sub": "carol"}  # no claim: the default tier
    assert [admit(alice) is None for _ in range(4)] == [True, True, True, False]
    assert [admit(bob) is None for _ in range(2)] == [True, False]
    assert [admit(carol) is None for _ in range(2)] == [True, False]
    assert admit(None) is None  # anonymous: keyed by IP, in the default tier
    rejection = admit(None)
    assert rejection.status == 429 and rejection.retry_after == 60
    # and through the proxy, anonymous requests use the default tier too
    assert (await get(gw))[0] == 200
    assert (await get(gw))[0] == 429


async def test_a_reload_applies_new_limits_and_keeps_counters(lucid_upstream, lucid_gateway):
    gw, clock, upstream = await start(lucid_upstream, lucid_gateway, '''
[[ratelimiter.limits]]
id = "per-ip"
rate = "2/minute"
algorithm = "fixed_window"
''')
    clock.now = T0 - T0 % 60
    assert (await get(gw))[0] == 200
    data = tomllib.loads(gw.config_path.read_text())
    data["ratelimiter"]["limits"][0]["routes"] = ["main"]
    data["ratelimiter"]["limits"].append({"id": "burst", "rate": "1/s"})
    gw.config_path.write_text(tomli_w.dumps(data))
    async with gw.session.post(gw.admin_url + "/gateway/config/reload") as r:
        assert r.status == 200, await r.text()
    status, headers = await get(gw)
    assert status == 200 and headers["X-RateLimit-Remaining"] == "0"
    assert headers["RateLimit-Policy"] == '"per-ip";q=2;w=60, "burst";q=1;w=1'
    assert (await get(gw))[0] == 429


async def test_limits_naming_unknown_routes_are_refused(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    try:
        await lucid_gateway(config(upstream, '''
[[ratelimiter.limits]]
id = "x"
rate = "1/s"
routes = ["nope"]
'''))
    except Exception as exc:  # noqa: BLE001 - the ConfigError's text is what matters
        assert "ratelimiter.limits[0].routes = 'nope': no such route" in str(exc.problems)
    else:
        raise AssertionError("the config was accepted")
