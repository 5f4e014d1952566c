"""HTTP/2 requests as HTTP/1.1 request heads, and HTTP/1.1 reply heads as HTTP/2 responses.

Sans-I/O: the HTTP/2 shell (http2.py) turns each stream's request into the
HTTP/1.1 head that the upgrade phase already knows how to answer, and that
phase's reply back into an HTTP/2 response. An RFC 8441 extended CONNECT
(`:method CONNECT`, `:protocol websocket`) becomes a GET with Upgrade and a
Sec-WebSocket-Key made by the gateway: an HTTP/2 client sends none. Any other
request becomes the same request without a body (a page, a 404, a 426).

Nothing a client sent reaches the HTTP/1.1 text unchecked: names must be
lowercase tokens, values field values, the path and authority plain visible
characters, so no CR, LF or NUL can split the head it is written into.
"""

from __future__ import annotations

import base64
import re

from .errors import HandshakeError
from .heads import is_field_value

Headers = list[tuple[bytes, bytes]]

_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-z]+")
_METHOD = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Z]+")
# origin-form: a visible ASCII byte string from "/", or "*" (OPTIONS).
_PATH = re.compile(rb"/[\x21-\x7e]*|\*")
# host[:port], with IPv6 literals: RFC 3986's reg-name and IP-literal characters, no userinfo.
_AUTHORITY = re.compile(rb"[A-Za-z0-9._~!$&'()*+,;=:%\[\]-]+")

# Request headers that belong to HTTP/1.1's connection or framing, or that the gateway sets itself.
_DROPPED = frozenset(
    {
        b"host",
        b"connection",
        b"upgrade",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"content-length",
        b"te",
        b"sec-websocket-key",
    }
)
# Reply headers that are HTTP/1.1's alone (RFC 9113 8.2.2), and the 101's own.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
_SWITCHING_ONLY = _HOP_BY_HOP | {b"sec-websocket-accept"}
# A request's pseudo-headers (RFC 9113 8.3.1, RFC 8441 4); any other makes it malformed.
_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority", b":protocol"})


def websocket_key(random16: bytes) -> bytes:
    """A Sec-WebSocket-Key for the backend, from 16 random bytes."""
    assert len(random16) == 16
    return base64.b64encode(random16)


def request_head(headers: Headers, key: bytes) -> tuple[bytes, bool]:
    """(the HTTP/1.1 request head, whether it is a WebSocket upgrade) for an HTTP/2 request.

    `headers` is the stream's header block as bytes, pseudo-headers first; `key` the
    Sec-WebSocket-Key to send the backend. Raises `HandshakeError` (400) for a
    request that cannot be written as HTTP/1.1 safely.
    """
    pseudo: dict[bytes, bytes] = {}
    regular: Headers = []
    cookies: list[bytes] = []
    for name, value in headers:
        if name.startswith(b":"):
            if name not in _PSEUDO or regular or cookies:
                raise HandshakeError(400, "an unknown pseudo-header, or one after a header")
            if name in pseudo:
                raise HandshakeError(400, f"repeated pseudo-header {name.decode('latin-1')}")
            pseudo[name] = value
            continue
        if _NAME.fullmatch(name) is None:
            raise HandshakeError(400, "a header name is not a lowercase token")
        if not is_field_value(value):
            raise HandshakeError(400, f"the value of {name.decode('ascii')} is not a field value")
        if name == b"cookie":
            cookies.append(value)
        elif name not in _DROPPED:
            regular.append((name, value))
    method = pseudo.get(b":method", b"")
    path = pseudo.get(b":path", b"")
    authority = pseudo.get(b":authority", b"")
    protocol = pseudo.get(b":protocol")
    if _METHOD.fullmatch(method) is None:
        raise HandshakeError(400, "bad :method")
    if _PATH.fullmatch(path) is None:
        raise HandshakeError(400, "bad or missing :path")
    if _AUTHORITY.fullmatch(authority) is None:
        raise HandshakeError(400, "bad or missing :authority")
    upgrade = method == b"CONNECT"
    if upgrade:
        if protocol is None:
            raise HandshakeError(400, "plain CONNECT is not served: only :protocol websocket")
        if protocol.lower() != b"websocket":
            raise HandshakeError(400, "only :protocol websocket is served")
        if pseudo.get(b":scheme") not in (b"https", b"http"):
            raise HandshakeError(400, "bad or missing :scheme")
        method = b"GET"
    elif protocol is not None:
        raise HandshakeError(400, ":protocol belongs to CONNECT")
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: " + authority]
    if upgrade:
        lines += [b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Key: " + key]
    if cookies:
        # RFC 9113 8.2.3: split cookie fields are joined for HTTP/1.1 with "; ".
        lines.append(b"cookie: " + b"; ".join(cookies))
    lines += [name + b": " + value for name, value in regular]
    return b"\r\n".join(lines) + b"\r\n\r\n", upgrade


def response_headers(head: bytes) -> tuple[int, Headers]:
    """(status, HTTP/2 headers) for an HTTP/1.1 reply head the gateway wrote, "\\r\\n\\r\\n" included.

    A 101 becomes RFC 8441's 200, without Upgrade, Connection and
    Sec-WebSocket-Accept; any other status keeps its end-to-end headers.
    """
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    dropped = _SWITCHING_ONLY if status == 101 else _HOP_BY_HOP
    headers: Headers = [(b":status", b"200" if status == 101 else b"%d" % status)]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name not in dropped:
            headers.append((name, value.strip()))
    return (200 if status == 101 else status), headers
