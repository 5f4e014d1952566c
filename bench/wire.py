"""WebSocket wire helpers shared by the load generator, the echo backend and the checks.

Everything here is built once per process and then only sliced: the hot paths
never build a frame per message.
"""

from __future__ import annotations

import base64
import hashlib
import os
import resource
import socket
from collections.abc import Callable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# A legal mask key that leaves the payload unchanged: the backend can echo the
# payload bytes as they are, and the echo is byte-identical to what was sent.
ZERO_MASK = b"\x00\x00\x00\x00"

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA

SMALL_SIZE = 32
# The fixed payload of the small-message scenarios; backend and generator share it.
SMALL_PAYLOAD = b"wsgate-bench 32-byte payload ..."
assert len(SMALL_PAYLOAD) == SMALL_SIZE


def _load_mask() -> Callable[[bytes, bytearray], None]:
    """aiohttp's C masking function when importable (aiohttp is a wsgate dependency), else a pure one."""
    try:
        from aiohttp._websocket.helpers import websocket_mask  # private, hence the fallback

        return websocket_mask
    except ImportError:

        def mask(key: bytes, data: bytearray) -> None:
            n = len(data)
            keys = (key * (n // 4 + 1))[:n]
            data[:] = (int.from_bytes(data, "little") ^ int.from_bytes(keys, "little")).to_bytes(n, "little")

        return mask


apply_mask = _load_mask()


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def frame_header(b0: int, length: int, mask_key: bytes | None) -> bytes:
    """Frame header with first byte `b0`; masked (with `mask_key` appended) when a key is given."""
    bit = 0x80 if mask_key is not None else 0
    if length < 126:
        head = bytes((b0, bit | length))
    elif length < 65536:
        head = bytes((b0, bit | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((b0, bit | 127)) + length.to_bytes(8, "big")
    return head + mask_key if mask_key is not None else head


def client_frame(payload: bytes, opcode: int = OP_BINARY, mask_key: bytes = ZERO_MASK) -> bytes:
    """A final, masked frame as a client sends it."""
    body = payload
    if mask_key != ZERO_MASK:
        masked = bytearray(payload)
        apply_mask(mask_key, masked)
        body = bytes(masked)
    return frame_header(0x80 | opcode, len(payload), mask_key) + body


def server_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """A final, unmasked frame as a server sends it."""
    return frame_header(0x80 | opcode, len(payload), None) + payload


def push_payload(size: int) -> bytes:
    """The deterministic payload of pushed messages, so a check can verify them."""
    block = bytes(range(256))
    return (block * (size // 256 + 1))[:size]


def upgrade_request(host: str, port: int, path: str, key: bytes) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
    ).encode() + key + b"\r\n\r\n"


def header_value(head: bytes, name: bytes) -> bytes | None:
    """A header's value from a raw HTTP head, by case-insensitive name (HAProxy lowercases names)."""
    lowered = head.lower()
    start = lowered.find(b"\r\n" + name.lower() + b":")
    if start < 0:
        return None
    start += len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE as far as allowed (the hard limit too when root); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20
    try:
        with open("/proc/sys/fs/nr_open") as f:
            want = min(want, int(f.read()))
    except OSError:
        pass
    for limit in ((want, want), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            return limit[0]
        except (ValueError, OSError):
            continue
    return soft


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is not None and sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
