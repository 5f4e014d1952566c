"""The backend leg of an upgrade, from its connect until the backend's answer is complete.

`BackendHandshake` sends the rewritten upgrade request (the bytes that
handshake.py built) and reads the answer: a 101 resolves `outcome` with its
`ResponseHead` (read by httptools on its fast path, else by h11) and the bytes
that followed it kept in `early`; anything else resolves it with the response
and its body, and a connection that fails or ends first resolves it with
`BackendUnavailable`. The upgrade protocol (upgrade.py) awaits the outcome.
"""

from __future__ import annotations

import asyncio
from typing import cast

import h11

from .config import Limits
from .errors import BackendUnavailable, HandshakeError
from .heads import HeadReader, HttpParser, ResponseHead, response_head, switching_protocols_head

# A backend's refusal is relayed to the client; its body is cut at this size.
BACKEND_REPLY_BODY_LIMIT = 64 * 1024

# h11's client reads a response only to a request it has sent itself. The request went out as
# bytes; this one is sent to h11 alone, so that it reads the answer as it would have read the
# answer to that request: what its reading depends on is the method (GET) and the Upgrade offer.
_READER_REQUEST = h11.Request(
    method=b"GET",
    target=b"/",
    headers=[(b"Host", b"backend"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
)


def _response_reader(max_head_size: int) -> h11.Connection:
    """An h11 client connection in the state where it reads the answer to an upgrade request."""
    reader = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_size)
    reader.send(_READER_REQUEST)  # its bytes are not sent anywhere
    reader.send(h11.EndOfMessage())
    return reader


class BackendHandshake(asyncio.Protocol):
    """The backend leg until its answer to the upgrade is complete."""

    def __init__(self, request: bytes, limits: Limits, parser: HttpParser) -> None:
        self.request = request
        self.parser: HttpParser = parser
        self.max_head_size = limits.max_header_bytes
        # Made only when h11 must read the answer: a refusal, an odd head, or `http_parser: h11`.
        self.h11: h11.Connection | None = None
        # The first head (the 101, or a refusal) is checked as a client's would be.
        self.head: HeadReader | None = HeadReader(limits.max_header_bytes, limits.max_headers)
        self.outcome: asyncio.Future[ResponseHead | h11.Response] = (
            asyncio.get_running_loop().create_future()
        )
        self.response: h11.Response | None = None
        self.body = bytearray()
        self.early = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.outcome.done():
            # After the 101 and before the hand-off: the backend's first frames.
            self.early += data
            return
        if self.head is not None:
            try:
                head = self.head.receive_data(data)
            except HandshakeError as exc:
                self._fail(f"backend sent a bad response head: {exc.reason}")
                return
            if head is None:
                return
            self.head = None
            switched = switching_protocols_head(head, self.parser)
            if switched is not None:
                response, after = switched
                self.early += after
                self.outcome.set_result(response)
                return
            data = head  # h11 reads it: the parser chosen, or a refusal with its body
            self.h11 = _response_reader(self.max_head_size)
        assert self.h11 is not None, "h11 reads whatever follows a head it was given"
        self.h11.receive_data(data)
        self._next_events()

    def eof_received(self) -> bool:
        if not self.outcome.done():
            if self.response is None:
                self._fail("backend closed the connection before answering")
            else:
                # A body without a length ends at EOF.
                assert self.h11 is not None, "h11 read the response"
                self.h11.receive_data(b"")
                self._next_events()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.outcome.done():
            self._fail("backend closed the connection before answering")

    def _fail(self, reason: str) -> None:
        self.outcome.set_exception(BackendUnavailable(502, reason))
        if self.transport is not None:
            self.transport.close()

    def _next_events(self) -> None:
        reader = self.h11
        assert reader is not None
        try:
            while not self.outcome.done():
                event = reader.next_event()
                if event is h11.NEED_DATA:
                    return
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        self.early += reader.trailing_data[0]
                        self.outcome.set_result(response_head(event))
                elif isinstance(event, h11.Response):
                    self.response = event
                elif isinstance(event, h11.Data):
                    room = BACKEND_REPLY_BODY_LIMIT - len(self.body)
                    self.body += event.data[:room]
                    if len(event.data) > room:
                        self._reply_complete()
                elif isinstance(event, h11.EndOfMessage):
                    self._reply_complete()
                else:
                    self._fail("backend closed the connection before answering")
        except h11.RemoteProtocolError as exc:
            self._fail(f"backend sent a malformed response: {exc}")

    def _reply_complete(self) -> None:
        assert self.response is not None
        self.outcome.set_result(self.response)
