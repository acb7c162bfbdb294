"""Access log: JSON lines to a rotating file, and the ring buffer behind /monitoring/logs."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

from lucid.testing import (
    GatewayProcess,
    start_upstream,
    wait_until,
    wait_until_answered,
    write_config,
)
from lucid.testing_internal import lucid_env


def config(upstream_url: str, monitoring: str) -> str:
    return f"""
[[gateway.routes]]
id = "api"
prefix = "/api"
service = "svc"

[[gateway.routes]]
id = "quiet"
prefix = "/quiet"
service = "svc"
plugins = {{ monitoring = {{ access_log = false }} }}

[gateway.services.svc]
instances = ["{upstream_url}"]

[monitoring]
{monitoring}
"""


async def handler(request: web.Request) -> web.Response:
    return web.Response(status=int(request.query.get("status", "200")), text="hello")


async def test_json_lines_go_to_a_rotating_file(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url, """
[monitoring.access_log]
enabled = true
target = "file"
path = "logs/access.log"
max_bytes = "2KiB"
backups = 3
"""))
    for i in range(12):
        async with gw.session.get(gw.proxy_url + f"/api/{i}", headers={
                "x-request-id": f"req-{i:04d}"}) as r:
            assert r.status == 200
    async with gw.session.get(gw.proxy_url + "/quiet/x") as r:
        assert r.status == 200
    path = gw.runtime.data_dir / "logs" / "access.log"

    def lines() -> list[dict]:
        found = []
        for candidate in sorted(path.parent.glob("access.log*"), reverse=True):
            found += [json.loads(line) for line in candidate.read_text().splitlines()]
        return found

    await wait_until(lambda: len(lines()) == 12, message="12 access-log lines")
    assert (path.parent / "access.log.1").exists()  # 12 lines of ~400 bytes rotated at 2 KiB
    records = sorted(lines(), key=lambda r: r["request_id"])
    first = records[0]
    assert first["request_id"] == "req-0000"
    assert first["route"] == "api" and first["service"] == "svc"
    assert first["method"] == "GET" and first["path"] == "/api/0" and first["status"] == 200
    assert first["instance"].startswith("http://127.0.0.1:")
    assert first["bytes_out"] == 5 and first["client_ip"] == "127.0.0.1"
    assert first["duration_ms"] >= first["upstream_ms"] > 0
    assert set(first) >= {"time", "subject", "attempts", "error", "bytes_in"}
    assert all(r["route"] != "quiet" for r in records)


async def test_logs_endpoint_filters_the_ring_buffer(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url, "log_buffer = 5"))
    before = time.time()
    for status in (200, 404, 500, 503, 200, 201):
        async with gw.session.get(gw.proxy_url + f"/api/s?status={status}",
                                  headers={"x-request-id": f"id-{status}"}) as r:
            assert r.status == status
    async with gw.session.get(gw.proxy_url + "/nowhere") as r:
        assert r.status == 404

    async def get(query: str) -> list[dict]:
        async with gw.session.get(gw.admin_url + "/monitoring/logs" + query) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["logs"]

    everything = await get("")
    assert len(everything) == 5  # bounded: the oldest two fell out
    assert [e["status"] for e in everything] == [404, 201, 200, 503, 500]
    assert everything[0]["route"] == "" and everything[0]["path"] == "/nowhere"
    assert [e["status"] for e in await get("?status=5xx")] == [503, 500]
    assert [e["request_id"] for e in await get("?status=503")] == ["id-503"]
    assert [e["status"] for e in await get("?route=api&limit=2")] == [201, 200]
    assert [e["status"] for e in await get("?request_id=id-500")] == [500]
    assert len(await get(f"?since={before}")) == 5
    assert await get(f"?until={before}") == []
    assert len(await get("?since=2020-01-01T00:00:00Z")) == 5
    for bad in ("?status=99", "?since=yesterday", "?limit=0", "?colour=red"):
        async with gw.session.get(gw.admin_url + "/monitoring/logs" + bad) as r:
            assert r.status == 422, bad


async def test_access_log_to_stdout(lucid_upstream, lucid_gateway, capfd):
    # The writer process inherits the gateway's stdout: capture it at the descriptor.
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url, "access_log = { enabled = true }"))
    async with gw.session.get(gw.proxy_url + "/api/out", headers={"x-request-id": "out-1"}):
        pass
    captured: list[str] = []

    def seen() -> bool:
        captured.extend(capfd.readouterr().out.splitlines())
        return any('"request_id":"out-1"' in line for line in captured)

    await wait_until(seen, message="the access-log line on stdout")
    line = next(json.loads(x) for x in captured if '"out-1"' in x)
    assert line["path"] == "/api/out" and line["status"] == 200


FILE_LOG = """
[monitoring.access_log]
enabled = true
target = "file"
path = "access.log"
"""


def logged(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_a_killed_writer_process_is_replaced(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url, FILE_LOG))
    path = gw.runtime.data_dir / "access.log"

    async def status() -> dict:
        async with gw.session.get(gw.admin_url + "/monitoring/status") as r:
            return (await r.json())["access_log"]

    first = (await status())["writer_pid"]
    assert first and first != os.getpid() and not gone(first)
    async with gw.session.get(gw.proxy_url + "/api/before") as r:
        assert r.status == 200
    await wait_until(lambda: len(logged(path)) == 1, message="the first line")
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: gone(first), message="the writer to die")
    for i in range(3):
        async with gw.session.get(gw.proxy_url + f"/api/after/{i}") as r:
            assert r.status == 200
    await wait_until(lambda: len(logged(path)) == 4, message="lines after the restart")
    assert [r["path"] for r in logged(path)][1:] == [f"/api/after/{i}" for i in range(3)]
    now = await status()
    assert now["writer_restarts"] == 1 and now["writer_pid"] not in (None, first)
    assert now["dropped_lines"] == 0


async def test_a_writer_too_far_behind_costs_lines_not_memory(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(config(upstream.url, FILE_LOG))
    writer = gw.runtime.plugin_set.pm.get_plugin("monitoring").writer
    path = gw.runtime.data_dir / "access.log"
    writer.max_behind = 100_000
    os.kill(writer.pid, signal.SIGSTOP)  # a writer stuck on a full disk, say
    try:
        handed = 0
        for n in range(1000):  # the pipe fills, then the gateway's buffer, then it drops
            for i in range(100):
                writer.put((time.time(), f"stuck-{n}-{i}", "api", "svc", "", "GET",
                            f"/api/{'x' * 200}", 200, 0.001, 0.001, 0, 5, "127.0.0.1", "", 1, ""))
            await writer.flush()
            if writer.dropped:
                break
            handed += 100
        assert writer.dropped == 100
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    # Every line handed over is written, whole; the dropped ones are not.
    await wait_until(lambda: len(logged(path)) == handed, timeout=30,
                     message="the writer to catch up")
    async with gw.session.get(gw.proxy_url + "/api/after") as r:
        assert r.status == 200
    await wait_until(lambda: len(logged(path)) == handed + 1, message="the next line")
    assert logged(path)[-1]["path"] == "/api/after"
    async with gw.session.get(gw.admin_url + "/monitoring/status") as r:
        assert (await r.json())["access_log"]["dropped_lines"] == 100


async def test_the_writer_process_outlives_no_gateway(tmp_path):
    """SIGTERM: every line is written, and the writer exits with the gateway. kill -9:
    the writer sees its stdin close and exits too; no writer is left behind."""
    upstream = await start_upstream(handler)
    try:
        await stop_a_logging_gateway(upstream.url, tmp_path / "term", signal.SIGTERM)
        await stop_a_logging_gateway(upstream.url, tmp_path / "kill", signal.SIGKILL)
    finally:
        await upstream.close()


async def stop_a_logging_gateway(upstream_url: str, directory: Path, sig: int) -> None:
    process = GatewayProcess(write_config(config(upstream_url, FILE_LOG), directory),
                             env=lucid_env())
    try:
        await asyncio.to_thread(process.wait_ready)
        async with aiohttp.ClientSession() as client:
            for i in range(20):
                async with client.get(f"{process.proxy_url}/api/{i}") as r:
                    assert r.status == 200
            async with client.get(process.admin_url + "/monitoring/status") as r:
                writer = (await r.json())["access_log"]["writer_pid"]
        assert psutil.Process(writer).ppid() == process.proc.pid
        path = directory / "data" / "access.log"
        if sig == signal.SIGKILL:  # the last 0.2 s of lines die with the gateway
            await wait_until(lambda: len(logged(path)) == 20, message="20 lines")
        process.signal(sig)
        await asyncio.to_thread(process.wait)
        await wait_until(lambda: gone(writer), message="the writer to exit")
        assert [r["path"] for r in logged(path)] == [f"/api/{i}" for i in range(20)]
    finally:
        process.stop()


async def test_workers_share_stdout_without_interleaving_lines(tmp_path):
    """Two workers, two writer processes, one stdout pipe: every line arrives whole."""
    upstream = await start_upstream(handler)
    text = config(upstream.url, 'access_log = { enabled = true }') + "\n[server]\nworkers = 2\n"
    process = GatewayProcess(write_config(text, tmp_path), env=lucid_env(),
                             stdout=subprocess.PIPE)
    # The smallest pipe Linux makes (one page, PIPE_BUF), read only once all requests
    # are done: both writers block on it, and a write longer than PIPE_BUF is torn.
    fcntl.fcntl(process.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(process.proc.stdout), daemon=True)
    try:
        await asyncio.to_thread(process.wait_for_line, r"worker 1, pid \d+\)")
        await asyncio.to_thread(process.wait_ready)
        # A new connection per request, so the kernel hands them to either worker.
        connector = aiohttp.TCPConnector(force_close=True, limit=20)
        async with aiohttp.ClientSession(connector=connector) as client:

            async def get(n: int) -> int:
                async with client.get(f"{process.proxy_url}/api/{'p' * 300}",
                                      headers={"x-request-id": f"w-{n:04d}"}) as r:
                    return r.status

            await wait_until_answered(lambda: get(0))
            assert await asyncio.gather(*(get(n) for n in range(1, 600))) == [200] * 599
        reader.start()
        process.signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait)
        await asyncio.to_thread(reader.join, 10)
    finally:
        if reader.ident is None:
            reader.start()  # the test failed early: do not leave the writers blocked
        process.stop()
        await upstream.close()
    records = [json.loads(line) for line in out]  # a torn line would not parse
    ids = sorted(r["request_id"] for r in records)
    assert "w-0000" in ids
    assert [i for i in ids if i != "w-0000"] == [f"w-{n:04d}" for n in range(1, 600)]


async def test_access_log_files_are_private(lucid_upstream, lucid_gateway):
    """The access log and every file it rotates to are created 0600 (they name clients,
    paths and token subjects), whatever the umask the writer process runs with."""
    upstream = await lucid_upstream(handler)
    old = os.umask(0)  # inherited by the writer process: the mode must be Lucid's own
    try:
        gw = await lucid_gateway(config(upstream.url, """
[monitoring.access_log]
enabled = true
target = "file"
path = "private/access.log"
max_bytes = "1KiB"
backups = 2
"""))
    finally:
        os.umask(old)
    folder = gw.runtime.data_dir / "private"
    for i in range(8):
        async with gw.session.get(gw.proxy_url + f"/api/{i}") as r:
            assert r.status == 200
    await wait_until(lambda: (folder / "access.log.2").exists(), message="two rotations")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.glob("access.log*")}
    assert modes == dict.fromkeys(["access.log", "access.log.1", "access.log.2"], 0o600)
