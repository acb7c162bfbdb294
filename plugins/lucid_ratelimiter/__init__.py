"""Lucid's rate limiter plugin: token bucket, sliding and fixed windows, quotas, headers.

With the local ``[cluster]`` backend, decisions are synchronous and in memory
(:mod:`lucid_ratelimiter.algorithms`); quota counters (windows of an hour or more) are
written to SQLite in the background, in batches (:mod:`lucid_ratelimiter.store`). With
a Redis backend every limit counts once for the cluster: each request's limits are
decided together by one script in Redis, batched per worker, with a local fallback
while Redis is down (:mod:`lucid_ratelimiter.redis_store`). Limits are definitions of
kind ``"limit"`` in the core's definitions layer: ``[[ratelimiter.limits]]``
("static") and the admin API ("dynamic", kept by the core's store); both apply
without a restart.

Each generation gets its table in ``lucid_prepare``; ``lucid_activate`` makes it live
and moves the counters of unchanged limits over, so the data path only reads
``self.table``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from math import ceil as _ceil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lucid.cluster import Membership
from lucid.config import ConfigError, data_dir
from lucid.definitions import BackendUnavailable, Kind, legacy_rows, read_stored
from lucid.model import Event, Exchange, Generation, Rejection
from lucid.plugins import hookimpl
from lucid_ratelimiter.algorithms import ALGORITHMS, FixedWindow, Limiter, TokenBucket
from lucid_ratelimiter.config import Limit, RateLimiterConfig, RouteSettings
from lucid_ratelimiter.redis_store import (
    ALGORITHM_CODES,
    LEASE_SECONDS,
    LEASE_SHARE,
    MAX_SLICE,
    MICRO,
    SharedLimits,
    Slice,
    limit_keys,
    state_key,
)
from lucid_ratelimiter.store import Row, SqliteStore

if TYPE_CHECKING:
    from lucid.runtime import Runtime

LUCID_CAPABILITY = "ratelimiter"
__all__ = ["RateLimiterPlugin", "RateLimiterConfig", "Limit", "RouteSettings"]
log = logging.getLogger("lucid.ratelimiter")

WORKERS_REASON = (
    "ratelimiter: with the local [cluster] backend limits are counted in each worker's "
    "memory, so {workers} workers would admit {workers}x every limit; run with "
    "server.workers = 1, or use a Redis [cluster] backend (backend = \"redis://...\"), "
    "which counts every limit once for all workers and nodes"
)
MAX_REJECTION_KEYS = 100_000  # per limit, for the usage report's "most limited keys"
IN_FLIGHT = "ratelimiter.in_flight"  # exchange.attributes: the slots an exchange holds


def _ip(exchange: Exchange) -> str:
    return exchange.client_ip


def key_function(spec: Limit, api_key_header: str) -> Callable[[Exchange], str]:
    """How a limit names the bucket of a request. Identities that are missing (no JWT,
    no API key, no such header) fall back to the client IP, never to one shared bucket."""
    kind = spec.key
    if kind == "ip":
        return _ip
    if kind == "user":
        def user(exchange: Exchange) -> str:
            identity = exchange.identity
            sub = identity.get("sub") if identity else None
            return f"sub:{sub}" if sub is not None else f"ip:{exchange.client_ip}"
        return user
    if kind in ("api_key", "header"):
        name = api_key_header if kind == "api_key" else spec.header

        def header(exchange: Exchange) -> str:
            value = exchange.headers.get(name)
            return f"h:{value}" if value is not None else f"ip:{exchange.client_ip}"
        return header
    if kind == "route":
        return lambda exchange: exchange.route_id
    if kind == "service":
        return lambda exchange: exchange.service
    return lambda exchange: "*"


def signature(spec: Limit) -> str:
    """What a limit's counters mean; a change of it starts the counters over.

    A concurrency limit's count is of requests still running: a new ``max_in_flight``
    keeps it (the running requests still hold their slots), so it is not part of it."""
    if spec.concurrent:
        return json.dumps([spec.algorithm, spec.key, spec.header])
    return json.dumps([spec.algorithm, spec.rate, spec.capacity, spec.key, spec.header])


class CompiledLimit:
    """One live limit: its definition, its counters and its rejection tally."""

    __slots__ = ("id", "spec", "source", "revision", "limiter", "key_of", "by_ip", "quota",
                 "concurrent", "signature", "rejections", "limit", "policy", "ietf_prefix",
                 "x_limit", "dirty", "shared_prefix", "shared_rejections", "shared_args",
                 "fallback", "lease", "slices", "seen", "seeded")

    def __init__(self, spec: Limit, source: str, limiter: Limiter, api_key_header: str,
                 revision: int = 0):
        self.id = spec.id
        self.spec = spec
        self.source = source
        self.revision = revision  # of its definition; 0 if static
        self.limiter = limiter
        self.key_of = key_function(spec, api_key_header)
        self.by_ip = spec.key == "ip"  # the usual key: read in line, without a call
        self.quota = spec.quota
        self.concurrent = spec.concurrent
        self.signature = signature(spec)
        self.rejections: dict[str, int] = {}
        self.dirty: set[str] = set()  # quota keys changed since the last flush
        self.limit = limiter.limit
        # a concurrency limit has no window: no "w" (the parameter is optional)
        self.policy = (f'"{spec.id}";q={self.limit}' if spec.concurrent
                       else f'"{spec.id}";q={self.limit};w={int(spec.period)}')
        self.ietf_prefix = f'"{spec.id}";r='
        self.x_limit = str(self.limit)
        # with a Redis backend (set by lucid_prepare): where it counts, and its
        # script parameters (algorithm, count, period or lease in µs, capacity)
        self.shared_prefix = ""
        self.shared_rejections = ""
        self.shared_args: tuple[str, int, int, int] = ("", 0, 0, 0)
        # while Redis is down (on_backend_failure = "local"): this process's share
        self.fallback: Limiter | None = None
        # sync = "lease" (with a Redis backend): the slices this worker holds, by key
        self.lease = spec.sync == "lease"
        self.slices: dict[str, Slice] = {}
        # what Redis last said of each key (token bucket: its TAT, epoch s; fixed
        # window: (window start, used)), so that a process's share while Redis is
        # down starts where the cluster was, not full; and what was seeded from it
        self.seen: dict[str, Any] = {}
        self.seeded: dict[str, tuple[float, int]] = {}


@dataclass(slots=True)
class Plan:
    """The limits that apply to one (route, tier): rate limits (``limits``, announced in
    RateLimit-Policy) and concurrency limits (``slots``, taken once the rate limits admit
    the request, given back when its exchange ends)."""

    limits: tuple[CompiledLimit, ...]
    policy: str
    slots: tuple[CompiledLimit, ...] = ()
    # every limit sync = "lease" (and no concurrency limit), counted in Redis: decided
    # from this worker's slices; any other plan is decided in Redis, request by request
    lease: bool = False
    # the usual plan, one rate limit counted in this process's memory and no
    # concurrency limit: that limit, decided in line by lucid_admit_request
    single: CompiledLimit | None = None
    # the headers last announced for this plan, and what they said (style, limit,
    # requests left, whole seconds until reset): while those stay the same (as they do
    # for a key far from its limit), a request reuses the list instead of a new one
    shown: list[tuple[str, str]] = field(default_factory=list)
    shown_style: str = ""
    shown_limit: CompiledLimit | None = None
    shown_left: int = -1
    shown_seconds: int = -1

    def headers(self, style: str, compiled: CompiledLimit, remaining: int,
                reset: float) -> list[tuple[str, str]]:
        """:func:`_headers` of an admitted request (``style`` not "none"), reused while
        the values stay the same; callers copy it (``+=``), never keep it."""
        seconds = _ceil(reset - 1e-6) if reset > 0 else 0
        if (remaining != self.shown_left or seconds != self.shown_seconds
                or compiled is not self.shown_limit or style != self.shown_style):
            self.shown = _headers(style, self.policy, compiled, remaining, reset)
            self.shown_style, self.shown_limit = style, compiled
            self.shown_left, self.shown_seconds = remaining, seconds
        return self.shown


@dataclass
class Table:
    """Every limit of one generation, static and dynamic, compiled in ``lucid_prepare``.

    Its limiters start empty; :meth:`RateLimiterPlugin.lucid_activate` swaps in the live
    ones of limits whose counters still mean the same (same :func:`signature`), so a
    candidate that is never swapped in touches no live counter."""

    config: RateLimiterConfig
    limits: dict[str, CompiledLimit] = field(default_factory=dict)
    shared: bool = False  # counted in Redis (a Redis [cluster] backend)
    # plans by (route, tier) with a tier claim, by route without one (one tier)
    plans: dict[tuple[str, str], Plan] = field(default_factory=dict)
    by_route: dict[str, Plan] = field(default_factory=dict)
    # the config's settings each request reads, as plain attributes (a pydantic
    # model's attribute costs several times a plain one's)
    style: str = field(init=False)
    tier_claim: str = field(init=False)
    default_tier: str = field(init=False)

    def __post_init__(self) -> None:
        self.style = self.config.headers
        self.tier_claim = self.config.tier_claim
        self.default_tier = self.config.default_tier

    def plan(self, route_id: str, tier: str) -> Plan:
        applicable = [
            c for c in self.limits.values()
            if (not c.spec.routes or route_id in c.spec.routes)
            and (not c.spec.tiers or tier in c.spec.tiers)
        ]
        chosen = tuple(c for c in applicable if not c.concurrent)
        slots = tuple(c for c in applicable if c.concurrent)
        lease = self.shared and bool(chosen) and not slots and all(c.lease for c in chosen)
        single = chosen[0] if len(chosen) == 1 and not slots and not self.shared else None
        plan = Plan(chosen, ", ".join(c.policy for c in chosen), slots, lease, single)
        if self.tier_claim:
            if len(self.plans) < 10_000:
                self.plans[(route_id, tier)] = plan
        elif len(self.by_route) < 10_000:
            self.by_route[route_id] = plan
        return plan


def compile_table(config: RateLimiterConfig,
                  specs: Iterable[tuple[Limit, str, int]]) -> Table:
    """A table of fresh limiters for ``(spec, origin, revision)``, in the given order."""
    table = Table(config)
    for spec, source, revision in specs:
        limiter = ALGORITHMS[spec.algorithm](
            spec.count, spec.period, spec.capacity, config.max_keys)
        table.limits[spec.id] = CompiledLimit(spec, source, limiter, config.api_key_header,
                                              revision)
    return table


def static_limits(config: Any) -> dict[str, Limit]:
    """The limits ``[[ratelimiter.limits]]`` declares, by id, in file order."""
    return {spec.id: spec for spec in config.ratelimiter.limits}


def legacy_limits(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Limits an older Lucid kept in the ``limits`` table of ``ratelimiter.db`` (moved
    to the core's definitions store once; its quota counters stay where they are)."""
    rows = legacy_rows(data_dir / "ratelimiter.db", "SELECT id, body FROM limits ORDER BY rowid")
    return {id: {**json.loads(body), "id": id} for id, body in rows}


def unknown_routes(generation: Generation, config: RateLimiterConfig) -> list[str]:
    """Static limits naming a route the config file does not declare. Routes come from
    ``generation.routes`` (whichever plugin routes). Only the file's routes count, as
    before: whether a file is valid must not depend on what the API stored, and deleting
    a runtime route must not be refused for a limit's sake. Dynamic limits may name
    routes that do not exist (yet)."""
    known = {route.id for route in generation.routes if route.origin == "static"}
    return [
        f"ratelimiter.limits[{i}].routes = {route!r}: no such route "
        f"(routes: {', '.join(sorted(known)) or 'none'})"
        for i, spec in enumerate(config.limits) for route in spec.routes
        if route not in known
    ]


class RateLimiterPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY

    def __init__(self) -> None:
        self.clock: Callable[[], float] = time.time  # injectable (tests)
        self.runtime: Runtime | None = None
        self.store: SqliteStore | None = None
        self.table: Table | None = None  # the live one, swapped in by lucid_activate
        self._restored: list[Row] = []  # quota counters read at startup, until activation
        self._tasks: list[asyncio.Task[Any]] = []
        self.admitted = 0
        self.rejected = 0
        # exchanges that took concurrency slots and have not ended yet (an exchange
        # noted twice only makes lucid_observe_exchange look when it need not)
        self.holding = 0
        self.flushes = 0
        self.flushed_rows = 0
        self.last_flush_at: float | None = None
        self.swept = 0
        self.write_lock = asyncio.Lock()
        self.shared: SharedLimits | None = None  # with a Redis [cluster] backend
        self.processes = 1  # live gateway processes in the cluster (membership)
        self.degraded = {"local": 0, "open": 0, "closed": 0}  # decisions without Redis
        self._reported = dict(self.degraded)  # as last emitted (limit_degraded events)

    # lifecycle ----------------------------------------------------------------
    @hookimpl
    def lucid_register_config(self, register: Callable[..., None]) -> None:
        register("ratelimiter", RateLimiterConfig, route_model=RouteSettings)

    @hookimpl
    def lucid_register_definitions(self, register: Callable[..., None]) -> None:
        register("limit", Limit, static=static_limits, legacy=legacy_limits,
                 section="ratelimiter.limits")

    @hookimpl
    def lucid_register_admin(self, register: Callable[..., None]) -> None:
        from lucid_ratelimiter.admin import blueprint

        register(blueprint)

    @hookimpl
    def lucid_check_workers(self, config: Any, workers: int) -> str | None:
        """Counters live in each worker's memory: any limit, in the file or stored
        through the admin API (by this or an older Lucid), refuses several workers."""
        if workers <= 1:
            return None
        if getattr(getattr(config, "cluster", None), "backend", "local") != "local":
            return None  # counted in Redis, once for every worker and node
        section = getattr(config, "ratelimiter", None)
        if section is not None and section.limits:
            return WORKERS_REASON.format(workers=workers)
        kind = Kind("limit", Limit, legacy=legacy_limits)
        try:
            stored = read_stored(data_dir(config, None), {"limit": kind}).of("limit")
        except sqlite3.Error:
            stored = {}
        return WORKERS_REASON.format(workers=workers) if stored else None

    @hookimpl
    def lucid_prepare(self, generation: Generation) -> None:
        """Compile the candidate's limits (file, then admin API) into a table of fresh
        limiters; the live counters move over only when it goes live."""
        config: RateLimiterConfig = generation.config.ratelimiter
        if config.limits and "gateway" in generation.capabilities:
            problems = unknown_routes(generation, config)
            if problems:
                raise ConfigError(generation.source, problems)
        table = generation.state["ratelimiter"] = compile_table(config, (
            (d.parsed(Limit), d.origin, d.revision)
            for d in generation.defined("limit").values()))
        cluster = getattr(generation.runtime, "cluster", None)
        if cluster is not None and cluster.shared:
            table.shared = True
            for compiled in table.limits.values():
                spec = compiled.spec
                compiled.shared_prefix, compiled.shared_rejections = limit_keys(
                    cluster, compiled.id, compiled.signature)
                # a concurrency slot's "period" is its lease
                period = config.concurrency_lease if spec.concurrent else spec.period
                compiled.shared_args = (ALGORITHM_CODES[spec.algorithm], spec.count,
                                        int(period * MICRO), spec.capacity)

    @hookimpl
    async def lucid_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = await SqliteStore.open(runtime.data_dir / "ratelimiter.db")
        self._restored = await self.store.load_counters()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._every(lambda: self.flush_interval, self.flush)),
            loop.create_task(self._every(lambda: self.sweep_interval, self._sweep)),
        ]
        if runtime.cluster.shared:
            self.shared = SharedLimits(runtime.cluster,
                                       runtime.config.ratelimiter.concurrency_lease,
                                       on_trip=self._degrade)
            self.processes = runtime.config.server.workers
            self._tasks.append(loop.create_task(self._watch_backend(runtime)))

    @hookimpl
    async def lucid_activate(self, generation: Generation) -> None:
        """Make the generation's table the live one: counters, rejection tallies and
        unflushed quota keys of unchanged limits carry over; persisted quota counters
        of limits that changed what they count, or are gone, are dropped."""
        table: Table | None = generation.state.get("ratelimiter")
        if table is None:
            return
        dropped = self.go_live(table)
        if self.store is not None and dropped:
            async with self.write_lock:
                await self.store.drop_counters(dropped)

    def go_live(self, table: Table) -> dict[str, str | None]:
        """Swap ``table`` in (synchronously: no request sees half of it) and say which
        limits' persisted counters no longer apply: ``{id: signature kept or None}``."""
        old = self.table.limits if self.table is not None else {}
        max_keys = table.config.max_keys
        for compiled in table.limits.values():
            previous = old.get(compiled.id)
            if previous is not None and previous.signature == compiled.signature:
                compiled.slices = previous.slices  # given back when they expire
                compiled.seen = previous.seen
                compiled.fallback, compiled.seeded = previous.fallback, previous.seeded
                compiled.limiter = limiter = previous.limiter
                limiter.max_keys = max_keys
                limiter.count = compiled.spec.count  # a concurrency limit's max_in_flight
                compiled.rejections = previous.rejections
                compiled.dirty = previous.dirty
        if self.table is None and self._restored:  # first activation: quotas from disk
            now = self.clock()
            for limit_id, sig, key, window, value, before in self._restored:
                restored = table.limits.get(limit_id)
                if restored is not None and restored.signature == sig:
                    restored.limiter.load(key, window, value, before, now)
            self._restored = []
        gone = [previous for id, previous in old.items()
                if previous.slices and (id not in table.limits
                                        or table.limits[id].slices is not previous.slices)]
        if gone and self.shared is not None:
            self._give_back(gone, every=True)
        self.table = table
        if self.shared is not None and not self.shared.closed:
            self._degrade(missing=True)  # Redis is down: new limits need their share
        return {
            id: (table.limits[id].signature if id in table.limits else None)
            for id, previous in old.items()
            if id not in table.limits or table.limits[id].signature != previous.signature
        }

    def current(self) -> Table:
        """The live table (admin reads; tests)."""
        if self.table is None:
            raise RuntimeError("the rate limiter has not been activated")
        return self.table

    @hookimpl
    async def lucid_shutdown(self, runtime: Runtime) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        if self.shared is not None and self.table is not None and self.shared.closed:
            ops = self._slices_back(self.table.limits.values(), time.monotonic(), every=True)
            if ops:
                try:  # unspent slices back to the cluster (else they expire there)
                    await self.shared.run(ops)
                except Exception:  # noqa: BLE001 - shutting down: they expire anyway
                    log.info("could not give %d slices back to Redis", len(ops))
        if self.store is not None:
            await self.flush()
            await self.store.close()
            self.store = None

    @property
    def flush_interval(self) -> float:
        return self.table.config.flush_interval if self.table else 1.0

    @property
    def sweep_interval(self) -> float:
        return self.table.config.sweep_interval if self.table else 10.0

    async def _every(self, interval: Callable[[], float], job: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval())
            try:
                result = job()
                if asyncio.iscoroutine(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ratelimiter background job failed")

    # data path ------------------------------------------------------------------------
    @hookimpl
    def lucid_admit_request(self, exchange: Exchange) -> Rejection | None:
        table = self.table
        if table is None:
            return None
        settings = exchange.overrides.get("ratelimiter")
        if settings is None:
            cost = 1
            style = table.style
        else:
            if not settings.enabled:
                return None
            cost = settings.cost
            style = settings.headers or table.style
        route_id = exchange.route_id
        claim = table.tier_claim
        if claim:
            tier = table.default_tier
            if exchange.identity:
                tier = str(exchange.identity.get(claim, tier))
            plan = table.plans.get((route_id, tier)) or table.plan(route_id, tier)
        else:
            plan = table.by_route.get(route_id) or table.plan(route_id, table.default_tier)
        single = plan.single
        if single is not None:
            # the usual case, one rate limit in memory: _admit_local's work, in line
            limiter = single.limiter
            key = exchange.client_ip if single.by_ip else single.key_of(exchange)
            remaining = limiter.hit(key, cost, self.clock())
            if remaining < 0:
                return self._reject(exchange, single, key, style, plan,
                                    limiter.retry_after, limiter.reset)
            if single.quota:
                single.dirty.add(key)
            self.admitted += 1
            if style != "none":
                # Plan.headers, its usual answer in line: the same as last time
                reset = limiter.reset
                if (remaining == plan.shown_left and style == plan.shown_style
                        and (_ceil(reset - 1e-6) if reset > 0 else 0) == plan.shown_seconds):
                    exchange.response_headers += plan.shown
                else:
                    exchange.response_headers += plan.headers(style, single, remaining, reset)
            return None
        if not plan.limits and not plan.slots:
            return None
        if table.shared and self.shared is not None:
            if self.shared.closed:
                if plan.lease:
                    return self._admit_lease(exchange, plan, cost, style)
                return self._admit_shared(exchange, plan, cost, style)
            return self._degraded(exchange, table, plan, cost, style)
        return self._admit_local(exchange, plan, cost, style, False)

    def _admit_local(self, exchange: Exchange, plan: Plan, cost: int, style: str,
                     fallback: bool) -> Rejection | None:
        """Decide in this process's memory: the local backend, or (``fallback``) this
        process's share of each limit while Redis is down."""
        limits = plan.limits
        slots = plan.slots
        now = self.clock()
        chosen: CompiledLimit | None = None
        chosen_remaining = 0
        chosen_reset = 0.0
        keys: list[str] = []
        for compiled in limits:
            key = compiled.key_of(exchange)
            limiter = compiled.fallback if fallback else compiled.limiter
            assert limiter is not None
            remaining = limiter.hit(key, cost, now)
            if remaining < 0:
                for prior, prior_key in zip(limits, keys, strict=False):
                    (prior.fallback if fallback else prior.limiter).refund(  # type: ignore[union-attr]
                        prior_key, cost, now)
                return self._reject(exchange, compiled, key, style, plan,
                                    limiter.retry_after, limiter.reset)
            keys.append(key)
            if compiled.quota and not fallback:
                compiled.dirty.add(key)
            if chosen is None or remaining < chosen_remaining:
                chosen, chosen_remaining, chosen_reset = compiled, remaining, limiter.reset
        if slots:
            refusal = self._take_slots(exchange, slots, limits, keys, cost, style, now,
                                       fallback)
            if refusal is not None:
                return refusal
        self.admitted += 1
        if style != "none" and chosen is not None:
            exchange.response_headers += plan.headers(style, chosen, chosen_remaining,
                                                      chosen_reset)
        return None

    def _take_slots(self, exchange: Exchange, slots: tuple[CompiledLimit, ...],
                    limits: tuple[CompiledLimit, ...], keys: list[str], cost: int, style: str,
                    now: float, fallback: bool = False) -> Rejection | None:
        """Take ``cost`` in-flight units from every concurrency limit, or none of them
        (and give the rate limits' units back) if one is full. What is taken is noted
        on the exchange, for :meth:`lucid_observe_exchange` to give back."""
        taken: list[tuple[Any, str, int]] = []
        for compiled in slots:
            key = compiled.key_of(exchange)
            limiter: Any = compiled.fallback if fallback else compiled.limiter
            if limiter.hit(key, cost, now) < 0:
                for prior, prior_key, _ in taken:
                    prior.release(prior_key, cost)
                for prior, prior_key in zip(limits, keys, strict=True):
                    (prior.fallback if fallback else prior.limiter).refund(  # type: ignore[union-attr]
                        prior_key, cost, now)
                return self._reject(exchange, compiled, key, style, None,
                                    limiter.retry_after, limiter.reset)
            taken.append((limiter, key, cost))
        exchange.attributes[IN_FLIGHT] = taken
        self.holding += 1
        return None

    @hookimpl
    def lucid_observe_exchange(self, exchange: Exchange) -> None:
        """Give back the in-flight units the exchange took: this hook runs at the end of
        every exchange, whether it succeeded, failed upstream, fell back, was refused by
        a later plugin, or lost its client."""
        if not self.holding:  # no exchange holds a slot (no concurrency limit): done
            return
        taken = exchange.attributes.pop(IN_FLIGHT, None)
        if taken is not None:
            self.holding -= 1
            for limiter, key, cost in taken:
                limiter.release(key, cost)

    async def _admit_shared(self, exchange: Exchange, plan: Plan, cost: int,
                            style: str) -> Rejection | None:
        """Decide in Redis: one group of the worker's next batched script call, every
        limit of the plan counted atomically (all or none)."""
        shared = self.shared
        assert shared is not None
        every = plan.limits + plan.slots
        args: list[Any] = []
        keys: list[str] = []
        labels: list[str] = []
        leases: list[str] = []
        for compiled in every:
            key = compiled.key_of(exchange)
            labels.append(key)
            keys.append(state_key(compiled.shared_prefix, key))
            code, count, period, capacity = compiled.shared_args
            lease = ""
            if compiled.concurrent:
                lease = shared.lease_id(cost)
                leases.append(lease)
            args += (code, cost, count, period, capacity, lease, compiled.shared_rejections,
                     key)
        try:
            reply = await shared.decide(args, keys)
        except BackendUnavailable:
            table = self.table
            assert table is not None
            return self._degraded(exchange, table, plan, cost, style)
        refused = int(reply[0]) - 1
        table = self.table
        if table is not None and table.config.on_backend_failure == "local":
            # only a local share seeded from these answers ever reads them
            now = self.clock()
            for i in range(min(len(plan.limits), (len(reply) - 1) // 3)):
                _remember(plan.limits[i], labels[i], reply[1 + 3 * i], reply[2 + 3 * i],
                          now)
        if refused >= 0:
            at = 1 + 3 * refused
            compiled = every[refused]
            return self._reject(exchange, compiled, labels[refused], style,
                                plan if refused < len(plan.limits) else None,
                                reply[at + 2] / MICRO, reply[at + 1] / MICRO)
        if plan.slots:
            taken = []
            for key, lease in zip(keys[len(plan.limits):], leases, strict=True):
                shared.held[lease] = key
                taken.append((shared, key, lease))
            exchange.attributes[IN_FLIGHT] = taken
            self.holding += 1
        self.admitted += 1
        if style != "none" and plan.limits:
            best = 0
            for i in range(1, len(plan.limits)):
                if reply[1 + 3 * i] < reply[1 + 3 * best]:
                    best = i
            exchange.response_headers += plan.headers(
                style, plan.limits[best], int(reply[1 + 3 * best]), reply[2 + 3 * best] / MICRO)
        return None

    def _admit_lease(self, exchange: Exchange, plan: Plan, cost: int,
                     style: str) -> Any:
        """``sync = "lease"``: admit from this worker's slices, synchronously, when every
        limit's slice still holds ``cost``; else take slices from Redis (awaitable)."""
        now = time.monotonic()
        limits = plan.limits
        keys = []
        ready = True
        for compiled in limits:
            key = compiled.key_of(exchange)
            keys.append(key)
            piece = compiled.slices.get(key)
            if piece is None or piece.tokens < cost or piece.deadline <= now:
                ready = False
        if not ready:
            return self._take_slices(exchange, plan, keys, cost, style, now)
        for compiled, key in zip(limits, keys, strict=True):
            compiled.slices[key].tokens -= cost
        self._lease_admitted(exchange, plan, keys, style, now)
        return None

    def _lease_admitted(self, exchange: Exchange, plan: Plan, keys: list[str], style: str,
                        now: float) -> None:
        """Count an admission from slices; its headers name the limit with the fewest
        requests left, as Redis last said (what this worker's slice still holds, plus
        what was left when it was taken: other workers' slices are not seen)."""
        self.admitted += 1
        if style == "none":
            return
        best: Slice | None = None
        chosen = plan.limits[0]
        for compiled, key in zip(plan.limits, keys, strict=True):
            piece = compiled.slices.get(key)
            if piece is None:  # given back meanwhile (a reload, Redis failing)
                continue
            if best is None or piece.remaining + piece.tokens < best.remaining + best.tokens:
                best, chosen = piece, compiled
        if best is None:
            return
        exchange.response_headers += plan.headers(
            style, chosen, best.remaining + best.tokens, max(0.0, best.reset_at - now))

    async def _take_slices(self, exchange: Exchange, plan: Plan, keys: list[str], cost: int,
                           style: str, now: float) -> Rejection | None:
        """Take a slice of every limit whose slice cannot pay ``cost`` (one batched
        script call); the request spends ``cost`` of each, or of none if one refuses
        (the slices taken stay with the worker). A slice is at most what is left ÷
        (LEASE_SHARE × live processes), and just ``cost`` once little is left: near
        the limit every request is decided in Redis, as with ``sync = "strict"``."""
        shared = self.shared
        assert shared is not None
        divisor = LEASE_SHARE * max(1, self.processes)
        reserved: list[Slice] = []
        asked: list[tuple[CompiledLimit, str, Slice]] = []
        args: list[Any] = []
        state: list[str] = []
        for compiled, key in zip(plan.limits, keys, strict=True):
            piece = compiled.slices.get(key)
            if piece is None:
                piece = compiled.slices[key] = Slice()
            if piece.tokens >= cost and piece.deadline > now:
                piece.tokens -= cost
                reserved.append(piece)
                continue
            if piece.deadline > now:  # spent before it expired: ask for more next time
                piece.want = min(MAX_SLICE, piece.want * 2)
            elif piece.tokens:  # expired: what is left goes back
                self._give_back([compiled], key=key)
            code, count, period, capacity = compiled.shared_args
            args += (code, cost, count, period, capacity, f"{piece.want}:{divisor}",
                     compiled.shared_rejections, key)
            state.append(state_key(compiled.shared_prefix, key))
            asked.append((compiled, key, piece))
        for _, _, piece in asked:
            piece.taking += 1
        try:
            reply = await shared.take(args, state)
        except BackendUnavailable:
            for piece in reserved:
                piece.tokens += cost
            table = self.table
            assert table is not None
            return self._degraded(exchange, table, plan, cost, style)
        finally:
            for _, _, piece in asked:
                piece.taking -= 1
        refused: tuple[CompiledLimit, str, float, float] | None = None
        wall = self.clock()
        for n, (compiled, key, piece) in enumerate(asked):
            granted, remaining, reset, retry, mark = reply[5 * n:5 * n + 5]
            if not granted:
                if refused is None:
                    refused = (compiled, key, retry / MICRO, reset / MICRO)
                continue
            until = reset / MICRO
            _remember(compiled, key, remaining, reset, wall)
            piece.tokens += int(granted)
            piece.remaining = int(remaining)
            piece.reset_at = now + until
            piece.mark = int(mark)
            # a fixed window's slice is worth nothing once its window ends
            piece.deadline = now + (min(LEASE_SECONDS, until) if mark else LEASE_SECONDS)
        if refused is not None:
            for piece in reserved:
                piece.tokens += cost
            compiled, key, retry_after, reset = refused
            return self._reject(exchange, compiled, key, style, plan, retry_after, reset)
        for _, _, piece in asked:
            piece.tokens -= cost
        self._lease_admitted(exchange, plan, keys, style, now)
        return None

    def _slices_back(self, limits: Iterable[CompiledLimit], now: float, every: bool = False,
                     key: str | None = None) -> list[tuple[str, list[Any], list[str]]]:
        """``g`` groups giving back the unspent tokens of expired slices (``every``: of
        all slices; ``key``: of that key's only). Slices idle for a while are dropped."""
        ops: list[tuple[str, list[Any], list[str]]] = []
        for compiled in limits:
            slices = compiled.slices
            if not slices:
                continue
            code, count, period, capacity = compiled.shared_args
            for name in ([key] if key is not None else list(slices)):
                piece = slices.get(name)
                if piece is None or not (every or key is not None or piece.deadline <= now):
                    continue
                if piece.tokens > 0:
                    ops.append(("g", [code, 0, count, period, capacity,
                                      f"{piece.tokens}:{piece.mark}", "", ""],
                                [state_key(compiled.shared_prefix, name)]))
                    piece.tokens = 0
                    piece.want = max(1, piece.want // 2)
                if every or (key is None and not piece.taking
                             and piece.deadline <= now - 10 * LEASE_SECONDS):
                    del slices[name]
        return ops

    def _give_back(self, limits: Iterable[CompiledLimit], every: bool = False,
                   key: str | None = None) -> None:
        """Give slices back in the worker's next batch (nobody waits for it)."""
        shared = self.shared
        if shared is None or not shared.closed:
            return
        for op, args, keys in self._slices_back(limits, time.monotonic(), every, key):
            shared.enqueue(op, args, keys)

    def _degraded(self, exchange: Exchange, table: Table, plan: Plan, cost: int,
                  style: str) -> Rejection | None:
        """Redis is down: ``on_backend_failure`` decides (each decision counted)."""
        mode = table.config.on_backend_failure
        self.degraded[mode] += 1
        if mode == "open":
            self.admitted += 1
            return None
        if mode == "closed":
            self.rejected += 1
            return Rejection(503, {"error": "rate limit backend unavailable",
                                   "backend": self.runtime.cluster.url if self.runtime
                                   else ""}, [("retry-after", "1")],
                             reason="rate limit backend unavailable", retry_after=1)
        return self._admit_local(exchange, plan, cost, style, True)

    def _degrade(self, missing: bool = False) -> None:
        """The breaker opened: give every limit (``missing``: every limit without one
        yet) this process's share (limit ÷ live gateway processes, at least 1),
        counted in memory from now on, starting from what Redis last said of each key."""
        if self.table is None:
            return
        share = max(1, self.processes)
        now = self.clock()
        for compiled in self.table.limits.values():
            if missing and compiled.fallback is not None:
                continue
            compiled.slices.clear()  # counted in Redis already: not spent twice
            spec = compiled.spec
            compiled.fallback = fallback = ALGORITHMS[spec.algorithm](
                max(1, spec.count // share), spec.period, max(1, spec.capacity // share),
                self.table.config.max_keys)
            seen, compiled.seen, compiled.seeded = compiled.seen, {}, {}
            if isinstance(fallback, TokenBucket):
                # a TAT is in seconds: the share's (1/share of the tokens, each worth
                # share times the time) is the cluster's, so it starts as full
                fallback.tats.update((key, tat) for key, tat in seen.items() if tat > now)
            elif type(fallback) is FixedWindow:
                window = fallback.window_at(now)
                for key, (start, used) in seen.items():
                    if abs(start - window) < spec.period / 2:
                        fallback.counts[key] = part = min(fallback.count, -(-used // share))
                        compiled.seeded[key] = (window, part)

    async def _back(self) -> None:
        """Redis answers again (before decisions go back to it): what was admitted
        meanwhile counts in Redis, and the concurrency leases of requests still
        running are renewed at once (else those that lapsed meanwhile would free
        slots that are taken)."""
        shared = self.shared
        assert shared is not None
        charges = self._charges()
        for start in range(0, len(charges), 1000):
            chunk = charges[start:start + 1000]
            await shared.run([op for op, _ in chunk])
            # only now does Redis count these: a recovery that fails half way and is
            # tried again charges what is left, never a window's count twice
            for _, charged in chunk:
                charged()
        await shared.renew(force=True)

    def _charges(self) -> list[tuple[tuple[str, list[Any], list[str]], Callable[[], None]]]:
        """Redis is back: ``c`` groups counting in it what this process admitted on
        its own meanwhile (token buckets and fixed windows), so that the cluster does
        not hand out the same allowance twice; each with what to note once Redis has
        counted it (a bucket's charge takes the later TAT, so it needs nothing)."""
        ops: list[tuple[tuple[str, list[Any], list[str]], Callable[[], None]]] = []
        if self.table is None:
            return ops
        now = self.clock()
        for compiled in self.table.limits.values():
            # the share stays (requests meanwhile still use it) until the next outage
            fallback = compiled.fallback
            seeded = compiled.seeded
            code, count, period, capacity = compiled.shared_args
            pending: list[tuple[str, str, Callable[[], None]]] = []
            if isinstance(fallback, TokenBucket):
                pending = [(key, f"{int((tat - now) * MICRO)}:0", _nothing)
                           for key, tat in fallback.tats.items() if tat > now]
            elif type(fallback) is FixedWindow:
                window = fallback.window_at(now)
                mark = round(window * MICRO)
                for key, used in fallback.counts.items():
                    start, part = seeded.get(key, (window, 0))
                    if used > part and start == window:
                        pending.append((key, f"{used - part}:{mark}", partial(
                            seeded.__setitem__, key, (window, used))))
            ops += [(("c", [code, 0, count, period, capacity, amount, "", ""],
                      [state_key(compiled.shared_prefix, key)]), charged)
                    for key, amount, charged in pending]
        return ops

    async def _watch_backend(self, runtime: Runtime) -> None:
        """While Redis is down, probe it every 0.2 s (requests never wait on a probe);
        while it is up, keep the count of live processes (for the local share) and
        renew the concurrency leases this worker holds. Degraded decisions are
        announced as ``limit_degraded`` events (counted by monitoring)."""
        shared = self.shared
        assert shared is not None
        membership = Membership(runtime.cluster, dict)
        cluster = runtime.cluster
        last_members = last_renew = 0.0
        while True:
            await asyncio.sleep(0.2)
            try:
                if shared.closed and not cluster.up:
                    shared.trip()  # another call of this process found Redis down
                if not shared.closed and await shared.probe(self._back):
                    last_renew = time.monotonic()
                now = time.monotonic()
                # the live processes matter only once Redis fails: read them seldom
                if shared.closed and now - last_members >= max(2.0, cluster.config.heartbeat):
                    last_members = now
                    try:
                        nodes = await membership.nodes()
                    except BackendUnavailable:
                        shared.trip()
                    else:
                        self.processes = max(1, sum(
                            int(n.get("workers", 1)) for n in nodes if n.get("alive")))
                if shared.closed and self.table is not None:
                    self._give_back(self.table.limits.values())
                if shared.closed and now - last_renew >= shared.lease_seconds / 3:
                    last_renew = now
                    await shared.renew()
                for mode, count in self.degraded.items():
                    if count != self._reported[mode]:
                        runtime.emit(Event("limit_degraded", {
                            "mode": mode, "decisions": count - self._reported[mode]}))
                        self._reported[mode] = count
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watching the rate limit backend failed")

    def _reject(self, exchange: Exchange, compiled: CompiledLimit, key: str, style: str,
                plan: Plan | None, retry_after: float, reset: float) -> Rejection:
        self.rejected += 1
        rejections = compiled.rejections
        if key in rejections or len(rejections) < MAX_REJECTION_KEYS:
            rejections[key] = rejections.get(key, 0) + 1
        retry = max(1, math.ceil(retry_after - 1e-9))
        headers = [("retry-after", str(retry))]
        if style != "none":
            policy = plan.policy if plan is not None else compiled.policy
            headers += _headers(style, policy, compiled, 0, reset)
        if self.runtime is not None:
            self.runtime.emit(Event("limit_rejected", {
                "limit": compiled.id, "key": key, "route_id": exchange.route_id,
                "retry_after": retry,
            }))
        return Rejection(
            429, {"limit": compiled.id, "retry_after": retry}, headers,
            reason="rate limit exceeded", retry_after=retry,
        )

    # background ----------------------------------------------------------------------
    async def flush(self) -> None:
        """Write every quota counter touched since the last flush, in one transaction."""
        if self.store is None or self.table is None or not self.pending:
            return
        async with self.write_lock:
            taken: list[tuple[CompiledLimit, set[str]]] = []
            rows, deleted = [], []
            for compiled in list(self.table.limits.values()):
                if not compiled.dirty:
                    continue
                dirty, compiled.dirty = compiled.dirty, set()
                taken.append((compiled, dirty))
                for key in dirty:
                    state = compiled.limiter.dump(key)
                    if state is None:
                        deleted.append((compiled.id, key))
                    else:
                        rows.append((compiled.id, compiled.signature, key, *state))
            try:
                await self.store.write_counters(rows, deleted)
            except Exception:
                for compiled, dirty in taken:  # try again next time
                    compiled.dirty |= dirty
                raise
            self.flushes += 1
            self.flushed_rows += len(rows)
            self.last_flush_at = time.time()

    async def _sweep(self) -> None:
        """Expire idle keys, a few thousand at a time, yielding to requests in between."""
        if self.table is None:
            return
        now = self.clock()
        for compiled in list(self.table.limits.values()):
            removed = 0
            for removed in compiled.limiter.sweep_steps(now):  # noqa: B007 - the last count
                await asyncio.sleep(0)
            self.swept += removed
            if len(compiled.rejections) >= MAX_REJECTION_KEYS:
                compiled.rejections.clear()
            if compiled.seen:  # what Redis said of keys since at rest or gone by
                period = compiled.spec.period
                compiled.seen = {
                    key: value for key, value in list(compiled.seen.items())
                    if (value > now if isinstance(value, float) else value[0] + period > now)
                } if len(compiled.seen) < table_max(self) else {}

    def reset_key(self, key: str, limit_id: str | None = None) -> list[str]:
        """Forget a key's counters (in memory, and on disk at the next flush)."""
        done = []
        for compiled in (self.table.limits.values() if self.table else ()):
            if limit_id is not None and compiled.id != limit_id:
                continue
            compiled.limiter.forget(key)
            compiled.rejections.pop(key, None)
            if compiled.quota:
                compiled.dirty.add(key)
            done.append(compiled.id)
        return done

    @property
    def pending(self) -> int:
        return sum(len(c.dirty) for c in self.table.limits.values()) if self.table else 0

    def data_path(self) -> Path | None:
        return self.runtime.data_dir / "ratelimiter.db" if self.runtime else None


def table_max(plugin: RateLimiterPlugin) -> int:
    return plugin.table.config.max_keys if plugin.table is not None else 1_000_000


def _remember(compiled: CompiledLimit, key: str, remaining: int, reset: int,
              now: float) -> None:
    """Note what Redis answered of ``key`` (see ``CompiledLimit.seen``); ``reset`` µs."""
    code = compiled.shared_args[0]
    if code == "1":
        compiled.seen[key] = now + reset / MICRO
    elif code == "2":
        compiled.seen[key] = (now + reset / MICRO - compiled.spec.period,
                              compiled.spec.count - int(remaining))


def _headers(style: str, policy: str, compiled: CompiledLimit, remaining: int,
             reset: float) -> list[tuple[str, str]]:
    """RateLimit-Policy/RateLimit (draft-ietf-httpapi-ratelimit-headers) and/or
    X-RateLimit-*, for the limit with the fewest requests left."""
    seconds = str(math.ceil(reset - 1e-6)) if reset > 0 else "0"
    left = str(remaining)
    if style == "all":
        return [("ratelimit-policy", policy),
                ("ratelimit", f"{compiled.ietf_prefix}{left};t={seconds}"),
                ("x-ratelimit-limit", compiled.x_limit),
                ("x-ratelimit-remaining", left),
                ("x-ratelimit-reset", seconds)]
    if style == "ietf":
        return [("ratelimit-policy", policy),
                ("ratelimit", f"{compiled.ietf_prefix}{left};t={seconds}")]
    return [("x-ratelimit-limit", compiled.x_limit),
            ("x-ratelimit-remaining", left),
            ("x-ratelimit-reset", seconds)]


def _nothing() -> None:
    """What a token bucket's charge needs noted once Redis has it: nothing."""
