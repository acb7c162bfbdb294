"""The data plane: a raw ASGI callable, not a Quart route (a Quart route costs about a
third of the throughput on the same server).

One request: normalise the path, match a route, admit, resolve instances, then try
instances (selection, permission, upstream call, outcome) within the route's retry
policy, and stream the response back. Bodies stream both ways in bounded chunks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from lucid import websocket
from lucid.deadline import Deadline, Deadlines
from lucid.http import (
    CLIENT_IDENTITY,
    FORWARDING,
    HOP_BY_HOP,
    _ids,
    client_ip,
    forwarded_element,
    hop_by_hop,
    http_date,
    is_trusted,
    json_body,
    normalize_path,
    refused_head,
    request_id_from,
    traceparent_from,
    underscore_twins,
)
from lucid.model import Exchange, Instance, Outcome, Rejection
from lucid.upstream import Response, UpstreamConnectError, UpstreamPool

if TYPE_CHECKING:
    from lucid.runtime import Runtime

log = logging.getLogger("lucid.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
BUFFER_LIMIT = 64 * 1024  # bodies up to this size are buffered, so they can be retried
READ_CHUNK = 64 * 1024
_SAFE_PATH = "/!$&'()*+,;=:@~"
_JSON = (b"content-type", b"application/json")
_CLOSE = (b"connection", b"close")
_FORWARDING = FORWARDING  # set by Lucid whatever the client sent
_TWINS = underscore_twins(_FORWARDING | CLIENT_IDENTITY)  # dropped from every peer
# Characters a path may carry unquoted upstream (RFC 3986 pchar and "/"): the usual path
# needs no quoting at all, and this check is cheaper than quote() finding that out.
_NEEDS_QUOTING = re.compile(r"[^A-Za-z0-9\-._~/!$&'()*+,;=:@]").search


def upstream_url(exchange: Exchange, instance: Instance) -> URL:
    """Where ``exchange`` goes at ``instance``: its upstream path, quoted only where it
    must be, and its query. The proxy's own call and a plugin's (a breaker's fallback
    to another service) build it here, so both send the same request line."""
    path = exchange.upstream_path
    if _NEEDS_QUOTING(path):
        path = quote(path, safe=_SAFE_PATH)
    return URL(instance.base + path + ("?" + exchange.query if exchange.query else ""),
               encoded=True)


def upstream_request(exchange: Exchange, instance: Instance) -> tuple[URL, list[tuple[str, str]]]:
    """The URL and headers the proxy sends for ``exchange`` to ``instance``, for a plugin
    that calls an upstream itself from a hook that runs once attempts began
    (``lucid_permit_call`` onwards, ``lucid_fallback_response``): hop-by-hop headers
    dropped, forwarding headers, request id and trace context set, as the proxy did."""
    headers = exchange.upstream_headers
    if headers is None:
        raise ValueError(f"request {exchange.request_id}: no upstream call was prepared")
    return upstream_url(exchange, instance), headers


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class BodyTimeout(Exception):
    """The client did not send the body it declared in time: answered 408."""


class _Body:
    """The request body as the upstream pool sends it, counted and capped on the way.

    Reading it counts against the route's timeouts, whichever path it takes (buffered,
    streamed, chunked): no wait for the next piece longer than ``read``, the whole body
    within ``total``. Without that, a client that declares a body and sends none holds
    a connection and a task for ever (nginx's client_body_timeout, Envoy's
    request_timeout do the same job).
    """

    __slots__ = ("receive", "exchange", "limit", "deadlines", "started", "waiting", "error",
                 "_total")

    def __init__(self, receive: Any, exchange: Exchange, limit: int | None,
                 deadlines: Deadlines):
        self.receive = receive
        self.exchange = exchange
        self.limit = limit
        self.deadlines = deadlines
        self.started = False
        self.waiting = False  # on the client: a timeout now is the client's
        self.error: Exception | None = None
        self._total: Deadline | None = None

    async def read_all(self) -> bytes:
        parts = [chunk async for chunk in self.stream()]
        return b"".join(parts)

    async def stream(self) -> AsyncIterator[bytes]:
        self.started = True
        policy = self.exchange.policy
        deadlines = self.deadlines
        # Created here, in the task that reads (a caller may send a streamed body from
        # a task of its own), so that expiry interrupts the read and nothing else.
        total = self._total = deadlines.deadline(policy.total_timeout)
        try:
            more = True
            while more:
                gap = deadlines.deadline(policy.read_timeout)
                self.waiting = True
                try:
                    with total, gap:
                        message = await self.receive()
                except TimeoutError:
                    self.error = BodyTimeout()
                    raise self.error from None
                finally:
                    gap.close()
                self.waiting = False
                if message["type"] == "http.disconnect":
                    self.error = ClientGone()
                    raise self.error
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                if chunk:
                    self.exchange.bytes_in += len(chunk)
                    if self.limit is not None and self.exchange.bytes_in > self.limit:
                        self.error = BodyTooLarge()
                        raise self.error
                    yield chunk
        finally:
            total.close()

    def close(self) -> None:
        """Forget the body's deadline, also when the pool stopped reading half-way."""
        if self._total is not None:
            self._total.close()


# The body of every request that declares none: never read, so nothing ever changes
# it (``started``, ``waiting`` and ``error`` are set only while a body is read).
_NO_BODY = _Body(None, None, None, None)  # type: ignore[arg-type]


class ProxyApp:
    """The ASGI application serving the proxy listener."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.passive = runtime.passive
        self._rotation = 0
        self.deadlines = Deadlines()
        self._via_cache: tuple[Any, bytes, str] = (None, b"", "")
        self._pool: UpstreamPool | None = None
        self.websockets = websocket.Sessions()

    @property
    def pool(self) -> UpstreamPool:
        """The upstream connections (made on first use, in the serving event loop)."""
        pool = self._pool
        if pool is None:
            server = self.runtime.config.server
            pool = self._pool = UpstreamPool(server.upstream_connections,
                                             server.upstream_keepalive)
        return pool

    async def close(self) -> None:
        """Close the upstream connections (the server has drained)."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """One request. The usual one (no streamed body, answered by the first
        instance) runs in this coroutine and :meth:`_call` alone: each coroutine a
        request passes through costs it a call and a resumption."""
        kind = scope["type"]
        if kind != "http" and "lucid.websocket" not in scope:
            if kind == "lifespan":
                await _lifespan(receive, send)
            elif kind == "websocket":  # the handshake; handle() with lucid.websocket's call
                await websocket.serve(self, scope, receive, send)
            return
        runtime = self.runtime
        generation = runtime.generation  # read once: a reload never changes it under us
        server = generation.config.server
        started = perf_counter()
        headers: dict[str, str] = {}
        head_size = 0  # the fields as sent, "name: value" CRLF, less 4 bytes each
        for raw_name, raw_value in scope["headers"]:
            head_size += len(raw_name) + len(raw_value)
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            if name in headers:
                headers[name] += ("; " if name == "cookie" else ", ") + value
            else:
                headers[name] = value
        client = scope.get("client")
        peer = client[0] if client else ""
        trusted = server.trusted_proxies
        request_id = headers.get("x-request-id")
        exchange = Exchange(
            request_id_from(request_id) if request_id is not None
            else _ids.getrandbits(128).to_bytes(16, "little").hex(),  # new_request_id()
            scope["method"], scope["path"],
            scope["query_string"].decode("latin-1"), headers.get("host", ""), scope["scheme"],
            client_ip(peer, headers.get("x-forwarded-for"), trusted) if trusted else peer,
            headers, started, generation)
        counters = runtime.counters
        counters["requests"] += 1
        counters["in_flight"] += 1
        send = _Sent(send)
        hooks = runtime.hooks
        try:
            refused = refused_head(scope, headers, head_size, server)
            if refused is not None:
                return await self._reply(exchange, send, *refused, close=True)
            raw = exchange.path  # normalised only when it may need it: a call less
            path = (normalize_path(raw) if not raw.startswith("/") or "//" in raw
                    or "/." in raw or "\x00" in raw else raw)
            if path is None:
                return await self._reply(exchange, send, 400, "malformed request path")
            exchange.path = exchange.upstream_path = path
            if hooks.match_route(exchange, generation) is None:
                return await self._reply(exchange, send, 404, "no route matches this request")
            policy = exchange.policy
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    return await self._reply(exchange, send, 400, "malformed Content-Length")
                if policy.max_body_size is not None and int(length) > policy.max_body_size:
                    return await self._reply(exchange, send, 413, "request body too large")
            if hooks.admits:
                rejection = hooks.admit_request(exchange)
                if rejection is not None and not isinstance(rejection, Rejection):
                    rejection = await rejection
                if rejection is not None:
                    exchange.rejection = rejection
                    return await self._send_rejection(exchange, send, rejection)
            instances = exchange.instances = hooks.resolve_instances(exchange, generation)
            if not instances and not getattr(instances, "everyone", None):
                return await self._reply(exchange, send, 503, _no_instances(exchange))
            body = _NO_BODY
            data: Any = None
            if length is not None or "transfer-encoding" in headers:
                body = _Body(receive, exchange, policy.max_body_size, self.deadlines)
                if length is not None and int(length) <= BUFFER_LIMIT:
                    if length == "0":
                        exchange.body = b""
                    else:
                        try:
                            data = exchange.body = await body.read_all()
                        except BodyTooLarge:
                            return await self._reply(exchange, send, 413,
                                                     "request body too large")
                        except BodyTimeout:
                            return await self._reply(exchange, send, 408, _BODY_LATE,
                                                     close=True)
                        except ClientGone:
                            exchange.error = "client disconnected"
                            return
                else:
                    data = body
            await self._attempts(exchange, instances, body, data, send, peer, scope)
        except Exception:
            counters["errors"] += 1
            log.exception("request %s failed inside Lucid", exchange.request_id)
            exchange.error = exchange.error or "internal error"
            if not send.started:
                await self._reply(exchange, send, 500, "internal error")
        finally:
            counters["in_flight"] -= 1
            ended = perf_counter()
            exchange.duration = ended - started
            runtime.recent.append((ended, exchange.duration, exchange.status))  # metrics
            if hooks.observes_exchanges:
                observing = hooks.observe_exchange(exchange)
                if observing is not None:
                    await observing

    #: what :mod:`lucid.websocket` runs a checked handshake through
    handle = __call__

    async def _attempts(
        self, exchange: Exchange, instances: Any, body: _Body, data: Any, send: _Sent,
        peer: str, scope: dict[str, Any],
    ) -> None:
        hooks = self.runtime.hooks
        if self.passive.ejected:  # only then: a list without the ejected, made once
            instances = exchange.instances = self.passive.view(instances)
        policy = exchange.policy
        budget = policy.budget
        idempotent = exchange.method in IDEMPOTENT
        upstream_headers = self._upstream_headers(exchange, peer, scope)
        exchange.upstream_headers = upstream_headers
        tried: list[Instance] = []
        failure: Rejection | None = None  # made when needed: most requests never do
        budget.active_requests += 1
        try:
            while exchange.attempts < policy.attempts:
                retry = exchange.attempts > 0
                if retry and not budget.allows_retry():
                    break
                candidates = [i for i in instances if i not in tried] if tried else instances
                if not candidates and instances:  # every healthy one tried (none healthy:
                    break                          # a panic threshold may still pick)
                instance = hooks.select_instance(exchange, candidates) if hooks.selects else None
                if instance is None:  # no selection plugin: rotate the first pick
                    if not candidates:
                        break
                    if tried:
                        instance = candidates[0]
                    else:
                        instance = candidates[self._rotation % len(candidates)]
                        self._rotation += 1
                tried.append(instance)
                if hooks.permits:
                    refused = hooks.permit_call(exchange, instance)
                    if refused is not None and not isinstance(refused, Rejection):
                        refused = await refused
                    if refused is not None:
                        failure = refused
                        continue
                exchange.attempts += 1
                exchange.instance = instance
                if retry:
                    budget.active_retries += 1
                try:
                    if scope["type"] == "websocket":
                        result = await websocket.call(self, exchange, instance, upstream_headers,
                                                      send, scope,
                                                      last=exchange.attempts >= policy.attempts)
                    else:
                        result = await self._call(exchange, instance, upstream_headers, body,
                                                  data, send, idempotent,
                                                  last=exchange.attempts >= policy.attempts)
                finally:
                    if retry:
                        budget.active_retries -= 1
                if isinstance(result, Rejection):
                    failure = result
                    if body.error is not None or (body.started and data is body):
                        break  # a streamed body cannot be sent twice
                    continue
                return
        finally:
            budget.active_requests -= 1
            if body is not _NO_BODY:
                body.close()
        if isinstance(body.error, ClientGone):
            exchange.error = "client disconnected"
            return
        if isinstance(body.error, BodyTooLarge):
            return await self._reply(exchange, send, 413, "request body too large")
        if isinstance(body.error, BodyTimeout):
            return await self._reply(exchange, send, 408, _BODY_LATE, close=True)
        if failure is None:
            failure = Rejection(503, reason="no instance accepted the request" if instances
                                else _no_instances(exchange))
        exchange.rejection = failure
        answer = await hooks.fallback_response(exchange, failure)
        await self._send_rejection(exchange, send, answer)

    async def attempt_failed(self, exchange: Exchange, instance: Instance,
                             outcome: Outcome, what: str = "") -> Rejection:
        """An attempt at ``instance`` got no answer (``outcome``: a timeout, a refused
        connection, a broken reply): counted everywhere it counts, and the 502/504 to
        answer unless another instance does better. ``what``: said in the log before
        the outcome (e.g. "WebSocket handshake ")."""
        exchange.upstream_duration = outcome.duration
        exchange.outcome = outcome
        log.info("request %s: %s%s from %s: %s", exchange.request_id, what, outcome.kind,
                 instance.url, outcome.error)
        recording = self.runtime.hooks.record_outcome(exchange, instance, outcome)
        if recording is not None:
            await recording
        self.passive.record(exchange, instance, outcome)
        status = 504 if outcome.kind == "timeout" else 502
        return Rejection(status, reason=f"upstream {outcome.kind.replace('_', ' ')}")

    async def _call(
        self, exchange: Exchange, instance: Instance, headers: list[tuple[str, str]],
        body: _Body, data: Any, send: _Sent, idempotent: bool, last: bool,
    ) -> Rejection | None:
        """One upstream attempt. A Rejection means "try elsewhere or answer with this".

        The route's total timeout runs from here to the response's last byte. The pool
        enforces it up to the response head; a :class:`Deadline` takes over only when
        the body does not come whole with the head, or when the request body is
        streamed (the usual small request and response never need one)."""
        hooks = self.runtime.hooks
        policy = exchange.policy
        path = exchange.upstream_path  # upstream_url(), inline: a call less per request
        if _NEEDS_QUOTING(path):
            path = quote(path, safe=_SAFE_PATH)
        base = instance.url
        if base[-1:] == "/":
            base = base.rstrip("/")
        url = URL(base + path + ("?" + exchange.query if exchange.query else ""), encoded=True)
        pool = self._pool or self.pool
        upstreams = self.runtime.tls.upstreams
        tls = upstreams.get(instance.service) if upstreams else None
        started = perf_counter()
        exchange.upstream_started = started
        deadline: Deadline | None = None
        try:
            if isinstance(data, _Body):
                deadline = self.deadlines.deadline(policy.total_timeout)
                with deadline:
                    response = await pool.request(
                        exchange.method, url, headers, data.stream(),
                        connect_timeout=policy.connect_timeout,
                        read_timeout=policy.read_timeout, tls=tls)
            else:
                response = await pool.request(
                    exchange.method, url, headers, data,
                    connect_timeout=policy.connect_timeout, read_timeout=policy.read_timeout,
                    total_timeout=policy.total_timeout, tls=tls)
        except Exception as exc:
            if deadline is not None:
                deadline.close()
            if body.error is None and body.waiting and isinstance(exc, TimeoutError):
                # The upstream waited for the body as long as Lucid did: the client
                # is the slow side (408), not the instance (no outcome recorded).
                body.error = BodyTimeout()
            if body.error is not None:
                return Rejection(400, reason=type(body.error).__name__)
            return await self.attempt_failed(
                exchange, instance, _classify(exc, perf_counter() - started))
        status = response.status
        outcome = Outcome(
            "error_status" if status >= 500 else "success", status, perf_counter() - started)
        exchange.outcome = outcome
        if hooks.records:
            recording = hooks.record_outcome(exchange, instance, outcome)
            if recording is not None:
                await recording
        if status >= 500:
            self.passive.record(exchange, instance, outcome)
        if (status in policy.retry_on_status and idempotent and not last
                and not (body.started and data is body)):
            if deadline is not None:
                deadline.close()
            response.release()
            return Rejection(status, reason=f"upstream answered {status}")
        try:
            # the response head: hop-by-hop fields dropped, Via and the request id added
            response_headers = response.headers
            connection = response_headers.get("connection")
            drop = hop_by_hop(connection) if connection else HOP_BY_HOP
            if exchange.drop_response_headers:
                drop = drop | exchange.drop_response_headers
            cached, generation = self._via_cache, exchange.generation  # _upstream_headers set it
            via = (cached[1] if generation is not None and cached[0] is generation.config.server
                   else self._via()[0])
            out = []
            lowered_names = _LOWERED
            for name, value in response.raw_headers:
                lowered = lowered_names.get(name)
                if lowered is None:
                    lowered = _lowered(name)
                if lowered == "via":
                    via = value + b", " + via
                elif lowered not in drop:
                    out.append((name, value))
            if "date" not in response_headers:  # a proxy adds Date when the origin did not
                out.append((b"date", http_date()))   # (RFC 9110 §6.6.1)
            out.append((b"x-request-id", exchange.request_id.encode()))
            out.append((b"via", via))
            if exchange.response_headers:
                out += [(n.encode("latin-1"), v.encode("latin-1"))
                        for n, v in exchange.response_headers]
            exchange.status = status
            send.started = True  # the server's send itself: a call less each (_Sent's)
            await send.send({"type": "http.response.start", "status": status, "headers": out})
            if exchange.method == "HEAD" or status == 204 or status == 304:
                await send.body(b"", more=False)
                whole = True
            else:
                # Every body is passed on as it arrives, whatever its declared length: a
                # long poll or a slow API must not wait for its last byte to show its
                # first. The usual small response came whole with its head: it goes out
                # as one final message, with no wait, timer or deadline.
                chunk = response.read_whole()
                if chunk is not None:
                    exchange.bytes_out += len(chunk)
                    await send.send({"type": "http.response.body", "body": chunk,
                                     "more_body": False})
                    whole = True
                else:
                    if deadline is None:
                        deadline = self.deadlines.deadline(
                            max(0.0, policy.total_timeout - (perf_counter() - started)))
                    whole = await self._stream_body(exchange, response, send, deadline)
        finally:
            if deadline is not None:
                deadline.close()
            response.release()
            exchange.upstream_duration = perf_counter() - started
        if whole and status < 500 and self.passive.failing:
            # a success for passive health only once the body came whole
            self.passive.record(exchange, instance, outcome)
        return None

    async def _stream_body(
        self, exchange: Exchange, response: Response, send: _Sent, deadline: Deadline,
    ) -> bool:
        """Pass a response body on as it arrives; False if the upstream broke it off."""
        chunk: bytes | None = None
        try:
            while True:  # the deadline covers reading the upstream, not writing to the client
                if chunk is None or deadline.expired:
                    with deadline:
                        chunk = await response.read_chunk()
                if not chunk:
                    break
                exchange.bytes_out += len(chunk)
                if response.at_eof():
                    await send.body(chunk, more=False)
                    return True
                await send.body(chunk, more=True)
                chunk = response.read_ready()  # what came already: no wait, nothing to time
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            # The status line is gone; closing the connection is the only honest signal.
            exchange.error = f"upstream failed mid-response: {type(exc).__name__}"
            log.warning("request %s: upstream %s failed mid-response (%s); closing the "
                        "client connection", exchange.request_id, exchange.instance and
                        exchange.instance.url, type(exc).__name__)
            response.close()
            if exchange.instance is not None:  # a broken response counts against it
                self.passive.record(exchange, exchange.instance, Outcome(
                    "upstream_error", response.status,
                    perf_counter() - exchange.upstream_started,
                    f"failed mid-response: {type(exc).__name__}"))
            return False
        await send.body(b"", more=False)
        return True

    def _upstream_headers(
        self, exchange: Exchange, peer: str, scope: dict[str, Any]
    ) -> list[tuple[str, str]]:
        headers = exchange.headers
        generation = exchange.generation
        server = (generation or self.runtime.generation).config.server
        trusted = bool(server.trusted_proxies) and is_trusted(peer, server.trusted_proxies)
        drop = _not_forwarded(headers.get("connection"), exchange.set_request_headers, trusted,
                              server.forwarded, server.x_real_ip)
        out = [(k, v) for k, v in headers.items() if k not in drop]
        if trusted:
            incoming = headers.get("x-forwarded-for")
            out.append(("x-forwarded-for", f"{incoming}, {peer}" if incoming else peer))
            out.append(("x-forwarded-proto", headers.get("x-forwarded-proto") or exchange.scheme))
            host = headers.get("x-forwarded-host") or exchange.host
        else:  # the peer is the client: what it claims about earlier hops is not passed on
            out.append(("x-forwarded-for", peer))
            out.append(("x-forwarded-proto", exchange.scheme))
            host = exchange.host
        if host:
            out.append(("x-forwarded-host", host))
        if server.forwarded:  # RFC 7239 §4: each proxy appends its element
            element = forwarded_element(peer, exchange.scheme, exchange.host)
            incoming = headers.get("forwarded") if trusted else None
            out.append(("forwarded", f"{incoming}, {element}" if incoming else element))
        if server.x_real_ip:
            out.append(("x-real-ip", exchange.client_ip))
        cached = self._via_cache
        via = cached[2] if cached[0] is server else self._via()[1]
        out.append(("via", f"{headers['via']}, {via}" if "via" in headers else via))
        out.append(("x-request-id", exchange.request_id))
        incoming = headers.get("traceparent")
        if incoming is None:  # a new trace: traceparent_from's, drawn here, a call less
            ids = _ids.getrandbits(192).to_bytes(24, "little").hex()
            out.append(("traceparent", f"00-{ids[:32]}-{ids[32:]}-00"))
            kept = False
        else:
            traceparent, kept = traceparent_from(incoming)
            out.append(("traceparent", traceparent))
        if not kept and "tracestate" in headers:  # a new trace has no vendor state
            out = [(k, v) for k, v in out if k != "tracestate"]
        if exchange.policy.preserve_host and exchange.host:
            out.append(("host", exchange.host))
        return out

    def _via(self) -> tuple[bytes, str]:
        """This hop's Via entry, as bytes and as text, made once per config."""
        server = self.runtime.generation.config.server
        cached = self._via_cache
        if cached[0] is not server:
            text = f"1.1 {server.via}"
            cached = self._via_cache = (server, text.encode("latin-1"), text)
        return cached[1], cached[2]

    async def _send_rejection(self, exchange: Exchange, send: _Sent, rejection: Rejection) -> None:
        body = rejection.body
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in rejection.headers]
        names = {n.lower() for n, _ in headers}
        if isinstance(body, dict) or (not body and rejection.status not in (204, 304)):
            extra = body if isinstance(body, dict) else {}
            message = rejection.reason or "request rejected"
            body = json_body(rejection.status, message, exchange.request_id, extra)
            if b"content-type" not in names:
                headers.append(_JSON)
        elif isinstance(body, str):
            body = body.encode()
        if rejection.retry_after is not None and b"retry-after" not in names:
            headers.append((b"retry-after", str(max(1, round(rejection.retry_after))).encode()))
        await self._send_full(exchange, send, rejection.status, headers, body)

    async def _reply(self, exchange: Exchange, send: _Sent, status: int, message: str,
                     close: bool = False) -> None:
        """An answer of Lucid's own: a small JSON body carrying the request id.

        ``close`` when the rest of the connection cannot be trusted or read (a request
        whose framing is in doubt, a body that stopped): the client is told so, and the
        server closes it after the answer (RFC 9112 §9.6)."""
        exchange.error = exchange.error or message
        body = json_body(status, message, exchange.request_id)
        await self._send_full(exchange, send, status, [_JSON, _CLOSE] if close else [_JSON], body)

    async def _send_full(
        self, exchange: Exchange, send: _Sent, status: int, headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        exchange.status = status
        headers.append((b"content-length", str(len(body)).encode()))
        headers.append((b"date", http_date()))
        headers.append((b"x-request-id", exchange.request_id.encode()))
        for name, value in exchange.response_headers:
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        await send.start(status, headers)
        exchange.bytes_out += len(body)
        await send.body(body if exchange.method != "HEAD" else b"", more=False)


class _Sent:
    """ASGI ``send`` that remembers whether the response has started.

    Its methods hand back the server's own awaitable instead of wrapping it in a
    coroutine of their own: one coroutine less per message, twice per request."""

    __slots__ = ("send", "started")

    def __init__(self, send: Any):
        self.send = send
        self.started = False

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> Awaitable[None]:
        self.started = True
        return self.send(  # type: ignore[no-any-return]
            {"type": "http.response.start", "status": status, "headers": headers})

    def body(self, chunk: bytes, more: bool) -> Awaitable[None]:
        return self.send(  # type: ignore[no-any-return]
            {"type": "http.response.body", "body": chunk, "more_body": more})


@functools.lru_cache(maxsize=256)
def _not_forwarded(connection: str | None, own: frozenset[str], trusted: bool,
                   forwarded: bool, real_ip: bool) -> frozenset[str]:
    """Request headers not copied upstream as they came, cached per combination (nearly
    every request has the same one): hop-by-hop ones; those Lucid sets itself; from a
    client that is not a trusted proxy, those naming who or where it is
    (``CLIENT_IDENTITY``); and the underscore twins of all these and of ``own``.

    ``own`` are headers a plugin set (the gateway's claim headers). A Connection header
    names fields of the message as received (RFC 9110 §7.6.1), not ones added on the
    way, so it cannot remove them; nor does ``CLIENT_IDENTITY`` remove one a route chose.
    """
    replaced = _FORWARDING
    if forwarded:
        replaced |= {"forwarded"}
    if real_ip:
        replaced |= {"x-real-ip"}
    named = hop_by_hop(connection) if trusted else hop_by_hop(connection) | CLIENT_IDENTITY
    dropped = (named - own) | HOP_BY_HOP | replaced | _TWINS
    return dropped | _twins_of(own) if own else dropped


@functools.lru_cache(maxsize=64)  # one set per route that sets headers, at most
def _twins_of(own: frozenset[str]) -> frozenset[str]:
    return underscore_twins(own)


_BODY_LATE = "request body not received in time"
# Upstream response header names as sent -> lower-case text: an upstream sends the same
# few names every time, so each is decoded and lowered once, not once per response.
_LOWERED: dict[bytes, str] = {}
_LOWERED_LIMIT = 1024  # an upstream inventing names costs a refill, never memory


def _lowered(name: bytes) -> str:
    if len(_LOWERED) >= _LOWERED_LIMIT:
        _LOWERED.clear()
    lowered = _LOWERED[name] = name.decode("latin-1").lower()
    return lowered


def _no_instances(exchange: Exchange) -> str:
    return f"no instances available for service {exchange.service!r}"


def _classify(exc: BaseException, duration: float) -> Outcome:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return Outcome("timeout", None, duration, type(exc).__name__)
    if isinstance(exc, UpstreamConnectError | aiohttp.ClientConnectorError
                  | ConnectionRefusedError):
        return Outcome("connect_error", None, duration, str(exc))
    if isinstance(exc, aiohttp.ClientError | OSError):
        return Outcome("upstream_error", None, duration, f"{type(exc).__name__}: {exc}")
    raise exc


async def _lifespan(receive: Any, send: Any) -> None:
    """The proxy app has nothing to start: the runtime is started by the server."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
