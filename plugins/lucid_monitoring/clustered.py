"""Monitoring across a cluster (``[cluster] backend`` is Redis).

* **Each node's figures.** Worker 0 of every node publishes its recent figures (its
  own windows, every worker's traffic summed) to one Redis key with a TTL, every
  ``[monitoring] cluster_interval``: nothing on the request path talks to Redis. A
  node that dies stops renewing its key, so its figures leave the cluster's within
  the TTL. ``GET /monitoring/cluster`` reads every node's key at once (MGET).
* **One alert leader.** Alert rules run on one node only, the leader: whoever holds
  the Redis lock ``monitoring:leader`` (``SET NX PX``, renewed by a compare-and-extend
  script every sixth of ``leader_lease``, when the other nodes try to take it). A
  leader that dies -- ``kill -9`` included -- stops renewing; the lock expires and
  another node takes it within ``leader_lease`` plus one attempt. The leader
  evaluates the rules on the cluster's figures (every node's published windows
  summed, histograms bucket by bucket, so a cluster p99 is a real quantile, not an
  average of the nodes' ones).
* **Alert state in Redis.** After each evaluation the leader writes every alert's
  state (pending/firing, since when) to Redis with a script that first checks it
  still holds the lock (a leader that was paused past its lease cannot write, and
  sends nothing); only then does it notify. Every other node copies those states into
  its own engine, so ``/monitoring/alerts``, the dashboard and ``lucid_alerts`` show
  the cluster's alerts on every node, and a new leader goes on from where the old
  one stopped: one notification per state change however many nodes run or die.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lucid_monitoring.metrics import COUNT, ERRORS, HEAD, WINDOWS, Recorder, figures

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from lucid.cluster import Cluster
    from lucid_monitoring.alerts import AlertEngine

log = logging.getLogger("lucid.monitoring.cluster")

FORMAT = 1
BREAKER_RANK = {"open": 3, "forced_open": 3, "half_open": 2, "closed": 1}

# KEYS: leader. ARGV: token, lease (ms). Extends the lease only if this node holds it.
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: leader, alert states (hash). ARGV: token, then (alert name, JSON state)...
# Fenced: a node that lost the lock (paused past its lease) writes nothing.
WRITE_STATES_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
"""


class WindowSums:
    """Per window, running sums of the recorder's closed slots, reduced to what a node
    publishes: (route, service) -> [count, 5xx, *duration buckets], (service,
    instance) -> [attempts, failed], limit -> rejections.

    A slot closes every ``TICK`` (10 s), so between ticks only the open slot is new:
    a slot is added once when it closes and subtracted once when it leaves the window
    (the counts are integers, so the sums stay exact). Summing the 360 slots of the
    1 h window afresh every second instead cost a whole core with 50 busy routes
    (``bench/bench_monitoring_cluster.py``)."""

    def __init__(self) -> None:
        self.recorder: Recorder | None = None
        self._reset()

    def _reset(self) -> None:
        self.kept: dict[str, deque[Any]] = {}
        self.routes: dict[str, dict[tuple[str, str], list[float]]] = {}
        self.instances: dict[str, dict[tuple[str, str], list[float]]] = {}
        self.rejections: dict[str, dict[str, int]] = {}

    def closed(self, rec: Recorder, name: str, now: float) -> tuple[
            dict[tuple[str, str], list[float]], dict[tuple[str, str], list[float]],
            dict[str, int]]:
        """The sums of ``name``'s closed slots at ``now`` (the caller must not change them)."""
        if rec is not self.recorder:
            self._reset()
            self.recorder = rec
        seconds = WINDOWS[name]
        kept = self.kept.setdefault(name, deque())
        routes = self.routes.setdefault(name, {})
        instances = self.instances.setdefault(name, {})
        rejections = self.rejections.setdefault(name, {})
        while kept and kept[0][0] <= now - seconds:
            self._add(rec, kept.popleft(), routes, instances, rejections, -1)
        newest = kept[-1][0] if kept else float("-inf")
        fresh = []
        for slot in reversed(rec.slots):
            if slot[0] <= newest or slot[0] <= now - seconds:
                break
            fresh.append(slot)
        for slot in reversed(fresh):
            self._add(rec, slot, routes, instances, rejections, 1)
            kept.append(slot)
        return routes, instances, rejections

    @staticmethod
    def _add(rec: Recorder, slot: Any, routes: dict[tuple[str, str], list[float]],
             instances: dict[tuple[str, str], list[float]], rejections: dict[str, int],
             sign: int) -> None:
        _, slot_routes, slot_instances, slot_rejections = slot
        reduce_into(rec.nb, slot_routes, slot_instances, slot_rejections, routes, instances,
                    rejections, sign)


def reduce_into(nb: int, routes: Mapping[Any, list[float]], instances: Mapping[Any, list[float]],
                rejections: Mapping[str, int], into_routes: dict[tuple[str, str], list[float]],
                into_instances: dict[tuple[str, str], list[float]], into_rejections: dict[str, int],
                sign: int = 1) -> None:
    """Add (``sign`` 1) or take away (-1) recorder deltas to the reduced sums; an entry
    that falls to zero requests leaves."""
    for (route, service, _, _), e in routes.items():
        key = (route, service)
        mine = into_routes.get(key)
        if mine is None:
            mine = into_routes[key] = [0] * (2 + nb)
        mine[0] += sign * e[COUNT]
        mine[1] += sign * e[ERRORS]
        for i in range(nb):
            mine[2 + i] += sign * e[HEAD + i]
        if not mine[0]:
            del into_routes[key]
    for key, e in instances.items():
        mine = into_instances.get(key)
        if mine is None:
            mine = into_instances[key] = [0, 0]
        mine[0] += sign * e[0]
        mine[1] += sign * e[1]
        if not mine[0]:
            del into_instances[key]
    for limit, n in rejections.items():
        total = into_rejections.get(limit, 0) + sign * n
        if total:
            into_rejections[limit] = total
        else:
            into_rejections.pop(limit, None)


def node_figures(rec: Recorder, node_id: str, windows: Iterable[str], now: float,
                 sums: WindowSums | None = None) -> dict[str, Any]:
    """What one node publishes: per window, per (route, service) the request count,
    5xx count and duration buckets; per instance attempts and failures; rejections;
    and the breaker and health states it knows. ``sums`` keeps the closed slots'
    sums from one call to the next (without it they are summed afresh)."""
    sums = sums if sums is not None else WindowSums()
    out: dict[str, Any] = {"format": FORMAT, "node_id": node_id, "at": now,
                           "bounds": list(rec.bounds), "windows": {}}
    nb = rec.nb
    open_routes, open_instances, open_rejections = rec.open_slot()
    for name in windows:
        closed_routes, closed_instances, closed_rejections = sums.closed(rec, name, now)
        routes = {k: list(v) for k, v in closed_routes.items()}
        instances = {k: list(v) for k, v in closed_instances.items()}
        rejections = dict(closed_rejections)
        reduce_into(nb, open_routes, open_instances, open_rejections, routes, instances,
                    rejections)
        out["windows"][name] = {
            "covered": max(1.0, min(WINDOWS[name], now - rec.started)),
            "routes": [[route, service, *entry] for (route, service), entry in
                       sorted(routes.items())],
            "instances": [[service, instance, *e] for (service, instance), e in
                          sorted(instances.items())],
            "rejections": rejections,
        }
    view = rec.view()
    out["breakers"] = [[s, i, state] for (s, i), state in sorted(view.breakers.items())]
    out["health"] = [[s, i, status] for (s, i), status in sorted(view.health.items())]
    return out


def minute_figures(document: Mapping[str, Any]) -> dict[str, Any] | None:
    """req/s, error rate and p50/p95/p99 (ms) of one node's last minute."""
    window = document.get("windows", {}).get("1m")
    if window is None:
        return None
    return ClusterFigures(document["bounds"], [document]).minute()


class ClusterFigures:
    """Every node's published windows summed: it answers what the alert rules ask a
    :class:`~lucid_monitoring.metrics.Recorder` (``window``, ``view``, ``breakers``,
    ``health``), so :func:`~lucid_monitoring.alerts.measure` runs on it unchanged.
    Nodes whose histogram bounds differ from ``bounds`` are left out (their buckets
    cannot be added); :attr:`skipped` names them."""

    def __init__(self, bounds: Iterable[float], documents: Iterable[Mapping[str, Any]]):
        self.bounds = tuple(float(b) for b in bounds)
        self.nb = len(self.bounds) + 1
        self.documents: list[Mapping[str, Any]] = []
        self.skipped: list[str] = []
        for document in documents:
            if tuple(float(b) for b in document.get("bounds", ())) == self.bounds:
                self.documents.append(document)
            else:
                self.skipped.append(str(document.get("node_id")))
        self.breakers: dict[tuple[str, str], str] = {}
        self.health: dict[tuple[str, str], str] = {}
        for document in self.documents:
            for service, instance, state in document.get("breakers", ()):
                known = self.breakers.get((service, instance))
                if known is None or BREAKER_RANK.get(state, 0) > BREAKER_RANK.get(known, 0):
                    self.breakers[(service, instance)] = state
            for service, instance, status in document.get("health", ()):
                if self.health.get((service, instance)) in (None, "passing"):
                    self.health[(service, instance)] = status  # a failing view wins

    def view(self) -> ClusterFigures:
        return self

    def window(self, seconds: float, now: float | None = None) -> tuple[
            float, dict[Any, list[float]], dict[Any, list[float]], dict[str, int]]:
        """(covered seconds, route entries, instance entries, rejections) of every
        node, in the layout of :meth:`Recorder.window`: route keys are
        ``(route, service, "", 0)`` (methods and status classes are summed)."""
        name = next(n for n, s in WINDOWS.items() if s == seconds)
        covered = 1.0
        routes: dict[Any, list[float]] = {}
        instances: dict[Any, list[float]] = {}
        rejections: dict[str, int] = {}
        nb = self.nb
        for document in self.documents:
            window = document["windows"].get(name)
            if window is None:
                continue
            # a node that started later has counted nothing before: the longest
            # coverage is the cluster's
            covered = max(covered, float(window["covered"]))
            for route, service, count, errors, *buckets in window["routes"]:
                entry = routes.get((route, service, "", 0))
                if entry is None:
                    entry = routes[(route, service, "", 0)] = [0.0] * (HEAD + 2 * nb)
                entry[COUNT] += count
                entry[ERRORS] += errors
                for i, n in enumerate(buckets[:nb]):
                    entry[HEAD + i] += n
            for service, instance, attempts, failed in window["instances"]:
                ientry = instances.setdefault((service, instance), [0.0, 0.0, 0.0])
                ientry[0] += attempts
                ientry[1] += failed
            for limit, n in window["rejections"].items():
                rejections[limit] = rejections.get(limit, 0) + int(n)
        return covered, routes, instances, rejections

    def minute(self) -> dict[str, Any]:
        """Requests, req/s, error rate and p50/p95/p99 (ms) over the last minute."""
        covered, routes, _, _ = self.window(WINDOWS["1m"])
        count = sum(e[COUNT] for e in routes.values())
        errors = sum(e[ERRORS] for e in routes.values())
        buckets = [sum(e[HEAD + i] for e in routes.values()) for i in range(self.nb)]
        return figures(self.bounds, count, errors, buckets, covered)


class ClusterMonitor:
    """This node's side: publish its figures, read everyone's, hold or seek the alert
    lock, and share the alert states. Worker 0 only (it has the admin API)."""

    def __init__(self, cluster: Cluster, run_id: str, interval: float, lease: float):
        self.cluster = cluster
        self.node_id = cluster.node_id
        # node id and run: a node restarted under the same id is another holder
        self.token = f"{cluster.node_id}/{run_id}"
        self.interval = interval
        self.lease = lease
        self.ttl_ms = int(max(3 * interval, 3.0) * 1000)
        self.leader_key = cluster.key("monitoring", "leader")
        self.states_key = cluster.key("monitoring", "alerts")
        self.leading_until = 0.0  # time.monotonic(): this node may act as leader until
        self.leader_since: float | None = None  # wall clock, while leading
        self.published_at: float | None = None
        self._renew: Any = None
        self._write: Any = None

    def figures_key(self, node_id: str) -> str:
        return self.cluster.key("monitoring", "figures", node_id)

    @property
    def leading(self) -> bool:
        """Whether this node holds the lock now, by its own clock: the lease counted
        from before the call that took or renewed it, so it ends here first."""
        return time.monotonic() < self.leading_until

    # figures -------------------------------------------------------------------
    async def publish(self, document: Mapping[str, Any]) -> None:
        body = json.dumps(document, separators=(",", ":"))
        key = self.figures_key(self.node_id)
        await self.cluster.call(lambda redis: redis.set(key, body, px=self.ttl_ms))
        self.published_at = time.time()

    async def read(self, node_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The figures each of ``node_ids`` published last (absent: expired or never)."""
        ids = list(node_ids)
        if not ids:
            return {}
        keys = [self.figures_key(n) for n in ids]
        values = await self.cluster.call(lambda redis: redis.mget(keys))
        out: dict[str, dict[str, Any]] = {}
        for node_id, value in zip(ids, values, strict=True):
            if value is None:
                continue
            try:
                document = json.loads(value)
            except ValueError:
                continue
            if isinstance(document, dict) and document.get("format") == FORMAT:
                out[node_id] = document
        return out

    # leadership ----------------------------------------------------------------
    async def campaign(self, engine: AlertEngine) -> bool:
        """Renew the lock if this node holds it, else try to take it; True when this
        node has just become the leader. A new leader takes the alert states the last
        one wrote into ``engine`` before it counts as leading, so its first
        evaluation goes on from them."""
        started = time.monotonic()
        lease_ms = int(self.lease * 1000)
        was = self.leading
        if self._renew is None and self.cluster.redis is not None:
            self._renew = self.cluster.redis.register_script(RENEW_SCRIPT)
        script = self._renew
        # Extend it if it is this node's: held, or left after this node stepped down
        # on a failed write (rather than leave the cluster leaderless for a lease)
        held = await self.cluster.call(lambda redis: script(
            keys=[self.leader_key], args=[self.token, lease_ms]))
        if not held and not was:
            held = await self.cluster.call(lambda redis: redis.set(
                self.leader_key, self.token, nx=True, px=lease_ms))
        if held:
            if not was:
                # a failure here leaves the lock to expire: nobody leads meanwhile
                await self.read_states(engine, follower=False)
            self.leading_until = started + self.lease
            if not was:
                self.leader_since = time.time()
                log.info("monitoring: node %s now evaluates the cluster's alert rules",
                         self.node_id)
            return not was
        if was:
            log.warning("monitoring: node %s lost the alert lock", self.node_id)
        self.step_down()
        return False

    def step_down(self) -> None:
        self.leading_until = 0.0
        self.leader_since = None

    async def resign(self) -> None:
        """At shutdown: free the lock at once rather than after the lease."""
        if not self.leading:
            return
        self.step_down()

        async def release(redis: Redis) -> None:
            await redis.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                             "return redis.call('DEL', KEYS[1]) end return 0",
                             1, self.leader_key, self.token)

        await self.cluster.call(release)

    async def leader(self) -> str | None:
        """The node id of the current leader, or None when nobody holds the lock."""
        value = await self.cluster.call(lambda redis: redis.get(self.leader_key))
        return None if value is None else str(value).rpartition("/")[0]

    # alert states ----------------------------------------------------------------
    async def write_states(self, engine: AlertEngine) -> bool:
        """Write every alert's state, if this node still holds the lock (False: it
        does not, and must not notify)."""
        if self._write is None and self.cluster.redis is not None:
            self._write = self.cluster.redis.register_script(WRITE_STATES_SCRIPT)
        script = self._write
        args: list[Any] = [self.token]
        for name, alert in engine.alerts.items():
            args += [name, json.dumps({
                "rule": alert.rule.model_dump(by_alias=True, mode="json"),
                "state": alert.state, "since": alert.since, "fired_at": alert.fired_at,
                "value": alert.value, "last_evaluated": alert.last_evaluated,
            }, sort_keys=True)]
        written = await self.cluster.call(lambda redis: script(
            keys=[self.leader_key, self.states_key], args=args))
        if not written:
            self.step_down()
        return bool(written)

    async def read_states(self, engine: AlertEngine, follower: bool = True) -> None:
        """Take the cluster's alert states into ``engine`` (rules defined alike only:
        a rule changed since is judged afresh). A ``follower`` read that comes back
        after this node became the leader is dropped: its own states are newer."""
        stored = await self.cluster.call(lambda redis: redis.hgetall(self.states_key))
        if follower and self.leading:
            return
        for name, alert in engine.alerts.items():
            try:
                state = json.loads(stored[name]) if name in stored else None
            except ValueError:
                state = None
            if state is None or state.get("rule") != alert.rule.model_dump(
                    by_alias=True, mode="json"):
                alert.state, alert.since, alert.fired_at = "inactive", 0.0, 0.0
                continue
            alert.state = str(state["state"])
            alert.since = float(state["since"])
            alert.fired_at = float(state["fired_at"])
            alert.value = None if state["value"] is None else float(state["value"])
            alert.last_evaluated = float(state["last_evaluated"])
