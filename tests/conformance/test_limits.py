"""Request-head limits: ``server.max_request_header_size`` (414 for the request line,
431 for the head) and ``server.max_request_headers`` (431), however the head arrives."""

from __future__ import annotations

import asyncio
import json

import pytest

from lucid.testing_http import Client, read_response
from lucid.testing_internal import route

KIB = 1024


def _request(target: bytes = b"/", fields: list[bytes] | None = None) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: a", *(fields or [])]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _send_in_pieces(served, data: bytes, piece: int = 4096):
    """Send ``data`` a piece at a time, each piece flushed, until the gateway answers."""
    reader, writer = await served.client.connect()
    answer = asyncio.create_task(read_response(reader))
    try:
        for start in range(0, len(data), piece):
            if answer.done():
                break  # refused mid-head: sending on would only provoke a reset
            writer.write(data[start:start + piece])
            try:
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0)
        return await asyncio.wait_for(answer, 10)
    finally:
        answer.cancel()
        writer.close()


def _refused(response, status: int) -> None:
    assert response.status == status, response.raw
    assert response.closed


# Heads over the 64 KiB default, as one write (that was never measured) and trickled.
OVERSIZED = {
    "request-line": (_request(b"/" + b"a" * (100 * KIB)), 414),
    "one-header": (_request(fields=[b"X-Big: " + b"v" * (100 * KIB)]), 431),
    "many-headers": (_request(fields=[b"X-H%d: v" % i for i in range(10_000)]), 431),
    "just-over": (_request(fields=[b"X-Big: " + b"v" * (64 * KIB)]), 431),
}


@pytest.mark.parametrize("case", sorted(OVERSIZED))
async def test_an_oversized_head_in_one_write_is_refused(serve, raw_upstream, case):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    data, status = OVERSIZED[case]
    response = await served.client.send(data)
    _refused(response, status)
    assert upstream.requests == []


@pytest.mark.parametrize("case", ["request-line", "one-header"])
async def test_an_oversized_head_in_pieces_is_refused(serve, raw_upstream, case):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    data, status = OVERSIZED[case]
    _refused(await _send_in_pieces(served, data), status)
    assert upstream.requests == []


async def test_the_refusal_says_which_limit_in_json(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    response = await served.client.send(OVERSIZED["one-header"][0])
    assert response.header("content-type") == "application/json"
    assert response.header("connection") == "close"
    assert "65536 bytes" in json.loads(response.body)["error"]


async def test_a_head_just_under_the_limit_is_proxied(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    response = await served.client.send(_request(fields=[b"X-Big: " + b"v" * (60 * KIB)]))
    assert response.status == 200
    [seen] = upstream.requests
    assert seen.values("x-big") == ["v" * (60 * KIB)]


async def test_header_count_limit_is_100_by_default(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    at_limit = _request(fields=[b"X-H%d: v" % i for i in range(99)])  # and Host: 100
    assert (await served.client.send(at_limit)).status == 200
    over = _request(fields=[b"X-H%d: v" % i for i in range(100)])
    response = await served.client.send(over)
    _refused(response, 431)
    assert "100 request header fields" in json.loads(response.body)["error"]
    assert len(upstream.requests) == 1


async def test_limits_are_configurable(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url), max_request_header_size="4KiB", max_request_headers=5)
    _refused(await served.client.send(_request(fields=[b"X-Big: " + b"v" * 5000])), 431)
    _refused(await served.client.send(_request(b"/" + b"a" * 5000)), 414)
    _refused(await served.client.send(_request(fields=[b"X-H%d: v" % i for i in range(5)])),
             431)
    ok = await served.client.send(_request(fields=[b"X-H%d: v" % i for i in range(4)]))
    assert ok.status == 200
    assert len(upstream.requests) == 1


async def test_a_head_past_twice_the_limit_is_cut_off_while_it_arrives(serve, raw_upstream):
    """Past twice the limit the parser stops reading (a bound on each connection's
    memory): still a 431 and a close, never a hang nor a head buffered whole."""
    upstream = await raw_upstream()
    served = serve(route(upstream.url), max_request_header_size="4KiB")
    data = _request(fields=[b"X-Big: " + b"v" * (64 * KIB)])
    _refused(await _send_in_pieces(served, data, piece=1024), 431)
    assert upstream.requests == []


async def test_the_admin_listener_holds_the_same_head_limits(serve, raw_upstream):
    """Hostile heads on the admin API get the same 4xx as on the proxy, however they
    arrive, and nothing behind it runs."""
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    host, _, port = served.process.admin_url.removeprefix("http://").rpartition(":")
    admin = Client(host, int(port))
    cases = {
        b"GET /gateway/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n": 431,
        b"GET /gateway/status HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(10_000)) + b"\r\n": 431,
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n": 414,
        b"POST /gateway/config/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n": 400,
    }
    for request, status in cases.items():
        response = await admin.send(request)
        assert response.status == status, (request[:60], response.raw[:200])
        assert response.header("content-type") == "application/json"
        assert response.closed
    assert "config reloaded" not in served.process.output
