"""The ``[loadbalancer]`` section and the pool definition the admin API takes."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lucid.config import SecretText16
from lucid.model import parse_upstream_url
from lucid.units import Duration
from lucid_loadbalancer.algorithms import HASHING, POINTS_PER_WEIGHT, RING_SIZE, is_prime

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (header/cookie name)
SOURCES_WITH_NAME = ("header", "cookie", "query")
SOURCES_PLAIN = ("ip", "path", "subject")

Algorithm = Literal["round_robin", "weighted_round_robin", "least_connections",
                    "least_request", "random", "ring_hash", "maglev"]


def parse_key_spec(spec: str, allow_random: bool = False) -> tuple[str, str]:
    """``"header:x-user"`` -> ``("header", "x-user")``; ``"ip"`` -> ``("ip", "")``.

    Sources: ``header:<name>``, ``cookie:<name>``, ``query:<arg>``, ``ip`` (the client
    IP, after ``server.trusted_proxies``), ``path``, ``subject`` (the ``sub`` claim of
    the authenticated caller); a fallback may also be ``random``.
    """
    source, _, name = spec.strip().partition(":")
    source = source.strip().lower()
    name = name.strip()
    if source in SOURCES_WITH_NAME:
        if not name:
            raise ValueError(f"{spec!r}: {source} needs a name, e.g. '{source}:x-user'")
        if not _TOKEN.match(name):
            raise ValueError(f"{spec!r}: {name!r} is not a valid {source} name")
        return source, name.lower() if source == "header" else name
    if source in SOURCES_PLAIN or (allow_random and source == "random"):
        if name:
            raise ValueError(f"{spec!r}: {source} takes no name")
        return source, ""
    choices = "header:<name>, cookie:<name>, query:<name>, ip, path, subject"
    raise ValueError(f"{spec!r}: expected one of {choices}" + (", random" if allow_random
                                                              else ""))


class InlineInstance(BaseModel):
    """An instance listed in the pool itself, not discovered through the registry."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, description="scheme://host:port")
    weight: int = Field(1, gt=0, le=10_000, description="relative share of traffic")
    id: str | None = Field(None, min_length=1, max_length=256,
                           description="defaults to the URL")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parse_upstream_url(value)
        return value


class SlowStart(BaseModel):
    """Envoy's ``slow_start_config``: a new or newly healthy instance's share ramps
    from ``min_weight_percent`` to full over ``window``:
    ``factor = max(min_weight_percent/100, (elapsed/window) ** (1/aggression))``."""

    model_config = ConfigDict(extra="forbid")

    window: Duration = Field(gt=0, le=3600, description="how long the ramp lasts")
    aggression: float = Field(1.0, gt=0, le=100,
                              description="1.0 is linear; larger ramps faster at first")
    min_weight_percent: float = Field(10.0, ge=0, le=100,
                                      description="the share an instance starts with")


class Affinity(BaseModel):
    """Session affinity: a signed cookie pins a client to the instance that served it
    while that instance stays a candidate."""

    model_config = ConfigDict(extra="forbid")

    cookie: str = Field("lucid_affinity", min_length=1, max_length=64)
    max_age: Duration | None = Field(None, gt=0, description="omitted: a session cookie")
    path: str = Field("/", min_length=1, pattern=r"^/[^;\s]*$")
    secure: bool = False
    http_only: bool = True
    same_site: Literal["Lax", "Strict", "None"] = "Lax"

    @field_validator("cookie")
    @classmethod
    def _cookie(cls, value: str) -> str:
        if not _TOKEN.match(value):
            raise ValueError(f"{value!r} is not a valid cookie name")
        return value


class PoolSpec(BaseModel):
    """One pool: a service, its instances (from the registry, or listed here) and how
    requests are spread over them."""

    model_config = ConfigDict(extra="forbid")

    service: str = Field(min_length=1, max_length=256,
                         description="the service (as routes name it) this pool balances")
    algorithm: Algorithm = "round_robin"
    instances: list[InlineInstance] | None = Field(
        None, description="inline instances; omitted: the service's own (registry or "
                          "[gateway.services])")
    hash_key: str | None = Field(
        None, description="ring_hash/maglev: header:<name>, cookie:<name>, query:<name>, "
                          "ip, path or subject (default ip)")
    hash_fallback: str = Field(
        "random", description="the key when hash_key is missing: another source, or random")
    points_per_weight: int = Field(
        POINTS_PER_WEIGHT, ge=1, le=65_536,
        description="ring_hash: ring positions per unit of an instance's weight (fixed, "
                    "so an instance leaving moves only its own keys)")
    ring_size: int = Field(RING_SIZE, ge=64, le=8_388_608,
                           description="ring_hash: most positions on the ring; above it "
                                       "every instance's positions are halved until it fits")
    table_size: int = Field(65537, ge=7, le=5_000_011,
                            description="maglev: lookup table entries, a prime > 100 x "
                                        "instances")
    bounded_load: float | None = Field(
        None, ge=1.0, le=100.0, description="ring_hash/maglev: no instance above this "
                                            "factor x the average in-flight load")
    choice_count: int = Field(2, ge=2, le=16, description="least_request: instances drawn")
    panic_threshold: float | None = Field(
        None, ge=0, le=100, description="% healthy below which all instances take traffic "
                                        "(default [loadbalancer].panic_threshold)")
    slow_start: SlowStart | None = None
    affinity: Affinity | None = None

    @field_validator("hash_key")
    @classmethod
    def _hash_key(cls, value: str | None) -> str | None:
        if value is not None:
            parse_key_spec(value)
        return value

    @field_validator("hash_fallback")
    @classmethod
    def _fallback(cls, value: str) -> str:
        parse_key_spec(value, allow_random=True)
        return value

    @field_validator("table_size")
    @classmethod
    def _prime(cls, value: int) -> int:
        if not is_prime(value):
            raise ValueError(f"{value} is not prime (Maglev needs a prime table size, "
                             "e.g. 65537)")
        return value

    @field_validator("instances")
    @classmethod
    def _not_empty(cls, value: list[InlineInstance] | None) -> list[InlineInstance] | None:
        if value is not None:
            if not value:
                raise ValueError("an empty pool: list at least one instance, or leave "
                                 "'instances' out to use the service's own")
            seen: set[str] = set()
            for item in value:
                key = item.id or item.url
                if key in seen:
                    raise ValueError(f"instance {key!r} is listed twice")
                seen.add(key)
        return value

    @model_validator(mode="after")
    def _fits_algorithm(self) -> PoolSpec:
        hashing = self.algorithm in HASHING
        for name in ("hash_key", "bounded_load"):
            if getattr(self, name) is not None and not hashing:
                raise ValueError(f"{name} applies to ring_hash and maglev only, not "
                                 f"{self.algorithm}")
        if self.slow_start is not None and hashing:
            raise ValueError(f"slow_start does not apply to {self.algorithm}: a hashed key "
                             "must keep its instance")
        if self.algorithm == "maglev" and self.instances is not None and (
                self.table_size <= len(self.instances)):
            raise ValueError("table_size must be larger than the number of instances")
        return self


class PoolCreate(PoolSpec):
    """``POST /loadbalancer/pools``: a pool with its id."""

    id: str = Field(min_length=1, max_length=128, pattern=_ID)


class LoadBalancerConfig(BaseModel):
    """``[loadbalancer]``: defaults, the affinity signing key and pools declared in TOML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    panic_threshold: float = Field(
        50.0, ge=0, le=100, description="default % healthy below which a pool balances "
                                        "over every instance (Envoy's panic mode); 0 is off")
    affinity_secret: SecretText16 | None = Field(
        None, description="HMAC key of affinity cookies; omitted: a random "
                                         "key kept in loadbalancer.db")
    pools: dict[str, PoolSpec] = Field(default_factory=dict)

    @field_validator("pools")
    @classmethod
    def _ids(cls, value: dict[str, PoolSpec]) -> dict[str, PoolSpec]:
        services: dict[str, str] = {}
        for name, spec in value.items():
            if not re.match(_ID, name):
                raise ValueError(f"pool id {name!r} may use letters, digits and ._:- only")
            if spec.service in services:
                raise ValueError(f"pools {services[spec.service]!r} and {name!r} both "
                                 f"balance service {spec.service!r}")
            services[spec.service] = name
        return value
