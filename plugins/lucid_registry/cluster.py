"""The registry shared by every node and worker of a Redis cluster.

With ``[cluster] backend = "redis://..."`` the registry's records live in Redis
(:class:`RedisStore`), and each process keeps a copy in memory (:class:`ClusterRegistry`)
that routing reads, so no proxied request waits on Redis:

* ``<prefix>registry:services`` (hash: service -> description), and per service
  ``registry:instances:<service>`` (instance -> URL, weight, zone, metadata, tags,
  maintenance) and ``registry:health:<service>`` (instance -> reported status, note,
  TTL);
* one registry index, bumped by a Lua script with each change, which also appends the
  changed services to the stream ``registry:log`` and publishes the index on
  ``registry:changed``. A process applies the log from the index it has (woken by the
  message, and checking every ``[cluster] check_interval`` anyway: pub/sub drops what
  is published while it reconnects); a gap in the log (trimmed, or Redis restarted
  empty) means a full resync;
* TTLs are decided once, by Redis: a heartbeat sets the instance's deadline in the
  sorted set ``registry:deadlines`` from Redis ``TIME``, and a script run by every
  node's first worker marks what lapsed critical (and removes what stayed critical
  past ``deregister_after``, from ``registry:deregister``). A second node running the
  same script finds nothing left to do.

Active HTTP checks and passive ejections stay per node (as Envoy's and Kong's do):
each process judges instances for its own traffic, shows its view as ``checks.http``
with ``checks.node`` naming the node, and such a change does not move the cluster's
index. Static services from the config stay local to each node, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lucid.definitions import BackendUnavailable
from lucid_registry.config import (
    InstanceSpec,
    RegistryConfig,
    ServiceBody,
    ServiceRegistration,
    StaticService,
)
from lucid_registry.registry import (
    Conflict,
    NotFound,
    Record,
    Registry,
    Service,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from lucid.cluster import Cluster
    from lucid.runtime import Runtime

log = logging.getLogger("lucid.registry")

# How often each node's first worker asks Redis to expire lapsed TTLs: the delay
# between a deadline and the instance going critical, at most.
EXPIRE_INTERVAL = 0.1
LOG_LENGTH = 10_000  # changes kept for processes catching up (approximate trim)
# under data_dir once registry.db was imported into an empty cluster registry
IMPORTED_MARKER = "registry-imported-to-cluster.json"

# KEYS: index, services, deadlines, deregister, log, channel
# ARGV: prefix of the per-service hashes, mode ("commit" or "expire"), ops (JSON)
# A script runs alone: its checks, writes, the index bump and the log entry cannot
# interleave with another node's. Redis's clock (TIME) sets every deadline.
SCRIPT = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local order, seen = {}, {}
local function touch(svc)
  if not seen[svc] then seen[svc] = true; order[#order + 1] = svc end
end
local function inst(svc) return ARGV[1] .. 'instances:' .. svc end
local function hk(svc) return ARGV[1] .. 'health:' .. svc end
local function member(svc, id) return svc .. '\0' .. id end
local function split(m)
  local i = string.find(m, '\0', 1, true)
  return string.sub(m, 1, i - 1), string.sub(m, i + 1)
end
local function drop(svc, id)
  redis.call('HDEL', inst(svc), id)
  redis.call('HDEL', hk(svc), id)
  redis.call('ZREM', KEYS[3], member(svc, id))
  redis.call('ZREM', KEYS[4], member(svc, id))
  touch(svc)
end
local function renew(svc, id, ttl)
  if ttl > 0 then
    redis.call('ZADD', KEYS[3], now + math.floor(ttl * 1000), member(svc, id))
  else
    redis.call('ZREM', KEYS[3], member(svc, id))
  end
end
local function health(svc, id, status, note, source, ttl, dereg, force)
  local raw = redis.call('HGET', hk(svc), id)
  if raw and not force then
    local old = cjson.decode(raw)
    if old.health == status then
      if note ~= '' and old.note ~= note then
        old.note = note
        redis.call('HSET', hk(svc), id, cjson.encode(old))
      end
      return
    end
  end
  redis.call('HSET', hk(svc), id, cjson.encode({health = status, note = note,
    source = source, changed_at = now / 1000, ttl = ttl, dereg = dereg}))
  if status == 'critical' and dereg > 0 then
    redis.call('ZADD', KEYS[4], 'NX', now + math.floor(dereg * 1000), member(svc, id))
  else
    redis.call('ZREM', KEYS[4], member(svc, id))
  end
  touch(svc)
end

if ARGV[2] == 'expire' then
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)) do
    redis.call('ZREM', KEYS[3], m)
    local svc, id = split(m)
    local raw = redis.call('HGET', hk(svc), id)
    if raw then
      local h = cjson.decode(raw)
      if h.health ~= 'critical' then
        health(svc, id, 'critical', 'TTL of ' .. string.format('%g', h.ttl) .. 's expired',
               'ttl', h.ttl, h.dereg, true)
      end
    end
  end
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 1000)) do
    redis.call('ZREM', KEYS[4], m)
    local svc, id = split(m)
    local raw = redis.call('HGET', hk(svc), id)
    if raw and cjson.decode(raw).health == 'critical' then drop(svc, id) end
  end
else
  local ops = cjson.decode(ARGV[3])
  for _, op in ipairs(ops) do  -- the checks come first: all or nothing
    local kind = op[1]
    if kind == 'need_service' and redis.call('HEXISTS', KEYS[2], op[2]) == 0 then
      return {'missing', op[2]}
    elseif kind == 'no_service' and redis.call('HEXISTS', KEYS[2], op[2]) == 1 then
      return {'exists', op[2]}
    elseif kind == 'need_instance' and redis.call('HEXISTS', inst(op[2]), op[3]) == 0 then
      return {'missing', op[2], op[3]}
    elseif kind == 'no_instance' and redis.call('HEXISTS', inst(op[2]), op[3]) == 1 then
      return {'exists', op[2], op[3]}
    elseif kind == 'no_index' and redis.call('EXISTS', KEYS[1]) == 1 then
      return {'indexed'}  -- an import: only into a registry never written to
    end
  end
  for _, op in ipairs(ops) do
    local kind = op[1]
    if kind == 'service' then
      redis.call('HSET', KEYS[2], op[2], op[3])
      touch(op[2])
    elseif kind == 'drop_service' then
      for _, id in ipairs(redis.call('HKEYS', inst(op[2]))) do drop(op[2], id) end
      redis.call('DEL', inst(op[2]), hk(op[2]))
      redis.call('HDEL', KEYS[2], op[2])
      touch(op[2])
    elseif kind == 'instance' then
      redis.call('HSET', inst(op[2]), op[3], op[4])
      touch(op[2])
    elseif kind == 'drop_instance' then
      drop(op[2], op[3])
    elseif kind == 'health' then
      renew(op[2], op[3], op[7])
      health(op[2], op[3], op[4], op[5], op[6], op[7], op[8], op[9] == 1)
    elseif kind == 'rearm' then
      for _, id in ipairs(redis.call('HKEYS', inst(op[2]))) do renew(op[2], id, op[3]) end
    end
  end
end

local current = redis.call('GET', KEYS[1])
if #order == 0 then return {'ok', current or '0'} end
local index
if current then index = redis.call('INCR', KEYS[1]) else
  index = now  -- a new (or emptied) Redis: indexes resume from the clock, in ms
  redis.call('SET', KEYS[1], string.format('%d', index))
end
local id = string.format('%d', index) .. '-1'
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[4], id, 's', cjson.encode(order))
redis.call('PUBLISH', KEYS[6], string.format('%d', index))
return {'ok', string.format('%d', index)}
"""

# KEYS: index, log. ARGV: prefix of the per-service hashes, the index the caller has.
# The changes after that index and, in the same script (so they agree), what Redis
# holds now of each service they name: one round trip where a log read and then a
# read of the services were two (each ~a loopback round trip, several ms on a busy
# machine, on the path between a registration and another node resolving it).
CHANGES_SCRIPT = r"""
local since = ARGV[2]
local first = since == '0' and '-' or ('(' .. since .. '-1')
local entries = redis.call('XRANGE', KEYS[2], first, '+', 'COUNT', 100000)
local out = {redis.call('GET', KEYS[1]) or '0', #entries}
local seen, order = {}, {}
for _, entry in ipairs(entries) do  -- first every entry: (id, names)...
  local names = entry[2][2]
  out[#out + 1] = entry[1]
  out[#out + 1] = names
  for _, name in ipairs(cjson.decode(names)) do
    if not seen[name] then seen[name] = true; order[#order + 1] = name end
  end
end
for _, name in ipairs(order) do  -- then each service named: (name, body, instances, health)
  out[#out + 1] = name
  out[#out + 1] = redis.call('HGET', ARGV[1] .. 'services', name) or ''
  out[#out + 1] = cjson.encode(redis.call('HGETALL', ARGV[1] .. 'instances:' .. name))
  out[#out + 1] = cjson.encode(redis.call('HGETALL', ARGV[1] .. 'health:' .. name))
end
return out
"""

Op = list[Any]
# (service description or None, {instance: fields}, {instance: health})
ServiceState = tuple[dict[str, Any] | None, dict[str, dict[str, Any]], dict[str, dict[str, Any]]]


class RedisStore:
    """The registry's records in Redis: commits through :data:`SCRIPT`, reads of the
    log and of whole services."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.prefix = cluster.key("registry", "")
        self.index_key = cluster.key("registry", "index")
        self.services_key = cluster.key("registry", "services")
        self.log_key = cluster.key("registry", "log")
        self.channel = cluster.key("registry", "changed")
        self.keys = [self.index_key, self.services_key, cluster.key("registry", "deadlines"),
                     cluster.key("registry", "deregister"), self.log_key, self.channel]
        self._script: Any = None
        self._changes: Any = None

    async def _run(self, mode: str, ops: list[Op]) -> list[Any]:
        if self._script is None and self.cluster.redis is not None:
            self._script = self.cluster.redis.register_script(SCRIPT)
        script = self._script
        args = [self.prefix, mode, json.dumps(ops), LOG_LENGTH]
        result: list[Any] = await self.cluster.call(
            lambda redis: script(keys=self.keys, args=args))
        return result

    async def commit(self, ops: list[Op]) -> int:
        """Run ``ops`` (checks first, then writes) as one script; the index after it."""
        outcome = await self._run("commit", ops)
        if outcome[0] == "indexed":
            raise Conflict("the cluster's registry has been written to already",
                           static=False)
        if outcome[0] == "missing":
            if len(outcome) > 2:
                raise NotFound(f"service {outcome[1]!r} has no instance {outcome[2]!r}")
            raise NotFound(f"no service {outcome[1]!r}")
        if outcome[0] == "exists":
            if len(outcome) > 2:
                raise Conflict(f"service {outcome[1]!r} already has an instance "
                               f"{outcome[2]!r}")
            raise Conflict(f"service {outcome[1]!r} already exists", static=False)
        return int(outcome[1])

    async def changed(self, since: int) -> tuple[
            int, list[tuple[int, list[str]]] | None, dict[str, ServiceState]]:
        """The current index, the changes after ``since`` (None when the log cannot
        say: trimmed past it, or Redis lost it; then read everything) and what Redis
        holds now of each service they name, in one script."""
        if self._changes is None and self.cluster.redis is not None:
            self._changes = self.cluster.redis.register_script(CHANGES_SCRIPT)
        script = self._changes
        out: list[Any] = await self.cluster.call(lambda redis: script(
            keys=[self.index_key, self.log_key], args=[self.prefix, str(since)]))
        index, count = int(out[0] or 0), int(out[1])
        changes = [(int(str(out[2 + 2 * n]).partition("-")[0]), json.loads(out[3 + 2 * n]))
                   for n in range(count)]
        states: dict[str, ServiceState] = {}
        rest = out[2 + 2 * count:]
        for n in range(0, len(rest), 4):
            name, body, instances, health = rest[n: n + 4]
            states[name] = (json.loads(body) if body else None,
                            {k: json.loads(v) for k, v in _pairs(json.loads(instances))},
                            {k: json.loads(v) for k, v in _pairs(json.loads(health))})
        if index < since or (index > since and (not changes or changes[0][0] != since + 1)):
            return index, None, {}
        return index, changes, states

    async def expire(self) -> int:
        """Mark lapsed TTLs critical, remove what stayed critical ``deregister_after``."""
        return int((await self._run("expire", []))[1])

    async def services(self) -> tuple[int, list[str]]:
        """The index and every registered service's name."""
        async def read(redis: Redis) -> list[Any]:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.get(self.index_key)
                pipe.hkeys(self.services_key)
                return await pipe.execute()

        current, names = await self.cluster.call(read)
        return int(current or 0), list(names)

    async def read(self, names: Iterable[str]) -> dict[str, ServiceState]:
        """What Redis holds of each service now (description None: it is gone)."""
        names = list(names)

        async def read(redis: Redis) -> list[Any]:
            async with redis.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.hget(self.services_key, name)
                    pipe.hgetall(self.prefix + "instances:" + name)
                    pipe.hgetall(self.prefix + "health:" + name)
                return await pipe.execute()

        found = await self.cluster.call(read) if names else []
        out: dict[str, ServiceState] = {}
        for n, name in enumerate(names):
            body, instances, health = found[3 * n: 3 * n + 3]
            out[name] = (json.loads(body) if body is not None else None,
                         {k: json.loads(v) for k, v in instances.items()},
                         {k: json.loads(v) for k, v in health.items()})
        return out


def _pairs(flat: Any) -> list[tuple[str, str]]:
    """HGETALL's flat reply as pairs (cjson writes an empty one as {})."""
    items = flat if isinstance(flat, list) else []
    return list(zip(items[::2], items[1::2], strict=True))


def _seconds(value: float | None) -> float:
    return float(value) if value is not None else 0.0


def instance_fields(spec: InstanceSpec, maintenance: str | None) -> str:
    return json.dumps({"url": spec.url, "weight": spec.weight, "zone": spec.zone,
                       "metadata": spec.metadata, "tags": spec.tags,
                       "maintenance": maintenance})


class ClusterRegistry(Registry):
    """The registry of one process of a Redis cluster: the same admin operations as
    :class:`Registry`, committed to Redis first, and applied here (as on every other
    process) from Redis's log of changes."""

    def __init__(self, runtime: Runtime, config: RegistryConfig, store: RedisStore,
                 candidates: dict[str, list[Any]], seed: int | None = None):
        super().__init__(runtime, config, store, candidates, seed)  # type: ignore[arg-type]
        self.redis = store
        self.node_id: str = runtime.cluster.node_id
        self._sync_lock = asyncio.Lock()
        self._full = True  # the next sync reads everything
        self._loaded = False  # read everything once
        self._ignored: set[str] = set()  # registered names that a static service shadows
        # what Redis last said of each registered service: the node's last-known-good
        # snapshot keeps it (runtime.cluster.remember), for a start while Redis is down
        self._states: dict[str, ServiceState] = {}

    # what stays local --------------------------------------------------------
    def _bump(self) -> int | None:
        return None  # a per-node view (an active check, a passive ejection)

    def _times(self, record: Record) -> bool:
        return record.static  # Redis keeps the clocks of registered instances

    def _persist_later(self, record: Record) -> None:
        """Active checks and ejections are this node's view: not written anywhere."""

    async def close_store(self) -> None:
        """The connection is the cluster's: closed with it."""

    # following Redis -----------------------------------------------------------
    async def start(self, statics: dict[str, StaticService]) -> None:
        await self.load(statics, persisted=False)
        for service in self.services.values():
            service.node = self.node_id
        self.index = 0
        try:
            await self.sync()
            if self.index == 0 and self.runtime.worker_index == 0:
                await self._import_local()
        except BackendUnavailable as exc:
            saved = self.runtime.cluster.recall("registry")
            if not saved or not saved.get("services"):
                log.warning("registry: %s; serving the static services until it answers",
                            exc.message)
                return
            for name, state in saved["services"].items():
                self._apply(name, (state[0], state[1], state[2]), int(saved["index"]))
            self._full = True  # Redis's whole state replaces this one when it answers
            log.warning("registry: %s; serving the %d registered services of the "
                        "last-known-good snapshot (index %d) until it answers",
                        exc.message, len(saved["services"]), int(saved["index"]))

    async def _import_local(self) -> None:
        """Switching a node from the local backend to Redis: the services it kept in
        ``data_dir/registry.db`` go into the cluster's registry if nothing was ever
        written there (checked by the script, atomically), once per data dir."""
        from lucid_registry.store import SQLiteStore

        data_dir = self.runtime.data_dir
        path, marker = data_dir / "registry.db", data_dir / IMPORTED_MARKER
        if not path.exists() or marker.exists():
            return
        store = SQLiteStore(path)
        try:
            rows, instance_rows = await store.load()
        finally:
            await store.close()
        ops: list[Op] = [["no_index"]]
        shapes: dict[str, Service] = {}
        for row in rows:
            if row["name"] in self.services:  # declared in this node's config
                continue
            try:
                body = ServiceBody.model_validate({k: row.get(k) for k in (
                    "metadata", "tags", "check") if row.get(k) is not None})
            except ValueError as exc:
                log.warning("registry: service %r in %s not imported: %s", row["name"],
                            path, exc)
                continue
            shapes[row["name"]] = shape = Service(row["name"], body, static=False)
            ops.append(["service", row["name"], json.dumps(shape.body())])
        for row in instance_rows:
            owner = shapes.get(row["service"])
            if owner is None:
                continue
            try:
                spec = InstanceSpec.model_validate({k: row[k] for k in (
                    "id", "url", "weight", "zone", "metadata", "tags") if k in row})
            except ValueError as exc:
                log.warning("registry: instance %r of %r in %s not imported: %s",
                            row["id"], owner.name, path, exc)
                continue
            ops.append(["instance", owner.name, spec.id,
                        instance_fields(spec, row["maintenance"])])
            ops.append(self._health_op(owner, spec.id, row["health"], row["note"],
                                       "import", True))
        if not shapes:
            return
        try:
            await self._commit(ops)
        except Conflict:
            log.info("registry: the cluster's registry has been written to already; "
                     "the services in %s were not imported", path)
            return
        await asyncio.to_thread(marker.write_text, json.dumps(
            {"backend": self.runtime.cluster.url, "index": self.index,
             "services": len(shapes), "at": time.time()}) + "\n")
        log.info("registry: imported %d services from %s (the local backend) into "
                 "the cluster's registry at %s", len(shapes), path,
                 self.runtime.cluster.url)

    def _remember(self) -> None:
        """Hand the registered services to the node's last-known-good snapshot
        (worker 0 saves it; the others' copy would be the same)."""
        if self.runtime.worker_index == 0:
            self.runtime.cluster.remember("registry", {
                "index": self.index,
                "services": {name: list(state) for name, state in self._states.items()}})

    async def follow(self, expire: bool) -> None:
        """Apply what other processes commit: woken by the published index, and
        checking every ``check_interval`` anyway. With ``expire`` (a node's first
        worker), also have Redis expire lapsed TTLs."""
        cluster = self.runtime.cluster
        wake = asyncio.Event()
        cluster.subscribe(self.redis.channel, lambda index: wake.set())

        cluster.on_reconnect(wake.set)  # what was published meanwhile is in the log
        interval = cluster.config.check_interval
        next_check = 0.0
        while not self.closed:
            timeout = EXPIRE_INTERVAL if expire else interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)
            woken = wake.is_set()
            wake.clear()
            try:
                # a published change first: expiring TTLs before it would put one more
                # round trip between another node's write and this node serving it
                if woken or time.monotonic() >= next_check:
                    next_check = time.monotonic() + interval
                    await self.sync()
                if expire:
                    await self.redis.expire()  # what it changes is published
            except BackendUnavailable:
                pass  # Cluster.mark logged it; the log has what is missed meanwhile
            except Exception:
                log.exception("registry: following the cluster failed; retrying")

    async def sync(self, at_least: int = 0) -> None:
        """Bring this process's copy up to Redis's index (at least ``at_least``): the
        services the log names since the index it has, or everything after a gap."""
        async with self._sync_lock:
            if at_least and self.index >= at_least and not self._full:
                return
            if not self._full:
                index, changes, states = await self.redis.changed(self.index)
                if changes is not None:
                    last: dict[str, int] = {}
                    for at, names in changes:
                        for name in names:
                            last[name] = at
                    for name, state in states.items():
                        self._apply(name, state, last[name])
                    if changes:
                        self.index = max(self.index, changes[-1][0])
                        self._remember()
                    return
                self._full = True
            index, names = await self.redis.services()
            if index == self.index and self._loaded:
                self._full = False  # nothing moved meanwhile
                return
            gone = [n for n, s in self.services.items() if not s.static and n not in names]
            states = await self.redis.read([*names, *gone])
            self._full = False
            for name, state in states.items():
                self._apply(name, state, index)
            if self._loaded and index != self.index:
                self._wake_catalog()
            self.index = index
            self._loaded = True
            self._remember()

    def _apply(self, name: str, state: ServiceState, index: int) -> None:
        """Make the service ``name`` here what Redis says it is."""
        body, instances, healths = state
        service = self.services.get(name)
        if body is None:
            self._states.pop(name, None)
        elif service is None or not service.static:
            self._states[name] = state
        if service is not None and service.static:
            if body is not None and name not in self._ignored:
                self._ignored.add(name)
                log.warning("registry: service %r is declared in the config; its "
                            "registered description is ignored", name)
            return
        if body is None:
            if service is not None:
                del self.services[name]
                self.candidates.pop(name, None)
                for record in list(service.records.values()):
                    self._drop(record, "service unregistered")
                self._removed(service, index)
            return
        described = ServiceBody.model_validate(body)
        rearm = service is None or service.check != described.check
        if service is None:
            service = self.services[name] = Service(name, described, static=False)
            service.node = self.node_id
        else:
            service.metadata = dict(described.metadata)
            service.tags = list(described.tags)
            service.check = described.check
        for instance_id, record in list(service.records.items()):
            if instance_id not in instances:
                self._drop(record, "deregistered")
        for instance_id, fields in instances.items():
            health = healths.get(instance_id, {})
            record = service.records.get(instance_id)
            spec = InstanceSpec.model_validate({
                "id": instance_id, "url": fields["url"], "weight": fields["weight"],
                "zone": fields["zone"], "metadata": fields["metadata"],
                "tags": fields["tags"],
                "status": record.spec.status if record is not None else
                health.get("health", "passing")})
            new = record is None
            if record is None:
                record = service.records[instance_id] = Record(service, spec, static=False)
            elif spec != record.spec:
                previous, record.spec = record.spec, spec
                record.respec(previous)
            record.reported = health.get("health", record.reported)
            record.note = health.get("note", record.note)
            record.changed_at = health.get("changed_at", record.changed_at)
            record.maintenance = fields.get("maintenance")
            record.idx = index
            if rearm or new:
                self._arm(record, first=new)
            if new:
                self._emit("instance_registered", record, url=spec.url)
            old, status = record.status, record.effective()
            if status != old:
                record.status = record.instance.status = status
                if not new:
                    self._emit("instance_health_changed", record, old=old, new=status,
                               source=health.get("source", "cluster") if
                               record.maintenance is None else "maintenance",
                               note=record.note)
        self._changed(service, index)

    # admin operations ------------------------------------------------------------
    async def _commit(self, ops: list[Op]) -> int:
        self._writable()
        index = await self.redis.commit(ops)
        try:
            await self.sync(index)
        except BackendUnavailable as exc:  # committed: say so, not "nothing was written"
            raise BackendUnavailable(
                f"the write was committed (registry index {index}), but this node could "
                f"not read it back yet: {exc.message}", **exc.extra) from None
        return index

    def _health_op(self, service: Service, instance_id: str, status: str, note: str,
                   source: str, force: bool) -> Op:
        check = service.check
        return ["health", service.name, instance_id, status, note, source,
                _seconds(check.ttl), _seconds(check.deregister_after), 1 if force else 0]

    def _registered(self, name: str) -> Service:
        service = self.service(name)
        if service.static:
            raise Conflict(f"service {name!r} is declared in the config file "
                           f"([registry.services.{name}]); in cluster mode its instances "
                           "are declared there too (or register the service through the "
                           "API)", static=True)
        return service

    async def register_service(self, reg: ServiceRegistration) -> Service:
        if reg.id in self.services and self.services[reg.id].static:
            raise Conflict(f"service {reg.id!r} already exists", static=True)
        shape = Service(reg.id, reg, static=False)
        ops: list[Op] = [["no_service", reg.id], ["service", reg.id, json.dumps(shape.body())]]
        for spec in reg.instances:
            ops.append(["instance", reg.id, spec.id, instance_fields(spec, None)])
            ops.append(self._health_op(shape, spec.id, spec.status, "", "registration",
                                       True))
        await self._commit(ops)
        return self.service(reg.id)

    async def update_service(self, name: str, body: Any) -> Service:
        service = self.service(name)
        self._mutable(service, "change")
        described = ServiceBody.model_validate(body.model_dump(exclude_none=True))
        await self._commit([
            ["need_service", name],
            ["service", name, json.dumps(described.model_dump(exclude_none=True))],
            ["rearm", name, _seconds(described.check.ttl)]])
        return self.service(name)

    async def delete_service(self, name: str) -> None:
        self._mutable(self.service(name), "remove")
        await self._commit([["need_service", name], ["drop_service", name]])

    async def register_instance(self, name: str, spec: InstanceSpec) -> Record:
        service = self._registered(name)
        await self._commit([
            ["need_service", name], ["no_instance", name, spec.id],
            ["instance", name, spec.id, instance_fields(spec, None)],
            self._health_op(service, spec.id, spec.status, "", "registration", True)])
        return self.record(name, spec.id)

    async def update_instance(self, name: str, instance_id: str, update: Any) -> Record:
        record = self.record(name, instance_id)
        if record.static:
            return await super().update_instance(name, instance_id, update)
        spec = InstanceSpec.model_validate({**update.model_dump(), "id": instance_id,
                                            "status": record.spec.status})
        await self._commit([["need_instance", name, instance_id],
                            ["instance", name, instance_id,
                             instance_fields(spec, record.maintenance)]])
        return self.record(name, instance_id)

    async def deregister_instance(self, name: str, instance_id: str) -> None:
        if self.record(name, instance_id).static:
            return await super().deregister_instance(name, instance_id)
        await self._commit([["need_instance", name, instance_id],
                            ["drop_instance", name, instance_id]])

    async def heartbeats(self, items: list[tuple[str, str, str, str]]) -> list[Record]:
        """Renew in Redis (whose clock decides the TTL) and report each status; a
        change is committed before answering. Static instances renew here."""
        records = self._records(items)
        static = [item for item, r in zip(items, records, strict=True) if r.static]
        if static:
            await super().heartbeats(static)
        ops: list[Op] = []
        for (name, instance_id, status, note), record in zip(items, records, strict=True):
            if not record.static:
                ops.append(["need_instance", name, instance_id])
                ops.append(self._health_op(record.service, instance_id, status,
                                           note or f"reported {status}", "heartbeat", False))
        if ops:
            ops.sort(key=lambda op: op[0] != "need_instance")  # checks first
            await self._commit(ops)
        return [self.record(r.service.name, r.spec.id) for r in records]

    async def maintenance(self, name: str, instance_id: str, enabled: bool,
                          reason: str) -> Record:
        record = self.record(name, instance_id)
        if record.static:  # as before: until the next start, on this node
            return await super().maintenance(name, instance_id, enabled, reason)
        await self._commit([["need_instance", name, instance_id],
                            ["instance", name, instance_id, instance_fields(
                                record.spec, (reason or "maintenance") if enabled else None)]])
        return self.record(name, instance_id)
