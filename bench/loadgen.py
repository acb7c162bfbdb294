"""Python fallback load generator, used when ``wrk`` is not installed.

It keeps N keep-alive connections busy against one URL for a fixed time and
prints one JSON object with requests, errors, req/s and latency percentiles, and
``failures``: how many of each kind ("status 503", "ServerDisconnectedError: ...",
"TimeoutError"), so a failed run says what failed.
It runs as its own process so its CPU use is not charged to the server being
measured.  Being Python, it is slower than wrk: on a 2-core machine it can
become the bottleneck, so treat its numbers as a lower bound and prefer wrk
(bench/setup.sh installs it).

Every loop is bounded by a deadline and by ``--max-requests``.

Usage: python bench/loadgen.py --url http://127.0.0.1:8080/ -c 50 -d 10 \
           [--header 'Authorization: Bearer ...' ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Stats:
    """Per-run tallies shared by all workers (single-threaded, so no locks)."""

    latencies: list[float] = field(default_factory=list)
    non_2xx: int = 0
    socket_errors: int = 0
    timeouts: int = 0
    requests: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # kind -> count

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors + self.timeouts


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile; exact enough for tens of thousands of samples."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


async def _worker(
    session: aiohttp.ClientSession, url: str, deadline: float, budget: list[int], stats: Stats
) -> None:
    """Issue requests back to back on one connection until time or budget runs out."""
    clock = time.perf_counter
    while clock() < deadline and budget[0] > 0:
        budget[0] -= 1
        started = clock()
        try:
            async with session.get(url) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
        except TimeoutError:
            stats.timeouts += 1
            stats.requests += 1
            stats.failures["TimeoutError: no whole answer within --timeout"] += 1
            continue
        except aiohttp.ClientError as exc:
            stats.socket_errors += 1
            stats.requests += 1
            stats.failures[failure_kind(exc)] += 1
            await asyncio.sleep(0.01)  # don't spin on a refused connection
            continue
        stats.latencies.append(clock() - started)
        stats.requests += 1
        if not ok:
            stats.non_2xx += 1
            stats.failures[f"status {resp.status}"] += 1


def failure_kind(exc: BaseException) -> str:
    """The exception's class and message, without what varies per connection."""
    text = str(exc).split(" [")[0]  # aiohttp appends "[Errno ...]" details
    return f"{type(exc).__name__}: {text}"[:120] if text else type(exc).__name__


async def run(
    url: str,
    connections: int,
    duration: float,
    max_requests: int,
    timeout: float,
    headers: list[tuple[str, str]] | None = None,
) -> dict:
    """Drive the URL and return a summary dict (the JSON this script prints)."""
    connector = aiohttp.TCPConnector(
        limit=connections, limit_per_host=connections, keepalive_timeout=60
    )
    stats = Stats()
    budget = [max_requests]
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        skip_auto_headers=("User-Agent",),
        headers=headers or None,  # sent with every request, as wrk -H does
    ) as session:
        cpu0 = time.process_time()
        started = time.perf_counter()
        deadline = started + duration
        await asyncio.gather(
            *(_worker(session, url, deadline, budget, stats) for _ in range(connections))
        )
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    return summarize(stats, elapsed, cpu, url, connections)


def summarize(stats: Stats, elapsed: float, cpu: float, url: str, connections: int) -> dict:
    latencies = sorted(stats.latencies)
    return {
        "url": url,
        "connections": connections,
        "duration_s": round(elapsed, 3),
        "requests": stats.requests,
        "errors": stats.errors,
        "non_2xx": stats.non_2xx,
        "socket_errors": stats.socket_errors,
        "timeouts": stats.timeouts,
        "failures": dict(stats.failures.most_common()),
        "rps": round(stats.requests / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "max_ms": round((latencies[-1] if latencies else 0.0) * 1000, 3),
        "cpu_s": round(cpu, 3),
    }


def _install_uvloop() -> None:
    """uvloop roughly doubles what one Python client process can push."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("-c", "--connections", type=int, default=50)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--max-requests", type=int, default=10_000_000, help="hard cap on requests")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds")
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="request header sent with every request (like wrk -H); repeatable",
    )
    args = parser.parse_args(argv)
    headers = []
    for spec in args.header:
        name, sep, value = spec.partition(":")
        if not sep or not name.strip():
            parser.error(f"--header {spec!r}: expected 'Name: value'")
        headers.append((name.strip(), value.strip()))
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        sys.exit("loadgen: refusing non-loopback URL")
    _install_uvloop()
    result = asyncio.run(
        run(args.url, args.connections, args.duration, args.max_requests, args.timeout, headers)
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
