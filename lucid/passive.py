"""Passive health (outlier detection): the proxy's own failed calls eject an instance.

Every instance is covered, whichever plugin declared it (``[gateway.services]``, the
registry, a load-balancer pool): the core sees every attempt, so it keeps the
counters, as Envoy's outlier detection and nginx's ``max_fails``/``fail_timeout`` do.
``connect_failures`` refused connections in a row, or ``consecutive_failures``
timeouts, 5xx answers and broken connections in a row, eject an instance for
``eject_for`` times the number of ejections in a row (Envoy's back-off), at most
``max_eject_for``; then it gets traffic again, and its first success ends the
back-off.

Bounded, and never the last: at most ``max_ejected_percent`` of a service's instances
are out at once (at least one of two or more), and never the last candidate left.
When every instance fails, ejecting them all would only turn 502s into 503s and hide
the first one to recover; answering a dead service fast is a circuit breaker's job.

Cost on the data path: nothing is filtered while nothing is ejected (one truth test a
request); while something is, each resolved candidate list is filtered once and the
filtered list reused (a selection plugin builds its balancer once per list object).
A success costs one truth test while no instance is failing.

Ejections and readmissions are announced as ``instance_ejected`` and
``instance_readmitted`` events (``service``, ``instance``, ``url``, and on ejection
``reason``, ``seconds``, ``ejections``), which is how the registry shows an ejected
instance as ``critical``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lucid.model import Candidates, Event, Exchange, Instance, Outcome
from lucid.units import Duration

log = logging.getLogger("lucid.passive")

# generation.state key under which a plugin may supply the settings instead of
# [server.passive] (the registry does, for its older [registry.passive] spelling).
STATE_KEY = "passive"
VIEW_CACHE = 1024  # filtered lists kept at once; all are dropped at every change
FAILING_CAP = 10_000  # instances with failures remembered; past it, forget them all

Key = tuple[str, str, str]  # service, instance id, url: survives a rebuilt list


class PassiveConfig(BaseModel):
    """``[server.passive]``: ejection driven by the proxy's own upstream failures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    connect_failures: int = Field(1, ge=1, le=100,
                                  description="refused connections in a row to eject")
    consecutive_failures: int = Field(
        5, ge=1, le=1000, description="timeouts, 5xx or broken responses in a row to eject")
    eject_for: Duration = Field(
        10.0, ge=0.1, le=3600,
        description="first ejection; the n-th in a row lasts n times this")
    max_eject_for: Duration = Field(300.0, ge=0.1, le=86400,
                                    description="longest ejection (Envoy's default)")
    max_ejected_percent: float = Field(
        50.0, ge=0, le=100,
        description="most of a service's instances out at once (at least one of two "
                    "or more, never the last); 0 ejects none")

    @model_validator(mode="after")
    def _longest(self) -> PassiveConfig:
        if self.max_eject_for < self.eject_for:
            raise ValueError(f"max_eject_for ({self.max_eject_for:g}s) is shorter than "
                             f"eject_for ({self.eject_for:g}s)")
        return self


DEFAULT = PassiveConfig()


def settings_of(generation: Any) -> PassiveConfig:
    """The settings a request runs under: a plugin's override, else ``[server.passive]``."""
    if generation is None:
        return DEFAULT
    override = generation.state.get(STATE_KEY)
    if override is not None:
        return override  # type: ignore[no-any-return]
    return generation.config.server.passive  # type: ignore[no-any-return]


class Ejected(Candidates):
    """A resolved candidate list minus its ejected instances; ``source`` is the list
    the resolver answered, ``everyone`` still holds every instance (a load balancer's
    panic threshold counts the ejected ones as unhealthy, as Envoy's does)."""

    __slots__ = ("source",)

    def __init__(self, healthy: list[Instance], everyone: list[Instance],
                 source: Sequence[Instance]):
        super().__init__(healthy, everyone)
        self.source = source


def key_of(instance: Instance) -> Key:
    return (instance.service, instance.id, instance.url)


def reason_of(outcome: Outcome) -> str:
    return outcome.kind + (f" ({outcome.status})" if outcome.status else "")


class PassiveHealth:
    """One gateway process's ejections (each worker judges from its own traffic, as
    each nginx worker does)."""

    def __init__(self, emit: Callable[[Event], None]):
        self.emit = emit
        # instance -> [refused connections, other failures, ejections in a row]; by
        # object, so a success looks it up without building a key
        self.failing: dict[Instance, list[int]] = {}
        self.ejected: dict[Key, asyncio.TimerHandle] = {}
        self._per_service: dict[str, int] = {}
        self._views: dict[int, tuple[Sequence[Instance], Sequence[Instance]]] = {}

    # the data path -------------------------------------------------------------
    def view(self, source: Sequence[Instance]) -> Sequence[Instance]:
        """``source`` without its ejected instances (``source`` itself when none of
        them is, or when none would be left), the same object for the same list."""
        cached = self._views.get(id(source))
        if cached is not None and cached[0] is source:
            return cached[1]
        ejected = self.ejected
        kept = [i for i in source if (i.service, i.id, i.url) not in ejected]
        view: Sequence[Instance] = source
        if kept and len(kept) < len(source):
            everyone = getattr(source, "everyone", None)
            view = Ejected(kept, list(source) if everyone is None else everyone, source)
        if len(self._views) >= VIEW_CACHE:
            self._views.clear()
        self._views[id(source)] = (source, view)  # holding source keeps its id unique
        return view

    def record(self, exchange: Exchange, instance: Instance, outcome: Outcome) -> None:
        """One attempt ended: a success forgets the instance's failures, a failure
        counts and may eject it."""
        if outcome.kind == "success":
            self.failing.pop(instance, None)
            return
        settings = settings_of(exchange.generation)
        if not settings.enabled:
            return
        key = key_of(instance)
        if key in self.ejected:  # picked anyway (panic mode): already out
            return
        entry = self.failing.get(instance)
        if entry is None:
            if len(self.failing) >= FAILING_CAP:
                self.failing.clear()
            entry = self.failing[instance] = [0, 0, 0]
        if outcome.kind == "connect_error":
            entry[0] += 1
            tripped = entry[0] >= settings.connect_failures
        else:
            entry[1] += 1
            tripped = entry[1] >= settings.consecutive_failures
        if tripped and self._room(exchange.instances, instance, key, settings):
            entry[0] = entry[1] = 0
            entry[2] += 1
            self._eject(instance, key, reason_of(outcome), entry[2], settings)

    # ejection ------------------------------------------------------------------
    def _room(self, instances: Any, instance: Instance, key: Key,
              settings: PassiveConfig) -> bool:
        """Whether the service may lose this instance now: under its ejection bound,
        and with another candidate left."""
        source = getattr(instances, "source", instances)
        if not source:
            return False
        everyone = getattr(source, "everyone", None)
        total = len(everyone) if everyone else len(source)
        allowed = int(total * settings.max_ejected_percent / 100)
        if allowed < 1 and total >= 2 and settings.max_ejected_percent > 0:
            allowed = 1
        if self._per_service.get(instance.service, 0) >= allowed:
            return False
        ejected = self.ejected
        return any(key_of(other) != key and key_of(other) not in ejected for other in source)

    def _eject(self, instance: Instance, key: Key, reason: str, times: int,
               settings: PassiveConfig) -> None:
        seconds = min(settings.eject_for * times, settings.max_eject_for)
        loop = asyncio.get_running_loop()
        self.ejected[key] = loop.call_later(seconds, self._readmit, key)
        self._per_service[key[0]] = self._per_service.get(key[0], 0) + 1
        self._views.clear()
        log.warning("passive health: instance %s of service %r ejected for %gs (%s; "
                    "ejection %d in a row)", key[2], key[0], seconds, reason, times)
        self.emit(Event("instance_ejected", {
            "service": key[0], "instance": key[1], "url": key[2], "reason": reason,
            "seconds": seconds, "ejections": times}))

    def _readmit(self, key: Key) -> None:
        if self.ejected.pop(key, None) is None:
            return
        left = self._per_service.get(key[0], 1) - 1
        if left > 0:
            self._per_service[key[0]] = left
        else:
            self._per_service.pop(key[0], None)
        self._views.clear()
        log.info("passive health: instance %s of service %r gets traffic again", key[2],
                 key[0])
        self.emit(Event("instance_readmitted", {
            "service": key[0], "instance": key[1], "url": key[2]}))

    def close(self) -> None:
        """The gateway stops: no readmission fires after its loop is gone."""
        for handle in self.ejected.values():
            handle.cancel()
        self.ejected.clear()
        self._per_service.clear()
        self._views.clear()
