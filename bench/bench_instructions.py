"""Instructions per proxied request: Lucid against the floor, counted by callgrind.

req/s and CPU time on a shared VM swing by 10-40% from one round to the next; the
number of instructions a server executes per request does not (runs of the same code
agree within about 0.2%). This benchmark runs the floor, Lucid and any ``--variant``
one after another under ``valgrind --tool=callgrind``, drives exactly ``--requests``
requests through each (50 keep-alive connections, ``bench/loadgen.py``), and prints
instructions per request and the ratio floor/Lucid: the same direction as
proxy_bench's req/s ratio (higher is better, 1.0 = as cheap as the floor).

It counts user-space instructions of every thread of the server. Not counted: time
in the kernel (system calls), cache misses, waiting for the GIL, and child processes
(the access-log writer: ``bench_monitoring.py`` prints its cost per line, and its
``--cpu`` mode counts it). So it is a guide for changes to Lucid's code, next to
proxy_bench's req/s ratio, not a replacement.

Periodic work (metric ticks, alert evaluation, log flushes) runs by the wall clock,
and a server under callgrind serves about 50 times fewer requests per second, so
that work would weigh 50 times too much per request. ``--idle`` seconds of an idle
server are counted too, and the table's "per request" column takes that rate out of
the loaded run ("raw" keeps it).

    python bench/bench_instructions.py                      # floor and Lucid
    python bench/bench_instructions.py --variant monitoring-off=off.toml
    python bench/bench_instructions.py --keep prof/  # callgrind_annotate prof/callgrind.lucid.1

Needs valgrind (Debian's package). Writes ``bench/results/instructions.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from proxy_bench import (
    BENCH_DIR,
    HOST,
    BenchError,
    Service,
    floor_command,
    free_ports,
    read_layer,
    start_service,
    upstream_command,
    wait_ready,
    write_lucid_config,
)

RESULTS = BENCH_DIR / "results" / "instructions.json"
GOAL = 0.90


@dataclass
class Count:
    label: str
    requests: int
    seconds: float  # wall time of the loaded run
    instructions: int  # the loaded run, everything the process did
    idle_per_second: float  # instructions per second of the idle server

    @property
    def raw(self) -> float:
        return self.instructions / self.requests

    @property
    def per_request(self) -> float:
        return (self.instructions - self.idle_per_second * self.seconds) / self.requests


def _totals(path: Path) -> int:
    """The event total of a callgrind dump (its ``summary:`` or ``totals:`` line)."""
    text = path.read_text(errors="replace")
    found = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.MULTILINE)
    if found is None:
        raise BenchError(f"{path}: no totals line in the callgrind output")
    return int(found.group(1))


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _drive(url: str, requests: int, connections: int) -> float:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(BENCH_DIR / "loadgen.py"), "--url", url, "-c", str(connections),
         "-d", "3600", "--max-requests", str(requests), "--timeout", "60"],
        check=True, capture_output=True, text=True,
    ).stdout
    errors = json.loads(out.strip().splitlines()[-1]).get("errors", 0)
    if errors:
        raise BenchError(f"{url}: {errors} failed requests under callgrind")
    return time.monotonic() - started


def count(label: str, cmd: list[str], ready: list[str], url: str, tmp: Path,
          args: argparse.Namespace) -> Count:
    out = tmp / f"callgrind.{label}"
    service: Service = start_service(
        label, ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}", *cmd], tmp)
    try:
        wait_ready(service, ready, timeout=300)
        _drive(url, args.warmup, args.connections)  # not counted
        _control(service.proc.pid, "-i", "on")
        seconds = _drive(url, args.requests, args.connections)
        _control(service.proc.pid, "-d")  # dump 1: the loaded run
        time.sleep(args.idle)
        _control(service.proc.pid, "-d")  # dump 2: the idle seconds after it
        loaded, idle = _totals(Path(f"{out}.1")), _totals(Path(f"{out}.2"))
    finally:
        service.stop()
    if args.keep is not None:  # dump 1 (loaded) and 2 (idle), for callgrind_annotate
        args.keep.mkdir(parents=True, exist_ok=True)
        for part in (1, 2):
            shutil.copy(f"{out}.{part}", args.keep / f"callgrind.{label}.{part}")
    rate = idle / args.idle if args.idle else 0.0
    result = Count(label, args.requests, seconds, loaded, rate)
    print(f"  {label:<22} {result.per_request:12,.0f} instructions/request "
          f"(raw {result.raw:,.0f}; {args.requests} requests in {seconds:.0f} s)", flush=True)
    return result


def run(args: argparse.Namespace) -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench_instructions: valgrind is not installed (apt-get install valgrind)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lucid-instructions-") as name:
        tmp = Path(name)
        up_port, floor_port, *rest = free_ports(2 + 2 * (1 + len(args.variants)))
        up_url = f"http://{HOST}:{up_port}"
        kind = "nginx" if shutil.which("nginx") else "asyncio"
        upstream = start_service("upstream", upstream_command(kind, tmp, up_port), tmp)
        try:
            wait_ready(upstream, [up_url + "/"])
            floor_url = f"http://{HOST}:{floor_port}/"
            counts = [count("floor", floor_command(floor_port, up_url), [floor_url], floor_url,
                            tmp, args)]
            rows = [("lucid", [])] + [(label, [(str(path), read_layer(path))])
                                      for label, path in args.variants]
            for i, (label, layers) in enumerate(rows):
                proxy_port, admin_port = rest[2 * i: 2 * i + 2]
                workdir = tmp / f"row-{i}"
                config = write_lucid_config(workdir, proxy_port, admin_port, up_url, layers)
                url = f"http://{HOST}:{proxy_port}/"
                counts.append(count(
                    label, [sys.executable, "-m", "lucid", "serve", "--config", str(config)],
                    [f"http://{HOST}:{admin_port}/gateway/health", url], url, tmp, args))
        finally:
            upstream.stop()
    report(counts, args)
    return 0


def report(counts: list[Count], args: argparse.Namespace) -> None:
    floor, lucid = counts[0], counts[1]
    print(f"\n{'target':<22} {'instr/request':>14} {'raw':>12} {'idle instr/s':>14} "
          f"{'floor/this':>11} {'lucid/this':>11}")
    for c in counts:
        each = c.per_request
        print(f"{c.label:<22} {each:14,.0f} {c.raw:12,.0f} {c.idle_per_second:14,.0f} "
              f"{floor.per_request / each:11.3f} {lucid.per_request / each:11.3f}")
    ratio = floor.per_request / lucid.per_request
    verdict = "met" if ratio >= GOAL else "NOT met"
    print(f"ratio floor/lucid (instructions per request): {ratio:.3f} -- {GOAL:.2f} {verdict} "
          "(user-space instructions only: see the module docstring)")
    payload = {
        "benchmark": "instructions per proxied request (callgrind)",
        "requests": args.requests, "connections": args.connections, "idle_seconds": args.idle,
        "rows": [{"label": c.label, "instructions_per_request": round(c.per_request),
                  "raw_instructions_per_request": round(c.raw),
                  "idle_instructions_per_second": round(c.idle_per_second),
                  "seconds": round(c.seconds, 1)} for c in counts],
        "ratio_floor_over_lucid": round(ratio, 4),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000,
                        help="counted requests per target (default 2000)")
    parser.add_argument("--warmup", type=int, default=300, help="uncounted requests first")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--idle", type=float, default=20.0,
                        help="idle seconds counted after the load, to take periodic work out")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=FILE",
                        help="one more Lucid row: the bench config plus FILE (TOML)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy each target's callgrind dumps here (callgrind.LABEL.1 the "
                             "loaded run, .2 the idle seconds)")
    args = parser.parse_args(argv)
    args.variants = []
    for spec in args.variant:
        label, sep, path = spec.partition("=")
        if not sep or not label or not Path(path).is_file():
            parser.error(f"--variant {spec!r}: expected LABEL=FILE with an existing FILE")
        args.variants.append((label, Path(path)))
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except BenchError as exc:
        print(f"bench_instructions: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
