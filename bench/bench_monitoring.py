"""Monitoring benchmark: what recording costs per request, and what it costs in throughput.

1. In-process micro-costs (always): ``lucid_record_outcome`` and
   ``lucid_observe_exchange`` on a finished exchange,
   timed over many iterations with ``time.perf_counter_ns`` (median of several
   repeats), for: metrics only; metrics + the /monitoring/logs ring buffer (the
   default); and that plus the access log's queue put (full). The floor is an empty
   hook implementation called the same way, measured in the same run.
2. Proxy throughput (``--throughput``): runs ``bench/proxy_bench.py --rounds N`` with
   two variants -- ``monitoring-off`` (``[plugins] monitoring = false``) and
   ``monitoring-full`` (access log to a rotating file, alert rules evaluated, log
   notifier) -- next to the plain Lucid row (monitoring on by default: metrics and
   ring buffer). The goal: every monitoring row >= 0.95 x monitoring-off, per the
   medians; per-round ratios are printed as a noise gauge.
3. CPU per request (``--cpu``): the same three gateways (monitoring off, default,
   full) serve exactly ``--requests`` requests each from ``bench/loadgen.py``
   (50 connections), in alternating order for ``--rounds`` rounds, and the user+system
   CPU time of each ``lucid serve`` process and its children (all its threads and the
   access-log writer process; the ticker and the alert evaluation included) is divided
   by the requests served.
   On a shared machine this is steadier than req/s: a neighbour taking the core
   slows a run down but does not add CPU time to the gateway. Goal: default and full
   cost at most 1/0.95 of monitoring-off per request.

    python bench/bench_monitoring.py                       # micro-costs only
    python bench/bench_monitoring.py --throughput --rounds 5 --duration 10
    python bench/bench_monitoring.py --cpu --rounds 5 --requests 20000
4. In one process (``--inprocess``): the three gateways run side by side inside this
   interpreter (one uvloop loop, GC tuned as ``lucid serve`` does); each in turn is
   driven by ``wrk`` for ``--duration`` seconds, for ``--rounds`` alternating rounds
   (short rounds, many of them: a neighbour's burst then hits every row alike); CPU
   time of this process (every thread) per request served.

    python bench/bench_monitoring.py --inprocess --rounds 15 --duration 3

Writes ``bench/results/monitoring.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "monitoring.json"
GOAL = 0.95

OFF = """\
[plugins]
monitoring = false
"""

FULL = """\
[monitoring]
evaluation_interval = "1s"

[monitoring.access_log]
enabled = true
target = "file"
path = "access.log"
max_bytes = "50MiB"
backups = 1

[[monitoring.alerts]]
name = "HighErrorRate"
metric = "error_rate"
threshold = 0.05

[[monitoring.alerts]]
name = "SlowP99"
metric = "p99_latency"
threshold = 1.0
for = "30s"

[[monitoring.alerts]]
name = "LowHealthyShare"
metric = "healthy_instance_share"
op = "<"
threshold = 0.5

[[monitoring.notifiers]]
type = "log"
"""


# ---------------------------------------------------------------------------- micro
def _exchange() -> Any:
    from lucid.model import Exchange, Instance, Outcome

    ex = Exchange(request_id="0af7651916cd43dd8448eb211c80319c", method="GET", path="/api/users",
                  query="", host="example.com", scheme="http", client_ip="10.1.2.3",
                  headers={}, started=time.perf_counter())
    ex.route_id, ex.service = "api", "users"
    ex.instance = Instance.from_url("users", "http://10.0.0.5:8080")
    ex.status, ex.attempts, ex.bytes_out = 200, 1, 512
    ex.duration, ex.upstream_duration = 0.0042, 0.0031
    ex.outcome = Outcome("success", 200, 0.003)
    return ex


def _plugin(ring: bool, access_log: bool, tmp: Path) -> Any:
    from lucid_monitoring import MonitoringPlugin
    from lucid_monitoring.accesslog import AccessLogWriter
    from lucid_monitoring.config import AccessLog, MonitoringConfig
    from lucid_monitoring.metrics import Recorder

    cfg = MonitoringConfig()
    plugin = MonitoringPlugin()
    plugin.recorder = Recorder(cfg.buckets, cfg.max_clients)
    if ring:
        from collections import deque

        plugin.ring = deque(maxlen=cfg.log_buffer)
    if access_log:
        plugin.writer = AccessLogWriter(
            AccessLog(enabled=True, target="file", path="access.log", max_bytes="100MiB"), tmp)
        plugin._put = plugin.writer.put
    return plugin


def _time(fn: Any, ex: Any, n: int, repeats: int) -> float:
    """Median ns per call."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn(ex)
        samples.append((time.perf_counter_ns() - start) / n)
    return statistics.median(samples)


def micro(n: int, repeats: int) -> dict[str, Any]:
    ex = _exchange()

    def nothing(exchange: Any, *more: Any) -> None:
        return None

    def floor(exchange: Any) -> None:  # the same two hook calls, doing nothing
        nothing(exchange, exchange.instance, exchange.outcome)
        nothing(exchange)

    with tempfile.TemporaryDirectory() as tmp:
        rows = {"floor (empty hooks)": _time(floor, ex, n, repeats)}
        for label, ring, log in (("metrics", False, False), ("metrics+ring (default)", True,
                                                             False),
                                 ("full (+access log)", True, True)):
            plugin = _plugin(ring, log, Path(tmp))
            def hooks(exchange: Any, plugin: Any = plugin) -> None:
                plugin.lucid_record_outcome(exchange, exchange.instance, exchange.outcome)
                plugin.lucid_observe_exchange(exchange)

            rows[label] = _time(hooks, ex, n, repeats)
        handover_ns, writer_ns = _writer_cost(ex, Path(tmp), n, repeats)
    base = rows["floor (empty hooks)"]
    print("\nper-request cost of lucid_record_outcome + lucid_observe_exchange "
          f"({n:,} calls x {repeats}, median)")
    print(f"{'variant':<26} {'ns/call':>9} {'over floor':>11}")
    for label, ns in rows.items():
        print(f"{label:<26} {ns:>9,.0f} {ns - base:>10,.0f}")
    print(f"{'+ access-log hand-over/line':<26} {handover_ns:>9,.0f}   (pickling the batch for "
          "the writer process, in the gateway's event loop)")
    print(f"{'access-log writer/line':<26} {writer_ns:>9,.0f}   (formatting and writing, "
          "in the writer process)")
    return {"iterations": n, "repeats": repeats, "ns_per_call": rows,
            "ns_over_floor": {k: round(v - base, 1) for k, v in rows.items()},
            "access_log_handover_ns_per_line": round(handover_ns, 1),
            "access_log_writer_process_ns_per_line": round(writer_ns, 1)}


def _writer_cost(ex: Any, tmp: Path, n: int, repeats: int) -> tuple[float, float]:
    """Median ns per line of the access log's two halves: the hand-over in the gateway
    process (pickling the batch), and the writer process (JSON lines, file writes)."""
    from lucid_monitoring.accesslog import entry, frame, lines
    from lucid_monitoring.logwriter import handler_for, write

    handler = handler_for({"target": "file", "path": str(tmp / "cost.log"),
                           "max_bytes": 100 * 2**20, "backups": 1})
    batch = [entry(ex, time.time()) for _ in range(1000)]
    loops = max(1, n // len(batch))
    handover, writer = [], []
    try:
        for _ in range(repeats):
            start = time.perf_counter_ns()
            for _ in range(loops):
                frame(batch)
            handover.append((time.perf_counter_ns() - start) / (loops * len(batch)))
            start = time.perf_counter_ns()
            for _ in range(loops):
                write(handler, lines(batch), 64 * 1024)
            writer.append((time.perf_counter_ns() - start) / (loops * len(batch)))
    finally:
        handler.close()
    return statistics.median(handover), statistics.median(writer)


# ---------------------------------------------------------------------------- throughput
def throughput(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        off, full = Path(tmp) / "off.toml", Path(tmp) / "full.toml"
        off.write_text(OFF)
        full.write_text(FULL)
        out = Path(tmp) / "proxy.json"
        cmd = [sys.executable, str(BENCH_DIR / "proxy_bench.py"), "--rounds", str(args.rounds),
               "--duration", str(args.duration), "--label", "lucid",
               "--variant", f"monitoring-off={off}", "--variant", f"monitoring-full={full}",
               "--json", str(out)]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        payload = json.loads(out.read_text())
    rows = {r["target"]: r for r in payload["results"]}

    def per_round(name: str) -> list[float]:
        return [run["rps"] for run in rows[name]["runs"]]

    off_rounds = per_round("monitoring-off")
    ratios = {}
    for name in ("lucid", "monitoring-full"):
        on = per_round(name)
        ratios[f"{name}/monitoring-off"] = {
            "value": round(statistics.median(on) / statistics.median(off_rounds), 3),
            "per_round": [round(a / b, 3) for a, b in zip(on, off_rounds, strict=True)],
        }
    # CPU time the proxy process spent per request: less sensitive than req/s to a
    # neighbour stealing the core mid-run (it does not count the time the proxy waited).
    cpu_us = {}
    for name, row in rows.items():
        cpu = row["cpu_percent"].get("target")
        if name != "upstream" and cpu and row["rps"]:
            cpu_us[name] = round(cpu / 100 / row["rps"] * 1e6, 1)
    print("\nproxy CPU per request (us, medians):", cpu_us)
    print("\nthroughput ratios (median req/s; goal >= 0.95):")
    for name, r in ratios.items():
        verdict = "met" if r["value"] >= GOAL else "NOT met"
        print(f"  {name:<28} {r['value']:.3f}  per round {r['per_round']}  -- {verdict}")
    return {"command": " ".join(cmd[1:]), "ratios": ratios, "cpu_us_per_request": cpu_us,
            "medians_rps": {n: statistics.median(per_round(n)) for n in rows if rows[n]["runs"]},
            "proxy_bench": payload}


# ---------------------------------------------------------------------------- cpu/request
def cpu_per_request(args: argparse.Namespace) -> dict[str, Any]:
    import shutil
    import tomllib

    sys.path.insert(0, str(BENCH_DIR))
    import proxy_bench as pb

    variants = {"monitoring-off": OFF, "lucid (default)": "", "monitoring-full": FULL}
    services: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        try:
            up_port, *ports = pb.free_ports(1 + 2 * len(variants))
            up_url = f"http://{pb.HOST}:{up_port}"
            kind = "nginx" if shutil.which("nginx") else "asyncio"
            upstream = pb.start_service("upstream", pb.upstream_command(kind, tmp, up_port), tmp)
            services.append(upstream)
            pb.wait_ready(upstream, [up_url + "/"])
            targets: dict[str, tuple[Any, str]] = {}
            for i, (label, text) in enumerate(variants.items()):
                proxy, admin = ports[2 * i:2 * i + 2]
                workdir = tmp / f"v{i}"
                config = pb.write_lucid_config(workdir, proxy, admin, up_url,
                                               [(label, tomllib.loads(text))])
                service = pb.start_service(label.split()[0], pb.lucid_command(
                    None, config, proxy, admin, up_url), workdir)
                services.append(service)
                url = f"http://{pb.HOST}:{proxy}/"
                pb.wait_ready(service, [f"http://{pb.HOST}:{admin}/gateway/health", url])
                targets[label] = (service, url)

            def drive(url: str, n: int) -> int:
                done = subprocess.run(
                    [sys.executable, str(BENCH_DIR / "loadgen.py"), "--url", url, "-c", "50",
                     "-d", "600", "--max-requests", str(n)],
                    capture_output=True, text=True, timeout=660, check=True)
                summary = json.loads(done.stdout)
                if summary.get("errors"):
                    raise RuntimeError(f"{url}: {summary['errors']} errors")
                return int(summary["requests"])

            for _, url in targets.values():  # warm-up: imports, connection pools
                drive(url, max(1000, args.requests // 10))
            runs: dict[str, list[float]] = {label: [] for label in targets}
            for round_no in range(1, args.rounds + 1):
                order = list(targets) if round_no % 2 else list(targets)[::-1]
                for label in order:
                    service, url = targets[label]
                    before = pb.tree_cpu_seconds(service)
                    served = drive(url, args.requests)
                    after = pb.tree_cpu_seconds(service)
                    us = (after - before) / served * 1e6
                    runs[label].append(round(us, 1))
                    print(f"  [{round_no}/{args.rounds}] {label:<18} {served:>7,} requests "
                          f"{us:7.1f} us CPU/request", flush=True)
        finally:
            for service in reversed(services):
                service.stop()
    return {"requests": args.requests, **cpu_summary(
        runs, f"lucid CPU per request (us, median of {args.rounds} rounds of "
              f"{args.requests:,} requests", args.rounds)}


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    import shutil

    import psutil
    import uvloop

    sys.path.insert(0, str(BENCH_DIR))
    import proxy_bench as pb

    from lucid.server import tune_garbage_collector
    from lucid.testing import run_gateway

    variants = {"monitoring-off": OFF, "lucid (default)": "", "monitoring-full": FULL}
    runs: dict[str, list[float]] = {label: [] for label in variants}
    served_per_round: dict[str, list[int]] = {label: [] for label in variants}

    async def wrk(url: str, seconds: float) -> int:
        proc = await asyncio.create_subprocess_exec(
            "wrk", "-t1", "-c50", f"-d{max(1, round(seconds))}s", url,
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        m = re.search(r"(\d+) requests in", out.decode())
        assert m, out.decode()
        return int(m.group(1))

    def cpu_seconds() -> float:
        """This process, and the access-log writers it started (not nginx, not wrk)."""
        total = time.process_time()
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                if "lucid_monitoring.logwriter" in child.cmdline():
                    times = child.cpu_times()
                    total += times.user + times.system
        return total

    async def measure(upstream: str, tmp: Path) -> None:
        async with contextlib.AsyncExitStack() as stack:
            urls = {}
            for label, text in variants.items():
                config = (f'[[gateway.routes]]\nid = "bench"\nprefix = "/"\nservice = "bench"'
                          f'\n\n[gateway.services.bench]\ninstances = ["{upstream}"]\n\n{text}')
                gw = await stack.enter_async_context(
                    run_gateway(config, tmp / label.split()[0]))
                urls[label] = gw.proxy_url + "/"
            tune_garbage_collector()
            for url in urls.values():
                await wrk(url, 2)  # warm-up
            for round_no in range(1, args.rounds + 1):
                order = list(variants) if round_no % 2 else list(variants)[::-1]
                for label in order:
                    start = cpu_seconds()
                    served = await wrk(urls[label], args.duration)
                    us = (cpu_seconds() - start) / served * 1e6
                    runs[label].append(round(us, 1))
                    served_per_round[label].append(served)
                    print(f"  [{round_no}/{args.rounds}] {label:<18} {served:>7,} requests "
                          f"{us:7.1f} us CPU/request (in process)", flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        port = pb.free_ports(1)[0]
        kind = "nginx" if shutil.which("nginx") else "asyncio"
        upstream = pb.start_service("upstream", pb.upstream_command(kind, tmp, port), tmp)
        url = f"http://{pb.HOST}:{port}"
        try:
            pb.wait_ready(upstream, [url + "/"])
            uvloop.run(measure(url, tmp))
        finally:
            upstream.stop()
    return {"duration": args.duration, **cpu_summary(
        runs, f"in-process CPU per request (us, median of {args.rounds} rounds of "
              f"{args.duration:g} s", args.rounds), "rps": rps_summary(served_per_round, args)}


def rps_summary(served: dict[str, list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """req/s of each gateway (median over rounds) over monitoring-off's, and the median
    of the per-round ratios (each round's runs are seconds apart: a steadier pairing)."""
    off = served["monitoring-off"]
    print(f"\nin-process req/s (median of {args.rounds} rounds of {args.duration:g} s; "
          f"goal: x / monitoring-off >= {GOAL}):")
    out = {}
    for label, counts in served.items():
        rps = statistics.median(counts) / args.duration
        ratio = statistics.median(counts) / statistics.median(off)
        paired = statistics.median(a / b for a, b in zip(counts, off, strict=True))
        out[label] = {"rps": round(rps, 1), "ratio": round(ratio, 3),
                      "median_of_round_ratios": round(paired, 3)}
        print(f"  {label:<18} {rps:9,.0f} req/s  this/off {ratio:.3f}  "
              f"(median of per-round ratios {paired:.3f})")
    return out


def cpu_summary(runs: dict[str, list[float]], heading: str, rounds: int) -> dict:
    """Print each gateway's median CPU per request and monitoring-off's over it."""
    base = statistics.median(runs["monitoring-off"])
    print(f"\n{heading}; goal: monitoring-off / x >= {GOAL}):")
    ratios = {}
    for label, values in runs.items():
        med = statistics.median(values)
        ratios[label] = round(base / med, 3)
        print(f"  {label:<18} {med:7.1f}  rounds {values}  off/this {ratios[label]:.3f}")
    return {"rounds": rounds, "us_per_request": runs,
            "median_us": {k: statistics.median(v) for k, v in runs.items()},
            "ratio_off_over_variant": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--throughput", action="store_true", help="also run proxy_bench.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--cpu", action="store_true",
                        help="also measure lucid's CPU time per request, per variant")
    parser.add_argument("--inprocess", action="store_true",
                        help="also measure CPU per request of gateways run in this process")
    parser.add_argument("--requests", type=int, default=20_000,
                        help="requests per variant and round for --cpu")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                              "micro": micro(args.iterations, args.repeats)}
    if args.throughput:
        result["throughput"] = throughput(args)
    if args.cpu:
        result["cpu"] = cpu_per_request(args)
    if args.inprocess:
        result["in_process"] = in_process(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
