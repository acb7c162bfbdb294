"""The plugin-author kit (``lucid.testing``): its public names import, the helpers that
moved to ``lucid.testing_internal`` still answer from the old place with a warning
naming the new one, and a gateway runs with an in-process plugin object registered."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import pytest

import lucid.testing
import lucid.testing_http
import lucid.testing_internal
from lucid.model import Exchange
from lucid.plugins import hookimpl
from lucid.testing import RunningGateway, run_gateway, wait_until

PUBLIC = ["GatewayProcess", "Handler", "PluginAdmin", "RedisServer", "RunningGateway",
          "Upstream", "echo", "json_request", "run_gateway", "start_upstream", "wait_until",
          "wait_until_answered", "write_config",
          "lucid_gateway", "lucid_process", "lucid_redis", "lucid_upstream"]
MOVED = {"lucid.testing": ["builtin_plugins", "debian_tool", "lucid_env", "plugin_rows",
                           "run_lucid", "two_services"],
         "lucid.testing_http": ["route", "challenge_params"]}


def test_the_public_kit_is_what_all_says_and_imports_without_warnings() -> None:
    assert sorted(lucid.testing.__all__) == sorted(PUBLIC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in PUBLIC:
            assert getattr(lucid.testing, name) is not None
        exec("from lucid.testing import *", {})
        exec("from lucid.testing_http import *", {})
    assert "route" not in lucid.testing_http.__all__


@pytest.mark.parametrize("module,name", [(m, n) for m, names in MOVED.items() for n in names])
def test_a_moved_helper_still_answers_from_its_old_place_with_a_warning(
    module: str, name: str
) -> None:
    with pytest.warns(DeprecationWarning,
                      match=rf"{module}\.{name} moved to lucid\.testing_internal\.{name}"):
        old = getattr(importlib.import_module(module), name)
    assert old is getattr(lucid.testing_internal, name)


def test_from_import_of_a_moved_helper_warns_too() -> None:
    with pytest.warns(DeprecationWarning, match="lucid.testing_internal.two_services"):
        exec("from lucid.testing import two_services", {})


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_helper"):
        lucid.testing.no_such_helper  # noqa: B018


class Seen:
    """An in-process observer: the exchanges the gateway finished."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    @hookimpl
    def lucid_observe_exchange(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)


async def test_a_gateway_runs_with_in_process_plugin_objects(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    upstream = await lucid_upstream()
    first, second = Seen(), Seen()
    gw: RunningGateway = await lucid_gateway(f"""
        [gateway.services.svc]
        instances = ["{upstream.url}"]
        [[gateway.routes]]
        id = "all"
        prefix = "/"
        service = "svc"
    """, plugins=[first, second])
    async with gw.session.get(gw.proxy_url + "/seen") as r:
        assert r.status == 200
    await wait_until(lambda: first.exchanges and second.exchanges, message="both observers")
    assert [(e.path, e.route_id, e.status) for e in first.exchanges] == [("/seen", "all", 200)]
    assert second.exchanges == first.exchanges
    assert gw.runtime.plugin_set.pm.get_plugin("Seen-2") is second
    # one plugin's own answer, whatever the others say
    observe = gw.plugin_hook("Seen", "lucid_observe_exchange")
    observe(exchange=first.exchanges[0])
    assert len(first.exchanges) == 2 and len(second.exchanges) == 1
    listed = gw.plugin_hook("gateway", "lucid_list_instances")(
        service="svc", generation=gw.runtime.generation)
    assert [i.url for i in listed] == [upstream.url]
    with pytest.raises(LookupError, match="does not implement lucid_select_instance"):
        gw.plugin_hook("Seen", "lucid_select_instance")
    with pytest.raises(LookupError, match="no enabled plugin is named 'nobody'"):
        gw.plugin_hook("nobody", "lucid_observe_exchange")


async def test_an_in_process_plugin_with_a_misspelled_hook_is_refused(tmp_path: Any) -> None:
    class Typo:
        @hookimpl
        def lucid_observe_exchanges(self, exchange: Exchange) -> None: ...

    with pytest.raises(Exception, match="Typo.*lucid_observe_exchanges"):
        async with run_gateway("", tmp_path, plugins=[Typo()]):
            pass
