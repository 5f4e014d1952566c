"""The connection books on their own: admission, reloads, the reload race and spread closes.

No listener and no socket: the books are the narrow interface the upgrade
protocols and the gateway share, and their rules hold without either.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import gateway_config
from peers import STEP_TIMEOUT
from prometheus_client import CollectorRegistry

from wsgate.balancer import Pool
from wsgate.books import Books
from wsgate.config import Config, parse_config
from wsgate.frames import CloseCode
from wsgate.metrics import Metrics

BACKENDS = ["ws://127.0.0.1:9", "ws://127.0.0.1:10"]


def make_config(backends: list[str] = BACKENDS, **sections: Any) -> Config:
    return parse_config(gateway_config(backends, **sections))


def pools(config: Config) -> dict[str, Pool]:
    return {route.name: Pool(route, config.discovery) for route in config.routes}


def make_books(config: Config) -> Books:
    return Books(config, {}, pools(config), Metrics(CollectorRegistry()))


async def test_the_gateway_wide_cap_refuses_with_503_until_a_release():
    books = make_books(make_config(limits={"max_connections": 2}))
    assert books.admit() is None and books.admit() is None
    refusal = books.admit()
    assert refusal is not None
    assert (refusal.label, refusal.error.status) == ("limit", 503)
    assert books.open_count == 2
    books.release(None)
    assert books.admit() is None


async def test_the_cap_per_address_counts_each_address_apart_and_forgets_it_at_zero():
    books = make_books(make_config(limits={"max_connections_per_ip": 1}))
    assert books.admit_address("198.51.100.1") is None
    assert books.admit_address("198.51.100.2") is None
    refusal = books.admit_address("198.51.100.1")
    assert refusal is not None and (refusal.label, refusal.error.status) == ("ip_limit", 429)
    books.open_count = 2  # as admit() would have counted them
    books.release("198.51.100.1")
    books.release("198.51.100.2")
    assert books.open_per_ip == {} and books.open_count == 0


async def test_a_reload_refills_the_rate_buckets_only_when_the_rate_changed():
    limited = make_config(limits={"new_connections_per_ip": {"rate": "1/m", "burst": 1}})
    books = make_books(limited)
    assert books.admit_address("198.51.100.1") is None
    refusal = books.admit_address("198.51.100.1")
    assert refusal is not None and refusal.label == "rate_limit"
    assert dict(refusal.error.headers)["Retry-After"] == "60"
    books.apply(limited, {}, pools(limited))
    assert books.admit_address("198.51.100.1").label == "rate_limit"  # same rate: same buckets
    faster = make_config(limits={"new_connections_per_ip": {"rate": "2/m", "burst": 1}})
    books.apply(faster, {}, pools(faster))
    assert books.tracked_addresses == 0
    assert books.admit_address("198.51.100.1") is None


async def test_a_backend_is_removed_when_the_route_s_current_pool_no_longer_has_it():
    books = make_books(make_config())
    chosen = books.pool_for("gateway.test", "/")
    assert chosen is books.pools["test"]
    kept, dropped = chosen.members
    assert not books.backend_removed(chosen, dropped)
    fewer = make_config(BACKENDS[:1])
    reloaded = pools(fewer)
    reloaded["test"].adopt(chosen)  # as the gateway's reload does: kept members carry over
    books.apply(fewer, {}, reloaded)
    assert books.backend_removed(chosen, dropped)
    assert not books.backend_removed(chosen, kept)


class Closable:
    def __init__(self, closed: list[tuple[int, str]], done: asyncio.Event, expected: int) -> None:
        self.closed, self.done, self.expected = closed, done, expected

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))
        if len(self.closed) == self.expected:
            self.done.set()


@pytest.mark.parametrize("count", [1, 5])
async def test_spread_closes_close_each_relay_once_within_the_drain_period(count):
    books = make_books(make_config(shutdown={"drain_period": "50ms", "grace_period": "1s"}))
    closed: list[tuple[int, str]] = []
    done = asyncio.Event()
    relays = [Closable(closed, done, count) for _ in range(count)]
    loop = asyncio.get_running_loop()
    handles = books.spread_closes(relays, CloseCode.SERVICE_RESTART, "backend removed")  # type: ignore
    assert len(handles) == count
    latest = max(handle.when() for handle in handles)
    assert latest <= loop.time() + 0.05
    async with asyncio.timeout(STEP_TIMEOUT):
        await done.wait()
    assert closed == [(CloseCode.SERVICE_RESTART, "backend removed")] * count
