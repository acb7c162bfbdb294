"""WebSocket proxying: a handshake goes through the route's admission and instance
selection like any request, then the session is relayed until one side ends it.

The proxy app sees a WebSocket handshake as a ``websocket`` scope (both engines) and
hands it to :func:`serve`, which checks the handshake itself (RFC 6455 §4.2.1) and
runs it through :meth:`ProxyApp.handle` with a scope that looks like a ``GET``: so
routing, authentication, rate limits and the breaker's permission apply as they do to
any request, a refusal is an ordinary HTTP answer (the ASGI "WebSocket Denial
Response"), and the observers see one exchange per session (status 101, its whole
duration). Each attempt (:func:`call`) opens a connection of its own to the instance
(an upgraded connection is never pooled), sends the client's handshake with the
proxy's forwarding headers and reads the answer; a failure there is an outcome of
that instance and the next one is tried, as for HTTP.

After the upstream's 101, how the session is relayed depends on the engine:

- **fast**: the 101 is passed on as the upstream wrote it (``Sec-WebSocket-Accept``,
  protocol, extensions: the client's own key went upstream), and from then on bytes
  are tunnelled both ways without parsing messages (compression included). Only frame
  *headers* are followed (:class:`_Frames`), so that a close frame can be put between
  two frames when the session idles out or the server drains.
- **hypercorn**: Hypercorn owns the client's framing and hands messages through ASGI
  (it cannot give the connection away), so messages are bridged to a wsproto client
  connection on the upstream socket: wsproto is what Hypercorn itself frames with, and
  the handshake stays this module's (one path for both engines: the same upstream
  request, the same failure outcomes). Extensions are negotiated per hop there.

Back-pressure: a side's reading pauses while the other side's transport has more
than its high-water mark buffered (asyncio's ``pause_writing``), on both engines.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from lucid.http import http_date, json_body, request_id_from
from lucid.model import Outcome, Rejection

if TYPE_CHECKING:
    from lucid.model import Exchange, Instance
    from lucid.proxy import ProxyApp

log = logging.getLogger("lucid.websocket")

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
GOING_AWAY = 1001  # RFC 6455 §7.4.1: the server goes down, or the session idled out
MAX_REFUSAL_BODY = 1024 * 1024  # what an upstream's non-101 answer may carry
CLOSE_WAIT = 5.0  # after sending close frames, how long the peers get to answer
_SCHEMES = {"ws": "http", "wss": "https"}
WRONG_ACCEPT = ("upstream answered the WebSocket handshake 101 with a wrong "
                "Sec-WebSocket-Accept")
_NOT_RELAYED_ON_ACCEPT = frozenset({
    b"upgrade", b"connection", b"sec-websocket-accept", b"sec-websocket-protocol",
    b"sec-websocket-extensions", b"content-length", b"transfer-encoding", b"date",
})


def handshake_problems(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """What is wrong with a client's handshake (RFC 6455 §4.2.1), by header name."""
    version = key = None
    for name, value in headers:
        if name.lower() == b"sec-websocket-version":
            version = value.strip()
        elif name.lower() == b"sec-websocket-key":
            key = value.strip()
    problems = {}
    if version != b"13":
        problems["sec-websocket-version"] = ("missing: must be 13" if version is None
                                             else "must be 13")
    if key is None:
        problems["sec-websocket-key"] = "missing: 16 random bytes in base64"
    else:
        try:
            valid = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid = False
        if not valid:
            problems["sec-websocket-key"] = "must be 16 bytes in base64"
    return problems


def _over_h2(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A WebSocket over HTTP/2 has no key (RFC 8441 §5: the stream is the session);
    the instance is asked over HTTP/1.1, which needs one: Lucid makes it."""
    if any(name.lower() == b"sec-websocket-key" for name, _ in headers):
        return headers
    return [*headers, (b"sec-websocket-key", base64.b64encode(os.urandom(16)))]


def accept_token(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


class Sessions:
    """The WebSocket sessions a proxy app is relaying, so a drain can close them."""

    def __init__(self) -> None:
        self.open: set[_Relay] = set()
        self.draining = False

    def __len__(self) -> int:
        return len(self.open)

    async def close_when(self, stop: asyncio.Event) -> None:
        """When ``stop`` is set (the drain began), close every session with 1001."""
        await stop.wait()
        self.draining = True
        for relay in list(self.open):
            relay.going_away("server shutting down")


class Session:
    """A client's handshake as the proxy carries it: the engine's ASGI ``receive`` and
    ``send``, and on the fast engine the connection that will become a tunnel."""

    __slots__ = ("receive", "send", "connection", "sessions", "idle_timeout")

    def __init__(self, receive: Any, send: Any, connection: Any, sessions: Sessions,
                 idle_timeout: float):
        self.receive = receive
        self.send = send
        self.connection = connection  # lucid.engine.HttpConnection, or None (Hypercorn)
        self.sessions = sessions
        self.idle_timeout = idle_timeout


async def serve(app: ProxyApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A ``websocket`` scope: check the handshake, then proxy it as the app proxies a
    request (``app.handle``), its answers sent as the denial-response extension's."""

    extensions = scope.get("extensions") or {}
    connection = extensions.get("lucid.connection")

    async def denial(message: dict[str, Any]) -> None:
        message["type"] = "websocket." + message["type"]
        await send(message)

    if connection is not None:  # Lucid's own engine answers HTTP as it is
        denial = send

    headers = scope["headers"]
    if scope.get("http_version") == "2":  # RFC 8441 (Hypercorn): extended CONNECT
        headers = _over_h2(headers)
    problems = handshake_problems(headers)
    if problems:
        # Hypercorn answers a bad handshake itself (a bare 400); the fast engine
        # leaves it to this JSON answer naming each header.
        request_id = request_id_from(None)
        body = json_body(400, "invalid WebSocket handshake", request_id,
                         {"fields": problems})
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()),
                   (b"date", http_date()), (b"x-request-id", request_id.encode()),
                   (b"sec-websocket-version", b"13"), (b"connection", b"close")]
        await denial({"type": "http.response.start", "status": 400, "headers": headers})
        await denial({"type": "http.response.body", "body": body})
        return
    config = app.runtime.generation.config.server
    session = Session(receive, send, connection, app.websockets,
                      float(config.websocket_idle_timeout))
    http_scope = dict(scope)
    http_scope["headers"] = headers
    http_scope["method"] = "GET"
    http_scope["scheme"] = _SCHEMES.get(scope.get("scheme", "ws"), "http")
    http_scope["lucid.websocket"] = session
    await app.handle(http_scope, receive, denial)


def _failure(exc: BaseException, duration: float) -> Outcome:
    if isinstance(exc, TimeoutError):
        return Outcome("timeout", None, duration, type(exc).__name__)
    if isinstance(exc, ConnectionRefusedError | _ConnectFailed):
        return Outcome("connect_error", None, duration, str(exc) or type(exc).__name__)
    return Outcome("upstream_error", None, duration, f"{type(exc).__name__}: {exc}")


class _ConnectFailed(Exception):
    pass


async def call(app: ProxyApp, exchange: Exchange, instance: Instance,
               headers: list[tuple[str, str]], send: Any, scope: dict[str, Any],
               last: bool) -> Rejection | None:
    """One attempt at ``instance``: connect, hand over the handshake, relay the session
    (None), or say why not (a Rejection: try elsewhere or answer with it)."""
    session: Session = scope["lucid.websocket"]
    hooks = app.runtime.hooks
    policy = exchange.policy
    started = time.perf_counter()
    exchange.upstream_started = started
    loop = asyncio.get_running_loop()
    asgi = session.connection is None
    upstream: _Upstream | None = None
    try:
        scheme, _, hostport = instance.base.partition("://")
        host, _, port = hostport.rpartition(":")
        host = host.strip("[]")
        context, server_name = app.pool.tls_for(
            scheme, host, app.runtime.tls.upstreams.get(instance.service))
        try:
            async with asyncio.timeout(policy.connect_timeout):
                _, upstream = await loop.create_connection(
                    _Upstream, host, int(port), ssl=context, server_hostname=server_name)
        except OSError as exc:
            raise _ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        upstream.transport.write(_request_head(exchange, headers, asgi))
        async with asyncio.timeout(policy.read_timeout):
            await upstream.answered
    except Exception as exc:
        if upstream is not None:
            upstream.transport.abort()
        if not isinstance(exc, TimeoutError | OSError | _ConnectFailed | _BadAnswer
                          | httptools.HttpParserError):
            raise
        return await app.attempt_failed(exchange, instance,
                                        _failure(exc, time.perf_counter() - started),
                                        "WebSocket handshake ")
    status = upstream.status
    if status == 101 and upstream.accept != accept_token(exchange.headers[
            "sec-websocket-key"].strip().encode("latin-1")):
        # not an answer to this handshake (RFC 6455 §4.1): the client would refuse it
        # anyway; an upstream failure like a broken reply, and nothing is relayed
        upstream.transport.abort()
        rejection = await app.attempt_failed(
            exchange, instance, Outcome("upstream_error", None, time.perf_counter() - started,
                                        WRONG_ACCEPT), "WebSocket handshake ")
        rejection.reason = WRONG_ACCEPT
        return rejection
    outcome = Outcome("error_status" if status >= 500 else "success", status,
                      time.perf_counter() - started)
    exchange.outcome = outcome
    recording = hooks.record_outcome(exchange, instance, outcome)
    if recording is not None:
        await recording
    if status >= 500:
        app.passive.record(exchange, instance, outcome)
    if status != 101:
        upstream.transport.close()
        exchange.upstream_duration = time.perf_counter() - started
        if not last and status in policy.retry_on_status:
            return Rejection(status, reason=f"upstream answered {status}")
        await _relay_refusal(exchange, upstream, send)
        return None
    exchange.status = 101
    if policy.websocket_idle_timeout is not None:  # the route's own
        session.idle_timeout = policy.websocket_idle_timeout
    relay: _Relay
    if asgi:
        relay = _Bridge(session, upstream, exchange)
    else:
        relay = _Tunnel(session, upstream, exchange)
    sessions = session.sessions
    sessions.open.add(relay)
    app.runtime.counters["websockets"] = len(sessions)
    try:
        if sessions.draining:
            relay.going_away("server shutting down")
        await relay.run()
    finally:
        sessions.open.discard(relay)
        app.runtime.counters["websockets"] = len(sessions)
        exchange.upstream_duration = time.perf_counter() - started
    return None


def _request_head(exchange: Exchange, headers: list[tuple[str, str]], asgi: bool) -> bytes:
    """The client's handshake as the instance gets it: the proxy's own request headers
    (hop-by-hop ones dropped, forwarding ones set), and the upgrade asked again. Over
    Hypercorn, extensions are this hop's to agree (none), since messages are bridged."""
    from lucid.proxy import upstream_url  # (lucid.proxy imports this module)

    instance = exchange.instance
    assert instance is not None
    target = upstream_url(exchange, instance).raw_path_qs  # quoted as for HTTP
    lines = [f"GET {target} HTTP/1.1\r\n"]
    has_host = False
    for name, value in headers:
        if name == "host":
            has_host = True
        elif asgi and name == "sec-websocket-extensions":
            continue
        lines.append(f"{name}: {value}\r\n")
    if not has_host:
        lines.append(f"host: {instance.base.partition('://')[2]}\r\n")
    lines.append("connection: Upgrade\r\nupgrade: websocket\r\n\r\n")
    return "".join(lines).encode("latin-1")


async def _relay_refusal(exchange: Exchange, upstream: _Upstream, send: Any) -> None:
    """The instance answered the handshake with an HTTP response: pass it on."""
    exchange.status = upstream.status
    out = [(n, v) for n, v in upstream.headers
           if n.lower() not in (b"connection", b"transfer-encoding", b"content-length",
                                b"keep-alive", b"upgrade")]
    body = b"".join(upstream.body)
    out.append((b"content-length", str(len(body)).encode()))
    out.append((b"x-request-id", exchange.request_id.encode()))
    exchange.bytes_out += len(body)
    await send.start(upstream.status, out)
    await send.body(body, more=False)


class _BadAnswer(Exception):
    """The instance's answer to the handshake was not HTTP, or too large."""


class _Upstream(asyncio.Protocol):
    """The connection to the instance: reads the answer to the handshake, then hands
    every byte to ``sink`` (the relay), with back-pressure both ways."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.answered: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.accept = b""
        self.body: list[bytes] = []
        self.size = 0
        self.rest = b""  # what followed the 101 in the same read
        self.upgraded = False
        self.sink: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.on_pause: Callable[[bool], None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
            return
        if self.upgraded:
            self.rest += data
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.rest = data[exc.args[0]:]
            self.upgraded = True
            self.transport.pause_reading()  # until the relay takes over
            self._answer(None)
        except httptools.HttpParserError as exc:
            self._answer(_BadAnswer(f"malformed answer: {exc}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if name.lower() == b"sec-websocket-accept":
            self.accept = value.strip()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_REFUSAL_BODY:
            self._answer(_BadAnswer("answer to the handshake too large"))
            self.transport.abort()
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status != 101:
            self._answer(None)

    def _answer(self, error: Exception | None) -> None:
        if not self.answered.done():
            if error is None:
                self.answered.set_result(None)
            else:
                self.answered.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.status and self.status != 101:
            self._answer(None)  # a body that ends with the connection
        else:
            self._answer(ConnectionResetError("upstream closed before answering the "
                                              "handshake"))
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(True)

    def resume_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(False)


def _pause(transport: asyncio.BaseTransport | None, paused: bool) -> None:
    if transport is None or transport.is_closing():
        return
    if paused:
        transport.pause_reading()  # type: ignore[attr-defined]
    else:
        transport.resume_reading()  # type: ignore[attr-defined]


def close_frame(code: int, reason: str, masked: bool) -> bytes:
    """A close frame (RFC 6455 §5.5.1); a client's is masked (§5.3)."""
    payload = code.to_bytes(2, "big") + reason.encode()[:120]
    if not masked:
        return bytes((0x88, len(payload))) + payload
    mask = os.urandom(4)
    return (bytes((0x88, 0x80 | len(payload))) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


class _Frames:
    """Where frames begin in one direction of a tunnel: only headers are read (at
    most 14 bytes a frame); payloads are skipped by their length."""

    __slots__ = ("remaining", "header", "closed")

    def __init__(self) -> None:
        self.remaining = 0
        self.header = bytearray()
        self.closed = False  # a close frame went this way

    def feed(self, data: bytes, stop: bool = False) -> int:
        """Follow ``data``; with ``stop``, only up to the first frame boundary (its
        offset is returned: a frame can be put there)."""
        n = len(data)
        remaining = self.remaining
        header = self.header
        if not header and remaining >= n and not (stop and remaining == 0):
            self.remaining = remaining - n  # within a payload: the usual large read
            return n
        i = 0
        while i < n:
            if remaining:
                step = min(remaining, n - i)
                remaining -= step
                i += step
                continue
            if stop and not header:
                break
            if not header and n - i >= 2:  # a whole header in this read: read it in place
                second = data[i + 1]
                size = second & 0x7F
                need = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (
                    4 if second & 0x80 else 0)
                if n - i >= need:
                    if size == 126:
                        size = int.from_bytes(data[i + 2:i + 4], "big")
                    elif size == 127:
                        size = int.from_bytes(data[i + 2:i + 10], "big")
                    if data[i] & 0x0F == 0x8:
                        self.closed = True
                    remaining = size
                    i += need
                    continue
            header.append(data[i])  # a header split between reads: byte by byte
            i += 1
            if len(header) < 2:
                continue
            size = header[1] & 0x7F
            need = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (
                4 if header[1] & 0x80 else 0)
            if len(header) < need:
                continue
            if size == 126:
                size = int.from_bytes(header[2:4], "big")
            elif size == 127:
                size = int.from_bytes(header[2:10], "big")
            if header[0] & 0x0F == 0x8:
                self.closed = True
            remaining = size
            header.clear()
        self.remaining = remaining
        return i

    @property
    def at_boundary(self) -> bool:
        return self.remaining == 0 and not self.header


class _Relay:
    """One proxied WebSocket session, ended by either side, idleness, or a drain."""

    def __init__(self, session: Session, upstream: _Upstream, exchange: Exchange):
        self.session = session
        self.upstream = upstream
        self.exchange = exchange
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.last = self.loop.time()
        self.idle: asyncio.TimerHandle | None = None
        self.closing = False

    def _watch_idle(self) -> None:
        timeout = self.session.idle_timeout
        due = self.last + timeout
        if self.loop.time() >= due:
            self.idle = None
            log.info("request %s: WebSocket idle for %.1f s; closing it",
                     self.exchange.request_id, timeout)
            self.going_away("idle timeout")
        else:
            self.idle = self.loop.call_at(due, self._watch_idle)

    def _finish(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if not self.done.done():
            self.done.set_result(None)

    async def run(self) -> None:
        raise NotImplementedError

    def going_away(self, reason: str) -> None:
        raise NotImplementedError


class _Tunnel(_Relay):
    """Fast engine: bytes both ways between the client's socket and the instance's."""

    def __init__(self, session: Session, upstream: _Upstream, exchange: Exchange):
        super().__init__(session, upstream, exchange)
        self.connection = session.connection
        self.client: asyncio.Transport = self.connection.transport
        self.to_upstream = _Frames()
        self.to_client = _Frames()
        self.pending: list[bool] = [False, False]  # a close frame waits: [client, upstream]
        self.sent: list[bool] = [False, False]  # and once it went
        self.client_gone = False

    async def run(self) -> None:
        upstream = self.upstream
        head = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in upstream.headers:
            head.append(b"%s: %s\r\n" % (name, value))
        for field, text in self.exchange.response_headers:  # a plugin's (rate-limit state)
            head.append(f"{field}: {text}\r\n".encode("latin-1"))
        head.append(b"x-request-id: %s\r\n\r\n" % self.exchange.request_id.encode())
        early = self.connection.upgrade(_ClientSide(self))
        if not self.client.is_closing():
            self.client.write(b"".join(head))
        upstream.sink = self.from_upstream
        upstream.on_lost = self.upstream_lost
        upstream.on_pause = lambda paused: _pause(self.client, paused)
        if upstream.rest:
            self.from_upstream(upstream.rest)
        if early:
            self.from_client(early)
        if upstream.lost:
            self.upstream_lost()
        else:
            _pause(upstream.transport, False)
        if self.client.is_closing():
            self.client_lost()
        else:
            _pause(self.client, False)
        self.idle = self.loop.call_at(self.last + self.session.idle_timeout, self._watch_idle)
        try:
            await self.done
        finally:
            self._finish()
            # cancelled too (the server stopping): never leave the instance's socket
            # open; close() still sends what is buffered, a close frame included
            upstream.transport.close()

    def from_client(self, data: bytes) -> None:
        self.exchange.bytes_in += len(data)
        self._relay(data, 1, self.to_upstream, self.upstream.transport.write,
                    self._close_upstream_side)

    def from_upstream(self, data: bytes) -> None:
        self.exchange.bytes_out += len(data)
        self._relay(data, 0, self.to_client, self.client.write, self._close_client_side)

    def _relay(self, data: bytes, side: int, frames: _Frames, write: Callable[[bytes], Any],
               close_side: Callable[[], None]) -> None:
        """Pass ``data`` on to ``side`` (0: the client, 1: the instance), keeping track
        of its frames so Lucid's own close frame goes in between two of them."""
        self.last = self.loop.time()
        if self.sent[side]:  # that side has Lucid's close frame: nothing more goes there
            frames.feed(data)
            self._maybe_done()
            return
        if self.pending[side]:
            cut = frames.feed(data, stop=True)
            if cut < len(data) or frames.at_boundary:
                write(data[:cut])
                close_side()
                frames.feed(data[cut:])
                self._maybe_done()
                return
        else:
            frames.feed(data)
        write(data)

    def going_away(self, reason: str) -> None:
        """Close both sides with 1001 at their next frame boundary, then the sockets
        once both answered (or after :data:`CLOSE_WAIT`)."""
        if any(self.pending) or self.closing or self.done.done():
            return  # going away already
        self.reason = reason
        self.pending = [True, True]
        self.to_client.closed = self.to_upstream.closed = False  # now: their answers
        if self.to_client.at_boundary:
            self._close_client_side()
        if self.to_upstream.at_boundary:
            self._close_upstream_side()
        self.loop.call_later(CLOSE_WAIT, self._abort)

    reason = ""

    def _close_client_side(self) -> None:
        if self.pending[0]:
            self.pending[0] = False
            self.sent[0] = True
            if not self.client.is_closing():
                self.client.write(close_frame(GOING_AWAY, self.reason, masked=False))
            self._both_sent()

    def _close_upstream_side(self) -> None:
        if self.pending[1]:
            self.pending[1] = False
            self.sent[1] = True
            if not self.upstream.transport.is_closing():
                self.upstream.transport.write(close_frame(GOING_AWAY, self.reason,
                                                          masked=True))
            self._both_sent()

    def _both_sent(self) -> None:
        if not any(self.pending):
            self.closing = True  # from now on nothing more is relayed
            self._maybe_done()

    def _maybe_done(self) -> None:
        """After both close frames went out: end once both peers answered with theirs."""
        if self.closing and self.to_client.closed and self.to_upstream.closed:
            self._close_both()

    def _close_both(self) -> None:
        if not self.client.is_closing():
            self.client.close()
        if not self.upstream.transport.is_closing():
            self.upstream.transport.close()
        self._finish()

    def _abort(self) -> None:
        if not self.done.done():
            self.client.abort()
            self.upstream.transport.abort()
            self._finish()

    def upstream_lost(self) -> None:
        if not self.client.is_closing():
            self.client.close()  # what was written still goes out first
        if self.client_gone:
            self._finish()

    def client_lost(self) -> None:
        self.client_gone = True
        if not self.upstream.transport.is_closing():
            self.upstream.transport.close()
        if self.upstream.lost:
            self._finish()
        else:  # the upstream's side ends when it acknowledges (or CLOSE_WAIT)
            self.loop.call_later(CLOSE_WAIT, self._abort)


class _ClientSide(asyncio.Protocol):
    """The client's socket once upgraded: its bytes go to the tunnel; its loss ends
    the engine's connection too (so a drain knows it closed)."""

    def __init__(self, tunnel: _Tunnel):
        self.tunnel = tunnel

    def data_received(self, data: bytes) -> None:
        self.tunnel.from_client(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.client_lost()
        self.tunnel.connection.connection_lost(exc)

    def pause_writing(self) -> None:
        _pause(self.tunnel.upstream.transport, True)

    def resume_writing(self) -> None:
        _pause(self.tunnel.upstream.transport, False)


class _Bridge(_Relay):
    """Hypercorn: ASGI messages from the client, wsproto frames to the instance."""

    HIGH_WATER = 1024 * 1024  # message bytes waiting for the client before reads pause

    def __init__(self, session: Session, upstream: _Upstream, exchange: Exchange):
        super().__init__(session, upstream, exchange)
        self.ws = Connection(ConnectionType.CLIENT)
        self.messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.writable = asyncio.Event()
        self.writable.set()
        self.parts: list[Any] = []
        self.queued = 0  # bytes of the messages waiting for the client
        self.client_closed = False

    async def run(self) -> None:
        upstream = self.upstream
        session = self.session
        subprotocol = extra = None
        extra = []
        for name, value in upstream.headers:
            lowered = name.lower()
            if lowered == b"sec-websocket-protocol":
                subprotocol = value.decode("latin-1").strip()
            elif lowered not in _NOT_RELAYED_ON_ACCEPT:
                extra.append((name, value))
        extra += [(n.encode("latin-1"), v.encode("latin-1"))
                  for n, v in self.exchange.response_headers]
        extra.append((b"x-request-id", self.exchange.request_id.encode()))
        await session.send({"type": "websocket.accept", "subprotocol": subprotocol,
                            "headers": extra})
        upstream.sink = self.from_upstream
        upstream.on_lost = lambda: self.messages.put_nowait(None)
        upstream.on_pause = self._upstream_paused
        if upstream.rest:
            self.from_upstream(upstream.rest)
        if upstream.lost:
            self.messages.put_nowait(None)
        _pause(upstream.transport, False)
        self.idle = self.loop.call_at(self.last + session.idle_timeout, self._watch_idle)
        tasks = [asyncio.ensure_future(self._from_client()),
                 asyncio.ensure_future(self._to_client())]
        for task in tasks:  # one failing ends the session, rather than leaving it hung
            task.add_done_callback(self._ended)
        try:
            await self.done
        finally:
            self._finish()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not upstream.transport.is_closing():
                upstream.transport.close()

    def _ended(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("request %s: WebSocket bridge failed: %r", self.exchange.request_id,
                        task.exception())
            self._finish()

    def _upstream_paused(self, paused: bool) -> None:
        if paused:
            self.writable.clear()
        else:
            self.writable.set()

    def _write(self, event: Any) -> None:
        transport = self.upstream.transport
        try:
            data = self.ws.send(event)
        except LocalProtocolError:  # closing already: what the client sends now is dropped
            return
        if not transport.is_closing():
            transport.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.last = self.loop.time()
        self.exchange.bytes_out += len(data)
        self.ws.receive_data(data)
        try:
            events = list(self.ws.events())
        except RemoteProtocolError as exc:  # frames no WebSocket peer may send
            log.warning("request %s: the instance broke the WebSocket protocol (%s); "
                        "closing the session", self.exchange.request_id, exc)
            self.upstream.transport.abort()
            return
        for event in events:
            if isinstance(event, Message):
                self.parts.append(event.data)
                if event.message_finished:
                    parts, self.parts = self.parts, []
                    if isinstance(event, TextMessage):
                        text = "".join(parts)
                        self.queued += len(text)
                        self.messages.put_nowait({"type": "websocket.send", "text": text})
                    else:
                        assert isinstance(event, BytesMessage)
                        data = b"".join(parts)
                        self.queued += len(data)
                        self.messages.put_nowait({"type": "websocket.send", "bytes": data})
            elif isinstance(event, Ping):
                self._write(event.response())
            elif isinstance(event, CloseConnection):
                if not self.closing:
                    self._write(event.response())
                self.messages.put_nowait({"type": "websocket.close", "code": event.code,
                                          "reason": event.reason or ""})
                self.messages.put_nowait(None)
        if self.queued > self.HIGH_WATER:
            _pause(self.upstream.transport, True)

    async def _to_client(self) -> None:
        send = self.session.send
        while True:
            message = await self.messages.get()
            if message is None:
                break
            self.queued -= len(message.get("text") or message.get("bytes") or "")
            if self.queued <= self.HIGH_WATER // 2:
                _pause(self.upstream.transport, False)
            if message["type"] == "websocket.close":
                if not self.client_closed:
                    self.client_closed = True
                    await send(message)
                continue
            if not self.client_closed:
                await send(message)
        if not self.client_closed:
            self.client_closed = True
            await send({"type": "websocket.close", "code": GOING_AWAY})
        self._finish()

    async def _from_client(self) -> None:
        receive = self.session.receive
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                self.last = self.loop.time()
                text = message.get("text")
                if text is not None:
                    self.exchange.bytes_in += len(text)
                    self._write(TextMessage(data=text))
                else:
                    data = message.get("bytes") or b""
                    self.exchange.bytes_in += len(data)
                    self._write(BytesMessage(data=data))
                await self.writable.wait()
            elif kind == "websocket.disconnect":
                self.client_closed = True
                if not self.closing:
                    self.closing = True
                    code = int(message.get("code", 1000))
                    self._write(CloseConnection(code=code if code not in (1005, 1006)
                                                else 1000))
                self.loop.call_later(CLOSE_WAIT, self._finish)
                return

    def going_away(self, reason: str) -> None:
        if self.closing or self.done.done():
            return
        self.closing = True
        self._write(CloseConnection(code=GOING_AWAY, reason=reason))
        self.messages.put_nowait({"type": "websocket.close", "code": GOING_AWAY,
                                  "reason": reason})
        self.loop.call_later(CLOSE_WAIT, self._finish)


__all__ = ["Sessions", "accept_token", "call", "close_frame", "handshake_problems",
           "serve"]
