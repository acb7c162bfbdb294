"""The gateway as a process: SIGTERM drains, SIGHUP reloads, bodies stream in bounded memory."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import psutil
import pytest
from aiohttp import web

from lucid.testing import wait_until


@pytest.fixture
def lucid_process(engine_process):
    """Every test here runs on each proxy engine (``engine_process`` in conftest)."""
    return engine_process


def one_route(url: str, **route: str) -> str:
    settings = "\n".join(f"{k} = {v}" for k, v in route.items())
    return f"""
[gateway.services.svc]
instances = ["{url}"]

[[gateway.routes]]
prefix = "/"
service = "svc"
{settings}
"""


async def test_sigterm_drains_in_flight_requests_and_exits_0(lucid_upstream, lucid_process):
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=b"finished")

    upstream = await lucid_upstream(slow)
    gateway = lucid_process(one_route(upstream.url), grace_period="20s")
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(f"{gateway.proxy_url}/slow"))
        await wait_until(lambda: upstream.requests, message="the request to reach the upstream")
        gateway.signal(signal.SIGTERM)

        async def refused() -> bool:
            # A connection accepted in the instant before the listener closed is not
            # served; it must not stall the poll, so each try gives up after 1 s.
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as fresh:
                    async with fresh.get(f"{gateway.proxy_url}/new"):
                        return False
            except aiohttp.ClientConnectionError:
                return True
            except TimeoutError:
                return False

        await wait_until(refused, message="the proxy to stop accepting connections")
        assert gateway.proc.poll() is None  # still draining
        release.set()
        response = await pending
        assert response.status == 200
        assert await response.read() == b"finished"
    assert await asyncio.to_thread(gateway.wait) == 0
    assert "Traceback" not in gateway.output


async def test_grace_period_bounds_the_drain(lucid_upstream, lucid_process):
    never = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    upstream = await lucid_upstream(stuck)
    gateway = lucid_process(one_route(upstream.url), grace_period="500ms")
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(f"{gateway.proxy_url}/stuck"))
        await wait_until(lambda: upstream.requests, message="the request to reach the upstream")
        gateway.signal(signal.SIGTERM)
        assert await asyncio.to_thread(gateway.wait, 15) == 0
        pending.cancel()
    never.set()


async def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(lucid_upstream, lucid_process):
    async def named(name: bytes):
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=name)
        return handler

    first = await lucid_upstream(await named(b"first"))
    second = await lucid_upstream(await named(b"second"))
    gateway = lucid_process(one_route(first.url))
    path = gateway.config_path
    async with aiohttp.ClientSession() as session:
        async def answer() -> bytes:
            async with session.get(f"{gateway.proxy_url}/x") as r:
                return await r.read()

        assert await answer() == b"first"
        path.write_text(path.read_text().replace(first.url, second.url))
        gateway.signal(signal.SIGHUP)
        await asyncio.to_thread(gateway.wait_for_line, "config reloaded .*generation 2")
        assert await answer() == b"second"

        path.write_text(path.read_text().replace('prefix = "/"', 'prefix = 42'))
        gateway.signal(signal.SIGHUP)
        line = await asyncio.to_thread(gateway.wait_for_line, "reload rejected")
        assert "generation 2" in line
        await asyncio.to_thread(gateway.wait_for_line, r"gateway\.routes\[0\]\.prefix = 42")
        assert await answer() == b"second"
        async with session.get(f"{gateway.admin_url}/gateway/status") as r:
            assert (await r.json())["generation"] == 2


LIMIT = 64 * 2**20
GIB = 2**30
CHUNK = 256 * 1024


class RssWatch:
    """Samples a process's resident memory until stopped; keeps the peak."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            await asyncio.sleep(0.02)

    def __enter__(self) -> RssWatch:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_a_gibibyte_each_way_adds_less_than_64_mib_to_the_gateway(
    lucid_upstream, lucid_process
):
    async def sink_or_source(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            received = 0
            async for chunk in request.content.iter_chunked(CHUNK):
                received += len(chunk)
            return web.json_response({"received": received})
        response = web.StreamResponse(headers={"Content-Length": str(GIB)})
        await response.prepare(request)
        block = b"z" * CHUNK
        for _ in range(GIB // CHUNK):
            await response.write(block)
        return response

    upstream = await lucid_upstream(sink_or_source)
    gateway = lucid_process(one_route(upstream.url, timeouts='{ total = "10m", read = "60s" }'))
    process = psutil.Process(gateway.proc.pid)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{gateway.proxy_url}/warm") as r:  # pools and code paths warm
            await r.read()
        baseline = process.memory_info().rss

        async def upload():
            block = b"u" * CHUNK
            for _ in range(GIB // CHUNK):
                yield block

        with RssWatch(gateway.proc.pid) as watch:
            async with session.post(f"{gateway.proxy_url}/up", data=upload(),
                                    headers={"Content-Length": str(GIB)}) as r:
                assert r.status == 200
                assert (await r.json())["received"] == GIB
        assert watch.peak - baseline < LIMIT, (watch.peak - baseline) / 2**20

        with RssWatch(gateway.proc.pid) as watch:
            received = 0
            async with session.get(f"{gateway.proxy_url}/down") as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(CHUNK):
                    received += len(chunk)
            assert received == GIB
        assert watch.peak - baseline < LIMIT, (watch.peak - baseline) / 2**20
