"""Load balancer benchmark: the in-process cost of one pick, for every algorithm, over
1,000 instances, and the time to build a Maglev table and a ketama ring for them.

1. Pick (in process): ``lucid_select_instance`` + ``lucid_observe_exchange`` (the
   release of the in-flight count) together, through the real plugin object, on a
   pool of 1,000 instances of weights 1, 2, 3 and 5 (a registry-style ``Candidates``
   list). Each figure is the median over ``--repeats`` timed loops of ``--iterations``
   picks, in process CPU time (wall time is reported too: on a shared machine it also
   holds time spent waiting for a core), minus the median of the same loop calling two
   no-op functions (the floor, also reported). Hash keys come from 5,000 users (a
   per-pool cache keeps their hashes), or, in the "every key new" rows, a new key per
   pick. Each pick is also given as a multiple of the CPU cost of making one
   ``Exchange`` (the core's per-request object), measured in the same run.
   Goal: < 5 us a pick, every algorithm.

2. Build: a Maglev table (65,537 entries) and a ketama ring (160 positions a unit of
   weight) for 1,000 instances, median of ``--builds`` builds, in CPU time (wall also
   reported); the ring cold (every instance's positions hashed) and warm (positions
   cached, as when one instance joins or leaves).
   Goal: Maglev < 100 ms.

Usage: python bench/bench_loadbalancer.py [--iterations 50000] [--repeats 7]
       [--json bench/results/loadbalancer.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lucid_loadbalancer import LoadBalancerPlugin, plan_pools
from lucid_loadbalancer.algorithms import Load, _ketama_points, build_maglev
from lucid_loadbalancer.algorithms import RingHash as _Ring
from lucid_loadbalancer.config import LoadBalancerConfig

from lucid.definitions import Definition
from lucid.model import Candidates, Exchange, Instance

ROOT = Path(__file__).resolve().parent
DEFAULT_JSON = ROOT / "results" / "loadbalancer.json"
PICK_GOAL_NS = 5000
MAGLEV_GOAL_MS = 100.0
INSTANCES = 1000

CASES: list[tuple[str, dict[str, Any]]] = [
    ("round_robin", {"algorithm": "round_robin"}),
    ("weighted_round_robin", {"algorithm": "weighted_round_robin"}),
    ("least_connections", {"algorithm": "least_connections"}),
    ("least_request (P2C)", {"algorithm": "least_request"}),
    ("random (weighted)", {"algorithm": "random"}),
    ("ring_hash, header key", {"algorithm": "ring_hash", "hash_key": "header:x-user"}),
    ("maglev, header key", {"algorithm": "maglev", "hash_key": "header:x-user"}),
    ("maglev, bounded 1.25", {"algorithm": "maglev", "hash_key": "header:x-user",
                              "bounded_load": 1.25}),
    ("maglev, every key new", {"algorithm": "maglev", "hash_key": "header:x-user",
                               "_cold": True}),
    ("ring_hash, every key new", {"algorithm": "ring_hash", "hash_key": "header:x-user",
                                  "_cold": True}),
    ("round_robin + affinity", {"algorithm": "round_robin", "affinity": {}}),
    ("least_request + slow start", {"algorithm": "least_request",
                                    "slow_start": {"window": "1h"}}),
]


def candidates() -> Candidates:
    weights = [1, 2, 3, 5]
    everyone = [Instance(id=f"svc-{k}", url=f"http://10.{k // 250}.0.{k % 250}:8080",
                         service="svc", weight=weights[k % 4]) for k in range(INSTANCES)]
    return Candidates(everyone, everyone)


def make_plugin(spec: dict[str, Any]) -> LoadBalancerPlugin:
    plugin = LoadBalancerPlugin(rng=random.Random(1))
    config = LoadBalancerConfig.model_validate({
        "affinity_secret": "x" * 32, "pools": {"bench": {"service": "svc", **spec}}})
    defined = {pid: Definition("pool", pid, None, "static", value=spec)
               for pid, spec in config.pools.items()}
    plugin.adopt(plan_pools(config, defined))
    return plugin


def exchanges(source: Candidates, count: int, cookie: str | None,
              cold: bool = False) -> list[Exchange]:
    """Requests of 5,000 users (or, ``cold``, a new user each: no key cache hit)."""
    out = []
    for k in range(count):
        headers = {"x-user": f"user-{k if cold else k % 5000}"}
        if cookie is not None and k % 2:
            headers["cookie"] = cookie  # half the clients hold a cookie already
        out.append(Exchange(request_id="r", method="GET", path="/", query="", host="h",
                            scheme="http", client_ip="10.9.8.7", headers=headers,
                            started=0.0, service="svc", instances=source))
    return out


def time_picks(select: Any, observe: Any, batch: list[Exchange], source: Candidates,
               clear: Any = None) -> tuple[float, float]:
    """(wall ns, CPU ns) per select+release pair. CPU time is the pick's own cost; on a
    shared machine wall time also holds the time spent waiting for a core."""
    for exchange in batch:
        exchange.attributes = {}
        exchange.response_headers = []
    if clear is not None:
        clear()
    cpu = time.process_time_ns()
    start = time.perf_counter_ns()
    for exchange in batch:
        select(exchange, source)
        observe(exchange)
    wall = time.perf_counter_ns() - start
    return wall / len(batch), (time.process_time_ns() - cpu) / len(batch)


def _noop2(a: Any, b: Any) -> None:
    return None


def _noop1(a: Any) -> None:
    return None


def reference_ns(source: Candidates, count: int = 20_000) -> float:
    """CPU ns to make one ``Exchange`` (what the core does once per request), measured
    in the same run: picks are also reported as a multiple of it, which moves less
    than absolute figures when other work shares the machine."""
    cpu = time.process_time_ns()
    exchanges(source, count, None)
    return (time.process_time_ns() - cpu) / count


def picks(iterations: int, repeats: int) -> list[dict[str, Any]]:
    source = candidates()
    rows = []
    for name, raw in CASES:
        spec = {k: v for k, v in raw.items() if not k.startswith("_")}
        plugin = make_plugin(spec)
        pool = plugin.pools["bench"]
        cookie = None
        if "affinity" in spec:
            cookie = f"lucid_affinity={pool.token('svc-17')}"
        if "slow_start" in spec:  # 50 instances joined a moment ago and are ramping
            first = exchanges(source, 1, None)[0]
            plugin.lucid_select_instance(first, source)
            plugin.lucid_observe_exchange(first)
            for k in range(0, INSTANCES, 20):
                pool.ramping[f"svc-{k}"] = plugin.clock()
        batch = exchanges(source, iterations, cookie, cold=bool(raw.get("_cold")))
        clear = pool.key_cache.clear if raw.get("_cold") else None
        select, observe = plugin.lucid_select_instance, plugin.lucid_observe_exchange
        time_picks(select, observe, batch[: iterations // 10], source)  # warm up, build
        floor, wall, cpu = [], [], []
        for _ in range(repeats):  # interleaved, so drift hits both alike
            floor.append(time_picks(_noop2, _noop1, batch, source)[1])
            w, c = time_picks(select, observe, batch, source, clear)
            wall.append(w)
            cpu.append(c)
        f, w, c = statistics.median(floor), statistics.median(wall), statistics.median(cpu)
        ref = statistics.median(reference_ns(source) for _ in range(3))
        assert pool.load.total == 0, "every pick released"
        rows.append({"case": name, "cpu_ns_per_pick": round(c, 1),
                     "exchange_ns": round(ref, 1), "pick_per_exchange": round((c - f) / ref, 2),
                     "wall_ns_per_pick": round(w, 1), "floor_cpu_ns": round(f, 1),
                     "net_cpu_ns": round(c - f, 1), "runs_cpu_ns": [round(x, 1) for x in cpu],
                     "runs_wall_ns": [round(x, 1) for x in wall],
                     "goal_ns": PICK_GOAL_NS, "met": c - f < PICK_GOAL_NS})
    return rows


def builds(count: int) -> dict[str, Any]:
    source = candidates()
    ids = [i.id for i in source]
    weights = [i.weight for i in source]
    runs: dict[str, list[tuple[float, float]]] = {"maglev_weighted": [], "maglev_uniform": [],
                                                  "ring_hash": [], "ring_hash_warm": []}

    def timed(name: str, build: Any) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        build()
        runs[name].append(((time.process_time() - cpu) * 1000,
                           (time.perf_counter() - wall) * 1000))

    for _ in range(count):
        timed("maglev_weighted", lambda: build_maglev(ids, weights, 65537))
        timed("maglev_uniform", lambda: build_maglev(ids, [1] * len(ids), 65537))
        _ketama_points.cache_clear()
        timed("ring_hash", lambda: _Ring(source, Load(), random.Random(1)))
        timed("ring_hash_warm", lambda: _Ring(source, Load(), random.Random(1)))
    out: dict[str, Any] = {"instances": INSTANCES, "goal_ms": MAGLEV_GOAL_MS}
    for name, values in runs.items():
        out[f"{name}_cpu_ms"] = round(statistics.median(v[0] for v in values), 2)
        out[f"{name}_wall_ms"] = round(statistics.median(v[1] for v in values), 2)
    out["met"] = max(out["maglev_weighted_cpu_ms"], out["maglev_uniform_cpu_ms"]) < MAGLEV_GOAL_MS
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--builds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)

    rows = picks(args.iterations, args.repeats)
    print(f"{INSTANCES} instances; one pick = select + release")
    print(f"{'case':<28} {'cpu ns':>8} {'floor':>6} {'net':>7} {'wall ns':>8} "
          f"{'x exch':>7}  goal net <{PICK_GOAL_NS} ns")
    for r in rows:
        print(f"{r['case']:<28} {r['cpu_ns_per_pick']:>8.0f} {r['floor_cpu_ns']:>6.0f} "
              f"{r['net_cpu_ns']:>7.0f} {r['wall_ns_per_pick']:>8.0f} "
              f"{r['pick_per_exchange']:>7.2f}  {'met' if r['met'] else 'NOT met'}")
    print("x exch: net pick cost / cost of making one Exchange, same run")
    built = builds(args.builds)
    print()
    print(f"build for {INSTANCES} instances, ms cpu (wall):")
    for name in ("maglev_weighted", "maglev_uniform", "ring_hash", "ring_hash_warm"):
        print(f"  {name:<16} {built[name + '_cpu_ms']:>7.1f} ({built[name + '_wall_ms']:.1f})")
    print(f"goal maglev < {MAGLEV_GOAL_MS:.0f} ms: {'met' if built['met'] else 'NOT met'}")
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(), "iterations": args.iterations,
        "repeats": args.repeats, "picks": rows, "builds": built,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
