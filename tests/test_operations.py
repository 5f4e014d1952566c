"""Operations end to end: /metrics, /healthz, /readyz, /status, the access log and the drain.

In-process gateways serve their admin app on 127.0.0.1:0 (the port is read from
`AdminServer.address`); `wsgate run` and `wsgate demo` run as subprocesses whose
ports are read from the "listening on" lines they log. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
import yaml
from conftest import gateway_config
from peers import (
    STEP_TIMEOUT,
    accept_upgrade,
    client_frame,
    close_payload,
    open_raw_client,
    read_frame,
    read_response_head,
    read_until_close,
    server_frame,
    until,
    upgrade_request,
)
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

import wsgate
import wsgate.gateway
from wsgate.admin import AdminServer
from wsgate.config import parse_config
from wsgate.gateway import Gateway

UP = "client_to_backend"
DOWN = "backend_to_client"
PAYLOAD_SIZE = 100


# -- helpers ---------------------------------------------------------------------------


class Samples:
    """One scrape of /metrics, parsed by prometheus-client's own parser."""

    def __init__(self, text: str) -> None:
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {frozenset(s.labels.items()): s.value for s in self.samples if s.name == name}

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the sample with exactly these labels, or None when absent."""
        return self.series(name).get(frozenset(labels.items()))


class Admin:
    """An in-process gateway with its admin server, and an HTTP client for the latter."""

    def __init__(self, gateway: Gateway, server: AdminServer, session: aiohttp.ClientSession) -> None:
        self.gateway = gateway
        self.server = server
        self.session = session
        host, port = gateway.addresses[0]
        self.ws_url = f"ws://{host}:{port}"
        self.admin_url = "http://%s:%d" % server.address

    async def get(self, path: str, **headers: str) -> tuple[int, dict[str, str], str]:
        async with asyncio.timeout(STEP_TIMEOUT):
            async with self.session.get(self.admin_url + path, headers=headers) as response:
                return response.status, dict(response.headers), await response.text()

    async def scrape(self) -> Samples:
        status, headers, body = await self.get("/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        return Samples(body)


@pytest.fixture
async def start_admin() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Admin]]]:
    """`await start_admin(config_dict)`: a started gateway plus its admin server on 127.0.0.1:0."""
    started: list[Admin] = []
    session = aiohttp.ClientSession()

    async def start(config: dict[str, Any]) -> Admin:
        config.setdefault("admin", {})["bind"] = "127.0.0.1:0"
        gateway = Gateway(parse_config(config))
        await gateway.start()
        server = AdminServer(gateway)
        try:
            await server.start("127.0.0.1", 0)
        except BaseException:
            await gateway.close()
            raise
        admin = Admin(gateway, server, session)
        started.append(admin)
        return admin

    yield start
    for admin in started:
        await admin.server.close()
        await admin.gateway.close()
    await session.close()


class AccessRecords(logging.Handler):
    """The access log's records; `await next()` waits for the next one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        self.queue.put_nowait(record.access)  # type: ignore[attr-defined]

    async def next(self) -> dict[str, Any]:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await self.queue.get()


@pytest.fixture
def access_records() -> Any:
    logger = logging.getLogger("wsgate.access")
    handler = AccessRecords()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def key_digest(key: bytes) -> str:
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def connect(url: str, **options: Any) -> Any:
    """A `websockets` client without compression, so that byte counts are the payloads'."""
    return websockets.connect(url, compression=None, **options)


async def echo_messages(ws: Any, count: int) -> None:
    for _ in range(count):
        data = os.urandom(PAYLOAD_SIZE)
        await ws.send(data)
        assert await ws.recv() == data


# -- 1. /metrics after real traffic ----------------------------------------------------


async def test_metrics_after_traffic(start_admin, ws_backend, access_records):
    n = 10
    admin = await start_admin(gateway_config([ws_backend.url], route={"match": {"path_prefix": "/ws"}}))
    labels = {"route": "test", "backend": ws_backend.url}
    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url + "/ws/a") as ws:
            await echo_messages(ws, n)
            during = await admin.scrape()
        await access_records.next()
        async with connect(admin.ws_url + "/ws/b"):
            pass
        await access_records.next()
        host, port = admin.ws_url.removeprefix("ws://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(upgrade_request(path="/elsewhere"))
        assert (await read_response_head(reader))[0] == 404
        writer.close()
        await access_records.next()
    after = await admin.scrape()

    assert during.value("wsgate_active_connections", **labels) == 1
    assert after.value("wsgate_active_connections", **labels) == 0
    assert after.series("wsgate_messages_total") == {
        frozenset({("route", "test"), ("direction", UP)}): n,
        frozenset({("route", "test"), ("direction", DOWN)}): n,
    }
    for direction, header in ((UP, 6), (DOWN, 2)):
        # The data frames and each connection's Close.
        assert after.value("wsgate_frames_total", route="test", direction=direction) >= n + 2
        assert after.value("wsgate_bytes_total", route="test", direction=direction) >= n * (PAYLOAD_SIZE + header)
        assert after.value("wsgate_message_size_bytes_count", direction=direction) == n
        assert after.value("wsgate_message_size_bytes_bucket", direction=direction, le="64.0") == 0
        assert after.value("wsgate_message_size_bytes_bucket", direction=direction, le="256.0") == n
        assert after.value("wsgate_message_size_bytes_bucket", direction=direction, le="+Inf") == n
    assert after.value("wsgate_connections_total", route="test", outcome="upgraded", protocol="http/1.1") == 2
    assert after.value("wsgate_close_frames_total", code="1000", side="client") == 2
    assert after.value("wsgate_connection_duration_seconds_count", route="test") == 2
    assert after.value("wsgate_handshake_duration_seconds_count", route="test") == 2
    # Durations come from perf_counter, not uvloop's millisecond-grained loop clock.
    for name, extra in (
        ("wsgate_handshake_duration_seconds_sum", {}),
        ("wsgate_connection_duration_seconds_sum", {}),
        ("wsgate_backend_connect_duration_seconds_sum", {}),
    ):
        total_ms = after.value(name, route="test", **extra) * 1000
        assert abs(total_ms - round(total_ms)) > 1e-6, (name, total_ms)
    assert after.value("wsgate_handshake_rejections_total", reason="no_route") == 1
    assert after.value("wsgate_backend_up", **labels) == 1
    assert after.value("wsgate_build_info", version=wsgate.__version__) == 1
    assert after.value("process_resident_memory_bytes") > 0

    status, headers, body = await admin.get("/metrics", Accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    families = {family.name: family for family in parse_openmetrics(body)}
    assert families["wsgate_messages"].type == "counter"
    assert families["wsgate_message_size_bytes"].type == "histogram"


@pytest.mark.parametrize("size", [20, 300, 70_000], ids=["7-bit", "16-bit", "64-bit"])
async def test_message_size_is_the_payload_of_data_messages(start_admin, ws_backend, access_records, size):
    admin = await start_admin(gateway_config([ws_backend.url]))
    text = "x" * size
    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url, max_size=None) as ws:
            await ws.send(text)
            assert await ws.recv() == text
        await access_records.next()  # both Close frames have crossed
    metrics = await admin.scrape()
    for direction in (UP, DOWN):
        # Neither the frame headers nor the Close frames count.
        assert metrics.value("wsgate_message_size_bytes_sum", direction=direction) == size
        assert metrics.value("wsgate_message_size_bytes_count", direction=direction) == 1


async def test_message_size_of_a_fragmented_message_with_a_ping(start_admin, ws_backend, access_records):
    admin = await start_admin(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await open_raw_client(admin.ws_url)
        writer.write(
            client_frame(0x1, b"hel", fin=False)
            + client_frame(0x9, b"ping")
            + client_frame(0x0, b"lo", fin=False)
            + client_frame(0x0, b" world")
        )
        frames = [await read_frame(reader) for _ in range(2)]
        assert sorted(frame.payload for frame in frames) == [b"hello world", b"ping"]
        writer.write(client_frame(0x8, close_payload(1000)))
        assert (await read_frame(reader)).opcode == 0x8
        await access_records.next()
        writer.close()
    metrics = await admin.scrape()
    # The fragments' payloads summed; the ping, its pong and the Closes left out.
    assert metrics.value("wsgate_message_size_bytes_sum", direction=UP) == 11
    assert metrics.value("wsgate_message_size_bytes_count", direction=UP) == 1
    assert metrics.value("wsgate_message_size_bytes_sum", direction=DOWN) == 11


async def test_message_size_of_a_message_still_arriving_at_a_flush(start_admin, ws_backend, access_records):
    admin = await start_admin(gateway_config([ws_backend.url]))
    size = 100_000
    frame = client_frame(0x2, os.urandom(size))
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await open_raw_client(admin.ws_url)
        writer.write(frame[: size // 2])

        async def half_counted() -> bool:
            # Each scrape flushes; this one finds half a message and no message complete.
            sent = (await admin.scrape()).value("wsgate_bytes_total", route="test", direction=UP)
            return sent is not None and sent >= size // 2

        await until(half_counted)
        writer.write(frame[size // 2 :])
        assert (await read_frame(reader)).opcode == 0x2  # the echo
        writer.write(client_frame(0x8, close_payload(1000)))
        assert (await read_frame(reader)).opcode == 0x8
        await access_records.next()
        writer.close()
    metrics = await admin.scrape()
    # The half seen at the first flush is not lost: it counts with the message once complete.
    assert metrics.value("wsgate_message_size_bytes_sum", direction=UP) == size
    assert metrics.value("wsgate_message_size_bytes_count", direction=UP) == 1


# -- 2. staleness: counts reach /metrics while a connection stays open -------------------


async def test_a_scrape_shows_an_open_connections_counts(start_admin, ws_backend):
    admin = await start_admin(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url) as ws:
            await echo_messages(ws, 3)
            first = await admin.scrape()
            await echo_messages(ws, 2)
            second = await admin.scrape()
    for direction in (UP, DOWN):
        assert first.value("wsgate_messages_total", route="test", direction=direction) == 3
        # Only the increments since the previous flush are added.
        assert second.value("wsgate_messages_total", route="test", direction=direction) == 5


async def test_the_periodic_flush_updates_the_registry_without_a_scrape(start_admin, ws_backend, monkeypatch):
    monkeypatch.setattr(wsgate.gateway, "METRICS_FLUSH_INTERVAL", 0.05)
    admin = await start_admin(gateway_config([ws_backend.url]))
    registry = admin.gateway.registry

    async def flushed() -> bool:
        values = [
            registry.get_sample_value("wsgate_messages_total", {"route": "test", "direction": d})
            for d in (UP, DOWN)
        ]
        return values == [4, 4]

    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url) as ws:
            await echo_messages(ws, 4)
            await until(flushed, timeout=2.0)
            assert registry.get_sample_value(
                "wsgate_active_connections", {"route": "test", "backend": ws_backend.url}
            ) == 1


async def test_a_handshake_s_counts_are_in_the_registry_as_it_happens_without_a_flush(
    start_admin, ws_backend, access_records, monkeypatch
):
    # Counted in plain dicts that the registry reads: neither the periodic flush nor a scrape
    # (which flushes first) is needed for what a handshake and a connection's end count.
    monkeypatch.setattr(wsgate.gateway, "METRICS_FLUSH_INTERVAL", 3600.0)
    admin = await start_admin(gateway_config([ws_backend.url]))
    registry = admin.gateway.registry

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    on_backend = {"route": "test", "backend": ws_backend.url}
    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url) as ws:
            await echo_messages(ws, 1)
            assert value("wsgate_active_connections", **on_backend) == 1
            assert value("wsgate_connections_total", route="test", outcome="upgraded",
                         protocol="http/1.1") == 1
            assert value("wsgate_handshake_duration_seconds_count", route="test") == 1
            assert value("wsgate_backend_connect_duration_seconds_count", route="test") == 1
            assert value("wsgate_handshake_duration_seconds_bucket", route="test", le="+Inf") == 1
        await access_records.next()
    ended = {
        ("wsgate_active_connections", frozenset(on_backend.items())): 0,
        ("wsgate_close_frames_total", frozenset({("code", "1000"), ("side", "client")})): 1,
        ("wsgate_connection_duration_seconds_count", frozenset({("route", "test")})): 1,
        ("wsgate_messages_total", frozenset({("route", "test"), ("direction", UP)})): 1,
    }
    scraped = await admin.scrape()
    for (name, labels), expected in ended.items():
        assert value(name, **dict(labels)) == expected, name
        assert scraped.value(name, **dict(labels)) == expected, name


async def test_the_connections_a_shutdown_closes_are_counted(ws_backend, access_records):
    gateway = Gateway(parse_config(gateway_config([ws_backend.url])))
    await gateway.start()
    host, port = gateway.addresses[0]
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            async with connect(f"ws://{host}:{port}") as ws:
                await echo_messages(ws, 2)
                await gateway.close()
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
    finally:
        await gateway.close()  # again, if the test failed before it
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert (await access_records.next())["close_code"] == 1001
    value = gateway.registry.get_sample_value
    assert value("wsgate_close_frames_total", {"code": "1001", "side": "gateway"}) == 1
    assert value("wsgate_connection_duration_seconds_count", {"route": "test"}) == 1
    assert value("wsgate_messages_total", {"route": "test", "direction": DOWN}) == 2
    assert value("wsgate_active_connections", {"route": "test", "backend": ws_backend.url}) == 0


# -- 3. /healthz, /readyz, /status ------------------------------------------------------


async def test_health_ready_and_status_while_serving(start_admin, ws_backend):
    admin = await start_admin(gateway_config([ws_backend.url]))
    assert (await admin.get("/healthz"))[0] == 200
    assert (await admin.get("/readyz"))[0] == 200
    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url):
            status, headers, body = await admin.get("/status")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    report = json.loads(body)
    assert report["version"] == wsgate.__version__
    assert report["draining"] is False
    assert report["connections"] == 1
    [route] = report["routes"]
    assert route["name"] == "test"
    [backend] = route["backends"]
    assert backend["backend"] == ws_backend.url
    assert backend["active_connections"] == 1
    assert backend["healthy"] is True and backend["available"] is True


async def test_readyz_says_503_as_soon_as_the_drain_starts(start_admin, ws_backend):
    admin = await start_admin(
        gateway_config([ws_backend.url], shutdown={"drain_period": "1s", "grace_period": "3s"})
    )
    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url) as ws:
            drain = asyncio.create_task(admin.gateway.drain())
            await asyncio.sleep(0)  # the task sets `draining` in its first step
            status, _, body = await admin.get("/readyz")
            assert status == 503
            assert "draining" in body
            assert ws.close_code is None  # the drain has not reached this connection yet
            assert (await admin.get("/healthz"))[0] == 200
            assert json.loads((await admin.get("/status"))[2])["draining"] is True
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1001
        await drain


async def test_readyz_requires_a_healthy_backend_when_asked(start_admin, closed_port):
    config = gateway_config(
        [f"ws://127.0.0.1:{closed_port}"],
        admin={"ready_requires_backends": True},
        route={
            "health_check": {"type": "tcp", "interval": "50ms", "timeout": "1s", "unhealthy_threshold": 1}
        },
    )
    admin = await start_admin(config)

    async def unready() -> bool:
        return (await admin.get("/readyz"))[0] == 503

    await until(unready)
    body = (await admin.get("/readyz"))[2]
    assert "route test has no healthy backend" in body
    [backend] = json.loads((await admin.get("/status"))[2])["routes"][0]["backends"]
    assert backend["healthy"] is False and backend["available"] is False
    metrics = await admin.scrape()
    assert metrics.value("wsgate_backend_up", route="test", backend=f"ws://127.0.0.1:{closed_port}") == 0


# -- 4. the access log ------------------------------------------------------------------


async def test_access_log_of_a_relayed_connection(start_admin, ws_backend, access_records):
    admin = await start_admin(gateway_config([ws_backend.url], route={"hash_key": "header:X-User"}))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url, additional_headers={"X-User": "alice-secret"}) as ws:
            client_port = ws.local_address[1]
            await echo_messages(ws, 3)
        entry = await access_records.next()
    assert entry["client"] == f"127.0.0.1:{client_port}"
    assert entry["route"] == "test"
    assert entry["backend"] == ws_backend.url
    assert re.fullmatch(r"[0-9a-f]{16}", entry["key_hash"])
    assert entry["key_hash"] == key_digest(b"alice-secret")
    assert "alice-secret" not in json.dumps(entry)
    assert entry["status"] == 101
    assert isinstance(entry["duration"], float) and 0 <= entry["duration"] < STEP_TIMEOUT
    assert entry["bytes_in"] >= 3 * (PAYLOAD_SIZE + 6)
    assert entry["bytes_out"] >= 3 * (PAYLOAD_SIZE + 2)
    assert (entry["messages_in"], entry["messages_out"]) == (3, 3)
    assert (entry["close_code"], entry["closed_by"], entry["reason"]) == (1000, "client", "close frame")
    # The client's Close reached the backend, and the backend's answer the client.
    assert entry["close_to_backend"] == {"code": 1000, "by": "client"}
    assert entry["close_to_client"] == {"code": 1000, "by": "backend"}


async def test_access_log_when_the_backend_is_lost_names_the_gateways_1014(
    start_admin, raw_backend, access_records
):
    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        writer.write(server_frame(0x1, b"last words"))
        await writer.drain()
        writer.transport.abort()

    admin = await start_admin(gateway_config([(await raw_backend(die)).url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url) as ws:
            assert await ws.recv() == "last words"
            await ws.wait_closed()
        entry = await access_records.next()
    assert ws.close_code == 1014
    assert (entry["close_code"], entry["closed_by"], entry["reason"]) == (None, "backend", "backend lost")
    assert entry["close_to_client"] == {"code": 1014, "by": "gateway"}
    assert entry["close_to_backend"] is None  # it was gone: nothing could be sent


async def test_access_log_of_a_backend_violation_names_both_gateway_closes(
    start_admin, raw_backend, access_records
):
    async def misbehave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        writer.write(server_frame(0x1, b"rsv2", rsv=2))
        await read_until_close(reader)

    admin = await start_admin(gateway_config([(await raw_backend(misbehave)).url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url) as ws:
            await ws.wait_closed()
        entry = await access_records.next()
    assert ws.close_code == 1014
    assert (entry["close_code"], entry["closed_by"]) == (1002, "gateway")
    assert entry["close_to_client"] == {"code": 1014, "by": "gateway"}
    assert entry["close_to_backend"] == {"code": 1002, "by": "gateway"}


async def test_access_log_of_a_close_stuck_behind_half_a_frame(start_admin, raw_backend, access_records):
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        writer.write(server_frame(0x2, bytes(100_000))[:50_000])  # half a frame, then silence
        await read_until_close(reader)

    admin = await start_admin(gateway_config([(await raw_backend(stall)).url], timeouts={"close": "100ms"}))
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await open_raw_client(admin.ws_url)
        await reader.readexactly(1000)  # the frame is on its way through the gateway
        # The client's Close waits for the end of that frame, which never comes.
        next(iter(admin.gateway.books.relays)).close()
        entry = await access_records.next()
        writer.close()
    assert (entry["close_code"], entry["closed_by"]) == (1001, "gateway")
    assert entry["close_to_client"] is None
    assert entry["close_to_backend"] == {"code": 1001, "by": "gateway"}


async def test_access_log_of_refused_handshakes(start_admin, closed_port, access_records):
    dead = f"ws://127.0.0.1:{closed_port}"
    admin = await start_admin(
        gateway_config(
            [dead],
            route={"match": {"path_prefix": "/ws"}, "retries": 0, "passive_ejection": {"failures": 0}},
        )
    )
    host, port = admin.ws_url.removeprefix("ws://").rsplit(":", 1)
    for path, status in (("/elsewhere", 404), ("/ws", 502)):
        async with asyncio.timeout(STEP_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, int(port))
            client_port = writer.get_extra_info("sockname")[1]
            writer.write(upgrade_request(path=path))
            assert (await read_response_head(reader))[0] == status
            writer.close()
            entry = await access_records.next()
        assert entry["client"] == f"127.0.0.1:{client_port}"
        assert entry["status"] == status
        assert isinstance(entry["duration"], float)
        if status == 404:
            assert (entry["route"], entry["backend"], entry["key_hash"]) == ("", "", "")
            assert "no route" in entry["reason"]
        else:
            assert (entry["route"], entry["backend"]) == ("test", dead)
            assert entry["key_hash"] == key_digest(b"127.0.0.1")
            assert "unreachable" in entry["reason"]


async def test_access_log_of_handshakes_that_time_out(start_admin, raw_backend, access_records):
    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the gateway gives up and hangs up

    silent = await raw_backend(never_answers)
    admin = await start_admin(
        gateway_config(
            [silent.url],
            timeouts={"handshake": "100ms", "connect": "200ms"},
            route={"retries": 0, "passive_ejection": {"failures": 0}},
        )
    )
    host, port = admin.ws_url.removeprefix("ws://").rsplit(":", 1)
    for request, status, least in ((b"", 408, 0.1), (upgrade_request(), 504, 0.2)):
        async with asyncio.timeout(STEP_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            assert (await read_response_head(reader))[0] == status
            writer.close()
            entry = await access_records.next()
        assert entry["status"] == status
        # The time the client waited for its answer, not a constant.
        assert least <= entry["duration"] < STEP_TIMEOUT
    metrics = await admin.scrape()
    assert metrics.value("wsgate_connections_total", route="", outcome="rejected", protocol="http/1.1") == 1
    assert metrics.value("wsgate_handshake_rejections_total", reason="timeout") == 1
    assert metrics.value("wsgate_connections_total", route="test", outcome="backend_failed",
                         protocol="http/1.1") == 1


class GatewayProcess:
    """`wsgate run` in a subprocess: its ports (from stderr), its output lines, its exit."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self.ws_url = ""
        self.admin_url = ""
        self._readers = [
            asyncio.create_task(self._read(process.stdout, self.stdout, None)),
            asyncio.create_task(self._read(process.stderr, self.stderr, self._lines)),
        ]

    @staticmethod
    async def _read(stream: Any, lines: list[str], queue: asyncio.Queue[str] | None) -> None:
        while line := (await stream.readline()).decode():
            lines.append(line)
            if queue is not None:
                queue.put_nowait(line)

    @classmethod
    async def start(cls, tmp_path: Path, config: dict[str, Any], *options: str) -> GatewayProcess:
        """`wsgate run -c tmp_path/wsgate.yaml [options]`; its log level must show INFO lines."""
        config.setdefault("admin", {})["bind"] = "127.0.0.1:0"
        path = tmp_path / "wsgate.yaml"
        path.write_text(yaml.safe_dump(config))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wsgate", "run", "-c", str(path), *options,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self = cls(process)
        line = await self.wait_for_line(r"(?<!admin )listening on ((?:127\.0\.0\.1|\[::1\]):\d+)")
        self.ws_url = "ws://" + line
        self.admin_url = "http://" + await self.wait_for_line(r"admin listening on (127\.0\.0\.1:\d+)")
        return self

    async def wait_for_line(self, pattern: str) -> str:
        """The first group of the next stderr line matching `pattern`."""
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                line = await self._lines.get()
                if match := re.search(pattern, line):
                    return match.group(1)
                assert "Traceback" not in line, "".join(self.stderr)

    async def wait(self, timeout: float = STEP_TIMEOUT) -> int:
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await asyncio.gather(*self._readers)
        return code

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        for reader in self._readers:
            reader.cancel()


async def _one_session_then_sigterm(tmp_path: Path, config: dict[str, Any], messages: int) -> GatewayProcess:
    """`wsgate run`, one client that echoes `messages`, then a SIGTERM and a clean exit."""
    gateway = await GatewayProcess.start(tmp_path, config)
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            async with connect(gateway.ws_url) as ws:
                await echo_messages(ws, messages)
            gateway.process.send_signal(signal.SIGTERM)
            assert await gateway.wait() == 0
    finally:
        await gateway.stop()
    return gateway


async def test_access_log_on_stdout_of_wsgate_run(tmp_path, ws_backend):
    gateway = await _one_session_then_sigterm(tmp_path, gateway_config([ws_backend.url]), 2)
    [line] = gateway.stdout
    entry = json.loads(line)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", entry["time"])
    assert (entry["status"], entry["messages_in"], entry["closed_by"]) == (101, 2, "client")
    assert entry["backend"] == ws_backend.url


ISO_WITH_OFFSET = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"


async def test_json_logs_use_iso_times_and_bracket_ipv6(tmp_path, ws_backend):
    config = gateway_config([ws_backend.url], log={"format": "json"})
    config["listeners"][0]["bind"] = "[::1]:0"
    gateway = await _one_session_then_sigterm(tmp_path, config, 1)
    lines = [json.loads(line) for line in gateway.stderr]
    assert len(lines) >= 3
    for entry in lines:
        assert re.fullmatch(ISO_WITH_OFFSET, entry["time"]), entry
    assert any(re.search(r"listening on \[::1\]:\d+ ", entry["message"]) for entry in lines)
    [access] = [json.loads(line) for line in gateway.stdout]
    assert re.fullmatch(ISO_WITH_OFFSET, access["time"])
    assert re.fullmatch(r"\[::1\]:\d+", access["client"]), access["client"]


# -- 5. SIGTERM: a drain spread over shutdown.drain_period --------------------------------


async def _await_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[float, int | None]:
    """Wait for the gateway's Close, answer it, and say when it came and its code."""
    frame = await read_frame(reader)
    received = asyncio.get_running_loop().time()
    code, _ = frame.close
    writer.write(client_frame(0x8, close_payload(code)))
    assert await asyncio.wait_for(reader.read(), STEP_TIMEOUT) == b""  # then the gateway hangs up
    writer.close()
    return received, code


async def test_sigterm_spreads_1001_closes_over_the_drain_period(tmp_path, ws_backend):
    drain_period, clients = 2.0, 50
    config = gateway_config([ws_backend.url], shutdown={"drain_period": "2s", "grace_period": "5s"})
    gateway = await GatewayProcess.start(tmp_path, config)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            connections = await asyncio.gather(*(open_raw_client(gateway.ws_url) for _ in range(clients)))
            waiters = [asyncio.create_task(_await_close(r, w)) for r, w in connections]
            started = loop.time()
            gateway.process.send_signal(signal.SIGTERM)
            first = await next(asyncio.as_completed(waiters))
            async with aiohttp.ClientSession() as session:
                async with session.get(gateway.admin_url + "/readyz") as response:
                    assert response.status == 503
            results = await asyncio.gather(*waiters)
            all_closed = loop.time()
            assert await gateway.wait() == 0
    finally:
        await gateway.stop()
    assert first in results
    assert [code for _, code in results] == [1001] * clients
    times = sorted(received - started for received, _ in results)
    assert times[0] < 0.25 * drain_period, times
    assert 0.6 * drain_period < times[-1] < drain_period + 1.0, times
    busiest = max(sum(1 for t in times if start <= t < start + 0.2) for start in times)
    assert busiest <= 15, times
    assert all_closed - started < drain_period + 1.0
    lines = [json.loads(line) for line in gateway.stdout]
    assert len(lines) == clients
    assert {(e["close_code"], e["closed_by"], e["reason"]) for e in lines} == {(1001, "gateway", "going away")}
    # What docs/relay.md promises for a shutdown is what the clients got.
    relay_doc = (Path(__file__).resolve().parent.parent / "docs" / "relay.md").read_text()
    assert "| gateway shutdown | 1001 `going away` | 1001 `going away` |" in relay_doc


async def test_a_second_sigterm_exits_at_once_with_status_1(tmp_path, ws_backend):
    config = gateway_config([ws_backend.url], shutdown={"drain_period": "30s", "grace_period": "45s"})
    gateway = await GatewayProcess.start(tmp_path, config)
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            # Held open, and it never answers a Close: the drain would last 30 s or more.
            connection = await open_raw_client(gateway.ws_url)
            gateway.process.send_signal(signal.SIGTERM)
            await gateway.wait_for_line(r"(draining 1 connections)")
        gateway.process.send_signal(signal.SIGTERM)
        assert await gateway.wait(timeout=1.0) == 1
        connection[1].close()
    finally:
        await gateway.stop()


# -- 6. heartbeats and idle timeouts ------------------------------------------------------


async def test_heartbeat_rtt_is_measured_on_both_legs(start_admin, ws_backend):
    admin = await start_admin(gateway_config([ws_backend.url], heartbeat={"interval": "50ms", "timeout": "1s"}))

    async def measured() -> bool:
        metrics = await admin.scrape()
        return all(
            (metrics.value("wsgate_heartbeat_rtt_seconds_count", side=side) or 0) > 0
            for side in ("client", "backend")
        )

    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url, ping_interval=None) as ws:
            await until(measured)
            assert ws.close_code is None
    metrics = await admin.scrape()
    assert metrics.value("wsgate_heartbeat_rtt_seconds_sum", side="client") < 1.0


async def test_heartbeat_rtt_is_finer_than_the_loop_clock(start_admin, ws_backend):
    # uvloop's loop clock counts whole milliseconds: a loopback round trip of a few
    # hundred microseconds measured with it reads as 0 or 1 ms, never in between.
    admin = await start_admin(gateway_config([ws_backend.url], heartbeat={"interval": "20ms", "timeout": "1s"}))

    async def measured() -> bool:
        metrics = await admin.scrape()
        return (metrics.value("wsgate_heartbeat_rtt_seconds_count", side="client") or 0) >= 5

    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url, ping_interval=None):
            await until(measured)
    total_ms = (await admin.scrape()).value("wsgate_heartbeat_rtt_seconds_sum", side="client") * 1000
    assert 0 < total_ms and abs(total_ms - round(total_ms)) > 1e-6, total_ms


async def test_heartbeat_timeout_is_counted(start_admin, ws_backend, access_records):
    admin = await start_admin(gateway_config([ws_backend.url], heartbeat={"interval": "50ms", "timeout": "100ms"}))
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await open_raw_client(admin.ws_url)  # reads nothing, answers no ping
        entry = await access_records.next()
        writer.close()
    assert entry["reason"] == "heartbeat timeout (client)"
    metrics = await admin.scrape()
    assert metrics.value("wsgate_heartbeat_timeouts_total", side="client") == 1
    assert metrics.value("wsgate_close_frames_total", code="1001", side="gateway") == 1


async def test_idle_timeout_is_counted(start_admin, ws_backend, access_records):
    admin = await start_admin(gateway_config([ws_backend.url], timeouts={"idle": "100ms"}, heartbeat={"interval": 0}))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with connect(admin.ws_url) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1001
        entry = await access_records.next()
    assert (entry["reason"], entry["closed_by"], entry["close_code"]) == ("idle timeout", "gateway", 1001)
    assert entry["close_to_client"] == entry["close_to_backend"] == {"code": 1001, "by": "gateway"}
    metrics = await admin.scrape()
    assert metrics.value("wsgate_idle_timeouts_total", route="test") == 1
    assert metrics.value("wsgate_heartbeat_timeouts_total", side="client") is None


# -- 7. wsgate demo ----------------------------------------------------------------------


async def test_demo_prints_a_metrics_url_that_serves_metrics():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsgate", "demo", "--port", "0", "--admin-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            url = None
            while url is None:
                line = (await process.stdout.readline()).decode()
                assert line, "the demo exited before printing its metrics URL"
                if match := re.search(r"metrics at (http://127\.0\.0\.1:\d+/metrics)", line):
                    url = match.group(1)
            async with aiohttp.ClientSession() as session:
                async with session.get(url) as response:
                    assert response.status == 200
                    metrics = Samples(await response.text())
            assert metrics.value("wsgate_build_info", version=wsgate.__version__) == 1
            up = metrics.series("wsgate_backend_up")
            assert len(up) == 3 and set(up.values()) == {1}
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_access_log_and_metrics_of_connections_refused_at_the_limit(start_admin, ws_backend, access_records):
    admin = await start_admin(gateway_config([ws_backend.url], limits={"max_connections_per_ip": 1}))
    host, port = admin.ws_url.removeprefix("ws://").rsplit(":", 1)
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(admin.ws_url) as ws:
            await ws.send("held")
            await ws.recv()
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(upgrade_request())
            assert (await read_response_head(reader))[0] == 429
            writer.close()
            entry = await access_records.next()
    assert (entry["status"], entry["reason"]) == (429, "too many connections from your address")
    metrics = await admin.scrape()
    assert metrics.value("wsgate_handshake_rejections_total", reason="ip_limit") == 1


async def test_rejection_metrics_tell_the_limits_apart(start_admin, ws_backend):
    limits = {
        "max_connections": 2,
        "max_connections_per_ip": 1,
        "new_connections_per_ip": {"rate": "1/m", "burst": 2},
    }
    admin = await start_admin(gateway_config([ws_backend.url], limits=limits))
    gateway = admin.gateway
    host, port = admin.ws_url.removeprefix("ws://").rsplit(":", 1)
    held: list[asyncio.StreamWriter] = []

    async def released() -> None:
        # A refused or closed connection gives its count back once its socket is gone.
        for _ in range(1000):
            if gateway.connection_count == len(held):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{gateway.connection_count} connections counted, {len(held)} open")

    async def answer(local_host: str) -> int:
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=(local_host, 0))
        status, _, _ = await read_response_head(reader)
        writer.close()
        await released()
        return status

    async with asyncio.timeout(STEP_TIMEOUT):
        for local_host in ("127.0.0.1", "127.0.0.2"):
            reader, writer = await asyncio.open_connection(host, int(port), local_addr=(local_host, 0))
            held.append(writer)
            writer.write(upgrade_request())
            assert (await read_response_head(reader))[0] == 101
        statuses = [await answer("127.0.0.3")]  # the gateway is full
        held.pop().close()
        await released()
        statuses += [await answer("127.0.0.1"), await answer("127.0.0.1")]  # its cap, then its rate
        metrics = await admin.scrape()
        for writer in held:
            writer.close()
    assert statuses == [503, 429, 429]
    for reason in ("limit", "ip_limit", "rate_limit"):
        assert metrics.value("wsgate_handshake_rejections_total", reason=reason) == 1, reason


async def test_every_heartbeat_round_trip_is_observed(start_admin, ws_backend, monkeypatch):
    # No periodic flush during the test: several pongs pile up before the scrape.
    monkeypatch.setattr(wsgate.gateway, "METRICS_FLUSH_INTERVAL", 3600.0)
    admin = await start_admin(gateway_config([ws_backend.url], heartbeat={"interval": "50ms"}))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(admin.ws_url, ping_interval=None):
            relay = next(iter(admin.gateway.books.relays))
            # A quiet client is pinged every 50 ms; its library answers in the background.
            for _ in range(200):
                if relay.client.rtts is not None and len(relay.client.rtts) >= 3:
                    break
                await asyncio.sleep(0.02)
            metrics = await admin.scrape()
    assert metrics.value("wsgate_heartbeat_rtt_seconds_count", side="client") >= 3
