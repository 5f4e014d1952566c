"""Tests of wsgate.health: rise/fall transitions, capped exponential ejection, jitter.

Table-driven; no event loop, no clock: every time is a number in the table.
"""

from __future__ import annotations

import random

import pytest

from wsgate.health import Backoff, RiseFall, jittered

# -- RiseFall ---------------------------------------------------------------------

# (rise, fall, start healthy, results "S"uccess/"F"ailure, what each record returns:
#  "." for None, "U" for True (came up), "D" for False (went down)).
RISE_FALL = [
    (2, 3, True, "SSSS", "...."),
    (2, 3, True, "FF", ".."),
    (2, 3, True, "FFF", "..D"),
    (2, 3, True, "FFSFFF", ".....D"),  # a success clears the failure streak
    (2, 3, True, "FFFFFF", "..D..."),  # already down: further failures say nothing
    (2, 3, True, "FFFSS", "..D.U"),
    (2, 3, True, "FFFSFSS", "..D...U"),  # a failure clears the success streak
    (2, 3, False, "S", "."),
    (2, 3, False, "SS", ".U"),
    (2, 3, False, "FFFF", "...."),
    (1, 1, True, "FSFS", "DUDU"),
    (1, 1, False, "SSFF", "U.D."),
    (3, 2, True, "FFSSSFF", ".D..U.D"),
]


@pytest.mark.parametrize(("rise", "fall", "healthy", "results", "expected"), RISE_FALL)
def test_rise_fall(rise: int, fall: int, healthy: bool, results: str, expected: str) -> None:
    counter = RiseFall(rise, fall, healthy)
    outcomes = {None: ".", True: "U", False: "D"}
    got = "".join(outcomes[counter.record(result == "S")] for result in results)
    assert got == expected
    # The verdict is the last transition, or the start.
    flips = expected.replace(".", "")
    assert counter.healthy == (flips[-1] == "U" if flips else healthy)


def test_rise_fall_a_success_starts_the_failure_count_over() -> None:
    counter = RiseFall(rise=3, fall=3)
    assert [counter.record(ok) for ok in (False, False, True, False, False)] == [None] * 5
    assert counter.healthy
    assert counter.record(False) is False
    assert "unhealthy" in repr(counter)


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 3)])
def test_rise_fall_rejects_counts_below_one(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RiseFall(rise, fall)


# -- Backoff ----------------------------------------------------------------------

# (base, cap, events, expected): events are ("eject", now) or ("reset", now); eject
# expects the returned end of the ejection.
BACKOFF = [
    pytest.param(1.0, 30.0, [("eject", 0.0)], [1.0], id="first-ejection-is-base"),
    pytest.param(
        1.0,
        30.0,
        [("eject", 0.0), ("eject", 10.0), ("eject", 20.0), ("eject", 30.0)],
        [1.0, 12.0, 24.0, 38.0],
        id="doubles",
    ),
    pytest.param(
        1.0,
        5.0,
        [("eject", 0.0), ("eject", 10.0), ("eject", 20.0), ("eject", 30.0), ("eject", 40.0)],
        [1.0, 12.0, 24.0, 35.0, 45.0],
        id="capped",
    ),
    pytest.param(
        1.0,
        30.0,
        [("eject", 0.0), ("eject", 10.0), ("reset", 11.0), ("eject", 20.0)],
        [1.0, 12.0, None, 21.0],
        id="reset-starts-over",
    ),
    pytest.param(
        10.0,
        30.0,
        [("eject", 0.0), ("eject", 1.0)],
        [10.0, 21.0],
        id="re-eject-while-ejected-extends",
    ),
    pytest.param(3.0, 3.0, [("eject", 0.0), ("eject", 5.0)], [3.0, 8.0], id="base-equals-cap"),
]


@pytest.mark.parametrize(("base", "cap", "events", "expected"), BACKOFF)
def test_backoff(base: float, cap: float, events: list[tuple[str, float]], expected: list) -> None:
    backoff = Backoff(base, cap)
    got: list = []
    for action, now in events:
        if action == "eject":
            got.append(backoff.eject(now))
        else:
            got.append(backoff.reset())
    assert got == expected


def test_backoff_counts_and_durations() -> None:
    backoff = Backoff(0.5, 60.0)
    durations = []
    for now in range(0, 1000, 100):
        durations.append(backoff.next_duration())
        backoff.eject(float(now))
    assert durations == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    backoff.reset()
    assert backoff.next_duration() == 0.5


def test_backoff_survives_very_many_ejections() -> None:
    backoff = Backoff(1.0, 30.0)
    for now in range(5000):
        backoff.eject(float(now * 100))
    assert backoff.next_duration() == 30.0


@pytest.mark.parametrize(
    ("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (float("nan"), 1.0)]
)
def test_backoff_rejects_bad_bounds(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        Backoff(base, cap)


def test_backoff_base_above_cap_means_always_cap() -> None:
    backoff = Backoff(10.0, 5.0)
    assert [backoff.eject(now) for now in (0.0, 100.0, 200.0)] == [5.0, 105.0, 205.0]


def test_backoff_jitter_stays_within_ten_percent_and_cap() -> None:
    rng = random.Random(7)
    backoff = Backoff(1.0, 4.0)
    for now, nominal in [(0.0, 1.0), (10.0, 2.0), (20.0, 4.0), (30.0, 4.0)]:
        until = backoff.eject(now, rng)
        assert nominal * 0.9 <= until - now <= min(4.0, nominal * 1.1)


def test_backoff_jitter_is_reproducible_from_the_seed() -> None:
    def run(seed: int) -> list[float]:
        rng = random.Random(seed)
        backoff = Backoff(1.0, 100.0)
        return [backoff.eject(10.0 * i, rng) for i in range(5)]

    assert run(1) == run(1)
    assert run(1) != run(2)


# -- jitter -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("draw", "expected"),
    [(0.0, 4.5), (0.5, 5.0), (0.75, 5.25), (0.999999, 5.499999)],
)
def test_jittered_maps_the_draw_linearly(draw: float, expected: float) -> None:
    assert jittered(5.0, lambda: draw) == pytest.approx(expected)


def test_jittered_accepts_a_seeded_random() -> None:
    values = [jittered(10.0, random.Random(seed)) for seed in range(200)]
    assert all(9.0 <= value < 11.0 for value in values)
    assert len(set(values)) == 200
    assert jittered(10.0, random.Random(3)) == jittered(10.0, random.Random(3))


@pytest.mark.parametrize(("spread", "low", "high"), [(0.0, 5.0, 5.0), (0.5, 2.5, 7.5)])
def test_jittered_spread(spread: float, low: float, high: float) -> None:
    assert jittered(5.0, lambda: 0.0, spread) == low
    assert jittered(5.0, lambda: 1.0, spread) == high


@pytest.mark.parametrize("spread", [-0.1, 1.0, 2.0])
def test_jittered_rejects_bad_spread(spread: float) -> None:
    with pytest.raises(ValueError, match="spread"):
        jittered(5.0, random.Random(0), spread)
