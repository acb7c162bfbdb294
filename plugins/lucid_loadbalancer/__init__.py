"""Lucid's load balancer plugin: round robin, smooth weighted round robin, least
connections, least request (P2C), weighted random, ring hash and Maglev; panic
threshold, slow start, signed session-affinity cookies, failover.

Inert for services without a pool: the selection hook is one dict lookup that misses,
and the core's own rotation applies. Pools are definitions of kind ``"pool"``: static
ones from ``[loadbalancer.pools.<id>]``, dynamic ones from the admin API, kept by the
core's definitions store (an older Lucid's ``loadbalancer.db`` pools are imported
once). ``lucid_prepare`` decides which pool balances which service; ``lucid_activate``
makes those pools live, carrying counters and slow-start clocks over, so the data
path never checks which generation it runs under.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lucid.definitions import BackendUnavailable, legacy_rows
from lucid.model import Event, Exchange, Generation, Instance
from lucid.plugins import hookimpl
from lucid_loadbalancer.config import LoadBalancerConfig, PoolSpec
from lucid_loadbalancer.pool import BALANCER, ID, INDEX, POOL, Pool
from lucid_loadbalancer.store import SQLiteStore, cluster_affinity_key

if TYPE_CHECKING:
    from lucid.definitions import Definition
    from lucid.runtime import Runtime

LUCID_CAPABILITY = "loadbalancer"
KIND = "pool"
DB_NAME = "loadbalancer.db"
log = logging.getLogger("lucid.loadbalancer")
__all__ = ["LoadBalancerPlugin", "LoadBalancerConfig", "PoolSpec", "Pool", "Plan", "plan_pools"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One pool a generation makes live."""

    id: str
    spec: PoolSpec
    static: bool


@dataclass(frozen=True)
class Plan:
    """What ``lucid_prepare`` derives from a generation: the ``[loadbalancer]``
    section and the pools that balance a service, one per service. Pure data: the
    live :class:`Pool` objects (with their counters) are made from it on activation,
    so preparing a candidate that is then rejected touches nothing running."""

    config: LoadBalancerConfig
    entries: tuple[Entry, ...] = ()

    @property
    def needs_key(self) -> bool:
        """Some pool signs affinity cookies and no ``affinity_secret`` is set: the
        store's random key is needed."""
        return self.config.affinity_secret is None and any(
            e.spec.affinity is not None for e in self.entries)

    def threshold(self, spec: PoolSpec) -> float:
        value = spec.panic_threshold
        return (value if value is not None else self.config.panic_threshold) / 100.0


def static_pools(config: Any) -> dict[str, PoolSpec]:
    """The pools the config file declares, by id, in file order."""
    return dict(config.loadbalancer.pools)


def legacy_pools(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Pools an older Lucid kept in the ``pools`` table of ``loadbalancer.db`` (moved
    to the core's store; the file keeps the affinity key)."""
    rows = legacy_rows(data_dir / DB_NAME, "SELECT id, spec FROM pools ORDER BY id")
    return {id: json.loads(spec) for id, spec in rows}


def plan_pools(config: LoadBalancerConfig, defined: Mapping[str, Definition]) -> Plan:
    """The pools to run, static first: a pool whose service an earlier one (a static
    one, or a dynamic one with a smaller id) balances already is left out with a
    warning. The admin API refuses to make such a pool; the config file can gain one
    (the file wins), and a start never fails over it."""
    entries: list[Entry] = []
    by_service: dict[str, str] = {}
    for pool_id, definition in defined.items():
        try:
            spec = definition.parsed(PoolSpec)
        except ValueError as exc:  # stored by a Lucid whose rules were looser
            log.error("pool %r in the store is not valid any more, ignored: %s", pool_id, exc)
            continue
        if spec.service in by_service:
            log.warning("pool %r balances service %r, already balanced by pool %r: ignored",
                        pool_id, spec.service, by_service[spec.service])
            continue
        by_service[spec.service] = pool_id
        entries.append(Entry(pool_id, spec, definition.origin == "static"))
    return Plan(config, tuple(entries))


class LoadBalancerPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        self.clock = clock  # tests may replace it (slow start)
        self.rng = rng or random.Random()
        self.runtime: Runtime | None = None
        self.store: SQLiteStore | None = None
        self.store_path: Path | None = None
        # the random affinity key: the cluster's in Redis, else the one in loadbalancer.db
        self.stored_key: bytes | None = None
        self.key_is_local = False  # Redis was unreachable: this node's key for now
        self.key: bytes | None = None  # the affinity key the live pools sign with
        self.plan = Plan(LoadBalancerConfig())
        self.pools: dict[str, Pool] = {}
        self.by_service: dict[str, Pool] = {}
        # admin writes of pools: the service checks and the write, one at a time
        self.lock = asyncio.Lock()

    # lifecycle ------------------------------------------------------------
    @hookimpl
    def lucid_register_config(self, register: Callable[..., None]) -> None:
        register("loadbalancer", LoadBalancerConfig)

    @hookimpl
    def lucid_register_definitions(self, register: Callable[..., None]) -> None:
        register(KIND, PoolSpec, static=static_pools, legacy=legacy_pools,
                 section="loadbalancer.pools")

    @hookimpl
    def lucid_register_admin(self, register: Callable[..., None]) -> None:
        from lucid_loadbalancer.admin import blueprint

        register(blueprint)

    @hookimpl
    def lucid_check_workers(self, config: Any, workers: int) -> str | None:
        """Every worker balances on its own (as nginx and Envoy workers do): round-robin
        turns, in-flight counts and slow-start clocks are per process, which spreads
        load just as well. Pools reach every worker through the core's definitions
        store, and the affinity key is made once (in loadbalancer.db, or in Redis with a
        Redis backend): nothing to refuse."""
        return None

    @hookimpl
    async def lucid_prepare(self, generation: Generation) -> None:
        plan = plan_pools(generation.config.loadbalancer, generation.defined(KIND))
        generation.state[LUCID_CAPABILITY] = plan
        if self.runtime is not None and plan.needs_key:  # started: the store may open
            await self.ensure_key()

    @hookimpl
    async def lucid_startup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store_path = runtime.data_dir / DB_NAME
        plan = runtime.generation.state.get(LUCID_CAPABILITY)
        if plan is not None and plan.needs_key:
            await self.ensure_key()

    @hookimpl
    def lucid_activate(self, generation: Generation) -> None:
        plan = generation.state.get(LUCID_CAPABILITY)
        if plan is not None:
            self.adopt(plan)

    @hookimpl
    async def lucid_shutdown(self, runtime: Runtime) -> None:
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def open_store(self) -> SQLiteStore:
        """The store, opened (and created) on first need. Workers starting together
        may find the new file locked: lucid.store.open_database waits that out."""
        if self.store is None:
            assert self.store_path is not None
            self.store = await SQLiteStore.open(self.store_path)
        return self.store

    async def ensure_key(self) -> None:
        """Read (or make) the random affinity key, once per process. With a Redis
        backend it is the cluster's, so every node signs and checks cookies with one key;
        while Redis is unreachable the node signs with its own stored key and keeps
        asking Redis (:meth:`_join_key`)."""
        if self.stored_key is not None and not self.key_is_local:
            return
        assert self.runtime is not None
        cluster = self.runtime.cluster
        if cluster.shared:
            try:
                self.stored_key = await cluster_affinity_key(cluster)
                self.key_is_local = False
                return
            except BackendUnavailable as exc:
                if not self.key_is_local:
                    log.warning("the cluster's affinity key could not be read (%s); this "
                                "node signs affinity cookies with its own key until it "
                                "can", exc.message)
                    self.key_is_local = True
                    self.runtime.background(self._join_key())
        self.stored_key = await (await self.open_store()).affinity_key()

    async def _join_key(self) -> None:
        """Ask Redis for the cluster's affinity key until it answers, then sign with
        it: the live pools are made again from the live plan with the new key."""
        assert self.runtime is not None
        cluster = self.runtime.cluster
        while self.key_is_local:
            await asyncio.sleep(cluster.config.check_interval)
            try:
                key = await cluster_affinity_key(cluster)
            except BackendUnavailable:
                continue
            self.stored_key = key
            self.key_is_local = False
            log.info("affinity cookies signed with the cluster's key again")
            self.adopt(self.plan)

    # activation ------------------------------------------------------------
    def adopt(self, plan: Plan) -> None:
        """Make ``plan``'s pools live. A pool whose definition, threshold and key are
        unchanged is kept as it is (its ring or table too); a redefined one starts
        from the counters and slow-start clocks of the one it replaces."""
        secret = plan.config.affinity_secret
        self.key = secret.get_secret_value().encode() if secret is not None else self.stored_key
        self.plan = plan
        self.pools, self.by_service = self._pools(plan.entries)

    def _pools(self, entries: Iterable[Entry]) -> tuple[dict[str, Pool], dict[str, Pool]]:
        pools: dict[str, Pool] = {}
        by_service: dict[str, Pool] = {}
        for entry in entries:
            old = self.pools.get(entry.id)
            threshold = self.plan.threshold(entry.spec)
            if old is not None and old.spec == entry.spec and old.static == entry.static and (
                    old.threshold == threshold and old.secret == self.key):
                pool = old
            else:
                pool = Pool(entry.id, entry.spec, entry.static,
                            self.plan.config.panic_threshold, self.key, self.clock, self.rng,
                            self._notify,
                            previous=old if old is not None and old.service == entry.spec.service
                            else None)
            pools[entry.id] = pool
            by_service[entry.spec.service] = pool
        return pools, by_service

    def _notify(self, kind: str, data: dict[str, Any]) -> None:
        log.warning("pool %s: %s (%d of %d instances healthy)", data["pool"],
                    "panic mode, balancing over every instance" if kind == "loadbalancer_panic"
                    else "out of panic mode", data["healthy"], data["instances"])
        if self.runtime is not None:
            try:
                self.runtime.emit(Event(kind, data))
            except RuntimeError:  # no running loop (a synchronous caller in a test)
                pass

    # the data path --------------------------------------------------------
    @hookimpl(tryfirst=True)
    def lucid_resolve_instances(
        self, exchange: Exchange, generation: Generation
    ) -> Sequence[Instance] | None:
        pool = self.by_service.get(exchange.service)
        return pool.inline if pool is not None else None

    @hookimpl
    def lucid_select_instance(
        self, exchange: Exchange, candidates: Sequence[Instance]
    ) -> Instance | None:
        pool = self.by_service.get(exchange.service)
        if pool is None:
            return None
        # The usual request, inline (what Pool.select does with it): a first attempt
        # under the pool's current candidate list, no hash key or affinity cookie to
        # read, no instance ramping up. Anything else goes through Pool.select.
        state = pool.state
        source = exchange.instances
        attributes = exchange.attributes
        if (state is None or not state.plain or pool.ramping or "loadbalancer" in attributes
                or state.source is not (candidates if source is None else source)):
            return pool.select(exchange, candidates)
        balancer = state.balancer
        index = balancer.fixed
        if index < 0:
            index = balancer.pick(0)
        instance_id = balancer.ids[index]
        attributes["loadbalancer"] = [pool, balancer, index, instance_id, None, None]
        load = pool.load  # Pool._charge
        counts = load.counts
        counts[instance_id] = counts.get(instance_id, 0) + 1
        load.total += 1
        if balancer.tracks_release:
            balancer.charged(index)
        picks = pool.picks
        picks[instance_id] = picks.get(instance_id, 0) + 1
        return balancer.instances[index]

    @hookimpl
    def lucid_observe_exchange(self, exchange: Exchange) -> None:
        pick = exchange.attributes.get("loadbalancer")
        if pick is None:
            return
        pool: Pool = pick[POOL]
        if pool.successor is not None or pick[BALANCER].tracks_release:
            while pool.successor is not None:  # redefined since: same counters, new state
                pool = pool.successor
            pool.release(pick)
            return
        if pick[INDEX] < 0:  # released already (a retry found nothing left)
            return
        # Pool.release, inline: the in-flight count drops
        instance_id = pick[ID]
        load = pool.load
        counts = load.counts
        left = counts.get(instance_id, 0) - 1
        if left > 0:
            counts[instance_id] = left
        else:
            counts.pop(instance_id, None)
        if load.total > 0:
            load.total -= 1
        pick[INDEX] = -1
