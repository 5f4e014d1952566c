"""The load generator: lean uvloop Protocol clients in worker processes.

No WebSocket library: every frame a client sends is built once per job (with
the zero mask key, so echoes are byte-identical) and then only sliced, and
replies are counted per read, not per message: every reply frame of a job has
the same known size, so replies = bytes received // reply size. Over TLS
(`Job.tls_ca` set) the clients are the same: the loop's TLS transport hands
them the decrypted bytes, read by read.

The coordinator (`LoadGen`) gives each worker process its share of the
connections. A job goes: setup (connect and upgrade everything) -> "ready" ->
the coordinator sends one start time for all workers -> load starts at that
time, counters are read at the start and the end of the measured window ->
"done" with the counts. Clocks are shared: time.monotonic() is
CLOCK_MONOTONIC in every process.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

import uvloop

from .targets import client_context
from .wire import (
    OP_CLOSE,
    SMALL_PAYLOAD,
    client_frame,
    new_key,
    push_payload,
    raise_nofile,
    server_frame,
    upgrade_request,
)

SETUP_TIMEOUT = 120.0  # ten thousand upgrades through a slow proxy take a while
ONE_SHOT_TIMEOUT = 5.0
CONNECT_CONCURRENCY = 64  # upgrades in progress at once per worker while setting up
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@dataclass(frozen=True)
class Job:
    """One worker's share of a scenario run."""

    kind: str  # pipelined | push | latency | idle | handshake | session
    port: int
    path: str
    conns: int  # connections, or concurrent loops for handshake/session
    size: int = 32  # message size in bytes
    depth: int = 1  # messages in flight per connection (pipelined)
    rate: float = 0.0  # messages per second per connection (latency)
    warmup: float = 1.0
    window: float = 5.0
    # Client source addresses, used in turn from `first_source`: spreads
    # connections over several 127.0.0.x so ephemeral ports never run short.
    sources: tuple[str, ...] = ("127.0.0.1",)
    first_source: int = 0
    host: str = "127.0.0.1"
    # TLS: the PEM of the CA to trust ("" for plain TCP) and the name to ask for and check.
    tls_ca: str = ""
    server_name: str = ""


class ClientError(Exception):
    """A peer answered something unexpected."""


@functools.cache
def _tls_context(ca_pem: str) -> ssl.SSLContext:
    """One client context per worker and CA, shared by all its connections (as a client library would)."""
    return client_context(ca_pem)


async def connect_from_source(factory: Callable[[], asyncio.Protocol], job: Job, index: int) -> asyncio.Transport:
    """A connection from the job's next source address; for TLS jobs, once the TLS handshake is done."""
    loop = asyncio.get_running_loop()
    source = job.sources[(job.first_source + index) % len(job.sources)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Choose the port at connect time, per destination, not at bind time.
        sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        await loop.sock_connect(sock, (job.host, job.port))
    except BaseException:
        sock.close()
        raise
    if not job.tls_ca:
        transport, _ = await loop.create_connection(factory, sock=sock)
        return transport
    transport, _ = await loop.create_connection(
        factory, sock=sock, ssl=_tls_context(job.tls_ca), server_hostname=job.server_name)
    return transport


def _check_101(head: bytes) -> None:
    if not head.startswith(b"HTTP/1.1 101"):
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        raise ClientError(f"upgrade refused: {status}")


class _Client(asyncio.Protocol):
    """Upgrades the connection, then counts received bytes in `rx`."""

    def __init__(self, request: bytes, opened: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.request = request
        self.head: bytearray | None = bytearray()  # None once upgraded
        self.opened = opened
        self.rx = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def _handshake(self, data: bytes) -> None:
        assert self.head is not None
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        head, rest = bytes(self.head[:end]), bytes(self.head[end + 4 :])
        self.head = None
        try:
            _check_101(head)
        except ClientError as exc:
            self.opened.set_exception(exc)
            return
        self.opened.set_result(None)
        if rest:
            self.data_received(rest)

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self._handshake(data)
        else:
            self.rx += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the 101 ({exc})"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Pipelined(_Client):
    """Keeps `depth` messages in flight; with depth 0 it only receives (push)."""

    def __init__(self, request: bytes, opened: asyncio.Future[None], frames: memoryview,
                 frame_size: int, reply_size: int, depth: int, expect: bytes) -> None:
        super().__init__(request, opened)
        self.frames = frames  # `depth` prebuilt frames, shared by all connections
        self.frame_size = frame_size
        self.reply_size = reply_size
        self.depth = depth
        self.sent = 0
        self.sending = False
        self.expect = expect  # what the first reply must start with
        self.first: bytearray | None = bytearray()
        self.bad = ""

    def start(self) -> None:
        if self.depth and self.transport is not None:
            self.sending = True
            self.transport.write(self.frames[: self.depth * self.frame_size])
            self.sent = self.depth

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self._handshake(data)
            return
        self.rx = rx = self.rx + len(data)
        if self.first is not None:
            self._check_first(data)
        if self.sending:
            more = rx // self.reply_size + self.depth - self.sent
            if more > 0:
                self.transport.write(self.frames[: more * self.frame_size])  # type: ignore[union-attr]
                self.sent += more

    def _check_first(self, data: bytes) -> None:
        assert self.first is not None
        self.first += data[: len(self.expect) - len(self.first)]
        if len(self.first) >= len(self.expect):
            if self.first != self.expect:
                self.bad = f"unexpected reply {bytes(self.first[:16])!r}..., expected {self.expect[:16]!r}..."
            self.first = None


class _Paced(_Client):
    """One message in flight, sent on a fixed time grid; records round-trip times.

    A send whose slot comes while the previous reply is still out is made as
    soon as that reply arrives, and its latency counts from its slot, so a
    stall is not hidden by the generator waiting (coordinated omission).
    """

    def __init__(self, request: bytes, opened: asyncio.Future[None], frame: bytes,
                 reply_size: int, samples: list[int]) -> None:
        super().__init__(request, opened)
        self.frame = frame
        self.reply_size = reply_size
        self.samples = samples
        self.waiting = False
        self.sent_ns = 0
        self.owed_ns = 0  # slot of a send held back by an outstanding reply
        self.replies = 0
        self.late = 0
        self.running = False
        self.k = 0
        self.loop: asyncio.AbstractEventLoop
        self.base_loop = 0.0  # the first slot, on the loop's clock (for call_at)
        self.base_ns = 0  # the same instant on perf_counter_ns (for latencies)
        self.period = 0.0
        self.period_ns = 0
        self.window = (0, 0)  # sends in [start, end) ns are recorded

    def begin(self, loop: asyncio.AbstractEventLoop, base_loop: float, base_ns: int,
              period: float, window: tuple[int, int]) -> None:
        self.loop, self.base_loop, self.base_ns = loop, base_loop, base_ns
        self.period, self.period_ns, self.window = period, int(period * 1e9), window
        self.running = True
        loop.call_at(base_loop, self._tick)

    def _tick(self) -> None:
        if not self.running:
            return
        slot_ns = self.base_ns + self.k * self.period_ns
        self.k += 1
        if self.waiting:
            self.late += 1
            self.owed_ns = slot_ns
        else:
            self._send(time.perf_counter_ns())
        self.loop.call_at(self.base_loop + self.k * self.period, self._tick)

    def _send(self, start_ns: int) -> None:
        self.sent_ns = start_ns
        self.waiting = True
        self.transport.write(self.frame)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self._handshake(data)
            return
        now = time.perf_counter_ns()
        self.rx += len(data)
        if self.waiting and self.rx >= (self.replies + 1) * self.reply_size:
            self.replies += 1
            self.waiting = False
            if self.window[0] <= self.sent_ns < self.window[1]:
                self.samples.append(now - self.sent_ns)
            if self.owed_ns and self.running:
                owed, self.owed_ns = self.owed_ns, 0
                self._send(owed)


class _OneShot(asyncio.Protocol):
    """One upgrade; for a session also one 32-byte echo and the close handshake."""

    ECHO = client_frame(SMALL_PAYLOAD)
    REPLY = server_frame(SMALL_PAYLOAD)
    CLOSE = client_frame((1000).to_bytes(2, "big"), OP_CLOSE)
    CLOSE_REPLY = server_frame((1000).to_bytes(2, "big"), OP_CLOSE)

    def __init__(self, request: bytes, done: asyncio.Future[None], session: bool) -> None:
        self.request = request
        self.done = done
        self.session = session
        self.buf = b""
        self.stage = 0  # 0: waiting for the 101, 1: for the echo, 2: for the Close
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.done.done():
            return
        try:
            self._advance()
        except ClientError as exc:
            self.done.set_exception(exc)

    def _advance(self) -> None:
        assert self.transport is not None
        if self.stage == 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            _check_101(self.buf[:end])
            self.buf = self.buf[end + 4 :]
            if not self.session:
                self.done.set_result(None)
                return
            self.stage = 1
            self.transport.write(self.ECHO)
        if self.stage == 1:
            if len(self.buf) < len(self.REPLY):
                return
            if self.buf[: len(self.REPLY)] != self.REPLY:
                raise ClientError(f"bad echo {self.buf[:16]!r}")
            self.buf = self.buf[len(self.REPLY) :]
            self.stage = 2
            self.transport.write(self.CLOSE)
        if self.stage == 2 and len(self.buf) >= len(self.CLOSE_REPLY):
            if self.buf[: len(self.CLOSE_REPLY)] != self.CLOSE_REPLY:
                raise ClientError(f"bad close reply {self.buf[:16]!r}")
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost at stage {self.stage} ({exc})"))


# -- job runners (inside a worker) --------------------------------------------


async def _sleep_until(monotonic: float) -> None:
    delay = monotonic - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class _Runner:
    """Runs one job: `setup` before the start signal, `run` after it."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.clients: list[Any] = []

    def request(self) -> bytes:
        return upgrade_request(self.job.host, self.job.port, self.job.path, new_key())

    async def _open_all(self, make: Callable[[asyncio.Future[None]], _Client]) -> dict[str, Any]:
        """Connects and upgrades `job.conns` clients, `CONNECT_CONCURRENCY` at a time."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        errors: list[str] = []

        async def one(index: int) -> None:
            async with gate:
                opened: asyncio.Future[None] = loop.create_future()
                client = make(opened)
                try:
                    await connect_from_source(lambda: client, self.job, index)
                    self.clients.append(client)
                    await opened
                except (OSError, ClientError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(i) for i in range(self.job.conns)))
        return {"open": self.job.conns - len(errors), "failed": len(errors), "error": errors[0] if errors else ""}

    async def setup(self) -> dict[str, Any]:
        return {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def count(self) -> int:
        return 0

    def extra(self) -> dict[str, Any]:
        return {}

    async def run(self, t_go: float) -> dict[str, Any]:
        """Load from `t_go`; counts between t_go + warmup and the end of the window."""
        job = self.job
        await _sleep_until(t_go)
        self.start()
        await _sleep_until(t_go + job.warmup)
        count0, time0 = self.count(), time.monotonic()
        await _sleep_until(t_go + job.warmup + job.window)
        count1, time1 = self.count(), time.monotonic()
        self.stop()
        lost = sum(1 for c in self.clients if getattr(c, "lost", False))
        return {"count": count1 - count0, "elapsed": time1 - time0, "lost": lost, **self.extra()}

    async def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()
        await asyncio.sleep(0.05)  # let the closes go out before the next job


class _EchoRunner(_Runner):
    """pipelined (echo with `depth` in flight) and push (receive only)."""

    async def setup(self) -> dict[str, Any]:
        job = self.job
        if job.kind == "push":
            reply = server_frame(push_payload(job.size))
            frames, frame_size, depth = memoryview(b""), 0, 0
        else:
            payload = SMALL_PAYLOAD if job.size == len(SMALL_PAYLOAD) else push_payload(job.size)
            frame = client_frame(payload)
            reply = server_frame(payload)
            frames, frame_size, depth = memoryview(frame * job.depth), len(frame), job.depth
        self.reply_size = len(reply)
        expect = reply[:4096]
        return await self._open_all(
            lambda opened: _Pipelined(self.request(), opened, frames, frame_size, self.reply_size, depth, expect)
        )

    def start(self) -> None:
        for client in self.clients:
            client.start()

    def stop(self) -> None:
        for client in self.clients:
            client.sending = False

    def count(self) -> int:
        size = self.reply_size
        return sum(c.rx // size for c in self.clients)

    def extra(self) -> dict[str, Any]:
        bad = [c.bad for c in self.clients if c.bad]
        unchecked = sum(1 for c in self.clients if c.first is not None)
        return {"bad": bad[0] if bad else "", "unchecked": unchecked}


class _LatencyRunner(_Runner):
    async def setup(self) -> dict[str, Any]:
        self.samples: list[int] = []
        frame, reply = client_frame(SMALL_PAYLOAD), server_frame(SMALL_PAYLOAD)
        return await self._open_all(lambda opened: _Paced(self.request(), opened, frame, len(reply), self.samples))

    async def run(self, t_go: float) -> dict[str, Any]:
        job = self.job
        loop = asyncio.get_running_loop()
        # Map the shared monotonic start onto the loop clock and the ns counter.
        now_mono, now_loop, now_ns = time.monotonic(), loop.time(), time.perf_counter_ns()
        base_loop = now_loop + (t_go - now_mono)
        base_ns = now_ns + int((t_go - now_mono) * 1e9)
        window = (base_ns + int(job.warmup * 1e9), base_ns + int((job.warmup + job.window) * 1e9))
        period = 1.0 / job.rate
        # Spread the connections evenly over one period.
        for i, client in enumerate(self.clients):
            offset = period * i / max(len(self.clients), 1)
            client.begin(loop, base_loop + offset, base_ns + int(offset * 1e9), period, window)
        result = await super().run(t_go)
        return result

    def stop(self) -> None:
        for client in self.clients:
            client.running = False

    def count(self) -> int:
        return sum(c.replies for c in self.clients)

    def extra(self) -> dict[str, Any]:
        return {"samples": self.samples, "late": sum(c.late for c in self.clients)}


class _IdleRunner(_Runner):
    async def setup(self) -> dict[str, Any]:
        return await self._open_all(lambda opened: _Client(self.request(), opened))

    async def run(self, t_go: float) -> dict[str, Any]:
        # The start signal means "release": the coordinator has measured.
        lost = sum(1 for c in self.clients if c.lost)
        return {"count": len(self.clients) - lost, "elapsed": 0.0, "lost": lost}


class _OneShotRunner(_Runner):
    """handshake and session: `conns` loops, each doing one-shot connections back to back."""

    async def setup(self) -> dict[str, Any]:
        self.done = 0
        self.errors = 0
        self.last_error = ""
        self.running = False
        self.tasks: list[asyncio.Task[None]] = []
        return {"open": 0}

    def start(self) -> None:
        self.running = True
        self.tasks = [asyncio.get_running_loop().create_task(self._loop(i)) for i in range(self.job.conns)]

    async def _loop(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        session = self.job.kind == "session"
        attempt = 0
        while self.running:
            done: asyncio.Future[None] = loop.create_future()
            transport: asyncio.Transport | None = None
            attempt += 1
            try:
                async with asyncio.timeout(ONE_SHOT_TIMEOUT):
                    factory = functools.partial(_OneShot, self.request(), done, session)
                    transport = await connect_from_source(factory, self.job, index + attempt * self.job.conns)
                    await done
                self.done += 1
            except (OSError, TimeoutError, ClientError) as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.01)  # never spin on a failing target
            finally:
                if transport is not None:
                    transport.close()

    def stop(self) -> None:
        self.running = False

    def count(self) -> int:
        return self.done

    def extra(self) -> dict[str, Any]:
        return {"errors": self.errors, "error": self.last_error}

    async def run(self, t_go: float) -> dict[str, Any]:
        result = await super().run(t_go)
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=ONE_SHOT_TIMEOUT + 1)
            for task in self.tasks:
                task.cancel()
        return result


_RUNNERS: dict[str, type[_Runner]] = {
    "pipelined": _EchoRunner,
    "push": _EchoRunner,
    "latency": _LatencyRunner,
    "idle": _IdleRunner,
    "handshake": _OneShotRunner,
    "session": _OneShotRunner,
}


def _run_job(loop: asyncio.AbstractEventLoop, pipe: Connection, job: Job) -> None:
    runner = _RUNNERS[job.kind](job)
    try:
        try:
            info = loop.run_until_complete(asyncio.wait_for(runner.setup(), SETUP_TIMEOUT))
        except Exception as exc:
            pipe.send(("error", f"setup failed: {type(exc).__name__}: {exc}"))
            return
        pipe.send(("ready", info))
        message = pipe.recv()
        if message[0] != "go":
            return  # aborted: another worker failed its setup
        pipe.send(("done", loop.run_until_complete(runner.run(message[1]))))
    finally:
        loop.run_until_complete(runner.close())


def _worker(pipe: Connection) -> None:
    # Ctrl-C is the coordinator's business; it stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    while True:
        try:
            message = pipe.recv()
        except EOFError:
            return  # the coordinator is gone
        if message[0] == "quit":
            return
        if message[0] != "job":
            continue  # a stray go/abort for a job that already failed
        try:
            _run_job(loop, pipe, message[1])
        except Exception as exc:  # report, and stay available for the next job
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))


class WorkerTimeout(Exception):
    """A worker did not answer in time; the pool was restarted."""


class LoadGen:
    """A pool of generator processes, driven phase by phase."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self._ctx = multiprocessing.get_context("fork")
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self._active: list[Connection] = []

    def start(self) -> None:
        for _ in range(self.procs):
            parent, child = self._ctx.Pipe()
            process = self._ctx.Process(target=_worker, args=(child,), daemon=True, name="bench-loadgen")
            process.start()
            child.close()
            self._workers.append((process, parent))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _ in self._workers if p.pid is not None]

    def submit(self, jobs: list[Job]) -> None:
        """One job per worker, in order; fewer jobs than workers leaves the rest idle."""
        assert len(jobs) <= len(self._workers)
        self._active = [pipe for (_, pipe), _job in zip(self._workers, jobs, strict=False)]
        for pipe, job in zip(self._active, jobs, strict=True):
            pipe.send(("job", job))

    def gather(self, expect: str, timeout: float) -> list[Any]:
        """Each active worker's answer; raises RuntimeError if any failed (the others are aborted)."""
        deadline = time.monotonic() + timeout
        answers: list[tuple[str, Any]] = []
        for pipe in self._active:
            try:
                if not pipe.poll(max(deadline - time.monotonic(), 0)):
                    raise WorkerTimeout(f"a generator process did not report {expect!r} within {timeout:.0f}s")
                answers.append(pipe.recv())
            except (EOFError, OSError) as exc:
                self.restart()
                raise WorkerTimeout(f"a generator process died ({type(exc).__name__})") from exc
            except WorkerTimeout:
                self.restart()
                raise
        errors = [payload for kind, payload in answers if kind == "error"]
        if errors:
            if expect == "ready":
                for pipe, (kind, _) in zip(self._active, answers, strict=True):
                    if kind == "ready":
                        pipe.send(("abort",))
            raise RuntimeError(errors[0])
        return [payload for _, payload in answers]

    def go(self, t_go: float) -> None:
        for pipe in self._active:
            pipe.send(("go", t_go))

    def restart(self) -> None:
        self.close()
        self.start()

    def close(self) -> None:
        for _, pipe in self._workers:
            try:
                pipe.send(("quit",))
            except OSError:
                pass
        for process, pipe in self._workers:
            process.join(2)
            if process.is_alive():
                process.kill()
                process.join(2)
            pipe.close()
        self._workers.clear()
        self._active = []


def split(total: int, parts: int) -> list[int]:
    """`total` shared out over at most `parts` workers, none given zero."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def worker_count() -> int:
    """Default number of generator processes: 2, or 1 on a single-CPU machine."""
    return 2 if (os.cpu_count() or 1) > 1 else 1
