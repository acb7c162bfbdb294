"""Cluster monitoring benchmark: what a node's background work costs, in process.

In a Redis cluster each node's worker 0 builds and serialises its figures every
``[monitoring] cluster_interval`` (1 s) -- the last minute always, the 5 m and 1 h
windows too once a rule uses them -- and the alert leader parses and sums every
node's figures at each evaluation. None of it is on the request path; this measures
how much of a core it takes, against a floor measured in the same run: one
``Recorder.window(60)`` (what one local evaluation of a 1 m rule, or one dashboard
poll, already costs on a single node).

The publishing node keeps the sums of the closed slots from one publish to the next
(``WindowSums``): a row sums them afresh at every call, for comparison (what a first
publish, or a publish after a restart, costs once).

The recorder is filled as a busy gateway's would be after an hour: ``--routes``
routes, each with traffic in 3 methods and 3 status classes, and every one of the
360 window slots (and the open one) holding a delta for every key (the worst case).

    python bench/bench_monitoring_cluster.py                 # 50 routes, 3 nodes
    python bench/bench_monitoring_cluster.py --routes 200 --nodes 10

Prints a table and writes ``bench/results/monitoring_cluster.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "plugins"))

from lucid_monitoring.clustered import ClusterFigures, WindowSums, node_figures  # noqa: E402
from lucid_monitoring.metrics import SLOTS, WINDOWS, Recorder  # noqa: E402

RESULTS = BENCH_DIR / "results" / "monitoring_cluster.json"
BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class Exchange:
    bytes_in = bytes_out = 100
    attempts = 1
    instance = "i"
    upstream_duration = 0.004
    client_ip = "10.0.0.1"

    def __init__(self, route: str, method: str, status: int, duration: float):
        self.route_id, self.service, self.method = route, "svc", method
        self.status, self.duration = status, duration


def busy_recorder(routes: int) -> Recorder:
    rec = Recorder(BUCKETS)
    now = time.time() - WINDOWS["1h"]
    rec.started = now
    for slot in range(SLOTS):
        for r in range(routes):
            for method in ("GET", "POST", "PUT"):
                for status in (200, 404, 503):
                    rec.observe(Exchange(f"route-{r}", method, status, 0.003 * (slot % 7 + 1)))
        rec.tick(now + slot * 10.0)
    for r in range(routes):  # and the open slot: traffic since the last tick
        for method in ("GET", "POST", "PUT"):
            for status in (200, 404, 503):
                rec.observe(Exchange(f"route-{r}", method, status, 0.003))
    return rec


def timed(work: Callable[[], Any], repeat: int) -> float:
    """Median seconds of one call."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--interval", type=float, default=1.0,
                        help="cluster_interval and evaluation_interval, seconds")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    rec = busy_recorder(args.routes)
    now = rec._last_tick
    minute = json.dumps(node_figures(rec, "n", ["1m"], now))
    every = json.dumps(node_figures(rec, "n", list(WINDOWS), now))
    documents = [json.loads(every) for _ in range(args.nodes)]

    def leader() -> None:
        docs = [json.loads(every) for _ in range(args.nodes)]
        merged = ClusterFigures(BUCKETS, docs)
        for seconds in WINDOWS.values():
            merged.window(seconds)

    sums = WindowSums()
    node_figures(rec, "n", list(WINDOWS), now, sums)  # what the first publish sums once
    cases = {
        "floor: Recorder.window(1m)": lambda: rec.window(WINDOWS["1m"], now),
        "publish 1m (build + JSON)": lambda: json.dumps(
            node_figures(rec, "n", ["1m"], now, sums)),
        "publish 1m+5m+1h (build + JSON)": lambda: json.dumps(
            node_figures(rec, "n", list(WINDOWS), now, sums)),
        "publish 1m+5m+1h, slots summed afresh": lambda: json.dumps(
            node_figures(rec, "n", list(WINDOWS), now)),
        f"leader: parse + sum {args.nodes} nodes, 3 windows": leader,
    }
    ClusterFigures(BUCKETS, documents).minute()  # warm
    seconds = {name: timed(work, args.repeat) for name, work in cases.items()}
    floor = seconds["floor: Recorder.window(1m)"]
    rows = [{"case": name, "ms": round(s * 1000, 3), "ratio_to_floor": round(s / floor, 2),
             "core_share_at_interval": round(s / args.interval, 5)}
            for name, s in seconds.items()]
    keys = len(rec.routes)
    print(f"{args.routes} routes ({keys} route keys), {args.nodes} nodes, "
          f"every {args.interval:g} s; figures: 1m {len(minute) / 1024:.1f} KiB, "
          f"all windows {len(every) / 1024:.1f} KiB")
    print(f"{'case':48} {'ms':>9} {'x floor':>8} {'core share':>11}")
    for row in rows:
        print(f"{row['case']:48} {row['ms']:9.3f} {row['ratio_to_floor']:8.2f} "
              f"{row['core_share_at_interval'] * 100:10.3f}%")
    result = {"bench": "monitoring_cluster", "at": datetime.now(UTC).isoformat(),
              "routes": args.routes, "route_keys": keys, "nodes": args.nodes,
              "interval": args.interval, "bytes_1m": len(minute), "bytes_all": len(every),
              "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
