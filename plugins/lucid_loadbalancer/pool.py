"""A pool at run time: the balancer for the service's current instances, panic mode,
slow start, the affinity cookie, hash keys, and in-flight and pick counters.

The data path (:meth:`Pool.select`, :meth:`Pool.release`) touches plain dicts and
ints; everything derived from a candidate list is built once per list object and
kept until the registry (or a config change) hands over a new one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote_plus

from lucid.model import Exchange, Instance
from lucid_loadbalancer.algorithms import HASHING, Balancer, Load, factory, key_hash
from lucid_loadbalancer.config import PoolSpec, parse_key_spec

KeyOf = Callable[[Exchange], Any]
Notify = Callable[[str, dict[str, Any]], None]
SLOW_START_REDRAWS = 3


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, without parsing the rest."""
    if not header:
        return None
    prefix = name + "="
    for part in header.split(";"):
        part = part.strip()
        if part.startswith(prefix):
            return part[len(prefix):].strip('"')
    return None


def query_value(query: str, name: str) -> str | None:
    if not query:
        return None
    prefix = name + "="
    for part in query.split("&"):
        if part.startswith(prefix):
            return unquote_plus(part[len(prefix):])
        if part == name:
            return ""
    return None


def key_function(spec: str) -> KeyOf | None:
    """The function reading one hash-key source from an exchange (None: random)."""
    source, name = parse_key_spec(spec, allow_random=True)
    if source == "header":
        return lambda e: e.headers.get(name)
    if source == "cookie":
        return lambda e: cookie_value(e.headers.get("cookie"), name)
    if source == "query":
        return lambda e: query_value(e.query, name)
    if source == "ip":
        return lambda e: e.client_ip
    if source == "path":
        return lambda e: e.path
    if source == "subject":
        return lambda e: e.identity.get("sub") if e.identity else None
    return None


# What one request took from a pool, kept in ``exchange.attributes["loadbalancer"]``:
# a list (the cheapest mutable record to make per request), indexed by these.
POOL, BALANCER, INDEX, ID, TRIED, COOKIE = range(6)
Pick = list  # [pool, balancer, index, instance id, tried ids or None, set-cookie or None]
KEY_CACHE = 16384  # key -> hash, per pool: repeat clients skip the hash function


class State:
    """Everything derived from one candidate list."""

    __slots__ = ("source", "balancer", "panic", "tokens", "cookies", "healthy", "everyone",
                 "plain")

    def __init__(self, source: Sequence[Instance], balancer: Balancer, panic: bool,
                 healthy: int, everyone: int):
        self.source = source
        self.balancer = balancer
        self.panic = panic
        self.tokens: dict[str, int] = {}
        self.cookies: list[tuple[str, str]] = []
        self.healthy = healthy
        self.everyone = everyone
        # a first pick needs no hash key and no affinity cookie (set by Pool.state_for)
        self.plain = False


class Pool:
    """One pool: a service bound to an algorithm and its settings."""

    def __init__(self, pool_id: str, spec: PoolSpec, static: bool, panic_default: float,
                 secret: bytes | None, clock: Callable[[], float], rng: random.Random,
                 notify: Notify | None = None, previous: Pool | None = None):
        self.id = pool_id
        self.spec = spec
        self.static = static
        self.service = spec.service
        self.clock = clock
        self.rng = rng
        self.notify = notify
        self.algorithm = spec.algorithm
        settings: dict[str, Any] = {}
        if spec.algorithm == "ring_hash":
            settings = {"points_per_weight": spec.points_per_weight,
                        "ring_size": spec.ring_size, "factor": spec.bounded_load}
        elif spec.algorithm == "maglev":
            settings = {"table_size": spec.table_size, "factor": spec.bounded_load}
        elif spec.algorithm == "least_request":
            settings = {"choice_count": spec.choice_count}
        self.build = factory(spec.algorithm, **settings)
        self.hashing = spec.algorithm in HASHING
        self.key_of = key_function(spec.hash_key or "ip") if self.hashing else None
        self.fallback_of = key_function(spec.hash_fallback) if self.hashing else None
        threshold = spec.panic_threshold if spec.panic_threshold is not None else panic_default
        self.threshold = threshold / 100.0
        self.slow_start = spec.slow_start
        self.affinity = spec.affinity
        self.secret = secret
        self.inline: list[Instance] | None = None
        if spec.instances is not None:
            self.inline = [Instance.from_url(spec.service, i.url, weight=i.weight,
                                             **({"id": i.id} if i.id else {}))
                           for i in spec.instances]
        # Counters and slow-start memory carry over when a pool is redefined, so
        # requests in flight are released where they were counted.
        self.load: Load = Load()
        self.picks: dict[str, int] = {}
        self.seen: dict[str, float] = {}  # instance id -> when it joined the candidates
        self.ramping: dict[str, float] = {}  # instance id -> ramp start, while ramping
        self.warm = False  # instances of the first list seen start at full weight
        self.was_panic = False
        if previous is not None:
            previous.successor = self
            self.load = previous.load
            self.picks = previous.picks
            self.seen = previous.seen
            self.ramping = previous.ramping
            self.warm = previous.warm
            self.was_panic = previous.was_panic
        self.state: State | None = None
        self.key_cache: dict[Any, int] = {}
        self.successor: Pool | None = None  # the pool that replaced this one, same counters

    # building --------------------------------------------------------------
    def panics(self, source: Sequence[Instance]) -> bool:
        """Whether too small a share of ``source``'s instances is healthy (Envoy's panic
        mode): then every instance takes traffic. A plain list has no others."""
        everyone: Sequence[Instance] | None = getattr(source, "everyone", None)
        return bool(everyone) and self.threshold > 0 and (
            len(source) < self.threshold * len(everyone or ()))

    def state_for(self, source: Sequence[Instance]) -> State:
        everyone = getattr(source, "everyone", None)
        healthy, total = len(source), len(everyone) if everyone is not None else len(source)
        panic = self.panics(source)
        chosen: Sequence[Instance] = everyone if panic else source  # type: ignore[assignment]
        state = State(source, self.build(chosen, self.load, self.rng), panic, healthy, total)
        if self.affinity is not None and self.secret is not None:
            for index, instance in enumerate(state.balancer.instances):
                token = self.token(instance.id)
                state.tokens[token] = index
                state.cookies.append(("set-cookie", self._cookie(token)))
        state.plain = not self.hashing and not state.tokens
        self._track(source)
        if panic != self.was_panic:
            self.was_panic = panic
            if self.notify is not None:
                self.notify("loadbalancer_panic" if panic else "loadbalancer_panic_over", {
                    "pool": self.id, "service": self.service, "healthy": healthy,
                    "instances": total, "threshold_percent": self.threshold * 100})
        self.state = state
        return state

    def _track(self, source: Sequence[Instance]) -> None:
        """Slow start: remember when each instance joined the healthy candidates; an
        instance that joins after the first list ramps up."""
        now = self.clock()
        present = {i.id for i in source}
        for gone in [k for k in self.seen if k not in present]:
            del self.seen[gone]
            self.ramping.pop(gone, None)
        for instance_id in present:
            if instance_id not in self.seen:
                self.seen[instance_id] = now
                if self.warm and self.slow_start is not None:
                    self.ramping[instance_id] = now
        self.warm = True

    def token(self, instance_id: str) -> str:
        assert self.secret is not None
        mac = hmac.new(self.secret, f"{self.id}\n{instance_id}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode()

    def _cookie(self, token: str) -> str:
        a = self.affinity
        assert a is not None
        parts = [f"{a.cookie}={token}", f"Path={a.path}", f"SameSite={a.same_site}"]
        if a.max_age is not None:
            parts.append(f"Max-Age={int(a.max_age)}")
        if a.http_only:
            parts.append("HttpOnly")
        if a.secure or a.same_site == "None":
            parts.append("Secure")
        return "; ".join(parts)

    def ramp_factor(self, elapsed: float) -> float:
        """Envoy's slow start: the share of its weight an instance gets ``elapsed``
        seconds after joining."""
        s = self.slow_start
        assert s is not None
        if elapsed >= s.window:
            return 1.0
        time_factor = max(elapsed, 0.0) / s.window
        return max(s.min_weight_percent / 100.0, time_factor ** (1.0 / s.aggression))

    # the data path -----------------------------------------------------------
    def hash_of(self, exchange: Exchange) -> int:
        key = self.key_of(exchange) if self.key_of is not None else None
        if not key and self.fallback_of is not None:
            key = self.fallback_of(exchange)
        if not key:
            return self.rng.getrandbits(64)
        cache = self.key_cache
        h = cache.get(key)
        if h is None:
            h = key_hash(str(key))
            if len(cache) >= KEY_CACHE:
                cache.clear()
            cache[key] = h
        return h

    def select(self, exchange: Exchange, candidates: Sequence[Instance]) -> Instance | None:
        source = exchange.instances
        if source is None:
            source = candidates
        state = self.state
        if state is None or state.source is not source:
            state = self.state_for(source)
        balancer = state.balancer
        attributes = exchange.attributes
        if "loadbalancer" in attributes:
            return self._retry(exchange, state, attributes["loadbalancer"])
        h = self.hash_of(exchange) if self.hashing else 0
        index = -1
        if state.tokens:
            token = cookie_value(exchange.headers.get("cookie"), self.affinity.cookie)  # type: ignore[union-attr]
            if token is not None:
                index = state.tokens.get(token, -1)
        if index < 0:
            index = balancer.fixed
            if index < 0:
                index = balancer.pick(h)
            if self.ramping:
                index = self._ramp(balancer, index, h, None)
        instance_id = balancer.ids[index]
        pick = [self, balancer, index, instance_id, None, None]
        attributes["loadbalancer"] = pick
        load = self.load  # _charge, inline
        counts = load.counts
        counts[instance_id] = counts.get(instance_id, 0) + 1
        load.total += 1
        if balancer.tracks_release:
            balancer.charged(index)
        picks = self.picks
        picks[instance_id] = picks.get(instance_id, 0) + 1
        if state.tokens:
            self._set_cookie(exchange, state, pick, index)
        return balancer.instances[index]

    def _retry(self, exchange: Exchange, state: State, pick: Pick) -> Instance | None:
        """A retry: release the last attempt, never pick an instance tried already."""
        self.release(pick)
        tried = pick[TRIED] or []
        tried.append(pick[ID])
        balancer = state.balancer
        ids = balancer.ids
        gone = set(tried)
        avoid = {i for i, x in enumerate(ids) if x in gone}  # retries only: O(n) is fine
        h = self.hash_of(exchange) if self.hashing else 0
        index = balancer.pick_avoiding(h, avoid)
        if index is None:
            pick[TRIED] = tried
            pick[INDEX] = -1  # nothing counted: release is a no-op
            return None
        if self.ramping:
            index = self._ramp(balancer, index, h, avoid)
        instance_id = ids[index]
        pick[BALANCER], pick[INDEX], pick[ID], pick[TRIED] = balancer, index, instance_id, tried
        self._charge(balancer, index, instance_id)
        if state.tokens:
            self._set_cookie(exchange, state, pick, index)
        return balancer.instances[index]

    def _charge(self, balancer: Balancer, index: int, instance_id: str) -> None:
        load = self.load
        counts = load.counts
        counts[instance_id] = counts.get(instance_id, 0) + 1
        load.total += 1
        if balancer.tracks_release:
            balancer.charged(index)
        picks = self.picks
        picks[instance_id] = picks.get(instance_id, 0) + 1

    def _set_cookie(self, exchange: Exchange, state: State, pick: Pick, index: int) -> None:
        token = cookie_value(exchange.headers.get("cookie"), self.affinity.cookie)  # type: ignore[union-attr]
        wanted = state.cookies[index]
        if pick[COOKIE] is not None:
            try:
                exchange.response_headers.remove(pick[COOKIE])
            except ValueError:
                pass
            pick[COOKIE] = None
        if token is not None and state.tokens.get(token, -1) == index:
            return  # the client already holds the right cookie
        exchange.response_headers.append(wanted)
        pick[COOKIE] = wanted

    def _ramp(self, balancer: Balancer, index: int, h: int, avoid: set[int] | None) -> int:
        """Slow start: a ramping instance keeps a pick with probability equal to its
        ramp factor; otherwise the pick is drawn again (a few times at most)."""
        ramping, now = self.ramping, self.clock()
        for _ in range(SLOW_START_REDRAWS):
            started = ramping.get(balancer.ids[index])
            if started is None:
                return index
            factor = self.ramp_factor(now - started)
            if factor >= 1.0:
                del ramping[balancer.ids[index]]
                return index
            if self.rng.random() < factor:
                return index
            balancer.skipped(index)
            skip = {index} if avoid is None else avoid | {index}
            other = balancer.pick_avoiding(h, skip)
            if other is None:
                return index
            index = other
        return index

    def release(self, pick: Pick) -> None:
        """The request (or attempt) of ``pick`` is over: its in-flight count drops."""
        if pick[INDEX] < 0:
            return
        instance_id = pick[ID]
        load = self.load
        counts = load.counts
        left = counts.get(instance_id, 0) - 1
        if left > 0:
            counts[instance_id] = left
        else:
            counts.pop(instance_id, None)
        if load.total > 0:
            load.total -= 1
        state = self.state
        if state is not None:
            balancer = state.balancer
            if balancer.tracks_release:
                if balancer is pick[BALANCER]:
                    balancer.released(pick[INDEX])
                else:
                    index = balancer.index_of.get(instance_id)  # type: ignore[attr-defined]
                    if index is not None:
                        balancer.released(index)
        pick[INDEX] = -1  # released once, whatever calls it again

    # reading -----------------------------------------------------------------
    def status(self, source: Sequence[Instance] | None) -> dict[str, Any]:
        """Algorithm, instances with in-flight and pick counts, ejected instances.

        ``source`` is the service's candidates as they are now (healthy ones, with
        ``everyone``); None shows what the last request saw. A read never rebuilds
        the balancer: that would move a round-robin turn or a slow-start clock."""
        if source is None and self.state is not None:
            source = self.state.source
        panic = source is not None and self.panics(source)
        counts = self.load.counts
        now = self.clock()
        out: dict[str, Any] = {"id": self.id, "service": self.service,
                               "algorithm": self.algorithm,
                               "source": "static" if self.static else "api",
                               "panic": panic,
                               "in_flight": self.load.total}
        instances: list[dict[str, Any]] = []
        ejected: list[str] = []
        if source is not None:
            healthy = {i.id for i in source}
            everyone = getattr(source, "everyone", None) or list(source)
            for instance in everyone:
                row = {"id": instance.id, "url": instance.url, "weight": instance.weight,
                       "status": instance.status, "healthy": instance.id in healthy,
                       "in_flight": counts.get(instance.id, 0),
                       "picks": self.picks.get(instance.id, 0)}
                started = self.ramping.get(instance.id)
                if started is not None and self.slow_start is not None:
                    row["slow_start_factor"] = round(self.ramp_factor(now - started), 3)
                instances.append(row)
                if instance.id not in healthy:
                    ejected.append(instance.id)
        out["instances"] = instances
        out["ejected"] = ejected
        out["picks"] = sum(self.picks.values())
        return out
