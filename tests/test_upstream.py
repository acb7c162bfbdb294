"""The proxy's upstream pool against real loopback upstreams, well-behaved and not."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop
from yarl import URL

from lucid.testing import wait_until
from lucid.testing_http import RawUpstream, answer_ok
from lucid.upstream import (
    HIGH_WATER,
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    iterate,
)


@pytest.fixture
async def pool():
    upstreams = UpstreamPool(limit=10, keepalive=30)
    yield upstreams
    await upstreams.close()


@pytest.fixture
async def upstream_factory():
    started: list[RawUpstream] = []

    async def start(respond=answer_ok) -> RawUpstream:
        upstream = await RawUpstream(respond).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


async def fetch(pool: UpstreamPool, url: str, method: str = "GET", body=None,
                headers=None, **timeouts) -> tuple[int, dict[str, str], bytes]:
    response = await pool.request(method, URL(url), headers or [], body, **timeouts)
    try:
        return response.status, response.headers, await response.read()
    finally:
        response.release()


async def test_a_request_and_its_response_cross_intact_and_the_connection_is_reused(
    pool, upstream_factory
):
    upstream = await upstream_factory()
    for _ in range(3):
        status, headers, body = await fetch(pool, upstream.url + "/a/b?x=1",
                                            headers=[("x-one", "1")])
        assert (status, body, headers["content-type"]) == (200, b"ok", "text/plain")
    assert [r.request_line for r in upstream.requests] == [b"GET /a/b?x=1 HTTP/1.1"] * 3
    assert upstream.requests[0].values("host") == [f"127.0.0.1:{upstream.port}"]
    assert upstream.requests[0].values("x-one") == ["1"]
    assert len(pool) == 1 and pool.idle() == 1


async def test_a_buffered_body_gets_its_length_and_a_streamed_one_goes_chunked(
    pool, upstream_factory
):
    upstream = await upstream_factory()
    await fetch(pool, upstream.url, "POST", b"hello")
    await fetch(pool, upstream.url, "POST", iterate([b"hel", b"", b"lo"]))
    await fetch(pool, upstream.url, "POST", iterate([b"hel", b"lo"]),
                headers=[("content-length", "5")])
    await fetch(pool, upstream.url, "POST")
    first, second, third, empty = upstream.requests
    assert first.body == second.body == third.body == b"hello"
    assert first.values("content-length") == ["5"]
    assert second.values("transfer-encoding") == ["chunked"]
    assert not second.has("content-length")
    assert third.values("content-length") == ["5"] and not third.has("transfer-encoding")
    assert empty.values("content-length") == ["0"]


async def test_the_framing_sent_is_the_pools_own(pool, upstream_factory):
    """A body is never longer nor shorter than the upstream is told: extra bytes would
    be read there as another request (request smuggling)."""
    upstream = await upstream_factory()
    await fetch(pool, upstream.url, "POST", b"hello", headers=[("content-length", "50")])
    await fetch(pool, upstream.url, "POST", b"x", headers=[("transfer-encoding", "chunked")])
    with pytest.raises(UpstreamError):
        await fetch(pool, upstream.url, "POST", iterate([b"GET /smuggled HTTP/1.1\r\n\r\n"]),
                    headers=[("content-length", "3")])
    first, second = upstream.requests  # nothing of the third reached the upstream
    assert first.values("content-length") == ["5"] and first.body == b"hello"
    assert second.values("content-length") == ["1"] and not second.has("transfer-encoding")


async def test_a_header_value_with_a_line_break_is_never_sent(pool, upstream_factory):
    upstream = await upstream_factory()
    with pytest.raises(ValueError):
        await fetch(pool, upstream.url, headers=[("x-a", "1\r\nx-injected: yes")])
    assert upstream.requests == []


async def test_chunked_head_bodyless_and_close_delimited_responses(pool, upstream_factory):
    answers = {
        b"/chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"/head": b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
        b"/nocontent": b"HTTP/1.1 204 No Content\r\n\r\n",
        b"/continue": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n"
                      b"\r\nc",
    }

    async def respond(request, reader, writer):
        writer.write(answers[request.request_line.split()[1]])
        await writer.drain()

    upstream = await upstream_factory(respond)
    assert (await fetch(pool, upstream.url + "/chunked"))[2] == b"abcde"
    status, headers, body = await fetch(pool, upstream.url + "/head", "HEAD")
    assert (status, headers["content-length"], body) == (200, "1000", b"")
    assert (await fetch(pool, upstream.url + "/nocontent"))[:3:2] == (204, b"")
    assert (await fetch(pool, upstream.url + "/continue"))[:3:2] == (200, b"c")
    assert len(upstream.requests) == 4
    assert len(pool) == 1  # every one of them left the connection reusable

    async def until_close(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    eof = await upstream_factory(until_close)
    assert (await fetch(pool, eof.url))[2] == b"all of it"
    await wait_until(lambda: len(pool) == 1, message="the close-delimited connection gone")


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 2OO OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nx-big: " + b"v" * 70_000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"x: y\r\n" * 300 + b"\r\n",
    b"",  # closed without a word
])
async def test_a_broken_response_is_an_upstream_error(pool, upstream_factory, answer):
    async def respond(request, reader, writer):
        writer.write(answer)
        await writer.drain()
        writer.close()

    upstream = await upstream_factory(respond)
    with pytest.raises(UpstreamError):
        await fetch(pool, upstream.url)
    await wait_until(lambda: len(pool) == 0, message="the broken connection closed")


async def test_a_body_cut_short_is_an_error_mid_response(pool, upstream_factory):
    async def respond(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    upstream = await upstream_factory(respond)
    response = await pool.request("GET", URL(upstream.url), [])
    assert response.status == 200
    with pytest.raises(UpstreamError):
        await response.read()
    response.release()
    await wait_until(lambda: len(pool) == 0, message="the connection closed")


async def test_read_timeouts_cover_the_head_and_each_piece_of_the_body(
    pool, upstream_factory
):
    never = asyncio.Event()

    async def slow_head(request, reader, writer):
        await never.wait()

    async def slow_body(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
        await writer.drain()
        await never.wait()

    head = await upstream_factory(slow_head)
    with pytest.raises(UpstreamTimeout):
        await fetch(pool, head.url, read_timeout=0.2)
    body = await upstream_factory(slow_body)
    response = await pool.request("GET", URL(body.url), [], read_timeout=0.2)
    assert await response.read_chunk() == b"first"
    with pytest.raises(UpstreamTimeout):
        await response.read_chunk()
    response.release()
    await wait_until(lambda: len(pool) == 0, message="the timed-out connections closed")
    never.set()


async def test_a_refused_connection_is_a_connect_error(pool):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamConnectError):
        await fetch(pool, f"http://127.0.0.1:{port}")
    assert len(pool) == 0


async def test_a_stale_connection_is_retried_once_for_an_idempotent_request(
    pool, upstream_factory
):
    async def once(request, reader, writer):  # answers, then closes while idle
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    upstream = await upstream_factory(once)
    await fetch(pool, upstream.url)
    await asyncio.sleep(0.2)  # the upstream closes its side while the pool holds it
    status, _, body = await fetch(pool, upstream.url)  # found stale, sent again
    assert (status, body) == (200, b"ok")
    assert len(upstream.requests) == 2


async def test_a_post_on_a_stale_connection_is_not_sent_twice(upstream_factory):
    pool = UpstreamPool(limit=10, keepalive=30)

    async def respond(request, reader, writer):
        if request.request_line.startswith(b"POST"):
            writer.transport.abort()  # read it, then vanish without an answer
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    try:
        upstream = await upstream_factory(respond)
        await fetch(pool, upstream.url)
        with pytest.raises(UpstreamError):
            await fetch(pool, upstream.url, "POST", b"once")
        assert [r.body for r in upstream.requests if r.body] == [b"once"]
    finally:
        await pool.close()


async def test_the_limit_makes_a_caller_wait_for_a_free_connection(upstream_factory):
    pool = UpstreamPool(limit=1, keepalive=30)
    try:
        upstream = await upstream_factory()
        first = await pool.request("GET", URL(upstream.url), [])
        waiting = asyncio.create_task(fetch(pool, upstream.url))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await first.read()
        first.release()
        assert (await asyncio.wait_for(waiting, 5))[2] == b"ok"
        with pytest.raises(UpstreamTimeout):
            held = await pool.request("GET", URL(upstream.url), [])
            try:
                other = await upstream_factory()
                await fetch(pool, other.url + "/x", connect_timeout=0.1)
            finally:
                held.release()
    finally:
        await pool.close()


async def test_large_bodies_stream_both_ways_with_bounded_buffers(pool, upstream_factory):
    size = 16 * 1024 * 1024
    piece = b"x" * 65536

    async def echo_length(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // len(piece)):
            writer.write(piece)
            await writer.drain()

    upstream = await upstream_factory(echo_length)

    async def upload():
        for _ in range(size // len(piece)):
            yield piece

    response = await pool.request("POST", URL(upstream.url), [], upload())
    assert upstream.requests[0].values("transfer-encoding") == ["chunked"]
    assert len(upstream.requests[0].body) == size
    total = 0
    await asyncio.sleep(0.2)  # let the upstream run ahead: the pool must stop reading
    first = await response.read_chunk()
    assert len(first) <= HIGH_WATER + 65536 * 4
    total += len(first)
    while chunk := await response.read_chunk():
        total += len(chunk)
    response.release()
    assert total == size
    assert pool.idle() == 1


def test_the_pool_runs_on_uvloop():
    """``lucid serve`` runs on uvloop, whose transports are not asyncio's classes."""

    async def main() -> None:
        upstream = await RawUpstream(answer_ok).start()
        upstreams = UpstreamPool(limit=2, keepalive=30)
        try:
            for _ in range(2):
                assert (await fetch(upstreams, upstream.url, "POST", iterate([b"a", b"b"])))[
                    2] == b"ok"
            assert [r.body for r in upstream.requests] == [b"ab", b"ab"]
            assert len(upstreams) == 1
        finally:
            await upstreams.close()
            await upstream.close()

    uvloop.run(main())
