"""Rate limits counted in Redis: what they cost a request, and what a stopped Redis does.

    python bench/bench_cluster_ratelimit.py [--rounds 5] [--duration 3] [-c 16]
                                            (--rounds 0: the outage runs only)
                                            [--json bench/results/cluster_ratelimit.json]

A private ``redis-server`` (lucid.testing_redis), one upstream, and three ``lucid
serve`` processes (one worker each) with the same token bucket on every request (a
rate high enough that every request is admitted, so each one is a full decision):
one counting in memory (``[cluster] backend = "local"``), one in Redis with ``sync =
"strict"`` (one script call per batch of a worker's concurrent decisions), one in
Redis with ``sync = "lease"`` (slices of the allowance spent locally).
``bench/loadgen.py`` drives each in turn (its own process), ``--rounds`` times, the
order rotating each round:

* **req/s ratio** Redis ÷ local, median of the per-round ratios (goals: strict ≥
  0.80, lease ≥ 0.95);
* **Redis calls per request**: script calls ÷ requests (``/ratelimiter/status``;
  goal for lease at steady state below the limit: ≤ 0.1);
* **added latency**: p50 and p99 of each Redis gateway minus the local one's;
* **CPU per request** of each gateway (``/proc``: the process and its workers) and of
  ``redis-server``, and local ÷ (gateway + Redis): what the throughput ratio would
  be were the gateway CPU-bound, steadier than req/s on a shared machine.

**Outage**, once per sync mode: a Redis gateway with a token bucket of 200/s, burst
200, driven for 12 s; Redis is ``SIGSTOP``-ped for 5 s from second 3
(``on_backend_failure = "local"``). Reported: the worst request latency of the run
minus the run's median (goal: a frozen Redis adds at most 100 ms), the degraded
decisions, and the admitted total against the exact limit for the run (burst + rate
× duration; goal ≈ 1.0). A control run with the same load and Redis never stopped
gives the floor for the worst latency on this machine. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from lucid.testing import GatewayProcess, start_upstream, write_config
from lucid.testing_internal import cluster_node_config
from lucid.testing_redis import RedisServer

HERE = Path(__file__).resolve().parent
GOAL_STRICT = 0.80
GOAL_LEASE = 0.95
MODES = ("local", "strict", "lease")


def config(backend: str, upstream: str, rate: str, burst: int, timeout: str,
           sync: str = "strict") -> str:
    return cluster_node_config(backend, upstreams=[upstream], timeout=timeout, extra=f"""
[[gateway.routes]]
id = "r"
prefix = "/"
service = "svc"

[ratelimiter]
headers = "ietf"

[[ratelimiter.limits]]
id = "bucket"
rate = "{rate}"
burst = {burst}
key = "global"
sync = "{sync}"
""")


def loadgen(url: str, connections: int, duration: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(HERE / "loadgen.py"), "--url", url, "-c", str(connections),
         "-d", str(duration)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a ``lucid serve`` process and the workers it forked."""
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    total = 0
    for one in pids:
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


async def status(session: aiohttp.ClientSession, node: GatewayProcess) -> dict[str, Any]:
    async with session.get(node.admin_url + "/ratelimiter/status") as r:
        return await r.json()  # type: ignore[no-any-return]


async def paired(redis: RedisServer, upstream: str, work: Path, rounds: int,
                 duration: float, connections: int) -> dict[str, Any]:
    nodes = {
        mode: GatewayProcess(write_config(
            config("local" if mode == "local" else redis.url, upstream, "1000000/s",
                   1000000, "50ms", "lease" if mode == "lease" else "strict"),
            work / mode))
        for mode in MODES}
    rows: list[dict[str, Any]] = []
    try:
        for node in nodes.values():
            node.wait_ready(60)
        async with aiohttp.ClientSession() as session:
            for n in range(rounds):
                order = list(MODES[n % 3:] + MODES[:n % 3])
                row: dict[str, Any] = {}
                for name in order:
                    node = nodes[name]
                    before = await status(session, node)
                    cpu = cpu_seconds(node.proc.pid), cpu_seconds(redis.proc.pid)
                    result = await asyncio.to_thread(loadgen, node.proxy_url + "/x",
                                                     connections, duration)
                    requests = max(1, result["requests"])
                    result["cpu_us_per_request"] = (
                        cpu_seconds(node.proc.pid) - cpu[0]) / requests * 1e6
                    result["redis_cpu_us_per_request"] = (
                        cpu_seconds(redis.proc.pid) - cpu[1]) / requests * 1e6
                    after = await status(session, node)
                    row[name] = result
                    if name != "local":
                        calls = (after["backend"]["script_calls"]
                                 - before["backend"]["script_calls"])
                        result["calls_per_request"] = calls / max(1, result["requests"])
                        result["degraded"] = sum(after["backend"]["degraded"].values())
                for name in MODES[1:]:
                    row[name]["ratio"] = row[name]["rps"] / row["local"]["rps"]
                    # what a CPU-bound gateway would sustain: local CPU per request ÷
                    # this one's (gateway and Redis CPU counted), less noisy on a
                    # shared machine than req/s
                    row[name]["cpu_ratio"] = row["local"]["cpu_us_per_request"] / (
                        row[name]["cpu_us_per_request"]
                        + row[name]["redis_cpu_us_per_request"])
                rows.append(row)
                print(f"round {n + 1}: local {row['local']['rps']:.0f} req/s; " + "; ".join(
                    f"{name} {row[name]['rps']:.0f} req/s, ratio {row[name]['ratio']:.3f}, "
                    f"{row[name]['calls_per_request']:.4f} Redis calls/request"
                    for name in MODES[1:]), flush=True)
    finally:
        for node in nodes.values():
            node.stop()
    return {"rounds": rows, **{name: {
        "ratio_median": statistics.median(r[name]["ratio"] for r in rows),
        "cpu_ratio_median": statistics.median(r[name]["cpu_ratio"] for r in rows),
        "cpu_us_per_request": statistics.median(r[name]["cpu_us_per_request"] for r in rows),
        "redis_cpu_us_per_request": statistics.median(r[name]["redis_cpu_us_per_request"]
                                                      for r in rows),
        "local_cpu_us_per_request": statistics.median(r["local"]["cpu_us_per_request"]
                                                      for r in rows),
        "calls_per_request_median": statistics.median(r[name]["calls_per_request"]
                                                      for r in rows),
        "added_p50_ms": statistics.median(r[name]["p50_ms"] - r["local"]["p50_ms"]
                                          for r in rows),
        "added_p99_ms": statistics.median(r[name]["p99_ms"] - r["local"]["p99_ms"]
                                          for r in rows),
        "errors": sum(r[name]["errors"] + r["local"]["errors"] for r in rows),
        "degraded": max(r[name]["degraded"] for r in rows),
    } for name in MODES[1:]}}


async def outage(redis: RedisServer, upstream: str, work: Path,
                 connections: int, sync: str, stop: bool = True) -> dict[str, Any]:
    rate, burst, duration = 200, 200, 12.0
    node = GatewayProcess(write_config(
        config(redis.url, upstream, f"{rate}/s", burst, "50ms", sync),
        work / f"outage-{sync}-{stop}"))
    try:
        node.wait_ready(60)

        def stop_redis() -> None:
            if not stop:  # the control run: the same load, Redis never stopped
                return
            time.sleep(3.0)
            redis.pause()
            time.sleep(5.0)
            redis.resume()

        pauser = threading.Thread(target=stop_redis)
        pauser.start()
        result = await asyncio.to_thread(loadgen, node.proxy_url + "/x", connections,
                                         duration)
        pauser.join()
        async with aiohttp.ClientSession() as session:
            after = await status(session, node)
    finally:
        node.stop()
    admitted = result["requests"] - result["non_2xx"] - result["socket_errors"] \
        - result["timeouts"]
    exact = burst + rate * result["duration_s"]
    return {
        "requests": result["requests"], "admitted": admitted,
        "exact_limit": round(exact), "admitted_over_limit": round(admitted / exact, 4),
        "worst_latency_ms": result["max_ms"], "p99_ms": result["p99_ms"],
        "worst_added_ms": round(result["max_ms"] - result["p50_ms"], 3),
        "errors": result["socket_errors"] + result["timeouts"],
        "degraded": after["backend"]["degraded"],
        "breaker_openings": after["backend"]["breaker_openings"],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        redis = RedisServer(work / "redis").start()
        upstream = await start_upstream()
        try:
            steady = await paired(redis, upstream.url, work, args.rounds, args.duration,
                                  args.connections) if args.rounds else None
            down = {}
            for sync in ("strict", "lease"):
                down[sync] = await outage(redis, upstream.url, work, args.connections, sync)
                down[sync]["control"] = await outage(redis, upstream.url, work,
                                                     args.connections, sync, stop=False)
        finally:
            await upstream.close()
            redis.stop()
    return {**(steady or {}), "outage": down, "goal_strict": GOAL_STRICT,
            "goal_lease": GOAL_LEASE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("-c", "--connections", type=int, default=16)
    parser.add_argument("--json", type=Path,
                        default=HERE / "results" / "cluster_ratelimit.json")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print()
    print("| measure | strict | lease | goal |")
    print("| --- | --- | --- | --- |")
    if "strict" in report:
        strict, lease = report["strict"], report["lease"]
        print(f"| req/s, Redis ÷ local (median of {args.rounds}) | "
              f"{strict['ratio_median']:.3f} | {lease['ratio_median']:.3f} | "
              f"strict ≥ {GOAL_STRICT}, lease ≥ {GOAL_LEASE} |")
        print("| CPU per request, local ÷ (gateway + Redis) (median) | "
              f"{strict['cpu_ratio_median']:.3f} | {lease['cpu_ratio_median']:.3f} | |")
        print("| CPU µs per request: gateway + Redis (local: "
              f"{strict['local_cpu_us_per_request']:.0f}) | "
              f"{strict['cpu_us_per_request']:.0f} + {strict['redis_cpu_us_per_request']:.0f} | "
              f"{lease['cpu_us_per_request']:.0f} + {lease['redis_cpu_us_per_request']:.0f} | |")
        print(f"| Redis calls per request | {strict['calls_per_request_median']:.4f} | "
              f"{lease['calls_per_request_median']:.4f} | lease ≤ 0.1 |")
        print(f"| added latency p50 / p99 (ms) | {strict['added_p50_ms']:.2f} / "
              f"{strict['added_p99_ms']:.2f} | {lease['added_p50_ms']:.2f} / "
              f"{lease['added_p99_ms']:.2f} | |")
    down = report["outage"]
    print(f"| outage: worst latency − median (ms) | {down['strict']['worst_added_ms']:.1f} | "
          f"{down['lease']['worst_added_ms']:.1f} | ≤ 100 |")
    print("| same load, Redis never stopped: worst − median (ms) | "
          f"{down['strict']['control']['worst_added_ms']:.1f} | "
          f"{down['lease']['control']['worst_added_ms']:.1f} | the floor |")
    print(f"| outage: p99 (ms), control p99 | {down['strict']['p99_ms']:.1f}, "
          f"{down['strict']['control']['p99_ms']:.1f} | {down['lease']['p99_ms']:.1f}, "
          f"{down['lease']['control']['p99_ms']:.1f} | |")
    print("| outage: admitted / exact limit | " + " | ".join(
        f"{down[m]['admitted']} / {down[m]['exact_limit']} "
        f"({down[m]['admitted_over_limit']:.3f})" for m in ("strict", "lease")) + " | ≈ 1.0 |")
    print(f"| outage: degraded decisions | {sum(down['strict']['degraded'].values())} | "
          f"{sum(down['lease']['degraded'].values())} | |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
