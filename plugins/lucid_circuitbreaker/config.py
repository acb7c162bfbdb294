"""The ``[circuitbreaker]`` config section, the admin payloads, and how a circuit's
settings inherit ``[circuitbreaker.defaults]``.

Setting names are Resilience4j's (snake_case) with Resilience4j's meaning; what
Resilience4j does not have (consecutive failures, per-instance scope, ejection cap,
status sets, fallbacks) is named after Envoy's outlier detection where it can be.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lucid.units import Duration
from lucid_circuitbreaker.machine import Settings

_ID = r"^[A-Za-z0-9._:-]+$"
_STATUS_CLASS = re.compile(r"^([1-5])xx$")
FAILURE_KINDS = ("timeout", "connect_error", "upstream_error")


def expand_statuses(values: list[int | str]) -> frozenset[int]:
    out: set[int] = set()
    for value in values:
        if isinstance(value, str):
            m = _STATUS_CLASS.match(value.strip().lower())
            if not m:
                raise ValueError(f"{value!r}: expected a status (e.g. 503) or a class ('5xx')")
            first = int(m.group(1)) * 100
            out.update(range(first, first + 100))
        elif isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            out.add(value)
        else:
            raise ValueError(f"{value!r}: expected a status between 100 and 599 or a class ('5xx')")
    return frozenset(out)


class Thresholds(BaseModel):
    """Every tunable of a circuit. In ``defaults`` each has a built-in default; in a
    circuit, a field left out (None) inherits ``defaults``."""

    model_config = ConfigDict(extra="forbid")

    failure_rate_threshold: float | None = Field(
        None, gt=0, le=100, description="% of failed calls in the window that trips (R4j)")
    slow_call_rate_threshold: float | None = Field(
        None, gt=0, le=100, description="% of slow calls in the window that trips (R4j)")
    slow_call_duration_threshold: Duration | None = Field(
        None, gt=0, description="a call at least this long is slow (R4j)")
    sliding_window_type: Literal["count_based", "time_based"] | None = Field(
        None, description="last N calls, or calls of the last N seconds (R4j)")
    sliding_window_size: int | None = Field(
        None, gt=0, le=100_000, description="N calls or N seconds (R4j)")
    minimum_number_of_calls: int | None = Field(
        None, ge=1, description="no rate is judged before this many calls in the window (R4j)")
    consecutive_failures: int | None = Field(
        None, ge=0, description="trip after this many failures in a row; 0 is off (Envoy)")
    wait_duration_in_open_state: Duration | None = Field(
        None, gt=0, description="open time before the first probe (R4j)")
    exponential_backoff_multiplier: float | None = Field(
        None, ge=1, le=100, description="open time grows by this at each repeated trip (R4j)")
    max_wait_duration_in_open_state: Duration | None = Field(
        None, gt=0, description="cap of the open time under backoff (R4j)")
    permitted_number_of_calls_in_half_open_state: int | None = Field(
        None, ge=1, le=10_000, description="probe calls in half-open (R4j)")
    max_wait_duration_in_half_open_state: Duration | None = Field(
        None, gt=0, description="half-open gives up and reopens after this (R4j, but bounded)")
    failure_statuses: list[int | str] | None = Field(
        None, description="upstream statuses that count as failures, e.g. [503, '5xx']")
    ignored_statuses: list[int | str] | None = Field(
        None, description="statuses counted neither as success nor failure, e.g. ['4xx']")
    failure_kinds: list[Literal["timeout", "connect_error", "upstream_error"]] | None = Field(
        None, description="transport outcomes that count as failures")
    scope: Literal["service", "instance"] | None = Field(
        None, description="one breaker for the service, or one per instance (ejection)")
    max_ejection_percent: float | None = Field(
        None, ge=0, le=100, description="instance scope: most instances ejected at once (Envoy)")

    @field_validator("failure_statuses", "ignored_statuses")
    @classmethod
    def _statuses(cls, value: list[int | str] | None) -> list[int | str] | None:
        if value is not None:
            expand_statuses(value)
        return value


BUILTIN_DEFAULTS: dict[str, Any] = {
    "failure_rate_threshold": 50.0,
    "slow_call_rate_threshold": 100.0,
    "slow_call_duration_threshold": 60.0,
    "sliding_window_type": "count_based",
    "sliding_window_size": 100,
    "minimum_number_of_calls": 100,
    "consecutive_failures": 0,
    "wait_duration_in_open_state": 60.0,
    "exponential_backoff_multiplier": 1.0,
    "max_wait_duration_in_open_state": 600.0,
    "permitted_number_of_calls_in_half_open_state": 10,
    "max_wait_duration_in_half_open_state": 60.0,
    "failure_statuses": ["5xx"],
    "ignored_statuses": ["4xx"],
    "failure_kinds": list(FAILURE_KINDS),
    "scope": "service",
    "max_ejection_percent": 50.0,
}


class Fallback(BaseModel):
    """What the client gets instead of an open circuit's 503: a static response, or
    the same request sent to another service."""

    model_config = ConfigDict(extra="forbid")

    status: int = Field(200, ge=100, le=599)
    headers: dict[str, str] = Field(default_factory=dict)
    body: str = ""
    service: str | None = Field(None, min_length=1,
                                description="send the request to this service instead")

    @model_validator(mode="after")
    def _one_kind(self) -> Fallback:
        if self.service is not None and (self.body or self.headers or
                                         "status" in self.model_fields_set):
            raise ValueError("give either 'service' or a static response (status, headers, "
                             "body), not both")
        return self


class CircuitSpec(Thresholds):
    """One circuit: which service it guards, its thresholds, its fallback."""

    service: str = Field(min_length=1, description="the service (upstream) this circuit guards")
    fallback: Fallback | None = None


class CircuitCreate(CircuitSpec):
    """``POST /circuitbreaker/circuits``: a spec with its id."""

    id: str = Field(min_length=1, max_length=128, pattern=_ID)


class CircuitBreakerConfig(BaseModel):
    """``[circuitbreaker]``: defaults circuits inherit, and circuits declared in TOML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: Thresholds = Field(default_factory=Thresholds)
    circuits: dict[str, CircuitSpec] = Field(default_factory=dict)
    scope: Literal["cluster", "node"] | None = Field(
        None, description="whose breaker state: 'cluster' (shared by every node and worker "
        "through the Redis backend; the default with one) or 'node' (each process its own; "
        "the default with the local backend)")
    tick_interval: Duration = Field(
        1.0, gt=0, le=60, description="how often idle half-open circuits are checked")

    @field_validator("circuits")
    @classmethod
    def _ids(cls, value: dict[str, CircuitSpec]) -> dict[str, CircuitSpec]:
        for name in value:
            if not re.match(_ID, name):
                raise ValueError(f"circuit id {name!r} may use letters, digits and ._:- only")
        return value


class RouteBreaker(BaseModel):
    """Per-route override, written on a route as
    ``plugins = { circuitbreaker = { circuit = "x", fallback = {...} } }``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    circuit: str | None = Field(None, min_length=1,
                                description="guard this route with this circuit, not its "
                                            "service's")
    fallback: Fallback | None = None


class Resolved:
    """A circuit's effective settings: its own fields over ``defaults`` over built-ins."""

    __slots__ = ("settings", "failure_statuses", "ignored_statuses", "record_timeout",
                 "record_connect_error", "record_upstream_error", "scope",
                 "max_ejection_percent", "effective")

    def __init__(self, effective: dict[str, Any]):
        self.effective = effective
        self.settings = Settings(**{k: effective[k] for k in Settings.__dataclass_fields__})
        self.failure_statuses = expand_statuses(effective["failure_statuses"])
        self.ignored_statuses = expand_statuses(effective["ignored_statuses"])
        kinds = set(effective["failure_kinds"])
        self.record_timeout = "timeout" in kinds
        self.record_connect_error = "connect_error" in kinds
        self.record_upstream_error = "upstream_error" in kinds
        self.scope = effective["scope"]
        self.max_ejection_percent = effective["max_ejection_percent"]


def resolve(
    spec: Thresholds, defaults: Thresholds
) -> tuple[Resolved | None, list[tuple[str, str]]]:
    """Effective settings, or the problems as ``(field, message)`` (cross-field rules
    that only the merged settings can answer)."""
    effective = dict(BUILTIN_DEFAULTS)
    effective.update(defaults.model_dump(exclude_none=True, include=set(BUILTIN_DEFAULTS)))
    effective.update(spec.model_dump(exclude_none=True, include=set(BUILTIN_DEFAULTS)))
    problems: list[tuple[str, str]] = []
    explicit = (spec.minimum_number_of_calls is not None
                or defaults.minimum_number_of_calls is not None)
    if not explicit:  # the built-in 100 shrinks to fit a smaller window
        effective["minimum_number_of_calls"] = min(
            effective["minimum_number_of_calls"], effective["sliding_window_size"])
    if (spec.max_wait_duration_in_open_state is None
            and defaults.max_wait_duration_in_open_state is None):  # the built-in cap grows
        effective["max_wait_duration_in_open_state"] = max(
            effective["max_wait_duration_in_open_state"], effective["wait_duration_in_open_state"])
    if (effective["sliding_window_type"] == "count_based"
            and effective["minimum_number_of_calls"] > effective["sliding_window_size"]):
        problems.append(("minimum_number_of_calls",
                         f"{effective['minimum_number_of_calls']} is more than "
                         f"sliding_window_size ({effective['sliding_window_size']}) of a "
                         "count_based window: the circuit could never trip on a rate"))
    if effective["max_wait_duration_in_open_state"] < effective["wait_duration_in_open_state"]:
        problems.append(("max_wait_duration_in_open_state",
                         f"{effective['max_wait_duration_in_open_state']:g}s is less than "
                         "wait_duration_in_open_state "
                         f"({effective['wait_duration_in_open_state']:g}s)"))
    overlap = (expand_statuses(effective["failure_statuses"])
               & expand_statuses(effective["ignored_statuses"]))
    if overlap:
        problems.append(("ignored_statuses",
                         f"statuses {sorted(overlap)[:5]} are also in failure_statuses"))
    if problems:
        return None, problems
    return Resolved(effective), []
