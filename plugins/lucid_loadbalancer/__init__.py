"""Lucid's load balancer plugin: round robin, smooth weighted round robin, least
connections, least request (P2C), weighted random, ring hash and Maglev; panic
threshold, slow start, signed session-affinity cookies, failover.

Inert for services without a pool: the selection hook is one dict lookup that misses,
and the core's own rotation applies. Pools come from ``[loadbalancer.pools.<id>]``
(static) and from the admin API (kept in ``loadbalancer.db``); a change applies to the
next request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lucid.model import Event, Exchange, Instance
from lucid.plugins import hookimpl
from lucid_loadbalancer.config import LoadBalancerConfig, PoolSpec
from lucid_loadbalancer.pool import Pool
from lucid_loadbalancer.store import SQLiteStore

LUCID_CAPABILITY = "loadbalancer"
DB_NAME = "loadbalancer.db"
log = logging.getLogger("lucid.loadbalancer")
__all__ = ["LoadBalancerPlugin", "LoadBalancerConfig", "PoolSpec", "Pool"]


class LoadBalancerPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        self.clock = clock  # tests may replace it (slow start)
        self.rng = rng or random.Random()
        self.runtime: Any = None
        self.store: SQLiteStore | None = None
        self.store_path: Path | None = None
        self.key: bytes | None = None  # the affinity signing key
        self.config = LoadBalancerConfig()
        self.static: dict[str, PoolSpec] = {}
        self.dynamic: dict[str, PoolSpec] = {}
        self.pools: dict[str, Pool] = {}
        self.by_service: dict[str, Pool] = {}
        self.lock: asyncio.Lock | None = None
        self._generation: Any = None

    # lifecycle ------------------------------------------------------------
    @hookimpl
    def lucid_register_config(self, register: Callable[..., None]) -> None:
        register("loadbalancer", LoadBalancerConfig)

    @hookimpl
    def lucid_register_admin(self, register: Callable[..., None]) -> None:
        from lucid_loadbalancer.admin import blueprint

        register(blueprint)

    @hookimpl
    def lucid_check_workers(self, config: Any, workers: int) -> str | None:
        """Every worker balances on its own (as nginx workers do): round-robin turns
        and in-flight counts are per process, which spreads load just as well. Pools
        from TOML and from the store are loaded by every worker; the admin API refuses
        writes while workers > 1 (it reaches one worker only)."""
        return None

    @hookimpl
    async def lucid_prepare(self, generation: Any) -> None:
        config: LoadBalancerConfig = generation.config.loadbalancer
        generation.state["loadbalancer"] = config
        if self.runtime is not None and self._needs_key(config.pools.values(), config):
            await self.ensure_key(config)

    @hookimpl
    async def lucid_startup(self, runtime: Any) -> None:
        self.runtime = runtime
        self.lock = asyncio.Lock()
        self.store_path = runtime.data_dir / DB_NAME
        config: LoadBalancerConfig = runtime.config.loadbalancer
        raw: dict[str, Any] = {}
        if self.store_path.exists():  # no pool ever stored: no file, no cost
            raw = await (await self.open_store()).load()
        for pool_id, data in raw.items():
            try:
                self.dynamic[pool_id] = PoolSpec.model_validate(data)
            except ValueError as exc:
                log.error("pool %r in the store is not valid any more, ignored: %s", pool_id, exc)
        if self._needs_key([*config.pools.values(), *self.dynamic.values()], config):
            await self.ensure_key(config)
        self.sync(runtime.generation, force=True)

    @hookimpl
    async def lucid_shutdown(self, runtime: Any) -> None:
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

    @staticmethod
    def _needs_key(specs: Any, config: LoadBalancerConfig) -> bool:
        return config.affinity_secret is None and any(s.affinity is not None for s in specs)

    async def ensure_key(self, config: LoadBalancerConfig | None = None) -> None:
        """The affinity key: ``affinity_secret`` when set, else the store's random key."""
        config = config or self.config
        if config.affinity_secret is not None:
            self.key = config.affinity_secret.encode()
        elif self.key is None:
            self.key = await (await self.open_store()).affinity_key()

    # definitions ----------------------------------------------------------
    def sync(self, generation: Any, force: bool = False) -> None:
        """Adopt a generation's config (startup, reload)."""
        if generation is self._generation and not force:
            return
        config = generation.state.get("loadbalancer")
        if config is None:
            return
        self._generation = generation
        if config.affinity_secret is not None:
            self.key = config.affinity_secret.encode()
        self.config = config
        self.static = dict(config.pools)
        self.rebuild()

    def rebuild(self) -> None:
        """Pools from static (TOML) and dynamic (API) definitions; a static pool wins an
        id or a service both claim. Unchanged pools keep their state."""
        pools: dict[str, Pool] = {}
        by_service: dict[str, Pool] = {}
        entries = [(pid, spec, True) for pid, spec in self.static.items()]
        entries += [(pid, spec, False) for pid, spec in self.dynamic.items()
                    if pid not in self.static]
        for pool_id, spec, static in entries:
            if spec.service in by_service:
                log.warning("pool %r balances service %r, already balanced by pool %r: "
                            "ignored", pool_id, spec.service, by_service[spec.service].id)
                continue
            old = self.pools.get(pool_id)
            if old is not None and old.spec == spec and old.static == static and (
                    old.threshold == self._threshold(spec) and old.secret == self.key):
                pool = old
            else:
                pool = Pool(pool_id, spec, static, self.config.panic_threshold, self.key,
                            self.clock, self.rng, self._notify,
                            previous=old if old is not None and old.service == spec.service
                            else None)
            pools[pool_id] = pool
            by_service[spec.service] = pool
        self.pools = pools
        self.by_service = by_service

    def _threshold(self, spec: PoolSpec) -> float:
        value = spec.panic_threshold
        return (value if value is not None else self.config.panic_threshold) / 100.0

    def _notify(self, kind: str, data: dict[str, Any]) -> None:
        log.warning("pool %s: %s (%d of %d instances healthy)", data["pool"],
                    "panic mode, balancing over every instance" if kind == "loadbalancer_panic"
                    else "out of panic mode", data["healthy"], data["instances"])
        if self.runtime is not None:
            try:
                self.runtime.emit(Event(kind, data))
            except RuntimeError:  # no running loop (a synchronous caller in a test)
                pass

    def instances_of(self, pool: Pool) -> Sequence[Instance] | None:
        """A pool's current candidate list, as the data path would resolve it (minus
        the instances the core's passive health has ejected)."""
        runtime = self.runtime
        found: Sequence[Instance] | None = pool.inline
        if found is None and runtime is not None:
            generation = runtime.generation
            exchange = Exchange(request_id="", method="GET", path="/", query="", host="",
                                scheme="http", client_ip="", headers={}, started=0.0,
                                generation=generation, service=pool.service)
            found = runtime.hooks.resolve_instances(exchange, generation)
        if found and runtime is not None and runtime.passive.ejected:
            return runtime.passive.view(found)  # type: ignore[no-any-return]
        return found

    # the data path --------------------------------------------------------
    @hookimpl(tryfirst=True)
    def lucid_resolve_instances(
        self, exchange: Exchange, generation: Any
    ) -> Sequence[Instance] | None:
        if generation is not self._generation:
            self.sync(generation)
        pool = self.by_service.get(exchange.service)
        return pool.inline if pool is not None else None

    @hookimpl
    def lucid_select_instance(
        self, exchange: Exchange, candidates: Sequence[Instance]
    ) -> Instance | None:
        pool = self.by_service.get(exchange.service)
        if pool is None:
            return None
        return pool.select(exchange, candidates)

    @hookimpl
    def lucid_observe_exchange(self, exchange: Exchange) -> None:
        pick = exchange.attributes.get("loadbalancer")
        if pick is not None:
            pool: Pool = pick[0]
            while pool.successor is not None:  # redefined since: same counters, new state
                pool = pool.successor
            pool.release(pick)
