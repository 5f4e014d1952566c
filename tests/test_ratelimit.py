"""Token buckets per client address: burst, refill, Retry-After, and the table's bound."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.ratelimit import TokenBuckets


def test_a_burst_then_one_token_per_interval() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3, max_addresses=10)
    assert [buckets.take("a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 100.0) == pytest.approx(0.5)
    assert buckets.take("a", 100.25) == pytest.approx(0.25)  # a refusal spends nothing
    assert buckets.take("a", 100.5) == 0.0
    assert buckets.take("a", 100.5) == pytest.approx(0.5)


def test_a_quiet_address_refills_to_the_burst_and_no_more() -> None:
    buckets = TokenBuckets(rate=1.0, burst=2, max_addresses=10)
    buckets.take("a", 0.0)
    buckets.take("a", 0.0)
    # An hour later: two tokens, not 3,600.
    assert [buckets.take("a", 3600.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_addresses_have_their_own_buckets() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, max_addresses=10)
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) > 0
    assert buckets.take("b", 0.0) == 0.0


def test_the_table_forgets_the_address_seen_longest_ago() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, max_addresses=3)
    for key in ("a", "b", "c"):
        buckets.take(key, 0.0)
    assert buckets.take("a", 0.0) > 0  # refused, but seen: now the most recent
    buckets.take("d", 0.0)  # forgets b
    assert len(buckets) == 3
    assert buckets.take("a", 0.0) > 0 and buckets.take("c", 0.0) > 0 and buckets.take("d", 0.0) > 0
    assert buckets.take("b", 0.0) == 0.0  # forgotten, so a full bucket again


@given(
    keys=st.lists(st.integers(0, 50).map(str), max_size=300),
    max_addresses=st.integers(1, 20),
    burst=st.integers(1, 5),
)
def test_property_the_table_never_exceeds_its_bound_nor_grants_more_than_the_rate(
    keys: list[str], max_addresses: int, burst: int
) -> None:
    rate = 10.0
    buckets = TokenBuckets(rate=rate, burst=burst, max_addresses=max_addresses)
    granted: dict[str, int] = {}
    for i, key in enumerate(keys):
        now = i * 0.01
        if buckets.take(key, now) == 0.0:
            granted[key] = granted.get(key, 0) + 1
        assert len(buckets) <= max_addresses
    duration = len(keys) * 0.01
    if len({*keys}) <= max_addresses:
        # Nothing was ever forgotten: no key got more than its burst and its rate allow.
        assert all(count <= burst + rate * duration + 1e-9 for count in granted.values())
