"""Cluster mode: how fast a write on one node is served by the others, and what
cluster mode costs a proxied request.

    python bench/bench_cluster.py [--writes 200] [--trips 60] [--duration 4] [--rounds 3]
                                  [--json bench/results/cluster.json]

1. **Propagation.** A private ``redis-server`` (lucid.testing_redis) on a free port,
   three ``lucid serve`` nodes on it and one upstream. Each write adds a route on one
   node (round robin); the time from sending it to the moment each *other* node's
   proxy answers 200 on the route is one sample (two per write). Reported: p50, p90,
   p99, max; goal p99 <= 100 ms. Polled on keep-alive connections, so a sample is
   late by at most one poll round trip (~1 ms).
2. **Breaker-open propagation.** The same three nodes with a circuit in cluster
   scope (``consecutive_failures = 1``) on an upstream answering 500. Each trip is one
   request through one node (round robin); the time from its trip to the moment
   each *other* node's breaker opened is one sample (two per trip), by the nodes'
   own clocks (each node's admin status says when its breaker moved, ``since``; one
   host, one wall clock), so the admin API's own latency is not counted; then a
   reset through the next node, waited for on every node. Reported: p50, p99, max;
   goal p99 <= 100 ms. ``--trips 0`` skips it.
3. **Per-request cost.** ``bench/proxy_bench.py`` with a ``cluster`` variant: the
   same generated config plus ``[cluster] backend`` on the private Redis, measured
   in the same rounds as the plain (local backend) Lucid row. Reported: its req/s
   ratio to the local row; goal >= 0.97 (no Redis call on the data path).
4. **Registry.** The same three nodes and clock, each write a service registered
   (with one instance) on one node, and a sample the time until another node's proxy
   answers 200 on the route naming it (declared in every node's config).

Propagation (1 and 4) is reported twice: from the start of the write (sent to node
A), and from A's 2xx answer (what a client waiting for the answer sees; 0 when a node
served it before A answered); A's own answer time is listed beside them.

Prints a table and writes JSON. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from lucid.testing import GatewayProcess, start_upstream, write_config
from lucid.testing_internal import cluster_node_config, write_cluster_config
from lucid.testing_redis import RedisServer

HERE = Path(__file__).resolve().parent
GOAL_P99_MS = 100.0
GOAL_RATIO = 0.97


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def route_write(n: int, upstream: str) -> tuple[str, dict[str, Any], str]:
    """A route added on the writer: (admin path, body, the path it serves)."""
    return "/gateway/route", {"id": f"p{n}", "prefix": f"/p{n}", "service": "svc",
                              "retries": {"attempts": 1}}, f"/p{n}"


def registry_write(n: int, upstream: str) -> tuple[str, dict[str, Any], str]:
    """A service registered (with one instance) on the writer, which a route declared
    in every node's config resolves once the node knows it."""
    return "/registry/services", {"id": f"s{n}", "instances": [{"url": upstream}]}, f"/s{n}"


def registry_routes(writes: int) -> str:
    return "".join(f'[[gateway.routes]]\nid = "s{n}"\nprefix = "/s{n}"\nservice = "s{n}"\n'
                   f'retries = {{ attempts = 1 }}\n' for n in range(writes))


async def propagation(redis_url: str, writes: int, work: Path,
                      write: Callable[[int, str], tuple[str, dict[str, Any], str]] = route_write,
                      extra: str = "") -> tuple[list[float], list[float], list[float]]:
    """Samples from the start of each write, from its 2xx answer on the writer (0 when
    a node served it before the writer answered), and the writer's answer times."""
    upstream = await start_upstream()
    # timeout: a Redis call that a busy machine leaves unanswered for 50 ms (the
    # default) would end the run with a 503; the samples show the delay instead
    nodes = [GatewayProcess(write_cluster_config(work / f"node{n}", redis_url,
                                                 upstreams=[upstream.url], extra=extra,
                                                 timeout="1s"),
                            env={"LUCID_CLUSTER__NODE_ID": f"bench-{n}"})
             for n in range(3)]
    samples: list[float] = []
    after_answer: list[float] = []
    acknowledged: list[float] = []  # the write's own answer
    try:
        for node in nodes:
            await asyncio.to_thread(node.wait_ready, 60)  # a busy machine starts slowly
        async with aiohttp.ClientSession() as session:
            for n in range(writes):
                writer = nodes[n % 3]
                others = [node for node in nodes if node is not writer]
                admin_path, body, path = write(n, upstream.url)
                sent = time.perf_counter()
                async with session.post(writer.admin_url + admin_path, json=body) as r:
                    if r.status != 201:
                        raise SystemExit(f"write {n} answered {r.status}: {await r.text()}")
                acknowledged.append((time.perf_counter() - sent) * 1000)

                async def served(node: GatewayProcess, path: str = path,
                                 sent: float = sent) -> float:
                    deadline = sent + 10
                    while time.perf_counter() < deadline:
                        async with session.get(node.proxy_url + path + "/x") as r:
                            await r.read()
                            if r.status == 200:
                                return (time.perf_counter() - sent) * 1000
                        # leave the node's one event loop to the work being measured
                        await asyncio.sleep(0.002)
                    raise SystemExit(f"{path} not served by {node.proxy_url} within 10 s")

                got = await asyncio.gather(*(served(node) for node in others))
                samples += got
                after_answer += [max(0.0, at - acknowledged[-1]) for at in got]
    finally:
        for node in nodes:
            node.stop()
        await upstream.close()
    return samples, after_answer, acknowledged


async def breaker_propagation(redis_url: str, trips: int, work: Path) -> list[float]:
    from aiohttp import web

    async def failing(request: web.Request) -> web.Response:
        return web.Response(status=500)

    from lucid_circuitbreaker.testing import guarded

    upstream = await start_upstream(failing)
    text = guarded([upstream.url], 'consecutive_failures = 1\nwait_duration_in_open_state = "10m"',
                   head=cluster_node_config(redis_url, key_prefix="breaker-bench:"))
    nodes = [GatewayProcess(write_config(text, work / f"breaker-node{n}"),
                            env={"LUCID_CLUSTER__NODE_ID": f"breaker-bench-{n}"})
             for n in range(3)]
    samples: list[float] = []
    try:
        for node in nodes:
            await asyncio.to_thread(node.wait_ready, 60)
        async with aiohttp.ClientSession() as session:

            async def shown(node: GatewayProcess, wanted: str) -> float:
                """When ``node``'s breaker moved to ``wanted`` (its wall clock)."""
                deadline = time.perf_counter() + 10
                while time.perf_counter() < deadline:
                    async with session.get(node.admin_url + "/circuitbreaker/circuits/cb") as r:
                        status = (await r.json())["status"]
                        if status["state"] == wanted:
                            return float(status["since"])
                    await asyncio.sleep(0.005)
                raise SystemExit(f"circuit not {wanted} on {node.admin_url} within 10 s")

            for n in range(trips):
                tripper = nodes[n % 3]
                async with session.get(tripper.proxy_url + "/x") as r:
                    await r.read()
                    if r.status != 500:
                        raise SystemExit(f"trip {n}: {r.status}, expected the upstream's 500")
                tripped, *opened = await asyncio.gather(*(
                    shown(node, "open") for node in [tripper] + [
                        node for node in nodes if node is not tripper]))
                samples += [max(0.0, at - tripped) * 1000 for at in opened]
                async with session.post(nodes[(n + 1) % 3].admin_url +
                                        "/circuitbreaker/circuits/cb/reset") as r:
                    await r.read()
                await asyncio.gather(*(shown(node, "closed") for node in nodes))
    finally:
        for node in nodes:
            node.stop()
        await upstream.close()
    return samples


def throughput(redis_url: str, args: argparse.Namespace, work: Path) -> dict:
    variant = work / "cluster-variant.toml"
    variant.write_text(f'[cluster]\nbackend = "{redis_url}"\n')
    out = work / "proxy.json"
    # only the rows compared here (plain Lucid, its cluster variant, and the floor the
    # proxy bench always measures): the standard rows would triple the run
    cmd = [sys.executable, str(HERE / "proxy_bench.py"), "--duration", str(args.duration),
           "--rounds", str(args.rounds), "--variant", f"cluster={variant}",
           "--no-standard-rows", "--json", str(out)]
    subprocess.run(cmd, check=True)
    report = json.loads(out.read_text())
    return report["variants"][0]["vs_lucid"]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values),
            "mean": statistics.fmean(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--trips", type=int, default=60,
                        help="breaker trips to time (0: skip)")
    parser.add_argument("--duration", type=float, default=4.0,
                        help="seconds per throughput run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", default=str(HERE / "results" / "cluster.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lucid-bench-cluster-") as tmp:
        work = Path(tmp)
        redis = RedisServer(work / "redis").start()
        try:
            samples, answered, acks = asyncio.run(
                propagation(redis.url, args.writes, work / "definitions"))
            registry, registry_answered, registry_acks = asyncio.run(
                propagation(redis.url, args.writes, work / "registry", registry_write,
                            registry_routes(args.writes)))
            breaker = (asyncio.run(breaker_propagation(redis.url, args.trips, work / "breaker"))
                       if args.trips else [])
            ratio = None if args.skip_throughput else throughput(redis.url, args, work)
        finally:
            redis.stop()
    result = {
        "writes": args.writes, "samples": len(samples),
        # from the start of the write (sent to A) until B and C serve it
        "propagation_ms": summary(samples),
        # from A's 2xx answer until B and C serve it (0: served before A answered)
        "propagation_after_answer_ms": summary(answered),
        "write_answer_ms": summary(acks),  # A's own answer
        "registry_ms": summary(registry),
        "registry_after_answer_ms": summary(registry_answered),
        "registry_write_answer_ms": summary(registry_acks),
        "goal_p99_ms": GOAL_P99_MS,
        "breaker_trips": args.trips,
        "breaker_open_propagation_ms": {
            "p50": percentile(breaker, 50), "p99": percentile(breaker, 99),
            "max": max(breaker)} if breaker else None,
        "cluster_vs_local": ratio, "goal_ratio": GOAL_RATIO,
    }
    for prefix, title, count, unit in (
            ("propagation", "definitions (route written on A -> served by B, C)", samples,
             "writes"),
            ("registry", "registry (registered on A -> resolved by B, C)", registry,
             "registrations")):
        columns = {"from the write": f"{prefix}_ms",
                   "from A's 2xx": f"{prefix}_after_answer_ms",
                   "A's answer": ("write_answer_ms" if prefix == "propagation"
                                  else "registry_write_answer_ms")}
        print(f"{title}, ms")
        print(f"  {'':<6}" + "".join(f"{name:>16}" for name in columns))
        for stat in ("p50", "p90", "p99", "max"):
            print(f"  {stat:<6}" + "".join(f"{result[key][stat]:>16.2f}"
                                           for key in columns.values()))
        verdict = "met" if result[f"{prefix}_ms"]["p99"] <= GOAL_P99_MS else "NOT met"
        after = "met" if result[f"{prefix}_after_answer_ms"]["p99"] <= GOAL_P99_MS \
            else "NOT met"
        print(f"  {len(count)} samples over {args.writes} {unit}; goal p99 <= "
              f"{GOAL_P99_MS:g} ms: {verdict} from the write, {after} from A's answer")
    b = result["breaker_open_propagation_ms"]
    if b is not None:
        verdict = "met" if b["p99"] <= GOAL_P99_MS else "NOT met"
        print(f"breaker open (trip on one node -> open on the other two): p50 "
              f"{b['p50']:.2f} ms, p99 {b['p99']:.2f} ms, max {b['max']:.2f} ms "
              f"({len(breaker)} samples); goal p99 <= {GOAL_P99_MS:g} ms: {verdict}")
    if ratio is not None and ratio.get("value") is not None:
        verdict = "met" if ratio["value"] >= GOAL_RATIO else "NOT met"
        rounds = ", ".join(f"{r:.3f}" for r in ratio.get("per_round", []))
        print(f"req/s cluster (Redis) / local: {ratio['value']:.3f} (rounds: {rounds}); "
              f"goal >= {GOAL_RATIO}: {verdict}")
        if ratio.get("cpu_value") is not None:
            # steadier than req/s on a machine shared with other work: the server's
            # own CPU time per request (local's / cluster's: >= 1 costs nothing more)
            print(f"CPU per request, local / cluster (Redis): {ratio['cpu_value']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
