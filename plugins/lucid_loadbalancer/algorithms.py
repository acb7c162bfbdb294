"""The balancing algorithms, each over one fixed list of instances.

A balancer is built once per candidate list (the registry builds a new list object
whenever anything about a service changes, so a pool rebuilds only then) and answers
an *index* into that list. Every ``pick`` is O(1) or O(log n) in the number of
instances, except smooth weighted round robin, which is O(number of distinct weights).

``pick(h)``: ``h`` is the request's 64-bit key hash (hash-based balancers only).
``pick_avoiding(h, avoid)``: the same, never answering an index in ``avoid`` (the
instances this request already tried); None when nothing is left.

In-flight counts live in the pool (:class:`Load`) and outlive any one balancer, so a
rebuilt balancer starts from the true load.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import math
import random
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

from lucid.model import Instance

ALGORITHMS = ("round_robin", "weighted_round_robin", "least_connections", "least_request",
              "random", "ring_hash", "maglev")
HASHING = frozenset({"ring_hash", "maglev"})
POINTS_PER_WEIGHT = 160  # libketama's 160 positions a server (40 MD5 digests x 4)
RING_SIZE = 1 << 20  # most positions on a ring before every instance's are thinned
_RANK_BITS = 24  # an instance's rank by id, packed under its 32-bit ring position
_RANK_MASK = (1 << _RANK_BITS) - 1

_U32x4 = struct.Struct("<4I")
_U64 = struct.Struct("<Q")


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a request key (the same in every process and release:
    Python's ``hash`` is salted per process, so it cannot place keys consistently)."""
    return _U64.unpack_from(hashlib.blake2b(key.encode(), digest_size=8).digest())[0]


def ketama_points(name: str, count: int) -> Sequence[int]:
    """``count`` 32-bit ring positions for one instance, four per MD5 digest of
    ``"<name>-<n>"`` as libketama places them, in ascending order. The positions for
    ``k`` are among those for every ``count >= k``. Cached: a ring rebuilt after one
    instance joined or left hashes only that one."""
    return _ketama_points(name, count)


@functools.lru_cache(maxsize=4096)
def _ketama_points(name: str, count: int) -> array[int]:
    points = array("I")  # 4 bytes a position: 4,096 cached instances take ~2.6 MB
    n = 0
    while len(points) < count:
        points.extend(_U32x4.unpack(hashlib.md5(f"{name}-{n}".encode()).digest()))
        n += 1
    del points[count:]
    # Sorted: a ring is then the merge of one sorted run an instance, which Python's
    # sort (Timsort) does several times faster than sorting the positions shuffled.
    return array("I", sorted(points))


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


class Load:
    """A pool's requests in flight: per instance id, and in total."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.total = 0


class Balancer:
    """Shared by every algorithm: the list it balances and the pool's load counters."""

    __slots__ = ("instances", "ids", "weights", "n", "inflight", "load", "rng", "fixed")
    tracks_release = False

    def __init__(self, instances: Sequence[Instance], load: Load,
                 rng: random.Random):
        self.instances = list(instances)
        self.ids = [i.id for i in self.instances]
        self.weights = [max(1, int(i.weight)) for i in self.instances]
        self.n = len(self.instances)
        self.inflight = load.counts
        self.load = load
        self.rng = rng
        # The index every pick answers, when that is known without asking (one
        # instance, and an algorithm whose pick then changes nothing); else -1.
        self.fixed = -1

    def pick(self, h: int) -> int:
        raise NotImplementedError

    def pick_avoiding(self, h: int, avoid: set[int]) -> int | None:
        """Generic fallback: ask ``pick`` a few times, then scan what is left."""
        for _ in range(4):
            index = self.pick(h)
            if index not in avoid:
                return index
        rest = [i for i in range(self.n) if i not in avoid]
        return self.rng.choice(rest) if rest else None

    def charged(self, index: int) -> None:
        """``index`` was chosen (by a pick or an affinity cookie) and its in-flight
        count already raised."""

    def released(self, index: int) -> None:
        """A request on ``index`` finished (its in-flight count already dropped)."""

    def skipped(self, index: int) -> None:
        """Slow start passed ``index`` over: it had its turn."""


class RoundRobin(Balancer):
    """Each instance in turn, ignoring weights."""

    __slots__ = ("next",)

    def __init__(self, instances: Sequence[Instance], load: Load,
                 rng: random.Random):
        super().__init__(instances, load, rng)
        self.next = rng.randrange(self.n) if self.n else 0  # workers do not start in step
        if self.n == 1:
            self.fixed = 0

    def pick(self, h: int) -> int:
        index = self.next
        self.next = index + 1 if index + 1 < self.n else 0
        return index

    def pick_avoiding(self, h: int, avoid: set[int]) -> int | None:
        for _ in range(self.n):
            index = self.pick(h)
            if index not in avoid:
                return index
        return None


class SmoothWeighted(Balancer):
    """nginx's smooth weighted round robin, exactly: every pick adds each instance's
    weight to its current weight, takes the largest (the first on a tie) and
    subtracts the total from it. Weights 5, 1, 1 give a a b a c a a, never a burst.

    Instances of equal weight gain alike, so within one weight the largest current
    weight is the one picked least often (the first on a tie): each weight group is a
    round robin, and a pick compares one candidate per distinct weight. The current
    weight of instance i after t picks is ``t*w_i - total*picks_i``.
    """

    __slots__ = ("groups", "total", "t")

    def __init__(self, instances: Sequence[Instance], load: Load,
                 rng: random.Random):
        super().__init__(instances, load, rng)
        by_weight: dict[int, list[int]] = {}
        for index, weight in enumerate(self.weights):
            by_weight.setdefault(weight, []).append(index)
        # [weight, members, picks of the group's next member, position of next member]
        self.groups: list[list[Any]] = [[w, members, 0, 0] for w, members in by_weight.items()]
        self.total = sum(self.weights)
        self.t = 0

    def pick(self, h: int) -> int:
        self.t = t = self.t + 1
        total = self.total
        best = None
        best_value = 0
        best_index = 0
        for group in self.groups:
            index = group[1][group[3]]
            value = t * group[0] - total * group[2]
            if best is None or value > best_value or (value == best_value and index < best_index):
                best, best_value, best_index = group, value, index
        assert best is not None
        position = best[3] + 1
        if position == len(best[1]):
            best[3] = 0
            best[2] += 1
        else:
            best[3] = position
        if t == total:  # one full cycle: every current weight is back to zero
            self.t = 0
            for group in self.groups:
                group[2] = group[3] = 0
        return best_index

    def pick_avoiding(self, h: int, avoid: set[int]) -> int | None:
        if len(avoid) >= self.n:
            return None
        for _ in range(self.total):
            index = self.pick(h)
            if index not in avoid:
                return index
        return None


class WeightedRandom(Balancer):
    """Random, in proportion to weight (a binary search over cumulative weights)."""

    __slots__ = ("cumulative", "total", "uniform")

    def __init__(self, instances: Sequence[Instance], load: Load,
                 rng: random.Random):
        super().__init__(instances, load, rng)
        self.cumulative = list(accumulate(self.weights))
        self.total = self.cumulative[-1] if self.cumulative else 0
        self.uniform = len(set(self.weights)) <= 1
        if self.n == 1:
            self.fixed = 0

    def pick(self, h: int) -> int:
        if self.uniform:
            return int(self.rng.random() * self.n)
        return bisect_right(self.cumulative, self.rng.random() * self.total)


class LeastRequest(Balancer):
    """Envoy's default: ``choice_count`` instances drawn at random (in proportion to
    weight), the one with the fewest requests in flight per unit of weight wins
    (the first drawn on a tie)."""

    __slots__ = ("choices", "cumulative", "total", "uniform")

    def __init__(self, instances: Sequence[Instance], load: Load,
                 rng: random.Random, choice_count: int = 2):
        super().__init__(instances, load, rng)
        self.choices = choice_count
        # each draw is WeightedRandom's, inline
        self.cumulative = list(accumulate(self.weights))
        self.total = self.cumulative[-1] if self.cumulative else 0
        self.uniform = len(set(self.weights)) <= 1
        if self.n == 1:
            self.fixed = 0

    def pick(self, h: int) -> int:
        inflight, ids, weights, random = self.inflight, self.ids, self.weights, self.rng.random
        if self.uniform:
            n = self.n
            best = int(random() * n)
            best_load = inflight.get(ids[best], 0) / weights[best]
            for _ in range(self.choices - 1):
                other = int(random() * n)
                load = inflight.get(ids[other], 0) / weights[other]
                if load < best_load:
                    best, best_load = other, load
            return best
        cumulative, total = self.cumulative, self.total
        best = bisect_right(cumulative, random() * total)
        best_load = inflight.get(ids[best], 0) / weights[best]
        for _ in range(self.choices - 1):
            other = bisect_right(cumulative, random() * total)
            load = inflight.get(ids[other], 0) / weights[other]
            if load < best_load:
                best, best_load = other, load
        return best


class LeastConnections(Balancer):
    """The fewest requests in flight per unit of weight, exactly (nginx's least_conn),
    from a heap: O(log n) a pick. Ties go to the instance whose virtual time is
    earliest, the time advancing by 1/weight at each pick, so at equal load the
    instances take turns in proportion to their weights.

    Heap entries are ``(load, vtime, version, index)``; a newer entry for the same
    index makes older ones stale (dropped when they surface), and an entry whose load
    no longer matches the pool's counter (another balancer of the same pool, built
    before a registry change, released it) is corrected when it surfaces.
    """

    __slots__ = ("heap", "vtime", "version", "index_of")
    tracks_release = True

    def __init__(self, instances: Sequence[Instance], load: Load,
                 rng: random.Random):
        super().__init__(instances, load, rng)
        self.vtime = [0.0] * self.n
        self.version = [0] * self.n
        self.index_of = {instance_id: i for i, instance_id in enumerate(self.ids)}
        self.heap: list[tuple[float, float, int, int]] = []
        self._rebuild()

    def _rebuild(self) -> None:
        inflight, ids, weights = self.inflight, self.ids, self.weights
        self.heap = [(inflight.get(ids[i], 0) / weights[i], self.vtime[i],
                      self.version[i], i) for i in range(self.n)]
        heapq.heapify(self.heap)

    def _push(self, index: int) -> None:
        self.version[index] += 1
        if len(self.heap) > 2 * self.n + 64:
            self._rebuild()
            return
        heapq.heappush(self.heap, (
            self.inflight.get(self.ids[index], 0) / self.weights[index],
            self.vtime[index], self.version[index], index))

    def _top(self) -> int:
        heap, version, inflight, ids, weights = (self.heap, self.version, self.inflight,
                                                 self.ids, self.weights)
        while True:
            load, _, entry_version, index = heap[0]
            if entry_version != version[index]:
                heapq.heappop(heap)
            elif load != inflight.get(ids[index], 0) / weights[index]:
                heapq.heappop(heap)
                version[index] -= 1  # _push bumps it back: this entry's replacement
                self._push(index)
            else:
                return index

    def pick(self, h: int) -> int:
        return self._top()

    def charged(self, index: int) -> None:
        self.vtime[index] += 1.0 / self.weights[index]
        heap = self.heap
        if heap[0][3] == index and heap[0][2] == self.version[index]:
            # the usual case: the pick was the top entry; replace it in one sift
            self.version[index] += 1
            heapq.heapreplace(heap, (
                self.inflight.get(self.ids[index], 0) / self.weights[index],
                self.vtime[index], self.version[index], index))
        else:
            self._push(index)

    skipped = charged

    def pick_avoiding(self, h: int, avoid: set[int]) -> int | None:
        best = None
        best_key = (math.inf, math.inf)
        for i in range(self.n):
            if i not in avoid:
                key = (self.inflight.get(self.ids[i], 0) / self.weights[i], self.vtime[i])
                if key < best_key:
                    best, best_key = i, key
        return best

    def released(self, index: int) -> None:
        self._push(index)


class _Bounded(Balancer):
    """Consistent hashing with optional bounded load (Mirrokni et al.; Envoy's
    ``hash_balance_factor``): an instance already at ``factor`` x the average
    in-flight load is passed over and the key spills to the next one."""

    __slots__ = ("factor",)

    def __init__(self, instances: Sequence[Instance], load: Load,
                 rng: random.Random, factor: float | None):
        super().__init__(instances, load, rng)
        self.factor = factor

    def bound(self) -> float:
        assert self.factor is not None
        return math.ceil(self.factor * (self.load.total + 1) / self.n)

    def _walk(self, h: int, avoid: set[int] | None) -> int | None:
        """The first instance from the key's place on, skipping ``avoid`` and (with
        a load factor) instances at their bound; None when every one is skipped."""
        table, start = self._start(h)
        size = len(table)
        bound = self.bound() if self.factor is not None else None
        inflight, ids = self.inflight, self.ids
        seen: set[int] = set()
        for step in range(size):
            index = table[(start + step) % size]
            if index in seen:
                continue
            seen.add(index)
            if avoid is not None and index in avoid:
                pass
            elif bound is None or inflight.get(ids[index], 0) + 1 <= bound:
                return index
            if len(seen) == self.n:
                break
        return None

    def _start(self, h: int) -> tuple[Sequence[int], int]:
        """The table of instance indexes a key walks, and where it starts."""
        raise NotImplementedError

    def pick(self, h: int) -> int:
        index = self._primary(h)
        if self.factor is None:
            return index
        found = self._walk(h, None)
        return index if found is None else found

    def pick_avoiding(self, h: int, avoid: set[int]) -> int | None:
        return self._walk(h, avoid)

    def _primary(self, h: int) -> int:
        raise NotImplementedError


class RingHash(_Bounded):
    """Ketama consistent hashing: each instance owns ``points_per_weight x weight``
    positions on a 32-bit ring, placed by its id alone; a key goes to the first
    position at or after its hash. An instance's positions never depend on the other
    instances, so removing one moves only the keys it owned (about 1/N of them) and
    adding one takes keys only for itself, whatever the count.

    Only a ring that would exceed ``ring_size`` positions is thinned: every instance
    keeps the first half of its positions (again, until it fits), which does move
    keys between survivors; the defaults reach that at 6,553 instances of weight 1.
    Equal positions of two instances go to the smaller id, and the instances are
    ranked by id, so the ring is the same whatever order they are listed in.
    """

    __slots__ = ("hashes", "owners")

    def __init__(self, instances: Sequence[Instance], load: Load,
                 rng: random.Random, points_per_weight: int = POINTS_PER_WEIGHT,
                 ring_size: int = RING_SIZE, factor: float | None = None):
        super().__init__(instances, load, rng, factor)
        per_weight = max(1, points_per_weight)
        total = sum(self.weights)
        while per_weight > 1 and per_weight * total > ring_size:
            per_weight //= 2
        # One int per position, the rank (by id) in the low bits: sorting plain ints
        # is several times faster than sorting (point, index) tuples, and ties go to
        # the smaller id.
        order = sorted(range(self.n), key=self.ids.__getitem__)
        ring: list[int] = []
        for rank, index in enumerate(order):
            ring += [point << _RANK_BITS | rank for point in
                     ketama_points(self.ids[index], per_weight * self.weights[index])]
        ring.sort()
        self.hashes = [entry >> _RANK_BITS for entry in ring]
        self.owners = [order[entry & _RANK_MASK] for entry in ring]

    def pick(self, h: int) -> int:
        if self.factor is not None:
            return super().pick(h)
        position = bisect_left(self.hashes, h & 0xFFFFFFFF)
        owners = self.owners
        return owners[position] if position < len(owners) else owners[0]

    def _primary(self, h: int) -> int:
        position = bisect_left(self.hashes, h & 0xFFFFFFFF)
        return self.owners[position if position < len(self.owners) else 0]

    def _start(self, h: int) -> tuple[Sequence[int], int]:
        return self.owners, bisect_left(self.hashes, h & 0xFFFFFFFF)


class Maglev(_Bounded):
    """Maglev hashing (Eisenbud et al., NSDI 2016): a lookup table of ``table_size``
    (prime) entries filled by each instance's own permutation in turn, weighted the
    way Envoy does (an instance claims an entry only when its share is due). Each
    instance owns an almost equal share, and a removal moves little more than the
    removed instance's keys."""

    __slots__ = ("table", "size")

    def __init__(self, instances: Sequence[Instance], load: Load,
                 rng: random.Random, table_size: int = 65537,
                 factor: float | None = None):
        super().__init__(instances, load, rng, factor)
        self.size = table_size
        self.table = build_maglev(self.ids, self.weights, table_size)

    def pick(self, h: int) -> int:
        if self.factor is not None:
            return super().pick(h)
        return self.table[h % self.size]

    def _primary(self, h: int) -> int:
        return self.table[h % self.size]

    def _start(self, h: int) -> tuple[Sequence[int], int]:
        return self.table, h % self.size


def build_maglev(ids: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
    """The Maglev lookup table: entry -> index into ``ids``.

    Instances take their turns in the order of their ids, not of the list: the same
    membership gives the same table whatever order a registry or a config lists it in
    (so every gateway holding that membership sends a key to the same instance).
    """
    order = sorted(range(len(ids)), key=ids.__getitem__)
    ranked = _maglev_table([ids[i] for i in order], [weights[i] for i in order], size)
    return [order[rank] for rank in ranked]


def _maglev_table(ids: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
    """The table over ``ids`` in the order given: entry -> index into ``ids``."""
    n = len(ids)
    offsets: list[int] = []
    skips: list[int] = []
    for instance_id in ids:
        digest = hashlib.blake2b(instance_id.encode(), digest_size=16).digest()
        offsets.append(int.from_bytes(digest[:8], "little") % size)
        skips.append(int.from_bytes(digest[8:], "little") % (size - 1) + 1)
    table = [-1] * size
    taken = bytearray(size)  # a byte's truth is the cheapest test in the hot loop
    position = offsets[:]  # the next entry of each instance's permutation to try
    filled = 0
    top = max(weights)
    if all(w == top for w in weights):
        order = list(enumerate(skips))
        while True:
            for i, skip in order:
                c = position[i]
                while taken[c]:
                    c = (c + skip) % size
                taken[c] = 1
                table[c] = i
                position[i] = (c + skip) % size
                filled += 1
                if filled == size:
                    return table
    share = [w / top for w in weights]
    credit = [0.0] * n
    while True:
        for i in range(n):
            credit[i] += share[i]
            if credit[i] < 1.0:
                continue
            credit[i] -= 1.0
            skip = skips[i]
            c = position[i]
            while taken[c]:
                c = (c + skip) % size
            taken[c] = 1
            table[c] = i
            position[i] = (c + skip) % size
            filled += 1
            if filled == size:
                return table


def factory(algorithm: str, **settings: object) -> Callable[..., Balancer]:
    """A constructor ``(instances, inflight, rng) -> Balancer`` for one algorithm."""
    classes: dict[str, type[Balancer]] = {
        "round_robin": RoundRobin, "weighted_round_robin": SmoothWeighted,
        "least_connections": LeastConnections, "least_request": LeastRequest,
        "random": WeightedRandom, "ring_hash": RingHash, "maglev": Maglev,
    }
    cls = classes[algorithm]

    def build(instances: Sequence[Instance], load: Load,
              rng: random.Random) -> Balancer:
        return cls(instances, load, rng, **settings)  # type: ignore[call-arg]

    return build
