"""Rate limits counted in Redis: what they cost a request, and what a stopped Redis does.

    python bench/bench_cluster_ratelimit.py [--rounds 5] [--duration 3] [-c 16]
                                            [--json bench/results/cluster_ratelimit.json]

A private ``redis-server`` (lucid.testing_redis), one upstream, and two ``lucid serve``
processes (one worker each) with the same token bucket on every request (a rate high
enough that every request is admitted, so each one is a full decision): one counting
in memory (``[cluster] backend = "local"``), one in Redis (``sync = strict``: one
script call per batch of a worker's concurrent decisions). ``bench/loadgen.py`` drives
each in turn (its own process), ``--rounds`` times in alternating order:

* **req/s ratio** Redis ÷ local, median of the per-round ratios (goal ≥ 0.80);
* **Redis calls per request**: script calls ÷ requests (``/ratelimiter/status``);
* **added latency**: p50 and p99 of the Redis gateway minus the local one's.

**Outage**: the Redis gateway with a token bucket of 200/s, burst 200, driven for
12 s; Redis is ``SIGSTOP``-ped for 5 s from second 3 (``on_backend_failure =
"local"``). Reported: the worst request latency of the run (goal: Redis adds at most
100 ms), the degraded decisions, and the admitted total against the exact limit for
the run (burst + rate × duration).

``lease`` mode is not implemented: its row is left out. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from lucid.testing_redis import RedisServer

HERE = Path(__file__).resolve().parent
GOAL_STRICT = 0.80


def config(backend: str, upstream: str, rate: str, burst: int, timeout: str) -> str:
    from lucid.testing_internal import cluster_node_config  # the cluster tests' preamble

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
""")


def loadgen(url: str, connections: int, duration: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(HERE / "loadgen.py"), "--url", url, "-c", str(connections),
         "-d", str(duration)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


async def status(session: aiohttp.ClientSession, node: GatewayProcess) -> dict[str, Any]:
    async with session.get(node.admin_url + "/ratelimiter/status") as r:
        return await r.json()  # type: ignore[no-any-return]


async def paired(redis: RedisServer, upstream: str, work: Path, rounds: int,
                 duration: float, connections: int) -> dict[str, Any]:
    local = GatewayProcess(write_config(
        config("local", upstream, "1000000/s", 1000000, "50ms"), work / "local"))
    shared = GatewayProcess(write_config(
        config(redis.url, upstream, "1000000/s", 1000000, "50ms"), work / "redis"))
    rows: list[dict[str, Any]] = []
    try:
        local.wait_ready(60)
        shared.wait_ready(60)
        async with aiohttp.ClientSession() as session:
            for n in range(rounds):
                order = [("local", local), ("redis", shared)]
                if n % 2:
                    order.reverse()
                row: dict[str, Any] = {}
                for name, node in order:
                    before = await status(session, node)
                    result = await asyncio.to_thread(loadgen, node.proxy_url + "/x",
                                                     connections, duration)
                    after = await status(session, node)
                    row[name] = result
                    if name == "redis":
                        calls = (after["backend"]["script_calls"]
                                 - before["backend"]["script_calls"])
                        row["calls_per_request"] = calls / max(1, result["requests"])
                        row["degraded"] = sum(after["backend"]["degraded"].values())
                row["ratio"] = row["redis"]["rps"] / row["local"]["rps"]
                rows.append(row)
                print(f"round {n + 1}: local {row['local']['rps']:.0f} req/s, redis "
                      f"{row['redis']['rps']:.0f} req/s, ratio {row['ratio']:.3f}, "
                      f"{row['calls_per_request']:.3f} Redis calls/request", flush=True)
    finally:
        local.stop()
        shared.stop()
    return {
        "rounds": rows,
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        "calls_per_request_median": statistics.median(r["calls_per_request"] for r in rows),
        "added_p50_ms": statistics.median(r["redis"]["p50_ms"] - r["local"]["p50_ms"]
                                          for r in rows),
        "added_p99_ms": statistics.median(r["redis"]["p99_ms"] - r["local"]["p99_ms"]
                                          for r in rows),
        "errors": sum(r["redis"]["errors"] + r["local"]["errors"] for r in rows),
        "degraded": max(r["degraded"] for r in rows),
    }


async def outage(redis: RedisServer, upstream: str, work: Path,
                 connections: int) -> dict[str, Any]:
    rate, burst, duration = 200, 200, 12.0
    node = GatewayProcess(write_config(
        config(redis.url, upstream, f"{rate}/s", burst, "50ms"), work / "outage"))
    try:
        node.wait_ready(60)

        def stop_redis() -> None:
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
            strict = await paired(redis, upstream.url, work, args.rounds, args.duration,
                                  args.connections)
            down = await outage(redis, upstream.url, work, args.connections)
        finally:
            await upstream.close()
            redis.stop()
    return {"strict": strict, "outage": down, "goal_strict": GOAL_STRICT,
            "lease": "not implemented"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("-c", "--connections", type=int, default=16)
    parser.add_argument("--json", type=Path,
                        default=HERE / "results" / "cluster_ratelimit.json")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    strict, down = report["strict"], report["outage"]
    print()
    print("| measure | value | goal |")
    print("| --- | --- | --- |")
    print(f"| req/s, Redis strict ÷ local (median of {args.rounds}) | "
          f"{strict['ratio_median']:.3f} | ≥ {GOAL_STRICT} |")
    print(f"| Redis calls per request, strict | {strict['calls_per_request_median']:.3f} "
          "| well under 1 |")
    print(f"| added latency p50 / p99 (ms) | {strict['added_p50_ms']:.2f} / "
          f"{strict['added_p99_ms']:.2f} | |")
    print("| lease mode | not implemented | ≥ 0.95 |")
    print(f"| outage: worst latency (ms) | {down['worst_latency_ms']:.1f} | ≤ 100 added |")
    print(f"| outage: admitted / exact limit | {down['admitted']} / {down['exact_limit']} "
          f"({down['admitted_over_limit']:.3f}) | |")
    print(f"| outage: degraded decisions | {down['degraded']} | |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
