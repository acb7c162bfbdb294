"""Reading and validating ``cluster.toml``.

Two passes, because the config's shape depends on the plugins it enables: the
``[plugins]`` table is read first to choose plugins, then every section is validated
against the models those plugins registered. Environment variables
``LUCID_<SECTION>__<KEY>`` override the file. Every problem is reported with the
file, the dotted key, the value found and what was expected.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Secret,
    SecretBytes,
    SecretStr,
    StringConstraints,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from lucid.passive import PassiveConfig
from lucid.units import ByteSize, Duration

_SECRET_TYPES = (SecretStr, SecretBytes, Secret)

# Secret text of a least length, refused as a ``str`` field would be ("String should
# have at least 32 characters"; ``SecretStr`` with ``min_length`` says "items").
SecretText16 = Secret[Annotated[str, StringConstraints(min_length=16)]]
SecretText32 = Secret[Annotated[str, StringConstraints(min_length=32)]]

ENV_PREFIX = "LUCID_"
ENV_DELIMITER = "__"

# Secrets are found two ways, and redacted wherever config or a written body is shown
# (``GET /gateway/config``, ``lucid config export``, the audit log, config errors):
#
# * by type: a field of a pydantic model typed ``SecretStr``, ``SecretBytes`` or
#   ``Secret[...]``, whatever it is called (a third-party plugin's ``key``);
# * by the key that holds it, in any section: a plugin's ``*_secret``, ``password`` or
#   ``api_key`` is hidden without it declaring anything (operators rely on this).
#
# A password inside a URL (``redis://user:pw@host``) is hidden in any string.
REDACTED = "***"
SECRET_WORDS = ("secret", "password", "passwd", "token", "private", "credential",
                "api_key", "apikey")

EVERY_ITEM = "[*]"  # a secret tree's key for "every item of this list, every value of this table"
_LEAF: dict[str, Any] = {}  # a secret tree's mark for "this value is a secret"
SecretTree = dict[str, Any]


class RouteOverrides:
    """Marks a model field holding per-route plugin settings by section (the built-in
    router's ``plugins``: ``{section: settings}``), typed ``dict[str, Any]`` since the
    sections are the plugins'. Redaction then reads each section's secrets from the
    ``route_model`` its plugin registered::

        plugins: Annotated[dict[str, dict[str, Any]], RouteOverrides()]
    """


def is_secret_key(key: object) -> bool:
    """Whether a setting (or JSON key) by this name holds a secret."""
    return isinstance(key, str) and any(w in key.lower() for w in SECRET_WORDS)


def is_secret_type(annotation: Any) -> bool:
    """Whether a field of this type holds a secret: ``SecretStr``, ``SecretBytes``,
    ``Secret[...]`` (also inside ``Annotated``)."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    annotation = get_origin(annotation) or annotation
    return isinstance(annotation, type) and issubclass(annotation, _SECRET_TYPES)


def secret_fields(model: Any, route_models: Mapping[str, type[BaseModel]] | None = None,
                  ) -> SecretTree | None:
    """Where ``model`` (a pydantic model class, or any type) keeps secrets, as a tree:
    ``{"server": {"admin_secret": {}}}``, with ``"[*]"`` for every item of a list or
    value of a table and ``{}`` at a secret; None when it keeps none. ``route_models``
    (section -> model) are read into a field marked :class:`RouteOverrides`. Pass the
    tree to :func:`redact`."""
    routes = tuple(sorted((route_models or {}).items()))
    try:
        return _cached_secret_fields(model, routes)
    except TypeError:  # an unhashable annotation: not worth a cache
        return _secret_fields(model, routes, frozenset())


@functools.lru_cache(maxsize=512)
def _cached_secret_fields(model: Any, routes: tuple[tuple[str, Any], ...]) -> SecretTree | None:
    return _secret_fields(model, routes, frozenset())


def _secret_fields(annotation: Any, routes: tuple[tuple[str, Any], ...],
                   visiting: frozenset[Any]) -> SecretTree | None:
    """None: no secret inside; ``_LEAF``: a secret; else a tree."""
    if is_secret_type(annotation):
        return _LEAF
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *meta = get_args(annotation)
        if any(isinstance(m, RouteOverrides) or m is RouteOverrides for m in meta):
            tree = {section: found for section, model in routes
                    if (found := _secret_fields(model, routes, visiting)) is not None}
            return tree or None
        return _secret_fields(inner, routes, visiting)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation in visiting:  # a recursive model: its secrets are found once
            return None
        inside = visiting | {annotation}
        tree = {name: found for name, field in annotation.model_fields.items()
                if (found := _secret_fields(_annotated(field), routes, inside)) is not None}
        return tree or None
    if origin in (Union, UnionType):
        merged: SecretTree | None = None
        for arg in get_args(annotation):
            merged = merge_secrets(merged, _secret_fields(arg, routes, visiting))
        return merged
    if isinstance(origin, type) and issubclass(origin, Iterable) and not issubclass(
            origin, str | bytes):
        items: SecretTree | None = None
        args = get_args(annotation)
        for arg in (args[1:] if issubclass(origin, Mapping) else args):
            if arg is not Ellipsis:
                items = merge_secrets(items, _secret_fields(arg, routes, visiting))
        return {EVERY_ITEM: items} if items is not None else None
    return None


def _annotated(field: Any) -> Any:
    """A model field's type with its ``Annotated`` metadata (pydantic keeps it apart)."""
    if field.metadata:
        return Annotated[(field.annotation, *field.metadata)]
    return field.annotation


def merge_secrets(a: SecretTree | None, b: SecretTree | None) -> SecretTree | None:
    """Secrets found in either tree (a value that may be of two models)."""
    if a is None or b is None:
        return a if b is None else b
    if a is _LEAF or b is _LEAF:
        return _LEAF
    out = dict(a)
    for key, sub in b.items():
        out[key] = merge_secrets(out.get(key), sub)
    return out


def secrets_at(tree: SecretTree | None, loc: Iterable[Any]) -> SecretTree | None:
    """The part of a secret tree under ``loc`` (keys and list indexes)."""
    for part in loc:
        if tree is None or tree is _LEAF:
            break
        tree = _child(tree, part)
    return tree


def redact(value: Any, secrets: SecretTree | None = None) -> Any:
    """A JSON-like value with every secret replaced by ``***``: what ``GET
    /gateway/config``, ``lucid config export``, the audit log and config errors show.

    ``secrets`` (from :func:`secret_fields`) says where the value's model keeps
    ``SecretStr`` fields; keys that look secret are hidden whatever the model, and so
    is a password inside a URL. A number or a flag under a secret-looking key is kept:
    it is a count or a switch (``token_cache_size``), never a key, and hiding it would
    make an export that no longer loads."""
    if secrets is _LEAF:
        return value if value is None else REDACTED
    if isinstance(value, dict):
        return {k: _redact_item(k, v, _child(secrets, k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, _child(secrets, None)) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def _child(tree: SecretTree | None, key: Any) -> SecretTree | None:
    if not tree:
        return None
    if isinstance(key, str) and key in tree:
        return tree[key]  # type: ignore[no-any-return]
    return tree.get(EVERY_ITEM)


def _redact_item(key: Any, value: Any, secrets: SecretTree | None = None) -> Any:
    if secrets is _LEAF:
        return value if value is None else REDACTED
    if value is None or isinstance(value, bool | int | float) or not is_secret_key(key):
        return redact(value, secrets)
    return REDACTED


# scheme://user:password@host; the password runs to the authority's last "@"
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^/\s]*(?=@)")


def redact_url(text: str) -> str:
    """``text`` with the password of any URL in it hidden: ``redis://user:***@host``
    (``redis://:***@host`` without a user name); anything else unchanged."""
    if "@" not in text or "://" not in text:
        return text
    return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)


def reveal(instance: Any, dumped: Any) -> Any:
    """``dumped`` (``instance.model_dump(mode="json")``, any ``exclude_*``) with its
    secrets in clear: pydantic writes a ``SecretStr`` as ``"**********"``, which is
    neither the value (a backup must restore it) nor ``***`` (what Lucid shows)."""
    if isinstance(instance, _SECRET_TYPES):
        secret = instance.get_secret_value()
        return secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret
    if isinstance(instance, BaseModel) and isinstance(dumped, dict):
        return {k: reveal(getattr(instance, k, None), v) if k in type(instance).model_fields
                else v for k, v in dumped.items()}
    if isinstance(instance, Mapping) and isinstance(dumped, dict):
        return {k: reveal(instance.get(k), v) for k, v in dumped.items()}
    if isinstance(instance, list | tuple) and isinstance(dumped, list) and len(
            instance) == len(dumped):
        return [reveal(i, d) for i, d in zip(instance, dumped, strict=True)]
    return dumped


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` are lines ready to show an operator."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"lucid: invalid config {self.source}:"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected 'host:port', e.g. '127.0.0.1:8080' (port 0 picks a free one)")
    return value


class TLSCertificate(BaseModel):
    """``[[server.tls.certificates]]``: one more certificate, chosen by SNI."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert: str = Field(description="PEM certificate chain (relative to the config file)")
    key: str = Field(description="PEM private key of ``cert`` (not encrypted)")
    server_names: list[Annotated[str, StringConstraints(min_length=1)]] = Field(
        default_factory=list, description="host names it answers for ('*.example.com' "
        "allowed); default: the DNS names in the certificate's subjectAltName")


class ServerTLS(BaseModel):
    """``[server.tls]``: TLS termination on the proxy listener (HTTPS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert: str = Field(description="PEM certificate chain served when no SNI name matches "
                      "another certificate (relative to the config file)")
    key: str = Field(description="PEM private key of ``cert`` (not encrypted)")
    min_version: Literal["1.2", "1.3"] = Field(
        "1.2", description="oldest TLS version accepted: '1.2' or '1.3'")
    certificates: list[TLSCertificate] = Field(
        default_factory=list, description="more certificates, chosen by the SNI name the "
        "client sends")


class ServiceConfig(BaseModel):
    """``[services.<name>]``: how the proxy connects to a service's ``https://``
    instances, whichever plugin lists them (``[gateway.services]``, the registry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tls_ca: str | None = Field(None, description="PEM CA certificates that sign the "
                               "instances' certificates (instead of the system's)")
    tls_verify: bool = Field(True, description="check the instances' certificates and "
                             "host names; false is allowed, and logged as a warning")
    tls_cert: str | None = Field(None, description="PEM client certificate chain (mTLS)")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    tls_server_name: str | None = Field(
        None, min_length=1, description="the name sent by SNI and checked in the "
        "certificate; default: the instance URL's host")

    @model_validator(mode="after")
    def _pairs(self) -> ServiceConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give tls_cert and tls_key together (a client certificate "
                             "and its private key)")
        if not self.tls_verify and self.tls_ca is not None:
            raise ValueError("tls_ca is unused with tls_verify = false: give one or the "
                             "other")
        return self


class ServerConfig(BaseModel):
    """``[server]``: listeners, processes and what the proxy trusts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    proxy: str = Field("127.0.0.1:8080", description="data-plane listener, host:port")
    admin: str = Field("127.0.0.1:8081", description="admin API listener, host:port")
    workers: int = Field(1, ge=1, le=64, description="proxy processes sharing the proxy port")
    engine: Literal["fast", "hypercorn"] = Field(
        "fast", description="proxy listener's HTTP server: 'fast' (HTTP/1.1, llhttp on "
        "uvloop; over TLS too) or 'hypercorn' (HTTP/1.1 and HTTP/2: h2c, or h2 over TLS)")
    tls: ServerTLS | None = Field(None, description="TLS termination on the proxy "
                                  "listener; the admin API stays plain HTTP")
    data_dir: str = Field("data", description="SQLite files and state; relative to the config")
    grace_period: Duration = Field(10.0, ge=0, description="drain time on SIGTERM")
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list,
        description="peers whose X-Forwarded-* headers are believed (CIDR)",
    )
    forwarded: bool = Field(False, description="send an RFC 7239 Forwarded header upstream")
    x_real_ip: bool = Field(False, description="send X-Real-IP: the client's address")
    upstream_connections: int = Field(
        1000, ge=1, description="keep-alive pool size across all upstreams"
    )
    upstream_keepalive: Duration = Field(30.0, gt=0, description="idle upstream connection life")
    max_request_header_size: ByteSize = Field(
        65536, ge=1024,
        description="larger request heads get 431 (414 if the request line alone is larger)",
    )
    max_request_headers: int = Field(
        100, ge=1, description="requests with more header fields get 431 (Envoy's default)"
    )
    # 20 s: a real client sends its head in one round trip, even a 64 KiB one over a
    # slow mobile link takes a few seconds; Apache's mod_reqtimeout waits 20 s for a
    # head (nginx's client_header_timeout 60 s). A trickling client holds a connection
    # that long at most, not for the 75 s keep-alive.
    request_head_timeout: Duration = Field(
        20.0, gt=0, description="a request head must arrive within this, from its first "
        "byte (408, then close); separate from the 75 s keep-alive"
    )
    # nginx closes a proxied WebSocket after 60 s without a byte (proxy_read_timeout);
    # applications ping more often than that, and a longer default forgives one that
    # pings every few minutes. Idle past it: a 1001 close frame to both sides.
    websocket_idle_timeout: Duration = Field(
        300.0, gt=0, description="a proxied WebSocket with no frame either way for this "
        "long is closed (1001 to both sides)")
    via: str = Field("lucid", pattern=r"^[A-Za-z0-9._-]+$",
                     description="pseudonym in the Via header")
    admin_secret: SecretText32 | None = Field(
        None, description="key that signs admin API tokens (lucid init makes one)"
    )
    admission_order: list[str] = Field(
        default_factory=list,
        description="plugins whose admission runs first, in this order; the others "
                    "follow by priority (gateway 1000, ratelimiter 800, others 500)")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    passive: PassiveConfig = Field(
        default_factory=PassiveConfig,
        description="passive health: the proxy's own failed calls eject an instance")

    @field_validator("proxy", "admin")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        return _listen(value)


class ClusterConfig(BaseModel):
    """``[cluster]``: where dynamic definitions and membership live. ``local`` (the
    default) is one node with its state under ``data_dir``; a Redis URL shares them
    between every node (and worker) pointed at it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str = Field("local", description="'local', or a redis:// or rediss:// URL "
                         "(user and password in the URL)")
    node_id: str | None = Field(None, min_length=1, max_length=200,
                                pattern=r"^[A-Za-z0-9._:@-]+$",
                                description="unique per node; default: hostname:proxy port")
    key_prefix: str = Field("lucid:", max_length=200,
                            description="prefix of every Redis key; clusters may share a Redis")
    # 50 ms: a Redis on the same network answers in well under a millisecond; no
    # admin request or revision check should wait longer on one that stopped.
    timeout: Duration = Field(0.05, gt=0, le=10,
                              description="Redis socket timeout (connect and each call)")
    check_interval: Duration = Field(0.5, gt=0, le=60, description="revision check besides "
                                     "pub/sub, which drops messages while reconnecting")
    heartbeat: Duration = Field(1.0, gt=0, le=60, description="membership renewal; a node is "
                                "shown dead after 3 missed renewals")
    forget_after: Duration = Field(60.0, gt=0, description="a dead node leaves the list")

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, value: str) -> str:
        from lucid.cluster import check_backend_url

        return check_backend_url(value)


class _RootBase(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        frozen=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file: that is what an override is for.
        return env_settings, init_settings


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except IsADirectoryError:
        raise ConfigError(str(path), ["is a directory, expected a TOML file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None


def plugin_choices(data: Mapping[str, Any], source: str) -> dict[str, str | bool]:
    """The ``[plugins]`` table (capability -> plugin name, or false), env overrides applied."""
    table = data.get("plugins", {})
    if not isinstance(table, dict):
        raise ConfigError(source, [f"plugins = {table!r}: expected a table"])
    choices: dict[str, str | bool] = dict(table)
    prefix = f"{ENV_PREFIX}PLUGINS{ENV_DELIMITER}"
    for name, value in os.environ.items():
        if name.upper().startswith(prefix):
            lowered = value.strip().lower()
            parsed: str | bool = {"false": False, "true": True}.get(lowered, value.strip())
            choices[name[len(prefix):].lower()] = parsed
    problems = [
        f"plugins.{cap} = {val!r}: expected a plugin name, true or false"
        for cap, val in choices.items()
        if not isinstance(val, str | bool) or val == ""
    ]
    if problems:
        raise ConfigError(source, problems)
    return choices


def build_root_model(sections: Mapping[str, type[BaseModel]]) -> type[BaseSettings]:
    """The root settings model: ``[server]``, ``[plugins]`` and one field per plugin section."""
    fields: dict[str, Any] = {
        "server": (ServerConfig, Field(default_factory=lambda: ServerConfig())),
        "plugins": (dict[str, str | bool], Field(default_factory=dict)),
        "cluster": (ClusterConfig, Field(default_factory=lambda: ClusterConfig())),
        "services": (dict[str, ServiceConfig], Field(default_factory=dict)),
    }
    for name, model in sections.items():
        fields[name] = (model, Field(default_factory=model))
    return create_model("LucidConfig", __base__=_RootBase, **fields)


def validate_config(
    data: Mapping[str, Any],
    sections: Mapping[str, type[BaseModel]],
    source: str,
    ignored: frozenset[str] = frozenset(),
    route_models: Mapping[str, type[BaseModel]] | None = None,
) -> BaseSettings:
    """Validate a whole config; raise ConfigError listing every problem (secrets
    hidden, those of ``route_models`` in a route's settings too)."""
    model = build_root_model(sections)
    data = {k: v for k, v in data.items() if k not in ignored}
    try:
        return model(**data)
    except ValidationError as exc:
        raise ConfigError(source, describe_errors(exc, model, data, route_models)) from None
    except SettingsError as exc:
        # pydantic-settings decodes lists and tables from the environment as JSON
        # itself, and its error names neither the variable nor the value.
        raise ConfigError(source, undecodable_env(model) or [f"environment: {exc}"]) from None


def undecodable_env(model: type[BaseModel]) -> list[str]:
    """``LUCID_*`` variables that set a list or table but do not hold JSON."""
    problems = []
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        loc = name[len(ENV_PREFIX):].lower().split(ENV_DELIMITER)
        if not _is_structured(_annotation_at(model, loc)):
            continue
        try:
            json.loads(value)
        except ValueError:
            # Not JSON, so not redactable key by key: hidden whole if it may hold one.
            hidden = is_secret_key(value) or secrets_at(secret_fields(model), loc) is not None
            problems.append(
                f"{dotted(loc)} = {shown(loc, REDACTED if hidden else value)!r}: a list or "
                "table set from the "
                "environment must be "
                f"JSON, e.g. '[\"a\", \"b\"]' (set by environment variable {name.upper()})"
            )
    return problems


def _annotation_at(model: type[BaseModel], loc: list[str]) -> Any:
    """The type of the setting at ``loc``; a part under a ``dict`` is one of its keys."""
    annotation: Any = model
    for part in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
    return annotation


def _is_structured(annotation: Any) -> bool:
    """Whether pydantic-settings reads this type from the environment as JSON."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        return any(_is_structured(arg) for arg in get_args(annotation))
    return origin in (list, dict, set, frozenset, tuple)


def describe_errors(exc: ValidationError, model: type[BaseModel], data: Any,
                    route_models: Mapping[str, type[BaseModel]] | None = None) -> list[str]:
    """One line per problem: dotted key, the value found (never a secret's), what was
    expected."""
    problems = []
    secrets = secret_fields(model, route_models)
    for error in exc.errors(include_url=False):
        loc = [p for p in error["loc"] if p not in _UNION_TAGS]
        key = dotted(loc) or "(top level)"
        kind = error["type"]
        if kind == "missing":
            problems.append(f"{key}: missing, required")
        elif kind == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
            problems.append(f"{key}: unknown key{hint}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(
                f"{key} = {shown(loc, error.get('input'), secrets)!r}: {message}")
        env = env_name(loc)
        if env and env in {k.upper() for k in os.environ}:
            problems[-1] += f" (set by environment variable {env})"
    return problems


def shown(loc: list[Any], value: Any, secrets: SecretTree | None = None) -> Any:
    """A value as a config error may print it: an operator's log is no place for a
    secret (a too-short ``admin_secret`` from the environment, an issuer table that
    fails its own check, a plugin's ``SecretStr`` field whatever its name).
    ``secrets`` is the validated model's :func:`secret_fields`."""
    return _redact_item(loc[-1] if loc else "", value, secrets_at(secrets, loc))


_UNION_TAGS = {"str", "bool", "int", "float", "list[str]", "dict[str,any]"}


def first_repeat(values: Iterable[Any], skip: Any = None) -> tuple[int, Any] | None:
    """The index and value of the first value seen before (ignoring ``skip``), if any:
    for models whose list items must have unique ids."""
    seen: set[Any] = set()
    for index, value in enumerate(values):
        if value == skip:
            continue
        if value in seen:
            return index, value
        seen.add(value)
    return None


def dotted(loc: list[Any] | tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def env_name(loc: list[Any]) -> str | None:
    if not loc or any(isinstance(p, int) for p in loc):
        return None
    return ENV_PREFIX + ENV_DELIMITER.join(str(p).upper() for p in loc)


def _allowed_keys(model: type[BaseModel], loc: list[Any]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = _inner_model(fields[part].annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside ``Model``, ``list[Model]``, ``dict[str, Model]`` or ``Model | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def data_dir(config: Any, config_path: Path | None) -> Path:
    """``server.data_dir`` resolved against the config file's folder, as an absolute path."""
    path = Path(config.server.data_dir)
    if not path.is_absolute() and config_path is not None:
        path = config_path.parent / path
    return Path(os.path.abspath(path))  # "conf/../data" reads as the folder it is
