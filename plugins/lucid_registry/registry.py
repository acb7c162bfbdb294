"""The registry in memory: services, their instances, and how each instance's health moves.

Everything the data path needs is precomputed: ``candidates`` maps a service name to
the list of instances a request may use, rebuilt when (and only when) that service
changes, so resolving is one dict lookup. Every change bumps a registry-wide
``index`` (Consul style) and wakes the service's watchers (blocking queries, SSE).

An instance's status is derived, in this order:

* ``maintenance`` while an operator drains it (no new requests; in-flight ones finish);
* ``critical`` while passively ejected (the core's :mod:`lucid.passive` saw it refuse
  connections, time out or fail repeatedly, and said so in an ``instance_ejected``
  event) -- transient, not persisted;
* otherwise the worst of what it *reported* (registration, heartbeats; ``critical``
  when its TTL lapses) and what the *active* HTTP check found.

Admin writes go to the store first (one transaction) and are applied in memory only
once committed, under one lock, so a rejected or failed write changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from lucid.model import Candidates, Event, Instance
from lucid_registry.config import (
    CheckSpec,
    InstanceSpec,
    RegistryConfig,
    ServiceBody,
    ServiceRegistration,
    StaticService,
)
from lucid_registry.store import RegistryStore

if TYPE_CHECKING:
    from lucid.runtime import Runtime

log = logging.getLogger("lucid.registry")

_RANK = {"passing": 0, "warning": 1, "critical": 2}


class RegistryError(Exception):
    status = 400

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.message = message
        self.extra = extra


class NotFound(RegistryError):
    status = 404


class Conflict(RegistryError):
    status = 409


@dataclass(slots=True, eq=False)
class RegisteredInstance(Instance):
    """The routing view of a registered instance, with a way back to its record."""

    record: Any = None


class Record:
    """One instance's registration and health state."""

    __slots__ = (
        "service", "spec", "static", "instance", "reported", "http", "note", "maintenance",
        "ejected_until", "changed_at", "idx",
        "ttl_deadline", "ttl_timer", "dereg_timer", "check_timer",
        "check_passes", "check_failures", "removed", "status",
    )

    def __init__(self, service: Service, spec: InstanceSpec, static: bool):
        self.service = service
        self.spec = spec
        self.static = static
        self.instance = RegisteredInstance(
            id=spec.id, url=spec.url, service=service.name, weight=spec.weight,
            zone=spec.zone, metadata=dict(spec.metadata), tags=tuple(spec.tags),
            status=spec.status, record=self,
        )
        self.reported: str = spec.status
        self.http: str | None = None
        self.note = ""
        self.maintenance: str | None = None
        self.ejected_until = 0.0  # while the core's passive health has it out
        self.changed_at = time.time()
        self.idx = 0
        self.ttl_deadline = 0.0
        self.ttl_timer: asyncio.TimerHandle | None = None
        self.dereg_timer: asyncio.TimerHandle | None = None
        self.check_timer: asyncio.TimerHandle | None = None
        self.check_passes = 0
        self.check_failures = 0
        self.removed = False
        self.status: str = spec.status

    @property
    def health(self) -> str:
        """What the checks say, ignoring maintenance and ejection."""
        http = self.http or "passing"
        return self.reported if _RANK[self.reported] >= _RANK[http] else http

    def effective(self) -> str:
        if self.maintenance is not None:
            return "maintenance"
        if self.ejected_until:
            return "critical"
        return self.health

    def cancel_timers(self) -> None:
        for timer in (self.ttl_timer, self.dereg_timer, self.check_timer):
            if timer is not None:
                timer.cancel()
        self.ttl_timer = self.dereg_timer = self.check_timer = None

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        scheme, rest = spec.url.split("://", 1)
        host, _, port = rest.rpartition(":")
        return {
            "id": spec.id, "url": spec.url, "scheme": scheme, "host": host.strip("[]"),
            "port": int(port), "weight": spec.weight, "zone": spec.zone,
            "metadata": spec.metadata, "tags": spec.tags, "status": self.status,
            "checks": self.checks(),
            "note": self.note, "maintenance_reason": self.maintenance,
            "static": self.static, "last_change": self.changed_at,
        }

    def respec(self, previous: InstanceSpec) -> bool:
        """``spec`` was replaced (``previous`` before): a new routing object, so
        requests in flight keep the one they picked; a new URL is judged afresh.
        Whether it was ejected (then its status must be recomputed)."""
        spec = self.spec
        self.instance = RegisteredInstance(
            id=spec.id, url=spec.url, service=self.service.name, weight=spec.weight,
            zone=spec.zone, metadata=dict(spec.metadata), tags=tuple(spec.tags),
            status=self.status, record=self)
        if spec.url == previous.url:
            return False
        ejected = bool(self.ejected_until)
        self.check_passes = self.check_failures = 0
        self.ejected_until = 0.0  # the core judges the new URL afresh
        return ejected

    def checks(self) -> dict[str, Any]:
        """The parts of the status; in cluster mode ``node`` says whose view the
        active and passive parts are (each node checks for its own traffic)."""
        checks: dict[str, Any] = {
            "reported": self.reported, "http": self.http,
            "passive": "critical" if self.ejected_until else "passing"}
        if self.service.node is not None:
            checks["node"] = self.service.node
        return checks

    def row(self) -> dict[str, Any]:
        spec = self.spec
        body = {"id": spec.id, "url": spec.url, "weight": spec.weight, "zone": spec.zone,
                "metadata": spec.metadata, "tags": spec.tags, "http": self.http}
        return {"service": self.service.name, "id": spec.id, "body": body,
                "health": self.reported, "maintenance": self.maintenance,
                "note": self.note, "changed_at": self.changed_at, "idx": self.idx}


class Service:
    """A named service: its description, check spec and instances."""

    __slots__ = ("name", "metadata", "tags", "check", "static", "records", "idx", "changed",
                 "watchers", "node")

    def __init__(self, name: str, body: ServiceBody, static: bool):
        self.name = name
        self.metadata = dict(body.metadata)
        self.tags = list(body.tags)
        self.check: CheckSpec = body.check
        self.static = static
        self.records: dict[str, Record] = {}
        self.idx = 0
        self.changed = asyncio.Event()
        self.watchers = 0  # blocking queries and SSE streams waiting on it now
        self.node: str | None = None  # cluster mode: the node whose checks show here

    def body(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "tags": self.tags,
                "check": self.check.model_dump(exclude_none=True)}

    def counts(self) -> dict[str, int]:
        counts = {"passing": 0, "warning": 0, "critical": 0, "maintenance": 0}
        for record in self.records.values():
            counts[record.status] += 1
        return counts

    def describe(self, instances: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.name, "static": self.static, "index": self.idx, **self.body(),
            "health": self.counts(), "watchers": self.watchers,
        }
        if instances:
            data["instances"] = [r.describe() for r in self.records.values()]
        return data


class Registry:
    """All services of one gateway, their health machinery and their persistence."""

    def __init__(self, runtime: Runtime, config: RegistryConfig, store: RegistryStore,
                 candidates: dict[str, list[Instance]], seed: int | None = None):
        self.runtime = runtime
        self.config = config
        self.store = store
        self.services: dict[str, Service] = {}
        self.candidates = candidates  # shared with the plugin's resolve hook
        self.index = 0
        self.lock = asyncio.Lock()
        self.random = random.Random(seed)
        self.loop = asyncio.get_running_loop()
        self.closed = False  # stopping: watches end, blocking queries answer now
        self.catalog_changed = asyncio.Event()  # any change, for watches of the list
        self.watchers = 0  # list-level blocking queries and streams waiting now
        self.read_only = ""  # why writes are refused (several worker processes)
        self._dirty: set[Record] = set()
        self._flushing: asyncio.Task[None] | None = None
        self._checks: asyncio.Queue[Record] | None = None
        self._checkers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # startup / shutdown ----------------------------------------------------
    async def load(self, statics: dict[str, StaticService], persisted: bool) -> None:
        """Static services from the config, then what the store kept."""
        for name, declared in statics.items():
            service = Service(name, declared, static=True)
            self.services[name] = service
            for spec in declared.instances:
                service.records[spec.id] = Record(service, spec, static=True)
        if persisted:
            rows, instance_rows = await self.store.load()
            for row in rows:
                self.index = max(self.index, row["idx"])
                if row["name"] in self.services:
                    log.warning("registry: service %r is declared in the config; its "
                                "registered description is ignored", row["name"])
                    continue
                body = ServiceBody.model_validate({k: row[k] for k in ("metadata", "tags",
                                                                        "check")})
                self.services[row["name"]] = Service(row["name"], body, static=False)
            for row in instance_rows:
                self.index = max(self.index, row["idx"])
                owner = self.services.get(row["service"])
                if owner is None or row["id"] in owner.records:
                    continue
                spec = InstanceSpec.model_validate(
                    {k: row[k] for k in ("id", "url", "weight", "zone", "metadata", "tags")})
                record = Record(owner, spec, static=False)
                record.reported = row["health"]
                record.http = row.get("http")
                record.maintenance = row["maintenance"]
                record.note = row["note"]
                record.changed_at = row["changed_at"]
                record.idx = row["idx"]
                owner.records[spec.id] = record
        # Indexes only grow, restarts included: changes driven by health are not
        # persisted one by one, so the index resumes from the clock (in ms) when that
        # is ahead of everything stored -- a watcher never sees it go backwards unless
        # the registry averaged more than 1,000 changes a second over its life.
        self.index = max(self.index, int(time.time() * 1000)) + 1
        for service in self.services.values():
            service.idx = self.index
            for record in service.records.values():
                record.status = record.instance.status = record.effective()
                self._arm(record, first=True)
            self._rebuild(service)

    async def sync_static(self, statics: dict[str, StaticService]) -> None:
        """After a reload: make the static services match the config again.

        A static service that left the config is removed (with any instances
        registered into it); a new one is added unless a registered service already
        has its name (then the registered one stays, and a warning says so); a
        changed one gets its new description, check and static instances.
        """
        async with self.lock:
            for name, service in list(self.services.items()):
                if service.static and name not in statics:
                    dynamic = [(name, r.spec.id) for r in service.records.values()
                               if not r.static]
                    if dynamic:
                        await self.store.write(delete_instances=dynamic)
                    del self.services[name]
                    self.candidates.pop(name, None)
                    for record in list(service.records.values()):
                        self._drop(record, "removed from the config")
                    self._removed(service)
            for name, declared in statics.items():
                found = self.services.get(name)
                if found is not None and not found.static:
                    log.warning("registry: [registry.services.%s] is ignored: a registered "
                                "service has that name", name)
                    continue
                service = found or Service(name, declared, static=True)
                self.services[name] = service
                service.metadata = dict(declared.metadata)
                service.tags = list(declared.tags)
                service.check = declared.check
                wanted = {spec.id: spec for spec in declared.instances}
                for record in list(service.records.values()):
                    if record.static and (record.spec.id not in wanted
                                          or wanted[record.spec.id] != record.spec):
                        self._drop(record, "removed from the config")
                for spec in declared.instances:
                    if spec.id not in service.records:
                        record = Record(service, spec, static=True)
                        service.records[spec.id] = record
                        self._emit("instance_registered", record, url=spec.url)
                for record in service.records.values():
                    self._arm(record, first=True)
                    record.status = record.instance.status = record.effective()
                self._changed(service)

    def close_watches(self) -> None:
        """The gateway is stopping: end SSE streams and answer blocking queries now,
        so an open watch does not hold the process for its whole grace period."""
        self.closed = True
        for service in self.services.values():
            service.changed.set()
        self.catalog_changed.set()

    async def stop(self) -> None:
        self.close_watches()
        for service in self.services.values():
            for record in service.records.values():
                record.cancel_timers()
        for task in [*self._checkers, *self._tasks]:
            task.cancel()
        if self._checkers or self._tasks:
            await asyncio.gather(*self._checkers, *self._tasks, return_exceptions=True)
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self._flush()

    async def close_store(self) -> None:
        await self.store.close()

    def background(self, work: Any) -> None:
        """Run ``work`` until the registry stops."""
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # the data path ---------------------------------------------------------
    def _rebuild(self, service: Service) -> None:
        """The candidates of one service: passing instances, else warning ones; with
        ``everyone`` not in maintenance, for a selection plugin's panic threshold."""
        records = service.records.values()
        passing: list[Instance] = [r.instance for r in records if r.status == "passing"]
        if not passing:
            passing = [r.instance for r in records if r.status == "warning"]
        everyone = [r.instance for r in records if r.status != "maintenance"]
        self.candidates[service.name] = Candidates(passing, everyone)

    def _bump(self) -> int | None:
        """The index of a change made here: the next one. (In cluster mode the index
        is the cluster's, and a change only this node sees does not move it.)"""
        return self.index + 1

    def _changed(self, service: Service, index: int | None = None) -> None:
        """Bump the index (or take ``index``), rebuild candidates, wake the service's
        watchers."""
        if index is None:
            index = self._bump()
        self._rebuild(service)
        if index is None:
            return
        self.index = max(self.index, index)
        service.idx = index
        event, service.changed = service.changed, asyncio.Event()
        event.set()
        self._wake_catalog()

    def _removed(self, service: Service, index: int | None = None) -> None:
        """A service left: bump the index, wake its watchers (they see it gone)."""
        if index is None:
            index = self._bump()
        if index is not None:
            self.index = max(self.index, index)
            service.idx = index
        service.changed.set()
        self._wake_catalog()

    def _wake_catalog(self) -> None:
        if not self.closed:
            event, self.catalog_changed = self.catalog_changed, asyncio.Event()
            event.set()

    def _restatus(self, record: Record, source: str, persist: bool = False) -> bool:
        """Recompute an instance's status; on change emit, rebuild and (maybe) persist."""
        old = record.status
        new = record.effective()
        self._arm_deregister(record)
        if new == old:
            return False
        record.status = record.instance.status = new
        record.changed_at = time.time()
        service = record.service
        self._changed(service)
        record.idx = service.idx
        self._emit("instance_health_changed", record, old=old, new=new, source=source,
                   note=record.note)
        if persist:
            self._persist_later(record)
        return True

    def passive(self, kind: str, data: dict[str, Any]) -> None:
        """The core's passive health ejected (``instance_ejected``) or readmitted
        (``instance_readmitted``) an instance: a registry instance shows as critical
        in between (see :mod:`lucid.passive`; the core already keeps it from traffic)."""
        service = self.services.get(data["service"])
        record = service.records.get(data["instance"]) if service is not None else None
        if record is None or record.removed or record.spec.url != data["url"]:
            return
        if kind == "instance_ejected":
            record.ejected_until = self.loop.time() + data["seconds"]
            record.note = f"passive: {data['reason']}"
        elif record.ejected_until:
            record.ejected_until = 0.0
        else:
            return
        self._restatus(record, "passive")

    # timers: TTL, deregistration ---------------------------------------------
    def _arm(self, record: Record, first: bool = False) -> None:
        """(Re)start the TTL clock and active checks of a record per its service's spec."""
        check = record.service.check
        if check.ttl is not None and self._times(record):
            record.ttl_deadline = self.loop.time() + check.ttl
            if record.ttl_timer is None:
                record.ttl_timer = self.loop.call_at(record.ttl_deadline, self._ttl_due, record)
        elif record.ttl_timer is not None:
            record.ttl_timer.cancel()
            record.ttl_timer = None
        if check.http is not None:
            if record.check_timer is None:
                # Spread the first checks over one interval so 1,000 instances
                # registered together are not all checked at the same moment.
                delay = self.random.uniform(0, check.http.interval) if first else 0.0
                self._schedule_check(record, delay)
        else:
            if record.check_timer is not None:
                record.check_timer.cancel()
                record.check_timer = None
            record.http = None
        self._arm_deregister(record)

    def _times(self, record: Record) -> bool:
        """Whether this process runs the TTL and deregistration clocks of ``record``
        (in cluster mode Redis does, for registered instances)."""
        return True

    def _ttl_due(self, record: Record) -> None:
        record.ttl_timer = None
        if record.removed or record.service.check.ttl is None:
            return
        now = self.loop.time()
        if now < record.ttl_deadline:  # renewed meanwhile: sleep until the new deadline
            record.ttl_timer = self.loop.call_at(record.ttl_deadline, self._ttl_due, record)
            return
        if record.reported != "critical":
            record.reported = "critical"
            record.note = f"TTL of {record.service.check.ttl:g}s expired"
            self._restatus(record, "ttl", persist=True)

    def renew(self, record: Record) -> None:
        """A heartbeat: push the TTL deadline (the timer catches up lazily)."""
        ttl = record.service.check.ttl
        if ttl is not None and self._times(record):
            record.ttl_deadline = self.loop.time() + ttl
            if record.ttl_timer is None:
                record.ttl_timer = self.loop.call_at(record.ttl_deadline, self._ttl_due, record)

    def _arm_deregister(self, record: Record) -> None:
        after = record.service.check.deregister_after
        due = (after is not None and not record.static and record.health == "critical"
               and self._times(record))
        if after is not None and due and record.dereg_timer is None:
            record.dereg_timer = self.loop.call_later(after, self._deregister_due, record)
        elif not due and record.dereg_timer is not None:
            record.dereg_timer.cancel()
            record.dereg_timer = None

    def _deregister_due(self, record: Record) -> None:
        record.dereg_timer = None
        if record.removed or record.health != "critical":
            return
        service = record.service
        after = service.check.deregister_after
        self.background(self._remove_expired(record, after))

    async def _remove_expired(self, record: Record, after: float | None) -> None:
        async with self.lock:
            if record.removed or record.health != "critical":
                return
            service = record.service
            await self.store.write(delete_instances=[(service.name, record.spec.id)])
            self._drop(record, f"critical for {after:g}s (deregister_after)")
            self._changed(service)

    # active HTTP checks ------------------------------------------------------
    def _schedule_check(self, record: Record, delay: float) -> None:
        if self._checks is None:
            self._checks = asyncio.Queue()
            self._checkers = [self.loop.create_task(self._checker())
                              for _ in range(self.config.check_concurrency)]
        record.check_timer = self.loop.call_later(delay, self._checks.put_nowait, record)

    async def _checker(self) -> None:
        assert self._checks is not None
        while True:
            record = await self._checks.get()
            record.check_timer = None
            spec = record.service.check.http
            if record.removed or spec is None:
                continue
            try:
                await self._check(record, spec)
            except Exception:
                log.exception("registry: health check of %s failed", record.spec.url)
            if not record.removed and record.service.check.http is not None:
                spec = record.service.check.http
                spread = spec.interval * spec.jitter
                self._schedule_check(
                    record, max(0.05, spec.interval + self.random.uniform(-spread, spread)))

    async def _check(self, record: Record, spec: Any) -> None:
        session = self.runtime.session
        note = ""
        try:
            async with session.get(record.spec.url + spec.path, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=spec.timeout)) as r:
                status = r.status
                await r.read()
            ok = status in spec.expected_statuses if spec.expected_statuses else (
                200 <= status < 300)
            if not ok:
                note = f"http check: {spec.path} answered {status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ok = False
            note = f"http check: {spec.path} failed: {type(exc).__name__}"
        if record.removed:
            return
        if ok:
            record.check_failures = 0
            record.check_passes += 1
            if record.http != "passing" and (record.http is None or
                                             record.check_passes >= spec.healthy_threshold):
                record.http = "passing"
                record.note = f"http check: {spec.path} passed"
                self._restatus(record, "http", persist=True)
        else:
            record.check_passes = 0
            record.check_failures += 1
            if record.http != "critical" and record.check_failures >= spec.unhealthy_threshold:
                record.http = "critical"
                record.note = note
                self._restatus(record, "http", persist=True)

    # persistence of background changes -----------------------------------------
    def _persist_later(self, record: Record) -> None:
        self._dirty.add(record)
        if self._flushing is None:
            self._flushing = self.loop.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        try:
            await self._flush()
        finally:
            self._flushing = None

    async def _flush(self) -> None:
        while self._dirty:
            async with self.lock:
                batch = [r for r in self._dirty if not r.removed and not r.static]
                self._dirty.clear()
                if batch:
                    try:
                        await self.store.write(instances=[r.row() for r in batch])
                    except Exception:
                        log.exception("registry: could not persist %d status changes",
                                      len(batch))

    # admin operations ------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise Conflict(self.read_only)

    def service(self, name: str) -> Service:
        service = self.services.get(name)
        if service is None:
            raise NotFound(f"no service {name!r}")
        return service

    def _mutable(self, service: Service, action: str) -> None:
        if service.static:
            raise Conflict(f"service {service.name!r} is declared in the config file "
                           f"([registry.services.{service.name}]); {action} it there",
                           static=True)

    async def register_service(self, reg: ServiceRegistration) -> Service:
        self._writable()
        async with self.lock:
            if reg.id in self.services:
                raise Conflict(f"service {reg.id!r} already exists",
                               static=self.services[reg.id].static)
            service = Service(reg.id, reg, static=False)
            idx = self.index + 1
            records = [Record(service, spec, static=False) for spec in reg.instances]
            for record in records:
                record.idx = idx
            await self.store.write(
                services=[{"name": reg.id, "body": service.body(), "idx": idx}],
                instances=[r.row() for r in records],
                delete_instances=[(reg.id, r.spec.id) for r in records],
            )
            self.services[reg.id] = service
            for record in records:
                service.records[record.spec.id] = record
                self._arm(record, first=True)
            self._changed(service)
            for record in records:
                self._emit("instance_registered", record, url=record.spec.url)
            return service

    async def update_service(self, name: str, body: ServiceBody) -> Service:
        self._writable()
        async with self.lock:
            service = self.service(name)
            self._mutable(service, "change")
            await self.store.write(
                services=[{"name": name, "body": {**body.model_dump(exclude_none=True)},
                           "idx": self.index + 1}])
            service.metadata = dict(body.metadata)
            service.tags = list(body.tags)
            service.check = body.check
            for record in service.records.values():
                self._arm(record)
            self._changed(service)
            for record in list(service.records.values()):
                self._restatus(record, "config", persist=True)
            return service

    async def delete_service(self, name: str) -> None:
        self._writable()
        async with self.lock:
            service = self.service(name)
            self._mutable(service, "remove")
            await self.store.write(delete_services=[name])
            del self.services[name]
            self.candidates.pop(name, None)
            for record in list(service.records.values()):
                self._drop(record, "service unregistered")
            self._removed(service)

    async def register_instance(self, name: str, spec: InstanceSpec) -> Record:
        self._writable()
        async with self.lock:
            service = self.service(name)
            if spec.id in service.records:
                raise Conflict(f"service {name!r} already has an instance {spec.id!r}")
            record = Record(service, spec, static=False)
            record.idx = self.index + 1
            await self.store.write(instances=[record.row()])
            service.records[spec.id] = record
            self._arm(record, first=True)
            self._changed(service)
            self._emit("instance_registered", record, url=spec.url)
            return record

    async def update_instance(self, name: str, instance_id: str, update: Any) -> Record:
        """Replace an instance's URL, weight, zone, metadata and tags; keep its health."""
        self._writable()
        async with self.lock:
            record = self.record(name, instance_id)
            if record.static:
                raise Conflict(f"instance {instance_id!r} is declared in the config file "
                               f"([registry.services.{name}]); change it there", static=True)
            spec = InstanceSpec.model_validate({**update.model_dump(), "id": instance_id,
                                                "status": record.spec.status})
            previous = record.spec
            record.spec = spec
            try:
                await self.store.write(instances=[record.row()])
            except BaseException:
                record.spec = previous
                raise
            ejected = record.respec(previous)
            self._changed(record.service)
            if ejected:
                self._restatus(record, "passive")
            return record

    def record(self, name: str, instance_id: str) -> Record:
        record = self.service(name).records.get(instance_id)
        if record is None:
            raise NotFound(f"service {name!r} has no instance {instance_id!r}")
        return record

    async def deregister_instance(self, name: str, instance_id: str) -> None:
        self._writable()
        async with self.lock:
            record = self.record(name, instance_id)
            if record.static:
                raise Conflict(f"instance {instance_id!r} is declared in the config file "
                               f"([registry.services.{name}]); remove it there", static=True)
            await self.store.write(delete_instances=[(name, instance_id)])
            self._drop(record, "deregistered")
            self._changed(record.service)

    async def heartbeat(self, name: str, instance_id: str, status: str, note: str) -> Record:
        """Renew the TTL; a changed status is persisted before answering."""
        self.record(name, instance_id)  # 404 with the usual message
        return (await self.heartbeats([(name, instance_id, status, note)]))[0]

    async def heartbeats(self, items: list[tuple[str, str, str, str]]) -> list[Record]:
        """Renew many instances at once (``service, instance, status, note``).

        All or nothing: an unknown instance refuses the whole batch before anything
        is renewed. Status changes are committed in one transaction before answering;
        renewals without a change write nothing.
        """
        records = self._records(items)
        changed: list[tuple[Record, str, str]] = []
        for record, (_, _, status, note) in zip(records, items, strict=True):
            self.renew(record)
            if status != record.reported:
                changed.append((record, status, note))
            elif note:
                record.note = note
        if changed:
            self._writable()
            async with self.lock:
                live = [(r, s, n) for r, s, n in changed if not r.removed]
                before = [(r, r.reported, r.note) for r, _, _ in live]
                for record, status, note in live:
                    record.reported = status
                    record.note = note or f"reported {status}"
                try:
                    rows = [r.row() for r, _, _ in live if not r.static]
                    if rows:
                        await self.store.write(instances=rows)
                except BaseException:
                    for record, reported, note in before:
                        record.reported, record.note = reported, note
                    raise
                for record, _, _ in live:
                    self._restatus(record, "heartbeat")
        return records

    def _records(self, items: list[tuple[str, str, str, str]]) -> list[Record]:
        """The records of a batch of heartbeats; 404 listing every unknown one."""
        records: list[Record] = []
        missing: list[str] = []
        for name, instance_id, _, _ in items:
            service = self.services.get(name)
            record = service.records.get(instance_id) if service is not None else None
            if record is None:
                missing.append(f"{name}/{instance_id}")
            else:
                records.append(record)
        if missing:
            raise NotFound(f"{len(missing)} unknown instance(s)", unknown=missing[:100])
        return records

    async def maintenance(self, name: str, instance_id: str, enabled: bool,
                          reason: str) -> Record:
        self._writable()
        async with self.lock:
            record = self.record(name, instance_id)
            previous = record.maintenance
            record.maintenance = (reason or "maintenance") if enabled else None
            try:
                if not record.static:  # static instances start as declared
                    await self.store.write(instances=[record.row()])
            except BaseException:
                record.maintenance = previous
                raise
            if not self._restatus(record, "maintenance") and previous != record.maintenance:
                self._changed(record.service)
            return record

    def _drop(self, record: Record, reason: str) -> None:
        record.removed = True
        record.cancel_timers()
        record.service.records.pop(record.spec.id, None)
        self._dirty.discard(record)
        self._emit("instance_deregistered", record, reason=reason)

    def _emit(self, kind: str, record: Record, **data: Any) -> None:
        self.runtime.emit(Event(kind, {
            "service": record.service.name, "instance": record.spec.id,
            "url": record.spec.url, "status": record.status, **data}))
