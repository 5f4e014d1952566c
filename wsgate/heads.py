"""Sans-I/O reading of HTTP/1.1 heads, on both legs of a handshake.

`HeadReader` collects a request or response head and refuses, before a parser
sees it, what is too large, too long or ambiguous. `parse_request_head` turns a
complete head into a `RequestHead`, and `switching_protocols_head` or
`response_head` a backend's into a `ResponseHead`, with h11 or, on its fast
path, httptools (see `HttpParser`). What the fields must say is decided in
`handshake`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import h11

from .errors import HandshakeError

try:
    import httptools
except ImportError:  # h11 parses every head where httptools does not install
    httptools = None

Headers = list[tuple[bytes, bytes]]

# What may follow a request target on its line: " HTTP/1.1" and the CR.
_REQUEST_LINE_TAIL_SIZE = len(b" HTTP/1.1\r")


class HeadReader:
    """Buffers an HTTP head up to its blank line, refusing what must not reach h11.

    h11 parses a head line by line in Python, so a head that is too large, has too
    many lines or too long a target is refused here first, by C-level `find` and
    `count` over the new bytes only: the work is bounded per byte received, however
    the head is split. A bare LF and an obs-fold line are refused too: h11 would end
    a line at the first and silently unfold the second, where another server might not.
    `HandshakeError` carries the client's answer; the backend leg turns it into a 502.
    """

    __slots__ = (
        "buffer",
        "scanned",
        "line_ends",
        "target_start",
        "request_line_done",
        "max_head_size",
        "max_header_lines",
        "max_target_size",
    )

    def __init__(
        self, max_head_size: int, max_header_lines: int, max_target_size: int | None = None
    ) -> None:
        self.buffer = bytearray()
        self.scanned = 0  # bytes of the head already checked
        self.line_ends = 0
        self.target_start = -1  # just after the request line's first space, once seen
        # Only a request's target is bounded; a response's status line is not looked at.
        self.request_line_done = max_target_size is None
        self.max_head_size = max_head_size
        self.max_header_lines = max_header_lines
        self.max_target_size = max_target_size

    def receive_data(self, data: bytes) -> bytes | None:
        """Take `data`; once the head is complete, return it with the bytes that followed.

        Raises `HandshakeError` (400, 414 or 431) as soon as the bytes so far must be refused.
        """
        buffer = self.buffer
        search_from = max(0, len(buffer) - 3)
        if not buffer and data and data[0] < 0x21:
            # A control byte or space cannot start a head (a TLS hello to a plain port, say).
            raise HandshakeError(400, "malformed head: it starts with a control byte or space")
        buffer += data
        end = buffer.find(b"\r\n\r\n", search_from)
        stop = len(buffer) if end < 0 else end + 4
        start = self.scanned
        # One byte back, so that a CRLF or a fold split across reads is seen whole.
        back = max(0, start - 1)
        self.scanned = stop
        if not self.request_line_done:
            self._check_target(start, stop)
        line_ends = buffer.count(b"\n", start, stop)
        if line_ends != buffer.count(b"\r\n", back, stop):
            raise HandshakeError(400, "a line of the head ends in a bare LF")
        self.line_ends += line_ends
        # The request or status line and, once complete, the blank line are not header lines.
        header_lines = self.line_ends - (1 if end < 0 else 2)
        if header_lines > self.max_header_lines:
            raise HandshakeError(431, f"more than {self.max_header_lines} header lines")
        if buffer.find(b"\n ", back, stop) >= 0 or buffer.find(b"\n\t", back, stop) >= 0:
            raise HandshakeError(400, "obsolete line folding in the head")
        if stop > self.max_head_size:
            raise HandshakeError(431, f"head larger than {self.max_head_size} bytes")
        if end < 0:
            return None
        self.buffer = bytearray()
        return bytes(buffer)

    def _check_target(self, start: int, stop: int) -> None:
        buffer = self.buffer
        assert self.max_target_size is not None
        line_end = buffer.find(b"\n", start, stop)
        if self.target_start < 0:
            space = buffer.find(b" ", start, stop if line_end < 0 else line_end)
            if space >= 0:
                self.target_start = space + 1
        if self.target_start < 0:
            if line_end >= 0:
                self.request_line_done = True  # no target at all: h11 refuses the line
            return
        if line_end < 0:
            # The line is not complete, but only " HTTP/1.1\r" may still follow the target.
            target_size = stop - self.target_start - _REQUEST_LINE_TAIL_SIZE
        else:
            self.request_line_done = True
            target_size = buffer.rfind(b" ", self.target_start, line_end) - self.target_start
        if target_size > self.max_target_size:
            raise HandshakeError(414, f"request target longer than {self.max_target_size} bytes")


# Which parser reads the heads (the `http_parser` setting): "auto" is httptools where it
# is importable. h11 is the reference: httptools only parses what h11 would parse the same.
HttpParser = Literal["auto", "h11", "httptools"]

# The head grammar h11 enforces (RFC 9110 5, 9112 3-5), as one regex per head: a head it
# matches, with no Host, Content-Length or Transfer-Encoding rule at stake, h11 parses to
# the same fields. Anything else goes to h11, whose answer (fields or error) is the one used.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_FIELD_CHAR = rb"[^\x00\s]"  # a visible byte or obs-text, as h11 allows in a value
# A field value: no NUL, CR, LF or other whitespace but SP and HTAB between visible bytes.
_FIELD_VALUE = rb"(?:" + _FIELD_CHAR + rb"+(?:[ \t]+" + _FIELD_CHAR + rb"+)*)?"
_HEADER_LINE = _TOKEN + rb":[ \t]*" + _FIELD_VALUE + rb"[ \t]*\r\n"
_VERSION = rb"HTTP/([0-9]\.[0-9])"
_REQUEST_HEAD = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e]+) " + _VERSION + rb"\r\n(?:" + _HEADER_LINE + rb")*\r\n"
)
_RESPONSE_HEAD = re.compile(
    _VERSION + rb" ([0-9]{3})(?: ((?:[ \t]|" + _FIELD_CHAR + rb")*))?\r\n(?:" + _HEADER_LINE + rb")*\r\n"
)
_FIELD_VALUE_WHOLE = re.compile(_FIELD_VALUE)


def is_field_value(value: bytes) -> bool:
    """True when `value` may be sent as a header's value: what h11 accepts, and reads back."""
    return _FIELD_VALUE_WHOLE.fullmatch(value) is not None


# Headers whose count or framing h11 rules on: a head with them is left to h11 whole.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})

@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request head: the same fields from h11 and from httptools."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: Headers  # as sent: names in their case, values without surrounding whitespace


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed response head: the same fields from h11 and from httptools."""

    status_code: int
    reason: bytes
    http_version: bytes
    headers: Headers


class _HeaderFields:
    """httptools' callbacks for one head: its header fields, and whether it ended."""

    __slots__ = ("headers", "complete")

    def __init__(self) -> None:
        self.headers: Headers = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value.rstrip(b" \t")))  # llhttp keeps trailing whitespace

    def on_headers_complete(self) -> None:
        self.complete = True


def _fast_headers(parser_type: type, head: bytes, end: int) -> Headers | None:
    """The header fields httptools reads from `head[:end]`, or None where h11 must decide."""
    fields = _HeaderFields()
    try:
        parser_type(fields).feed_data(head[:end])
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        pass  # a 101 without Upgrade headers pauses llhttp too: `complete` says if the head was read
    if not fields.complete:
        return None
    hosts = 0
    for name, _ in fields.headers:
        lower = name.lower()
        if lower == b"host":
            hosts += 1
        elif lower in _FRAMING:
            return None
    if parser_type is httptools.HttpRequestParser and hosts != 1:
        return None
    return fields.headers


def parse_request_head(head: bytes, parser: HttpParser) -> tuple[RequestHead, bytes]:
    """Parse a complete request head from `HeadReader`; return it and the bytes after it.

    Raises `HandshakeError` with h11's status (400, 431 or 501) for a malformed head.
    """
    end = head.find(b"\r\n\r\n") + 4
    assert end >= 4, "HeadReader returns complete heads only"
    if parser != "h11" and httptools is not None:
        line = _REQUEST_HEAD.fullmatch(head, 0, end)
        if line is not None:
            headers = _fast_headers(httptools.HttpRequestParser, head, end)
            if headers is not None:
                method, target, version = line.groups()
                return RequestHead(method, target, version, headers), head[end:]
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(head)
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError as exc:
        raise HandshakeError(exc.error_status_hint, _h11_reason(exc)) from None
    assert isinstance(event, h11.Request), "h11 reads a request from a complete head"
    request = RequestHead(
        event.method, event.target, event.http_version, list(event.headers.raw_items())
    )
    return request, connection.trailing_data[0]


def switching_protocols_head(head: bytes, parser: HttpParser) -> tuple[ResponseHead, bytes] | None:
    """A backend's 101 read by httptools from a complete head, and the bytes after it.

    None when h11 must read the head: h11 is the parser chosen, or the head is not a
    101 that h11 would read the same. The backend leg's own h11 connection then reads
    it, as it reads a refusal's body, and `response_head` gives the same fields.
    """
    if parser == "h11" or httptools is None:
        return None
    end = head.find(b"\r\n\r\n") + 4
    assert end >= 4, "HeadReader returns complete heads only"
    line = _RESPONSE_HEAD.fullmatch(head, 0, end)
    if line is None or line.group(2) != b"101":
        return None
    headers = _fast_headers(httptools.HttpResponseParser, head, end)
    if headers is None:
        return None
    version, status, reason = line.groups()
    return ResponseHead(int(status), reason or b"", version, headers), head[end:]


def response_head(event: h11.Response | h11.InformationalResponse) -> ResponseHead:
    """The fields of a response h11 has read."""
    return ResponseHead(
        event.status_code, event.reason, event.http_version, list(event.headers.raw_items())
    )


def _h11_reason(exc: h11.RemoteProtocolError) -> str:
    if exc.error_status_hint == 431:
        return "request header block too large"
    return f"malformed request: {exc}"
