"""Instructions per proxied request: Lucid against the floor, counted by callgrind.

req/s and CPU time on a shared VM swing by 10-40% from one round to the next; the
number of instructions a server executes per request does not (runs of the same code
agree within about 0.2%). This benchmark runs the floor, Lucid and any ``--variant``
one after another under ``valgrind --tool=callgrind``, drives exactly ``--requests``
requests through each (50 keep-alive connections, ``bench/loadgen.py``), and prints
instructions per request and the ratio floor/Lucid: the same direction as
proxy_bench's req/s ratio (higher is better, 1.0 = as cheap as the floor).

The rows are proxy_bench's standard ones on the fast engine: ``floor`` (Hypercorn +
aiohttp), ``floor-fast`` (uvloop + httptools both sides, ``bench/floor_fast.py``),
``lucid`` and ``lucid-full`` (JWT auth, rate limit, pool, breaker and metrics on the
route, sending the bench's bearer token), then each ``--variant``; every row is
compared with both floors. ``--rows`` picks some of them.

``--price-plugins`` adds lucid-full without each of its plugins in turn (rows
``full-no-auth``, ``full-no-ratelimiter`` ...) and prints what each plugin costs a
request: lucid-full's count less that row's (its hooks and whatever its work adds
elsewhere, such as the response headers a rate limit announces).

A failed request fails the run, naming what failed (``bench/loadgen.py`` counts each
kind: a status, a connection error, a timeout).

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

    python bench/bench_instructions.py                      # the four standard rows
    python bench/bench_instructions.py --rows floor-fast,lucid-full
    python bench/bench_instructions.py --rows lucid-full --price-plugins
    python bench/bench_instructions.py --variant monitoring-off=off.toml
    python bench/bench_instructions.py --keep prof/  # callgrind_annotate prof/callgrind.lucid.1

Needs valgrind (Debian's package). Writes ``bench/results/instructions.json``.
"""

from __future__ import annotations

import argparse
import copy
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
    BENCH_HEADERS,
    BENCH_ROUTE,
    FULL_CHAIN_GOALS,
    HOST,
    BenchError,
    Service,
    floor_command,
    floor_fast_command,
    free_ports,
    layer_headers,
    read_layer,
    standard_layers,
    start_service,
    upstream_command,
    wait_ready,
    write_lucid_config,
)

RESULTS = BENCH_DIR / "results" / "instructions.json"
GOAL = 0.90  # floor/lucid
FLOORS = ("floor", "floor-fast")
STANDARD_ROWS = ("floor", "floor-fast", "lucid", "lucid-full")
PRICED = ("ratelimiter", "loadbalancer", "circuitbreaker", "monitoring")  # and auth


def priced_layers(full: dict) -> dict[str, dict]:
    """lucid-full's layer without one plugin each (auth: the route's JWT check and its
    token), by row label."""
    rows = {}
    layer = copy.deepcopy(full)
    del layer[BENCH_ROUTE], layer[BENCH_HEADERS]
    rows["full-no-auth"] = layer
    for capability in PRICED:
        layer = copy.deepcopy(full)
        del layer[capability]
        layer["plugins"] = {capability: False}
        rows[f"full-no-{capability}"] = layer
    return rows


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


def _drive(url: str, requests: int, connections: int, headers: list[tuple[str, str]],
           service: Service) -> float:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(BENCH_DIR / "loadgen.py"), "--url", url, "-c", str(connections),
         "-d", "3600", "--max-requests", str(requests), "--timeout", "60",
         *(f"--header={name}: {value}" for name, value in headers)],
        check=True, capture_output=True, text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result.get("errors", 0):
        kinds = "; ".join(f"{n} x {kind}" for kind, n in result.get("failures", {}).items())
        raise BenchError(f"{url}: {result['errors']} of {requests} requests failed under "
                         f"callgrind ({kinds})\n{service.log_tail(2000)}")
    return time.monotonic() - started


def count(label: str, cmd: list[str], ready: list[str], url: str, tmp: Path,
          args: argparse.Namespace, headers: list[tuple[str, str]] | None = None) -> Count:
    out = tmp / f"callgrind.{label}"
    headers = headers or []
    service: Service = start_service(
        label, ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}", *cmd], tmp)
    try:
        wait_ready(service, ready, timeout=300, headers=headers)
        _drive(url, args.warmup, args.connections, headers, service)  # not counted
        _control(service.proc.pid, "-i", "on")
        seconds = _drive(url, args.requests, args.connections, headers, service)
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
        up_port, *rest = free_ports(1 + 2 * len(args.row_labels))
        up_url = f"http://{HOST}:{up_port}"
        kind = "nginx" if shutil.which("nginx") else "asyncio"
        upstream = start_service("upstream", upstream_command(kind, tmp, up_port), tmp)
        standard = standard_layers()
        layers_of: dict[str, list[tuple[str, dict]]] = {
            "lucid": [], "lucid-full": [("lucid-full", standard["lucid-full"])],
            **{label: [(label, layer)]
               for label, layer in priced_layers(standard["lucid-full"]).items()},
            **{label: [(str(path), read_layer(path))] for label, path in args.variants}}
        counts = []
        try:
            wait_ready(upstream, [up_url + "/"])
            for i, label in enumerate(args.row_labels):
                proxy_port, admin_port = rest[2 * i: 2 * i + 2]
                url = f"http://{HOST}:{proxy_port}/"
                if label in FLOORS:
                    make = floor_command if label == "floor" else floor_fast_command
                    counts.append(count(label, make(proxy_port, up_url), [url], url, tmp, args))
                    continue
                layers = layers_of[label]
                headers = [h for _, layer in layers for h in layer_headers(layer)]
                config = write_lucid_config(tmp / f"row-{i}", proxy_port, admin_port, up_url,
                                            layers)
                counts.append(count(
                    label, [sys.executable, "-m", "lucid", "serve", "--config", str(config)],
                    [f"http://{HOST}:{admin_port}/gateway/health", url], url, tmp, args,
                    headers))
        finally:
            upstream.stop()
    report(counts, args)
    return 0


def _over(top: Count | None, row: Count) -> float | None:
    """top's instructions per request over row's: as a req/s ratio row/top would read."""
    return None if top is None else top.per_request / row.per_request


def report(counts: list[Count], args: argparse.Namespace) -> None:
    by_label = {c.label: c for c in counts}
    columns = [label for label in (*FLOORS, "lucid") if label in by_label]
    print(f"\n{'target':<22} {'instr/request':>14} {'raw':>12} {'idle instr/s':>14} "
          + " ".join(f"{label + '/this':>15}" for label in columns))
    for c in counts:
        ratios = [_over(by_label[label], c) for label in columns]
        print(f"{c.label:<22} {c.per_request:14,.0f} {c.raw:12,.0f} "
              f"{c.idle_per_second:14,.0f} " + " ".join(f"{r:15.3f}" for r in ratios
                                                        if r is not None))
    goals = []
    if "floor" in by_label and "lucid" in by_label:
        goals.append(("lucid", "floor", GOAL))
    goals += [("lucid-full", floor, goal) for floor, goal in FULL_CHAIN_GOALS.items()
              if floor in by_label and "lucid-full" in by_label]
    for row, floor, goal in goals:
        ratio = by_label[floor].per_request / by_label[row].per_request
        verdict = "met" if ratio >= goal else "NOT met"
        print(f"{floor}/{row} (instructions per request): {ratio:.3f} -- {goal:.2f} "
              f"{verdict} (user-space instructions only: see the module docstring)")
    plugin_costs: dict[str, float] = {}
    full = by_label.get("lucid-full")
    if full is not None:
        plugin_costs = {c.label.removeprefix("full-no-"): full.per_request - c.per_request
                        for c in counts if c.label.startswith("full-no-")}
        for plugin, cost in plugin_costs.items():
            print(f"{plugin:<22} costs {cost:10,.0f} instructions/request in lucid-full "
                  f"({cost / full.per_request:.1%})")
    payload: dict = {
        "benchmark": "instructions per proxied request (callgrind)",
        "requests": args.requests, "connections": args.connections, "idle_seconds": args.idle,
        "rows": [{"label": c.label, "instructions_per_request": round(c.per_request),
                  "raw_instructions_per_request": round(c.raw),
                  "idle_instructions_per_second": round(c.idle_per_second),
                  "seconds": round(c.seconds, 1),
                  **{f"ratio_{floor}_over_this": round(r, 4) for floor in FLOORS
                     if (r := _over(by_label.get(floor), c)) is not None}}
                 for c in counts],
    }
    if plugin_costs:
        payload["plugin_instructions_per_request"] = {
            plugin: round(cost) for plugin, cost in plugin_costs.items()}
    if "floor" in by_label and "lucid" in by_label:
        payload["ratio_floor_over_lucid"] = round(
            by_label["floor"].per_request / by_label["lucid"].per_request, 4)
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
    parser.add_argument("--rows", default=",".join(STANDARD_ROWS),
                        help="standard rows to count, comma-separated (default: "
                             f"{','.join(STANDARD_ROWS)}); variants are always counted")
    parser.add_argument("--price-plugins", action="store_true",
                        help="also count lucid-full without each of its plugins, and print "
                             "what each costs a request")
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
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in STANDARD_ROWS]
    taken = [label for label, _ in args.variants if label in STANDARD_ROWS]
    if unknown or taken:
        parser.error(f"--rows {', '.join(unknown)}: not a standard row ({', '.join(STANDARD_ROWS)})"
                     if unknown else f"--variant {taken[0]}: the label is a standard row's")
    priced = [f"full-no-{p}" for p in ("auth", *PRICED)] if args.price_plugins else []
    if priced and "lucid-full" not in rows:
        rows.append("lucid-full")  # what the plugins' costs are measured from
    args.row_labels = rows + priced + [label for label, _ in args.variants]
    if not args.row_labels:
        parser.error("nothing to count: --rows is empty and there is no --variant")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except BenchError as exc:
        print(f"bench_instructions: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
