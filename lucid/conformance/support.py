"""What the conformance tests share: the plugin under test (read from a
``conformance.toml``), two switchable loopback upstreams, a spy plugin registered
in-process beside it, and a client that remembers each answer's request id.

Only the public kit (:mod:`lucid.testing`) and the public model are used, so the
suite tests a third-party plugin exactly as it tests a built-in one.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDictProxy
from pydantic import BaseModel, ConfigDict, ValidationError

from lucid.model import Exchange, Instance, Outcome
from lucid.plugins import hook_names_of, hookimpl, installed_plugins
from lucid.testing import RunningGateway, Upstream, echo, run_gateway, start_upstream, wait_until

Capability = Literal["router", "registry", "selector", "admission", "failure", "observer"]
#: each capability, and the hooks that make a plugin have it
CAPABILITY_HOOKS: dict[str, tuple[str, ...]] = {
    "router": ("lucid_match_route",),
    "registry": ("lucid_resolve_instances", "lucid_list_instances"),
    "selector": ("lucid_select_instance",),
    "admission": ("lucid_admit_request",),
    "failure": ("lucid_permit_call", "lucid_record_outcome", "lucid_fallback_response"),
    "observer": ("lucid_observe_exchange", "lucid_observe_event"),
}
BUILTINS = Path(__file__).parent / "builtins"
SERVICE = "conformance"  # the service the config routes /conformance/ to
UNMATCHED = "/nothing-matches-here"


class ProbeRequest(BaseModel):
    """``admitted`` / ``refused``: what is added to a GET under ``/conformance/``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    headers: dict[str, str] = {}


class ConformanceTable(BaseModel):
    """The ``[conformance]`` table of a ``conformance.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plugin: str
    capabilities: list[Capability] | None = None
    admitted: ProbeRequest | None = None
    refused: ProbeRequest | None = None


class ConformanceFileError(Exception):
    """A ``conformance.toml`` the suite cannot use; the message names the file and key."""


@dataclass(frozen=True)
class Target:
    """One plugin under test, and the gateway config it is tested in."""

    plugin: str
    capabilities: frozenset[str]
    admitted: ProbeRequest
    refused: ProbeRequest
    config: Mapping[str, Any]  # the gateway config, "{upstream}"/"{upstream2}" unfilled
    source: str

    def __str__(self) -> str:
        return self.plugin

    def gateway_config(self, upstream: str, upstream2: str) -> dict[str, Any]:
        """The gateway config with the two upstreams' URLs put in."""
        value = _fill(dict(self.config), {"{upstream}": upstream, "{upstream2}": upstream2})
        assert isinstance(value, dict)
        return value


def load_target(path: Path) -> Target:
    """Read a ``conformance.toml``: its ``[conformance]`` table names the plugin, the
    rest is the gateway config."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConformanceFileError(f"{path}: {exc}") from None
    try:
        table = ConformanceTable.model_validate(data.pop("conformance", None))
    except ValidationError as exc:
        problems = "; ".join(
            f"conformance.{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"]
            else f"[conformance]: {e['msg']}" for e in exc.errors())
        raise ConformanceFileError(f"{path}: {problems}") from None
    installed = {p.name: p for p in installed_plugins()}
    plugin = installed.get(table.plugin)
    if plugin is None:
        raise ConformanceFileError(
            f"{path}: conformance.plugin: {table.plugin!r} is not an installed plugin "
            f"(entry points of group 'lucid': {', '.join(sorted(installed)) or 'none'})")
    if table.capabilities is not None:
        capabilities: frozenset[str] = frozenset(table.capabilities)
    else:
        hooks = set(hook_names_of(plugin.module))
        capabilities = frozenset(c for c, names in CAPABILITY_HOOKS.items()
                                 if hooks.intersection(names))
    if "admission" in capabilities and (table.admitted is None or table.refused is None):
        raise ConformanceFileError(
            f"{path}: conformance.admitted and conformance.refused are required to test "
            "admission (one request the plugin admits, one it refuses)")
    return Target(table.plugin, capabilities, table.admitted or ProbeRequest(),
                  table.refused or ProbeRequest(), data, str(path))


def builtin_targets() -> list[Target]:
    """Lucid's built-in plugins, each with the config shipped in ``builtins/``."""
    return [load_target(path) for path in sorted(BUILTINS.glob("*.toml"))]


def _fill(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for placeholder, text in values.items():
            value = value.replace(placeholder, text)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    return value


class Spy:
    """Registered in-process after every installed plugin: it records what the core
    told plugins (each finished exchange, each permitted call, each outcome) and
    changes nothing."""

    def __init__(self) -> None:
        self.exchanges: dict[str, Exchange] = {}
        self.permitted: list[tuple[str, str]] = []  # (request id, instance url)
        self.outcomes: list[tuple[str, str, Outcome]] = []  # (request id, url, outcome)

    @hookimpl
    def lucid_observe_exchange(self, exchange: Exchange) -> None:
        assert exchange.request_id not in self.exchanges, "an exchange observed twice"
        self.exchanges[exchange.request_id] = exchange

    @hookimpl
    def lucid_permit_call(self, exchange: Exchange, instance: Instance) -> None:
        self.permitted.append((exchange.request_id, instance.url))

    @hookimpl
    def lucid_record_outcome(self, exchange: Exchange, instance: Instance,
                             outcome: Outcome) -> None:
        self.outcomes.append((exchange.request_id, instance.url, outcome))

    def outcomes_of(self, request_id: str) -> list[Outcome]:
        return [o for rid, _, o in self.outcomes if rid == request_id]

    def permitted_for(self, request_id: str) -> list[str]:
        return [url for rid, url in self.permitted if rid == request_id]


@dataclass
class Backend:
    """One loopback upstream of the ``conformance`` service; ``status`` switches what
    it answers (200: a JSON echo of the request; anything else: that status)."""

    status: int = 200
    upstream: Upstream | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.status == 200:
            return await echo(request)
        return web.json_response({"error": "switched off by the test"}, status=self.status)

    @property
    def url(self) -> str:
        assert self.upstream is not None
        return self.upstream.url

    def hits(self, request_id: str) -> int:
        """How many times a request reached this upstream."""
        assert self.upstream is not None
        return sum(1 for r in self.upstream.requests if r.headers.get("x-request-id")
                   == request_id)

    @property
    def requests(self) -> int:
        assert self.upstream is not None
        return len(self.upstream.requests)


@dataclass
class Answer:
    """What the client got."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), (
            f"expected a JSON answer, got {self}")
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"{self.status} {dict(self.headers)} {self.body[:300]!r}"


@dataclass
class Harness:
    """A gateway running the plugin under test, its two upstreams and the spy."""

    target: Target
    gw: RunningGateway
    backends: tuple[Backend, Backend]
    spy: Spy = field(default_factory=Spy)

    async def get(self, path: str = "/conformance/", headers: Mapping[str, str] | None = None,
                  ) -> Answer:
        """GET ``path`` on the proxy with ``headers``, by default the ``admitted``
        request's (an admission plugin under test lets the other contracts through)."""
        if headers is None:
            headers = self.target.admitted.headers
        async with self.gw.session.get(self.gw.proxy_url + path, headers=headers or {}) as r:
            return Answer(r.status, r.headers, await r.read())

    async def exchange_of(self, answer: Answer) -> Exchange:
        """The exchange behind ``answer``, once observers have seen it."""
        assert answer.request_id, f"no x-request-id on {answer}"
        exchange: Exchange = await wait_until(
            lambda: self.spy.exchanges.get(answer.request_id),
            message=f"the exchange of request {answer.request_id}")
        return exchange

    def hits(self, request_id: str) -> int:
        return sum(b.hits(request_id) for b in self.backends)

    def hook(self, name: str) -> Any:
        """The plugin under test's own implementation of hook ``name``."""
        return self.gw.plugin_hook(self.target.plugin, name)


@asynccontextmanager
async def running(target: Target, directory: Path) -> AsyncIterator[Harness]:
    """Start the two upstreams and a gateway on ``target``'s config with the spy."""
    backends = (Backend(), Backend())
    for backend in backends:
        backend.upstream = await start_upstream(backend.handle)
    spy = Spy()
    try:
        config = target.gateway_config(backends[0].url, backends[1].url)
        async with run_gateway(config, directory, plugins=[spy]) as gw:
            enabled = [p.name for p in gw.runtime.plugin_set.plugins]
            assert target.plugin in enabled, (
                f"{target.source}: the config does not enable {target.plugin!r} (enabled: "
                f"{', '.join(enabled)}); choose it in [plugins]")
            yield Harness(target, gw, backends, spy)
    finally:
        for backend in backends:
            if backend.upstream is not None:
                await backend.upstream.close()
