"""API-key authentication for Lucid: an admission plugin a third party could publish.

A request names its key in a header (``x-api-key`` by default); the key identifies a
client declared in ``[apikey.keys]``. A request without a valid key is answered 401
with a ``WWW-Authenticate`` challenge and a JSON body, before any upstream sees it.
An admitted request carries its client's name: ``exchange.identity["sub"]`` (what the
rate limiter's ``key = "user"`` counts by) and, to the upstream, the
``X-Consumer-Username`` header (Kong's name for it), which a client cannot set itself.

The plugin runs at admission priority 900: after the gateway's CORS and JWT (1000),
before the rate limiter (800), so a refused request spends no rate-limit allowance.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lucid.model import Exchange, Generation, Rejection
from lucid.plugins import hookimpl
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

__all__ = ["ApiKeyConfig", "ApiKeyPlugin", "Keyring", "RouteSettings", "Tally"]

LUCID_CAPABILITY = "apikey"
SECTION = "apikey"

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP field name (RFC 9110 §5.1)
_CLIENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def _field_name(value: str | None) -> str | None:
    if value is None:
        return None
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return value.lower()  # Lucid gives hooks lower-case header names


class ApiKeyConfig(BaseModel):
    """``[apikey]``. With no ``keys`` (and ``required`` not set) the plugin admits
    everything: installed but not configured, it is inert, as Lucid's built-ins are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    header: str = Field("x-api-key", description="the request header carrying the key")
    keys: dict[str, SecretStr] = Field(
        default_factory=dict, description="client name = key; keys are secrets")
    required: bool = Field(True, description="routes need a key unless they say otherwise")
    hide_credentials: bool = Field(
        False, description="remove the key header before the upstream (Kong's option)")
    realm: str = Field("lucid", pattern=r'^[^"\\]*$', description="of the 401's challenge")
    consumer_header: str | None = Field(
        "x-consumer-username", description="tells the upstream the client's name; "
        "empty: not sent")
    run_on_preflight: bool = Field(
        True, description="false: CORS preflights (OPTIONS) pass without a key")

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        return _field_name(value) or ""

    @field_validator("consumer_header")
    @classmethod
    def _consumer_header(cls, value: str | None) -> str | None:
        return _field_name(value or None)

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        seen: dict[str, str] = {}
        for client, key in value.items():
            if not _CLIENT.match(client):
                raise ValueError(f"client name {client!r}: letters, digits and ._:@- only, "
                                 "at most 128")
            secret = key.get_secret_value()
            if not secret or secret != secret.strip():
                raise ValueError(f"the key of {client!r} is empty or has surrounding spaces")
            if secret in seen:  # the key would identify two clients
                raise ValueError(f"clients {seen[secret]!r} and {client!r} have the same key")
            seen[secret] = client
        return value


class RouteSettings(BaseModel):
    """Per route: ``plugins = { apikey = { required = false } }`` opens a route. On an
    open route a valid key still identifies its client; no key (or a wrong one) is
    admitted anonymously."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    required: bool | None = Field(None, description="None: as [apikey] required says")


def _digest(key: str) -> bytes:
    # Keys are looked up by their SHA-256, so how long a dict lookup takes says nothing
    # about how much of a guessed key was right.
    return hashlib.sha256(key.encode()).digest()


@dataclass(slots=True)
class Tally:
    """Requests admitted per client and refused, for one gateway (across reloads)."""

    admitted: Counter[str] = field(default_factory=Counter)
    refused: int = 0


@dataclass(frozen=True, slots=True)
class Keyring:
    """What the plugin derives from one config generation (``lucid_prepare``)."""

    config: ApiKeyConfig
    by_digest: dict[bytes, str]  # SHA-256 of a key -> client name
    active: bool
    challenge: list[tuple[str, str]]
    tally: Tally

    @classmethod
    def from_config(cls, config: ApiKeyConfig, tally: Tally) -> Keyring:
        return cls(
            config,
            {_digest(key.get_secret_value()): client for client, key in config.keys.items()},
            bool(config.keys) or "required" in config.model_fields_set,
            [("www-authenticate", f'Key realm="{config.realm}"')],
            tally,
        )

    def client(self, key: str) -> str | None:
        return self.by_digest.get(_digest(key))

    def refuse(self, message: str) -> Rejection:
        """401, Kong's wording; the core adds ``status`` and ``request_id`` to the body."""
        return Rejection(401, body={"error": message}, headers=list(self.challenge),
                         reason=message)

    def clients(self) -> list[dict[str, Any]]:
        """The configured clients, by name, with the requests each made: never a key."""
        return [{"name": name, "admitted": self.tally.admitted[name]}
                for name in self.config.keys]


class ApiKeyPlugin:
    """One per gateway, so two gateways in one process keep their own counts."""

    LUCID_ADMISSION_PRIORITY = 900  # after CORS and JWT (1000), before limiting (800)

    def __init__(self) -> None:
        self.tally = Tally()

    @hookimpl
    def lucid_register_config(self, register: Callable[..., None]) -> None:
        register(SECTION, ApiKeyConfig, route_model=RouteSettings)

    @hookimpl
    def lucid_register_admin(self, register: Callable[..., None]) -> None:
        from lucid_apikey.admin import blueprint

        register(blueprint)

    @hookimpl
    def lucid_prepare(self, generation: Generation) -> None:
        generation.state[SECTION] = Keyring.from_config(
            getattr(generation.config, SECTION), self.tally)

    @hookimpl
    def lucid_admit_request(self, exchange: Exchange) -> Rejection | None:
        generation = exchange.generation
        keyring: Keyring | None = generation.state.get(SECTION) if generation else None
        if keyring is None or not keyring.active:
            return None
        config = keyring.config
        headers = exchange.headers
        if config.consumer_header is not None:
            headers.pop(config.consumer_header, None)  # a client cannot name itself
        settings: RouteSettings | None = exchange.overrides.get(SECTION)
        required = (config.required if settings is None or settings.required is None
                    else settings.required)
        if (not config.run_on_preflight and exchange.method == "OPTIONS"
                and "origin" in headers and "access-control-request-method" in headers):
            return None
        presented = (headers.pop(config.header, None) if config.hide_credentials
                     else headers.get(config.header))
        client = keyring.client(presented) if presented else None
        if client is None:
            if not required:
                return None
            keyring.tally.refused += 1
            return keyring.refuse("No API key found in request" if presented is None
                                  else "Invalid authentication credentials")
        keyring.tally.admitted[client] += 1
        if exchange.identity is None:  # a verified JWT (checked first) keeps its identity
            exchange.identity = {"sub": client, "auth": "apikey"}
        exchange.attributes["apikey.client"] = client
        if config.consumer_header is not None:
            headers[config.consumer_header] = client
            exchange.set_request_headers |= {config.consumer_header}
        return None
