"""Keep-alive on Lucid's listeners: an idle connection is closed after
``keep_alive_timeout``, a busy one never, and every idle one at once when the server
drains. Lucid keeps these timeouts on one shared clock instead of Hypercorn's task
per connection (``lucid.server._HeadClock``); these tests hold it to Hypercorn's
behaviour, through a real server and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from hypercorn.asyncio import serve

from lucid.server import bind_socket, hypercorn_config, install_head_timeout
from lucid.testing_http import closed_within, read_response

REQUEST = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
SERVER = SimpleNamespace(grace_period=30.0, max_request_header_size=64 * 1024,
                         request_head_timeout=20.0)


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.asynccontextmanager
async def _server(keep_alive: float) -> AsyncIterator[tuple[str, int, asyncio.Event,
                                                            asyncio.Task[None]]]:
    install_head_timeout()
    sock = bind_socket("127.0.0.1:0")
    host, port = sock.getsockname()[:2]
    config = hypercorn_config(sock, SERVER, "proxy")
    config.keep_alive_timeout = keep_alive
    stop = asyncio.Event()
    task = asyncio.create_task(serve(_hello, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        yield host, port, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    for _ in range(100):  # the server task may not have started accepting yet
        try:
            return await asyncio.open_connection(host, port)
        except ConnectionRefusedError:
            await asyncio.sleep(0.05)
    raise AssertionError("the server never accepted a connection")


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(REQUEST)
    await writer.drain()
    response = await asyncio.wait_for(read_response(reader, closed_wait=None), 10)
    assert response.status == 200, response.raw


async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout() -> None:
    async with _server(keep_alive=1.0) as (host, port, _, _task):
        reader, writer = await _connect(host, port)
        try:
            await _ask(reader, writer)
            assert await closed_within(reader, 10)
        finally:
            writer.close()


async def test_a_connection_that_keeps_asking_is_never_cut() -> None:
    """Each request restarts the timeout: six requests 0.4 s apart outlive a 1 s
    keep-alive timeout twice over on one connection."""
    async with _server(keep_alive=1.0) as (host, port, _, _task):
        reader, writer = await _connect(host, port)
        try:
            for _ in range(6):
                await _ask(reader, writer)
                assert not await closed_within(reader, 0.4)
        finally:
            writer.close()


async def test_draining_closes_idle_connections_at_once() -> None:
    """A server that stops does not wait out its grace period (30 s here) for an idle
    keep-alive connection: it closes it, as it closes one that falls idle later."""
    async with _server(keep_alive=75.0) as (host, port, stop, task):
        idle_reader, idle_writer = await _connect(host, port)
        busy_reader, busy_writer = await _connect(host, port)
        try:
            await _ask(idle_reader, idle_writer)
            busy_writer.write(b"GET / HTTP/1.1\r\n")  # a head begun, not finished
            await busy_writer.drain()
            stop.set()
            assert await closed_within(idle_reader, 10)
            busy_writer.write(b"Host: a\r\n\r\n")  # finished: answered, then closed
            await busy_writer.drain()
            response = await asyncio.wait_for(read_response(busy_reader), 10)
            assert response.status in (0, 200)
            assert response.closed
            await asyncio.wait_for(task, 10)
        finally:
            idle_writer.close()
            busy_writer.close()
