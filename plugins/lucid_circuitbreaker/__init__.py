"""Lucid's circuit breaker plugin: states, sliding windows, slow calls, fallbacks, ejection.

Inert unless a circuit is configured: with no circuit, each data-path hook is one
identity check and one empty-dict test. Circuit state lives on the plugin instance
(not on a config generation) so a reload keeps the state of circuits whose
definition did not change.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import quote

from lucid.config import ConfigError
from lucid.model import Event, Exchange, Instance, Outcome, Rejection
from lucid.plugins import hookimpl
from lucid_circuitbreaker.circuits import NORMAL, Circuit
from lucid_circuitbreaker.config import (
    CircuitBreakerConfig,
    CircuitSpec,
    Fallback,
    RouteBreaker,
    Thresholds,
    resolve,
)
from lucid_circuitbreaker.machine import Breaker
from lucid_circuitbreaker.store import CircuitStore, SQLiteStore

LUCID_CAPABILITY = "circuitbreaker"
log = logging.getLogger("lucid.circuitbreaker")
_NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization", "host", "content-length",
})
_NOT_RETURNED = _NOT_FORWARDED | {"date"}
FALLBACK_BODY_LIMIT = 1 << 20
RECENT_TRANSITIONS = 100


class CircuitBreakerPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock  # the one clock every breaker reads; tests may replace it
        self.runtime: Any = None
        self.store: CircuitStore | None = None
        self.store_path: Path | None = None
        self.circuits: dict[str, Circuit] = {}
        self.by_service: dict[str, Circuit] = {}
        self.defaults = Thresholds()
        self.static: dict[str, CircuitSpec] = {}
        self.dynamic: dict[str, CircuitSpec] = {}
        self.modes: dict[str, str] = {}
        self.transition_counts: dict[str, int] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_TRANSITIONS)
        self.lock: asyncio.Lock | None = None
        self._generation: Any = None
        self._ticker: asyncio.Task[None] | None = None
        self._rotation = 0

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
    def lucid_register_admin(self, register: Callable[..., None]) -> None:
        from lucid_circuitbreaker.admin import blueprint

        register(blueprint)

    @hookimpl
    def lucid_check_workers(self, config: Any, workers: int) -> str | None:
        section = getattr(config, "circuitbreaker", None)
        if workers > 1 and section is not None and section.circuits:
            return ("circuit breakers keep their state per process and the admin API reaches "
                    "only worker 0 (reset, force-open); run one worker with circuits declared")
        return None

    @hookimpl
    def lucid_prepare(self, generation: Any) -> None:
        config: CircuitBreakerConfig = generation.config.circuitbreaker
        problems: list[str] = []
        _, errors = resolve(Thresholds(), config.defaults)
        problems += [f"circuitbreaker.defaults.{f}: {m}" for f, m in errors]
        services: dict[str, str] = {}
        for cid, spec in config.circuits.items():
            _, errors = resolve(spec, config.defaults)
            problems += [f"circuitbreaker.circuits.{cid}.{f}: {m}" for f, m in errors]
            if spec.service in services:
                problems.append(f"circuitbreaker.circuits.{cid}.service = {spec.service!r}: "
                                f"circuit {services[spec.service]!r} already guards it")
            services.setdefault(spec.service, cid)
        known = set(config.circuits) | self._stored_ids(generation)
        for index, route_id, circuit_id in route_circuits(generation):
            if circuit_id not in known:
                problems.append(
                    f"gateway.routes[{index}].plugins.circuitbreaker.circuit = {circuit_id!r}"
                    f" (route {route_id!r}): no such circuit (declared: "
                    f"{', '.join(sorted(known)) or 'none'})")
        if problems:
            raise ConfigError(generation.source, problems)
        generation.state["circuitbreaker"] = (config.defaults, dict(config.circuits),
                                              config.tick_interval)

    def _stored_ids(self, generation: Any) -> set[str]:
        """Ids of the circuits made through the API: from memory once started, else
        read from the store file (the first config is prepared before startup)."""
        if self.runtime is not None:
            return set(self.dynamic)
        runtime = generation.runtime
        path = runtime.data_dir / "circuitbreaker.db" if runtime is not None else None
        if path is None or not path.exists():
            return set()
        try:
            with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
                return {row[0] for row in db.execute("SELECT id FROM circuits")}
        except sqlite3.Error as exc:
            log.warning("could not read circuit ids from %s: %s", path, exc)
            return set()

    @hookimpl
    async def lucid_startup(self, runtime: Any) -> None:
        self.runtime = runtime
        self.lock = asyncio.Lock()
        self.store_path = runtime.data_dir / "circuitbreaker.db"
        raw: dict[str, Any] = {}
        if self.store_path.exists():  # no circuit ever stored: no file, no cost
            store = await self.open_store()
            raw, self.modes = await store.load()
        for cid, data in raw.items():
            try:
                self.dynamic[cid] = CircuitSpec.model_validate(data)
            except ValueError as exc:
                log.error("circuit %r in the store is not valid any more, ignored: %s", cid, exc)
        self.sync(runtime.generation, force=True)
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    @hookimpl
    async def lucid_shutdown(self, runtime: Any) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def open_store(self) -> CircuitStore:
        """The store, opened (and created) on first need. Workers starting together
        may find the new file locked: lucid.store.open_database waits that out."""
        if self.store is None:
            assert self.store_path is not None
            self.store = await SQLiteStore.open(self.store_path)
        return self.store

    async def _tick_loop(self) -> None:
        """Half-open circuits with no traffic go back to open on time, with an event."""
        while True:
            state = self.runtime.generation.state.get("circuitbreaker")
            await asyncio.sleep(state[2] if state else 1.0)
            try:
                self.sync(self.runtime.generation)
                for circuit in list(self.circuits.values()):
                    circuit.tick()
            except Exception:
                log.exception("circuit breaker tick failed")

    # definitions ----------------------------------------------------------
    def sync(self, generation: Any, force: bool = False) -> None:
        """Adopt a generation's static circuits (a reload), keeping unchanged circuits."""
        if generation is self._generation and not force:
            return
        state = generation.state.get("circuitbreaker")
        if state is None:
            return
        self._generation = generation
        self.defaults, self.static, _ = state
        self.rebuild()

    def rebuild(self) -> None:
        """Circuits from static (TOML) and dynamic (API) definitions; static ones win
        an id or a service both claim."""
        circuits: dict[str, Circuit] = {}
        by_service: dict[str, Circuit] = {}
        entries = [(cid, spec, True) for cid, spec in self.static.items()]
        entries += [(cid, spec, False) for cid, spec in self.dynamic.items()
                    if cid not in self.static]
        for cid, spec, static in entries:
            resolved, problems = resolve(spec, self.defaults)
            if resolved is None:
                log.error("circuit %r is not valid under the current defaults, inert: %s",
                          cid, "; ".join(f"{f}: {m}" for f, m in problems))
                continue
            old = self.circuits.get(cid)
            if (old is not None and old.static == static and old.spec == spec
                    and old.resolved.effective == resolved.effective):
                circuit = old
            else:
                circuit = Circuit(cid, spec, resolved, static, self.clock, self._notify,
                                  self.modes.get(cid, NORMAL))
            circuits[cid] = circuit
            if spec.service in by_service:
                log.warning("circuit %r guards service %r, already guarded by %r: it applies "
                            "only to routes that name it", cid, spec.service,
                            by_service[spec.service].id)
            else:
                by_service[spec.service] = circuit
        self.circuits = circuits
        self.by_service = by_service

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
    def _circuit_for(self, exchange: Exchange) -> Circuit | None:
        overrides = exchange.overrides
        if overrides:
            route = overrides.get("circuitbreaker")
            if route is not None and route.circuit is not None:
                return self.circuits.get(route.circuit)
        return self.by_service.get(exchange.service)

    @hookimpl
    def lucid_permit_call(self, exchange: Exchange, instance: Instance) -> Rejection | None:
        if exchange.generation is not self._generation:
            self.sync(exchange.generation)
        if not self.circuits:
            return None
        circuit = (self._circuit_for(exchange) if exchange.overrides
                   else self.by_service.get(exchange.service))
        if circuit is None:
            return None
        if circuit.breaker is None and instance.id not in circuit.instances:
            self._learn_instances(circuit, exchange)
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
        circuit = (self._circuit_for(exchange) if exchange.overrides
                   else self.by_service.get(exchange.service))
        if circuit is not None:
            circuit.record(instance, outcome)

    @hookimpl
    def lucid_fallback_response(self, exchange: Exchange, rejection: Rejection) -> Any:
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

    async def _forward(self, exchange: Exchange, service: str, circuit: Circuit) -> Any:
        """The request, body included, sent to the fallback service; its answer buffered.

        A body the core streamed (over 64 KiB, or chunked) was not kept, so it cannot be
        sent: such a request gets the default answer rather than a body-less copy."""
        import aiohttp
        from yarl import URL

        if exchange.body is None and (
                exchange.headers.get("content-length", "0") != "0"
                or "transfer-encoding" in exchange.headers):
            log.warning("circuit %s: request %s has a streamed body; fallback service %r "
                        "not called", circuit.id, exchange.request_id, service)
            return None
        generation = exchange.generation
        runtime = generation.runtime
        original = exchange.service
        exchange.service = service
        try:
            instances = runtime.hooks.resolve_instances(exchange, generation)
        finally:
            exchange.service = original
        if not instances or runtime.session is None:
            log.warning("circuit %s: fallback service %r has no instances", circuit.id, service)
            return None
        instance = instances[self._rotation % len(instances)]
        self._rotation += 1
        url = URL(instance.base + quote(exchange.upstream_path, safe="/!$&'()*+,;=:@~")
                  + ("?" + exchange.query if exchange.query else ""), encoded=True)
        headers = {k: v for k, v in exchange.headers.items() if k not in _NOT_FORWARDED}
        headers["x-request-id"] = exchange.request_id
        try:
            async with runtime.session.request(
                exchange.method, url, headers=headers, data=exchange.body or None,
                allow_redirects=False,
                timeout=exchange.policy.client_timeout, compress=None,
            ) as response:
                body = await response.content.read(FALLBACK_BODY_LIMIT)
                status = response.status
                out = [(k, v) for k, v in response.headers.items()
                       if k.lower() not in _NOT_RETURNED]
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("circuit %s: fallback service %r failed: %s", circuit.id, service, exc)
            return None
        out.append(("x-lucid-fallback", circuit.id))
        return Rejection(status, body=body, headers=out,
                         reason=f"fallback of circuit {circuit.id!r}")


def route_circuits(generation: Any) -> list[tuple[int, str, str]]:
    """``(index, route id, circuit id)`` of every route that names its circuit, from the
    gateway plugin's route table in this generation (none without it)."""
    state = generation.state.get("gateway")
    routes = getattr(getattr(state, "router", None), "routes", ())
    found = []
    overrides_of = getattr(state, "overrides", ())
    for index, (route, overrides) in enumerate(zip(routes, overrides_of, strict=True)):
        setting = overrides.get("circuitbreaker")
        if setting is not None and setting.circuit is not None:
            found.append((index, route.id or f"routes[{index}]", setting.circuit))
    return found


def static_answer(fallback: Fallback, circuit: Circuit) -> Rejection:
    headers = list(fallback.headers.items())
    if fallback.body and not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("content-type", "text/plain; charset=utf-8"))
    headers.append(("x-lucid-fallback", circuit.id))
    return Rejection(fallback.status, body=fallback.body.encode(), headers=headers,
                     reason=f"circuit {circuit.id!r} is open (fallback)")
