"""Breaker state shared by every node and worker of a cluster (``scope = "cluster"``).

What lives in Redis, per circuit, is the part of a breaker that must be one
cluster-wide: its state, when it opened (Redis's clock), the open wait, its trips,
and the half-open probe counters. Every change is one Lua script (atomic: two nodes
tripping at once make one trip; probe slots are handed out one at a time up to
``permitted_number_of_calls_in_half_open_state`` for the whole cluster), and each
change is published; a periodic revision check catches what pub/sub dropped.

What does not live in Redis is the sliding window: each process counts its own calls
and trips locally at once (refusing from that moment), then publishes the trip. So the
data path never waits on Redis: a closed circuit costs one string compare more than in
node scope; an open one is refused from local memory; only a half-open circuit needs a
probe slot, and a process without one refuses (``Retry-After: 1``) while it asks for
one in the background.

Redis unreachable: every process goes on alone (its local machine decides, as in node
scope) and re-joins when Redis answers again: a trip it made alone is published, then
the shared state is taken.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lucid.definitions import BackendUnavailable
from lucid_circuitbreaker.machine import (
    CLOSED,
    FORCED_OPEN,
    HALF_OPEN,
    HALF_OPEN_RETRY,
    METRICS_ONLY,
    NO_PROBE,
    OPEN,
    Breaker,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from lucid.cluster import Cluster
    from lucid_circuitbreaker.circuits import Circuit

log = logging.getLogger("lucid.circuitbreaker")

# KEYS: the circuit's hash (breaker key -> JSON entry), the revision counter, the channel
# ARGV: circuit id, breaker key, definition revision, op, open wait (ms), backoff
#       multiplier, max open wait (ms), permitted probes, max half-open wait (ms),
#       failure rate threshold, slow-call rate threshold, op argument 1, op argument 2,
#       reason, ejection cap (-1: no cap)
# ops: trip (arg1: the revision the caller saw, -1 for any), claim (arg1: 1 to take a
#      probe slot, 0 only to move time-driven state on), result (arg1 failure, arg2
#      slow: one probe's outcome), release (a probe slot given back).
# An entry written for another definition of the circuit counts as absent (closed).
BREAKER_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, key, def, op = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local e = nil
local raw = redis.call('HGET', KEYS[1], key)
if raw then
  e = cjson.decode(raw)
  if tonumber(e.def) ~= def then e = nil end
end
if not e then
  e = {s = 'closed', rev = 0, def = def, at = 0, wait = 0, trips = 0,
       pi = 0, pc = 0, pf = 0, ps = 0, why = ''}
end
local permitted = tonumber(ARGV[8])
local function reply(granted) return {cjson.encode(e), now, granted} end
local function store() redis.call('HSET', KEYS[1], key, cjson.encode(e)) end
local function save(state, why)
  e.s = state
  e.why = why
  e.rev = redis.call('INCR', KEYS[2])
  store()
  redis.call('PUBLISH', KEYS[3], cjson.encode({c = id, k = key, e = e, now = now}))
end
local function open(why, backoff)
  if backoff or e.trips == 0 then e.trips = e.trips + 1 end
  local base, mult = tonumber(ARGV[5]), tonumber(ARGV[6])
  local wait = base
  if mult ~= 1 and e.trips > 1 then
    wait = math.min(base * mult ^ (e.trips - 1), tonumber(ARGV[7]))
  end
  e.at = now
  e.wait = wait
  e.pi, e.pc, e.pf, e.ps = 0, 0, 0, 0
  save('open', why)
end
if op == 'trip' then
  local expect = tonumber(ARGV[12])
  if e.s ~= 'closed' or (expect >= 0 and e.rev ~= expect) then return reply(0) end
  local cap = tonumber(ARGV[15])
  if cap >= 0 then
    local ejected = 0
    local all = redis.call('HGETALL', KEYS[1])
    for i = 1, #all, 2 do
      if all[i] ~= key then
        local other = cjson.decode(all[i + 1])
        if tonumber(other.def) == def and other.s ~= 'closed' then ejected = ejected + 1 end
      end
    end
    if ejected >= cap then return reply(-1) end
  end
  e.trips = 0
  open(ARGV[14], true)
  return reply(1)
elseif op == 'claim' then
  if e.s == 'open' and now >= e.at + e.wait then
    e.at = now
    e.pi, e.pc, e.pf, e.ps = 0, 0, 0, 0
    save('half_open', 'wait_duration_in_open_state elapsed')
  end
  if e.s ~= 'half_open' then return reply(0) end
  if now >= e.at + tonumber(ARGV[9]) then
    open('no probe results within max_wait_duration_in_half_open_state', false)
    return reply(0)
  end
  if tonumber(ARGV[12]) > 0 and e.pi < permitted then
    e.pi = e.pi + 1
    store()
    return reply(1)
  end
  return reply(0)
elseif op == 'result' then
  if e.s ~= 'half_open' then return reply(0) end
  e.pc = e.pc + 1
  if ARGV[12] == '1' then e.pf = e.pf + 1 end
  if ARGV[13] == '1' then e.ps = e.ps + 1 end
  if e.pc < permitted then
    store()
  elseif e.pf * 100 >= tonumber(ARGV[10]) * e.pc then
    open(e.pf .. ' of ' .. e.pc .. ' probe calls failed', true)
  elseif e.ps * 100 >= tonumber(ARGV[11]) * e.pc then
    open(e.ps .. ' of ' .. e.pc .. ' probe calls were slow', true)
  else
    e.trips = 0
    save('closed', e.pc .. ' probe calls succeeded')
  end
  return reply(1)
elseif op == 'release' then
  if e.s == 'half_open' and e.pi > e.pc then
    e.pi = e.pi - 1
    store()
  end
  return reply(0)
end
return redis.error_reply('unknown op ' .. op)
"""

# KEYS: the circuit's hash, the revision counter, the channel, the modes hash
# ARGV: circuit id, mode ("normal" closes every breaker of the circuit)
MODE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, mode = ARGV[1], ARGV[2]
local entries = {}
if mode == 'normal' then
  redis.call('HDEL', KEYS[4], id)
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local e = cjson.decode(all[i + 1])
    e.s, e.trips, e.why = 'closed', 0, 'reset by operator'
    e.pi, e.pc, e.pf, e.ps = 0, 0, 0, 0
    e.rev = redis.call('INCR', KEYS[2])
    redis.call('HSET', KEYS[1], all[i], cjson.encode(e))
    entries[all[i]] = e
  end
else
  redis.call('HSET', KEYS[4], id, mode)
end
local rev = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[3], cjson.encode({c = id, mode = mode, mrev = rev,
                                             entries = entries, now = now}))
return rev
"""

# An outcome classified by Circuit.record: (failure, slow)
Outcome = tuple[bool, bool]


@dataclass(slots=True)
class Link:
    """What this process knows of one shared breaker beyond the local machine."""

    rev: int = 0  # the revision of the shared entry last taken
    tokens: int = 0  # probe slots granted to this process, not used yet
    outstanding: int = 0  # probe calls permitted with a slot, outcome not reported yet
    claiming: bool = False  # a claim is on its way
    alone: bool = False  # tripped while Redis was unreachable: publish on re-joining


class Shared:
    """The cluster side of every circuit of one process (``runtime.cluster``)."""

    def __init__(self, cluster: Cluster, circuits: Callable[[], dict[str, Circuit]],
                 modes: Callable[[], dict[str, str]], clock: Callable[[], float]):
        self.cluster = cluster
        self.circuits = circuits
        self.modes = modes  # the plugin's operator modes, by circuit id
        self.clock = clock
        self.revision_key = cluster.key("circuitbreaker", "revision")
        self.modes_key = cluster.key("circuitbreaker", "modes")
        self.channel = cluster.key("circuitbreaker", "changed")
        self.links: dict[tuple[str, str], Link] = {}
        self.mode_revs: dict[str, int] = {}
        self.seen = -1  # the revision counter at the last full read
        self.was_up = True
        self.adopting = False  # transitions made while taking shared state: not published
        self.refresh_pending = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self._breaker_script: Any = None
        self._mode_script: Any = None
        self._loop: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def hash_key(self, circuit_id: str) -> str:
        return self.cluster.key("circuitbreaker", "circuit", circuit_id)

    @property
    def live(self) -> bool:
        """Whether the shared state is reachable: otherwise this process decides alone."""
        return self.cluster.up

    # lifecycle ---------------------------------------------------------------
    def start(self, interval: float) -> None:
        self._unsubscribe = self.cluster.subscribe(self.channel, self._message)
        self.cluster.on_reconnect(self._reconnected)
        self._loop = asyncio.get_running_loop().create_task(self._check_loop(interval))

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        tasks = [*self.tasks, *([self._loop] if self._loop is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None

    def spawn(self, work: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:  # no running loop (a synchronous caller in a test)
            work.close()
            return
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def link(self, circuit: Circuit, breaker: Breaker) -> Link:
        found = self.links.get((circuit.id, breaker.key))
        if found is None:
            found = self.links[(circuit.id, breaker.key)] = Link()
        return found

    # the data path (only for a breaker that is not closed) ---------------------
    def permit(self, circuit: Circuit, breaker: Breaker, now: float) -> float | None:
        """None (call it) or the seconds to wait, as ``Breaker.permit`` answers."""
        state = breaker.state
        if state == METRICS_ONLY or state == CLOSED:
            return None
        if state == FORCED_OPEN:
            return NO_PROBE
        if state == OPEN and now < breaker.open_until:
            return breaker.open_until - now
        link = self.link(circuit, breaker)
        if link.tokens > 0:
            link.tokens -= 1
            link.outstanding += 1
            return None
        if not link.claiming:
            link.claiming = True
            self.spawn(self._claim(circuit, breaker, link, 1))
        return HALF_OPEN_RETRY if state == HALF_OPEN else 0.0

    def record(self, circuit: Circuit, breaker: Breaker, outcome: Outcome | None) -> None:
        """A call on a breaker that is not closed ended: a probe's outcome goes to the
        cluster (None: ignored, its slot given back); any other call is not counted."""
        link = self.links.get((circuit.id, breaker.key))
        if link is None or link.outstanding <= 0:
            return
        link.outstanding -= 1
        if outcome is None:
            self.spawn(self._run_quietly(circuit, breaker.key, "release"))
        else:
            self.spawn(self._run_quietly(circuit, breaker.key, "result",
                                         int(outcome[0]), int(outcome[1])))

    def moved(self, circuit: Circuit, breaker: Breaker, before: str, after: str,
              reason: str) -> None:
        """The local machine moved a breaker. A trip from closed is published (or kept
        to publish on re-joining when Redis is unreachable); other local moves only
        happen while alone, and the shared state wins over them on re-joining."""
        if self.adopting or before != CLOSED or after != OPEN:
            return
        link = self.link(circuit, breaker)
        if not self.live:
            link.alone = True
            return
        self.spawn(self._trip(circuit, breaker.key, link.rev, reason))

    def tick(self, circuit: Circuit, breaker: Breaker, now: float) -> None:
        """Time-driven moves of a half-open breaker with no probe results: Redis's."""
        if breaker.state == HALF_OPEN and now >= breaker.half_open_until:
            link = self.link(circuit, breaker)
            if not link.claiming:
                link.claiming = True
                self.spawn(self._claim(circuit, breaker, link, 0))

    # Redis -----------------------------------------------------------------------
    async def _run(self, circuit: Circuit, key: str, op: str, arg1: int = 0, arg2: int = 0,
                   reason: str = "") -> tuple[dict[str, Any], int, int]:
        if self._breaker_script is None and self.cluster.redis is not None:
            self._breaker_script = self.cluster.redis.register_script(BREAKER_SCRIPT)
        script = self._breaker_script
        s = circuit.resolved.settings
        cap = circuit.ejection_cap() if key else -1
        args = [circuit.id, key, circuit.revision, op,
                round(s.wait_duration_in_open_state * 1000),
                s.exponential_backoff_multiplier,
                round(s.max_wait_duration_in_open_state * 1000),
                s.permitted_number_of_calls_in_half_open_state,
                round(s.max_wait_duration_in_half_open_state * 1000),
                s.failure_rate_threshold, s.slow_call_rate_threshold, arg1, arg2, reason, cap]
        keys = [self.hash_key(circuit.id), self.revision_key, self.channel]
        raw, now_ms, granted = await self.cluster.call(
            lambda redis: script(keys=keys, args=args))
        entry = json.loads(raw)
        self.adopt(circuit, key, entry, int(now_ms))
        return entry, int(now_ms), int(granted)

    async def _run_quietly(self, circuit: Circuit, key: str, op: str, arg1: int = 0,
                           arg2: int = 0) -> None:
        try:
            await self._run(circuit, key, op, arg1, arg2)
        except BackendUnavailable:
            pass  # alone until Redis answers (Cluster.mark logged it)

    async def _claim(self, circuit: Circuit, breaker: Breaker, link: Link, want: int) -> None:
        try:
            entry, _, granted = await self._run(circuit, breaker.key, "claim", want)
            if granted > 0:
                link.tokens += granted
            elif int(entry["rev"]) == 0 and breaker.state in (OPEN, HALF_OPEN):
                # Redis has no state for a breaker open here, whose wait is over:
                # it lost its data (restarted without persistence). Close, so calls
                # probe again; a failing upstream trips it again, for everyone.
                self.adopting = True
                try:
                    breaker.follow(CLOSED, self.clock(), "the shared state was lost", 0,
                                   0.0, 0.0, (0, 0, 0, 0))
                finally:
                    self.adopting = False
        except BackendUnavailable:
            pass
        finally:
            link.claiming = False

    async def _trip(self, circuit: Circuit, key: str, seen: int, reason: str) -> None:
        try:
            _, _, done = await self._run(circuit, key, "trip", seen, reason=reason)
        except BackendUnavailable:
            link = self.links.get((circuit.id, key))
            if link is not None:
                link.alone = True
            return
        if done < 0:
            log.info("circuit %s instance %s: not ejected across the cluster "
                     "(max_ejection_percent reached)", circuit.id, key)

    async def set_mode(self, circuit_id: str, mode: str) -> int:
        """Store an operator mode for every node (``normal`` closes every breaker of
        the circuit); published, so every process applies it."""
        if self._mode_script is None and self.cluster.redis is not None:
            self._mode_script = self.cluster.redis.register_script(MODE_SCRIPT)
        script = self._mode_script
        keys = [self.hash_key(circuit_id), self.revision_key, self.channel, self.modes_key]
        rev = int(await self.cluster.call(lambda redis: script(keys=keys,
                                                                args=[circuit_id, mode])))
        self.mode_revs[circuit_id] = max(self.mode_revs.get(circuit_id, 0), rev)
        return rev

    async def load_modes(self) -> dict[str, str]:
        modes: dict[str, str] = await self.cluster.call(
            lambda redis: redis.hgetall(self.modes_key))
        return modes

    # taking the shared state ----------------------------------------------------------
    def adopt(self, circuit: Circuit, key: str, entry: dict[str, Any], now_ms: int) -> None:
        """Take a shared entry newer than what this process has for the breaker."""
        if int(entry.get("def", -1)) != circuit.revision:
            return  # written for another definition of the circuit
        breaker = circuit.breaker if not key else circuit.instances.get(key)
        if breaker is None:
            return
        link = self.link(circuit, breaker)
        rev = int(entry["rev"])
        if rev <= link.rev:
            return
        link.rev = rev
        state = entry["s"]
        if state != HALF_OPEN:
            link.tokens = 0
        if circuit.mode != "normal":
            return  # forced open or disabled: the operator's mode stands
        now = self.clock()
        at = (int(entry["at"]) - now_ms) / 1000.0 + now  # Redis's clock, here
        self.adopting = True
        try:
            breaker.follow(
                state, now, entry.get("why", ""), int(entry["trips"]),
                open_until=at + int(entry["wait"]) / 1000.0,
                half_open_until=at + circuit.resolved.settings.max_wait_duration_in_half_open_state,
                probes=(int(entry["pi"]), int(entry["pc"]), int(entry["pf"]), int(entry["ps"])))
        finally:
            self.adopting = False

    def apply_mode(self, circuit: Circuit, mode: str, rev: int) -> None:
        if rev <= self.mode_revs.get(circuit.id, 0):
            return
        self.mode_revs[circuit.id] = rev
        modes = self.modes()
        if mode == "normal":
            modes.pop(circuit.id, None)
        else:
            modes[circuit.id] = mode
        self.adopting = True
        try:
            if mode == "normal":
                circuit.reset()
            elif circuit.mode != mode:
                circuit.set_mode(mode, "")
        finally:
            self.adopting = False

    def _message(self, data: str) -> None:
        try:
            message = json.loads(data)
            circuit = self.circuits().get(message["c"])
            if circuit is None:
                return
            now_ms = int(message["now"])
            if "mode" in message:
                self.apply_mode(circuit, message["mode"], int(message["mrev"]))
                for key, entry in (message.get("entries") or {}).items():
                    self.adopt(circuit, key, entry, now_ms)
            else:
                self.adopt(circuit, message["k"], message["e"], now_ms)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("a circuit breaker message could not be read (%s): %.200s", exc, data)

    def _reconnected(self) -> None:
        """The subscription was lost (Redis may have been unreachable): re-join now
        rather than at the next check."""
        self.was_up = True
        self.spawn(self._rejoin_quietly())

    async def _rejoin_quietly(self) -> None:
        try:
            await self.rejoin()
        except BackendUnavailable:
            self.was_up = False

    def refresh_soon(self) -> None:
        """Read the shared state soon (once, however many ask before it runs)."""
        if not self.refresh_pending:
            self.refresh_pending = True
            self.spawn(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        self.refresh_pending = False
        try:
            await self.refresh()
        except BackendUnavailable:
            self.was_up = False  # re-join at the next check

    async def refresh(self) -> None:
        """Read every shared circuit and the modes, and take what is newer."""
        circuits = dict(self.circuits())

        async def read(redis: Redis) -> list[Any]:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.time()
                pipe.get(self.revision_key)
                pipe.hgetall(self.modes_key)
                for cid in circuits:
                    pipe.hgetall(self.hash_key(cid))
                return await pipe.execute()

        if self._breaker_script is None and self.cluster.redis is not None:
            # loaded before the first trip needs it: a trip then costs one round trip
            self._breaker_script = self.cluster.redis.register_script(BREAKER_SCRIPT)
            await self.cluster.call(lambda redis: redis.script_load(BREAKER_SCRIPT))
        (seconds, micros), revision, modes, *hashes = await self.cluster.call(read)
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        for (cid, circuit), entries in zip(circuits.items(), hashes, strict=True):
            mode = modes.get(cid, "normal")
            if mode != circuit.mode:
                self.apply_mode(circuit, mode, int(revision or 0))
            for key, raw in entries.items():
                self.adopt(circuit, key, json.loads(raw), now_ms)
        self.seen = int(revision or 0)

    async def rejoin(self) -> None:
        """Redis answers again: publish the trips made alone, then take the shared state."""
        log.info("circuit breaker state shared again through %s", self.cluster.url)
        for (cid, key), link in list(self.links.items()):
            circuit = self.circuits().get(cid)
            if not link.alone or circuit is None:
                continue
            link.alone = False
            breaker = circuit.breaker if not key else circuit.instances.get(key)
            if breaker is not None and breaker.state == OPEN:
                await self._trip(circuit, key, -1, breaker.last_reason)
        await self.refresh()

    async def _check_loop(self, interval: float) -> None:
        """Besides pub/sub: the revision counter every ``interval``, a full read when it
        moved; re-joining after Redis was unreachable."""
        while True:
            try:
                await self.check()
            except BackendUnavailable:
                self.was_up = False
            except Exception:
                log.exception("circuit breaker state check failed")
            await asyncio.sleep(interval)

    async def check(self) -> None:
        circuits = self.circuits()
        if not circuits:
            return
        revision = int(await self.cluster.call(
            lambda redis: redis.get(self.revision_key)) or 0)
        if revision < self.seen:  # Redis lost its data: revisions start again
            for link in self.links.values():
                link.rev = 0
            self.mode_revs.clear()
            self.seen = -1
        if not self.was_up:
            self.was_up = True
            await self.rejoin()
        elif revision != self.seen:
            await self.refresh()
