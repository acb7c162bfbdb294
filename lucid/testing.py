"""Testing helpers for Lucid and its plugin authors, shipped with the package.

Everything here runs for real: a gateway on loopback sockets built from a TOML
string, upstream servers on loopback, and gateway subprocesses for signal and
crash tests. Installed as a pytest plugin (``pytest11`` entry point), it provides the
fixtures ``lucid_gateway``, ``lucid_upstream`` and ``lucid_process``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from aiohttp import web
from aiohttp.test_utils import TestServer

from lucid.plugins import ENTRY_POINT_GROUP, InstalledPlugin
from lucid.runtime import Runtime, load_plugins_and_config
from lucid.server import bind_socket, run_process

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
    """A gateway serving in the current event loop."""

    runtime: Runtime
    config_path: Path
    proxy_url: str
    admin_url: str
    session: aiohttp.ClientSession


@asynccontextmanager
async def run_gateway(
    text: str | dict[str, Any], directory: Path, **server: Any
) -> AsyncIterator[RunningGateway]:
    """Start a gateway from a TOML string on free loopback ports; stop it on exit."""
    path = write_config(text, directory, **server)
    plugin_set, config = load_plugins_and_config(path)
    runtime = Runtime(plugin_set, config, path)
    proxy_sock = bind_socket(config.server.proxy)
    admin_sock = bind_socket(config.server.admin)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_process(runtime, proxy_sock, admin_sock, [], stop, ready))
    await asyncio.wait([task, asyncio.create_task(ready.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raise what stopped it
    proxy_url = f"http://{runtime.listeners['proxy']}"
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


def two_services(url: str, extra: str = "") -> str:
    """Config: services ``svc`` and ``other``, both at ``url``; every path routed to
    ``svc`` without retries; then ``extra``."""
    return f"""
[gateway.services.svc]
instances = ["{url}"]
[gateway.services.other]
instances = ["{url}"]

[[gateway.routes]]
prefix = "/"
service = "svc"
retries = {{ attempts = 1 }}
{extra}
"""


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


def lucid_env(*installed: Path, **extra: str) -> dict[str, str]:
    """The environment for a ``lucid`` subprocess: no stray ``LUCID_*`` overrides from
    the caller's shell, the ``installed`` folders (plugin dist-infos) importable, and
    ``extra`` variables set."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LUCID_")}
    paths = [str(p) for p in installed]
    if paths:
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def run_lucid(
    *args: str, installed: tuple[Path, ...] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the ``lucid`` command (``python -m lucid ARGS``) and capture what it says."""
    return subprocess.run(
        [sys.executable, "-m", "lucid", *args],
        capture_output=True, text=True, timeout=60, env=lucid_env(*installed, **env),
    )


def builtin_plugins() -> list[InstalledPlugin]:
    """Lucid's own plugins (the ``lucid`` entry points of ``lucid-gateway``), by name."""
    return sorted(
        (InstalledPlugin(ep.name, ep.value, ep.dist.name)
         for ep in entry_points(group=ENTRY_POINT_GROUP)
         if ep.dist is not None and ep.dist.name == "lucid-gateway"),
        key=lambda p: p.name,
    )


def plugin_rows(output: str) -> dict[str, list[str]]:
    """``lucid plugins`` output as ``name -> [capability, enabled, package, hooks]``.

    Columns are cut where the header's words start, so a plugin implementing no hooks
    (an empty last column) parses too, as ``""``."""
    header, *lines = output.splitlines()
    assert header.split() == ["plugin", "capability", "enabled", "package", "hooks"]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    rows = {}
    for line in lines:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        assert all(cells[:4]) and " " not in "".join(cells[:4]), f"misaligned row: {line!r}"
        rows[cells[0]] = cells[1:]
    return rows


_apt_lock = threading.Lock()


def debian_tool(binary: str, package: str) -> str:
    """The path of a tool a test needs from Debian's packages, installing the package
    first when it is missing and this is a root shell with apt (as on CI and a fresh
    development machine); otherwise the test fails saying what to install."""
    found = shutil.which(binary)
    if found:
        return found
    with _apt_lock:
        if shutil.which(binary) is None and os.geteuid() == 0 and shutil.which("apt-get"):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True,
                           timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                            package], env=env, capture_output=True, timeout=900)
    found = shutil.which(binary)
    assert found, f"this test needs {binary!r}: apt-get install -y {package}"
    return found


class GatewayProcess:
    """``lucid serve`` in a subprocess, for signals, restarts and memory measurements."""

    LISTENING = re.compile(r"(proxy|admin) listening on (http://\S+)")

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
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
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

    @pytest_asyncio.fixture
    async def lucid_upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
        """Factory: ``await lucid_upstream(handler)`` serves a handler on a free port."""
        started: list[Upstream] = []

        async def factory(handler: Handler | web.Application | None = None) -> Upstream:
            upstream = await start_upstream(handler)
            started.append(upstream)
            return upstream

        yield factory
        for upstream in started:
            await upstream.close()

    @pytest_asyncio.fixture
    async def lucid_gateway(
        tmp_path: Path,
    ) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
        """Factory: ``await lucid_gateway(toml_text)`` runs a gateway in this event loop."""
        stack: list[Any] = []

        async def factory(text: str | dict[str, Any], **server: Any) -> RunningGateway:
            context = run_gateway(text, tmp_path / f"gateway{len(stack)}", **server)
            gateway = await context.__aenter__()
            stack.append(context)
            return gateway

        yield factory
        for context in reversed(stack):
            await context.__aexit__(None, None, None)

    @pytest.fixture
    def lucid_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
        """Factory: ``lucid_process(toml_text)`` starts ``lucid serve`` in a subprocess."""
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
