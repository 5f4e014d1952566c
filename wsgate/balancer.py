"""Backend pools: membership (static and DNS), health, passive ejection, bounded loads.

A `Pool` serves one route. Its members are the route's `url` backends plus every
address its `dns` entries resolve to. The ring is rebuilt only when membership
changes; health and ejection only make `candidates` skip a member, which the
ring guarantees is the same as removing it, so existing connections never move
and a recovered backend gets its keys back for new connections.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import ssl
from collections import deque
from collections.abc import Coroutine, Iterator
from typing import Any

from .closing import Cause, gateway_close
from .config import Discovery, Route
from .hashring import HashRing
from .health import Backoff, RiseFall, jittered
from .member import Member, PooledRelay
from .probes import Prober, resolve, ws_url
from .tls import backend_context

__all__ = ["Member", "Pool", "PooledRelay", "random_key", "resolve", "ws_url"]

log = logging.getLogger("wsgate.balancer")


class Pool:
    """The backends of one route and how a key picks among them."""

    def __init__(
        self,
        route: Route,
        discovery: Discovery,
        rng: random.Random | None = None,
        path: str = "routes[0]",
    ) -> None:
        self.route = route
        self.discovery = discovery
        self._rng = rng or random.Random()
        # Addresses each `dns` entry resolved to last; static entries never change.
        self._resolved: dict[int, list[str]] = {
            i: [] for i, backend in enumerate(route.backends) if backend.dns is not None
        }
        self._tls: dict[int, ssl.SSLContext] = {}
        for i, backend in enumerate(route.backends):
            if backend.scheme == "wss":
                self._tls[i] = backend_context(backend.tls, f"{path}.backends[{i}].tls")
                if backend.tls is not None and not backend.tls.verify:
                    log.warning(
                        "route %s: TLS to %s is NOT VERIFIED (verify: false); anyone on the"
                        " path can impersonate this backend",
                        route.name, backend.label,
                    )
        self.members: list[Member] = []
        self._positions: dict[Member, int] = {}
        # Members that were unhealthy or ejected when last seen; the rest are available,
        # so choosing needs no pass over every member.
        self._suspects: set[Member] = set()
        self.ring = HashRing([])
        self._tasks: set[asyncio.Task[None]] = set()
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._prober = Prober()
        self._rebuild()

    # -- membership -------------------------------------------------------------

    def _rebuild(self) -> None:
        """Recompute members from the config and the last DNS answers; keep live state."""
        old = {member.identity: member for member in self.members}
        members: list[Member] = []
        seen: set[str] = set()
        for i, backend in enumerate(self.route.backends):
            tls = self._tls.get(i)
            server_name = None
            if tls is not None:
                configured = backend.tls.server_name if backend.tls is not None else None
                server_name = configured or backend.host
            if backend.url is not None:
                addresses = [backend.host]
            else:
                addresses = self._resolved[i]
            wanted = [
                Member(
                    backend.url or ws_url(address, backend.port, backend.scheme),
                    address, backend.port, backend.weight, tls, server_name,
                )
                for address in addresses
            ]
            for member in wanted:
                if member.identity in seen:
                    continue
                seen.add(member.identity)
                kept = old.get(member.identity)
                if kept is not None:
                    kept.weight = member.weight
                    member = kept
                members.append(member)
        policy = self.route.passive_ejection
        check = self.route.health_check
        for member in members:
            if member.backoff is None:
                member.backoff = Backoff(policy.backoff, policy.max_backoff)
            if check is not None and member.checks is None:
                member.checks = RiseFall(check.healthy_threshold, check.unhealthy_threshold)
        self._set_members(members)
        self.ring = HashRing([m.identity for m in members], [m.weight for m in members])
        if self._tasks:
            self._sync_probes()

    def adopt(self, previous: Pool) -> None:
        """Take over `previous`'s live state (a reload): its DNS answers, and the members
        that stay, with their connections, health and ejection state."""
        by_target = {
            backend.dns: previous._resolved[i]
            for i, backend in enumerate(previous.route.backends)
            if backend.dns is not None
        }
        for i, backend in enumerate(self.route.backends):
            if backend.dns is not None and backend.dns in by_target:
                self._resolved[i] = by_target[backend.dns]
        self._rebuild()
        kept = {member.identity: member for member in previous.members}
        check, policy = self.route.health_check, self.route.passive_ejection
        members = []
        for member in self.members:
            old = kept.get(member.identity)
            if old is not None:
                old.weight, old.tls, old.server_name = member.weight, member.tls, member.server_name
                # The new route's checks: none means no probe would ever bring it back.
                if check is None:
                    old.checks = None
                elif old.checks is None:
                    old.checks = member.checks
                else:
                    old.checks.rise, old.checks.fall = check.healthy_threshold, check.unhealthy_threshold
                assert old.backoff is not None
                old.backoff.base, old.backoff.cap = policy.backoff, policy.max_backoff
                member = old
            members.append(member)
        self._set_members(members)

    def _set_members(self, members: list[Member]) -> None:
        self.members = members
        self._positions = {member: i for i, member in enumerate(members)}
        self._suspects = {member for member in members if not member.healthy or member.ejected_until}

    def set_resolved(self, entry: int, addresses: list[str]) -> bool:
        """Record what `dns` entry `entry` resolved to; True when membership changed."""
        addresses = sorted(set(addresses))
        if addresses == self._resolved[entry]:
            return False
        self._resolved[entry] = addresses
        self._rebuild()
        return True

    # -- choosing -----------------------------------------------------------------

    def candidates(self, key: bytes, now: float) -> Iterator[Member]:
        """Members to try for `key`, best first: the bounded-load choice, then failover.

        Unavailable members (unhealthy, ejected) are skipped; when every member is
        unavailable they are all tried anyway, since refusing is no better.
        """
        members = self.members
        skip = set()
        for member in list(self._suspects):
            position = self._positions.get(member)
            if position is None or member.available(now):
                self._suspects.discard(member)
            else:
                skip.add(position)
        if len(skip) == len(members):
            skip = set()
        factor = self.route.balance_factor
        # Handshakes under way count, or a burst on one hot key would overshoot the bound.
        loads = [m.active + m.connecting for m in members] if factor is not None else None
        for _ in range(self.route.retries + 1):
            index = self.ring.pick(key, loads=loads, balance_factor=factor, skip=skip)
            if index is None:
                return
            skip.add(index)
            yield members[index]

    # -- outcomes -------------------------------------------------------------------

    def on_connected(self, member: Member) -> None:
        """A connect and handshake succeeded: the member is fine."""
        member.failures = 0
        member.probation = False
        if member.backoff is not None:
            member.backoff.reset()

    def on_failed(self, member: Member, now: float, reason: str) -> bool:
        """A connect or handshake failed; enough in a row eject the member (returns True)."""
        policy = self.route.passive_ejection
        if not policy.failures or now < member.ejected_until:
            # Already ejected: this attempt began before the ejection and is counted.
            return False
        member.failures += 1
        if member.failures >= policy.failures or member.probation:
            assert member.backoff is not None
            member.ejected_until = member.backoff.eject(now)
            self._suspects.add(member)
            member.failures = 0
            member.probation = True
            log.warning(
                "route %s: ejected backend %s for %.1fs after %s",
                self.route.name, member.identity, member.ejected_until - now, reason,
            )
            return True
        return False

    def opened(self, member: Member, relay: PooledRelay) -> None:
        member.active += 1
        member.relays.add(relay)

    def closed(self, member: Member, relay: PooledRelay) -> None:
        member.active -= 1
        member.relays.discard(relay)

    # -- background work: DNS and probes ------------------------------------------------

    async def resolve_once(self) -> None:
        """Resolve every `dns` entry now."""
        for entry in self._resolved:
            await self._resolve(entry)

    async def start(self) -> None:
        """Resolve DNS entries once, then keep resolving and probing in the background."""
        await self.resolve_once()
        for entry in self._resolved:
            self._spawn(self._resolve_forever(entry))
        if self.route.rebalance is not None:
            self._spawn(self._rebalance_forever())
        self._sync_probes()

    async def stop(self) -> None:
        pending = {*self._tasks, *self._probes.values()}
        # Cancel until they are done: on Python 3.11 asyncio.wait_for (which dnspython
        # uses) loses a cancel that lands as its inner future completes, and the task
        # would then run, and this wait last, forever.
        while pending:
            for task in pending:
                task.cancel()
            done, pending = await asyncio.wait(pending, timeout=0.1)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved, as gather(return_exceptions=True) did
        self._tasks.clear()
        self._probes.clear()
        await self._prober.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _resolve(self, entry: int) -> None:
        backend = self.route.backends[entry]
        assert backend.dns is not None
        try:
            addresses = await resolve(backend.host, self.discovery)
        except OSError as exc:
            # Keep the last good answer: a DNS outage must not empty the pool.
            log.warning("route %s: cannot resolve %s: %s", self.route.name, backend.host, exc)
            return
        if self.set_resolved(entry, addresses):
            log.info(
                "route %s: %s now resolves to %s",
                self.route.name, backend.host, ", ".join(addresses) or "nothing",
            )

    async def _resolve_forever(self, entry: int) -> None:
        while True:
            await asyncio.sleep(self.discovery.resolve_interval)
            await self._resolve(entry)

    # Rebalancing closes are spread over this many ticks per period.
    REBALANCE_TICKS = 10

    def misplaced(self, now: float) -> list[PooledRelay]:
        """Open connections that, reconnecting now, would go to another member.

        With bounded loads that is the choice made with the connection's own slot
        freed, so a hot key's overflow stays where it is until an earlier member in
        the key's order has room. When every member is unavailable, nothing moves.
        """
        members = self.members
        skip = {i for i, member in enumerate(members) if not member.available(now)}
        factor = self.route.balance_factor
        loads = [member.active for member in members]
        found = []
        for i, member in enumerate(members):
            for relay in member.relays:
                if relay.closing:
                    continue
                if factor is None:
                    best = self.ring.pick(relay.key, skip=skip)
                else:
                    loads[i] -= 1
                    best = self.ring.pick(relay.key, loads=loads, balance_factor=factor, skip=skip)
                    loads[i] += 1
                if best is not None and best != i:
                    found.append(relay)
        return found

    async def _rebalance_forever(self) -> None:
        policy = self.route.rebalance
        assert policy is not None
        loop = asyncio.get_running_loop()
        tick = policy.period / self.REBALANCE_TICKS
        recent: deque[float] = deque()  # when each rebalancing close happened
        while True:
            await asyncio.sleep(jittered(tick, self._rng))
            now = loop.time()
            while recent and recent[0] <= now - policy.period:
                recent.popleft()
            total = sum(member.active for member in self.members)
            budget = max(1, math.floor(policy.max_fraction * total))
            per_tick = max(1, math.ceil(budget / self.REBALANCE_TICKS))
            room = min(per_tick, budget - len(recent))
            if room <= 0:
                continue
            moving = self.misplaced(now)
            if not moving:
                continue
            self._rng.shuffle(moving)
            for relay in moving[:room]:
                relay.close(*gateway_close(Cause.REBALANCING))
                recent.append(now)
            log.info(
                "route %s: rebalancing closed %d of %d misplaced connections",
                self.route.name, min(room, len(moving)), len(moving),
            )

    def _sync_probes(self) -> None:
        """One probe task per current member; members that left lose theirs."""
        if self.route.health_check is None:
            return
        current = {member.identity: member for member in self.members}
        for identity in list(self._probes):
            if identity not in current:
                self._probes.pop(identity).cancel()
        loop = asyncio.get_running_loop()
        for identity, member in current.items():
            if identity not in self._probes:
                self._probes[identity] = loop.create_task(self._probe_forever(member))

    async def _probe_forever(self, member: Member) -> None:
        check = self.route.health_check
        assert check is not None and member.checks is not None
        while True:
            await asyncio.sleep(jittered(check.interval, self._rng))
            ok = await self._prober.probe(
                check, member.host, member.port, member.tls, member.server_name, label=member.identity
            )
            flipped = member.checks.record(ok)
            if flipped is not None:
                if not flipped:
                    self._suspects.add(member)
                log.log(
                    logging.INFO if flipped else logging.WARNING,
                    "route %s: backend %s is now %s",
                    self.route.name, member.identity, "healthy" if flipped else "unhealthy",
                )


def random_key() -> bytes:
    """A key for `hash_fallback: random`: no affinity, an even spread."""
    return os.urandom(8)
