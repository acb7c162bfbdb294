"""With the registry: a pool over a registered service, instances going unhealthy
(ejected, then panic mode past the threshold), and an instance back from critical
ramping up again (slow start)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from aiohttp import web

CONFIG = """
[[gateway.routes]]
prefix = "/"
service = "reg"
retries = { attempts = 1 }
"""


def named(name: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=name)
    return handler


async def test_panic_mode_and_ejected_instances_with_the_registry(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    ups = [await lucid_upstream(named(n)) for n in "abcd"]
    gw = await lucid_gateway(CONFIG)
    session, admin = gw.session, gw.admin_url

    async def call(method: str, path: str, json: Any = None) -> tuple[int, Any]:
        async with session.request(method, admin + path, json=json) as r:
            return r.status, await r.json()

    code, body = await call("POST", "/registry/services", {
        "id": "reg", "instances": [{"id": n, "url": u.url} for n, u in zip("abcd", ups,
                                                                          strict=True)]})
    assert code == 201, body
    code, body = await call("POST", "/loadbalancer/pools", {
        "id": "p", "service": "reg", "algorithm": "round_robin",
        "slow_start": {"window": "1h"}})
    assert code == 201, body

    async def spread(count: int) -> Counter[str]:
        seen: Counter[str] = Counter()
        for _ in range(count):
            async with session.get(gw.proxy_url + "/x") as r:
                assert r.status == 200
                seen[await r.text()] += 1
        return seen

    assert await spread(8) == {n: 2 for n in "abcd"}
    assert (await call("POST", "/registry/services/reg/health",
                       {"instance": "d", "status": "critical"}))[0] == 200
    assert await spread(6) == {n: 2 for n in "abc"}  # 3 of 4 healthy: d ejected
    _, status = await call("GET", "/loadbalancer/status")
    pool = status["pools"][0]
    assert pool["ejected"] == ["d"] and pool["panic"] is False
    for name in "bc":
        await call("POST", "/registry/services/reg/health",
                   {"instance": name, "status": "critical"})
    # 1 of 4 healthy (25% < 50%): panic, every instance takes traffic again
    assert await spread(8) == {n: 2 for n in "abcd"}
    _, health = await call("GET", "/loadbalancer/health")
    assert health["panic"] == ["p"]
    for name in "bcd":
        await call("POST", "/registry/services/reg/health",
                   {"instance": name, "status": "passing"})
    # out of panic; b, c and d came back healthy: they ramp from 10% of their share
    seen = await spread(200)
    assert seen["a"] > 100 and all(seen[n] < 40 for n in "bcd"), seen
    _, listing = await call("GET", "/loadbalancer/pools/p/instances")
    factors = {i["id"]: i.get("slow_start_factor") for i in listing["instances"]}
    assert factors["a"] is None and all(0.1 <= factors[n] < 0.2 for n in "bcd"), factors


async def test_no_healthy_instance_at_all_panics_with_a_pool_and_503s_without(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    ups = [await lucid_upstream(named(n)) for n in "ab"]
    gw = await lucid_gateway(CONFIG)
    session, admin = gw.session, gw.admin_url

    async def call(method: str, path: str, json: Any = None) -> tuple[int, Any]:
        async with session.request(method, admin + path, json=json) as r:
            return r.status, await r.json()

    await call("POST", "/registry/services", {
        "id": "reg", "instances": [{"id": n, "url": u.url} for n, u in zip("ab", ups,
                                                                          strict=True)]})
    for name in "ab":
        await call("POST", "/registry/services/reg/health",
                   {"instance": name, "status": "critical"})
    async with session.get(gw.proxy_url + "/x") as r:  # no pool: nothing healthy, 503
        assert r.status == 503
        assert "no instances available for service 'reg'" in (await r.json())["error"]
    assert (await call("POST", "/loadbalancer/pools", {"id": "p", "service": "reg"}))[0] == 201
    seen: Counter[str] = Counter()
    for _ in range(4):  # 0 of 2 healthy: panic mode spreads over both (Envoy's 0% case)
        async with session.get(gw.proxy_url + "/x") as r:
            assert r.status == 200
            seen[await r.text()] += 1
    assert seen == {"a": 2, "b": 2}
