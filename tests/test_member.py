"""A pool member's facts, each with one owner: health is its checks' verdict, the ejection's end its own."""

from __future__ import annotations

from wsgate.health import Backoff, RiseFall
from wsgate.member import Member


def member() -> Member:
    return Member("ws://10.0.0.1:8000", "10.0.0.1", 8000, 1)


def test_a_member_without_checks_is_healthy() -> None:
    m = member()
    assert m.healthy and m.available(0.0)


def test_a_members_health_is_its_checks_verdict() -> None:
    m = member()
    m.checks = RiseFall(rise=1, fall=2)
    m.checks.record(False)
    assert m.healthy
    m.checks.record(False)
    assert not m.healthy and not m.available(0.0)
    m.checks.record(True)
    assert m.healthy
    m.checks = RiseFall(rise=1, fall=1, healthy=False)
    assert not m.healthy
    m.checks = None  # a reload took the route's checks away
    assert m.healthy


def test_an_ejection_ends_when_the_member_says() -> None:
    m = member()
    m.backoff = Backoff(2.0, 30.0)
    m.ejected_until = m.backoff.eject(10.0)
    assert [m.available(now) for now in (10.0, 11.999, 12.0)] == [False, False, True]
    # A success forgets the count; the ejection under way still ends when it was to.
    m.backoff.reset()
    assert not m.available(11.0) and m.backoff.next_duration() == 2.0
