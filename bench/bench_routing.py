"""Route-matching micro-benchmark: match() must not slow down as the table grows.

It builds one router from 10 routes and one from the same 10 plus 9,990 more (exact
paths, prefixes, patterns, per-tenant hosts, method filters; many share the request
paths' first segments so the trie nodes the requests walk are wide, not just the
root). The same requests -- hitting each kind, falling through filters, and missing
-- must pick the same route in both, and each one's ns/match is the median of
several timed loops, the two routers interleaved so drift hits both alike.

The exit status is 1 if, for any kind or overall, 10k-route time / 10-route time
exceeds ``--limit`` (2.0): the cost must depend on path depth, not on route count.

Usage: python bench/bench_routing.py [--json bench/results/routing.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from itertools import repeat
from pathlib import Path
from typing import Any

from lucid_gateway.config import Route
from lucid_gateway.router import Router

ROOT = Path(__file__).resolve().parent
DEFAULT_JSON = ROOT / "results" / "routing.json"
KINDS = ("exact", "prefix", "pattern", "fallthrough", "miss")

Request = tuple[str, str, str, dict[str, str]]  # method, host, path, headers


def core_routes() -> list[Route]:
    """The 10 routes every request below is aimed at."""
    return [
        Route(id="health", service="ops", path="/health"),
        Route(id="status", service="api", path="/api/v1/status", methods=["GET"]),
        Route(id="api", service="api", prefix="/api", strip_prefix=True),
        Route(id="users-v1", service="users", prefix="/api/v1/users"),
        Route(id="cdn", service="cdn", prefix="/static", hosts=["cdn.example.com"]),
        Route(id="user", service="users", pattern="/users/{id}"),
        Route(id="order", service="orders", pattern="/users/{id}/orders/{oid}", rewrite="/o/{oid}"),
        Route(id="item", service="shop", pattern="/shops/{shop}/items/{item}", methods=["GET"]),
        Route(id="admin", service="admin", prefix="/admin", headers={"x-admin": "1"}),
        Route(id="login", service="auth", path="/login", methods=["POST"]),
    ]


def filler_routes(count: int) -> list[Route]:
    """A realistic spread of other routes, crowding the nodes the requests pass through."""
    routes: list[Route] = []
    for i in range(count):
        svc = f"svc{i % 97}"
        match i % 10:
            case 0:
                routes.append(Route(service=svc, path=f"/api/v1/r{i}/health"))
            case 1:
                routes.append(Route(service=svc, path=f"/e{i}", methods=["GET", "HEAD"]))
            case 2:
                routes.append(Route(service=svc, prefix=f"/api/v{i % 50 + 3}/svc{i}"))
            case 3:
                routes.append(Route(service=svc, prefix=f"/svc{i}", strip_prefix=True))
            case 4:
                routes.append(Route(service=svc, pattern=f"/users/{{id}}/x{i}"))
            case 5:
                routes.append(Route(service=svc, pattern=f"/p{i}/{{id}}/items/{{item}}"))
            case 6:  # one tenant per host on a shared prefix
                routes.append(Route(service=svc, prefix="/static", hosts=[f"t{i}.example.com"]))
            case 7:
                routes.append(Route(service=svc, prefix=f"/t{i}", hosts=[f"*.t{i}.example.com"]))
            case 8:
                routes.append(Route(service=svc, pattern=f"/shops/{{shop}}/r{i}", methods=["POST"]))
            case _:
                routes.append(Route(service=svc, path=f"/api/v1/users/{i}", rewrite=f"/u/{i}"))
    return routes


def requests() -> dict[str, list[Request]]:
    host = "api.example.com:8443"
    return {
        "exact": [
            ("GET", host, "/health", {}),
            ("GET", host, "/api/v1/status", {}),
        ],
        "prefix": [
            ("GET", host, "/api/v2/things", {}),
            ("GET", host, "/api/v1/users/42/avatar", {}),
            ("GET", "CDN.example.com", "/static/css/site.css", {}),
        ],
        "pattern": [
            ("GET", host, "/users/42", {}),
            ("GET", host, "/users/42/orders/7", {}),
            ("GET", host, "/shops/acme/items/9", {}),
        ],
        "fallthrough": [  # the best candidate's filters fail, a later one answers
            ("POST", host, "/api/v1/status", {}),  # exact -> prefix /api
            ("GET", host, "/login", {}),  # exact (POST only) -> nothing: a miss
        ],
        "miss": [
            ("GET", host, "/nope", {}),
            ("GET", host, "/users", {}),
            ("GET", host, "/admin/panel", {"x-admin": "0"}),
            ("GET", "www.example.com", "/static/logo.png", {}),
        ],
    }


def time_one(router: Router, request: Request, iterations: int) -> float:
    """ns per match() over one tight loop."""
    method, host, path, headers = request
    match = router.match
    start = time.perf_counter_ns()
    for _ in repeat(None, iterations):
        match(method, host, path, headers)
    return (time.perf_counter_ns() - start) / iterations


def run(iterations: int, repeats: int, filler: int) -> dict[str, Any]:
    core = core_routes()
    small = Router(core)
    start = time.perf_counter()
    big = Router(core + filler_routes(filler))
    build_s = time.perf_counter() - start
    routers = {len(small.routes): small, len(big.routes): big}

    groups = requests()
    for kind, reqs in groups.items():
        for req in reqs:
            a, b = (r.match(*req) for r in routers.values())
            picked = [None if m is None else m.route_id for m in (a, b)]
            if picked[0] != picked[1]:
                raise SystemExit(f"{kind} {req}: 10 routes pick {picked[0]}, 10k pick {picked[1]}")

    samples: dict[tuple[int, str, int], list[float]] = {}
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        for _ in range(repeats):
            for kind, reqs in groups.items():
                for n, req in enumerate(reqs):
                    for size, router in routers.items():
                        ns = time_one(router, req, iterations)
                        samples.setdefault((size, kind, n), []).append(ns)
    finally:
        gc.enable()

    per_kind: dict[int, dict[str, float]] = {size: {} for size in routers}
    per_request: list[dict[str, Any]] = []
    for size in routers:
        for kind, reqs in groups.items():
            medians = [statistics.median(samples[(size, kind, n)]) for n in range(len(reqs))]
            per_kind[size][kind] = statistics.fmean(medians)
            for req, ns in zip(reqs, medians, strict=True):
                m = routers[size].match(*req)
                per_request.append(
                    {
                        "routes": size,
                        "kind": kind,
                        "method": req[0],
                        "host": req[1],
                        "path": req[2],
                        "route_id": None if m is None else m.route_id,
                        "ns": round(ns, 1),
                    }
                )
        per_kind[size]["overall"] = statistics.fmean(per_kind[size][kind] for kind in groups)
    small_size, big_size = routers
    ratios = {k: per_kind[big_size][k] / per_kind[small_size][k] for k in per_kind[small_size]}
    return {
        "python": platform.python_version(),
        "iterations": iterations,
        "repeats": repeats,
        "build_seconds_10k": round(build_s, 3),
        "ns_per_match": {
            str(size): {k: round(v, 1) for k, v in kinds.items()}
            for size, kinds in per_kind.items()
        },
        "ratio": {k: round(v, 3) for k, v in ratios.items()},
        "requests": per_request,
    }


def print_table(result: dict[str, Any], limit: float) -> None:
    sizes = list(result["ns_per_match"])
    columns = [*KINDS, "overall"]
    print(f"{'routes':>8} " + " ".join(f"{c:>12}" for c in columns) + "   (ns/match)")
    for size in sizes:
        row = result["ns_per_match"][size]
        print(f"{size:>8} " + " ".join(f"{row[c]:>12.1f}" for c in columns))
    ratio = result["ratio"]
    print(
        f"{'ratio':>8} " + " ".join(f"{ratio[c]:>12.2f}" for c in columns) + f"   (limit {limit})"
    )
    print(f"10k-route router built in {result['build_seconds_10k']:.2f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--iterations", type=int, default=20_000, help="matches per timed loop")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per request")
    parser.add_argument("--limit", type=float, default=2.0, help="largest allowed 10k/10 ratio")
    args = parser.parse_args(argv)

    result = run(args.iterations, args.repeats, filler=10_000 - len(core_routes()))
    result["limit"] = args.limit
    failed = sorted(k for k, v in result["ratio"].items() if v > args.limit)
    result["ok"] = not failed
    print_table(result, args.limit)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    if failed:
        print(f"FAIL: 10k/10 ratio above {args.limit} for {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
