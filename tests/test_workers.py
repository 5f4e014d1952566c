"""`workers: N` end to end: a supervisor process and its workers, real sockets on 127.0.0.1.

Each test runs `wsgate run` with `workers: 2` in a subprocess. The supervisor's
ports come from the lines it logs on stderr ("listening on HOST:PORT (NAME, 2
workers)", "wsgate.workers: admin listening on HOST:PORT"); the workers log
there too, so those two lines are picked out by their wording. Worker pids
come from the supervisor's /status. Every wait is bounded; what no event
announces (a replacement worker answering, connections released) is polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
import yaml
from conftest import gateway_config
from peers import STEP_TIMEOUT, open_raw_client, until
from test_operations import DOWN, UP, GatewayProcess, Samples, _await_close, connect

import wsgate
from wsgate.hashring import HashRing
from wsgate.workers import one_answer

WORKERS = 2


class Supervised(GatewayProcess):
    """`wsgate run` with `workers: 2`: the supervisor's ports, its config file, its admin endpoint."""

    config_path: Path
    session: aiohttp.ClientSession
    worker_admin_urls: list[str]

    @classmethod
    async def launch(
        cls, tmp_path: Path, config: dict[str, Any], *, admin: bool = True, log_level: str = "info"
    ) -> Supervised:
        """With `admin` false the supervisor serves no admin endpoint: `worker_admin_urls` are
        the workers' private ones."""
        path = tmp_path / "wsgate.yaml"
        path.write_text(yaml.safe_dump(with_workers(config, admin=admin)))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wsgate", "run", "-c", str(path), "--log-level", log_level,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self = cls(process)
        self.config_path = path
        self.session = aiohttp.ClientSession()
        admin_line = r"wsgate\.{}: admin listening on (127\.0\.0\.1:\d+)"
        if not admin:  # the workers announce theirs as they start, before the supervisor's lines
            self.worker_admin_urls = [
                "http://" + await self.wait_for_line(admin_line.format("admin")) for _ in range(WORKERS)
            ]
        # The supervisor's lines, not a worker's "listening on ... (test)" or "admin listening on ... (version ...)".
        self.ws_url = "ws://" + await self.wait_for_line(rf"listening on (127\.0\.0\.1:\d+) \(test, {WORKERS} workers\)")
        if admin:
            self.admin_url = "http://" + await self.wait_for_line(admin_line.format("workers"))
        return self

    async def get(self, path: str) -> tuple[int, str]:
        async with asyncio.timeout(STEP_TIMEOUT):
            async with self.session.get(self.admin_url + path) as response:
                return response.status, await response.text()

    async def post(self, url: str) -> tuple[int, str]:
        async with asyncio.timeout(STEP_TIMEOUT):
            async with self.session.post(url) as response:
                return response.status, await response.text()

    async def workers(self) -> list[dict[str, Any]]:
        """The supervisor's /status: one entry per worker (index, pid, restarts, the worker's own status)."""
        code, body = await self.get("/status")
        assert code == 200, body
        workers = json.loads(body)["workers"]
        assert [w["index"] for w in workers] == list(range(WORKERS))
        return workers

    async def scrape(self) -> Samples:
        code, body = await self.get("/metrics")
        assert code == 200, body
        return Samples(body)

    def started_worker_pids(self) -> set[int]:
        """Every worker pid this supervisor started, from the workers' "serving" lines."""
        return {int(m.group(1)) for line in self.stderr if (m := re.search(r"worker \d+ serving \(pid (\d+)\)", line))}

    async def shutdown(self) -> None:
        """Kill the supervisor (so it restarts nothing), then any worker of its still alive.

        The workers go before the wait: they hold the supervisor's stderr, and stock
        asyncio's wait() returns only once that pipe is closed.
        """
        if self.process.returncode is None:
            self.process.kill()
        for pid in self.started_worker_pids():
            if is_worker(pid):
                os.kill(pid, signal.SIGKILL)
        await self.stop()
        await self.session.close()


def with_workers(config: dict[str, Any], *, admin: bool = True) -> dict[str, Any]:
    return {
        **config,
        "workers": WORKERS,
        "admin": {**config.get("admin", {}), "bind": "127.0.0.1:0"} if admin else {"enabled": False},
        "log": {"access": False, **config.get("log", {})},
    }


def is_worker(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) `wsgate _worker` process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            cmdline = file.read()
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return b"_worker" in cmdline and state != b"Z"


@pytest.fixture
async def supervised(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Supervised]]]:
    started: list[Supervised] = []

    async def launch(config: dict[str, Any], **options: Any) -> Supervised:
        gateway = await Supervised.launch(tmp_path, config, **options)
        started.append(gateway)
        return gateway

    yield launch
    for gateway in started:
        await gateway.shutdown()


@pytest.fixture
async def named_backends() -> AsyncIterator[Callable[[int], Awaitable[list[str]]]]:
    """`await named_backends(n)`: n backends that answer every message with their own URL."""
    servers: list[Any] = []

    async def answer(connection: Any) -> None:
        async for _ in connection:
            await connection.send(f"ws://127.0.0.1:{connection.local_address[1]}")

    async def start(count: int) -> list[str]:
        urls = []
        for _ in range(count):
            server = await websockets.serve(answer, "127.0.0.1", 0, compression=None)
            servers.append(server)
            urls.append(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        return urls

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def echoes(ws: Any, text: str = "ping") -> bool:
    """Whether `ws` still relays a message both ways."""
    try:
        await ws.send(text)
        return await ws.recv() == text
    except websockets.ConnectionClosed:
        return False


async def open_many(stack: contextlib.AsyncExitStack, url: str, count: int) -> list[Any]:
    return list(await asyncio.gather(*(stack.enter_async_context(connect(url)) for _ in range(count))))


def connections_per_worker(workers: list[dict[str, Any]]) -> list[int]:
    return [w["status"]["connections"] for w in workers]


# -- 1. the kernel spreads connections over the workers ---------------------------------


async def test_connections_spread_over_both_workers_and_every_one_echoes(supervised, ws_backend):
    clients = 40
    gateway = await supervised(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT), contextlib.AsyncExitStack() as stack:
        connections = await open_many(stack, gateway.ws_url, clients)
        assert all(await asyncio.gather(*(echoes(ws, f"message {i}") for i, ws in enumerate(connections))))
        workers = await gateway.workers()
    pids = [w["pid"] for w in workers]
    assert len(set(pids)) == WORKERS and os.getpid() not in pids
    assert all(is_worker(pid) for pid in pids)
    per_worker = connections_per_worker(workers)
    assert sum(per_worker) == clients
    assert all(count > 0 for count in per_worker), per_worker
    for worker in workers:
        [backend] = worker["status"]["routes"][0]["backends"]
        assert backend["active_connections"] == worker["status"]["connections"]
    assert ws_backend.connections == clients


# -- 2. a worker that dies is replaced, and the others keep serving ---------------------


async def test_a_killed_worker_is_replaced_while_traffic_continues(supervised, ws_backend):
    clients, openers = 40, 8
    gateway = await supervised(gateway_config([ws_backend.url]))
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(3 * STEP_TIMEOUT), contextlib.AsyncExitStack() as stack:
        connections = await open_many(stack, gateway.ws_url, clients)
        assert all(await asyncio.gather(*(echoes(ws) for ws in connections)))
        before = await gateway.workers()
        victim, survivor = before
        assert all(count > 0 for count in connections_per_worker(before))

        os.kill(victim["pid"], signal.SIGKILL)
        await gateway.wait_for_line(r"worker (0) exited with status -9")

        # New connections while the worker is gone and after it is back: every one succeeds
        # (those the kernel queues on the dead worker's socket wait for its replacement).
        done: list[float] = []
        stop = asyncio.Event()

        async def keep_connecting() -> None:
            while not stop.is_set():
                async with connect(gateway.ws_url) as ws:
                    assert await echoes(ws, "new")
                done.append(loop.time())

        opening = [asyncio.create_task(keep_connecting()) for _ in range(openers)]
        stack.callback(lambda: [task.cancel() for task in opening])  # if the test fails before they stop
        # The victim's connections are gone with it; every one on the survivor still echoes.
        alive = await asyncio.gather(*(echoes(ws) for ws in connections))
        assert alive.count(True) == survivor["status"]["connections"]
        assert alive.count(False) == victim["status"]["connections"]

        new_pid = int(await gateway.wait_for_line(r"worker 0 serving \(pid (\d+)\)"))

        async def replaced() -> bool:
            workers = await gateway.workers()
            return workers[0]["pid"] == new_pid and "error" not in workers[0]["status"]

        await until(replaced, timeout=STEP_TIMEOUT)
        stop.set()
        await asyncio.gather(*opening)  # an opener that failed raises here
        assert len(done) >= openers

        fresh = await open_many(stack, gateway.ws_url, clients)
        assert all(await asyncio.gather(*(echoes(ws) for ws in fresh)))
        after = await gateway.workers()
    assert new_pid != victim["pid"] and not is_worker(victim["pid"])
    assert [(w["pid"], w["restarts"]) for w in after] == [(new_pid, 1), (survivor["pid"], 0)]
    # The replacement listens on the same port: the kernel gives it a share of new connections.
    assert after[0]["status"]["connections"] > 0
    assert after[1]["status"]["connections"] >= alive.count(True)


# -- 3. the supervisor's /metrics sums the workers' -------------------------------------


async def test_metrics_are_summed_across_workers(supervised, ws_backend):
    clients, per_client = 20, 5
    messages = clients * per_client
    launched = time.time()
    gateway = await supervised(gateway_config([ws_backend.url]))
    labels = {"route": "test", "backend": ws_backend.url}
    async with asyncio.timeout(STEP_TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            connections = await open_many(stack, gateway.ws_url, clients)
            for i in range(per_client):
                assert all(await asyncio.gather(*(echoes(ws, f"{i}") for ws in connections)))
            per_worker = connections_per_worker(await gateway.workers())
            during = await gateway.scrape()

        async def released() -> bool:
            return sum(connections_per_worker(await gateway.workers())) == 0

        await until(released)
        after = await gateway.scrape()
        async with gateway.session.get(
            gateway.admin_url + "/metrics", headers={"Accept": "application/openmetrics-text"}
        ) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            openmetrics = await response.text()
    assert openmetrics.rstrip().endswith("# EOF")
    assert f'wsgate_messages_total{{direction="client_to_backend",route="test"}} {float(messages)}' in openmetrics
    assert all(count > 0 for count in per_worker), per_worker
    for metrics in (during, after):
        for direction in (UP, DOWN):
            assert metrics.value("wsgate_messages_total", route="test", direction=direction) == messages
        assert metrics.value("wsgate_connections_total", route="test", outcome="upgraded",
                             protocol="http/1.1") == clients
        assert metrics.value("wsgate_build_info", version=wsgate.__version__) == 1
        assert metrics.value("wsgate_backend_up", **labels) == 1
        # Times are not added up: a series was created when its first worker created it.
        created = metrics.value("wsgate_connections_created", route="test", outcome="upgraded",
                                protocol="http/1.1")
        assert launched <= created <= time.time()
        # (computed from /proc, whose boot time is whole seconds)
        assert launched - 2 <= metrics.value("process_start_time_seconds") <= time.time()
    assert during.value("wsgate_active_connections", **labels) == clients
    assert after.value("wsgate_active_connections", **labels) == 0
    assert after.value("wsgate_close_frames_total", code="1000", side="client") == clients
    assert after.value("wsgate_connection_duration_seconds_count", route="test") == clients


async def test_the_supervisors_dashboard_shows_the_whole_gateway(supervised, ws_backend):
    clients = 40
    gateway = await supervised(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT), contextlib.AsyncExitStack() as stack:
        connections = await open_many(stack, gateway.ws_url, clients)
        assert all(await asyncio.gather(*(echoes(ws, f"message {i}") for i, ws in enumerate(connections))))
        status, page = await gateway.get("/dashboard")
        assert status == 200 and "/dashboard/dashboard.js" in page
        event: dict[str, Any] = {}
        async with gateway.session.get(gateway.admin_url + "/dashboard/events") as response:
            for _ in range(int(STEP_TIMEOUT) + 2):  # about one event a second
                line = await response.content.readline()
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if event["connections"] == clients and event["handshakes"].get("upgraded") == clients:
                        break
            else:
                raise AssertionError(f"the dashboard never counted {clients} connections: {event}")
    assert [w["index"] for w in event["workers"]] == list(range(WORKERS))
    per_worker = [w["connections"] for w in event["workers"]]
    assert sum(per_worker) == clients and all(count > 0 for count in per_worker), per_worker
    [backend] = event["routes"][0]["backends"]
    assert backend["active_connections"] == clients and backend["key_share"] == 1.0


# -- 4. every worker hashes a key to the same backend -----------------------------------


async def test_a_key_lands_on_the_same_backend_whichever_worker_accepts_it(supervised, named_backends):
    per_key = 16  # enough that both workers accept some of each key's connections
    urls = await named_backends(3)
    ring = HashRing(urls)
    # Two keys per backend, so that every backend is somebody's answer.
    rooms: dict[str, str] = {}
    for i in range(200):
        room, url = f"room-{i}", urls[next(ring.order(f"room-{i}".encode()))]
        if list(rooms.values()).count(url) < 2:
            rooms[room] = url
    assert sorted(rooms.values()) == sorted(urls * 2)
    gateway = await supervised(gateway_config(urls, route={"hash_key": "query:room"}))
    for room, expected in rooms.items():
        async with asyncio.timeout(STEP_TIMEOUT):
            async with contextlib.AsyncExitStack() as stack:
                connections = await open_many(stack, f"{gateway.ws_url}/?room={room}", per_key)
                for ws in connections:
                    await ws.send("who")
                assert {await ws.recv() for ws in connections} == {expected}, room
                workers = await gateway.workers()

            async def released() -> bool:
                return sum(connections_per_worker(await gateway.workers())) == 0

            await until(released)
        assert all(count > 0 for count in connections_per_worker(workers)), (room, workers)
        for worker in workers:
            busy = {b["backend"]: b["active_connections"] for b in worker["status"]["routes"][0]["backends"]}
            assert {url for url, count in busy.items() if count} == {expected}, (room, worker)


# -- 5. SIGTERM drains every worker and stops them all ----------------------------------


async def test_sigterm_drains_the_workers_and_the_supervisor_exits_0(supervised, ws_backend):
    clients = 20
    config = gateway_config([ws_backend.url], shutdown={"drain_period": "300ms", "grace_period": "5s"})
    gateway = await supervised(config)
    async with asyncio.timeout(STEP_TIMEOUT):
        connections = await asyncio.gather(*(open_raw_client(gateway.ws_url) for _ in range(clients)))
        workers = await gateway.workers()
        assert all(count > 0 for count in connections_per_worker(workers))
        waiters = [asyncio.create_task(_await_close(reader, writer)) for reader, writer in connections]
        gateway.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*waiters)
        # wait() also reads stderr to its end, which the workers hold open as long as they live.
        assert await gateway.wait() == 0
    assert [code for _, code in results] == [1001] * clients
    pids = [w["pid"] for w in workers]
    assert not [pid for pid in pids if is_worker(pid)]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert sum("stop signal: draining" in line for line in gateway.stderr) == 1 + WORKERS


# -- 6. SIGHUP reloads every worker -----------------------------------------------------


async def test_sighup_reaches_every_worker(supervised, ws_backend, aiohttp_backend):
    per_path = 16  # enough that both workers accept some
    gateway = await supervised(gateway_config([ws_backend.url], route={"hash_key": "path"}))
    old_version = (await gateway.workers())[0]["status"]["config"]["version"]
    added = gateway_config([ws_backend.url, aiohttp_backend.url], route={"hash_key": "path"})
    gateway.config_path.write_text(yaml.safe_dump(with_workers(added)))
    gateway.process.send_signal(signal.SIGHUP)
    versions = {await gateway.wait_for_line(r"reloaded .* \(config version (\w+)\)") for _ in range(WORKERS)}
    workers = await gateway.workers()
    assert len(versions) == 1 and old_version not in versions
    for worker in workers:
        assert worker["restarts"] == 0
        assert worker["status"]["config"]["version"] in versions
        backends = [b["backend"] for b in worker["status"]["routes"][0]["backends"]]
        assert backends == [ws_backend.url, aiohttp_backend.url]
    # New connections follow the new config in every worker: a path the ring gives the
    # new backend reaches it, whichever worker accepted the connection.
    ring = HashRing([ws_backend.url, aiohttp_backend.url])
    path = next(p for i in range(100) if ring.identities[next(ring.order((p := f"/p{i}").encode()))] == aiohttp_backend.url)
    async with asyncio.timeout(STEP_TIMEOUT), contextlib.AsyncExitStack() as stack:
        connections = await open_many(stack, gateway.ws_url + path, per_path)
        assert all(await asyncio.gather(*(echoes(ws) for ws in connections)))
        per_worker = connections_per_worker(await gateway.workers())
    assert all(count > 0 for count in per_worker), per_worker
    assert (aiohttp_backend.connections, ws_backend.connections) == (per_path, 0)


# -- 7. no worker outlives its supervisor -----------------------------------------------


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(supervised, ws_backend):
    config = gateway_config([ws_backend.url], shutdown={"drain_period": "200ms", "grace_period": "3s"})
    gateway = await supervised(config)
    host, port = gateway.ws_url.removeprefix("ws://").rsplit(":", 1)
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await open_raw_client(gateway.ws_url)
        pids = [w["pid"] for w in await gateway.workers()]
        gateway.process.kill()  # SIGKILL: the supervisor can tell nobody
        _, code = await _await_close(reader, writer)

        async def all_gone() -> bool:
            if any(is_worker(pid) for pid in pids):
                return False
            try:  # a process that has just exited may still be closing its sockets
                _, probe = await asyncio.open_connection(host, int(port))
            except ConnectionRefusedError:
                return True
            probe.close()
            return False

        await until(all_gone, timeout=STEP_TIMEOUT)
    assert code == 1001  # the connection was drained, not cut
    assert sum("supervisor gone: draining" in line for line in gateway.stderr) == WORKERS
    assert not [line for line in gateway.stderr if "second stop signal" in line]


# -- 8. a restarted worker serves what its siblings serve ------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_restarted_worker_serves_the_listeners_and_config_of_its_siblings(
    supervised, ws_backend, aiohttp_backend
):
    gateway = await supervised(gateway_config([ws_backend.url]))
    extra_port = free_port()
    changed = gateway_config([ws_backend.url, aiohttp_backend.url])
    changed["listeners"].append({"name": "extra", "bind": f"127.0.0.1:{extra_port}"})
    gateway.config_path.write_text(yaml.safe_dump(with_workers(changed)))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with gateway.session.post(gateway.admin_url + "/reload") as response:
            answer = await response.text()
        assert response.status == 200, answer
        version = re.fullmatch(r"reloaded, config version (\w+); ignored until a restart: listeners\n", answer)[1]
        victim = (await gateway.workers())[0]
        os.kill(victim["pid"], signal.SIGKILL)
        await gateway.wait_for_line(r"worker (0) exited")
        new_pid = int(await gateway.wait_for_line(r"worker 0 serving \(pid (\d+)\)"))

        async def replaced() -> bool:
            workers = await gateway.workers()
            return workers[0]["pid"] == new_pid and "error" not in workers[0]["status"]

        await until(replaced, timeout=STEP_TIMEOUT)
        code, body = await gateway.get("/status")
    status = json.loads(body)
    assert code == 200
    assert status["config"]["version"] == version
    assert [w["status"]["config"]["version"] for w in status["workers"]] == [version] * WORKERS
    for worker in status["workers"]:
        backends = [b["backend"] for b in worker["status"]["routes"][0]["backends"]]
        assert backends == [ws_backend.url, aiohttp_backend.url]  # the rest of the reload applied
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", extra_port)


# -- 9. counters only go up ---------------------------------------------------------------


async def test_counters_keep_a_dead_workers_counts_and_one_sighup_counts_one_reload(supervised, ws_backend):
    clients = 20
    gateway = await supervised(gateway_config([ws_backend.url]))
    labels = {"route": "test", "outcome": "upgraded", "protocol": "http/1.1"}
    async with asyncio.timeout(STEP_TIMEOUT), contextlib.AsyncExitStack() as stack:
        connections = await open_many(stack, gateway.ws_url, clients)
        assert all(await asyncio.gather(*(echoes(ws) for ws in connections)))
        workers = await gateway.workers()
        assert all(count > 0 for count in connections_per_worker(workers))
        before = await gateway.scrape()
        os.kill(workers[0]["pid"], signal.SIGKILL)
        await gateway.wait_for_line(r"worker (0) exited")
        after_death = await gateway.scrape()

        gateway.process.send_signal(signal.SIGHUP)
        await gateway.wait_for_line(r"wsgate\.workers: (reloaded)")
        after_reload = await gateway.scrape()
    assert before.value("wsgate_connections_total", **labels) == clients
    assert after_death.value("wsgate_connections_total", **labels) == clients
    assert after_reload.value("wsgate_config_reloads_total", result="success") == 1


# -- 10. the supervisor answers once, naming workers only when they differ --------------


async def test_supervisor_answers_say_their_reason_once(supervised, closed_port):
    config = gateway_config(
        [f"ws://127.0.0.1:{closed_port}"],
        admin={"ready_requires_backends": True},
        route={"health_check": {"type": "tcp", "interval": "50ms", "timeout": "1s", "unhealthy_threshold": 1}},
    )
    gateway = await supervised(config)

    async def both_unready() -> bool:
        # (while only one worker's probe has failed, the answer names that worker)
        return (await gateway.get("/readyz")) == (503, "not ready: route test has no healthy backend\n")

    await until(both_unready)
    gateway.config_path.write_text("routes: [\n")
    async with asyncio.timeout(STEP_TIMEOUT):
        async with gateway.session.post(gateway.admin_url + "/reload") as response:
            answer = await response.text()
    assert response.status == 400
    assert answer.startswith(f"reload refused: {gateway.config_path}: invalid YAML") and answer.count("refused") == 1


async def test_a_token_guards_the_supervisors_reload_and_its_own_calls_to_the_workers(
    tmp_path, supervised, ws_backend
):
    token_file = tmp_path / "admin-token"
    token_file.write_text("first-token\n")
    gateway = await supervised(gateway_config([ws_backend.url], admin={"token_file": str(token_file)}))

    async def reload(token: str | None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with asyncio.timeout(STEP_TIMEOUT):
            async with gateway.session.post(gateway.admin_url + "/reload", headers=headers) as response:
                return response.status, await response.text()

    assert (await reload(None))[0] == 401
    assert (await reload("wrong"))[0] == 401
    code, text = await reload("first-token")
    assert code == 200 and text.startswith("reloaded, config version"), text
    # A worker started after the file changed takes the supervisor's token, not the file's.
    token_file.write_text("second-token\n")
    [victim, _] = await gateway.workers()
    os.kill(victim["pid"], signal.SIGKILL)
    new_pid = int(await gateway.wait_for_line(r"worker 0 serving \(pid (\d+)\)"))

    async def replaced() -> bool:
        workers = await gateway.workers()
        return workers[0]["pid"] == new_pid and "error" not in workers[0]["status"]

    await until(replaced, timeout=STEP_TIMEOUT)
    code, text = await reload("first-token")
    assert code == 200 and text.startswith("reloaded, config version"), text
    assert (await reload("second-token"))[0] == 401
    assert (await gateway.get("/metrics"))[0] == 200


def test_workers_that_disagree_are_named():
    assert one_answer("not ready: ", {1: "not ready: draining\n"}, 2) == "not ready: draining (worker 1)"
    assert one_answer("not ready: ", {0: "not ready: draining", 1: "not ready: draining"}, 2) == "not ready: draining"
    mixed = {0: "not ready: draining", 1: "not ready: not listening", 2: "not ready: draining"}
    assert one_answer("not ready: ", mixed, 3) == "not ready: draining (workers 0, 2); not listening (worker 1)"


# -- 11. /status has one shape, whatever the number of workers --------------------------


def shape(value: Any) -> Any:
    """The keys of `value` all the way down (a list by its first item), without the values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


async def test_status_has_the_same_shape_with_one_worker_and_with_several(tmp_path, supervised, ws_backend):
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single = await GatewayProcess.start(single_dir, gateway_config([ws_backend.url], log={"access": False}))
    try:
        async with asyncio.timeout(STEP_TIMEOUT), aiohttp.ClientSession() as session:
            async with session.get(single.admin_url + "/status") as response:
                one = await response.json()
        several = json.loads((await (await supervised(gateway_config([ws_backend.url]))).get("/status"))[1])
    finally:
        await single.stop()
    assert shape(one) == shape(several)
    assert [w["index"] for w in one["workers"]] == [0] and len(several["workers"]) == WORKERS
    assert one["workers"][0]["status"]["config"] == one["config"]
    assert several["connections"] == sum(w["status"]["connections"] for w in several["workers"])


# -- 7. a reload names what takes a restart, and every process follows the log settings ----


async def test_a_reload_under_workers_names_the_settings_that_take_a_restart(supervised, ws_backend):
    gateway = await supervised(gateway_config([ws_backend.url]))
    changed = with_workers(gateway_config([ws_backend.url]))
    changed["workers"] = WORKERS + 1
    changed["admin"]["bind"] = "127.0.0.2:0"
    changed["listeners"][0]["bind"] = "127.0.0.2:0"
    gateway.config_path.write_text(yaml.safe_dump(changed))
    keys = "listeners, workers, admin.bind"
    code, text = await gateway.post(gateway.admin_url + "/reload")
    assert code == 200 and text.endswith(f"; ignored until a restart: {keys}\n"), text
    # The supervisor keeps them out of the workers' snapshot: it warns, once.
    assert await gateway.wait_for_line(r"WARNING wsgate\.workers: (.*)") == f"ignored until a restart: {keys}"
    code, body = await gateway.get("/status")
    assert json.loads(body)["config"]["restart_needed"] == keys.split(", ")
    workers = await gateway.workers()
    assert [w["status"]["config"]["restart_needed"] for w in workers] == [[]] * WORKERS
    assert len(workers) == WORKERS and all(worker["restarts"] == 0 for worker in workers)
    # The supervisor's sockets stay where they were, and so do the workers' listeners.
    async with asyncio.timeout(STEP_TIMEOUT), contextlib.AsyncExitStack() as stack:
        connections = await open_many(stack, gateway.ws_url, 16)
        assert all(await asyncio.gather(*(echoes(ws) for ws in connections)))


async def test_workers_serve_the_config_substituted_once_at_start_and_after_a_reload(
    supervised, ws_backend, monkeypatch
):
    # The workers read the supervisor's snapshot with the same environment: a "$$" in the
    # file must not turn into a reference there.
    monkeypatch.setenv("WSGATE_T_REGION", "eu")
    route = {"name": "chat-$${WSGATE_T_REGION}-${WSGATE_T_REGION}"}
    gateway = await supervised(gateway_config([ws_backend.url], route=route))
    expected = ["chat-${WSGATE_T_REGION}-eu"] * WORKERS
    assert [w["status"]["routes"][0]["name"] for w in await gateway.workers()] == expected
    code, text = await gateway.post(gateway.admin_url + "/reload")
    assert code == 200, text
    assert [w["status"]["routes"][0]["name"] for w in await gateway.workers()] == expected


async def test_workers_compare_the_admin_settings_with_the_file_not_with_their_private_admin(
    supervised, ws_backend
):
    gateway = await supervised(gateway_config([ws_backend.url]), admin=False)
    for url in gateway.worker_admin_urls:
        code, text = await gateway.post(url + "/reload")
        assert code == 200 and "ignored" not in text, text


@pytest.mark.parametrize("how", ["sighup", "post"])
async def test_a_reload_switches_the_log_format_of_the_supervisor_and_every_worker(
    supervised, ws_backend, how
):
    gateway = await supervised(gateway_config([ws_backend.url]))
    json_logs = with_workers(gateway_config([ws_backend.url], log={"format": "json"}))
    gateway.config_path.write_text(yaml.safe_dump(json_logs))
    if how == "sighup":
        gateway.process.send_signal(signal.SIGHUP)
    else:
        code, text = await gateway.post(gateway.admin_url + "/reload")
        assert code == 200, text
    # Each worker's line and the supervisor's, which it logs once every worker has answered:
    # a SIGTERM before that one would stop the supervisor while its reload is still under way.
    for _ in range(WORKERS + 1):
        await gateway.wait_for_line(r"(reloaded .*)")
    gateway.process.send_signal(signal.SIGTERM)
    assert await gateway.wait() == 0
    last_reload = max(i for i, line in enumerate(gateway.stderr) if "reloaded " in line)
    entries = [json.loads(line) for line in gateway.stderr[last_reload:]]
    messages = [(entry["logger"], entry["message"]) for entry in entries]
    assert ("wsgate", f"stop signal: draining {WORKERS} workers") in messages, messages
    assert messages.count(("wsgate", "stopped")) == WORKERS, messages


async def test_workers_log_at_the_command_lines_level(supervised, closed_port):
    probed = {"health_check": {"type": "tcp", "interval": "50ms", "timeout": "1s", "unhealthy_threshold": 1}}
    gateway = await supervised(gateway_config([f"ws://127.0.0.1:{closed_port}"], route=probed), log_level="debug")
    # Only workers probe backends: a DEBUG line about a probe is a worker's, at the level asked for.
    assert await gateway.wait_for_line(rf"DEBUG \S+: (probe of ws://127\.0\.0\.1:{closed_port}) failed")


def test_a_worker_that_dies_before_serving_stops_the_sibling_already_serving(tmp_path, closed_port):
    # Workers start one after another; a sitecustomize on the path ends worker 1 at start-up,
    # once worker 0 already serves the listener.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "with open('/proc/self/cmdline', 'rb') as file:\n"
        "    argv = file.read().split(b'\\0')\n"
        "if b'_worker' in argv and argv[argv.index(b'--index') + 1] == b'1':\n"
        "    os._exit(3)\n"
    )
    path = tmp_path / "wsgate.yaml"
    path.write_text(yaml.safe_dump(with_workers(gateway_config([f"ws://127.0.0.1:{closed_port}"]))))
    python_path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "wsgate", "run", "-c", str(path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": python_path},
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("wsgate: ")]
    assert errors == ["wsgate: worker 1 exited with status 3 before serving"]
    served = [int(m.group(1)) for m in re.finditer(r"worker 0 serving \(pid (\d+)\)", result.stderr)]
    assert len(served) == 1, result.stderr
    assert not is_worker(served[0]), "worker 0 outlived its supervisor"
    # Stopped by the supervisor (a signal), not left to notice the supervisor gone.
    assert "stop signal: draining" in result.stderr
    assert "supervisor gone" not in result.stderr
    assert "starting it again" not in result.stderr
