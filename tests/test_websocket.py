"""WebSocket proxying, end to end on each engine: a real aiohttp WebSocket upstream on
loopback, a real aiohttp client, the handshake through routing and admission (JWT,
rate limit, breaker), then messages both ways; idle timeout, drain, failures."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from joserfc import jwt
from joserfc.jwk import OctKey

from lucid.model import Exchange
from lucid.plugins import hookimpl
from lucid.testing import wait_until
from lucid.testing_http import read_response
from lucid.websocket import close_frame

SECRET = "w" * 40
FLOOD, MB = 64, b"m" * (1024 * 1024)  # 64 MiB in 1 MiB messages


class Echo:
    """A WebSocket echo server (protocol ``chat``), counting sessions and the close
    codes it received; any other request gets 200 text."""

    def __init__(self) -> None:
        self.sessions = 0
        self.close_codes: list[int | None] = []
        self.flooded = 0
        self.handshakes: list[web.Request] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("upgrade", "").lower() != "websocket":
            return web.Response(text="not a websocket")
        ws = web.WebSocketResponse(protocols=("chat",), max_msg_size=0)
        await ws.prepare(request)
        self.sessions += 1
        self.handshakes.append(request)
        if request.path.endswith("/flood"):  # as fast as the client takes them
            for _ in range(FLOOD):
                await ws.send_bytes(MB)
                self.flooded += 1
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        self.close_codes.append(ws.close_code)
        return ws


class Seen:
    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.outcomes: list[tuple[str, str, int | None]] = []

    @hookimpl
    def lucid_observe_exchange(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)

    @hookimpl
    def lucid_record_outcome(self, exchange: Exchange, instance: Any, outcome: Any) -> None:
        self.outcomes.append((instance.url, outcome.kind, outcome.status))


def config(url: str, unavailable: str = "http://127.0.0.1:9") -> str:
    return f"""
[gateway.services.echo]
instances = ["{url}"]
[gateway.services.guarded]
instances = ["{url}"]
[gateway.services.down]
instances = ["http://127.0.0.1:9"]
[gateway.services.pair]
instances = ["http://127.0.0.1:9", "{url}"]
[gateway.services.flaky]
instances = ["{unavailable}", "{url}"]

[gateway.auth.issuers.main]
issuer = "https://issuer.test"
audiences = ["api"]
algorithms = ["HS256"]
secret = "{SECRET}"

[[gateway.routes]]
id = "ws"
prefix = "/ws"
service = "echo"

[[gateway.routes]]
id = "auth"
prefix = "/auth"
service = "echo"
auth = {{}}

[[gateway.routes]]
id = "limited"
prefix = "/limited"
service = "echo"

[[gateway.routes]]
id = "guarded"
prefix = "/guarded"
service = "guarded"

[[gateway.routes]]
id = "down"
prefix = "/down"
service = "down"

[[gateway.routes]]
id = "quiet"
prefix = "/quiet"
service = "echo"
timeouts = {{ websocket_idle = "0.5s" }}

[[gateway.routes]]
id = "pair"
prefix = "/pair"
service = "pair"

[[gateway.routes]]
id = "flaky"
prefix = "/flaky"
service = "flaky"

[[ratelimiter.limits]]
id = "handshakes"
rate = "2/minute"
routes = ["limited"]

[circuitbreaker.circuits.guard]
service = "guarded"
"""


def token() -> str:
    now = int(time.time())
    return jwt.encode({"alg": "HS256"}, {"iss": "https://issuer.test", "sub": "alice",
                                         "aud": "api", "iat": now, "exp": now + 300},
                      OctKey.import_key(SECRET))


async def handshake_status(gw: Any, path: str, **kw: Any) -> int:
    """The status of a refused handshake (101 if it was accepted)."""
    try:
        async with gw.session.ws_connect(gw.proxy_url + path, **kw) as ws:
            await ws.close()
            return 101
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status


async def test_messages_go_both_ways_and_the_session_is_observed(engine_gateway,
                                                                 lucid_upstream):
    echo = Echo()
    upstream = await lucid_upstream(echo)
    seen = Seen()
    gw = await engine_gateway(config(upstream.url), plugins=[seen])
    large = os.urandom(4 * 1024 * 1024)
    async with gw.session.ws_connect(gw.proxy_url + "/ws/chat?room=1", protocols=("chat",),
                                     max_msg_size=0) as ws:
        assert ws.protocol == "chat"  # the upstream's choice, relayed
        (handshake,) = echo.handshakes
        assert handshake.path_qs == "/ws/chat?room=1"
        assert handshake.headers["X-Forwarded-For"] == "127.0.0.1"  # as for any request
        assert handshake.headers["X-Request-Id"] == ws._response.headers["X-Request-Id"]
        assert gw.runtime.counters["websockets"] == 1
        async with gw.session.get(gw.admin_url + "/metrics") as r:  # monitoring's gauge
            assert "lucid_websockets_open 1.0" in (await r.text()).splitlines()
        await ws.send_str("hello")
        assert (await ws.receive(timeout=10)).data == "hello"
        await ws.send_bytes(b"\x00\x01\xff")
        assert (await ws.receive(timeout=10)).data == b"\x00\x01\xff"
        await ws.send_bytes(large)  # several MB each way, through back-pressure
        assert (await ws.receive(timeout=30)).data == large
        await ws.send_str("é" * 300_000)
        assert (await ws.receive(timeout=30)).data == "é" * 300_000
        await ws.close()
    assert ws.close_code == 1000
    exchange = await wait_until(lambda: [e for e in seen.exchanges if e.route_id == "ws"]
                                and seen.exchanges[-1])
    assert (exchange.status, exchange.service, exchange.path) == (101, "echo", "/ws/chat")
    assert exchange.duration > 0 and exchange.bytes_in > len(large)
    await wait_until(lambda: echo.close_codes == [1000], message="the upstream's close")
    assert gw.runtime.counters["websockets"] == 0


async def test_the_handshake_is_admitted_like_a_request(engine_gateway, lucid_upstream):
    echo = Echo()
    upstream = await lucid_upstream(echo)
    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=503)

    unavailable = await lucid_upstream(busy)
    seen = Seen()
    gw = await engine_gateway(config(upstream.url, unavailable.url), plugins=[seen])
    # JWT: refused without a token (the gateway's 401), admitted with one
    assert await handshake_status(gw, "/auth/x") == 401
    assert await handshake_status(
        gw, "/auth/x", headers={"Authorization": f"Bearer {token()}"}) == 101
    # rate limit: 2 handshakes a minute, the third refused
    assert [await handshake_status(gw, "/limited") for _ in range(3)] == [101, 101, 429]
    # an open breaker refuses the handshake
    async with gw.session.post(gw.admin_url + "/circuitbreaker/circuits/guard/force-open"
                               ) as r:
        assert r.status == 200, await r.text()
    assert await handshake_status(gw, "/guarded") == 503
    # nothing listens at the instance: 502, as for HTTP
    assert await handshake_status(gw, "/down") == 502
    assert await handshake_status(gw, "/nowhere") == 404
    assert echo.sessions == 3
    # an instance that cannot be reached is an outcome of its own (a breaker counts
    # it), and the next instance is tried: one of two handshakes meets it first
    seen.outcomes.clear()
    assert [await handshake_status(gw, "/pair") for _ in range(2)] == [101, 101]
    assert sorted(seen.outcomes) == sorted([
        ("http://127.0.0.1:9", "connect_error", None), (upstream.url, "success", 101),
        (upstream.url, "success", 101)])
    # an instance answering 503 to the handshake: an error outcome, the next one tried
    seen.outcomes.clear()
    assert [await handshake_status(gw, "/flaky") for _ in range(2)] == [101, 101]
    assert sorted(seen.outcomes) == sorted([
        (unavailable.url, "error_status", 503), (upstream.url, "success", 101),
        (upstream.url, "success", 101)])


async def test_a_bad_handshake_gets_400(engine_gateway, lucid_upstream):
    echo = Echo()
    upstream = await lucid_upstream(echo)
    gw = await engine_gateway(config(upstream.url))
    host, _, port = gw.proxy_url.removeprefix("http://").rpartition(":")
    for fields in (b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                   b"Sec-WebSocket-Version: 13"):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\n" + fields + b"\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
        finally:
            writer.close()
        assert response.status == 400
        if gw.runtime.config.server.engine == "fast":  # Hypercorn answers it bare
            body = json.loads(response.body)
            assert set(body["fields"]) == ({"sec-websocket-version"} if b"8" in fields
                                           else {"sec-websocket-key"})
    assert echo.sessions == 0


@pytest.mark.parametrize("path, server", [("/ws", {"websocket_idle_timeout": 0.5}),
                                          ("/quiet", {})])  # [server], or the route's
async def test_an_idle_session_is_closed(engine_gateway, lucid_upstream, path, server):
    echo = Echo()
    upstream = await lucid_upstream(echo)
    gw = await engine_gateway(config(upstream.url), **server)
    async with gw.session.ws_connect(gw.proxy_url + path, autoping=False) as ws:
        await ws.send_str("still here")
        assert (await ws.receive(timeout=10)).data == "still here"
        message = await ws.receive(timeout=10)  # nothing more: the proxy closes it
        assert message.type == WSMsgType.CLOSE and message.data == 1001
    await wait_until(lambda: echo.close_codes == [1001], message="the upstream's close")


@pytest.mark.parametrize("engine", ["fast", "hypercorn"])
async def test_a_drain_closes_sessions_with_1001(engine, lucid_process, lucid_upstream):
    echo = Echo()
    upstream = await lucid_upstream(echo)
    gw = lucid_process(config(upstream.url), engine=engine, grace_period=5)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(gw.proxy_url + "/ws", autoping=False) as ws:
            await ws.send_str("ping")
            assert (await ws.receive(timeout=10)).data == "ping"
            started = time.monotonic()
            gw.signal(signal.SIGTERM)
            message = await ws.receive(timeout=10)
            assert message.type == WSMsgType.CLOSE and message.data == 1001
    await wait_until(lambda: echo.close_codes == [1001], message="the upstream's close")
    assert await asyncio.to_thread(gw.wait) == 0
    assert time.monotonic() - started < 5  # within the grace period, not at its end


async def test_a_slow_client_holds_the_upstream_back(engine_gateway, lucid_upstream):
    """Back-pressure: while the client reads nothing, the proxy stops reading the
    instance, so the instance's sends stall instead of Lucid buffering them all."""
    echo = Echo()
    upstream = await lucid_upstream(echo)
    gw = await engine_gateway(config(upstream.url))
    async with gw.session.ws_connect(gw.proxy_url + "/ws/flood", max_msg_size=0) as ws:
        seen: list[tuple[int, float]] = []

        def stalled() -> bool:  # the count stood still for half a second
            now = time.monotonic()
            if not seen or seen[-1][0] != echo.flooded:
                seen.append((echo.flooded, now))
                return False
            return echo.flooded > 0 and now - seen[-1][1] >= 0.5

        await wait_until(stalled, message="the upstream's sends to stall or end")
        assert echo.flooded < FLOOD  # what the socket buffers hold, not everything
        for _ in range(FLOOD):
            message = await ws.receive(timeout=10)
            assert message.data == MB
    await wait_until(lambda: echo.flooded == FLOOD)


def test_frame_boundaries_are_found_however_the_bytes_are_split():
    """The fast engine's tunnel follows frame headers only, to put a close frame
    between two frames: every split of a stream must give the same boundaries."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import BytesMessage, CloseConnection, TextMessage

    from lucid.websocket import _Frames

    client = Connection(ConnectionType.CLIENT)  # masked frames, as a client sends
    frames = [client.send(TextMessage(data="hi")),
              client.send(BytesMessage(data=b"b" * 200)),        # 16-bit length
              client.send(BytesMessage(data=b"c" * 70_000)),     # 64-bit length
              client.send(TextMessage(data="", message_finished=True)),
              client.send(CloseConnection(code=1000))]
    stream = b"".join(frames)
    ends = {sum(map(len, frames[:i + 1])) for i in range(len(frames))}
    for size in (1, 2, 3, 7, 126, 4096, len(stream)):
        tracker, seen, at = _Frames(), set(), 0
        for start in range(0, len(stream), size):
            chunk = stream[start:start + size]
            while chunk:  # as the tunnel does while a close frame waits
                cut = tracker.feed(chunk, stop=True)
                if cut == 0:  # at a boundary already: step over one byte to move on
                    cut = tracker.feed(chunk[:1])
                at += cut
                chunk = chunk[cut:]
                if tracker.at_boundary:
                    seen.add(at)
        assert seen == ends, size
        assert tracker.closed


@pytest.mark.parametrize("engine", ["fast", "hypercorn"])
async def test_a_drain_mid_message_closes_between_messages(engine, lucid_process,
                                                           lucid_upstream):
    """SIGTERM while 1 MiB messages stream to a client that is behind: it gets whole
    messages, then the 1001 close frame (never one cut into a message)."""
    echo = Echo()
    upstream = await lucid_upstream(echo)
    gw = lucid_process(config(upstream.url), engine=engine, grace_period=5)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(gw.proxy_url + "/ws/flood", max_msg_size=0,
                                      autoping=False) as ws:
            assert (await ws.receive(timeout=10)).data == MB
            await wait_until(lambda: echo.flooded > 3, message="messages under way")
            gw.signal(signal.SIGTERM)
            while True:
                message = await ws.receive(timeout=10)
                if message.type != WSMsgType.BINARY:
                    break
                assert message.data == MB
            assert message.type == WSMsgType.CLOSE and message.data == 1001
    assert await asyncio.to_thread(gw.wait) == 0


async def test_a_websocket_over_http2_is_proxied_on_hypercorn(lucid_gateway, lucid_upstream):
    """RFC 8441 (extended CONNECT, which Hypercorn offers on HTTP/2): the stream carries
    no key, Lucid makes one for the instance, asked over HTTP/1.1."""
    import h2.config
    import h2.connection
    import h2.events
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import TextMessage

    echo = Echo()
    upstream = await lucid_upstream(echo)
    gw = await lucid_gateway(config(upstream.url), engine="hypercorn")
    host, _, port = gw.proxy_url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    writer.write(client.data_to_send())

    async def events() -> list[Any]:
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data, "the connection closed"
        received = client.receive_data(data)
        writer.write(client.data_to_send())
        return received

    try:
        while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in await events()):
            pass
        stream = client.get_next_available_stream_id()
        client.send_headers(stream, [(":method", "CONNECT"), (":protocol", "websocket"),
                                     (":scheme", "http"), (":path", "/ws/h2"),
                                     (":authority", "a"), ("sec-websocket-version", "13")])
        writer.write(client.data_to_send())
        status = None
        while status is None:
            for event in await events():
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
        assert status == b"200"
        ws = Connection(ConnectionType.CLIENT)
        client.send_data(stream, ws.send(TextMessage(data="over h2")))
        writer.write(client.data_to_send())
        echoed = None
        while echoed is None:
            for event in await events():
                if isinstance(event, h2.events.DataReceived):
                    client.acknowledge_received_data(event.flow_controlled_length, stream)
                    ws.receive_data(event.data)
                    echoed = next((m.data for m in ws.events()
                                   if isinstance(m, TextMessage)), None)
        assert echoed == "over h2"
        (handshake,) = echo.handshakes
        assert handshake.path == "/ws/h2" and handshake.headers["Sec-WebSocket-Key"]
    finally:
        writer.close()
    await wait_until(lambda: gw.runtime.counters["websockets"] == 0, timeout=3)
    await wait_until(lambda: echo.close_codes, timeout=3)


async def test_wss_is_proxied_over_tls_termination(engine_gateway, lucid_upstream, tls_files):
    """``wss://`` to Lucid ([server.tls]), plain ``ws`` to the instance, which hears
    https as the client's scheme; messages both ways through the TLS transport."""
    echo = Echo()
    upstream = await lucid_upstream(echo)
    gw = await engine_gateway(config(upstream.url) + f"""
[server.tls]
cert = "{tls_files.server_cert}"
key = "{tls_files.server_key}"
""")
    assert gw.proxy_url.startswith("https://")
    large = os.urandom(2 * 1024 * 1024)
    async with aiohttp.ClientSession() as session, session.ws_connect(
            gw.proxy_url.replace("https://", "wss://") + "/ws", max_msg_size=0,
            ssl=tls_files.client_context()) as ws:
        await ws.send_str("secret")
        assert (await ws.receive(timeout=10)).data == "secret"
        await ws.send_bytes(large)
        assert (await ws.receive(timeout=30)).data == large
        await ws.close()
    (handshake,) = echo.handshakes
    assert handshake.headers["X-Forwarded-Proto"] == "https"
    await wait_until(lambda: echo.close_codes == [1000], message="the upstream's close")


async def test_a_pipelined_handshake_is_refused_by_the_fast_engine(lucid_gateway,
                                                                   lucid_upstream):
    """A handshake behind a request in the same write would be read before its turn
    to take the connection over: 400 after the first answer, and the connection ends."""
    echo = Echo()
    upstream = await lucid_upstream(echo)
    gw = await lucid_gateway(config(upstream.url), engine="fast")
    host, _, port = gw.proxy_url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /ws/plain HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        first = await asyncio.wait_for(read_response(reader), 10)
        second = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert (first.status, second.status, second.closed) == (200, 400, True)
    assert echo.sessions == 0


async def _serve_tls(handler: Any, ctx: Any) -> tuple[web.AppRunner, int]:
    """``handler`` for every path over TLS on loopback (``ctx``): (runner, port)."""
    async def handle(request: web.Request) -> web.StreamResponse:
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    return runner, runner.addresses[0][1]


async def test_a_session_is_proxied_to_an_https_instance(engine_gateway, tls_files):
    """``wss`` from Lucid to an ``https://`` instance, its certificate verified with the
    service's ``tls_ca`` (without it, the system's CAs refuse it: 502 and no session);
    messages both ways, through TLS on the upstream side."""
    echo = Echo()
    ctx = tls_files.server_context()
    names: list[str | None] = []  # the SNI names it was sent
    ctx.sni_callback = lambda _, name, __: names.append(name)
    runner, port = await _serve_tls(echo, ctx)
    try:
        seen = Seen()
        gw = await engine_gateway(config(f"https://localhost:{port}") + f"""
[gateway.services.unknown-ca]
instances = ["https://localhost:{port}"]

[[gateway.routes]]
id = "unknown-ca"
prefix = "/unknown-ca"
service = "unknown-ca"

[services.echo]
tls_ca = "{tls_files.ca_cert}"
""", plugins=[seen])
        assert await handshake_status(gw, "/unknown-ca") == 502
        assert echo.sessions == 0
        assert seen.outcomes == [(f"https://localhost:{port}", "connect_error", None)]

        large = os.urandom(2 * 1024 * 1024)
        async with gw.session.ws_connect(gw.proxy_url + "/ws/tls", protocols=("chat",),
                                         max_msg_size=0) as ws:
            assert ws.protocol == "chat"
            await ws.send_str("over wss")
            assert (await ws.receive(timeout=10)).data == "over wss"
            await ws.send_bytes(large)
            assert (await ws.receive(timeout=30)).data == large
            await ws.close()
        assert ws.close_code == 1000
        (handshake,) = echo.handshakes
        assert handshake.secure and handshake.path == "/ws/tls"  # it came over TLS
        assert names[-1] == "localhost"
        await wait_until(lambda: echo.close_codes == [1000], message="the upstream's close")
        assert seen.outcomes[-1] == (f"https://localhost:{port}", "success", 101)
    finally:
        await runner.cleanup()


class WrongAccept:
    """An instance that answers every handshake 101 with a ``Sec-WebSocket-Accept``
    that is not the one for the client's key, then at once sends a text frame; it
    records what arrives after each handshake, and when each connection ends."""

    FRAME = b"\x81\x05hello"  # an unmasked text frame, as a server sends

    def __init__(self) -> None:
        self.after: list[bytes] = []  # per connection: the bytes after the head
        self.ended = 0
        self.server: asyncio.Server | None = None

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + base64.b64encode(b"x" * 20)
                         + b"\r\n\r\n" + self.FRAME)
            self.after.append(b"")
            while data := await reader.read(65536):
                self.after[-1] += data
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.ended += 1
            writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_wrong_accept_is_a_failure_and_nothing_is_tunnelled(engine_gateway,
                                                                    lucid_upstream):
    """An instance's 101 whose ``Sec-WebSocket-Accept`` is not the one for the key (it
    did not understand the handshake, or something in between answered): 502 to the
    client with a JSON body naming the problem, an upstream failure
    (its outcome recorded, the next instance tried when there is one), and no byte
    relayed either way: the instance's connection is cut."""
    wrong = WrongAccept()
    url = await wrong.start()
    try:
        echo = Echo()
        upstream = await lucid_upstream(echo)
        seen = Seen()
        gw = await engine_gateway(config(upstream.url, url) + f"""
[gateway.services.wrong]
instances = ["{url}"]

[[gateway.routes]]
id = "wrong"
prefix = "/wrong"
service = "wrong"
""", plugins=[seen])
        host, _, port = gw.proxy_url.removeprefix("http://").rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /wrong HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader, closed_wait=None), 10)
            assert response.status == 502
            assert response.header("upgrade") is None
            body = json.loads(response.body)  # Hypercorn's denial response carries it too
            assert body["error"] == ("upstream answered the WebSocket handshake 101 with "
                                     "a wrong Sec-WebSocket-Accept")
            assert body["request_id"] == response.header("x-request-id")
            assert WrongAccept.FRAME not in response.body
            await wait_until(lambda: wrong.ended == 1, message="the instance's connection cut")
            # the client's connection is no tunnel: a frame sent now is not relayed,
            # and the instance's frame never arrives (the connection reads as HTTP, or
            # it has ended)
            writer.write(close_frame(1000, "bye", masked=True))
            rest = await asyncio.wait_for(reader.read(), 10)
            assert WrongAccept.FRAME not in rest
        finally:
            writer.close()
        assert wrong.after == [b""]
        assert seen.outcomes == [(url, "upstream_error", None)]
        (exchange,) = [e for e in seen.exchanges if e.route_id == "wrong"]
        assert exchange.status == 502
        assert gw.runtime.counters.get("websockets", 0) == 0  # no session was opened

        # aiohttp's client sees the 502 too; with a good instance next, the handshake
        # is retried there: one of two handshakes meets the wrong instance first
        assert await handshake_status(gw, "/wrong") == 502
        seen.outcomes.clear()
        assert [await handshake_status(gw, "/flaky") for _ in range(2)] == [101, 101]
        assert sorted(seen.outcomes) == sorted([
            (url, "upstream_error", None), (upstream.url, "success", 101),
            (upstream.url, "success", 101)])
        assert echo.sessions == 2 and set(wrong.after) == {b""}
    finally:
        wrong.close()
