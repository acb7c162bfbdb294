"""The four algorithms, driven with explicit timestamps (deterministic, no sockets)."""

from __future__ import annotations

import random

import pytest
from lucid_ratelimiter.algorithms import (
    ALGORITHMS,
    FixedWindow,
    SlidingLog,
    SlidingWindow,
    TokenBucket,
)
from lucid_ratelimiter.config import Limit, RateLimiterConfig, parse_rate
from pydantic import ValidationError

T0 = 1_800_000_000.0  # epoch-sized timestamps, as in production (float precision matters)


def drive(limiter, rate: float, seconds: float, cost: int = 1, key: str = "k") -> int:
    """Offer ``rate`` requests/s, evenly spaced, for ``seconds``; count the admitted."""
    admitted = 0
    n = int(rate * seconds)
    for i in range(n):
        if limiter.hit(key, cost, T0 + i / rate) >= 0:
            admitted += 1
    return admitted


@pytest.mark.parametrize("algorithm,expected", [
    ("token_bucket", 100 * 10 + 20),  # limit x time + burst
    ("fixed_window", 100 * 10),
    ("sliding_log", 100 * 10),
    ("sliding_window", 100 * 10),
])
def test_twice_the_limit_for_ten_seconds_admits_the_limit_within_one_percent(algorithm, expected):
    limiter = ALGORITHMS[algorithm](100, 1.0, 20 if algorithm == "token_bucket" else 100, 1000)
    admitted = drive(limiter, rate=200, seconds=10)
    assert abs(admitted - expected) <= expected * 0.01, admitted


def test_token_bucket_starts_full_refills_at_the_rate_and_says_when_to_retry():
    bucket = TokenBucket(10, 1.0, 3, 100)
    assert [bucket.hit("a", 1, T0) for _ in range(4)] == [2, 1, 0, -1]
    assert bucket.retry_after == pytest.approx(0.1, abs=1e-4)
    assert bucket.hit("a", 1, T0 + 0.1) == 0  # one token came back
    assert bucket.hit("b", 1, T0) == 2  # keys are independent
    assert bucket.hit("a", 1, T0 + 10) == 2  # idle: full again
    assert bucket.usage("a", T0 + 10) == (1, pytest.approx(0.1, abs=1e-4))


def test_cost_weighted_requests_take_several_tokens():
    bucket = TokenBucket(10, 1.0, 10, 100)
    assert bucket.hit("a", 4, T0) == 6
    assert bucket.hit("a", 4, T0) == 2
    assert bucket.hit("a", 4, T0) == -1
    assert bucket.hit("a", 2, T0) == 0
    window = FixedWindow(10, 60.0, 10, 100)
    assert window.hit("a", 7, T0) == 3
    assert window.hit("a", 7, T0) == -1


def test_fixed_window_resets_on_the_boundary():
    start = T0 - T0 % 60
    window = FixedWindow(2, 60.0, 2, 100)
    assert window.hit("a", 1, start + 1) == 1
    assert window.hit("a", 1, start + 2) == 0
    assert window.hit("a", 1, start + 3) == -1
    assert window.retry_after == pytest.approx(57)
    assert window.hit("a", 1, start + 60) == 1


def test_sliding_log_is_exact_and_retry_after_names_the_oldest_request():
    log = SlidingLog(3, 10.0, 3, 100)
    for t in (0, 1, 2):
        assert log.hit("a", 1, T0 + t) >= 0
    assert log.hit("a", 1, T0 + 5) == -1
    assert log.retry_after == pytest.approx(5)  # the request at +0 leaves at +10
    assert log.hit("a", 1, T0 + 10) == 0
    assert log.usage("a", T0 + 10)[0] == 3


def test_sliding_window_weights_the_previous_window():
    start = T0 - T0 % 10
    window = SlidingWindow(10, 10.0, 10, 100)
    for _ in range(10):
        assert window.hit("a", 1, start + 9) >= 0
    # a quarter into the next window, 75% of the previous 10 still count
    assert window.usage("a", start + 12.5)[0] == 8
    assert window.hit("a", 1, start + 12.5) == 1
    assert window.hit("a", 1, start + 12.5) == 0
    assert window.hit("a", 1, start + 12.5) == -1
    assert window.retry_after > 0


@pytest.mark.parametrize("cls", [TokenBucket, FixedWindow, SlidingWindow, SlidingLog])
def test_refund_undoes_a_hit(cls):
    limiter = cls(5, 1.0, 5, 100)
    before = limiter.hit("a", 1, T0)
    limiter.hit("a", 2, T0)
    limiter.refund("a", 2, T0)
    assert limiter.hit("a", 1, T0) == before - 1


@pytest.mark.parametrize("cls", [TokenBucket, FixedWindow, SlidingWindow, SlidingLog])
def test_memory_is_bounded_and_idle_keys_expire(cls):
    limiter = cls(5, 1.0, 5, 1000)
    rng = random.Random(7)
    for i in range(5000):
        limiter.hit(f"k{rng.randrange(10**9)}", 1, T0 + i * 1e-4)
    assert len(limiter) <= 1000 * (2 if cls in (FixedWindow, SlidingWindow) else 1)
    limiter.sweep(T0 + 100)
    assert len(limiter) == 0
    assert limiter.keys(T0 + 100) == []


def test_eviction_is_counted_when_every_key_is_active():
    bucket = TokenBucket(1, 3600.0, 1, 10)
    for i in range(20):
        bucket.hit(f"k{i}", 1, T0)
    assert len(bucket) == 10
    assert bucket.evictions == 10


@pytest.mark.parametrize("text,expected", [
    ("10/s", (10, 1.0)), ("100/10s", (100, 10.0)), ("5/minute", (5, 60.0)),
    ("1000/day", (1000, 86400.0)), ("7/hours", (7, 3600.0)), ("3/month", (3, 2592000.0)),
])
def test_rates_parse(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize("body,field,message", [
    ({"rate": "10/fortnight"}, "rate", "unknown period 'fortnight'"),
    ({"rate": "0/s"}, "rate", "greater than 0"),
    ({"rate": "-1/s"}, "rate", "expected 'N/period'"),
    ({"rate": "10/s", "algorithm": "leaky"}, "algorithm", "Input should be"),
    ({"rate": "10/s", "key": "cookie"}, "key", "Input should be"),
    ({"rate": "10/s", "key": "header"}, "header", "needs header"),
    ({"rate": "10/s", "header": "x-a"}, "header", "only used with key = 'header'"),
    ({"rate": "10/s", "burst": 5, "algorithm": "fixed_window"}, "burst", "token_bucket' only"),
    ({"rate": "10/s", "burst": 0}, "burst", "greater than or equal to 1"),
    ({"rate": "10/h", "algorithm": "sliding_log"}, "rate", "hour or more"),
    ({}, "rate", "a rate such as '10/s' is required"),
    ({"algorithm": "concurrency"}, "max_in_flight", "needs max_in_flight"),
    ({"algorithm": "concurrency", "max_in_flight": 0}, "max_in_flight", "greater than or equal"),
    ({"algorithm": "concurrency", "max_in_flight": 2, "rate": "1/s"}, "rate", "not a rate"),
    ({"algorithm": "concurrency", "max_in_flight": 2, "burst": 3}, "burst", "token_bucket' only"),
    ({"rate": "10/s", "max_in_flight": 3}, "max_in_flight", "'concurrency' only"),
    ({"rate": "10/s", "algorithm": "sliding_log", "sync": "lease"}, "sync",
     "'token_bucket' or 'fixed_window' only, not 'sliding_log'"),
    ({"rate": "10/s", "algorithm": "sliding_window", "sync": "lease"}, "sync",
     "'fixed_window' only, not 'sliding_window'"),
    ({"algorithm": "concurrency", "max_in_flight": 2, "sync": "lease"}, "sync",
     "not 'concurrency'"),
    ({"rate": "10/s", "sync": "batch"}, "sync", "Input should be 'strict' or 'lease'"),
])
def test_bad_limits_are_refused_naming_the_field(body, field, message):
    with pytest.raises(ValidationError) as info:
        Limit(id="x", **body)
    error = info.value.errors()[0]
    assert ".".join(map(str, error["loc"])) == field
    assert message in error["msg"]


def test_limit_ids_are_unique():
    with pytest.raises(ValidationError, match="used twice"):
        RateLimiterConfig(limits=[Limit(id="a", rate="1/s"), Limit(id="a", rate="2/s")])
