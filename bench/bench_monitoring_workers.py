"""What sharing a worker's monitoring with worker 0 costs (``server.workers > 1``).

Every worker but the first, once a second, writes its metrics snapshot (with its
client counts, for the reports' top clients) and appends the requests its log buffer
took since to ``<pid>.log`` (for ``/monitoring/logs``). That runs in the worker's
event loop, so it is time no request gets. This benchmark replays one second of
traffic at several rates through the plugin's hooks (metrics and the default
1,000-line log buffer), then times the share, and reports it per request served in
that second against the floor measured in the same run: what the same hooks cost per
request (``lucid_record_outcome`` + ``lucid_observe_exchange``). Ratios, not absolute
figures: "sharing adds x% to what recording a request costs".

For comparison it also times what writing the whole log buffer every second would
cost (the first version did) with ``--log-buffer`` lines.

    python bench/bench_monitoring_workers.py
    python bench/bench_monitoring_workers.py --rates 100,1000,10000 --seconds 15

Writes ``bench/results/monitoring-workers.json``.
"""

from __future__ import annotations

import argparse
import json
import marshal
import statistics
import sys
import tempfile
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "monitoring-workers.json"


def exchange(client: str) -> Any:
    from lucid.model import Exchange, Instance, Outcome

    ex = Exchange(request_id="0af7651916cd43dd8448eb211c80319c", method="GET", path="/api/users",
                  query="", host="example.com", scheme="http", client_ip=client,
                  headers={}, started=time.perf_counter())
    ex.route_id, ex.service = "api", "users"
    ex.instance = Instance.from_url("users", "http://10.0.0.5:8080")
    ex.status, ex.attempts, ex.bytes_out = 200, 1, 512
    ex.duration, ex.upstream_duration = 0.0042, 0.0031
    ex.outcome = Outcome("success", 200, 0.003)
    return ex


def plugin(log_buffer: int) -> Any:
    from lucid_monitoring import MonitoringPlugin
    from lucid_monitoring.config import MonitoringConfig
    from lucid_monitoring.metrics import Recorder

    cfg = MonitoringConfig()
    p = MonitoringPlugin()
    p.recorder = Recorder(cfg.buckets, cfg.max_clients)
    p.ring = deque(maxlen=log_buffer)
    return p


def hooks_ns(exchanges: list[Any], log_buffer: int, repeats: int) -> float:
    """The floor: ns per request of the recording hooks themselves (median)."""
    samples = []
    for _ in range(repeats):
        p = plugin(log_buffer)
        start = time.perf_counter_ns()
        for ex in exchanges:
            p.lucid_record_outcome(ex, ex.instance, ex.outcome)
            p.lucid_observe_exchange(ex)
        samples.append((time.perf_counter_ns() - start) / len(exchanges))
    return statistics.median(samples)


def share_ns(rate: int, seconds: int, clients: int, tmp: Path) -> tuple[float, float, float]:
    """(median, max, median of the log part) ns of one share after ``rate`` requests,
    over ``seconds`` seconds of replayed traffic (the log file appended to, then
    replaced, as in a worker)."""
    from lucid_monitoring.workers import WorkerShare

    p = plugin(1000)
    share = WorkerShare(tmp / f"rate-{rate}", "run", 1)
    pool = [exchange(f"10.1.{i // 250}.{i % 250}") for i in range(clients)]
    samples, logs = [], []
    for second in range(seconds):
        for i in range(rate):
            ex = pool[(second * rate + i) % clients]
            p.lucid_record_outcome(ex, ex.instance, ex.outcome)
            p.lucid_observe_exchange(ex)
        start = time.perf_counter_ns()
        share.write(p.recorder, 0)
        middle = time.perf_counter_ns()
        share.write_log(p.ring)
        end = time.perf_counter_ns()
        samples.append(end - start)
        logs.append(end - middle)
    return statistics.median(samples[1:]), max(samples[1:]), statistics.median(logs[1:])


def whole_ring_ns(log_buffer: int, repeats: int, tmp: Path) -> float:
    """ns to write a full ``log_buffer``-line ring whole (marshal + replace)."""
    p = plugin(log_buffer)
    ex = exchange("10.1.2.3")
    for _ in range(log_buffer):
        p.lucid_observe_exchange(ex)
    path = tmp / "whole.log"
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        data = marshal.dumps(list(p.ring))
        (tmp / "whole.tmp").write_bytes(data)
        (tmp / "whole.tmp").replace(path)
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100,1000,10000",
                        help="requests per second a worker serves, comma-separated")
    parser.add_argument("--seconds", type=int, default=12, help="seconds replayed per rate")
    parser.add_argument("--clients", type=int, default=200, help="distinct client addresses")
    parser.add_argument("--log-buffer", type=int, default=100_000,
                        help="log buffer size for the whole-ring comparison")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    floor_pool = [exchange(f"10.1.0.{i % 200}") for i in range(20_000)]
    floor = hooks_ns(floor_pool, 1000, args.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for rate in rates:
            median, worst, log = share_ns(rate, args.seconds, args.clients, tmp)
            rows.append({"rate": rate, "share_us": round(median / 1000, 1),
                         "log_part_us": round(log / 1000, 1),
                         "share_max_us": round(worst / 1000, 1),
                         "ns_per_request": round(median / rate, 1),
                         "ratio_to_floor": round(median / rate / floor, 4),
                         "loop_share": round(median / 1e9, 6)})
        whole = whole_ring_ns(args.log_buffer, args.repeats, tmp)
    print(f"\nfloor: recording hooks (metrics + 1,000-line log buffer) {floor:,.0f} ns/request")
    print(f"{'req/s':>8} {'share (µs)':>11} {'log part':>9} {'max (µs)':>9} {'ns/request':>11} "
          f"{'x floor':>8} {'of each second':>15}")
    for r in rows:
        print(f"{r['rate']:>8,} {r['share_us']:>11,.1f} {r['log_part_us']:>9,.1f} "
              f"{r['share_max_us']:>9,.1f} "
              f"{r['ns_per_request']:>11,.1f} {r['ratio_to_floor']:>8.3f} "
              f"{r['loop_share'] * 100:>14.3f}%")
    print(f"writing a whole {args.log_buffer:,}-line log buffer instead: "
          f"{whole / 1e6:,.1f} ms each second")
    result = {"at": datetime.now(UTC).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "floor_ns_per_request": round(floor, 1), "rates": rows,
              "whole_ring": {"lines": args.log_buffer, "ms": round(whole / 1e6, 2)}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
