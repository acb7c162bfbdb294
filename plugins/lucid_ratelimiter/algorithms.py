"""The counting algorithms (four rate limits and a concurrency limit), each keeping its
per-key state in memory.

Every limiter answers ``hit(key, cost, now)`` with the requests left after this one
(``>= 0``: admitted and counted) or ``-1`` (refused, nothing counted), and leaves
``reset`` (seconds until the counter is back to full, or the window ends) and, on a
refusal, ``retry_after`` (seconds until ``cost`` would be admitted) on itself: one
decision at a time runs per process, and this avoids a tuple per request.

State is one small value per key, in plain dicts: a float (token bucket), an int
(windows: the whole window's keys live in one dict, so a new window drops the old
counts at once and idle keys expire for free) or a list of (time, cost) (sliding log). ``max_keys``
bounds each limiter; when it is reached, the oldest key (by first use) is dropped in
O(1): free if it was idle, else an *eviction* (that key starts over with a full
allowance), counted in ``evictions``. A background sweep expires idle keys in steps.
"""

from __future__ import annotations

import math
from typing import Any


class Limiter:
    """What the plugin needs from an algorithm; see the module docstring."""

    algorithm = ""

    def __init__(self, count: int, period: float, capacity: int, max_keys: int):
        self.count = count
        self.period = period
        self.capacity = capacity
        self.max_keys = max_keys
        self.reset = 0.0
        self.retry_after = 0.0
        self.evictions = 0

    # what the store interface needs ------------------------------------------
    def hit(self, key: str, cost: int, now: float) -> int:
        raise NotImplementedError

    def refund(self, key: str, cost: int, now: float) -> None:
        """Undo an admitted ``hit`` (another stacked limit refused the request)."""
        raise NotImplementedError

    def usage(self, key: str, now: float) -> tuple[int, float]:
        """(used, seconds until reset) without counting anything."""
        raise NotImplementedError

    def keys(self, now: float) -> list[str]:
        raise NotImplementedError

    def forget(self, key: str) -> None:
        raise NotImplementedError

    def sweep(self, now: float) -> int:
        """Drop keys whose state equals a fresh key's; returns how many."""
        removed = 0
        for removed in self.sweep_steps(now, 1 << 62):  # noqa: B007 - the last count
            pass
        return removed

    def sweep_steps(self, now: float, chunk: int = 5000) -> Any:
        """The same sweep, in steps of ``chunk`` keys (yields after each, with the
        count so far), so that a million keys never block the event loop at once."""
        yield 0

    def __len__(self) -> int:
        return len(self.keys(float("inf")))

    # persistence (quotas) ------------------------------------------------------
    def dump(self, key: str) -> tuple[float, float, float] | None:
        """(window start, value, previous value) to persist, or None if nothing."""
        raise NotImplementedError

    def load(self, key: str, window: float, value: float, previous: float, now: float) -> None:
        raise NotImplementedError

    @property
    def limit(self) -> int:
        """What headers announce as the quota."""
        return self.count


class TokenBucket(Limiter):
    """GCRA: per key, the theoretical arrival time (TAT) of the next conforming request.

    The bucket holds ``capacity`` tokens and refills ``count`` per ``period``; a full
    bucket is a TAT in the past, so a key at rest holds no state at all.
    """

    algorithm = "token_bucket"

    def __init__(self, count: int, period: float, capacity: int, max_keys: int):
        super().__init__(count, period, capacity, max_keys)
        self.interval = period / count
        self.tolerance = capacity * self.interval
        # epoch seconds carry ~2e-7 s of float error: a thousandth of a token absorbs it
        self.slack = self.interval * 1e-3
        self.tats: dict[str, float] = {}

    def hit(self, key: str, cost: int, now: float) -> int:
        tats = self.tats
        tat = tats.get(key)
        if tat is None or tat < now:
            if tat is None and len(tats) >= self.max_keys:
                self._make_room(now)
            tat = now
        new = tat + cost * self.interval
        ahead = new - now
        if ahead > self.tolerance + self.slack:
            self.retry_after = ahead - self.tolerance
            self.reset = tat - now
            return -1
        tats[key] = new
        self.reset = ahead
        return int((self.tolerance - ahead + self.slack) / self.interval)

    def refund(self, key: str, cost: int, now: float) -> None:
        if key in self.tats:
            self.tats[key] -= cost * self.interval

    def usage(self, key: str, now: float) -> tuple[int, float]:
        ahead = max(0.0, self.tats.get(key, now) - now)
        return math.ceil((ahead - self.slack) / self.interval), ahead

    def keys(self, now: float) -> list[str]:
        return [k for k, tat in self.tats.items() if tat > now]

    def forget(self, key: str) -> None:
        self.tats.pop(key, None)

    def sweep_steps(self, now: float, chunk: int = 5000) -> Any:
        tats = self.tats
        keys = list(tats)
        removed = 0
        for start in range(0, len(keys), chunk):
            for k in keys[start:start + chunk]:
                tat = tats.get(k)
                if tat is not None and tat <= now:
                    del tats[k]
                    removed += 1
            yield removed

    def _make_room(self, now: float) -> None:
        """O(1): drop the oldest key; an eviction only if it was still counting."""
        oldest = next(iter(self.tats))
        if self.tats.pop(oldest) > now:
            self.evictions += 1

    def __len__(self) -> int:
        return len(self.tats)

    def dump(self, key: str) -> tuple[float, float, float] | None:
        tat = self.tats.get(key)
        return None if tat is None else (0.0, tat, 0.0)

    def load(self, key: str, window: float, value: float, previous: float, now: float) -> None:
        if value > now:
            self.tats[key] = value

    @property
    def limit(self) -> int:
        return self.capacity


class FixedWindow(Limiter):
    """``count`` per window aligned on the epoch; all keys share the current window."""

    algorithm = "fixed_window"

    def __init__(self, count: int, period: float, capacity: int, max_keys: int):
        super().__init__(count, period, capacity, max_keys)
        self.window = 0.0
        self.counts: dict[str, int] = {}
        self.previous: dict[str, int] = {}

    def window_at(self, now: float) -> float:
        """The start of the window ``now`` is in (the current one, once rolled)."""
        return self._roll(now)

    def _roll(self, now: float) -> float:
        start = now - now % self.period
        if start != self.window:
            self.previous = self.counts if start - self.window == self.period else {}
            self.counts = {}
            self.window = start
        return start

    def hit(self, key: str, cost: int, now: float) -> int:
        start = self.window
        if now >= start + self.period or now < start:
            start = self._roll(now)
        counts = self.counts
        used = counts.get(key, 0) + cost
        self.reset = start + self.period - now
        if used > self.count:
            self.retry_after = self.reset
            return -1
        if used == cost and len(counts) >= self.max_keys:
            del counts[next(iter(counts))]
            self.evictions += 1
        counts[key] = used
        return self.count - used

    def refund(self, key: str, cost: int, now: float) -> None:
        if key in self.counts:
            self.counts[key] -= cost

    def usage(self, key: str, now: float) -> tuple[int, float]:
        self._roll(now)
        return self.counts.get(key, 0), self.window + self.period - now

    def keys(self, now: float) -> list[str]:
        self._roll(now)
        return list(self.counts)

    def forget(self, key: str) -> None:
        self.counts.pop(key, None)
        self.previous.pop(key, None)

    def sweep_steps(self, now: float, chunk: int = 5000) -> Any:
        before = len(self.counts) + len(self.previous)
        self._roll(now)  # a new window drops the old counts in one go
        yield before - len(self.counts) - len(self.previous)

    def __len__(self) -> int:
        return len(self.counts) + len(self.previous)

    def dump(self, key: str) -> tuple[float, float, float] | None:
        if key not in self.counts:
            return None
        return (self.window, float(self.counts[key]), float(self.previous.get(key, 0)))

    def load(self, key: str, window: float, value: float, previous: float, now: float) -> None:
        start = self._roll(now)
        if window == start:
            self.counts[key] = int(value)
            if previous:
                self.previous[key] = int(previous)
        elif window == start - self.period:
            self.previous[key] = int(value)


class SlidingWindow(FixedWindow):
    """Sliding window counter (approximate, O(1) per key): the previous window's count,
    weighted by how much of it still overlaps the sliding window, plus the current one."""

    algorithm = "sliding_window"

    def hit(self, key: str, cost: int, now: float) -> int:
        start = self.window
        if now >= start + self.period or now < start:
            start = self._roll(now)
        counts = self.counts
        current = counts.get(key, 0)
        weight = 1.0 - (now - start) / self.period
        estimate = self.previous.get(key, 0) * weight + current
        used = estimate + cost
        self.reset = start + self.period - now
        if used > self.count + 1e-9:
            previous = self.previous.get(key, 0)
            if current + cost <= self.count:
                # later in this window, once enough of the previous one slid out
                at = self.period * (1.0 - (self.count - current - cost) / previous)
                self.retry_after = at - (now - start)
            else:
                # in the next window, where this window's count is the weighted one
                at = self.period * (1.0 - (self.count - cost) / current) if current else 0.0
                self.retry_after = self.reset + max(0.0, at)
            return -1
        if not current and len(counts) >= self.max_keys:
            del counts[next(iter(counts))]
            self.evictions += 1
        counts[key] = current + cost
        return int(self.count - used + 1e-9)

    def usage(self, key: str, now: float) -> tuple[int, float]:
        self._roll(now)
        weight = 1.0 - (now - self.window) / self.period
        used = self.previous.get(key, 0) * weight + self.counts.get(key, 0)
        return math.ceil(used - 1e-9), self.window + self.period - now

    def keys(self, now: float) -> list[str]:
        self._roll(now)
        return list(dict.fromkeys([*self.counts, *self.previous]))


class SlidingLog(Limiter):
    """Exact sliding window: per key, a list of (time, cost) of the admitted requests
    (a list, not a deque: a deque costs ~600 bytes even when nearly empty)."""

    algorithm = "sliding_log"

    def __init__(self, count: int, period: float, capacity: int, max_keys: int):
        super().__init__(count, period, capacity, max_keys)
        self.logs: dict[str, Any] = {}  # key -> [list of (time, cost), used]

    def _trim(self, entry: list[Any], now: float) -> None:
        log = entry[0]
        horizon = now - self.period
        i, n = 0, len(log)
        while i < n and log[i][0] <= horizon:
            entry[1] -= log[i][1]
            i += 1
        if i:
            del log[:i]

    def hit(self, key: str, cost: int, now: float) -> int:
        entry = self.logs.get(key)
        if entry is None:
            if len(self.logs) >= self.max_keys:
                self._make_room(now)
            entry = [[], 0]
        else:
            self._trim(entry, now)
        log = entry[0]
        used = entry[1] + cost
        if used > self.count:
            # the oldest entries must slide out until ``cost`` fits
            excess = used - self.count
            for at, spent in log:
                excess -= spent
                if excess <= 0:
                    self.retry_after = at + self.period - now
                    break
            self.reset = log[-1][0] + self.period - now if log else 0.0
            return -1
        log.append((now, cost))
        entry[1] = used
        self.logs[key] = entry
        self.reset = self.period
        return self.count - used

    def refund(self, key: str, cost: int, now: float) -> None:
        entry = self.logs.get(key)
        if entry and entry[0]:
            entry[1] -= entry[0].pop()[1]

    def usage(self, key: str, now: float) -> tuple[int, float]:
        entry = self.logs.get(key)
        if entry is None:
            return 0, 0.0
        self._trim(entry, now)
        reset = entry[0][-1][0] + self.period - now if entry[0] else 0.0
        return entry[1], reset

    def keys(self, now: float) -> list[str]:
        return [k for k, e in self.logs.items() if e[0] and e[0][-1][0] > now - self.period]

    def forget(self, key: str) -> None:
        self.logs.pop(key, None)

    def sweep_steps(self, now: float, chunk: int = 5000) -> Any:
        logs = self.logs
        keys = list(logs)
        horizon = now - self.period
        removed = 0
        for start in range(0, len(keys), chunk):
            for k in keys[start:start + chunk]:
                entry = logs.get(k)
                if entry is not None and (not entry[0] or entry[0][-1][0] <= horizon):
                    del logs[k]
                    removed += 1
            yield removed

    def _make_room(self, now: float) -> None:
        """O(1): drop the oldest key; an eviction only if it was still counting."""
        oldest = next(iter(self.logs))
        log = self.logs.pop(oldest)[0]
        if log and log[-1][0] > now - self.period:
            self.evictions += 1

    def __len__(self) -> int:
        return len(self.logs)

    def dump(self, key: str) -> tuple[float, float, float] | None:
        return None  # never a quota (refused for windows of an hour or more)

    def load(self, key: str, window: float, value: float, previous: float, now: float) -> None:
        return None


class Concurrency(Limiter):
    """At most ``count`` units in flight per key: ``hit`` takes them when a request is
    admitted, ``release`` gives them back when its exchange ends (the plugin does both).

    Only keys with something in flight hold state, so the dict is bounded by the
    requests in progress: nothing to evict, nothing to sweep, nothing to persist (a
    restart ends every exchange).
    """

    algorithm = "concurrency"
    RETRY_AFTER = 1.0  # a slot frees when a request ends: when is not known; ask again soon

    def __init__(self, count: int, period: float, capacity: int, max_keys: int):
        super().__init__(count, period, capacity, max_keys)
        self.in_flight: dict[str, int] = {}

    def hit(self, key: str, cost: int, now: float) -> int:
        in_flight = self.in_flight
        used = in_flight.get(key, 0) + cost
        if used > self.count:
            self.retry_after = self.reset = self.RETRY_AFTER
            return -1
        in_flight[key] = used
        self.reset = 0.0
        return self.count - used

    def release(self, key: str, cost: int) -> None:
        in_flight = self.in_flight
        left = in_flight.get(key, 0) - cost
        if left > 0:
            in_flight[key] = left
        else:
            in_flight.pop(key, None)

    def refund(self, key: str, cost: int, now: float) -> None:
        self.release(key, cost)

    def usage(self, key: str, now: float) -> tuple[int, float]:
        return self.in_flight.get(key, 0), 0.0

    def keys(self, now: float) -> list[str]:
        return list(self.in_flight)

    def forget(self, key: str) -> None:
        """Nothing to forget: the count is of requests still running, and each one
        gives its units back when it ends."""

    def __len__(self) -> int:
        return len(self.in_flight)

    def dump(self, key: str) -> tuple[float, float, float] | None:
        return None

    def load(self, key: str, window: float, value: float, previous: float, now: float) -> None:
        return None


ALGORITHMS: dict[str, type[Limiter]] = {
    cls.algorithm: cls
    for cls in (TokenBucket, FixedWindow, SlidingWindow, SlidingLog, Concurrency)
}
