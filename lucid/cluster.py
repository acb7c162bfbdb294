"""Cluster mode: several gateway nodes (and each node's workers) sharing one view
through Redis.

``[cluster] backend`` is ``"local"`` (the default: one node, definitions in
``data_dir/definitions.db``, as before) or a ``redis://`` / ``rediss://`` URL. With
Redis:

* dynamic definitions live in Redis (:class:`RedisBackend`) under one cluster
  revision, bumped atomically with each write by a Lua script that also refuses a
  write validated against an older revision (the writer validates again);
* every process learns of a new revision through pub/sub *and* a periodic revision
  check (pub/sub drops what is published while it reconnects), and applies it through
  ``Runtime.apply``; nothing on the data path talks to Redis;
* every applied revision is saved to ``data_dir/cluster-snapshot.json``, so a node
  that starts while Redis is unreachable serves its last-known-good definitions;
* each node renews a membership entry (``GET /cluster``).

:class:`Cluster` is the handle plugins get as ``runtime.cluster``: the backend's name,
``node_id``, ``up``, the redis-py asyncio client (None for local), ``key(*parts)``
and ``subscribe(channel, callback)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lucid.config import redact_url
from lucid.definitions import (
    BackendUnavailable,
    Definition,
    Key,
    PreconditionFailed,
    Snapshot,
    Write,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from lucid.config import ClusterConfig
    from lucid.runtime import Runtime

log = logging.getLogger("lucid.cluster")

SNAPSHOT_FILE = "cluster-snapshot.json"
BACKEND_SCHEMES = ("redis", "rediss")
Callback = Callable[[str], Any]


def check_backend_url(value: str) -> str:
    """``[cluster] backend``: ``local`` or a Redis URL with a host."""
    if value == "local":
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("expected 'local' or a URL such as 'redis://127.0.0.1:6379/0' "
                         "(bad port)") from None
    if parts.scheme not in BACKEND_SCHEMES or not parts.hostname:
        raise ValueError("expected 'local' or a URL such as 'redis://127.0.0.1:6379/0' "
                         "or 'rediss://user:password@host:6380/0'")
    return value


def not_shared_yet(config: Any, what: str) -> str:
    """How a ``lucid_check_workers`` refusal ends for state that stays per process
    whatever the backend: what a Redis ``[cluster]`` backend shares, and that ``what``
    is not among it yet."""
    backend = getattr(getattr(config, "cluster", None), "backend", "local")
    shares = ("the Redis [cluster] backend shares definitions across workers and nodes"
              if backend != "local" else
              "a Redis [cluster] backend (backend = \"redis://...\") shares definitions "
              "across workers and nodes")
    return f"run with server.workers = 1 ({shares}; {what} not yet)"


def default_node_id(proxy: str) -> str:
    """Hostname and proxy port: unique per node unless two share a host and a port."""
    return f"{socket.gethostname()}:{proxy.rpartition(':')[2]}"


class Cluster:
    """What one gateway process knows of its cluster; ``runtime.cluster``."""

    def __init__(self, config: ClusterConfig, node_id: str):
        self.config = config
        self.backend = "local" if config.backend == "local" else "redis"
        self.url = redact_url(config.backend)  # safe to show and log
        self.node_id = node_id
        self.prefix = config.key_prefix
        self.redis: Redis | None = None
        self.up = self.backend == "local"  # whether the last Redis call succeeded
        self.down_since: float | None = None
        self._subscribers: dict[str, list[Callback]] = {}
        self._reconnected: list[Callable[[], Any]] = []
        self._channels_changed = asyncio.Event()
        self._live: set[str] = set()  # channels the listener has subscribed
        self._live_changed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        # plugins' state kept in the last-known-good snapshot beside the definitions:
        # what this process saves, and what the snapshot held when it started
        self.remembered: dict[str, Any] = {}
        self.recalled: dict[str, Any] = {}
        self.remembered_changed: Callable[[], None] | None = None  # the runtime saves

    # the last-known-good snapshot --------------------------------------------
    def remember(self, section: str, state: Any) -> None:
        """Keep ``state`` (JSON-serialisable, not changed afterwards: pass a copy) as
        ``section`` of this node's last-known-good snapshot, saved with the definitions
        off the caller's path (by worker 0 of a Redis cluster); :meth:`recall` gives it
        back to a process that starts while Redis is unreachable."""
        self.remembered[section] = state
        if self.remembered_changed is not None:
            self.remembered_changed()

    def recall(self, section: str) -> Any:
        """``section`` of the last-known-good snapshot as it was when this process
        started, or None."""
        return self.recalled.get(section)

    def load_remembered(self, data_dir: Path) -> None:
        """Read the sections of the snapshot under ``data_dir`` (at start): for
        :meth:`recall`, and kept in the next save until their plugin remembers anew."""
        self.recalled = load_snapshot_sections(data_dir)
        self.remembered = {**self.recalled, **self.remembered}

    def key(self, *parts: str) -> str:
        """A Redis key (or channel) under this cluster's ``key_prefix``."""
        return self.prefix + ":".join(parts)

    @property
    def shared(self) -> bool:
        """Whether state is shared beyond this node (a Redis backend)."""
        return self.backend != "local"

    # connection ------------------------------------------------------------
    async def start(self) -> None:
        """Make the client (no I/O yet) and start listening for published messages."""
        if not self.shared:
            return
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        timeout = self.config.timeout
        # No retries inside redis-py: a dead Redis must cost one timeout, not four
        # with back-off in between; the callers here retry on their own schedule.
        self.redis = Redis.from_url(
            self.config.backend, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, decode_responses=True,
            health_check_interval=0, client_name=f"lucid:{self.node_id}")
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):
                pass
            self._listener = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    def mark(self, up: bool, error: BaseException | None = None) -> None:
        """Record how the last Redis call went; log each change once."""
        if up and not self.up:
            log.info("cluster backend %s reachable again", self.url)
            self.down_since = None
        elif not up and self.up:
            log.warning("cluster backend %s unreachable (%s); serving the definitions "
                        "this node has, admin writes answer 503", self.url, describe(error))
            self.down_since = time.time()
        self.up = up

    def unavailable(self, error: BaseException | None = None) -> BackendUnavailable:
        """The 503 for a write the backend could not take: it names the backend."""
        from redis.exceptions import TimeoutError

        if isinstance(error, TimeoutError):
            # sent, but no answer: a Redis that was only stopped may still run it
            return BackendUnavailable(
                f"the cluster backend {self.url} did not answer within "
                f"{self.config.timeout * 1000:g} ms; the write may still be applied "
                "when it resumes: read before retrying", backend=self.url)
        return BackendUnavailable(
            f"the cluster backend {self.url} is unreachable ({describe(error)}); "
            "nothing was written", backend=self.url)

    async def call(self, work: Callable[[Redis], Awaitable[Any]]) -> Any:
        """``work(redis)``, with a failure recorded (``up``) and raised as
        :class:`BackendUnavailable`."""
        from redis.exceptions import ConnectionError, TimeoutError

        if self.redis is None:
            raise self.unavailable()
        try:
            result = await work(self.redis)
        except (ConnectionError, TimeoutError, OSError) as exc:
            self.mark(False, exc)
            raise self.unavailable(exc) from None
        self.mark(True)
        return result

    # pub/sub -----------------------------------------------------------------
    def subscribe(self, channel: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback(data)`` for each message published on ``channel`` (a full
        name: use :meth:`key`); returns a function that unsubscribes. A callback may be
        async; it runs in the listener, so it should only take note and return. With
        the local backend nothing is ever published."""
        self._subscribers.setdefault(channel, []).append(callback)
        self._channels_changed.set()

        def unsubscribe() -> None:
            callbacks = self._subscribers.get(channel, [])
            if callback in callbacks:
                callbacks.remove(callback)

        return unsubscribe

    def on_reconnect(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` once the first subscription is made, and each time it is
        made again after a loss: whatever was published before it (between a
        subscriber's first read and its subscription) or meanwhile is gone, so look
        again."""
        self._reconnected.append(callback)

    # how long the listener waits for a message before it looks for new channels
    LISTEN_POLL = 0.1

    async def subscribed(self, timeout: float) -> bool:
        """Wait, at most ``timeout`` seconds, until every channel asked for so far is
        subscribed; whether it is. A starting node waits for this before it serves, so
        a change written on another node right after reaches it by pub/sub rather than
        by the next periodic check."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while set(self._subscribers) - self._live:
            left = deadline - loop.time()
            if left <= 0 or self._listener is None:
                return False
            self._live_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._live_changed.wait(), left)
        return True

    async def _listen(self) -> None:
        assert self.redis is not None
        # True at first too: a message published between a subscriber's first read of
        # the shared state and this subscription would otherwise be missed until the
        # next periodic revision check.
        lost = True
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                subscribed: set[str] = set()
                while True:
                    wanted = set(self._subscribers)
                    if wanted - subscribed:
                        self._channels_changed.clear()
                        await pubsub.subscribe(*(wanted - subscribed))
                        subscribed |= wanted
                        self._live = set(subscribed)
                        self._live_changed.set()
                        if lost:
                            lost = False
                            await _run_all([cb() for cb in self._reconnected])
                    if not subscribed:
                        await self._channels_changed.wait()
                        continue
                    # short, so a channel asked for meanwhile is subscribed within it
                    message = await pubsub.get_message(timeout=self.LISTEN_POLL)
                    if message is not None and message.get("type") == "message":
                        await _run_all([cb(str(message["data"])) for cb in
                                        list(self._subscribers.get(message["channel"], ()))])
            except asyncio.CancelledError:
                await _quietly(pubsub.aclose())  # type: ignore[no-untyped-call]
                raise
            except Exception as exc:
                if not lost:
                    log.debug("cluster subscription lost (%s); subscribing again",
                              describe(exc))
                lost = True
                self._live = set()
                await _quietly(pubsub.aclose())  # type: ignore[no-untyped-call]
                await asyncio.sleep(0.1)


async def _run_all(results: Sequence[Any]) -> None:
    for result in results:
        if inspect.isawaitable(result):
            try:
                await result
            except Exception:
                log.exception("a cluster subscriber failed")


async def _quietly(work: Awaitable[Any]) -> None:
    try:
        await work
    except Exception:
        pass


def describe(error: BaseException | None) -> str:
    if error is None:
        return "not connected"
    return f"{type(error).__name__}: {redact_url(str(error)) or 'no detail'}"


# ---------------------------------------------------------------------------
# definitions in Redis
# ---------------------------------------------------------------------------

# KEYS: revision, bodies (hash "kind\0id" -> JSON), revisions (hash -> int), channel
# ARGV: base, number of expectations, (field, wanted revision or "" for absent)...,
#       then (field, JSON body or "" to delete)...
# Everything or nothing: a script runs alone, so the check and the writes cannot
# interleave with another node's. The message published carries the revision and
# the changes themselves ({"revision": n, "changes": [[field, body or ""], ...]}), so
# a process at revision n - 1 applies them without reading Redis back (measured: the
# two round trips and the parse of every body were half a receiver's time).
COMMIT_SCRIPT = """
local revision = tonumber(redis.call('GET', KEYS[1]) or '0')
if revision ~= tonumber(ARGV[1]) then return {'moved', revision} end
local n = tonumber(ARGV[2])
local i = 3
for _ = 1, n do
  local found = redis.call('HGET', KEYS[3], ARGV[i])
  local wanted = ARGV[i + 1]
  if wanted == '' then
    if found then return {'exists', ARGV[i]} end
  elseif (not found) or found ~= wanted then
    return {'stale', ARGV[i], found or ''}
  end
  i = i + 2
end
revision = revision + 1
local changes = {}
while i <= #ARGV do
  changes[#changes + 1] = {ARGV[i], ARGV[i + 1]}
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
  else
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[3], ARGV[i], revision)
  end
  i = i + 2
end
redis.call('SET', KEYS[1], revision)
redis.call('PUBLISH', KEYS[4], cjson.encode({revision = revision, changes = changes}))
return {'ok', revision}
"""


def _field(kind: str, id: str) -> str:
    return f"{kind}\0{id}"


def published_change(data: str) -> tuple[int, list[Write]] | None:
    """The revision and writes of a commit's message on the definitions channel, or
    None if it is not one (then the receiver reads Redis instead)."""
    try:
        message = json.loads(data)
        changes = message["changes"]
        writes = []
        for name, body in [] if changes == {} else changes:  # cjson writes [] as {}
            kind, _, id = str(name).partition("\0")
            writes.append(Write(kind, id, json.loads(body) if body else None))
        return int(message["revision"]), writes
    except (ValueError, KeyError, TypeError):
        return None


class Moved(PreconditionFailed):
    """The cluster revision moved past the one the write was validated against:
    another node wrote meanwhile. The runtime validates again and retries."""


class RedisBackend:
    """Dynamic definitions in Redis, shared by every node and worker of a cluster."""

    name = "redis"

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.revision_key = cluster.key("definitions", "revision")
        self.bodies_key = cluster.key("definitions", "bodies")
        self.revisions_key = cluster.key("definitions", "revisions")
        self.channel = cluster.key("definitions", "changed")
        self._snapshot: Snapshot | None = None
        self._commit: Any = None

    async def load(self) -> Snapshot:
        async def read(redis: Redis) -> list[Any]:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.get(self.revision_key)
                pipe.hgetall(self.bodies_key)
                pipe.hgetall(self.revisions_key)
                return await pipe.execute()

        revision, bodies, revisions = await self.cluster.call(read)
        known = self._snapshot.items if self._snapshot is not None else {}
        items: dict[Key, Definition] = {}
        for name, body in bodies.items():
            kind, _, id = name.partition("\0")
            at = int(revisions.get(name, 0))
            same = known.get((kind, id))
            # unchanged since the last load: the same object, not validated again
            items[(kind, id)] = same if same is not None and same.revision == at else \
                Definition(kind, id, json.loads(body), "dynamic", at)
        self._snapshot = Snapshot(int(revision or 0), items)
        return self._snapshot

    async def commit(self, writes: Sequence[Write], base: int,
                     expect: Mapping[Key, int | None]) -> Snapshot:
        args: list[Any] = [base, len(expect)]
        for (kind, id), wanted in expect.items():
            args += [_field(kind, id), "" if wanted is None else str(wanted)]
        for w in writes:
            args += [_field(w.kind, w.id),
                     "" if w.body is None else json.dumps(w.body, sort_keys=True)]
        if self._commit is None and self.cluster.redis is not None:
            self._commit = self.cluster.redis.register_script(COMMIT_SCRIPT)
        script = self._commit
        keys = [self.revision_key, self.bodies_key, self.revisions_key, self.channel]
        outcome = await self.cluster.call(lambda redis: script(keys=keys, args=args))
        verdict = outcome[0]
        if verdict == "moved":
            raise Moved(f"the definitions moved on to revision {outcome[1]}; read them "
                        "again", revision=int(outcome[1]))
        if verdict == "exists":
            from lucid.definitions import Conflict

            kind, _, id = outcome[1].partition("\0")
            raise Conflict(f"{kind} {id!r} already exists", field="id")
        if verdict == "stale":
            kind, _, id = outcome[1].partition("\0")
            now = f"at revision {outcome[2]}" if outcome[2] else "deleted"
            raise PreconditionFailed(f"{kind} {id!r} is {now} (If-Match)",
                                     revision=int(outcome[2]) if outcome[2] else None)
        revision = int(outcome[1])
        known = self._snapshot
        if known is not None and known.revision == base:
            self._snapshot = known.applied(writes, revision)
        else:
            self._snapshot = await self.load()
        return self._snapshot

    def received(self, snapshot: Snapshot) -> None:
        """``snapshot`` was made from a published change: what Redis holds at its
        revision, so the next commit on top of it needs no read back."""
        self._snapshot = snapshot

    async def revision(self) -> int:
        value = await self.cluster.call(lambda redis: redis.get(self.revision_key))
        return int(value or 0)

    async def close(self) -> None:
        """The connection is the cluster's: closed with it."""


# ---------------------------------------------------------------------------
# the last-known-good snapshot under data_dir
# ---------------------------------------------------------------------------

def save_snapshot(data_dir: Path, snapshot: Snapshot, backend: str,
                  sections: Mapping[str, Any] | None = None) -> None:
    """Write the applied definitions, and the ``sections`` plugins keep there
    (:meth:`Cluster.remember`: the registry's services), to
    ``data_dir/cluster-snapshot.json`` (0600, replaced whole), for a start while the
    backend is unreachable."""
    from lucid.cli import write_private

    document = {
        "backend": backend, "revision": snapshot.revision, "saved_at": time.time(),
        "definitions": [{"kind": d.kind, "id": d.id, "revision": d.revision,
                         "body": dict(d.body)} for d in snapshot.items.values()],
        "sections": dict(sections or {}),
    }
    write_private(data_dir / SNAPSHOT_FILE, json.dumps(document, sort_keys=True))


def load_snapshot(data_dir: Path) -> Snapshot | None:
    """The last-known-good snapshot, or None when there is none (or it is unreadable)."""
    path = data_dir / SNAPSHOT_FILE
    try:
        document = json.loads(path.read_text())
        return Snapshot(int(document["revision"]), {
            (d["kind"], d["id"]): Definition(d["kind"], d["id"], d["body"], "dynamic",
                                             int(d["revision"]))
            for d in document["definitions"]})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("the cluster snapshot %s is unreadable (%s); ignored", path, exc)
        return None


def load_snapshot_sections(data_dir: Path) -> dict[str, Any]:
    """The plugins' sections of the last-known-good snapshot ({} when none)."""
    try:
        sections = json.loads((data_dir / SNAPSHOT_FILE).read_text()).get("sections", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return sections if isinstance(sections, dict) else {}


# ---------------------------------------------------------------------------
# membership
# ---------------------------------------------------------------------------

# KEYS: nodes (hash node_id -> JSON), seen (hash node_id -> ms, Redis's clock)
# ARGV: node_id, JSON, forget after (ms). Redis's clock, so the nodes' clocks may differ.
RENEW_SCRIPT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], now)
local seen = redis.call('HGETALL', KEYS[2])
for i = 1, #seen, 2 do
  if now - tonumber(seen[i + 1]) > tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], seen[i])
    redis.call('HDEL', KEYS[2], seen[i])
  end
end
return now
"""


class Membership:
    """This node's entry in the cluster's list of nodes, renewed every ``heartbeat``
    by worker 0 (the one with the admin API)."""

    def __init__(self, cluster: Cluster, describe_node: Callable[[], dict[str, Any]]):
        self.cluster = cluster
        self.describe_node = describe_node
        self.nodes_key = cluster.key("nodes")
        self.seen_key = cluster.key("nodes", "seen")
        self._renew: Any = None

    async def renew(self) -> None:
        if self._renew is None and self.cluster.redis is not None:
            self._renew = self.cluster.redis.register_script(RENEW_SCRIPT)
        script = self._renew
        entry = json.dumps(self.describe_node(), sort_keys=True)
        forget = int(self.cluster.config.forget_after * 1000)
        await self.cluster.call(lambda redis: script(
            keys=[self.nodes_key, self.seen_key],
            args=[self.cluster.node_id, entry, forget]))

    async def run(self) -> None:
        while True:
            try:
                await self.renew()
            except BackendUnavailable:
                pass  # logged once by Cluster.mark; try again at the next beat
            except Exception:
                log.exception("renewing this node's membership failed")
            await asyncio.sleep(self.cluster.config.heartbeat)

    async def leave(self) -> None:
        async def remove(redis: Redis) -> None:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self.nodes_key, self.cluster.node_id)
                pipe.hdel(self.seen_key, self.cluster.node_id)
                await pipe.execute()

        try:
            await self.cluster.call(remove)
        except BackendUnavailable:
            pass  # it will be shown dead, then forgotten

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node renewing or recently renewing, with ``alive`` and ``last_seen``
        (Unix seconds)."""
        async def read(redis: Redis) -> list[Any]:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.time()
                pipe.hgetall(self.nodes_key)
                pipe.hgetall(self.seen_key)
                return await pipe.execute()

        (seconds, micros), entries, seen = await self.cluster.call(read)
        now = int(seconds) * 1000 + int(micros) // 1000
        dead_after = 3 * self.cluster.config.heartbeat * 1000
        out = []
        for node_id, entry in sorted(entries.items()):
            last = int(seen.get(node_id, 0))
            out.append({**json.loads(entry), "node_id": node_id,
                        "last_seen": last / 1000, "alive": now - last <= dead_after})
        return out


def node_entry(runtime: Runtime) -> dict[str, Any]:
    """What a node says of itself in the membership list and ``GET /cluster``."""
    return {
        "node_id": runtime.cluster.node_id,
        "proxy": runtime.listeners.get("proxy", ""),
        "admin": runtime.listeners.get("admin", ""),
        "revision": runtime.generation.definitions.revision,
        "workers": runtime.config.server.workers,
    }


async def status(runtime: Runtime) -> dict[str, Any]:
    """``GET /cluster``: this node's view of the cluster."""
    cluster: Cluster = runtime.cluster
    me = {**node_entry(runtime), "last_seen": time.time(), "alive": True}
    nodes = [me]
    if runtime.membership is not None:
        try:
            nodes = await runtime.membership.nodes() or [me]
        except BackendUnavailable:
            pass  # Redis is down: this node is all it can vouch for
    return {
        "backend": cluster.backend,
        "url": cluster.url,
        "node_id": cluster.node_id,
        "backend_up": cluster.up,
        "revision": runtime.generation.definitions.revision,
        "nodes": nodes,
    }

