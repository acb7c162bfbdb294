"""The ``[gateway]`` config section: routes and, until the registry plugin owns them, services."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lucid.config import RouteOverrides, first_repeat
from lucid.http import normalize_path
from lucid.units import ByteSize, Duration
from lucid_gateway.auth import AuthConfig, RouteAuth
from lucid_gateway.cors import CorsPolicy

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(Strict):
    """Per-route timeouts; each exceeded one answers 504, or 408 when it was the client
    that was slow to send its request body."""

    connect: Duration = Field(5.0, gt=0, description="establishing the upstream connection")
    read: Duration = Field(30.0, gt=0, description="waiting for each chunk of the response "
                          "(or of the request body)")
    # (5 s and longer: enforced to the next whole second, on a timer shared by all calls)
    total: Duration = Field(60.0, gt=0, description="the whole upstream exchange, body included")
    websocket_idle: Duration | None = Field(
        None, gt=0, description="a proxied WebSocket with no frame either way for this long "
        "is closed with 1001 (default: [server] websocket_idle_timeout)")


class Retries(Strict):
    """Retries on another instance, bounded like Envoy's retry budget.

    A retry is allowed while the route's retries in flight stay under
    ``max(min_concurrency, budget_percent% of its active requests)``, so a failing
    upstream cannot be hit with a retry storm.
    """

    attempts: int = Field(2, ge=1, le=10, description="total tries, the first one included")
    on_status: list[int] = Field(
        default_factory=lambda: [502, 503, 504],
        description="upstream statuses that are retried (idempotent methods only)",
    )
    budget_percent: float = Field(20.0, ge=0, le=100)
    min_concurrency: int = Field(3, ge=0)

    @field_validator("on_status")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 500 <= status <= 599 and status != 429:
                raise ValueError(f"{status} is not a retryable status (5xx or 429)")
        return value


class Route(Strict):
    """One route: what it matches and where it sends the request.

    Exactly one of ``path`` (exact), ``prefix`` (whole path segments) or ``pattern``
    (``/users/{id}``) is given. Precedence: exact > longest prefix > pattern; within
    one kind and one path, the higher ``priority`` wins, then the earlier route.
    """

    id: str = Field(
        "", pattern=r"^([A-Za-z0-9._:-]+)?$",
        description="name shown in logs and metrics; defaults to routes[N]",
    )
    service: str = Field(min_length=1)
    hosts: list[str] = Field(default_factory=list, description="exact or *.example.com")
    path: str | None = None
    prefix: str | None = None
    pattern: str | None = None
    methods: list[str] = Field(default_factory=list, description="empty: every method")
    headers: dict[str, str] = Field(default_factory=dict, description="exact values required")
    priority: int = 0
    strip_prefix: bool = False
    rewrite: str | None = Field(
        None, description="replaces the matched path (or prefix); {param}s are filled in"
    )
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: Retries = Field(default_factory=Retries)
    max_body_size: ByteSize | None = Field(None, description="larger request bodies get 413")
    preserve_host: bool = Field(False, description="send the client's Host header upstream")
    plugins: Annotated[dict[str, dict[str, Any]], RouteOverrides()] = Field(
        default_factory=dict, description="per-route overrides of other plugins' settings"
    )
    auth: RouteAuth | None = Field(None, description="require a JWT (see auth.py)")
    cors: CorsPolicy | None = Field(None, description="CORS answered by the gateway")

    @field_validator("path", "prefix", "pattern", "rewrite")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        # Requests are normalised before matching, so a route written with '//', '.'
        # or '..' segments could never match: say so instead of failing silently.
        normalised = normalize_path(value)
        if normalised is None:
            raise ValueError("not a usable path")
        if normalised != value and normalised + "/" != value:
            raise ValueError(f"write it normalised, as {normalised!r}")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return value
        names: set[str] = set()
        for segment in value.strip("/").split("/"):
            if "{" in segment or "}" in segment:
                m = _PARAM.match(segment)
                if not m:
                    raise ValueError(f"segment {segment!r} must be a whole '{{name}}'")
                if m.group(1) in names:
                    raise ValueError(f"parameter {m.group(1)!r} appears twice")
                names.add(m.group(1))
        if not names:
            raise ValueError("a pattern needs at least one {param}; use 'path' instead")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        upper = [m.upper() for m in value]
        for method in upper:
            if method not in HTTP_METHODS:
                raise ValueError(f"{method!r} is not an HTTP method")
        return upper

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        lowered = [h.lower() for h in value]
        for host in lowered:
            if not _HOST.match(host):
                raise ValueError(f"{host!r} is not a host name or *.domain wildcard")
        return lowered

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        return {k.lower(): v for k, v in value.items()}

    @model_validator(mode="after")
    def _one_matcher(self) -> Route:
        given = [k for k in ("path", "prefix", "pattern") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'path', 'prefix' or 'pattern'")
        if self.strip_prefix and self.prefix is None:
            raise ValueError("'strip_prefix' applies to 'prefix' routes only")
        if self.strip_prefix and self.rewrite is not None:
            raise ValueError("give 'strip_prefix' or 'rewrite', not both")
        if self.rewrite:
            params = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.rewrite))
            declared = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.pattern or ""))
            if unknown := params - declared:
                raise ValueError(f"rewrite uses parameters the route does not capture: "
                                 f"{sorted(unknown)}")
        return self

    @property
    def kind(self) -> Literal["exact", "prefix", "pattern"]:
        if self.path is not None:
            return "exact"
        return "prefix" if self.prefix is not None else "pattern"


class InstanceConfig(Strict):
    url: str
    weight: int = Field(1, ge=1)
    zone: str = ""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from lucid.model import parse_upstream_url

        parse_upstream_url(value)
        return value


class Service(Strict):
    instances: list[InstanceConfig] = Field(min_length=1)

    @field_validator("instances", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"url": v} if isinstance(v, str) else v for v in value]
        return value


class HeaderLimits(Strict):
    """``[gateway.limits]``: request header limits checked on every routed request
    (Hypercorn already caps the whole head at ``server.max_request_header_size``)."""

    max_header_count: int | None = Field(None, ge=1, description="more headers get 431")
    max_header_size: ByteSize | None = Field(
        None, ge=64, description="a longer name+value gets 431")

    @property
    def enabled(self) -> bool:
        return self.max_header_count is not None or self.max_header_size is not None


class GatewayConfig(Strict):
    """``[gateway]``: the route table and the services routes send traffic to."""

    routes: list[Route] = Field(default_factory=list)
    services: dict[str, Service] = Field(
        default_factory=dict, description="static services: name -> instance URLs"
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: HeaderLimits = Field(default_factory=HeaderLimits)

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        if repeat := first_repeat((route.id for route in self.routes), skip=""):
            index, route_id = repeat
            raise ValueError(f"routes[{index}]: id {route_id!r} is used twice")
        return self
