"""Raw-socket helpers for tests that must send or read exact bytes."""

from __future__ import annotations

import asyncio
import base64
import inspect
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from codec import close_payload, encode_frame, xor  # noqa: F401 - close_payload is re-exported

from wsgate.handshake import accept_key

# Every wait on the network in a test is bounded by this.
STEP_TIMEOUT = 10.0
# How often `until` looks again.
POLL_INTERVAL = 0.02


async def until(
    condition: Callable[[], bool | Awaitable[bool]], what: str | None = None, timeout: float = STEP_TIMEOUT
) -> None:
    """Return once `condition()` (a plain or an async function) holds, else fail after `timeout`.

    For a state no event announces (a count, a probe result, a periodic flush);
    where an event can be awaited, await it instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or condition.__name__}")
        await asyncio.sleep(POLL_INTERVAL)


def upgrade_request(
    path: str = "/", host: str = "gateway.test", extra: str = "", key: str | None = None
) -> bytes:
    """A valid client upgrade request as raw bytes."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1_header(source: tuple[str, int] | None, destination: tuple[str, int] | None = None) -> bytes:
    """A PROXY protocol v1 line (test-only builder); no source gives an UNKNOWN line."""
    if source is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP6" if ":" in source[0] else "TCP4"
    if destination is None:
        destination = ("2001:db8::1", 443) if family == "TCP6" else ("192.0.2.1", 443)
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def proxy_v2_header(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None = None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
    local: bool = False,
) -> bytes:
    """A PROXY protocol v2 header (test-only builder): PROXY over TCP from `source`,
    or with no source the unspecified family; `local` makes it a LOCAL header."""
    if source is None:
        family, addresses = 0x00, b""
    else:
        ip = ipaddress.ip_address(source[0])
        if destination is None:
            destination = ("192.0.2.1", 443) if ip.version == 4 else ("2001:db8::1", 443)
        family = 0x11 if ip.version == 4 else 0x21
        target = ipaddress.ip_address(destination[0])
        addresses = ip.packed + target.packed + struct.pack("!HH", source[1], destination[1])
    body = addresses + b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in tlvs)
    command = 0x20 if local else 0x21
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A masked frame as a client sends it."""
    return encode_frame(opcode, payload, fin=fin, key=mask)


async def read_response_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lowercase names) and the body (to EOF or Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if status != 101 and "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), STEP_TIMEOUT)
    return status, headers, body


async def raw_exchange(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to the gateway and read its HTTP answer."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        return await read_response_head(reader)
    finally:
        writer.close()


def server_frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    """An unmasked frame as a server sends it; rsv is the 3 RSV bits."""
    return encode_frame(opcode, payload, fin=fin, rsv=rsv)


@dataclass
class Frame:
    opcode: int
    fin: bool
    masked: bool
    payload: bytes

    @property
    def close(self) -> tuple[int | None, str]:
        """(code, reason) of a Close frame; code None when it carries no status."""
        assert self.opcode == 0x8, f"not a close frame: {self}"
        if not self.payload:
            return None, ""
        return struct.unpack("!H", self.payload[:2])[0], self.payload[2:].decode()


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """One frame, unmasked; IncompleteReadError at EOF."""
    first, second = await asyncio.wait_for(reader.readexactly(2), STEP_TIMEOUT)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    masked = bool(second & 0x80)
    mask = await reader.readexactly(4) if masked else b""
    payload = await asyncio.wait_for(reader.readexactly(length), STEP_TIMEOUT)
    if masked:
        payload = xor(payload, mask)
    return Frame(first & 0x0F, bool(first & 0x80), masked, payload)


async def read_until_close(reader: asyncio.StreamReader) -> tuple[list[Frame], Frame]:
    """Frames up to and including the first Close."""
    frames: list[Frame] = []
    for _ in range(10_000):
        frame = await read_frame(reader)
        if frame.opcode == 0x8:
            return frames, frame
        frames.append(frame)
    raise AssertionError("no close frame in 10,000 frames")


async def open_raw_client(
    url: str, extra: str = "", receive_buffer_size: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP client that has completed the upgrade through the gateway.

    A `receive_buffer_size` is set before connecting, so that it bounds the TCP window.
    """
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    if receive_buffer_size:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_size)
        sock.setblocking(False)
        try:
            connecting = asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            await asyncio.wait_for(connecting, STEP_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(upgrade_request(extra=extra))
    status, _, _ = await read_response_head(reader)
    assert status == 101
    return reader, writer


async def accept_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, extra: bytes = b"") -> bytes:
    """Answer the gateway's upgrade request with a valid 101; returns the request head."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n" + extra + b"\r\n"
    )
    await writer.drain()
    return head
