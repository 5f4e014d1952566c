"""`python -m bench.soak`: attacks on one wsgate process while well-behaved clients keep echoing.

Twenty good clients (`--good`) echo small messages at 100 per second each
through the gateway for the whole run, in a process of their own, and time
every echo. Meanwhile the attackers, one phase after another:

- `slowloris`: handshakes that trickle one byte a second;
- `idle`: TCP connections that send nothing;
- `malformed`: bad handshakes sent in one write (64 KiB heads, 10,000 header
  lines, bad keys, request smuggling, HTTP/0.9 and binary garbage);
- `flood`: upgraded connections that each send 100,000 tiny frames;
- `burst`: 5,000 upgrades that arrive at once;
- `firehose`: upgraded connections to a backend that pushes as fast as it
  can, whose clients stop reading.

Each phase reports how the gateway dealt with the attackers (what it answered
and when), its RSS at the start of the phase, at its peak and after it, the
backend connections the attackers caused, and the good clients' p50/p99 echo
latency against the unloaded figure, with any message lost. Good clients and
attackers have backends of their own. `--scale` shrinks every count and the
phases' waits for a quick check; a full run takes about 70 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import uvloop

from . import procstat
from .report import write_run
from .targets import HOST, REPO, Proc
from .wire import OP_BINARY, client_frame, new_key, raise_nofile, upgrade_request

# Attackers come from these addresses, so the per-IP limits (1,000 by default) hold the burst.
_SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 18))
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# A good client's message: its sequence number and the monotonic time it was sent.
_STAMP = struct.Struct("!Qd")
_GOOD_RATE = 100.0  # messages per second per good client
_RSS_INTERVAL = 0.1
PHASES = ("slowloris", "idle", "malformed", "flood", "burst", "firehose")
# The longest anything may take beyond what the phase expects of the gateway.
_SLACK = 10.0


@dataclass
class Phase:
    """One phase's figures, as reported."""

    name: str
    attackers: int
    started: float = 0.0
    ended: float = 0.0
    # What each attacker got from the gateway: a status code, "eof", "reset", "upgraded"...
    answers: Counter[str] = field(default_factory=Counter)
    # Seconds from an attacker's connect to the gateway's answer (or its drop).
    answer_seconds: list[float] = field(default_factory=list)
    backend_connections: int = 0
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_after_kib: int = 0
    notes: list[str] = field(default_factory=list)


class _Attacker(asyncio.Protocol):
    """A client that sends what it is told and notes what the gateway does about it."""

    def __init__(self, payload: bytes = b"", read_limit: int = 4096, stall: bool = False) -> None:
        self.payload = payload
        self.read_limit = read_limit
        self.stall = stall  # stop reading once answered
        self.transport: asyncio.Transport | None = None
        self.connected_at = 0.0
        self.answered_at = 0.0
        self.answer = ""
        self.head = bytearray()
        self.received = 0
        self.lost = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connected_at = time.monotonic()
        if self.payload:
            self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.answered_at:
            return
        self.head += data[: self.read_limit]
        end = self.head.find(b"\r\n")
        if end < 0 and len(self.head) < self.read_limit:
            return
        line = bytes(self.head[: end if end >= 0 else 40])
        self.answered_at = time.monotonic()
        if self.stall:
            assert self.transport is not None
            self.transport.pause_reading()
        parts = line.split(b" ", 2)
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/"):
            self.answer = "upgraded" if parts[1] == b"101" else parts[1].decode(errors="replace")
        else:
            self.answer = "other: " + line[:20].decode(errors="replace")
        if not self.done.done():
            self.done.set_result(None)

    def eof_received(self) -> bool:
        self._ended("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._ended("reset" if exc is not None else "eof")
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def _ended(self, how: str) -> None:
        if not self.answered_at:
            self.answered_at = time.monotonic()
            self.answer = how
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def _connect(factory: Callable[[], asyncio.Protocol], port: int, index: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((_SOURCES[index % len(_SOURCES)], 0))
        await loop.sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    await loop.create_connection(factory, sock=sock)


async def _open(attackers: list[_Attacker], port: int, timeout: float) -> list[str]:
    """Connect every attacker at once; returns why those that could not connect failed."""

    async def one(index: int, attacker: _Attacker) -> str:
        try:
            await asyncio.wait_for(_connect(lambda: attacker, port, index), timeout)
        except (OSError, TimeoutError) as exc:
            attacker.answer = "connect failed"
            if not attacker.done.done():
                attacker.done.set_result(None)
            return f"{type(exc).__name__}: {exc}"
        return ""

    failures = await asyncio.gather(*(one(i, a) for i, a in enumerate(attackers)))
    return [f for f in failures if f]


async def _wait_all(attackers: list[_Attacker], timeout: float) -> None:
    pending = [a.done for a in attackers if not a.done.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def _record(phase: Phase, attackers: list[_Attacker]) -> None:
    for attacker in attackers:
        phase.answers[attacker.answer or "no answer"] += 1
        if attacker.answered_at and attacker.connected_at:
            phase.answer_seconds.append(attacker.answered_at - attacker.connected_at)


def _request(port: int, path: str) -> bytes:
    return upgrade_request(HOST, port, path, new_key())


def malformed_requests(port: int) -> dict[str, bytes]:
    """One bad handshake of each kind, sent whole in one write."""
    start = f"GET /discard HTTP/1.1\r\nHost: {HOST}:{port}\r\n".encode()
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    key = b"Sec-WebSocket-Key: " + new_key() + b"\r\n"
    pad = b"".join(b"X-Pad-%04d: %s\r\n" % (i, b"p" * 80) for i in range(680))  # 64 KiB
    lines = b"".join(b"X-%d: y\r\n" % i for i in range(10_000))
    body = b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"
    return {
        "64KiB head": start + upgrade + key + pad + b"\r\n",
        "10,000 header lines": start + upgrade + key + lines + b"\r\n",
        "bad key": start + upgrade + b"Sec-WebSocket-Key: not-a-key\r\n\r\n",
        "smuggling": start + upgrade + key + b"Content-Length: %d\r\n" % len(body)
        + b"Transfer-Encoding: chunked\r\n\r\n" + body,
        "garbage": b"GET /\r\n\x00\x01\xff\xfe\r\n\r\n" + bytes(range(256)) * 8,
    }


# -- the good clients, in a process of their own -----------------------------------------


class _GoodClient(asyncio.Protocol):
    """Echoes stamped messages; keeps each echo's latency in the current phase's list."""

    def __init__(self, request: bytes, opened: asyncio.Future[None], samples: list[list[float]]) -> None:
        self.request = request
        self.opened = opened
        self.samples = samples
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.sent = 0
        self.received = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def send(self) -> None:
        assert self.transport is not None
        if self.lost:
            return
        self.transport.write(client_frame(_STAMP.pack(self.sent, time.monotonic()), OP_BINARY))
        self.sent += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buffer.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(bytes(self.buffer[:40]).decode(errors="replace")))
                return
            self.upgraded = True
            del self.buffer[: end + 4]
            self.opened.set_result(None)
        now = time.monotonic()
        frame = 2 + _STAMP.size
        samples = self.samples[-1]
        while len(self.buffer) >= frame:
            _, sent_at = _STAMP.unpack_from(self.buffer, 2)
            samples.append(now - sent_at)
            self.received += 1
            del self.buffer[:frame]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"lost before the 101 ({exc})"))


def _good_process(port: int, count: int, pipe: Connection) -> None:
    """Echo at a steady rate; a message on the pipe starts a new phase, "stop" ends the run."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        samples: list[list[float]] = [[]]
        clients = []
        for _ in range(count):
            opened: asyncio.Future[None] = loop.create_future()
            client = _GoodClient(_request(port, "/echo"), opened, samples)
            await loop.create_connection(lambda c=client: c, HOST, port)  # type: ignore[misc]
            await asyncio.wait_for(opened, 10)
            clients.append(client)
        pipe.send("ready")
        stop = asyncio.Event()
        phases: list[str] = []

        def on_message() -> None:
            message = pipe.recv()
            if message == "stop":
                stop.set()
            else:
                phases.append(message)
                samples.append([])

        loop.add_reader(pipe.fileno(), on_message)
        interval = 1.0 / _GOOD_RATE
        tick = loop.time()
        while not stop.is_set():
            for client in clients:
                client.send()
            tick += interval
            await asyncio.sleep(max(0.0, tick - loop.time()))
        loop.remove_reader(pipe.fileno())
        os.set_blocking(pipe.fileno(), True)  # the loop's reader made it non-blocking
        # Echoes still on their way are waited for, not counted lost.
        deadline = loop.time() + _SLACK
        while loop.time() < deadline and any(c.received < c.sent and not c.lost for c in clients):
            await asyncio.sleep(0.05)
        pipe.send({
            "latency": {phase: _latency(kept) for phase, kept in zip(phases, samples[1:])},
            "sent": sum(c.sent for c in clients),
            "received": sum(c.received for c in clients),
            "disconnected": sum(c.lost for c in clients),
        })
        for client in clients:
            if client.transport is not None:
                client.transport.abort()

    uvloop.run(main())


# -- the soak ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """The run's counts and waits."""

    slowloris: int
    idle: int
    malformed_each: int
    flood_conns: int
    flood_frames: int
    burst: int
    firehose: int
    firehose_stall: float  # seconds the firehosed clients hold without reading
    baseline: float  # seconds of unloaded echo
    settle: float  # seconds before RSS "after" is read: past the sweeper's 5 s look at closed relays

    @classmethod
    def of(cls, factor: float) -> Scale:
        def n(full: int) -> int:
            return max(1, round(full * factor))

        def seconds(full: float) -> float:
            return max(0.5, full * min(1.0, 2 * factor))

        return cls(
            slowloris=n(200), idle=n(200), malformed_each=n(40), flood_conns=n(50),
            flood_frames=max(100, round(100_000 * factor)), burst=n(5000), firehose=n(200),
            firehose_stall=seconds(5.0), baseline=seconds(5.0),
            settle=seconds(6.0),
        )


class Soak:
    """Runs the phases against one gateway, sampling its RSS all along."""

    def __init__(self, gateway_pid: int, port: int, attack_backend_port: int, scale: Scale,
                 handshake_timeout: float, mark: Callable[[str], None]) -> None:
        self.gateway_pid = gateway_pid
        self.port = port
        self.attack_backend_port = attack_backend_port
        self.scale = scale
        self.handshake_timeout = handshake_timeout
        self.mark = mark
        self.rss: list[tuple[float, int]] = []
        self.phases: list[Phase] = []

    async def sample_rss(self) -> None:
        while True:
            self.rss.append((time.monotonic(), procstat.rss_kib(self.gateway_pid)))
            await asyncio.sleep(_RSS_INTERVAL)

    async def backend_stats(self) -> dict[str, int]:
        reader, writer = await asyncio.open_connection(HOST, self.attack_backend_port)
        writer.write(b"GET /stats HTTP/1.1\r\nHost: backend\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return cast(dict[str, int], json.loads(reply.split(b"\r\n\r\n", 1)[1]))

    async def run_phase(self, name: str, attackers: int, attack: Callable[[Phase], Awaitable[None]]) -> Phase:
        phase = Phase(name, attackers)
        print(f"bench.soak: {name}: {attackers:,} attackers", flush=True)
        self.mark(name)
        accepted = (await self.backend_stats())["accepted"]
        phase.rss_before_kib = procstat.rss_kib(self.gateway_pid)
        phase.started = time.monotonic()
        await attack(phase)
        phase.ended = time.monotonic()
        self.mark(f"{name} settle")
        await asyncio.sleep(self.scale.settle)
        phase.rss_after_kib = procstat.rss_kib(self.gateway_pid)
        phase.rss_peak_kib = max(
            [kib for at, kib in self.rss if at >= phase.started] + [phase.rss_after_kib]
        )
        phase.backend_connections = (await self.backend_stats())["accepted"] - accepted
        self.phases.append(phase)
        return phase

    async def run(self, names: list[str]) -> None:
        scale = self.scale
        phases = {
            "slowloris": (scale.slowloris, self.slowloris),
            "idle": (scale.idle, self.idle),
            "malformed": (scale.malformed_each * 5, self.malformed),
            "flood": (scale.flood_conns, self.flood),
            "burst": (scale.burst, self.burst),
            "firehose": (scale.firehose, self.firehose),
        }
        sampler = asyncio.create_task(self.sample_rss())
        try:
            self.mark("unloaded")
            await asyncio.sleep(scale.baseline)
            for name in names:
                await self.run_phase(name, *phases[name])
        finally:
            sampler.cancel()

    async def _hold_until_dropped(self, phase: Phase, attackers: list[_Attacker]) -> None:
        failures = await _open(attackers, self.port, _SLACK)
        if failures:
            phase.notes.append(f"{len(failures)} could not connect ({failures[0]})")
        await _wait_all(attackers, self.handshake_timeout + _SLACK)
        _record(phase, attackers)
        for attacker in attackers:
            attacker.abort()

    async def slowloris(self, phase: Phase) -> None:
        request = _request(self.port, "/discard")
        attackers = [_Attacker() for _ in range(phase.attackers)]

        async def trickle() -> None:
            for index in range(len(request)):
                for attacker in attackers:
                    if attacker.transport is not None and not attacker.answered_at:
                        attacker.transport.write(request[index : index + 1])
                await asyncio.sleep(1.0)

        trickling = asyncio.create_task(trickle())
        try:
            await self._hold_until_dropped(phase, attackers)
        finally:
            trickling.cancel()

    async def idle(self, phase: Phase) -> None:
        await self._hold_until_dropped(phase, [_Attacker() for _ in range(phase.attackers)])

    async def malformed(self, phase: Phase) -> None:
        kinds = malformed_requests(self.port)
        each = self.scale.malformed_each
        attackers = [_Attacker(payload) for payload in kinds.values() for _ in range(each)]
        failures = await _open(attackers, self.port, _SLACK)
        if failures:
            phase.notes.append(f"{len(failures)} could not connect ({failures[0]})")
        await _wait_all(attackers, self.handshake_timeout + _SLACK)
        _record(phase, attackers)
        for index, kind in enumerate(kinds):
            answers = Counter(a.answer or "no answer" for a in attackers[index * each : (index + 1) * each])
            got = ", ".join(f"{n} {answer}" for answer, n in answers.most_common())
            phase.notes.append(f"{kind}: {got}")
        for attacker in attackers:
            attacker.abort()

    async def _upgrade(
        self, phase: Phase, path: str, count: int, timeout: float, stall: bool = False
    ) -> list[_Attacker]:
        """Open `count` upgraded attackers at once; returns those that got their 101."""
        attackers = [_Attacker(_request(self.port, path), stall=stall) for _ in range(count)]
        failures = await _open(attackers, self.port, timeout)
        if failures:
            phase.notes.append(f"{len(failures)} could not connect ({failures[0]})")
        await _wait_all(attackers, timeout)
        _record(phase, attackers)
        return [a for a in attackers if a.answer == "upgraded"]

    async def flood(self, phase: Phase) -> None:
        scale = self.scale
        upgraded = await self._upgrade(phase, "/discard", phase.attackers, self.handshake_timeout + _SLACK)
        frames = client_frame(b"x") * scale.flood_frames
        before = (await self.backend_stats())["discarded"]
        started = time.monotonic()
        for attacker in upgraded:
            assert attacker.transport is not None
            attacker.transport.write(frames)
        expected = before + len(frames) * len(upgraded)
        deadline = started + 60.0
        discarded = before
        while time.monotonic() < deadline:
            discarded = (await self.backend_stats())["discarded"]
            if discarded >= expected:
                break
            await asyncio.sleep(0.1)
        seconds = time.monotonic() - started
        relayed = (discarded - before) // len(client_frame(b"x"))
        phase.notes.append(
            f"{relayed:,} of {scale.flood_frames * len(upgraded):,} frames relayed in {seconds:.1f} s"
            f" ({relayed / seconds:,.0f}/s)"
        )
        for attacker in upgraded:
            attacker.abort()

    async def burst(self, phase: Phase) -> None:
        upgraded = await self._upgrade(phase, "/discard", phase.attackers, self.handshake_timeout + _SLACK)
        times = sorted(a.answered_at - a.connected_at for a in upgraded)
        if times:
            phase.notes.append(f"all {len(upgraded):,} upgraded within {times[-1]:.1f} s of connecting")
        await asyncio.sleep(1.0)
        for attacker in upgraded:
            attacker.abort()

    async def firehose(self, phase: Phase) -> None:
        upgraded = await self._upgrade(
            phase, "/push?size=16384", phase.attackers, self.handshake_timeout + _SLACK, stall=True
        )
        await asyncio.sleep(self.scale.firehose_stall)
        dropped = sum(a.lost for a in upgraded)
        phase.notes.append(
            f"read nothing after the 101 for {self.scale.firehose_stall:g} s; {dropped} dropped by"
            f" the gateway meanwhile, {len(upgraded) - dropped} closed by the soak"
        )
        for attacker in upgraded:
            attacker.abort()


def _config(good_port: int, attack_port: int, handshake_timeout: float) -> str:
    return (
        "# Written by bench.soak: wsgate's defaults, with a short handshake timeout.\n"
        "listeners:\n  - name: soak\n    bind: 127.0.0.1:0\n"
        "admin:\n  enabled: false\n"
        "routes:\n"
        "  - name: good\n    match: {path_prefix: /echo}\n"
        f"    backends:\n      - url: ws://127.0.0.1:{good_port}\n"
        "  - name: attack\n"
        f"    backends:\n      - url: ws://127.0.0.1:{attack_port}\n"
        f"timeouts: {{handshake: {handshake_timeout}s}}\n"
    )


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def _latency(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "count": len(ordered),
        "p50_ms": round(1000 * _percentile(ordered, 0.50), 2),
        "p99_ms": round(1000 * _percentile(ordered, 0.99), 2),
        "max_ms": round(1000 * ordered[-1], 2) if ordered else 0.0,
    }


def _summary(phase: Phase, latency: dict[str, float], unloaded_p99: float) -> dict[str, Any]:
    answer_seconds = sorted(phase.answer_seconds)
    return {
        "phase": phase.name,
        "attackers": phase.attackers,
        "seconds": round(phase.ended - phase.started, 1),
        "answers": dict(phase.answers.most_common()),
        "answer_s_p50": round(statistics.median(answer_seconds), 2) if answer_seconds else None,
        "answer_s_max": round(answer_seconds[-1], 2) if answer_seconds else None,
        "backend_connections": phase.backend_connections,
        "rss_before_mib": round(phase.rss_before_kib / 1024, 1),
        "rss_peak_mib": round(phase.rss_peak_kib / 1024, 1),
        "rss_after_mib": round(phase.rss_after_kib / 1024, 1),
        "good": latency,
        "p99_ratio": round(latency["p99_ms"] / unloaded_p99, 1) if unloaded_p99 else None,
        "notes": phase.notes,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--good", type=int, default=20, help="good clients (default %(default)s)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of every attacker count, and of the waits when below 0.5 (default 1)")
    parser.add_argument("--handshake-timeout", type=float, default=5.0,
                        help="wsgate's timeouts.handshake in seconds (default %(default)s)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="comma-separated phases to run, in this order (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "results",
                        help="results folder (default %(default)s)")
    args = parser.parse_args(argv)
    args.phase_names = [name for name in PHASES if name in args.phases.split(",")]
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown or not args.phase_names:
        parser.error(f"--phases: expected some of {','.join(PHASES)}")
    if args.good < 1 or not 0 < args.scale <= 1 or args.handshake_timeout <= 0:
        parser.error("--good must be positive, --scale in (0, 1], --handshake-timeout positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    scale = Scale.of(args.scale)
    workdir = Path(tempfile.mkdtemp(prefix="wsgate-soak-"))
    started: list[Proc] = []
    good: multiprocessing.Process | None = None
    try:
        ports = []
        for name in ("good-backend", "attack-backend"):
            backend = Proc(name, [sys.executable, "-m", "bench.echo_backend", "--port", "0"], workdir)
            started.append(backend)
            ports.append(backend.wait_for_port())
        config = workdir / "wsgate.yaml"
        config.write_text(_config(ports[0], ports[1], args.handshake_timeout))
        gateway = Proc("wsgate", [sys.executable, "-m", "wsgate", "run", "-c", str(config)], workdir)
        started.append(gateway)
        port = gateway.wait_for_port()
        context = multiprocessing.get_context("spawn")
        pipe, child_end = context.Pipe()
        good = context.Process(target=_good_process, args=(port, args.good, child_end), daemon=True)
        good.start()
        if not pipe.poll(30) or pipe.recv() != "ready":
            raise RuntimeError("the good clients did not connect")
        soak = Soak(gateway.pid, port, ports[1], scale, args.handshake_timeout, pipe.send)
        print(f"bench.soak: {args.good} good clients at {_GOOD_RATE:g} msg/s each through wsgate on"
              f" port {port}; logs in {workdir}", flush=True)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(soak.run(args.phase_names))
        pipe.send("stop")
        if not pipe.poll(2 * _SLACK):
            raise RuntimeError("the good clients did not report")
        report = pipe.recv()
        gateway_alive = gateway.popen.poll() is None
    except BaseException:
        print(f"bench.soak: failed; the processes' logs are in {workdir}", file=sys.stderr)
        raise
    finally:
        if good is not None:
            good.join(timeout=10)
            if good.is_alive():
                good.kill()
        for proc in reversed(started):
            proc.stop()
    latency = report["latency"]
    unloaded = latency.get("unloaded", _latency([]))
    phases = [_summary(p, latency.get(p.name, _latency([])), unloaded["p99_ms"]) for p in soak.phases]
    result: dict[str, Any] = {
        "good_clients": args.good,
        "scale": args.scale,
        "handshake_timeout_s": args.handshake_timeout,
        "unloaded": unloaded,
        "phases": phases,
        "good_sent": report["sent"],
        "good_lost": report["sent"] - report["received"],
        "good_disconnected": report["disconnected"],
        "gateway_alive": gateway_alive,
    }
    _report(result, args.out)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if gateway_alive and not result["good_lost"] and not result["good_disconnected"] else 1


def _report(result: dict[str, Any], out: Path) -> None:
    unloaded = result["unloaded"]
    print(f"\nunloaded echo: p50 {unloaded['p50_ms']} ms, p99 {unloaded['p99_ms']} ms"
          f" ({unloaded['count']:,} echoes)")
    print("\n| phase | attackers | answered with | answer after (p50 / max) | backend conns"
          " | RSS MiB before / peak / after | good p50 / p99 ms | p99 × unloaded |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for phase in result["phases"]:
        answers = ", ".join(f"{n:,} {answer}" for answer, n in phase["answers"].items())
        timing = "–"
        if phase["answer_s_p50"] is not None:
            timing = f"{phase['answer_s_p50']} / {phase['answer_s_max']} s"
        good = phase["good"]
        print(f"| {phase['phase']} | {phase['attackers']:,} | {answers} | {timing}"
              f" | {phase['backend_connections']}"
              f" | {phase['rss_before_mib']} / {phase['rss_peak_mib']} / {phase['rss_after_mib']}"
              f" | {good['p50_ms']} / {good['p99_ms']} | ×{phase['p99_ratio']} |")
    for phase in result["phases"]:
        for note in phase["notes"]:
            print(f"note: {phase['phase']}: {note}")
    print(f"good messages: {result['good_sent']:,} sent, {result['good_lost']:,} lost,"
          f" {result['good_disconnected']} good clients disconnected")
    print(f"bench.soak: wrote {write_run(out, 'soak', result)}")


if __name__ == "__main__":
    sys.exit(main())
