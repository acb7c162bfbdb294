"""Two listeners in one process (proxy and admin), optional extra proxy workers, and
the signals that drive them: SIGTERM/SIGINT drain and exit 0, SIGHUP reloads.

Sockets are bound here, before any worker starts, so that port 0 resolves to one
real port that every worker shares and that can be announced on stderr.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from ssl import SSLError
from typing import Any, Protocol

import h11
import hypercorn.asyncio.run
from hypercorn.asyncio import serve
from hypercorn.asyncio.tcp_server import MAX_RECV, TCPServer
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol

from lucid.admin import HeadLimits, create_admin_app
from lucid.config import ConfigError
from lucid.http import HEAD_LATE, refusal
from lucid.model import Event
from lucid.proxy import ProxyApp
from lucid.runtime import Runtime, load_plugins_and_config
from lucid.tls import load_tls

log = logging.getLogger("lucid")


def bind_socket(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {listen}: {exc.strerror}") from None
    # Listening now means a connection made right after the "listening" line waits
    # in the backlog instead of being refused while the server starts.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LucidHypercornConfig(HypercornConfig):
    """Hypercorn's settings, and what it lacks: a time limit on reading a request head,
    and TLS from a context Lucid made (certificates chosen by SNI, swapped on reload)
    rather than from its certfile/keyfile."""

    request_head_timeout: float | None = None
    ssl_context: ssl.SSLContext | None = None

    @property
    def ssl_enabled(self) -> bool:
        return self.ssl_context is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self.ssl_context


class TimedConnection(Protocol):
    """What :class:`HeadClock` keeps time for: a client connection of either engine."""

    loop: asyncio.AbstractEventLoop
    context: Any  # its server's; ``context.terminated`` is set when the server drains

    def head_timed_out(self) -> None: ...

    def keep_alive_ended(self) -> None: ...


class HeadClock:
    """Every connection's request-head deadline and keep-alive timeout, on shared timers.

    Measured under callgrind: arming a timer task per request (Hypercorn's idle-task
    way: a task and a ``wait_for`` each time) cost about 58k instructions, 4% of a
    proxied request. Here the first byte of a head is a dict insert and the parsed head
    a dict removal; a sweep runs only while some head is pending, every ``TICK``
    seconds (a timeout is late by at most that).

    Keep-alive (``keep_alive_timeout``, Hypercorn's idle task, which it restarts after
    every response and cancels at every request head: a task, a ``wait_for`` and a
    cancellation each time) is kept the same way: a connection that falls idle joins
    the set of those whose timeout ends in the same whole second (one timer per
    second, the way ``lucid.deadline`` groups upstream deadlines; a timeout is late by
    less than a second), and leaves it when its next request begins. When the server
    starts draining, every idle connection is closed at once, as Hypercorn's idle task
    did.
    """

    TICK = 0.1

    def __init__(self) -> None:
        self.due: dict[TimedConnection, float] = {}
        self.sweep: asyncio.TimerHandle | None = None
        self.resting: dict[int, set[TimedConnection]] = {}  # by the second they end
        self.draining: dict[Any, asyncio.Task[None]] = {}  # Hypercorn's worker contexts

    def begin(self, connection: TimedConnection, timeout: float) -> None:
        loop = connection.loop
        self.due[connection] = loop.time() + timeout
        if self.sweep is None:
            self.sweep = loop.call_later(self.TICK, self._sweep, loop)

    def end(self, connection: TimedConnection) -> None:
        self.due.pop(connection, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sweep = None
        now = loop.time()
        late = [c for c, due in self.due.items() if due <= now]
        for connection in late:
            del self.due[connection]
            connection.head_timed_out()
        if self.due:
            self.sweep = loop.call_later(self.TICK, self._sweep, loop)

    def rest(self, connection: TimedConnection, timeout: float) -> set[Any]:
        """``connection`` is idle from now for at most ``timeout`` seconds; the set
        returned holds it until then (discard it from there when a request begins)."""
        loop = connection.loop
        when = math.ceil(loop.time() + timeout)
        resting = self.resting.get(when)
        if resting is None:
            resting = self.resting[when] = set()
            loop.call_at(when, self._rested, when)
        resting.add(connection)
        context = connection.context
        if context not in self.draining:
            self.draining[context] = loop.create_task(self._drain(context))
        return resting

    def _rested(self, when: int) -> None:
        for connection in self.resting.pop(when, ()):
            connection.keep_alive_ended()

    async def _drain(self, context: Any) -> None:
        """Close the idle connections of a server that stops (its ``terminated``)."""
        try:
            await context.terminated.wait()
            for resting in list(self.resting.values()):
                for connection in [c for c in resting if c.context is context]:
                    resting.discard(connection)
                    connection.keep_alive_ended()
        finally:
            del self.draining[context]


_head_clocks: dict[asyncio.AbstractEventLoop, HeadClock] = {}


def head_clock(loop: asyncio.AbstractEventLoop) -> HeadClock:
    clock = _head_clocks.get(loop)
    if clock is None:
        for stale in [lp for lp in _head_clocks if lp.is_closed()]:
            del _head_clocks[stale]
        clock = _head_clocks[loop] = HeadClock()
    return clock


class HeadTimedTCPServer(TCPServer):
    """Hypercorn's connection, with a request-head timeout separate from keep-alive.

    Hypercorn arms one timer while a connection is idle (``keep_alive_timeout``) and
    stops it when the parser has a whole request head, so a client trickling a head
    held the connection for the full 75 s keep-alive. Here the first byte of a new
    request, arriving while idle, starts ``request_head_timeout`` on a shared clock
    (:class:`HeadClock`): the head must be complete within it, or the client gets 408
    and the connection closes (nginx's client_header_timeout). An idle keep-alive
    connection that sends nothing still waits the 75 s.

    The keep-alive timeout is kept on the same shared clock, not in Hypercorn's idle
    task (see :class:`HeadClock`).

    Relies on TCPServer's internals (``_read_data``, ``protocol``, ``Updated`` events,
    ``send_lock``, ``idle_task``, ``_initiate_server_close``), the same in Hypercorn
    0.17 and 0.18; pyproject pins that range.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idle = True  # no request in progress (Hypercorn starts idle)
        self._reading_head = False
        self._head_timeout: float | None = getattr(self.config, "request_head_timeout", None)
        self._clock = head_clock(self.loop)
        self._resting: set[HeadTimedTCPServer] | None = None  # the clock's, while idle
        self.idle_task = _KeepAlive(self)  # type: ignore[assignment]

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, Updated):  # a head parsed (idle=False), or a response done
            self._idle = event.idle
            if self._reading_head:
                self._reading_head = False
                self._clock.end(self)
            if event.idle:
                if self._head_timeout and self._pipelined():
                    # The next request's head began before this response ended: time it.
                    self._start_head()
                self.rest()
            else:
                self.wake()
            return  # what Hypercorn does with Updated: its idle task, here rest/wake
        await super().protocol_send(event)

    def rest(self) -> None:
        """Idle from now: the keep-alive timeout runs (closed at once while draining)."""
        self.wake()
        if self.context.terminated.is_set():
            self.keep_alive_ended()
        else:
            self._resting = self._clock.rest(self, self.config.keep_alive_timeout)

    def wake(self) -> None:
        """A request began (or the connection ends): no keep-alive timeout runs."""
        if self._resting is not None:
            self._resting.discard(self)
            self._resting = None

    def keep_alive_ended(self) -> None:
        """Idle too long, or the server drains: close, in a task of the connection's
        own task group (as Hypercorn's idle task did)."""
        self._resting = None
        self._task_group.spawn(self._close_idle)

    async def _close_idle(self) -> None:
        await asyncio.shield(self._initiate_server_close())

    def _start_head(self) -> None:
        assert self._head_timeout is not None
        self._reading_head = True
        self._clock.begin(self, self._head_timeout)

    def _pipelined(self) -> bool:
        """Whether HTTP/1.1 bytes of a next request are already buffered, unparsed."""
        protocol = self.protocol.protocol
        return isinstance(protocol, H11Protocol) and isinstance(
            protocol.connection, h11.Connection) and bool(protocol.connection.trailing_data[0])

    async def _read_data(self) -> None:
        # TCPServer._read_data, plus the head timer started by a new request's first byte.
        try:
            while not self.reader.at_eof():
                try:
                    data = await asyncio.wait_for(self.reader.read(MAX_RECV),
                                                  self.config.read_timeout)
                except (ConnectionError, OSError, TimeoutError, SSLError):
                    break
                else:
                    if data and self._idle and not self._reading_head and self._head_timeout \
                            and isinstance(self.protocol.protocol, H11Protocol):  # not h2 pings
                        self._start_head()
                    await self.protocol.handle(RawData(data))
            await self.protocol.handle(Closed())
        finally:
            self._clock.end(self)

    def head_timed_out(self) -> None:
        """The clock found this head late: answer 408 and close, in a task of the
        connection's own task group (it ends with the connection)."""
        self._task_group.spawn(self._answer_late_head)

    async def _answer_late_head(self) -> None:
        # No request has started, so no response either: the 408 is written as is.
        async with self.send_lock:
            try:
                self.writer.write(refusal(408, HEAD_LATE))
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                pass
        await asyncio.shield(self._initiate_server_close())


class _KeepAlive:
    """Stands in for the connection's ``idle_task`` (Hypercorn's ``AsyncioSingleTask``),
    which Hypercorn restarts when a connection opens and stops when it closes: the
    shared clock keeps the timeout instead of a task."""

    __slots__ = ("connection",)

    def __init__(self, connection: HeadTimedTCPServer):
        self.connection = connection

    async def restart(self, task_group: Any, action: Any) -> None:
        self.connection.rest()

    async def stop(self) -> None:
        self.connection.wake()


def install_head_timeout() -> None:
    """Make Hypercorn's asyncio worker use HeadTimedTCPServer for every connection.

    ``hypercorn.asyncio.run.worker_serve`` builds each connection's ``TCPServer`` by
    its module-global name and has no hook for another class; this is the one place
    that replaces it. Connections of a config without ``request_head_timeout`` behave
    exactly as Hypercorn's own.
    """
    hypercorn.asyncio.run.TCPServer = HeadTimedTCPServer  # type: ignore[attr-defined]


def hypercorn_config(sock: socket.socket, server: Any, name: str,
                     ssl_context: ssl.SSLContext | None = None) -> HypercornConfig:
    cfg = LucidHypercornConfig()
    cfg.bind = [f"fd://{sock.fileno()}"]
    cfg.ssl_context = ssl_context
    cfg.ssl_handshake_timeout = min(float(server.request_head_timeout), 60.0)
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger(f"lucid.{name}.server")
    cfg.graceful_timeout = server.grace_period
    # h11 bounds only a head still incomplete; the proxy and the admin listener
    # (HeadLimits) measure the whole head themselves (JSON 431, or 414 for a long
    # request line), so h11's bound is only for memory, at twice the limit: within it
    # every oversized head gets Lucid's answer, past it h11 stops reading with a bare 431.
    cfg.h11_max_incomplete_size = 2 * server.max_request_header_size
    cfg.request_head_timeout = server.request_head_timeout
    cfg.keep_alive_timeout = 75
    # Hypercorn closes a client connection after 1,000 requests by default; a gateway
    # should not force its clients to reconnect (Envoy sets no such limit either).
    cfg.keep_alive_max_requests = 1_000_000
    cfg.backlog = 2048
    cfg.include_server_header = False
    cfg.include_date_header = name != "proxy"  # the proxy passes the origin's Date on
    return cfg


async def run_process(
    runtime: Runtime,
    proxy_sock: socket.socket,
    admin_sock: socket.socket | None,
    children: list[int],
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    tune_gc: bool = False,
) -> None:
    """Serve until ``stop`` is set (SIGTERM/SIGINT set it), then drain and stop plugins.

    Signal handlers are installed, and the garbage collector tuned, only for the
    ``lucid serve`` process itself: tests and embedders run a gateway inside their
    own event loop and keep their own process settings.
    """
    if stop is None:
        stop = asyncio.Event()
        _install_signal_handlers(runtime, stop, children)
    install_head_timeout()
    runtime.listeners["proxy"] = address(proxy_sock)  # known before start: the cluster
    if admin_sock is not None:                          # tells the other nodes
        runtime.listeners["admin"] = address(admin_sock)
    await runtime.start()
    try:
        server = runtime.config.server
        proxy_app = ProxyApp(runtime)
        tls = runtime.termination.context if runtime.termination is not None else None
        serving = [_serve_proxy(proxy_app, proxy_sock, server, stop, tls)]
        if admin_sock is not None:
            admin_app: Any = HeadLimits(create_admin_app(runtime), runtime)
            serving.append(serve(admin_app, hypercorn_config(admin_sock, server, "admin"),
                                 shutdown_trigger=stop.wait))
        for name, where in runtime.listeners.items():
            scheme = "https" if name == "proxy" and tls is not None else "http"
            log.info("%s listening on %s://%s (worker %d, pid %d)",
                     name, scheme, where, runtime.worker_index, os.getpid())
        if tune_gc:
            tune_garbage_collector()
        if ready is not None:
            ready.set()
        announce = asyncio.create_task(_announce_stopping(runtime, stop))
        goodbye = asyncio.create_task(proxy_app.websockets.close_when(stop))  # 1001
        try:
            await asyncio.gather(*serving)
        finally:
            announce.cancel()
            goodbye.cancel()
            await proxy_app.close()
    finally:
        # Hypercorn closed the listening fds it was handed; forget them here so they
        # are not closed twice (the number may already belong to a new file).
        for sock in (proxy_sock, admin_sock):
            if sock is not None and sock.fileno() != -1:
                sock.detach()
        await runtime.stop()
        log.info("worker %d stopped", runtime.worker_index)


async def _serve_proxy(app: ProxyApp, sock: socket.socket, server: Any,
                       stop: asyncio.Event, tls: ssl.SSLContext | None = None) -> None:
    """The proxy listener on the engine ``[server] engine`` names: ``fast`` (llhttp on
    uvloop, :mod:`lucid.engine`) or ``hypercorn`` (h11, and HTTP/2 by h2c, or h2 over
    TLS); over TLS when ``tls`` is given (``[server.tls]``, :mod:`lucid.tls`)."""
    if server.engine == "hypercorn":
        await serve(app, hypercorn_config(sock, server, "proxy", tls),  # type: ignore[arg-type]
                    shutdown_trigger=stop.wait)
    else:
        from lucid.engine import serve_fast  # it builds on this module's HeadClock

        await serve_fast(app, sock, server, stop.wait, tls)


async def _announce_stopping(runtime: Runtime, stop: asyncio.Event) -> None:
    """Tell observers the moment draining starts (a ``stopping`` event), so what holds
    a connection open on purpose (watches, blocking queries) ends it instead of
    keeping the process up for the whole grace period."""
    await stop.wait()
    runtime.emit(Event("stopping", {"worker": runtime.worker_index}))


def tune_garbage_collector() -> None:
    """Keep the cyclic GC off the request path (measured: 11% of CPU under load).

    Everything alive once the gateway has started (modules, config, apps) lives until
    exit, so it is frozen out of the collector's scans; and with 50 requests in
    flight the default gen-0 threshold (700) is crossed by live objects alone, so a
    collection ran every few requests and found little. Refcounting still frees
    nearly everything a request allocates; cycles are collected, just less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _install_signal_handlers(runtime: Runtime, stop: asyncio.Event, children: list[int]) -> None:
    loop = asyncio.get_running_loop()

    def forward(sig: int) -> None:
        for pid in children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def on_stop() -> None:
        forward(signal.SIGTERM)
        stop.set()

    def on_hup() -> None:
        forward(signal.SIGHUP)
        runtime.reload_in_background()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)


def serve_forever(config_path: Path | None) -> int:
    """``lucid serve``: load, bind, fork workers, serve. Returns the exit code."""
    try:
        plugin_set, config = load_plugins_and_config(config_path)
        workers = config.server.workers
        from lucid.plugins import Hooks

        reasons = Hooks(plugin_set.pm).check_workers(config, workers)
        if reasons:
            source = str(config_path) if config_path else "(built-in defaults)"
            raise ConfigError(source, [f"server.workers = {workers}: {r}" for r in reasons])
        # every certificate and key readable and matching, before any worker starts
        load_tls(config, config_path, warn=False)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    configure_logging(config.server.log_level)
    try:
        proxy_sock = bind_socket(config.server.proxy)
        admin_sock = bind_socket(config.server.admin)
    except OSError as exc:
        print(f"lucid: {exc}", file=sys.stderr)
        return 1
    children: list[int] = []
    for index in range(1, workers):
        pid = os.fork()
        if pid == 0:
            admin_sock.close()
            code = _run(Runtime(plugin_set, config, config_path), proxy_sock, None, [], index)
            os._exit(code)
        children.append(pid)
    code = _run(Runtime(plugin_set, config, config_path), proxy_sock, admin_sock, children, 0)
    if code != 0:  # worker 0 failed: the others must not serve on without an admin API
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return code


def _run(runtime: Runtime, proxy_sock: socket.socket, admin_sock: socket.socket | None,
         children: list[int], index: int) -> int:
    runtime.worker_index = index
    try:
        import uvloop

        uvloop.run(run_process(runtime, proxy_sock, admin_sock, children, tune_gc=True))
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(run_process(runtime, proxy_sock, admin_sock, children, tune_gc=True))
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except Exception:
        # A plugin failing to start (a store it cannot open, say): say which worker,
        # exit non-zero, and never let a forked worker run on into the parent's code.
        log.exception("worker %d failed to start or stopped with an error", index)
        return 1
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
