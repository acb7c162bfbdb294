"""Proxy throughput benchmark: Lucid against the bare-stack "floor".

One command starts a fast upstream, the floor proxy (bench/floor.py) and Lucid,
drives each of them -- and the upstream directly, as a reference -- with the
same load from a separate process, one target at a time, and prints req/s and
latency plus the ratio Lucid/floor.  The goal is Lucid >= 0.90 x floor: the
floor is the same Hypercorn + uvloop + aiohttp stack with nothing on top, so
the ratio isolates what Lucid's own code costs.

    python bench/proxy_bench.py [--duration 10] [--connections 50]
                                [--json bench/results/proxy.json]
                                [--extra-config more.toml] [--label lucid+auth]
                                [--variant LABEL=FILE ...]
                                [--header 'Name: value' ...]

The standard rows (``--no-standard-rows`` drops them) add the fast engine's floor
(bench/floor_fast.py), Lucid on Hypercorn, and Lucid with the full plugin chain on
the bench route, whose req/s is reported against both floors (goals 2.5x the
Hypercorn floor, 0.80x the fast one).

Each ``--variant LABEL=FILE`` adds one more Lucid row, started from the same
generated config plus FILE, measured in the same rounds, and reported as a
ratio to the plain Lucid row and to the floor ("throughput with feature X is
N% of the same run without it").

``--header`` adds a request header to every request of every row; a
``[bench_headers]`` table in an --extra-config or --variant file adds headers to
that file's rows only (e.g. the bearer token an auth variant needs), replacing a
``--header`` of the same name.

Tools: wrk and nginx when on PATH (bench/setup.sh installs them), otherwise
bench/loadgen.py and bench/upstream.py.  All traffic stays on 127.0.0.1.
Exit code: 0 unless a server or the load generator failed to start or run;
the ratio goal and per-run errors are reported, not enforced.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

try:
    import psutil
except ImportError:  # CPU columns are a diagnostic, not a requirement
    psutil = None

try:
    import tomli_w  # a Lucid dependency: present wherever Lucid is installed
except ImportError:
    tomli_w = None  # type: ignore[assignment]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_JSON = BENCH_DIR / "results" / "proxy.json"
HOST = "127.0.0.1"
GOAL_RATIO = 0.90
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


class BenchError(RuntimeError):
    """Something the bench depends on failed to start or run (exit code 1).

    ``service`` names the culprit so its output can be shown with the error.
    """

    def __init__(self, message: str, service: Service | None = None) -> None:
        super().__init__(message)
        self.service = service


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


@dataclass
class Service:
    """A server subprocess we own and must stop, with its output kept on disk.

    Output goes to files rather than pipes so a chatty server can never block
    on a full pipe in the middle of a run.
    """

    name: str
    proc: subprocess.Popen
    log_path: Path
    kind: str = ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, max_chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-max_chars:]
        return ""

    def stop(self) -> None:
        """SIGTERM the whole process group, then SIGKILL it after a timeout.

        Each service runs in its own session, so its group holds exactly the
        processes it spawned (nginx workers, server workers) and nothing else.
        """
        if self.proc.poll() is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT_S)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def _affinity(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn pinning the child (and all it forks) to ``cpus``, if given."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def start_service(
    name: str, cmd: list[str], workdir: Path, kind: str = "", cpus: set[int] | None = None
) -> Service:
    """Launch a server in its own session so we can signal its whole tree."""
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_affinity(cpus),
        )
    except OSError as exc:
        raise BenchError(f"{name}: cannot run {cmd[0]!r}: {exc}") from exc
    finally:
        log.close()  # the child holds its own copy of the descriptor
    return Service(name, proc, log_path, kind)


def free_ports(count: int) -> list[int]:
    """Reserve distinct free loopback ports (held open together so none repeat)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


# urllib honours http_proxy & co.; readiness probes must never leave loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(
    url: str, timeout: float = 1.0, headers: Sequence[tuple[str, str]] = ()
) -> int | None:
    """Status of a GET, or None if the server is not answering yet."""
    try:
        with _OPENER.open(
            urllib.request.Request(url, headers=dict(headers)), timeout=timeout
        ) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def wait_ready(
    service: Service,
    urls: list[str],
    timeout: float = READY_TIMEOUT_S,
    headers: Sequence[tuple[str, str]] = (),
) -> None:
    """Poll each URL until it answers 200, failing fast if the process dies."""
    deadline = time.monotonic() + timeout
    for url in urls:
        status = None
        while status != 200:
            if not service.alive():
                code = service.proc.returncode
                raise BenchError(f"{service.name} exited ({code}) before it was ready", service)
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{service.name} not ready after {timeout:.0f}s: GET {url} -> {status}", service
                )
            status = http_status(url, headers=headers)
            if status != 200:
                time.sleep(0.1)


# --------------------------------------------------------------------------
# The three servers
# --------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-client-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    default_type text/plain;
    server {{
        listen {host}:{port} backlog=1024;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def upstream_command(kind: str, tmp: Path, port: int) -> list[str]:
    """nginx with a throwaway config in tmp, or the asyncio fallback."""
    if kind == "nginx":
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, host=HOST, port=port))
        return ["nginx", "-p", str(tmp), "-e", "stderr", "-c", str(conf)]
    return [sys.executable, str(BENCH_DIR / "upstream.py"), "--listen", f"{HOST}:{port}"]


def floor_command(port: int, upstream_url: str) -> list[str]:
    return [
        sys.executable,
        str(BENCH_DIR / "floor.py"),
        "--listen",
        f"{HOST}:{port}",
        "--upstream",
        upstream_url,
    ]


def floor_fast_command(port: int, upstream_url: str) -> list[str]:
    return [sys.executable, str(BENCH_DIR / "floor_fast.py"), "--listen", f"{HOST}:{port}",
            "--upstream", upstream_url]


# The engine rows (--standard-rows): Lucid on Hypercorn, and Lucid with every plugin on
# the bench route on the default (fast) engine, measured against both floors.
FULL_CHAIN_SECRET = "bench-secret-" + "x" * 40
FULL_CHAIN_GOALS = {"floor": 2.5, "floor-fast": 0.80}  # lucid-full over each floor


def standard_layers() -> dict[str, dict]:
    """label -> config layer of the built-in rows."""
    import jwt  # a Lucid dependency (pyjwt)

    now = int(time.time())
    token = jwt.encode({"iss": "https://bench.test", "aud": "api", "sub": "bench",
                        "iat": now, "exp": now + 30 * 24 * 3600},
                       FULL_CHAIN_SECRET, algorithm="HS256")
    full = {
        "gateway": {"auth": {"issuers": {"bench": {
            "issuer": "https://bench.test", "audiences": ["api"], "algorithms": ["HS256"],
            "secret": FULL_CHAIN_SECRET}}}},
        "ratelimiter": {"limits": [{"id": "bench", "rate": "100000000/s", "key": "ip"}]},
        "loadbalancer": {"pools": {"bench": {"service": "bench",
                                             "algorithm": "least_request"}}},
        "circuitbreaker": {"circuits": {"bench": {"service": "bench"}}},
        "monitoring": {},
        BENCH_ROUTE: {"auth": {}},
        BENCH_HEADERS: {"Authorization": f"Bearer {token}"},
    }
    return {"lucid-hypercorn": {"server": {"engine": "hypercorn"}}, "lucid-full": full}


# The table in an --extra-config or --variant file whose keys go into the bench
# route (the generated config's [[gateway.routes]] entry with id "bench").
BENCH_ROUTE = "bench_route"
# The table in an --extra-config or --variant file holding request headers the load
# generator sends to that file's rows ({"Authorization" = "Bearer ..."}); never
# part of Lucid's config.
BENCH_HEADERS = "bench_headers"
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


class ConfigLayerError(ValueError):
    """An --extra-config or --variant file that cannot be combined with the base."""


def read_layer(path: Path) -> dict:
    """Parse a config layer, checking its shape (a usage error, before anything runs)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigLayerError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigLayerError(f"{path}: not valid TOML: {exc}") from None
    route = data.get(BENCH_ROUTE, {})
    if not isinstance(route, dict):
        raise ConfigLayerError(f"{path}: {BENCH_ROUTE} must be a table, e.g. [{BENCH_ROUTE}]")
    headers = data.get(BENCH_HEADERS, {})
    if not isinstance(headers, dict):
        raise ConfigLayerError(
            f"{path}: {BENCH_HEADERS} must be a table, e.g. "
            f'[{BENCH_HEADERS}] Authorization = "Bearer ..."'
        )
    for name, value in headers.items():
        problem = header_problem(name, value)
        if problem:
            raise ConfigLayerError(f"{path}: {BENCH_HEADERS}.{name}: {problem}")
    return data


def header_problem(name: str, value: object) -> str | None:
    """Why a request header cannot be sent as given, or None."""
    if not _HEADER_NAME.fullmatch(name):
        return f"{name!r} is not a header name"
    if not isinstance(value, str):
        return "the value must be a string"
    if any(c in value for c in "\r\n\0"):
        return "the value must not contain CR, LF or NUL"
    return None


def layer_headers(layer: dict | None) -> list[tuple[str, str]]:
    """The ``[bench_headers]`` of one layer, as (name, value) pairs."""
    return list((layer or {}).get(BENCH_HEADERS, {}).items())


def combine_headers(*groups: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Later groups replace earlier headers of the same name (case-insensitive)."""
    out: dict[str, tuple[str, str]] = {}
    for group in groups:
        for name, value in group:
            out[name.lower()] = (name, value)
    return list(out.values())


def base_config(proxy_port: int, admin_port: int, upstream_url: str, data_dir: Path) -> dict:
    """The cluster.toml contract Lucid's core reads, as a dict."""
    return {
        "server": {
            "proxy": f"{HOST}:{proxy_port}",
            "admin": f"{HOST}:{admin_port}",
            "data_dir": str(data_dir),
        },
        "gateway": {
            "routes": [{"id": "bench", "prefix": "/", "service": "bench"}],
            "services": {"bench": {"instances": [upstream_url]}},
        },
    }


def merge_layer(config: dict, layer: dict, source: str) -> None:
    """Add ``layer`` to ``config`` in place.

    Like appending the file to the generated TOML, new keys and tables are added
    and a key the config already sets is an error -- except that tables merge
    (so ``[gateway.services.other]`` or ``[server]`` with new keys work), arrays
    of tables extend (``[[gateway.routes]]`` adds a route) and a table below an
    array of tables goes into its last entry (``[gateway.routes.plugins.x]``, as
    appended text would).  The layer's ``[bench_route]`` table is merged into the
    bench route, and there a later value replaces an earlier one (tables merge
    key by key).
    """
    layer = copy.deepcopy(layer)  # its tables go into config, which later layers change
    route_extra = layer.pop(BENCH_ROUTE, {})
    layer.pop(BENCH_HEADERS, None)  # for the load generator, not for Lucid
    _merge_strict(config, layer, source, ())
    route = next(r for r in config["gateway"]["routes"] if r.get("id") == "bench")
    _merge_override(route, route_extra)


def _merge_strict(into: dict, new: dict, source: str, at: tuple[str, ...]) -> None:
    for key, value in new.items():
        dotted = ".".join((*at, key))
        old = into.get(key)
        if key not in into:
            into[key] = value
        elif isinstance(old, dict) and isinstance(value, dict):
            _merge_strict(old, value, source, (*at, key))
        elif isinstance(old, list) and _table_array(old) and _table_array(value):
            old.extend(value)
        elif isinstance(old, list) and _table_array(old) and isinstance(value, dict):
            # [gateway.routes.plugins.x] after the generated [[gateway.routes]]: appended
            # TOML would put it in the array's last table, the bench route (or the last
            # route --extra-config added); parsed alone it is a plain table.
            _merge_strict(old[-1], value, source, (*at, f"{key}[{len(old) - 1}]"))
        else:
            hint = f"; per-route settings go in [{BENCH_ROUTE}]" if at[:1] == ("gateway",) else ""
            raise ConfigLayerError(
                f"{source}: {dotted} is already set (to {old!r}) by the generated config "
                f"or --extra-config; a file adds keys, it cannot change them{hint}"
            )


def _table_array(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _merge_override(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(into.get(key), dict) and isinstance(value, dict):
            _merge_override(into[key], value)
        else:
            into[key] = value


def lucid_config(
    proxy_port: int,
    admin_port: int,
    upstream_url: str,
    data_dir: Path,
    layers: list[tuple[str, dict]],
) -> dict:
    """Base config plus each ``(source, layer)`` in order (--extra-config, then a variant)."""
    config = base_config(proxy_port, admin_port, upstream_url, data_dir)
    for source, layer in layers:
        merge_layer(config, layer, source)
    return config


def write_lucid_config(
    workdir: Path,
    proxy_port: int,
    admin_port: int,
    upstream_url: str,
    layers: list[tuple[str, dict]],
) -> Path:
    """Write ``workdir/cluster.toml`` with its own data dir; see :func:`merge_layer`."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = lucid_config(proxy_port, admin_port, upstream_url, data_dir, layers)
    sources = ", ".join(source for source, _ in layers) or "nothing"
    path = workdir / "cluster.toml"
    path.write_text(
        f"# generated by bench/proxy_bench.py: base config + {sources}\n" + tomli_w.dumps(config)
    )
    return path


def lucid_command(
    template: str | None, config: Path, proxy_port: int, admin_port: int, upstream_url: str
) -> list[str]:
    """Default: the real Lucid.  A template (hidden --lucid-cmd) lets the harness
    be tested before Lucid exists, e.g. by pointing the row at a second floor."""
    if template is None:
        return [sys.executable, "-m", "lucid", "serve", "--config", str(config)]
    return shlex.split(
        template.format(
            python=shlex.quote(sys.executable),
            bench=shlex.quote(str(BENCH_DIR)),
            config=shlex.quote(str(config)),
            proxy=f"{HOST}:{proxy_port}",
            admin=f"{HOST}:{admin_port}",
            upstream=upstream_url,
        )
    )


@dataclass
class Target:
    """One row of the table: what to hit, and whose CPU to charge for it."""

    name: str
    url: str
    server: Service
    upstream: Service | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)  # sent with every request


def start_all(args: argparse.Namespace, tmp: Path, services: list[Service]) -> list[Target]:
    """Start upstream, floor, Lucid and each --variant (in that order) and wait for each.

    Everything is started before any measuring so a broken Lucid fails the
    bench in seconds rather than after the reference runs.  Idle servers cost
    nothing measurable while another target is being driven.
    """
    ports = free_ports(5 + 2 * len(args.variants))
    up_port, floor_port = ports[:2]
    up_url = f"http://{HOST}:{up_port}"

    up_cmd = upstream_command(args.upstream_kind, tmp, up_port)
    upstream = _start(services, "upstream", up_cmd, tmp, args.upstream_kind, args.support_cpus)
    headers = list(args.headers)
    wait_ready(upstream, [up_url + "/"], headers=headers)

    floor_cmd = floor_command(floor_port, up_url)
    floor = _start(services, "floor", floor_cmd, tmp, "hypercorn+aiohttp", args.proxy_cpus)
    floor_url = f"http://{HOST}:{floor_port}/"
    wait_ready(floor, [floor_url], headers=headers)

    targets = [
        Target("upstream", up_url + "/", upstream, headers=headers),
        Target("floor", floor_url, floor, upstream, headers=headers),
    ]
    if args.standard_rows:
        fast_port = ports[-1]
        fast = _start(services, "floor-fast", floor_fast_command(fast_port, up_url), tmp,
                      "fast+pool", args.proxy_cpus)
        fast_url = f"http://{HOST}:{fast_port}/"
        wait_ready(fast, [fast_url], headers=headers)
        targets.append(Target("floor-fast", fast_url, fast, upstream, headers=headers))
    base_layers = [(str(args.extra_config), args.extra_layer)] if args.extra_config else []
    base_headers = combine_headers(headers, layer_headers(args.extra_layer))
    rows = [(args.label, base_layers, tmp, base_headers)]
    for i, variant in enumerate(args.variants, 1):
        rows.append(
            (
                variant.label,
                [*base_layers, (str(variant.path), variant.layer)],
                tmp / f"variant-{i}",
                combine_headers(base_headers, layer_headers(variant.layer)),
            )
        )
    for i, (label, layers, workdir, row_headers) in enumerate(rows):
        proxy_port, admin_port = ports[2 + 2 * i : 4 + 2 * i]
        try:
            config = write_lucid_config(workdir, proxy_port, admin_port, up_url, layers)
        except ConfigLayerError as exc:  # checked in parse_args; kept as a safety net
            raise BenchError(str(exc)) from None
        cmd = lucid_command(args.lucid_cmd, config, proxy_port, admin_port, up_url)
        lucid = _start(services, label, cmd, tmp, "lucid", args.proxy_cpus)
        lucid_url = f"http://{HOST}:{proxy_port}/"
        checks = (
            [lucid_url]
            if args.lucid_cmd
            else [
                f"http://{HOST}:{admin_port}/gateway/health",
                lucid_url,
            ]
        )
        wait_ready(lucid, checks, headers=row_headers)
        targets.append(Target(label, lucid_url, lucid, upstream, headers=row_headers))
    return targets


def _start(
    services: list[Service],
    name: str,
    cmd: list[str],
    tmp: Path,
    kind: str,
    cpus: set[int] | None,
) -> Service:
    """Start and register at once, so cleanup covers a service that fails readiness."""
    pinned = f" (cpus {sorted(cpus)})" if cpus else ""
    print(f"starting {name}{pinned}: {shlex.join(cmd)}", flush=True)
    service = start_service(name, cmd, tmp, kind, cpus)
    services.append(service)
    return service


# --------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------

_WRK_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_WRK_TIME = r"([\d.]+)(us|ms|s|m|h)"


def _wrk_ms(number: str, unit: str) -> float:
    return float(number) * _WRK_UNITS_MS[unit]


def parse_wrk(text: str) -> dict:
    """Pull req/s, p50/p99 and error counts out of `wrk --latency` output.

    wrk counts any status >= 400 as "Non-2xx or 3xx"; socket errors are
    connect/read/write/timeout.  All of them count as errors here.
    """
    summary: dict = {"non_2xx": 0, "socket_errors": 0, "timeouts": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        summary["rps"] = float(m.group(1))
    if m := re.search(rf"(\d+) requests in {_WRK_TIME}", text):
        summary["requests"] = int(m.group(1))
        summary["duration_s"] = _wrk_ms(m.group(2), m.group(3)) / 1000
    for pct in ("50", "99"):
        if m := re.search(rf"^\s*{pct}%\s+{_WRK_TIME}\s*$", text, re.MULTILINE):
            summary[f"p{pct}_ms"] = round(_wrk_ms(m.group(1), m.group(2)), 3)
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    ):
        connect, read, write, timeout = map(int, m.groups())
        summary["socket_errors"] = connect + read + write
        summary["timeouts"] = timeout
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        summary["non_2xx"] = int(m.group(1))
    if "rps" not in summary or "p99_ms" not in summary:
        raise BenchError(f"could not parse wrk output:\n{text}")
    summary["errors"] = summary["non_2xx"] + summary["socket_errors"] + summary["timeouts"]
    return summary


def loadgen_command(
    tool: str,
    url: str,
    connections: int,
    duration: float,
    threads: int,
    headers: Sequence[tuple[str, str]] = (),
) -> list[str]:
    if tool == "wrk":
        return [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            *(arg for name, value in headers for arg in ("-H", f"{name}: {value}")),
            url,
        ]
    return [
        sys.executable,
        str(BENCH_DIR / "loadgen.py"),
        "--url",
        url,
        "-c",
        str(connections),
        "-d",
        str(duration),
        *(arg for name, value in headers for arg in ("--header", f"{name}: {value}")),
    ]


def drive(
    args: argparse.Namespace, url: str, duration: float, headers: Sequence[tuple[str, str]] = ()
) -> dict:
    """Run the load generator once, to completion, and return its summary.

    It is a plain child of this process (not a new session), so Ctrl-C reaches
    it too, and subprocess.run kills it on any exception or on the timeout.
    """
    tool = args.tool
    cmd = loadgen_command(tool, url, args.connections, duration, args.threads, headers)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=duration + 60,
            cwd=REPO_ROOT,
            preexec_fn=_affinity(args.support_cpus),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"load generator failed: {exc}") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        secret = {f"{name}: {value}": f"{name}: ..." for name, value in headers}
        shown = shlex.join(secret.get(arg, arg) for arg in cmd)  # no tokens in the report
        raise BenchError(f"{shown} exited {done.returncode}:\n{done.stderr[-2000:]}")
    if tool == "wrk":
        summary = parse_wrk(done.stdout)
        summary["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    else:
        # loadgen.py reports its own CPU for the measured window, which leaves
        # out interpreter start-up and imports.
        summary = json.loads(done.stdout)
    return summary


# --------------------------------------------------------------------------
# CPU accounting (diagnostic: shows who saturates the 2 cores)
# --------------------------------------------------------------------------


def tree_cpu_seconds(service: Service | None) -> float | None:
    """User+system CPU of a service and all its descendants, or None if unknown."""
    if service is None or psutil is None:
        return None
    try:
        root = psutil.Process(service.proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def machine_busy_seconds() -> float | None:
    """Non-idle CPU seconds summed over all cores, for the whole machine."""
    if psutil is None:
        return None
    times = psutil.cpu_times()
    # Not sum(times): guest time is already included in user time.
    return sum(getattr(times, name, 0.0) for name in _BUSY_FIELDS)


_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


def _percent(before: float | None, after: float | None, seconds: float) -> float | None:
    """CPU seconds used over a window, as % of one core (so 2 busy cores = 200)."""
    if before is None or after is None or seconds <= 0:
        return None
    return round(100.0 * (after - before) / seconds, 1)


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


@dataclass
class Run:
    """One measured load run against one target."""

    round: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int
    errors: int
    error_detail: dict
    duration_s: float
    cpu_percent: dict
    # CPU seconds of the proxy's process tree per request, in microseconds: steadier
    # than req/s on a shared machine, because a busy neighbour slows the run but
    # hardly changes what one request costs
    cpu_us_per_request: float | None = None


@dataclass
class Summary:
    """All runs of one target.  The table shows medians so that one noisy run
    (on this shared 2-core VM the same server varies 10-20% run to run) does
    not decide the ratio."""

    target: Target
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float | None:
        values = [getattr(run, attr) for run in self.runs if getattr(run, attr) is not None]
        return statistics.median(values) if values else None

    @property
    def rps(self) -> float:
        return self.median("rps") or 0.0

    @property
    def errors(self) -> int:
        return sum(run.errors for run in self.runs)

    @property
    def flagged(self) -> bool:
        return self.errors > 0

    @property
    def spread_percent(self) -> float | None:
        """(max - min) / median of req/s across rounds: how much to trust the median."""
        if len(self.runs) < 2 or not self.rps:
            return None
        values = [run.rps for run in self.runs]
        return round(100.0 * (max(values) - min(values)) / self.rps, 1)

    def cpu(self, key: str) -> float | None:
        values = [run.cpu_percent[key] for run in self.runs if run.cpu_percent.get(key) is not None]
        return statistics.median(values) if values else None

    def to_json(self) -> dict:
        return {
            "target": self.target.name,
            "url": self.target.url,
            "server_kind": self.target.server.kind,
            "request_headers": [name for name, _ in self.target.headers],  # values may be secrets
            "rps": self.rps,
            "p50_ms": self.median("p50_ms"),
            "p99_ms": self.median("p99_ms"),
            "errors": self.errors,
            "flagged": self.flagged,
            "rps_spread_percent": self.spread_percent,
            "cpu_percent": {key: self.cpu(key) for key in CPU_KEYS},
            "cpu_us_per_request": self.median("cpu_us_per_request"),
            "runs": [asdict(run) for run in self.runs],
        }


CPU_KEYS = ("target", "upstream", "loadgen", "other")
NOISY_OTHER_PERCENT = 25.0


def measure(
    target: Target, args: argparse.Namespace, round_no: int, services: list[Service]
) -> Run:
    """Warm up (discarded), then run the measured load with CPU accounting.

    The warm-up runs before every measured run, because each load-generator
    run opens fresh connections and the previous target may have left the
    machine in a different state (caches, CPU frequency).
    """
    tag = f"  [{round_no}/{args.rounds}] {target.name}"
    if args.warmup > 0:
        print(f"{tag}: warm-up {args.warmup:g}s", flush=True)
        drive(args, target.url, args.warmup, target.headers)
    print(f"{tag}: measuring {args.duration:g}s", flush=True)
    before = _cpu_sample(target, services)
    result = drive(args, target.url, args.duration, target.headers)
    after = _cpu_sample(target, services)
    if not target.server.alive():
        raise BenchError(f"{target.name} died during the run", target.server)
    seconds = result.get("duration_s") or args.duration
    requests = result.get("requests", 0)
    spent = _delta(before, after, "target")
    return Run(
        round=round_no,
        rps=result["rps"],
        p50_ms=result.get("p50_ms"),
        p99_ms=result.get("p99_ms"),
        requests=result.get("requests", 0),
        errors=result["errors"],
        error_detail={k: result.get(k, 0) for k in ("non_2xx", "socket_errors", "timeouts")},
        duration_s=seconds,
        cpu_percent=_cpu_percent(before, after, result.get("cpu_s"), seconds),
        cpu_us_per_request=round(spent / requests * 1e6, 1) if spent and requests else None,
    )


def _cpu_percent(before: dict, after: dict, loadgen_s: float | None, seconds: float) -> dict:
    """Per-component CPU as % of one core, plus 'other': processes not in the bench.

    target/upstream/loadgen are divided by the load's duration (they only work
    while it runs).  'other' is the machine's busy time minus every bench
    server (idle ones included) and the load generator over the whole sampling
    window, so it shows neighbours -- on a shared machine, someone else's test
    run -- rather than our own processes.
    """
    window = after["wall"] - before["wall"]
    cpu = {
        "target": _percent(before["target"], after["target"], seconds),
        "upstream": _percent(before["upstream"], after["upstream"], seconds),
        "loadgen": _percent(0.0, loadgen_s, seconds),
        "machine": _percent(before["machine"], after["machine"], window),
        "other": None,
    }
    machine_s = _delta(before, after, "machine")
    servers_s = _delta(before, after, "bench_servers")
    if machine_s is not None and servers_s is not None and loadgen_s is not None:
        cpu["other"] = _percent(0.0, max(0.0, machine_s - servers_s - loadgen_s), window)
    return cpu


def _delta(before: dict, after: dict, key: str) -> float | None:
    if before[key] is None or after[key] is None:
        return None
    return after[key] - before[key]


def _cpu_sample(target: Target, services: list[Service]) -> dict[str, float | None]:
    per_service = [tree_cpu_seconds(service) for service in services]
    known = [value for value in per_service if value is not None]
    return {
        "wall": time.monotonic(),
        "target": tree_cpu_seconds(target.server),
        "upstream": tree_cpu_seconds(target.upstream),
        "bench_servers": sum(known) if len(known) == len(per_service) else None,
        "machine": machine_busy_seconds(),
    }


def measure_all(
    targets: list[Target], args: argparse.Namespace, services: list[Service]
) -> list[Summary]:
    """Drive every target, strictly one at a time.

    The upstream reference is measured once.  The proxies (floor, lucid and
    each variant) are measured in ``--rounds`` rounds whose order alternates
    (floor, lucid, v1 / v1, lucid, floor / ...) so slow drift of the machine
    hits every row alike.
    """
    reference, *proxies = targets
    summaries = {target.name: Summary(target) for target in targets}
    summaries[reference.name].runs.append(measure(reference, args, 1, services))
    for round_no in range(1, args.rounds + 1):
        order = proxies if round_no % 2 else proxies[::-1]
        for target in order:
            summaries[target.name].runs.append(measure(target, args, round_no, services))
    return list(summaries.values())


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

_COLUMNS = "{:<16} {:>10} {:>7} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>9} {:>8}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(summaries: list[Summary]) -> str:
    """Medians over rounds.  cpu columns: % of one core; 'other' is CPU used by
    processes that are not part of the bench (a busy neighbour skews a run)."""
    header = "target req/s spread p50ms p99ms errors us/req cpu:tgt up load other".split()
    lines = [_COLUMNS.format(*header)]
    for s in summaries:
        spread = s.spread_percent
        lines.append(
            _COLUMNS.format(
                s.target.name[:16],
                _fmt(s.rps, ",.0f"),
                "-" if spread is None else f"{spread:.0f}%",
                _fmt(s.median("p50_ms"), ".2f"),
                _fmt(s.median("p99_ms"), ".2f"),
                f"{s.errors}{' !' if s.flagged else ''}",
                _fmt(s.median("cpu_us_per_request"), ".0f"),
                *(_fmt(s.cpu(key), ".0f") for key in CPU_KEYS),
            )
        )
    return "\n".join(lines)


def _cpu_ratio(top: Summary | None, bottom: Summary | None) -> float | None:
    """bottom's CPU per request over top's: the req/s ratio the CPU cost alone predicts."""
    if not top or not bottom:
        return None
    mine, theirs = top.median("cpu_us_per_request"), bottom.median("cpu_us_per_request")
    return round(theirs / mine, 3) if mine and theirs else None


def _ratio(top: Summary | None, bottom: Summary | None) -> tuple[float | None, list[float]]:
    """top/bottom on median req/s, and per round (both were measured in the same rounds)."""
    if not top or not bottom:
        return None, []
    value = round(top.rps / bottom.rps, 3) if bottom.rps else None
    pairs = zip(bottom.runs, top.runs, strict=True)
    return value, [round(t.rps / b.rps, 3) for b, t in pairs if b.rps]


def ratio_summary(summaries: list[Summary], label: str) -> dict:
    """Lucid/floor on median req/s, plus the per-round ratios as a noise gauge."""
    by_name = {s.target.name: s for s in summaries}
    value, per_round = _ratio(by_name.get(label), by_name.get("floor"))
    return {
        "name": f"{label}/floor",
        "value": value,
        "per_round": per_round,
        "cpu_value": _cpu_ratio(by_name.get(label), by_name.get("floor")),
        "goal": GOAL_RATIO,
        "met": value is not None and value >= GOAL_RATIO,
    }


def variant_ratios(summaries: list[Summary], args: argparse.Namespace) -> list[dict]:
    """For each --variant: its req/s as a ratio to the plain Lucid row and to the floor."""
    by_name = {s.target.name: s for s in summaries}
    out = []
    for variant in args.variants:
        row = by_name.get(variant.label)
        vs_lucid, vs_lucid_rounds = _ratio(row, by_name.get(args.label))
        vs_floor, vs_floor_rounds = _ratio(row, by_name.get("floor"))
        out.append(
            {
                "label": variant.label,
                "file": str(variant.path),
                # what FILE added (the temp config is removed); header values left out
                "settings": {k: v for k, v in variant.layer.items() if k != BENCH_HEADERS},
                "vs_lucid": {
                    "name": f"{variant.label}/{args.label}",
                    "value": vs_lucid,
                    "per_round": vs_lucid_rounds,
                    "cpu_value": _cpu_ratio(row, by_name.get(args.label)),
                },
                "vs_floor": {
                    "name": f"{variant.label}/floor",
                    "value": vs_floor,
                    "per_round": vs_floor_rounds,
                    "cpu_value": _cpu_ratio(row, by_name.get("floor")),
                },
            }
        )
    return out


def engine_goals(summaries: list[Summary]) -> list[dict]:
    """lucid-full (every plugin on the route, fast engine) over each floor, and the
    Lucid rows on the two engines against each other."""
    by_name = {s.target.name: s for s in summaries}
    out = []
    pairs = [("lucid-full", floor, goal) for floor, goal in FULL_CHAIN_GOALS.items()]
    pairs += [("lucid", "lucid-hypercorn", None), ("floor-fast", "floor", None)]
    for top, bottom, goal in pairs:
        if top not in by_name or bottom not in by_name:
            continue
        value, per_round = _ratio(by_name[top], by_name[bottom])
        out.append({"name": f"{top}/{bottom}", "value": value, "per_round": per_round,
                    "cpu_value": _cpu_ratio(by_name[top], by_name[bottom]), "goal": goal,
                    "met": None if goal is None else value is not None and value >= goal})
    return out


def print_report(summaries: list[Summary], ratio: dict, variants: Sequence[dict] = (),
                 goals: Sequence[dict] = ()) -> None:
    print()
    print(format_table(summaries))
    for s in summaries:
        busy = [
            run.round for run in s.runs if (run.cpu_percent.get("other") or 0) > NOISY_OTHER_PERCENT
        ]
        if busy:
            print(f"NOTE: {s.target.name}: other processes were busy during round(s) {busy}")
        if s.flagged:
            details = [run.error_detail for run in s.runs if run.errors]
            print(f"WARNING: {s.target.name}: {s.errors} errors {details}; its numbers are suspect")
    if ratio["value"] is None:
        print(f"ratio {ratio['name']}: n/a")
    else:
        verdict = "met" if ratio["met"] else "NOT met"
        print(
            f"ratio {ratio['name']} (req/s): {ratio['value']:.3f} -- goal {GOAL_RATIO:.2f} "
            f"{verdict}"
        )
        if len(ratio["per_round"]) > 1:
            print("per round: " + ", ".join(f"{r:.2f}" for r in ratio["per_round"]))
        if ratio.get("cpu_value") is not None:
            print(f"ratio {ratio['name']} (CPU per request, floor's/Lucid's): "
                  f"{ratio['cpu_value']:.3f}")
    for variant in variants:
        for key in ("vs_lucid", "vs_floor"):
            r = variant[key]
            if r["value"] is None:
                print(f"ratio {r['name']}: n/a")
                continue
            rounds = ""
            if len(r["per_round"]) > 1:
                rounds = "; per round: " + ", ".join(f"{x:.2f}" for x in r["per_round"])
            cpu = "" if r.get("cpu_value") is None else f"; CPU per request: {r['cpu_value']:.3f}"
            print(f"ratio {r['name']} (req/s): {r['value']:.3f} ({100 * r['value']:.1f}%)"
                  f"{rounds}{cpu}")
    for r in goals:
        if r["value"] is None:
            print(f"ratio {r['name']}: n/a")
            continue
        verdict = "" if r["goal"] is None else (
            f" -- goal {r['goal']:.2f} {'met' if r['met'] else 'NOT met'}")
        cpu = "" if r.get("cpu_value") is None else f"; CPU per request: {r['cpu_value']:.3f}"
        rounds = ""
        if len(r["per_round"]) > 1:
            rounds = "; per round: " + ", ".join(f"{x:.2f}" for x in r["per_round"])
        print(f"ratio {r['name']} (req/s): {r['value']:.3f}{verdict}{rounds}{cpu}")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def build_payload(
    args: argparse.Namespace, summaries: list[Summary], ratio: dict, variants: Sequence[dict] = ()
) -> dict:
    """Everything needed to compare two runs later, not just the numbers."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "tool": {
            "loadgen": "wrk" if args.tool == "wrk" else "python",
            "upstream": args.upstream_kind,
        },
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "connections": args.connections,
        "wrk_threads": args.threads if args.tool == "wrk" else None,
        "pinned": args.pin,
        "label": args.label,
        "extra_config": str(args.extra_config) if args.extra_config else None,
        "request_headers": [name for name, _ in args.headers],
        "lucid_cmd_override": args.lucid_cmd,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
        "versions": {
            name: _version(name) for name in ("hypercorn", "aiohttp", "uvloop", "lucid-gateway")
        },
        "results": [s.to_json() for s in summaries],
        "ratio": ratio,
        "variants": list(variants),
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per target (default 10)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="discarded warm-up seconds before each run (default 2)",
    )
    parser.add_argument(
        "--connections", type=int, default=50, help="concurrent keep-alive connections (default 50)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure floor, Lucid and the variants this many times, alternating, and report "
        "medians "
        "(default 1; use 5 when judging the 0.90 goal: runs vary 10-20%% on a shared VM)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give the proxy under test CPU 0 to itself; load generator and upstream share "
        "the other CPUs",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="wrk threads (default 1: leave the cores to the servers)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help=f"results file (default {DEFAULT_JSON.relative_to(REPO_ROOT)})",
    )
    parser.add_argument("--label", default="lucid", help="name of the Lucid row, e.g. 'lucid+auth'")
    parser.add_argument(
        "--extra-config",
        type=Path,
        help="TOML file added to the generated cluster.toml (for the Lucid row and every "
        f"variant); its [{BENCH_ROUTE}] table is merged into the bench route",
    )
    parser.add_argument(
        "--variant",
        dest="variant_specs",
        action="append",
        default=[],
        metavar="LABEL=FILE",
        help="one more Lucid row named LABEL: the same config plus FILE (TOML, added like "
        "--extra-config), measured in the same rounds and reported as a ratio to the Lucid "
        "row and to the floor; repeatable",
    )
    parser.add_argument(
        "--standard-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure floor-fast (bench/floor_fast.py), lucid-hypercorn (Lucid on "
        "[server] engine = 'hypercorn') and lucid-full (JWT auth, rate limit, pool, breaker "
        "and metrics on the bench route), and report lucid-full against both floors "
        "(default on)",
    )
    parser.add_argument(
        "--header",
        dest="header_specs",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="request header sent to every row (wrk -H); repeatable.  Per row: a "
        f"[{BENCH_HEADERS}] table in an --extra-config or --variant file",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (auto: wrk if on PATH)",
    )
    parser.add_argument(
        "--upstream",
        dest="upstream_kind",
        choices=("auto", "nginx", "asyncio"),
        default="auto",
        help="upstream server (auto: nginx if on PATH)",
    )
    # Hidden: test the harness before Lucid's core exists.  A template with
    # {python} {bench} {config} {proxy} {admin} {upstream}; the admin health
    # check is skipped when it is set.  E.g.
    #   --lucid-cmd '{python} {bench}/floor.py --listen {proxy} --upstream {upstream}'
    parser.add_argument("--lucid-cmd", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.duration, args.connections, args.threads, args.rounds) <= 0 or args.warmup < 0:
        parser.error("--duration, --connections, --threads, --rounds must be positive")
    if args.label in ("upstream", "floor"):
        parser.error("--label must differ from the 'upstream' and 'floor' rows")
    if args.threads > args.connections:
        parser.error("--threads must not exceed --connections (wrk requirement)")
    if args.extra_config is not None and not args.extra_config.is_file():
        parser.error(f"--extra-config {args.extra_config}: no such file")
    args.variants = _parse_variants(parser, args)
    if args.standard_rows:
        args.variants += _standard_variants(parser, args)
    args.headers = _parse_headers(parser, args.header_specs)
    args.extra_layer = None
    if args.extra_config is not None or args.variants:
        if tomli_w is None:
            parser.error("--extra-config and --variant need tomli_w (pip install tomli-w)")
        # Build every config once now, so a bad file is a usage error, not a failed run.
        try:
            base: list[tuple[str, dict]] = []
            if args.extra_config is not None:
                args.extra_layer = read_layer(args.extra_config)
                base = [(str(args.extra_config), args.extra_layer)]
            lucid_config(0, 0, "http://x", Path("data"), base)
            for variant in args.variants:
                variant.layer = read_layer(variant.path)
                lucid_config(
                    0, 0, "http://x", Path("data"), [*base, (str(variant.path), variant.layer)]
                )
        except ConfigLayerError as exc:
            parser.error(str(exc))
    elif tomli_w is None:
        parser.error("tomli_w is needed to write Lucid's config (pip install tomli-w)")
    args.tool = _resolve(args.loadgen, "wrk", "wrk", "python")
    args.upstream_kind = _resolve(args.upstream_kind, "nginx", "nginx", "asyncio")
    args.proxy_cpus, args.support_cpus = _cpu_split(args.pin)
    return args


@dataclass
class Variant:
    """One --variant LABEL=FILE: a Lucid row with FILE added to the config."""

    label: str
    path: Path
    layer: dict = field(default_factory=dict)


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _parse_variants(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Variant]:
    variants: list[Variant] = []
    taken = {"upstream", "floor", args.label}
    for spec in args.variant_specs:
        label, sep, file = spec.partition("=")
        if not sep or not label or not file:
            parser.error(f"--variant {spec!r}: expected LABEL=FILE")
        if not _LABEL.fullmatch(label):
            parser.error(f"--variant {spec!r}: LABEL may hold letters, digits and _ . + -")
        if label in taken:
            parser.error(f"--variant {spec!r}: the label {label!r} is already used by another row")
        path = Path(file)
        if not path.is_file():
            parser.error(f"--variant {spec!r}: {file}: no such file")
        taken.add(label)
        variants.append(Variant(label, path))
    return variants


def _standard_variants(parser: argparse.ArgumentParser, args: argparse.Namespace
                       ) -> list[Variant]:
    """The built-in rows as variants, their files in a directory removed at exit."""
    import atexit

    taken = {"upstream", "floor", "floor-fast", args.label, *(v.label for v in args.variants)}
    directory = Path(tempfile.mkdtemp(prefix="lucid-bench-rows-"))
    atexit.register(shutil.rmtree, directory, True)
    variants = []
    for label, layer in standard_layers().items():
        if label in taken:
            parser.error(f"--standard-rows: the label {label!r} is already used by another row")
        path = directory / f"{label}.toml"
        path.write_text(tomli_w.dumps(layer))
        variants.append(Variant(label, path))
    return variants


def _parse_headers(parser: argparse.ArgumentParser, specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        name, sep, value = spec.partition(":")
        problem = header_problem(name.strip(), value.strip()) if sep else "expected 'Name: value'"
        if problem:
            parser.error(f"--header {spec!r}: {problem}")
        pairs.append((name.strip(), value.strip()))
    return combine_headers(pairs)


def _cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(proxy cpus, load generator + upstream cpus) for --pin, else no pinning.

    The proxies are single-process Python servers that saturate one core;
    pinning keeps wrk and the upstream off that core, so a run measures the
    proxy rather than where the scheduler happened to put things.
    """
    if not pin:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("--pin ignored: fewer than 2 CPUs available", file=sys.stderr)
        return None, None
    return {cpus[0]}, set(cpus[1:])


def _resolve(choice: str, binary: str, native: str, fallback: str) -> str:
    """'auto' picks the native tool when installed; an explicit choice must exist."""
    if choice == "auto":
        return native if shutil.which(binary) else fallback
    if choice == native and not shutil.which(binary):
        sys.exit(f"{binary} not found on PATH (run bench/setup.sh)")
    return choice


def _sigterm_to_exit(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit so the finally-block cleanup still runs."""
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    """Start, measure, report; always stop what was started.

    The temp dir (configs, server logs) is removed on success and kept on
    failure, so a server that would not start can be investigated.
    """
    services: list[Service] = []
    tmp = Path(tempfile.mkdtemp(prefix="lucid-bench-"))
    keep_tmp = False
    try:
        print(
            f"load: {args.tool}, upstream: {args.upstream_kind}, {args.connections} connections, "
            f"{args.duration:g}s (+{args.warmup:g}s warm-up) per run, {args.rounds} round(s)"
            f"{', pinned' if args.proxy_cpus else ''}"
        )
        targets = start_all(args, tmp, services)
        summaries = measure_all(targets, args, services)
        ratio = ratio_summary(summaries, args.label)
        variants = variant_ratios(summaries, args)
        goals = engine_goals(summaries)
        print_report(summaries, ratio, variants, goals)
        payload = build_payload(args, summaries, ratio, variants)
        payload["engine_goals"] = goals
        write_json(args.json, payload)
        return 0
    except BenchError as exc:
        keep_tmp = True
        print(f"\nERROR: {exc}", file=sys.stderr)
        for service in services:
            if service is exc.service or not service.alive():
                print(
                    f"---- {service.name} output ({service.log_path}) ----\n{service.log_tail()}",
                    file=sys.stderr,
                )
        print(f"configs and logs kept in {tmp}", file=sys.stderr)
        return 1
    finally:
        for service in reversed(services):
            service.stop()
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
