"""The data plane end to end: real upstreams on loopback, a real gateway, a real client."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from lucid.testing import wait_until
from lucid.testing_http import read_response


@pytest.fixture
def lucid_gateway(engine_gateway):
    """Every test here runs on each proxy engine (``engine_gateway`` in conftest)."""
    return engine_gateway


def route_config(*urls: str, extra_route: str = "", server: str = "", **route: str) -> str:
    """A config with one service ``svc`` and one prefix route to it."""
    instances = ", ".join(f'"{u}"' for u in urls)
    settings = "\n".join(f"{k} = {v}" for k, v in route.items())
    return f"""
{server}
[gateway.services.svc]
instances = [{instances}]

[[gateway.routes]]
id = "main"
prefix = "/"
service = "svc"
{settings}
{extra_route}
"""


async def body_of(response: aiohttp.ClientResponse) -> dict:
    return json.loads(await response.read())


async def assert_cut_off(gw, path: str, caplog, logged: str) -> None:
    """The response starts (200), then the gateway closes the connection mid-body and
    logs ``logged``."""
    async with gw.session.get(f"{gw.proxy_url}{path}") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), timeout=10)
    await wait_until(lambda: logged in caplog.text, message=f"{logged!r} in the log")


# --- pass-through --------------------------------------------------------------------


async def test_method_path_query_and_body_reach_the_upstream(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_config(upstream.url))
    url = URL(f"{gw.proxy_url}/a/b%20c?x=1&y=%2F", encoded=True)
    async with gw.session.put(url, data=b"x" * 1000) as r:
        assert r.status == 200
        seen = await body_of(r)
    assert seen["method"] == "PUT"
    assert seen["path"] == "/a/b%20c"
    assert seen["query"] == "x=1&y=%2F"
    assert seen["body_size"] == 1000
    assert seen["headers"]["content-length"] == "1000"


async def test_upstream_status_headers_and_body_come_back_unchanged(
    lucid_upstream, lucid_gateway
):
    async def teapot(request: web.Request) -> web.Response:
        return web.Response(status=418, body=b"short and stout",
                            headers={"X-Custom": "yes", "Set-Cookie": "a=1"})

    upstream = await lucid_upstream(teapot)
    gw = await lucid_gateway(route_config(upstream.url))
    async with gw.session.get(f"{gw.proxy_url}/pot") as r:
        assert r.status == 418
        assert await r.read() == b"short and stout"
        assert r.headers["X-Custom"] == "yes"
        assert r.headers["Set-Cookie"] == "a=1"


async def test_compressed_bodies_pass_through_untouched(lucid_upstream, lucid_gateway):
    import gzip

    payload = gzip.compress(b"hello " * 1000)

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(body=payload, headers={"Content-Encoding": "gzip"})

    upstream = await lucid_upstream(gzipped)
    gw = await lucid_gateway(route_config(upstream.url))
    async with gw.session.get(f"{gw.proxy_url}/z", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert await r.read() == payload
    seen = upstream.requests[-1].headers
    assert seen["Accept-Encoding"] == "gzip"
    assert "User-Agent" in seen  # the client's own, not one added by Lucid's client


async def test_chunked_upload_and_streamed_download(lucid_upstream, lucid_gateway):
    async def stream_back(request: web.Request) -> web.StreamResponse:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(size // 100_000):
            await response.write(b"y" * 100_000)
        await response.write_eof()
        return response

    async def chunks():
        for _ in range(20):
            yield b"x" * 100_000

    upstream = await lucid_upstream(stream_back)
    gw = await lucid_gateway(route_config(upstream.url))
    async with gw.session.post(f"{gw.proxy_url}/up", data=chunks()) as r:
        assert r.status == 200
        assert len(await r.read()) == 2_000_000
    assert upstream.requests[-1].headers.get("Transfer-Encoding") == "chunked"


async def test_head_and_no_content_responses_have_no_body(lucid_upstream, lucid_gateway):
    async def answer(request: web.Request) -> web.Response:
        if request.path == "/empty":
            return web.Response(status=204)
        return web.Response(body=b"x" * 10)

    upstream = await lucid_upstream(answer)
    gw = await lucid_gateway(route_config(upstream.url))
    async with gw.session.head(f"{gw.proxy_url}/h") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "10"
        assert await r.read() == b""
    async with gw.session.get(f"{gw.proxy_url}/empty") as r:
        assert r.status == 204
        assert await r.read() == b""


# --- headers ---------------------------------------------------------------------------


async def test_hop_by_hop_headers_are_removed_both_ways(lucid_upstream, lucid_gateway):
    async def hoppy(request: web.Request) -> web.Response:
        return web.Response(body=b"ok", headers={
            "Connection": "X-Upstream-Private", "X-Upstream-Private": "secret",
            "Keep-Alive": "timeout=5", "Proxy-Authenticate": "Basic", "X-Kept": "1",
        })

    upstream = await lucid_upstream(hoppy)
    gw = await lucid_gateway(route_config(upstream.url))
    headers = {
        "Connection": "keep-alive, X-Client-Private", "X-Client-Private": "secret",
        "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Authorization": "Basic eA==",
        "Upgrade": "websocket", "X-Kept": "1",
    }
    async with gw.session.get(f"{gw.proxy_url}/h", headers=headers) as r:
        assert r.status == 200
        for name in ("X-Upstream-Private", "Keep-Alive", "Proxy-Authenticate"):
            assert name not in r.headers
        assert r.headers["X-Kept"] == "1"
    seen = {k.lower() for k in upstream.requests[-1].headers}
    for name in ("x-client-private", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert name not in seen
    assert "x-kept" in seen


async def test_forwarded_headers_from_an_untrusted_client_are_replaced(
    lucid_upstream, lucid_gateway
):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_config(upstream.url))
    spoofed = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
               "X-Forwarded-Host": "evil.example", "Host": "shop.example"}
    async with gw.session.get(f"{gw.proxy_url}/x", headers=spoofed) as r:
        seen = (await body_of(r))["headers"]
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "shop.example"
    assert seen["via"] == "1.1 lucid"


async def test_forwarded_for_is_appended_behind_a_trusted_proxy(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(
        route_config(upstream.url, server='[server]\ntrusted_proxies = ["127.0.0.0/8"]')
    )
    headers = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
               "X-Forwarded-Host": "api.example", "Via": "1.1 edge"}
    async with gw.session.get(f"{gw.proxy_url}/x", headers=headers) as r:
        seen = (await body_of(r))["headers"]
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == "api.example"
    assert seen["via"] == "1.1 edge, 1.1 lucid"


async def test_request_id_is_propagated_or_generated(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_config(upstream.url))
    async with gw.session.get(f"{gw.proxy_url}/x", headers={"X-Request-ID": "abc-123"}) as r:
        assert r.headers["X-Request-ID"] == "abc-123"
        assert (await body_of(r))["headers"]["x-request-id"] == "abc-123"
    async with gw.session.get(f"{gw.proxy_url}/x") as r:
        generated = r.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        assert (await body_of(r))["headers"]["x-request-id"] == generated
    async with gw.session.get(f"{gw.proxy_url}/x", headers={"X-Request-ID": "bad id\t!"}) as r:
        assert r.headers["X-Request-ID"] != "bad id\t!"


async def test_traceparent_is_propagated_and_started_when_missing(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_config(upstream.url))
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = {"traceparent": incoming, "tracestate": "vendor=1"}
    async with gw.session.get(f"{gw.proxy_url}/x", headers=headers) as r:
        seen = (await body_of(r))["headers"]
    assert seen["traceparent"] == incoming
    assert seen["tracestate"] == "vendor=1"
    async with gw.session.get(f"{gw.proxy_url}/x") as r:
        started = (await body_of(r))["headers"]["traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", started)
    bad = {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01",
           "tracestate": "vendor=1"}
    async with gw.session.get(f"{gw.proxy_url}/x", headers=bad) as r:
        seen = (await body_of(r))["headers"]
    assert seen["traceparent"] != bad["traceparent"]
    assert "tracestate" not in seen


async def test_preserve_host_sends_the_clients_host(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_config(upstream.url, preserve_host="true"))
    async with gw.session.get(f"{gw.proxy_url}/x", headers={"Host": "shop.example"}) as r:
        assert (await body_of(r))["headers"]["host"] == "shop.example"


# --- routing through the proxy -----------------------------------------------------------


async def test_routes_pick_services_strip_and_rewrite(lucid_upstream, lucid_gateway):
    users, orders = await lucid_upstream(), await lucid_upstream()
    gw = await lucid_gateway(f"""
[gateway.services.users]
instances = ["{users.url}"]
[gateway.services.orders]
instances = ["{orders.url}"]

[[gateway.routes]]
prefix = "/api/users"
strip_prefix = true
service = "users"

[[gateway.routes]]
pattern = "/api/orders/{{id}}"
rewrite = "/v2/orders/{{id}}/detail"
methods = ["GET"]
service = "orders"

[[gateway.routes]]
path = "/api/orders/special"
service = "users"
""")
    async with gw.session.get(f"{gw.proxy_url}/api/users/7/profile") as r:
        assert (await body_of(r))["path"] == "/7/profile"
    async with gw.session.get(f"{gw.proxy_url}/api/orders/42") as r:
        assert (await body_of(r))["path"] == "/v2/orders/42/detail"
    async with gw.session.get(f"{gw.proxy_url}/api/orders/special") as r:
        assert (await body_of(r))["path"] == "/api/orders/special"
        assert users.requests[-1].path == "/api/orders/special"
    async with gw.session.post(f"{gw.proxy_url}/api/orders/42") as r:
        assert r.status == 404
        body = await body_of(r)
        assert body["error"] == "no route matches this request"
        assert body["request_id"] == r.headers["X-Request-ID"]


@pytest.mark.parametrize("path", [
    "/public/../admin/secret",
    "/public/%2e%2e/admin/secret",
    "/public/%2E%2E/admin/secret",
    "/public/..%2fadmin/secret",
    "/public/.%2e/admin/secret",
])
async def test_dot_segments_cannot_escape_a_route(lucid_upstream, lucid_gateway, path):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(f"""
[gateway.services.svc]
instances = ["{upstream.url}"]
[[gateway.routes]]
prefix = "/public"
service = "svc"
""")
    reader, writer = await asyncio.open_connection(*gw.runtime.listeners["proxy"].split(":"))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 404"), response[:200]
    assert not upstream.requests


async def test_duplicate_slashes_and_dots_are_normalised_before_matching(
    lucid_upstream, lucid_gateway
):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(f"""
[gateway.services.svc]
instances = ["{upstream.url}"]
[[gateway.routes]]
path = "/a/b"
service = "svc"
""")
    for path in ("//a//b", "/a/./b", "/x/../a/b", "/a/%2e/b"):
        reader, writer = await asyncio.open_connection(*gw.runtime.listeners["proxy"].split(":"))
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        response = await reader.read()
        writer.close()
        assert response.startswith(b"HTTP/1.1 200"), (path, response[:200])
        assert upstream.requests[-1].path == "/a/b"


# --- failures ------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_connection_refused_answers_502(lucid_gateway):
    gw = await lucid_gateway(route_config(f"http://127.0.0.1:{closed_port()}"))
    async with gw.session.get(f"{gw.proxy_url}/x") as r:
        assert r.status == 502
        body = await body_of(r)
        assert body["error"] == "upstream connect error"
        assert body["request_id"] == r.headers["X-Request-ID"]


async def test_connection_reset_answers_502(lucid_gateway):
    async def reset(reader, writer):
        await reader.readline()
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await lucid_gateway(route_config(f"http://127.0.0.1:{port}"))
        async with gw.session.get(f"{gw.proxy_url}/x") as r:
            assert r.status == 502
    finally:
        server.close()


async def test_read_timeout_answers_504(lucid_upstream, lucid_gateway):
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=b"late")

    upstream = await lucid_upstream(slow)
    gw = await lucid_gateway(route_config(
        upstream.url, timeouts='{ read = "200ms" }', retries="{ attempts = 1 }"))
    async with gw.session.get(f"{gw.proxy_url}/x") as r:
        assert r.status == 504
        assert (await body_of(r))["error"] == "upstream timeout"
    release.set()


async def test_total_timeout_answers_504(lucid_upstream, lucid_gateway):
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b".")
            await asyncio.sleep(0.05)
        return response

    async def headers_late(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)  # the upstream's own pace, not test synchronisation
        return web.Response(body=b"x")

    app = web.Application()
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/late", headers_late)
    upstream = await lucid_upstream(app)
    gw = await lucid_gateway(route_config(
        upstream.url, timeouts='{ read = "5s", total = "100ms" }', retries="{ attempts = 1 }"))
    async with gw.session.get(f"{gw.proxy_url}/late") as r:
        assert r.status == 504


async def test_total_timeout_covers_the_response_body(lucid_upstream, lucid_gateway, caplog):
    """Headers come in time, the body does not: the status line is gone, so the client
    connection is closed when the deadline passes, long before the upstream would end."""
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(200):
            await response.write(b".")
            await asyncio.sleep(0.05)  # the upstream's own pace: 10 s in all
        return response

    upstream = await lucid_upstream(trickle)
    gw = await lucid_gateway(route_config(
        upstream.url, timeouts='{ read = "5s", total = "300ms" }', retries="{ attempts = 1 }"))
    await assert_cut_off(gw, "/trickle", caplog, "failed mid-response (TimeoutError)")


async def test_connect_timeout_answers_504(lucid_gateway):
    # A listener whose accept queue is full and never drained: the kernel drops
    # further SYNs, so a connect hangs until the gateway's connect timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        gw = await lucid_gateway(route_config(
            f"http://127.0.0.1:{port}", timeouts='{ connect = "200ms" }',
            retries="{ attempts = 1 }"))
        async with gw.session.get(f"{gw.proxy_url}/x") as r:
            assert r.status == 504
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_body_over_the_route_limit_answers_413(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_config(upstream.url, max_body_size='"1KiB"'))
    async with gw.session.post(f"{gw.proxy_url}/x", data=b"x" * 2048) as r:
        assert r.status == 413
    assert not upstream.requests

    async def chunks():
        for _ in range(10):
            yield b"x" * 512

    async with gw.session.post(f"{gw.proxy_url}/x", data=chunks()) as r:
        assert r.status == 413
    async with gw.session.post(f"{gw.proxy_url}/x", data=b"x" * 1024) as r:
        assert r.status == 200


async def test_a_client_slow_with_its_body_gets_408_and_is_not_the_upstreams_failure(
    lucid_upstream, lucid_gateway
):
    """While Lucid waits for the client's body the upstream waits too; when the route's
    read timeout passes, that is the client's fault (408), not a failed upstream call
    for breakers and passive health (it used to be a 504 that opened the breaker)."""
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_config(
        upstream.url, timeouts='{ read = "0.5s" }', retries="{ attempts = 1 }",
        extra_route='[circuitbreaker.circuits.svc]\nservice = "svc"\nconsecutive_failures = 1',
    ))
    host, _, port = gw.proxy_url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n"
                     + b"x" * 1000)
        await writer.drain()
        response = await asyncio.wait_for(read_response(reader), 15)
    finally:
        writer.close()
    assert response.status == 408
    assert response.closed
    async with gw.session.get(f"{gw.proxy_url}/after") as r:
        assert r.status == 200  # the breaker saw no failure


async def test_upstream_dying_mid_response_closes_the_client_connection(
    lucid_gateway, caplog
):
    async def half(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(half, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await lucid_gateway(route_config(f"http://127.0.0.1:{port}"))
        await assert_cut_off(gw, "/x", caplog, "failed mid-response")
    finally:
        server.close()


async def test_upstream_dying_mid_chunked_response_is_not_passed_off_as_complete(
    lucid_gateway,
):
    async def half(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"100000\r\n" + b"x" * 5000)
        await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(half, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await lucid_gateway(route_config(f"http://127.0.0.1:{port}"))
        async with gw.session.get(f"{gw.proxy_url}/x") as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(r.read(), timeout=10)
    finally:
        server.close()


# --- retries -------------------------------------------------------------------------------


async def test_idempotent_requests_retry_on_another_instance(lucid_upstream, lucid_gateway):
    good = await lucid_upstream()
    gw = await lucid_gateway(route_config(f"http://127.0.0.1:{closed_port()}", good.url))
    for _ in range(6):  # whichever instance is picked first, the request succeeds
        async with gw.session.get(f"{gw.proxy_url}/x") as r:
            assert r.status == 200
    assert len(good.requests) == 6


async def test_connect_failures_retry_even_for_post(lucid_upstream, lucid_gateway):
    good = await lucid_upstream()
    gw = await lucid_gateway(route_config(f"http://127.0.0.1:{closed_port()}", good.url))
    for _ in range(4):
        async with gw.session.post(f"{gw.proxy_url}/x", data=b"payload") as r:
            assert r.status == 200
            assert (await body_of(r))["body_size"] == 7


async def test_retryable_statuses_retry_idempotent_methods_only(lucid_upstream, lucid_gateway):
    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, body=b"busy")

    bad, good = await lucid_upstream(unavailable), await lucid_upstream()
    gw = await lucid_gateway(route_config(bad.url, good.url, retries="{ attempts = 2 }"))
    for _ in range(4):
        async with gw.session.get(f"{gw.proxy_url}/x") as r:
            assert r.status == 200
    statuses = []
    for _ in range(4):
        async with gw.session.post(f"{gw.proxy_url}/x", data=b"p") as r:
            statuses.append(r.status)
    assert 503 in statuses
    posts = [r for r in bad.requests + good.requests if r.method == "POST"]
    assert len(posts) == 4  # a POST that reached an instance is never sent twice


async def test_attempts_are_bounded_by_the_route(lucid_upstream, lucid_gateway):
    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503)

    a, b, c = [await lucid_upstream(unavailable) for _ in range(3)]
    gw = await lucid_gateway(route_config(a.url, b.url, c.url, retries="{ attempts = 2 }"))
    async with gw.session.get(f"{gw.proxy_url}/x") as r:
        assert r.status == 503
    assert len(a.requests) + len(b.requests) + len(c.requests) == 2


async def test_an_empty_retry_budget_stops_retries(lucid_upstream, lucid_gateway):
    good = await lucid_upstream()
    gw = await lucid_gateway(route_config(
        f"http://127.0.0.1:{closed_port()}", good.url,
        retries="{ attempts = 3, budget_percent = 0, min_concurrency = 0 }"))
    statuses = set()
    for _ in range(6):
        async with gw.session.get(f"{gw.proxy_url}/x") as r:
            statuses.add(r.status)
    assert statuses == {200, 502}


# --- the generation a request started with ------------------------------------------------


async def test_in_flight_requests_finish_on_the_config_they_started_with(
    lucid_upstream, lucid_gateway
):
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=b"old")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(body=b"new")

    old, new = await lucid_upstream(slow), await lucid_upstream(fast)
    gw = await lucid_gateway(route_config(old.url))
    pending = asyncio.create_task(gw.session.get(f"{gw.proxy_url}/x"))
    await wait_until(lambda: old.requests, message="the slow request to arrive")
    gw.config_path.write_text(gw.config_path.read_text().replace(old.url, new.url))
    async with gw.session.post(f"{gw.admin_url}/gateway/config/reload") as r:
        assert r.status == 200
        assert (await r.json())["generation"] == 2
    async with gw.session.get(f"{gw.proxy_url}/x") as r:
        assert await r.read() == b"new"
    release.set()
    response = await pending
    assert await response.read() == b"old"
    response.release()


async def test_an_invalid_reload_changes_nothing(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_config(upstream.url))
    good = gw.config_path.read_text()
    gw.config_path.write_text(good.replace('prefix = "/"', 'prefix = "no-slash"'))
    async with gw.session.post(f"{gw.admin_url}/gateway/config/reload") as r:
        assert r.status == 422
        body = await r.json()
    assert any("gateway.routes[0].prefix" in p for p in body["problems"])
    assert gw.runtime.generation.number == 1
    async with gw.session.get(f"{gw.proxy_url}/still") as r:
        assert r.status == 200


async def test_responses_carry_exactly_one_date_header(lucid_upstream, lucid_gateway):
    async def dated(request: web.Request) -> web.Response:
        return web.Response(body=b"x", headers={"Date": "Sun, 06 Nov 1994 08:49:37 GMT"})

    upstream = await lucid_upstream(dated)
    gw = await lucid_gateway(route_config(upstream.url))
    async with gw.session.get(f"{gw.proxy_url}/x") as r:
        assert r.headers.getall("Date") == ["Sun, 06 Nov 1994 08:49:37 GMT"]
    async with gw.session.get(f"{gw.proxy_url}/x", headers={"x-request-id": "a b"}) as r:
        assert len(r.headers.getall("Date")) == 1
    gw2 = await lucid_gateway(route_config(f"http://127.0.0.1:{closed_port()}"))
    async with gw2.session.get(f"{gw2.proxy_url}/x") as r:
        assert r.status == 502
        assert len(r.headers.getall("Date")) == 1
