"""Third-party plugins, installed for real: a folder holding modules and ``*.dist-info``
metadata with ``lucid`` entry points is put on ``sys.path`` (in-process) or on
``PYTHONPATH`` (subprocesses), exactly where an installed package would be found.

Fixtures, under ``tests/fixtures/``:

* ``thirdparty/``: ``fakerouter`` (capability ``gateway``, a replacement router),
  ``boom`` (an async admission hook that can raise or reject) and ``guard`` (a sync
  admission hook that admits);
* ``rivals/``: ``quota-a`` and ``quota-b``, two providers of one capability;
* ``broken/``: a plugin whose import fails;
* ``badhook/``: a plugin implementing a misspelled hook.

Lucid ships several built-in plugins (all entry points of the ``lucid-gateway``
distribution) and gains more over time. These tests are about choosing plugins, not
about which built-ins exist: they compute the built-in set from the entry points and
assert the plugins under test exactly (membership and relative order), the other
built-ins only where a test is about them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lucid.config import ConfigError
from lucid.plugins import InstalledPlugin, choose_plugins, installed_plugins
from lucid.runtime import load_plugins_and_config
from lucid.testing import GatewayProcess, run_gateway, wait_until, write_config
from lucid.testing_internal import builtin_plugins, lucid_env, plugin_rows, run_lucid

FIXTURES = Path(__file__).resolve().parent / "fixtures"
THIRDPARTY = FIXTURES / "thirdparty"
RIVALS = FIXTURES / "rivals"
BROKEN = FIXTURES / "broken"
BADHOOK = FIXTURES / "badhook"


BUILTINS = [p.name for p in builtin_plugins()]  # sorted by name
# The built-ins other than the router these tests swap and switch off.
OTHER_BUILTINS = frozenset(BUILTINS) - {"gateway"}


def under_test(names: list[str]) -> list[str]:
    """``names`` (in their order) without the other built-ins: the plugins under test."""
    return [n for n in names if n not in OTHER_BUILTINS]


def other_builtins_off() -> str:
    """``[plugins]`` lines switching every built-in capability but ``gateway`` off."""
    return "".join(f"{p.capability} = false\n" for p in builtin_plugins()
                   if p.name in OTHER_BUILTINS)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def enabled_names(path: Path) -> list[str]:
    plugin_set, _ = load_plugins_and_config(path)
    return [p.name for p in plugin_set.plugins]


@pytest.fixture
def thirdparty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(THIRDPARTY))


@pytest.fixture
def rivals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(RIVALS))


# --- discovery and choice --------------------------------------------------------------------


def test_third_party_plugins_are_found_through_entry_points(thirdparty: None) -> None:
    found = {p.name: p for p in installed_plugins()}
    assert sorted(found) == sorted([*BUILTINS, "boom", "fakerouter", "guard"])
    fake = found["fakerouter"]
    assert (fake.target, fake.distribution, fake.capability) == (
        "lucid_fake_router", "lucid-fake-router", "gateway",
    )
    assert found["gateway"].distribution == "lucid-gateway"
    assert {found[name].distribution for name in BUILTINS} == {"lucid-gateway"}


def test_without_the_folder_they_are_not_installed() -> None:
    assert "gateway" in BUILTINS
    assert [p.name for p in installed_plugins()] == BUILTINS
    assert {p.distribution for p in installed_plugins()} == {"lucid-gateway"}


def test_capability_left_out_goes_to_the_plugin_named_after_it(
    thirdparty: None, tmp_path: Path
) -> None:
    """Two plugins provide ``gateway``; the one *named* ``gateway`` wins by default, and
    a capability with a single provider (``boom``, ``guard``) gets that provider."""
    names = enabled_names(write(tmp_path, ""))
    assert under_test(names) == ["gateway", "boom", "guard"]
    # the other built-ins are each the plugin named after their capability: all enabled
    assert set(names) == OTHER_BUILTINS | {"gateway", "boom", "guard"}


def test_capability_left_out_with_several_providers_is_an_error(
    rivals: None, tmp_path: Path
) -> None:
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as caught:
        load_plugins_and_config(path)
    assert caught.value.problems == [
        "plugins.quota: several installed plugins provide it (quota-a, quota-b); name one"
    ]
    result = run_lucid("check", "--config", str(path), installed=(RIVALS,))
    assert result.returncode == 2
    assert "several installed plugins provide it (quota-a, quota-b)" in result.stderr
    assert "Traceback" not in result.stderr


def test_naming_one_of_several_providers(rivals: None, tmp_path: Path) -> None:
    path = write(tmp_path, '[plugins]\nquota = "quota-b"\n')
    plugin_set, config = load_plugins_and_config(path)
    assert under_test([p.name for p in plugin_set.plugins]) == ["gateway", "quota-b"]
    assert config.quota.provider == "quota-b"  # its config model validated [quota]


def test_switching_a_capability_off_ignores_its_section(rivals: None, tmp_path: Path) -> None:
    path = write(tmp_path, '[plugins]\nquota = false\n\n[quota]\nanything = "goes"\n')
    plugin_set, _ = load_plugins_and_config(path)
    assert under_test([p.name for p in plugin_set.plugins]) == ["gateway"]
    assert plugin_set.disabled == frozenset({"quota"})


def test_a_plugin_named_after_another_capability_does_not_provide_it(
    thirdparty: None, rivals: None
) -> None:
    """The default goes to the plugin named after the capability only if it provides it."""
    misnamed = InstalledPlugin("quota", "lucid_fake_guard", "lucid-fake-admission")
    quota_a = InstalledPlugin("quota-a", "lucid_fake_quota_a", "lucid-fake-quota")
    quota_b = InstalledPlugin("quota-b", "lucid_fake_quota_b", "lucid-fake-quota")
    installed = [misnamed, quota_a, quota_b]
    assert misnamed.capability == "guard"

    with pytest.raises(ConfigError, match=r"several installed plugins provide it \(quota-a, "):
        choose_plugins({}, "test", installed)
    enabled, _ = choose_plugins({"quota": "quota-a"}, "test", installed)
    assert [(p.capability, p.name) for p in enabled] == [("guard", "quota"), ("quota", "quota-a")]


def test_environment_chooses_plugins_too(
    thirdparty: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[plugins]\ngateway = "gateway"\n')
    monkeypatch.setenv("LUCID_PLUGINS__GATEWAY", "fakerouter")
    monkeypatch.setenv("LUCID_PLUGINS__BOOM", "false")
    assert under_test(enabled_names(path)) == ["fakerouter", "guard"]


# --- naming plugins that cannot be used -----------------------------------------------------


def test_naming_a_plugin_that_is_not_installed_lists_those_that_are(
    thirdparty: None, tmp_path: Path
) -> None:
    path = write(tmp_path, '[plugins]\ngateway = "nope"\n')
    installed = ", ".join(sorted([*BUILTINS, "boom", "fakerouter", "guard"]))
    expected = f"plugins.gateway = 'nope': no such plugin is installed (installed: {installed})"
    with pytest.raises(ConfigError) as caught:
        load_plugins_and_config(path)
    assert caught.value.problems == [expected]

    result = run_lucid("check", "--config", str(path), installed=(THIRDPARTY,))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"invalid config {path}:\n  {expected}" in result.stderr


def test_naming_a_plugin_of_another_capability(thirdparty: None, tmp_path: Path) -> None:
    path = write(tmp_path, '[plugins]\ngateway = "boom"\n')
    with pytest.raises(ConfigError, match="that plugin provides 'boom', not 'gateway'"):
        load_plugins_and_config(path)


def test_a_plugin_whose_import_fails_is_reported_by_name(tmp_path: Path) -> None:
    problem = ("plugin 'broken' (lucid_fake_broken) failed to import: "
               "No module named 'lucid_fake_dependency_that_is_not_installed'")
    # Named in [plugins] (as the provider of some capability, or its own): an error.
    for text in ('[plugins]\nbroken = "broken"\n', "[plugins]\nbroken = true\n"):
        path = write(tmp_path, text)
        result = run_lucid("check", "--config", str(path), installed=(BROKEN,))
        assert result.returncode == 2, result
        assert "Traceback" not in result.stderr
        assert f"invalid config {path}:" in result.stderr
        assert problem in result.stderr
    # Not used by the config: left out with a warning, the gateway still starts.
    path = write(tmp_path, "")
    result = run_lucid("check", "--config", str(path), installed=(BROKEN,))
    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr
    assert f"{problem}; it is not used" in result.stderr

    # `lucid plugins` still lists what is installed, the broken one included.
    listing = run_lucid("plugins", installed=(BROKEN,))
    assert "Traceback" not in listing.stderr
    assert problem in listing.stderr
    assert listing.returncode == 2
    rows = plugin_rows(listing.stdout)
    assert rows["broken"][:3] == ["?", "no", "lucid-fake-broken"]
    assert rows["broken"][3].startswith("(failed to import: No module named")
    assert rows["gateway"][0] == "gateway"


def test_a_misspelled_hook_is_reported_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    result = run_lucid("check", "--config", str(path), installed=(BADHOOK,))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert f"invalid config {path}:" in result.stderr
    assert "plugin 'badhook'" in result.stderr
    assert "unknown hook 'lucid_admit_requets'" in result.stderr


# --- lucid plugins ---------------------------------------------------------------------------


def test_lucid_plugins_shows_third_party_plugins(tmp_path: Path) -> None:
    result = run_lucid("plugins", installed=(THIRDPARTY,))
    assert result.returncode == 0, result.stderr
    rows = plugin_rows(result.stdout)
    assert list(rows) == sorted([*BUILTINS, "boom", "fakerouter", "guard"])
    assert rows["fakerouter"] == [
        "gateway", "no", "lucid-fake-router",
        "lucid_match_route, lucid_register_admin, lucid_register_config, "
        "lucid_resolve_instances",
    ]
    assert rows["boom"] == [
        "boom", "yes", "lucid-fake-admission", "lucid_admit_request, lucid_register_config",
    ]
    assert rows["guard"] == ["guard", "yes", "lucid-fake-admission", "lucid_admit_request"]
    assert rows["gateway"][:2] == ["gateway", "yes"]

    path = write(tmp_path, '[plugins]\ngateway = "fakerouter"\nboom = false\n')
    chosen = plugin_rows(run_lucid("plugins", "--config", str(path),
                                   installed=(THIRDPARTY,)).stdout)
    assert list(chosen) == list(rows)
    assert {name: row[1] for name, row in chosen.items() if name not in OTHER_BUILTINS} == {
        "boom": "no", "fakerouter": "yes", "gateway": "no", "guard": "yes",
    }


# --- swapping and disabling the router ------------------------------------------------------


async def test_swapping_the_router_for_a_third_party_one(
    thirdparty: None, lucid_upstream: Any, tmp_path: Path
) -> None:
    upstream = await lucid_upstream()
    toml = f"""
[plugins]
gateway = "fakerouter"

[fakerouter]
upstream = "{upstream.url}"
prefix = "/api"
"""
    async with run_gateway(toml, tmp_path) as gateway:
        assert under_test([p.name for p in gateway.runtime.plugin_set.plugins]) == [
            "fakerouter", "boom", "guard",
        ]
        async with gateway.session.get(f"{gateway.proxy_url}/api/users?page=2") as response:
            assert response.status == 200
            assert response.headers["x-routed-by"] == "fakerouter"
            echoed = await response.json()
        assert echoed["path"] == "/fake/api/users"
        assert echoed["query"] == "page=2"

        async with gateway.session.get(f"{gateway.proxy_url}/elsewhere") as response:
            assert response.status == 404
            assert "x-routed-by" not in response.headers
    assert len(upstream.requests) == 1


def test_the_builtin_routers_section_is_unknown_once_it_is_swapped_out(
    thirdparty: None, tmp_path: Path
) -> None:
    path = write(tmp_path, '[plugins]\ngateway = "fakerouter"\n\n[gateway]\nroutes = []\n')
    with pytest.raises(ConfigError, match=r"gateway: unknown key \(expected one of: .*fakerouter"):
        load_plugins_and_config(path)


def test_switching_routing_off_answers_404_to_everything(tmp_path: Path) -> None:
    """With routing off nothing routes: the other built-ins are off too, so none of
    them can answer in its place; the third-party admission plugins stay on."""
    config = write_config("""
[plugins]
gateway = false
""" + other_builtins_off() + """
[gateway.services.users]
instances = ["http://127.0.0.1:9"]

[[gateway.routes]]
prefix = "/"
service = "users"
""", tmp_path)
    check = run_lucid("check", "--config", str(config), installed=(THIRDPARTY,))
    assert check.returncode == 0, check.stderr
    assert "ok (plugins: boom=boom, guard=guard; routes: 0)" in check.stdout

    # A subprocess, so the real `lucid serve` is what runs with no routing plugin.
    process = GatewayProcess(config, env=lucid_env(THIRDPARTY))
    try:
        process.wait_ready()

        async def requests() -> list[tuple[int, dict[str, Any]]]:
            async with aiohttp.ClientSession() as client:

                async def answers() -> bool:
                    try:
                        async with client.get(process.proxy_url):
                            return True
                    except aiohttp.ClientConnectionError:
                        return False  # announced before hypercorn called listen()

                await wait_until(answers, message="the proxy to answer")
                out = []
                for path in ("/", "/users/1", "/gateway/health"):
                    async with client.post(f"{process.proxy_url}{path}", data=b"x") as r:
                        out.append((r.status, json.loads(await r.read())))
                # the core's operations answer on the admin listener all the same
                async with client.get(f"{process.admin_url}/gateway/health") as r:
                    assert r.status == 200, await r.text()
                return out

        for status, body in asyncio.run(requests()):
            assert status == 404
            assert body["error"] == "no route matches this request"
            assert body["request_id"]
    finally:
        process.stop()
    assert "Traceback" not in process.output


# --- the data path: hook failures and awaitable results -------------------------------------

ROUTE_ALL = """
[gateway.services.echo]
instances = ["{url}"]

[[gateway.routes]]
prefix = "/"
service = "echo"
"""


async def test_a_plugin_raising_on_the_data_path_answers_500_and_serving_goes_on(
    thirdparty: None, lucid_upstream: Any, lucid_gateway: Any
) -> None:
    upstream = await lucid_upstream()
    gateway = await lucid_gateway(ROUTE_ALL.format(url=upstream.url))
    url = f"{gateway.proxy_url}/orders"

    async with gateway.session.get(url, headers={"x-boom": "raise"}) as response:
        assert response.status == 500
        assert response.headers["content-type"] == "application/json"
        body = await response.json()
    assert body["error"] == "internal error"
    assert body["status"] == 500
    assert body["request_id"] and body["request_id"] == response.headers["x-request-id"]

    headers = {"x-boom": "raise", "x-request-id": "trace-42"}
    async with gateway.session.get(url, headers=headers) as response:
        assert response.status == 500
        assert (await response.json())["request_id"] == "trace-42"

    async with gateway.session.get(url) as response:
        assert response.status == 200
        assert (await response.json())["path"] == "/orders"
    assert len(upstream.requests) == 1
    assert gateway.runtime.counters["errors"] == 2


async def test_an_async_hook_rejects_and_a_sync_hook_admits(
    thirdparty: None, lucid_upstream: Any, lucid_gateway: Any
) -> None:
    """``boom`` is async (its result is a coroutine to await), ``guard`` is sync; they run
    in that order and the first rejection stops the others."""
    upstream = await lucid_upstream()
    gateway = await lucid_gateway(ROUTE_ALL.format(url=upstream.url))
    url = f"{gateway.proxy_url}/orders"

    async with gateway.session.get(url, headers={"x-boom": "reject"}) as response:
        assert response.status == 403
        assert response.headers["x-boom"] == "rejected"
        assert "x-guard" not in response.headers  # guard was never asked
        body = await response.json()
    assert body["error"] == "rejected by boom"
    assert body["request_id"] == response.headers["x-request-id"]
    assert upstream.requests == []

    async with gateway.session.get(url, headers={"x-boom": "admit"}) as response:
        assert response.status == 200
        assert response.headers["x-guard"] == "admitted"
    assert len(upstream.requests) == 1


# --- per-route overrides validated by the plugin's route model ------------------------------

ROUTE_WITH_OVERRIDE = """
[gateway.services.echo]
instances = ["http://127.0.0.1:9"]

[[gateway.routes]]
prefix = "/"
service = "echo"

[gateway.routes.plugins.boom]
{override}
"""


def test_per_route_overrides_are_validated_by_the_plugins_route_model(tmp_path: Path) -> None:
    good = write(tmp_path, ROUTE_WITH_OVERRIDE.format(override='action = "reject"'))
    result = run_lucid("check", "--config", str(good), installed=(THIRDPARTY,))
    assert result.returncode == 0, result.stderr

    bad = write(tmp_path, ROUTE_WITH_OVERRIDE.format(override='actoin = "reject"\nweight = 0'))
    result = run_lucid("check", "--config", str(bad), installed=(THIRDPARTY,))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert ("gateway.routes[0].plugins.boom.weight = 0: Input should be greater than or "
            "equal to 1") in result.stderr
    assert ("gateway.routes[0].plugins.boom.actoin: unknown key (expected one of: action, "
            "weight)") in result.stderr


def test_switching_a_plugin_off_ignores_its_per_route_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[plugins]\nboom = false\n"
                 + ROUTE_WITH_OVERRIDE.format(override='action = "reject"'))
    result = run_lucid("check", "--config", str(path), installed=(THIRDPARTY,))
    assert result.returncode == 0, result.stderr


LIMITED = """
[ratelimiter]
[[ratelimiter.limits]]
id = "tight"
rate = "2/m"
algorithm = "fixed_window"
key = "global"
"""


@pytest.mark.parametrize("order", ["[]", '["boom"]'])
async def test_admission_runs_by_priority_and_the_order_is_configurable(
    thirdparty: None, lucid_upstream: Any, lucid_gateway: Any, order: str
) -> None:
    """Authentication (gateway, 1000) before limiting (ratelimiter, 800) before a
    third-party plugin without a priority (500): a request it refuses has already spent
    rate-limit allowance. ``admission_order`` puts it first, and then it spends none."""
    upstream = await lucid_upstream()
    gateway = await lucid_gateway(ROUTE_ALL.format(url=upstream.url) + LIMITED,
                                  admission_order=json.loads(order))
    expected = ["gateway", "ratelimiter", "boom", "guard"]
    if order != "[]":
        expected = ["boom", "gateway", "ratelimiter", "guard"]
    assert under_test(gateway.runtime.hooks.admission) == under_test(expected)
    url = f"{gateway.proxy_url}/orders"
    statuses = []
    for _ in range(3):
        async with gateway.session.get(url, headers={"x-boom": "reject"}) as response:
            statuses.append(response.status)
    async with gateway.session.get(url) as response:
        statuses.append(response.status)
    if order == "[]":
        assert statuses == [403, 403, 429, 429]  # the refused ones used the allowance up
    else:
        assert statuses == [403, 403, 403, 200]


def test_admission_order_names_only_plugins_that_admit(thirdparty: None,
                                                      tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nadmission_order = ["nosuch"]\n')
    result = run_lucid("check", "--config", str(path), installed=(THIRDPARTY,))
    assert result.returncode == 2, result
    assert "server.admission_order: 'nosuch' is not an enabled plugin that admits" in (
        result.stderr)
