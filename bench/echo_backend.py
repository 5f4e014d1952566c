"""A fast WebSocket backend for the benchmark: `python -m bench.echo_backend --port 0`.

The request path picks the mode:

- `/echo32`: echo of fixed 32-byte binary messages by arithmetic. The load
  generator sends identical frames with a zero mask key, so the backend counts
  the complete 38-byte frames in each read and writes back as many prebuilt
  34-byte replies, with no per-message work. A read that starts at a frame
  boundary with anything other than a binary frame (a Close, a ping) switches
  the connection to the streaming parser below.
- `/echo`: a streaming echo of any frames. Each header is parsed, the unmasked
  header is written at once and the payload is forwarded in slices as it
  arrives (unmasked in C when the key is not zero, as behind the aiohttp proxy).
  Close is answered with Close, ping with pong.
- `/push?size=N`: after the 101, prebuilt N-byte binary frames are written for
  as long as the transport accepts them (pause_writing/resume_writing).
- `/discard`: after the 101, everything read is counted and dropped, unparsed,
  but for a Close at the start of a read, which is answered.
- `GET /stats` (plain HTTP): `{"open": N, "accepted": N, "discarded": N}`, the
  open WebSocket connections (so the benchmark can wait until a run is torn
  down before the next one), the TCP connections accepted so far and the bytes
  dropped by `/discard` connections.

It prints `listening on HOST:PORT` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import cast

import uvloop

from .wire import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    SMALL_PAYLOAD,
    ZERO_MASK,
    accept_key,
    apply_mask,
    client_frame,
    frame_header,
    header_value,
    push_payload,
    raise_nofile,
    server_frame,
    set_nodelay,
)

_REQUEST_FRAME = len(client_frame(SMALL_PAYLOAD))  # 38
_REPLY = server_frame(SMALL_PAYLOAD)  # 34 bytes
_BATCH = 4096
_REPLIES = memoryview(_REPLY * _BATCH)
_MAX_HEAD = 64 * 1024
# A push connection writes at most this much per loop iteration, so a fast
# reader can never make the pump monopolise the loop.
_PUSH_BURST = 4 * 1024 * 1024

# Open WebSocket connections, TCP connections accepted and bytes discarded, for /stats.
_stats = {"open": 0, "accepted": 0, "discarded": 0}


class _Handshake(asyncio.Protocol):
    """Reads the upgrade request, answers the 101 and hands the transport to a mode protocol."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        set_nodelay(transport.get_extra_info("socket"))
        _stats["accepted"] += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEAD:
                self._reply(400, b"head too large")
            return
        head = bytes(self.buf[:end])
        rest = bytes(self.buf[end + 4 :])
        target = head.split(b"\r\n", 1)[0].split(b" ")
        path, _, query = (target[1] if len(target) > 2 else b"").partition(b"?")
        if path == b"/stats":
            _stats["accepted"] -= 1  # asking is not one of the connections counted
            self._reply(200, json.dumps(_stats).encode())
            return
        key = header_value(head, b"sec-websocket-key")
        if key is None:
            self._reply(400, b"not a WebSocket upgrade")
            return
        mode: asyncio.Protocol
        if path == b"/echo32":
            mode = _Echo32(self.transport)
        elif path == b"/echo":
            mode = _Stream(self.transport, echo=True)
        elif path == b"/discard":
            mode = _Discard(self.transport)
        elif path == b"/push":
            params = dict(p.partition(b"=")[::2] for p in query.split(b"&") if p)
            try:
                size = int(params.get(b"size", b"65536"))
            except ValueError:
                size = -1
            if not 0 <= size <= 1 << 30:
                self._reply(400, b"bad size")
                return
            mode = _Push(self.transport, size)
        else:
            self._reply(404, b"unknown path")
            return
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
        )
        _stats["open"] += 1
        self.transport.set_protocol(mode)
        if isinstance(mode, _Push):
            mode.start()
        if rest:
            mode.data_received(rest)

    def _reply(self, status: int, body: bytes) -> None:
        self.transport.write(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        self.transport.close()


class _Upgraded(asyncio.Protocol):
    """Common end of life for upgraded connections."""

    __slots__ = ()

    def connection_lost(self, exc: Exception | None) -> None:
        _stats["open"] -= 1


class _Echo32(_Upgraded):
    __slots__ = ("transport", "pending")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.pending = 0  # bytes of an incomplete request frame carried to the next read

    def data_received(self, data: bytes) -> None:
        pending = self.pending
        if pending == 0 and data[0] != 0x82:
            # Not one of the fixed frames: parse properly from here on.
            stream = _Stream(self.transport, echo=True)
            self.transport.set_protocol(stream)
            stream.data_received(data)
            return
        count, self.pending = divmod(pending + len(data), _REQUEST_FRAME)
        write = self.transport.write
        while count > _BATCH:
            write(_REPLIES)
            count -= _BATCH
        if count:
            write(_REPLIES[: count * len(_REPLY)])


class _Discard(_Upgraded):
    __slots__ = ("transport",)

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        _stats["discarded"] += len(data)
        # A peer's Close comes in a write of its own, so it starts a read: answer it. A read
        # that starts mid-frame could look the same only if the data held these two bytes.
        if data[0] == 0x80 | OP_CLOSE and len(data) > 1 and data[1] & 0x80:
            self.transport.write(server_frame(b"\x03\xe8", OP_CLOSE))
            self.transport.close()


class _Stream(_Upgraded):
    """Incremental frame parser; echoes data frames (when `echo`) and answers control frames."""

    def __init__(self, transport: asyncio.Transport, echo: bool) -> None:
        self.transport = transport
        self.echo = echo
        self.partial = b""  # an incomplete frame header carried to the next read
        self.left = 0  # payload bytes of the current frame still to come
        self.key: bytes | None = None  # non-zero mask key of the current frame
        self.key_offset = 0
        self.control: bytearray | None = None  # payload of the current control frame
        self.opcode = 0
        self.closed = False
        transport.set_write_buffer_limits(high=1 << 20)

    # Bounded memory: stop reading while our echoes are not being read.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.partial:
            data = self.partial + data
            self.partial = b""
        view = memoryview(data)
        pos, end = 0, len(data)
        write = self.transport.write
        while pos < end:
            if self.left:
                take = min(self.left, end - pos)
                chunk: memoryview | bytearray = view[pos : pos + take]
                if self.key is not None:
                    chunk = self._unmask(view[pos : pos + take])
                if self.control is not None:
                    self.control += chunk
                elif self.echo:
                    write(chunk)
                pos += take
                self.left -= take
                if not self.left and self.control is not None:
                    self._on_control()
                    if self.closed:
                        return
                continue
            if end - pos < 2:
                break
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if b1 & 0x80 else 0)
            if end - pos < size:
                break
            if length == 126:
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif length == 127:
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            key = bytes(data[pos + size - 4 : pos + size]) if b1 & 0x80 else ZERO_MASK
            self.key = None if key == ZERO_MASK else key
            self.key_offset = 0
            self.opcode = b0 & 0x0F
            pos += size
            self.left = length
            if self.opcode >= 8:
                self.control = bytearray()
                if not length:
                    self._on_control()
            else:
                self.control = None
                if self.echo:
                    write(frame_header(b0, length, None))
            if self.closed:
                return
        if pos < end:
            self.partial = bytes(data[pos:])

    def _unmask(self, chunk: memoryview) -> bytearray:
        turn = self.key_offset % 4
        assert self.key is not None
        key = self.key[turn:] + self.key[:turn]
        out = bytearray(chunk)
        apply_mask(key, out)
        self.key_offset += len(out)
        return out

    def _on_control(self) -> None:
        payload = bytes(self.control or b"")
        self.control = None
        if self.opcode == OP_CLOSE:
            self.transport.write(server_frame(payload[:2], OP_CLOSE))
            self.closed = True
            self.transport.close()
        elif self.opcode == OP_PING:
            self.transport.write(server_frame(payload, OP_PONG))


class _Push(_Stream):
    """Writes prebuilt frames while the transport's buffer has room; parses input for Close/ping."""

    def __init__(self, transport: asyncio.Transport, size: int) -> None:
        super().__init__(transport, echo=False)
        self.frame = server_frame(push_payload(size))
        # Keep a couple of frames queued so the socket never runs dry, but never more.
        transport.set_write_buffer_limits(high=max(2 * len(self.frame), 256 * 1024))
        self.paused = False

    def start(self) -> None:
        asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        written = 0
        write = self.transport.write
        while not self.paused and not self.closed and written < _PUSH_BURST:
            if self.transport.is_closing():
                return
            write(self.frame)
            written += len(self.frame)
        if not self.paused and not self.closed and not self.transport.is_closing():
            asyncio.get_running_loop().call_soon(self._pump)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        if self.paused:
            self.paused = False
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        super().connection_lost(exc)


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(_Handshake, host, port, reuse_address=True, backlog=4096)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    raise_nofile()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
