"""Paired flow control, measured on a real gateway process.

A raw backend pushes 512 MiB of 1 MiB binary frames as fast as its socket takes
them, toward a raw client that reads slowly at first and then as fast as it
can. If the gateway kept reading the backend while the client leg's write
buffer was full, the backlog would pile up in the gateway's memory; with
paired flow control it stays in the kernel's socket buffers. The gateway's RSS
is sampled throughout, and every frame is checked for size, order and content.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import struct
import sys
import time
from pathlib import Path

import psutil
from peers import STEP_TIMEOUT, read_response_head, upgrade_request

from wsgate.handshake import accept_key

KiB = 1024
MiB = 1024 * KiB

FRAME_SIZE = 1 * MiB
FRAME_COUNT = 512
# The first bytes are read in small pieces with pauses, so that the backend
# outruns the client for a while and the gateway has to push back.
SLOW_BYTES = 64 * MiB
SLOW_READ_SIZE = 64 * KiB
SLOW_READ_PAUSE = 0.001
FAST_READ_SIZE = 4 * MiB
RSS_SAMPLE_INTERVAL = 0.05

# The gateway holds at most high_water (256 KiB) unsent on each leg plus the read
# in hand (uvloop reads up to 256 KiB at a time): about 1 MiB. The kernel buffers
# the rest of the backlog (socket buffers are not in RSS). The bound leaves room
# for interpreter and allocator noise: pymalloc arenas, glibc's heap keeping freed
# 256 KiB chunks after its mmap threshold adapts. Without flow control the
# backlog would reach tens of MiB within the slow phase alone.
MAX_RSS_GROWTH = 16 * MiB

# Everything, from starting the gateway to its exit, fits in this many seconds.
TEST_TIMEOUT = 60.0

# Each frame: FIN + binary, no mask, 64-bit length, then the sequence number and filler.
FRAME_HEAD = struct.pack("!BBQ", 0x82, 127, FRAME_SIZE)
FILLER = bytes(range(256)) * ((FRAME_SIZE - 8) // 256) + bytes(range((FRAME_SIZE - 8) % 256))
assert len(FILLER) == FRAME_SIZE - 8

CLIENT_CLOSE = b"\x88\x86" + b"\x0a\x0b\x0c\x0d" + bytes(
    b ^ m for b, m in zip(struct.pack("!H", 1000) + b"done", b"\x0a\x0b\x0c\x0d\x0a\x0b", strict=True)
)
BACKEND_CLOSE = b"\x88\x05" + struct.pack("!H", 1000) + b"bye"

CONFIG = """\
listeners: [{name: flow, bind: "127.0.0.1:0"}]
admin: {enabled: false}
routes:
  - name: flood
    backends: [{url: "ws://127.0.0.1:%d"}]
heartbeat: {interval: 0}
timeouts: {idle: 0}
flow_control: {high_water: 256KiB, low_water: 64KiB}
limits: {max_message_size: 0}
log: {level: info}
"""


def _request_key(head: bytes) -> bytes:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"sec-websocket-key:"):
            return line.split(b":", 1)[1].strip()
    raise AssertionError("no Sec-WebSocket-Key forwarded")


class FloodBackend:
    """Answers one upgrade, floods the connection when told to, then closes cleanly."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(_request_key(head)) + b"\r\n\r\n"
            )
            await writer.drain()
            await self.go.wait()
            for seq in range(FRAME_COUNT):
                writer.write(FRAME_HEAD + struct.pack("!Q", seq))
                writer.write(FILLER)
                await writer.drain()
            # The client's Close, forwarded byte for byte, then ours back and EOF.
            close = await reader.readexactly(len(CLIENT_CLOSE))
            writer.write(BACKEND_CLOSE)
            await writer.drain()
            tail = await reader.read()
            self.done.set_result(close + tail)
        except Exception as exc:  # reported to the test through `done`
            if not self.done.done():
                self.done.set_exception(exc)
        finally:
            writer.close()


class FrameChecker:
    """Parses the backend-to-client stream: FRAME_COUNT frames in order; keeps what follows."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.frames = 0
        self.received = 0

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        buffer = self.buffer
        buffer += data
        while self.frames < FRAME_COUNT and len(buffer) >= len(FRAME_HEAD) + FRAME_SIZE:
            assert buffer[: len(FRAME_HEAD)] == FRAME_HEAD, f"frame {self.frames}: bad header {bytes(buffer[:10])!r}"
            start = len(FRAME_HEAD)
            seq = struct.unpack_from("!Q", buffer, start)[0]
            assert seq == self.frames, f"frame {self.frames} carries sequence number {seq}"
            assert buffer[start + 8 : start + FRAME_SIZE] == FILLER, f"frame {seq}: filler corrupted"
            del buffer[: start + FRAME_SIZE]
            self.frames += 1


async def _sample_rss(process: psutil.Process, samples: list[int]) -> None:
    while True:
        samples.append(process.memory_info().rss)
        await asyncio.sleep(RSS_SAMPLE_INTERVAL)


async def _stop(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _drain_lines(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode(errors="replace").rstrip())


async def test_slow_client_does_not_grow_gateway_memory(tmp_path: Path) -> None:
    started = time.monotonic()
    backend = FloodBackend()
    server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
    config = tmp_path / "wsgate.yaml"
    config.write_text(CONFIG % server.sockets[0].getsockname()[1])
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsgate", "run", "-c", str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert gateway.stderr is not None
    log: list[str] = []
    log_task: asyncio.Task[None] | None = None
    sampler: asyncio.Task[None] | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            port = None
            while port is None:
                line = (await asyncio.wait_for(gateway.stderr.readline(), STEP_TIMEOUT)).decode()
                assert line, f"the gateway exited before listening: {log}"
                log.append(line.rstrip())
                if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                    port = int(match.group(1))
            log_task = asyncio.create_task(_drain_lines(gateway.stderr, log))

            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=FAST_READ_SIZE)
            writer.write(upgrade_request())
            status, _, _ = await read_response_head(reader)
            assert status == 101

            samples: list[int] = []
            measured = psutil.Process(gateway.pid)
            baseline = measured.memory_info().rss
            sampler = asyncio.create_task(_sample_rss(measured, samples))
            backend.go.set()

            checker = FrameChecker()
            while checker.received < SLOW_BYTES:
                data = await asyncio.wait_for(reader.read(SLOW_READ_SIZE), STEP_TIMEOUT)
                assert data, "the gateway closed the client connection mid-stream"
                checker.feed(data)
                await asyncio.sleep(SLOW_READ_PAUSE)
            slow_done = time.monotonic()
            while checker.frames < FRAME_COUNT:
                data = await asyncio.wait_for(reader.read(FAST_READ_SIZE), STEP_TIMEOUT)
                assert data, f"EOF after {checker.frames} frames"
                checker.feed(data)
            transfer_done = time.monotonic()
            await _stop(sampler)
            samples.append(measured.memory_info().rss)
            growth = max(samples) - baseline

            # Close: ours goes to the backend untouched, the backend's comes back, then EOF.
            writer.write(CLIENT_CLOSE)
            await writer.drain()
            rest = bytes(checker.buffer) + await asyncio.wait_for(reader.read(), STEP_TIMEOUT)
            assert rest == BACKEND_CLOSE
            assert await asyncio.wait_for(backend.done, STEP_TIMEOUT) == CLIENT_CLOSE

            gateway.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(gateway.wait(), STEP_TIMEOUT) == 0, log
    finally:
        await _stop(sampler)
        await _stop(log_task)
        if writer is not None:
            writer.close()
        server.close()
        if gateway.returncode is None:
            gateway.kill()
            await gateway.wait()

    print(
        f"\nflow control: {FRAME_COUNT} x {FRAME_SIZE // MiB} MiB relayed in {transfer_done - started:.1f}s "
        f"(first {SLOW_BYTES // MiB} MiB read slowly, by {slow_done - started:.1f}s); gateway RSS baseline "
        f"{baseline / MiB:.1f} MiB, max growth {growth / MiB:.2f} MiB over {len(samples)} samples "
        f"(bound {MAX_RSS_GROWTH // MiB} MiB); whole test {time.monotonic() - started:.1f}s"
    )
    assert growth < MAX_RSS_GROWTH, f"gateway RSS grew by {growth / MiB:.1f} MiB"
