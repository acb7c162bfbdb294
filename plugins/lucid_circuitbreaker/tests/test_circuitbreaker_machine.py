"""The state machine as a table (state x event -> next state), with a hand-driven clock.

Each row starts from a state reached by a fixed recipe and applies events; the
README's "State machine" table lists the same rows.
"""

from __future__ import annotations

import math

import pytest
from lucid_circuitbreaker.machine import (
    CLOSED,
    FORCED_OPEN,
    HALF_OPEN,
    METRICS_ONLY,
    NO_PROBE,
    OPEN,
    Breaker,
    CountWindow,
    Settings,
    TimeWindow,
)

TABLE_SETTINGS = Settings(
    failure_rate_threshold=50,
    slow_call_rate_threshold=50,
    slow_call_duration_threshold=1.0,
    sliding_window_type="count_based",
    sliding_window_size=4,
    minimum_number_of_calls=4,
    consecutive_failures=3,
    wait_duration_in_open_state=10,
    permitted_number_of_calls_in_half_open_state=2,
    max_wait_duration_in_half_open_state=5,
)


class Driver:
    """Steps: S success, F failure, W slow success, P permit, I ignored outcome
    (release), T tick, R reset, O force open, D disable, +N advance the clock."""

    def __init__(self, settings: Settings = TABLE_SETTINGS):
        self.now = 1000.0
        self.moves: list[tuple[str, str, str]] = []
        self.breaker = Breaker(settings, self.now, self._moved)
        self.permits: list[float | None] = []

    def _moved(self, breaker: Breaker, before: str, after: str, reason: str, now: float) -> None:
        self.moves.append((before, after, reason))

    def run(self, steps: str) -> Driver:
        b = self.breaker
        for step in steps.split():
            if step.startswith("+"):
                self.now += float(step[1:])
            elif step == "P":
                self.permits.append(b.permit(self.now))
            elif step in "SFW":
                b.record(step == "F", step == "W", self.now)
            elif step == "I":
                b.release(self.now)
            elif step == "T":
                b.tick(self.now)
            elif step == "R":
                b.reset(self.now)
            elif step == "O":
                b.force_open(self.now)
            elif step == "D":
                b.metrics_only(self.now)
            else:
                raise ValueError(step)
        return self


# how each row's starting state is reached
START = {
    CLOSED: "",
    OPEN: "F F F",
    HALF_OPEN: "F F F +10 P",  # one of the two probes issued
    FORCED_OPEN: "O",
    METRICS_ONLY: "D",
}

PERMITTED = "permitted"
REFUSED = "refused"

# (from state, events, next state, result of the last permit in events or None)
TABLE = [
    # closed
    (CLOSED, "S", CLOSED, None),
    (CLOSED, "F", CLOSED, None),
    (CLOSED, "F F F", OPEN, None),  # consecutive failures
    (CLOSED, "F F S F", OPEN, None),  # not 3 in a row, but a failure rate of 3/4
    (CLOSED, "S F S F", OPEN, None),  # failure rate 2/4 = 50% >= 50% at minimum calls
    (CLOSED, "S F S", CLOSED, None),  # below minimum_number_of_calls
    (CLOSED, "W S S W", OPEN, None),  # slow-call rate 2/4 = 50%
    (CLOSED, "W S S S", CLOSED, None),  # slow-call rate 25%
    (CLOSED, "S S S S S S S F", CLOSED, None),  # window keeps the last 4: 1/4 failed
    (CLOSED, "P", CLOSED, PERMITTED),
    (CLOSED, "+10000 T", CLOSED, None),
    (CLOSED, "O", FORCED_OPEN, None),
    (CLOSED, "D", METRICS_ONLY, None),
    (CLOSED, "R", CLOSED, None),
    # open
    (OPEN, "P", OPEN, REFUSED),
    (OPEN, "+9.9 P", OPEN, REFUSED),
    (OPEN, "+10 P", HALF_OPEN, PERMITTED),  # the first call after the wait is a probe
    (OPEN, "S S S S", OPEN, None),  # late outcomes of calls made before the trip
    (OPEN, "+10000 T", OPEN, None),  # no traffic: waits for a call, no flapping
    (OPEN, "R", CLOSED, None),
    (OPEN, "O", FORCED_OPEN, None),
    (OPEN, "D", METRICS_ONLY, None),
    # half-open (2 probes permitted, 1 issued)
    (HALF_OPEN, "P", HALF_OPEN, PERMITTED),
    (HALF_OPEN, "P P", HALF_OPEN, REFUSED),  # the rest are refused at once
    (HALF_OPEN, "S", HALF_OPEN, None),
    (HALF_OPEN, "P S S", CLOSED, None),
    (HALF_OPEN, "P S F", OPEN, None),  # 1/2 failed >= 50%
    (HALF_OPEN, "P W S", OPEN, None),  # 1/2 slow >= 50%
    (HALF_OPEN, "P I P", HALF_OPEN, PERMITTED),  # an ignored outcome frees its slot
    (HALF_OPEN, "+4.9 T", HALF_OPEN, None),
    (HALF_OPEN, "+5 T", OPEN, None),  # probes never reported: back to open, never stuck
    (HALF_OPEN, "+5 P", OPEN, REFUSED),
    (HALF_OPEN, "R", CLOSED, None),
    (HALF_OPEN, "O", FORCED_OPEN, None),
    (HALF_OPEN, "D", METRICS_ONLY, None),
    # forced open
    (FORCED_OPEN, "P", FORCED_OPEN, REFUSED),
    (FORCED_OPEN, "+10000 P", FORCED_OPEN, REFUSED),
    (FORCED_OPEN, "S S S S", FORCED_OPEN, None),
    (FORCED_OPEN, "+10000 T", FORCED_OPEN, None),
    (FORCED_OPEN, "D", METRICS_ONLY, None),
    (FORCED_OPEN, "R", CLOSED, None),
    # metrics only (disabled): always permits, still counts, never trips
    (METRICS_ONLY, "F F F F F P", METRICS_ONLY, PERMITTED),
    (METRICS_ONLY, "+10000 T", METRICS_ONLY, None),
    (METRICS_ONLY, "O", FORCED_OPEN, None),
    (METRICS_ONLY, "R", CLOSED, None),
]


@pytest.mark.parametrize(("start", "events", "expected", "permit"), TABLE,
                         ids=[f"{s}-[{e}]" for s, e, _, _ in TABLE])
def test_state_table(start: str, events: str, expected: str, permit: str | None) -> None:
    driver = Driver().run(START[start])
    assert driver.breaker.state == start
    driver.permits.clear()
    driver.run(events)
    assert driver.breaker.state == expected
    if permit is not None:
        assert driver.permits, "the row must permit at least once"
        last = driver.permits[-1]
        assert (PERMITTED if last is None else REFUSED) == permit


def test_every_state_has_rows() -> None:
    assert {row[0] for row in TABLE} == set(START)


def test_transitions_are_reported_with_reasons() -> None:
    driver = Driver().run("F F F +10 P P S S")
    assert [(a, b) for a, b, _ in driver.moves] == [
        (CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert driver.moves[0][2] == "3 consecutive failures"
    assert driver.breaker.transitions == {
        "closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


def test_a_success_breaks_a_run_of_failures() -> None:
    settings = Settings(consecutive_failures=3, sliding_window_size=100,
                        minimum_number_of_calls=100)
    driver = Driver(settings).run("F F S F F")
    assert driver.breaker.state == CLOSED
    driver.run("F")
    assert driver.breaker.state == OPEN


def test_retry_after_counts_down_to_the_next_probe() -> None:
    driver = Driver().run("F F F +3 P")
    assert driver.permits == [7.0]
    assert driver.breaker.retry_after(driver.now) == 7.0


def test_forced_open_refuses_with_no_probe_time() -> None:
    driver = Driver().run("O P")
    assert driver.permits == [NO_PROBE]
    assert driver.breaker.retry_after(driver.now) is None


def test_exponential_backoff_is_capped() -> None:
    settings = Settings(
        consecutive_failures=1, sliding_window_size=10, minimum_number_of_calls=10,
        wait_duration_in_open_state=10, exponential_backoff_multiplier=2,
        max_wait_duration_in_open_state=30, permitted_number_of_calls_in_half_open_state=1,
    )
    driver = Driver(settings)
    waits = []
    driver.run("F")
    for _ in range(4):
        waits.append(driver.breaker.open_until - driver.now)
        driver.run(f"+{waits[-1]} P F")  # the probe fails: trip again
    assert waits == [10, 20, 30, 30]
    driver.run("+30 P S")
    assert driver.breaker.state == CLOSED
    driver.run("F")
    assert driver.breaker.open_until - driver.now == 10  # closing resets the backoff


def test_half_open_timeout_does_not_grow_the_backoff() -> None:
    settings = Settings(
        consecutive_failures=1, sliding_window_size=10, minimum_number_of_calls=10,
        wait_duration_in_open_state=10, exponential_backoff_multiplier=2,
        max_wait_duration_in_open_state=100, max_wait_duration_in_half_open_state=5,
        permitted_number_of_calls_in_half_open_state=1,
    )
    driver = Driver(settings).run("F +10 P +5 T")
    assert driver.breaker.state == OPEN
    assert driver.breaker.open_until - driver.now == 10


def test_metrics_only_still_counts() -> None:
    driver = Driver().run("D F F S")
    assert driver.breaker.snapshot(driver.now)["failed_calls"] == 2
    assert driver.breaker.snapshot(driver.now)["calls_in_window"] == 3


def test_count_window_keeps_the_last_n() -> None:
    window = CountWindow(3)
    for flags in (1, 1, 0, 0, 2):
        window.add(flags, 0.0)
    assert window.totals(0.0) == (3, 0, 1)


def test_time_window_forgets_old_seconds() -> None:
    window = TimeWindow(10)
    window.add(1, 100.2)
    window.add(0, 100.9)
    window.add(3, 105.0)
    assert window.totals(105.5) == (3, 2, 1)
    assert window.totals(110.0) == (1, 1, 1)  # second 100 left the window
    assert window.totals(115.0) == (0, 0, 0)
    window.add(1, 1000.0)  # a long gap clears everything once
    assert window.totals(1000.0) == (1, 1, 0)


def test_time_based_breaker_trips_on_rate_within_the_window() -> None:
    settings = Settings(sliding_window_type="time_based", sliding_window_size=10,
                        minimum_number_of_calls=4, failure_rate_threshold=50)
    driver = Driver(settings).run("F F +11 S S S")
    assert driver.breaker.state == CLOSED  # the failures aged out
    driver.run("F F")
    assert driver.breaker.state == CLOSED  # 2/5 = 40%
    driver.run("F")
    assert driver.breaker.state == OPEN  # 3/6 = 50%


def test_backoff_overflow_is_capped() -> None:
    settings = Settings(exponential_backoff_multiplier=100, wait_duration_in_open_state=60,
                        max_wait_duration_in_open_state=600)
    assert settings.open_wait(1000) == 600
    assert not math.isinf(settings.open_wait(10_000))


@pytest.mark.parametrize("size", [1, 3, 7, 100])
def test_count_window_pending_successes_match_adding_them_one_by_one(size: int) -> None:
    """Successes counted in ``pending`` (the data path's fast success) are settled into
    the ring as if each had been added in turn, whatever the ring held."""
    import random

    rng = random.Random(size)
    lazy, eager = CountWindow(size), CountWindow(size)
    for _ in range(3000):
        if rng.random() < 0.5:
            for _ in range(rng.choice((1, 1, 2, size - 1, size, size + 1, 3 * size + 2))):
                lazy.pending += 1
                eager.add(0, 0.0)
        else:
            flags = rng.choice((0, 1, 2, 3))
            lazy.add(flags, 0.0)
            eager.add(flags, 0.0)
        if rng.random() < 0.3:
            assert lazy.totals(0.0) == eager.totals(0.0)
            assert (lazy.pos, bytes(lazy.ring)) == (eager.pos, bytes(eager.ring))


@pytest.mark.parametrize("settings", [
    TABLE_SETTINGS,
    Settings(sliding_window_size=10, minimum_number_of_calls=5, failure_rate_threshold=30,
             slow_call_rate_threshold=40, slow_call_duration_threshold=1.0,
             wait_duration_in_open_state=3, permitted_number_of_calls_in_half_open_state=2),
    Settings(sliding_window_size=10, minimum_number_of_calls=10, consecutive_failures=4,
             wait_duration_in_open_state=3, permitted_number_of_calls_in_half_open_state=3),
])
def test_quiet_successes_change_nothing_the_machine_decides(settings: Settings) -> None:
    """A breaker counting fast successes the quiet way moves, refuses and reports exactly
    as one that takes every outcome through the whole check."""
    import random

    rng = random.Random(7)
    quick, full = Driver(settings), Driver(settings)
    for _ in range(4000):
        step = rng.choices(["S", "S", "S", "S", "F", "W", "P", "I", "+1", "D", "R"],
                           [40, 40, 40, 40, 20, 10, 30, 3, 10, 1, 2])[0]
        full.breaker.quiet = False  # the reference never takes the short cut
        quick.run(step)
        full.run(step)
        assert quick.moves == full.moves
        assert quick.permits == full.permits
        assert quick.breaker.snapshot(quick.now) == full.breaker.snapshot(full.now)
