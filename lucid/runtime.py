"""The running gateway: its plugins, its current config generation, its upstream pool.

A *generation* is one validated config plus what plugins derived from it (a compiled
route table, say). Each request reads ``runtime.generation`` once when it arrives and
uses that object to the end, so a reload swaps one reference and in-flight requests
finish on the generation they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from lucid import __version__
from lucid.audit import AuditLog, SqliteAudit
from lucid.cluster import (
    SNAPSHOT_FILE,
    Cluster,
    Membership,
    Moved,
    RedisBackend,
    default_node_id,
    load_snapshot,
    node_entry,
    published_change,
    save_snapshot,
)
from lucid.config import (
    ConfigError,
    data_dir,
    plugin_choices,
    read_toml,
    validate_config,
)
from lucid.definitions import (
    Backend,
    BackendUnavailable,
    Conflict,
    Definition,
    Invalid,
    Key,
    Kind,
    NotFound,
    Snapshot,
    SqliteBackend,
    Write,
    check_expectations,
    legacy_writes,
    read_stored,
)
from lucid.model import Event, Generation, Instance
from lucid.passive import PassiveHealth
from lucid.plugins import Hooks, PluginSet, choose_plugins
from lucid.tls import Termination, load_tls, warn_unmatched

log = logging.getLogger("lucid")

RECENT_EXCHANGES = 10_000  # kept for GET /gateway/metrics
# under data_dir once its local definitions were imported into an empty Redis cluster
IMPORTED_MARKER = "definitions-imported-to-cluster.json"


def load_plugins_and_config(
    path: Path | None, data: dict[str, Any] | None = None,
    extra: Sequence[tuple[str, object]] = (),
) -> tuple[PluginSet, Any]:
    """Choose plugins from ``[plugins]``, then validate the whole file against them.

    ``extra``: ``(name, object)`` plugins to register besides the chosen ones, in
    process (a test's observer); their config sections are validated like any."""
    source = str(path) if path is not None else "(built-in defaults)"
    if data is None:
        data = read_toml(path) if path is not None else {}
    enabled, disabled = choose_plugins(plugin_choices(data, source), source)
    try:
        plugin_set = PluginSet(enabled, disabled, extra)
    except ValueError as exc:
        raise ConfigError(source, [str(exc)]) from None
    config = validate_config(data, plugin_set.sections, source, ignored=disabled,
                             route_models=plugin_set.route_models)
    return plugin_set, config


class Runtime:
    """Everything one gateway process shares across requests."""

    # How often a worker without the admin API looks for definitions another process
    # wrote to the shared store (the local backend has no notifications).
    FOLLOW_INTERVAL = 1.0
    # A write validated against a revision another node moved past is validated
    # again against the new one this many times before it answers 412.
    WRITE_ATTEMPTS = 5

    def __init__(self, plugin_set: PluginSet, config: Any, config_path: Path | None):
        self.plugin_set = plugin_set
        self.hooks = Hooks(plugin_set.pm, plugin_set.admission_priority,
                           config.server.admission_order)
        self.config_path = config_path
        self.source = str(config_path) if config_path else "(built-in defaults)"
        self.generation = self._generation(0, config, Snapshot())
        self.started_at = time.time()
        self.worker_index = 0
        self.listeners: dict[str, str] = {}
        self.session: aiohttp.ClientSession | None = None
        self.data_dir = data_dir(config, config_path)
        self.backend: Backend | None = None  # where dynamic definitions live
        # the cluster this node belongs to ([cluster]; "local": this node alone)
        self.cluster = Cluster(config.cluster, config.cluster.node_id
                               or default_node_id(config.server.proxy))
        self.cluster.remembered_changed = lambda: self._save_later(self.generation)
        self.membership: Membership | None = None  # worker 0 of a Redis cluster
        self.audit: AuditLog | None = None  # admin writes (lucid.audit)
        self.started = False  # every plugin's startup ran (GET /gateway/health)
        # (perf_counter, duration, status) of recent exchanges, for /gateway/metrics:
        # appended by the proxy, one tuple per request
        self.recent: deque[tuple[float, float, int]] = deque(maxlen=RECENT_EXCHANGES)
        self._apply_lock = asyncio.Lock()
        self._unsaved: Generation | None = None  # waiting for the snapshot file
        self._saving: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.counters = {"requests": 0, "errors": 0, "in_flight": 0}
        self.passive = PassiveHealth(self.emit)  # ejections, for every instance
        self.version = __version__
        # [server.tls] and [services.*]: every certificate read and checked now (a
        # ConfigError otherwise); the listener's Termination follows reloads.
        self.tls = load_tls(config, config_path)
        self.termination = (Termination(self.tls.certificates)
                            if self.tls.certificates is not None else None)

    def _generation(self, number: int, config: Any, definitions: Snapshot) -> Generation:
        return Generation(
            number, config, self.source,
            capabilities=frozenset(p.capability for p in self.plugin_set.plugins),
            disabled=self.plugin_set.disabled,
            route_models=self.plugin_set.route_models,
            runtime=self,
            definitions=definitions,
            kinds=self.plugin_set.kinds,
        )

    @property
    def config(self) -> Any:
        return self.generation.config

    def instances(self, service: str) -> list[Instance]:
        """Every instance of ``service``, of any health (each carries its ``status``),
        as the plugin that resolves it knows them now (``lucid_list_instances``)."""
        return list(self.hooks.list_instances(service, self.generation))

    @property
    def kinds(self) -> Mapping[str, Kind]:
        return self.plugin_set.kinds

    # lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Open the definitions store, prepare the first generation, open the upstream
        pool, start plugins, then make the generation live."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # if new: private
        cluster = self.cluster
        if cluster.shared and self.config.cluster.node_id is None and "proxy" in self.listeners:
            cluster.node_id = default_node_id(self.listeners["proxy"])  # the port bound
        try:
            if cluster.shared:
                await asyncio.to_thread(cluster.load_remembered, self.data_dir)
                await cluster.start()
                self.backend = RedisBackend(cluster)
            else:
                self.backend = await SqliteBackend.open(self.data_dir / "definitions.db")
            if self.worker_index == 0:  # only worker 0 serves the admin API
                self.audit = await SqliteAudit.open(self.data_dir)
            snapshot = await (self._first_snapshot() if cluster.shared else self.backend.load())
            if snapshot.revision == 0 and cluster.up:
                snapshot = await self._import_legacy(snapshot)
            first = self._generation(1, self.generation.config, snapshot)
            await self.hooks.prepare(first)
        except BaseException:
            # aiosqlite's thread is not a daemon: left open, it would keep the
            # process alive after a refused start
            if self.backend is not None:
                await self.backend.close()
                self.backend = None
            await cluster.close()
            await self._close_audit()
            raise
        self.generation = first
        await self._saved(first)
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
        try:
            await self.hooks.startup(self)
        except BaseException:
            await self.stop()
            raise
        await self.hooks.activate(first)
        self.started = True
        if self.config.services and self.worker_index == 0:  # once, not per worker
            list_instances = self.plugin_set.pm.hook.lucid_list_instances  # None: unknown
            warn_unmatched(self.config.services, lambda name: list_instances(
                service=name, generation=first) is not None)
        if cluster.shared:
            self.background(self._follow_cluster())
            await asyncio.sleep(0)  # the follower asks for its channel
            if cluster.up:
                if await cluster.subscribed(self.SUBSCRIBE_WAIT):
                    await self._sync_logged()  # committed between the first read and now
                else:
                    log.warning("not subscribed to the cluster's changes after %.0f s; "
                                "the periodic revision check keeps this node current "
                                "meanwhile", self.SUBSCRIBE_WAIT)
            if self.worker_index == 0:
                self.membership = Membership(cluster, lambda: node_entry(self))
                self.background(self.membership.run())
        elif server.workers > 1:
            self.background(self._follow())

    async def stop(self) -> None:
        """Stop plugins (reverse order), then close the pool. Requests have drained."""
        self.started = False
        if self._unsaved is not None or (self._saving is not None and not self._saving.done()):
            await self._saved(self.generation)  # the last revision applied, before exit
        for task in list(self._background):
            task.cancel()
        if self.membership is not None:
            await self.membership.leave()
            self.membership = None
        await self.hooks.shutdown(self)
        self.passive.close()
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.backend is not None:
            await self.backend.close()
            self.backend = None
        await self.cluster.close()
        await self._close_audit()

    async def _first_snapshot(self) -> Snapshot:
        """The cluster's definitions, or while Redis is unreachable the last-known-good
        snapshot under ``data_dir`` (the follower keeps trying Redis); with neither, the
        node cannot know what to serve and does not start."""
        assert self.backend is not None
        deadline = time.monotonic() + 1.0  # a Redis starting beside this node: wait a bit
        while True:
            try:
                return await self.backend.load()
            except BackendUnavailable as exc:
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    continue
                failure = exc
                break
        snapshot = await asyncio.to_thread(load_snapshot, self.data_dir)
        if snapshot is None:
            raise ConfigError(self.source, [
                f"cluster.backend = {self.cluster.url!r}: {failure.message}, and there is "
                f"no last-known-good snapshot ({self.data_dir / SNAPSHOT_FILE}) to serve "
                "from; start Redis (or check the URL), or run this node once while it is "
                "reachable"])
        log.warning("cluster backend %s unreachable; serving the last-known-good snapshot "
                    "at revision %d from %s, and retrying", self.cluster.url,
                    snapshot.revision, self.data_dir / SNAPSHOT_FILE)
        return snapshot

    def _save_later(self, generation: Generation) -> None:
        """Save ``generation``'s snapshot off the write's path: one save at a time,
        the newest revision waiting for it (never an older one written last)."""
        if not self.cluster.shared or self.worker_index != 0:
            return
        self._unsaved = generation
        if self._saving is None or self._saving.done():
            self._saving = self.background(self._save_unsaved())

    async def _save_unsaved(self) -> None:
        while self._unsaved is not None:
            generation, self._unsaved = self._unsaved, None
            await self._saved(generation)

    async def _saved(self, generation: Generation) -> None:
        """Keep the last-known-good snapshot of a Redis cluster's definitions: what
        this node serves if it starts while Redis is unreachable."""
        if not self.cluster.shared or self.worker_index != 0:
            return
        try:
            await asyncio.to_thread(save_snapshot, self.data_dir, generation.definitions,
                                    self.cluster.url, dict(self.cluster.remembered))
        except OSError:
            log.exception("saving the cluster snapshot under %s failed", self.data_dir)

    async def _close_audit(self) -> None:
        if self.audit is not None:
            await self.audit.close()
            self.audit = None

    async def check(self) -> str | None:
        """Prepare a generation of the config as ``lucid serve`` would start it (the
        file, and the definitions stored under ``data_dir``, read-only) without making
        it live: every plugin's verdict. With a Redis backend, the definitions are the
        live cluster's if it answers (nothing is written to it), else the last-known-good
        snapshot's; what was checked against is returned, to be said."""
        if not self.cluster.shared:
            stored = await asyncio.to_thread(read_stored, self.data_dir, self.kinds)
            await self.hooks.prepare(self._generation(1, self.generation.config, stored))
            return None
        cluster = self.cluster
        await cluster.start()
        try:
            backend = RedisBackend(cluster)
            live: Snapshot | None = None
            failure: BackendUnavailable | None = None
            deadline = time.monotonic() + 1.0
            while live is None:
                try:
                    live = await backend.load()
                except BackendUnavailable as exc:
                    failure = exc
                    if time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(0.1)
            if live is not None:
                try:
                    nodes = await Membership(cluster, lambda: {}).nodes()
                    alive = sum(1 for node in nodes if node["alive"])
                    seen = f"{alive} node{'s' if alive != 1 else ''} alive"
                except BackendUnavailable:
                    seen = "its nodes unknown"
                said = (f"cluster: checked against the live cluster at {cluster.url} "
                        f"(revision {live.revision}, {len(live.items)} dynamic definitions, "
                        f"{seen})")
                stored = live
                if live.revision == 0 and not (self.data_dir / IMPORTED_MARKER).exists():
                    local = await asyncio.to_thread(read_stored, self.data_dir, self.kinds)
                    if local.items:  # what lucid serve would import into it
                        stored = local
                        said += (f"; it is empty, so the {len(local.items)} definitions "
                                 f"under {self.data_dir} that lucid serve would import were "
                                 "checked too")
            else:
                assert failure is not None
                saved = await asyncio.to_thread(load_snapshot, self.data_dir)
                if saved is None:
                    said = (f"cluster: {failure.message}; there is no last-known-good "
                            f"snapshot ({self.data_dir / SNAPSHOT_FILE}) either, so only the "
                            "config file was checked (lucid serve would not start until "
                            "the backend answers)")
                else:
                    said = (f"cluster: {failure.message}; checked against the "
                            f"last-known-good snapshot only (revision {saved.revision}, "
                            f"{self.data_dir / SNAPSHOT_FILE}), not the live cluster")
                stored = saved or Snapshot()
        finally:
            await cluster.close()
        await self.hooks.prepare(self._generation(1, self.generation.config, stored))
        return said

    # the one way a generation goes live ----------------------------------------
    async def apply(
        self, config: Any = None, definitions: Snapshot | None = None,
        commit: Callable[[], Awaitable[Snapshot]] | None = None,
    ) -> Generation:
        """Validate, prepare and swap in a generation with ``config`` and
        ``definitions`` (each defaults to the running one's); then tell plugins it is
        live (``lucid_activate``).

        Every change goes through here: SIGHUP, ``POST /gateway/config/reload``, and
        every definition written through the admin API. ``commit``, if given, runs
        after every plugin accepted the candidate and before the swap (a store write):
        if it raises, nothing changed. A :class:`ConfigError` from any plugin rejects
        the candidate and the running generation stays.
        """
        async with self._apply_lock:
            return await self._apply(config, definitions, commit)

    async def _apply(
        self, config: Any, definitions: Snapshot | None,
        commit: Callable[[], Awaitable[Snapshot]] | None,
    ) -> Generation:
        old = self.generation
        candidate = self._generation(
            old.number + 1, old.config if config is None else config,
            old.definitions if definitions is None else definitions)
        await self.hooks.prepare(candidate)
        if commit is not None:
            committed = await commit()
            if committed.revision != candidate.definitions.revision:
                # the store moved on meanwhile (another process wrote): prepare what it has
                candidate = self._generation(candidate.number, candidate.config, committed)
                await self.hooks.prepare(candidate)
        self.generation = candidate
        await self.hooks.activate(candidate)
        if candidate.definitions.revision != old.definitions.revision:
            self._save_later(candidate)
        return candidate

    async def write(
        self, kind: str, id: str, body: Mapping[str, Any] | None, *,
        exists: bool | None = None, if_match: int | None = None,
    ) -> Definition | None:
        """Create, replace or delete (``body`` None) one dynamic definition: checked,
        prepared by every plugin, committed to the store, then live. ``exists`` True
        means it must exist already, False that it must not.

        Raises :class:`NotFound` (404), :class:`Conflict` (409: a static id, an id
        taken, or a definition the config no longer accepts), :class:`PreconditionFailed`
        (412: ``if_match`` is not the definition's revision) or :class:`Invalid` (422:
        a plugin rejected the result); nothing changes then.
        """
        return (await self._written(kind, id, body, exists, if_match))[0]

    async def put(
        self, kind: str, id: str, body: Mapping[str, Any], *, if_match: int | None = None,
    ) -> tuple[Definition, bool]:
        """Create or replace one dynamic definition, as :meth:`write` does; also whether
        it was created. That is decided against the definitions the write committed on,
        not this process's view of them, which may lag behind another node's write."""
        definition, created = await self._written(kind, id, body, None, if_match)
        assert definition is not None
        return definition, created

    async def _written(
        self, kind: str, id: str, body: Mapping[str, Any] | None,
        exists: bool | None, if_match: int | None,
    ) -> tuple[Definition | None, bool]:
        if kind not in self.kinds:
            raise KeyError(f"no plugin registered definitions of kind {kind!r}")
        for _ in range(self.WRITE_ATTEMPTS - 1):
            try:
                return await self._write(kind, id, body, exists, if_match)
            except Moved:  # another node wrote first: validate again on what it made
                await self.sync()
        return await self._write(kind, id, body, exists, if_match)

    async def _write(
        self, kind: str, id: str, body: Mapping[str, Any] | None,
        exists: bool | None, if_match: int | None,
    ) -> tuple[Definition | None, bool]:
        async with self._apply_lock:
            if self.backend is None:
                raise BackendUnavailable("the definitions store is not open")
            running = self.generation
            if id in self.kinds[kind].declared(running.config):
                verb = "change" if body is not None else "remove"
                raise Conflict(f"{kind} {id!r} is declared in the config file; {verb} it "
                               "there and reload", field="id", origin="static")
            found = running.definitions.get(kind, id)
            expect: dict[Key, int | None] = {}
            if exists is False:
                expect[(kind, id)] = None
            elif found is None and exists:
                raise NotFound(f"no {kind} {id!r}", field="id")
            if if_match is not None:
                expect[(kind, id)] = if_match
            check_expectations(running.definitions, expect)
            writes = [Write(kind, id, body)]
            base = running.definitions.revision
            preview = running.definitions.applied(writes, base + 1)
            backend = self.backend
            try:
                generation = await self._apply(
                    None, preview, lambda: backend.commit(writes, base, expect))
            except ConfigError as exc:
                raise Invalid(f"{kind} rejected; nothing changed", problems=exc.problems) from None
            return generation.definitions.get(kind, id), found is None

    async def _import_legacy(self, snapshot: Snapshot) -> Snapshot:
        """Definitions an older Lucid kept in each plugin's own store, moved into the
        core's store once (its first start with this version). With a Redis backend
        that has no revision yet (a cluster never written to), what this node kept
        with the local backend (``data_dir/definitions.db``, or those older stores) is
        imported instead: switching a node from ``local`` to Redis keeps its routes,
        limits and pools. A cluster that has a revision is never overwritten."""
        assert self.backend is not None
        marker = self.data_dir / IMPORTED_MARKER
        if self.cluster.shared and marker.exists():
            return snapshot  # imported once: a Redis emptied since gets no stale copy
        if self.cluster.shared:
            stored = await asyncio.to_thread(read_stored, self.data_dir, self.kinds)
            writes = [Write(d.kind, d.id, d.body) for d in stored.items.values()]
            source = f"{self.data_dir / 'definitions.db'} (the local backend)"
        else:
            writes = await asyncio.to_thread(legacy_writes, self.data_dir, self.kinds)
            source = "older stores"
        if not writes:
            return snapshot
        try:
            imported = await self.backend.commit(writes, snapshot.revision, {})
        except Moved:  # another node or worker of the cluster imported first
            log.info("the cluster was written to meanwhile; the definitions of %s were "
                     "not imported", source)
            return await self.backend.load()
        log.info("imported %d definitions from %s into the %s definitions store "
                 "(revision %d)", len(writes), source, self.cluster.url if
                 self.cluster.shared else self.backend.name, imported.revision)
        if self.cluster.shared:
            await asyncio.to_thread(marker.write_text, json.dumps({
                "backend": self.cluster.url, "revision": imported.revision,
                "definitions": len(writes), "at": time.time()}) + "\n")
        return imported

    async def sync(self) -> bool:
        """Apply the store's definitions if its revision differs from the running
        one (another process or node wrote); whether it did."""
        async with self._apply_lock:
            backend = self.backend
            if backend is None:
                return False
            revision = await backend.revision()
            if revision == self.generation.definitions.revision:
                return False
            await self._apply(None, await backend.load(), None)
            return True

    async def _follow(self) -> None:
        """Workers without the admin API apply what worker 0 committed to the shared
        store, within ``FOLLOW_INTERVAL``."""
        while self.backend is not None:
            await asyncio.sleep(self.FOLLOW_INTERVAL)
            await self._sync_logged()

    async def _follow_cluster(self) -> None:
        """Apply every revision another node or worker commits to Redis: woken by the
        published revision, and checking every ``check_interval`` anyway (pub/sub loses
        what is published while it reconnects; a node that started from its snapshot
        catches up here)."""
        assert isinstance(self.backend, RedisBackend)
        wake = asyncio.Event()
        published: dict[int, list[Write]] = {}  # revision -> its writes, not applied yet

        def received(data: str) -> None:
            change = published_change(data)
            if change is not None and len(published) < self.PUBLISHED_KEPT:
                published[change[0]] = change[1]
            wake.set()

        self.cluster.subscribe(self.backend.channel, received)
        self.cluster.on_reconnect(wake.set)
        while self.backend is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.cluster.config.check_interval)
            wake.clear()
            if published and await self._apply_published(published):
                continue
            published.clear()
            await self._sync_logged()

    # how long a starting node waits for its pub/sub subscription before it serves
    SUBSCRIBE_WAIT = 2.0

    # published changes kept while a process catches up; past that it reads Redis
    PUBLISHED_KEPT = 1000

    async def _apply_published(self, published: dict[int, list[Write]]) -> bool:
        """Apply the published changes that follow the running revision without
        reading Redis; whether nothing else is left to read (a gap, a change missed
        while the subscription was lost, is read from Redis by the caller)."""
        async with self._apply_lock:
            backend = self.backend
            current = self.generation.definitions
            for revision in [r for r in published if r <= current.revision]:
                del published[revision]  # this process's own, or already read
            snapshot = current
            while snapshot.revision + 1 in published:
                revision = snapshot.revision + 1
                snapshot = snapshot.applied(published.pop(revision), revision)
            if snapshot is not current and isinstance(backend, RedisBackend):
                try:
                    await self._apply(None, snapshot, None)
                except ConfigError as exc:
                    log.error("definitions at the store's revision were rejected:\n%s",
                              exc.render())
                    return False
                except Exception:
                    log.exception("applying a published change failed; reading the store")
                    return False
                backend.received(snapshot)
            return not published

    async def _sync_logged(self) -> None:
        try:
            await self.sync()
        except BackendUnavailable:
            pass  # Cluster.mark logged it; the next check tries again
        except ConfigError as exc:
            log.error("definitions at the store's revision were rejected:\n%s",
                      exc.render())
        except Exception:
            log.exception("following the definitions store failed; retrying")

    # config ----------------------------------------------------------------
    async def reload(self) -> Generation:
        """Validate the config file again and swap it in; on any error keep the old one.

        Changing ``[plugins]`` or the listeners needs a restart, and says so.
        """
        if self.config_path is None:
            raise ConfigError(self.source, ["no config file to reload from"])
        data = await asyncio.to_thread(read_toml, self.config_path)
        plugin_set, config = load_plugins_and_config(self.config_path, data)
        old = self.generation
        problems = []
        if [p.name for p in plugin_set.plugins] != [p.name for p in self.plugin_set.plugins]:
            problems.append("plugins: changing which plugins are enabled needs a restart")
        for key in ("proxy", "admin", "workers", "data_dir", "admission_order", "engine"):
            if getattr(config.server, key) != getattr(old.config.server, key):
                problems.append(f"server.{key}: changing it needs a restart")
        if (config.server.tls is None) != (old.config.server.tls is None):
            problems.append("server.tls: turning TLS on or off needs a restart")
        if problems:
            raise ConfigError(self.source, problems)
        # Certificates are read again (a renewed file under the same name) and checked
        # before anything changes: a bad one keeps the running ones.
        tls = await asyncio.to_thread(load_tls, config, self.config_path)
        candidate = await self.apply(config)
        self.tls = tls
        if self.termination is not None and tls.certificates is not None:
            self.termination.swap(tls.certificates)
        log.info("config reloaded from %s (generation %d)", self.source, candidate.number)
        self.emit(Event("config_reloaded", {"generation": candidate.number, "source": self.source}))
        return candidate

    # events and background work --------------------------------------------
    def emit(self, event: Event) -> None:
        """Deliver a lifecycle event to observers without making the caller wait."""
        if not self.hooks.observes_events:
            return
        self.background(self.hooks.observe_event(event))

    def background(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` as a task the runtime keeps (and cancels when it stops)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

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

        self.background(run())
