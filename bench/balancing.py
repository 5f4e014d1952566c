"""Micro-benchmark of consistent hashing: lookup cost, balance, disruption, memory.

    python -m bench.balancing          # the algorithm wsgate uses
    python -m bench.balancing --all    # and the alternatives it was chosen over

Prints Markdown tables (docs/balancing.md holds a copy). This is a measurement, not a
test: nothing here asserts, and the timings are specific to the machine.

For each algorithm and each of 3, 10, 100 and 1,000 equally weighted backends:

- build: time to build the structure, and the memory it keeps (tracemalloc);
- lookup: microseconds per first choice (and, for wsgate, per first choice under
  bounded loads with balance factor 1.25 and realistic loads);
- max/mean: the most loaded backend over the mean, over 100,000 random keys;
- remove / add: the fraction of keys that moved when one backend is removed or one
  is added, next to the ideal (the removed backend's share, or 1/(N+1));
- stray: the fraction of keys that moved between two backends that were there
  before and after. Minimal disruption means 0.

O(N) lookups (rendezvous) use fewer keys at large N; the keys column says how many.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import random
import statistics
import sys
import time
import tracemalloc
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence

from wsgate.hashring import HashRing, backend_points, stable_hash

SIZES = (3, 10, 100, 1000)
KEY_COUNT = 100_000
TIMED_KEYS = 20_000
_M64 = (1 << 64) - 1

Lookup = Callable[[bytes], int]


# -- the alternatives ---------------------------------------------------------------
# Each builder takes identities and weights and returns a lookup: key -> index.


def build_wsgate(points: int) -> Callable[[Sequence[str], Sequence[int]], Lookup]:
    def build(identities: Sequence[str], weights: Sequence[int]) -> Lookup:
        ring = HashRing(identities, weights, points_per_backend=points)
        return ring.pick  # type: ignore[return-value]

    return build


def build_ketama(points: int) -> Callable[[Sequence[str], Sequence[int]], Lookup]:
    """Clockwise successor on a ring of `points` x weight virtual nodes (libketama, nginx)."""

    def build(identities: Sequence[str], weights: Sequence[int]) -> Lookup:
        # Packed as wsgate packs them: position in the high 48 bits, index below.
        entries = sorted(
            p | index
            for index, (identity, weight) in enumerate(zip(identities, weights, strict=True))
            for p in backend_points(identity, points * weight)
        )
        positions = array("Q", entries)
        count = len(positions)

        def lookup(key: bytes) -> int:
            at = bisect_left(positions, stable_hash(key) & ~0xFFFF)
            return positions[at if at < count else 0] & 0xFFFF

        return lookup

    return build


def build_rendezvous(identities: Sequence[str], weights: Sequence[int]) -> Lookup:
    """Weighted highest-random-weight: score -w / ln(u) per backend, best wins."""
    seeds = [
        (identity.encode() + b"\x00", float(weight))
        for identity, weight in zip(identities, weights, strict=True)
    ]
    scale = float(1 << 52)

    def lookup(key: bytes) -> int:
        best, best_index = -1.0, 0
        for index, (seed, weight) in enumerate(seeds):
            unit = ((stable_hash(seed + key) >> 12) + 0.5) / scale
            score = -weight / math.log(unit)
            if score > best:
                best, best_index = score, index
        return best_index

    return lookup


def build_maglev(identities: Sequence[str], weights: Sequence[int], size: int = 65537) -> Lookup:
    """Maglev's lookup table (Eisenbud et al., NSDI 2016), weights as extra turns."""
    n = len(identities)
    offsets, skips = [], []
    for identity in identities:
        digest = hashlib.blake2b(identity.encode(), digest_size=16).digest()
        offsets.append(int.from_bytes(digest[:8], "big") % size)
        skips.append(int.from_bytes(digest[8:], "big") % (size - 1) + 1)
    table = [-1] * size
    nexts = [0] * n
    filled = 0
    while True:
        for index in range(n):
            for _ in range(weights[index]):
                slot = (offsets[index] + nexts[index] * skips[index]) % size
                while table[slot] >= 0:
                    nexts[index] += 1
                    slot = (offsets[index] + nexts[index] * skips[index]) % size
                table[slot] = index
                nexts[index] += 1
                filled += 1
                if filled == size:
                    entries = array("H", table)
                    return lambda key: entries[stable_hash(key) % size]


def build_multiprobe(identities: Sequence[str], weights: Sequence[int], probes: int = 21) -> Lookup:
    """Multi-probe consistent hashing (Appleton, O'Reilly 2015): one point per backend,
    the key probes 21 times, the closest clockwise successor wins. Weights ignored."""
    entries = sorted(
        (backend_points(identity, 1)[0], index) for index, identity in enumerate(identities)
    )
    positions = [p for p, _ in entries]
    owners = [index for _, index in entries]
    count = len(positions)

    def lookup(key: bytes) -> int:
        digest = hashlib.shake_128(key).digest(8 * probes)
        best, best_index = _M64 + 1, 0
        for i in range(0, 8 * probes, 8):
            h = int.from_bytes(digest[i : i + 8], "little")
            at = bisect_left(positions, h)
            at = at if at < count else 0
            distance = (positions[at] - h) & _M64
            if distance < best:
                best, best_index = distance, owners[at]
        return best_index

    return lookup


def build_jump(identities: Sequence[str], weights: Sequence[int]) -> Lookup:
    """Jump consistent hash (Lamping, Veach 2014) over the identities in sorted order.
    Only removing the last bucket is cheap; weights ignored."""
    order = sorted(range(len(identities)), key=identities.__getitem__)
    n = len(identities)

    def lookup(key: bytes) -> int:
        h = stable_hash(key)
        b, j = -1, 0
        while j < n:
            b = j
            h = (h * 2862933555777941757 + 1) & _M64
            j = int((b + 1) * (float(1 << 31) / float((h >> 33) + 1)))
        return order[b]

    return lookup


ALGORITHMS: dict[str, tuple[Callable[[Sequence[str], Sequence[int]], Lookup], int]] = {
    # name: (builder, at most this many backend evaluations per pass; 0 = all keys)
    "wsgate: nearest point, 1024 points": (build_wsgate(1024), 0),
    "nearest point, 256 points": (build_wsgate(256), 0),
    "ketama, 160 points": (build_ketama(160), 0),
    "ketama, 1024 points": (build_ketama(1024), 0),
    "rendezvous (weighted HRW)": (build_rendezvous, 1_000_000),
    "maglev, M = 65537": (build_maglev, 0),
    "multi-probe, 21 probes": (build_multiprobe, 0),
    "jump hash, sorted identities": (build_jump, 0),
}
CHOSEN = "wsgate: nearest point, 1024 points"


# -- measurements ------------------------------------------------------------------


def identities(count: int) -> list[str]:
    return [f"ws://10.0.{i // 250}.{i % 250 + 1}:8000" for i in range(count)]


def random_keys(count: int, seed: int = 6455) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(count)]


def timed_build(
    build: Callable[[Sequence[str], Sequence[int]], Lookup], names: list[str]
) -> tuple[Lookup, float, int]:
    """The lookup, the seconds its build took, and the bytes the built structure keeps."""
    weights = [1] * len(names)
    gc.collect()
    started = time.perf_counter()
    lookup = build(names, weights)
    seconds = time.perf_counter() - started
    del lookup
    gc.collect()
    # Built again under the tracer (which slows it): what is still allocated once
    # the build returns is the structure the lookup keeps.
    tracemalloc.start()
    lookup = build(names, weights)
    gc.collect()
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return lookup, seconds, memory


def per_call(function: Callable[[bytes], object], keys: Sequence[bytes], rounds: int = 3) -> float:
    """Microseconds per call: the best of `rounds` passes over a share of the keys each,
    since other processes on the machine only ever add time."""
    share = max(1, len(keys) // rounds)
    best = float("inf")
    for start in range(0, share * rounds, share):
        chunk = keys[start : start + share]
        started = time.perf_counter()
        for key in chunk:
            function(key)
        best = min(best, (time.perf_counter() - started) / len(chunk))
    return best * 1e6


def noise_floor(n: int, keys: int = KEY_COUNT, trials: int = 5) -> float:
    """max/mean of a perfectly uniform random assignment, averaged over trials."""
    rng = random.Random(n)
    results = []
    for _ in range(trials):
        counts = Counter(rng.randrange(n) for _ in range(keys))
        results.append(max(counts.values()) / (keys / n))
    return statistics.mean(results)


def measure(name: str, n: int, keys: list[bytes]) -> dict[str, str]:
    build, budget = ALGORITHMS[name]
    if budget:
        keys = keys[: max(1000, min(len(keys), budget // n))]
    names = identities(n)
    lookup, build_seconds, memory = timed_build(build, names)
    lookup_us = per_call(lookup, keys[:TIMED_KEYS] if not budget else keys[:2000])

    before = [names[lookup(key)] for key in keys]
    loads = Counter(before)
    balance = max(loads.values()) / (len(keys) / n)

    gone = names[n // 2]
    rest = [x for x in names if x != gone]
    after_remove = build(rest, [1] * len(rest))
    moved_remove = stray = 0
    for key, old in zip(keys, before, strict=True):
        new = rest[after_remove(key)]
        if new != old:
            moved_remove += 1
            stray += old != gone
    added = "ws://10.255.255.254:8000"
    more = [*names, added]
    after_add = build(more, [1] * len(more))
    moved_add = 0
    for key, old in zip(keys, before, strict=True):
        new = more[after_add(key)]
        if new != old:
            moved_add += 1
            stray += new != added

    bounded = "—"
    if name == CHOSEN:
        ring = HashRing(names)
        # Loads as after 100 connections per backend, as the balance pass left them.
        scaled = [round(loads[x] * 100 * n / len(keys)) for x in names]
        bounded_us = per_call(
            lambda key: ring.pick(key, loads=scaled, balance_factor=1.25), keys[:TIMED_KEYS]
        )
        bounded = f"{bounded_us:.1f}"
    count = len(keys)
    return {
        "N": str(n),
        "build ms": f"{build_seconds * 1000:.{0 if build_seconds >= 0.001 else 2}f}",
        "memory KiB": f"{memory / 1024:,.0f}",
        "lookup µs": f"{lookup_us:.1f}",
        "bounded µs": bounded,
        "keys": f"{count:,}",
        "max/mean": f"{balance:.3f}",
        "remove: moved (ideal)": f"{moved_remove / count:.4f} ({loads[gone] / count:.4f})",
        "add: moved (ideal)": f"{moved_add / count:.4f} ({1 / (n + 1):.4f})",
        "stray": f"{stray / count:.4f}",
    }


def table(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    # Numbers to the right, names to the left.
    align = [" --- " if c in ("ring", "weights") else " ---: " for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def exact_shares(names: list[str], points: int, both_ways: bool) -> list[float]:
    """Each backend's exact share of the ring over the mean share (equal weights).

    Clockwise (ketama) a point owns the gap before it; both ways round (wsgate) it
    owns half of the gap on each side.
    """
    entries = sorted(p | i for i, name in enumerate(names) for p in backend_points(name, points))
    shares = [0] * len(names)
    count = len(entries)
    for j, entry in enumerate(entries):
        before = (entry - entries[j - 1]) >> 16 & (_M64 >> 16)
        after = (entries[(j + 1) % count] - entry) >> 16 & (_M64 >> 16)
        shares[entry & 0xFFFF] += (before + after) / 2 if both_ways else before
    mean = sum(shares) / len(shares)
    return [share / mean for share in shares]


def ring_balance_rows(everything: bool, sets: int = 40, n: int = 10) -> list[dict[str, str]]:
    """max/mean of exact shares at N=10 over many identity sets: no key sampling noise."""
    variants = [("wsgate: nearest point", 1024, True)]
    if everything:
        variants += [
            ("nearest point", 512, True),
            ("nearest point", 256, True),
            ("ketama", 1024, False),
            ("ketama", 160, False),
        ]
    rows = []
    for label, points, both_ways in variants:
        worst = [
            max(exact_shares([f"ws://10.{s}.0.{i}:8000" for i in range(n)], points, both_ways))
            for s in range(sets)
        ]
        rows.append(
            {
                "ring": label,
                "points": str(points),
                "median max/mean": f"{statistics.median(worst):.3f}",
                "worst max/mean": f"{max(worst):.3f}",
            }
        )
    return rows


def weighted_rows() -> list[dict[str, str]]:
    """The chosen algorithm with unequal weights: share accuracy and lookup cost."""
    keys = random_keys(40_000, seed=17)
    rows = []
    for label, make in [
        ("1, 2, 3, 4 repeating", lambda i: i % 4 + 1),
        ("random in 1..1000", lambda i: random.Random(i).randint(1, 1000)),
    ]:
        for n in (10, 100, 1000):
            names = identities(n)
            weights = [make(i) for i in range(n)]
            ring = HashRing(names, weights)
            lookup_us = per_call(ring.pick, keys[:TIMED_KEYS])
            counts = Counter(ring.pick(key) for key in keys)
            total = sum(weights)
            # Largest deviation of a backend's share from weight / total, relative,
            # over backends expecting at least 1,000 keys (else it is sampling noise).
            expected = [len(keys) * w / total for w in weights]
            errors = [abs(counts[i] / e - 1) for i, e in enumerate(expected) if e >= 1000]
            rows.append(
                {
                    "weights": label,
                    "N": str(n),
                    "lookup µs": f"{lookup_us:.1f}",
                    "worst share error": f"{max(errors):.3f}" if errors else "—",
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.balancing", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--all", action="store_true", help="also measure the rejected alternatives")
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(size) for size in text.split(",")],
        default=list(SIZES),
        help="comma-separated backend counts (default: 3,10,100,1000)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    keys = random_keys(KEY_COUNT)
    print(f"Python {sys.version.split()[0]}, {KEY_COUNT:,} random 16-byte keys, equal weights.\n")
    print("### Noise floor: a perfectly uniform random assignment\n")
    print(table([{"N": str(n), "max/mean": f"{noise_floor(n):.3f}"} for n in args.sizes]))
    names = list(ALGORITHMS) if args.all else [CHOSEN]
    for name in names:
        print(f"\n### {name}\n", flush=True)
        print(table([measure(name, n, keys) for n in args.sizes]), flush=True)
    print("\n### Balance without sampling noise: exact shares, 10 backends, 40 identity sets\n")
    print(table(ring_balance_rows(args.all)))
    print("\n### wsgate with unequal weights (40,000 keys)\n")
    print(table(weighted_rows()))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
