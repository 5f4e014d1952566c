"""Sans-I/O WebSocket frame scanner, frame builders, opcodes and close codes.

The scanner never copies, unmasks or re-masks data payloads: it walks frame
headers with integer arithmetic and tells the relay what to forward, where the
control frames are, and where it may inject frames of its own (RFC 6455).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Final

from wsgate.errors import ProtocolError

# The scanner's per-frame fast path compiled (wsgate/_speedups.c), where it was
# built; the pure-Python loop does the same. WSGATE_PURE_PYTHON=1 turns it off.
walk_frames: Callable[[bytes, int, int, bytes, bytes], tuple[int, int]] | None = None
if not os.environ.get("WSGATE_PURE_PYTHON"):
    try:
        from wsgate._speedups import walk_frames
    except ImportError:
        pass

__all__ = [
    "BOUNDARY",
    "CloseCode",
    "ControlFrame",
    "FrameScanner",
    "Opcode",
    "apply_mask",
    "build_close",
    "build_frame",
    "compressed_message_limit",
    "is_valid_close_code",
    "parse_close_payload",
]


class Opcode(IntEnum):
    """Frame opcodes (RFC 6455 section 5.2)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """Close status codes, named as in RFC 6455 section 7.4 and the IANA registry."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005
    ABNORMAL_CLOSURE = 1006
    INVALID_FRAME_PAYLOAD_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


def is_valid_close_code(code: int) -> bool:
    """Whether `code` may appear in a Close frame on the wire."""
    # 1004-1006 and 1015 are reserved for local use; 1016-2999 are unassigned.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


_MAX_CONTROL_PAYLOAD: Final = 125
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


def apply_mask(data: bytes, mask_key: bytes) -> bytes:
    """XOR `data` with the repeated 4-byte `mask_key` (masking and unmasking alike)."""
    if len(mask_key) != 4:
        raise ValueError("mask_key must be 4 bytes")
    size = len(data)
    if not size:
        return b""
    key = (bytes(mask_key) * (size // 4 + 1))[:size]
    # One big-integer XOR instead of a per-byte Python loop.
    masked = int.from_bytes(data, "big") ^ int.from_bytes(key, "big")
    return masked.to_bytes(size, "big")


def build_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask_key: bytes | None = None
) -> bytes:
    """One frame with the shortest length encoding; masked when `mask_key` is given."""
    if not 0 <= opcode <= 0xF:
        raise ValueError(f"opcode out of range: {opcode}")
    size = len(payload)
    if opcode >= 8 and (size > _MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("control frames must be final and carry at most 125 bytes")
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask_key is not None else 0
    if size < 126:
        header = bytes((first, mask_bit | size))
    elif size < 0x10000:
        header = bytes((first, mask_bit | 126)) + _U16.pack(size)
    else:
        header = bytes((first, mask_bit | 127)) + _U64.pack(size)
    if mask_key is None:
        return header + bytes(payload)
    return header + bytes(mask_key) + apply_mask(payload, mask_key)


def build_close(
    code: int | None, reason: str = "", *, mask_key: bytes | None = None
) -> bytes:
    """A Close frame; `code` None sends an empty payload. Long reasons are cut to fit."""
    if code is None:
        if reason:
            raise ValueError("a close reason needs a close code")
        payload = b""
    else:
        if not is_valid_close_code(code):
            raise ValueError(f"close code {code} may not be sent")
        encoded = reason.encode("utf-8")[: _MAX_CONTROL_PAYLOAD - 2]
        # Dropping an incomplete trailing character keeps the reason valid UTF-8.
        encoded = encoded.decode("utf-8", "ignore").encode("utf-8")
        payload = _U16.pack(code) + encoded
    return build_frame(Opcode.CLOSE, payload, mask_key=mask_key)


def parse_close_payload(payload: bytes) -> tuple[int | None, str]:
    """The (code, reason) of an unmasked Close payload; (None, "") when empty."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = payload[0] << 8 | payload[1]
    if not is_valid_close_code(code):
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            CloseCode.INVALID_FRAME_PAYLOAD_DATA, "close reason is not valid UTF-8"
        ) from exc
    return code, reason


def compressed_message_limit(max_message_size: int) -> int:
    """The most bytes a compressed message may carry on the wire under `max_message_size` (> 0).

    The gateway does not inflate, so it judges a compressed message by its
    compressed size, and deflate makes incompressible data slightly longer:
    zlib ends a block whenever its symbol buffer fills (every 2,047 bytes at
    memory level 5, websockets' setting; every 16,383 at 8, browsers'), and a
    stored block costs 5 bytes. The 64 bytes cover the message's last block
    and Huffman-coded blocks, which small windows force (see docs/relay.md).
    """
    return max_message_size + 5 * -(-max_message_size // 2047) + 64


class ControlFrame:
    """A complete ping, pong or close frame; `raw` is its exact bytes from the wire."""

    __slots__ = ("opcode", "payload", "raw", "close_code", "close_reason")

    def __init__(
        self,
        opcode: int,
        payload: bytes,
        raw: bytes,
        close_code: int | None = None,
        close_reason: str = "",
    ) -> None:
        self.opcode = opcode
        self.payload = payload  # unmasked
        self.raw = raw  # still masked if it came masked
        self.close_code = close_code
        self.close_reason = close_reason

    def __repr__(self) -> str:
        name = Opcode(self.opcode).name
        if self.opcode == Opcode.CLOSE:
            return f"<ControlFrame {name} {self.close_code} {self.close_reason!r}>"
        return f"<ControlFrame {name} {self.payload!r}>"


class _Boundary:
    __slots__ = ()

    def __repr__(self) -> str:
        return "BOUNDARY"


BOUNDARY: Final = _Boundary()
"""Marks, in receive_data's output, the frame boundary asked for by want_boundary."""


def _fast_table(*first_bytes: int) -> bytes:
    table = bytearray(256)
    for value in first_bytes:
        table[value] = 1
    return bytes(table)


# First header bytes the per-frame fast path may accept without further checks:
# a final TEXT or BINARY frame, outside a fragmented message.
_FAST_PLAIN = _fast_table(0x81, 0x82)
_FAST_DEFLATE = _fast_table(0x81, 0x82, 0xC1, 0xC2)  # RSV1 = compressed message
_FAST_NONE = bytes(256)


def _step_table(mask_bit: int) -> bytes:
    header_size = 6 if mask_bit else 2
    table = bytearray(256)
    for length in range(126):
        table[mask_bit | length] = header_size + length
    return bytes(table)


# Second header byte to the size of the whole frame, for 7-bit lengths with the
# mask bit as the direction requires; 0 for everything else.
_STEPS_MASKED = _step_table(0x80)
_STEPS_UNMASKED = _step_table(0)

_NO_LIMIT: Final = 1 << 127  # larger than any sum of 63-bit lengths we can meet
_RSV1: Final = 0x40  # set by permessage-deflate on a message's first frame


def _header_length(second_byte: int) -> int:
    length_field = second_byte & 0x7F
    size = 2 + (4 if second_byte & 0x80 else 0)
    if length_field == 126:
        return size + 2
    if length_field == 127:
        return size + 8
    return size


def _payload_length(header: bytes | bytearray, start: int, second_byte: int) -> int:
    """The payload length of the complete header at `start`."""
    length = second_byte & 0x7F
    if length == 126:
        return _U16.unpack_from(header, start + 2)[0]
    if length == 127:
        length = _U64.unpack_from(header, start + 2)[0]
        if length >> 63:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "64-bit length with the top bit set")
    return length


class FrameScanner:
    """Finds frame boundaries in one direction of a WebSocket stream.

    Feed every chunk to receive_data() and forward what it returns, in order:
    the chunk itself (the common case, checked with ``is``), or a list of
    bytes-like items, ControlFrame items (forward ``raw`` or swallow it) and
    BOUNDARY (where frames of the relay's own may go). Payloads pass through
    untouched. A partial header or a partial control frame is held back (at
    most 14 + 125 bytes) until complete, so the relay never forwards a header
    that turns out bad and can always drop a whole control frame.

    On a violation, ProtocolError is raised after ``valid_prefix`` is set to
    the items that preceded the bad frame in that call; the scanner is then
    dead and raises on every later call.
    """

    __slots__ = (
        "_masked",
        "_mask_bit",
        "_fixed_header",
        "_steps",
        "_second_16",
        "_limit",
        "_compressed_limit",
        "_message_limit",
        "_allow_rsv1",
        "_fast",
        "_fast_outside_message",
        "_remaining",
        "_last_fin",
        "_fragmented",
        "_message_size",
        "_held",
        "_error",
        "want_boundary",
        "frames",
        "messages",
        "framing_bytes",
        "valid_prefix",
    )

    def __init__(
        self, *, masked: bool, max_message_size: int, allow_rsv1: bool = False
    ) -> None:
        self._masked = masked
        self._mask_bit = 0x80 if masked else 0
        self._fixed_header = 6 if masked else 2  # header with a 7-bit length
        self._steps = _STEPS_MASKED if masked else _STEPS_UNMASKED
        self._second_16 = self._mask_bit | 126  # second byte announcing a 16-bit length
        self._limit = max_message_size if max_message_size > 0 else _NO_LIMIT
        # RSV1 marks a message compressed by permessage-deflate: judged by its wire size,
        # with deflate's growth of incompressible data allowed for.
        self._compressed_limit = self._limit
        if allow_rsv1 and max_message_size > 0:
            self._compressed_limit = compressed_message_limit(max_message_size)
        self._message_limit = self._limit  # the limit of the fragmented message in progress
        self._allow_rsv1 = allow_rsv1
        fast = _FAST_DEFLATE if allow_rsv1 else _FAST_PLAIN
        if self._limit < _MAX_CONTROL_PAYLOAD:
            fast = _FAST_NONE  # a 7-bit frame could exceed the limit: check every one
        self._fast_outside_message = fast
        self._fast = fast
        self._remaining = 0  # payload bytes of the current data frame still to come
        self._last_fin = 0  # FIN bit of that frame (1 or 0), counted when it ends
        self._fragmented = False  # a non-final data frame header was seen
        self._message_size = 0  # payload bytes of the fragmented message so far
        self._held = bytearray()  # partial header or partial control frame
        self._error: ProtocolError | None = None
        self.want_boundary = False
        self.frames = 0
        self.messages = 0
        # Bytes of frame headers and of whole control frames: what is not data payload.
        self.framing_bytes = 0
        self.valid_prefix: list = []

    @property
    def at_boundary(self) -> bool:
        """True when the bytes forwarded so far end exactly between two frames."""
        return self._remaining == 0

    @property
    def held_size(self) -> int:
        """Bytes received but not yet forwarded: a partial header or control frame."""
        return len(self._held)

    def receive_data(self, data: bytes) -> bytes | list:
        """What to forward now: `data` itself, or a list of bytes, ControlFrames and BOUNDARY.

        `data` must not be resized while memoryview slices of it are alive.
        """
        n = len(data)
        remaining = self._remaining
        if remaining:
            if n < remaining:
                self._remaining = remaining - n
                return data
            # The outstanding payload ends in this chunk.
            self._remaining = 0
            self.frames += 1
            self.messages += self._last_fin
            if n == remaining:
                if self.want_boundary:
                    self.want_boundary = False
                    return [data, BOUNDARY]
                return data
            out = None
            start = 0
            pos = remaining
        elif self._held:
            out, pos = self._resume_held(data)
            if pos == n:
                return out
            start = pos
        else:
            out = None
            start = pos = 0

        if self.want_boundary:
            # pos is a frame boundary, and the first one this call reaches.
            self.want_boundary = False
            out = [] if out is None else out
            if pos > start:
                out.append(memoryview(data)[start:pos])
            out.append(BOUNDARY)
            start = pos

        steps = self._steps
        fast = self._fast
        last_fast_header = n - self._fixed_header  # a 7-bit header starting here fits
        fast_frames = 0  # final, unfragmented data frames: count as frame and message
        medium_frames = 0  # those of them with a 16-bit length, two header bytes more
        cut = 0  # 1 when the last of them runs past the chunk
        try:
            while True:
                # The per-frame fast path: a final TEXT/BINARY frame with the mask bit
                # as required and a 7-bit length. `steps` maps the second header byte
                # to the whole frame size (0 when the frame needs a closer look).
                if walk_frames is not None:
                    pos, walked = walk_frames(data, pos, last_fast_header, steps, fast)
                    fast_frames += walked
                else:
                    while pos <= last_fast_header:
                        step = steps[data[pos + 1]]
                        if step and fast[data[pos]]:
                            pos += step
                            fast_frames += 1
                            continue
                        break
                if pos >= n:
                    if pos > n:
                        # The last frame runs past the chunk: it is not complete yet.
                        cut = 1
                        self._remaining = pos - n
                        self._last_fin = 1
                        pos = n
                    break

                # Every other header: extended lengths, control frames, fragments,
                # violations, or a header cut off by the end of the chunk.
                if pos + 2 > n:
                    break
                first = data[pos]
                second = data[pos + 1]
                if second == self._second_16 and fast[first] and pos + self._fixed_header + 2 <= n:
                    # Medium frame with a 16-bit length: only the size limit to check.
                    length = _U16.unpack_from(data, pos + 2)[0]
                    if length <= self._limit:
                        pos += self._fixed_header + 2 + length
                        fast_frames += 1
                        medium_frames += 1
                        continue  # pos > n is handled as for 7-bit frames
                header_end = pos + _header_length(second)
                if header_end > n:
                    break
                length = _payload_length(data, pos, second)
                opcode = self._check_header(first, second, length)
                fast = self._fast
                end = header_end + length
                if opcode >= 8:
                    if end > n:
                        break  # hold the partial control frame
                    frame = self._control_frame(
                        opcode, bytes(data[pos:end]), header_end - pos
                    )
                    if out is None:
                        out = []
                    if pos > start:
                        out.append(memoryview(data)[start:pos])
                    out.append(frame)
                    self.frames += 1
                    self.framing_bytes += end - pos
                    pos = start = end
                    continue
                self.framing_bytes += header_end - pos
                fin = first >> 7
                if end <= n:
                    self.frames += 1
                    self.messages += fin
                    pos = end
                    continue
                self._remaining = end - n
                self._last_fin = fin
                pos = n
                break
        except ProtocolError as exc:
            self.frames += fast_frames
            self.messages += fast_frames
            self.framing_bytes += fast_frames * self._fixed_header + 2 * medium_frames
            prefix = [] if out is None else out
            if pos > start:
                prefix.append(memoryview(data)[start:pos])
            self._die(exc, prefix)
            raise

        if fast_frames:
            self.framing_bytes += fast_frames * self._fixed_header + 2 * medium_frames
            fast_frames -= cut
            self.frames += fast_frames
            self.messages += fast_frames
        if pos < n:
            self._held += data[pos:]
        if out is None:
            if start == 0 and pos == n:
                return data
            out = []
        if pos > start:
            out.append(memoryview(data)[start:pos])
        return out

    def _check_header(self, first: int, second: int, length: int) -> int:
        """Validate a complete header, update the message state; return the opcode."""
        if (second & 0x80) != self._mask_bit:
            raise ProtocolError(
                CloseCode.PROTOCOL_ERROR,
                "unmasked frame from client" if self._masked else "masked frame from backend",
            )
        if first & 0x30:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bit RSV2 or RSV3 set")
        opcode = first & 0x0F
        rsv1 = first & _RSV1
        if opcode >= 8:
            if opcode > Opcode.PONG:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")
            if rsv1:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "RSV1 set on a control frame")
            if not first & 0x80:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            if length > _MAX_CONTROL_PAYLOAD:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "control frame longer than 125 bytes")
            return opcode
        if opcode == Opcode.CONTINUATION:
            if not self._fragmented:
                raise ProtocolError(
                    CloseCode.PROTOCOL_ERROR, "continuation frame outside a message"
                )
            if rsv1:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "RSV1 set on a continuation frame")
            size = self._message_size + length
            limit = self._message_limit
        elif opcode > Opcode.BINARY:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")
        else:
            if self._fragmented:
                raise ProtocolError(
                    CloseCode.PROTOCOL_ERROR, "new data message inside a fragmented message"
                )
            if rsv1 and not self._allow_rsv1:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "RSV1 set without an extension")
            size = length
            limit = self._compressed_limit if rsv1 else self._limit
        if size > limit:
            what = "message" if limit == self._limit else "compressed message"
            raise ProtocolError(CloseCode.MESSAGE_TOO_BIG, f"{what} exceeds {limit} bytes")
        if first & 0x80:
            if self._fragmented:
                self._fragmented = False
                self._message_size = 0
                self._fast = self._fast_outside_message
        else:
            self._message_size = size
            self._message_limit = limit
            if not self._fragmented:
                self._fragmented = True
                self._fast = _FAST_NONE  # continuations need the size and state checks
        return opcode

    def _control_frame(self, opcode: int, raw: bytes, header_size: int) -> ControlFrame:
        payload = raw[header_size:]
        if self._masked:
            payload = apply_mask(payload, raw[header_size - 4 : header_size])
        if opcode == Opcode.CLOSE:
            code, reason = parse_close_payload(payload)
            return ControlFrame(opcode, payload, raw, code, reason)
        return ControlFrame(opcode, payload, raw)

    def _resume_held(self, data: bytes) -> tuple[list, int]:
        """Complete the held frame prefix from `data`; return the items and where it stopped."""
        if self._error is not None:
            self.valid_prefix = []
            raise ProtocolError(self._error.close_code, self._error.reason)
        out: list = []
        if self.want_boundary:
            # Nothing of the held frame was forwarded: the relay may write here.
            self.want_boundary = False
            out.append(BOUNDARY)
        held = self._held
        held_before = len(held)
        n = len(data)
        pos = 0
        try:
            if held_before < 2:
                pos = min(2 - len(held), n)
                held += data[:pos]
                if len(held) < 2:
                    return out, pos
            first = held[0]
            second = held[1]
            header_size = _header_length(second)
            if held_before < header_size:
                take = min(header_size - len(held), n - pos)
                held += data[pos : pos + take]
                pos += take
                if len(held) < header_size:
                    return out, pos
                length = _payload_length(held, 0, second)
                opcode = self._check_header(first, second, length)
            else:
                # A control frame whose header was checked by an earlier call.
                length = _payload_length(held, 0, second)
                opcode = first & 0x0F

            if opcode < 8:
                # Data frame: forward its header now and its payload as it comes.
                out.append(bytes(held))
                self.framing_bytes += header_size
                held.clear()
                available = n - pos
                if length > available:
                    self._remaining = length - available
                    self._last_fin = first >> 7
                    if available:
                        out.append(memoryview(data)[pos:])
                    return out, n
                if length:
                    out.append(memoryview(data)[pos : pos + length])
                    pos += length
                self.frames += 1
                self.messages += first >> 7
                return out, pos

            total = header_size + length
            take = min(total - len(held), n - pos)
            held += data[pos : pos + take]
            pos += take
            if len(held) < total:
                return out, pos
            frame = self._control_frame(opcode, bytes(held), header_size)
            held.clear()
            out.append(frame)
            self.frames += 1
            self.framing_bytes += total
            return out, pos
        except ProtocolError as exc:
            self._die(exc, out)
            raise

    def _die(self, exc: ProtocolError, prefix: list) -> None:
        self.valid_prefix = prefix
        self._error = exc
        self._remaining = 0
        # A poison byte sends every later call into _resume_held, which raises again.
        self._held[:] = b"\x00"
