"""Sans-I/O backend choice by a stable hash of a key.

Weighted rendezvous hashing: every backend scores the key, the highest score
wins and the rest follow in score order. The hash is blake2b, never Python's
`hash()`, so every process with the same backends agrees on every key.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

_SCALE = float(1 << 52)


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """An immutable set of weighted backends that orders them for a key."""

    __slots__ = ("_ids", "_seeds", "_weights")

    def __init__(self, identities: Sequence[str], weights: Sequence[int] | None = None) -> None:
        if weights is None:
            weights = [1] * len(identities)
        assert len(weights) == len(identities)
        self._ids = tuple(identities)
        self._seeds = tuple(identity.encode("utf-8") + b"\x00" for identity in identities)
        self._weights = tuple(float(w) for w in weights)

    def __len__(self) -> int:
        return len(self._ids)

    def order(self, key: bytes) -> list[int]:
        """Backend indexes in the key's preference order, best first."""
        scores = []
        for index, (seed, weight) in enumerate(zip(self._seeds, self._weights, strict=True)):
            # The top 52 bits plus 0.5 are exact in a float, so unit lies strictly in
            # (0, 1) and the logarithm is finite and negative. (h + 0.5) / 2**64 rounds
            # to 1.0 for the highest hashes, and log(1.0) == 0 divides by zero.
            unit = ((stable_hash(seed + key) >> 12) + 0.5) / _SCALE
            scores.append((-weight / math.log(unit), index))
        scores.sort(reverse=True)
        return [index for _, index in scores]

    def pick(self, key: bytes) -> int:
        """The index of the key's first-choice backend."""
        return self.order(key)[0]
