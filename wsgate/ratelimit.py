"""Sans-I/O token buckets, one per client address, in a table of bounded size.

Each bucket holds up to `burst` tokens and gains `rate` tokens a second; a new
connection spends one. A bucket is kept as one number, the moment it will be
full again (the GCRA form of a token bucket): a past moment means a full bucket,
the same as an address never seen.

The table is an LRU of at most `max_addresses` entries (an OrderedDict). LRU
rather than a periodic sweep: the bound holds after every call, with no timer,
and the entry forgotten is the one seen longest ago, whose bucket has most
likely refilled already. Forgetting a bucket that is not full gives that
address a full one again: at most `burst` connections more, once, for an
address that let `max_addresses` others be seen since its last connection.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """Buckets by key; the clock is passed in, in seconds."""

    __slots__ = ("_interval", "_slack", "max_addresses", "_full_at")

    def __init__(self, rate: float, burst: int, max_addresses: int) -> None:
        assert rate > 0 and burst >= 1 and max_addresses >= 1
        self._interval = 1.0 / rate  # the time one token takes to come back
        # How far ahead of now full_at may be for one more token to be there.
        self._slack = (burst - 1) * self._interval
        self.max_addresses = max_addresses
        self._full_at: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._full_at)

    def take(self, key: str, now: float) -> float:
        """Spend one of `key`'s tokens: 0.0 when there was one, else the seconds until there is."""
        # A bucket never seen, or full again, is at `now`: the comparison is exact for it.
        full_at = max(self._full_at.get(key, now), now)
        wait = full_at - now - self._slack
        if wait > 0:
            # Refused, so nothing is spent (and only a key with an entry is ever refused);
            # seen most recently all the same, so it is the last to be forgotten.
            self._full_at.move_to_end(key)
            return wait
        self._full_at[key] = full_at + self._interval
        self._full_at.move_to_end(key)
        if len(self._full_at) > self.max_addresses:
            self._full_at.popitem(last=False)
        return 0.0
