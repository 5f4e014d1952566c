"""Sans-I/O rules of the RFC 6455 opening handshake, on both legs.

The heads themselves are read in `heads`.
`check_client_request` either returns an `UpgradeRequest` or raises
`HandshakeError` carrying the HTTP reply.
`build_upstream_request` turns it into the bytes of the request sent to a
backend and the `Offer` they make, and `check_backend_response` decides
whether the backend's 101 may be relayed.
Replies are rendered here by hand so that a rejection can be sent whatever
state h11 is in after a malformed request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus
from urllib.parse import parse_qs

import h11

from .errors import BackendUnavailable, HandshakeError
from .heads import Headers, RequestHead, ResponseHead, is_field_value

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUPPORTED_VERSION = b"13"

# Hop-by-hop headers (RFC 9110 7.6.1) plus the legacy ones proxies still meet.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Headers a client may name in Connection but that the handshake cannot lose:
# without them the backend gets no upgrade, and its 101 cannot be checked.
_NEVER_STRIPPED = frozenset({b"host", b"sec-websocket-key", b"sec-websocket-version"})
# Set by the gateway; a client's own values would let it forge its address or identity.
# Forwarded is dropped, not set: the chain the gateway believed goes on in X-Forwarded-For.
_FORWARDING_SET = frozenset(
    {
        b"x-forwarded-for",
        b"forwarded",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"x-client-cert-subject",
    }
)


# What a request never passes on, whatever its Connection header names.
_ALWAYS_DROPPED = _HOP_BY_HOP | _FORWARDING_SET
assert not _ALWAYS_DROPPED & _NEVER_STRIPPED
_STRIP_EXTENSIONS = _ALWAYS_DROPPED | {b"sec-websocket-extensions"}
# What a route's request_headers may not set or remove: the gateway's own rules decide
# these (framing, the handshake, forwarding), or another key does (upstream_host, subprotocols).
ROUTE_CANNOT_EDIT_REQUEST = _ALWAYS_DROPPED | _NEVER_STRIPPED | {
    b"content-length",
    b"sec-websocket-protocol",
    b"sec-websocket-extensions",
}
# What a route's response_headers may not set or remove on the 101: what makes it a valid 101.
ROUTE_CANNOT_EDIT_RESPONSE = _HOP_BY_HOP | {
    b"content-length",
    b"sec-websocket-accept",
    b"sec-websocket-protocol",
    b"sec-websocket-extensions",
}

# Schemes of an absolute-form target (RFC 6455 4.1 names http and https).
_ABSOLUTE_SCHEMES = frozenset({b"http", b"https", b"ws", b"wss"})
# Where a backend might see a segment break: "/", and what some servers decode or treat as one.
_SEGMENT_BREAK = re.compile(r"/|\\|%2f|%5c", re.IGNORECASE)


def accept_key(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value that answers `key`."""
    return base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())


ByName = dict[bytes, list[bytes]]


def _header_index(headers: Headers) -> ByName:
    """The values of each header under its lower-cased name, in order.

    Built once per head, so that each rule looks a name up instead of lowering every name again.
    """
    by_name: ByName = {}
    for name, value in headers:
        lower = name.lower()
        values = by_name.get(lower)
        if values is None:
            by_name[lower] = [value]
        else:
            values.append(value)
    return by_name


def _header_tokens(by_name: ByName, name: bytes, *, case_sensitive: bool = False) -> list[bytes]:
    """Comma-separated tokens of every occurrence of header `name` (lowercase), in order, none empty.

    Most tokens compare case-insensitively; subprotocol names do not (RFC 6455 4.1).
    """
    values = by_name.get(name)
    if values is None:
        return []
    # Several occurrences of a list header are one list (RFC 9110 5.3).
    joined = b",".join(values)
    if not case_sensitive:
        joined = joined.lower()
    return [token for token in map(bytes.strip, joined.split(b",")) if token]


def _extension_names(offers: list[bytes]) -> list[bytes]:
    """`permessage-deflate; client_max_window_bits` -> `permessage-deflate`."""
    return [offer.split(b";", 1)[0].strip() for offer in offers]


def _split_host(host_header: bytes) -> str:
    """The host name of a Host header, lowercased, without port or brackets."""
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A valid WebSocket upgrade request, as the client sent it."""

    target: bytes
    path: str
    host: str
    key: bytes
    headers: Headers
    by_name: ByName  # the headers' values by lower-cased name, for the rules to look up
    protocols: list[bytes]
    extensions: list[bytes]
    origin: str | None


def check_client_request(request: RequestHead) -> UpgradeRequest:
    """Validate an upgrade request against RFC 6455 4.2.1, or raise `HandshakeError`."""
    if request.method != b"GET":
        raise HandshakeError(405, "WebSocket upgrades must use GET", [("Allow", "GET")])
    if request.http_version != b"1.1":
        raise HandshakeError(400, "WebSocket upgrades need HTTP/1.1")
    by_name = _header_index(request.headers)
    if b"websocket" not in _header_tokens(by_name, b"upgrade"):
        raise HandshakeError(
            426,
            "this endpoint only serves WebSocket upgrades",
            [("Upgrade", "websocket"), ("Connection", "Upgrade")],
        )
    if b"upgrade" not in _header_tokens(by_name, b"connection"):
        raise HandshakeError(400, "Connection header must contain 'upgrade'")
    versions = by_name.get(b"sec-websocket-version")
    if not versions:
        raise HandshakeError(400, "missing Sec-WebSocket-Version")
    if versions != [SUPPORTED_VERSION]:
        raise HandshakeError(
            426, "unsupported WebSocket version", [("Sec-WebSocket-Version", "13")]
        )
    keys = by_name.get(b"sec-websocket-key", [])
    if len(keys) != 1 or not _is_valid_key(keys[0]):
        raise HandshakeError(400, "Sec-WebSocket-Key must be base64 of 16 bytes")
    if by_name.get(b"content-length", [b"0"]) != [b"0"] or b"transfer-encoding" in by_name:
        raise HandshakeError(400, "an upgrade request has no body")
    host_values = by_name.get(b"host", [])
    if len(host_values) != 1 or not host_values[0].strip():
        raise HandshakeError(400, "exactly one Host header is required")
    target = _origin_form(request.target, host_values[0])
    path = target.split(b"?", 1)[0].decode("latin-1")
    if _has_dot_segment(path):
        raise HandshakeError(400, "the path has a '.' or '..' segment")
    origins = by_name.get(b"origin")
    return UpgradeRequest(
        target=target,
        path=path,
        host=_split_host(host_values[0]),
        key=keys[0].strip(),
        headers=request.headers,
        by_name=by_name,
        protocols=_header_tokens(by_name, b"sec-websocket-protocol", case_sensitive=True),
        extensions=_extension_names(_header_tokens(by_name, b"sec-websocket-extensions")),
        origin=origins[0].decode("latin-1") if origins else None,
    )


@dataclass(frozen=True, slots=True)
class PlainGet:
    """A plain GET, with what routing looks at (it offers no subprotocol)."""

    host: str
    path: str
    target: bytes
    by_name: ByName
    protocols: tuple[bytes, ...] = ()


def plain_get(request: RequestHead) -> PlainGet | None:
    """The plain HTTP/1.1 GET (no upgrade) that a route's `static` files may answer.

    None for anything else. The target rules of an upgrade hold: one Host header, an
    origin-form (or matching absolute-form) target, and no `.` or `..` segment.
    """
    by_name = _header_index(request.headers)
    host_values = by_name.get(b"host", [])
    if request.method != b"GET" or request.http_version != b"1.1" or len(host_values) != 1:
        return None
    if b"websocket" in _header_tokens(by_name, b"upgrade"):
        return None  # an upgrade, refused for another reason
    try:
        target = _origin_form(request.target, host_values[0])
    except HandshakeError:
        return None
    path = target.split(b"?", 1)[0].decode("latin-1")
    if _has_dot_segment(path):
        return None
    return PlainGet(_split_host(host_values[0]), path, target, by_name)


def _origin_form(target: bytes, host_header: bytes) -> bytes:
    """`target` as /path?query; an absolute-form target must name the Host header's authority.

    RFC 6455 4.1 lets a client send an absolute http(s) URI; the backend gets the
    origin-form, as any server would. Any other form (authority, asterisk) is refused.
    """
    if target.startswith(b"/"):
        return target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in _ABSOLUTE_SCHEMES:
        raise HandshakeError(400, "the request target must be an absolute path")
    authority_end = len(rest)
    for mark in b"/?#":
        found = rest.find(bytes((mark,)))
        if 0 <= found < authority_end:
            authority_end = found
    if rest[:authority_end].lower() != host_header.strip().lower():
        raise HandshakeError(400, "the request target names another host than Host")
    origin = rest[authority_end:]
    return origin if origin.startswith(b"/") else b"/" + origin


# What a path the gateway writes itself (a route's rewrite) may hold: visible ASCII, no query or fragment.
_PLAIN_PATH = re.compile(r"/[\x21-\x7e]*")


def is_sendable_path(path: str) -> bool:
    """Whether a path made by the gateway may go upstream: one a client could have sent and passed."""
    return _PLAIN_PATH.fullmatch(path) is not None and "?" not in path and "#" not in path and (
        not _has_dot_segment(path)
    )


def _has_dot_segment(path: str) -> bool:
    """A `.` or `..` segment, its dots plain or as %2e, between any of / \\ %2f %5c."""
    if "." not in path and "%2" not in path:
        return False
    return any(
        segment.lower().replace("%2e", ".") in (".", "..") for segment in _SEGMENT_BREAK.split(path)
    )


def affinity_key(handshake: UpgradeRequest, spec: str, client_ip: str) -> bytes | None:
    """The bytes a route hashes to pin this connection, or None when the request lacks them.

    `spec` is a route's `hash_key`: ip, path, header:NAME, cookie:NAME or query:NAME.
    """
    if spec == "ip":
        return client_ip.encode("ascii")
    if spec == "path":
        return handshake.path.encode("latin-1")
    kind, _, name = spec.partition(":")
    if kind == "header":
        values = handshake.by_name.get(name.lower().encode("latin-1"))
        return values[0].strip() if values else None
    if kind == "cookie":
        wanted = name.encode("latin-1")
        for header in handshake.by_name.get(b"cookie", []):
            for pair in header.split(b";"):
                cookie, sep, value = pair.strip().partition(b"=")
                if sep and cookie == wanted:
                    return value.strip(b'"')
        return None
    if kind == "query":
        query = handshake.target.partition(b"?")[2].decode("latin-1")
        values = parse_qs(query, keep_blank_values=True).get(name)
        return values[0].encode("utf-8") if values else None
    raise ValueError(f"unknown hash key {spec!r}")


def _is_valid_key(value: bytes) -> bool:
    try:
        return len(base64.b64decode(value.strip(), validate=True)) == 16
    except binascii.Error:
        return False


def check_origin(handshake: UpgradeRequest, allowed: list[str] | None) -> None:
    """Refuse a browser origin that the route does not allow (None allows any).

    Only browsers send Origin, and cross-site browser pages are what the list
    guards against, so a request without Origin passes.
    """
    if allowed is None or handshake.origin is None:
        return
    if handshake.origin.lower() not in {o.lower() for o in allowed}:
        raise HandshakeError(403, "origin not allowed")


@dataclass(frozen=True, slots=True)
class Offer:
    """What the request sent to a backend offered, for its 101 to be checked against."""

    key: bytes  # the Sec-WebSocket-Key, without surrounding whitespace
    protocols: list[bytes]  # the subprotocols, in order
    extensions: list[bytes]  # the extension names, lower-cased


def build_upstream_request(
    handshake: UpgradeRequest,
    *,
    client_ip: str,
    forwarded_for: list[str] | None = None,
    scheme: str = "http",
    host: str | None = None,
    strip_extensions: bool = False,
    client_cert_subject: str | None = None,
    target: bytes | None = None,
    route_drop: frozenset[bytes] = frozenset(),
    route_set: Headers | tuple[tuple[bytes, bytes], ...] = (),
    protocols: list[bytes] | None = None,
) -> tuple[bytes, Offer]:
    """The request to send a backend, as bytes, and what it offers.

    End-to-end headers are kept in their order and case, forwarding headers set.
    `forwarded_for` is the X-Forwarded-For chain, client first (see `forwarding`);
    the client's own forwarding headers are never passed on. By default it is the
    client alone. Raises `ValueError` when a value the gateway sets (the Host
    override, a forwarding header, the client certificate's subject) is no valid
    header value.

    A route's shaping comes in already decided: the `target` to send, the header
    names it drops (`route_drop`, lower-case: those it removes and those it sets),
    the headers it sets (`route_set`, added after the client's), and the `protocols`
    offered instead of the client's list (None: the client's, as sent). The gateway's
    own headers still come last; the config refuses routes that would name them.
    """
    named_in_connection = _header_tokens(handshake.by_name, b"connection")
    drop = _STRIP_EXTENSIONS if strip_extensions else _ALWAYS_DROPPED
    # Connection most often names only what is dropped anyway ("upgrade", "keep-alive"):
    # then no set is built for this request.
    if not drop.issuperset(named_in_connection):
        drop = drop.union(named_in_connection).difference(_NEVER_STRIPPED)
    if route_drop:
        drop = drop | route_drop
    if protocols is not None:
        drop = drop | {b"sec-websocket-protocol"}
    upstream_host = None if host is None else host.encode("latin-1")
    original_host = host_line = b""
    lines = [b"GET " + (handshake.target if target is None else target) + b" HTTP/1.1"]
    for name, value in handshake.headers:
        lower = name.lower()
        if lower in drop or lower.startswith(b"proxy-"):
            continue
        if lower == b"host":
            original_host = value
            host_line = name + b": " + (value if upstream_host is None else upstream_host)
        else:
            lines.append(name + b": " + value)
    assert host_line, "check_client_request lets through exactly one Host"
    # Host goes first, as RFC 9112 3.2 asks of a client (and as h11 would write it).
    lines.insert(1, host_line)
    if protocols:
        lines.append(b"Sec-WebSocket-Protocol: " + b", ".join(protocols))
    for name, value in route_set:
        lines.append(name + b": " + value)
    forwarded = ", ".join([client_ip] if forwarded_for is None else forwarded_for).encode("ascii")
    real_ip = client_ip.encode("ascii")
    proto = scheme.encode("ascii")
    lines += [
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"X-Forwarded-For: " + forwarded,
        b"X-Forwarded-Proto: " + proto,
        b"X-Forwarded-Host: " + original_host,
        b"X-Real-IP: " + real_ip,
    ]
    # The client's own headers were held to h11's grammar when its head was read; these were not.
    # A subject or Host with a CR, LF or NUL would otherwise split a header or end the head.
    set_here = [forwarded, proto, real_ip]
    if upstream_host is not None:
        set_here.append(upstream_host)
    if client_cert_subject is not None:
        subject = client_cert_subject.encode("utf-8")
        set_here.append(subject)
        lines.append(b"X-Client-Cert-Subject: " + subject)
    for value in set_here:
        if not is_field_value(value):
            raise ValueError(f"a header the gateway sets would have an invalid value: {value!r}")
    offer = Offer(
        key=handshake.key,
        protocols=protocols if protocols is not None
        else [] if b"sec-websocket-protocol" in drop else handshake.protocols,
        extensions=[] if b"sec-websocket-extensions" in drop else handshake.extensions,
    )
    return b"\r\n".join(lines) + b"\r\n\r\n", offer


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What the backend's 101 settled, and the headers to relay to the client."""

    headers: Headers
    subprotocol: bytes | None
    extensions: list[bytes]

    @property
    def deflate(self) -> bool:
        """permessage-deflate is on, so RSV1 is legal on data frames."""
        return b"permessage-deflate" in self.extensions


def check_backend_response(response: ResponseHead, offer: Offer) -> Negotiated:
    """Check a backend's 101 against what the request offered; raise `BackendUnavailable` (502)."""
    if response.status_code != 101:
        raise BackendUnavailable(502, f"backend answered {response.status_code} to an upgrade")
    headers = response.headers
    by_name = _header_index(headers)
    if b"content-length" in by_name or b"transfer-encoding" in by_name:
        # A 101 has no body (RFC 9110 8.6, 6.1): a length is a confused or smuggling backend.
        raise BackendUnavailable(502, "backend 101 carries Content-Length or Transfer-Encoding")
    if b"websocket" not in _header_tokens(by_name, b"upgrade"):
        raise BackendUnavailable(502, "backend 101 lacks 'Upgrade: websocket'")
    connection = _header_tokens(by_name, b"connection")
    if b"upgrade" not in connection:
        raise BackendUnavailable(502, "backend 101 lacks 'Connection: upgrade'")
    if by_name.get(b"sec-websocket-accept") != [accept_key(offer.key)]:
        raise BackendUnavailable(502, "backend sent a wrong or missing Sec-WebSocket-Accept")
    chosen = _header_tokens(by_name, b"sec-websocket-protocol", case_sensitive=True)
    if len(chosen) > 1 or (chosen and chosen[0] not in offer.protocols):
        raise BackendUnavailable(502, "backend chose a subprotocol the client did not offer")
    accepted = _extension_names(_header_tokens(by_name, b"sec-websocket-extensions"))
    for name in accepted:
        if name not in offer.extensions:
            raise BackendUnavailable(
                502, f"backend accepted extension {name.decode('latin-1')!r} the client did not offer"
            )
    relayed = _without_hops(headers, connection)
    relayed += [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]
    return Negotiated(
        headers=relayed, subprotocol=chosen[0] if chosen else None, extensions=accepted
    )


def end_to_end(headers: Headers) -> Headers:
    """`headers` without the hop-by-hop ones and those named in Connection."""
    return _without_hops(headers, _header_tokens(_header_index(headers), b"connection"))


def _without_hops(headers: Headers, connection: list[bytes]) -> Headers:
    drop = _HOP_BY_HOP.union(connection)
    return [(n, v) for n, v in headers if n.lower() not in drop]


def render_response(
    status: int, headers: Headers, body: bytes = b"", reason: bytes | None = None
) -> bytes:
    """An HTTP/1.1 response head (and body) ready to write to a socket."""
    if reason is None:
        reason = _reason_phrase(status)
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def render_switching_protocols(negotiated: Negotiated) -> bytes:
    """The 101 to relay to the client."""
    return render_response(101, negotiated.headers)


def render_error(status: int, message: str, extra: list[tuple[str, str]] | None = None) -> bytes:
    """A short plain-text error reply that closes the connection."""
    return _rendered_error(status, message, tuple(extra) if extra else ())


# The same few refusals (503 at the limit, 429, 408, 502) answer whole storms of connections:
# each is rendered once. Bounded, as a reason may quote what a client sent.
@lru_cache(maxsize=128)
def _rendered_error(status: int, message: str, extra: tuple[tuple[str, str], ...]) -> bytes:
    body = (message + "\n").encode("utf-8")
    connection = "close"
    headers: Headers = []
    for name, value in extra:
        if name.lower() == "connection":
            # One Connection header: a 426's "Upgrade" joins the "close" every error carries.
            connection = f"{value}, close"
        else:
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
    headers += [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode("ascii")),
        (b"Connection", connection.encode("latin-1")),
    ]
    return render_response(status, headers, body)


def render_rejection(error: HandshakeError) -> bytes:
    """The reply that `HandshakeError` stands for."""
    return render_error(error.status, error.reason, error.headers)


def render_backend_reply(response: h11.Response, body: bytes) -> bytes:
    """A backend's non-101 answer, relayed with its status, end-to-end headers and (bounded) body."""
    headers = [
        (n, v)
        for n, v in end_to_end(list(response.headers.raw_items()))
        if n.lower() != b"content-length"
    ]
    headers += [(b"Content-Length", str(len(body)).encode("ascii")), (b"Connection", b"close")]
    return render_response(response.status_code, headers, body, response.reason or None)


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"
