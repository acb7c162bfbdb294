"""What the proxy engines do with a client connection besides one request at a time:
pipelining, HTTP/1.0, 100-continue, chunked answers, a WebSocket handshake (draining:
``test_lifecycle.py``).
Each test runs on every engine (``engine_gateway``)."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from lucid.testing_http import Client, read_response
from lucid.testing_internal import route


def _client(gw) -> Client:
    host, _, port = gw.proxy_url.removeprefix("http://").rpartition(":")
    return Client(host, int(port))


async def test_pipelined_requests_are_answered_in_order(engine_gateway, lucid_upstream):
    async def echo_path(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await asyncio.sleep(0.2)  # answered last were it not for the order
        return web.Response(text=request.path)

    upstream = await lucid_upstream(echo_path)
    gw = await engine_gateway(route(upstream.url))
    reader, writer = await _client(gw).connect()
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                     b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        bodies = [(await asyncio.wait_for(read_response(reader, None), 10)).body
                  for _ in range(3)]
    finally:
        writer.close()
    assert bodies == [b"/slow", b"/b", b"/c"]


async def test_an_http_1_0_client_is_answered_and_closed_unless_it_keeps_alive(
    engine_gateway, lucid_upstream
):
    """An HTTP/1.0 client cannot read a chunked body: it gets a length or a close. One
    that asks for keep-alive may keep the connection (the fast engine does; h11, under
    Hypercorn, always closes HTTP/1.0)."""
    upstream = await lucid_upstream()
    gw = await engine_gateway(route(upstream.url))
    responses = []
    for request in (b"GET /a HTTP/1.0\r\nHost: a\r\n\r\n",
                    b"GET /b HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"):
        responses.append(await _client(gw).send(request))
    plain, kept = responses
    assert (plain.status, plain.closed) == (200, True)
    assert kept.status == 200 and json.loads(kept.body)["path"] == "/b"
    assert kept.closed or kept.header("connection") == "keep-alive"


async def test_expect_100_continue_gets_the_body_sent(engine_gateway, lucid_upstream):
    upstream = await lucid_upstream()
    gw = await engine_gateway(route(upstream.url))
    reader, writer = await _client(gw).connect()
    try:
        writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"hello")
        await writer.drain()
        response = await asyncio.wait_for(read_response(reader, None), 10)
    finally:
        writer.close()
    assert response.status == 200
    assert json.loads(response.body)["body_size"] == 5


async def test_a_response_of_unknown_length_reaches_the_client_whole(
    engine_gateway, lucid_upstream
):
    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)  # chunked: no Content-Length
        for part in (b"one,", b"two,", b"three"):
            await response.write(part)
        await response.write_eof()
        return response

    upstream = await lucid_upstream(streamed)
    gw = await engine_gateway(route(upstream.url))
    async with gw.session.get(f"{gw.proxy_url}/s") as r:
        assert r.status == 200
        assert await r.read() == b"one,two,three"


async def test_a_websocket_handshake_not_accepted_upstream_gets_its_answer(
    engine_gateway, lucid_upstream
):
    """A handshake is proxied (``test_websocket.py``); an instance that answers it with
    no 101 has its answer passed on, and the connection ends with it."""
    upstream = await lucid_upstream()
    gw = await engine_gateway(route(upstream.url))
    response = await _client(gw).send(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert (response.status, response.closed) == (200, True)
    (request,) = upstream.requests
    assert request.headers["Upgrade"] == "websocket"
    assert request.headers["Sec-WebSocket-Key"] == "dGhlIHNhbXBsZSBub25jZQ=="


async def test_an_upgrade_request_with_a_body_is_refused_by_the_fast_engine(
    lucid_gateway, lucid_upstream
):
    """llhttp stops reading at the head of a request asking to upgrade: a body after
    it would be left unread, and be read as the next request."""
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route(upstream.url), engine="fast")
    response = await _client(gw).send(
        b"POST /u HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
        b"Upgrade: h2c\r\nContent-Length: 30\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\n\r\n")
    assert (response.status, response.closed) == (400, True)
    assert upstream.requests == []
