"""Property tests holding the two head parsers to one behaviour (no event loop, no sockets).

httptools is a fast path, h11 the reference: on any input, both must accept or
refuse the same heads, with the same status and reason, and fill the same fields.
Inputs are valid heads with bytes mutated, heads built from hostile pieces, and
random bytes, each fed to `HeadReader` in random pieces as a socket would.
HYPOTHESIS_PROFILE picks the depth (see conftest.py).
"""

from __future__ import annotations

import os

import h11
import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from wsgate.errors import HandshakeError
from wsgate.handshake import accept_key, check_client_request
from wsgate.heads import (
    HeadReader,
    RequestHead,
    ResponseHead,
    parse_request_head,
    response_head,
    switching_protocols_head,
)

pytest.importorskip("httptools")

_DEPTH = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
PROFILE = settings(
    _DEPTH,
    # An example takes about a millisecond, and a parting of the parsers hides in a few
    # bytes at the right place: five times the profile's examples.
    max_examples=_DEPTH.max_examples * 5,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
VALID_REQUEST = (
    b"GET /chat?room=1 HTTP/1.1\r\n"
    b"Host: gateway.test:8080\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Origin: https://gateway.test\r\n"
    b"Sec-WebSocket-Protocol: chat, superchat\r\n"
    b"\r\n"
)
VALID_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + accept_key(KEY) + b"\r\n"
    b"Sec-WebSocket-Protocol: chat\r\n"
    b"\r\n"
)
# Bytes where the grammars of h11 and llhttp could part: whitespace, controls, obs-text,
# separators and versions ...
INSERTIONS = [
    b" ", b"\t", b"  ", b"\r", b"\r\n", b"\x00", b"\x01", b"\x0b", b"\x7f", b"\x80", b"\xff",
    b":", b": ", b" :", b",", b";", b"\"", b"/", b"?", b"#", b"%", b"@", b"\\", b"a", b"A", b"1",
    b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.10", b"http/1.1",
]
# ... and whole lines that change a head's meaning, or that one parser might normalise.
LINES = [
    b"Host: other.test", b"host:", b"Content-Length: 0", b"Content-Length: 5", b"Content-Length: 0, 0",
    b"Content-Length: 00", b"Transfer-Encoding: chunked", b"Transfer-Encoding: Chunked",
    b"Transfer-Encoding: gzip", b"X-Empty:", b"X-Spaces:   ", b": no-name", b"X-Tab:\tv\t",
    b"X-Trailing: v ", b"Upgrade: h2c", b"Connection: close", b"Sec-WebSocket-Version: 13",
]
TOKEN_CHARS = "!#$%&'*+-.^_`|~09azAZ"
FIELD_BYTES = b" \t!\"#,:;=?@[\\]{}azAZ09\x00\x01\x0b\x7f\x80\xff"


def boundaries(data: bytes | bytearray) -> list[int]:
    """Where the grammar turns: around spaces, colons and line ends."""
    return [i + shift for i, byte in enumerate(data) if byte in b" :\r\n" for shift in (0, 1)]


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with up to four insertions, deletions and byte changes, most at a boundary."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.one_of(st.sampled_from(boundaries(data) or [0]), st.integers(0, len(data))))
        kind = draw(st.sampled_from(["insert", "delete", "change"]))
        if kind == "insert":
            data[at:at] = draw(st.sampled_from(INSERTIONS))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif at < len(data):
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def with_lines(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with one to three of the `LINES` among its header lines."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 3))):
        starts = [i + 1 for i, byte in enumerate(data) if byte == ord("\n")][:-1]
        at = draw(st.sampled_from(starts))
        data[at:at] = draw(st.sampled_from(LINES)) + b"\r\n"
    return bytes(data)


field_name = st.one_of(
    st.sampled_from([b"Upgrade", b"Connection", b"Sec-WebSocket-Key", b"X-A", b"Host"]),
    st.text(TOKEN_CHARS, min_size=1, max_size=6).map(str.encode),
    st.text(TOKEN_CHARS, min_size=1, max_size=6).map(str.encode),
    st.binary(min_size=0, max_size=4),
)
field_value = st.tuples(
    st.sampled_from([b"", b" ", b"\t", b"  "]),
    st.one_of(
        st.sampled_from([b"websocket", b"Upgrade", KEY, b"13", b"gateway.test", b"a b", b""]),
        st.lists(st.sampled_from([bytes((b,)) for b in FIELD_BYTES]), max_size=8).map(b"".join),
    ),
    st.sampled_from([b"", b"", b" ", b"\t", b" \t "]),
).map(b"".join)


@st.composite
def built_request(draw: st.DrawFn) -> bytes:
    """A request head put together from valid and hostile pieces."""
    method = draw(st.sampled_from([b"GET", b"get", b"POST", b"PRI", b"G\x00T", b"GET "]))
    target = draw(st.sampled_from([b"/", b"/chat?a=b", b"*", b"http://gateway.test/x", b"/\x80", b"/a b"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"HTTP/11"]))
    separator = st.sampled_from([b": ", b":", b":\t", b" : "])
    headers = draw(st.lists(st.tuples(field_name, separator, field_value), max_size=8))
    lines = [name + separator + value for name, separator, value in headers]
    if draw(st.booleans()) or draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), b"Host: gateway.test")  # most have one Host
    lines.insert(0, method + b" " + target + b" " + version)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@st.composite
def built_response(draw: st.DrawFn) -> bytes:
    """A response head put together from valid and hostile pieces."""
    status = draw(st.sampled_from([b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 101", b"HTTP/1.1 101 ",
                                   b"HTTP/1.0 101 OK", b"HTTP/1.1 1010 x", b"HTTP/1.1 200 OK",
                                   b"HTTP/1.1 101 \x80\x01", b"HTTP/1.1  101 x"]))
    headers = draw(st.lists(st.tuples(field_name, st.sampled_from([b": ", b":", b" : "]), field_value),
                            max_size=8))
    lines = [status, *(name + separator + value for name, separator, value in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]


def read_head(pieces: list[bytes], reader: HeadReader) -> bytes:
    """The complete head `reader` returns from `pieces`; a head it refuses is not for the parsers."""
    for piece in pieces:
        try:
            head = reader.receive_data(piece)
        except HandshakeError as exc:
            event(f"HeadReader refused {exc.status}")
            reject()
        if head is not None:
            return head
    reject()  # never complete


def request_outcome(head: bytes, parser: str) -> object:
    """What a parser makes of a request head: its fields, or the refusal it becomes."""
    try:
        request, after = parse_request_head(head, parser)  # type: ignore[arg-type]
    except HandshakeError as exc:
        return ("refused", exc.status, exc.reason)
    try:
        checked: object = check_client_request(request)
    except HandshakeError as exc:
        checked = ("refused", exc.status, exc.reason)
    return (request, after, checked)


def h11_response(head: bytes) -> tuple[ResponseHead, bytes] | None:
    """The backend leg's reading of `head` by h11: its first head, or None if h11 refuses it."""
    client = h11.Connection(h11.CLIENT)
    upgrade = [(b"Host", b"b"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    client.send(h11.Request(method=b"GET", target=b"/", headers=upgrade))
    client.send(h11.EndOfMessage())
    client.receive_data(head)
    try:
        event = client.next_event()
    except h11.RemoteProtocolError:
        return None
    assert isinstance(event, (h11.InformationalResponse, h11.Response))
    return response_head(event), client.trailing_data[0]


requests = st.one_of(
    mutated(VALID_REQUEST),
    with_lines(VALID_REQUEST),
    built_request(),
    st.binary(min_size=1, max_size=120).map(lambda data: data + b"\r\n\r\n"),
)
responses = st.one_of(
    mutated(VALID_RESPONSE),
    with_lines(VALID_RESPONSE),
    built_response(),
    st.binary(min_size=1, max_size=120).map(lambda data: data + b"\r\n\r\n"),
)
frames_after = st.sampled_from([b"", b"\x81\x85\x00\x00\x00\x00hello", b"GET / HTTP/1.1\r\n\r\n"])


@PROFILE
@given(data=requests, after=frames_after, cuts=st.lists(st.integers(0, 1 << 12), max_size=6))
def test_both_parsers_decide_every_request_alike(data: bytes, after: bytes, cuts: list[int]) -> None:
    head = read_head(cut(data + after, cuts), HeadReader(16 * 1024, 100, 8 * 1024))
    reference = request_outcome(head, "h11")
    fast = request_outcome(head, "httptools")
    event("refused" if reference[0] == "refused" else "parsed")
    assert fast == reference


@PROFILE
@given(data=responses, after=frames_after, cuts=st.lists(st.integers(0, 1 << 12), max_size=6))
def test_the_fast_path_reads_a_backend_101_as_h11_does(data: bytes, after: bytes, cuts: list[int]) -> None:
    head = read_head(cut(data + after, cuts), HeadReader(16 * 1024, 100))
    fast = switching_protocols_head(head, "httptools")
    reference = h11_response(head)
    event("fast path" if fast is not None else "left to h11")
    if fast is not None:
        # The fast path reads only 101s that h11 reads, and reads them to the same fields.
        assert reference is not None and reference[0].status_code == 101
        assert fast == reference


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_a_valid_request_is_read_to_its_fields(parser: str) -> None:
    request, after = parse_request_head(VALID_REQUEST + b"\x81\x80", parser)  # type: ignore[arg-type]
    assert (request.method, request.target, request.http_version) == (b"GET", b"/chat?room=1", b"1.1")
    assert request.headers[1] == (b"Upgrade", b"websocket")
    assert after == b"\x81\x80"
    assert isinstance(request, RequestHead)


def test_a_valid_101_takes_the_fast_path() -> None:
    fast = switching_protocols_head(VALID_RESPONSE + b"\x81\x00", "httptools")
    assert fast == h11_response(VALID_RESPONSE + b"\x81\x00")
    assert switching_protocols_head(VALID_RESPONSE, "h11") is None
