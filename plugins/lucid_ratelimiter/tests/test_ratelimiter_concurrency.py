"""Concurrency limits end to end: requests in flight per key, through a real gateway, to
upstreams on loopback that hold each request until the test lets it go (a slow upstream
whose slowness the test controls: no sleeps, every wait is on a condition).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from lucid_ratelimiter.algorithms import Concurrency

from lucid.testing import wait_until


class HeldUpstream:
    """Counts the requests that reached it and answers none until ``release()``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.arrived = 0
        self.gate = asyncio.Event()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.arrived += 1
        await self.gate.wait()
        return web.json_response({"ok": True}, status=self.status)

    def release(self) -> None:
        self.gate.set()


def config(url: str, limits: str, routes: str = "", services: str = "") -> str:
    return f'''
[gateway.services.svc]
instances = ["{url}"]
{services}
{routes}
[[gateway.routes]]
id = "main"
prefix = "/"
service = "svc"

[ratelimiter]
{limits}
'''


CONCURRENCY = '''
[[ratelimiter.limits]]
id = "conc"
algorithm = "concurrency"
max_in_flight = 3
key = "header"
header = "x-tenant"
'''


def in_flight(gw: Any, limit: str = "conc") -> dict[str, int]:
    limiter = gw.plugin("ratelimiter").current().limits[limit].limiter
    assert isinstance(limiter, Concurrency)
    return dict(limiter.in_flight)


async def get(gw: Any, path: str = "/x", tenant: str = "acme") -> tuple[int, Any, Any]:
    async with gw.session.get(gw.proxy_url + path, headers={"X-Tenant": tenant}) as r:
        body = await r.json(content_type=None)
        return r.status, r.headers, body


async def usage(gw: Any, limit: str = "conc") -> dict[str, Any]:
    async with gw.session.get(gw.admin_url + f"/ratelimiter/usage?limit={limit}") as r:
        assert r.status == 200
        return {row["key"]: row for row in (await r.json())["usage"]}


async def test_n_in_flight_are_admitted_the_next_is_refused_and_slots_come_back(
        lucid_upstream, lucid_gateway):
    held = HeldUpstream()
    upstream = await lucid_upstream(held.handler)
    gw = await lucid_gateway(config(upstream.url, CONCURRENCY))
    first = [asyncio.create_task(get(gw)) for _ in range(3)]
    await wait_until(lambda: held.arrived == 3, message="three requests at the upstream")

    status, headers, body = await get(gw)  # the fourth, while three are in flight
    assert status == 429, body
    assert body["limit"] == "conc" and body["retry_after"] == 1
    assert headers["Retry-After"] == "1"
    assert headers["RateLimit-Policy"] == '"conc";q=3'
    assert headers["RateLimit"] == '"conc";r=0;t=1'
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("3", "0")
    assert held.arrived == 3  # the refused request never reached the upstream
    rows = await usage(gw)
    assert rows["h:acme"]["used"] == 3 and rows["h:acme"]["remaining"] == 0
    assert rows["h:acme"]["rejections"] == 1

    held.release()
    assert [(await task)[0] for task in first] == [200, 200, 200]
    await wait_until(lambda: in_flight(gw) == {}, message="the slots to be given back")
    assert (await usage(gw))["h:acme"]["used"] == 0
    # three again, at once: the slots are really free
    held.gate.clear()
    again = [asyncio.create_task(get(gw)) for _ in range(3)]
    await wait_until(lambda: held.arrived == 6, message="three more at the upstream")
    assert (await get(gw))[0] == 429
    held.release()
    assert [(await task)[0] for task in again] == [200, 200, 200]
    await wait_until(lambda: in_flight(gw) == {}, message="the slots to be given back")


async def test_each_key_has_its_own_slots_and_a_refusal_costs_the_rate_limits_nothing(
        lucid_upstream, lucid_gateway):
    held = HeldUpstream()
    upstream = await lucid_upstream(held.handler)
    gw = await lucid_gateway(config(upstream.url, '''
[[ratelimiter.limits]]
id = "per-minute"
rate = "100/minute"
algorithm = "fixed_window"
key = "header"
header = "x-tenant"

[[ratelimiter.limits]]
id = "conc"
algorithm = "concurrency"
max_in_flight = 1
key = "header"
header = "x-tenant"
'''))
    a = asyncio.create_task(get(gw, tenant="a"))
    b = asyncio.create_task(get(gw, tenant="b"))
    await wait_until(lambda: held.arrived == 2, message="one request per tenant upstream")
    assert in_flight(gw) == {"h:a": 1, "h:b": 1}
    status, headers, _ = await get(gw, tenant="a")
    assert status == 429 and headers["RateLimit"].startswith('"conc";r=0')
    assert (await usage(gw, "per-minute"))["h:a"]["used"] == 1  # the refused one was refunded
    held.release()
    assert [(await a)[0], (await b)[0]] == [200, 200]
    await wait_until(lambda: in_flight(gw) == {}, message="the slots to be given back")
    status, headers, _ = await get(gw, tenant="a")
    assert status == 200
    # admitted responses announce the rate limits (a count of requests in flight would
    # be stale by the time the client reads it)
    assert headers["RateLimit-Policy"] == '"per-minute";q=100;w=60'


async def test_slots_come_back_whatever_ends_the_exchange(lucid_upstream, lucid_gateway):
    """Upstream 500, upstream timeout (504), an instance that refuses connections (the
    fallback answer), and a client that goes away before the upstream answers."""
    held = HeldUpstream()
    upstream = await lucid_upstream(held.handler)

    async def fail(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "boom"}, status=500)

    failing = await lucid_upstream(fail)
    gone = await lucid_upstream()
    dead_url = gone.url
    await gone.close()  # nothing listens there any more: connections are refused
    gw = await lucid_gateway(config(upstream.url, CONCURRENCY, services=f'''
[gateway.services.failing]
instances = ["{failing.url}"]

[gateway.services.dead]
instances = ["{dead_url}"]
''', routes='''
[[gateway.routes]]
id = "failing"
prefix = "/failing"
service = "failing"

[[gateway.routes]]
id = "dead"
prefix = "/dead"
service = "dead"

[[gateway.routes]]
id = "slow"
prefix = "/slow"
service = "svc"
timeouts = { read = "100ms" }
retries = { attempts = 1 }
'''))
    for path, expected in [("/failing", {500}), ("/dead", {502, 503}), ("/slow", {504})]:
        for _ in range(2):
            assert (await get(gw, path))[0] in expected
            await wait_until(lambda: in_flight(gw) == {}, message=f"{path}: the slot back")
    # 6 exchanges, one after the other, with max_in_flight = 3: none kept its slot

    # a client that disconnects while its request waits at the upstream
    reader, writer = await asyncio.open_connection(*gw.proxy_url[len("http://"):].split(":"))
    writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\nX-Tenant: acme\r\n\r\n")
    await writer.drain()
    arrived = held.arrived
    await wait_until(lambda: held.arrived == arrived + 1, message="the request upstream")
    assert in_flight(gw) == {"h:acme": 1}
    writer.close()
    await writer.wait_closed()
    held.release()  # the upstream answers into a closed connection; the exchange ends
    await wait_until(lambda: in_flight(gw) == {}, message="the disconnected client's slot")
    assert [(await get(gw))[0] for _ in range(3)] == [200, 200, 200]


async def test_concurrency_limits_through_the_admin_api(lucid_upstream, lucid_gateway):
    held = HeldUpstream()
    upstream = await lucid_upstream(held.handler)
    gw = await lucid_gateway(config(upstream.url, ""))

    async def call(method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with gw.session.request(method, gw.admin_url + "/ratelimiter" + path, **kw) as r:
            return r.status, await r.json()

    for payload, field in [
        ({"id": "c", "algorithm": "concurrency"}, "max_in_flight"),
        ({"id": "c", "algorithm": "concurrency", "max_in_flight": 0}, "max_in_flight"),
        ({"id": "c", "algorithm": "concurrency", "max_in_flight": 2, "rate": "1/s"}, "rate"),
        ({"id": "c", "rate": "5/s", "max_in_flight": 2}, "max_in_flight"),
    ]:
        status, body = await call("POST", "/limits", json=payload)
        assert status == 422 and field in [f["field"] for f in body["fields"]], body
    assert (await call("GET", "/limits"))[1]["limits"] == []

    status, body = await call("POST", "/limits", json={
        "id": "conc", "algorithm": "concurrency", "max_in_flight": 1, "key": "header",
        "header": "x-tenant"})
    assert status == 201, body
    assert body["max_in_flight"] == 1 and body["rate"] is None
    first = asyncio.create_task(get(gw))
    await wait_until(lambda: held.arrived == 1, message="the first request upstream")
    assert (await get(gw))[0] == 429
    # a new max_in_flight applies at once and keeps counting the request still running
    status, body = await call("PUT", "/limits/conc", json={
        "algorithm": "concurrency", "max_in_flight": 2, "key": "header", "header": "x-tenant"})
    assert status == 200, body
    second = asyncio.create_task(get(gw))
    await wait_until(lambda: held.arrived == 2, message="the second request upstream")
    assert (await get(gw))[0] == 429
    held.release()
    assert [(await first)[0], (await second)[0]] == [200, 200]
    await wait_until(lambda: in_flight(gw) == {}, message="the slots to be given back")
