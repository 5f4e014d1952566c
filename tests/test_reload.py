"""Hot reload end to end: SIGHUP to `wsgate run`, and POST /reload on in-process gateways.

Refused configs change nothing; backends that leave close their connections with
1012 spread over `shutdown.drain_period` (or keep them); listeners come and go by
name without touching the others; new limits apply to new connections; backends
that stay keep their health and ejection state. Every wait is bounded, and each
step waits for the event it needs (a log line, a Close frame, an HTTP answer).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
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
    client_frame,
    close_payload,
    proxy_v1_header,
    raw_exchange,
    read_frame,
    read_response_head,
    read_until_close,
    until,
    upgrade_request,
)
from test_operations import Admin, GatewayProcess, Samples, access_records, start_admin  # noqa: F401

from wsgate.handshake import accept_key
from wsgate.hashring import HashRing

DRAIN_PERIOD = 0.5
ROOMS = [f"room-{i}" for i in range(300)]
RELOADED = r"(reloaded .*|reload refused.*)"


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
async def echo_servers() -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """`await echo_servers(name)`: a `websockets` echo server that answers "who" with `name`."""
    servers: list[Any] = []

    async def start(name: str) -> str:
        async def echo(connection: Any) -> None:
            try:
                async for message in connection:
                    await connection.send(name if message == "who" else message)
            except websockets.ConnectionClosed:
                pass

        server = await websockets.serve(echo, "127.0.0.1", 0, compression=None, ping_interval=None)
        servers.append(server)
        return f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def run_gateway(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[GatewayProcess]]]:
    """`await run_gateway(config, *options)`: `wsgate run -c tmp_path/wsgate.yaml` in a subprocess."""
    started: list[GatewayProcess] = []

    async def start(config: dict[str, Any], *options: str) -> GatewayProcess:
        gateway = await GatewayProcess.start(tmp_path, config, *options)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop()


def write_config(path: Path, config: dict[str, Any]) -> None:
    config.setdefault("admin", {})["bind"] = "127.0.0.1:0"
    path.write_text(yaml.safe_dump(config))


async def sighup(gateway: GatewayProcess, path: Path, text: str | dict[str, Any]) -> str:
    """Write the config file, send SIGHUP, and return the line that says how the reload went."""
    if isinstance(text, str):
        path.write_text(text)
    else:
        write_config(path, text)
    gateway.process.send_signal(signal.SIGHUP)
    return await gateway.wait_for_line(RELOADED)


async def scrape(admin_url: str) -> Samples:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url + "/metrics") as response:
            assert response.status == 200
            return Samples(await response.text())


async def post_reload(admin_url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(admin_url + "/reload") as response:
            return response.status, await response.text()


async def get_status(admin_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url + "/status") as response:
            assert response.status == 200
            return await response.json()


def backends_of(status: dict[str, Any], route: str) -> dict[str, dict[str, Any]]:
    [found] = [r for r in status["routes"] if r["name"] == route]
    return {backend["backend"]: backend for backend in found["backends"]}


async def ask(ws: Any, text: str) -> str:
    await ws.send(text)
    return await ws.recv()


def split(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def owner(backends: list[str], room: str) -> str:
    """Where a consistent-hash ring of `backends` (weight 1 each) sends key `room`."""
    index = HashRing(backends).pick(room.encode())
    assert index is not None
    return backends[index]


class RawClient:
    """A WebSocket client on raw frames: exact Close codes and the moment each arrives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str, path: str) -> RawClient:
        reader, writer = await asyncio.open_connection(*split(url))
        writer.write(upgrade_request(path=path))
        status, _, _ = await read_response_head(reader)
        assert status == 101
        return cls(reader, writer)

    async def ask(self, text: str) -> str:
        self.writer.write(client_frame(0x1, text.encode()))
        frame = await read_frame(self.reader)
        assert frame.opcode == 0x1, frame
        return frame.payload.decode()

    async def await_close(self) -> tuple[float, int | None, str]:
        """Wait for the gateway's Close, answer it; when it came, its code and reason."""
        frame = await read_frame(self.reader)
        received = asyncio.get_running_loop().time()
        code, reason = frame.close
        self.writer.write(client_frame(0x8, close_payload(code)))
        assert await asyncio.wait_for(self.reader.read(), STEP_TIMEOUT) == b""
        self.writer.close()
        return received, code, reason

    async def close(self) -> None:
        self.writer.write(client_frame(0x8, close_payload(1000)))
        assert (await read_frame(self.reader)).close == (1000, "")
        self.writer.close()


# -- 1. invalid configs are refused ------------------------------------------------------


async def test_invalid_configs_are_refused_and_the_old_config_keeps_serving(tmp_path, run_gateway, echo_servers):
    a, b = await echo_servers("A"), await echo_servers("B")
    path = tmp_path / "wsgate.yaml"
    gateway = await run_gateway(gateway_config([a]))
    bad_key = gateway_config([b], route={"bogus": 1})  # would send new connections to B
    bad_limit = gateway_config([b], limits={"max_connections": 1, "bogus": 1})
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(gateway.ws_url) as held:
            assert await ask(held, "who") == "A"
            failures = 0
            for text, expected in (
                ("listeners:\n  - name: test\n   bind: [\n", f"{path}: invalid YAML at line 3"),
                (yaml.safe_dump(bad_key), f"{path}: routes[0].bogus: unknown key"),
            ):
                line = await sighup(gateway, path, text)
                failures += 1
                assert line.startswith("reload refused; keeping the running config and the old certificates: ")
                assert expected in line
                # The open connection carries on, and new ones follow the old routes.
                assert await ask(held, "still there?") == "still there?"
                async with websockets.connect(gateway.ws_url) as fresh:
                    assert await ask(fresh, "who") == "A"
                metrics = await scrape(gateway.admin_url)
                assert metrics.value("wsgate_config_reloads_total", result="failure") == failures
                assert metrics.value("wsgate_config_reloads_total", result="success") in (None, 0)

            write_config(path, bad_limit)
            status, text = await post_reload(gateway.admin_url)
            assert status == 400
            assert text.startswith("reload refused: ")
            assert f"{path}: limits.bogus: unknown key" in text
            assert await ask(held, "who") == "A"
            async with websockets.connect(gateway.ws_url) as fresh:
                assert await ask(fresh, "who") == "A"
            metrics = await scrape(gateway.admin_url)
            assert metrics.value("wsgate_config_reloads_total", result="failure") == 3


# -- 2. backends added and removed ---------------------------------------------------------


def two_routes(backends: list[str]) -> dict[str, Any]:
    """The same backends behind a route that closes on removal (/c) and one that keeps (/k)."""
    route = {"hash_key": "query:room", "backends": [{"url": url} for url in backends]}
    return {
        "listeners": [{"name": "test", "bind": "127.0.0.1:0"}],
        "routes": [
            {"name": "close", "match": {"path_prefix": "/c"}, **route},
            {"name": "keep", "match": {"path_prefix": "/k"}, "on_backend_removed": "keep", **route},
        ],
        "shutdown": {"drain_period": f"{int(DRAIN_PERIOD * 1000)}ms", "grace_period": "5s"},
    }


async def test_removed_backends_close_with_1012_over_the_drain_period_and_new_ones_take_keys(
    tmp_path, run_gateway, echo_servers
):
    a, b, c = [await echo_servers(name) for name in "ABC"]
    names = {a: "A", b: "B", c: "C"}
    before, after = [a, b], [b, c]
    path = tmp_path / "wsgate.yaml"
    gateway = await run_gateway(two_routes(before))
    on_a = [room for room in ROOMS if owner(before, room) == a]
    on_b = [room for room in ROOMS if owner(before, room) == b]
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(STEP_TIMEOUT):
        closing = [await RawClient.open(gateway.ws_url, f"/c?room={room}") for room in on_a[:6]]
        kept = [await RawClient.open(gateway.ws_url, f"/k?room={room}") for room in on_a[6:8]]
        staying = [
            await RawClient.open(gateway.ws_url, f"/c?room={on_b[0]}"),
            await RawClient.open(gateway.ws_url, f"/k?room={on_b[1]}"),
        ]
        for client in closing + kept:
            assert await client.ask("who") == "A"
        for client in staying:
            assert await client.ask("who") == "B"

        waiters = [asyncio.create_task(client.await_close()) for client in closing]
        sent = loop.time()
        line = await sighup(gateway, path, two_routes(after))
        assert line.startswith("reloaded "), "".join(gateway.stderr)
        closes = await asyncio.gather(*waiters)

        # Connections on A (route "close") got 1012, spread over the drain period.
        assert {(code, reason) for _, code, reason in closes} == {(1012, "backend removed")}
        times = sorted(received - sent for received, _, _ in closes)
        assert times[-1] < DRAIN_PERIOD + 0.5, times
        # Six slots of 83 ms: first and last close are at least four slots apart.
        assert times[-1] - times[0] > DRAIN_PERIOD / 3, times
        # By now every close is done; the rest are still open and still relay.
        for client in kept:
            assert await client.ask("who") == "A"
            assert await client.ask("kept") == "kept"
        for client in staying:
            assert await client.ask("who") == "B"
            assert await client.ask("stayed") == "stayed"

        # New connections follow the ring of [B, C]: A's keys moved to B or C, and some
        # of B's to C (a new backend takes keys from every other).
        rooms = on_a[:20] + on_b[:20]
        served = {}
        for room in rooms:
            client = await RawClient.open(gateway.ws_url, f"/c?room={room}")
            served[room] = await client.ask("who")
            await client.close()
        assert served == {room: names[owner(after, room)] for room in rooms}
        assert set(served.values()) == {"B", "C"}

        # `wsgate explain` on the new file agrees.
        keys = tmp_path / "keys.txt"
        keys.write_text("\n".join(rooms) + "\n")
        explain = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wsgate", "explain", "-c", str(path), "--route", "close", "--keys", str(keys),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await explain.communicate()
        assert explain.returncode == 0
        explained = dict(line.split("\t") for line in out.decode().splitlines())
        assert {room: names[url] for room, url in explained.items()} == served

        for client in kept + staying:
            await client.close()
    assert sum("closing 6 connections on removed backends" in line for line in gateway.stderr) == 1


# -- 3. listeners added and removed ----------------------------------------------------------


def with_listeners(backend: str, *extra: dict[str, str]) -> dict[str, Any]:
    config = gateway_config([backend])
    config["listeners"] = [{"name": "main", "bind": "127.0.0.1:0"}, *extra]
    return config


async def test_listeners_are_added_and_removed_without_touching_the_others(tmp_path, run_gateway, echo_servers):
    a = await echo_servers("A")
    path = tmp_path / "wsgate.yaml"
    gateway = await run_gateway(with_listeners(a))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(gateway.ws_url) as on_main:
            assert await ask(on_main, "one") == "one"

            line = await sighup(gateway, path, with_listeners(a, {"name": "extra", "bind": "127.0.0.1:0"}))
            assert line.startswith("reloaded "), "".join(gateway.stderr)
            [extra] = [
                line.split("listening on ", 1)[1].split()[0]
                for line in gateway.stderr
                if line.rstrip().endswith("(extra)") and "listening on" in line
            ]
            async with websockets.connect(f"ws://{extra}") as on_extra:
                assert await ask(on_extra, "who") == "A"
                assert await ask(on_main, "two") == "two"

                line = await sighup(gateway, path, with_listeners(a))
                assert line.startswith("reloaded "), "".join(gateway.stderr)
                assert any("stopped listening on 127.0.0.1:0 (extra)" in line for line in gateway.stderr)
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection(*split(f"ws://{extra}"))
                # Accepted on the removed listener, it carries on.
                assert await ask(on_extra, "still here") == "still here"
            assert await ask(on_main, "three") == "three"
            async with websockets.connect(gateway.ws_url) as fresh:
                assert await ask(fresh, "who") == "A"
    # "main" was never rebound: one listening line for it, from start-up.
    assert sum("(main)" in line and "listening on" in line for line in gateway.stderr) == 1


# -- 4-6. in-process gateways reloaded with POST /reload ------------------------------------


async def started_from_file(start_admin: Any, path: Path, config: dict[str, Any]) -> Admin:
    admin = await start_admin(config)
    write_config(path, config)
    admin.gateway.config_path = str(path)
    return admin


async def reload_with(admin: Admin, path: Path, config: dict[str, Any]) -> str:
    write_config(path, config)
    status, text = await post_reload(admin.admin_url)
    assert status == 200, text
    return text


async def test_a_lowered_per_ip_limit_applies_to_new_connections(tmp_path, start_admin, ws_backend, access_records):
    path = tmp_path / "wsgate.yaml"
    config = gateway_config([ws_backend.url], limits={"max_connections_per_ip": 100})
    admin = await started_from_file(start_admin, path, config)
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(admin.ws_url) as first:
            async with websockets.connect(admin.ws_url) as second:
                assert await ask(second, "two at once") == "two at once"
            await access_records.next()  # the second one has ended, and its slot is free

            await reload_with(admin, path, gateway_config([ws_backend.url], limits={"max_connections_per_ip": 1}))
            reader, writer = await asyncio.open_connection(*split(admin.ws_url))
            writer.write(upgrade_request())
            status, headers, _ = await read_response_head(reader)
            writer.close()
            assert (status, headers["retry-after"]) == (429, "1")
            assert await ask(first, "still open") == "still open"
        entry = await access_records.next()  # the refusal
        assert (entry["status"], entry["reason"]) == (429, "too many connections from your address")
        await access_records.next()  # the first one has ended
        async with websockets.connect(admin.ws_url) as alone:
            assert await ask(alone, "alone") == "alone"


async def test_trusted_proxies_and_the_rate_limit_apply_to_new_connections(tmp_path, start_admin, ws_backend):
    path = tmp_path / "wsgate.yaml"
    admin = await started_from_file(start_admin, path, gateway_config([ws_backend.url]))
    via_proxy = upgrade_request(extra="X-Forwarded-For: 203.0.113.7\r\n")
    async with asyncio.timeout(STEP_TIMEOUT):
        assert (await raw_exchange(admin.ws_url, via_proxy))[0] == 101
        limits = {"new_connections_per_ip": {"rate": "1/m", "burst": 1}}
        config = gateway_config([ws_backend.url], trusted_proxies=["127.0.0.1"], limits=limits)
        await reload_with(admin, path, config)
        assert (await raw_exchange(admin.ws_url, via_proxy))[0] == 101
        status, headers, _ = await raw_exchange(admin.ws_url, via_proxy)
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert [r["x-forwarded-for"] for r in ws_backend.requests] == ["127.0.0.1", "203.0.113.7, 127.0.0.1"]
    assert [r["x-real-ip"] for r in ws_backend.requests] == ["127.0.0.1", "203.0.113.7"]


async def test_proxy_protocol_set_by_a_reload_applies_to_new_connections(tmp_path, start_admin, ws_backend):
    path = tmp_path / "wsgate.yaml"
    config = gateway_config([ws_backend.url])
    admin = await started_from_file(start_admin, path, config)
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(admin.ws_url) as before:
            config["listeners"][0]["proxy_protocol"] = "v1"
            await reload_with(admin, path, config)
            behind = proxy_v1_header(("203.0.113.7", 1)) + upgrade_request()
            status, _, _ = await raw_exchange(admin.ws_url, behind)
            assert status == 101
            assert ws_backend.requests[-1]["x-real-ip"] == "203.0.113.7"
            reader, writer = await asyncio.open_connection(*split(admin.ws_url))
            writer.write(upgrade_request())
            assert await reader.read() == b""  # no header now: closed unanswered
            writer.close()
            assert await ask(before, "still open") == "still open"


async def test_post_reload_reports_the_new_version_and_status_shows_it(
    tmp_path, start_admin, ws_backend, aiohttp_backend
):
    path = tmp_path / "wsgate.yaml"
    admin = await started_from_file(start_admin, path, gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        before = await get_status(admin.admin_url)
        text = await reload_with(admin, path, gateway_config([ws_backend.url, aiohttp_backend.url]))
        after = await get_status(admin.admin_url)
        metrics = await admin.scrape()
        async with websockets.connect(admin.ws_url) as ws:
            assert await ask(ws, "hello") == "hello"
    version = after["config"]["version"]
    assert text == f"reloaded, config version {version}\n"
    assert version != before["config"]["version"]
    assert after["config"]["loaded_at"] >= before["config"]["loaded_at"]
    assert list(backends_of(before, "test")) == [ws_backend.url]
    assert list(backends_of(after, "test")) == [ws_backend.url, aiohttp_backend.url]
    assert metrics.value("wsgate_config_reloads_total", result="success") == 1
    assert metrics.value("wsgate_backend_up", route="test", backend=aiohttp_backend.url) == 1


async def test_counts_from_before_a_reload_stay_and_go_on_after_it(
    tmp_path, start_admin, ws_backend, access_records
):
    path = tmp_path / "wsgate.yaml"
    admin = await started_from_file(start_admin, path, gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(admin.ws_url) as held:
            assert await ask(held, "before") == "before"
            async with websockets.connect(admin.ws_url) as ws:
                assert await ask(ws, "before") == "before"
            await access_records.next()
            await reload_with(admin, path, gateway_config([ws_backend.url], timeouts={"idle": "60s"}))
            assert await ask(held, "across") == "across"
            async with websockets.connect(admin.ws_url) as ws:
                assert await ask(ws, "after") == "after"
            await access_records.next()
        await access_records.next()
        metrics = await admin.scrape()
    assert metrics.value("wsgate_config_reloads_total", result="success") == 1
    assert metrics.value("wsgate_connections_total", route="test", outcome="upgraded",
                         protocol="http/1.1") == 3
    assert metrics.value("wsgate_handshake_duration_seconds_count", route="test") == 3
    assert metrics.value("wsgate_connection_duration_seconds_count", route="test") == 3
    assert metrics.value("wsgate_close_frames_total", code="1000", side="client") == 3
    assert metrics.value("wsgate_messages_total", route="test", direction="client_to_backend") == 4


def checked_and_ejecting(backends: list[str], interval: str | None, ejecting_check: bool = False) -> dict[str, Any]:
    """Route "checked" probes its backends every `interval` (none if None); route "ejecting"
    ejects a backend for a minute after one failed connect."""
    check = {"type": "tcp", "unhealthy_threshold": 1, "healthy_threshold": 100}
    checked: dict[str, Any] = {"name": "checked", "match": {"path_prefix": "/h"}}
    if interval is not None:
        checked["health_check"] = {**check, "interval": interval}
    ejecting: dict[str, Any] = {
        "name": "ejecting",
        "match": {"path_prefix": "/e"},
        "hash_key": "query:room",
        "passive_ejection": {"failures": 1, "backoff": "60s", "max_backoff": "60s"},
    }
    if ejecting_check:
        ejecting["health_check"] = {**check, "interval": "50ms"}
    return {
        "listeners": [{"name": "test", "bind": "127.0.0.1:0"}],
        "routes": [
            {**route, "backends": [{"url": url} for url in backends]} for route in (checked, ejecting)
        ],
    }


async def test_backends_that_stay_keep_their_health_and_ejection_state(
    tmp_path, start_admin, ws_backend, aiohttp_backend, closed_port
):
    dead, live, added = f"ws://127.0.0.1:{closed_port}", ws_backend.url, aiohttp_backend.url
    path = tmp_path / "wsgate.yaml"
    admin = await started_from_file(start_admin, path, checked_and_ejecting([dead, live], "50ms"))
    room = next(room for room in ROOMS if owner([dead, live], room) == dead)

    async def dead_is_down() -> bool:
        return not backends_of(await get_status(admin.admin_url), "checked")[dead]["healthy"]

    async with asyncio.timeout(STEP_TIMEOUT):
        # One failed connect ejects the dead backend; the connection fails over to the live one.
        async with websockets.connect(f"{admin.ws_url}/e?room={room}") as ws:
            assert await ask(ws, "failed over") == "failed over"
        await until(dead_is_down)

        # Probes every hour from now on: whatever the status says next was carried over.
        await reload_with(admin, path, checked_and_ejecting([dead, live, added], "1h"))
        status = await get_status(admin.admin_url)
    checked, ejecting = backends_of(status, "checked"), backends_of(status, "ejecting")
    assert [checked[url]["healthy"] for url in (dead, live, added)] == [False, True, True]
    assert [ejecting[url]["ejected"] for url in (dead, live, added)] == [True, False, False]
    assert [ejecting[url]["available"] for url in (dead, live, added)] == [False, True, True]


async def test_health_check_changes_apply_to_backends_that_stay(tmp_path, start_admin, ws_backend, closed_port):
    dead, live = f"ws://127.0.0.1:{closed_port}", ws_backend.url
    path = tmp_path / "wsgate.yaml"
    admin = await started_from_file(start_admin, path, checked_and_ejecting([dead, live], "50ms"))

    async def healthy(route: str) -> bool:
        return backends_of(await get_status(admin.admin_url), route)[dead]["healthy"]

    def dead_is_down(route: str) -> Callable[[], Awaitable[bool]]:
        async def down() -> bool:
            return not await healthy(route)

        return down

    async with asyncio.timeout(STEP_TIMEOUT):
        await until(dead_is_down("checked"))
        # "checked" loses its health check, "ejecting" gains one.
        await reload_with(admin, path, checked_and_ejecting([dead, live], None, ejecting_check=True))
        # No probe will ever bring the dead backend back: without checks, it counts as healthy.
        assert await healthy("checked")
        await until(dead_is_down("ejecting"))


async def test_a_listener_that_cannot_bind_refuses_the_reload(tmp_path, start_admin, ws_backend):
    path = tmp_path / "wsgate.yaml"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        config = gateway_config([ws_backend.url])
        admin = await started_from_file(start_admin, path, config)
        moved = gateway_config([ws_backend.url])
        moved["listeners"] = [{"name": "test", "bind": "127.0.0.1:%d" % busy.getsockname()[1]}]
        async with asyncio.timeout(STEP_TIMEOUT):
            version = (await get_status(admin.admin_url))["config"]["version"]
            write_config(path, moved)
            status, text = await post_reload(admin.admin_url)
            assert status == 400, text
            assert "cannot listen" in text
            assert (await get_status(admin.admin_url))["config"]["version"] == version
            async with websockets.connect(admin.ws_url) as ws:
                assert await ask(ws, "still listening") == "still listening"
            metrics = await admin.scrape()
            assert metrics.value("wsgate_config_reloads_total", result="failure") == 1
    finally:
        busy.close()


async def test_a_moved_listener_accepts_on_its_new_address_only(tmp_path, start_admin, ws_backend):
    path = tmp_path / "wsgate.yaml"
    admin = await started_from_file(start_admin, path, gateway_config([ws_backend.url]))
    moved = gateway_config([ws_backend.url])
    moved["listeners"] = [{"name": "test", "bind": "127.0.0.2:0"}]  # all of 127/8 is loopback on Linux
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(admin.ws_url) as held:
            await reload_with(admin, path, moved)
            [(host, port)] = admin.gateway.addresses
            assert host == "127.0.0.2"
            async with websockets.connect(f"ws://{host}:{port}") as ws:
                assert await ask(ws, "moved") == "moved"
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*split(admin.ws_url))
            assert await ask(held, "accepted before the move") == "accepted before the move"


def held_upgrade(request_seen: asyncio.Event, release: asyncio.Event) -> Any:
    """A raw backend handler that answers the upgrade only once `release` is set."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
        request_seen.set()
        await release.wait()
        key = next(
            line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
        )
        await reader.read()  # until the gateway hangs up

    return handler


@pytest.mark.parametrize("policy", ["close", "keep"])
async def test_a_handshake_under_way_follows_the_policy_of_the_backend_a_reload_removed(
    tmp_path, start_admin, raw_backend, ws_backend, policy
):
    request_seen, release = asyncio.Event(), asyncio.Event()
    held = await raw_backend(held_upgrade(request_seen, release))
    path = tmp_path / "wsgate.yaml"
    # The held backend never answers a Close: a short close timeout keeps the teardown short.
    sections = {"shutdown": {"drain_period": f"{DRAIN_PERIOD}s"}, "timeouts": {"close": "200ms"}}
    route = {"on_backend_removed": policy}
    admin = await started_from_file(start_admin, path, gateway_config([held.url], route=route, **sections))
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection(*split(admin.ws_url))
        writer.write(upgrade_request())
        await request_seen.wait()
        await reload_with(admin, path, gateway_config([ws_backend.url], route=route, **sections))
        release.set()
        status, _, _ = await read_response_head(reader)
        assert status == 101
        if policy == "close":
            _, close = await read_until_close(reader)
            assert close.close == (1012, "backend removed")
        else:
            writer.write(client_frame(0x1, b"still here"))
            await writer.drain()
            # The held backend never echoes: silence for a drain period is the connection
            # staying open, and its count is on the removed backend, not on the new one.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(read_frame(reader), DRAIN_PERIOD * 2)
            status_now = await get_status(admin.admin_url)
            assert backends_of(status_now, "test")[ws_backend.url]["active_connections"] == 0
        writer.close()


# -- 7. log settings apply at once; what takes a restart is named ------------------------------


def probed(backend: str, closed_port: int, **sections: Any) -> dict[str, Any]:
    """Route "test" to `backend`, and route "dead" to a closed port probed every 50 ms: its
    first failed probe logs a WARNING, every failed probe a DEBUG record."""
    check = {"type": "tcp", "interval": "50ms", "timeout": "1s", "unhealthy_threshold": 1}
    dead = {
        "name": "dead",
        "match": {"path_prefix": "/dead"},
        "backends": [{"url": f"ws://127.0.0.1:{closed_port}"}],
        "health_check": check,
    }
    return gateway_config([backend], extra_routes=[dead], **sections)


DEBUG_RECORD = r"(probe of \S+ failed)"


async def test_a_reload_applies_log_level(tmp_path, run_gateway, ws_backend, closed_port):
    path = tmp_path / "wsgate.yaml"
    gateway = await run_gateway(probed(ws_backend.url, closed_port, log={"level": "info"}))
    await gateway.wait_for_line(r"(backend \S+ is now unhealthy)")
    # That probe's DEBUG record came first, and the INFO level dropped it.
    assert not any("probe of" in line for line in gateway.stderr), "".join(gateway.stderr)
    line = await sighup(gateway, path, probed(ws_backend.url, closed_port, log={"level": "debug"}))
    assert line.startswith("reloaded "), "".join(gateway.stderr)
    await gateway.wait_for_line(DEBUG_RECORD)


async def test_a_command_line_log_level_holds_until_the_files_log_level_changes(
    tmp_path, run_gateway, ws_backend, closed_port
):
    path = tmp_path / "wsgate.yaml"
    config = probed(ws_backend.url, closed_port, log={"level": "warning"})
    gateway = await run_gateway(config, "--log-level", "info")
    # Logging is set up again, with the same log.level: --log-level info stays, so the INFO line shows.
    no_access_log = probed(ws_backend.url, closed_port, log={"level": "warning", "access": False})
    line = await sighup(gateway, path, no_access_log)
    assert line.startswith("reloaded "), "".join(gateway.stderr)
    # The file's log.level changed: now it is the one that counts.
    line = await sighup(gateway, path, probed(ws_backend.url, closed_port, log={"level": "debug"}))
    assert line.startswith("reloaded "), "".join(gateway.stderr)
    await gateway.wait_for_line(DEBUG_RECORD)


async def test_a_reload_applies_log_format(tmp_path, run_gateway, ws_backend):
    path = tmp_path / "wsgate.yaml"
    gateway = await run_gateway(gateway_config([ws_backend.url], log={"format": "text"}))
    assert all(not line.startswith("{") for line in gateway.stderr), "".join(gateway.stderr)
    await sighup(gateway, path, gateway_config([ws_backend.url], log={"format": "json"}))
    [line] = [line for line in gateway.stderr if "reloaded " in line]
    entry = json.loads(line)
    assert (entry["level"], entry["logger"]) == ("info", "wsgate.gateway")
    assert entry["message"].startswith("reloaded "), entry
    await sighup(gateway, path, gateway_config([ws_backend.url], log={"format": "text"}))
    line = [line for line in gateway.stderr if "reloaded " in line][-1]
    assert line.split()[2:5] == ["INFO", "wsgate.gateway:", "reloaded"], line


async def test_a_reload_applies_log_access(tmp_path, run_gateway, ws_backend):
    path = tmp_path / "wsgate.yaml"
    gateway = await run_gateway(gateway_config([ws_backend.url], log={"access": True}))

    async def one_connection() -> int:
        """A connection that has ended once this returns (and so has had its access line, if any)."""
        async with websockets.connect(gateway.ws_url) as ws:
            assert await ask(ws, "hello") == "hello"
            port = ws.local_address[1]

        async def ended() -> bool:
            return (await get_status(gateway.admin_url))["connections"] == 0

        await until(ended)
        return port

    async def access_lines(count: int) -> list[int]:
        """The client ports of the first `count` access lines, once that many are on stdout."""

        async def written() -> bool:
            return len(gateway.stdout) >= count

        await until(written)
        return [int(json.loads(line)["client"].rsplit(":", 1)[1]) for line in gateway.stdout]

    async with asyncio.timeout(STEP_TIMEOUT):
        logged = await one_connection()
        assert await access_lines(1) == [logged]
        await sighup(gateway, path, gateway_config([ws_backend.url], log={"access": False}))
        await one_connection()
        await sighup(gateway, path, gateway_config([ws_backend.url], log={"access": True}))
        logged_again = await one_connection()
        assert await access_lines(2) == [logged, logged_again]


RESTART_ONLY = {"workers": 2, "admin.bind": "127.0.0.2:0", "admin.enabled": False}


@pytest.mark.parametrize("key", list(RESTART_ONLY))
async def test_a_reload_names_each_setting_it_leaves_until_a_restart(tmp_path, run_gateway, ws_backend, key):
    path = tmp_path / "wsgate.yaml"
    gateway = await run_gateway(gateway_config([ws_backend.url]))
    changed = gateway_config([ws_backend.url], admin={"bind": "127.0.0.1:0"})
    section, _, name = key.rpartition(".")
    (changed[section] if section else changed)[name] = RESTART_ONLY[key]
    async with asyncio.timeout(STEP_TIMEOUT):
        version = (await get_status(gateway.admin_url))["config"]["version"]
        path.write_text(yaml.safe_dump(changed))
        # The admin server is where it was: it answers, and says what it left alone.
        for _ in range(2):
            answer = await post_reload(gateway.admin_url)
            assert answer == (200, f"reloaded, config version {version}; ignored until a restart: {key}\n")
            warning = await gateway.wait_for_line(r"WARNING wsgate\.gateway: (.*)")
            assert warning == f"ignored until a restart: {key}"
            assert (await get_status(gateway.admin_url))["config"]["restart_needed"] == [key]
        async with websockets.connect(gateway.ws_url) as ws:
            assert await ask(ws, "still serving") == "still serving"

        write_config(path, gateway_config([ws_backend.url]))
        assert await post_reload(gateway.admin_url) == (200, f"reloaded, config version {version}\n")
        assert (await get_status(gateway.admin_url))["config"]["restart_needed"] == []
