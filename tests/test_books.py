"""The connection books on their own: admission, reloads, the reload race, spread closes and
the access line.

No listener and no socket: the books are the narrow interface the upgrade
protocols and the gateway share, and their rules hold without either.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import gateway_config
from hypothesis import given
from hypothesis import strategies as st
from peers import STEP_TIMEOUT
from prometheus_client import CollectorRegistry

from wsgate.balancer import Pool
from wsgate.books import Access, Books, access_entry, access_line, iso_time, spread_delays
from wsgate.config import Config, parse_config
from wsgate.frames import CloseCode
from wsgate.handshake import PlainGet
from wsgate.metrics import Metrics
from wsgate.runtime import setup_logging

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
    chosen = books.pool_for("gateway.test", "/", PlainGet("gateway.test", "/", b"/", {}))
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
    handles = books.spread_closes(relays, CloseCode.SERVICE_RESTART, "backend removed")  # type: ignore
    assert len(handles) == count
    async with asyncio.timeout(STEP_TIMEOUT):
        await done.wait()
    assert closed == [(CloseCode.SERVICE_RESTART, "backend removed")] * count


@pytest.mark.parametrize("count", [1, 2, 7, 1000])
def test_spread_delays_give_each_close_its_own_slot_within_the_period(count):
    period = 0.05
    delays = spread_delays(count, period)
    slot = period / count
    assert len(delays) == count
    for i, delay in enumerate(delays):
        assert i * slot <= delay <= min(period, (i + 1) * slot)
    assert delays == sorted(delays)


@pytest.fixture
def made_records() -> Iterator[list[logging.LogRecord]]:
    """The log records made during the test; the logging setup of before it back after."""
    root, access = logging.getLogger(), logging.getLogger("wsgate.access")
    saved = (root.handlers[:], root.level, access.handlers[:], access.level, access.propagate)
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record)
        return record

    logging.setLogRecordFactory(counting_factory)
    yield made
    logging.setLogRecordFactory(factory)
    root.handlers[:], level, access.handlers[:], access.level, access.propagate = saved
    root.setLevel(level)


def as_run(access_log: bool = True) -> logging.Logger:
    """Logging set up as `wsgate run` does (onto the test's captured stdout); the access logger.

    pytest adds its own capture handlers to every logger for the call phase: they go.
    """
    setup_logging("info", "json", access_log)
    access = logging.getLogger("wsgate.access")
    access.handlers[:] = [h for h in access.handlers if not type(h).__module__.startswith("_pytest")]
    return access


def access_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def finished_relay(
    code: int | None = CloseCode.NORMAL_CLOSURE,
    to_client: tuple[int | None, str] | None = (CloseCode.NORMAL_CLOSURE, "backend"),
    to_backend: tuple[int | None, str] | None = None,
    closed_by: str = "backend",
) -> Any:
    """What the access line reads of a relay that ended: its legs' counts and its closes."""
    def leg(received: int, messages: int, close_written: tuple[int | None, str] | None) -> Any:
        return SimpleNamespace(
            bytes_received=received, scanner=SimpleNamespace(messages=messages), close_written=close_written
        )

    return SimpleNamespace(
        client=leg(7, 1, to_client), backend=leg(1 << 40, 3, to_backend), close_code=code, closed_by=closed_by
    )


async def test_the_access_line_is_written_without_a_log_record_in_the_same_json(made_records, capsys):
    books = make_books(make_config())
    as_run()
    books.log_access(
        "127.0.0.1:5000", "r", "b", b"k", 101, 1.23456, "client closed", None, finished_relay()
    )
    logging.getLogger("wsgate.access").info("", extra={"access": {"status": 101}})
    direct, through_logging = access_lines(capsys.readouterr().out)
    assert len(made_records) == 1  # only the line logged by hand made a record
    assert list(direct) == ["time", "client", "route", "backend", "key_hash", "status", "duration",
                            "bytes_in", "bytes_out", "messages_in", "messages_out", "close_code",
                            "closed_by", "close_to_client", "close_to_backend", "reason", "client_cert",
                            "protocol"]
    assert direct["duration"] == 1.235 and direct["bytes_in"] == 7 and direct["client_cert"] is None
    assert direct["close_to_client"] == {"code": 1000, "by": "backend"} and direct["close_to_backend"] is None
    # The same time format on both paths: 2026-01-02T03:04:05.678+00:00.
    assert len(direct["time"]) == len(through_logging["time"]) == 29
    assert direct["time"].endswith("+00:00") and through_logging["time"].endswith("+00:00")


async def test_an_access_logger_with_a_filter_or_a_second_handler_gets_records(made_records, capsys):
    access = as_run()
    books = make_books(make_config())
    dropped = logging.Filter("nothing.by.this.name")
    access.addFilter(dropped)
    books.log_access("127.0.0.1:5000", "r", "b", b"", 101, 0.0, "done", None)
    access.removeFilter(dropped)
    assert capsys.readouterr().out == ""  # the filter held on the direct path's logger
    extra = logging.NullHandler()
    access.addHandler(extra)
    books.log_access("127.0.0.1:5000", "r", "b", b"", 101, 0.0, "done", None)
    access.removeHandler(extra)
    assert len(made_records) == 2
    (line,) = access_lines(capsys.readouterr().out)
    assert line["reason"] == "done"


async def test_no_access_line_and_no_record_while_the_access_log_is_off(made_records, capsys):
    as_run(access_log=False)
    make_books(make_config()).log_access("127.0.0.1:5000", "r", "b", b"", 101, 0.0, "done", None)
    assert capsys.readouterr().out == "" and made_records == []


def reference_iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


@pytest.mark.parametrize(
    "timestamp",
    [0.0, 1.0, 1_700_000_000.0, 1_700_000_000.0005, 1_700_000_000.9994999, 1_700_000_000.9995,
     1_700_000_000.9999995, 1_700_000_000.99999949, 1_700_000_001.0000004, 1_700_000_000.123,
     -1.5, -0.0000004, -86_400.9999996, 4_102_444_799.9999999],
)
def test_iso_time_reads_as_datetime_writes_it_at_the_edges_of_a_millisecond(timestamp):
    assert iso_time(timestamp) == reference_iso_time(timestamp)


@given(st.lists(st.floats(min_value=-1e9, max_value=4.1e9), min_size=1, max_size=20))
def test_iso_time_reads_as_datetime_writes_it_whichever_second_came_before(timestamps):
    # Each call may reuse the previous one's formatted second, or must not.
    for timestamp in timestamps:
        assert iso_time(timestamp) == reference_iso_time(timestamp)
        assert iso_time(timestamp + 1.0) == reference_iso_time(timestamp + 1.0)


@pytest.mark.parametrize(
    "fields",
    [
        ("127.0.0.1:5000", "chat", "ws://10.0.0.1:80", b"room-1", 101, 1.23456, "client closed", None),
        ("[2001:db8::1]:443", "", "", b"", 404, 0, "no route for this host and path", None),
        ("127.0.0.1:5000", "r", "b", b"k", 502, 0.0004999, 'a "quoted" \\ reason\n',
         "CN=caf\u00e9 \U0001f600"),
        ("127.0.0.1:5000", "r\u00e9", "b", b"\xff\x00", 101, 12345.6789, "done", "\ud800 lone surrogate"),
    ],
)
@pytest.mark.parametrize(
    "relay",
    [
        None,
        finished_relay(),
        finished_relay(code=None, to_client=None, to_backend=(None, "gateway"), closed_by=""),
        finished_relay(code=4321, to_client=(CloseCode.GOING_AWAY, "gateway"), to_backend=(1001, "gateway")),
    ],
    ids=["handshake only", "relayed", "no codes", "private code"],
)
def test_the_direct_access_line_is_json_dumps_of_the_record_s_entry(fields, relay):
    timestamp = 1_700_000_000.25
    access = Access(*fields, relay)
    direct = access_line(timestamp, access)
    assert direct == json.dumps({"time": iso_time(timestamp), **access_entry(access)})


# -- per-route relay settings ---------------------------------------------------------------


async def test_a_route_s_settings_are_computed_once_and_shared_when_it_overrides_nothing():
    config = make_config(
        timeouts={"idle": "120s", "connect": "3s"},
        extra_routes=[{
            "name": "quick", "match": {"path_prefix": "/quick"}, "backends": [{"url": BACKENDS[0]}],
            "timeouts": {"idle": "5s"},
        }],
    )
    books = make_books(config)
    assert books.route_settings["test"] is books.relay_settings  # overrides nothing: the global object
    quick = books.route_settings["quick"]
    assert quick.idle_timeout == 5.0 and books.relay_settings.idle_timeout == 120.0
    assert quick.close_timeout == books.relay_settings.close_timeout  # what it leaves out stays global
    assert books.connect_timeouts == {"test": 3.0, "quick": 3.0}


async def test_the_sweeper_ticks_for_the_route_that_needs_it_most_and_follows_a_reload():
    beating = make_config(extra_routes=[
        {"name": "beat", "match": {"path_prefix": "/beat"}, "backends": [{"url": BACKENDS[0]}],
         "heartbeat": {"interval": "100ms"}}
    ])
    books = make_books(beating)
    assert books.sweeper.tick == pytest.approx(0.025)  # a quarter of the route's interval
    plain = make_config()
    books.apply(plain, {}, pools(plain))
    assert books.sweeper.tick == 1.0  # the global timers alone (no relay is open to keep the old one)
