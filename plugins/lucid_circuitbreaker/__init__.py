"""Lucid's circuit breaker plugin: states, sliding windows, slow calls, fallbacks, ejection.

Inert unless a circuit is configured: with no circuit, each data-path hook is one
empty-dict test. Circuits are definitions of kind ``"circuit"`` (static from
``[circuitbreaker] circuits``, dynamic from the admin API, kept by the core's
definitions layer). ``lucid_prepare`` resolves them for a candidate generation;
``lucid_activate`` makes them live, carrying over the state of every circuit whose
definition did not change. Circuit state lives on the plugin instance (not on a
generation) for that reason; operator modes (forced open, disabled) are state too,
kept in the plugin's own store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lucid.config import ConfigError
from lucid.definitions import BackendUnavailable, legacy_rows
from lucid.http import hop_by_hop
from lucid.model import Event, Exchange, Generation, Instance, Outcome, Rejection
from lucid.plugins import hookimpl
from lucid.proxy import upstream_request
from lucid_circuitbreaker.circuits import NORMAL, Circuit
from lucid_circuitbreaker.config import (
    CircuitBreakerConfig,
    CircuitSpec,
    Fallback,
    Resolved,
    RouteBreaker,
    Thresholds,
    resolve,
)
from lucid_circuitbreaker.machine import CLOSED, METRICS_ONLY, Breaker
from lucid_circuitbreaker.shared import Shared
from lucid_circuitbreaker.store import ModeStore, SQLiteStore

if TYPE_CHECKING:
    from lucid.runtime import Runtime

LUCID_CAPABILITY = "circuitbreaker"
KIND = "circuit"
log = logging.getLogger("lucid.circuitbreaker")
# response headers the core sets itself on the answer it sends for a Rejection
_SET_BY_CORE = frozenset({"content-length", "date"})
FALLBACK_BODY_LIMIT = 1 << 20
RECENT_TRANSITIONS = 100
PERMITTING = frozenset({CLOSED, METRICS_ONLY})  # states whose permit is a plain yes


def static_circuits(config: Any) -> dict[str, CircuitSpec]:
    """The circuits the config file declares, by id, in file order."""
    return dict(config.circuitbreaker.circuits)


def legacy_circuits(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Circuits an older Lucid kept in ``circuitbreaker.db`` (moved to the core's store
    once; the ``modes`` table beside them stays this plugin's)."""
    rows = legacy_rows(data_dir / "circuitbreaker.db", "SELECT id, spec FROM circuits ORDER BY id")
    return {cid: json.loads(spec) for cid, spec in rows}


@dataclass(frozen=True, slots=True)
class Planned:
    """One circuit as a candidate generation defines it, resolved."""

    id: str
    spec: CircuitSpec
    resolved: Resolved
    static: bool
    revision: int


@dataclass(frozen=True)
class Plan:
    """What ``lucid_prepare`` derives from one generation, for ``lucid_activate``."""

    defaults: Thresholds
    circuits: tuple[Planned, ...]
    tick_interval: float


class CircuitBreakerPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock  # the one clock every breaker reads; tests may replace it
        self.runtime: Runtime | None = None
        self.store: ModeStore | None = None
        self.store_path: Path | None = None
        self.circuits: dict[str, Circuit] = {}
        self.by_service: dict[str, Circuit] = {}
        self.defaults = Thresholds()
        self.tick_interval = 1.0
        self.modes: dict[str, str] = {}
        self.transition_counts: dict[str, int] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_TRANSITIONS)
        self.lock: asyncio.Lock | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._rotation = 0
        # cluster scope: breaker state and operator modes shared through Redis
        self.shared: Shared | None = None

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Replace the clock of the plugin and of every live circuit (tests drive time)."""
        self.clock = clock
        for circuit in self.circuits.values():
            circuit.clock = clock

    # lifecycle ------------------------------------------------------------
    @hookimpl
    def lucid_register_config(self, register: Callable[..., None]) -> None:
        register("circuitbreaker", CircuitBreakerConfig, route_model=RouteBreaker)

    @hookimpl
    def lucid_register_definitions(self, register: Callable[..., None]) -> None:
        register(KIND, CircuitSpec, static=static_circuits, legacy=legacy_circuits,
                 section="circuitbreaker.circuits")

    @hookimpl
    def lucid_register_admin(self, register: Callable[..., None]) -> None:
        from lucid_circuitbreaker.admin import blueprint

        register(blueprint)

    @hookimpl
    def lucid_check_workers(self, config: Any, workers: int) -> str | None:
        section = getattr(config, "circuitbreaker", None)
        if workers > 1 and section is not None and section.circuits and (
                not cluster_scope(config)):
            return ("circuit breakers in node scope keep their state per process and the "
                    "admin API reaches only worker 0 (reset, force-open); use a Redis backend "
                    "([cluster] backend = \"redis://...\", circuitbreaker.scope = \"cluster\"), "
                    "which shares breaker state between workers, or run one worker")
        return None

    @hookimpl
    def lucid_prepare(self, generation: Generation) -> None:
        """Resolve every circuit of the candidate against its defaults. A static circuit
        that does not resolve, or guards a service another static one guards, rejects
        the config; a dynamic one that no longer resolves (the defaults changed under
        it) stays stored but inert, as the admin API checked it when it was written."""
        config: CircuitBreakerConfig = generation.config.circuitbreaker
        problems: list[str] = []
        if config.scope == "cluster" and generation.config.cluster.backend == "local":
            problems.append("circuitbreaker.scope = 'cluster' needs a Redis backend "
                            "([cluster] backend = \"redis://...\"); use 'node' with the "
                            "local backend")
        _, errors = resolve(Thresholds(), config.defaults)
        problems += [f"circuitbreaker.defaults.{f}: {m}" for f, m in errors]
        services: dict[str, str] = {}
        planned: list[Planned] = []
        defined = generation.defined(KIND)
        for cid, definition in defined.items():
            static = definition.origin == "static"
            try:
                spec = definition.parsed(CircuitSpec)
            except ValueError as exc:  # stored by an older Lucid, not valid any more
                log.error("circuit %r in the store is not valid any more, ignored: %s",
                          cid, exc)
                continue
            resolved, errors = resolve(spec, config.defaults)
            if static:
                problems += [f"circuitbreaker.circuits.{cid}.{f}: {m}" for f, m in errors]
                if spec.service in services:
                    problems.append(f"circuitbreaker.circuits.{cid}.service = {spec.service!r}"
                                    f": circuit {services[spec.service]!r} already guards it")
                services.setdefault(spec.service, cid)
            if resolved is None:
                if not static:
                    log.error("circuit %r is not valid under the current defaults, inert: %s",
                              cid, "; ".join(f"{f}: {m}" for f, m in errors))
                continue
            planned.append(Planned(cid, spec, resolved, static, definition.revision))
        for index, route_id, circuit_id in route_circuits(generation):
            if circuit_id not in defined:
                problems.append(
                    f"gateway.routes[{index}].plugins.circuitbreaker.circuit = {circuit_id!r}"
                    f" (route {route_id!r}): no such circuit (declared: "
                    f"{', '.join(sorted(defined)) or 'none'})")
        if problems:
            raise ConfigError(generation.source, problems)
        generation.state["circuitbreaker"] = Plan(config.defaults, tuple(planned),
                                                  config.tick_interval)

    @hookimpl
    async def lucid_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.lock = asyncio.Lock()
        self.store_path = runtime.data_dir / "circuitbreaker.db"
        if cluster_scope(runtime.config):
            self.shared = Shared(runtime.cluster, lambda: self.circuits, lambda: self.modes,
                                 lambda: self.clock())
            try:
                self.modes = await self.shared.load_modes()
            except BackendUnavailable:
                pass  # taken from Redis when it answers (Shared.rejoin)
            self.shared.start(runtime.config.cluster.check_interval)
        elif self.store_path.exists():  # no mode ever stored: no file, no cost
            self.modes = await (await self.open_store()).load()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    @hookimpl
    def lucid_activate(self, generation: Generation) -> None:
        """The generation is live: its circuits replace the running ones."""
        plan: Plan | None = generation.state.get("circuitbreaker")
        if plan is not None:
            self.adopt(plan)

    @hookimpl
    async def lucid_shutdown(self, runtime: Runtime) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.shared is not None:
            await self.shared.stop()
            self.shared = None
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def open_store(self) -> ModeStore:
        """The store, opened (and created) on first need. Workers starting together
        may find the new file locked: lucid.store.open_database waits that out."""
        if self.store is None:
            assert self.store_path is not None
            self.store = await SQLiteStore.open(self.store_path)
        return self.store

    async def _tick_loop(self) -> None:
        """Half-open circuits with no traffic go back to open on time, with an event."""
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                for circuit in list(self.circuits.values()):
                    circuit.tick()
            except Exception:
                log.exception("circuit breaker tick failed")

    # definitions ----------------------------------------------------------
    def adopt(self, plan: Plan) -> None:
        """Make a prepared generation's circuits the running ones. A circuit whose
        origin, definition and effective settings did not change keeps its object, so
        its state; any other starts closed (in its persisted operator mode). Where two
        circuits guard one service, the first (static ones come first) takes it."""
        circuits: dict[str, Circuit] = {}
        by_service: dict[str, Circuit] = {}
        for entry in plan.circuits:
            old = self.circuits.get(entry.id)
            if (old is not None and old.static == entry.static and old.spec == entry.spec
                    and old.resolved.effective == entry.resolved.effective):
                circuit = old
            else:
                circuit = Circuit(entry.id, entry.spec, entry.resolved, entry.static,
                                  self.clock, self._notify, self.modes.get(entry.id, NORMAL))
            circuit.revision = entry.revision
            circuit.shared = self.shared
            circuits[entry.id] = circuit
            if entry.spec.service in by_service:
                log.warning("circuit %r guards service %r, already guarded by %r: it applies "
                            "only to routes that name it", entry.id, entry.spec.service,
                            by_service[entry.spec.service].id)
            else:
                by_service[entry.spec.service] = circuit
        self.defaults = plan.defaults
        self.tick_interval = plan.tick_interval
        self.circuits = circuits
        self.by_service = by_service
        if self.shared is not None and circuits:
            self.shared.refresh_soon()  # open elsewhere already: open here too

    def _notify(self, circuit: Circuit, breaker: Breaker, before: str, after: str,
                reason: str, now: float) -> None:
        name = f"{before}->{after}"
        self.transition_counts[name] = self.transition_counts.get(name, 0) + 1
        calls, failures, slows = breaker.window.totals(now)
        data = {
            "circuit": circuit.id, "service": circuit.service,
            "instance": breaker.key or None, "from": before, "to": after, "reason": reason,
            "retry_after": breaker.retry_after(now), "calls_in_window": calls,
            "failure_rate": round(100.0 * failures / calls, 2) if calls else None,
            "slow_call_rate": round(100.0 * slows / calls, 2) if calls else None,
        }
        self.recent.append({**data, "at": round(time.time(), 3)})
        log.info("circuit %s%s: %s -> %s (%s)", circuit.id,
                 f" instance {breaker.key}" if breaker.key else "", before, after, reason)
        if self.runtime is not None:
            try:
                self.runtime.emit(Event("breaker_transition", data))
            except RuntimeError:  # no running loop (a synchronous caller in a test)
                pass

    # the data path --------------------------------------------------------
    # Both hooks find the circuit inline (the route's named circuit, else the
    # service's) and answer the usual case, a closed circuit, without a call: a
    # permit reads the breaker's state, a fast success adds one to its window.
    @hookimpl
    def lucid_permit_call(self, exchange: Exchange, instance: Instance) -> Rejection | None:
        if not self.circuits:
            return None
        overrides = exchange.overrides
        route = overrides.get("circuitbreaker") if overrides else None
        circuit = (self.by_service.get(exchange.service) if route is None or route.circuit is None
                   else self.circuits.get(route.circuit))
        if circuit is None:
            return None
        breaker = circuit.breaker
        if breaker is None:
            breaker = circuit.instances.get(instance.id)
            if breaker is None:
                self._learn_instances(circuit, exchange)
        if breaker is not None and breaker.state in PERMITTING:
            return None  # what circuit.permit answers: closed permits, shared or not
        refused = circuit.permit(instance)
        if refused is not None:
            exchange.attributes["circuitbreaker"] = circuit
        return refused

    @staticmethod
    def _learn_instances(circuit: Circuit, exchange: Exchange) -> None:
        """A new instance in instance scope (rare): learn the service's whole instance
        list, so the ejection cap counts instances that were not called yet, and drop
        breakers of instances that left. The core kept what the resolve hook answered."""
        circuit.learn([i.id for i in exchange.instances or ()])

    @hookimpl
    def lucid_record_outcome(self, exchange: Exchange, instance: Instance,
                             outcome: Outcome) -> None:
        if not self.circuits:
            return
        overrides = exchange.overrides
        route = overrides.get("circuitbreaker") if overrides else None
        circuit = (self.by_service.get(exchange.service) if route is None or route.circuit is None
                   else self.circuits.get(route.circuit))
        if circuit is None:
            return
        breaker = circuit.breaker
        if breaker is None:
            breaker = circuit.instances.get(instance.id)
            if breaker is None:
                return
        if breaker.quiet and outcome.status not in circuit.not_success and (
                outcome.duration < circuit.slow_threshold) and (
                outcome.kind == "success" or outcome.kind == "error_status"):
            # a fast success where no success can trip: what Breaker.record does with it
            breaker.window.pending += 1  # type: ignore[union-attr]  # quiet: a CountWindow
            breaker.consecutive = 0
            return
        circuit.record(instance, outcome)

    @hookimpl
    def lucid_fallback_response(
        self, exchange: Exchange, rejection: Rejection
    ) -> Rejection | Awaitable[Rejection | None] | None:
        """A circuit that refused this request answers with its (or its route's)
        fallback; without one, the circuit's own 503 (or the core's answer) stands."""
        circuit = exchange.attributes.get("circuitbreaker") if exchange.attributes else None
        if circuit is None:
            return None
        route = exchange.overrides.get("circuitbreaker") if exchange.overrides else None
        fallback = route.fallback if route is not None and route.fallback is not None else (
            circuit.spec.fallback)
        if fallback is None:
            return None
        if fallback.service is None:
            return static_answer(fallback, circuit)
        return self._forward(exchange, fallback.service, circuit)

    async def _forward(self, exchange: Exchange, service: str,
                       circuit: Circuit) -> Rejection | None:
        """The request, body included, sent to the fallback service as the proxy would
        send it (``lucid.proxy.upstream_request``); its answer buffered.

        A body the core streamed (over 64 KiB, or chunked) was not kept, so it cannot be
        sent: such a request gets the default answer rather than a body-less copy."""
        import aiohttp

        if exchange.body is None and (
                exchange.headers.get("content-length", "0") != "0"
                or "transfer-encoding" in exchange.headers):
            log.warning("circuit %s: request %s has a streamed body; fallback service %r "
                        "not called", circuit.id, exchange.request_id, service)
            return None
        runtime = self.runtime
        instances = healthy(runtime.instances(service)) if runtime is not None else []
        if runtime is None or not instances or runtime.session is None:
            log.warning("circuit %s: fallback service %r has no instances", circuit.id, service)
            return None
        instance = instances[self._rotation % len(instances)]
        self._rotation += 1
        url, headers = upstream_request(exchange, instance)
        try:
            async with runtime.session.request(
                exchange.method, url, headers=headers, data=exchange.body or None,
                allow_redirects=False,
                timeout=exchange.policy.client_timeout, compress=None,
            ) as response:
                body = await response.content.read(FALLBACK_BODY_LIMIT)
                status = response.status
                drop = hop_by_hop(response.headers.get("connection")) | _SET_BY_CORE
                out = [(k, v) for k, v in response.headers.items() if k.lower() not in drop]
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("circuit %s: fallback service %r failed: %s", circuit.id, service, exc)
            return None
        out.append(("x-lucid-fallback", circuit.id))
        return Rejection(status, body=body, headers=out,
                         reason=f"fallback of circuit {circuit.id!r}")


def cluster_scope(config: Any) -> bool:
    """Whether breaker state is the cluster's: ``[circuitbreaker] scope`` (by default
    ``cluster`` with a Redis backend, ``node`` with the local one)."""
    section = getattr(config, "circuitbreaker", None)
    scope = section.scope if section is not None else None
    return config.cluster.backend != "local" and scope != "node"


def healthy(instances: Sequence[Instance]) -> list[Instance]:
    """The instances a request may go to: passing ones, else those only warning (the
    registry's rule for its candidates)."""
    passing = [i for i in instances if i.status == "passing"]
    return passing or [i for i in instances if i.status == "warning"]


def route_circuits(generation: Generation) -> list[tuple[int, str, str]]:
    """``(index, route id, circuit id)`` of every route that names its circuit, from the
    routing plugin's table in this generation (``generation.routes``)."""
    found = []
    for index, route in enumerate(generation.routes):
        setting = route.overrides.get("circuitbreaker")
        if setting is not None and setting.circuit is not None:
            found.append((index, route.id, setting.circuit))
    return found


def static_answer(fallback: Fallback, circuit: Circuit) -> Rejection:
    headers = list(fallback.headers.items())
    if fallback.body and not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("content-type", "text/plain; charset=utf-8"))
    headers.append(("x-lucid-fallback", circuit.id))
    return Rejection(fallback.status, body=fallback.body.encode(), headers=headers,
                     reason=f"circuit {circuit.id!r} is open (fallback)")
