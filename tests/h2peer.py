"""A WebSocket-over-HTTP/2 client (RFC 8441) for the tests, driven by the `h2` library over real TLS.

`H2Client.connect(port, context)` opens a TLS connection offering only `h2`,
reads the server's SETTINGS and runs a reader task that feeds `H2Connection`
and hands each stream its events. `client.websocket(path)` sends an extended
CONNECT and returns a `ClientStream` whose `send`, `send_message` and `frame`
speak WebSocket frames as DATA. A stream's reading can be held (`hold()`): its
DATA is then kept unacknowledged, so no WINDOW_UPDATE tells the gateway it was read.

h2 moves a client's whole connection to CLOSED when a GOAWAY arrives, and then
refuses the frames of the streams the GOAWAY lets finish (RFC 9113 6.8); after a
graceful GOAWAY (NO_ERROR) the client here puts the connection back to open.
"""

from __future__ import annotations

import asyncio
import ssl
import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from codec import close_payload, decode_frames, encode_frame
from peers import STEP_TIMEOUT

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8
MASK = b"\x0a\x0b\x0c\x0d"
CONNECTION_WINDOW = 64 * 1024 * 1024


def frame_size(buffer: bytes | bytearray) -> int | None:
    """The length of the whole frame at the start of `buffer`, or None while it is incomplete."""
    if len(buffer) < 2:
        return None
    length, head = buffer[1] & 0x7F, 2
    if length == 126:
        if len(buffer) < 4:
            return None
        (length,) = struct.unpack_from("!H", buffer, 2)
        head = 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        (length,) = struct.unpack_from("!Q", buffer, 2)
        head = 10
    total = head + (4 if buffer[1] & 0x80 else 0) + length
    return total if len(buffer) >= total else None


class ClientStream:
    """One stream: the response headers, its DATA as bytes, how it ended."""

    def __init__(self, client: H2Client, stream_id: int) -> None:
        self.client = client
        self.stream_id = stream_id
        loop = asyncio.get_running_loop()
        self.response: asyncio.Future[dict[bytes, bytes]] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()  # END_STREAM from the gateway
        self.reset: asyncio.Future[int] = loop.create_future()  # RST_STREAM from the gateway: its code
        self.data = bytearray()
        self.arrived = asyncio.Event()
        self.held = False
        self.unacknowledged = 0  # flow-controlled bytes received while held
        self.window_opened = asyncio.Event()

    @property
    def status(self) -> int:
        return int(self.response.result()[b":status"])

    async def headers(self) -> dict[bytes, bytes]:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await asyncio.shield(self.response)

    def hold(self) -> None:
        """Stop acknowledging DATA: the gateway's send window for this stream closes."""
        self.held = True

    def release(self) -> None:
        """Acknowledge what was held, and what comes from now on."""
        self.held = False
        if self.unacknowledged:
            self.client.conn.acknowledge_received_data(self.unacknowledged, self.stream_id)
            self.unacknowledged = 0
            self.client.flush()

    async def send(self, data: bytes, end_stream: bool = False) -> None:
        """Send `data` as DATA, waiting for the gateway's windows as they allow."""
        conn, view = self.client.conn, memoryview(data)
        async with asyncio.timeout(STEP_TIMEOUT):
            while view:
                size = min(conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size,
                           len(view))
                if size <= 0:
                    self.window_opened.clear()
                    await self.window_opened.wait()
                    continue
                conn.send_data(self.stream_id, view[:size].tobytes())
                self.client.flush()
                view = view[size:]
                await self.client.writer.drain()
        if end_stream:
            self.end()

    def end(self) -> None:
        self.client.conn.end_stream(self.stream_id)
        self.client.flush()

    def cancel(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self.client.conn.reset_stream(self.stream_id, error_code)
        self.client.flush()

    async def send_message(self, payload: str | bytes) -> None:
        opcode = TEXT if isinstance(payload, str) else BINARY
        data = payload.encode() if isinstance(payload, str) else payload
        await self.send(encode_frame(opcode, data, key=MASK))

    async def send_close(self, code: int, reason: str = "") -> None:
        await self.send(encode_frame(CLOSE, close_payload(code, reason), key=MASK))

    async def frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next whole frame the gateway sent on this stream."""
        async with asyncio.timeout(STEP_TIMEOUT):
            while (size := frame_size(self.data)) is None:
                if self.client.error is not None:
                    raise AssertionError(f"the client's reader failed: {self.client.error!r}")
                if self.ended.done() or self.reset.done():
                    raise AssertionError(f"stream {self.stream_id} ended amid a frame: {bytes(self.data)!r}")
                self.arrived.clear()
                await self.arrived.wait()
        ((fin, rsv, opcode, key, payload),) = decode_frames(bytes(self.data[:size]))
        del self.data[:size]
        assert fin and key is None, (fin, key)  # the echo backends send whole, unmasked frames
        return opcode, payload

    async def message(self) -> str | bytes:
        opcode, payload = await self.frame()
        assert opcode in (TEXT, BINARY), (opcode, payload)
        return payload.decode() if opcode == TEXT else payload

    async def close_frame(self) -> tuple[int, str]:
        opcode, payload = await self.frame()
        assert opcode == CLOSE, (opcode, payload)
        return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    async def wait_ended(self) -> None:
        async with asyncio.timeout(STEP_TIMEOUT):
            await asyncio.shield(self.ended)

    async def wait_reset(self) -> int:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await asyncio.shield(self.reset)


class H2Client:
    """One HTTP/2 connection to the gateway, with its streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.streams: dict[int, ClientStream] = {}
        loop = asyncio.get_running_loop()
        self.settings: asyncio.Future[None] = loop.create_future()  # the server's first SETTINGS
        self.goaway: asyncio.Future[h2.events.ConnectionTerminated] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()  # the server closed the TCP connection
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None  # what stopped the reader, other than an EOF

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext, read: bool = True) -> H2Client:
        """Connected, its preface sent; with `read`, the server's SETTINGS read too."""
        context.set_alpn_protocols(["h2"])
        async with asyncio.timeout(STEP_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
            )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        client = cls(reader, writer)
        client.conn.initiate_connection()
        # A large connection window, so that a held stream (its own 64 KiB window full) never
        # holds up the others on the client's side.
        client.conn.increment_flow_control_window(CONNECTION_WINDOW)
        client.flush()
        if read:
            await client.start_reading()
        return client

    async def start_reading(self) -> None:
        self.task = asyncio.create_task(self._read())
        async with asyncio.timeout(STEP_TIMEOUT):
            await asyncio.shield(self.settings)

    @property
    def server_settings(self) -> h2.settings.Settings:
        return self.conn.remote_settings

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def request(self, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> ClientStream:
        stream_id = self.conn.get_next_available_stream_id()
        stream = self.streams[stream_id] = ClientStream(self, stream_id)
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()
        return stream

    def websocket(
        self,
        path: str = "/",
        extra: list[tuple[bytes, bytes]] | None = None,
        authority: bytes = b"gateway.test",
    ) -> ClientStream:
        """An extended CONNECT for a WebSocket at `path` (RFC 8441 4)."""
        headers = [
            (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
            (b":path", path.encode()), (b":authority", authority), (b"sec-websocket-version", b"13"),
        ]
        return self.request(headers + (extra or []))

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                for event in self.conn.receive_data(data):
                    self._on_event(event)
                self.flush()
        except (ConnectionError, ssl.SSLError):
            pass
        except Exception as exc:
            self.error = exc
        finally:
            if not self.closed.done():
                self.closed.set_result(None)
            for stream in self.streams.values():
                stream.arrived.set()
                stream.window_opened.set()

    def _on_event(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.settings.done():
                self.settings.set_result(None)
            for waiting in self.streams.values():
                waiting.window_opened.set()  # INITIAL_WINDOW_SIZE may have grown
        elif isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.response.set_result(dict(event.headers))
        elif isinstance(event, h2.events.DataReceived) and stream is not None:
            stream.data += event.data
            stream.arrived.set()
            if stream.held:
                stream.unacknowledged += event.flow_controlled_length
            else:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended.set_result(None)
            stream.arrived.set()
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset.set_result(event.error_code)
            stream.arrived.set()
        elif isinstance(event, h2.events.WindowUpdated):
            for waiting in (self.streams.values() if stream is None else [stream]):
                waiting.window_opened.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            if not self.goaway.done():
                self.goaway.set_result(event)
            if event.error_code == h2.errors.ErrorCodes.NO_ERROR:
                self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN

    async def wait_closed(self) -> None:
        async with asyncio.timeout(STEP_TIMEOUT):
            await asyncio.shield(self.closed)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
