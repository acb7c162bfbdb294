"""Service registry benchmark: resolve cost, registration latency, heartbeat throughput,
and how fast a killed instance stops getting traffic under load.

With 100 services x 100 instances registered:

1. **resolve** (in process): ``RegistryPlugin.lucid_resolve_instances`` and the whole
   hook chain (``runtime.hooks.resolve_instances``) on a real gateway started in this
   process; each call timed alone with ``perf_counter_ns``; p50/p99 are the median over
   ``--repeats`` rounds. Floor: the gateway plugin's static resolver in the same run.
   Goal: p99 < 50 us.
2. **registration** through the admin API of a real ``lucid serve`` subprocess: one
   instance per ``POST /registry/services/{id}/instances`` (each one a committed
   SQLite transaction), sequential. Floor: ``GET /gateway/health`` on the same admin
   API. Goal: p99 < 5 ms.
3. **heartbeats** through the admin API: ``POST /registry/services/{id}/health`` on
   random instances (fixed seed) at ``--concurrency`` in flight for ``--duration`` s,
   and the same through the batch endpoint ``POST /registry/health`` (``--batch``
   heartbeats per request; counted as heartbeats). Floor: ``GET /gateway/health`` at
   the same concurrency. Goal: >= 2,000/s. The gateway process's CPU per request is
   reported too: unlike req/s it hardly depends on what else the machine runs.
4. **ejection under load** (reported, no goal in the issue beyond "within 1 s"): two
   upstream processes behind one registered service, ``--concurrency`` clients
   through the proxy; one upstream is SIGKILLed; measured from the kill to the
   ``instance_health_changed`` seen by an SSE watcher, and the client errors.

Usage: python bench/bench_registry.py [--duration 5] [--concurrency 16]
                                      [--json bench/results/registry.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from lucid.model import Exchange
from lucid.testing import run_gateway, wait_until

ROOT = Path(__file__).resolve().parent
DEFAULT_JSON = ROOT / "results" / "registry.json"
SERVICES = 100
INSTANCES = 100
GOALS = {"resolve_p99_us": 50.0, "register_p99_ms": 5.0, "heartbeats_per_s": 2000.0}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def service_body(s: int, port_base: int = 20000) -> dict[str, Any]:
    return {
        "id": f"svc{s:03d}", "tags": ["bench"], "check": {"ttl": "1h"},
        "instances": [{"id": f"i{i:03d}", "url": f"http://10.{s // 250}.{s % 250}.{i}:8080",
                       "zone": f"z{i % 3}"} for i in range(INSTANCES)],
    }


# 1. resolve in process ----------------------------------------------------------------
async def bench_resolve(iterations: int, repeats: int) -> dict[str, Any]:
    from lucid_registry.config import ServiceRegistration

    static = "\n".join(f'[gateway.services.static{s:03d}]\ninstances = ["http://10.9.{s}.1:80"]'
                       for s in range(SERVICES))
    with tempfile.TemporaryDirectory() as tmp:
        async with run_gateway(static, Path(tmp)) as gw:
            plugin = gw.runtime.plugin_set.pm.get_plugin("registry")
            for s in range(SERVICES):
                await plugin.registry.register_service(
                    ServiceRegistration.model_validate(service_body(s)))
            generation = gw.runtime.generation
            hooks = gw.runtime.hooks
            gateway_resolve = gw.runtime.plugin_set.pm.get_plugin("gateway")\
                .lucid_resolve_instances
            rng = random.Random(7)

            def exchanges(prefix: str) -> list[Exchange]:
                out = []
                for _ in range(iterations):
                    ex = Exchange("", "GET", "/", "", "", "http", "", {}, 0.0, generation)
                    ex.service = f"{prefix}{rng.randrange(SERVICES):03d}"
                    out.append(ex)
                return out

            cases = {
                "registry hook": (plugin.lucid_resolve_instances, exchanges("svc")),
                "hook chain (registry)": (hooks.resolve_instances, exchanges("svc")),
                "floor: static hook": (gateway_resolve, exchanges("static")),
                "hook chain (static)": (hooks.resolve_instances, exchanges("static")),
            }
            for fn, exs in cases.values():
                assert fn(exs[0], generation), "resolve found nothing"
            rounds: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
            clock = time.perf_counter_ns
            for _ in range(repeats):
                for name, (fn, exs) in cases.items():  # interleaved: drift hits all alike
                    samples = []
                    for ex in exs:
                        t0 = clock()
                        fn(ex, generation)
                        samples.append(clock() - t0)
                    rounds[name].append((pct(samples, 0.5) / 1000, pct(samples, 0.99) / 1000))
    result = {}
    for name, values in rounds.items():
        result[name] = {"p50_us": statistics.median(v[0] for v in values),
                        "p99_us": statistics.median(v[1] for v in values),
                        "per_round_p99_us": [round(v[1], 3) for v in values]}
    return result


# subprocess gateway ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    def __init__(self, tmp: Path, extra: str = ""):
        self.proxy, self.admin = free_port(), free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        config = tmp / "cluster.toml"
        config.write_text(f"""
[server]
proxy = "127.0.0.1:{self.proxy}"
admin = "127.0.0.1:{self.admin}"
data_dir = "{tmp / 'data'}"
log_level = "warning"
{extra}
""")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lucid", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "lucid.log", "w"),  # noqa: SIM115
            start_new_session=True)
        self.admin_url = f"http://127.0.0.1:{self.admin}"
        self.proxy_url = f"http://127.0.0.1:{self.proxy}"

    async def ready(self, session: aiohttp.ClientSession) -> None:
        async def up() -> bool:
            try:
                async with session.get(self.admin_url + "/gateway/health") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False
        await wait_until(up, timeout=30, message="lucid to start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def timed_sequential(session: aiohttp.ClientSession, requests: list[tuple[str, str, Any]],
                           expect: int) -> list[float]:
    samples = []
    for method, url, body in requests:
        t0 = time.perf_counter()
        async with session.request(method, url, json=body) as r:
            await r.read()
            assert r.status == expect, (r.status, await r.text())
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (Linux), so a cost per request can be given
    that does not depend on how busy the shared machine is."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def rate(session: aiohttp.ClientSession, make: Any, concurrency: int,
               duration: float, pid: int) -> dict[str, Any]:
    done = errors = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def worker(seed: int) -> None:
        nonlocal done, errors
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            method, url, body = make(rng)
            t0 = time.perf_counter()
            async with session.request(method, url, json=body) as r:
                await r.read()
                if r.status == 200:
                    done += 1
                else:
                    errors += 1
            latencies.append((time.perf_counter() - t0) * 1000)

    started, cpu = time.perf_counter(), cpu_seconds(pid)
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
    return {"per_s": done / elapsed, "errors": errors, "p50_ms": pct(latencies, 0.5),
            "p99_ms": pct(latencies, 0.99), "server_cpu_us": cpu / max(1, done) * 1e6,
            "server_cpu_share": cpu / elapsed}


async def bench_admin(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    gw = Gateway(tmp)
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            await gw.ready(session)
            admin = gw.admin_url
            t0 = time.perf_counter()
            bulk = await timed_sequential(session, [
                ("POST", admin + "/registry/services", service_body(s))
                for s in range(SERVICES)], 201)
            populate_s = time.perf_counter() - t0
            health = [("GET", admin + "/gateway/health", None)] * args.registrations
            register = [("POST", f"{admin}/registry/services/svc{n % SERVICES:03d}/instances",
                         {"id": f"extra{n}", "url": f"http://10.200.{n // 250}.{n % 250}:80"})
                        for n in range(args.registrations)]
            floor_lat: list[float] = []
            reg_lat: list[float] = []
            chunk = max(1, args.registrations // args.repeats)
            for i in range(0, args.registrations, chunk):  # interleaved with the floor
                floor_lat += await timed_sequential(session, health[i:i + chunk], 200)
                reg_lat += await timed_sequential(session, register[i:i + chunk], 201)

            def heartbeat(rng: random.Random) -> tuple[str, str, Any]:
                s, i = rng.randrange(SERVICES), rng.randrange(INSTANCES)
                return ("POST", f"{admin}/registry/services/svc{s:03d}/health",
                        {"instance": f"i{i:03d}"})

            def batch(rng: random.Random) -> tuple[str, str, Any]:
                return ("POST", admin + "/registry/health", {"heartbeats": [
                    {"service": f"svc{rng.randrange(SERVICES):03d}",
                     "instance": f"i{rng.randrange(INSTANCES):03d}"}
                    for _ in range(args.batch)]})

            def ping(rng: random.Random) -> tuple[str, str, Any]:
                return ("GET", admin + "/gateway/health", None)

            hb_rounds, floor_rounds, batch_rounds = [], [], []
            for _ in range(args.rounds):
                floor_rounds.append(await rate(session, ping, args.concurrency, args.duration,
                                               gw.proc.pid))
                hb_rounds.append(await rate(session, heartbeat, args.concurrency,
                                            args.duration, gw.proc.pid))
                batch_rounds.append(await rate(session, batch, args.concurrency,
                                               args.duration, gw.proc.pid))
                for r in batch_rounds[-1:]:
                    r["per_s"] *= args.batch  # heartbeats, not requests
                    r["server_cpu_us"] /= args.batch
    finally:
        gw.stop()
    return {
        "populate": {"services": SERVICES, "instances_each": INSTANCES,
                     "seconds": populate_s, "per_service_p50_ms": pct(bulk, 0.5),
                     "per_service_p99_ms": pct(bulk, 0.99)},
        "register": {"n": len(reg_lat), "p50_ms": pct(reg_lat, 0.5),
                     "p99_ms": pct(reg_lat, 0.99)},
        "floor_health": {"n": len(floor_lat), "p50_ms": pct(floor_lat, 0.5),
                         "p99_ms": pct(floor_lat, 0.99)},
        "heartbeats": {"per_s": statistics.median(r["per_s"] for r in hb_rounds),
                       "server_cpu_us": statistics.median(r["server_cpu_us"] for r in hb_rounds),
                       "rounds": hb_rounds},
        "batched_heartbeats": {
            "batch": args.batch,
            "per_s": statistics.median(r["per_s"] for r in batch_rounds),
            "server_cpu_us": statistics.median(r["server_cpu_us"] for r in batch_rounds),
            "rounds": batch_rounds},
        "floor_pings": {"per_s": statistics.median(r["per_s"] for r in floor_rounds),
                        "server_cpu_us": statistics.median(r["server_cpu_us"]
                                                           for r in floor_rounds),
                        "rounds": floor_rounds},
    }


# 4. ejection under load ---------------------------------------------------------------
def start_upstream(port: int) -> subprocess.Popen[bytes]:
    code = ("import asyncio, sys\nfrom aiohttp import web\n"
            "async def ok(r): return web.Response(text='ok')\n"
            "app = web.Application(); app.router.add_get('/{t:.*}', ok)\n"
            f"web.run_app(app, host='127.0.0.1', port={port}, print=None)\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def bench_ejection(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ports = [free_port(), free_port()]
    ups = [start_upstream(p) for p in ports]
    gw = Gateway(tmp, extra='[[gateway.routes]]\nprefix = "/"\nservice = "web"\n')
    results: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            await gw.ready(session)

            async def serving(port: int) -> bool:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            for p in ports:
                await wait_until(lambda p=p: serving(p), timeout=20, message="upstream")
            async with session.post(gw.admin_url + "/registry/services", json={
                "id": "web", "instances": [{"id": f"u{p}", "url": f"http://127.0.0.1:{p}"}
                                           for p in ports]}) as r:
                assert r.status == 201
            statuses: dict[int, int] = {}
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set():
                    try:
                        async with session.get(gw.proxy_url + "/x") as r:
                            await r.read()
                            statuses[r.status] = statuses.get(r.status, 0) + 1
                    except aiohttp.ClientError:
                        statuses[0] = statuses.get(0, 0) + 1

            killed_at: list[float] = []
            ejected_at: list[float] = []

            async def watch() -> None:
                async with session.get(gw.admin_url + "/registry/services/web/events",
                                       timeout=aiohttp.ClientTimeout(total=None)) as r:
                    async for line in r.content:
                        text = line.decode()
                        if killed_at and text.startswith("data:") and '"critical"' in text:
                            ejected_at.append(time.perf_counter())
                            return

            watcher = asyncio.create_task(watch())
            clients = [asyncio.create_task(client()) for _ in range(args.concurrency)]
            await asyncio.sleep(1.0)  # load established before the kill
            before = sum(statuses.values())
            ups[0].kill()
            killed_at.append(time.perf_counter())
            await asyncio.wait_for(watcher, 10)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*clients)
            results = {"kill_to_ejection_ms": (ejected_at[0] - killed_at[0]) * 1000,
                       "requests_before_kill": before, "statuses": statuses,
                       "client_errors": sum(n for s, n in statuses.items() if s != 200)}
    finally:
        gw.stop()
        for up in ups:
            if up.poll() is None:
                up.kill()
            up.wait()
    return results


# report ---------------------------------------------------------------------------------
def report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"load average {m['loadavg_start'][0]:.2f} at the start, "
          f"{m['loadavg_end'][0]:.2f} at the end ({m['cpus']} CPUs)")
    r = result["resolve"]
    print(f"\nresolve, {SERVICES} services x {INSTANCES} instances (in process)")
    print(f"{'case':<24}{'p50 us':>10}{'p99 us':>10}   per-round p99")
    for name, row in r.items():
        print(f"{name:<24}{row['p50_us']:>10.3f}{row['p99_us']:>10.3f}   "
              f"{row['per_round_p99_us']}")
    a = result["admin"]
    print("\nadmin API (lucid serve subprocess)")
    print(f"{'case':<34}{'n':>7}{'p50 ms':>9}{'p99 ms':>9}{'per s':>10}  [rounds] "
          "server CPU us/request")
    print(f"{'register 1 instance (POST)':<34}{a['register']['n']:>7}"
          f"{a['register']['p50_ms']:>9.2f}{a['register']['p99_ms']:>9.2f}{'':>10}")
    print(f"{'floor: GET /gateway/health':<34}{a['floor_health']['n']:>7}"
          f"{a['floor_health']['p50_ms']:>9.2f}{a['floor_health']['p99_ms']:>9.2f}{'':>10}")
    print(f"{'register 100-instance service':<34}{SERVICES:>7}"
          f"{a['populate']['per_service_p50_ms']:>9.2f}"
          f"{a['populate']['per_service_p99_ms']:>9.2f}{'':>10}")
    for name, key in (("heartbeats (POST .../health)", "heartbeats"),
                      (f"batched x{a['batched_heartbeats']['batch']} (POST /health)",
                       "batched_heartbeats"),
                      ("floor: GET /gateway/health", "floor_pings")):
        rounds = ", ".join(f"{x['per_s']:,.0f}" for x in a[key]["rounds"])
        print(f"{name:<34}{'':>7}{a[key]['rounds'][0]['p50_ms']:>9.2f}"
              f"{a[key]['rounds'][0]['p99_ms']:>9.2f}{a[key]['per_s']:>10,.0f}  [{rounds}] "
              f"{a[key]['server_cpu_us']:.0f}")
    print("  (capacity of one server core ~ 1e6 / CPU us: heartbeats "
          f"{1e6 / a['heartbeats']['server_cpu_us']:,.0f}/s, floor "
          f"{1e6 / a['floor_pings']['server_cpu_us']:,.0f}/s)")
    e = result.get("ejection")
    if e:
        print(f"\nkill -9 of 1 of 2 instances under load: ejected {e['kill_to_ejection_ms']:.0f} "
              f"ms after the kill; client statuses {e['statuses']}")
    g = result["goals"]
    print("\ngoals:")
    for key, row in g.items():
        print(f"  {key:<22} {row['value']:>10.3f}  goal {row['goal']}  "
              f"{'met' if row['met'] else 'NOT met'}  (ratio to floor {row['ratio_to_floor']:.2f})")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": {"python": platform.python_version(),
                                          "cpus": os.cpu_count(),
                                          "loadavg_start": os.getloadavg()},
                              "args": vars(args) | {"json": str(args.json)}}
    result["resolve"] = await bench_resolve(args.iterations, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        result["admin"] = await bench_admin(args, Path(tmp) / "admin")
    if not args.skip_ejection:
        with tempfile.TemporaryDirectory() as tmp:
            result["ejection"] = await bench_ejection(args, Path(tmp) / "eject")
    # Other work on the machine shows in every latency and rate here; the ratios to
    # the floors and the CPU per request are what compare across runs.
    result["machine"]["loadavg_end"] = os.getloadavg()
    r, a = result["resolve"], result["admin"]
    result["goals"] = {
        "resolve_p99_us": {"value": r["registry hook"]["p99_us"], "goal": "< 50",
                           "met": r["registry hook"]["p99_us"] < GOALS["resolve_p99_us"],
                           "ratio_to_floor": r["registry hook"]["p99_us"]
                           / r["floor: static hook"]["p99_us"]},
        "register_p99_ms": {"value": a["register"]["p99_ms"], "goal": "< 5",
                            "met": a["register"]["p99_ms"] < GOALS["register_p99_ms"],
                            "ratio_to_floor": a["register"]["p99_ms"]
                            / a["floor_health"]["p99_ms"]},
        "batched_heartbeats_per_s": {
            "value": a["batched_heartbeats"]["per_s"], "goal": ">= 2000",
            "met": a["batched_heartbeats"]["per_s"] >= GOALS["heartbeats_per_s"],
            "ratio_to_floor": a["batched_heartbeats"]["per_s"] / a["floor_pings"]["per_s"]},
        "heartbeats_per_s": {"value": a["heartbeats"]["per_s"], "goal": ">= 2000",
                             "met": a["heartbeats"]["per_s"] >= GOALS["heartbeats_per_s"],
                             "ratio_to_floor": a["heartbeats"]["per_s"]
                             / a["floor_pings"]["per_s"]},
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20_000, help="resolves per round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--registrations", type=int, default=2_000)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rate round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=50,
                        help="heartbeats per POST /registry/health")
    parser.add_argument("--skip-ejection", action="store_true")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    try:
        import uvloop

        result = uvloop.run(main_async(args))
    except ImportError:
        result = asyncio.run(main_async(args))
    report(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
