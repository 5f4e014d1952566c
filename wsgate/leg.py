"""One leg of a relay: the asyncio Protocol of one side of a proxied connection after the 101.

A leg scans what it reads with a `FrameScanner` and writes it, byte for byte, to
its peer leg; anything that needs a decision (control frames, violations,
requested frame boundaries) goes to its relay. Its close handshake is a
`CloseState`, moved only through `wsgate.closing.next_state`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import NamedTuple, Protocol

from .closing import BACKEND, GATEWAY, CloseEvent, CloseState, next_state
from .errors import ProtocolError
from .frames import FrameScanner, build_close, build_frame
from .turns import Turns

if sys.platform == "linux":
    from fcntl import ioctl
    from termios import TIOCOUTQ  # the same request as SIOCOUTQ on a TCP socket
else:
    ioctl = None

# A read this large means the peer has more waiting. uvloop goes on reading a socket while
# its reads fill the buffer (up to 32 of 256 kB in one turn), so a leg that got one yields
# its turn: it pauses reading until a later turn of the loop (see Turns).
TURN_READ_SIZE = 64 * 1024

# The per-connection limits a client can go over, as metric labels.
FRAME_RATE = "frame_rate"

# os.urandom drawn in blocks: a mask key or ping payload per frame needs no system call.
_ENTROPY_BLOCK = 4096
_entropy = b""
_entropy_used = 0

_CLOSE_SENT = CloseState.CLOSE_SENT
_LOST = CloseState.LOST


def unacknowledged_size(fd: int) -> int:
    """Bytes in socket `fd`'s kernel send queue: not sent, or not acknowledged yet; 0 where unknown."""
    if ioctl is None or fd < 0:
        return 0
    try:
        return int.from_bytes(ioctl(fd, TIOCOUTQ, b"\0\0\0\0"), sys.byteorder)
    except OSError:
        return 0


def random_bytes(count: int) -> bytes:
    """`count` bytes from the OS's random source, taken from a block read ahead."""
    global _entropy, _entropy_used
    if _entropy_used + count > len(_entropy):
        _entropy, _entropy_used = os.urandom(max(_ENTROPY_BLOCK, count)), 0
    start = _entropy_used
    _entropy_used += count
    return _entropy[start : start + count]


class LegOwner(Protocol):
    """What a leg needs from its relay."""

    turns: Turns

    def forward(self, src: Leg, items: list) -> None: ...

    def on_violation(self, src: Leg, exc: ProtocolError) -> None: ...

    def on_over_limit(self, src: Leg, limit: str, reason: str) -> None: ...

    def on_leg_lost(self, leg: Leg) -> None: ...


class LegCounts(NamedTuple):
    """What one leg counted since it last handed its counts over (see `Leg.take_counts`)."""

    side: str
    frames: int
    messages: int
    size: int  # bytes received
    payload: int  # payload bytes of the `messages` completed
    pauses: int  # times reading stopped for flow control
    rtts: list[float] | None  # round trips of the gateway's answered pings


class Leg(asyncio.Protocol):
    """One side of a relay; what it reads, it scans and writes to its peer leg."""

    __slots__ = (
        "relay",
        "side",
        "transport",
        "socket_fd",
        "peer",
        "scanner",
        "mask_frames",
        "forwarding",
        "write_to_peer",
        "data_reads",
        "bytes_received",
        "bytes_withheld",
        "bytes_injected",
        "queued",
        "state",
        "close_written",
        "reading_paused",
        "yielding",
        "ping_payload",
        "ping_sent_at",
        "ping_clock",
        "pong_wait_from",
        "gone_seen",
        "quiet_since",
        "bytes_seen",
        "pauses",
        "rtts",
        "counted_frames",
        "counted_messages",
        "counted_bytes",
        "counted_payload",
        "counted_pauses",
    )

    def __init__(
        self, relay: LegOwner, side: str, transport: asyncio.Transport, scanner: FrameScanner
    ) -> None:
        self.relay = relay
        self.side = side
        self.transport = transport
        self.socket_fd = -1  # set by Relay.start, for the kernel's send queue
        self.peer: Leg = self  # set by Relay once both legs exist
        self.scanner = scanner
        # The gateway is the backend's client, so frames it writes there are masked.
        self.mask_frames = side == BACKEND
        # True while this leg's reads may be written to the peer without a look.
        self.forwarding = True
        self.write_to_peer = transport.write  # replaced by the peer's write in Relay.__init__
        self.data_reads = 0
        self.bytes_received = 0
        # Bytes received but not passed on: the pongs that answer the gateway's pings.
        self.bytes_withheld = 0
        # Bytes of the gateway's own frames written to this leg.
        self.bytes_injected = 0
        # Gateway frames waiting for the stream toward this leg to reach a boundary.
        self.queued: list[bytes] = []
        self.state = CloseState.OPEN
        # (code, sender) of the Close frame written to this leg, for the access log.
        self.close_written: tuple[int | None, str] | None = None
        self.reading_paused = False
        self.yielding = False  # reading stopped until the loop's next turn (see TURN_READ_SIZE)
        # None until the gateway pings this leg, so no peer pong can match it by accident.
        self.ping_payload: bytes | None = None
        self.ping_sent_at = 0.0
        # The same moment on a fine clock, for the round trip: uvloop's loop clock
        # counts whole milliseconds, coarser than a round trip in one data centre.
        self.ping_clock = 0.0
        # While a ping is unanswered: the pong's wait runs from here, the ping or the
        # last look that found bytes gone toward the peer (None before the first look).
        self.pong_wait_from = 0.0
        self.gone_seen: int | None = None
        self.quiet_since = 0.0
        self.bytes_seen = 0
        self.pauses = 0  # times reading this leg stopped for flow control
        # Round trips of the gateway's answered pings since the counts were last taken;
        # None until the first, so idle connections carry no list.
        self.rtts: list[float] | None = None
        # What take_counts has already handed over.
        self.counted_frames = 0
        self.counted_messages = 0
        self.counted_bytes = 0
        self.counted_payload = 0
        self.counted_pauses = 0

    @property
    def payload_received(self) -> int:
        """Payload bytes of data frames received so far, without frame headers or control frames."""
        scanner = self.scanner
        return self.bytes_received - scanner.framing_bytes - scanner.held_size

    @property
    def sealed(self) -> bool:
        """True once nothing more may be written to this leg: a Close went to it, or it is lost."""
        return self.state >= _CLOSE_SENT

    @property
    def lost(self) -> bool:
        """True once this leg's connection is gone."""
        return self.state is _LOST

    def move(self, event: CloseEvent) -> None:
        """Advance the close state; a move the table forbids raises CloseStateError."""
        self.state = next_state(self.state, event)

    def take_counts(self) -> LegCounts | None:
        """What this leg counted since the last call, handed over once; None when nothing happened."""
        rtts = self.rtts
        self.rtts = None
        size = self.bytes_received - self.counted_bytes
        pauses = self.pauses - self.counted_pauses
        if not size and not pauses:
            # Nothing arrived: no frame, no message either.
            return None if rtts is None else LegCounts(self.side, 0, 0, 0, 0, 0, rtts)
        scanner = self.scanner
        frames = scanner.frames - self.counted_frames
        messages = scanner.messages - self.counted_messages
        self.counted_frames = scanner.frames
        self.counted_messages = scanner.messages
        self.counted_bytes = self.bytes_received
        self.counted_pauses = self.pauses
        payload = 0
        if messages:
            # Payload of a message still arriving counts with the next one to complete.
            received = self.payload_received
            payload = received - self.counted_payload
            self.counted_payload = received
        return LegCounts(self.side, frames, messages, size, payload, pauses, rtts)

    # -- asyncio callbacks --------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # The hot path: one scan, two integer additions, one write.
        size = len(data)
        self.bytes_received += size
        if size >= TURN_READ_SIZE and not self.yielding:
            self._yield_turn()
        try:
            out = self.scanner.receive_data(data)
        except ProtocolError as exc:
            self.relay.on_violation(self, exc)
            return
        if out is data and self.forwarding:
            self.data_reads += 1
            self.write_to_peer(data)
            return
        self.relay.forward(self, [data] if out is data else out)

    def eof_received(self) -> bool:
        # WebSocket has no half-close: an EOF ends this side; connection_lost follows.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.on_leg_lost(self)

    def _yield_turn(self) -> None:
        self.yielding = True
        self.transport.pause_reading()
        self.relay.turns.later(self.end_turn)

    def end_turn(self) -> None:
        """Its turn has come: read again, unless flow control says otherwise."""
        self.yielding = False
        if not self.reading_paused and self.state is not _LOST:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.peer.reading_paused = True
        self.peer.pauses += 1
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.reading_paused = False
        self.peer.quiet_since = asyncio.get_running_loop().time()
        if not self.peer.yielding:
            self.peer.transport.resume_reading()

    # -- writing the gateway's own frames -------------------------------------------

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """Write a gateway frame to this leg, at the next boundary of the stream toward it."""
        if self.state >= _CLOSE_SENT or self.transport.is_closing():
            return
        frame = build_frame(opcode, payload, mask_key=random_bytes(4) if self.mask_frames else None)
        self._inject(frame)

    def send_close(self, code: int, reason: str = "") -> None:
        """Write a gateway Close to this leg; nothing is written after it."""
        if self.state >= _CLOSE_SENT or self.transport.is_closing():
            return
        frame = build_close(code, reason, mask_key=random_bytes(4) if self.mask_frames else None)
        self._inject(frame)
        self.move(CloseEvent.SEND_CLOSE)
        self.close_written = (code, GATEWAY)

    def _inject(self, frame: bytes) -> None:
        source = self.peer.scanner
        if source.at_boundary and not self.queued:
            self.bytes_injected += len(frame)
            self.transport.write(frame)
            return
        self.queued.append(frame)
        source.want_boundary = True
        self.peer.forwarding = False

    def flush_queued(self) -> None:
        """The stream toward this leg is at a frame boundary: write what waited."""
        if self.queued:
            frames = b"".join(self.queued)
            self.bytes_injected += len(frames)
            self.transport.write(frames)
            self.queued.clear()

    def bytes_gone(self) -> int:
        """How many of the bytes written to this leg have left the gateway, as a running count.

        Written: what the peer leg read, less the pongs it withheld, plus the
        gateway's own frames. Not gone: what waits in the write buffer and, on
        Linux, in the kernel's send queue until the peer acknowledges it. Only a
        rise of the count before any close means something: a partial frame the
        scanner holds, or the overhead of TLS records, shifts it by a few bytes.
        """
        peer = self.peer
        written = peer.bytes_received - peer.bytes_withheld + self.bytes_injected
        return written - self.transport.get_write_buffer_size() - unacknowledged_size(self.socket_fd)


class RateLimitedLeg(Leg):
    """A client leg whose frames draw on a token bucket, filled at `frame_rate` up to `frame_burst`.

    The bucket is charged once per read, with the frames the scanner completed in
    it and one clock read, so a flood of tiny frames costs no Python per frame.
    """

    __slots__ = ("frame_rate", "frame_burst", "frame_tokens", "frames_charged", "charged_at")

    def __init__(
        self,
        relay: LegOwner,
        side: str,
        transport: asyncio.Transport,
        scanner: FrameScanner,
        *,
        frame_rate: float,
        frame_burst: int,
    ) -> None:
        super().__init__(relay, side, transport, scanner)
        self.frame_rate = frame_rate
        self.frame_burst = frame_burst
        self.frame_tokens = float(frame_burst)
        self.frames_charged = 0
        self.charged_at = time.monotonic()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        frames = self.scanner.frames
        if frames == self.frames_charged:
            return  # no frame ended in this read: nothing to charge
        now = time.monotonic()
        tokens = self.frame_tokens + (now - self.charged_at) * self.frame_rate
        if tokens > self.frame_burst:
            tokens = self.frame_burst
        self.frame_tokens = tokens - (frames - self.frames_charged)
        self.frames_charged = frames
        self.charged_at = now
        if self.frame_tokens < 0 and self.state < _CLOSE_SENT:
            self.relay.on_over_limit(self, FRAME_RATE, "frame rate limit exceeded")
