"""The sans-I/O translation of HTTP/2 requests to HTTP/1.1 heads and back (wsgate.extended_connect)."""

from __future__ import annotations

import pytest

from wsgate.errors import HandshakeError
from wsgate.extended_connect import request_head, response_headers, websocket_key

KEY = websocket_key(bytes(range(16)))
CONNECT = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
           (b":path", b"/chat?room=1"), (b":authority", b"example.test:8443")]


def test_an_extended_connect_becomes_an_upgrade_with_the_gateway_s_key():
    head, upgrade = request_head(
        CONNECT + [(b"sec-websocket-version", b"13"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
                   (b"sec-websocket-key", b"client's"), (b"te", b"trailers")],
        KEY,
    )
    assert upgrade
    assert head == (
        b"GET /chat?room=1 HTTP/1.1\r\nHost: example.test:8443\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\ncookie: a=1; b=2\r\n"
        b"sec-websocket-version: 13\r\n\r\n"
    )
    assert KEY == b"AAECAwQFBgcICQoLDA0ODw=="


def test_a_plain_get_stays_a_get():
    head, upgrade = request_head([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                                  (b":authority", b"a.test")], KEY)
    assert not upgrade and head == b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"


@pytest.mark.parametrize(
    "change",
    [
        [(b"x-a", b"1\r\nx-b: 2")],
        [(b"x-a", b"1\x00")],
        [(b"X-A", b"1")],
        [(b"x a", b"1")],
        [(b"", b"1")],
        [(b"x-a", b"1"), (b":method", b"GET")],  # a pseudo-header after a header
        [(b":status", b"200")],
        [(b":path", b"/again")],
    ],
)
def test_what_could_split_or_confuse_the_head_is_refused(change):
    with pytest.raises(HandshakeError) as refused:
        request_head(CONNECT + change, KEY)
    assert refused.value.status == 400


@pytest.mark.parametrize(
    "name, value",
    [(b":path", b"/a b"), (b":path", b"no-slash"), (b":authority", b"a\r\nb"), (b":authority", b""),
     (b":protocol", b"h2c"), (b":scheme", b"ftp"), (b":method", b"get ")],
)
def test_bad_pseudo_header_values_are_refused(name, value):
    headers = [(n, value if n == name else v) for n, v in CONNECT]
    with pytest.raises(HandshakeError):
        request_head(headers, KEY)


def test_a_101_becomes_200_without_the_upgrade_s_own_headers():
    status, headers = response_headers(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: x\r\nSec-WebSocket-Protocol: chat.v2\r\n\r\n"
    )
    assert status == 200 and headers == [(b":status", b"200"), (b"sec-websocket-protocol", b"chat.v2")]


def test_a_refusal_keeps_its_status_and_end_to_end_headers():
    status, headers = response_headers(
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: 4\r\n\r\n"
    )
    assert status == 404
    assert headers == [(b":status", b"404"), (b"content-type", b"text/plain"), (b"content-length", b"4")]
