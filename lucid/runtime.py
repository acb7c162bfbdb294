"""The running gateway: its plugins, its current config generation, its upstream pool.

A *generation* is one validated config plus what plugins derived from it (a compiled
route table, say). Each request reads ``runtime.generation`` once when it arrives and
uses that object to the end, so a reload swaps one reference and in-flight requests
finish on the generation they started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp

from lucid import __version__
from lucid.config import (
    ConfigError,
    data_dir,
    plugin_choices,
    read_toml,
    validate_config,
)
from lucid.model import Event, Generation
from lucid.passive import PassiveHealth
from lucid.plugins import Hooks, PluginSet, choose_plugins

log = logging.getLogger("lucid")


def load_plugins_and_config(
    path: Path | None, data: dict[str, Any] | None = None
) -> tuple[PluginSet, Any]:
    """Choose plugins from ``[plugins]``, then validate the whole file against them."""
    source = str(path) if path is not None else "(built-in defaults)"
    if data is None:
        data = read_toml(path) if path is not None else {}
    enabled, disabled = choose_plugins(plugin_choices(data, source), source)
    try:
        plugin_set = PluginSet(enabled, disabled)
    except ValueError as exc:
        raise ConfigError(source, [str(exc)]) from None
    config = validate_config(data, plugin_set.sections, source, ignored=disabled)
    return plugin_set, config


class Runtime:
    """Everything one gateway process shares across requests."""

    def __init__(self, plugin_set: PluginSet, config: Any, config_path: Path | None):
        self.plugin_set = plugin_set
        self.hooks = Hooks(plugin_set.pm)
        self.config_path = config_path
        self.source = str(config_path) if config_path else "(built-in defaults)"
        self.generation = self._generation(0, config)
        self.started_at = time.time()
        self.worker_index = 0
        self.listeners: dict[str, str] = {}
        self.session: aiohttp.ClientSession | None = None
        self.data_dir = data_dir(config, config_path)
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self.counters = {"requests": 0, "errors": 0, "in_flight": 0}
        self.passive = PassiveHealth(self.emit)  # ejections, for every instance
        self.version = __version__

    def _generation(self, number: int, config: Any) -> Generation:
        return Generation(
            number, config, self.source,
            capabilities=frozenset(p.capability for p in self.plugin_set.plugins),
            disabled=self.plugin_set.disabled,
            route_models=self.plugin_set.route_models,
            runtime=self,
        )

    @property
    def config(self) -> Any:
        return self.generation.config

    # lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Prepare the first generation, open the upstream pool, start plugins."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # if new: private
        first = self._generation(1, self.generation.config)
        await self.hooks.prepare(first)
        self.generation = first
        server = self.config.server
        connector = aiohttp.TCPConnector(
            limit=server.upstream_connections,
            limit_per_host=0,
            keepalive_timeout=server.upstream_keepalive,
            ttl_dns_cache=60,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        await self.hooks.startup(self)

    async def stop(self) -> None:
        """Stop plugins (reverse order), then close the pool. Requests have drained."""
        for task in list(self._background):
            task.cancel()
        await self.hooks.shutdown(self)
        self.passive.close()
        if self.session is not None:
            await self.session.close()
            self.session = None

    # config ----------------------------------------------------------------
    async def reload(self) -> Generation:
        """Validate the config file again and swap it in; on any error keep the old one.

        Changing ``[plugins]`` or the listeners needs a restart, and says so.
        """
        async with self._reload_lock:
            if self.config_path is None:
                raise ConfigError(self.source, ["no config file to reload from"])
            data = await asyncio.to_thread(read_toml, self.config_path)
            plugin_set, config = load_plugins_and_config(self.config_path, data)
            old = self.generation
            problems = []
            if [p.name for p in plugin_set.plugins] != [p.name for p in self.plugin_set.plugins]:
                problems.append("plugins: changing which plugins are enabled needs a restart")
            for key in ("proxy", "admin", "workers", "data_dir"):
                if getattr(config.server, key) != getattr(old.config.server, key):
                    problems.append(f"server.{key}: changing it needs a restart")
            if problems:
                raise ConfigError(self.source, problems)
            candidate = self._generation(old.number + 1, config)
            await self.hooks.prepare(candidate)
            self.generation = candidate
            log.info("config reloaded from %s (generation %d)", self.source, candidate.number)
        self.emit(Event("config_reloaded", {"generation": candidate.number, "source": self.source}))
        return candidate

    # events ----------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Deliver a lifecycle event to observers without making the caller wait."""
        if not self.hooks._observe_event:
            return
        task = asyncio.get_running_loop().create_task(self.hooks.observe_event(event))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def reload_in_background(self) -> None:
        """SIGHUP: reload, and on failure log why and keep the running generation."""

        async def run() -> None:
            try:
                await self.reload()
            except ConfigError as exc:
                log.error("reload rejected, keeping generation %d:\n%s",
                          self.generation.number, exc.render())
            except Exception:
                log.exception("reload failed, keeping generation %d", self.generation.number)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
