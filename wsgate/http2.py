"""WebSockets over HTTP/2 (RFC 8441): each stream of a client's HTTP/2 connection is a virtual connection.

A TLS connection whose ALPN picked `h2` is handed to an `Http2Session`, which
runs the `h2` library's sans-I/O `H2Connection` (the gateway parses no HTTP/2
itself). The session advertises SETTINGS_ENABLE_CONNECT_PROTOCOL and turns
each request stream into an HTTP/1.1 request head (see extended_connect.py)
fed to a fresh `StreamUpgrade`, the upgrade phase of any connection, over a
`StreamTransport`: routes, hashing, limits, the backend connect, the `Relay`
with its heartbeats, idle timeouts, drain and counters all work per stream,
unchanged. What the gateway writes to a stream transport is an HTTP/1.1 reply
head, rewritten into HTTP/2 response headers (a 101 becomes 200), then
WebSocket frame bytes sent as DATA.

Flow control maps onto the relay's: a stream's unsent bytes (waiting for its
HTTP/2 send window) are its write buffer, with the relay's watermarks; a
stream whose reading is paused gets no DATA delivered and none acknowledged,
so the client's window for it closes, and what it holds is bounded by the
window the gateway advertised. The connection's window is as large as all
streams' windows together, so a stalled stream never stops another.

Ends: the gateway's `close()` on a stream sends END_STREAM after its queued
bytes, `abort()` RST_STREAM(CANCEL); the client's RST_STREAM is a lost
connection to the relay, its END_STREAM an EOF.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, SettingsFrame

from .books import Books
from .config import Listener
from .errors import HandshakeError
from .extended_connect import request_head, response_headers, websocket_key

log = logging.getLogger("wsgate.http2")

PROTOCOL = "h2"
# The most a WINDOW_UPDATE may add to a window (RFC 9113 6.9.1).
_MAX_WINDOW = 2**31 - 1
_HEAD_END = b"\r\n\r\n"
_SETTINGS = h2.settings.SettingCodes


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, refusing an overlong frame by its header.

    h2 checks a frame's length against SETTINGS_MAX_FRAME_SIZE only once the whole
    frame has arrived, so a peer declaring 16 MiB would have that much buffered first.
    """

    def __next__(self) -> Any:
        data = self._data
        if len(data) >= 9:
            self._validate_frame_length(int.from_bytes(data[:3], "big"))
        return super().__next__()


class StreamTransport(asyncio.Transport):
    """One HTTP/2 stream as the transport of a connection's protocol."""

    __slots__ = (
        "session",
        "stream_id",
        "protocol",
        "head",
        "unsent",
        "closing",
        "lost",
        "ended",
        "upgrade",
        "reading_paused",
        "writing_paused",
        "received",
        "eof_waiting",
        "high_water",
        "low_water",
    )

    def __init__(self, session: Http2Session, stream_id: int, upgrade: bool) -> None:
        super().__init__()
        self.session = session
        self.stream_id = stream_id
        self.protocol: asyncio.Protocol | None = None
        # The gateway's HTTP/1.1 reply head as written so far; None once it went out as headers.
        self.head: bytearray | None = bytearray()
        self.unsent = bytearray()  # DATA waiting for the stream's and the connection's window
        self.closing = False
        self.lost = False
        self.ended = False  # END_STREAM or RST_STREAM sent
        # An extended CONNECT. The client's END_STREAM ends a WebSocket; after a plain
        # request it is only the request's end.
        self.upgrade = upgrade
        self.reading_paused = False
        self.writing_paused = False
        # DATA held while reading is paused: (bytes, flow-controlled length), unacknowledged.
        self.received: list[tuple[bytes, int]] = []
        self.eof_waiting = False
        self.high_water = 64 * 1024
        self.low_water = 16 * 1024

    # -- asyncio.Transport ------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            # The socket is the connection's, shared by every stream: nothing per stream in it.
            return default
        if name == "http2_stream_id":
            return self.stream_id
        if name == "wsgate_client":
            # (ip, address) of the client as its connection resolved it (PROXY protocol).
            return self.session.client_ip, self.session.client_address
        return self.session.transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def is_closing(self) -> bool:
        return self.closing or self.lost

    def is_reading(self) -> bool:
        return not self.reading_paused and not self.lost

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self.session.deliver(self)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        self.high_water, self.low_water = high, high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low_water, self.high_water

    def get_write_buffer_size(self) -> int:
        return len(self.unsent)

    def can_write_eof(self) -> bool:
        return False  # no half-close: END_STREAM ends the WebSocket

    def write_eof(self) -> None:
        raise NotImplementedError("an HTTP/2 stream is ended by close()")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.lost:
            return
        head = self.head
        if head is not None:
            head += data
            end = head.find(_HEAD_END)
            if end < 0:
                return
            self.head = None
            data = bytes(head[end + 4 :])
            self.session.send_response(self, bytes(head[: end + 4]))
            if self.lost:
                return
        if data:
            self.unsent += data
            self.session.send_unsent(self)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def close(self) -> None:
        if self.closing or self.lost:
            return
        self.closing = True
        self.session.send_unsent(self)

    def abort(self) -> None:
        if self.lost:
            return
        self.unsent.clear()
        self.session.reset(self, ErrorCodes.CANCEL)
        self.lose(None)

    # -- the session's side -------------------------------------------------------

    def lose(self, exc: Exception | None) -> None:
        """The stream is over for its protocol: connection_lost, on the loop's next turn."""
        if self.lost:
            return
        self.lost = True
        self.closing = True
        self.received.clear()
        self.session.forget(self)
        if self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, exc)


class Http2Session(asyncio.Protocol):
    """One client's HTTP/2 connection: its `H2Connection` and its streams."""

    def __init__(
        self,
        books: Books,
        listener: Listener,
        transport: asyncio.Transport,
        client_ip: str,
        client_address: str,
        counted_ip: str | None,
        stream_protocol: Callable[[], asyncio.Protocol],
    ) -> None:
        self.books = books
        self.stream_protocol = stream_protocol  # each stream's upgrade phase
        self.listener = listener
        self.transport = transport
        self.client_ip = client_ip
        self.client_address = client_address
        self.counted_ip = counted_ip  # the admission of the TCP connection, given back at its end
        self.streams: dict[int, StreamTransport] = {}
        self.going_away = False
        self.lost = False
        self.writing_paused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        config = books.config
        # Each stream may hold a window of unread DATA: as much as a relay leg buffers.
        self.stream_window = min(_MAX_WINDOW, config.flow_control.high_water)
        self.max_streams = listener.http2_max_streams
        self.conn = h2.connection.H2Connection(
            # Headers are checked by request_head, as a stream's error: h2's own checks would end
            # the connection, with every WebSocket on it, for one malformed request.
            config=h2.config.H2Configuration(
                client_side=False, header_encoding=None, validate_inbound_headers=False
            )
        )
        self.conn.incoming_buffer = _FrameBuffer(server=True)
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                _SETTINGS.ENABLE_CONNECT_PROTOCOL: 1,
                _SETTINGS.INITIAL_WINDOW_SIZE: self.stream_window,
                _SETTINGS.MAX_HEADER_LIST_SIZE: config.limits.max_header_bytes,
            },
        )

    def start(self, early: bytes) -> None:
        """Take the connection over: send the server preface, then read what came with the handshake."""
        conn = self.conn
        conn.initiate_connection()
        # The stream limit goes in a SETTINGS frame of its own, built here: h2 would enforce a
        # limit it sent itself with a connection error, ending every stream on the connection,
        # where RFC 9113 5.1.2 allows refusing only the stream over it, which _on_request does.
        self.transport.write(
            conn.data_to_send()
            + SettingsFrame(0, settings={_SETTINGS.MAX_CONCURRENT_STREAMS: self.max_streams}).serialize()
        )
        connection_window = min(_MAX_WINDOW, self.stream_window * self.max_streams)
        if connection_window > conn.inbound_flow_control_window:
            conn.increment_flow_control_window(connection_window - conn.inbound_flow_control_window)
        self.books.sessions.add(self)
        self.transport.set_protocol(self)
        self._write_out()
        self._arm_idle_timer()
        if early:
            self.data_received(early)

    # -- asyncio callbacks --------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.lost:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        try:
            for event in events:
                self._on_event(event)
        except Exception:
            log.exception("conn=%s %s HTTP/2 event handling failed", id(self), self.client_address)
            self._end_all(ErrorCodes.INTERNAL_ERROR)
            return
        self._write_out()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        for stream in list(self.streams.values()):
            stream.lose(exc or ConnectionResetError("the HTTP/2 connection was lost"))
        self.books.sessions.discard(self)
        self.books.release(self.counted_ip)

    def pause_writing(self) -> None:
        # The client reads nothing: every stream stops, and so does reading its requests.
        self.writing_paused = True
        self.transport.pause_reading()
        for stream in list(self.streams.values()):
            if not stream.writing_paused and stream.protocol is not None:
                stream.writing_paused = True
                stream.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.transport.resume_reading()
        for stream in list(self.streams.values()):
            if stream.writing_paused and len(stream.unsent) <= stream.low_water and stream.protocol:
                stream.writing_paused = False
                stream.protocol.resume_writing()

    # -- events ---------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self._acknowledge(event.flow_controlled_length, event.stream_id)
                return
            if stream.reading_paused or stream.received:
                stream.received.append((event.data, event.flow_controlled_length))
                return
            self._acknowledge(event.flow_controlled_length, event.stream_id)
            if event.data and stream.protocol is not None:
                stream.protocol.data_received(event.data)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event.stream_id, event.headers)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self.send_unsent(stream)
            else:
                self._send_all_unsent()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.upgrade:
                stream.eof_waiting = True
                self.deliver(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.ended = True  # nothing more may be sent on it
                stream.lose(ConnectionResetError(f"stream reset by the client ({event.error_code!r})"))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if _SETTINGS.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._send_all_unsent()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # h2 sends nothing after a GOAWAY either way: what is open is lost.
            self._end_all(None)

    def _on_request(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        metrics = self.books.metrics
        if self.going_away or len(self.streams) >= self.max_streams:
            metrics.handshake_rejections.inc("stream_limit")
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        try:
            head, upgrade = request_head(headers, websocket_key(os.urandom(16)))
        except HandshakeError as exc:
            log.info("%s HTTP/2 stream %d rejected: %s", self.client_address, stream_id, exc.reason)
            metrics.handshake_rejections.inc("bad_request")
            metrics.connections.inc("", "rejected", PROTOCOL)
            self.books.log_access(
                self.client_address, "", "", b"", exc.status, 0.0, exc.reason, None, protocol=PROTOCOL
            )
            body = (exc.reason + "\n").encode("utf-8")
            self.conn.send_headers(
                stream_id,
                [(b":status", b"%d" % exc.status), (b"content-type", b"text/plain; charset=utf-8"),
                 (b"content-length", b"%d" % len(body))],
            )
            self.conn.send_data(stream_id, body, end_stream=True)
            return
        stream = StreamTransport(self, stream_id, upgrade)
        self.streams[stream_id] = stream
        if self.writing_paused:
            stream.writing_paused = True
        protocol = self.stream_protocol()
        stream.protocol = protocol
        protocol.connection_made(stream)
        if not stream.is_closing():
            protocol.data_received(head)

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        log.info("%s HTTP/2 protocol error: %s", self.client_address, exc)
        code = getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR)
        self._end_all(code)

    def _end_all(self, error_code: int | None) -> None:
        """End the connection: GOAWAY with `error_code` (None: none), every stream lost."""
        if error_code is not None:
            try:
                self.conn.close_connection(error_code=error_code)
            except h2.exceptions.ProtocolError:
                pass
            self._write_out()
        for stream in list(self.streams.values()):
            stream.ended = True
            stream.lose(ConnectionResetError("the HTTP/2 connection ended"))
        self.transport.close()

    # -- what the streams ask for -----------------------------------------------------

    def send_response(self, stream: StreamTransport, head: bytes) -> None:
        """The gateway's reply head to `stream`, as HTTP/2 headers."""
        status, headers = response_headers(head)
        if status != 200 or not stream.upgrade:
            # A refusal or a page: its body follows, then close() ends the stream.
            stream.upgrade = False
        self.conn.send_headers(stream.stream_id, headers)
        self._write_out()

    def send_unsent(self, stream: StreamTransport) -> None:
        """Send what the windows allow of `stream`'s bytes; END_STREAM once all went, if closing."""
        if stream.ended or self.lost:
            return
        conn, unsent, stream_id = self.conn, stream.unsent, stream.stream_id
        if unsent:
            frame_size = conn.max_outbound_frame_size
            sent = 0
            view = memoryview(unsent)
            try:
                while sent < len(unsent):
                    size = min(conn.local_flow_control_window(stream_id), frame_size, len(unsent) - sent)
                    if size <= 0:
                        break
                    conn.send_data(stream_id, view[sent : sent + size].tobytes())
                    sent += size
            finally:
                view.release()
            del unsent[:sent]
        if stream.closing and not unsent and not stream.lost:
            stream.ended = True
            if stream.head is not None:
                conn.send_headers(stream_id, [(b":status", b"502")], end_stream=True)
            else:
                conn.end_stream(stream_id)
            self._write_out()
            stream.lose(None)
            return
        self._write_out()
        size = len(unsent)
        if stream.protocol is None:
            return
        if size > stream.high_water:
            if not stream.writing_paused:
                stream.writing_paused = True
                stream.protocol.pause_writing()
        elif stream.writing_paused and size <= stream.low_water and not self.writing_paused:
            stream.writing_paused = False
            stream.protocol.resume_writing()

    def _send_all_unsent(self) -> None:
        for stream in list(self.streams.values()):
            if stream.unsent or stream.closing:
                self.send_unsent(stream)

    def deliver(self, stream: StreamTransport) -> None:
        """Give `stream`'s protocol the DATA held while its reading was paused, then its EOF."""
        protocol = stream.protocol
        while stream.received and not stream.reading_paused and not stream.lost:
            data, length = stream.received.pop(0)
            self._acknowledge(length, stream.stream_id)
            if data and protocol is not None:
                protocol.data_received(data)
        if stream.eof_waiting and not stream.received and not stream.lost:
            stream.eof_waiting = False
            keep_open = protocol.eof_received() if protocol is not None else False
            if not keep_open:
                stream.close()
        self._write_out()

    def reset(self, stream: StreamTransport, error_code: int) -> None:
        if stream.ended or self.lost:
            return
        stream.ended = True
        try:
            self.conn.reset_stream(stream.stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            pass
        self._write_out()

    def forget(self, stream: StreamTransport) -> None:
        """`stream` is over: a later stream may take its place; the last one closes a draining session."""
        if not stream.ended and not self.lost:
            # Lost without an end sent (its protocol's loss): reset, so the client knows.
            self.reset(stream, ErrorCodes.CANCEL)
        self.streams.pop(stream.stream_id, None)
        if not self.streams:
            if self.going_away:
                self.transport.close()
            else:
                self._arm_idle_timer()

    def go_away(self) -> None:
        """Drain: GOAWAY, so the client opens no more streams; the connection ends with its last one.

        h2 moves its whole connection to CLOSED when it sends a GOAWAY, and would send
        nothing more on the open streams, so this GOAWAY frame is built and sent here.
        """
        if self.going_away or self.lost:
            return
        self.going_away = True
        self._write_out()
        frame = GoAwayFrame(stream_id=0)
        frame.last_stream_id = self.conn.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self.transport.write(frame.serialize())
        if not self.streams:
            self.transport.close()

    def _acknowledge(self, length: int, stream_id: int) -> None:
        if length:
            try:
                self.conn.acknowledge_received_data(length, stream_id)
            except h2.exceptions.ProtocolError:
                pass  # the connection is closing; no window matters any more

    def _arm_idle_timer(self) -> None:
        idle = self.books.config.timeouts.idle
        if idle and self.idle_timer is None and not self.lost:
            self.idle_timer = asyncio.get_running_loop().call_later(idle, self._on_idle)

    def _on_idle(self) -> None:
        self.idle_timer = None
        if not self.streams:
            log.info("%s HTTP/2 connection idle with no stream: closing", self.client_address)
            self.go_away()

    def _write_out(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)
