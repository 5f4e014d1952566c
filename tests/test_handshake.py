"""Tests of wsgate.handshake (no event loop, no sockets).

Requests and responses are h11 event objects built here, rendered to bytes and
parsed by the head parser under test (each module-level test runs once with h11
and once with httptools); rendered replies are parsed back by an h11 client
connection, an independent peer.
HYPOTHESIS_PROFILE picks the depth of the property tests (see conftest.py).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator

import h11
import pytest
from hypothesis import event, given, reject
from hypothesis import strategies as st

from wsgate.errors import BackendUnavailable, HandshakeError
from wsgate import handshake as rules
from wsgate import heads
from wsgate.handshake import (
    Negotiated,
    Offer,
    UpgradeRequest,
    accept_key,
    build_upstream_request,
    check_origin,
    render_backend_reply,
    render_error,
    render_rejection,
    render_switching_protocols,
)
from wsgate.heads import (
    HeadReader,
    HttpParser,
    RequestHead,
    ResponseHead,
    parse_request_head,
    response_head,
    switching_protocols_head,
)

# The example of RFC 6455 section 1.3.
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
CLIENT_IP = "203.0.113.9"

Headers = list[tuple[bytes, bytes]]

BASE: Headers = [
    (b"Host", b"chat.example.com"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
]

# Names the gateway removes (RFC 9110 7.6.1 plus the legacy ones) and sets.
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
}
GATEWAY_SET = [
    b"connection",
    b"upgrade",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-real-ip",
]
# Names a client may list in Connection without breaking the upgrade it asks for.
HANDSHAKE_CRITICAL = {b"host", b"sec-websocket-key", b"sec-websocket-version"}

# ---------------------------------------------------------------- helpers

# The parser the module's tests read heads with; the `head_parser` fixture sets it.
PARSER: list[HttpParser] = ["h11"]


@pytest.fixture(autouse=True, scope="module", params=["h11", "httptools"])
def head_parser(request: pytest.FixtureRequest) -> Iterator[HttpParser]:
    """Runs every test of the module with each parser."""
    if request.param == "httptools" and heads.httptools is None:
        pytest.skip("httptools is not installed")
    PARSER[0] = request.param
    yield request.param
    PARSER[0] = "h11"


def render_head(event: h11.Request | h11.Response | h11.InformationalResponse) -> bytes:
    """The bytes of `event`'s head, in any HTTP version (h11 itself only writes 1.1)."""
    if isinstance(event, h11.Request):
        start = b"%s %s HTTP/%s" % (event.method, event.target, event.http_version)
    else:
        start = b"HTTP/%s %d %s" % (event.http_version, event.status_code, event.reason)
    lines = [start, *(name + b": " + value for name, value in event.headers.raw_items())]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def parsed_request(event: h11.Request) -> RequestHead:
    head, after = parse_request_head(render_head(event), PARSER[0])
    assert after == b""
    return head


def parsed_response(event: h11.Response | h11.InformationalResponse) -> ResponseHead:
    """The head as the backend leg reads it: httptools' fast path, or else an h11 client."""
    head = render_head(event)
    fast = switching_protocols_head(head, PARSER[0])
    if fast is not None:
        assert fast[1] == b""
        return fast[0]
    return response_head(read_head(head))


def read_head(head: bytes) -> h11.InformationalResponse | h11.Response:
    """`head` read by an h11 client connection that sent an upgrade request."""
    client = h11.Connection(h11.CLIENT)
    client.send(request())
    client.send(h11.EndOfMessage())
    client.receive_data(head)
    event = client.next_event()
    assert isinstance(event, (h11.InformationalResponse, h11.Response))
    return event


def check_client_request(event: h11.Request) -> UpgradeRequest:
    """`handshake.check_client_request` of `event`, as the parser under test reads it."""
    return rules.check_client_request(parsed_request(event))


def check_backend_response(event: h11.InformationalResponse, offer: Offer) -> Negotiated:
    """`handshake.check_backend_response` of `event`, as the parser under test reads it."""
    return rules.check_backend_response(parsed_response(event), offer)



def request(
    headers: Headers = BASE,
    *,
    method: bytes = b"GET",
    target: bytes = b"/chat",
    http_version: bytes = b"1.1",
) -> h11.Request:
    return h11.Request(method=method, target=target, headers=headers, http_version=http_version)


def without(name: bytes, headers: Headers = BASE) -> Headers:
    return [(n, v) for n, v in headers if n.lower() != name.lower()]


def replaced(name: bytes, value: bytes, headers: Headers = BASE) -> Headers:
    return [(n, value if n.lower() == name.lower() else v) for n, v in headers]


def handshake(*extra: tuple[bytes, bytes], target: bytes = b"/chat") -> UpgradeRequest:
    return check_client_request(request([*BASE, *extra], target=target))


def raw(event: h11.Request | h11.Response | h11.InformationalResponse) -> Headers:
    return list(event.headers.raw_items())


def lower_names(headers: Headers) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name.lower()]


def tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def received(built: tuple[bytes, Offer]) -> h11.Request:
    """The request a backend reads from the bytes `build_upstream_request` made, read by h11."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(built[0])
    event = server.next_event()
    assert isinstance(event, h11.Request)
    assert isinstance(server.next_event(), h11.EndOfMessage)
    assert server.next_event() is h11.PAUSED  # an upgrade: h11 reads no further
    assert server.trailing_data == (b"", False)  # the head is all that was sent
    return event


def upstream_request(
    *extra: tuple[bytes, bytes], target: bytes = b"/chat", **kwargs
) -> tuple[bytes, Offer]:
    return build_upstream_request(handshake(*extra, target=target), client_ip=CLIENT_IP, **kwargs)


def upstream(*extra: tuple[bytes, bytes], target: bytes = b"/chat", **kwargs) -> h11.Request:
    """The request a backend reads when the client sent BASE and `extra`."""
    return received(upstream_request(*extra, target=target, **kwargs))


def offer_of(*extra: tuple[bytes, bytes], **kwargs) -> Offer:
    """What the request sent to a backend offers when the client sent BASE and `extra`."""
    return upstream_request(*extra, **kwargs)[1]


def switching(
    *extra: tuple[bytes, bytes], accept: bytes | None = ACCEPT
) -> h11.InformationalResponse:
    headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]
    if accept is not None:
        headers.append((b"Sec-WebSocket-Accept", accept))
    return h11.InformationalResponse(status_code=101, headers=[*headers, *extra])


def read_reply(data: bytes) -> tuple[list[object], bytes, h11.Connection]:
    """Parse `data` as the answer to an upgrade request, as an h11 client would."""
    client = h11.Connection(h11.CLIENT)
    client.send(request())
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    events: list[object] = []
    body = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            break
        events.append(event)
        if isinstance(event, h11.Data):
            body += event.data
        if isinstance(event, h11.EndOfMessage):
            break
    return events, body, client


# ---------------------------------------------------------------- accept_key


def test_accept_key_rfc_example() -> None:
    assert accept_key(KEY) == ACCEPT


# ---------------------------------------------------------------- check_client_request: accepted


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(BASE, id="minimal"),
        pytest.param(replaced(b"upgrade", b"WebSocket"), id="upgrade-token-case"),
        pytest.param(replaced(b"upgrade", b"h2c, websocket"), id="upgrade-list"),
        pytest.param(replaced(b"connection", b"UPGRADE"), id="connection-token-case"),
        pytest.param(replaced(b"connection", b"keep-alive, Upgrade"), id="connection-list"),
        pytest.param(
            replaced(b"connection", b"keep-alive,upgrade,"), id="connection-list-no-spaces"
        ),
        pytest.param(
            [*without(b"connection"), (b"Connection", b"keep-alive"), (b"Connection", b"Upgrade")],
            id="multiple-connection-headers",
        ),
        pytest.param([(n.lower(), v) for n, v in BASE], id="lowercase-names"),
        pytest.param([(n.upper(), v) for n, v in BASE], id="uppercase-names"),
        pytest.param([*BASE, (b"Content-Length", b"0")], id="content-length-zero"),
        pytest.param(list(reversed(BASE)), id="any-order"),
    ],
)
def test_client_request_accepted(headers: Headers) -> None:
    result = check_client_request(request(headers, target=b"/chat?room=7"))
    assert result.key == KEY
    assert result.target == b"/chat?room=7"
    assert result.path == "/chat"
    assert result.host == "chat.example.com"
    assert result.headers == headers
    assert result.origin is None
    assert result.protocols == []
    assert result.extensions == []


BAD_REQUESTS = [
    pytest.param(request(method=b"POST"), 405, {"Allow": "GET"}, id="post"),
    pytest.param(request(method=b"get"), 405, {"Allow": "GET"}, id="lowercase-get"),
    pytest.param(request(http_version=b"1.0"), 400, {}, id="http-1.0"),
    pytest.param(
        request(without(b"upgrade")),
        426,
        {"Upgrade": "websocket", "Connection": "Upgrade"},
        id="no-upgrade",
    ),
    pytest.param(
        request(replaced(b"upgrade", b"h2c")),
        426,
        {"Upgrade": "websocket", "Connection": "Upgrade"},
        id="upgrade-not-websocket",
    ),
    pytest.param(
        request(replaced(b"upgrade", b"websocket2")),
        426,
        {"Upgrade": "websocket", "Connection": "Upgrade"},
        id="upgrade-token-not-substring",
    ),
    pytest.param(request(without(b"connection")), 400, {}, id="no-connection"),
    pytest.param(
        request(replaced(b"connection", b"keep-alive")), 400, {}, id="connection-no-upgrade"
    ),
    pytest.param(
        request(replaced(b"connection", b"upgraded")), 400, {}, id="connection-token-not-substring"
    ),
    pytest.param(request(without(b"sec-websocket-version")), 400, {}, id="missing-version"),
    pytest.param(
        request(replaced(b"sec-websocket-version", b"8")),
        426,
        {"Sec-WebSocket-Version": "13"},
        id="version-8",
    ),
    pytest.param(
        request(replaced(b"sec-websocket-version", b"13, 8")),
        426,
        {"Sec-WebSocket-Version": "13"},
        id="version-list",
    ),
    pytest.param(
        request([*BASE, (b"Sec-WebSocket-Version", b"13")]),
        426,
        {"Sec-WebSocket-Version": "13"},
        id="version-twice",
    ),
    pytest.param(request(without(b"sec-websocket-key")), 400, {}, id="missing-key"),
    pytest.param(
        request(replaced(b"sec-websocket-key", b"not-base64!")), 400, {}, id="key-not-base64"
    ),
    pytest.param(
        request(replaced(b"sec-websocket-key", base64.b64encode(bytes(15)))),
        400,
        {},
        id="key-15-bytes",
    ),
    pytest.param(
        request(replaced(b"sec-websocket-key", base64.b64encode(bytes(17)))),
        400,
        {},
        id="key-17-bytes",
    ),
    pytest.param(
        request(replaced(b"sec-websocket-key", KEY.rstrip(b"="))), 400, {}, id="key-unpadded"
    ),
    pytest.param(request(replaced(b"sec-websocket-key", b"")), 400, {}, id="key-empty"),
    pytest.param(request([*BASE, (b"Sec-WebSocket-Key", KEY)]), 400, {}, id="key-twice"),
    pytest.param(
        request([*BASE, (b"Sec-WebSocket-Key", base64.b64encode(bytes(16)))]),
        400,
        {},
        id="two-keys",
    ),
    pytest.param(request([*BASE, (b"Content-Length", b"5")]), 400, {}, id="body-content-length"),
    pytest.param(request([*BASE, (b"Transfer-Encoding", b"chunked")]), 400, {}, id="body-chunked"),
    pytest.param(request(replaced(b"host", b"")), 400, {}, id="host-empty"),
    pytest.param(request(target=b"*"), 400, {}, id="target-asterisk"),
    pytest.param(request(target=b"chat"), 400, {}, id="target-relative"),
    pytest.param(
        request(target=b"http://other.example.com/chat"), 400, {}, id="target-absolute-other-host"
    ),
    pytest.param(
        request(target=b"http://chat.example.com:80/chat"), 400, {}, id="target-absolute-other-port"
    ),
    pytest.param(
        request(target=b"http://chat.example.com.evil.net/"), 400, {}, id="target-absolute-longer-host"
    ),
    pytest.param(
        request(target=b"http://user@chat.example.com/"), 400, {}, id="target-absolute-userinfo"
    ),
    pytest.param(request(target=b"ftp://chat.example.com/"), 400, {}, id="target-absolute-ftp"),
    pytest.param(request(target=b"chat.example.com:443"), 400, {}, id="target-authority-form"),
    *(
        pytest.param(request(target=target), 400, {}, id=f"dot-segment-{target.decode()}")
        for target in [
            b"/..",
            b"/.",
            b"/../../etc/passwd",
            b"/chat/./x",
            b"/chat/../admin",
            b"/chat/..?x=1",
            b"/chat/%2e%2e/admin",
            b"/chat/%2E%2E",
            b"/chat/.%2e/x",
            b"/chat/%2e./x",
            b"/chat/%2e",
            b"/chat%2f..%2fadmin",
            b"/chat%2F..",
            b"/chat\\..\\admin",
            b"/chat%5c..",
            b"http://chat.example.com/../admin",
        ]
    ),
]


@pytest.mark.parametrize(("bad", "status", "headers"), BAD_REQUESTS)
def test_client_request_rejected(bad: h11.Request, status: int, headers: dict[str, str]) -> None:
    with pytest.raises(HandshakeError) as caught:
        check_client_request(bad)
    assert caught.value.status == status
    assert dict(caught.value.headers) == headers
    assert caught.value.reason


def test_http_1_0_without_host_rejected() -> None:
    with pytest.raises(HandshakeError) as caught:
        check_client_request(request(without(b"host"), http_version=b"1.0"))
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("host_header", "host"),
    [
        (b"chat.example.com", "chat.example.com"),
        (b"chat.example.com:8443", "chat.example.com"),
        (b"Chat.Example.COM:80", "chat.example.com"),
        (b"127.0.0.1:8080", "127.0.0.1"),
        (b"[::1]", "::1"),
        (b"[::1]:8080", "::1"),
        (b"[2001:DB8::A]:443", "2001:db8::a"),
    ],
)
def test_client_request_host(host_header: bytes, host: str) -> None:
    assert check_client_request(request(replaced(b"host", host_header))).host == host


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/", "/"),
        (b"/chat", "/chat"),
        (b"/chat/room?x=1&y=2", "/chat/room"),
        (b"/?", "/"),
        (b"/a%20b", "/a%20b"),
    ],
)
def test_client_request_path(target: bytes, path: str) -> None:
    result = check_client_request(request(target=target))
    assert (result.target, result.path) == (target, path)


@pytest.mark.parametrize(
    "target",
    [b"/a..b", b"/.well-known/x", b"/x/...", b"/x/..a", b"/v1.2/", b"/%2e%2e%2e", b"/x?p=/../y", b"/x%2e"],
)
def test_dots_that_are_not_segments_pass(target: bytes) -> None:
    assert check_client_request(request(target=target)).target == target


@pytest.mark.parametrize(
    ("target", "origin_form"),
    [
        (b"http://chat.example.com/chat?x=1", b"/chat?x=1"),
        (b"https://chat.example.com/", b"/"),
        (b"WS://Chat.Example.COM/chat", b"/chat"),
        (b"wss://chat.example.com", b"/"),
        (b"http://chat.example.com?x=1", b"/?x=1"),
    ],
)
def test_absolute_form_for_the_host_becomes_origin_form(target: bytes, origin_form: bytes) -> None:
    result = check_client_request(request(target=target))
    assert (result.target, result.path) == (origin_form, origin_form.partition(b"?")[0].decode())
    assert received(build_upstream_request(result, client_ip=CLIENT_IP)).target == origin_form


def test_client_request_protocols_extensions_origin() -> None:
    result = handshake(
        (b"Sec-WebSocket-Protocol", b"chat.v2, chat.v1"),
        (b"Sec-WebSocket-Protocol", b"superchat"),
        (
            b"Sec-WebSocket-Extensions",
            b"permessage-deflate; client_max_window_bits, x-webkit-deflate-frame",
        ),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate ;server_no_context_takeover"),
        (b"Origin", b"https://chat.example.com"),
    )
    assert result.protocols == [b"chat.v2", b"chat.v1", b"superchat"]
    assert result.extensions == [
        b"permessage-deflate",
        b"x-webkit-deflate-frame",
        b"permessage-deflate",
    ]
    assert result.origin == "https://chat.example.com"


def test_client_request_index_by_lower_cased_name() -> None:
    result = handshake((b"X-Tag", b"a"), (b"Cookie", b"c=1"), (b"x-TAG", b"b"))
    assert result.by_name[b"x-tag"] == [b"a", b"b"]
    assert result.by_name[b"host"] == [b"chat.example.com"]
    assert sum(map(len, result.by_name.values())) == len(result.headers)


# ---------------------------------------------------------------- HeadReader

HEAD = (
    b"GET /chat?room=1 HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
HEAD_LINES = 5


def reader(
    max_head_size: int = 16 * 1024, max_lines: int = 100, max_target: int | None = 8 * 1024
) -> HeadReader:
    return HeadReader(max_head_size, max_lines, max_target)


def feed(head_reader: HeadReader, data: bytes, pieces: list[int]) -> bytes | None:
    """Feed `data` cut at `pieces`, as the server does; None while the head is incomplete.

    Once the head is complete, the pieces after it are the client's first frames.
    """
    result = None
    cuts = [0, *sorted(set(pieces)), len(data)]
    for start, stop in zip(cuts, cuts[1:]):
        if result is None:
            result = head_reader.receive_data(data[start:stop])
        else:
            result += data[start:stop]
    return result


def test_head_reader_returns_the_head_and_what_followed() -> None:
    head_reader = reader()
    assert head_reader.receive_data(HEAD[:-1]) is None
    assert head_reader.receive_data(HEAD[-1:] + b"\x81\x00") == HEAD + b"\x81\x00"


UPGRADE_LINE = b"Upgrade: websocket\r\n"
HEAD_REFUSALS = [
    pytest.param(HEAD.replace(b"/chat?room=1", b"/" + b"t" * 8 * 1024), {}, 414, id="target-over-limit"),
    pytest.param(
        HEAD.replace(b"/chat?room=1", b"/" + b"t" * 1024), {"max_target": 1024}, 414, id="target-1KiB"
    ),
    pytest.param(HEAD.replace(UPGRADE_LINE, b"X: %s\r\n" % (b"p" * 16 * 1024)), {}, 431, id="head-too-large"),
    pytest.param(HEAD, {"max_lines": HEAD_LINES - 1}, 431, id="too-many-lines"),
    pytest.param(HEAD.replace(UPGRADE_LINE, b"Upgrade: websocket\n"), {}, 400, id="bare-lf"),
    pytest.param(HEAD.replace(b"\r\n\r\n", b"\n\n"), {}, 400, id="bare-lf-blank-line"),
    pytest.param(HEAD.replace(UPGRADE_LINE, b"Upgrade:\r\n websocket\r\n"), {}, 400, id="obs-fold-sp"),
    pytest.param(HEAD.replace(UPGRADE_LINE, b"Upgrade:\r\n\twebsocket\r\n"), {}, 400, id="obs-fold-tab"),
    pytest.param(b"\r\n" + HEAD, {}, 400, id="leading-blank-line"),
    pytest.param(b"\x16\x03\x01\x00\xa5\x01", {}, 400, id="tls-hello"),
]


@pytest.mark.parametrize(("data", "limits", "status"), HEAD_REFUSALS)
@pytest.mark.parametrize("split", ["whole", "byte-by-byte"])
def test_head_reader_refusals(data: bytes, limits: dict[str, int], status: int, split: str) -> None:
    head_reader = reader(**limits)
    with pytest.raises(HandshakeError) as caught:
        feed(head_reader, data, [] if split == "whole" else list(range(1, len(data))))
    assert caught.value.status == status


def test_head_reader_limits_are_inclusive() -> None:
    target = b"/" + b"t" * 1023
    head = HEAD.replace(b"/chat?room=1", target)
    assert reader(max_head_size=len(head), max_lines=HEAD_LINES, max_target=1024).receive_data(head) == head
    at_limits = {"max_head_size": len(head), "max_lines": HEAD_LINES, "max_target": 1024}
    for one_less in [{"max_head_size": len(head) - 1}, {"max_lines": HEAD_LINES - 1}, {"max_target": 1023}]:
        with pytest.raises(HandshakeError):
            reader(**{**at_limits, **one_less}).receive_data(head)


def test_head_reader_refuses_a_long_target_before_its_line_ends() -> None:
    head_reader = reader(max_target=1024)
    # 1034 target bytes so far, of which " HTTP/1.1\r" might be the last 10.
    assert head_reader.receive_data(b"GET /" + b"t" * 1033) is None
    with pytest.raises(HandshakeError) as caught:
        head_reader.receive_data(b"t")
    assert caught.value.status == 414


def test_head_reader_refuses_many_lines_before_the_head_ends() -> None:
    head_reader = reader(max_lines=3)
    assert head_reader.receive_data(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n") is None
    with pytest.raises(HandshakeError) as caught:
        head_reader.receive_data(b"D: 4\r\n")
    assert caught.value.status == 431


def test_head_reader_for_a_response_ignores_the_status_line() -> None:
    head = b"HTTP/1.1 101 " + b"r" * 2000 + b"\r\nUpgrade: websocket\r\n\r\n"
    assert HeadReader(16 * 1024, 100).receive_data(head) == head


@given(
    pieces=st.lists(st.integers(min_value=1, max_value=len(HEAD) + 1), max_size=20),
    trailing=st.binary(max_size=8),
)
def test_property_head_reader_split_anywhere(pieces: list[int], trailing: bytes) -> None:
    data = HEAD + trailing
    assert feed(reader(), data, [p for p in pieces if p < len(HEAD)]) == data


@given(
    data=st.binary(max_size=300)
    | st.lists(st.sampled_from([b"\r\n", b"\n", b" ", b"\t", b"GET", b"/..", b"x:"])).map(b"".join),
    pieces=st.lists(st.integers(min_value=1, max_value=300), max_size=10),
)
def test_property_head_reader_split_does_not_change_the_verdict(data: bytes, pieces: list[int]) -> None:
    # Which rule speaks first may depend on the split; whether the head is refused may not.
    def verdict(cuts: list[int]) -> tuple[bool, bytes | None]:
        try:
            return False, feed(reader(max_head_size=1024, max_lines=8, max_target=64), data, cuts)
        except HandshakeError:
            return True, None

    assert verdict([]) == verdict([p for p in pieces if p < len(data)])


# ---------------------------------------------------------------- check_origin


@pytest.mark.parametrize(
    ("allowed", "origin", "ok"),
    [
        pytest.param(None, b"https://evil.example", True, id="none-allows-all"),
        pytest.param(None, None, True, id="none-no-origin"),
        pytest.param(["https://chat.example.com"], None, True, id="missing-origin-passes"),
        pytest.param([], None, True, id="empty-list-missing-origin"),
        pytest.param(["https://chat.example.com"], b"https://chat.example.com", True, id="listed"),
        pytest.param(
            ["https://a.example", "https://chat.example.com"],
            b"https://chat.example.com",
            True,
            id="second",
        ),
        pytest.param(
            ["https://chat.example.com"], b"HTTPS://Chat.Example.COM", True, id="origin-case"
        ),
        pytest.param(
            ["https://CHAT.example.com"], b"https://chat.example.com", True, id="allowed-case"
        ),
        pytest.param(["null"], b"null", True, id="null-origin"),
        pytest.param(["https://chat.example.com"], b"https://evil.example", False, id="other"),
        pytest.param(
            ["https://chat.example.com"], b"http://chat.example.com", False, id="other-scheme"
        ),
        pytest.param(
            ["https://chat.example.com"], b"https://chat.example.com:8443", False, id="other-port"
        ),
        pytest.param(
            ["https://chat.example.com"], b"https://evilchat.example.com", False, id="not-suffix"
        ),
        pytest.param(["https://chat.example.com"], b"null", False, id="null-not-listed"),
        pytest.param([], b"https://chat.example.com", False, id="empty-list"),
    ],
)
def test_check_origin(allowed: list[str] | None, origin: bytes | None, ok: bool) -> None:
    result = handshake(*([(b"Origin", origin)] if origin is not None else []))
    if ok:
        check_origin(result, allowed)
    else:
        with pytest.raises(HandshakeError) as caught:
            check_origin(result, allowed)
        assert caught.value.status == 403


# ---------------------------------------------------------------- build_upstream_request


def test_upstream_request_line() -> None:
    sent = upstream(target=b"/chat/room?x=1&y=%20")
    assert (sent.method, sent.target, sent.http_version) == (
        b"GET",
        b"/chat/room?x=1&y=%20",
        b"1.1",
    )


def test_upstream_end_to_end_headers_kept_in_order() -> None:
    extra = [
        (b"Origin", b"https://chat.example.com"),
        (b"Cookie", b"session=abc"),
        (b"Authorization", b"Bearer token"),
        (b"Sec-WebSocket-Protocol", b"chat.v1, chat.v2"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits"),
        (b"X-Custom", b"1"),
        (b"Cookie", b"other=def"),
    ]
    headers = raw(upstream(*extra))
    expected = [h for h in [*BASE, *extra] if h[0].lower() not in HOP_BY_HOP]
    assert headers[: len(expected)] == expected
    assert lower_names(headers[len(expected) :]) == GATEWAY_SET


def test_upstream_header_name_case_preserved() -> None:
    sent = received(build_upstream_request(
        check_client_request(
            request(
                [
                    (b"hOsT", b"chat.example.com"),
                    (b"upgrade", b"websocket"),
                    (b"CONNECTION", b"upgrade"),
                    (b"sec-websocket-key", KEY),
                    (b"SEC-WEBSOCKET-VERSION", b"13"),
                    (b"x-MiXeD", b"v"),
                ]
            )
        ),
        client_ip=CLIENT_IP,
        host="chat.internal",
    ))
    assert raw(sent)[:4] == [
        (b"hOsT", b"chat.internal"),
        (b"sec-websocket-key", KEY),
        (b"SEC-WEBSOCKET-VERSION", b"13"),
        (b"x-MiXeD", b"v"),
    ]


@pytest.mark.parametrize(
    "hop",
    [
        pytest.param((b"Keep-Alive", b"timeout=5"), id="keep-alive"),
        pytest.param((b"Proxy-Connection", b"keep-alive"), id="proxy-connection"),
        pytest.param((b"TE", b"trailers"), id="te"),
        pytest.param((b"Trailer", b"X-Checksum"), id="trailer"),
        pytest.param((b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="), id="proxy-authorization"),
        pytest.param((b"proxy-anything", b"1"), id="proxy-star"),
        pytest.param((b"Connection", b"keep-alive"), id="extra-connection"),
        pytest.param((b"Upgrade", b"h2c"), id="extra-upgrade"),
    ],
)
def test_upstream_hop_by_hop_removed(hop: tuple[bytes, bytes]) -> None:
    headers = raw(upstream(hop, (b"X-After", b"kept")))
    assert hop not in headers
    assert values(headers, b"connection") == [b"Upgrade"]
    assert values(headers, b"upgrade") == [b"websocket"]
    assert values(headers, b"x-after") == [b"kept"]


def test_upstream_transfer_encoding_removed() -> None:
    # check_client_request refuses a body; the rule still holds for any handshake.
    base = handshake()
    chunked = dataclasses.replace(base, headers=[*base.headers, (b"Transfer-Encoding", b"chunked")])
    assert b"transfer-encoding" not in lower_names(
        raw(received(build_upstream_request(chunked, client_ip=CLIENT_IP)))
    )


def test_upstream_headers_named_in_connection_removed() -> None:
    sent = upstream(
        (b"Connection", b"X-Secret, x-other"),
        (b"X-Secret", b"s"),
        (b"X-Other", b"o"),
        (b"X-Kept", b"k"),
    )
    names = lower_names(raw(sent))
    assert b"x-secret" not in names
    assert b"x-other" not in names
    assert b"x-kept" in names


@pytest.mark.parametrize("name", sorted(HANDSHAKE_CRITICAL))
def test_upstream_connection_cannot_strip_handshake_headers(name: bytes) -> None:
    # Naming them in Connection would leave the backend a request that is no upgrade at all.
    sent = upstream((b"Connection", name))
    again = check_client_request(sent)
    assert again.key == KEY
    assert values(raw(sent), name) == values(BASE, name)


def test_upstream_connection_and_upgrade_set() -> None:
    headers = raw(upstream((b"Connection", b"keep-alive, Upgrade")))
    assert values(headers, b"connection") == [b"Upgrade"]
    assert values(headers, b"upgrade") == [b"websocket"]


@pytest.mark.parametrize(
    "client_values",
    [
        pytest.param([], id="none"),
        pytest.param([(b"X-Forwarded-For", b"198.51.100.1")], id="one"),
        pytest.param(
            [(b"X-Forwarded-For", b"198.51.100.1, 198.51.100.2"), (b"x-forwarded-for", b"198.51.100.3")],
            id="several-headers",
        ),
        pytest.param([(b"Forwarded", b"for=198.51.100.1")], id="forwarded"),
    ],
)
@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        pytest.param(None, CLIENT_IP.encode(), id="client-alone"),
        pytest.param(
            [CLIENT_IP, "10.0.0.2", "10.0.0.1"], CLIENT_IP.encode() + b", 10.0.0.2, 10.0.0.1", id="chain"
        ),
    ],
)
def test_upstream_x_forwarded_for_is_the_chain_given(
    client_values: Headers, chain: list[str] | None, expected: bytes
) -> None:
    # What the client says is not passed on: the gateway decides what it believes (forwarding).
    headers = raw(upstream(*client_values, forwarded_for=chain))
    assert values(headers, b"x-forwarded-for") == [expected]
    assert values(headers, b"forwarded") == []


def test_upstream_x_forwarded_for_ipv6() -> None:
    sent = received(build_upstream_request(handshake(), client_ip="2001:db8::7"))
    assert values(raw(sent), b"x-forwarded-for") == [b"2001:db8::7"]
    assert values(raw(sent), b"x-real-ip") == [b"2001:db8::7"]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_upstream_forwarding_headers_replace_client_values(scheme: str) -> None:
    headers = raw(
        upstream(
            (b"X-Real-IP", b"10.6.6.6"),
            (b"x-forwarded-proto", b"gopher"),
            (b"X-Forwarded-Host", b"evil.example"),
            (b"X-REAL-IP", b"10.7.7.7"),
            scheme=scheme,
        )
    )
    assert values(headers, b"x-real-ip") == [CLIENT_IP.encode()]
    assert values(headers, b"x-forwarded-proto") == [scheme.encode()]
    assert values(headers, b"x-forwarded-host") == [b"chat.example.com"]


@pytest.mark.parametrize(
    ("client_host", "override", "sent_host"),
    [
        pytest.param(b"chat.example.com:8443", None, b"chat.example.com:8443", id="kept-with-port"),
        pytest.param(b"Chat.Example.com", None, b"Chat.Example.com", id="kept-verbatim"),
        pytest.param(
            b"chat.example.com:8443", "chat.internal:8000", b"chat.internal:8000", id="rewritten"
        ),
    ],
)
def test_upstream_host(client_host: bytes, override: str | None, sent_host: bytes) -> None:
    result = check_client_request(request(replaced(b"host", client_host)))
    headers = raw(received(build_upstream_request(result, client_ip=CLIENT_IP, host=override)))
    assert headers[0] == (b"Host", sent_host)  # same place as the client's
    assert values(headers, b"host") == [sent_host]
    assert values(headers, b"x-forwarded-host") == [client_host]


@pytest.mark.parametrize("strip", [False, True])
def test_upstream_strip_extensions(strip: bool) -> None:
    offer = (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits")
    headers = raw(upstream(offer, (b"Sec-WebSocket-Protocol", b"chat"), strip_extensions=strip))
    assert (offer in headers) is not strip
    assert (b"Sec-WebSocket-Protocol", b"chat") in headers


@pytest.mark.parametrize("strip", [False, True])
def test_upstream_offer(strip: bool) -> None:
    offer = offer_of(
        (b"Sec-WebSocket-Protocol", b"chat.v1, Chat.V2"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits, X-Webkit-Deflate-Frame"),
        strip_extensions=strip,
    )
    assert offer.key == KEY
    assert offer.protocols == [b"chat.v1", b"Chat.V2"]
    assert offer.extensions == ([] if strip else [b"permessage-deflate", b"x-webkit-deflate-frame"])


def test_upstream_offer_is_what_was_sent_when_connection_names_the_offers() -> None:
    # A client that lists them in Connection has them dropped: the backend was offered nothing.
    extra = (
        (b"Connection", b"Sec-WebSocket-Protocol, Sec-WebSocket-Extensions"),
        (b"Sec-WebSocket-Protocol", b"chat"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
    )
    names = lower_names(raw(upstream(*extra)))
    assert b"sec-websocket-protocol" not in names and b"sec-websocket-extensions" not in names
    offer = offer_of(*extra)
    assert (offer.protocols, offer.extensions) == ([], [])
    answers = [(b"Sec-WebSocket-Protocol", b"chat"), (b"Sec-WebSocket-Extensions", b"permessage-deflate")]
    for answer in answers:
        with pytest.raises(BackendUnavailable):
            check_backend_response(switching(answer), offer)


def _h11_refuses(value: bytes) -> bool:
    try:
        h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"h"), (b"X-Value", value)])
    except h11.LocalProtocolError:
        return True
    return False


SET_VALUES = [
    "CN=alice,O=Example Corp",
    "CN=a\tb",
    "CN=a\x01b",
    "CN=a\x1fb",
    "CN=\u00e9l\u00e8ve",
    "CN=a\r\nX-Injected: 1",
    "CN=a\nX-Injected: 1",
    "CN=a\rb",
    "CN=a\x00b",
    "CN=a\x0bb",
    "CN=a\x0cb",
    " CN=a",
    "CN=a ",
    "",
]


@pytest.mark.parametrize("value", SET_VALUES)
def test_upstream_values_set_here_are_held_to_h11s_grammar(value: str) -> None:
    # The gateway once sent the request through h11, which refused what could split a header;
    # the values the gateway adds are refused in the same cases, with ValueError.
    for where, name, encoding in [
        ("client_cert_subject", b"x-client-cert-subject", "utf-8"),
        ("host", b"host", "latin-1"),  # the config refuses an empty one
    ]:
        refused = _h11_refuses(value.encode(encoding))
        try:
            built, _ = upstream_request(**{where: value})
        except ValueError:
            assert refused, (where, value)
            continue
        assert not refused, (where, value)
        assert values(raw(received((built, offer_of()))), name) == [value.encode(encoding)]


# ---------------------------------------------------------------- check_backend_response


def test_backend_minimal() -> None:
    negotiated = check_backend_response(switching(), offer_of())
    assert negotiated.subprotocol is None
    assert negotiated.extensions == []
    assert not negotiated.deflate


def test_backend_token_case() -> None:
    response = h11.InformationalResponse(
        status_code=101,
        headers=[
            (b"upgrade", b"WebSocket"),
            (b"connection", b"keep-alive, upgrade"),
            (b"sec-websocket-accept", ACCEPT),
        ],
    )
    assert check_backend_response(response, offer_of()).subprotocol is None


@pytest.mark.parametrize(
    ("response", "offer"),
    [
        pytest.param(h11.InformationalResponse(status_code=100, headers=[]), [], id="status-100"),
        pytest.param(switching(accept=None), [], id="accept-missing"),
        pytest.param(
            switching(accept=accept_key(b"x3JJHMbDL1EzLkh9GBhXDw==")), [], id="accept-wrong"
        ),
        pytest.param(switching(accept=KEY), [], id="accept-is-the-key"),
        pytest.param(switching((b"Sec-WebSocket-Accept", ACCEPT)), [], id="accept-duplicated"),
        pytest.param(
            h11.InformationalResponse(
                status_code=101,
                headers=[(b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", ACCEPT)],
            ),
            [],
            id="no-upgrade",
        ),
        pytest.param(
            h11.InformationalResponse(
                status_code=101,
                headers=[
                    (b"Upgrade", b"websocket"),
                    (b"Connection", b"keep-alive"),
                    (b"Sec-WebSocket-Accept", ACCEPT),
                ],
            ),
            [],
            id="no-connection-upgrade",
        ),
        pytest.param(
            switching((b"Sec-WebSocket-Protocol", b"chat")), [], id="protocol-none-offered"
        ),
        pytest.param(
            switching((b"Sec-WebSocket-Protocol", b"chat.v3")),
            [(b"Sec-WebSocket-Protocol", b"chat.v1, chat.v2")],
            id="protocol-not-offered",
        ),
        pytest.param(
            switching((b"Sec-WebSocket-Protocol", b"chat.v1, chat.v2")),
            [(b"Sec-WebSocket-Protocol", b"chat.v1, chat.v2")],
            id="protocol-two-in-one-header",
        ),
        pytest.param(
            switching(
                (b"Sec-WebSocket-Protocol", b"chat.v1"), (b"Sec-WebSocket-Protocol", b"chat.v2")
            ),
            [(b"Sec-WebSocket-Protocol", b"chat.v1, chat.v2")],
            id="protocol-two-headers",
        ),
        pytest.param(
            switching((b"Sec-WebSocket-Extensions", b"permessage-deflate")),
            [],
            id="extension-none-offered",
        ),
        pytest.param(
            switching((b"Sec-WebSocket-Extensions", b"x-webkit-deflate-frame")),
            [(b"Sec-WebSocket-Extensions", b"permessage-deflate")],
            id="extension-not-offered",
        ),
        pytest.param(
            switching((b"Sec-WebSocket-Extensions", b"permessage-deflate, x-webkit-deflate-frame")),
            [(b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits")],
            id="extension-one-of-two-not-offered",
        ),
        pytest.param(switching((b"Content-Length", b"0")), [], id="content-length"),
        pytest.param(switching((b"Content-Length", b"12")), [], id="content-length-nonzero"),
        pytest.param(switching((b"Transfer-Encoding", b"chunked")), [], id="transfer-encoding"),
    ],
)
def test_backend_response_rejected(response: h11.InformationalResponse, offer: Headers) -> None:
    with pytest.raises(BackendUnavailable) as caught:
        check_backend_response(response, offer_of(*offer))
    assert caught.value.status == 502
    assert caught.value.reason


def test_backend_extension_after_strip_rejected() -> None:
    # compression: strip removed the client's offer; a backend that compresses anyway is broken.
    sent = offer_of((b"Sec-WebSocket-Extensions", b"permessage-deflate"), strip_extensions=True)
    with pytest.raises(BackendUnavailable):
        check_backend_response(
            switching((b"Sec-WebSocket-Extensions", b"permessage-deflate")), sent
        )


@pytest.mark.parametrize(
    ("offered", "chosen", "subprotocol"),
    [
        pytest.param(b"chat.v1, chat.v2", b"chat.v2", b"chat.v2", id="second-offer"),
        pytest.param(b"chat.v1", b"chat.v1", b"chat.v1", id="only-offer"),
        pytest.param(b"chat.v1, chat.v2", None, None, id="none-chosen"),
    ],
)
def test_backend_subprotocol(
    offered: bytes, chosen: bytes | None, subprotocol: bytes | None
) -> None:
    extra = [(b"Sec-WebSocket-Protocol", chosen)] if chosen is not None else []
    negotiated = check_backend_response(
        switching(*extra), offer_of((b"Sec-WebSocket-Protocol", offered))
    )
    assert negotiated.subprotocol == subprotocol
    assert values(negotiated.headers, b"sec-websocket-protocol") == ([chosen] if chosen else [])


@pytest.mark.parametrize(
    ("offered", "accepted", "extensions"),
    [
        pytest.param(b"permessage-deflate", None, [], id="offered-not-accepted"),
        pytest.param(
            b"permessage-deflate", b"permessage-deflate", [b"permessage-deflate"], id="plain"
        ),
        pytest.param(
            b"permessage-deflate; client_max_window_bits",
            b"permessage-deflate; server_no_context_takeover; client_max_window_bits=15",
            [b"permessage-deflate"],
            id="with-params",
        ),
        pytest.param(
            b"permessage-deflate; client_max_window_bits, x-webkit-deflate-frame",
            b"x-webkit-deflate-frame",
            [b"x-webkit-deflate-frame"],
            id="other-extension",
        ),
    ],
)
def test_backend_extensions(
    offered: bytes, accepted: bytes | None, extensions: list[bytes]
) -> None:
    extra = [(b"Sec-WebSocket-Extensions", accepted)] if accepted is not None else []
    negotiated = check_backend_response(
        switching(*extra), offer_of((b"Sec-WebSocket-Extensions", offered))
    )
    assert negotiated.extensions == extensions
    assert negotiated.deflate is (b"permessage-deflate" in extensions)
    # The backend's answer reaches the client verbatim, parameters and all.
    assert values(negotiated.headers, b"sec-websocket-extensions") == (
        [accepted] if accepted else []
    )


@pytest.mark.parametrize(
    ("extensions", "deflate"),
    [([], False), ([b"x-webkit-deflate-frame"], False), ([b"permessage-deflate"], True)],
)
def test_negotiated_deflate(extensions: list[bytes], deflate: bool) -> None:
    assert Negotiated(headers=[], subprotocol=None, extensions=extensions).deflate is deflate


def test_backend_relayed_headers() -> None:
    response = h11.InformationalResponse(
        status_code=101,
        headers=[
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade, X-Backend-Hop"),
            (b"Sec-WebSocket-Accept", ACCEPT),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Backend-Hop", b"secret"),
            (b"Set-Cookie", b"a=1; Path=/"),
            (b"X-Backend-Id", b"b-2"),
            (b"Set-Cookie", b"b=2; HttpOnly"),
            (b"Proxy-Connection", b"keep-alive"),
        ],
    )
    negotiated = check_backend_response(response, offer_of())
    assert negotiated.headers == [
        (b"Sec-WebSocket-Accept", ACCEPT),
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"X-Backend-Id", b"b-2"),
        (b"Set-Cookie", b"b=2; HttpOnly"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
    ]


# ---------------------------------------------------------------- rendering


def test_render_switching_protocols_parses() -> None:
    response = switching((b"Sec-WebSocket-Protocol", b"chat"), (b"Set-Cookie", b"a=1"))
    negotiated = check_backend_response(response, offer_of((b"Sec-WebSocket-Protocol", b"chat")))
    events, body, client = read_reply(render_switching_protocols(negotiated) + b"\x81\x02hi")
    (event,) = events
    assert isinstance(event, h11.InformationalResponse)
    assert event.status_code == 101
    assert raw(event) == negotiated.headers
    assert client.their_state is h11.SWITCHED_PROTOCOL
    # The head ends exactly where the first frame starts.
    assert client.trailing_data == (b"\x81\x02hi", False)


@pytest.mark.parametrize(("bad", "status", "headers"), BAD_REQUESTS)
def test_render_rejection_parses(bad: h11.Request, status: int, headers: dict[str, str]) -> None:
    with pytest.raises(HandshakeError) as caught:
        check_client_request(bad)
    events, body, client = read_reply(render_rejection(caught.value))
    response = events[0]
    assert isinstance(response, h11.Response)
    assert response.status_code == status
    got = [(n.decode(), v.decode()) for n, v in raw(response)]
    # A 426 also says Connection: Upgrade (RFC 9110 7.8), in the one Connection header.
    connection = [v for n, v in got if n.lower() == "connection"]
    wanted = headers.get("Connection")
    assert connection == [f"{wanted}, close" if wanted else "close"]
    assert all(item in got for item in headers.items() if item[0] != "Connection")
    assert ("Content-Type", "text/plain; charset=utf-8") in got
    assert body == (caught.value.reason + "\n").encode()
    assert isinstance(events[-1], h11.EndOfMessage)
    assert client.their_state is h11.MUST_CLOSE


@pytest.mark.parametrize(
    ("status", "reason"),
    [(403, b"Forbidden"), (502, b"Bad Gateway"), (503, b"Service Unavailable"), (599, b"Unknown")],
)
def test_render_error_parses(status: int, reason: bytes) -> None:
    events, body, client = read_reply(
        render_error(status, "busy — try later", [("Retry-After", "1")])
    )
    response = events[0]
    assert isinstance(response, h11.Response)
    assert (response.status_code, response.reason) == (status, reason)
    assert values(raw(response), b"retry-after") == [b"1"]
    assert values(raw(response), b"content-length") == [str(len(body)).encode()]
    assert body == "busy — try later\n".encode()
    assert client.their_state is h11.MUST_CLOSE


def test_a_rejection_is_rendered_once_for_every_error_that_says_the_same() -> None:
    first = render_rejection(HandshakeError(429, "slow down", [("Retry-After", "1")]))
    again = render_rejection(HandshakeError(429, "slow down", [("Retry-After", "1")]))
    assert again is first  # the bytes of the first, not a new rendering
    other = render_rejection(HandshakeError(429, "slow down", [("Retry-After", "2")]))
    assert other != first and b"Retry-After: 2\r\n" in other


@pytest.mark.parametrize(
    ("reason", "sent_reason"),
    [(b"Custom Reason", b"Custom Reason"), (b"", b"Unauthorized")],
)
def test_render_backend_reply_parses(reason: bytes, sent_reason: bytes) -> None:
    response = h11.Response(
        status_code=401,
        reason=reason,
        headers=[
            (b"WWW-Authenticate", b'Bearer realm="chat"'),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Hop", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Set-Cookie", b"a=1"),
        ],
    )
    body = b'{"error": "login first"}'
    events, got_body, client = read_reply(render_backend_reply(response, body))
    relayed = events[0]
    assert isinstance(relayed, h11.Response)
    assert (relayed.status_code, relayed.reason) == (401, sent_reason)
    assert raw(relayed) == [
        (b"WWW-Authenticate", b'Bearer realm="chat"'),
        (b"Set-Cookie", b"a=1"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
    ]
    assert got_body == body
    assert client.their_state is h11.MUST_CLOSE


def test_render_backend_reply_recounts_content_length() -> None:
    # The body may have been cut; the declared length must match what is sent.
    response = h11.Response(status_code=500, headers=[(b"Content-Length", b"999999")])
    events, body, client = read_reply(render_backend_reply(response, b"cut"))
    assert values(raw(events[0]), b"content-length") == [b"3"]
    assert body == b"cut"


# ---------------------------------------------------------------- properties

# h11's field-vchar is any byte but NUL and whitespace; values may hold inner SP/HTAB.
_VCHAR = rb"[\x01-\x08\x0e-\x1f\x21-\xff]"
_RANDOM_VALUE = st.from_regex(rb"(?:%s+(?:[ \t]+%s+)*)?" % (_VCHAR, _VCHAR), fullmatch=True)
_RANDOM_NAME = st.from_regex(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+", fullmatch=True)

_NAMES = [
    *sorted(HOP_BY_HOP - {b"transfer-encoding"}),
    b"proxy-authorization",
    b"proxy-x",
    b"x-forwarded-for",
    b"forwarded",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-real-ip",
    b"origin",
    b"cookie",
    b"sec-websocket-protocol",
    b"sec-websocket-extensions",
    b"x-custom",
]
# Content-Length, Transfer-Encoding, Host and a second key or version make the
# request one that h11 or check_client_request refuses; the tables cover them.
_UNSAFE = {
    b"content-length",
    b"transfer-encoding",
    b"host",
    b"sec-websocket-key",
    b"sec-websocket-version",
}


def _any_case(name: bytes) -> st.SearchStrategy[bytes]:
    flips = st.lists(st.booleans(), min_size=len(name), max_size=len(name))
    return flips.map(
        lambda fs: b"".join(
            name[i : i + 1].upper() if f else name[i : i + 1] for i, f in enumerate(fs)
        )
    )


_CONNECTION_TOKENS = st.lists(
    st.sampled_from([*_NAMES, *sorted(HANDSHAKE_CRITICAL), b"upgrade", b"x-unlisted"]).flatmap(
        _any_case
    ),
    max_size=4,
).map(b", ".join)

_EXTRA_HEADER = st.one_of(
    st.tuples(st.just(b"Connection"), _CONNECTION_TOKENS),
    st.tuples(st.sampled_from(_NAMES).flatmap(_any_case), _RANDOM_VALUE),
    st.tuples(_RANDOM_NAME.filter(lambda n: n.lower() not in _UNSAFE), _RANDOM_VALUE),
)


@given(
    extra=st.lists(_EXTRA_HEADER, max_size=12),
    data=st.data(),
    client_ip=st.sampled_from([CLIENT_IP, "2001:db8::7", "127.0.0.1"]),
    scheme=st.sampled_from(["http", "https"]),
    host=st.sampled_from([None, "chat.internal:8000"]),
    strip=st.booleans(),
)
def test_property_upstream_headers(
    extra: Headers, data: st.DataObject, client_ip: str, scheme: str, host: str | None, strip: bool
) -> None:
    headers = data.draw(st.permutations([*BASE, *extra]))
    result = check_client_request(request(headers))
    built, offer = build_upstream_request(
        result, client_ip=client_ip, scheme=scheme, host=host, strip_extensions=strip
    )
    sent = received((built, offer))
    out = raw(sent)
    names = lower_names(out)

    named = {t for n, v in headers if n.lower() == b"connection" for t in tokens(v)}
    # What the gateway sets is never forwarded from the client, and set once.
    for name in GATEWAY_SET:
        assert names.count(name) == 1
    assert names[-len(GATEWAY_SET) :] == GATEWAY_SET
    assert values(out, b"connection") == [b"Upgrade"]
    assert values(out, b"upgrade") == [b"websocket"]
    assert values(out, b"x-real-ip") == [client_ip.encode()]
    # No other hop-by-hop header, Proxy-*, or header the client named in Connection.
    forwarded = names[: -len(GATEWAY_SET)]
    for name in forwarded:
        assert name not in HOP_BY_HOP
        assert not name.startswith(b"proxy-")
        assert name not in named or name in HANDSHAKE_CRITICAL

    # Every other header, in order, untouched except Host.
    # Forwarded is the client's word on its address: dropped, never set.
    drop = HOP_BY_HOP | set(GATEWAY_SET) | {b"forwarded"} | (named - HANDSHAKE_CRITICAL)
    if strip:
        drop.add(b"sec-websocket-extensions")
    kept = [
        (n, host.encode() if host is not None and n.lower() == b"host" else v)
        for n, v in headers
        if n.lower() not in drop and not n.lower().startswith(b"proxy-")
    ]
    # Host goes first on the wire (RFC 9112 3.2).
    assert out[: -len(GATEWAY_SET)] == sorted(kept, key=lambda header: header[0].lower() != b"host")

    assert values(out, b"x-forwarded-for") == [client_ip.encode()]

    # Byte for byte what h11 writes for the same request, as the gateway once sent it through h11.
    gateway_set = [
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"X-Forwarded-For", client_ip.encode()),
        (b"X-Forwarded-Proto", scheme.encode()),
        (b"X-Forwarded-Host", values(headers, b"host")[0]),
        (b"X-Real-IP", client_ip.encode()),
    ]
    reference = h11.Request(method=b"GET", target=result.target, headers=[*kept, *gateway_set])
    assert built == h11.Connection(h11.CLIENT).send(reference)

    # The offer is what the request says.
    assert offer.key == KEY
    assert offer.protocols == [
        t.strip() for v in values(out, b"sec-websocket-protocol") for t in v.split(b",") if t.strip()
    ]
    assert offer.extensions == [
        t.split(b";")[0].strip() for v in values(out, b"sec-websocket-extensions") for t in tokens(v)
    ]

    # The backend gets a valid upgrade with the client's key.
    again = check_client_request(sent)
    assert again.key == KEY
    assert again.target == result.target


_VALID = [
    *BASE,
    (b"Origin", b"https://chat.example.com"),
    (b"Sec-WebSocket-Protocol", b"chat.v1, chat.v2"),
    (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits"),
]
_INTERESTING_VALUES = st.sampled_from(
    [
        b"",
        b"0",
        b"5",
        b"13",
        b"8",
        b"13, 13",
        b"websocket",
        b"WebSocket, h2c",
        b"Upgrade",
        b"keep-alive",
        b"Upgrade, Sec-WebSocket-Key",
        b"Upgrade, Host, Sec-WebSocket-Version",
        b"chunked",
        KEY,
        KEY.rstrip(b"="),
        base64.b64encode(bytes(15)),
        base64.b64encode(bytes(16)),
        b"AAAAAAAAAAAAAAAAAAAAAA==\xff",
        b"[::1]:8080",
        b"[::1",
        b"chat.example.com:",
        b"\xff\xfe",
    ]
)
_MUTATION = st.tuples(
    st.sampled_from(["drop", "duplicate", "alter", "insert"]),
    st.integers(min_value=0, max_value=63),
    st.one_of(_INTERESTING_VALUES, _RANDOM_VALUE),
    st.one_of(st.sampled_from([n for n, _ in _VALID]).flatmap(_any_case), _RANDOM_NAME),
)


def _mutate(headers: Headers, mutations: list[tuple[str, int, bytes, bytes]]) -> Headers:
    headers = list(headers)
    for kind, index, value, name in mutations:
        if kind == "insert":
            headers.insert(index % (len(headers) + 1), (name, value))
            continue
        if not headers:
            continue
        i = index % len(headers)
        if kind == "drop":
            del headers[i]
        elif kind == "duplicate":
            headers.insert(i, headers[i])
        else:
            headers[i] = (headers[i][0], value)
    return headers


@given(
    mutations=st.lists(_MUTATION, min_size=1, max_size=6),
    method=st.sampled_from([b"GET", b"GET", b"GET", b"POST", b"get"]),
    target=st.sampled_from([b"/chat", b"/chat?room=1", b"/", b"*", b"chat", b"http://h/x"]),
    http_version=st.sampled_from([b"1.1", b"1.1", b"1.0"]),
)
def test_property_mutated_requests(
    mutations: list[tuple[str, int, bytes, bytes]],
    method: bytes,
    target: bytes,
    http_version: bytes,
) -> None:
    headers = _mutate(_VALID, mutations)
    try:
        mutated = request(headers, method=method, target=target, http_version=http_version)
    except h11.LocalProtocolError:
        reject()  # h11 itself would have refused it (two Hosts, a bad Content-Length, ...)
    try:
        result = check_client_request(mutated)
    except HandshakeError as exc:
        event(f"rejected {exc.status}")
        assert exc.status in (400, 405, 426)
        assert render_rejection(exc).startswith(b"HTTP/1.1 %d " % exc.status)
        return
    event("accepted")
    assert len(base64.b64decode(result.key, validate=True)) == 16
    assert result.path.startswith("/")
    # Whatever passed makes a valid upgrade for the backend, with the same key.
    sent = received(build_upstream_request(result, client_ip=CLIENT_IP))
    assert check_client_request(sent).key == result.key


def test_backend_subprotocol_compares_case_sensitively() -> None:
    sent = offer_of((b"Sec-WebSocket-Protocol", b"chat"))
    with pytest.raises(BackendUnavailable):
        check_backend_response(switching((b"Sec-WebSocket-Protocol", b"Chat")), sent)
