"""Sans-I/O consistent hashing: which backend serves a key, and the next ones after it.

The algorithm is a nearest-point ring with weight-scaled distances. docs/balancing.md
has the measurements behind the choice.

- Each backend puts `points_per_backend` points on a 64-bit ring. They come from
  SHAKE-256 of its identity alone, so they are the same in every process, for every
  set of backends and every list order.
- A key sits at `stable_hash(key)` on the ring. A backend's score for the key is the
  distance, either way round the ring, from the key to the backend's nearest point,
  divided by the backend's weight. `order(key)` lists the backends by score, lowest
  first. Equal scores go to the identity that sorts first.

Each score depends only on the key and that one backend's identity and weight. That
gives the three properties the gateway relies on:

- Skipping is the same as removing. The first backend in `order(key)` that is not X
  is the first choice of the same ring rebuilt without X. A health change and a
  membership change therefore agree, and failover follows `order(key)`.
- Disruption is minimal. Removing a backend moves only its own keys. Adding one moves
  keys only onto the new backend. Changing one weight moves keys only to or from
  that backend.
- Shares follow the weights. The nearest-point distance is almost exactly exponential
  with rate proportional to the number of points, so a score is exponential with
  rate proportional to the weight. The lowest score therefore falls on each backend
  with probability weight / total weight, the same argument that makes weighted
  rendezvous hashing work. Counting distance both ways round the ring halves the
  variance of the shares compared with ketama's clockwise successor.

Lookup. Backends are grouped into spans: one span per distinct weight, or, when
there are more than a few distinct weights, one span per power-of-two range of
weights. Each span's points sit in one sorted array. A lookup bisects each array and
walks outwards from the key. It stops once no point still unvisited could beat the
best score so far: that point would be at least as far away, and its weight at most
the span's maximum. When every span holds a single weight, a span's best is
whichever of the two points either side of the key is nearer.

Bounded loads (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded
Loads", 2018): `pick(..., loads=, balance_factor=c)` returns the first backend in the
key's order whose load is below `capacity(...)`, that is ceil(c * (L + 1) * w / W),
where L and W total the loads and weights of the backends that are not skipped. A key
whose first choice has room keeps it. With c >= 1 some backend always has room.

Every position is a multiple of 2**16. The low 16 bits of an array entry hold the
backend's rank in sorted-identity order, and ranks only break ties. Sorted order
between two identities does not depend on the rest of the set, so tie-breaking keeps
all of the properties above.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from fractions import Fraction
from functools import lru_cache
from bisect import bisect_left
from collections.abc import Collection, Iterator, Sequence
from heapq import heappop, heappush

__all__ = [
    "DEFAULT_POINTS",
    "MAX_BACKENDS",
    "HashRing",
    "backend_points",
    "capacity",
    "stable_hash",
]

#: Points per backend. See docs/balancing.md: 1024 keeps the max/mean load of 10
#: equal backends within about 5% of ideal. A ring of 1,000 backends takes 8 MiB.
DEFAULT_POINTS = 1024

_RANK_BITS = 16
#: The low bits of an array entry hold a rank, so this many backends fit in a ring.
MAX_BACKENDS = 1 << _RANK_BITS
_RANK = MAX_BACKENDS - 1
_M64 = (1 << 64) - 1
_POSITION = _M64 ^ _RANK
_POINT_DOMAIN = b"wsgate.hashring.points\x00"
# Up to this many distinct weights get one span each; more share power-of-two spans.
_EXACT_SPANS = 4


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _point_stream(identity: str, count: int) -> int:
    """A backend's `count` 64-bit points, as lanes of one little-endian integer."""
    digest = hashlib.shake_256(_POINT_DOMAIN + identity.encode("utf-8")).digest(8 * count)
    return int.from_bytes(digest, "little")


def backend_points(identity: str, count: int) -> list[int]:
    """The ring positions of one backend: `count` multiples of 2**16 below 2**64.

    They depend only on the identity, and a larger count only appends points: SHAKE
    output is a prefix-stable stream.
    """
    lanes = _point_stream(identity, count)
    return [(lanes >> (64 * i)) & _POSITION for i in range(count)]


@lru_cache(maxsize=64)
def _ratio(balance_factor: float) -> tuple[int, int]:
    # 1.1 means 11/10, not the binary float just above it: with 10 connections on
    # one backend the bound is 11, not 12.
    fraction = Fraction(balance_factor).limit_denominator(1_000_000)
    return fraction.numerator, fraction.denominator


def capacity(total_load: int, weight: int, total_weight: int, balance_factor: float) -> int:
    """How many connections a backend may hold once one more arrives.

    ceil(balance_factor * (total_load + 1) * weight / total_weight), in exact integer
    arithmetic, with balance_factor read as the nearest fraction whose denominator is
    at most 10**6. total_load and total_weight count only the backends that are not
    skipped. A new connection may go to a backend whose load is below this number.
    """
    if total_weight <= 0:
        raise ValueError("total_weight must be positive")
    num, den = _ratio(balance_factor)
    return -(-(num * (total_load + 1) * weight) // (den * total_weight))


class _Span:
    """The points of some backends in one sorted array, and what bounds their scores."""

    __slots__ = ("points", "weight", "max_weight", "size")

    def __init__(self, points: array, weights: set[int], size: int) -> None:
        self.points = points
        # The one weight of every backend here, or 0 when they differ.
        self.weight = next(iter(weights)) if len(weights) == 1 else 0
        self.max_weight = max(weights)
        self.size = size


def _closest(points: array, h: int) -> tuple[int, int]:
    """(distance, entry) of the point nearest to position h; equal distances, lower rank."""
    after = bisect_left(points, h)
    right = points[after] if after < len(points) else points[0]
    left = points[after - 1]
    right_d = ((right & _POSITION) - h) & _M64
    left_d = (h - (left & _POSITION)) & _M64
    if right_d < left_d or (right_d == left_d and right & _RANK < left & _RANK):
        return right_d, right
    return left_d, left


def _walk(points: array, h: int) -> Iterator[tuple[int, int]]:
    """Every (distance, rank) of a span, nearest to position h first, both ways round.

    Distances never decrease; an equal distance comes lower rank first. Past the
    last point it goes round again; the caller stops once it has seen every rank.
    """
    n = len(points)
    right = bisect_left(points, h)
    left = right - 1
    right_entry = points[right % n]
    right_d = ((right_entry & _POSITION) - h) & _M64
    left_entry = points[left % n]
    left_d = (h - (left_entry & _POSITION)) & _M64
    while True:
        if right_d < left_d or (right_d == left_d and right_entry & _RANK < left_entry & _RANK):
            yield right_d, right_entry & _RANK
            right += 1
            right_entry = points[right % n]
            right_d = ((right_entry & _POSITION) - h) & _M64
        else:
            yield left_d, left_entry & _RANK
            left -= 1
            left_entry = points[left % n]
            left_d = (h - (left_entry & _POSITION)) & _M64


class HashRing:
    """An immutable set of weighted backends that orders them for a key.

    Indexes, in and out, refer to `identities` as passed in; the mapping itself does
    not depend on their order. Identities must be unique; weights are positive ints.
    """

    __slots__ = (
        "_identities",
        "_weights",
        "_points_per_backend",
        "_index_of_rank",
        "_rank_weights",
        "_spans",
        "_uniform",
        "_total_weight",
    )

    def __init__(
        self,
        identities: Sequence[str],
        weights: Sequence[int] | None = None,
        *,
        points_per_backend: int = DEFAULT_POINTS,
    ) -> None:
        identities = tuple(identities)
        weights = (1,) * len(identities) if weights is None else tuple(weights)
        if len(weights) != len(identities):
            raise ValueError(f"{len(identities)} identities but {len(weights)} weights")
        if len(set(identities)) != len(identities):
            raise ValueError("backend identities must be unique")
        if len(identities) > MAX_BACKENDS:
            raise ValueError(f"at most {MAX_BACKENDS} backends")
        for weight in weights:
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                raise ValueError(f"weights must be positive integers, not {weight!r}")
        if points_per_backend < 1:
            raise ValueError("points_per_backend must be at least 1")
        self._identities = identities
        self._weights = weights
        self._points_per_backend = points_per_backend
        self._total_weight = sum(weights)

        by_identity = sorted(range(len(identities)), key=identities.__getitem__)
        self._index_of_rank = tuple(by_identity)
        self._rank_weights = tuple(weights[index] for index in by_identity)
        exact = len(set(weights)) <= _EXACT_SPANS
        groups: dict[int, list[int]] = {}
        for rank, weight in enumerate(self._rank_weights):
            groups.setdefault(weight if exact else weight.bit_length(), []).append(rank)
        # Mask every 64-bit lane of a point stream at once, then set its rank.
        lane_ones = int.from_bytes(
            b"\x01\x00\x00\x00\x00\x00\x00\x00" * points_per_backend, "little"
        )
        lane_mask = _POSITION * lane_ones
        spans = []
        for _, ranks in sorted(groups.items()):
            lanes = array("Q")
            for rank in ranks:
                stream = _point_stream(identities[by_identity[rank]], points_per_backend)
                stream = (stream & lane_mask) | rank * lane_ones
                lanes.frombytes(stream.to_bytes(8 * points_per_backend, "little"))
            if sys.byteorder == "big":
                lanes.byteswap()
            entries = array("Q", sorted(lanes))
            spans.append(_Span(entries, {self._rank_weights[rank] for rank in ranks}, len(ranks)))
        self._spans = tuple(spans)
        self._uniform = all(span.weight for span in spans)

    # -- introspection ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self._identities)

    def __repr__(self) -> str:
        return f"<HashRing of {len(self)} backends, {self._points_per_backend} points each>"

    @property
    def identities(self) -> tuple[str, ...]:
        return self._identities

    @property
    def weights(self) -> tuple[int, ...]:
        return self._weights

    @property
    def points_per_backend(self) -> int:
        return self._points_per_backend

    # -- lookups ---------------------------------------------------------------

    def order(self, key: bytes) -> Iterator[int]:
        """Every backend index, in the key's preference order, lazily.

        The first few cost microseconds; the whole order of 1,000 backends costs
        milliseconds, so take only what you need.
        """
        index_of_rank = self._index_of_rank
        return (index_of_rank[rank] for rank in self._ranks(stable_hash(key) & _POSITION))

    def pick(
        self,
        key: bytes,
        *,
        loads: Sequence[int] | None = None,
        balance_factor: float | None = None,
        skip: Collection[int] = frozenset(),
    ) -> int | None:
        """The first backend in `order(key)` that is not in `skip` and, given a
        balance factor, whose `loads[i]` is below its `capacity`.

        None when every backend is skipped (or the ring is empty).
        """
        if balance_factor is not None:
            if loads is None:
                raise ValueError("a balance_factor needs loads")
            if not balance_factor >= 1:
                raise ValueError(f"balance_factor must be at least 1, not {balance_factor!r}")
            if len(loads) != len(self._weights):
                raise ValueError(f"{len(loads)} loads for {len(self._weights)} backends")
        if not self._identities:
            return None
        h = stable_hash(key) & _POSITION
        totals: list[int] = []  # load and weight of the backends not skipped

        def has_room(index: int) -> bool:
            if balance_factor is None:
                return True
            if not totals:
                totals.extend(self._totals(loads, skip))  # type: ignore[arg-type]
            limit = capacity(totals[0], self._weights[index], totals[1], balance_factor)
            return loads[index] < limit  # type: ignore[index]

        if self._uniform:
            # Each span's best is its point nearest to the key.
            spans = self._spans
            distance, entry = _closest(spans[0].points, h)
            rank = entry & _RANK
            if len(spans) > 1:
                best = (distance / spans[0].weight, rank)
                for span in spans[1:]:
                    distance, entry = _closest(span.points, h)
                    best = min(best, (distance / span.weight, entry & _RANK))
                rank = best[1]
            first = self._index_of_rank[rank]
            if first not in skip and has_room(first):
                return first
        if skip and all(index in skip for index in range(len(self._identities))):
            return None
        index_of_rank = self._index_of_rank
        for rank in self._ranks(h):
            index = index_of_rank[rank]
            if index not in skip and has_room(index):
                return index
        return None

    def _totals(self, loads: Sequence[int], skip: Collection[int]) -> tuple[int, int]:
        """Total load and total weight of the backends not in `skip`."""
        total_load = sum(loads)
        total_weight = self._total_weight
        for skipped in set(skip):
            if 0 <= skipped < len(self._weights):
                total_load -= loads[skipped]
                total_weight -= self._weights[skipped]
        return total_load, total_weight

    def _ranks(self, h: int) -> Iterator[int]:
        """Ranks by score (distance / weight), lowest first, each once."""
        rank_weights = self._rank_weights
        # Per span: [next distance, its rank, walk, max weight, backends not yet seen].
        walks = []
        for span in self._spans:
            walk = _walk(span.points, h)
            distance, rank = next(walk)
            walks.append([distance, rank, walk, span.max_weight, span.size])
        seen: set[int] = set()
        scored: list[tuple[float, int]] = []
        while walks:
            # No point still unvisited scores below its span's next distance divided
            # by the span's largest weight.
            nearest = walks[0]
            bound = nearest[0] / nearest[3]
            for walk in walks:
                if walk[0] / walk[3] < bound:
                    nearest, bound = walk, walk[0] / walk[3]
            while scored and scored[0][0] < bound:
                yield heappop(scored)[1]
            distance, rank = nearest[0], nearest[1]
            if rank not in seen:
                seen.add(rank)
                heappush(scored, (distance / rank_weights[rank], rank))
                nearest[4] -= 1
                if not nearest[4]:
                    walks.remove(nearest)  # every backend of the span has its score
                    continue
            nearest[0], nearest[1] = next(nearest[2])
        while scored:
            yield heappop(scored)[1]
