"""``lucid serve`` with two workers: /metrics, the JSON windows, the log buffer and the
reports' top clients (served by worker 0) cover the requests both workers served, and
keep a killed worker's counts."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import deque

import aiohttp
from lucid_monitoring.metrics import Recorder
from lucid_monitoring.workers import WorkerShare
from prometheus_client.parser import text_string_to_metric_families

from lucid.testing import wait_until


def totals(text: str) -> tuple[float, float]:
    """(sum of lucid_requests_total, lucid_requests_in_flight)."""
    requests = in_flight = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "lucid_requests_total":
                requests += s.value
            elif s.name == "lucid_requests_in_flight":
                in_flight = s.value
    return requests, in_flight


async def test_metrics_sum_every_worker_and_keep_a_dead_workers_counts(
        lucid_upstream, lucid_process):
    upstream = await lucid_upstream()
    process = lucid_process(f"""
[server]
workers = 2

[[gateway.routes]]
id = "api"
prefix = "/"
service = "svc"

[gateway.services.svc]
instances = ["{upstream.url}"]

[monitoring]
evaluation_interval = "100ms"

[[monitoring.alerts]]   # judged on both workers' traffic
name = "Traffic"
metric = "request_rate"
op = ">"
threshold = 0
""", wait=False)
    line = await asyncio.to_thread(process.wait_for_line, r"worker 1, pid \d+\)")
    worker1 = int(re.search(r"pid (\d+)", line).group(1))
    await asyncio.to_thread(process.wait_ready)
    sent = 0
    seen: list[float] = []
    # A new connection per request, so the kernel hands them to either worker.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:

        async def send(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                async with client.get(process.proxy_url + "/x") as r:
                    assert r.status == 200
                    await r.read()
                sent += 1

        async def status() -> dict:
            async with client.get(process.admin_url + "/monitoring/status") as r:
                return await r.json()

        async def metrics_total() -> float:
            async with client.get(process.admin_url + "/metrics") as r:
                assert r.status == 200
                total = totals(await r.text())[0]
            assert not seen or total >= seen[-1], "a counter went backwards"
            seen.append(total)
            return total

        async def metrics_total_is(n: int) -> bool:
            return await metrics_total() == n

        async def both_served() -> bool:
            workers = (await status())["workers"]
            if len(workers) == 2 and all(w["requests"] for w in workers):
                return True
            await send(10)
            return False

        await wait_until(both_served, timeout=15, interval=0.1,
                         message="both workers to have served requests")
        await wait_until(lambda: metrics_total_is(sent), timeout=10,
                         message=f"/metrics to count all {sent} requests")
        workers = (await status())["workers"]
        assert [w["worker"] for w in workers] == [0, 1]
        assert sum(w["requests"] for w in workers) == sent
        assert workers[1]["pid"] == worker1 and workers[0]["pid"] == process.proc.pid
        async with client.get(process.admin_url + "/monitoring/metrics?window=1m") as r:
            assert (await r.json())["windows"]["1m"]["total"]["requests"] == sent

        # /monitoring/logs: every request, whichever worker served it, newest first
        async def logs() -> list[dict]:
            async with client.get(process.admin_url + "/monitoring/logs?limit=10000") as r:
                assert r.status == 200
                return (await r.json())["logs"]

        async def logged_all() -> list[dict] | None:
            lines = await logs()
            return lines if len(lines) == sent else None

        lines = await wait_until(logged_all, timeout=10,
                                 message=f"/monitoring/logs to list all {sent} requests")
        assert len({line["request_id"] for line in lines}) == sent
        assert [line["time"] for line in lines] == sorted(
            (line["time"] for line in lines), reverse=True)
        async with client.get(process.admin_url + "/monitoring/logs?limit=3") as r:
            assert len((await r.json())["logs"]) == 3

        # reports: the top clients count both workers' requests
        async def top_clients_total() -> bool:
            async with client.get(process.admin_url + "/monitoring/reports") as r:
                assert r.status == 200
                report = (await r.json())["report"]
            total = sum(c["requests"] for period in report
                        for c in period["services"].get("svc", {}).get("top_clients", []))
            assert total <= sent, "a client counted twice"
            return total == sent

        await wait_until(top_clients_total, timeout=10,
                         message=f"the reports' top clients to count all {sent} requests")

        async def firing() -> bool:
            async with client.get(process.admin_url + "/monitoring/alerts") as r:
                return (await r.json())["alerts"][0]["state"] == "firing"

        await wait_until(firing, message="the alert rule to fire")

        # kill -9 worker 1: what it counted stays; worker 0 serves on and counts on.
        os.kill(worker1, signal.SIGKILL)
        before = sent
        await send(5)
        assert sent == before + 5
        await wait_until(lambda: metrics_total_is(sent), timeout=10,
                         message=f"/metrics to count all {sent} requests after the kill")
        # the killed worker's requests stay in /monitoring/logs (shared before the kill)
        await wait_until(logged_all, timeout=10,
                         message=f"/monitoring/logs to list all {sent} requests after the kill")

        async def worker1_dead() -> bool:
            rows = {w["worker"]: w for w in (await status())["workers"]}
            return not rows[1]["live"] and rows[1]["in_flight"] == 0

        await wait_until(worker1_dead, timeout=10, interval=0.2,
                         message="worker 1 to be reported dead")
        async with client.get(process.admin_url + "/metrics") as r:
            requests, in_flight = totals(await r.text())
        assert requests == sent and in_flight == 0


def test_top_clients_of_other_workers_are_taken_once_per_rollup(tmp_path):
    """Each rollup takes what another worker counted since the last one: the worker
    starts a new table after each rollup (bounded by max_clients, like worker 0's),
    and worker 0 takes what grew in the closed table, then in the new one."""
    zero = WorkerShare(tmp_path, "run", 0)
    other = WorkerShare(tmp_path, "run", 1)
    other.pid = zero.pid + 1
    other.path = other.directory / f"{other.pid}.snap"
    recorder = Recorder((0.1,), max_clients=2)
    recorder.clients = {("svc", "a"): 3}
    other.write(recorder, 0)
    assert zero.take_clients() == {("svc", "a"): 3}  # rollup 1
    recorder.clients[("svc", "a")] = 5  # 2 more before the worker saw rollup 1
    other.write(recorder, 0)  # sees rollup 1: closes {a: 5}, starts a new table
    assert recorder.clients == {}
    recorder.clients[("svc", "b")] = 4
    other.write(recorder, 0)
    assert zero.take_clients() == {("svc", "a"): 2, ("svc", "b"): 4}  # rollup 2
    assert zero.take_clients() == {}  # rollup 3: nothing new (the worker has not written)
    recorder.clients[("svc", "b")] = 6
    other.write(recorder, 0)  # sees rollup 3: one new table for rollups 2 and 3
    recorder.clients[("svc", "c")] = 1
    other.write(recorder, 0)
    assert zero.take_clients() == {("svc", "b"): 2, ("svc", "c"): 1}
    assert zero.take_clients() == {}


def test_a_worker_shares_its_log_buffer_by_appending_what_is_new(tmp_path):
    """Each write appends only the requests taken since the last; once the file holds
    twice the ring it is replaced by the ring. Worker 0 reads each worker's newest."""
    zero = WorkerShare(tmp_path, "run", 0)
    other = WorkerShare(tmp_path, "run", 1)
    other.pid = zero.pid + 1
    other.log_path = other.directory / f"{other.pid}.log"
    ring = deque(maxlen=4)

    def take(n: int) -> None:
        for _ in range(n):
            ring.append((float(len(seen)),) + ("x",) * 15)
            seen.append(ring[-1])

    seen: list[tuple] = []
    take(2)
    other.write_log(ring)
    assert zero.logs(4) == seen
    size = other.log_path.stat().st_size
    other.write_log(ring)  # nothing new: nothing written
    assert other.log_path.stat().st_size == size
    take(1)
    other.write_log(ring)
    assert zero.logs(4) == seen and other.log_path.stat().st_size < 2 * size  # appended
    take(3)
    other.write_log(ring)  # 6 lines: still appended
    assert zero.logs(4) == seen[-4:] and zero.logs(10) == seen
    take(3)
    other.write_log(ring)  # 9 > 2 * 4: replaced by the ring
    assert zero.logs(10) == seen[-4:]
    take(9)
    other.write_log(ring)  # the last one shared fell out of the ring: replaced
    assert zero.logs(10) == seen[-4:]
    with open(other.log_path, "ab") as file:  # a frame being written: not read yet
        file.write((1000).to_bytes(4, "big") + b"\x00" * 10)
    assert zero.logs(10) == seen[-4:]
