"""A pool in process: panic threshold, slow start ramp (a hand-driven clock), hash
keys and their fallback, affinity tokens, retries, config validation."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from lucid_loadbalancer.config import LoadBalancerConfig, PoolSpec
from lucid_loadbalancer.pool import Pool, cookie_value, query_value
from pydantic import ValidationError

from lucid.model import Candidates, Exchange, Instance


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def instances(n: int) -> list[Instance]:
    return [Instance(id=f"i{k}", url=f"http://127.0.0.1:{9000 + k}", service="svc")
            for k in range(n)]


def exchange(source: Any, headers: dict[str, str] | None = None, **kw: Any) -> Exchange:
    return Exchange(request_id="r", method="GET", path=kw.pop("path", "/"),
                    query=kw.pop("query", ""), host="h", scheme="http",
                    client_ip=kw.pop("client_ip", "10.1.1.1"), headers=headers or {},
                    started=0.0, service="svc", instances=source, **kw)


def pool(spec: dict[str, Any], clock: Clock | None = None, seed: int = 1,
         events: list[Any] | None = None) -> Pool:
    return Pool("p", PoolSpec.model_validate({"service": "svc", **spec}), False, 50.0,
                b"k" * 32, clock or Clock(), random.Random(seed),
                (lambda kind, data: events.append((kind, data))) if events is not None
                else None)


def run(p: Pool, source: Any, count: int, **kw: Any) -> Counter[str]:
    """``count`` requests, each released before the next."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        e = exchange(source, **kw)
        chosen = p.select(e, source)
        assert chosen is not None
        seen[chosen.id] += 1
        p.release(e.attributes["loadbalancer"])
    return seen


def test_panic_threshold_spreads_over_everyone_when_too_few_are_healthy() -> None:
    everyone = instances(10)
    events: list[Any] = []
    p = pool({"algorithm": "round_robin"}, events=events)
    healthy = Candidates(everyone[:6], everyone)  # 60% >= 50%: healthy ones only
    assert set(run(p, healthy, 60)) == {f"i{k}" for k in range(6)}
    assert events == []
    sick = Candidates(everyone[:3], everyone)  # 30% < 50%: panic
    counts = run(p, sick, 100)
    assert counts == {f"i{k}": 10 for k in range(10)}
    assert events[-1][0] == "loadbalancer_panic" and events[-1][1]["healthy"] == 3
    run(p, healthy, 1)
    assert events[-1][0] == "loadbalancer_panic_over"
    off = pool({"algorithm": "round_robin", "panic_threshold": 0})
    assert set(run(off, sick, 30)) == {"i0", "i1", "i2"}


def test_panic_retry_never_repeats_a_tried_instance() -> None:
    everyone = instances(4)
    p = pool({"algorithm": "least_request"})
    sick = Candidates(everyone[:1], everyone)
    e = exchange(sick)
    tried = []
    candidates: list[Instance] = sick
    for _ in range(4):
        chosen = p.select(e, candidates)
        assert chosen is not None and chosen.id not in tried
        tried.append(chosen.id)
        candidates = [i for i in sick if i.id not in tried] or sick
    assert sorted(tried) == ["i0", "i1", "i2", "i3"]
    assert p.select(e, candidates) is None  # every instance tried
    p.release(e.attributes["loadbalancer"])
    assert p.load.total == 0 and not p.load.counts


@pytest.mark.parametrize("algorithm", ["round_robin", "least_request", "random",
                                       "least_connections", "weighted_round_robin"])
def test_slow_start_ramps_a_new_instance(algorithm: str) -> None:
    """A new instance's share is its ramp factor times a full share: with 4 instances
    and a 60 s linear window (minimum 10%), 25% x factor within 2.5 points."""
    clock = Clock()
    p = pool({"algorithm": algorithm, "slow_start": {"window": "60s"}}, clock, seed=3)
    first = instances(3)
    run(p, first, 3)  # the first list seen is warm: no ramp at startup
    assert not p.ramping
    grown = instances(4)  # i3 joins (a new list object, as the registry makes)
    for elapsed, factor in [(0, 0.1), (15, 0.25), (30, 0.5), (45, 0.75), (60, 1.0)]:
        clock.now = 1000.0 + elapsed
        share = run(p, grown, 8000)["i3"] / 8000
        assert abs(share - 0.25 * factor) < 0.025, (elapsed, share)
    assert not p.ramping  # done ramping: forgotten


def test_slow_start_aggression_and_minimum() -> None:
    p = pool({"algorithm": "random", "slow_start": {"window": "100s", "aggression": 2.0,
                                                   "min_weight_percent": 20}})
    assert p.ramp_factor(0) == 0.2
    assert p.ramp_factor(25) == pytest.approx(0.5)  # (0.25) ** (1/2)
    assert p.ramp_factor(100) == 1.0


def test_instance_back_from_unhealthy_ramps_again() -> None:
    clock = Clock()
    p = pool({"algorithm": "round_robin", "slow_start": {"window": "10s"}}, clock)
    everyone = instances(3)
    run(p, Candidates(everyone, everyone), 3)
    run(p, Candidates(everyone[:2], everyone), 3)
    run(p, Candidates(list(everyone), everyone), 1)
    assert set(p.ramping) == {"i2"}


@pytest.mark.parametrize(("hash_key", "kw", "same"), [
    ("header:x-user", {"headers": {"x-user": "alice"}}, True),
    ("cookie:sid", {"headers": {"cookie": "a=1; sid=abc; b=2"}}, True),
    ("query:user", {"query": "x=1&user=bob"}, True),
    ("path", {"path": "/carts/42"}, True),
    ("ip", {"client_ip": "192.0.2.7"}, True),
    ("subject", {"identity": {"sub": "u-1"}}, True),
    ("header:x-user", {}, False),  # missing, fallback random: spread
])
def test_hash_keys_pin_a_key_to_one_instance(hash_key: str, kw: dict[str, Any],
                                             same: bool) -> None:
    for algorithm in ("ring_hash", "maglev"):
        p = pool({"algorithm": algorithm, "hash_key": hash_key})
        counts = run(p, instances(8), 40, **kw)
        assert (len(counts) == 1) is same, (algorithm, counts)


def test_missing_hash_key_uses_the_fallback_source() -> None:
    p = pool({"algorithm": "maglev", "hash_key": "header:x-user", "hash_fallback": "ip"})
    assert len(run(p, instances(8), 30, client_ip="198.51.100.9")) == 1
    assert len(run(p, instances(8), 30, client_ip="198.51.100.9",
                   headers={"x-user": "carol"})) == 1


def test_affinity_cookie_pins_and_a_forged_one_is_replaced() -> None:
    p = pool({"algorithm": "round_robin", "affinity": {"cookie": "lb"}})
    source = instances(5)
    first = exchange(source)
    chosen = p.select(first, source)
    assert chosen is not None
    (name, value), = first.response_headers
    assert name == "set-cookie" and value.startswith("lb=") and "HttpOnly" in value
    token = value.split(";")[0][3:]
    for _ in range(10):
        again = exchange(source, headers={"cookie": f"x=1; lb={token}"})
        assert p.select(again, source) is chosen
        assert again.response_headers == []  # already holds the right cookie
    forged = exchange(source, headers={"cookie": "lb=" + p.token("i4")[:-2] + "AA"})
    p.select(forged, source)
    assert forged.response_headers and forged.response_headers[0][0] == "set-cookie"
    other = Pool("p", p.spec, False, 50.0, b"z" * 32, Clock(), random.Random(1))
    assert other.token("i1") != p.token("i1")  # another key: another token


def test_affinity_moves_when_its_instance_leaves_and_on_failover() -> None:
    p = pool({"algorithm": "round_robin", "affinity": {}})
    source = instances(3)
    pinned = p.token("i1")
    e = exchange(source, headers={"cookie": f"lucid_affinity={pinned}"})
    assert p.select(e, source).id == "i1"  # type: ignore[union-attr]
    rest = [i for i in source if i.id != "i1"]
    assert p.select(e, rest).id != "i1"  # type: ignore[union-attr]  # failover
    assert len(e.response_headers) == 1 and p.token("i1") not in e.response_headers[0][1]
    shrunk = [source[0], source[2]]  # i1 left the candidates
    moved = exchange(shrunk, headers={"cookie": f"lucid_affinity={pinned}"})
    assert p.select(moved, shrunk).id != "i1"  # type: ignore[union-attr]
    assert moved.response_headers


def test_cookie_and_query_parsing() -> None:
    assert cookie_value("a=1; b=2", "b") == "2"
    assert cookie_value("ab=1", "b") is None
    assert cookie_value(None, "b") is None
    assert query_value("a=1&b=x%20y", "b") == "x y"
    assert query_value("ab=1", "b") is None


@pytest.mark.parametrize(("spec", "field"), [
    ({"algorithm": "fastest"}, "algorithm"),
    ({"instances": [{"url": "http://127.0.0.1:1", "weight": 0}]}, "instances.0.weight"),
    ({"instances": [{"url": "http://127.0.0.1:1", "weight": -2}]}, "instances.0.weight"),
    ({"instances": []}, "instances"),
    ({"algorithm": "maglev", "hash_key": "header"}, "hash_key"),
    ({"algorithm": "maglev", "hash_key": "body:x"}, "hash_key"),
    ({"algorithm": "maglev", "hash_fallback": "nothing"}, "hash_fallback"),
    ({"algorithm": "maglev", "table_size": 65536}, "table_size"),
    ({"algorithm": "round_robin", "hash_key": "ip"}, ""),
    ({"algorithm": "ring_hash", "slow_start": {"window": "10s"}}, ""),
    ({"instances": [{"url": "ftp://x"}]}, "instances.0.url"),
])
def test_bad_pool_specs_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        PoolSpec.model_validate({"service": "svc", **spec})
    locations = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert field in locations, locations


def test_two_pools_for_one_service_are_refused() -> None:
    with pytest.raises(ValidationError, match="both balance service"):
        LoadBalancerConfig.model_validate({"pools": {"a": {"service": "s"},
                                                     "b": {"service": "s"}}})


@pytest.mark.parametrize("algorithm", ["round_robin", "weighted_round_robin",
                                       "least_connections", "least_request", "random"])
@pytest.mark.parametrize("weights", [[1], [1, 1, 1], [1, 3, 2, 1]])
def test_the_plugins_inline_pick_is_pool_select(algorithm: str, weights: list[int]) -> None:
    """The selection and observation hooks answer a first attempt themselves; they pick
    and count exactly as Pool.select and Pool.release, retries and overlapping requests
    included."""
    from lucid_loadbalancer import Entry, LoadBalancerPlugin, Plan

    spec = PoolSpec.model_validate({"service": "svc", "algorithm": algorithm})
    plugin = LoadBalancerPlugin(clock=Clock(), rng=random.Random(3))
    plugin.adopt(Plan(LoadBalancerConfig(), (Entry("p", spec, True),)))
    reference = Pool("p", spec, True, 50.0, None, Clock(), random.Random(3))
    source = [Instance(id=f"i{k}", url=f"http://127.0.0.1:{9000 + k}", service="svc",
                       weight=w) for k, w in enumerate(weights)]
    rng = random.Random(11)
    open_: list[tuple[Exchange, Exchange]] = []
    for _ in range(400):
        mine, theirs = exchange(source), exchange(source)
        got = plugin.lucid_select_instance(mine, source)
        want = reference.select(theirs, source)
        assert got is not None and want is not None and got.id == want.id
        if rng.random() < 0.2:  # a retry: the second attempt goes through Pool.select
            got = plugin.lucid_select_instance(mine, source)
            want = reference.select(theirs, source)
            assert (got and got.id) == (want and want.id)
        open_.append((mine, theirs))
        while open_ and rng.random() < 0.6:
            mine, theirs = open_.pop(rng.randrange(len(open_)))
            plugin.lucid_observe_exchange(mine)
            plugin.lucid_observe_exchange(mine)  # a second release changes nothing
            reference.release(theirs.attributes["loadbalancer"])
        pool = plugin.pools["p"]
        assert pool.load.counts == reference.load.counts
        assert pool.load.total == reference.load.total
        assert pool.picks == reference.picks
    assert pool.status(source) == reference.status(source)
