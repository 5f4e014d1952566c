"""Table-driven tests of wsgate.frames (no event loop).

Scanner inputs come from `encode_frame()` in tests/codec.py, a builder that exists only in
the tests, so the scanner and the library builders cannot share a bug.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
from codec import close_payload, decode_frames, encode_frame, xor

from wsgate.errors import ProtocolError
from wsgate.frames import (
    BOUNDARY,
    CloseCode,
    ControlFrame,
    FrameScanner,
    Opcode,
    apply_mask,
    build_close,
    build_frame,
    compressed_message_limit,
    is_valid_close_code,
    parse_close_payload,
)

# Every test runs with the compiled fast path of the scanner and with the pure-Python one.
pytestmark = pytest.mark.usefixtures("scanner_implementation")

KEY = bytes([0x37, 0xFA, 0x21, 0x3D])  # the mask key of RFC 6455 section 5.7

# ---------------------------------------------------------------- helpers


def cframe(opcode: int, payload: bytes = b"", masked: bool = False, **kw) -> bytes:
    """A frame as one direction sends it: masked with KEY when `masked` (from a client)."""
    return encode_frame(opcode, payload, key=KEY if masked else None, **kw)


def feed(scanner: FrameScanner, chunks: list[bytes]) -> list:
    """All items returned for `chunks`, with the fast-path `data` wrapped as an item."""
    items: list = []
    for chunk in chunks:
        result = scanner.receive_data(chunk)
        if isinstance(result, list):
            items.extend(result)
        else:
            assert result is chunk
            items.append(result)
    return items


def wire(items: list) -> bytes:
    """The bytes the relay would forward if it forwards every control frame."""
    parts = []
    for item in items:
        if isinstance(item, ControlFrame):
            parts.append(item.raw)
        elif item is not BOUNDARY:
            assert len(item) > 0, "empty bytes item"
            parts.append(bytes(item))
    return b"".join(parts)


def controls(items: list) -> list[ControlFrame]:
    return [item for item in items if isinstance(item, ControlFrame)]


def bytewise(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def scanner(masked: bool = True, limit: int = 0, rsv1: bool = False) -> FrameScanner:
    return FrameScanner(masked=masked, max_message_size=limit, allow_rsv1=rsv1)


# ---------------------------------------------------------------- enums and close codes


def test_enum_values() -> None:
    assert [int(op) for op in Opcode] == [0, 1, 2, 8, 9, 10]
    assert CloseCode.GOING_AWAY == 1001
    assert CloseCode.INVALID_FRAME_PAYLOAD_DATA == 1007
    assert CloseCode.MESSAGE_TOO_BIG == 1009
    assert CloseCode.BAD_GATEWAY == 1014


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        (0, False), (999, False), (1000, True), (1001, True), (1002, True), (1003, True),
        (1004, False), (1005, False), (1006, False), (1007, True), (1008, True),
        (1011, True), (1012, True), (1013, True), (1014, True), (1015, False),
        (1016, False), (2999, False), (3000, True), (3999, True), (4000, True),
        (4999, True), (5000, False), (65535, False),
    ],
)
def test_is_valid_close_code(code: int, valid: bool) -> None:
    assert is_valid_close_code(code) is valid


# ---------------------------------------------------------------- apply_mask


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 1000])
def test_apply_mask_matches_reference_and_round_trips(size: int) -> None:
    data = bytes((i * 7 + 3) % 256 for i in range(size))
    masked = apply_mask(data, KEY)
    assert masked == xor(data, KEY)
    assert apply_mask(masked, KEY) == data


def test_apply_mask_rfc_vector() -> None:
    assert apply_mask(b"Hello", KEY) == bytes([0x7F, 0x9F, 0x4D, 0x51, 0x58])


def test_apply_mask_keeps_leading_zero_bytes() -> None:
    assert apply_mask(KEY * 2, KEY) == bytes(8)


@pytest.mark.parametrize("key", [b"", b"abc", b"abcde"])
def test_apply_mask_rejects_bad_key(key: bytes) -> None:
    with pytest.raises(ValueError):
        apply_mask(b"x", key)


# ---------------------------------------------------------------- build_frame


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # RFC 6455 section 5.7 examples.
        ({"opcode": 1, "payload": b"Hello"}, "81 05 48 65 6c 6c 6f"),
        ({"opcode": 1, "payload": b"Hello", "mask_key": KEY}, "81 85 37 fa 21 3d 7f 9f 4d 51 58"),
        ({"opcode": 1, "payload": b"Hel", "fin": False}, "01 03 48 65 6c"),
        ({"opcode": 0, "payload": b"lo"}, "80 02 6c 6f"),
        ({"opcode": 9, "payload": b"Hello"}, "89 05 48 65 6c 6c 6f"),
        ({"opcode": 10, "payload": b"Hello", "mask_key": KEY}, "8a 85 37 fa 21 3d 7f 9f 4d 51 58"),
        ({"opcode": 9, "payload": b""}, "89 00"),
    ],
)
def test_build_frame_rfc_examples(kwargs: dict, expected: str) -> None:
    assert build_frame(**kwargs) == bytes.fromhex(expected)


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, "82 00"),
        (125, "82 7d"),
        (126, "82 7e 00 7e"),
        (256, "82 7e 01 00"),
        (65535, "82 7e ff ff"),
        (65536, "82 7f 00 00 00 00 00 01 00 00"),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_build_frame_length_encodings(size: int, header: str, masked: bool) -> None:
    payload = bytes(i % 251 for i in range(size))
    built = build_frame(Opcode.BINARY, payload, mask_key=KEY if masked else None)
    head = bytearray.fromhex(header)
    if masked:
        head[1] |= 0x80
        head += KEY
    assert built.startswith(bytes(head))
    assert decode_frames(built) == [(True, 0, 2, KEY if masked else None, payload)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"opcode": 16, "payload": b""},
        {"opcode": -1, "payload": b""},
        {"opcode": 9, "payload": bytes(126)},
        {"opcode": 8, "payload": b"", "fin": False},
        {"opcode": 1, "payload": b"", "mask_key": b"123"},
    ],
)
def test_build_frame_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_frame(**kwargs)


# ---------------------------------------------------------------- build_close / parse_close_payload


@pytest.mark.parametrize(
    ("code", "reason", "payload"),
    [
        (None, "", b""),
        (1000, "", b"\x03\xe8"),
        (1001, "bye", b"\x03\xe9bye"),
        (4999, "é", b"\x13\x87\xc3\xa9"),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_build_close(code: int | None, reason: str, payload: bytes, masked: bool) -> None:
    built = build_close(code, reason, mask_key=KEY if masked else None)
    assert decode_frames(built) == [(True, 0, 8, KEY if masked else None, payload)]
    assert parse_close_payload(payload) == (code, reason)


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        ("a" * 200, "a" * 123),
        ("é" * 100, "é" * 61),  # 2-byte characters: 122 bytes fit, the 123rd is half of one
        ("a" + "€" * 50, "a" + "€" * 40),  # 3-byte characters, 1 + 120 bytes
        ("😀" * 40, "😀" * 30),  # 4-byte characters
    ],
)
def test_build_close_truncates_reason_at_character_boundary(reason: str, kept: str) -> None:
    built = build_close(1000, reason)
    [(_, _, _, _, payload)] = decode_frames(built)
    assert len(payload) <= 125
    assert parse_close_payload(payload) == (1000, kept)


@pytest.mark.parametrize(
    ("code", "reason"), [(1005, ""), (1006, ""), (999, ""), (5000, ""), (None, "x")]
)
def test_build_close_rejects_unsendable(code: int | None, reason: str) -> None:
    with pytest.raises(ValueError):
        build_close(code, reason)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", (None, "")),
        (b"\x03\xe8", (1000, "")),
        (b"\x03\xe8ok", (1000, "ok")),
        (b"\x0b\xb8", (3000, "")),
        (b"\x03\xf6", (1014, "")),
        (b"\x03", 1002),
        (b"\x03\xec", 1002),  # 1004
        (b"\x03\xed", 1002),  # 1005
        (b"\x03\xee", 1002),  # 1006
        (b"\x03\xf7", 1002),  # 1015
        (b"\x07\xd0", 1002),  # 2000
        (b"\x13\x88", 1002),  # 5000
        (b"\x00\x00", 1002),
        (b"\x03\xe8\xff", 1007),
        (b"\x03\xe8\xc3", 1007),  # truncated 2-byte sequence
        (b"\x03\xe8\xed\xa0\x80", 1007),  # UTF-16 surrogate
    ],
)
def test_parse_close_payload(payload: bytes, expected: tuple | int) -> None:
    if isinstance(expected, int):
        with pytest.raises(ProtocolError) as info:
            parse_close_payload(payload)
        assert info.value.close_code == expected
    else:
        assert parse_close_payload(payload) == expected


# ---------------------------------------------------------------- scanner: valid streams

LENGTHS = [0, 1, 125, 126, 65535, 65536]


@pytest.mark.parametrize("size", LENGTHS)
@pytest.mark.parametrize("masked", [False, True])
def test_single_frame_of_each_length(size: int, masked: bool) -> None:
    data = cframe(Opcode.BINARY, bytes(size), masked)
    s = scanner(masked)
    assert s.receive_data(data) is data
    assert (s.frames, s.messages, s.at_boundary) == (1, 1, True)


@pytest.mark.parametrize("size", LENGTHS)
@pytest.mark.parametrize("masked", [False, True])
def test_frame_fed_byte_by_byte(size: int, masked: bool) -> None:
    data = cframe(Opcode.TEXT, b"x" * size, masked)
    s = scanner(masked)
    items = feed(s, bytewise(data))
    assert wire(items) == data
    assert (s.frames, s.messages, s.at_boundary) == (1, 1, True)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "width", [16, 64], ids=["16-bit", "64-bit"]
)
@pytest.mark.parametrize("opcode", [Opcode.BINARY, Opcode.PING])
def test_non_minimal_length_encodings_are_accepted(masked: bool, width: int, opcode: int) -> None:
    data = cframe(opcode, b"hello", masked, width=width)
    s = scanner(masked)
    items = feed(s, [data])
    assert wire(items) == data
    if opcode == Opcode.PING:
        [cf] = controls(items)
        assert cf.payload == b"hello"
    assert s.frames == 1


MIXED_STREAMS = {
    "small frames": [
        (Opcode.TEXT, b"a", True),
        (Opcode.BINARY, b"bc", True),
        (Opcode.TEXT, b"", True),
    ],
    "fragmented with ping": [
        (Opcode.TEXT, b"Hel", False),
        (Opcode.PING, b"p", True),
        (Opcode.CONTINUATION, b"l", False),
        (Opcode.CONTINUATION, b"o", True),
    ],
    "close then more": [
        (Opcode.CLOSE, close_payload(1000, b"done"), True),
        (Opcode.TEXT, b"late", True),
    ],
    "pong and empty close": [(Opcode.PONG, b"", True), (Opcode.CLOSE, b"", True)],
    "big and small": [
        (Opcode.BINARY, bytes(70000), True),
        (Opcode.PONG, b"x" * 125, True),
        (Opcode.TEXT, b"t" * 126, True),
    ],
}


@pytest.mark.parametrize("name", MIXED_STREAMS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("split", ["whole", "bytes", "sevens"])
def test_mixed_streams(name: str, masked: bool, split: str) -> None:
    spec = MIXED_STREAMS[name]
    data = b"".join(cframe(op, payload, masked, fin=fin) for op, payload, fin in spec)
    if split == "whole":
        chunks = [data]
    elif split == "bytes":
        chunks = bytewise(data)
    else:
        chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
    s = scanner(masked)
    items = feed(s, chunks)
    assert wire(items) == data
    expected_controls = [(op, payload) for op, payload, _ in spec if op >= 8]
    assert [(cf.opcode, cf.payload) for cf in controls(items)] == expected_controls
    for cf in controls(items):
        assert cf.raw == cframe(cf.opcode, cf.payload, masked)
    assert s.frames == len(spec)
    assert s.messages == sum(1 for op, _, fin in spec if op < 8 and fin)
    assert s.at_boundary


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (b"", None, ""),
        (close_payload(1001, b"away"), 1001, "away"),
        (close_payload(4000, "ü".encode()), 4000, "ü"),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_close_frame_is_parsed(payload: bytes, code: int | None, reason: str, masked: bool) -> None:
    data = cframe(Opcode.CLOSE, payload, masked)
    [cf] = scanner(masked).receive_data(data)
    assert (cf.opcode, cf.payload, cf.raw) == (Opcode.CLOSE, payload, data)
    assert (cf.close_code, cf.close_reason) == (code, reason)


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG])
def test_other_control_frames_have_no_close_fields(opcode: int) -> None:
    [cf] = scanner(False).receive_data(cframe(opcode, b"\x03\xe8"))
    assert (cf.close_code, cf.close_reason) == (None, "")


def test_scanner_round_trips_build_frame_output() -> None:
    data = (
        build_frame(Opcode.TEXT, b"Hel", fin=False, mask_key=KEY)
        + build_frame(Opcode.PING, b"?", mask_key=KEY)
        + build_frame(Opcode.CONTINUATION, b"lo", mask_key=KEY)
        + build_close(1000, "bye", mask_key=KEY)
    )
    items = scanner(True).receive_data(data)
    assert wire(items) == data
    assert [(cf.opcode, cf.payload) for cf in controls(items)] == [(9, b"?"), (8, b"\x03\xe8bye")]


# ---------------------------------------------------------------- scanner: fast path, output


@pytest.mark.parametrize("masked", [False, True])
def test_fast_path_returns_the_chunk_itself(masked: bool) -> None:
    s = scanner(masked)
    many = b"".join(cframe(Opcode.BINARY, bytes(20), masked) for _ in range(50))
    assert s.receive_data(many) is many
    big = cframe(Opcode.BINARY, bytes(100_000), masked)
    head, middle, tail = big[:1000], big[1000:50_000], big[50_000:]
    assert s.receive_data(head) is head  # ends inside the payload
    assert not s.at_boundary
    assert s.receive_data(middle) is middle  # wholly inside the payload
    assert s.receive_data(tail) is tail  # ends exactly at the frame's end
    assert s.at_boundary
    assert (s.frames, s.messages) == (51, 51)


def test_chunk_with_control_frame_is_split_around_it() -> None:
    a = cframe(Opcode.TEXT, b"aaa", True)
    ping = cframe(Opcode.PING, b"p", True)
    b = cframe(Opcode.TEXT, b"bbb", True)
    first, cf, second = scanner(True).receive_data(a + ping + b)
    assert bytes(first) == a and bytes(second) == b
    assert isinstance(cf, ControlFrame) and cf.raw == ping


def test_control_frame_at_chunk_edges_yields_only_the_frame() -> None:
    ping = cframe(Opcode.PING, b"p", True)
    assert [type(x) for x in scanner(True).receive_data(ping)] == [ControlFrame]


def test_empty_chunk() -> None:
    s = scanner(True)
    data = b""
    result = s.receive_data(data)
    assert result is data or result == []


# ---------------------------------------------------------------- scanner: holding back


@pytest.mark.parametrize("size", [5, 300, 70000])
@pytest.mark.parametrize("masked", [False, True])
def test_split_header_is_held_until_complete(size: int, masked: bool) -> None:
    data = cframe(Opcode.BINARY, b"z" * size, masked)
    header_size = (2 if size < 126 else 4 if size < 65536 else 10) + (4 if masked else 0)
    s = scanner(masked)
    for i in range(header_size - 1):
        assert s.receive_data(data[i : i + 1]) == []
        assert s.at_boundary  # nothing of the frame was forwarded
    items = s.receive_data(data[header_size - 1 :])
    assert bytes(items[0]) == data[:header_size]  # the held header, in one piece
    assert wire(items) == data
    assert s.frames == 1


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("size", [0, 1, 125])
def test_split_control_frame_is_held_whole(masked: bool, size: int) -> None:
    data = cframe(Opcode.PONG, b"q" * size, masked)
    for cut in range(1, len(data)):
        s = scanner(masked)
        assert s.receive_data(data[:cut]) == []
        [cf] = s.receive_data(data[cut:])
        assert cf.raw == data and cf.payload == b"q" * size
        assert s.frames == 1


def test_data_after_held_control_frame_is_forwarded_in_order() -> None:
    a = cframe(Opcode.TEXT, b"a" * 10, True)
    ping = cframe(Opcode.PING, b"hi", True)
    b = cframe(Opcode.BINARY, b"b" * 1000, True)
    s = scanner(True)
    first = s.receive_data(a + ping[:3])
    assert [bytes(x) for x in first] == [a]
    second = s.receive_data(ping[3:] + b[:10])
    assert isinstance(second[0], ControlFrame) and second[0].raw == ping
    assert bytes(second[1]) == b[:10]
    assert not s.at_boundary
    assert s.receive_data(b[10:]) == b[10:]


# ---------------------------------------------------------------- scanner: want_boundary


def test_boundary_inside_large_frame_stream() -> None:
    # An endless stream of large frames: the relay still gets a place to write.
    big = cframe(Opcode.BINARY, bytes(10_000), True)
    stream = big * 5
    s = scanner(True)
    s.receive_data(stream[:3000])
    assert not s.at_boundary
    s.want_boundary = True
    out = s.receive_data(stream[3000:9000])
    assert out == stream[3000:9000]  # no boundary reached yet: fast path
    assert s.want_boundary
    out = s.receive_data(stream[9000:25_000])
    assert [type(x) for x in out] == [memoryview, type(BOUNDARY), memoryview]
    assert out[1] is BOUNDARY
    assert bytes(out[0]) == stream[9000 : len(big)]
    assert bytes(out[2]) == stream[len(big) : 25_000]
    assert not s.want_boundary
    assert s.receive_data(stream[25_000:]) == stream[25_000:]


def test_boundary_exactly_at_chunk_end() -> None:
    big = cframe(Opcode.BINARY, bytes(1000), False)
    s = scanner(False)
    s.receive_data(big[:100])
    s.want_boundary = True
    rest = big[100:]
    out = s.receive_data(rest)
    assert out[0] is rest and out[1] is BOUNDARY and len(out) == 2


def test_boundary_when_already_at_boundary_comes_first() -> None:
    s = scanner(True)
    s.receive_data(cframe(Opcode.TEXT, b"x", True))
    s.want_boundary = True
    nxt = cframe(Opcode.TEXT, b"y", True)
    out = s.receive_data(nxt)
    assert out[0] is BOUNDARY and bytes(out[1]) == nxt


def test_boundary_before_held_partial_header() -> None:
    nxt = cframe(Opcode.TEXT, b"y" * 200, True)
    s = scanner(True)
    assert s.receive_data(nxt[:3]) == []
    s.want_boundary = True
    out = s.receive_data(nxt[3:])
    assert out[0] is BOUNDARY
    assert b"".join(bytes(x) for x in out[1:]) == nxt


def test_boundary_between_frames_of_one_chunk() -> None:
    a = cframe(Opcode.BINARY, bytes(500), True)
    b = cframe(Opcode.BINARY, bytes(10), True)
    s = scanner(True)
    s.receive_data(a[:100])
    s.want_boundary = True
    out = s.receive_data(a[100:] + b + b)
    assert [bytes(x) if x is not BOUNDARY else x for x in out] == [a[100:], BOUNDARY, b + b]


def test_boundary_after_held_data_header_frame_ends() -> None:
    a = cframe(Opcode.BINARY, bytes(500), False)
    s = scanner(False)
    s.receive_data(a[:2])
    s.want_boundary = True
    out = s.receive_data(a[2:])
    assert out[0] is BOUNDARY  # forwarded bytes were at a boundary when asked


# ---------------------------------------------------------------- scanner: counters and state


def test_counters_through_a_fragmented_message() -> None:
    s = scanner(False)
    s.receive_data(cframe(Opcode.TEXT, b"a", fin=False))
    assert (s.frames, s.messages) == (1, 0)
    s.receive_data(cframe(Opcode.PING))
    assert (s.frames, s.messages) == (2, 0)
    last = cframe(Opcode.CONTINUATION, bytes(1000))
    s.receive_data(last[:100])
    assert not s.at_boundary and (s.frames, s.messages) == (2, 0)
    s.receive_data(last[100:])
    assert s.at_boundary and (s.frames, s.messages) == (3, 1)
    big = cframe(Opcode.BINARY, bytes(1000))
    s.receive_data(big[:500])
    assert not s.at_boundary and (s.frames, s.messages) == (3, 1)
    s.receive_data(big[500:])
    assert (s.frames, s.messages) == (4, 2)


# ---------------------------------------------------------------- scanner: RSV1 and limits


@pytest.mark.parametrize("masked", [False, True])
def test_rsv1_allowed_on_first_frame_of_message(masked: bool) -> None:
    data = (
        cframe(Opcode.TEXT, b"c", masked, rsv=4)
        + cframe(Opcode.BINARY, b"c" * 300, masked, rsv=4, fin=False)
        + cframe(Opcode.CONTINUATION, b"d", masked)
        + cframe(Opcode.TEXT, b"plain", masked)
    )
    s = scanner(masked, rsv1=True)
    assert s.receive_data(data) is data
    assert (s.frames, s.messages) == (4, 3)


@pytest.mark.parametrize(
    ("limit", "spec", "ok"),
    [
        (10, [(Opcode.TEXT, 10, True)], True),
        (10, [(Opcode.TEXT, 11, True)], False),
        # Control frames between fragments do not count.
        (
            10,
            [(Opcode.TEXT, 4, False), (Opcode.PING, 100, True), (Opcode.CONTINUATION, 6, True)],
            True,
        ),
        (
            10,
            [
                (Opcode.TEXT, 4, False),
                (Opcode.CONTINUATION, 4, False),
                (Opcode.CONTINUATION, 3, True),
            ],
            False,
        ),
        # The limit is per message, not per stream.
        (10, [(Opcode.TEXT, 10, True), (Opcode.TEXT, 10, True)], True),
        (200, [(Opcode.TEXT, 125, True), (Opcode.BINARY, 200, True)], True),
        (200, [(Opcode.TEXT, 100, False), (Opcode.CONTINUATION, 101, True)], False),
        (70000, [(Opcode.BINARY, 70001, True)], False),
        (0, [(Opcode.BINARY, 70001, True)], True),
    ],
)
@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_message_size_limit(limit: int, spec: list, ok: bool, split: str) -> None:
    data = b"".join(cframe(op, bytes(size), True, fin=fin) for op, size, fin in spec)
    s = scanner(True, limit=limit)
    chunks = [data] if split == "whole" else bytewise(data)
    if ok:
        assert wire(feed(s, chunks)) == data
    else:
        with pytest.raises(ProtocolError) as info:
            feed(s, chunks)
        assert info.value.close_code == 1009


def test_message_too_big_is_judged_from_header_alone() -> None:
    s = scanner(False, limit=1000)
    head = encode_frame(Opcode.BINARY, declared=1001)  # header only, no payload yet
    with pytest.raises(ProtocolError) as info:
        s.receive_data(head)
    assert info.value.close_code == 1009


@pytest.mark.parametrize(
    ("limit", "compressed"),
    [(1, 70), (2047, 2047 + 5 + 64), (2048, 2048 + 10 + 64), (16 * 1024 * 1024, 16 * 1024 * 1024 + 41049)],
)
def test_compressed_message_limit(limit: int, compressed: int) -> None:
    assert compressed_message_limit(limit) == compressed


LIMIT = 1000
COMPRESSED_LIMIT = LIMIT + 5 + 64
TOO_BIG = f"message exceeds {LIMIT} bytes"
COMPRESSED_TOO_BIG = f"compressed message exceeds {COMPRESSED_LIMIT} bytes"


@pytest.mark.parametrize(
    ("sizes", "rsv1", "error"),
    [
        # Payload sizes of the message's frames; error None when it is accepted.
        pytest.param([COMPRESSED_LIMIT], True, None, id="compressed-at-its-limit"),
        pytest.param([COMPRESSED_LIMIT + 1], True, COMPRESSED_TOO_BIG, id="compressed-one-over"),
        pytest.param([LIMIT], False, None, id="plain-at-the-limit"),
        pytest.param([LIMIT + 1], False, TOO_BIG, id="plain-one-over"),
        # Fragments of a compressed message share its allowance: RSV1 is on the first only.
        pytest.param([500, 500, COMPRESSED_LIMIT - 1000], True, None, id="compressed-fragments"),
        pytest.param(
            [500, 500, COMPRESSED_LIMIT - 999], True, COMPRESSED_TOO_BIG, id="compressed-fragments-over"
        ),
        pytest.param([500, 500, 1], False, TOO_BIG, id="plain-fragments-over"),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_compressed_messages_get_the_deflate_allowance(
    sizes: list[int], rsv1: bool, error: str | None, masked: bool, split: str
) -> None:
    data = b"".join(
        cframe(
            Opcode.BINARY if i == 0 else Opcode.CONTINUATION,
            bytes(n),
            masked,
            rsv=4 if rsv1 and i == 0 else 0,
            fin=i == len(sizes) - 1,
        )
        for i, n in enumerate(sizes)
    )
    s = scanner(masked, limit=LIMIT, rsv1=True)
    chunks = [data] if split == "whole" else bytewise(data)
    if error is None:
        assert wire(feed(s, chunks)) == data
        assert s.messages == 1
    else:
        with pytest.raises(ProtocolError) as info:
            feed(s, chunks)
        assert (info.value.close_code, info.value.reason) == (1009, error)


# ---------------------------------------------------------------- scanner: violations

UNMASKED = False
MASKED = True
OPEN_TEXT = (Opcode.TEXT, b"x", False)


class Bad(NamedTuple):
    """A bad frame, the stream state it arrives in, and the close code it earns."""

    masked: bool  # the scanner's direction: True for a client stream
    frame: bytes
    code: int
    before: tuple = ()  # (opcode, payload, fin) of valid frames sent first
    rsv1: bool = False
    limit: int = 0


def mframe(opcode: int, payload: bytes = b"", **kw) -> bytes:
    """A frame masked with KEY, as a client sends it."""
    return encode_frame(opcode, payload, key=KEY, **kw)


BIG_64 = {"width": 64, "declared": 1 << 20}

VIOLATIONS: dict[str, Bad] = {
    "unmasked from client": Bad(MASKED, encode_frame(Opcode.TEXT, b"x"), 1002),
    "masked from backend": Bad(UNMASKED, mframe(Opcode.TEXT, b"x"), 1002),
    **{
        f"reserved opcode {op:#x}": Bad(MASKED, mframe(op), 1002)
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
    },
    "ping of 126 bytes": Bad(MASKED, mframe(Opcode.PING, bytes(126)), 1002),
    "close of 126 bytes": Bad(UNMASKED, encode_frame(Opcode.CLOSE, close_payload(1000, bytes(124))), 1002),
    "pong declaring 64-bit length": Bad(UNMASKED, encode_frame(Opcode.PONG, **BIG_64), 1002),
    "fragmented ping": Bad(MASKED, mframe(Opcode.PING, fin=False), 1002),
    "fragmented close": Bad(UNMASKED, encode_frame(Opcode.CLOSE, fin=False), 1002),
    "continuation first": Bad(MASKED, mframe(Opcode.CONTINUATION, b"x"), 1002),
    "continuation after final": Bad(
        UNMASKED, encode_frame(Opcode.CONTINUATION, b"x"), 1002, before=((Opcode.TEXT, b"a", True),)
    ),
    "text inside message": Bad(UNMASKED, encode_frame(Opcode.TEXT, b"x"), 1002, before=(OPEN_TEXT,)),
    "binary inside message": Bad(MASKED, mframe(Opcode.BINARY), 1002, before=(OPEN_TEXT,)),
    "rsv1 without extension": Bad(MASKED, mframe(Opcode.TEXT, b"x", rsv=4), 1002),
    "rsv1 on continuation": Bad(
        UNMASKED, encode_frame(Opcode.CONTINUATION, b"x", rsv=4), 1002, before=(OPEN_TEXT,), rsv1=True
    ),
    "rsv1 on control frame": Bad(UNMASKED, encode_frame(Opcode.PING, rsv=4), 1002, rsv1=True),
    "rsv2": Bad(MASKED, mframe(Opcode.TEXT, b"x", rsv=2), 1002, rsv1=True),
    "rsv3": Bad(UNMASKED, encode_frame(Opcode.BINARY, b"x", rsv=1), 1002, rsv1=True),
    "rsv2 on control": Bad(UNMASKED, encode_frame(Opcode.PONG, rsv=2), 1002),
    "64-bit length top bit": Bad(
        UNMASKED, encode_frame(Opcode.BINARY, width=64, declared=1 << 63), 1002
    ),
    "64-bit length all ones": Bad(
        MASKED, mframe(Opcode.BINARY, width=64, declared=(1 << 64) - 1), 1002
    ),
    "close with 1-byte payload": Bad(MASKED, mframe(Opcode.CLOSE, b"\x03"), 1002),
    **{
        f"close code {code}": Bad(UNMASKED, encode_frame(Opcode.CLOSE, close_payload(code)), 1002)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)
    },
    "close reason not utf-8": Bad(
        MASKED, mframe(Opcode.CLOSE, close_payload(1000, b"\xc3\x28")), 1007
    ),
    "single frame too big": Bad(MASKED, mframe(Opcode.BINARY, bytes(101)), 1009, limit=100),
    "fragments too big": Bad(
        UNMASKED,
        encode_frame(Opcode.CONTINUATION, bytes(41)),
        1009,
        before=((Opcode.TEXT, bytes(60), False),),
        limit=100,
    ),
    "64-bit frame too big": Bad(
        UNMASKED, encode_frame(Opcode.BINARY, width=64, declared=(1 << 20) + 1), 1009, limit=1 << 20
    ),
}


@pytest.mark.parametrize("name", VIOLATIONS)
@pytest.mark.parametrize("split", ["whole", "bytes", "threes"])
def test_violations(name: str, split: str) -> None:
    case = VIOLATIONS[name]
    good = b"".join(cframe(op, data, case.masked, fin=fin) for op, data, fin in case.before)
    ping = cframe(Opcode.PING, b"ok", case.masked)
    data = good + ping + case.frame + cframe(Opcode.TEXT, b"after", case.masked)
    if split == "whole":
        chunks = [data]
    elif split == "bytes":
        chunks = bytewise(data)
    else:
        chunks = [data[i : i + 3] for i in range(0, len(data), 3)]
    s = scanner(case.masked, limit=case.limit, rsv1=case.rsv1)
    forwarded: list = []
    with pytest.raises(ProtocolError) as info:
        for chunk in chunks:
            forwarded.extend(feed(s, [chunk]))
    assert info.value.close_code == case.code
    assert info.value.reason
    # Everything before the bad frame reaches the peer; nothing of the bad frame does.
    assert wire(forwarded + s.valid_prefix) == good + ping
    # The scanner is dead.
    with pytest.raises(ProtocolError):
        s.receive_data(cframe(Opcode.TEXT, b"x", case.masked))


@pytest.mark.parametrize(
    ("masked", "bad", "reason"),
    [
        (MASKED, encode_frame(Opcode.TEXT, b"x"), "unmasked frame from client"),
        (UNMASKED, encode_frame(Opcode.TEXT, b"x", key=KEY), "masked frame from backend"),
        (UNMASKED, encode_frame(Opcode.CLOSE, b"\x03"), "close frame with a 1-byte payload"),
    ],
)
def test_violation_reasons(masked: bool, bad: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        scanner(masked).receive_data(bad)
    assert (info.value.close_code, info.value.reason) == (1002, reason)


def test_valid_prefix_contents() -> None:
    a = cframe(Opcode.TEXT, b"aaaa", True)
    ping = cframe(Opcode.PING, b"p", True)
    b = cframe(Opcode.BINARY, b"b" * 300, True)
    bad = encode_frame(Opcode.TEXT, b"unmasked")
    s = scanner(True)
    with pytest.raises(ProtocolError):
        s.receive_data(a + ping + b + bad)
    first, cf, second = s.valid_prefix
    assert bytes(first) == a and bytes(second) == b
    assert isinstance(cf, ControlFrame) and cf.raw == ping


def test_valid_prefix_after_payload_spanning_chunks() -> None:
    big = cframe(Opcode.BINARY, bytes(1000), False)
    bad = encode_frame(Opcode.CONTINUATION, b"")
    s = scanner(False)
    s.receive_data(big[:500])
    s.want_boundary = True
    with pytest.raises(ProtocolError):
        s.receive_data(big[500:] + bad)
    assert [bytes(x) if x is not BOUNDARY else x for x in s.valid_prefix] == [big[500:], BOUNDARY]


def test_valid_prefix_with_held_control_frame_completed() -> None:
    ping = cframe(Opcode.PING, b"abc", True)
    s = scanner(True)
    assert s.receive_data(ping[:4]) == []
    with pytest.raises(ProtocolError):
        s.receive_data(ping[4:] + encode_frame(Opcode.TEXT, b""))
    [cf] = s.valid_prefix
    assert cf.raw == ping


def test_valid_prefix_empty_when_bad_header_was_held() -> None:
    s = scanner(True)
    bad = encode_frame(Opcode.BINARY, bytes(300))  # unmasked, 16-bit length: 4-byte header
    assert s.receive_data(bad[:3]) == []
    with pytest.raises(ProtocolError):
        s.receive_data(bad[3:])
    assert s.valid_prefix == []


def test_tiny_message_limit_checks_every_frame() -> None:
    s = scanner(True, limit=3)
    ok = cframe(Opcode.TEXT, b"abc", True)
    assert s.receive_data(ok) is ok
    with pytest.raises(ProtocolError) as info:
        s.receive_data(cframe(Opcode.TEXT, b"abcd", True))
    assert info.value.close_code == 1009
