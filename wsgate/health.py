"""Sans-I/O backend health: rise/fall counting, passive ejection, probe jitter.

Nothing here reads a clock or a global random generator. Callers pass the time
(`now`, float seconds from any monotonic clock) and, for jitter, a random source
they seeded themselves. The balancer owns the probes, timers and connections and
feeds results in; these objects only decide.

- `RiseFall` is an active-check verdict in HAProxy's style: `fall` consecutive
  failures take a healthy backend down, `rise` consecutive successes bring an
  unhealthy one back. A result that agrees with the current state clears the count
  toward the opposite state.
- `Backoff` is passive ejection's length. After a connect failure the backend is
  ejected for `base` seconds, and each further ejection without a success in
  between doubles the time, up to `cap`. When the current ejection ends is the
  caller's to keep (`Member.ejected_until`).
- `jittered` spreads probe intervals by +-10% so probes of many backends, or of many
  gateways, do not fire in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff", "RiseFall", "jittered"]

#: A random source: a `random.Random` the caller seeded, or a function returning
#: floats in [0, 1).
RandomSource = random.Random | Callable[[], float]


def _uniform(rng: RandomSource) -> float:
    return rng.random() if isinstance(rng, random.Random) else rng()


def jittered(interval: float, rng: RandomSource, spread: float = 0.1) -> float:
    """`interval` moved by a uniform random fraction in [-spread, +spread)."""
    if not 0 <= spread < 1:
        raise ValueError(f"spread must be in [0, 1), not {spread!r}")
    return interval * (1 + spread * (2 * _uniform(rng) - 1))


class RiseFall:
    """Counts consecutive check results and reports when the verdict flips."""

    __slots__ = ("rise", "fall", "healthy", "_streak")

    def __init__(self, rise: int, fall: int, healthy: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be at least 1, not {rise} and {fall}")
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        # Consecutive results against the current verdict.
        self._streak = 0

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "unhealthy"
        return f"<RiseFall {state}, {self._streak} of {self.fall if self.healthy else self.rise}>"

    def record(self, ok: bool) -> bool | None:
        """Count one check result; return the new health if it flipped, else None."""
        if ok == self.healthy:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < (self.fall if self.healthy else self.rise):
            return None
        self.healthy = not self.healthy
        self._streak = 0
        return self.healthy


class Backoff:
    """How long passive ejections last: capped exponential backoff.

    eject(now) returns now + min(cap, base * 2**k), where k counts the ejections
    since the last reset(). A base above the cap just means every ejection lasts `cap`.
    """

    __slots__ = ("base", "cap", "_ejections")

    def __init__(self, base: float, cap: float) -> None:
        if not (base > 0 and cap > 0):
            raise ValueError(f"base and cap must be positive, not base={base!r} cap={cap!r}")
        self.base = base
        self.cap = cap
        self._ejections = 0

    def __repr__(self) -> str:
        return f"<Backoff {self._ejections} ejections, next {self.next_duration()}s>"

    def next_duration(self) -> float:
        """How long the next ejection would last."""
        # Compare exponents rather than computing 2**k, which overflows for large k.
        if self._ejections >= 1024 or self.base * 2.0**self._ejections >= self.cap:
            return self.cap
        return self.base * 2.0**self._ejections

    def eject(self, now: float, rng: RandomSource | None = None) -> float:
        """Count an ejection starting at `now`; return the time it ends.

        Given a random source, the duration is jittered by +-10% (still at most cap).
        """
        duration = self.next_duration()
        if rng is not None:
            duration = min(self.cap, jittered(duration, rng))
        self._ejections += 1
        return now + duration

    def reset(self) -> None:
        """A success: forget past ejections, so the next one lasts `base` again."""
        self._ejections = 0
