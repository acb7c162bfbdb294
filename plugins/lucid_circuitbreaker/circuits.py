"""A circuit: one definition, its breaker (or one per instance), outcome
classification, ejection bounded by ``max_ejection_percent``, and the 503 it answers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lucid.model import Instance, Outcome, Rejection
from lucid_circuitbreaker.config import CircuitSpec, Resolved
from lucid_circuitbreaker.machine import (
    CLOSED,
    FORCED_OPEN,
    HALF_OPEN,
    METRICS_ONLY,
    NO_PROBE,
    OPEN,
    Breaker,
)

if TYPE_CHECKING:
    from lucid_circuitbreaker.shared import Shared

NORMAL = "normal"
MODES = (NORMAL, FORCED_OPEN, METRICS_ONLY)
_EJECTING = frozenset({OPEN, HALF_OPEN, FORCED_OPEN})
# in cluster scope, these states are the cluster's (probe slots, probe outcomes)
_SHARED = frozenset({OPEN, HALF_OPEN})

Notify = Callable[["Circuit", Breaker, str, str, str, float], None]


class Circuit:
    """One configured circuit. ``permit``/``record`` are the data path."""

    __slots__ = ("id", "spec", "resolved", "static", "clock", "notify", "mode", "breaker",
                 "instances", "ejected", "suppressed", "service", "slow_threshold",
                 "failure_statuses", "ignored_statuses", "not_success", "revision", "shared",
                 "_answers")

    def __init__(self, circuit_id: str, spec: CircuitSpec, resolved: Resolved, static: bool,
                 clock: Callable[[], float], notify: Notify, mode: str = NORMAL):
        self.id = circuit_id
        self.spec = spec
        self.service = spec.service
        self.resolved = resolved
        self.static = static
        self.revision = 0  # of its definition; set when a generation goes live
        self.shared: Shared | None = None  # cluster scope: the state shared through Redis
        self.clock = clock
        self.notify = notify
        self.mode = NORMAL
        self.slow_threshold = resolved.settings.slow_call_duration_threshold
        self.failure_statuses = resolved.failure_statuses
        self.ignored_statuses = resolved.ignored_statuses
        # an answer with any other status is a success (the data path's one test)
        self.not_success = resolved.failure_statuses | resolved.ignored_statuses
        self.instances: dict[str, Breaker] = {}
        self.ejected: set[str] = set()
        self.suppressed = 0  # refusals waived because of max_ejection_percent
        self._answers: dict[tuple[str, str | None], tuple[dict[str, Any], str]] = {}
        self.breaker: Breaker | None = (
            Breaker(resolved.settings, clock(), self._moved) if resolved.scope == "service"
            else None
        )
        self.set_mode(mode, "restored from the store" if mode != NORMAL else "")

    # the data path --------------------------------------------------------
    def permit(self, instance: Instance) -> Rejection | None:
        breaker = self.breaker
        shared = self.shared
        if breaker is not None:
            if shared is not None and breaker.state in _SHARED and shared.live:
                wait = shared.permit(self, breaker, self.clock())
            else:
                wait = breaker.permit(self.clock())
            return None if wait is None else self._rejection(breaker, wait)
        key = instance.id
        breaker = self.instances.get(key)
        if breaker is None:
            breaker = self._instance_breaker(key)
        if shared is not None and breaker.state in _SHARED and shared.live:
            wait = shared.permit(self, breaker, self.clock())
        else:
            wait = breaker.permit(self.clock())
        if wait is None:
            return None
        if key not in self.ejected:
            if breaker.state != FORCED_OPEN and len(self.ejected) >= self.ejection_cap():
                self.suppressed += 1  # Envoy: never eject beyond max_ejection_percent
                return None
            self.ejected.add(key)
        return self._rejection(breaker, wait, key)

    def record(self, instance: Instance, outcome: Outcome) -> None:
        breaker = self.breaker
        if breaker is None:
            breaker = self.instances.get(instance.id)
            if breaker is None:
                return
        kind = outcome.kind
        r = self.resolved
        if kind == "success" or kind == "error_status":
            status = outcome.status
            if status in self.ignored_statuses:
                self._release(breaker)
                return
            failure = status in self.failure_statuses
        elif (r.record_timeout if kind == "timeout" else
              r.record_connect_error if kind == "connect_error" else r.record_upstream_error):
            failure = True
        else:
            self._release(breaker)
            return
        slow = outcome.duration >= self.slow_threshold
        shared = self.shared
        if shared is not None and breaker.state in _SHARED and shared.live:
            shared.record(self, breaker, (failure, slow))
        else:
            breaker.record(failure, slow, self.clock())

    def _release(self, breaker: Breaker) -> None:
        """An ignored outcome: a probe slot is given back (the cluster's, when shared)."""
        shared = self.shared
        if shared is not None and breaker.state in _SHARED and shared.live:
            shared.record(self, breaker, None)
        else:
            breaker.release(self.clock())

    def learn(self, keys: list[str]) -> None:
        """The instances the service has now: new ones get a breaker, gone ones lose it."""
        current = set(keys)
        for key in list(self.instances):
            if key not in current:
                del self.instances[key]
                self.ejected.discard(key)
        for key in keys:
            if key not in self.instances:
                self._instance_breaker(key)

    def ejection_cap(self) -> int:
        return math.floor(len(self.instances) * self.resolved.max_ejection_percent / 100.0)

    def _rejection(self, breaker: Breaker, wait: float, instance: str | None = None) -> Rejection:
        """The default 503; its body and reason are built once per (state, instance)
        (the core only reads them), so refusing stays cheap under load."""
        parts = self._answers.get((breaker.state, instance))
        if parts is None:
            body: dict[str, Any] = {"circuit": self.id, "state": breaker.state}
            if instance is not None:
                body["instance"] = instance
            reason = f"circuit {self.id!r} is {breaker.state.replace('_', '-')}"
            parts = self._answers[(breaker.state, instance)] = (body, reason)
        if wait == NO_PROBE:
            return Rejection(503, parts[0], [], parts[1], None)
        return Rejection(503, parts[0], [("Retry-After", str(math.ceil(wait) or 1))], parts[1],
                         wait)

    def _instance_breaker(self, key: str) -> Breaker:
        breaker = Breaker(self.resolved.settings, self.clock(), self._moved, key=key)
        self.instances[key] = breaker
        self._apply_mode(breaker, "")
        if self.shared is not None:
            self.shared.refresh_soon()  # the cluster may have ejected it already
        return breaker

    def _moved(self, breaker: Breaker, before: str, after: str, reason: str, now: float) -> None:
        key = breaker.key
        if key:
            if after not in _EJECTING:
                self.ejected.discard(key)
            elif after == FORCED_OPEN or len(self.ejected) < self.ejection_cap():
                self.ejected.add(key)  # at the trip, so status shows it at once
        if self.shared is not None:
            self.shared.moved(self, breaker, before, after, reason)
        self.notify(self, breaker, before, after, reason, now)

    # operator actions -----------------------------------------------------
    def breakers(self) -> list[Breaker]:
        return [self.breaker] if self.breaker is not None else list(self.instances.values())

    def set_mode(self, mode: str, reason: str) -> None:
        self.mode = mode
        for breaker in self.breakers():
            self._apply_mode(breaker, reason)

    def _apply_mode(self, breaker: Breaker, reason: str) -> None:
        now = self.clock()
        if self.mode == FORCED_OPEN:
            breaker.force_open(now, reason or "forced open by operator")
        elif self.mode == METRICS_ONLY:
            breaker.metrics_only(now, reason or "disabled by operator")

    def reset(self) -> None:
        self.mode = NORMAL
        now = self.clock()
        for breaker in self.breakers():
            breaker.reset(now)
        self.ejected.clear()

    def tick(self) -> None:
        now = self.clock()
        shared = self.shared
        for breaker in self.breakers():
            if shared is not None and shared.live:
                shared.tick(self, breaker, now)
            else:
                breaker.tick(now)

    # reading --------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": "static" if self.static else "api",
            "revision": self.revision,
            "service": self.service,
            "mode": self.mode,
            "definition": self.spec.model_dump(exclude_unset=True),
            "effective": self.resolved.effective,
        }

    def status(self, wall_offset: float) -> dict[str, Any]:
        now = self.clock()
        out: dict[str, Any] = {"id": self.id, "service": self.service,
                               "scope": self.resolved.scope, "mode": self.mode}
        if self.breaker is not None:
            out.update(_breaker_status(self.breaker, now, wall_offset))
        else:
            instances = {key: _breaker_status(b, now, wall_offset) for key, b in
                         self.instances.items()}
            for key, data in instances.items():
                data["ejected"] = key in self.ejected
            worst = [d["state"] for d in instances.values()]
            out["state"] = next((s for s in (FORCED_OPEN, OPEN, HALF_OPEN, METRICS_ONLY)
                                 if s in worst), CLOSED)
            out["instances"] = instances
            out["ejected"] = sorted(self.ejected)
            out["ejection_cap"] = self.ejection_cap()
            out["ejections_suppressed"] = self.suppressed
        return out


def _breaker_status(breaker: Breaker, now: float, wall_offset: float) -> dict[str, Any]:
    data = breaker.snapshot(now)
    data["since"] = round(breaker.since + wall_offset, 3)
    wait = data["next_probe_in"]
    data["next_probe_at"] = None if wait is None else round(now + wait + wall_offset, 3)
    return data
