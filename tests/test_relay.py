"""The frame-aware relay through a running gateway: violations, closes, failures, liveness."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import struct
import sys
import zlib
from collections.abc import AsyncIterator

import pytest
import websockets
from conftest import Backend, gateway_config
from peers import (
    STEP_TIMEOUT,
    accept_upgrade,
    client_frame,
    close_payload,
    open_raw_client,
    read_frame,
    read_until_close,
    server_frame,
)
from test_operations import access_records, start_admin  # noqa: F401

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
MASK = b"\x11\x22\x33\x44"


def masked_head(first: int, second_len: bytes) -> bytes:
    """A client frame header with an arbitrary length field, then the mask key."""
    return bytes([first]) + second_len + MASK


CLIENT_VIOLATIONS = [
    pytest.param(server_frame(TEXT, b"unmasked"), 1002, id="unmasked"),
    pytest.param(client_frame(0x3, b"x"), 1002, id="reserved-opcode-3"),
    pytest.param(client_frame(0xB, b"x"), 1002, id="reserved-opcode-0xB"),
    pytest.param(client_frame(PING, b"p" * 126), 1002, id="long-control"),
    pytest.param(client_frame(PING, b"p", fin=False), 1002, id="fragmented-control"),
    pytest.param(client_frame(CONT, b"orphan"), 1002, id="orphan-continuation"),
    pytest.param(client_frame(TEXT, b"a", fin=False) + client_frame(TEXT, b"b"), 1002, id="data-inside-message"),
    pytest.param(bytes([0xC1]) + client_frame(TEXT, b"rsv1")[1:], 1002, id="rsv1-without-deflate"),
    pytest.param(bytes([0xA1]) + client_frame(TEXT, b"rsv2")[1:], 1002, id="rsv2"),
    pytest.param(bytes([0x91]) + client_frame(TEXT, b"rsv3")[1:], 1002, id="rsv3"),
    pytest.param(masked_head(0x82, bytes([0xFF]) + struct.pack("!Q", 1 << 63)), 1002, id="length-top-bit"),
    pytest.param(client_frame(CLOSE, b"\x03"), 1002, id="close-1-byte"),
    pytest.param(client_frame(CLOSE, close_payload(1005)), 1002, id="close-code-1005"),
    pytest.param(client_frame(CLOSE, close_payload(999)), 1002, id="close-code-999"),
    pytest.param(client_frame(CLOSE, close_payload(1000) + b"\xff\xfe"), 1007, id="close-reason-not-utf8"),
    pytest.param(client_frame(BINARY, b"x" * 2048), 1009, id="too-big"),
    pytest.param(client_frame(TEXT, b"x" * 1000, fin=False) + client_frame(CONT, b"x" * 1000), 1009, id="too-big-fragments"),
]


@pytest.mark.parametrize(("bad", "code"), CLIENT_VIOLATIONS)
async def test_client_violation_closes_client_with_code_and_backend_with_1001(
    start_gateway, ws_backend, bad, code
):
    url = await start_gateway(gateway_config([ws_backend.url], limits={"max_message_size": "1500B"}))
    reader, writer = await open_raw_client(url)
    try:
        # A good message first, in the same write: it must still be delivered.
        writer.write(client_frame(TEXT, b"before") + bad)
        frames, close = await read_until_close(reader)
        assert close.close[0] == code
        assert not close.masked
        assert [f.payload for f in frames if f.opcode == TEXT] in ([b"before"], [])
        assert await asyncio.wait_for(ws_backend.closes.get(), STEP_TIMEOUT) == (1001, "")
        assert ws_backend.messages[:1] == ["before"]
        # The offender gets no close handshake: the gateway hangs up.
        assert await asyncio.wait_for(reader.read(), STEP_TIMEOUT) == b""
    finally:
        writer.close()


def server_head(first: int, second_len: bytes) -> bytes:
    """A server frame header with an arbitrary length field."""
    return bytes([first]) + second_len


BACKEND_VIOLATIONS = [
    pytest.param(client_frame(TEXT, b"masked"), 1002, id="masked"),
    pytest.param(server_frame(0x4, b"x"), 1002, id="reserved-opcode-4"),
    pytest.param(server_frame(0xF, b"x"), 1002, id="reserved-opcode-0xF"),
    pytest.param(server_frame(PING, b"p" * 126), 1002, id="long-control"),
    pytest.param(server_frame(PONG, b"p", fin=False), 1002, id="fragmented-control"),
    pytest.param(server_frame(CONT, b"orphan"), 1002, id="orphan-continuation"),
    pytest.param(server_frame(BINARY, b"a", fin=False) + server_frame(BINARY, b"b"), 1002, id="data-inside-message"),
    pytest.param(server_frame(TEXT, b"rsv1", rsv=4), 1002, id="rsv1-without-deflate"),
    pytest.param(server_frame(TEXT, b"rsv2", rsv=2), 1002, id="rsv2"),
    pytest.param(server_frame(TEXT, b"rsv3", rsv=1), 1002, id="rsv3"),
    pytest.param(server_head(0x82, bytes([0x7F]) + struct.pack("!Q", 1 << 63)), 1002, id="length-top-bit"),
    pytest.param(server_frame(CLOSE, b"\x03"), 1002, id="close-1-byte"),
    pytest.param(server_frame(CLOSE, close_payload(1006)), 1002, id="close-code-1006"),
    pytest.param(server_frame(CLOSE, close_payload(5000)), 1002, id="close-code-5000"),
    pytest.param(server_frame(CLOSE, close_payload(1000) + b"\xc3"), 1007, id="close-reason-not-utf8"),
    pytest.param(server_frame(BINARY, b"x" * 2048), 1009, id="too-big"),
    pytest.param(server_frame(TEXT, b"x" * 1000, fin=False) + server_frame(CONT, b"x" * 1000), 1009, id="too-big-fragments"),
]


@pytest.mark.parametrize(("bad", "code"), BACKEND_VIOLATIONS)
async def test_backend_violation_closes_client_with_1014_and_backend_with_code(
    start_gateway, raw_backend, bad, code
):
    seen: asyncio.Future = asyncio.get_running_loop().create_future()

    async def misbehave(reader, writer):
        await accept_upgrade(reader, writer)
        writer.write(server_frame(TEXT, b"fine") + bad)
        _, close = await read_until_close(reader)
        seen.set_result(close)

    backend = await raw_backend(misbehave)
    url = await start_gateway(gateway_config([backend.url], limits={"max_message_size": "1500B"}))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            assert await ws.recv() == "fine"
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1014
        close = await seen
    assert close.masked, "frames toward a backend are masked by the gateway"
    assert close.close[0] == code


# -- compressed messages and the size limit -------------------------------------------

DEFLATE_LIMIT = 256 * 1024
# What docs/relay.md allows a compressed message over the limit: 5 bytes per 2,047, plus 64.
DEFLATE_ALLOWANCE = 5 * math.ceil(DEFLATE_LIMIT / 2047) + 64


def incompressible(size: int) -> bytes:
    """Random bytes, the same on every run: deflate can only make them longer."""
    return random.Random(size).randbytes(size)


async def test_incompressible_message_of_exactly_the_limit_crosses_compressed(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], limits={"max_message_size": DEFLATE_LIMIT}))
    data = incompressible(DEFLATE_LIMIT)
    async with asyncio.timeout(STEP_TIMEOUT):
        # websockets compresses by default on both sides, at its own settings (memLevel 5).
        async with websockets.connect(url, max_size=None) as ws:
            assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
            await ws.send(data)
            assert await ws.recv() == data  # the backend's echo, compressed too
    assert ws.close_code == 1000
    assert ws_backend.messages == [data]


async def test_compressed_message_past_the_allowance_is_refused_with_1009(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], limits={"max_message_size": DEFLATE_LIMIT}))
    data = incompressible(DEFLATE_LIMIT + DEFLATE_ALLOWANCE)
    # Whatever the compressor's settings, random bytes come out longer than they went in.
    squeezed = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    assert len(squeezed.compress(data) + squeezed.flush(zlib.Z_SYNC_FLUSH)) - 4 > len(data)
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(data)
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
    assert ws.close_code == 1009
    assert await asyncio.wait_for(ws_backend.closes.get(), STEP_TIMEOUT) == (1001, "")
    assert ws_backend.messages == []


# -- close handshake ---------------------------------------------------------------


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (1001, "bye"), (4000, "custom reason")])
async def test_backend_initiated_close_reaches_client(start_gateway, ws_backend, code, reason):
    url = await start_gateway(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            await ws.send(f"close {code} {reason}")
            await ws.wait_closed()
    assert (ws.close_code, ws.close_reason) == (code, reason)


async def test_status_less_close_from_client(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    reader, writer = await open_raw_client(url)
    try:
        writer.write(client_frame(CLOSE, b""))
        _, close = await read_until_close(reader)
        assert close.close == (None, "")
        assert await asyncio.wait_for(ws_backend.closes.get(), STEP_TIMEOUT) == (1005, "")
        assert await asyncio.wait_for(reader.read(), STEP_TIMEOUT) == b""
    finally:
        writer.close()


async def test_status_less_close_from_backend(start_gateway, raw_backend):
    reply: asyncio.Future = asyncio.get_running_loop().create_future()

    async def close_bare(reader, writer):
        await accept_upgrade(reader, writer)
        writer.write(server_frame(CLOSE, b""))
        _, close = await read_until_close(reader)
        reply.set_result(close)

    url = await start_gateway(gateway_config([(await raw_backend(close_bare)).url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            await ws.wait_closed()
        assert ws.close_code == 1005
        assert (await reply).close == (None, "")


async def test_fragmented_message_with_interleaved_pings(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    reader, writer = await open_raw_client(url)
    try:
        writer.write(
            client_frame(TEXT, b"hel", fin=False)
            + client_frame(PING, b"p1")
            + client_frame(CONT, b"lo ", fin=False)
            + client_frame(PING, b"p2")
            + client_frame(CONT, b"world")
        )
        frames = [await read_frame(reader) for _ in range(3)]
        assert sorted(f.payload for f in frames if f.opcode == PONG) == [b"p1", b"p2"]
        assert [f.payload for f in frames if f.opcode == TEXT] == [b"hello world"]
        assert ws_backend.messages == ["hello world"]
    finally:
        writer.close()


# -- failures become close frames ----------------------------------------------------


async def test_backend_killed_mid_frame_hangs_up_on_client_at_once(start_gateway, raw_backend):
    async def die(reader, writer):
        await accept_upgrade(reader, writer)
        writer.write(server_frame(BINARY, b"x" * 100_000)[:50_000])  # half a frame, then gone
        await writer.drain()
        writer.transport.abort()

    # A close timeout far beyond the test's: the hang-up must not wait for it.
    url = await start_gateway(gateway_config([(await raw_backend(die)).url], timeouts={"close": "60s"}))
    async with asyncio.timeout(STEP_TIMEOUT):
        ws = await websockets.connect(url)
        await ws.wait_closed()
    # No Close frame can follow half a frame: the client sees the TCP connection end.
    assert ws.close_code == 1006


async def test_backend_lost_between_messages_gives_client_1014(start_gateway, raw_backend):
    async def die(reader, writer):
        await accept_upgrade(reader, writer)
        writer.write(server_frame(TEXT, b"last words"))
        await writer.drain()
        writer.transport.abort()

    url = await start_gateway(gateway_config([(await raw_backend(die)).url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            assert await ws.recv() == "last words"
            await ws.wait_closed()
    assert ws.close_code == 1014


async def test_client_dropped_gives_backend_1001(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    reader, writer = await open_raw_client(url)
    writer.write(client_frame(TEXT, b"hi"))
    assert (await read_frame(reader)).payload == b"hi"
    writer.transport.abort()
    assert await asyncio.wait_for(ws_backend.closes.get(), STEP_TIMEOUT) == (1001, "")


async def test_gateway_shutdown_closes_both_sides_with_1001(ws_backend):
    from wsgate.config import parse_config
    from wsgate.gateway import Gateway

    gateway = Gateway(parse_config(gateway_config([ws_backend.url])))
    await gateway.start()
    host, port = gateway.addresses[0]
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(f"ws://{host}:{port}") as ws:
            await ws.send("hi")
            await ws.recv()
            await gateway.close()
            await ws.wait_closed()
    assert ws.close_code == 1001
    assert await asyncio.wait_for(ws_backend.closes.get(), STEP_TIMEOUT) == (1001, "going away")


# -- fairness between busy and quiet connections --------------------------------------------

BURST_SIZE = 8 * 1024 * 1024


async def pushing_backend(raw_backend, burst: bytes) -> tuple[Backend, asyncio.Event]:
    """A backend that accepts each upgrade, then writes `burst` once the event is set."""
    start_pushing = asyncio.Event()

    async def push(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        await start_pushing.wait()
        writer.write(burst)
        await writer.drain()
        await reader.read(2)  # the gateway's Close, once the client has gone

    return await raw_backend(push), start_pushing


async def test_a_busy_leg_reads_at_most_one_buffer_per_turn_of_the_loop(raw_backend):
    # uvloop goes on reading a socket while its reads fill the buffer; without a yield,
    # a backend pushing megabytes would hold the loop while quiet connections wait.
    from wsgate.config import parse_config
    from wsgate.gateway import Gateway

    burst = server_frame(BINARY, b"b" * BURST_SIZE)
    backend, start_pushing = await pushing_backend(raw_backend, burst)
    gateway = Gateway(parse_config(gateway_config([backend.url])))
    await gateway.start()
    host, port = gateway.addresses[0]
    loop = asyncio.get_running_loop()
    read_per_turn: list[int] = []
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            reader, writer = await open_raw_client(f"ws://{host}:{port}")
            (relay,) = gateway.books.relays
            watched = asyncio.Event()

            def each_turn(before: int) -> None:
                now = relay.backend.bytes_received
                read_per_turn.append(now - before)
                if now < len(burst) and len(read_per_turn) < 100_000:
                    loop.call_soon(each_turn, now)
                else:
                    watched.set()

            loop.call_soon(each_turn, 0)
            start_pushing.set()
            await reader.readexactly(len(burst))
            await watched.wait()
            writer.close()
    finally:
        await gateway.close()
    assert sum(read_per_turn) == len(burst)
    assert max(read_per_turn) <= 256 * 1024


BUSY_CONNECTIONS = 40
BUSY_PUSH_SIZE = 2 * 1024 * 1024


async def test_busy_legs_take_turns_to_read(raw_backend):
    # With many backends pushing at once, each reading one buffer per turn would still
    # make every turn as long as all their reads together.
    from wsgate.config import parse_config
    from wsgate.gateway import Gateway
    from wsgate.leg import TURN_READ_SIZE
    from wsgate.relay import BULK_LEGS_PER_TURN

    burst = server_frame(BINARY, b"b" * BUSY_PUSH_SIZE)
    backend, start_pushing = await pushing_backend(raw_backend, burst)
    limits = {"max_connections_per_ip": 2 * BUSY_CONNECTIONS}
    gateway = Gateway(parse_config(gateway_config([backend.url], limits=limits)))
    await gateway.start()
    host, port = gateway.addresses[0]
    loop = asyncio.get_running_loop()
    # Per turn: the legs that made a large read, not counting each leg's first.
    again_per_turn: list[int] = []
    clients = []
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            for _ in range(BUSY_CONNECTIONS):
                clients.append(await open_raw_client(f"ws://{host}:{port}"))
            legs = [relay.backend for relay in gateway.books.relays]
            seen = [0] * len(legs)
            large_reads = [0] * len(legs)
            watched = asyncio.Event()

            def each_turn() -> None:
                again = 0
                for index, leg in enumerate(legs):
                    if leg.bytes_received - seen[index] >= TURN_READ_SIZE:
                        large_reads[index] += 1
                        again += large_reads[index] > 1
                    seen[index] = leg.bytes_received
                again_per_turn.append(again)
                if sum(seen) < len(legs) * len(burst) and len(again_per_turn) < 100_000:
                    loop.call_soon(each_turn)
                else:
                    watched.set()

            loop.call_soon(each_turn)
            start_pushing.set()
            await asyncio.gather(*(reader.readexactly(len(burst)) for reader, _ in clients))
            await watched.wait()
    finally:
        for _, writer in clients:
            writer.close()
        await gateway.close()
    assert max(again_per_turn) <= BULK_LEGS_PER_TURN


# -- heartbeats and idle timeout ---------------------------------------------------------

HEARTBEAT = {"interval": "100ms", "timeout": "100ms"}


async def test_client_that_never_answers_pings_is_dropped(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], heartbeat=HEARTBEAT))
    loop = asyncio.get_running_loop()
    reader, writer = await open_raw_client(url)
    started = loop.time()
    try:
        ping = await read_frame(reader)
        assert ping.opcode == PING and not ping.masked
        assert await asyncio.wait_for(reader.read(), STEP_TIMEOUT) == b""
        elapsed = loop.time() - started
        assert elapsed >= 0.2, "dropped before interval + timeout"
        # interval + timeout + a sweep tick (25 ms), with room for a busy machine.
        assert elapsed < 1.5, "dropped long after interval + timeout"
        assert await asyncio.wait_for(ws_backend.closes.get(), STEP_TIMEOUT) == (1001, "")
    finally:
        writer.close()
    print(f"silent client dropped after {elapsed * 1000:.0f} ms (interval 100 ms + timeout 100 ms)")


async def test_backend_that_never_answers_pings_gives_client_1014(start_gateway, raw_backend):
    pinged = asyncio.Event()

    async def deaf(reader, writer):
        await accept_upgrade(reader, writer)
        frame = await read_frame(reader)
        if frame.opcode == PING and frame.masked:
            pinged.set()
        await reader.read()

    url = await start_gateway(gateway_config([(await raw_backend(deaf)).url], heartbeat=HEARTBEAT))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, ping_interval=None) as ws:
            await ws.wait_closed()
    assert pinged.is_set()
    assert ws.close_code == 1014


# A message that a slow reader takes several heartbeat periods to take in: 8 MiB read
# 32 KiB at a time, 10 ms apart, is 2.5 s at least, four times interval + timeout.
LARGE_MESSAGE = bytes(range(256)) * (32 * 1024)
SLOW_READ_SIZE = 32 * 1024
SLOW_READ_PAUSE = 0.01
SHORT_HEARTBEAT = {"interval": "300ms", "timeout": "300ms"}
# Bounds the client's TCP window, so that the backlog waits in the gateway, not at the client.
SMALL_RECEIVE_BUFFER = 64 * 1024


@pytest.fixture
async def large_message_backend() -> AsyncIterator[Backend]:
    """A `websockets` server that sends LARGE_MESSAGE on each connection, then reads until closed."""
    backend = Backend(url="")

    async def send_large_message(connection) -> None:
        try:
            with contextlib.suppress(websockets.ConnectionClosed):
                await connection.send(LARGE_MESSAGE)
                async for message in connection:
                    backend.messages.append(message)
        finally:
            backend.closes.put_nowait((connection.close_code, connection.close_reason))

    async with websockets.serve(send_large_message, "127.0.0.1", 0, max_size=None) as server:
        backend.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        yield backend


async def read_large_frame_head(reader: asyncio.StreamReader) -> tuple[int, int]:
    """The first byte and the payload length of an unmasked frame with a 64-bit length."""
    head = await asyncio.wait_for(reader.readexactly(10), STEP_TIMEOUT)
    first, second, length = struct.unpack("!BBQ", head)
    assert second == 127, f"not an unmasked frame with a 64-bit length: {second:#x}"
    return first, length


async def read_slowly(reader: asyncio.StreamReader, size: int) -> bytes:
    """`size` bytes, SLOW_READ_SIZE at a time with a pause after each; fewer if the connection ends."""
    received = bytearray()
    for offset in range(0, size, SLOW_READ_SIZE):
        try:
            received += await asyncio.wait_for(
                reader.readexactly(min(SLOW_READ_SIZE, size - offset)), STEP_TIMEOUT
            )
        except asyncio.IncompleteReadError as exc:
            return bytes(received + exc.partial)
        except ConnectionResetError:
            break
        await asyncio.sleep(SLOW_READ_PAUSE)
    return bytes(received)


# Most of the backlog waits in the kernel's send queue, which the gateway reads on Linux only.
@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's send queue is not read here")
async def test_client_slowly_reading_a_large_message_is_not_dropped(start_gateway, large_message_backend):
    url = await start_gateway(gateway_config([large_message_backend.url], heartbeat=SHORT_HEARTBEAT))
    reader, writer = await open_raw_client(url, receive_buffer_size=SMALL_RECEIVE_BUFFER)
    try:
        async with asyncio.timeout(STEP_TIMEOUT * 3):
            assert await read_large_frame_head(reader) == (0x80 | BINARY, len(LARGE_MESSAGE))
            # The client sends nothing while it reads: only its reading shows it is alive.
            received = await read_slowly(reader, len(LARGE_MESSAGE))
            assert len(received) == len(LARGE_MESSAGE), f"dropped after {len(received)} bytes"
            assert received == LARGE_MESSAGE
            # The gateway pinged the quiet client meanwhile; the ping came behind the message.
            ping = await read_frame(reader)
            assert ping.opcode == PING
            writer.write(client_frame(PONG, ping.payload) + client_frame(CLOSE, close_payload(1000)))
            frames, close = await read_until_close(reader)
            assert close.close == (1000, "")
            assert {f.opcode for f in frames} <= {PING}
            assert await asyncio.wait_for(large_message_backend.closes.get(), STEP_TIMEOUT) == (1000, "")
    finally:
        writer.close()


async def test_client_that_stops_reading_and_answering_mid_message_is_dropped(
    start_gateway, large_message_backend
):
    url = await start_gateway(
        gateway_config([large_message_backend.url], heartbeat=SHORT_HEARTBEAT, timeouts={"close": "300ms"})
    )
    reader, writer = await open_raw_client(url, receive_buffer_size=SMALL_RECEIVE_BUFFER)
    try:
        assert await read_large_frame_head(reader) == (0x80 | BINARY, len(LARGE_MESSAGE))
        # A live client's first MiB; then it neither reads nor sends anything.
        first_part = await read_slowly(reader, 1024 * 1024)
        assert first_part == LARGE_MESSAGE[: 1024 * 1024]
        assert await asyncio.wait_for(large_message_backend.closes.get(), STEP_TIMEOUT) == (1001, "")
        # Its connection was dropped mid-message: what is left to read ends short of the message.
        rest = b""
        with contextlib.suppress(ConnectionResetError):
            rest = await asyncio.wait_for(reader.read(), STEP_TIMEOUT)
        assert len(first_part) + len(rest) < len(LARGE_MESSAGE)
    finally:
        writer.close()


async def _answer_pings(
    reader, writer, *, masked: bool, got: list, pings: asyncio.Event, echo: bool,
    text: asyncio.Event | None = None,
) -> None:
    """A raw peer that answers every ping, echoes text frames, and records what it reads."""
    build = client_frame if masked else server_frame
    for _ in range(10_000):
        frame = await read_frame(reader)
        got.append(frame)
        if frame.opcode == PING:
            writer.write(build(PONG, frame.payload))
            if sum(f.opcode == PING for f in got) >= 5:
                pings.set()
        elif frame.opcode == TEXT:
            if echo:
                writer.write(build(TEXT, frame.payload))
            if text is not None:
                text.set()
        elif frame.opcode == CLOSE:
            return


async def test_peers_that_answer_stay_up_and_never_see_gateway_pongs(start_gateway, raw_backend):
    backend_got: list = []
    backend_pinged = asyncio.Event()

    async def lively(reader, writer):
        await accept_upgrade(reader, writer)
        await _answer_pings(reader, writer, masked=False, got=backend_got, pings=backend_pinged, echo=True)

    url = await start_gateway(gateway_config([(await raw_backend(lively)).url], heartbeat=HEARTBEAT))
    reader, writer = await open_raw_client(url)
    client_got: list = []
    client_pinged = asyncio.Event()
    echoed = asyncio.Event()
    answering = asyncio.create_task(
        _answer_pings(reader, writer, masked=True, got=client_got, pings=client_pinged, echo=False, text=echoed)
    )
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            # Five pings each way: five heartbeat intervals at least.
            await client_pinged.wait()
            await backend_pinged.wait()
            writer.write(client_frame(TEXT, b"still here"))
            await echoed.wait()
    finally:
        answering.cancel()
        writer.close()
    assert not any(f.opcode == PONG for f in client_got + backend_got), "a gateway pong leaked"
    assert all(f.masked for f in backend_got) and not any(f.masked for f in client_got)


async def test_idle_connection_is_closed_with_1001(start_gateway, ws_backend):
    url = await start_gateway(
        gateway_config([ws_backend.url], timeouts={"idle": "200ms"}, heartbeat={"interval": "50ms"})
    )
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            await ws.wait_closed()
    # Heartbeats ran all along; they are not activity.
    assert (ws.close_code, ws.close_reason) == (1001, "idle timeout")
    assert await asyncio.wait_for(ws_backend.closes.get(), STEP_TIMEOUT) == (1001, "idle timeout")


async def test_busy_connection_is_not_idle(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], timeouts={"idle": "200ms"}))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            for i in range(10):  # 10 x 50 ms: two and a half idle periods of traffic
                await ws.send(str(i))
                assert await ws.recv() == str(i)
                await asyncio.sleep(0.05)
    assert ws.close_code == 1000


# -- per-connection frame rate ---------------------------------------------------------------

# One frame a second, ten at once: a client sending FLOOD frames at any pace a test machine
# manages goes over it, and one sending fewer than FRAME_BURST never does.
FRAME_LIMIT = {"max_frames_per_second": {"rate": 1, "burst": 10}}
FRAME_BURST = 10
FLOOD = 500


async def flood(ws: websockets.ClientConnection, count: int) -> int:
    """Send up to `count` one-byte messages, then read to the close; how many were sent."""
    sent = 0
    with contextlib.suppress(websockets.ConnectionClosed):
        for _ in range(count):
            await ws.send("x")
            sent += 1
    with contextlib.suppress(websockets.ConnectionClosed):
        async for _ in ws:  # the backend's echoes, until the gateway's Close
            pass
    return sent


async def test_a_client_flooding_frames_gets_1008_and_a_calm_one_is_untouched(
    start_admin, aiohttp_backend, access_records
):
    admin = await start_admin(gateway_config([aiohttp_backend.url], limits=FRAME_LIMIT))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(admin.ws_url) as calm:
            async with websockets.connect(admin.ws_url, max_queue=None) as flooder:
                await flood(flooder, FLOOD)
                for i in range(FRAME_BURST - 1):
                    await calm.send(f"calm {i}")
                    assert await calm.recv() == f"calm {i}"
            entry = await access_records.next()
            assert (flooder.close_code, flooder.close_reason) == (1008, "frame rate limit exceeded")
            assert (entry["close_code"], entry["reason"]) == (1008, "client frame rate limit exceeded")
            # (The backend's own view of its Close is checked in the mid-frame test.)
            assert entry["close_to_backend"] == {"code": 1001, "by": "gateway"}
            assert entry["messages_in"] < FLOOD
        assert calm.close_code == 1000
        await access_records.next()
        metrics = await admin.scrape()
    assert metrics.value("wsgate_limit_closes_total", reason="frame_rate") == 1
    assert metrics.value("wsgate_close_frames_total", code="1008", side="gateway") == 1
    assert metrics.value("wsgate_close_frames_total", code="1000", side="client") == 1


async def test_frames_are_not_limited_by_default(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, max_queue=None) as ws:
            for _ in range(FLOOD):
                await ws.send("x")
            for _ in range(FLOOD):
                assert await ws.recv() == "x"
    assert ws.close_code == 1000


async def test_over_the_frame_rate_mid_frame_the_backend_gets_the_whole_frame_then_1001(
    start_gateway, ws_backend
):
    url = await start_gateway(gateway_config([ws_backend.url], limits=FRAME_LIMIT))
    reader, writer = await open_raw_client(url)
    large = client_frame(BINARY, b"L" * 4000)
    try:
        # Over the burst in one write, which ends inside a large frame on its way to the backend.
        writer.write(b"".join(client_frame(TEXT, b"%d" % i) for i in range(FRAME_BURST + 1)) + large[:1000])
        _, close = await read_until_close(reader)
        assert close.close == (1008, "frame rate limit exceeded")
        # The rest of that frame still reaches the backend; what follows it does not.
        writer.write(large[1000:] + client_frame(TEXT, b"after"))
        assert await asyncio.wait_for(ws_backend.closes.get(), STEP_TIMEOUT) == (1001, "")
        assert ws_backend.messages[-1] == b"L" * 4000
        assert "after" not in ws_backend.messages
        writer.write(client_frame(CLOSE, close_payload(1008)))
        assert await asyncio.wait_for(reader.read(), STEP_TIMEOUT) == b""
    finally:
        writer.close()


def test_random_bytes_come_in_the_asked_sizes_across_block_boundaries():
    from wsgate.leg import random_bytes

    # 3,000 mask keys and ping payloads span several 4 KiB blocks of os.urandom.
    keys, payloads = zip(*((random_bytes(4), random_bytes(8)) for _ in range(1500)))
    assert {len(key) for key in keys} == {4} and {len(p) for p in payloads} == {8}
    # No slice is handed out twice: 64-bit payloads never repeat, nor do consecutive keys.
    assert len(set(payloads)) == len(payloads)
    assert all(a != b for a, b in zip(keys, keys[1:]))
    assert len(random_bytes(5000)) == 5000  # more than a block at once
