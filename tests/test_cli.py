"""The ``lucid`` command, run for real in subprocesses: init, check, plugins, serve."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import aiohttp
import lucid_gateway
import psutil
import pytest
from aiohttp import web

from lucid import __version__, hookspecs
from lucid.testing import (
    GatewayProcess,
    start_upstream,
    wait_until,
    wait_until_answered,
    write_config,
)
from lucid.testing_internal import builtin_plugins, lucid_env, plugin_rows, run_lucid


def builtin_capabilities() -> dict[str, str]:
    """Lucid's own plugins as ``name -> capability``."""
    return {p.name: p.capability for p in builtin_plugins()}


def admin_secret(path: Path) -> str:
    return str(tomllib.loads(path.read_text())["server"]["admin_secret"])


# --- lucid --version -----------------------------------------------------------------------


def test_version() -> None:
    result = run_lucid("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"lucid, version {__version__}"
    assert __version__ == version("lucid-gateway")


# --- lucid init ----------------------------------------------------------------------------


def test_init_writes_a_private_config_with_a_fresh_secret(tmp_path: Path) -> None:
    first, second = tmp_path / "one" / "deeper", tmp_path / "two"
    for directory in (first, second):
        result = run_lucid("init", str(directory))
        assert result.returncode == 0, result.stderr
        assert f"wrote {directory / 'cluster.toml'}" in result.stdout

    written = first / "cluster.toml"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    secret = admin_secret(written)
    assert "@ADMIN_SECRET@" not in written.read_text()
    assert len(secret) >= 32
    assert secret != admin_secret(second / "cluster.toml")

    check = run_lucid("check", "--config", str(written))
    assert check.returncode == 0, check.stderr
    match = re.fullmatch(rf"{re.escape(str(written))}: ok \(plugins: (.*); routes: 1\)",
                         check.stdout.strip())
    assert match, check.stdout
    # the starter config leaves every built-in on, each providing its own capability
    enabled = [tuple(pair.split("=")) for pair in match.group(1).split(", ")]
    assert sorted(enabled) == sorted(
        (capability, name) for name, capability in builtin_capabilities().items()
    )
    assert ("gateway", "gateway") in enabled


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert run_lucid("init", str(tmp_path)).returncode == 0
    target = tmp_path / "cluster.toml"
    before = target.read_text()

    refused = run_lucid("init", str(tmp_path))
    assert refused.returncode == 1
    assert f"{target} exists; use --force to overwrite it" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert target.read_text() == before

    target.chmod(0o644)
    forced = run_lucid("init", "--force", str(tmp_path))
    assert forced.returncode == 0, forced.stderr
    assert admin_secret(target) != tomllib.loads(before)["server"]["admin_secret"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


# --- lucid plugins -------------------------------------------------------------------------


def test_plugins_lists_the_builtin_gateway() -> None:
    result = run_lucid("plugins")
    assert result.returncode == 0, result.stderr
    rows = plugin_rows(result.stdout)
    packages = {name: row[2] for name, row in rows.items()}
    assert packages == {p.name: p.distribution for p in builtin_plugins()}
    capability, enabled, package, hooks = rows["gateway"]
    assert (capability, enabled, package) == ("gateway", "yes", "lucid-gateway")
    # every hook the gateway module implements, by name, sorted; the gateway grows hooks
    # (auth, CORS, ...), so only its routing hooks are named here
    implemented = sorted(name for name in vars(hookspecs) if name.startswith("lucid_")
                         and callable(getattr(lucid_gateway, name, None)))
    assert hooks.split(", ") == implemented
    assert {
        "lucid_match_route", "lucid_prepare", "lucid_register_admin",
        "lucid_register_config", "lucid_resolve_instances",
    } <= set(implemented)


def test_plugins_shows_what_a_config_enables(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text("[plugins]\ngateway = false\n")
    result = run_lucid("plugins", "--config", str(path))
    assert result.returncode == 0, result.stderr
    rows = plugin_rows(result.stdout)
    assert rows["gateway"][1] == "no"
    assert set(rows) == {p.name for p in builtin_plugins()}  # switched off is still listed
    default = plugin_rows(run_lucid("plugins").stdout)
    assert default["gateway"][1] == "yes"
    # only the capability switched off changed
    assert {n: r[1] for n, r in rows.items() if n != "gateway"} == {
        n: r[1] for n, r in default.items() if n != "gateway"
    }


# --- lucid serve ---------------------------------------------------------------------------


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nworkers = 2\ngrace_period = "10 fortnights"\n')
    result = run_lucid("serve", "--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"invalid config {path}:" in result.stderr
    assert "server.grace_period = '10 fortnights': expected a duration" in result.stderr


def test_serve_refuses_a_missing_config(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    result = run_lucid("serve", "--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"invalid config {path}:\n  file not found" in result.stderr


LISTENING = re.compile(r"proxy listening on (http://\S+) \(worker (\d+), pid (\d+)\)")


async def test_serve_with_two_workers(tmp_path: Path) -> None:
    """Two processes share the proxy port; both answer; SIGTERM stops both with 0."""
    peer_ports: list[int] = []

    async def echo_peer(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peer_ports.append(request.transport.get_extra_info("peername")[1])
        return web.json_response({"path": request.path})

    upstream = await start_upstream(echo_peer)
    config = write_config(f"""
[server]
workers = 2

[gateway.services.echo]
instances = ["{upstream.url}"]

[[gateway.routes]]
prefix = "/"
service = "echo"
""", tmp_path)
    process = GatewayProcess(config, env=lucid_env())
    try:
        await asyncio.to_thread(process.wait_for_line, r"worker 1, pid \d+\)")
        await asyncio.to_thread(process.wait_ready)
        workers = {}
        for line in process.output.splitlines():
            if m := LISTENING.search(line):
                workers[int(m.group(2))] = (m.group(1), int(m.group(3)))
        assert sorted(workers) == [0, 1]
        (url0, pid0), (url1, pid1) = workers[0], workers[1]
        assert url0 == url1 == process.proxy_url  # one port, shared
        assert pid0 == process.proc.pid
        assert pid1 != pid0
        assert psutil.Process(pid1).ppid() == pid0

        # A new connection per request, so the kernel hands them to either worker.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as client:

            async def get(n: int) -> int:
                async with client.get(f"{process.proxy_url}/r/{n}") as response:
                    assert (await response.json())["path"] == f"/r/{n}"
                    return response.status

            await wait_until_answered(lambda: get(0))
            statuses = await asyncio.gather(*(get(n) for n in range(1, 51)))
            assert statuses == [200] * 50

            def upstream_ports(pid: int) -> set[int]:
                """Local ports of ``pid``'s pooled connections to the upstream."""
                return {
                    c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
                    if c.raddr and c.raddr.port == upstream.port
                }

            async def served_by_both() -> bool:
                served = {pid for pid in (pid0, pid1) if upstream_ports(pid) & set(peer_ports)}
                if served == {pid0, pid1}:
                    return True
                await asyncio.gather(*(get(n) for n in range(10)))
                return False

            await wait_until(served_by_both, timeout=10,
                             message="requests to reach the upstream from both workers")

        process.signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert not psutil.pid_exists(pid0)
        assert not psutil.pid_exists(pid1)
        assert "worker 1 stopped" in process.output
        assert "worker 0 stopped" in process.output
        assert "Traceback" not in process.output
    finally:
        process.stop()
        await upstream.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal(sig: int, tmp_path: Path) -> None:
    process = GatewayProcess(write_config("", tmp_path), env=lucid_env())
    try:
        process.wait_ready()
        process.signal(sig)
        assert process.wait(30) == 0
        assert "worker 0 stopped" in process.output
    finally:
        process.stop()


# --- lucid config export, and secrets ------------------------------------------------------

FILE_SECRET = "file-admin-secret-" + "f" * 30
ISSUER_SECRET = "file-issuer-secret-" + "i" * 30
SECRETS_CONFIG = f"""
[server]
admin_secret = "{FILE_SECRET}"

[gateway.auth]
token_cache_size = 500

[gateway.auth.issuers.main]
algorithms = ["HS256"]
secret = "{ISSUER_SECRET}"

[gateway.services.svc]
instances = ["http://127.0.0.1:9"]

[[gateway.routes]]
id = "static"
prefix = "/static"
service = "svc"
auth = {{ issuers = ["main"] }}
"""


def test_config_export_redacts_secrets_unless_asked(tmp_path: Path) -> None:
    """Secrets read "***" as GET /gateway/config shows them, from the file or from the
    environment; --show-secrets prints them, for a backup or a migration."""
    path = write_config(SECRETS_CONFIG, tmp_path)
    env_admin, env_issuer = "env-admin-secret-" + "e" * 30, "env-issuer-secret-" + "v" * 30
    environment = {"LUCID_SERVER__ADMIN_SECRET": env_admin,
                   "LUCID_GATEWAY__AUTH__ISSUERS__MAIN__SECRET": env_issuer}
    for env, (admin, issuer) in (({}, (FILE_SECRET, ISSUER_SECRET)),
                                 (environment, (env_admin, env_issuer))):
        result = run_lucid("config", "export", "--config", str(path), **env)
        assert result.returncode == 0, result.stderr
        exported = tomllib.loads(result.stdout)
        assert exported["server"]["admin_secret"] == "***"
        assert exported["gateway"]["auth"]["issuers"]["main"]["secret"] == "***"
        assert admin not in result.stdout + result.stderr
        assert issuer not in result.stdout + result.stderr
        # a number under a secret-looking key is a count, not a secret
        assert exported["gateway"]["auth"]["token_cache_size"] == 500
        assert [r["id"] for r in exported["gateway"]["routes"]] == ["static"]

        shown = run_lucid("config", "export", "--show-secrets", "--config", str(path), **env)
        assert shown.returncode == 0, shown.stderr
        exported = tomllib.loads(shown.stdout)
        assert exported["server"]["admin_secret"] == admin
        assert exported["gateway"]["auth"]["issuers"]["main"]["secret"] == issuer

    helped = run_lucid("config", "export", "--help")
    assert "--show-secrets" in helped.stdout and "0600" in helped.stdout


def test_config_export_writes_a_private_file(tmp_path: Path) -> None:
    """-o writes 0600 from the start whatever the umask, and a file it replaces becomes
    0600 too (replaced whole: no temporary file is left beside it)."""
    path = write_config(SECRETS_CONFIG, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "exported.toml"

    def export(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lucid", "config", "export", "--config", str(path),
             "-o", str(target), *extra],
            capture_output=True, text=True, timeout=60, env=lucid_env(),
            preexec_fn=lambda: os.umask(0))  # the loosest umask: the mode is Lucid's

    result = export()
    assert result.returncode == 0, result.stderr
    assert f"wrote {target}" in result.stderr and result.stdout == ""
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert tomllib.loads(target.read_text())["server"]["admin_secret"] == "***"

    target.write_text("old")
    target.chmod(0o644)
    result = export("--show-secrets")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert tomllib.loads(target.read_text())["server"]["admin_secret"] == FILE_SECRET
    assert sorted(p.name for p in out.iterdir()) == ["exported.toml"]

    missing = tmp_path / "no-such-folder" / "x.toml"
    result = run_lucid("config", "export", "--config", str(path), "-o", str(missing))
    assert result.returncode == 1
    assert f"lucid: cannot write {missing}" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_errors_do_not_print_secrets(tmp_path: Path) -> None:
    """A config error names the key, the variable that set it and what was expected,
    but never shows a secret's value: not a too-short admin secret from the
    environment, not an issuer table that fails its own check, not a table from the
    environment that is not JSON. lucid serve prints the same lines to its log."""
    short = "short-but-secret"
    path = write_config(SECRETS_CONFIG.replace('algorithms = ["HS256"]',
                                               'algorithms = ["RS256"]'), tmp_path)
    for command in ("check", "serve"):
        result = run_lucid(command, "--config", str(path), LUCID_SERVER__ADMIN_SECRET=short)
        assert result.returncode == 2, result.stderr
        assert ("server.admin_secret = '***': String should have at least 32 characters "
                "(set by environment variable LUCID_SERVER__ADMIN_SECRET)") in result.stderr
        assert "gateway.auth.issuers.main = {" in result.stderr
        assert "'secret': '***'" in result.stderr
        assert "'secret' is given but no HS* algorithm is allowed" in result.stderr
        assert short not in result.stderr and ISSUER_SECRET not in result.stderr
        assert "Traceback" not in result.stderr

    broken = '{"issuers": {"main": {"secret": "' + ISSUER_SECRET + '"'  # not JSON: cut short
    result = run_lucid("check", "--config", str(path), LUCID_GATEWAY__AUTH=broken)
    assert result.returncode == 2
    assert ("gateway.auth = '***': a list or table set from the environment must be JSON"
            in result.stderr)
    assert ISSUER_SECRET not in result.stderr


def test_serve_keeps_its_state_private(tmp_path: Path) -> None:
    """Every plugin's SQLite files (and their -wal and -shm) that a real lucid serve
    creates under data_dir are 0600, and the data_dir it creates is 0700."""
    process = GatewayProcess(write_config(SECRETS_CONFIG, tmp_path), env=lucid_env())
    try:
        process.wait_ready()
        data = tmp_path / "data"
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        files = sorted(p for p in data.rglob("*.db*") if p.is_file())
        # the core's stores (the gateway plugin keeps no file of its own any more)
        assert {p.name for p in files} >= {"audit.db", "audit.db-wal", "audit.db-shm",
                                           "definitions.db"}
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {
            p.name: 0o600 for p in files}
    finally:
        process.stop()
