"""The balancer end to end: affinity, failover, bounded loads, passive ejection,
active health checks, DNS membership and rebalancing, through a running gateway
with real backends on loopback, and `wsgate explain` held to what the gateway does.

Every wait is bounded. Where a feature is about time, its timers are short (50 ms
probes, a 200 ms ejection backoff, rebalancing periods of 0.2 s and 1 s) and the tests
wait on what the backends, the gateway's log or its pool report. The only sleeps let
a backoff run out between attempts or give rebalancing ticks a chance to (wrongly) act.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import websockets
from aiohttp import WSMsgType, web
from conftest import gateway_config
from prometheus_client import generate_latest
from peers import (
    STEP_TIMEOUT,
    accept_upgrade,
    raw_exchange,
    read_until_close,
    server_frame,
    upgrade_request,
)

from wsgate.config import parse_config
from wsgate.hashring import HashRing
from wsgate.gateway import Gateway

# Probes every 50 ms, and one result flips a backend either way.
FAST_CHECK = {"interval": 0.05, "timeout": 0.5, "healthy_threshold": 1, "unhealthy_threshold": 1}
DNS_NAME = "chat.wsgate.test"

# The backends' own log: the gateway's TCP probes make websockets log every
# connection that closes before its request as a failed handshake.
_backend_log = logging.getLogger("tests.balancer.backend")
_backend_log.setLevel(logging.CRITICAL)


# -- waiting on events ---------------------------------------------------------------


class Changes:
    """Wakes waiters whenever a backend, the gateway's log or a DNS server reports something."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def until(
        self, predicate: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT
    ) -> None:
        """Return once `predicate()` holds; it is checked on every report and every 50 ms."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    waiter = loop.create_future()
                    self._waiters.append(waiter)
                    await asyncio.wait([waiter], timeout=0.05)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}") from None


class LogWatch(logging.Handler):
    """Every message of the `wsgate` loggers, each one a report to `changes`."""

    def __init__(self, changes: Changes) -> None:
        super().__init__(logging.DEBUG)
        self.changes = changes
        self.messages: list[str] = []
        self.levels: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.levels.append(record.levelno)
        self.changes.notify()

    def levels_of(self, *parts: str) -> list[int]:
        """The levels of the messages that contain every one of `parts`."""
        return [
            level
            for level, message in zip(self.levels, self.messages)
            if all(part in message for part in parts)
        ]

    def count(self, *parts: str) -> int:
        """How many messages contain every one of `parts`."""
        return sum(all(part in message for part in parts) for message in self.messages)


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def logs(changes: Changes):
    watch = LogWatch(changes)
    logger = logging.getLogger("wsgate")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(level)


# -- backends ------------------------------------------------------------------------


def _port_holder(host: str, port: int) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT, so that we alone can listen there again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Echo:
    """A `websockets` echo server that records who it serves.

    Each 101 names the server in an `X-Backend` header (its URL), which the gateway
    relays to the client. `GET /healthz` answers 200 or 503 and an upgrade on the
    probe path `/probe` succeeds or gets 503, as `healthy` says; neither counts as a
    connection. `stop_listening` closes only the listening socket: new connections
    are refused, open ones carry on. A bound socket that never listens keeps the
    port meanwhile, so `listen` comes back on the same address.
    """

    def __init__(self, changes: Changes, host: str = "127.0.0.1", port: int = 0) -> None:
        self.changes = changes
        self._hold = _port_holder(host, port)
        self.host = host
        self.port = self._hold.getsockname()[1]
        self.url = f"ws://{host}:{self.port}"
        self.healthy = True
        self.connections = 0  # upgrade requests from clients
        self.live: dict[Any, str] = {}  # open client connections and their request paths
        self._servers: list[Any] = []

    @property
    def open(self) -> int:
        return len(self.live)

    async def listen(self) -> None:
        sock = _port_holder(self.host, self.port)
        sock.listen(128)
        self._servers.append(
            await websockets.serve(
                self._serve,
                sock=sock,
                process_request=self._process_request,
                process_response=self._process_response,
                logger=_backend_log,
            )
        )

    async def stop_listening(self) -> None:
        """Close the listening socket; return once connecting is refused."""
        self._servers[-1].server.close()
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                try:
                    _, writer = await asyncio.open_connection(self.host, self.port)
                except ConnectionRefusedError:
                    return
                writer.close()
                await asyncio.sleep(0.01)  # the loop closes the socket in a later iteration

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await asyncio.wait_for(server.wait_closed(), STEP_TIMEOUT)
        self._hold.close()

    def _process_request(self, connection: Any, request: Any) -> Any:
        if request.path == "/healthz":
            return connection.respond(200 if self.healthy else 503, "health\n")
        if request.path == "/probe":
            return None if self.healthy else connection.respond(503, "unhealthy\n")
        self.connections += 1
        self.changes.notify()
        return None

    def _process_response(self, connection: Any, request: Any, response: Any) -> None:
        response.headers["X-Backend"] = self.url

    async def _serve(self, connection: Any) -> None:
        if connection.request.path == "/probe":
            return
        self.live[connection] = connection.request.path
        self.changes.notify()
        try:
            async for message in connection:
                await connection.send(message)
        except websockets.ConnectionClosed:
            pass
        finally:
            del self.live[connection]
            self.changes.notify()


class AiohttpEcho:
    """An aiohttp echo server with a `/healthz` route that says 200 or 503, as `healthy` says."""

    def __init__(self, changes: Changes) -> None:
        self.changes = changes
        self.healthy = True
        self.connections = 0
        self.live: dict[Any, str] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    @property
    def open(self) -> int:
        return len(self.live)

    async def listen(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"ws://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503, text="health\n")

    async def _echo(self, request: web.Request) -> web.WebSocketResponse:
        self.connections += 1
        ws = web.WebSocketResponse()
        ws.headers["X-Backend"] = self.url
        await ws.prepare(request)
        self.live[ws] = request.path_qs
        self.changes.notify()
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    await ws.send_str(message.data)
        finally:
            del self.live[ws]
            self.changes.notify()
        return ws


@pytest.fixture
async def echoes(changes: Changes):
    """`await echoes(n, host=, port=)`: n listening `Echo` servers."""
    made: list[Echo | AiohttpEcho] = []

    async def make(count: int, host: str = "127.0.0.1", port: int = 0) -> list[Echo]:
        servers = []
        for _ in range(count):
            echo = Echo(changes, host, port)
            made.append(echo)
            await echo.listen()
            servers.append(echo)
        return servers

    make.made = made  # type: ignore[attr-defined]
    yield make
    for server in made:
        await server.close()


@pytest.fixture
async def gateway():
    """`await gateway(config)` starts a gateway in this loop: (the Gateway, its ws:// URL)."""
    started: list[Gateway] = []

    async def start(config: dict[str, Any]) -> tuple[Gateway, str]:
        gw = Gateway(parse_config(config))
        await gw.start()
        started.append(gw)
        host, port = gw.addresses[0]
        return gw, f"ws://{host}:{port}"

    yield start
    for gw in started:
        await gw.close()


# -- clients -------------------------------------------------------------------------


def _target(url: str, hash_key: str, key: str | None) -> tuple[str, dict[str, Any]]:
    """The URI and connect() options that carry `key` as `hash_key` reads it (None: no key)."""
    options: dict[str, Any] = {"open_timeout": STEP_TIMEOUT, "close_timeout": STEP_TIMEOUT}
    if key is None:
        return url + "/", options
    kind, _, name = hash_key.partition(":")
    if kind == "ip":
        options["local_addr"] = (key, 0)
        return url + "/", options
    if kind == "path":
        return url + key, options
    if kind == "query":
        return f"{url}/?{name}={key}", options
    if kind == "header":
        options["additional_headers"] = {name: key}
    elif kind == "cookie":
        options["additional_headers"] = {"Cookie": f"other=1; {name}={key}"}
    return url + "/", options


async def connect(url: str, hash_key: str = "query:room", key: str | None = None) -> tuple[Any, str]:
    """An open client connection through the gateway, and the URL of the backend serving it."""
    uri, options = _target(url, hash_key, key)
    ws = await websockets.connect(uri, **options)
    return ws, ws.response.headers["X-Backend"]


async def served_by(url: str, hash_key: str = "query:room", key: str | None = None) -> str:
    """The backend one connection with `key` lands on; the connection is closed again."""
    ws, backend = await connect(url, hash_key, key)
    await ws.close()
    return backend


async def echo_works(ws: Any, text: str = "still here") -> bool:
    await ws.send(text)
    return await asyncio.wait_for(ws.recv(), STEP_TIMEOUT) == text


def key_first_on(urls: list[str], backend: str, count: int = 1) -> list[str]:
    """`count` keys room-N whose first choice among `urls` is `backend`."""
    ring = HashRing(urls)
    found = [f"room-{i}" for i in range(1000) if urls[ring.pick(f"room-{i}".encode())] == backend]
    return found[:count]


def order_of(urls: list[str], key: str) -> list[str]:
    return [urls[i] for i in HashRing(urls).order(key.encode())]


# -- wsgate explain as a user runs it --------------------------------------------------


async def wsgate_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsgate", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(3 * STEP_TIMEOUT):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, out.decode(), err.decode()


def write_config(directory: Path, config: dict[str, Any], name: str = "wsgate.yaml") -> Path:
    path = directory / name
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


async def explain_owners(directory: Path, config: dict[str, Any], keys: list[str]) -> dict[str, str]:
    """`wsgate explain --keys FILE` for the route `test`: each key's chosen backend."""
    path = write_config(directory, config, "explain.yaml")
    key_file = directory / "keys.txt"
    key_file.write_text("".join(key + "\n" for key in keys))
    status, out, err = await wsgate_cli(
        "explain", "-c", str(path), "--route", "test", "--keys", str(key_file)
    )
    assert status == 0, err
    owners = dict(line.split("\t") for line in out.splitlines())
    assert list(owners) == keys
    return owners


_ORDER_LINE = re.compile(r"^\s*(\d+)\. (\S+)  (chosen|fallback)$")


async def explain_order(directory: Path, config: dict[str, Any], key: str) -> list[str]:
    """`wsgate explain --key KEY` for the route `test`: the backends in the key's order."""
    path = write_config(directory, config, "explain.yaml")
    status, out, err = await wsgate_cli("explain", "-c", str(path), "--route", "test", "--key", key)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == f"route test, key {key!r} (hash_key {config['routes'][0].get('hash_key', 'ip')}):"
    order = []
    for rank, line in enumerate(lines[1:], start=1):
        match = _ORDER_LINE.match(line)
        assert match, line
        assert int(match[1]) == rank
        assert match[3] == ("chosen" if rank == 1 else "fallback")
        order.append(match[2])
    return order


# == 1. Affinity ======================================================================

KEYS = {
    # Clients connect from these source addresses (all of 127/8 is loopback on Linux).
    "ip": [f"127.0.0.{i}" for i in range(1, 13)],
    "header:X-User": [f"user-{i}" for i in range(12)],
    "cookie:session": [f"s{i:04x}" for i in range(12)],
    "query:room": [f"room-{i}" for i in range(12)],
    "path": [f"/rooms/{i}" for i in range(12)],
}


@pytest.mark.parametrize("hash_key", list(KEYS))
async def test_same_key_same_backend_as_explain_says(hash_key, echoes, gateway, tmp_path):
    backends = await echoes(3)
    config = gateway_config([b.url for b in backends], route={"hash_key": hash_key})
    keys = KEYS[hash_key]
    # explain runs in its own process while the gateway serves.
    explained = asyncio.create_task(explain_owners(tmp_path, config, keys))
    _, url = await gateway(config)
    async with asyncio.timeout(4 * STEP_TIMEOUT):
        seen = {}
        for key in keys:
            landed = await asyncio.gather(*(served_by(url, hash_key, key) for _ in range(4)))
            assert len(set(landed)) == 1, f"{key!r} landed on {landed}"
            seen[key] = landed[0]
        assert seen == await explained
    assert len(set(seen.values())) > 1, "different keys should spread over the backends"
    assert sum(b.connections for b in backends) == 4 * len(keys)


async def test_hash_fallback_random_spreads_and_ip_pins(echoes, gateway, tmp_path):
    backends = await echoes(3)
    urls = [b.url for b in backends]
    config = gateway_config(
        urls,
        route={"hash_key": "header:X-User", "match": {"path_prefix": "/pinned"}},
        extra_routes=[{
            "name": "spread",
            "match": {"path_prefix": "/spread"},
            "backends": [{"url": u} for u in urls],
            "hash_key": "header:X-User",
            "hash_fallback": "random",
        }],
    )
    explained = asyncio.create_task(explain_owners(tmp_path, config, ["127.0.0.1", "127.0.0.7", "alice"]))
    _, url = await gateway(config)
    async with asyncio.timeout(4 * STEP_TIMEOUT):
        spread = await asyncio.gather(*(served_by(url + "/spread") for _ in range(30)))
        pinned = await asyncio.gather(*(served_by(url + "/pinned") for _ in range(10)))
        other = await asyncio.gather(*(served_by(url + "/pinned", "ip", "127.0.0.7") for _ in range(5)))
        # The key, when present, still decides, on either route.
        alice = await asyncio.gather(
            *(served_by(url + path, "header:X-User", "alice") for path in ["/pinned", "/spread"] * 3)
        )
        owners = await explained
    assert len(set(spread)) > 1, "hash_fallback random should spread keyless connections"
    assert set(pinned) == {owners["127.0.0.1"]}
    assert set(other) == {owners["127.0.0.7"]}
    assert set(alice) == {owners["alice"]}


# == 2. The same choice in every process ====================================================


async def _start_gateway_process(config_path: Path, seed: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsgate", "run", "-c", str(config_path),
        env={**os.environ, "PYTHONHASHSEED": seed},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(3 * STEP_TIMEOUT):
            while True:
                line = (await process.stderr.readline()).decode()
                assert line, "the gateway exited before listening"
                if match := re.search(r"listening on (127\.0\.0\.1:\d+)", line):
                    return process, f"ws://{match[1]}"
    except BaseException:
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise


async def test_two_gateway_processes_send_keys_to_the_same_backends(echoes, tmp_path):
    backends = await echoes(3)
    urls = [b.url for b in backends]
    config = gateway_config(
        urls, route={"hash_key": "query:room"}, admin={"enabled": False}, log={"level": "info"}
    )
    path = write_config(tmp_path, config)
    keys = [f"room-{i}" for i in range(16)]
    started = await asyncio.gather(
        _start_gateway_process(path, "1"), _start_gateway_process(path, "2"), return_exceptions=True
    )
    processes = [item[0] for item in started if isinstance(item, tuple)]
    drains = [asyncio.create_task(p.stderr.read()) for p in processes]  # never let a pipe fill
    try:
        for item in started:
            if isinstance(item, BaseException):
                raise item
        async with asyncio.timeout(4 * STEP_TIMEOUT):
            choices = [
                {key: await served_by(url, "query:room", key) for key in keys}
                for _, url in started
            ]
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STEP_TIMEOUT):
            statuses = [await process.wait() for process in processes]
        await asyncio.gather(*drains)
    assert statuses == [0, 0]
    ring = HashRing(urls)
    assert choices[0] == choices[1] == {key: urls[ring.pick(key.encode())] for key in keys}
    assert len(set(choices[0].values())) > 1


# == 3. Failover ===========================================================================


async def test_failover_follows_the_keys_order_and_retries_0_gives_502(echoes, gateway, tmp_path):
    backends = await echoes(3)
    by_url = {b.url: b for b in backends}
    urls = list(by_url)
    (key,) = key_first_on(urls, urls[0])
    config = gateway_config(urls, route={"hash_key": "query:room"})
    order = await explain_order(tmp_path, config, key)
    assert order == order_of(urls, key)
    _, url = await gateway(config)
    _, url_no_retries = await gateway(
        gateway_config(urls, route={"hash_key": "query:room", "retries": 0})
    )
    async with asyncio.timeout(4 * STEP_TIMEOUT):
        assert await served_by(url, key=key) == order[0]

        await by_url[order[0]].stop_listening()
        assert await served_by(url, key=key) == order[1]
        status, _, _ = await raw_exchange(url_no_retries, upgrade_request(f"/?room={key}"))
        assert status == 502

        await by_url[order[1]].stop_listening()
        assert await served_by(url, key=key) == order[2]
    assert [by_url[u].connections for u in order] == [1, 1, 1]


# == 4. Bounded loads ======================================================================


async def test_bounded_loads_spread_a_hot_key(echoes, gateway, changes):
    backends = await echoes(4)
    urls = [b.url for b in backends]
    factor = Fraction(5, 4)
    _, url = await gateway(
        gateway_config(urls, route={"hash_key": "query:room", "balance_factor": 1.25})
    )
    ring = HashRing(urls)
    model = [0] * 4  # what the bounded-loads rule predicts, connection by connection
    first = urls[ring.pick(b"hot")]
    clients = []
    try:
        async with asyncio.timeout(4 * STEP_TIMEOUT):
            for n in range(1, 41):
                ws, backend = await connect(url, key="hot")
                clients.append(ws)
                chosen = ring.pick(b"hot", loads=model, balance_factor=1.25)
                model[chosen] += 1
                assert backend == urls[chosen], f"connection {n}"
                await changes.until(
                    lambda n=n: sum(b.open for b in backends) == n, f"{n} open connections"
                )
                loads = [b.open for b in backends]
                assert loads == model
                assert max(loads) <= math.ceil(factor * n / len(backends)), f"{loads} after {n}"
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))
    assert loads[urls.index(first)] == max(loads)
    assert min(loads) > 0, "a hot key overflows onto every backend"


async def test_bounded_loads_hold_for_a_burst_of_handshakes(echoes, gateway, changes):
    """Forty hot-key handshakes at once: those still under way count as load."""
    backends = await echoes(4)
    urls = [b.url for b in backends]
    _, url = await gateway(
        gateway_config(urls, route={"hash_key": "query:room", "balance_factor": 1.25})
    )
    clients = []
    try:
        async with asyncio.timeout(4 * STEP_TIMEOUT):
            results = await asyncio.gather(*(connect(url, key="hot") for _ in range(40)))
            clients = [ws for ws, _ in results]
            await changes.until(lambda: sum(b.open for b in backends) == 40, "40 open connections")
            loads = [b.open for b in backends]
            assert max(loads) <= math.ceil(Fraction(5, 4) * 40 / len(backends)), loads
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))


# == 5. Passive ejection ===================================================================


async def test_passive_ejection_backoff_and_probation(raw_backend, echoes, gateway, logs):
    """failures 2, backoff 200 ms: two failed connects eject the bad backend; it is left
    alone until the backoff ends; then one more failure ejects it for twice as long; once
    it answers, its keys come back."""
    serving = False

    async def bad_then_good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not serving:
            return  # accept the TCP connection, then close it at once
        await accept_upgrade(reader, writer, b"X-Backend: " + bad.url.encode() + b"\r\n")
        _, close = await read_until_close(reader)
        writer.write(server_frame(0x8, close.payload))
        await writer.drain()

    bad = await raw_backend(bad_then_good)
    (good,) = await echoes(1)
    urls = [bad.url, good.url]
    (key,) = key_first_on(urls, bad.url)
    _, url = await gateway(gateway_config(urls, route={
        "hash_key": "query:room",
        "passive_ejection": {"failures": 2, "backoff": 0.2, "max_backoff": 10},
    }))
    loop = asyncio.get_running_loop()

    async def attempts_until_bad_is_tried(limit: float) -> list[tuple[float, float, str]]:
        """Connections with `key`, 20 ms apart, until one reaches `bad`: (sent, done, served by)."""
        made = []
        start = bad.connections
        deadline = loop.time() + limit
        while bad.connections == start:
            assert loop.time() < deadline, f"{bad.url} was not tried again within {limit}s"
            sent = loop.time()
            backend = await served_by(url, key=key)
            made.append((sent, loop.time(), backend))
            if bad.connections == start:
                await asyncio.sleep(0.02)  # let the backoff run out
        return made

    async with asyncio.timeout(4 * STEP_TIMEOUT):
        assert await served_by(url, key=key) == good.url
        assert bad.connections == 1 and logs.count("ejected") == 0
        before_ejection = loop.time()
        assert await served_by(url, key=key) == good.url
        ejected = loop.time()
        assert bad.connections == 2
        assert logs.count("ejected backend " + bad.url, "for 0.2s") == 1

        # Ejected: straight to the next backend, until the backoff runs out.
        made = await attempts_until_bad_is_tried(0.2 + 3.0)
        assert len(made) >= 2, "connections during the backoff must skip the ejected backend"
        *skipped, (retry_sent, retry_done, retry_backend) = made
        # The gateway's clock lies between our readings around each event (1 ms of slack).
        assert all(sent < ejected + 0.2 + 0.001 for sent, _, _ in skipped)
        assert retry_done >= before_ejection + 0.2 - 0.001
        # Probation: the one failure ejects it again, for twice as long.
        assert retry_backend == good.url
        assert bad.connections == 3
        assert logs.count("ejected backend " + bad.url, "for 0.4s") == 1
        reejected = loop.time()

        serving = True
        made = await attempts_until_bad_is_tried(0.4 + 3.0)
        assert len(made) >= 2
        *skipped, (sent, done, backend) = made
        assert all(s < reejected + 0.4 + 0.001 for s, _, _ in skipped)
        assert done >= retry_sent + 0.4 - 0.001
        assert backend == bad.url
        # A success ends the ejection for good: its keys are back.
        assert [await served_by(url, key=key) for _ in range(3)] == [bad.url] * 3
    assert logs.count("ejected backend") == 2


async def test_a_burst_of_failures_ejects_once(raw_backend, echoes, gateway, logs):
    """Ten connects in flight when the backend fails them all: one ejection for the base
    backoff, not ten doublings of it (failures of attempts made before the ejection are
    already counted)."""
    all_in = asyncio.Event()

    async def close_once_all_arrived(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if bad.connections == 10:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), STEP_TIMEOUT)

    bad = await raw_backend(close_once_all_arrived)
    (good,) = await echoes(1)
    urls = [bad.url, good.url]
    (key,) = key_first_on(urls, bad.url)
    gw, url = await gateway(gateway_config(urls, route={
        "hash_key": "query:room",
        "passive_ejection": {"failures": 2, "backoff": 0.2, "max_backoff": 100},
    }))
    async with asyncio.timeout(4 * STEP_TIMEOUT):
        landed = await asyncio.gather(*(served_by(url, key=key) for _ in range(10)))
    assert landed == [good.url] * 10
    assert bad.connections == 10
    assert logs.count("ejected backend") == 1
    assert logs.count("ejected backend " + bad.url, "for 0.2s") == 1
    (member,) = [m for m in gw.pools["test"].members if m.identity == bad.url]
    # One ejection so far: the next would last twice the base.
    assert member.backoff.next_duration() == 0.4


def test_an_ejected_member_is_skipped_until_its_ejection_ends():
    """The pool skips members it saw ejected without walking every member per handshake,
    and takes them back once their ejection has run out."""
    urls = [f"ws://127.0.0.1:{port}" for port in range(9001, 9005)]
    config = parse_config(gateway_config(urls, route={
        "passive_ejection": {"failures": 1, "backoff": 10, "max_backoff": 10},
    }))
    gw = Gateway(config)
    pool = gw.pools["test"]
    key = b"room-7"
    first = next(pool.candidates(key, 0.0))
    assert pool.on_failed(first, 0.0, "refused")
    assert first not in list(pool.candidates(key, 5.0))
    assert first not in list(pool.candidates(key, 9.9))
    assert next(pool.candidates(key, 10.0)) is first


# == 6. Active health checks (and a backend that goes away and comes back) ==============


@pytest.mark.parametrize("check", ["http", "websocket", "tcp"])
async def test_unhealthy_backend_gets_no_new_connections_until_healthy(
    check, echoes, changes, gateway, logs
):
    """http: /healthz says 503; websocket: the probe's upgrade gets 503; tcp: the backend
    stops listening, then listens again on the same port. Open connections never move."""
    if check == "http":
        toggled: Echo | AiohttpEcho = AiohttpEcho(changes)
        echoes.made.append(toggled)
        await toggled.listen()
        backends = [toggled, *await echoes(2)]
    else:
        backends = await echoes(3)
        toggled = backends[0]
    urls = [b.url for b in backends]
    by_url = {b.url: b for b in backends}
    (key,) = key_first_on(urls, toggled.url)
    fallback = by_url[order_of(urls, key)[1]]
    path = {"http": "/healthz", "websocket": "/probe", "tcp": "/"}[check]
    gw, url = await gateway(gateway_config(urls, route={
        "hash_key": "query:room",
        "health_check": {"type": check, "path": path, **FAST_CHECK},
        "passive_ejection": {"failures": 0},  # only the probes decide
        "retries": 0,  # a refused connection is no failover: the probes alone steer
    }))
    member = next(m for m in gw.pools["test"].members if m.identity == toggled.url)

    async with asyncio.timeout(4 * STEP_TIMEOUT):
        kept, backend = await connect(url, key=key)
        assert backend == toggled.url

        if check == "tcp":
            await toggled.stop_listening()
        else:
            toggled.healthy = False
        await changes.until(
            lambda: logs.count(f"backend {toggled.url} is now unhealthy"), "the probe to fail"
        )
        assert not member.healthy
        during = [await connect(url, key=key) for _ in range(3)]
        assert [backend for _, backend in during] == [fallback.url] * 3
        assert toggled.connections == 1
        # The open connection stays where it is.
        assert await echo_works(kept)
        assert toggled.open == 1

        if check == "tcp":
            await toggled.listen()  # the same port again
        else:
            toggled.healthy = True
        await changes.until(
            lambda: logs.count(f"backend {toggled.url} is now healthy"), "the probe to pass"
        )
        # Recovery is good news, not a warning.
        assert logs.levels_of(f"backend {toggled.url} is now unhealthy") == [logging.WARNING]
        assert logs.levels_of(f"backend {toggled.url} is now healthy") == [logging.INFO]
        assert [await served_by(url, key=key) for _ in range(3)] == [toggled.url] * 3
        # Neither the connection kept through the outage nor those made during it moved.
        assert await echo_works(kept)
        for ws, _ in during:
            assert await echo_works(ws)
        await changes.until(
            lambda: toggled.open == 1 and fallback.open == 3, "the probing connections to close"
        )
        for ws in [kept, *(ws for ws, _ in during)]:
            await ws.close()


# == 7. DNS membership from a real DNS server ================================================


class Dnsmasq:
    """dnsmasq on 127.0.0.1 answering for DNS_NAME from a hosts file that the test rewrites."""

    def __init__(self, executable: str, directory: Path, changes: Changes) -> None:
        self.executable = executable
        self.hosts = directory / "dns-hosts"
        self.changes = changes
        self.port = 0
        self.output: list[str] = []
        self.exited = False
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    def loads(self) -> int:
        """How often dnsmasq has read the hosts file."""
        return sum(f"read {self.hosts}" in line for line in self.output)

    def _write(self, addresses: list[str]) -> None:
        self.hosts.write_text("".join(f"{address} {DNS_NAME}\n" for address in addresses))

    async def start(self, addresses: list[str]) -> None:
        self._write(addresses)
        for _ in range(5):
            # dnsmasq cannot report a port it picked, so take one that was free a moment
            # ago and try again if it was taken meanwhile.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
            args = [
                self.executable, "--no-daemon", f"--port={self.port}",
                "--listen-address=127.0.0.1", "--bind-interfaces",
                "--no-resolv", "--no-hosts", f"--addn-hosts={self.hosts}",
                # Authoritative for the test domain: AAAA gets an empty answer, not REFUSED.
                "--local=/wsgate.test/",
                "--log-facility=-", "--pid-file=",
            ]
            if os.geteuid() == 0:
                args.append("--user=root")  # so that it can read the hosts file in tmp_path
            self.output, self.exited = [], False
            self.process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            self._reader = asyncio.create_task(self._read(self.process))
            await self.changes.until(lambda: self.loads() or self.exited, "dnsmasq to start")
            if not self.exited:
                return
            await self.process.wait()
            if not any("in use" in line for line in self.output):
                raise AssertionError("dnsmasq failed:\n" + "".join(self.output))
        raise AssertionError("dnsmasq found no free port in 5 tries")

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        while line := (await process.stdout.readline()).decode():
            self.output.append(line)
            self.changes.notify()
        self.exited = True
        self.changes.notify()

    async def set(self, addresses: list[str]) -> None:
        """Answer with `addresses` from now on."""
        loads = self.loads()
        self._write(addresses)
        self.process.send_signal(signal.SIGHUP)  # dnsmasq reads its hosts files again
        await self.changes.until(lambda: self.loads() > loads, "dnsmasq to read its hosts file")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await self._reader


@pytest.fixture
async def dnsmasq(tmp_path, changes):
    executable = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if executable is None:
        reason = "dnsmasq is not installed (scripts/test.sh installs dnsmasq-base)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    server = Dnsmasq(executable, tmp_path, changes)
    yield server
    await server.stop()


async def two_addresses_one_port(echoes) -> tuple[Echo, Echo]:
    """Echo servers on 127.0.0.2:P and 127.0.0.3:P, one port for both, as a DNS name gives."""
    for _ in range(5):
        try:
            (second,) = await echoes(1, "127.0.0.2")
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                pytest.skip("127.0.0.2 is not a local address on this system")
            raise
        try:
            (third,) = await echoes(1, "127.0.0.3", second.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return second, third
    raise AssertionError("no port free on both 127.0.0.2 and 127.0.0.3 in 5 tries")


def dns_route_config(port: int, dns_port: int, **route: Any) -> dict[str, Any]:
    return gateway_config(
        [],
        route={"backends": [{"dns": f"{DNS_NAME}:{port}"}], "hash_key": "query:room", **route},
        discovery={"nameservers": [f"127.0.0.1:{dns_port}"], "resolve_interval": 0.1},
    )


def resolves_to(logs: LogWatch, *addresses: str) -> Callable[[], bool]:
    message = f"route test: {DNS_NAME} now resolves to {', '.join(addresses)}"
    return lambda: message in logs.messages


async def test_dns_membership_follows_the_name(dnsmasq, echoes, gateway, logs, changes):
    second, third = await two_addresses_one_port(echoes)
    await dnsmasq.start(["127.0.0.2"])
    gw, url = await gateway(dns_route_config(second.port, dnsmasq.port))
    pool = gw.pools["test"]
    assert [m.identity for m in pool.members] == [second.url]
    keys = [f"room-{i}" for i in range(12)]
    ring = HashRing([second.url, third.url])
    to_third = {k for k in keys if ring.pick(k.encode()) == 1}
    assert to_third and to_third != set(keys), "the keys should split between the two"
    kept = []
    try:
        async with asyncio.timeout(4 * STEP_TIMEOUT):
            for key in keys:
                ws, backend = await connect(url, key=key)
                kept.append(ws)
                assert backend == second.url

            await dnsmasq.set(["127.0.0.2", "127.0.0.3"])
            await changes.until(resolves_to(logs, "127.0.0.2", "127.0.0.3"), "the gateway to see .3")
            now = {key: await served_by(url, key=key) for key in keys}
            assert {k for k, b in now.items() if b == third.url} == to_third
            assert {k for k, b in now.items() if b == second.url} == set(keys) - to_third

            await dnsmasq.set(["127.0.0.3"])
            await changes.until(resolves_to(logs, "127.0.0.3"), "the gateway to drop .2")
            assert [m.identity for m in pool.members] == [third.url]
            assert {await served_by(url, key=key) for key in keys} == {third.url}

            # Open connections stay on their backend through both changes.
            for ws in kept:
                assert await echo_works(ws)
            await changes.until(
                lambda: second.open == len(keys) and third.open == 0, "the probing connections to close"
            )
    finally:
        await asyncio.gather(*(ws.close() for ws in kept))


async def test_a_backend_dropped_by_dns_leaves_no_series(dnsmasq, echoes, gateway, logs, changes):
    second, third = await two_addresses_one_port(echoes)
    await dnsmasq.start(["127.0.0.2", "127.0.0.3"])
    gw, url = await gateway(dns_route_config(second.port, dnsmasq.port))
    await changes.until(resolves_to(logs, "127.0.0.2", "127.0.0.3"), "the gateway to see both")
    async with asyncio.timeout(4 * STEP_TIMEOUT):
        [key] = key_first_on([second.url, third.url], second.url)
        assert await served_by(url, key=key) == second.url
        await changes.until(lambda: second.open == 0, "the connection to close")
        await dnsmasq.set(["127.0.0.3"])
        await changes.until(resolves_to(logs, "127.0.0.3"), "the gateway to drop .2")
    gw.flush_metrics()  # what a scrape does first
    exposition = generate_latest(gw.registry).decode()
    assert f'backend="{third.url}"' in exposition
    assert f'backend="{second.url}"' not in exposition


async def test_close_survives_a_cancel_lost_while_resolving(monkeypatch):
    """On Python 3.11, asyncio.wait_for (inside dnspython) returns the answer instead of
    raising when a cancel lands as the answer arrives. The resolve loop then carries on,
    and closing the gateway must still finish."""
    lost = asyncio.Event()
    calls = 0

    async def resolve(name: str, discovery: Any) -> list[str]:
        nonlocal calls
        calls += 1
        if calls > 1 and not lost.is_set():
            try:
                await asyncio.sleep(STEP_TIMEOUT)
            except asyncio.CancelledError:
                lost.set()  # and return the answer, as wait_for does
        return ["127.0.0.2"]

    monkeypatch.setattr("wsgate.balancer.resolve", resolve)
    gw = Gateway(parse_config(dns_route_config(9, 53)))
    await gw.start()
    async with asyncio.timeout(STEP_TIMEOUT):
        while calls < 2:
            await asyncio.sleep(0.01)  # the resolve loop's interval is 100 ms
        await gw.close()
    assert lost.is_set()


# == 8. wsgate explain ======================================================================

EXPLAIN_URLS = ["ws://10.0.0.1:8000", "ws://10.0.0.2:8000", "ws://10.0.0.3:8000"]


async def test_explain_prints_the_order_and_tab_separated_owners(tmp_path):
    config = gateway_config(EXPLAIN_URLS, route={"hash_key": "query:room"})
    path = str(write_config(tmp_path, config))
    ring = HashRing(EXPLAIN_URLS)

    def owner(key: str) -> str:
        return EXPLAIN_URLS[ring.pick(key.encode())]

    key_file = tmp_path / "keys.txt"
    key_file.write_text("alice\nbob\n\ncarol\r\nroom 7\n")
    single, several, from_file, unknown = await asyncio.gather(
        wsgate_cli("explain", "-c", path, "--route", "test", "--key", "alice"),
        wsgate_cli("explain", "-c", path, "--route", "test", "--key", "alice", "--key", "bob"),
        wsgate_cli("explain", "-c", path, "--route", "test", "--key", "dave", "--keys", str(key_file)),
        wsgate_cli("explain", "-c", path, "--route", "nope", "--key", "alice"),
    )

    status, out, err = single
    assert status == 0, err
    order = order_of(EXPLAIN_URLS, "alice")
    assert out.splitlines() == [
        "route test, key 'alice' (hash_key query:room):",
        f"   1. {order[0]}  chosen",
        f"   2. {order[1]}  fallback",
        f"   3. {order[2]}  fallback",
    ]

    status, out, err = several
    assert status == 0, err
    assert out.splitlines() == [f"alice\t{owner('alice')}", f"bob\t{owner('bob')}"]

    status, out, err = from_file
    assert status == 0, err
    keys = ["dave", "alice", "bob", "carol", "room 7"]
    assert out.splitlines() == [f"{key}\t{owner(key)}" for key in keys]

    status, out, err = unknown
    assert status == 2
    assert out == ""
    assert "no route named 'nope'; routes: test" in err


# == 9. Rebalancing after scale-out ==========================================================


class Holders:
    """Clients that each keep a connection open with their key, reconnecting whenever the
    gateway closes it, and record every close they see."""

    def __init__(self, url: str, keys: list[str], changes: Changes) -> None:
        self.url = url
        self.keys = keys
        self.changes = changes
        self.served: dict[int, str] = {}  # client -> backend of its current connection
        self.closes: list[tuple[float, str, int | None, str, str]] = []  # when, key, code, reason, from
        self._current: dict[int, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        """Connect the clients one after another, then keep them connected."""
        for index, key in enumerate(self.keys):
            self._tasks.append(asyncio.create_task(self._hold(index, key)))
            await self.changes.until(self.alive(lambda i=index: i in self.served), "a client to connect")

    async def _hold(self, index: int, key: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            ws, backend = await connect(self.url, key=key)
            self.served[index], self._current[index] = backend, ws
            self.changes.notify()
            await ws.wait_closed()
            if self._stopping:
                return
            self.closes.append((loop.time(), key, ws.close_code, ws.close_reason, backend))
            self.changes.notify()

    def alive(self, wanted: Callable[[], bool]) -> Callable[[], bool]:
        """`wanted`, failing at once if a client stopped (its exception, if any)."""
        def check() -> bool:
            for task in self._tasks:
                if task.done():
                    task.result()
                    raise AssertionError("a client stopped")
            return wanted()
        return check

    def keys_on(self, backend: str) -> set[str]:
        return {self.keys[i] for i, served in self.served.items() if served == backend}

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*(ws.close() for ws in self._current.values()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_rebalancing_moves_misplaced_connections_a_few_at_a_time(
    dnsmasq, echoes, gateway, logs, changes
):
    period = 1.0
    second, third = await two_addresses_one_port(echoes)
    await dnsmasq.start(["127.0.0.2"])
    _, url = await gateway(
        dns_route_config(second.port, dnsmasq.port, rebalance={"max_fraction": 0.2, "period": period})
    )
    keys = [f"room-{i}" for i in range(20)]
    ring = HashRing([second.url, third.url])
    to_third = {k for k in keys if ring.pick(k.encode()) == 1}
    moves = len(to_third)
    budget = max(1, math.floor(0.2 * len(keys)))
    assert moves > budget, "the moves should take more than one period"
    loop = asyncio.get_running_loop()
    clients = Holders(url, keys, changes)
    try:
        async with asyncio.timeout(4 * STEP_TIMEOUT):
            await clients.start()
            assert clients.keys_on(second.url) == set(keys)

            await dnsmasq.set(["127.0.0.2", "127.0.0.3"])
            await changes.until(resolves_to(logs, "127.0.0.2", "127.0.0.3"), "the gateway to see .3")
            changed = loop.time()
            expected = math.ceil(moves / budget) * period
            await changes.until(
                clients.alive(lambda: (
                    clients.keys_on(third.url) == to_third
                    and third.open == moves
                    and second.open == len(keys) - moves
                )),
                "the new backend to reach its share",
                timeout=expected + 3.0,
            )
            took = loop.time() - changed
            # A few more rebalancing ticks: nothing else is misplaced, nothing else moves.
            await asyncio.sleep(3 * period / 10)
    finally:
        await clients.stop()

    closes = clients.closes
    assert sorted(key for _, key, _, _, _ in closes) == sorted(to_third), "each misplaced key moves once"
    assert {(code, reason, source) for _, _, code, reason, source in closes} == {
        (1012, "rebalancing", second.url)
    }
    times = sorted(when for when, *_ in closes)
    # At most `budget` closes in any window of one period (less the clients' read jitter).
    for i, start in enumerate(times):
        in_window = [t for t in times[i:] if t < start + period - 0.05]
        assert len(in_window) <= budget, f"{len(in_window)} closes within a period: {times}"
    assert times[-1] - times[0] >= (math.ceil(moves / budget) - 1) * period - 0.05
    assert took <= expected + 1.5, f"took {took:.2f}s for {moves} moves at {budget} per period"


async def test_rebalancing_settles_a_hot_keys_overflow(echoes, gateway, changes):
    """With bounded loads a hot key's overflow belongs where a reconnect would put it.
    Rebalancing may move a few connections to a backend earlier in the key's order that
    has room, then nothing is misplaced and nothing moves, instead of closing the
    overflow again and again."""
    period = 0.2
    backends = await echoes(4)
    urls = [b.url for b in backends]
    gw, url = await gateway(gateway_config(urls, route={
        "hash_key": "query:room",
        "balance_factor": 1.25,
        "rebalance": {"max_fraction": 0.5, "period": period},
    }))
    pool = gw.pools["test"]
    loop = asyncio.get_running_loop()
    clients = Holders(url, ["hot"] * 20, changes)
    try:
        async with asyncio.timeout(4 * STEP_TIMEOUT):
            await clients.start()
            await changes.until(
                clients.alive(lambda: (
                    sum(b.open for b in backends) == 20 and not pool.misplaced(loop.time())
                )),
                "rebalancing to settle",
            )
            settled = len(clients.closes)
            loads = [b.open for b in backends]
            # Two periods, twenty rebalancing ticks: nothing moves any more.
            await asyncio.sleep(2 * period)
            assert len(clients.closes) == settled
    finally:
        await clients.stop()
    assert settled <= 10, f"{settled} rebalancing closes for 20 connections of one key"
    assert max(loads) <= math.ceil(Fraction(5, 4) * 20 / 4)
