"""The objects hooks receive and return on the data path.

They are plain classes rather than pydantic models (slotted, but for
:class:`Exchange`): one of each is made per request, and validation already happened
when the config or admin payload was read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from lucid.definitions import Definition, Kind, Snapshot, merged

if TYPE_CHECKING:
    from pydantic import BaseModel

    from lucid.runtime import Runtime

OutcomeKind = Literal["success", "error_status", "timeout", "connect_error", "upstream_error"]


def parse_upstream_url(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an instance URL, or ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: give scheme, host and port only")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    return parts.scheme, parts.hostname, port


@dataclass(slots=True, eq=False)
class Instance:
    """One upstream instance of a service."""

    id: str
    url: str
    service: str
    weight: int = 1
    zone: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    status: str = "passing"

    @property
    def base(self) -> str:
        return self.url.rstrip("/")

    @classmethod
    def from_url(cls, service: str, url: str, **kwargs: Any) -> Instance:
        scheme, host, port = parse_upstream_url(url)
        base = f"{scheme}://{host}:{port}"
        return cls(id=kwargs.pop("id", base), url=base, service=service, **kwargs)


class Candidates(list):  # type: ignore[type-arg]
    """The healthy instances of a service, as ``lucid_resolve_instances`` returns them,
    plus ``everyone``: all its instances that may take traffic, of any health.

    A plain list is a valid answer too. A selection plugin uses ``everyone`` to apply
    a panic threshold: when too small a share is healthy, spread load over all of them
    rather than crush the few (Envoy's panic mode).
    """

    __slots__ = ("everyone",)

    def __init__(self, healthy: list[Instance], everyone: list[Instance]):
        super().__init__(healthy)
        self.everyone = everyone


@dataclass(slots=True)
class RetryBudget:
    """Envoy-style retry budget: retries in flight stay under a share of active requests."""

    percent: float = 20.0
    min_concurrency: int = 3
    active_requests: int = 0
    active_retries: int = 0

    def allows_retry(self) -> bool:
        limit = max(self.min_concurrency, self.active_requests * self.percent / 100.0)
        return self.active_retries < limit


@dataclass(slots=True, eq=False)
class RoutePolicy:
    """How the core proxies for one route; the routing plugin builds one per route."""

    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    total_timeout: float = 60.0
    attempts: int = 2
    retry_on_status: frozenset[int] = frozenset({502, 503, 504})
    max_body_size: int | None = None
    preserve_host: bool = False
    budget: RetryBudget = field(default_factory=RetryBudget)
    client_timeout: Any = None  # all three timeouts, for a plugin's own upstream call
    io_timeout: Any = None  # connect and read only: the core keeps the total deadline
    websocket_idle_timeout: float | None = None  # None: [server] websocket_idle_timeout

    def __post_init__(self) -> None:
        import aiohttp

        self.client_timeout = aiohttp.ClientTimeout(
            total=self.total_timeout, sock_connect=self.connect_timeout,
            sock_read=self.read_timeout,
        )
        self.io_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout,
        )


DEFAULT_POLICY = RoutePolicy()


@dataclass(slots=True)
class Rejection:
    """An answer given instead of calling the upstream (auth failure, rate limit, breaker)."""

    status: int
    body: bytes | str | dict[str, Any] = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    reason: str = ""
    retry_after: float | None = None


@dataclass(slots=True)
class Outcome:
    """How one upstream call ended, as failure hooks see it."""

    kind: OutcomeKind
    status: int | None
    duration: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "success"


@dataclass(slots=True)
class Event:
    """A lifecycle event: ``instance_registered``, ``breaker_transition``, ``config_reloaded`` …"""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """One route as other plugins may read it: ``generation.routes``, set by the
    routing plugin in its ``lucid_prepare`` (which runs before the others')."""

    id: str
    service: str
    policy: RoutePolicy
    overrides: Mapping[str, Any]  # per-route plugin settings, validated, by section
    origin: Literal["static", "dynamic"] = "static"


def route_settings(
    plugins: Mapping[str, Mapping[str, Any]], key: str,
    route_models: Mapping[str, type[BaseModel]], disabled: frozenset[str], problems: list[str],
) -> dict[str, Any]:
    """One route's per-plugin settings (``plugins = { <section> = {...} }``), each
    validated by the ``route_model`` its plugin registered: what a router puts in
    ``exchange.overrides`` and ``RouteInfo.overrides``. Settings of a capability
    switched off in ``[plugins]`` are ignored, like its config section, so switching a
    plugin off is one line. Problems are appended to ``problems`` under the dotted
    ``key`` of the route's ``plugins`` table. Every routing plugin needs this rule."""
    from pydantic import ValidationError

    from lucid.config import describe_errors

    validated: dict[str, Any] = {}
    for section, values in plugins.items():
        if section in disabled:
            continue
        model = route_models.get(section)
        if model is None:
            known = ", ".join(sorted(route_models)) or "none"
            problems.append(f"{key}.{section}: no enabled plugin takes per-route settings "
                            f"named {section!r} (known: {known})")
            continue
        try:
            validated[section] = model.model_validate(values)
        except ValidationError as exc:
            problems += [f"{key}.{section}.{p}" for p in describe_errors(exc, model, values)]
    return validated


@dataclass(eq=False)
class Generation:
    """One validated config and what plugins derived from it.

    Each request reads ``runtime.generation`` once and uses that object to its end, so
    a reload swaps one reference and in-flight requests finish on the generation they
    started with. ``config`` is the root model built for the enabled plugins: its
    sections are attributes named after them (``config.server``, ``config.gateway``).
    """

    number: int
    config: Any  # built at startup from the plugins' sections: no static type exists
    source: str
    capabilities: frozenset[str] = frozenset()
    disabled: frozenset[str] = frozenset()  # capabilities switched off in [plugins]
    route_models: dict[str, type[BaseModel]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # per plugin, by plugin name
    runtime: Runtime | None = None  # the Runtime this generation belongs to
    loaded_at: float = field(default_factory=time.time)
    routes: tuple[RouteInfo, ...] = ()  # set by the routing plugin in lucid_prepare
    definitions: Snapshot = field(default_factory=Snapshot)  # the dynamic ones, committed
    kinds: Mapping[str, Kind] = field(default_factory=dict)
    _defined: dict[str, dict[str, Definition]] = field(default_factory=dict, repr=False)

    def route_settings(self, plugins: Mapping[str, Mapping[str, Any]], key: str,
                       problems: list[str]) -> dict[str, Any]:
        """A route's per-plugin settings, validated for this generation's plugins
        (:func:`route_settings`)."""
        return route_settings(plugins, key, self.route_models, self.disabled, problems)

    def defined(self, kind: str) -> dict[str, Definition]:
        """Every definition of ``kind`` in this generation, by id: the config file's
        (``origin == "static"``, file order), then the admin API's (id order)."""
        found = self._defined.get(kind)
        if found is None:
            registered = self.kinds.get(kind)
            if registered is None:
                raise KeyError(f"no plugin registered definitions of kind {kind!r}")
            found = self._defined[kind] = merged(
                registered.declared(self.config), self.definitions, kind)
        return found


@dataclass(eq=False, init=False)
class Exchange:
    """One request through the proxy, from arrival to the last byte of the response.

    Hooks read it and may annotate it: ``identity`` (set by auth), ``attributes``
    (free-form, for one plugin to leave something for another) and
    ``response_headers`` (added to whatever response the client gets, e.g. rate-limit
    headers on an admitted request).

    One is made per request, so it is not slotted and its ``__init__`` is written out:
    a field left at its default is the class's value, read through, not copied into
    every exchange (the generated ``__init__`` of forty fields measured about four
    times the cost of this one).
    """

    request_id: str
    method: str
    path: str  # normalised, percent-decoded
    query: str
    host: str
    scheme: str
    client_ip: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    started: float
    generation: Generation | None = None  # the config generation this request runs under
    route: Any = None  # the routing plugin's route object, once matched
    policy: RoutePolicy = DEFAULT_POLICY
    route_id: str = ""
    service: str = ""
    path_params: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # per-route plugin settings
    upstream_path: str = ""
    instances: Any = None  # what lucid_resolve_instances answered (a list or Candidates)
    instance: Instance | None = None
    attempts: int = 0
    status: int = 0
    body: bytes | None = None  # the request body when the core buffered it (<= 64 KiB)
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_started: float = 0.0
    upstream_duration: float = 0.0
    duration: float = 0.0
    outcome: Outcome | None = None
    rejection: Rejection | None = None
    error: str = ""
    identity: dict[str, Any] | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    # upstream response headers to drop, lower-case (a plugin's own policy wins, e.g. CORS)
    drop_response_headers: frozenset[str] = frozenset()
    # request headers a plugin set, lower-case (the gateway's claim headers): a client's
    # Connection header cannot remove them, and their underscore twins are dropped
    set_request_headers: frozenset[str] = frozenset()
    # the headers the proxy sends upstream, made once before the first attempt (read
    # them through lucid.proxy.upstream_request)
    upstream_headers: list[tuple[str, str]] | None = None

    def __init__(self, request_id: str, method: str, path: str, query: str, host: str,
                 scheme: str, client_ip: str, headers: dict[str, str], started: float,
                 generation: Generation | None = None, **fields: Any):
        self.request_id = request_id
        self.method = method
        self.path = path
        self.query = query
        self.host = host
        self.scheme = scheme
        self.client_ip = client_ip
        self.headers = headers
        self.started = started
        self.generation = generation
        self.path_params = {}
        self.overrides = {}
        self.attributes = {}
        self.response_headers = []
        if fields:
            unknown = fields.keys() - _EXCHANGE_FIELDS
            if unknown:
                raise TypeError(f"Exchange has no field {', '.join(sorted(unknown))}")
            for name, value in fields.items():
                setattr(self, name, value)


_EXCHANGE_FIELDS = frozenset(Exchange.__dataclass_fields__)


def __getattr__(name: str) -> Any:
    """``lucid.model.Runtime``: the running gateway's class, imported on first use
    (``lucid.runtime`` imports this module)."""
    if name == "Runtime":
        from lucid.runtime import Runtime

        return Runtime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
