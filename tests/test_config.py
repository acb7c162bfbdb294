"""Reading ``cluster.toml`` as an operator meets it: through ``lucid check`` and the loader.

Every bad config must come back as exit code 2 and a message naming the file, the
dotted key, the value found and what was expected -- never a traceback. The same
files are loaded in-process with :func:`lucid.runtime.load_plugins_and_config` (plus
the plugins' prepare hooks, which is where route references are checked), so the
CLI and the library are held to one standard.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from lucid.config import ConfigError
from lucid.runtime import Runtime, load_plugins_and_config
from lucid.testing_internal import builtin_plugins, run_lucid
from lucid.units import parse_duration, parse_size

REPO = Path(__file__).resolve().parent.parent
CLUSTER_TOML = REPO / "conf" / "cluster.toml"


def builtins_off_but(*keep: str) -> str:
    """A ``[plugins]`` table switching off every built-in capability not in ``keep``."""
    return "[plugins]\n" + "".join(f"{p.capability} = false\n" for p in builtin_plugins()
                                   if p.capability not in keep)


def check_ok(stdout: str, source: Path | str, routes: int) -> dict[str, str]:
    """The plugins ``lucid check`` reports enabled (capability -> plugin), after checking
    the rest of its one line of output."""
    match = re.fullmatch(rf"{re.escape(str(source))}: ok \(plugins: (.*); routes: (\d+)\)",
                         stdout.strip())
    assert match, stdout
    assert int(match.group(2)) == routes
    pairs = [pair.split("=") for pair in match.group(1).split(", ")]
    return {capability: name for capability, name in pairs}


def load(path: Path) -> Any:
    """Load a config the way ``lucid check`` does: choose plugins, validate, prepare."""
    plugin_set, config = load_plugins_and_config(path)
    asyncio.run(Runtime(plugin_set, config, path).check())
    return config


# --- every error: file, dotted key, value, expectation; exit 2, no traceback ------------

SERVICE = """
[gateway.services.users]
instances = ["http://127.0.0.1:9001"]
"""

BAD_CONFIGS = {
    "toml-syntax": (
        "[server\nworkers = 2\n",
        ["not valid TOML", "Expected ']'", "line 1"],
    ),
    "unknown-key-typo": (
        "[server]\nwokers = 2\n",
        ["server.wokers: unknown key", "expected one of:", "workers", "grace_period"],
    ),
    "wrong-type": (
        '[server]\nworkers = "many"\n',
        ["server.workers = 'many'", "valid integer"],
    ),
    "out-of-range": (
        "[server]\nworkers = 0\n",
        ["server.workers = 0", "greater than or equal to 1"],
    ),
    "bad-listen-address": (
        '[server]\nproxy = "localhost"\n',
        ["server.proxy = 'localhost'", "expected 'host:port'"],
    ),
    "bad-duration": (
        '[server]\ngrace_period = "10 fortnights"\n',
        ["server.grace_period = '10 fortnights'", "expected a duration such as", "'250ms'"],
    ),
    "bad-route-duration": (
        SERVICE + '[[gateway.routes]]\nprefix = "/u"\nservice = "users"\n'
        'timeouts = { read = "10 fortnights" }\n',
        ["gateway.routes[0].timeouts.read = '10 fortnights'", "expected a duration"],
    ),
    "bad-size": (
        SERVICE + '[[gateway.routes]]\nprefix = "/u"\nservice = "users"\n'
        'max_body_size = "10 MiBs"\n',
        ["gateway.routes[0].max_body_size = '10 MiBs'", "expected a size such as"],
    ),
    "route-with-path-and-prefix": (
        SERVICE + '[[gateway.routes]]\npath = "/x"\nprefix = "/y"\nservice = "users"\n',
        ["gateway.routes[0] = ", "'path': '/x'", "'prefix': '/y'",
         "give exactly one of 'path', 'prefix' or 'pattern'"],
    ),
    # Only without a registry: with one, services may register at runtime.
    "route-to-undeclared-service": (
        "[plugins]\nregistry = false\n"
        + SERVICE + '[[gateway.routes]]\nprefix = "/g"\nservice = "ghost"\n',
        ["gateway.routes[0].service = 'ghost'", "no such service in [gateway.services]",
         "declared: users"],
    ),
    "second-route-wrong-type": (
        SERVICE + '[[gateway.routes]]\nprefix = "/a"\nservice = "users"\n'
        '[[gateway.routes]]\nprefix = "/b"\nservice = "users"\npriority = "high"\n',
        ["gateway.routes[1].priority = 'high'", "valid integer"],
    ),
    # With no plugin taking per-route settings (the other built-ins switched off).
    "per-route-override-for-no-plugin": (
        builtins_off_but("gateway") + SERVICE
        + '[[gateway.routes]]\nprefix = "/u"\nservice = "users"\n'
        "[gateway.routes.plugins.ratelimit]\nrate = 5\n",
        ["gateway.routes[0].plugins.ratelimit",
         "no enabled plugin takes per-route settings named 'ratelimit'", "known: none"],
    ),
    "per-route-overrides-not-a-table": (
        SERVICE + '[[gateway.routes]]\nprefix = "/u"\nservice = "users"\nplugins = "fast"\n',
        ["gateway.routes[0].plugins = 'fast'", "valid dictionary"],
    ),
    "bad-instance-url": (
        '[gateway.services.users]\ninstances = ["ftp://files"]\n',
        ["gateway.services.users.instances[0].url = 'ftp://files'", "scheme must be http"],
    ),
    "plugin-choice-wrong-type": (
        "[plugins]\ngateway = 3\n",
        ["plugins.gateway = 3", "expected a plugin name, true or false"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_error_names_file_key_value_and_expectation(case: str, tmp_path: Path) -> None:
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "cluster.toml"
    path.write_text(text)

    result = run_lucid("check", "--config", str(path))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert f"invalid config {path}:" in result.stderr
    for fragment in expected:
        assert fragment in result.stderr, f"{fragment!r} missing from:\n{result.stderr}"

    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.source == str(path)
    rendered = caught.value.render()
    for fragment in expected:
        assert fragment in rendered


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text('[server]\nwokers = 2\ngrace_period = "soon"\nvia = "a b"\n')
    result = run_lucid("check", "--config", str(path))
    assert result.returncode == 2
    problems = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert sorted(p.split(":")[0].split(" =")[0] for p in problems) == [
        "server.grace_period", "server.via", "server.wokers",
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "cluster.toml"
    result = run_lucid("check", "--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"invalid config {path}:" in result.stderr
    assert "file not found" in result.stderr
    with pytest.raises(ConfigError, match="file not found"):
        load_plugins_and_config(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    result = run_lucid("check", "--config", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "is a directory, expected a TOML file" in result.stderr


# --- environment overrides ---------------------------------------------------------------

FILE_WITH_SERVER = """
[server]
proxy = "127.0.0.1:9999"
workers = 1
grace_period = "10s"
"""


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(FILE_WITH_SERVER)
    before = load(path).server
    assert (before.workers, before.grace_period) == (1, 10.0)

    monkeypatch.setenv("LUCID_SERVER__WORKERS", "3")
    monkeypatch.setenv("LUCID_SERVER__GRACE_PERIOD", "2s")
    server = load(path).server
    assert server.workers == 3
    assert server.grace_period == 2.0
    assert server.proxy == "127.0.0.1:9999"  # what the environment does not set stays


def test_environment_sets_what_the_file_leaves_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text("")
    monkeypatch.setenv("lucid_server__workers", "2")  # names are case-insensitive
    monkeypatch.setenv("LUCID_SERVER__TRUSTED_PROXIES", '["10.0.0.0/8", "::1/128"]')
    server = load(path).server
    assert server.workers == 2
    assert [str(n) for n in server.trusted_proxies] == ["10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LUCID_SERVER__WORKERS", "many",
         "server.workers = 'many': Input should be a valid integer"),
        ("LUCID_SERVER__GRACE_PERIOD", "forever",
         "server.grace_period = 'forever': expected a duration"),
        ("LUCID_SERVER__WOKERS", "2", "server.wokers: unknown key"),
        # lists and tables come from the environment as JSON; plain text is an error
        # naming the variable, not a pydantic-settings traceback
        ("LUCID_SERVER__TRUSTED_PROXIES", "10.0.0.0/8", "server.trusted_proxies = '10.0.0.0/8'"),
    ],
)
def test_bad_environment_value_names_the_variable(
    variable: str, value: str, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(FILE_WITH_SERVER)
    result = run_lucid("check", "--config", str(path), **{variable: value})
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert f"invalid config {path}:" in result.stderr
    assert expected in result.stderr
    assert f"(set by environment variable {variable})" in result.stderr


# --- durations and sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5m", 300.0), ("30s", 30.0), ("1.5s", 1.5), ("2h", 7200.0),
     ("1d", 86400.0), (" 10 s ", 10.0), (30, 30.0), (0.5, 0.5)],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("10MiB", 10 * 2**20), ("512KiB", 512 * 1024), ("512KB", 512_000), ("1GB", 10**9),
     ("2gib", 2 * 2**30), ("100B", 100), ("1.5KiB", 1536), (4096, 4096)],
)
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10 fortnights", "-5s", "5 minutes", "", True])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["10 MiBs", "-1", "lots", 1.5, False])
def test_bad_sizes(text: Any) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


def test_durations_and_sizes_in_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(SERVICE + """
[server]
grace_period = "250ms"
upstream_keepalive = "5m"
max_request_header_size = "10MiB"

[[gateway.routes]]
prefix = "/u"
service = "users"
max_body_size = "10MiB"
timeouts = { connect = "250ms", read = "5m", total = "1h" }
""")
    config = load(path)
    assert config.server.grace_period == 0.25
    assert config.server.upstream_keepalive == 300.0
    assert config.server.max_request_header_size == 10 * 2**20
    route = config.gateway.routes[0]
    assert route.max_body_size == 10 * 2**20
    assert (route.timeouts.connect, route.timeouts.read, route.timeouts.total) == (
        0.25, 300.0, 3600.0,
    )


# --- the shipped example -------------------------------------------------------------------


def test_check_accepts_the_example_cluster() -> None:
    result = run_lucid("check", "--config", str(CLUSTER_TOML))
    assert result.returncode == 0, result.stderr
    # every built-in, each providing its own capability, and nothing else
    assert check_ok(result.stdout, CLUSTER_TOML, routes=1) == {
        p.capability: p.name for p in builtin_plugins()
    }
    assert result.stderr == ""


def test_check_without_a_config_uses_the_defaults() -> None:
    result = run_lucid("check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("(built-in defaults): ok")
