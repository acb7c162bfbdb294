"""Where a proxied request's time goes inside Lucid: one row under cProfile.

bench_instructions.py says how much a request costs; this says where, by Python
function. It starts the bench upstream (nginx, else bench/upstream.py), then Lucid
for one row (``lucid``, ``lucid-full`` or a ``--variant`` file, as proxy_bench
builds them) under ``python -m cProfile``, drives ``--requests`` requests through it
with bench/loadgen.py, stops it (SIGTERM: a graceful drain, so the profile is
written) and prints the functions with the most time of their own, per request.

cProfile adds a fixed cost to every Python call, so functions that make many small
calls look dearer than they are: read the table for where to look, and measure a
change with bench_instructions.py.

    python bench/profile_proxy.py                      # lucid-full, 20000 requests
    python bench/profile_proxy.py --row lucid --top 60
    python bench/profile_proxy.py --variant my.toml --keep /tmp/lucid.prof
"""

from __future__ import annotations

import argparse
import pstats
import shutil
import sys
import tempfile
from pathlib import Path

from bench_instructions import _drive
from proxy_bench import (
    HOST,
    free_ports,
    layer_headers,
    read_layer,
    standard_layers,
    start_service,
    upstream_command,
    wait_ready,
    write_lucid_config,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", default="lucid-full", choices=("lucid", "lucid-full"))
    parser.add_argument("--variant", type=Path, metavar="FILE",
                        help="a config layer (as proxy_bench's --extra-config) instead")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--keep", type=Path, metavar="FILE", help="keep the pstats file")
    args = parser.parse_args(argv)

    layer = read_layer(args.variant) if args.variant else standard_layers().get(args.row)
    layers = [(str(args.variant or args.row), layer)] if layer else []
    headers = layer_headers(layer)
    with tempfile.TemporaryDirectory(prefix="lucid-profile-") as name:
        tmp = Path(name)
        up_port, proxy_port, admin_port = free_ports(3)
        up_url = f"http://{HOST}:{up_port}"
        kind = "nginx" if shutil.which("nginx") else "asyncio"
        upstream = start_service("upstream", upstream_command(kind, tmp, up_port), tmp)
        out = tmp / "lucid.prof"
        try:
            wait_ready(upstream, [up_url + "/"])
            config = write_lucid_config(tmp / "row", proxy_port, admin_port, up_url, layers)
            lucid = start_service("lucid", [sys.executable, "-m", "cProfile", "-o", str(out),
                                            "-m", "lucid", "serve", "--config", str(config)],
                                  tmp)
            url = f"http://{HOST}:{proxy_port}/"
            try:
                wait_ready(lucid, [f"http://{HOST}:{admin_port}/gateway/health", url],
                           headers=headers)
                _drive(url, args.requests, args.connections, headers, lucid)
            finally:
                lucid.stop()
        finally:
            upstream.stop()
        if not out.exists():
            print(f"profile_proxy: Lucid wrote no profile\n{lucid.log_tail(2000)}",
                  file=sys.stderr)
            return 1
        if args.keep is not None:
            shutil.copy(out, args.keep)
        stats = pstats.Stats(str(out))
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in stats.stats.values())  # type: ignore[attr-defined]
    print(f"{'µs/req own':>10} {'share':>6} {'calls/req':>9}  function")
    for (path, line, func), (_, calls, tt, _, _) in rows[:args.top]:
        where = f"{Path(path).name}:{line}" if line else path
        print(f"{tt / args.requests * 1e6:10.2f} {tt / total:6.1%} {calls / args.requests:9.2f}"
              f"  {func} ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
