"""What TLS costs the proxy: HTTPS termination on each engine, and TLS to the
upstream, each against the same Lucid without it, measured in the same run.

Rows (each a ``lucid serve``, the bench route to an nginx upstream, or bench/upstream.py
without nginx; started before anything is measured, then driven one at a time,
alternating over ``--rounds``):

- ``fast-http``: the fast engine, plain HTTP: the floor of the fast rows;
- ``fast-https``: the same with ``[server.tls]`` (keep-alive clients: the handshake
  is paid once per connection, then it is the cost of encrypting);
- ``fast-tls-upstream``: plain to the client, ``https://`` to the upstream with
  ``[services.bench] tls_ca`` (keep-alive pool; needs nginx);
- ``hypercorn-http`` and ``hypercorn-https``: the same on Hypercorn.

Printed as a table and written to JSON: req/s medians, and the ratios
https/http per engine, tls-upstream/http, and fast-https/hypercorn-https.

    python bench/bench_tls.py [--duration 5] [--rounds 3] [--connections 50]
                              [--json bench/results/tls.json]

Certificates are made for the run (trustme, a test dependency). All traffic stays
on 127.0.0.1; wrk when on PATH (it speaks TLS), else bench/loadgen.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import tomli_w
import trustme
from proxy_bench import (
    HOST,
    BenchError,
    Service,
    drive,
    free_ports,
    start_service,
    upstream_command,
    wait_ready,
)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "results" / "tls.json"

NGINX_TLS = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx-tls.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-tls-body;
    proxy_temp_path {tmp}/nginx-tls-proxy;
    fastcgi_temp_path {tmp}/nginx-tls-fastcgi;
    uwsgi_temp_path {tmp}/nginx-tls-uwsgi;
    scgi_temp_path {tmp}/nginx-tls-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen {host}:{port} ssl backlog=1024;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def tls_ready(service: Service, port: int, timeout: float = 20.0) -> None:
    """Until a TLS handshake and a GET succeed on ``port`` (certificate not checked)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while True:
        if not service.alive():
            raise BenchError(f"{service.name} exited before it was ready", service)
        try:
            with socket.create_connection((HOST, port), timeout=1) as raw, \
                    ctx.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                if tls.recv(12).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{service.name}: no HTTPS answer after {timeout:.0f}s", service)
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    nginx = shutil.which("nginx") is not None
    wrk = shutil.which("wrk") is not None
    drive_args = argparse.Namespace(tool="wrk" if wrk else "python", connections=args.connections,
                                    threads=1, support_cpus=None)
    services: list[Service] = []
    with tempfile.TemporaryDirectory(prefix="lucid-tls-bench-") as name:
        tmp = Path(name)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", HOST)
        cert, key, ca_pem = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_pem))
        try:
            ports = free_ports(2 + 2 * 5)
            up_port, tls_up_port = ports[:2]
            upstream = start_service("upstream", upstream_command(
                "nginx" if nginx else "asyncio", tmp, up_port), tmp)
            services.append(upstream)
            up_url = f"http://{HOST}:{up_port}"
            wait_ready(upstream, [up_url + "/"])
            rows: list[tuple[str, str, bool, bool]] = [  # label, engine, https, tls upstream
                ("fast-http", "fast", False, False),
                ("fast-https", "fast", True, False),
                ("hypercorn-http", "hypercorn", False, False),
                ("hypercorn-https", "hypercorn", True, False),
            ]
            if nginx:
                conf = tmp / "nginx-tls.conf"
                conf.write_text(NGINX_TLS.format(tmp=tmp, host=HOST, port=tls_up_port,
                                                 cert=cert, key=key))
                tls_upstream = start_service("tls-upstream", [
                    "nginx", "-p", str(tmp), "-e", "stderr", "-c", str(conf)], tmp)
                services.append(tls_upstream)
                tls_ready(tls_upstream, tls_up_port)
                rows.insert(2, ("fast-tls-upstream", "fast", False, True))
            targets: dict[str, str] = {}
            for index, (label, engine, https, tls_upstream_row) in enumerate(rows):
                proxy_port, admin_port = ports[2 + 2 * index: 4 + 2 * index]
                workdir = tmp / label
                (workdir / "data").mkdir(parents=True)
                instance = f"https://localhost:{tls_up_port}" if tls_upstream_row else up_url
                config: dict = {
                    "server": {"proxy": f"{HOST}:{proxy_port}", "admin": f"{HOST}:{admin_port}",
                               "data_dir": str(workdir / "data"), "engine": engine},
                    "gateway": {"routes": [{"id": "bench", "prefix": "/", "service": "bench"}],
                                "services": {"bench": {"instances": [instance]}}},
                }
                if https:
                    config["server"]["tls"] = {"cert": str(cert), "key": str(key)}
                if tls_upstream_row:
                    config["services"] = {"bench": {"tls_ca": str(ca_pem)}}
                path = workdir / "cluster.toml"
                path.write_text(tomli_w.dumps(config))
                lucid = start_service(label, [sys.executable, "-m", "lucid", "serve",
                                              "--config", str(path)], tmp)
                services.append(lucid)
                wait_ready(lucid, [f"http://{HOST}:{admin_port}/gateway/health"])
                if https:
                    tls_ready(lucid, proxy_port)
                    targets[label] = f"https://{HOST}:{proxy_port}/"
                else:
                    wait_ready(lucid, [f"http://{HOST}:{proxy_port}/"])
                    targets[label] = f"http://{HOST}:{proxy_port}/"
            runs: dict[str, list[dict]] = {label: [] for label in targets}
            for round_ in range(args.rounds):
                for label, url in targets.items():
                    drive(drive_args, url, 1.0)  # warm-up: connections, handshakes
                    summary = drive(drive_args, url, args.duration)
                    runs[label].append(summary)
                    print(f"round {round_ + 1} {label:18} {summary['rps']:10.0f} req/s "
                          f"errors {summary.get('errors', 0)}", flush=True)
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            if exc.service is not None:
                print(exc.service.log_tail(), file=sys.stderr)
            return 1
        finally:
            for service in reversed(services):
                service.stop()
    rps = {label: statistics.median(r["rps"] for r in rs) for label, rs in runs.items()}

    def ratio(a: str, b: str) -> float | None:
        return round(rps[a] / rps[b], 3) if a in rps and b in rps and rps[b] else None

    ratios = {
        "fast-https / fast-http": ratio("fast-https", "fast-http"),
        "fast-tls-upstream / fast-http": ratio("fast-tls-upstream", "fast-http"),
        "hypercorn-https / hypercorn-http": ratio("hypercorn-https", "hypercorn-http"),
        "fast-https / hypercorn-https": ratio("fast-https", "hypercorn-https"),
    }
    print(f"\n{'row':20} {'req/s (median)':>15}")
    for label, value in rps.items():
        print(f"{label:20} {value:15.0f}")
    print(f"\n{'ratio':36} {'value':>8}")
    for label, value in ratios.items():
        print(f"{label:36} {value if value is not None else 'n/a':>8}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/bench_tls.py", *(argv or sys.argv[1:])]),
        "load_generator": drive_args.tool, "upstream": "nginx" if nginx else "asyncio",
        "connections": args.connections, "duration_s": args.duration, "rounds": args.rounds,
        "rps_median": rps, "ratios": ratios, "runs": runs,
    }, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
