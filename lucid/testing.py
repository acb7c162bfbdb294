"""The test kit for Lucid plugin authors (and Lucid's own tests), shipped in the package.

Everything here runs for real: a gateway on loopback sockets built from a TOML string,
upstream servers on loopback, a real HTTP client, and gateway subprocesses for signal
and crash tests. Installed as a pytest plugin (the ``pytest11`` entry point ``lucid``),
it provides the fixtures ``lucid_gateway``, ``lucid_upstream`` and ``lucid_process``,
and the ``--lucid-conformance=FILE`` option of the conformance suite
(:mod:`lucid.conformance`). Tests that use the fixtures need pytest-asyncio with
``asyncio_mode = "auto"``. ``docs/testing.md`` is the guide.

The names in ``__all__`` are the public kit; raw-socket HTTP/1.1 helpers are in
:mod:`lucid.testing_http`. Helpers only Lucid's own tests use live in
:mod:`lucid.testing_internal`; the ones that used to be here still answer from here
for one release, with a :class:`DeprecationWarning`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from aiohttp import web
from aiohttp.test_utils import TestServer

from lucid.deprecation import moved
from lucid.runtime import Runtime, load_plugins_and_config
from lucid.server import bind_socket, run_process
from lucid.testing_redis import RedisServer

__all__ = [
    "GatewayProcess",
    "Handler",
    "PluginAdmin",
    "RedisServer",
    "RunningGateway",
    "Upstream",
    "echo",
    "json_request",
    "run_gateway",
    "start_upstream",
    "wait_until",
    "wait_until_answered",
    "write_config",
]

# Lucid's own test helpers, moved to lucid.testing_internal (one release of aliases)
__getattr__ = moved(__name__, dict.fromkeys(
    ("two_services", "lucid_env", "run_lucid", "builtin_plugins", "plugin_rows",
     "debian_tool"), "lucid.testing_internal"))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def write_config(text: str | dict[str, Any], directory: Path, **server: Any) -> Path:
    """Write ``cluster.toml`` into ``directory`` with free loopback ports and a private
    data dir filled in unless the config sets them."""
    data = tomllib.loads(text) if isinstance(text, str) else dict(text)
    section = data.setdefault("server", {})
    section.setdefault("proxy", "127.0.0.1:0")
    section.setdefault("admin", "127.0.0.1:0")
    section.setdefault("data_dir", str(directory / "data"))
    section.setdefault("grace_period", "5s")
    section.update(server)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cluster.toml"
    path.write_text(tomli_w.dumps(data))
    return path


async def wait_until(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
    message: str = "condition",
) -> Any:
    """Poll ``condition`` (sync or async) until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


async def wait_until_answered(request: Callable[[], Awaitable[int]]) -> None:
    """Send ``request`` (it returns a status) until it is answered 200. A forked
    ``lucid serve`` worker announces its listener before Hypercorn calls listen(), so
    the first connections may be refused."""

    async def answered() -> bool:
        try:
            return await request() == 200
        except aiohttp.ClientConnectionError:
            return False

    await wait_until(answered, message="the proxy to answer")


@dataclass
class RunningGateway:
    """A gateway serving in the current event loop, as :func:`run_gateway` and the
    ``lucid_gateway`` fixture give it."""

    #: the gateway itself: ``runtime.generation`` (the live config, ``.config.<section>``
    #: and what plugins prepared), ``runtime.instances(service)``, ``runtime.hooks``
    runtime: Runtime
    #: the ``cluster.toml`` written for it (free ports and a private ``data_dir`` filled in)
    config_path: Path
    #: ``http://127.0.0.1:<port>`` of the proxy listener (the data plane); ``https://``
    #: with ``[server.tls]``
    proxy_url: str
    #: ``http://127.0.0.1:<port>`` of the admin API
    admin_url: str
    #: an aiohttp client session, closed with the gateway; it does not decompress
    #: bodies, so a test sees what the gateway sent
    session: aiohttp.ClientSession

    def plugin(self, name: str) -> Any:
        """The enabled plugin named ``name`` (its instance: counters, state), for a
        test to look at; LookupError if no such plugin is enabled."""
        target = self.runtime.plugin_set.pm.get_plugin(name)
        if target is None:
            raise LookupError(f"no enabled plugin is named {name!r}")
        return target

    def plugin_hook(self, plugin: str, hook: str) -> Callable[..., Any]:
        """Call ``hook`` of the enabled plugin named ``plugin`` alone, with keyword
        arguments as the hook spec names them: that plugin's own answer, not the first
        of all plugins' (a firstresult hook answers one value, any other a list).
        LookupError if the plugin is not enabled or does not implement the hook."""
        pm = self.runtime.plugin_set.pm
        target = self.plugin(plugin)
        caller = getattr(pm.hook, hook)
        if not any(impl.plugin is target for impl in caller.get_hookimpls()):
            raise LookupError(f"plugin {plugin!r} does not implement {hook}")
        return pm.subset_hook_caller(
            hook, [p for p in pm.get_plugins() if p is not target])


@asynccontextmanager
async def run_gateway(
    text: str | dict[str, Any], directory: Path, *, plugins: Sequence[object] = (),
    **server: Any,
) -> AsyncIterator[RunningGateway]:
    """Start a gateway from a TOML string (or a dict) on free loopback ports, its files
    under ``directory``; stop it on exit. ``server`` settings are added to ``[server]``.

    ``plugins``: objects with ``@hookimpl`` methods registered in this gateway besides
    the installed plugins the config chooses (a test's observer, a spy), called after
    them; one may register a config section like any plugin. Each is named after its
    class (``"Spy"``; a second of one class ``"Spy-2"``)."""
    path = write_config(text, directory, **server)
    plugin_set, config = load_plugins_and_config(path, extra=_named(plugins))
    runtime = Runtime(plugin_set, config, path)
    proxy_sock = bind_socket(config.server.proxy)
    admin_sock = bind_socket(config.server.admin)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_process(runtime, proxy_sock, admin_sock, [], stop, ready))
    await asyncio.wait([task, asyncio.create_task(ready.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raise what stopped it
    scheme = "https" if runtime.termination is not None else "http"  # [server.tls]
    proxy_url = f"{scheme}://{runtime.listeners['proxy']}"
    admin_url = f"http://{runtime.listeners['admin']}"
    session = aiohttp.ClientSession(auto_decompress=False)
    try:
        async def healthy() -> bool:  # the core's own endpoint: any routing plugin will do
            try:
                async with session.get(f"{admin_url}/openapi.json") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(healthy, message="the admin API to answer")
        yield RunningGateway(runtime, path, proxy_url, admin_url, session)
    finally:
        await session.close()
        stop.set()
        await asyncio.wait_for(task, timeout=30)


def _named(plugins: Sequence[object]) -> list[tuple[str, object]]:
    named: list[tuple[str, object]] = []
    for plugin in plugins:
        base = type(plugin).__name__ if not isinstance(plugin, type) else plugin.__name__
        count = sum(1 for name, _ in named if name.split("-")[0] == base)
        named.append((base if count == 0 else f"{base}-{count + 1}", plugin))
    return named


async def json_request(
    session: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, Any]:
    """A request whose answer is JSON: ``(status, parsed body)``."""
    async with session.request(method, url, **kw) as r:
        return r.status, await r.json()


class PluginAdmin:
    """One plugin's admin API on a running gateway, for tests:
    ``await admin("POST", "/pools", {...})`` answers ``(status, JSON body)``."""

    def __init__(self, gw: RunningGateway, prefix: str):
        self.gw = gw
        self.prefix = prefix

    async def __call__(self, method: str, path: str, json: Any = None, **kw: Any
                       ) -> tuple[int, Any]:
        return await json_request(self.gw.session, method,
                                  self.gw.admin_url + self.prefix + path, json=json, **kw)


@dataclass
class Upstream:
    """An aiohttp server on loopback standing in for a microservice."""

    server: TestServer
    requests: list[web.Request] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def port(self) -> int:
        return int(self.server.port or 0)

    async def close(self) -> None:
        await self.server.close()


async def start_upstream(handler: Handler | web.Application | None = None) -> Upstream:
    """Serve ``handler`` for every path (or a whole aiohttp app) on a free port.

    Without a handler, every request gets 200 and a JSON echo of what arrived.
    """
    upstream: Upstream
    if isinstance(handler, web.Application):
        app = handler
    else:
        chosen = handler or echo

        async def record(request: web.Request) -> web.StreamResponse:
            upstream.requests.append(request)
            return await chosen(request)

        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, host="127.0.0.1")
    upstream = Upstream(server)
    await server.start_server()
    return upstream


async def echo(request: web.Request) -> web.StreamResponse:
    """Answer with what arrived: method, path, query, headers and body size."""
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "path": request.raw_path.split("?")[0],
        "query": request.raw_path.partition("?")[2],
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_size": len(body),
        "port": request.transport.get_extra_info("sockname")[1] if request.transport else None,
    })


class GatewayProcess:
    """``lucid serve --config config_path`` in a subprocess, for signals, restarts and
    memory measurements. ``env`` is added to this process's environment; its stderr
    (the log) is collected in ``lines``, and ``proxy_url``/``admin_url`` come from its
    "listening on" lines."""

    LISTENING = re.compile(r"(proxy|admin) listening on (https?://\S+)")

    def __init__(self, config_path: Path, env: dict[str, str] | None = None,
                 stdout: Any = subprocess.DEVNULL):
        self.config_path = config_path
        self.lines: list[str] = []
        self.urls: dict[str, str] = {}
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lucid", "serve", "--config", str(config_path)],
            stdout=stdout, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                if m := self.LISTENING.search(line):
                    self.urls.setdefault(m.group(1), m.group(2))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything it logged so far."""
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 20.0) -> str:
        """Block until a stderr line matches ``pattern``; fail with the output so far."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no line matching {pattern!r} (exit code {self.proc.poll()}):\n"
                        + "\n".join(self.lines))
                self._changed.wait(min(remaining, 0.2))

    def wait_ready(self, timeout: float = 20.0) -> GatewayProcess:
        """Block until both listeners are announced (see :func:`wait_until_answered` for
        a worker's first connections)."""
        self.wait_for_line("admin listening on", timeout)
        self.wait_for_line("proxy listening on", timeout)
        return self

    @property
    def proxy_url(self) -> str:
        return self.urls["proxy"]

    @property
    def admin_url(self) -> str:
        return self.urls["admin"]

    def signal(self, sig: int) -> None:
        """Send ``sig`` (``signal.SIGHUP`` reloads, ``SIGTERM`` drains and exits)."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit; its exit code."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


# pytest fixtures ------------------------------------------------------------

try:
    import pytest
    import pytest_asyncio
except ImportError:  # pragma: no cover - the helpers above work without pytest
    pass
else:
    # a private redis-server per test (cluster mode), for any plugin's tests
    from lucid.testing_redis import lucid_redis  # noqa: F401

    @pytest_asyncio.fixture
    async def lucid_upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
        """Factory: ``await lucid_upstream(handler=None)`` serves a handler (or an aiohttp
        app) on a free loopback port (see :func:`start_upstream`); closed after the test."""
        started: list[Upstream] = []

        async def factory(handler: Handler | web.Application | None = None) -> Upstream:
            upstream = await start_upstream(handler)
            started.append(upstream)
            return upstream

        yield factory
        for upstream in started:
            await upstream.close()

    __all__ += ["lucid_gateway", "lucid_process", "lucid_redis", "lucid_upstream"]

    def pytest_addoption(parser: pytest.Parser) -> None:
        """``--lucid-conformance=FILE``: run :mod:`lucid.conformance` against the plugin
        that FILE (a ``conformance.toml``) names, instead of against the built-ins; may
        be given more than once."""
        parser.getgroup("lucid").addoption(
            "--lucid-conformance", metavar="FILE", action="append", default=[],
            help="conformance.toml naming the plugin that "
                 "'pytest --pyargs lucid.conformance' tests (default: Lucid's built-ins); "
                 "repeatable")

    @pytest_asyncio.fixture
    async def lucid_gateway(
        tmp_path: Path,
    ) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
        """Factory: ``await lucid_gateway(toml_text, plugins=(), **server)`` runs a
        gateway in this event loop (see :func:`run_gateway`); stopped after the test."""
        stack: list[Any] = []

        async def factory(text: str | dict[str, Any], *, plugins: Sequence[object] = (),
                          **server: Any) -> RunningGateway:
            context = run_gateway(text, tmp_path / f"gateway{len(stack)}", plugins=plugins,
                                  **server)
            gateway = await context.__aenter__()
            stack.append(context)
            return gateway

        yield factory
        for context in reversed(stack):
            await context.__aexit__(None, None, None)

    @pytest.fixture
    def lucid_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
        """Factory: ``lucid_process(toml_text, env=None, wait=True, **server)`` starts
        ``lucid serve`` in a subprocess (a :class:`GatewayProcess`), ready unless
        ``wait=False``; stopped (SIGTERM) after the test."""
        started: list[GatewayProcess] = []

        def factory(text: str | dict[str, Any], env: dict[str, str] | None = None,
                    wait: bool = True, **server: Any) -> GatewayProcess:
            path = write_config(text, tmp_path / f"process{len(started)}", **server)
            process = GatewayProcess(path, env)
            started.append(process)
            return process.wait_ready() if wait else process

        yield factory
        for process in started:
            process.stop()
