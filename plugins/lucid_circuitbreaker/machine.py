"""The breaker state machine and its sliding windows, free of I/O and of the clock.

Every method takes ``now`` (seconds from one monotonic clock), so the table test in
``tests/test_circuitbreaker_machine.py`` drives time by hand. The documented table
(``README.md``, "State machine") is the contract; this module implements it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
FORCED_OPEN = "forced_open"  # Resilience4j FORCED_OPEN: refuses everything until reset
METRICS_ONLY = "metrics_only"  # Resilience4j METRICS_ONLY: permits everything, still counts

STATES = (CLOSED, OPEN, HALF_OPEN, FORCED_OPEN, METRICS_ONLY)
FAILURE = 1
SLOW = 2
NO_PROBE = math.inf  # permit() result when refused with no probe scheduled (forced open)
HALF_OPEN_RETRY = 1.0  # Retry-After while every probe slot is taken


@dataclass(frozen=True, slots=True)
class Settings:
    """Resolved thresholds of one circuit (defaults already applied, ranges checked)."""

    failure_rate_threshold: float = 50.0
    slow_call_rate_threshold: float = 100.0
    slow_call_duration_threshold: float = 60.0
    sliding_window_type: str = "count_based"
    sliding_window_size: int = 100
    minimum_number_of_calls: int = 100
    consecutive_failures: int = 0  # 0: off
    wait_duration_in_open_state: float = 60.0
    exponential_backoff_multiplier: float = 1.0
    max_wait_duration_in_open_state: float = 600.0
    permitted_number_of_calls_in_half_open_state: int = 10
    max_wait_duration_in_half_open_state: float = 60.0

    def open_wait(self, trips: int) -> float:
        """Open duration after ``trips`` consecutive trips (1 = the first)."""
        base = self.wait_duration_in_open_state
        if self.exponential_backoff_multiplier == 1.0 or trips <= 1:
            return base
        try:
            wait = base * self.exponential_backoff_multiplier ** (trips - 1)
        except OverflowError:
            wait = math.inf
        return min(wait, self.max_wait_duration_in_open_state)


class CountWindow:
    """The last N recorded calls (Resilience4j COUNT_BASED), in a ring of flag bytes.

    Successes may be counted in ``pending`` (one integer add on the data path) and are
    written into the ring by the next :meth:`add` or :meth:`totals`, which then answer
    exactly what adding each one in turn would have."""

    __slots__ = ("size", "ring", "pos", "calls", "failures", "slows", "pending")

    def __init__(self, size: int):
        self.size = size
        self.ring = bytearray(size)
        self.pos = 0
        self.calls = 0
        self.failures = 0
        self.slows = 0
        self.pending = 0  # successes counted but not yet in the ring

    def _settle(self) -> None:
        """Write the ``pending`` successes into the ring, oldest flags out first."""
        k, self.pending = self.pending, 0
        size, pos, calls = self.size, self.pos, self.calls
        if calls < size:
            # Until the ring is full, ``pos == calls`` and the slots from ``pos`` on
            # hold zeros: a success is already written there.
            grow = min(k, size - calls)
            self.calls = calls + grow
            k -= grow
            pos += grow
            if pos == size:
                pos = 0
        if k and (self.failures or self.slows):  # an all-zero ring has nothing to drop
            ring = self.ring
            if k >= size:
                ring[:] = bytes(size)
                self.failures = self.slows = 0
            else:
                end = pos + k
                spans = ((pos, end),) if end <= size else ((pos, size), (0, end - size))
                for a, b in spans:
                    dropped = ring[a:b]
                    both = dropped.count(FAILURE | SLOW)
                    self.failures -= dropped.count(FAILURE) + both
                    self.slows -= dropped.count(SLOW) + both
                    ring[a:b] = bytes(b - a)
        self.pos = (pos + k) % size

    def add(self, flags: int, now: float) -> None:
        if self.pending:
            self._settle()
        pos = self.pos
        if self.calls == self.size:
            old = self.ring[pos]
            if old & FAILURE:
                self.failures -= 1
            if old & SLOW:
                self.slows -= 1
        else:
            self.calls += 1
        self.ring[pos] = flags
        if flags & FAILURE:
            self.failures += 1
        if flags & SLOW:
            self.slows += 1
        pos += 1
        self.pos = 0 if pos == self.size else pos

    def totals(self, now: float) -> tuple[int, int, int]:
        if self.pending:
            self._settle()
        return self.calls, self.failures, self.slows


class TimeWindow:
    """Calls of the last N seconds (Resilience4j TIME_BASED): N one-second buckets,
    aggregated as they go, so a record costs O(1) amortised."""

    __slots__ = ("size", "b_calls", "b_failures", "b_slows", "last", "calls", "failures", "slows")

    def __init__(self, size: int):
        self.size = size
        self.b_calls = [0] * size
        self.b_failures = [0] * size
        self.b_slows = [0] * size
        self.last: int | None = None
        self.calls = 0
        self.failures = 0
        self.slows = 0

    def _advance(self, second: int) -> None:
        last = self.last
        if last is None or second > last:
            if last is not None:
                size = self.size
                for s in range(last + 1, last + 1 + min(second - last, size)):
                    i = s % size
                    self.calls -= self.b_calls[i]
                    self.failures -= self.b_failures[i]
                    self.slows -= self.b_slows[i]
                    self.b_calls[i] = self.b_failures[i] = self.b_slows[i] = 0
            self.last = second

    def add(self, flags: int, now: float) -> None:
        second = int(now)
        if second != self.last:
            self._advance(second)
        i = second % self.size
        self.b_calls[i] += 1
        self.calls += 1
        if flags & FAILURE:
            self.b_failures[i] += 1
            self.failures += 1
        if flags & SLOW:
            self.b_slows[i] += 1
            self.slows += 1

    def totals(self, now: float) -> tuple[int, int, int]:
        self._advance(int(now))
        return self.calls, self.failures, self.slows


def new_window(settings: Settings) -> CountWindow | TimeWindow:
    if settings.sliding_window_type == "time_based":
        return TimeWindow(settings.sliding_window_size)
    return CountWindow(settings.sliding_window_size)


Transition = Callable[["Breaker", str, str, str, float], None]


class Breaker:
    """One circuit's state (or one instance's, in per-instance scope).

    ``permit(now)`` answers None (call it) or the seconds until the next probe
    (``NO_PROBE`` when forced open); ``record(failure, slow, now)`` counts a finished
    call; ``release(now)`` gives back a probe slot whose call was ignored.
    ``on_transition(breaker, from, to, reason, now)`` is told every state change.
    """

    __slots__ = (
        "settings", "state", "since", "window", "consecutive", "trips", "open_until",
        "half_open_until", "probes_issued", "probe_calls", "probe_failures", "probe_slows",
        "transitions", "last_reason", "on_transition", "key", "time_based", "minimum_calls",
        "quiet",
    )

    def __init__(self, settings: Settings, now: float, on_transition: Transition | None = None,
                 key: str = ""):
        self.settings = settings
        self.state = CLOSED
        self.since = now
        self.window = new_window(settings)
        self.consecutive = 0
        self.trips = 0
        self.open_until = 0.0
        self.half_open_until = 0.0
        self.probes_issued = 0
        self.probe_calls = 0
        self.probe_failures = 0
        self.probe_slows = 0
        self.transitions: dict[str, int] = {}
        self.last_reason = ""
        self.on_transition = on_transition
        self.key = key
        self.time_based = settings.sliding_window_type == "time_based"
        self.minimum_calls = settings.minimum_number_of_calls
        # A fast success needs only be counted (``window.pending += 1``, the consecutive
        # failures reset): closed or metrics-only, a count window, and (closed) at
        # least minimum_number_of_calls in it, so no success can raise a rate or reach
        # the minimum. Kept by record() and _move(); the plugin's data path reads it.
        self.quiet = False

    # the data path -----------------------------------------------------------
    def permit(self, now: float) -> float | None:
        state = self.state
        if state == CLOSED or state == METRICS_ONLY:
            return None
        if state == OPEN:
            if now < self.open_until:
                return self.open_until - now
            self._half_open(now)
        elif state == FORCED_OPEN:
            return NO_PROBE
        # half-open
        if now >= self.half_open_until:
            self._open(now, "no probe results within max_wait_duration_in_half_open_state",
                       backoff=False)
            return self.open_until - now
        if self.probes_issued < self.settings.permitted_number_of_calls_in_half_open_state:
            self.probes_issued += 1
            return None
        return HALF_OPEN_RETRY

    def record(self, failure: bool, slow: bool, now: float) -> None:
        state = self.state
        if state == CLOSED or state == METRICS_ONLY:
            if self.quiet and not failure and not slow:
                self.window.pending += 1  # type: ignore[union-attr]  # quiet: a CountWindow
                self.consecutive = 0
                return
            window = self.window
            window.add((FAILURE if failure else 0) | (SLOW if slow else 0), now)
            if failure:
                self.consecutive += 1
            else:
                self.consecutive = 0
            if not self.time_based and window.calls >= self.minimum_calls:
                self.quiet = True  # a trip below makes it False again
            # In a count window a fast success cannot raise either rate, except by
            # bringing the window up to minimum_number_of_calls: skip the check then.
            if state == CLOSED and (failure or slow or self.time_based
                                    or window.calls == self.minimum_calls):
                self._check_closed(now)
        elif state == HALF_OPEN:
            self.probe_calls += 1
            if failure:
                self.probe_failures += 1
            if slow:
                self.probe_slows += 1
            if self.probe_calls >= self.settings.permitted_number_of_calls_in_half_open_state:
                self._judge_probes(now)
        # open / forced open: a call permitted before the trip finished late; not counted

    def release(self, now: float) -> None:
        """A permitted call ended with an ignored outcome: free its probe slot."""
        if self.state == HALF_OPEN and self.probes_issued > self.probe_calls:
            self.probes_issued -= 1

    def _check_closed(self, now: float) -> None:
        s = self.settings
        if s.consecutive_failures and self.consecutive >= s.consecutive_failures:
            self._open(now, f"{self.consecutive} consecutive failures")
            return
        calls, failures, slows = self.window.totals(now)
        if calls < s.minimum_number_of_calls or not calls:
            return
        if failures * 100.0 >= s.failure_rate_threshold * calls:
            self._open(now, f"failure rate {100.0 * failures / calls:.1f}% >= "
                            f"{s.failure_rate_threshold:g}% over {calls} calls")
        elif slows * 100.0 >= s.slow_call_rate_threshold * calls:
            self._open(now, f"slow-call rate {100.0 * slows / calls:.1f}% >= "
                            f"{s.slow_call_rate_threshold:g}% over {calls} calls")

    def _judge_probes(self, now: float) -> None:
        s = self.settings
        calls = self.probe_calls
        if self.probe_failures * 100.0 >= s.failure_rate_threshold * calls:
            self._open(now, f"{self.probe_failures} of {calls} probe calls failed")
        elif self.probe_slows * 100.0 >= s.slow_call_rate_threshold * calls:
            self._open(now, f"{self.probe_slows} of {calls} probe calls were slow")
        else:
            self._close(now, f"{calls} probe calls succeeded")

    # time ---------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Time-driven transitions with no traffic: a half-open circuit whose probes
        never reported goes back to open (open -> half-open waits for a call, as in
        Resilience4j without automatic transition)."""
        if self.state == HALF_OPEN and now >= self.half_open_until:
            self._open(now, "no probe results within max_wait_duration_in_half_open_state",
                       backoff=False)

    # operator actions ---------------------------------------------------------
    def reset(self, now: float, reason: str = "reset by operator") -> None:
        self.trips = 0
        self._close(now, reason)

    def force_open(self, now: float, reason: str = "forced open by operator") -> None:
        self._move(FORCED_OPEN, now, reason)

    def metrics_only(self, now: float, reason: str = "disabled by operator") -> None:
        if self.state != METRICS_ONLY:
            self.window = new_window(self.settings)
            self.consecutive = 0
        self._move(METRICS_ONLY, now, reason)

    def follow(self, state: str, now: float, reason: str, trips: int, open_until: float,
               half_open_until: float, probes: tuple[int, int, int, int]) -> None:
        """Take a state another process decided (cluster scope: the state shared
        through Redis). Closed keeps the window if this breaker was closed already."""
        if state == CLOSED:
            if self.state != CLOSED:
                self._close(now, reason)
            return
        self.trips = trips
        self.open_until = open_until
        self.half_open_until = half_open_until
        (self.probes_issued, self.probe_calls, self.probe_failures,
         self.probe_slows) = probes
        self._move(state, now, reason)

    # transitions --------------------------------------------------------------
    def _open(self, now: float, reason: str, backoff: bool = True) -> None:
        if backoff or self.trips == 0:
            self.trips += 1
        self.open_until = now + self.settings.open_wait(self.trips)
        self._move(OPEN, now, reason)

    def _half_open(self, now: float) -> None:
        self.probes_issued = self.probe_calls = self.probe_failures = self.probe_slows = 0
        self.half_open_until = now + self.settings.max_wait_duration_in_half_open_state
        self._move(HALF_OPEN, now, "wait_duration_in_open_state elapsed")

    def _close(self, now: float, reason: str) -> None:
        self.window = new_window(self.settings)
        self.consecutive = 0
        self.trips = 0
        self._move(CLOSED, now, reason)

    def _move(self, to: str, now: float, reason: str) -> None:
        before = self.state
        self.state = to
        self.last_reason = reason
        self.quiet = not self.time_based and (to == METRICS_ONLY or (
            to == CLOSED and self.window.totals(now)[0] >= self.minimum_calls))
        if before == to:
            return
        self.since = now
        name = f"{before}->{to}"
        self.transitions[name] = self.transitions.get(name, 0) + 1
        if self.on_transition is not None:
            self.on_transition(self, before, to, reason, now)

    # reading ------------------------------------------------------------------
    def retry_after(self, now: float) -> float | None:
        """Seconds until the next probe may run (None: no probe scheduled)."""
        if self.state == OPEN:
            return max(0.0, self.open_until - now)
        if self.state == HALF_OPEN:
            return 0.0 if self.probes_issued < (
                self.settings.permitted_number_of_calls_in_half_open_state) else HALF_OPEN_RETRY
        return None

    def snapshot(self, now: float) -> dict[str, Any]:
        calls, failures, slows = self.window.totals(now)
        return {
            "state": self.state,
            "since_seconds": round(now - self.since, 3),
            "reason": self.last_reason,
            "calls_in_window": calls,
            "failed_calls": failures,
            "slow_calls": slows,
            "failure_rate": round(100.0 * failures / calls, 2) if calls else None,
            "slow_call_rate": round(100.0 * slows / calls, 2) if calls else None,
            "consecutive_failures": self.consecutive,
            "next_probe_in": self.retry_after(now),
            "half_open_probes": (
                {"permitted": self.settings.permitted_number_of_calls_in_half_open_state,
                 "issued": self.probes_issued, "completed": self.probe_calls,
                 "failed": self.probe_failures, "slow": self.probe_slows,
                 "gives_up_in": round(max(0.0, self.half_open_until - now), 3)}
                if self.state == HALF_OPEN else None
            ),
            "trips": self.trips,
            "transitions": dict(self.transitions),
        }
