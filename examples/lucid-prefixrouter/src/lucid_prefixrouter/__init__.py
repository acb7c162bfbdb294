"""A longest-prefix router for Lucid: a third-party plugin that replaces a built-in.

It provides the ``gateway`` capability, so ``[plugins] gateway = "prefixrouter"``
swaps it in for Lucid's own router. Routes come from ``[[prefixrouter.routes]]``; a
request goes to the route with the longest prefix that matches it in whole segments
(``/api`` matches ``/api`` and ``/api/x``, not ``/apix``). Matching costs one dict
lookup per segment of the path, whatever the number of routes.

What every router must set (``docs/plugin_hooks.md``, ``lucid_match_route``):
``exchange.route``, ``route_id``, ``service``, ``upstream_path``, ``policy`` (timeouts,
retries, body limit) and ``overrides`` (the route's per-plugin settings, validated by
the models other plugins registered); and, in ``lucid_prepare``, ``generation.routes``,
the table other plugins read (the rate limiter's ``routes = [...]``, the breaker's
per-route circuits). Instances are not its business: the registry resolves services.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lucid.config import ConfigError
from lucid.model import Exchange, Generation, RouteInfo, RoutePolicy
from lucid.plugins import hookimpl
from lucid.units import ByteSize, Duration
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["PrefixRoute", "PrefixRouterConfig", "Table"]

LUCID_CAPABILITY = "gateway"  # the capability it provides: routing
SECTION = "prefixrouter"


class PrefixRoute(BaseModel):
    """One ``[[prefixrouter.routes]]`` entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field("", pattern=r"^([A-Za-z0-9._:-]+)?$", description="default: the prefix")
    prefix: str = Field(description="matches this path and everything under it")
    service: str = Field(min_length=1)
    strip_prefix: bool = Field(False, description="send the rest of the path upstream")
    connect_timeout: Duration = Field(5.0, gt=0)
    read_timeout: Duration = Field(30.0, gt=0)
    timeout: Duration = Field(60.0, gt=0, description="the whole exchange")
    attempts: int = Field(2, ge=1, le=10, description="retries included, on 502/503/504")
    max_body_size: ByteSize | None = Field(None, description="larger request bodies get 413")
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-route settings of other plugins, by section")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or "//" in value or "?" in value:
            raise ValueError("must be a path such as /api/users")
        return value

    @property
    def key(self) -> str:
        """The prefix as the table holds it: no trailing slash (``/`` is ``""``)."""
        return self.prefix.rstrip("/")

    def policy(self) -> RoutePolicy:
        return RoutePolicy(
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
            total_timeout=self.timeout, attempts=self.attempts,
            max_body_size=self.max_body_size,
        )


class PrefixRouterConfig(BaseModel):
    """``[prefixrouter]``: the routes. None: every request is answered 404."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    routes: list[PrefixRoute] = Field(default_factory=list)

    @field_validator("routes")
    @classmethod
    def _unique(cls, routes: list[PrefixRoute]) -> list[PrefixRoute]:
        prefixes: set[str] = set()
        ids: set[str] = set()
        for route in routes:
            if route.key in prefixes:
                raise ValueError(f"prefix {route.prefix!r} appears twice")
            if (route.id or route.prefix) in ids:
                raise ValueError(f"route id {route.id or route.prefix!r} appears twice")
            prefixes.add(route.key)
            ids.add(route.id or route.prefix)
        return routes


@dataclass(frozen=True, slots=True)
class Entry:
    route: PrefixRoute
    info: RouteInfo
    overrides: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Table:
    """One generation's routes, by prefix key."""

    by_prefix: dict[str, Entry]

    def match(self, path: str) -> Entry | None:
        """The route with the longest prefix of ``path`` (a normalised path), if any."""
        probe = path.rstrip("/")
        while True:
            entry = self.by_prefix.get(probe)
            if entry is not None or not probe:
                return entry
            probe = probe[: probe.rfind("/")]


@hookimpl
def lucid_register_config(register: Callable[..., None]) -> None:
    register(SECTION, PrefixRouterConfig)


@hookimpl
def lucid_prepare(generation: Generation) -> None:
    config: PrefixRouterConfig = getattr(generation.config, SECTION)
    problems: list[str] = []
    entries: dict[str, Entry] = {}
    for index, route in enumerate(config.routes):
        overrides = generation.route_settings(route.plugins, f"{SECTION}.routes[{index}].plugins",
                                              problems)
        info = RouteInfo(route.id or route.prefix, route.service, route.policy(), overrides)
        entries[route.key] = Entry(route, info, overrides)
    if problems:
        raise ConfigError(generation.source, problems)
    generation.state[SECTION] = Table(entries)
    generation.routes = tuple(entry.info for entry in entries.values())


@hookimpl
def lucid_match_route(exchange: Exchange, generation: Generation) -> PrefixRoute | None:
    table: Table = generation.state[SECTION]
    entry = table.match(exchange.path)
    if entry is None:
        return None  # the core answers 404
    route = entry.route
    exchange.route = route
    exchange.route_id = entry.info.id
    exchange.service = route.service
    exchange.upstream_path = (exchange.path[len(route.key):] or "/" if route.strip_prefix
                              else exchange.path)
    exchange.policy = entry.info.policy
    exchange.overrides = entry.overrides
    return route
