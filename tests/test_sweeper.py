"""The sweeper's schedule, driven by explicit times: which relays it looks at, and when.

Stand-ins take the relays' place: each asks to be looked at again after a fixed
period and records when it was. The relays' own sweep (pings, timeouts) is
tested end to end in test_relay.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from wsgate.relay import MAX_RECHECK, RelaySettings, Sweeper, sweep_timing

TICK, RECHECK = 0.1, 0.5


class Visited:
    """Asks for a look `period` after each one; `None` period: never again."""

    conn_id = 0

    def __init__(self, period: float | None) -> None:
        self.period = period
        self.seen: list[float] = []

    def sweep(self, now: float, recheck: float) -> float | None:
        self.seen.append(now)
        return None if self.period is None else now + self.period


def drive(sweeper: Sweeper, until: float, start: float = 0.0) -> None:
    """Run the sweeper on every tick from `start` to `until`."""
    for step in range(1, round((until - start) / TICK) + 1):
        sweeper.run_due(start + step * TICK)


def test_each_relay_is_looked_at_when_it_asked_and_not_on_every_tick():
    sweeper = Sweeper(TICK, RECHECK)
    quiet, active = [Visited(3.0) for _ in range(100)], Visited(RECHECK)
    for relay in [*quiet, active]:
        sweeper.add(relay, 0.0)
    drive(sweeper, 10.0)
    # First look one recheck after joining, then when asked, never early, at most a tick late.
    for relay in quiet:
        assert relay.seen == pytest.approx([0.5, 3.5, 6.5, 9.5])
    assert len(active.seen) == 20
    # 100 ticks ran; a pass over every relay per tick would have been 100 looks each.
    assert sum(len(relay.seen) for relay in quiet) == 400


def test_a_look_due_between_ticks_comes_at_the_next_tick():
    sweeper = Sweeper(TICK, RECHECK)
    relay = Visited(1.05)
    sweeper.add(relay, 0.0)
    drive(sweeper, 3.0)
    for asked, seen in zip([0.5, *[t + 1.05 for t in relay.seen]], relay.seen):
        assert asked <= seen + 1e-9 < asked + TICK + 1e-9


def test_relays_that_left_or_need_no_more_looks_are_dropped():
    sweeper = Sweeper(TICK, RECHECK)
    left, done, staying = Visited(1.0), Visited(None), Visited(1.0)
    for relay in (left, done, staying):
        sweeper.add(relay, 0.0)
    sweeper.relays.discard(left)
    drive(sweeper, 5.0)
    assert left.seen == []
    assert done.seen == pytest.approx([0.5])
    assert len(staying.seen) == 5


def test_a_relay_that_left_is_not_kept_alive_until_its_slot_comes_round():
    sweeper = Sweeper(TICK, RECHECK)
    left, staying = Visited(1.0), Visited(1.0)
    for relay in (left, staying):
        sweeper.add(relay, 0.0)
    gone = weakref.ref(left)
    sweeper.relays.discard(left)
    del left
    gc.collect()
    assert gone() is None
    drive(sweeper, 2.0)
    assert staying.seen == pytest.approx([0.5, 1.5])


def test_new_timings_keep_every_relay_and_look_at_it_on_the_next_tick():
    sweeper = Sweeper(TICK, RECHECK)
    relays = [Visited(2.0) for _ in range(10)]
    for relay in relays:
        sweeper.add(relay, 0.0)
    drive(sweeper, 1.0)
    sweeper.retime(0.05, 0.2, 1.0)
    sweeper.run_due(1.05)
    assert all(relay.seen == pytest.approx([0.5, 1.05]) for relay in relays)


@pytest.mark.parametrize(
    ("interval", "timeout", "idle", "tick", "recheck"),
    [
        (30.0, 10.0, 300.0, 1.0, MAX_RECHECK),  # the defaults
        (0.0, 10.0, 0.0, 1.0, 1.0),  # nothing to notice: recheck is one tick
        (0.1, 0.1, 0.0, 0.025, 0.025),
        (8.0, 2.0, 0.0, 0.5, 2.0),
        (0.0, 10.0, 12.0, 1.0, 3.0),
    ],
)
def test_timing_follows_the_shortest_timers(interval, timeout, idle, tick, recheck):
    settings = RelaySettings(
        high_water=1, low_water=0, max_message_size=0, close_timeout=1.0,
        heartbeat_interval=interval, heartbeat_timeout=timeout, idle_timeout=idle,
    )
    assert sweep_timing(settings) == pytest.approx((tick, recheck))
