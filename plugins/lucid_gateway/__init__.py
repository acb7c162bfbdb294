"""Lucid's gateway plugin: the route table and, until the registry plugin owns them,
the services declared in ``[gateway.services]``.

It is registered through the ``lucid`` entry-point group like any third-party
plugin; ``[plugins] gateway = "other"`` swaps it for another routing plugin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lucid.config import ConfigError
from lucid.definitions import legacy_rows
from lucid.model import (
    Exchange,
    Generation,
    Instance,
    Rejection,
    RetryBudget,
    RouteInfo,
    RoutePolicy,
    route_settings,
)
from lucid.plugins import hookimpl
from lucid_gateway.auth import build_verifier, route_guard
from lucid_gateway.config import GatewayConfig, Route
from lucid_gateway.cors import CorsGuard
from lucid_gateway.guard import RouteGuard
from lucid_gateway.jwks import JwksCache
from lucid_gateway.router import Router

if TYPE_CHECKING:
    from lucid.runtime import Runtime

LUCID_CAPABILITY = "gateway"
__all__ = ["GatewayConfig", "Route", "Router", "GatewayState", "GatewayShared"]


class GatewayShared:
    """What outlives a config generation, one per gateway (never a module global):
    JWKS caches and their background tasks. (The audit log and the recent request
    figures are the core's now: ``runtime.audit``, ``runtime.recent``.)"""

    def __init__(self) -> None:
        self.jwks_caches: dict[tuple[str, str], JwksCache] = {}
        self.tasks: set[asyncio.Task[Any]] = set()


@dataclass(frozen=True)
class GatewayState:
    """What this plugin derives from one config generation."""

    router: Router
    policies: tuple[RoutePolicy, ...]
    overrides: tuple[dict[str, Any], ...]
    instances: dict[str, list[Instance]]
    shared: GatewayShared = field(default_factory=GatewayShared)


def policy_for(route: Route) -> RoutePolicy:
    return RoutePolicy(
        connect_timeout=route.timeouts.connect,
        read_timeout=route.timeouts.read,
        total_timeout=route.timeouts.total,
        websocket_idle_timeout=route.timeouts.websocket_idle,
        attempts=route.retries.attempts,
        retry_on_status=frozenset(route.retries.on_status),
        max_body_size=route.max_body_size,
        preserve_host=route.preserve_host,
        budget=RetryBudget(route.retries.budget_percent, route.retries.min_concurrency),
    )


def build_state(
    config: GatewayConfig, route_models: dict[str, Any], source: str, registry: bool,
    disabled: frozenset[str] = frozenset(), dynamic: Sequence[Route] = (),
    shared: GatewayShared | None = None, base: Path | None = None,
) -> GatewayState:
    """Compile a route table; every problem is reported with its dotted key.

    Per-route settings of a capability switched off in ``[plugins]`` are ignored, like
    its config section, so switching a plugin off is one line. ``dynamic`` routes
    (added through the admin API) follow the TOML ones. A route with auth, CORS,
    header limits or ``methods`` gets a compiled guard in its overrides under
    ``"gateway"``.
    """
    shared = shared or GatewayShared()
    problems: list[str] = []
    overrides: list[dict[str, Any]] = []
    routes = [*config.routes, *dynamic]
    verifier = build_verifier(config.auth, base, shared.jwks_caches, shared.tasks, problems)
    limits = config.limits if config.limits.enabled else None
    for index, route in enumerate(routes):
        validated: dict[str, Any] = {}
        auth = None
        if route.auth is not None:
            auth = route_guard(verifier, route.auth, f"gateway.routes[{index}].auth", problems)
        cors = CorsGuard(route.cors) if route.cors is not None else None
        if auth is not None or cors is not None or limits is not None or route.methods:
            validated["gateway"] = RouteGuard(limits, cors, auth,
                                              frozenset(route.methods) or None,
                                              ", ".join(route.methods))
        validated.update(route_settings(route.plugins, f"gateway.routes[{index}].plugins",
                                        route_models, disabled, problems))
        overrides.append(validated)
        if not registry and route.service not in config.services:
            known = ", ".join(sorted(config.services)) or "none"
            problems.append(f"gateway.routes[{index}].service = {route.service!r}: "
                            f"no such service in [gateway.services] (declared: {known})")
    if problems:
        raise ConfigError(source, problems)
    instances = {
        name: [
            Instance.from_url(name, i.url, weight=i.weight, zone=i.zone)
            for i in service.instances
        ]
        for name, service in config.services.items()
    }
    policies = tuple(policy_for(r) for r in routes)
    return GatewayState(
        Router(routes, policies, overrides),
        policies,
        tuple(overrides),
        instances,
        shared,
    )


@hookimpl
def lucid_register_config(register: Callable[..., None]) -> None:
    register("gateway", GatewayConfig)


def route_id(index: int, route: Route) -> str:
    """A route's id: its own, or ``routes[<index>]`` (its place in the table) when the
    config file gives none. This is the one place that rule lives."""
    return route.id or f"routes[{index}]"


def static_routes(config: Any) -> dict[str, Route]:
    """The routes the config file declares, by id, in file order."""
    return {route_id(i, route): route for i, route in enumerate(config.gateway.routes)}


def legacy_routes(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Runtime routes an older Lucid kept in ``gateway.db`` (moved to the core's store)."""
    import json

    rows = legacy_rows(data_dir / "gateway.db", "SELECT id, definition FROM routes ORDER BY id")
    return {id: {**json.loads(body), "id": id} for id, body in rows}


@hookimpl
def lucid_register_definitions(register: Callable[..., None]) -> None:
    register("route", Route, static=static_routes, legacy=legacy_routes,
             section="gateway.routes")


@hookimpl
def lucid_register_admin(register: Callable[..., None]) -> None:
    from lucid_gateway.admin import blueprint

    register(blueprint)


def shared_of(generation: Generation) -> GatewayShared:
    """The gateway's long-lived state, carried from the running generation."""
    runtime = getattr(generation, "runtime", None)
    running = getattr(runtime, "generation", None)
    previous = running.state.get("gateway") if running is not None else None
    return previous.shared if previous is not None else GatewayShared()


@hookimpl
def lucid_prepare(generation: Generation) -> None:
    shared = shared_of(generation)
    dynamic = [d.parsed(Route) for d in generation.defined("route").values()
               if d.origin == "dynamic"]
    runtime = getattr(generation, "runtime", None)
    config_path = getattr(runtime, "config_path", None)
    state = generation.state["gateway"] = build_state(
        generation.config.gateway,
        generation.route_models,
        generation.source,
        "registry" in generation.capabilities,
        generation.disabled,
        tuple(dynamic),
        shared,
        config_path.parent if config_path is not None else None,
    )
    static = len(generation.config.gateway.routes)
    generation.routes = tuple(
        RouteInfo(route_id(index, route), route.service, state.policies[index],
                  state.overrides[index], "static" if index < static else "dynamic")
        for index, route in enumerate(state.router.routes))


@hookimpl
async def lucid_startup(runtime: Runtime) -> None:
    state: GatewayState = runtime.generation.state["gateway"]
    shared = state.shared
    for cache in shared.jwks_caches.values():  # warm the keys before the first request
        if not cache.loaded:
            cache.refresh_in_background(shared.tasks)


@hookimpl
async def lucid_shutdown(runtime: Runtime) -> None:
    shared: GatewayShared = runtime.generation.state["gateway"].shared
    for task in list(shared.tasks):
        task.cancel()
    for cache in shared.jwks_caches.values():
        await cache.close()


@hookimpl
def lucid_admit_request(exchange: Exchange) -> Rejection | None | Awaitable[Rejection | None]:
    """Header limits, CORS and JWT auth for routes that configure them; nothing otherwise."""
    guard = exchange.overrides.get("gateway")
    if guard is None:
        return None
    return guard.check(exchange)  # type: ignore[no-any-return]


@hookimpl
def lucid_match_route(exchange: Exchange, generation: Generation) -> Route | None:
    state: GatewayState = generation.state["gateway"]
    found = state.router.find(exchange.method, exchange.host, exchange.path, exchange.headers)
    if found is None:
        if exchange.method != "OPTIONS" or "origin" not in exchange.headers:
            return None
        # A CORS preflight for a route that does not list OPTIONS: match it as the
        # method it asks about, if that route answers CORS itself.
        requested = exchange.headers.get("access-control-request-method")
        if requested is None:
            return None
        found = state.router.find(requested.upper(), exchange.host, exchange.path,
                                  exchange.headers)
        if found is None or found[0].route.cors is None:
            return None
    entry, exchange.path_params, exchange.upstream_path = found
    route = exchange.route = entry.route
    exchange.route_id = entry.route_id
    exchange.service = entry.service
    exchange.policy = entry.policy
    exchange.overrides = entry.overrides
    return route


@hookimpl(trylast=True)
def lucid_resolve_instances(
    exchange: Exchange, generation: Generation
) -> Sequence[Instance] | None:
    state: GatewayState = generation.state["gateway"]
    return state.instances.get(exchange.service)


@hookimpl(trylast=True)
def lucid_list_instances(service: str, generation: Generation) -> Sequence[Instance] | None:
    state: GatewayState | None = generation.state.get("gateway")
    return None if state is None else state.instances.get(service)
