"""The rate limiter's config: ``[ratelimiter]``, its ``[[ratelimiter.limits]]`` and the
per-route overrides. The same :class:`Limit` model validates TOML and admin payloads,
so a bad rate is refused with the same words wherever it is written.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from lucid.config import first_repeat
from lucid.units import Duration

Algorithm = Literal["token_bucket", "sliding_log", "sliding_window", "fixed_window",
                    "concurrency"]
KeyType = Literal["ip", "user", "api_key", "header", "route", "service", "global"]
HeaderStyle = Literal["all", "ietf", "x", "none"]
BackendFailure = Literal["local", "open", "closed"]
Sync = Literal["strict", "lease"]
LEASE_ALGORITHMS = ("token_bucket", "fixed_window")

PERIODS = {
    "s": 1, "sec": 1, "second": 1,
    "m": 60, "min": 60, "minute": 60,
    "h": 3600, "hour": 3600,
    "d": 86400, "day": 86400,
    "month": 30 * 86400,
}
QUOTA_PERIOD = 3600.0  # windows this long or longer are quotas: persisted in SQLite
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")
_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def parse_rate(text: str) -> tuple[int, float]:
    """``"10/s"``, ``"100/10s"``, ``"10000/day"`` → (requests, period in seconds)."""
    m = _RATE.match(text.lower())
    if m is None:
        raise ValueError(f"{text!r}: expected 'N/period' such as '10/s', '100/10s' or '1000/day'")
    count, multiplier, unit = int(m.group(1)), m.group(2), m.group(3)
    base = PERIODS.get(unit) or PERIODS.get(unit.removesuffix("s"))
    if base is None:
        known = ", ".join(sorted(set(PERIODS) - {"sec", "min"}, key=PERIODS.__getitem__))
        raise ValueError(f"{text!r}: unknown period {unit!r} (known: {known})")
    if count <= 0:
        raise ValueError(f"{text!r}: the rate must be greater than 0")
    if multiplier and int(multiplier) <= 0:
        raise ValueError(f"{text!r}: the period must be greater than 0")
    return count, float(base * (int(multiplier) if multiplier else 1))


class Limit(BaseModel):
    """One limit: how many requests per period (or in flight at once), counted how,
    keyed by what."""

    model_config = ConfigDict(extra="forbid")

    # ``algorithm`` comes before ``rate`` so that the validators of ``rate`` and
    # ``max_in_flight`` see it and a 422 names the field that is missing or out of place
    id: str = Field(pattern=_ID)
    algorithm: Algorithm = "token_bucket"
    rate: str | None = Field(default=None, validate_default=True)
    max_in_flight: int | None = Field(default=None, ge=1, validate_default=True)
    key: KeyType = "ip"
    header: str = Field(default="", validate_default=True)
    burst: int | None = Field(default=None, ge=1, validate_default=True)
    routes: list[str] = Field(default_factory=list)
    tiers: list[str] = Field(default_factory=list)
    # with a Redis [cluster] backend: decide every request in Redis ("strict"), or
    # spend slices of the allowance taken from Redis ahead ("lease"; see README)
    sync: Sync = Field(default="strict", validate_default=True)

    # field validators (not a model validator) so that a 422 names the field
    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None, info: ValidationInfo) -> str | None:
        algorithm = info.data.get("algorithm")
        if algorithm == "concurrency":
            if value is not None:
                raise ValueError("algorithm = 'concurrency' counts requests in flight, not a "
                                 "rate: give max_in_flight = N instead")
            return None
        if value is None:
            if algorithm is None:
                return None  # the algorithm itself is refused; say that only
            raise ValueError("a rate such as '10/s' is required "
                             "(or algorithm = 'concurrency' with max_in_flight)")
        period = parse_rate(value)[1]
        if algorithm == "sliding_log" and period >= QUOTA_PERIOD:
            raise ValueError("sliding_log keeps every request of the window: use "
                             "'sliding_window' or 'fixed_window' for windows of an hour or more")
        return value

    @field_validator("max_in_flight")
    @classmethod
    def _max_in_flight(cls, value: int | None, info: ValidationInfo) -> int | None:
        algorithm = info.data.get("algorithm")
        if algorithm == "concurrency" and value is None:
            raise ValueError("algorithm = 'concurrency' needs max_in_flight = N")
        if algorithm is not None and algorithm != "concurrency" and value is not None:
            raise ValueError("max_in_flight applies to algorithm = 'concurrency' only")
        return value

    @field_validator("header")
    @classmethod
    def _header(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip().lower()
        key = info.data.get("key")
        if key == "header" and not value:
            raise ValueError("key = 'header' needs header = '<name>'")
        if key is not None and key != "header" and value:
            raise ValueError("header is only used with key = 'header'")
        return value

    @field_validator("burst")
    @classmethod
    def _burst(cls, value: int | None, info: ValidationInfo) -> int | None:
        algorithm = info.data.get("algorithm")
        if value is not None and algorithm is not None and algorithm != "token_bucket":
            raise ValueError("burst applies to algorithm = 'token_bucket' only")
        return value

    @field_validator("sync")
    @classmethod
    def _sync(cls, value: str, info: ValidationInfo) -> str:
        algorithm = info.data.get("algorithm")
        if value == "lease" and algorithm is not None and algorithm not in LEASE_ALGORITHMS:
            raise ValueError(f"sync = 'lease' applies to algorithm = 'token_bucket' or "
                             f"'fixed_window' only, not {algorithm!r} (use sync = 'strict')")
        return value

    @property
    def concurrent(self) -> bool:
        return self.algorithm == "concurrency"

    @property
    def count(self) -> int:
        """Requests per period; for a concurrency limit, requests in flight at once."""
        if self.rate is None:
            return self.max_in_flight or 0
        return parse_rate(self.rate)[0]

    @property
    def period(self) -> float:
        """Seconds; 0 for a concurrency limit (it has no window)."""
        return parse_rate(self.rate)[1] if self.rate is not None else 0.0

    @property
    def capacity(self) -> int:
        """Token bucket size: ``burst``, else one period's worth of requests."""
        return self.burst if self.burst is not None else self.count

    @property
    def quota(self) -> bool:
        return self.period >= QUOTA_PERIOD


class RateLimiterConfig(BaseModel):
    """``[ratelimiter]``: inert (no limit, nothing per request) unless limits are declared."""

    model_config = ConfigDict(extra="forbid")

    limits: list[Limit] = Field(default_factory=list)
    headers: HeaderStyle = "all"
    api_key_header: str = "x-api-key"
    tier_claim: str = ""
    default_tier: str = "default"
    max_keys: int = Field(default=1_000_000, ge=1)
    flush_interval: Duration = Field(default=1.0, gt=0)
    sweep_interval: Duration = Field(default=10.0, gt=0)
    # with a Redis [cluster] backend: what decides while Redis does not answer
    on_backend_failure: BackendFailure = "local"
    # a concurrency slot held in Redis expires this long after its holder last renewed
    # it (every third of it), so a killed node's slots come back within it
    concurrency_lease: Duration = Field(default=10.0, ge=0.3, le=3600)

    @field_validator("api_key_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @field_validator("limits")
    @classmethod
    def _unique(cls, limits: list[Limit]) -> list[Limit]:
        if repeat := first_repeat(limit.id for limit in limits):
            raise ValueError(f"limit id {repeat[1]!r} is used twice")
        return limits


class RouteSettings(BaseModel):
    """``plugins = { ratelimiter = { ... } }`` on a route."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    cost: int = Field(default=1, ge=1)
    headers: HeaderStyle | None = None
