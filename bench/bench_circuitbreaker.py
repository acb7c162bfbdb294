"""Circuit breaker benchmark: the in-process cost of the data-path hooks, and the
throughput of fallback answers from an open breaker in front of a dead upstream.

1. Micro (in process): ``lucid_permit_call`` + ``lucid_record_outcome`` together,
   through the real plugin object, for: no circuit (inert), a closed service-scope
   circuit (count window and time window), a closed instance-scope circuit, and an
   open circuit refusing (the permit alone: a refused call records nothing). Each
   figure is the median over ``--repeats`` timed loops of ``--iterations`` pairs,
   minus the median of the same loop calling two no-op functions (the floor, also
   reported). Goal: record + permit < 5 us.

2. Throughput: ``bench/proxy_bench.py`` with two variants, in one run:
   ``cb-fallback``: the bench route goes to a service whose only instance is a
   closed port, guarded by a circuit that trips on the first connect error and
   answers a static 200 fallback -- so the upstream is never touched;
   ``cb-closed``: the same circuit settings on the live bench service (closed
   circuit, the normal path). Goal: cb-fallback req/s >= 0.80 x plain Lucid.

Usage: python bench/bench_circuitbreaker.py [--rounds 5] [--duration 10]
       [--micro-only] [--json bench/results/circuitbreaker.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lucid_circuitbreaker import KIND, CircuitBreakerPlugin, static_circuits
from lucid_circuitbreaker.config import CircuitBreakerConfig, CircuitSpec

from lucid.definitions import Kind
from lucid.model import Exchange, Generation, Instance, Outcome

ROOT = Path(__file__).resolve().parent
DEFAULT_JSON = ROOT / "results" / "circuitbreaker.json"
PROXY_JSON = ROOT / "results" / "circuitbreaker-proxy.json"
MICRO_GOAL_NS = 5000
THROUGHPUT_GOAL = 0.80


# --------------------------------------------------------------------------
# micro
# --------------------------------------------------------------------------


def make_plugin(
    specs: dict[str, dict[str, Any]], instances: list[Instance]
) -> tuple[CircuitBreakerPlugin, Any]:
    """A plugin with static circuits, prepared and activated the way a config
    generation is (the instance list comes with each exchange)."""
    plugin = CircuitBreakerPlugin()
    config = SimpleNamespace(circuitbreaker=CircuitBreakerConfig.model_validate(
        {"circuits": specs}))
    generation = Generation(1, config, "bench", kinds={
        KIND: Kind(KIND, CircuitSpec, static=static_circuits)})
    plugin.lucid_prepare(generation)
    plugin.lucid_activate(generation)
    return plugin, generation


def exchange_for(generation: Any, service: str) -> Exchange:
    return Exchange(request_id="r", method="GET", path="/", query="", host="h",
                    scheme="http", client_ip="127.0.0.1", headers={}, started=0.0,
                    generation=generation, service=service)


def time_pairs(permit: Any, record: Any, exchange: Exchange, instances: list[Instance],
               outcome: Outcome, iterations: int) -> float:
    """ns per permit+record pair, instances taken in rotation."""
    n = len(instances)
    rotation = [instances[i % n] for i in range(iterations)]
    start = time.perf_counter_ns()
    for instance in rotation:
        permit(exchange, instance)
        record(exchange, instance, outcome)
    return (time.perf_counter_ns() - start) / iterations


def _noop2(exchange: Any, instance: Any) -> None:
    return None


def _noop3(exchange: Any, instance: Any, outcome: Any) -> None:
    return None


def micro(iterations: int, repeats: int) -> list[dict[str, Any]]:
    ok = Outcome("success", 200, 0.002)
    fail = Outcome("error_status", 500, 0.002)
    single = [Instance.from_url("svc", "http://127.0.0.1:9001")]
    four = [Instance.from_url("svc", f"http://127.0.0.1:{9001 + i}") for i in range(4)]
    closed = {"service": "svc", "sliding_window_size": 100, "minimum_number_of_calls": 50,
              "failure_rate_threshold": 99, "consecutive_failures": 0}
    cases: list[tuple[str, dict[str, Any], list[Instance], Outcome]] = [
        ("no circuit (inert)", {}, single, ok),
        ("closed, count window", {"c": closed}, single, ok),
        ("closed, count window, 404", {"c": closed}, single, Outcome("success", 404, 0.002)),
        ("closed, time window", {"c": {**closed, "sliding_window_type": "time_based",
                                       "sliding_window_size": 10}}, single, ok),
        ("closed, instance scope x4", {"c": {**closed, "scope": "instance"}}, four, ok),
        ("open, refusing", {"c": {"service": "svc", "consecutive_failures": 1,
                                  "wait_duration_in_open_state": "1h"}}, single, fail),
    ]
    rows = []
    for name, specs, instances, outcome in cases:
        plugin, generation = make_plugin(specs, instances)
        exchange = exchange_for(generation, "svc")
        permit, record = plugin.lucid_permit_call, plugin.lucid_record_outcome
        if name.startswith("open"):
            permit(exchange, instances[0])
            record(exchange, instances[0], fail)  # trips it
            assert permit(exchange, instances[0]) is not None
        time_pairs(permit, record, exchange, instances, outcome, iterations // 10)  # warm
        floor, measured = [], []
        for _ in range(repeats):  # interleaved, so drift hits both alike
            floor.append(time_pairs(_noop2, _noop3, exchange, instances, outcome, iterations))
            measured.append(time_pairs(permit, record, exchange, instances, outcome, iterations))
        f, m = statistics.median(floor), statistics.median(measured)
        states = {b.state for c in plugin.circuits.values() for b in c.breakers()}
        rows.append({
            "case": name, "ns_per_pair": round(m, 1), "floor_ns": round(f, 1),
            "net_ns": round(m - f, 1), "runs_ns": [round(x, 1) for x in measured],
            "breaker_states": sorted(states), "goal_ns": MICRO_GOAL_NS,
            "met": m - f < MICRO_GOAL_NS,
        })
    return rows


def print_micro(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':<28} {'ns/pair':>9} {'floor':>7} {'net':>7}  states      goal <5000 ns")
    for r in rows:
        print(f"{r['case']:<28} {r['ns_per_pair']:>9.0f} {r['floor_ns']:>7.0f} "
              f"{r['net_ns']:>7.0f}  {','.join(r['breaker_states']) or '-':<11} "
              f"{'met' if r['met'] else 'NOT met'}")


# --------------------------------------------------------------------------
# throughput
# --------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


FALLBACK_VARIANT = """\
[gateway.services.dead]
instances = ["http://127.0.0.1:{port}"]

[bench_route]
service = "dead"
retries = {{ attempts = 1 }}

[circuitbreaker.circuits.dead]
service = "dead"
consecutive_failures = 1
wait_duration_in_open_state = "1h"

[circuitbreaker.circuits.dead.fallback]
status = 200
body = "ok\\n"
"""

CLOSED_VARIANT = """\
[circuitbreaker.circuits.bench]
service = "bench"
consecutive_failures = 5
sliding_window_size = 100
minimum_number_of_calls = 100
"""


def throughput(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    fallback = tmp / "cb-fallback.toml"
    fallback.write_text(FALLBACK_VARIANT.format(port=closed_port()))
    closed = tmp / "cb-closed.toml"
    closed.write_text(CLOSED_VARIANT)
    cmd = [sys.executable, str(ROOT / "proxy_bench.py"), "--rounds", str(args.rounds),
           "--duration", str(args.duration), "--variant", f"cb-fallback={fallback}",
           "--variant", f"cb-closed={closed}", "--json", str(args.proxy_json)]
    print("running:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT.parent, check=False)
    if done.returncode != 0:
        raise SystemExit(f"proxy_bench.py exited {done.returncode}")
    payload = json.loads(args.proxy_json.read_text())
    out: dict[str, Any] = {"proxy_json": str(args.proxy_json), "variants": {}}
    for variant in payload["variants"]:
        out["variants"][variant["label"]] = variant["vs_lucid"]
    rows = {r["target"]: r for r in payload["results"]}
    out["rows"] = {name: {"rps": r["rps"], "errors": r["errors"],
                          "runs_rps": [run["rps"] for run in r["runs"]]}
                   for name, r in rows.items()}
    ratio = out["variants"].get("cb-fallback", {}).get("value")
    out["fallback_vs_lucid"] = ratio
    out["goal"] = THROUGHPUT_GOAL
    out["met"] = ratio is not None and ratio >= THROUGHPUT_GOAL
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--micro-only", action="store_true")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--proxy-json", type=Path, default=PROXY_JSON)
    args = parser.parse_args(argv)

    rows = micro(args.iterations, args.repeats)
    print_micro(rows)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(), "iterations": args.iterations,
        "repeats": args.repeats, "micro": rows,
    }
    if not args.micro_only:
        with tempfile.TemporaryDirectory(prefix="bench-cb-") as tmp:
            result["throughput"] = throughput(args, Path(tmp))
        t = result["throughput"]
        print()
        for name, r in t["rows"].items():
            runs = ", ".join(f"{x:,.0f}" for x in r["runs_rps"])
            print(f"{name:<14} median {r['rps']:>9,.0f} req/s  errors {r['errors']:>5}  [{runs}]")
        for ratio in t["variants"].values():
            rounds = ", ".join(f"{x:.2f}" for x in ratio["per_round"])
            print(f"ratio {ratio['name']}: {ratio['value']}  per round: {rounds}")
        print(f"fallback answers / plain Lucid: {t['fallback_vs_lucid']} -- goal "
              f"{THROUGHPUT_GOAL:.2f} {'met' if t['met'] else 'NOT met'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
