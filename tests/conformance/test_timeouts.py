"""Slow clients: a request body counts against the route's timeouts on every path
(buffered, streamed, chunked) and a request head against ``server.request_head_timeout``;
either way the client gets 408 and the connection closes. A slow upstream is still 504."""

from __future__ import annotations

import asyncio
import json

from lucid.testing_http import closed_within, read_response
from lucid.testing_internal import route

# Generous: what is asserted is that an answer comes at all, not how fast.
ANSWERED_WITHIN = 15


async def _stalled(served, data: bytes):
    """Send ``data`` and then nothing more; the gateway's answer (or its close)."""
    reader, writer = await served.client.connect()
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), ANSWERED_WITHIN)
    finally:
        writer.close()


def _timed_out(response, message: str) -> None:
    assert response.status == 408, response.raw
    assert response.closed
    assert response.header("connection") == "close"
    assert json.loads(response.body)["error"] == message


BODY_LATE = "request body not received in time"
POST = b"POST /upload HTTP/1.1\r\nHost: a\r\n"


async def test_a_small_declared_body_that_never_comes_gets_408(serve, raw_upstream):
    """Content-Length <= 64 KiB is buffered before the upstream is called: it used to
    wait for the body for ever, past every timeout."""
    upstream = await raw_upstream()
    served = serve(route(upstream.url, 'timeouts = { read = "0.5s" }'))
    response = await _stalled(served, POST + b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
    _timed_out(response, BODY_LATE)
    assert upstream.requests == []


async def test_a_small_body_is_bounded_by_the_total_timeout_too(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url, 'timeouts = { read = "30s", total = "0.5s" }'))
    response = await _stalled(served, POST + b"Content-Length: 1000\r\n\r\n")
    _timed_out(response, BODY_LATE)
    assert upstream.requests == []


async def test_a_large_streamed_body_that_stops_gets_408(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url, 'timeouts = { read = "0.5s" }'))
    response = await _stalled(served, POST + b"Content-Length: 1000000\r\n\r\n" + b"x" * 1000)
    _timed_out(response, BODY_LATE)
    assert upstream.requests == []  # the upstream never had a whole request


async def test_a_large_streamed_body_is_bounded_by_the_total_timeout(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url, 'timeouts = { read = "30s", total = "1s" }'))
    response = await _stalled(served, POST + b"Content-Length: 1000000\r\n\r\n" + b"x" * 1000)
    _timed_out(response, BODY_LATE)
    assert upstream.requests == []


async def test_a_chunked_body_that_stops_gets_408(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url, 'timeouts = { read = "0.5s" }'))
    response = await _stalled(
        served, POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    _timed_out(response, BODY_LATE)
    assert upstream.requests == []


async def test_a_slow_upstream_after_the_whole_body_is_still_504(serve, raw_upstream):
    """The body's timeouts blame the client only while Lucid waits on the client."""
    never = asyncio.Event()

    async def hang(request, reader, writer):
        await never.wait()

    upstream = await raw_upstream(hang)
    served = serve(route(upstream.url, 'timeouts = { read = "0.5s" }'))
    body = b"x" * 100_000
    response = await _stalled(served, POST + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    never.set()
    assert response.status == 504, response.raw
    assert [len(r.body) for r in upstream.requests] == [len(body)]


async def test_a_trickled_head_gets_408_after_the_head_timeout(serve, raw_upstream):
    """A byte every 100 ms keeps a connection busy, never idle: only a timer from the
    head's first byte ends it (it used to last the 75 s keep-alive)."""
    upstream = await raw_upstream()
    served = serve(route(upstream.url), request_head_timeout="0.5s")
    reader, writer = await served.client.connect()

    async def trickle() -> None:
        writer.write(b"GET / HTTP/1.1\r\n")
        for i in range(1000):
            writer.write(b"X-%d: v\r\n" % i)
            await writer.drain()
            await asyncio.sleep(0.1)

    sending = asyncio.create_task(trickle())
    try:
        response = await asyncio.wait_for(read_response(reader), ANSWERED_WITHIN)
    finally:
        sending.cancel()
        writer.close()
    _timed_out(response, "request head not received in time")
    assert upstream.requests == []


async def test_the_head_timeout_does_not_cut_an_idle_keep_alive_connection(
    serve, raw_upstream
):
    upstream = await raw_upstream()
    served = serve(route(upstream.url), request_head_timeout="0.3s")
    reader, writer = await served.client.connect()
    try:
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            await writer.drain()
            response = await asyncio.wait_for(read_response(reader), ANSWERED_WITHIN)
            assert (response.status, response.closed) == (200, False)
            # Idle between requests for several head timeouts: still open.
            assert not await closed_within(reader, 1.5)
    finally:
        writer.close()
    assert len(upstream.requests) == 2


async def test_a_pipelined_head_left_incomplete_gets_408(serve, raw_upstream):
    """The next request's head arrived with the first request: its timer starts when
    the first response ends (not the 75 s keep-alive)."""
    upstream = await raw_upstream()
    served = serve(route(upstream.url), request_head_timeout="0.5s")
    reader, writer = await served.client.connect()
    try:
        writer.write(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n")
        await writer.drain()
        first = await asyncio.wait_for(read_response(reader, None), ANSWERED_WITHIN)
        assert first.status == 200
        second = await asyncio.wait_for(read_response(reader), ANSWERED_WITHIN)
    finally:
        writer.close()
    _timed_out(second, "request head not received in time")
    assert [r.request_line for r in upstream.requests] == [b"GET /1 HTTP/1.1"]
