"""Tests of wsgate.hashring: determinism, balance, minimal disruption, skip == remove,
weights, bounded loads.

The 100,000-key checks share their rings and lookups through cached helpers, so each
ring is built and each key looked up once per run.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgate import hashring
from wsgate.hashring import HashRing, backend_points, capacity, stable_hash

BACKENDS = ["ws://10.0.0.1:8000", "ws://10.0.0.2:8000", "ws://10.0.0.3:8000"]
TEN = [f"ws://10.0.0.{i}:8000" for i in range(1, 11)]
KEY_COUNT = 100_000


def keys(count: int) -> list[bytes]:
    """Client-address-like keys, as the server passes them."""
    return [f"198.51.{i // 256}.{i % 256}".encode() for i in range(count)]


@functools.cache
def random_keys() -> tuple[bytes, ...]:
    rng = random.Random(6455)
    return tuple(rng.randbytes(16) for _ in range(KEY_COUNT))


@functools.cache
def ring(identities: tuple[str, ...], weights: tuple[int, ...] | None = None) -> HashRing:
    return HashRing(identities, weights)


@functools.cache
def owners(
    identities: tuple[str, ...], weights: tuple[int, ...] | None = None, count: int = KEY_COUNT
) -> tuple[str, ...]:
    """The first-choice identity of each of the first `count` random keys."""
    built = ring(identities, weights)
    picks = (built.pick(key) for key in random_keys()[:count])
    return tuple(identities[index] for index in picks)  # type: ignore[index]


def reference_order(
    identities: list[str], weights: list[int], key: bytes, points: int
) -> list[int]:
    """order(key) from the definition: nearest point either way round, over weight."""
    mask = (1 << 64) - 1
    position = stable_hash(key) & hashring._POSITION
    ranks = {identity: rank for rank, identity in enumerate(sorted(identities))}
    scores = []
    for index, (identity, weight) in enumerate(zip(identities, weights, strict=True)):
        distance = min(
            min((p - position) & mask, (position - p) & mask)
            for p in backend_points(identity, points)
        )
        scores.append((distance / weight, ranks[identity], index))
    return [index for *_, index in sorted(scores)]


# -- the stable hash --------------------------------------------------------------


def test_stable_hash_is_deterministic() -> None:
    assert stable_hash(b"wsgate") == stable_hash(b"wsgate")
    assert stable_hash(b"wsgate") != stable_hash(b"wsgatf")
    assert 0 <= stable_hash(b"wsgate") < 1 << 64


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Computed once; a change here moves clients between backends on upgrade.
        (b"wsgate", 13878770725050356688),
        (b"", 16476032584258269876),
    ],
)
def test_stable_hash_known_values(data: bytes, expected: int) -> None:
    assert stable_hash(data) == expected


def test_backend_points_known_values() -> None:
    # Computed once, like the hashes above.
    assert backend_points("ws://10.0.0.1:8000", 2) == [2641442977784922112, 5016842627397058560]


def test_backend_points_are_a_prefix_stable_stream() -> None:
    few, more = backend_points("a", 5), backend_points("a", 50)
    assert more[:5] == few
    assert all(p % (1 << 16) == 0 and 0 <= p < 1 << 64 for p in more)
    assert len(set(more)) == 50


# -- orders -----------------------------------------------------------------------


def test_known_order() -> None:
    # Computed once, like the hashes above.
    assert list(HashRing(BACKENDS).order(b"192.0.2.7")) == [1, 0, 2]
    assert [HashRing(BACKENDS).pick(key) for key in keys(8)] == [1, 2, 0, 1, 0, 2, 0, 0]


@pytest.mark.parametrize(
    "weights",
    [None, [1, 1, 1, 1, 1], [1, 2, 3, 4, 1000], [1, 2, 3, 5, 8], [2, 3, 3, 1000, 999]],
)
def test_order_is_a_permutation(weights: list[int] | None) -> None:
    built = HashRing(["a", "b", "c", "d", "e"], weights)
    assert len(built) == 5
    for key in keys(200):
        order = list(built.order(key))
        assert sorted(order) == [0, 1, 2, 3, 4]
        assert built.pick(key) == order[0]


@pytest.mark.parametrize(
    "weights", [[1, 1, 1, 1, 1], [1, 2, 3, 4, 1000], [1, 2, 3, 5, 8, 13, 21, 34]]
)
def test_order_matches_the_definition(weights: list[int]) -> None:
    names = [f"b{i}" for i in range(len(weights))]
    built = HashRing(names, weights, points_per_backend=16)
    for key in keys(100):
        assert list(built.order(key)) == reference_order(names, weights, key, 16)


def test_list_order_does_not_matter() -> None:
    weights = [1, 2, 3, 4, 5, 6]
    names = [f"ws://backend-{i}:8000" for i in range(6)]
    forward = HashRing(names, weights)
    backward = HashRing(names[::-1], weights[::-1])
    for key in keys(300):
        backward_names = [names[::-1][i] for i in backward.order(key)]
        assert [names[i] for i in forward.order(key)] == backward_names


def test_same_key_same_order() -> None:
    built = HashRing(BACKENDS)
    again = HashRing(list(BACKENDS))
    for key in keys(200):
        assert list(built.order(key)) == list(built.order(key)) == list(again.order(key))


def test_order_is_lazy() -> None:
    built = ring(tuple(TEN))
    order = built.order(b"key")
    assert next(order) == built.pick(b"key")
    assert len([next(order) for _ in range(9)]) == 9
    assert next(order, None) is None


def test_single_backend() -> None:
    built = HashRing(["only"], points_per_backend=1)
    assert all(list(built.order(key)) == [0] and built.pick(key) == 0 for key in keys(20))
    assert built.pick(b"k", skip={0}) is None


def test_empty_ring() -> None:
    empty = HashRing([])
    assert len(empty) == 0
    assert list(empty.order(b"k")) == []
    assert empty.pick(b"k") is None
    assert empty.pick(b"k", loads=[], balance_factor=1.25) is None


@pytest.mark.parametrize(
    ("identities", "weights", "points", "message"),
    [
        (["a", "b"], [1], 8, "2 identities but 1 weights"),
        (["a", "a"], None, 8, "unique"),
        (["a"], [0], 8, "positive integers"),
        (["a"], [-1], 8, "positive integers"),
        (["a"], [1.5], 8, "positive integers"),
        (["a"], [True], 8, "positive integers"),
        (["a"], None, 0, "points_per_backend"),
    ],
)
def test_bad_arguments(
    identities: list[str], weights: list | None, points: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        HashRing(identities, weights, points_per_backend=points)


@pytest.mark.parametrize("forced", [0, 1, 1 << 63, (1 << 64) - 2048, (1 << 64) - 1])
def test_order_survives_extreme_hashes(monkeypatch: pytest.MonkeyPatch, forced: int) -> None:
    monkeypatch.setattr(hashring, "stable_hash", lambda data: forced)
    for weights in ([1, 1, 1], [1, 2, 3]):
        built = HashRing(BACKENDS, weights, points_per_backend=3)
        assert sorted(built.order(b"key")) == [0, 1, 2]
        assert built.pick(b"key") == next(built.order(b"key"))


@pytest.mark.parametrize("listed", [["a", "b"], ["b", "a"]])
@pytest.mark.parametrize("weights", [(1, 1), (5, 5), (1, 1000)])
def test_equal_scores_go_to_the_identity_sorting_first(
    monkeypatch: pytest.MonkeyPatch, listed: list[str], weights: tuple[int, int]
) -> None:
    # "a" 1000 units before the key, "b" after it at the same distance over weight.
    unit = 1 << 16
    light, heavy = weights
    places = {"a": 5000 * unit, "b": (6000 + 1000 * heavy // light) * unit}
    monkeypatch.setattr(hashring, "_point_stream", lambda identity, count: places[identity])
    monkeypatch.setattr(hashring, "stable_hash", lambda data: 6000 * unit)
    listed_weights = [light if name == "a" else heavy for name in listed]
    built = HashRing(listed, listed_weights, points_per_backend=1)
    assert [listed[i] for i in built.order(b"k")] == ["a", "b"]
    assert listed[built.pick(b"k")] == "a"  # type: ignore[index]


# -- determinism across processes -------------------------------------------------

_CHILD = """
import json, sys
from wsgate.hashring import HashRing
backends, weights, count = json.loads(sys.argv[1])
ring = HashRing(backends, weights)
keys = [f"198.51.{i // 256}.{i % 256}".encode() for i in range(count)]
print(json.dumps([list(ring.order(key))[:3] for key in keys]))
"""


def test_deterministic_across_processes() -> None:
    weights = [1, 2, 3]
    built = HashRing(BACKENDS, weights)
    here = [list(built.order(key))[:3] for key in keys(200)]
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([BACKENDS, weights, 200])],
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        check=True,
        text=True,
        timeout=30,
    )
    assert json.loads(child.stdout) == here
    assert {order[0] for order in here} == {0, 1, 2}  # the comparison covers every backend


# -- balance, disruption, weights over 100,000 random keys ------------------------


def test_balance_of_ten_equal_backends() -> None:
    loads = Counter(owners(tuple(TEN)))
    assert len(loads) == 10
    assert max(loads.values()) / (KEY_COUNT / 10) <= 1.10


def test_removing_a_backend_moves_only_its_keys() -> None:
    gone = TEN[3]
    rest = tuple(name for name in TEN if name != gone)
    before, after = owners(tuple(TEN)), owners(rest)
    full = ring(tuple(TEN))
    moved = 0
    for key, old, new in zip(random_keys(), before, after, strict=True):
        if old == gone:
            moved += 1
            # Its keys go to their second choice, as a retry skipping it would.
            order = full.order(key)
            next(order)
            assert new == TEN[next(order)]
        else:
            assert new == old
    assert moved == Counter(before)[gone] > 0


def test_adding_a_backend_moves_keys_only_to_it() -> None:
    new_name = "ws://10.0.0.11:8000"
    before, after = owners(tuple(TEN)), owners((*TEN, new_name))
    moved = 0
    for old, new in zip(before, after, strict=True):
        if new != old:
            assert new == new_name
            moved += 1
    assert 0 < moved / KEY_COUNT <= 1.2 / 11


def test_weights_shift_shares_proportionally() -> None:
    names = ("w1", "w2", "w3", "w4")
    weights = (1, 2, 3, 4)
    shares = Counter(owners(names, weights, 40_000))
    for name, weight in zip(names, weights, strict=True):
        assert shares[name] / 40_000 == pytest.approx(weight / 10, rel=0.08)


def test_changing_one_weight_moves_keys_only_to_or_from_it() -> None:
    names = ("w1", "w2", "w3", "w4")
    before = owners(names, (1, 2, 3, 4), 40_000)
    after = owners(names, (1, 2, 6, 4), 40_000)
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert changed and all(new == "w3" for _, new in changed)
    assert Counter(after)["w3"] / 40_000 == pytest.approx(6 / 13, rel=0.08)


@pytest.mark.parametrize("weights", [None, (1, 1, 2, 2, 3, 3, 5, 8, 13, 1000)])
def test_skipping_equals_rebuilding_without(weights: tuple[int, ...] | None) -> None:
    full = ring(tuple(TEN), weights)
    for gone in (0, 4, 9):
        rest = [name for i, name in enumerate(TEN) if i != gone]
        rest_weights = None if weights is None else [w for i, w in enumerate(weights) if i != gone]
        without = HashRing(rest, rest_weights)
        for key in random_keys()[:2000]:
            skipped = full.pick(key, skip={gone})
            assert skipped == next(i for i in full.order(key) if i != gone)
            assert TEN[skipped] == rest[without.pick(key)]  # type: ignore[index]


def test_skip_of_everyone_is_none() -> None:
    full = ring(tuple(TEN))
    assert full.pick(b"k", skip=set(range(10))) is None
    assert full.pick(b"k", skip=range(10)) is None
    assert full.pick(b"k", loads=[0] * 10, balance_factor=1.5, skip=frozenset(range(10))) is None
    assert full.pick(b"k", skip=set(range(9))) == 9


# -- bounded loads ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("total_load", "weight", "total_weight", "factor", "expected"),
    [
        (0, 1, 10, 1.25, 1),  # never below one
        (79, 1, 10, 1.25, 10),  # exactly 10, no rounding up
        (80, 1, 10, 1.25, 11),
        (99, 1, 10, 1.25, 13),
        (9, 1, 1, 1.1, 11),  # 1.1 is 11/10, not the float just above it
        (9, 3, 6, 1.0, 5),
        (999, 2, 3, 1.0, 667),
        (10**12, 1, 3, 1.25, 416_666_666_668),
    ],
)
def test_capacity(
    total_load: int, weight: int, total_weight: int, factor: float, expected: int
) -> None:
    assert capacity(total_load, weight, total_weight, factor) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"balance_factor": 1.25}, "needs loads"),
        ({"balance_factor": 0.9, "loads": [0, 0, 0]}, "at least 1"),
        ({"balance_factor": 1.25, "loads": [0, 0]}, "2 loads for 3 backends"),
    ],
)
def test_bad_bounded_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HashRing(BACKENDS, points_per_backend=4).pick(b"k", **kwargs)


@pytest.mark.parametrize(
    ("weights", "arrivals"), [(None, 20_000), ((1, 1, 1, 1, 2, 2, 2, 3, 3, 4), 10_000)]
)
def test_bounded_loads_are_never_exceeded(weights: tuple[int, ...] | None, arrivals: int) -> None:
    """Arrivals, 30% of them on one hot key, connections never closing."""
    built = ring(tuple(TEN), weights)
    total_weight = sum(weights or [1] * 10)
    rng = random.Random(1)
    hot = b"hot-room"
    loads = [0] * 10
    overflowed = 0
    for arrival in range(arrivals):
        key = hot if rng.random() < 0.3 else rng.randbytes(8)
        chosen = built.pick(key, loads=loads, balance_factor=1.25)
        first = built.pick(key)
        assert chosen is not None
        limits = [capacity(arrival, built.weights[i], total_weight, 1.25) for i in range(10)]
        if loads[first] < limits[first]:  # type: ignore[index]
            assert chosen == first  # a key whose first choice has room keeps it
        else:
            overflowed += 1
            assert chosen == next(i for i in built.order(key) if loads[i] < limits[i])
        loads[chosen] += 1
        # After the arrival, every backend is within the bound for the new total.
        assert all(load <= limit for load, limit in zip(loads, limits, strict=True))
    assert overflowed > arrivals // 20  # the hot key did spill over
    assert max(load / limit for load, limit in zip(loads, limits, strict=True)) > 0.95


def test_bounded_loads_with_departures_and_skips() -> None:
    """Connections come and go and one backend is down: each arrival lands within
    the bound computed at that moment, never on the skipped backend."""
    built = ring(tuple(TEN))
    rng = random.Random(2)
    loads = [0] * 10
    open_connections: list[int] = []
    down = {7}
    for _ in range(20_000):
        if open_connections and rng.random() < 0.45:
            loads[open_connections.pop(rng.randrange(len(open_connections)))] -= 1
            continue
        key = b"hot" if rng.random() < 0.3 else rng.randbytes(8)
        chosen = built.pick(key, loads=loads, balance_factor=1.25, skip=down)
        assert chosen is not None and chosen not in down
        total = sum(loads) - loads[7]
        assert loads[chosen] + 1 <= capacity(total, 1, 9, 1.25)
        loads[chosen] += 1
        open_connections.append(chosen)
    assert loads[7] == 0


# -- properties -------------------------------------------------------------------

identity_sets = st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=12, unique=True)


@settings(deadline=None)  # max_examples from the HYPOTHESIS_PROFILE loaded in conftest
@given(
    identities=identity_sets,
    data=st.data(),
    points=st.integers(1, 8),
    key=st.binary(max_size=12),
)
def test_property_order_skip_and_rebuild(
    identities: list[str], data: st.DataObject, points: int, key: bytes
) -> None:
    n = len(identities)
    weight = st.sampled_from([1, 1, 2, 3, 7, 64, 1000])
    weights = data.draw(st.lists(weight, min_size=n, max_size=n))
    skip = data.draw(st.sets(st.integers(0, n - 1)))
    built = HashRing(identities, weights, points_per_backend=points)
    order = list(built.order(key))
    assert sorted(order) == list(range(n))
    assert order == reference_order(identities, weights, key, points)
    expected = next((i for i in order if i not in skip), None)
    assert built.pick(key, skip=skip) == expected
    kept = [i for i in range(n) if i not in skip]
    without = HashRing(
        [identities[i] for i in kept], [weights[i] for i in kept], points_per_backend=points
    )
    rebuilt = without.pick(key)
    assert (None if rebuilt is None else kept[rebuilt]) == expected
    # Zero loads and any factor >= 1 change nothing.
    assert built.pick(key, skip=skip, loads=[0] * n, balance_factor=1.0) == expected
