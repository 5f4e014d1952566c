"""Property tests of the frame scanner: arbitrary splits, malformed frames, mutations.

HYPOTHESIS_PROFILE picks the depth: "dev" (default, quick) or "ci" (deep).
Streams are built by the tests' own encoder (tests/codec.py), never by wsgate.frames.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from codec import encode_frame

from wsgate import frames
from wsgate.errors import ProtocolError
from wsgate.frames import BOUNDARY, ControlFrame, FrameScanner

# Every test runs with the compiled fast path of the scanner and with the pure-Python one.
pytestmark = pytest.mark.usefixtures("scanner_implementation")

# The profiles are registered in conftest.py; applied per test rather than loaded, so
# other modules' settings stay as they are.
PROFILE = settings(
    settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev")),
    # Streams with 64 KiB frames are slow to build and large by design.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10
LIMIT = 300_000  # above every valid message the strategies build (4 x 65536 at most)
PATTERN = bytes(range(256)) * (65536 // 256 + 2)


class Stream:
    """A valid stream and what the scanner must report for it."""

    def __init__(self, masked: bool, allow_rsv1: bool) -> None:
        self.masked = masked
        self.allow_rsv1 = allow_rsv1
        self.data = bytearray()
        self.boundaries = [0]
        self.payload_spans: list[tuple[int, int]] = []  # data frames, header excluded
        self.control_spans: list[tuple[int, int]] = []
        self.controls: list[tuple[int, bytes]] = []
        self.frames = 0
        self.messages = 0

    def __repr__(self) -> str:
        # Short enough for a failure report; the frame layout is what matters.
        return (
            f"Stream(masked={self.masked}, allow_rsv1={self.allow_rsv1}, size={len(self.data)}, "
            f"head={bytes(self.data[:40])!r}, boundaries={self.boundaries}, "
            f"controls={self.control_spans})"
        )

    def add(self, frame: bytes, header_size: int, opcode: int, payload: bytes, fin: bool) -> None:
        start = len(self.data)
        self.data += frame
        end = len(self.data)
        if opcode >= 8:
            self.control_spans.append((start, end))
            self.controls.append((opcode, payload))
        else:
            self.payload_spans.append((start + header_size, end))
            self.messages += fin
        self.frames += 1
        self.boundaries.append(end)


SIZES = st.one_of(
    st.integers(0, 16),
    st.integers(0, 300),
    st.sampled_from([125, 126, 127, 65535, 65536]),
)
WIDTHS = st.sampled_from([None, None, None, 16, 64])  # sometimes non-minimal


@st.composite
def control_frame(draw: st.DrawFn) -> tuple[int, bytes]:
    opcode = draw(st.sampled_from([PING, PONG, CLOSE]))
    if opcode != CLOSE:
        return opcode, draw(st.binary(max_size=125))
    if draw(st.booleans()):
        return CLOSE, b""
    code = draw(st.sampled_from([1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999]))
    reason = draw(st.text(max_size=30)).encode("utf-8")[:123]
    reason = reason.decode("utf-8", "ignore").encode("utf-8")
    return CLOSE, struct.pack("!H", code) + reason


@st.composite
def streams(draw: st.DrawFn, max_messages: int = 6, allow_rsv1: bool | None = None) -> Stream:
    masked = draw(st.booleans())
    if allow_rsv1 is None:
        allow_rsv1 = draw(st.booleans())
    stream = Stream(masked=masked, allow_rsv1=allow_rsv1)

    def key() -> bytes | None:
        return draw(st.binary(min_size=4, max_size=4)) if masked else None

    def put(opcode: int, payload: bytes, fin: bool, rsv: int = 0, width: int | None = None) -> None:
        mask_key = key()
        frame = encode_frame(opcode, payload, fin=fin, rsv=rsv, key=mask_key, width=width)
        header_size = len(frame) - len(payload)
        stream.add(frame, header_size, opcode, payload, fin)

    def controls() -> None:
        for opcode, payload in draw(st.lists(control_frame(), max_size=2)):
            put(opcode, payload, True, width=draw(st.sampled_from([None, None, 16])))

    for _ in range(draw(st.integers(0, max_messages))):
        controls()
        sizes = draw(st.lists(SIZES, min_size=1, max_size=4))
        for index, size in enumerate(sizes):
            opcode = draw(st.sampled_from([TEXT, BINARY])) if index == 0 else CONTINUATION
            rsv = 4 if index == 0 and stream.allow_rsv1 and draw(st.booleans()) else 0
            payload = PATTERN[index : index + size]
            put(opcode, payload, index == len(sizes) - 1, rsv, draw(WIDTHS))
            if index < len(sizes) - 1:
                controls()
    controls()
    return stream


def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    if draw(st.booleans()):  # sometimes very fine-grained around the start
        cuts += range(min(len(data), draw(st.integers(0, 20))))
    points = sorted({0, len(data), *cuts})
    return [data[a:b] for a, b in zip(points, points[1:])]


def scanner_for(stream: Stream, limit: int = LIMIT) -> FrameScanner:
    return FrameScanner(masked=stream.masked, max_message_size=limit, allow_rsv1=stream.allow_rsv1)


def items_of(result: bytes | list, chunk: bytes) -> list:
    if isinstance(result, list):
        return result
    assert result is chunk
    return [chunk]


def wire_length(item: object) -> int:
    if item is BOUNDARY:
        return 0
    if isinstance(item, ControlFrame):
        return len(item.raw)
    return len(item)  # type: ignore[arg-type]


def wire_bytes(items: list) -> bytes:
    out = []
    for item in items:
        if isinstance(item, ControlFrame):
            out.append(item.raw)
        elif item is not BOUNDARY:
            out.append(bytes(item))
    return b"".join(out)


def inside_payload(spans: list[tuple[int, int]], offset: int) -> bool:
    return any(start <= offset <= end for start, end in spans)


def overlaps(spans: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(start < hi and lo < end for start, end in spans)


def payload_before(spans: list[tuple[int, int]], offset: int) -> int:
    """Data payload bytes among the stream's first `offset` bytes."""
    return sum(max(0, min(end, offset) - start) for start, end in spans)


# ---------------------------------------------------------------- (a) splits


@PROFILE
@given(st.data())
def test_any_split_reproduces_the_stream(data: st.DataObject) -> None:
    stream = data.draw(streams())
    chunks = split(data.draw, bytes(stream.data))
    boundaries = set(stream.boundaries)
    s = scanner_for(stream)
    forwarded: list = []
    consumed = sent = 0
    for chunk in chunks:
        held_before = consumed - sent
        result = s.receive_data(chunk)
        items = items_of(result, chunk)
        consumed += len(chunk)
        for item in items:
            if not isinstance(item, ControlFrame):
                assert item is not BOUNDARY
                assert len(item) > 0, "empty bytes item"
            sent += wire_length(item)
        forwarded += items
        # What was sent ends at a frame boundary or inside a data frame's payload.
        assert sent in boundaries or inside_payload(stream.payload_spans, sent)
        assert s.at_boundary == (sent in boundaries)
        held = consumed - sent
        assert 0 <= held <= 14 + 125
        assert s.held_size == held
        # Everything received is either framing (headers, control frames), held, or payload.
        assert consumed - s.framing_bytes - held == payload_before(stream.payload_spans, consumed)
        fast = (
            held_before == 0
            and held == 0
            and not overlaps(stream.control_spans, consumed - len(chunk), consumed)
        )
        assert (result is chunk) == fast
    assert wire_bytes(forwarded) == stream.data
    controls = [item for item in forwarded if isinstance(item, ControlFrame)]
    assert [(cf.opcode, cf.payload) for cf in controls] == stream.controls
    assert [cf.raw for cf in controls] == [stream.data[a:b] for a, b in stream.control_spans]
    assert (s.frames, s.messages) == (stream.frames, stream.messages)
    assert s.at_boundary

    whole = scanner_for(stream)
    everything = bytes(stream.data)
    whole_items = items_of(whole.receive_data(everything), everything)
    assert wire_bytes(whole_items) == stream.data
    assert (whole.frames, whole.messages) == (s.frames, s.messages)
    assert whole.framing_bytes == s.framing_bytes


# ---------------------------------------------------------------- (b) malformed frames


@st.composite
def malformed(draw: st.DrawFn) -> tuple[Stream, bytes, bytes, int, int]:
    """(valid prefix, opening fragment, bad frame, limit, close code)."""
    case = draw(
        st.sampled_from(
            [
                "mask", "opcode", "control too long", "control fragmented", "stray continuation",
                "nested message", "rsv1", "rsv1 continuation", "rsv1 control", "rsv23",
                "length top bit", "close 1 byte", "close code", "close utf-8", "too big",
                "fragments too big",
            ]
        )
    )
    rsv1 = {"rsv1": False, "rsv1 continuation": True, "rsv1 control": True}.get(case)
    stream = draw(streams(max_messages=3, allow_rsv1=rsv1))
    masked = stream.masked
    key = draw(st.binary(min_size=4, max_size=4)) if masked else None
    wrong_key = None if masked else draw(st.binary(min_size=4, max_size=4))
    opening = b""  # a non-final data frame when the bad frame needs a message in progress
    opening_size = 0
    too_big = case in ("too big", "fragments too big")
    limit = LIMIT if too_big else draw(st.sampled_from([0, LIMIT]))  # 0: no limit
    code = 1002
    payload = draw(st.binary(max_size=20))
    if case in ("nested message", "rsv1 continuation", "fragments too big"):
        opening_size = draw(st.integers(0, 200))
        first_opcode = draw(st.sampled_from([TEXT, BINARY]))
        opening = encode_frame(first_opcode, bytes(opening_size), fin=False, key=key)
    if case == "mask":
        bad = encode_frame(draw(st.sampled_from([TEXT, BINARY, PING])), payload, key=wrong_key)
    elif case == "opcode":
        opcode = draw(st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]))
        bad = encode_frame(opcode, payload, key=key, fin=draw(st.booleans()))
    elif case == "control too long":
        opcode = draw(st.sampled_from([PING, PONG, CLOSE]))
        size = draw(st.integers(126, 400))
        bad = encode_frame(opcode, bytes(size), key=key)
    elif case == "control fragmented":
        bad = encode_frame(draw(st.sampled_from([PING, PONG, CLOSE])), b"", fin=False, key=key)
    elif case == "stray continuation":
        bad = encode_frame(CONTINUATION, payload, key=key, fin=draw(st.booleans()))
    elif case == "nested message":
        opcode = draw(st.sampled_from([TEXT, BINARY]))
        bad = encode_frame(opcode, payload, key=key, fin=draw(st.booleans()))
    elif case == "rsv1":
        bad = encode_frame(draw(st.sampled_from([TEXT, BINARY])), payload, rsv=4, key=key)
    elif case == "rsv1 continuation":
        bad = encode_frame(CONTINUATION, payload, rsv=4, key=key)
    elif case == "rsv1 control":
        bad = encode_frame(draw(st.sampled_from([PING, PONG])), b"", rsv=4, key=key)
    elif case == "rsv23":
        rsv = draw(st.sampled_from([1, 2, 3, 5, 6, 7]))
        bad = encode_frame(draw(st.sampled_from([TEXT, BINARY, PING])), b"", rsv=rsv, key=key)
    elif case == "length top bit":
        declared = draw(st.integers(1 << 63, (1 << 64) - 1))
        bad = encode_frame(BINARY, b"", key=key, width=64, declared=declared)
    elif case == "close 1 byte":
        bad = encode_frame(CLOSE, payload[:1] or b"\x03", key=key)
    elif case == "close code":
        bad_code = draw(
            st.one_of(st.integers(0, 999), st.sampled_from([1004, 1005, 1006, 1015]),
                      st.integers(1016, 2999), st.integers(5000, 65535))
        )
        bad = encode_frame(CLOSE, struct.pack("!H", bad_code) + payload[:10], key=key)
    elif case == "close utf-8":
        code = 1007
        # A stray byte, a cut sequence, a bad continuation, a surrogate, a 5-byte form.
        invalid = [b"\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf8\x88\x80\x80"]
        junk = draw(st.sampled_from(invalid))
        text = draw(st.text(max_size=10)).encode("utf-8")
        bad = encode_frame(CLOSE, b"\x03\xe8" + text + junk, key=key)
    elif case == "too big":
        code = 1009
        declared = draw(st.integers(LIMIT + 1, (1 << 63) - 1))
        bad = encode_frame(draw(st.sampled_from([TEXT, BINARY])), b"", key=key, declared=declared)
    else:  # fragments too big
        code = 1009
        declared = draw(st.integers(LIMIT - opening_size + 1, LIMIT * 2))
        bad = encode_frame(CONTINUATION, b"", key=key, fin=draw(st.booleans()), declared=declared)
    return stream, opening, bad, limit, code


@PROFILE
@given(st.data())
def test_malformed_frames_are_rejected_whatever_the_split(data: st.DataObject) -> None:
    stream, opening, bad, limit, code = data.draw(malformed())
    valid = bytes(stream.data) + opening
    trailer = data.draw(st.binary(max_size=40))
    chunks = split(data.draw, valid + bad + trailer)
    s = scanner_for(stream, limit)
    forwarded: list = []
    with pytest.raises(ProtocolError) as info:
        for chunk in chunks:
            forwarded += items_of(s.receive_data(chunk), chunk)
    assert info.value.close_code == code
    # Every good frame was (or may now be) forwarded, nothing of the bad one.
    assert wire_bytes(forwarded + s.valid_prefix) == valid
    with pytest.raises(ProtocolError):
        s.receive_data(b"\x81")


# ---------------------------------------------------------------- (c) mutations


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Stream, bytes]:
    stream = draw(streams(max_messages=4))
    data = bytearray(stream.data)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return stream, bytes(data)


@PROFILE
@given(st.data())
def test_mutations_only_raise_protocol_error(data: st.DataObject) -> None:
    stream, mutant = data.draw(mutated())
    assume(mutant != stream.data)
    limit = data.draw(st.sampled_from([0, 10, 130, LIMIT]))
    s = scanner_for(stream, limit)
    sent = 0
    consumed = 0
    try:
        for chunk in split(data.draw, mutant):
            items = items_of(s.receive_data(chunk), chunk)
            consumed += len(chunk)
            sent += sum(wire_length(item) for item in items)
            assert 0 <= consumed - sent <= 14 + 125
    except ProtocolError as exc:
        assert exc.close_code in (1002, 1007, 1009)
        with pytest.raises(ProtocolError):
            s.receive_data(b"\x00")


# ---------------------------------------------------------------- (d) boundaries


@PROFILE
@given(st.data())
def test_requested_boundary_lands_on_the_next_frame_boundary(data: st.DataObject) -> None:
    stream = data.draw(streams())
    chunks = split(data.draw, bytes(stream.data))
    ask_before = data.draw(st.integers(0, len(chunks)))
    s = scanner_for(stream)
    sent = 0
    landed: list[int] = []
    expected = None
    for index, chunk in enumerate(chunks):
        if index == ask_before:
            assert not s.want_boundary
            expected = min(b for b in stream.boundaries if b >= sent)
            s.want_boundary = True
        for item in items_of(s.receive_data(chunk), chunk):
            if item is BOUNDARY:
                landed.append(sent)
            sent += wire_length(item)
    if expected is None:
        assert landed == []
    else:
        assert landed == [expected]
        assert not s.want_boundary


# ---------------------------------------------------------------- the compiled fast path


def walk_reference(data: bytes, pos: int, stop: int, steps: bytes, fast: bytes) -> tuple[int, int]:
    """The scanner's pure-Python fast-path loop, as the compiled one must behave."""
    count = 0
    while pos <= stop:
        step = steps[data[pos + 1]]
        if step and fast[data[pos]]:
            pos += step
            count += 1
            continue
        break
    return pos, count


frame_specs = st.lists(
    st.tuples(
        st.sampled_from([TEXT, BINARY, CONTINUATION, PING]),
        st.integers(0, 200),
        st.booleans(),  # fin
        st.sampled_from([0, 4]),  # rsv: none or RSV1
        st.booleans(),  # masked
    ),
    max_size=12,
)


@PROFILE
@given(frame_specs, st.binary(max_size=8), st.integers(0, 3), st.booleans(), st.booleans())
def test_the_compiled_walk_matches_the_python_loop(specs, tail, cut, masked, deflate):
    compiled = pytest.importorskip("wsgate._speedups").walk_frames
    stream = b"".join(
        encode_frame(op, PATTERN[:size], fin=fin, rsv=rsv, key=b"\x01\x02\x03\x04" if key else None)
        for op, size, fin, rsv, key in specs
    ) + tail
    data = stream[: max(0, len(stream) - cut)]
    steps = frames._STEPS_MASKED if masked else frames._STEPS_UNMASKED
    fast = frames._FAST_DEFLATE if deflate else frames._FAST_PLAIN
    stop = len(data) - (6 if masked else 2)
    expected = walk_reference(data, 0, stop, steps, fast)
    assert compiled(data, 0, stop, steps, fast) == expected
    assert compiled(bytearray(data), 0, stop, steps, fast) == expected
    assert compiled(memoryview(data), 0, stop, steps, fast) == expected


def test_the_compiled_walk_stays_inside_its_buffer_and_checks_its_tables():
    walk = pytest.importorskip("wsgate._speedups").walk_frames
    frame = bytes([0x82, 0x80 | 3]) + b"\0\0\0\0abc"
    # A `stop` past the end is clamped: no header byte is read beyond the buffer.
    assert walk(frame, 0, 10**9, frames._STEPS_MASKED, frames._FAST_PLAIN) == (9, 1)
    assert walk(frame[:1], 0, 10**9, frames._STEPS_MASKED, frames._FAST_PLAIN) == (0, 0)
    assert walk(b"", 0, 10**9, frames._STEPS_MASKED, frames._FAST_PLAIN) == (0, 0)
    assert walk(frame, -5, 10**9, frames._STEPS_MASKED, frames._FAST_PLAIN) == (-5, 0)
    with pytest.raises(ValueError):
        walk(frame, 0, 3, b"short", frames._FAST_PLAIN)
    with pytest.raises(TypeError):
        walk(frame, 0, 3)
