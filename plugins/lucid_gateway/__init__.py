"""Lucid's gateway plugin: the route table and, until the registry plugin owns them,
the services declared in ``[gateway.services]``.

It is registered through the ``lucid`` entry-point group like any third-party
plugin; ``[plugins] gateway = "other"`` swaps it for another routing plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from lucid.config import ConfigError, describe_errors
from lucid.model import Exchange, Instance, RetryBudget, RoutePolicy
from lucid.plugins import hookimpl
from lucid_gateway.config import GatewayConfig, Route
from lucid_gateway.router import Router

LUCID_CAPABILITY = "gateway"
__all__ = ["GatewayConfig", "Route", "Router", "GatewayState"]


@dataclass(frozen=True)
class GatewayState:
    """What this plugin derives from one config generation."""

    router: Router
    policies: tuple[RoutePolicy, ...]
    overrides: tuple[dict[str, Any], ...]
    instances: dict[str, list[Instance]]


def policy_for(route: Route) -> RoutePolicy:
    return RoutePolicy(
        connect_timeout=route.timeouts.connect,
        read_timeout=route.timeouts.read,
        total_timeout=route.timeouts.total,
        attempts=route.retries.attempts,
        retry_on_status=frozenset(route.retries.on_status),
        max_body_size=route.max_body_size,
        preserve_host=route.preserve_host,
        budget=RetryBudget(route.retries.budget_percent, route.retries.min_concurrency),
    )


def build_state(
    config: GatewayConfig, route_models: dict[str, Any], source: str, registry: bool,
    disabled: frozenset[str] = frozenset(),
) -> GatewayState:
    """Compile a route table; every problem is reported with its dotted key.

    Per-route settings of a capability switched off in ``[plugins]`` are ignored, like
    its config section, so switching a plugin off is one line.
    """
    problems: list[str] = []
    overrides: list[dict[str, Any]] = []
    for index, route in enumerate(config.routes):
        validated: dict[str, Any] = {}
        for section, values in route.plugins.items():
            if section in disabled:
                continue
            key = f"gateway.routes[{index}].plugins.{section}"
            model = route_models.get(section)
            if model is None:
                known = ", ".join(sorted(route_models)) or "none"
                problems.append(f"{key}: no enabled plugin takes per-route settings "
                                f"named {section!r} (known: {known})")
                continue
            try:
                validated[section] = model.model_validate(values)
            except ValidationError as exc:
                problems += [f"{key}.{p}" for p in describe_errors(exc, model, values)]
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
    return GatewayState(
        Router(config.routes),
        tuple(policy_for(r) for r in config.routes),
        tuple(overrides),
        instances,
    )


@hookimpl
def lucid_register_config(register: Callable[..., None]) -> None:
    register("gateway", GatewayConfig)


@hookimpl
def lucid_register_admin(register: Callable[..., None]) -> None:
    from lucid_gateway.admin import blueprint

    register(blueprint)


@hookimpl
def lucid_prepare(generation: Any) -> None:
    generation.state["gateway"] = build_state(
        generation.config.gateway,
        generation.route_models,
        generation.source,
        "registry" in generation.capabilities,
        generation.disabled,
    )


@hookimpl
def lucid_match_route(exchange: Exchange, generation: Any) -> Route | None:
    state: GatewayState = generation.state["gateway"]
    match = state.router.match(exchange.method, exchange.host, exchange.path, exchange.headers)
    if match is None:
        return None
    exchange.route = match.route
    exchange.route_id = match.route_id
    exchange.service = match.route.service
    exchange.path_params = match.params
    exchange.upstream_path = match.upstream_path
    exchange.policy = state.policies[match.index]
    exchange.overrides = state.overrides[match.index]
    return match.route


@hookimpl(trylast=True)
def lucid_resolve_instances(exchange: Exchange, generation: Any) -> Sequence[Instance] | None:
    state: GatewayState = generation.state["gateway"]
    return state.instances.get(exchange.service)
