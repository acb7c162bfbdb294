"""Limits counted in Redis, once for the whole cluster (``[cluster] backend`` a Redis
URL): every node and worker decides against the same counters.

Each decision is atomic in Redis: one Lua script (:data:`SCRIPT`) reads the Redis
server's clock (``TIME``, never a node's), evaluates every limit that applies to a
request in order (rate limits, then concurrency limits) and counts the request in
all of them or in none, with the same arithmetic as :mod:`lucid_ratelimiter.algorithms`
(times in microseconds). A stacked limit that refuses therefore needs no refund.

Decisions are batched per worker (:class:`SharedLimits`): one script call is in flight
at a time, and the decisions that arrive meanwhile go together in the next one, so
under load a worker makes far fewer Redis calls than it admits requests, and at rest a
decision waits for nothing but its own round trip.

Concurrency limits hold *leases*: a sorted set per key of (lease, expiry); the worker
holding one renews it every third of ``concurrency_lease`` and releases it when the
exchange ends, so the slots of a node killed mid-request come back within the lease.

When Redis fails (a refused connection, or no answer within ``[cluster] timeout``),
a breaker opens: decisions follow ``on_backend_failure`` without waiting on Redis, and
a probe closes the breaker as soon as Redis answers again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lucid.definitions import BackendUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from lucid.cluster import Cluster

log = logging.getLogger("lucid.ratelimiter")

ALGORITHM_CODES = {"token_bucket": "1", "fixed_window": "2", "sliding_window": "3",
                   "sliding_log": "4", "concurrency": "5"}
KEY_TYPES = {"token_bucket": "string", "fixed_window": "hash", "sliding_window": "hash",
             "sliding_log": "zset", "concurrency": "zset"}
PER_LIMIT = 8  # ARGV entries per limit of a group (see SCRIPT)
MICRO = 1_000_000
SEPARATOR = "\x1f"  # between the script's arguments (see SCRIPT)

# The arguments travel as one string, fields joined by \x1f (US): one argument to
# encode per call instead of ~11 per decision (redis-py encodes each in Python: the
# largest cost of a batch, measured with cProfile). Logically, ARGV[1]: groups.
# Each group: op, limits; each limit: algorithm (ALGORITHM_CODES), cost, count,
# period (µs; a concurrency limit's lease), capacity, lease id
# (concurrency), rejections hash, the key as users see it. KEYS: one per limit, in
# order (the key's state; a sliding log's running total is that key .. ':n').
# ops: d = decide (all or nothing), u = usage (read only), r = release a lease,
#      n = renew a lease, l = take a slice (sync = "lease"; the lease entry is
#      "want:divisor"), g = give a slice back (the lease entry is "unused:mark"),
#      c = charge what was admitted while Redis was down (the lease entry is
#      "ahead:0" for a token bucket: its TAT at least now + ahead µs; "n:mark" for a
#      fixed window: n more in the window starting at mark µs).
# Reply: {now (µs), then per group: d -> {refused (0, or the 1-based index of the
# refusing limit), then remaining, reset (µs), retry (µs) per limit evaluated};
# u -> {used, reset (µs)} per limit; l -> {granted (0: refused), remaining after it,
# reset (µs), retry (µs), mark (a fixed window's start, µs)} per limit;
# r, n, g, c -> {}}.
SCRIPT = """
-- the arguments come as one string, fields separated by \\31 (see SharedLimits._call)
local packed = ARGV[1] .. '\\31'
local ARGV = {}
for field in string.gmatch(packed, '(.-)\\31') do ARGV[#ARGV + 1] = field end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local floor, ceil = math.floor, math.ceil

local function roll(key, period)
  local start = now - (now % period)
  local st = redis.call('HMGET', key, 'w', 'c', 'p')
  local w, c, p = tonumber(st[1]), tonumber(st[2]) or 0, tonumber(st[3]) or 0
  if w ~= start then
    if w and start - w == period then p = c else p = 0 end
    c = 0
  end
  return start, c, p
end

local function lease_cost(member)
  return tonumber(string.match(member, ':(%d+)$')) or 1
end

local function in_flight(key)
  local used = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, '(' .. now, '+inf')) do
    used = used + lease_cost(m)
  end
  return used
end

-- decide one limit: ok, remaining, reset, retry, and the write to make if all admit
local function decide(alg, key, cost, count, period, capacity, lease)
  if alg == '1' then
    local interval = period / count
    local tolerance = capacity * interval
    local slack = interval * 1e-3
    local tat = tonumber(redis.call('GET', key))
    if (not tat) or tat < now then tat = now end
    local new = tat + cost * interval
    local ahead = new - now
    if ahead > tolerance + slack then return false, 0, tat - now, ahead - tolerance end
    return true, floor((tolerance - ahead + slack) / interval), ahead, 0, function()
      redis.call('SET', key, string.format('%.17g', new), 'PX', ceil(ahead / 1000) + 1)
    end
  elseif alg == '2' or alg == '3' then
    local start, c, p = roll(key, period)
    local reset = start + period - now
    local remaining
    if alg == '2' then
      local used = c + cost
      if used > count then return false, 0, reset, reset end
      remaining = count - used
    else
      local used = p * (1 - (now - start) / period) + c + cost
      if used > count + 1e-9 then
        local retry
        if c + cost <= count then
          retry = period * (1 - (count - c - cost) / p) - (now - start)
        else
          local at = 0
          if c > 0 then at = period * (1 - (count - cost) / c) end
          retry = reset + math.max(0, at)
        end
        return false, 0, reset, retry
      end
      remaining = floor(count - used + 1e-9)
    end
    return true, remaining, reset, 0, function()
      redis.call('HSET', key, 'w', start, 'c', c + cost, 'p', p)
      redis.call('PEXPIRE', key, ceil((reset + period) / 1000) + 1)
    end
  elseif alg == '4' then
    local total_key = key .. ':n'
    local horizon = now - period
    local total = tonumber(redis.call('GET', total_key)) or 0
    local gone = redis.call('ZRANGEBYSCORE', key, '-inf', horizon)
    if #gone > 0 then
      for _, m in ipairs(gone) do total = total - lease_cost(m) end
      redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
      redis.call('SET', total_key, total, 'KEEPTTL')
    end
    local used = total + cost
    if used > count then
      local excess = used - count
      local retry = 0
      local log = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
      for i = 1, #log, 2 do
        excess = excess - lease_cost(log[i])
        if excess <= 0 then retry = tonumber(log[i + 1]) + period - now break end
      end
      local reset = 0
      if #log > 0 then reset = tonumber(log[#log]) + period - now end
      return false, 0, reset, retry
    end
    return true, count - used, period, 0, function()
      local ms = ceil(period / 1000) + 1
      redis.call('ZADD', key, now, string.format('%.17g:%d:%d', now, used, cost))
      redis.call('PEXPIRE', key, ms)
      redis.call('SET', total_key, used, 'PX', ms)
    end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local used = in_flight(key) + cost
    if used > count then return false, 0, 1000000, 1000000 end
    return true, count - used, 0, 0, function()
      redis.call('ZADD', key, now + period, lease)
      redis.call('PEXPIRE', key, ceil(period / 1000) + 1000)
    end
  end
end

-- sync = "lease": take a slice of what is left, at least cost and at most want,
-- else an even share (what is left / divisor); refused (0) if cost does not fit.
-- The slice is counted now, as that many requests would be: the cluster never
-- admits more than the limit, whoever spends it.
local function take(alg, key, cost, count, period, capacity, want, divisor)
  local avail, write
  if alg == '1' then
    local interval = period / count
    local tolerance = capacity * interval
    local tat = tonumber(redis.call('GET', key))
    if (not tat) or tat < now then tat = now end
    avail = floor((tolerance - (tat - now) + interval * 1e-3) / interval)
    if avail < cost then
      return 0, 0, tat - now, tat + cost * interval - now - tolerance, 0
    end
    local slice = math.max(cost, math.min(want, floor(avail / divisor)))
    local new = tat + slice * interval
    redis.call('SET', key, string.format('%.17g', new), 'PX', ceil((new - now) / 1000) + 1)
    return slice, avail - slice, new - now, 0, 0
  end
  local start, c, p = roll(key, period)
  local reset = start + period - now
  avail = count - c
  if avail < cost then return 0, 0, reset, reset, start end
  local slice = math.max(cost, math.min(want, floor(avail / divisor)))
  redis.call('HSET', key, 'w', start, 'c', c + slice, 'p', p)
  redis.call('PEXPIRE', key, ceil((reset + period) / 1000) + 1)
  return slice, avail - slice, reset, 0, start
end

-- give back what a slice did not spend (a fixed window's only within its window)
local function give(alg, key, count, period, unused, mark)
  if alg == '1' then
    local tat = tonumber(redis.call('GET', key))
    if not tat then return end
    local new = tat - unused * period / count
    if new > now then
      redis.call('SET', key, string.format('%.17g', new), 'PX', ceil((new - now) / 1000) + 1)
    else
      redis.call('DEL', key)
    end
    return
  end
  local start, c, p = roll(key, period)
  if start == mark and c > 0 then
    redis.call('HSET', key, 'w', start, 'c', math.max(0, c - unused), 'p', p)
  end
end

-- after an outage: count what a process admitted on its own meanwhile
local function charge(alg, key, count, period, capacity, amount, mark)
  if alg == '1' then
    local new = now + math.min(amount, capacity * period / count)
    local tat = tonumber(redis.call('GET', key))
    if (not tat) or tat < new then
      redis.call('SET', key, string.format('%.17g', new), 'PX', ceil((new - now) / 1000) + 1)
    end
    return
  end
  local start, c, p = roll(key, period)
  if start == mark then
    redis.call('HSET', key, 'w', start, 'c', math.min(count, c + amount), 'p', p)
    redis.call('PEXPIRE', key, ceil((start + 2 * period - now) / 1000) + 1)
  end
end

local function usage(alg, key, count, period, capacity)
  if alg == '1' then
    local interval = period / count
    local tat = tonumber(redis.call('GET', key)) or now
    local ahead = math.max(0, tat - now)
    return ceil((ahead - interval * 1e-3) / interval), ahead
  elseif alg == '2' or alg == '3' then
    local start, c, p = roll(key, period)
    local used = c
    if alg == '3' then used = ceil(p * (1 - (now - start) / period) + c - 1e-9) end
    return used, start + period - now
  elseif alg == '4' then
    local total = 0
    local log = redis.call('ZRANGEBYSCORE', key, '(' .. (now - period), '+inf', 'WITHSCORES')
    for i = 1, #log, 2 do total = total + lease_cost(log[i]) end
    if #log == 0 then return 0, 0 end
    return total, tonumber(log[#log]) + period - now
  end
  return in_flight(key), 0
end

local out = {now}
local i, k = 2, 1
for _ = 1, tonumber(ARGV[1]) do
  local op, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local reply = {}
  if op == 'd' then
    reply[1] = 0
    local writes = {}
    for j = 1, n do
      if reply[1] == 0 then
        local ok, remaining, reset, retry, write = decide(
          ARGV[i], KEYS[k], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]),
          tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), ARGV[i + 5])
        reply[#reply + 1] = remaining
        reply[#reply + 1] = floor(reset)
        reply[#reply + 1] = floor(retry)
        if ok then
          writes[#writes + 1] = write
        else
          reply[1] = j
          redis.call('HINCRBY', ARGV[i + 6], ARGV[i + 7], 1)
          redis.call('PEXPIRE', ARGV[i + 6], 86400000)
        end
      end
      i, k = i + 8, k + 1
    end
    if reply[1] == 0 then
      for _, write in ipairs(writes) do write() end
    end
  else
    for _ = 1, n do
      if op == 'u' then
        local used, reset = usage(ARGV[i], KEYS[k], tonumber(ARGV[i + 2]),
                                  tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]))
        reply[#reply + 1] = used
        reply[#reply + 1] = floor(reset)
      elseif op == 'r' then
        redis.call('ZREM', KEYS[k], ARGV[i + 5])
      elseif op == 'l' then
        local want, divisor = string.match(ARGV[i + 5], '^(%d+):(%d+)$')
        local granted, remaining, reset, retry, mark = take(
          ARGV[i], KEYS[k], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]),
          tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), tonumber(want), tonumber(divisor))
        if granted == 0 then
          redis.call('HINCRBY', ARGV[i + 6], ARGV[i + 7], 1)
          redis.call('PEXPIRE', ARGV[i + 6], 86400000)
        end
        reply[#reply + 1] = granted
        reply[#reply + 1] = remaining
        reply[#reply + 1] = floor(reset)
        reply[#reply + 1] = floor(retry)
        reply[#reply + 1] = mark
      elseif op == 'g' then
        local unused, mark = string.match(ARGV[i + 5], '^(%d+):(%d+)$')
        give(ARGV[i], KEYS[k], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]),
             tonumber(unused), tonumber(mark))
      elseif op == 'c' then
        local amount, mark = string.match(ARGV[i + 5], '^(%d+):(%d+)$')
        charge(ARGV[i], KEYS[k], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]),
               tonumber(ARGV[i + 4]), tonumber(amount), tonumber(mark))
      elseif op == 'n' then
        redis.call('ZADD', KEYS[k], 'XX', now + tonumber(ARGV[i + 3]), ARGV[i + 5])
        redis.call('PEXPIRE', KEYS[k], ceil(tonumber(ARGV[i + 3]) / 1000) + 1000)
      end
      i, k = i + 8, k + 1
    end
  end
  out[#out + 1] = reply
end
return out
"""


# sync = "lease": how a worker sizes the slices it takes
LEASE_SHARE = 2  # a slice is at most what is left ÷ (this × live processes)
LEASE_SECONDS = 1.0  # a slice unspent this long goes back (a fixed window's: at its end)
FIRST_SLICE = 4  # a key's first slice; doubled while slices run out, halved when not
MAX_SLICE = 1024


class Slice:
    """What one worker holds of one limit for one key (``sync = "lease"``): ``tokens``
    it may admit without asking Redis until ``deadline`` (monotonic seconds), and what
    Redis said when it gave them (``remaining`` elsewhere, ``reset_at``) for headers."""

    __slots__ = ("tokens", "remaining", "reset_at", "deadline", "mark", "want", "taking")

    def __init__(self) -> None:
        self.tokens = 0
        self.remaining = 0
        self.reset_at = 0.0
        self.deadline = 0.0
        self.mark = 0  # a fixed window's start (µs, Redis's clock): where to give back
        self.want = FIRST_SLICE
        # requests waiting for Redis to add to this slice: it must not be dropped
        # meanwhile, or what Redis grants would be held by nobody until its window ends
        self.taking = 0


@dataclass(slots=True)
class Verdict:
    """One request's decision: ``refused`` is the index of the refusing limit (-1:
    admitted); ``results`` (remaining, reset s, retry s) per limit evaluated."""

    refused: int
    results: list[tuple[int, float, float]]


def limit_keys(cluster: Cluster, limit_id: str, signature: str) -> tuple[str, str]:
    """Where a limit counts: the prefix of its keys' state (``prefix + key``) and its
    rejections hash. Both name the limit's signature: what a limit counts changing
    starts it over, as with counters in memory."""
    digest = hashlib.sha1(signature.encode()).hexdigest()[:12]
    return (cluster.key("rl", limit_id, digest, ""),
            cluster.key("rl-rejections", limit_id, digest))


def state_key(prefix: str, key: str) -> str:
    """A client's state key for one limit: the client's key is a Redis Cluster hash tag
    (``{...}``), so every key of that limit for that client (a sliding log's running
    total ``...}:n`` too) lands in one slot, and stacked limits keyed alike share it."""
    return f"{prefix}{{{key}}}"


def label_of(name: str, prefix: str) -> str:
    """The client's key back from a state key (:func:`state_key`)."""
    return name[len(prefix) + 1:-1]


def fail(batch: Sequence[tuple[Any, ...]], error: BackendUnavailable) -> None:
    for *_, future in batch:
        if future is not None and not future.done():
            future.set_exception(error)


class SharedLimits:
    """One worker's link to the cluster's counters: batched script calls, the breaker
    around them, and the concurrency leases this worker holds."""

    def __init__(self, cluster: Cluster, lease_seconds: float,
                 on_trip: Any = None):
        self.cluster = cluster
        self.on_trip = on_trip  # called when the breaker opens
        self.lease_seconds = lease_seconds
        self._script: Any = None
        self._queue: list[tuple[str, list[Any], list[str], asyncio.Future[Any] | None]] = []
        self._sending = False
        self._sender: asyncio.Task[None] | None = None
        self._leases = itertools.count(1)
        # unique per process: forked workers share a node id (and may share addresses)
        self._holder = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.held: dict[str, str] = {}  # lease id -> key, for renewal
        self.closed = True  # the breaker: False while Redis is considered down
        self.opened_at: float | None = None
        self.calls = 0  # script calls sent
        self.decisions = 0  # decisions made in Redis
        self.failures = 0  # breaker openings

    def lease_id(self, cost: int) -> str:
        return f"{self.cluster.node_id}:{self._holder}:{next(self._leases)}:{cost}"

    # calls ---------------------------------------------------------------------
    async def run(self, ops: Sequence[tuple[str, list[Any], list[str]]]) -> list[Any]:
        """Several groups (op, args, keys) in one script call now, without batching
        (admin reads, releases, renewals). Returns the replies, ``now`` (µs) first."""
        args: list[Any] = [len(ops)]
        keys: list[str] = []
        for op, op_args, op_keys in ops:
            args += [op, len(op_keys), *op_args]
            keys += op_keys
        return await self._call(keys, args)  # type: ignore[no-any-return]

    async def _call(self, keys: list[str], args: list[Any]) -> Any:
        cluster = self.cluster
        # one argument (see SCRIPT); a separator inside a client's key would shift
        # the fields: it becomes "?" (only the rejections report shows that label)
        packed = SEPARATOR.join(map(str, args))
        if packed.count(SEPARATOR) != len(args) - 1:
            packed = SEPARATOR.join(str(a).replace(SEPARATOR, "?") for a in args)
        args = [packed]
        if self._script is None and cluster.redis is not None:
            self._script = cluster.redis.register_script(SCRIPT)
        script = self._script
        self.calls += 1

        async def work(redis: Redis) -> Any:
            return await script(keys=keys, args=args)

        try:
            return await cluster.call(work)
        except BackendUnavailable:
            self.trip()
            raise

    def decide(self, args: list[Any], keys: list[str]) -> asyncio.Future[Any]:
        """Queue one request's decision (a ``d`` group); resolved with its reply, or
        :class:`BackendUnavailable`. Sent with whatever else is queued when the call
        in flight (if any) returns."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue("d", args, keys, future)
        return future

    def take(self, args: list[Any], keys: list[str]) -> asyncio.Future[Any]:
        """Queue the taking of slices (an ``l`` group, ``sync = "lease"``), batched
        like decisions; resolved with the reply or :class:`BackendUnavailable`."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue("l", args, keys, future)
        return future

    def release(self, key: str, lease: str) -> None:
        """Give a concurrency lease back, in the next batch (nobody waits for it; if
        Redis is down the lease expires on its own)."""
        self.held.pop(lease, None)
        if self.closed:
            self._enqueue("r", self.params("concurrency", 0, 0, 0, 0, lease, "", ""),
                          [key], None)

    def enqueue(self, op: str, args: list[Any], keys: list[str]) -> None:
        """A group nobody waits for (a slice given back), in the next batch."""
        self._enqueue(op, args, keys, None)

    def _enqueue(self, op: str, args: list[Any], keys: list[str],
                 future: asyncio.Future[Any] | None) -> None:
        self._queue.append((op, args, keys, future))
        if not self._sending:
            self._sending = True
            # kept: the loop holds tasks weakly
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                if not self.closed:
                    fail(batch, BackendUnavailable("the rate limit backend is down"))
                    continue
                args: list[Any] = [len(batch)]
                keys: list[str] = []
                for op, group_args, group_keys, _ in batch:
                    args += [op, len(group_keys), *group_args]
                    keys += group_keys
                try:
                    reply = await self._call(keys, args)
                except BackendUnavailable as exc:
                    fail(batch, exc)
                    continue
                except Exception as exc:  # a script error: say so, decide without Redis
                    log.exception("the rate limit script failed")
                    fail(batch, BackendUnavailable(str(exc)))
                    continue
                for (*_, future), answer in zip(batch, reply[1:], strict=True):
                    if future is not None and not future.done():
                        self.decisions += 1
                        future.set_result(answer)
        finally:
            self._sending = False

    @staticmethod
    def verdict(reply: list[int]) -> Verdict:
        values = reply[1:]
        return Verdict(int(reply[0]) - 1, [
            (int(values[i]), values[i + 1] / MICRO, values[i + 2] / MICRO)
            for i in range(0, len(values), 3)])

    # the breaker -----------------------------------------------------------------
    def trip(self) -> None:
        if self.closed:
            self.closed = False
            self.opened_at = time.monotonic()
            self.failures += 1
            log.warning("rate limit backend %s unreachable: deciding without it until "
                        "it answers again", self.cluster.url)
            if self.on_trip is not None:
                self.on_trip()

    async def probe(self, before: Callable[[], Awaitable[None]] | None = None) -> bool:
        """PING; close the breaker if Redis answers (after ``before``, if given, has
        run: what must reach Redis before decisions do)."""
        try:
            await self.cluster.call(lambda redis: redis.ping())
            if before is not None:
                await before()
        except BackendUnavailable:
            return False
        if not self.closed:
            log.info("rate limit backend %s answers again: counting in it", self.cluster.url)
        self.closed = True
        self.opened_at = None
        return True

    # leases ----------------------------------------------------------------------
    def params(self, algorithm: str, cost: int, count: int, period: float, capacity: int,
               lease: str, rejections: str, label: str) -> list[Any]:
        """One limit's ARGV entries (see :data:`SCRIPT`)."""
        micro = self.lease_seconds * MICRO if algorithm == "concurrency" else period * MICRO
        return [ALGORITHM_CODES[algorithm], cost, count, int(micro), capacity, lease,
                rejections, label]

    async def renew(self, force: bool = False) -> None:
        """Extend every lease this worker holds, in one call (``force``: even with the
        breaker open, as Redis comes back)."""
        if not self.held or not (self.closed or force):
            return
        ops = [("n", self.params("concurrency", 0, 0, 0, 0, lease, "", ""), [key])
               for lease, key in list(self.held.items())]
        try:
            await self.run(ops)
        except BackendUnavailable:
            pass
