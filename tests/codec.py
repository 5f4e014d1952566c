"""The tests' own WebSocket frame codec, written apart from wsgate.frames so each checks the other.

Plain bytes in and out: no sockets, no event loop, nothing beyond the standard library.
"""

from __future__ import annotations

import struct

# One translation table per mask byte: each of the four byte lanes is XORed through one.
_XOR_TABLES = [bytes(i ^ k for i in range(256)) for k in range(256)]


def xor(payload: bytes, key: bytes) -> bytes:
    """`payload` masked (or unmasked) with the 4-byte `key`."""
    out = bytearray(payload)
    for lane in range(4):
        out[lane::4] = payload[lane::4].translate(_XOR_TABLES[key[lane]])
    return bytes(out)


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    key: bytes | None = None,
    width: int | None = None,
    declared: int | None = None,
) -> bytes:
    """A frame, masked with `key` when given; `rsv` is the three RSV bits.

    `width` (7, 16, 64) asks for a longer length encoding than the shortest (it
    widens, never truncates); `declared` is a length to claim instead of the payload's.
    """
    length = len(payload) if declared is None else declared
    shortest = 7 if length < 126 else 16 if length < 65536 else 64
    width = shortest if width is None else max(width, shortest)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask = 0x80 if key is not None else 0
    if width == 7:
        head = bytes([first, mask | length])
    elif width == 16:
        head = bytes([first, mask | 126]) + struct.pack("!H", length)
    else:
        head = bytes([first, mask | 127]) + struct.pack("!Q", length)
    if key is None:
        return head + payload
    return head + key + xor(payload, key)


def decode_frames(stream: bytes) -> list[tuple[bool, int, int, bytes | None, bytes]]:
    """(fin, rsv, opcode, mask key, unmasked payload) of each frame of a whole `stream`."""
    out = []
    pos = 0
    while pos < len(stream):
        first, second = stream[pos], stream[pos + 1]
        pos += 2
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", stream[pos : pos + 2])
            pos += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", stream[pos : pos + 8])
            pos += 8
        key = None
        if second & 0x80:
            key = stream[pos : pos + 4]
            pos += 4
        payload = stream[pos : pos + length]
        assert len(payload) == length, "truncated frame"
        pos += length
        if key:
            payload = xor(payload, key)
        out.append((bool(first & 0x80), (first >> 4) & 7, first & 0xF, key, payload))
    return out


def close_payload(code: int | None, reason: str | bytes = b"") -> bytes:
    """A Close frame's payload: empty without a code, else the code and the reason (text as UTF-8)."""
    if code is None:
        return b""
    return struct.pack("!H", code) + (reason.encode() if isinstance(reason, str) else reason)
