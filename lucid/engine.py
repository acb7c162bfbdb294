"""The fast proxy engine: HTTP/1.1 served by an asyncio protocol that parses with llhttp
(``httptools``) on uvloop, driving the proxy's ASGI app.

Hypercorn's h11 server measured several times the cost of the rest of a proxied
request (issue 19); uvicorn's httptools protocol shows what the same parser costs,
but it cannot be made to enforce Lucid's limits (a request-head timeout apart from
keep-alive, a bound on a head still arriving, Lucid's JSON refusals), so this module
is a small server of its own in uvicorn's manner. Hypercorn stays selectable
(``[server] engine = "hypercorn"``) for HTTP/2.

What it enforces, as Lucid makes Hypercorn do:

- a request line longer than ``max_request_header_size``: 414; a head still arriving
  past twice that size, or with more than twice ``max_request_headers`` fields: 431
  (a bound on memory; a whole head is measured exactly by the proxy, as on Hypercorn);
- a head not complete within ``request_head_timeout`` of its first byte: 408 (the
  shared :class:`lucid.server.HeadClock`, also for the 75 s keep-alive timeout);
- a head llhttp refuses (``Content-Length`` with ``Transfer-Encoding``, obs-fold,
  bad characters): 400 naming the reason;
- every such refusal closes the connection;
- pipelined requests are answered in order, one at a time (reading pauses while one
  waits);
- on drain (``stop``), idle connections close at once, busy ones after their
  response, and whatever is left after the grace period is aborted.

The app is called through ASGI rather than a direct interface to the proxy's
pipeline: the ASGI plumbing (the scope and three message dicts, the receive and two
send awaits) measured 3.9 us per request on the shared 2-core machine, against
213 us of CPU per request for the whole fast floor (``bench/floor_fast.py``) and
324 us for Lucid on this engine in the same period (``bench/proxy_bench.py``): 1-2%,
too little to earn the proxy a second entry point, and one app serves both engines.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import httptools

from lucid.http import HEAD_LATE, refusal
from lucid.server import HeadClock, head_clock

log = logging.getLogger("lucid.engine")

HIGH_WATER = 256 * 1024  # request body bytes buffered before the socket stops being read
KEEP_ALIVE_TIMEOUT = 75.0  # as Hypercorn's
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BODYLESS = frozenset({204, 304})
_LENGTH, _CHUNKED, _NONE = 0, 1, 2  # how a response body is framed: as is, chunked, none


class _Refused(Exception):
    """Raised from a parser callback: the head is refused with this answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class FastServer:
    """One listening socket served by :class:`HttpConnection`; ``terminated`` is set
    when it starts to drain (the shared clock closes idle connections then)."""

    def __init__(self, app: Any, server: Any):
        self.app = app
        self.max_head = int(server.max_request_header_size)
        self.max_fields = int(server.max_request_headers)
        self.head_timeout = float(server.request_head_timeout)
        self.grace_period = float(server.grace_period)
        self.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
        self.connections: set[HttpConnection] = set()
        self.terminated = asyncio.Event()
        self._all_closed: asyncio.Event | None = None
        self.clock: HeadClock = head_clock(asyncio.get_running_loop())
        self.scheme = "http"  # "https" on a TLS listener (the ASGI scope's scheme)

    async def serve(self, sock: socket.socket, shutdown_trigger: Callable[[], Awaitable[Any]],
                    tls: ssl.SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.scheme = "https" if tls is not None else "http"
        # A handshake is bounded like a request head: a client that opens a connection
        # and stalls the handshake holds it no longer than it could stall a head.
        listener = await loop.create_server(
            lambda: HttpConnection(self), sock=sock, backlog=2048, ssl=tls,
            ssl_handshake_timeout=min(self.head_timeout, 60.0) if tls is not None else None)
        try:
            await shutdown_trigger()
        finally:
            listener.close()
            await self.drain()

    async def drain(self) -> None:
        """Stop: idle connections now, the others after their response or the grace."""
        self.terminated.set()
        for connection in list(self.connections):
            connection.drain()
        if self.connections:
            self._all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_closed.wait(), self.grace_period)
            except TimeoutError:
                log.warning("%d connections still busy after the grace period; closing "
                            "them", len(self.connections))
        for connection in list(self.connections):
            connection.abort()
        await asyncio.sleep(0)

    def forget(self, connection: HttpConnection) -> None:
        self.connections.discard(connection)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, runs one ASGI cycle at a time."""

    def __init__(self, server: FastServer):
        self.server = server
        self.context = server  # for the shared clock: ``context.terminated``
        self.loop = asyncio.get_running_loop()
        self.app = server.app
        self.clock = server.clock
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.cycle: _Cycle | None = None  # the request being answered
        self.parsing: _Cycle | None = None  # the request whose body is being read
        self.pipeline: deque[_Cycle] = deque()
        self.reading_head = False
        self.late_head = False
        self.refused: bytes | None = None  # to write once the answer in progress ends
        self.closing = False
        self.read_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._resting: set[Any] | None = None
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self.upgrade_rest = b""  # what followed a WebSocket handshake's head

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.server.connections.add(self)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        self.local = (str(local[0]), int(local[1])) if isinstance(local, tuple) else None
        self._rest()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self._resting is not None:
            self._wake()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            # httptools wraps what a callback raised; _raise kept what it meant
            if self._last_refusal is None:
                raise
            self._refuse(*self._last_refusal)
        except httptools.HttpParserUpgrade as exc:
            cycle = self.cycle
            if cycle is not None and cycle.scope["type"] == "websocket":
                # the bytes after the head are the client's, once the handshake is
                # accepted (lucid.websocket takes them); nothing is read until then
                self.upgrade_rest = data[exc.args[0]:]
                self._pause_reading()
            # any other upgrade: the request is served as it is, and the connection
            # closed after it
        except httptools.HttpParserError as exc:
            self._refuse(400, self._malformed(exc))

    _last_refusal: tuple[int, str] | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.clock.end(self)
        self._wake()
        for cycle in (self.cycle, self.parsing, *self.pipeline):
            if cycle is not None:
                cycle.disconnected = True
                cycle.wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.server.forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        # A head begins (also one pipelined behind a request in the same read): it
        # must be whole within the head timeout.
        self.reading_head = True
        self.clock.begin(self, self.server.head_timeout)
        self._url = b""
        self._fields = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) + 12 > self.server.max_head:
            self._raise(414, f"request line longer than {self.server.max_head} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        self._fields.append((name.lower(), value))
        server = self.server
        if self._head_size > 2 * server.max_head:
            self._raise(431, f"request head larger than {server.max_head} bytes")
        if len(self._fields) > 2 * server.max_fields:
            self._raise(431, f"more than {server.max_fields} request header fields")

    def on_headers_complete(self) -> None:
        if self.reading_head:
            self.reading_head = False
            self.clock.end(self)
        parser = self.parser
        websocket = parser.should_upgrade() and any(
            n == b"upgrade" and b"websocket" in v.lower() for n, v in self._fields)
        if websocket and self.cycle is not None:
            self._raise(400, "a WebSocket handshake cannot be pipelined")
        if parser.should_upgrade() and any(
                n == b"transfer-encoding" or n == b"content-length" and v != b"0"
                for n, v in self._fields):
            # llhttp stops at an upgrade's head: a body after it would go unread
            self._raise(400, "a request asking to upgrade cannot carry a body here")
        try:
            parsed = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            self._raise(400, "malformed request target")
        raw_path = parsed.path or b"/"
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            self._raise(400, "request target is not ASCII")
        if "%" in path:
            path = unquote(path)
        version = parser.get_http_version()
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version,
            "server": self.local,
            "client": self.client,
            "scheme": self.server.scheme,
            "method": parser.get_method().decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": parsed.query or b"",
            "headers": self._fields,
        }
        if websocket:  # lucid.websocket proxies it, and may take the connection over
            scope["type"] = "websocket"
            scope["scheme"] = "wss" if self.server.scheme == "https" else "ws"
            scope["extensions"] = {"lucid.connection": self}
        cycle = _Cycle(self, scope, parser.should_keep_alive() and not parser.should_upgrade())
        if any(n == b"expect" and v.lower() == b"100-continue" for n, v in self._fields):
            cycle.expect_continue = True
        self.parsing = cycle
        if self.cycle is None:
            self._start(cycle)
        else:  # pipelined: answered once the one before is
            self.pipeline.append(cycle)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is None or cycle.finished:
            return  # the answer went out already: the rest of the body is dropped
        cycle.body.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > HIGH_WATER:
            self._pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.parsing
        if cycle is not None:
            cycle.more_body = False
            cycle.wake()
        self.parsing = None

    # -- the connection's life --

    def _raise(self, status: int, message: str) -> None:
        self._last_refusal = (status, message)
        raise _Refused(status, message)

    def _malformed(self, exc: Exception) -> str:
        names = {n for n, _ in self._fields}
        if b"transfer-encoding" in names and b"content-length" in names:
            return "Content-Length together with Transfer-Encoding"
        return f"malformed request: {exc}"

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and close: now, or after the answer in progress."""
        self.closing = True
        self.reading_head = False
        self.clock.end(self)
        answer = refusal(status, message)
        if self.cycle is not None:
            self.refused = answer
            return
        assert self.transport is not None
        self.transport.write(answer)
        self.transport.close()

    def head_timed_out(self) -> None:
        """The shared clock found this head late (it already forgot it)."""
        self.reading_head = False
        if not self.closing:
            self._refuse(408, HEAD_LATE)

    def _rest(self) -> None:
        """Idle from now: the keep-alive timeout runs (closed at once while draining)."""
        if self.server.terminated.is_set():
            self._close()
        else:
            self._resting = self.clock.rest(self, self.server.keep_alive_timeout)

    def _wake(self) -> None:
        if self._resting is not None:
            self._resting.discard(self)
            self._resting = None

    def keep_alive_ended(self) -> None:
        self._resting = None
        if self.cycle is None and not self.reading_head:
            self._close()

    def drain(self) -> None:
        """The server stops: close if idle, else after the answer in progress."""
        if self.cycle is None and not self.reading_head:
            self._close()
        elif self.cycle is not None:
            self.cycle.keep_alive = False

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        for cycle in (self.cycle, *self.pipeline):
            if cycle is not None and cycle.task is not None:
                cycle.task.cancel()

    def _close(self) -> None:
        self.closing = True
        self._wake()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.pipeline and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def _start(self, cycle: _Cycle) -> None:
        self.cycle = cycle
        cycle.task = self.loop.create_task(cycle.run())

    def finished(self, cycle: _Cycle) -> None:
        """``cycle``'s answer is complete: the next request, or close, or rest."""
        self.cycle = None
        if not cycle.keep_alive or self.parsing is cycle:
            # asked to close, draining, or the body never came whole (its framing lost)
            self._close()
        elif self.pipeline:
            self._start(self.pipeline.popleft())
            self.resume_reading()
        elif self.refused is not None:
            if self.transport is not None:
                self.transport.write(self.refused)
            self._close()
        elif self.closing:
            self._close()
        else:
            self.resume_reading()
            if not self.reading_head and self.parsing is None:
                self._rest()

    def upgrade(self, protocol: asyncio.Protocol) -> bytes:
        """The upstream accepted the WebSocket handshake: ``protocol`` reads the socket
        from now on (:mod:`lucid.websocket`). Gives the bytes that followed the head;
        reading stays paused until the new protocol resumes it."""
        assert self.transport is not None
        rest, self.upgrade_rest = self.upgrade_rest, b""
        self.transport.set_protocol(protocol)
        return rest

    async def drained(self) -> None:
        """Until the transport's write buffer is low again."""
        if self.write_paused and not self.closing:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None


class _Cycle:
    """One request and its answer, through the ASGI ``receive`` and ``send``."""

    __slots__ = ("connection", "scope", "keep_alive", "body", "buffered", "more_body",
                 "expect_continue", "waiter", "disconnected", "started", "finished",
                 "status", "headers", "framing", "head_only", "task")

    def __init__(self, connection: HttpConnection, scope: dict[str, Any], keep_alive: bool):
        self.connection = connection
        self.scope = scope
        self.keep_alive = keep_alive
        self.body: list[bytes] = []
        self.buffered = 0
        self.more_body = True
        self.expect_continue = False
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        self.started = False
        self.finished = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.framing = _LENGTH
        self.head_only = scope["method"] == "HEAD"
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self) -> None:
        try:
            await self.connection.app(self.scope, self.receive, self.send)
        except BaseException:
            log.exception("the proxy app failed")
            if not self.started and not self.disconnected:
                self.keep_alive = False
                await self._whole(500, b'{"error": "internal error", "status": 500}')
        finally:
            if not self.finished:  # the app ended without a whole answer: cut it off
                self.keep_alive = False
                self.finished = True
                self.connection.finished(self)

    async def _whole(self, status: int, body: bytes) -> None:
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [(b"content-type", b"application/json")]})
        await self.send({"type": "http.response.body", "body": body})

    async def receive(self) -> dict[str, Any]:
        connection = self.connection
        if self.expect_continue:
            self.expect_continue = False
            if self.more_body and not self.started and connection.transport is not None:
                connection.transport.write(_CONTINUE)
        while not self.body and self.more_body and not self.disconnected:
            self.waiter = connection.loop.create_future()
            connection.resume_reading()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if self.disconnected and not self.body and (self.more_body or self.finished):
            return {"type": "http.disconnect"}
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        if self.buffered > HIGH_WATER:
            connection.resume_reading()
        self.buffered = 0
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", ()))
            self.started = True
            return
        if kind != "http.response.body" or self.finished:
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        connection = self.connection
        transport = connection.transport
        if self.disconnected or transport is None or transport.is_closing():
            if not more:
                self._done()
            return
        if self.status:
            head = self._head(len(body), more)
            self.status = 0
            if not body or self.framing == _NONE:
                transport.write(head)
            elif self.framing == _CHUNKED:
                transport.writelines((head, b"%x\r\n" % len(body), body, b"\r\n"))
            else:
                transport.writelines((head, body))
        elif body and self.framing != _NONE:
            if self.framing == _CHUNKED:
                transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
            else:
                transport.write(body)
        if not more:
            if self.framing == _CHUNKED:
                transport.write(b"0\r\n\r\n")
            self._done()
        elif connection.write_paused:
            await connection.drained()

    def _head(self, size: int, more: bool) -> bytes:
        """The status line and header block, framed for what is known of the body."""
        status = self.status
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        length = False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = True
            elif lowered == b"connection" and b"close" in value.lower():
                self.keep_alive = False
            elif lowered == b"transfer-encoding":
                continue  # framing is this hop's
            lines += (name, b": ", value, b"\r\n")  # joined below: cheaper than b"%s"
        if self.head_only or status in _BODYLESS or status < 200:
            self.framing = _NONE
        elif not length:
            if not more:
                lines.append(b"content-length: %d\r\n" % size)
            elif self.scope["http_version"] == "1.1":
                self.framing = _CHUNKED
                lines.append(b"transfer-encoding: chunked\r\n")
            else:  # an HTTP/1.0 client: the body ends with the connection
                self.keep_alive = False
        if not self.keep_alive or self.connection.server.terminated.is_set():
            self.keep_alive = False
            if not any(n.lower() == b"connection" for n, _ in self.headers):
                lines.append(b"connection: close\r\n")
        elif self.scope["http_version"] == "1.0":
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _done(self) -> None:
        self.finished = True
        self.wake()
        self.connection.finished(self)


_REASON_CACHE: dict[int, bytes] = {}


def _reason(status: int) -> bytes:
    reason = _REASON_CACHE.get(status)
    if reason is None:
        from http import HTTPStatus

        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        _REASON_CACHE[status] = reason
    return reason


async def serve_fast(app: Any, sock: socket.socket, server: Any,
                     shutdown_trigger: Callable[[], Awaitable[Any]],
                     tls: ssl.SSLContext | None = None) -> None:
    """Serve ``app`` on ``sock`` with the fast engine until ``shutdown_trigger``
    returns, then drain (``server`` is the ``[server]`` config; ``tls`` the listening
    context of ``[server.tls]``, :class:`lucid.tls.Termination`)."""
    await FastServer(app, server).serve(sock, shutdown_trigger, tls)
