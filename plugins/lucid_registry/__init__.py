"""Lucid's service registry plugin: registration, discovery, health, watches, persistence.

Routes name a service; this plugin resolves it to the service's usable instances
from memory (one dict lookup per request) and returns None for services it does not
know, so the gateway plugin's static ``[gateway.services]`` still resolve. Without a
``[registry]`` section and without registrations it is inert: no store is opened
until the admin API first writes, and every service lookup misses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from lucid.cluster import not_shared_yet
from lucid.config import ConfigError
from lucid.model import Exchange, Instance
from lucid.passive import STATE_KEY as PASSIVE_STATE
from lucid.plugins import hookimpl
from lucid_registry.cluster import ClusterRegistry, RedisStore
from lucid_registry.config import RegistryConfig
from lucid_registry.registry import Registry
from lucid_registry.store import SQLiteStore

if TYPE_CHECKING:
    from lucid.model import Generation
    from lucid.runtime import Runtime

LUCID_CAPABILITY = "registry"
DB_NAME = "registry.db"
# Announced by the core when SIGTERM arrives, before the listeners drain: an open
# watch (SSE stream, blocking query) would otherwise hold the process for its grace
# period.
STOPPING_EVENT = "stopping"
PASSIVE_EVENTS = frozenset({"instance_ejected", "instance_readmitted"})  # lucid.passive
__all__ = ["RegistryConfig", "RegistryPlugin", "Registry"]


class RegistryPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY

    def __init__(self) -> None:
        self.registry: Registry | None = None
        # service name -> candidate instances; the Registry rebuilds entries in place.
        self.candidates: dict[str, list[Instance]] = {}

    # lifecycle ---------------------------------------------------------------
    @hookimpl
    def lucid_register_config(self, register: Callable[..., None]) -> None:
        register("registry", RegistryConfig)

    @hookimpl
    def lucid_register_admin(self, register: Callable[..., None]) -> None:
        from lucid_registry.admin import blueprint

        register(blueprint)

    @hookimpl
    def lucid_check_workers(self, config: Any, workers: int) -> str | None:
        if config.cluster.backend != "local":
            return None  # every worker follows the registry in Redis
        if workers > 1 and config.registry.model_fields_set:
            return ("the registry keeps instances and their health in one process; "
                    + not_shared_yet(config, "registrations are"))
        return None

    @hookimpl
    def lucid_prepare(self, generation: Generation) -> None:
        config = generation.config
        generation.state["registry"] = config.registry
        if "passive" in config.registry.model_fields_set:
            # the older spelling of [server.passive], kept working: it sets the
            # gateway-wide passive health when [server.passive] is not set
            if "passive" in config.server.model_fields_set:
                raise ConfigError(generation.source, [
                    "registry.passive: passive health is set in [server.passive]; "
                    "[registry.passive] is its older name, keep one of them"])
            generation.state[PASSIVE_STATE] = config.registry.passive

    @hookimpl
    async def lucid_startup(self, runtime: Runtime) -> None:
        config: RegistryConfig = runtime.config.registry
        if runtime.cluster.shared:
            shared = ClusterRegistry(runtime, config, RedisStore(runtime.cluster),
                                     self.candidates)
            await shared.start(config.services)
            shared.background(shared.follow(expire=runtime.worker_index == 0))
            self.registry = shared
            return
        path = runtime.data_dir / DB_NAME
        registry = Registry(runtime, config, SQLiteStore(path), self.candidates)
        if runtime.config.server.workers > 1:
            registry.read_only = ("the registry needs server.workers = 1: registrations "
                                  "made here would not reach the other worker processes")
        await registry.load(config.services, persisted=path.exists())
        self.registry = registry

    @hookimpl
    async def lucid_shutdown(self, runtime: Runtime) -> None:
        if self.registry is not None:
            await self.registry.stop()
            await self.registry.close_store()
            self.registry = None

    @hookimpl
    def lucid_observe_event(self, event: Any) -> Awaitable[None] | None:
        """After a reload, static services follow the file; when the gateway starts
        stopping, watches end; passive ejections show in instance statuses (other
        events cost nothing)."""
        if self.registry is None:
            return None
        if event.kind == STOPPING_EVENT:
            self.registry.close_watches()
            return None
        if event.kind in PASSIVE_EVENTS:
            self.registry.passive(event.kind, event.data)
            return None
        if event.kind != "config_reloaded":
            return None
        registry = self.registry
        config: RegistryConfig = registry.runtime.config.registry
        registry.config = config  # max_wait follows the reload
        return registry.sync_static(config.services)

    # data path -----------------------------------------------------------------
    @hookimpl
    def lucid_resolve_instances(
        self, exchange: Exchange, generation: Generation
    ) -> Sequence[Instance] | None:
        return self.candidates.get(exchange.service)

    @hookimpl
    def lucid_list_instances(
        self, service: str, generation: Generation
    ) -> Sequence[Instance] | None:
        registry = self.registry
        known = registry.services.get(service) if registry is not None else None
        if known is None:
            return None
        return [record.instance for record in known.records.values()]
