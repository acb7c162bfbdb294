"""The proxy's upstream connections: a lean HTTP/1.1 client on asyncio protocols with
llhttp (``httptools``) parsing the responses.

aiohttp's client session measured several times the cost of everything else in a
proxied request (issue 19: Hypercorn with this kind of pool ran 1.5-1.8x Hypercorn
with aiohttp); the proxy needs a small part of what it does: one request at a time
per connection, bodies streamed both ways, keep-alive. aiohttp stays for the
plugins' own calls (JWKS, webhooks, health checks).

- **Pools**: idle keep-alive connections per ``(scheme, host, port)``, at most
  ``limit`` connections open in all (busy and idle); a caller past the limit waits
  for one (within its connect timeout), or an idle one of another upstream is closed
  to make room. Idle connections are closed after ``keepalive`` seconds.
- **Reuse** only when the response was read to its end, the request was sent whole,
  and both sides allow keep-alive. Bytes arriving on an idle connection end it.
- **A stale connection** (closed by the upstream while idle, found out on use) is
  retried once on a new connection when that is safe: no byte of a response came,
  the body can be sent again (none, or buffered), and the method is idempotent.
- **Deadlines**: ``connect_timeout`` for the TCP (and TLS) handshake and for a free
  slot; ``read_timeout`` for each wait on the upstream (the head, each piece of the
  body). The caller keeps the total deadline (``lucid.deadline``).
- **Back-pressure**: a request body is written piece by piece, waiting while the
  transport's buffer is full; a response body is buffered up to ``HIGH_WATER``, then
  the socket is not read until the caller takes some.
- **Framing**: a request body of unknown length goes chunked; responses to HEAD and
  1xx/204/304 have no body; a response without length ends with the connection.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import httptools
from yarl import URL

from lucid.tls import UpstreamTLS, upstream_context

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
HIGH_WATER = 256 * 1024  # response bytes buffered before the socket stops being read
MAX_HEAD = 64 * 1024  # a larger response head is a broken upstream
MAX_FIELDS = 256


# (scheme, host, port, TLS settings): connections made with one service's TLS
# settings (its CA, client certificate, SNI name) never serve another's requests.
_Key = tuple[str, str, int, UpstreamTLS | None]


class UpstreamError(ConnectionError):
    """The upstream broke HTTP: a malformed or oversized response, or a connection
    closed before the response was whole."""


class UpstreamConnectError(ConnectionError):
    """No connection to the upstream could be made (refused, unreachable, TLS)."""


class UpstreamTimeout(TimeoutError):
    """The upstream did not connect, or send what was awaited, in time."""


class _HeadDone(Exception):
    """Raised from the parser's callback to stop at the head of a response to HEAD."""


class Response:
    """One upstream response: status and head at once, the body as it arrives."""

    __slots__ = ("status", "raw_headers", "headers", "_connection", "_chunks", "_buffered",
                 "_complete", "_error", "_waiter", "_released")

    def __init__(self, connection: _Connection):
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        #: lower-case name -> value, repeated fields joined with ", "
        self.headers: dict[str, str] = {}
        self._connection = connection
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    def at_eof(self) -> bool:
        """The body is whole and every byte of it was taken."""
        return self._complete and not self._chunks

    async def read_chunk(self) -> bytes:
        """The next piece of the body (whatever has arrived), ``b""`` at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._connection.wait(self)
        if len(self._chunks) == 1:
            chunk = self._chunks.popleft()
        else:
            chunk = b"".join(self._chunks)
            self._chunks.clear()
        if self._buffered > HIGH_WATER:
            self._connection.resume()
        self._buffered = 0
        return chunk

    def read_ready(self) -> bytes | None:
        """What :meth:`read_chunk` would answer now without waiting, or None when it
        would wait or raise. The usual small response comes whole with its head: the
        proxy takes it without a coroutine, a timer or a deadline."""
        chunks = self._chunks
        if not chunks:
            return b"" if self._complete and self._error is None else None
        if len(chunks) == 1:
            chunk = chunks.popleft()
        else:
            chunk = b"".join(chunks)
            chunks.clear()
        if self._buffered > HIGH_WATER:
            self._connection.resume()
        self._buffered = 0
        return chunk

    def read_whole(self) -> bytes | None:
        """The whole body if all of it is here already (the usual small response comes
        with its head), else None, taking nothing: one call where the proxy would
        otherwise make two (:meth:`read_ready`, :meth:`at_eof`)."""
        if not self._complete or self._error is not None:
            return None
        chunks = self._chunks
        if not chunks:
            return b""
        chunk = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered > HIGH_WATER:
            self._connection.resume()
        self._buffered = 0
        return chunk

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if it can be
        reused (the body was read to its end), else it is closed."""
        if not self._released:
            self._released = True
            self._connection.done(reusable=self._complete and self._error is None)

    def close(self) -> None:
        """Done with the response, and its connection is not to be reused."""
        if not self._released:
            self._released = True
            self._connection.done(reusable=False)

    # -- fed by the connection --

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream; one request at a time."""

    def __init__(self, pool: UpstreamPool, key: _Key):
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None  # the response being read
        self.head_pending = False  # a request was sent and its head not yet parsed
        self.head_only = False  # the request was HEAD
        self.keep_alive = True
        self.closed = False
        self.received = 0  # response bytes since the request was sent
        self.idle_since = 0.0
        self._fields: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._informational = False
        self._head_waiter: asyncio.Future[None] | None = None
        self._head_error: BaseException | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if not self.head_pending and (response is None or response._complete):
            # Nothing was asked: an upstream talking out of turn cannot be trusted.
            self.keep_alive = False
            self._close()
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if not self.head_only or self.head_pending:  # else: _HeadDone, the head is in
                self._broken(UpstreamError(self._head_error_text()))
        except httptools.HttpParserUpgrade:
            self._broken(UpstreamError("upstream switched protocols (not supported)"))
        except httptools.HttpParserError as exc:
            self._broken(UpstreamError(f"malformed response from the upstream: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep_alive = False
        response = self.response
        if self.head_pending:
            self._head_failed(UpstreamError("upstream closed the connection before "
                                            "answering"))
        elif response is not None and not response._complete:
            if self._read_to_eof():
                response._complete = True
                response._wake()
            else:
                response._fail(UpstreamError("upstream closed the connection mid-response"))
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(UpstreamError("upstream closed the connection"))
        self.pool._lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self._fields = []
        self._head_size = 0

    def on_status(self, status: bytes) -> None:
        self._head_size += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD or len(self._fields) >= MAX_FIELDS:
            self._head_error = UpstreamError("response head too large")
            raise self._head_error
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 100 Continue, 103 Early Hints: skipped
            self._informational = True
            return
        response = self.response
        assert response is not None
        response.status = status
        response.raw_headers = self._fields
        headers = response.headers
        for raw_name, raw_value in self._fields:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = headers[name] + ", " + value if name in headers else value
        self.head_pending = False
        if self.head_only:
            # A response to HEAD has no body whatever its Content-Length says; llhttp
            # cannot be told that, so the parser stops here and a new one reads the next.
            response._complete = True
            self.keep_alive = self.parser.should_keep_alive()
            self.parser = httptools.HttpResponseParser(self)
            self._head_ready()
            raise _HeadDone
        self._head_ready()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response._chunks.append(body)
        response._buffered += len(body)
        if response._buffered > HIGH_WATER and not self._read_paused:
            self._read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        response._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        response = self.response
        if response is None:
            return
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        response._complete = True
        response._wake()

    # -- used by the pool and the response --

    def _head_error_text(self) -> str:
        return str(self._head_error) if self._head_error else "malformed response"

    def _read_to_eof(self) -> bool:
        """Whether the response was one whose body ends with the connection."""
        response = self.response
        assert response is not None
        headers = response.headers
        return "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", "").lower()

    def _head_ready(self) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _head_failed(self, error: BaseException) -> None:
        self.head_pending = False
        self._head_error = error
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _broken(self, error: BaseException) -> None:
        self.keep_alive = False
        if self.head_pending:
            self._head_failed(error)
        elif self.response is not None:
            self.response._fail(error)
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def resume(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    async def wait(self, response: Response) -> None:
        """Until more of ``response``'s body arrives, within the read timeout."""
        waiter = response._waiter = self.loop.create_future()
        timer = self.loop.call_later(self.pool_read_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            response._waiter = None

    pool_read_timeout = 30.0

    async def write_body(self, body: AsyncIterable[bytes], chunked: bool,
                         declared: int | None) -> bool:
        """Send a streamed body; False if the upstream answered (or closed) first, or
        the body was shorter than ``declared``. Longer is an error: the extra bytes
        would be read upstream as another request."""
        transport = self.transport
        assert transport is not None
        sent = 0
        async for chunk in body:
            if self.closed or not self.head_pending:
                return False
            sent += len(chunk)
            if declared is not None and sent > declared:
                self.keep_alive = False
                self._close()
                raise UpstreamError("request body longer than its Content-Length")
            if chunked:
                if chunk:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self._write_paused:
                self._drain = self.loop.create_future()
                timer = self.loop.call_later(self.pool_read_timeout, _expire, self._drain)
                try:
                    await self._drain
                finally:
                    timer.cancel()
                    self._drain = None
        if chunked and not self.closed:
            transport.write(b"0\r\n\r\n")
        return declared is None or sent == declared

    async def head(self, read_timeout: float) -> None:
        """Until the response head is in, within ``read_timeout``."""
        if self.head_pending:
            waiter = self._head_waiter = self.loop.create_future()
            timer = self.loop.call_later(read_timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._head_waiter = None
        elif self._head_error is not None:
            raise self._head_error

    def done(self, reusable: bool) -> None:
        self.response = None
        if self._read_paused:
            self.resume()
        if reusable and self.keep_alive and not self.closed:
            self.pool._park(self)
        else:
            self.keep_alive = False
            self._close()
            self.pool._forget(self)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("upstream read timed out"))


class UpstreamPool:
    """Keep-alive connections to the proxy's upstreams, shared by every request of
    one event loop."""

    def __init__(self, limit: int = 1000, keepalive: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None):
        self.limit = limit
        self.keepalive = keepalive
        self.loop = asyncio.get_running_loop()
        self._ssl = ssl_context
        self._idle: dict[_Key, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False

    def __len__(self) -> int:
        """Connections open now (busy and idle)."""
        return len(self._open)

    def idle(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def request(
        self, method: str, url: URL, headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None = None, *,
        connect_timeout: float = 5.0, read_timeout: float = 30.0,
        total_timeout: float | None = None, tls: UpstreamTLS | None = None,
    ) -> Response:
        """Send one request and return its response once the head is in; read the
        body from it and ``release()`` it. Raises UpstreamConnectError,
        UpstreamTimeout or UpstreamError. ``total_timeout``: the head must be in
        within it, from now, connecting included (the caller times the body).
        ``tls``: how to connect to an ``https://`` URL (the service's
        ``[services.<name>]``), else the pool's default context (verifying against
        the system's CAs)."""
        scheme = url.scheme
        host = url.raw_host or ""
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port, tls if scheme == "https" else None)
        head, chunked, declared = _request_head(method, url, host, port, headers, body)
        replayable = not isinstance(body, AsyncIterable)
        until = None
        if total_timeout is not None:
            until = self.loop.time() + total_timeout
            connect_timeout = min(connect_timeout, total_timeout)
        for attempt in (0, 1):
            connection, reused = await self._acquire(key, connect_timeout)
            connection.pool_read_timeout = read_timeout
            response = connection.response = Response(connection)
            connection.head_pending = True
            connection.head_only = method == "HEAD"
            connection._head_error = None
            connection.received = 0
            transport = connection.transport
            assert transport is not None
            try:
                if isinstance(body, bytes | bytearray):
                    transport.writelines((head, body))
                else:
                    transport.write(head)
                    if body is not None:
                        assert isinstance(body, AsyncIterable)
                        if not await connection.write_body(body, chunked, declared):
                            connection.keep_alive = False  # the body was not sent whole
                if until is None:
                    await connection.head(read_timeout)
                else:
                    await connection.head(min(read_timeout, until - self.loop.time()))
            except UpstreamError:
                connection.done(reusable=False)
                if (attempt == 0 and reused and connection.received == 0 and replayable
                        and method in IDEMPOTENT):
                    continue  # a stale keep-alive connection: once more on a new one
                raise
            except BaseException:
                connection.done(reusable=False)
                raise
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self, key: _Key, timeout: float
                       ) -> tuple[_Connection, bool]:
        idle = self._idle.get(key)
        if idle:
            now = self.loop.time()
            while idle:
                connection = idle.pop()
                if not connection.closed and now - connection.idle_since < self.keepalive:
                    return connection, True
                connection._close()
                self._open.discard(connection)
        if self.closed:
            raise UpstreamConnectError("the upstream pool is closed")
        deadline = self.loop.time() + timeout
        while len(self._open) + self._connecting >= self.limit:
            if not self._evict_idle():
                waiter = self.loop.create_future()
                self._waiters.append(waiter)
                try:
                    async with asyncio.timeout_at(deadline):
                        await waiter
                except TimeoutError:
                    raise UpstreamTimeout("no free upstream connection in time") from None
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        self._connecting += 1
        scheme, host, port, tls = key
        context, server_name = self.tls_for(scheme, host, tls)
        try:
            async with asyncio.timeout_at(deadline):
                _, connection = await self.loop.create_connection(
                    lambda: _Connection(self, key), host, port,
                    ssl=context, server_hostname=server_name,
                )
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {host}:{port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        finally:
            self._connecting -= 1
            self._wake_waiter()
        self._open.add(connection)
        return connection, False

    def tls_for(self, scheme: str, host: str, tls: UpstreamTLS | None
                ) -> tuple[ssl.SSLContext | None, str | None]:
        """The context and server name a connection to ``scheme://host`` is made
        with: none for ``http``; for ``https`` the service's settings (``tls``) or the
        system's CAs, and SNI (the name checked) the URL's host unless told."""
        if scheme != "https":
            return None, None
        context = tls.context if tls is not None else self._ssl_context()
        return context, (tls.server_name if tls is not None else None) or host

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = upstream_context()
        return self._ssl

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection of any upstream, to make room."""
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        self._idle[oldest.key].remove(oldest)
        oldest._close()
        self._open.discard(oldest)
        return True

    def _park(self, connection: _Connection) -> None:
        if self.closed:
            connection._close()
            self._forget(connection)
            return
        connection.idle_since = self.loop.time()
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = []
        idle.append(connection)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.keepalive, self._expire_idle)
        self._wake_waiter()

    def _expire_idle(self) -> None:
        self._sweep = None
        cutoff = self.loop.time() - self.keepalive
        for idle in self._idle.values():
            stale = [c for c in idle if c.idle_since <= cutoff]
            for connection in stale:
                idle.remove(connection)
                connection._close()
                self._open.discard(connection)
        if any(self._idle.values()):
            self._sweep = self.loop.call_later(self.keepalive / 2, self._expire_idle)

    def _forget(self, connection: _Connection) -> None:
        if connection in self._open:
            self._open.discard(connection)
            self._wake_waiter()

    def _lost(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        if connection.response is None:
            self._forget(connection)

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every connection (idle now; busy ones as their responses end)."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for connection in idle:
                connection._close()
        self._idle.clear()
        for connection in list(self._open):
            if connection.response is None:
                connection._close()
        await asyncio.sleep(0)  # let the transports' connection_lost run


def _request_head(method: str, url: URL, host: str, port: int,
                  headers: list[tuple[str, str]], body: Any) -> tuple[bytes, bool, int | None]:
    """The request line and header block; whether the body goes chunked; the length
    a streamed body declared. The framing is always the pool's own: a buffered body
    is sent with its real length, whatever header came with it, so that no body can
    be shorter or longer than the upstream was told (request smuggling)."""
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1\r\n"]
    has_host = chunked = False
    length: int | None = None
    buffered = isinstance(body, bytes | bytearray)
    for name, value in headers:
        lowered = name.lower()
        if lowered == "host":
            has_host = True
        elif lowered == "content-length":
            if buffered or length is not None or not value.isdigit():
                continue  # a buffered body's length is its own (below); one length only
            length = int(value)
        elif lowered == "transfer-encoding":
            continue  # framing is this hop's: set below
        lines.append(f"{name}: {value}\r\n")
    has_length = length is not None
    if not has_host:
        default = 443 if url.scheme == "https" else 80
        lines.insert(1, f"host: {host}\r\n" if port == default else f"host: {host}:{port}\r\n")
    if buffered:
        lines.append(f"content-length: {len(body)}\r\n")
    elif body is None:
        if not has_length and method not in _BODYLESS_METHODS:
            lines.append("content-length: 0\r\n")
    elif not has_length:
        chunked = True
        lines.append("transfer-encoding: chunked\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # A CR or LF inside a value would end the field early and start one of the
    # sender's choosing (response splitting upstream).
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise ValueError("a request header holds a line break")
    return text.encode("latin-1"), chunked, length


async def iterate(chunks: list[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` as an async iterable body (for tests and callers with parts)."""
    for chunk in chunks:
        yield chunk
