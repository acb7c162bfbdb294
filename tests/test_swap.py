"""Every built-in capability is swappable: with one of the six replaced by a third-party
plugin, the other five keep working end to end; and the packaged examples under
``examples/`` pass their own tests as their authors run them.

The replacements: the router by ``examples/lucid-prefixrouter``, the other five by the
minimal plugins of ``tests/fixtures/swap/lucid_swap.py`` (a static registry, a
first-candidate selector, a breaker that permits everything, a fixed-count limiter, an
exchange counter). An example is "installed" the way ``tests/test_plugins.py`` installs
its fixtures: its sources and a ``*.dist-info`` holding its ``lucid`` entry points (made
from its ``pyproject.toml``) on ``sys.path``, so nothing is pip-installed.
"""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web

from lucid.testing import run_gateway, wait_until
from lucid.testing_internal import lucid_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SWAP = Path(__file__).resolve().parent / "fixtures" / "swap"
SECRET = "s" * 40

# capability -> the plugin that replaces its built-in
REPLACEMENTS = {
    "gateway": "prefixrouter",
    "registry": "staticregistry",
    "loadbalancer": "firstpick",
    "circuitbreaker": "alwayspermit",
    "ratelimiter": "fixedcount",
    "monitoring": "counter",
}


def install_example(name: str, into: Path) -> list[Path]:
    """The folders that make ``examples/<name>`` importable and its entry points found:
    its ``src`` and a ``*.dist-info`` written into ``into`` from its ``pyproject.toml``."""
    project = EXAMPLES / name
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    info = into / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
        for group, points in meta["entry-points"].items()))
    return [project / "src", into]


@pytest.fixture
def replacements(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for folder in [SWAP, *install_example("lucid-prefixrouter", tmp_path / "installed")]:
        monkeypatch.syspath_prepend(str(folder))


def scenario(swapped: str, a: str, b: str, flaky: str) -> str:
    """One config exercising all six capabilities, with ``swapped`` replaced.

    Routes ``api`` (two instances, JWT where the gateway routes), ``limited`` (two
    requests admitted) and ``flaky`` (an upstream answering 503, one attempt)."""
    parts = [f'[plugins]\n{swapped} = "{REPLACEMENTS[swapped]}"\n']
    if swapped == "gateway":
        parts.append("""
[[prefixrouter.routes]]
id = "api"
prefix = "/api"
service = "svc"
[[prefixrouter.routes]]
id = "limited"
prefix = "/limited"
service = "svc"
[[prefixrouter.routes]]
id = "flaky"
prefix = "/flaky"
service = "flaky"
attempts = 1
""")
    else:
        parts.append(f"""
[gateway.auth.issuers.main]
algorithms = ["HS256"]
secret = "{SECRET}"
[[gateway.routes]]
id = "api"
prefix = "/api"
service = "svc"
auth = {{ issuers = ["main"] }}
[[gateway.routes]]
id = "limited"
prefix = "/limited"
service = "svc"
[[gateway.routes]]
id = "flaky"
prefix = "/flaky"
service = "flaky"
retries = {{ attempts = 1 }}
""")
    if swapped == "registry":
        parts.append(f'[staticregistry.services]\nsvc = ["{a}", "{b}"]\nflaky = ["{flaky}"]\n')
    else:
        parts.append(f'[registry.services.svc]\ninstances = ["{a}", "{b}"]\n'
                     f'[registry.services.flaky]\ninstances = ["{flaky}"]\n')
    if swapped == "ratelimiter":
        parts.append('[fixedcount]\nlimit = 2\nroutes = ["limited"]\n')
    else:
        parts.append('[[ratelimiter.limits]]\nid = "two"\nrate = "2/h"\nroutes = ["limited"]\n')
    if swapped != "loadbalancer":
        parts.append('[loadbalancer.pools.svc]\nservice = "svc"\n')
    if swapped != "circuitbreaker":
        parts.append('[circuitbreaker.circuits.flaky]\nservice = "flaky"\n'
                     'consecutive_failures = 2\nwait_duration_in_open_state = "60s"\n')
    return "\n".join(parts)


async def unavailable(request: web.Request) -> web.StreamResponse:
    return web.json_response({"error": "down"}, status=503)


async def call(gw: Any, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with gw.session.request(method, url, **kw) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.parametrize("swapped", list(REPLACEMENTS))
async def test_with_one_builtin_replaced_the_other_five_keep_working(
    swapped: str, replacements: None, lucid_upstream: Any, tmp_path: Path
) -> None:
    a, b = await lucid_upstream(), await lucid_upstream()
    flaky = await lucid_upstream(unavailable)
    async with run_gateway(scenario(swapped, a.url, b.url, flaky.url), tmp_path) as gw:
        enabled = {p.capability: p.name for p in gw.runtime.plugin_set.plugins}
        assert enabled == {**{c: c for c in REPLACEMENTS}, swapped: REPLACEMENTS[swapped]}
        stand_in = gw.runtime.plugin_set.pm.get_plugin(REPLACEMENTS[swapped])
        proxy = gw.proxy_url

        # routing, and JWT where the built-in router remains
        auth = {}
        if swapped != "gateway":
            assert (await call(gw, "GET", proxy + "/api/x"))[0] == 401
            token = jwt.encode({"sub": "u1", "exp": int(time.time()) + 600}, SECRET, "HS256")
            auth = {"Authorization": f"Bearer {token}"}
        routed = [await call(gw, "GET", proxy + "/api/x", headers=auth) for _ in range(4)]
        assert [status for status, _ in routed] == [200] * 4
        assert (await call(gw, "GET", proxy + "/nothing-matches-here"))[0] == 404

        # registry: the service's instances, for requests and for runtime.instances
        assert sorted(i.url for i in gw.runtime.instances("svc")) == sorted([a.url, b.url])

        # balancing: the pool's round robin, or the stand-in's first pick
        ports = [echo["port"] for _, echo in routed]
        if swapped == "loadbalancer":
            assert set(ports) == {a.port} and stand_in.picks == 4
        else:
            assert sorted(ports) == sorted([a.port, b.port] * 2)
            status, lb = await call(gw, "GET", gw.admin_url + "/loadbalancer/status")
            assert status == 200 and [p["picks"] for p in lb["pools"]] == [4]  # its picks

        # limiting: two requests admitted on "limited", whichever plugin counts
        limited = [(await call(gw, "GET", proxy + "/limited"))[0] for _ in range(3)]
        assert limited == [200, 200, 429]

        # breaking: two failures open the circuit; the stand-in permits every call
        answers = [await call(gw, "GET", proxy + "/flaky") for _ in range(3)]
        assert [status for status, _ in answers] == [503] * 3
        if swapped == "circuitbreaker":
            assert len(flaky.requests) == 3 and stand_in.outcomes["error_status"] == 3
        else:
            assert len(flaky.requests) == 2 and answers[2][1]["circuit"] == "flaky"

        # metrics: Prometheus from monitoring, or the stand-in's count
        if swapped == "monitoring":
            await wait_until(lambda: stand_in.exchanges["api"] == len(routed) + bool(auth),
                             message="the counter to see every exchange")
            status, counted = await call(gw, "GET", gw.admin_url + "/counter/exchanges")
            assert status == 200 and counted["limited"] == 3
        else:
            async def counted() -> bool:
                async with gw.session.get(gw.admin_url + "/metrics") as r:
                    return 'route="limited"' in await r.text()
            await wait_until(counted, message="/metrics to count the limited route")

        # the core's operations endpoints and its audit, whatever plugins run
        for path in ("/gateway/health", "/gateway/status", "/gateway/config"):
            assert (await call(gw, "GET", gw.admin_url + path))[0] == 200, path
        status, reloaded = await call(gw, "POST", gw.admin_url + "/gateway/config/reload")
        assert status == 200, reloaded
        status, audit = await call(gw, "GET", gw.admin_url + "/gateway/audit")
        assert status == 200
        assert any(e["path"] == "/gateway/config/reload" for e in audit["entries"]), audit


# --- the packaged examples, run as their authors run them -------------------------------


@pytest.mark.parametrize("example", ["lucid-apikey", "lucid-prefixrouter"])
def test_an_example_passes_its_own_tests(example: str, tmp_path: Path) -> None:
    """The example's tests and Lucid's conformance suite on its ``conformance.toml``
    (the two pytest lines of its README, as one run), in the example's folder, in a
    subprocess, with the example installed on ``PYTHONPATH`` (its own pytest settings).

    Only the two pytest plugins an example needs are loaded (pytest-asyncio and Lucid's
    kit): loading every installed one (schemathesis's, say) doubled the run's time."""
    paths = install_example(example, tmp_path / "installed")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
         "-p", "pytest_asyncio.plugin", "-p", "lucid.testing",
         "--basetemp", str(tmp_path / "pytest"),
         "--pyargs", str(EXAMPLES / example / "tests"), "lucid.conformance",
         "--lucid-conformance=tests/conformance.toml"],
        cwd=EXAMPLES / example, capture_output=True, text=True, timeout=300,
        env=lucid_env(*paths, PYTHONDONTWRITEBYTECODE="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, result.stdout
    passed = [line for line in result.stdout.splitlines() if line.startswith("PASSED ")]
    assert any(line.startswith("PASSED tests/test_") for line in passed), result.stdout
    plugin = example.removeprefix("lucid-")  # the conformance tests' parameter
    assert any(line.endswith(f"[{plugin}]") and " tests/" not in line for line in passed), (
        result.stdout)

