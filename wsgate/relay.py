"""The relay of one proxied connection after the 101, frame by frame.

Two `asyncio.Protocol` legs, one per side, share one code path with src and dst
swapped. Each leg scans what it reads with a `FrameScanner` and writes the
frames, byte for byte, to the other leg; only control frames, protocol
violations and requested frame boundaries leave the fast path.

Close handshake rules, per leg:

- `close_received`: the peer on this leg sent a Close frame.
- `sealed`: a Close frame was written to this leg; nothing more is written to it.
- A leg whose peer both sent and was sent a Close is finished: its TCP
  connection is closed (after pending writes flush).
- The first Close, from either side or from the gateway, arms one deadline of
  `timeouts.close`; legs still unfinished then are dropped.

Liveness is judged by a single `Sweeper` for all relays: legs count the bytes
they receive and their data reads in plain integers, and the sweep compares
them with what it saw last time, so no timer is created per message or read.
A peer with a ping unanswered is also alive while the bytes sent toward it
keep leaving the gateway (see `Leg.bytes_gone`), since its pong may wait
behind a large message that it is still reading.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ProtocolError
from .frames import BOUNDARY, CloseCode, ControlFrame, FrameScanner, Opcode, build_close, build_frame
from .turns import Turns

log = logging.getLogger("wsgate.relay")

if sys.platform == "linux":
    from fcntl import ioctl
    from termios import TIOCOUTQ  # the same request as SIOCOUTQ on a TCP socket
else:
    ioctl = None

CLIENT = "client"
BACKEND = "backend"
GATEWAY = "gateway"

# Payload of the gateway's own pings; a pong echoing it is the gateway's to swallow.
_PING_PREFIX = b"wsgate-"

# A read this large means the peer has more waiting. uvloop goes on reading a socket while
# its reads fill the buffer (up to 32 of 256 kB in one turn), so a leg that got one yields
# its turn: it pauses reading until a later turn of the loop (see Turns).
TURN_READ_SIZE = 64 * 1024
# Legs that yielded which may read again in one turn: with hundreds of busy connections, a
# quiet one's message waits behind this many large reads, not one on every busy connection.
BULK_LEGS_PER_TURN = 16

# os.urandom drawn in blocks: a mask key or ping payload per frame needs no system call.
_ENTROPY_BLOCK = 4096
_entropy = b""
_entropy_used = 0


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


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """What a relay needs from the config, in seconds and bytes."""

    high_water: int
    low_water: int
    max_message_size: int
    close_timeout: float
    heartbeat_interval: float
    heartbeat_timeout: float
    idle_timeout: float
    # Frames a client may send a second, and at once; a rate of 0 means no limit.
    frame_rate: float = 0.0
    frame_burst: int = 0


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
        "pending",
        "close_received",
        "close_written",
        "sealed",
        "lost",
        "reading_paused",
        "yielding",
        "ping_payload",
        "ping_sent_at",
        "pong_wait_from",
        "gone_seen",
        "quiet_since",
        "bytes_seen",
        "pauses",
        "rtts",
        "flushed_frames",
        "flushed_messages",
        "flushed_bytes",
        "flushed_payload",
        "flushed_pauses",
    )

    def __init__(self, relay: Relay, side: str, transport: asyncio.Transport, scanner: FrameScanner) -> None:
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
        self.pending: list[bytes] = []
        self.close_received = False
        # (code, sender) of the Close frame written to this leg, for the access log.
        self.close_written: tuple[int | None, str] | None = None
        self.sealed = False
        self.lost = False
        self.reading_paused = False
        self.yielding = False  # reading stopped until the loop's next turn (see TURN_READ_SIZE)
        # None until the gateway pings this leg, so no peer pong can match it by accident.
        self.ping_payload: bytes | None = None
        self.ping_sent_at = 0.0
        # While a ping is unanswered: the pong's wait runs from here, the ping or the
        # last look that found bytes gone toward the peer (None before the first look).
        self.pong_wait_from = 0.0
        self.gone_seen: int | None = None
        self.quiet_since = 0.0
        self.bytes_seen = 0
        self.pauses = 0  # times reading this leg stopped for flow control
        # Round trips of the gateway's answered pings since the last metrics flush;
        # None until the first, so idle connections carry no list.
        self.rtts: list[float] | None = None
        # What the metrics have already been told (see Metrics.flush_relays).
        self.flushed_frames = 0
        self.flushed_messages = 0
        self.flushed_bytes = 0
        self.flushed_payload = 0
        self.flushed_pauses = 0

    @property
    def payload_received(self) -> int:
        """Payload bytes of data frames received so far, without frame headers or control frames."""
        scanner = self.scanner
        return self.bytes_received - scanner.framing_bytes - scanner.held_size

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
        self.relay.route(self, [data] if out is data else out)

    def eof_received(self) -> bool:
        # WebSocket has no half-close: an EOF ends this side; connection_lost follows.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.on_leg_lost(self)

    def _yield_turn(self) -> None:
        self.yielding = True
        self.transport.pause_reading()
        self.relay.turns.later(self.end_turn)

    def end_turn(self) -> None:
        """Its turn has come: read again, unless flow control says otherwise."""
        self.yielding = False
        if not self.reading_paused and not self.lost:
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
        if self.sealed or self.transport.is_closing():
            return
        frame = build_frame(opcode, payload, mask_key=random_bytes(4) if self.mask_frames else None)
        self._inject(frame)

    def send_close(self, code: int, reason: str = "") -> None:
        """Write a gateway Close to this leg; nothing is written after it."""
        if self.sealed or self.transport.is_closing():
            return
        frame = build_close(code, reason, mask_key=random_bytes(4) if self.mask_frames else None)
        self._inject(frame)
        self.sealed = True
        self.close_written = (code, GATEWAY)

    def _inject(self, frame: bytes) -> None:
        source = self.peer.scanner
        if source.at_boundary and not self.pending:
            self.bytes_injected += len(frame)
            self.transport.write(frame)
            return
        self.pending.append(frame)
        source.want_boundary = True
        self.peer.forwarding = False

    def flush_pending(self) -> None:
        """The stream toward this leg is at a frame boundary: write what waited."""
        if self.pending:
            frames = b"".join(self.pending)
            self.bytes_injected += len(frames)
            self.transport.write(frames)
            self.pending.clear()

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


# The per-connection limits a client can go over, as metric labels.
FRAME_RATE = "frame_rate"


class RateLimitedLeg(Leg):
    """A client leg whose frames draw on a token bucket, filled at `frame_rate` up to `frame_burst`.

    The bucket is charged once per read, with the frames the scanner completed in
    it and one clock read, so a flood of tiny frames costs no Python per frame.
    """

    __slots__ = ("frame_tokens", "frames_charged", "charged_at")

    def __init__(self, relay: Relay, side: str, transport: asyncio.Transport, scanner: FrameScanner) -> None:
        super().__init__(relay, side, transport, scanner)
        self.frame_tokens = float(relay.settings.frame_burst)
        self.frames_charged = 0
        self.charged_at = time.monotonic()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        frames = self.scanner.frames
        if frames == self.frames_charged:
            return  # no frame ended in this read: nothing to charge
        settings = self.relay.settings
        now = time.monotonic()
        tokens = self.frame_tokens + (now - self.charged_at) * settings.frame_rate
        if tokens > settings.frame_burst:
            tokens = settings.frame_burst
        self.frame_tokens = tokens - (frames - self.frames_charged)
        self.frames_charged = frames
        self.charged_at = now
        if self.frame_tokens < 0 and not self.sealed:
            self.relay.on_over_limit(self, FRAME_RATE, "frame rate limit exceeded")


class Relay:
    """Pairs a client transport with a backend transport until both are closed."""

    __slots__ = (
        "client",
        "backend",
        "settings",
        "conn_id",
        "_on_closed",
        "closed",
        "close_code",
        "closed_by",
        "_close_timer",
        "data_seen",
        "idle_since",
        "key",
        "member",
        "route_name",
        "started_at",
        "close_reason",
        "dead_side",
        "limit_exceeded",
        "turns",
        "__weakref__",
    )

    def __init__(
        self,
        client_transport: asyncio.Transport,
        backend_transport: asyncio.Transport,
        settings: RelaySettings,
        *,
        deflate: bool = False,
        conn_id: int = 0,
        on_closed: Callable[[Relay], None] | None = None,
        turns: Turns | None = None,
    ) -> None:
        limit = settings.max_message_size
        self.settings = settings
        client_leg = RateLimitedLeg if settings.frame_rate else Leg
        self.client = client_leg(
            self, CLIENT, client_transport,
            FrameScanner(masked=True, max_message_size=limit, allow_rsv1=deflate),
        )
        self.backend = Leg(
            self, BACKEND, backend_transport,
            FrameScanner(masked=False, max_message_size=limit, allow_rsv1=deflate),
        )
        self.client.peer = self.backend
        self.backend.peer = self.client
        self.client.write_to_peer = backend_transport.write
        self.backend.write_to_peer = client_transport.write
        self.conn_id = conn_id
        self._on_closed = on_closed
        self.closed = False
        self.close_code: int | None = None
        self.closed_by = ""
        self._close_timer: asyncio.TimerHandle | None = None
        self.data_seen = 0
        self.idle_since = 0.0
        # The affinity key, pool member and route name this connection is pinned to.
        self.key = b""
        self.member: object = None
        self.route_name = ""
        self.started_at = 0.0
        # Why the connection ended, in a few words, for the access log.
        self.close_reason = ""
        # The side dropped for not answering a heartbeat ping, if that is how it ended.
        self.dead_side = ""
        # The per-connection limit the client went over (FRAME_RATE), if that is how it ended.
        self.limit_exceeded = ""
        # Shared by all the gateway's relays, so busy legs take turns across connections.
        self.turns = Turns(BULK_LEGS_PER_TURN) if turns is None else turns

    def start(self, client_early: bytes = b"", backend_early: bytes = b"") -> None:
        """Take over both transports; bytes read during the handshake are relayed first."""
        now = asyncio.get_running_loop().time()
        self.idle_since = now
        self.started_at = time.perf_counter()  # for the duration, finer than the loop clock
        for leg in (self.client, self.backend):
            leg.quiet_since = now
            sock = leg.transport.get_extra_info("socket")
            if sock is not None:
                leg.socket_fd = sock.fileno()
            leg.transport.set_protocol(leg)
            # After set_protocol, so that an immediate pause_writing reaches the leg.
            leg.transport.set_write_buffer_limits(
                high=self.settings.high_water, low=self.settings.low_water
            )
        if backend_early:
            self.backend.data_received(backend_early)
        if client_early:
            self.client.data_received(client_early)
        for leg in (self.client, self.backend):
            if not leg.reading_paused and not leg.yielding:
                leg.transport.resume_reading()

    # -- the slow path: anything but plain data frames ------------------------------

    def route(self, src: Leg, items: list) -> None:
        """Forward scanner output from `src` to its peer, acting on control frames."""
        dst = src.peer
        counted = False
        for item in items:
            if item is BOUNDARY:
                dst.flush_pending()
            elif isinstance(item, ControlFrame):
                self._on_control(src, item)
            else:
                if not counted:
                    src.data_reads += 1
                    counted = True
                # Until a pending gateway Close goes out, the frame in flight completes.
                if not dst.sealed or dst.pending:
                    dst.transport.write(item)
        src.forwarding = not dst.pending and not dst.sealed

    def _on_control(self, src: Leg, frame: ControlFrame) -> None:
        dst = src.peer
        opcode = frame.opcode
        if opcode == Opcode.PONG and frame.payload == src.ping_payload:
            # The answer to the gateway's own ping: measure it, never forward it.
            src.bytes_withheld += len(frame.raw)
            if src.ping_sent_at:
                now = asyncio.get_running_loop().time()
                rtt = now - src.ping_sent_at
                # The sweeper need not find out for itself: the peer is alive, quiet from now.
                src.ping_sent_at = 0.0
                src.quiet_since = now
                src.bytes_seen = src.bytes_received
                if src.rtts is None:
                    src.rtts = [rtt]
                elif len(src.rtts) < 64:  # bounded if metrics are never flushed
                    src.rtts.append(rtt)
            return
        if opcode == Opcode.CLOSE:
            src.close_received = True
            self._record(src.side, frame.close_code, "close frame")
            self._arm_close_timer()
            if not dst.sealed:
                dst.transport.write(frame.raw)
                dst.sealed = True
                dst.close_written = (frame.close_code, src.side)
            self._finish_legs()
            return
        if not dst.sealed:
            dst.transport.write(frame.raw)

    # -- failures and closes ----------------------------------------------------------

    def on_violation(self, src: Leg, exc: ProtocolError) -> None:
        """`src` broke the protocol: tell it why, tell the other side we go away."""
        if src.lost or (src.sealed and src.transport.is_closing()):
            return
        if src.scanner.valid_prefix:
            prefix, src.scanner.valid_prefix = src.scanner.valid_prefix, []
            self.route(src, prefix)
        log.info("conn=%d %s protocol violation: %d %s", self.conn_id, src.side, exc.close_code, exc.reason)
        if src.side == CLIENT:
            to_src, to_peer = exc.close_code, CloseCode.GOING_AWAY
        else:
            to_src, to_peer = exc.close_code, CloseCode.BAD_GATEWAY
        self._record(GATEWAY, to_src, f"{src.side} protocol violation: {exc.reason}")
        self._gateway_close(to_peer, "", only=src.peer)
        src.transport.pause_reading()
        src.send_close(to_src, exc.reason)
        # A peer that broke the protocol gets no close handshake: drop it after the flush.
        src.transport.close()

    def on_over_limit(self, src: Leg, limit: str, reason: str) -> None:
        """The client went over a per-connection limit: 1008 to it, 1001 to the backend.

        As for a client's protocol violation, except that the client's stream is
        still valid: when a frame of it is still on its way to the backend, the
        backend's Close waits for its end (reads go on until then, and are dropped
        after), so the backend never sees a frame cut short.
        """
        if self.closed_by:
            return
        log.info("conn=%d %s over a limit: %s", self.conn_id, src.side, reason)
        self.limit_exceeded = limit
        self._record(GATEWAY, CloseCode.POLICY_VIOLATION, f"{src.side} {reason}")
        self._gateway_close(CloseCode.POLICY_VIOLATION, reason, only=src)
        self._gateway_close(CloseCode.GOING_AWAY, "", only=src.peer)
        if not src.peer.pending:
            # The backend has its Close: the offender gets no close handshake.
            src.transport.pause_reading()
            src.transport.close()

    def on_leg_lost(self, leg: Leg) -> None:
        peer = leg.peer
        finished = leg.close_received and leg.sealed
        # Nothing more can be written to a lost leg.
        leg.sealed = True
        if leg.pending and leg.close_written is not None and leg.close_written[1] == GATEWAY:
            leg.close_written = None  # the gateway's Close waited for a frame boundary, in vain
        leg.pending.clear()
        peer.forwarding = False
        if peer.lost:
            self._closed()
        elif not leg.scanner.at_boundary:
            # The frame in flight toward the peer can never be completed, so no
            # Close can follow it: hang up after what was already sent.
            self._record(leg.side, None, f"{leg.side} lost mid-frame")
            peer.transport.close()
        elif not finished:
            code = CloseCode.BAD_GATEWAY if leg.side == BACKEND else CloseCode.GOING_AWAY
            self._record(leg.side, None, f"{leg.side} lost")
            self._gateway_close(code, "", only=peer)

    def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "") -> None:
        """Close both sides with `code` (a gateway decision: idle, shutdown)."""
        self._record(GATEWAY, code, reason)
        self._gateway_close(code, reason)

    def _gateway_close(self, code: int, reason: str, only: Leg | None = None) -> None:
        for leg in (self.client, self.backend) if only is None else (only,):
            if leg.lost:
                continue
            leg.send_close(code, reason)
            leg.peer.forwarding = False
        self._arm_close_timer()
        self._finish_legs()

    def _record(self, who: str, code: int | None, reason: str = "") -> None:
        if not self.closed_by:
            self.closed_by = who
            self.close_code = code
            self.close_reason = reason

    def _finish_legs(self) -> None:
        for leg in (self.client, self.backend):
            if leg.lost:
                continue
            if leg.sealed and not leg.pending and leg.close_received:
                leg.transport.close()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self.closed:
            self._close_timer = asyncio.get_running_loop().call_later(
                self.settings.close_timeout, self._on_close_timeout
            )

    def _on_close_timeout(self) -> None:
        for leg in (self.client, self.backend):
            if not leg.lost:
                leg.transport.abort()

    def abort(self) -> None:
        """Drop both legs at once, discarding buffered data."""
        self.client.transport.abort()
        self.backend.transport.abort()

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._on_closed is not None:
            self._on_closed(self)

    # -- liveness, called by the sweeper ----------------------------------------------

    def sweep(self, now: float, recheck: float) -> float | None:
        """Ping quiet peers, drop dead ones, close idle connections.

        Returns when this relay next needs a look: when a ping or a timeout is
        due, and no later than `recheck` from now; None once it is closing, or
        when no timer is enabled.
        """
        settings = self.settings
        if self.closed_by:
            return None
        soon = now + recheck
        due = math.inf
        for leg in (self.client, self.backend):
            if leg.bytes_received != leg.bytes_seen or leg.reading_paused:
                leg.bytes_seen = leg.bytes_received
                leg.quiet_since = now
                leg.ping_sent_at = 0.0
                due = min(due, soon)
            elif leg.ping_sent_at:
                # The ping may wait behind megabytes the peer is still reading: as long
                # as they leave the gateway, the peer is alive and the wait starts again.
                gone = leg.bytes_gone()
                if leg.gone_seen is None or gone > leg.gone_seen:
                    if leg.gone_seen is not None:
                        leg.pong_wait_from = now
                    leg.gone_seen = gone
                if now - leg.pong_wait_from >= settings.heartbeat_timeout:
                    self._on_dead(leg)
                    return None
                # Waiting for an answer: any traffic will do, so look every tick.
                due = min(due, now)
            elif settings.heartbeat_interval:
                if now - leg.quiet_since >= settings.heartbeat_interval:
                    leg.ping_payload = _PING_PREFIX + random_bytes(8).hex().encode()
                    leg.ping_sent_at = leg.pong_wait_from = now
                    # Measured from the next look on: most pongs come back before it.
                    leg.gone_seen = None
                    leg.send_frame(Opcode.PING, leg.ping_payload)
                    due = min(due, now)
                else:
                    due = min(due, leg.quiet_since + settings.heartbeat_interval, soon)
        data = self.client.data_reads + self.backend.data_reads
        if data != self.data_seen:
            self.data_seen = data
            self.idle_since = now
            due = min(due, soon)
        elif settings.idle_timeout:
            if now - self.idle_since >= settings.idle_timeout:
                log.info("conn=%d idle for %.1fs: closing", self.conn_id, now - self.idle_since)
                self.close(CloseCode.GOING_AWAY, "idle timeout")
                return None
            due = min(due, self.idle_since + settings.idle_timeout, soon)
        return None if due == math.inf else due

    def _on_dead(self, leg: Leg) -> None:
        log.info("conn=%d %s did not answer a ping: dropping it", self.conn_id, leg.side)
        code = CloseCode.BAD_GATEWAY if leg.side == BACKEND else CloseCode.GOING_AWAY
        self._record(GATEWAY, code, f"heartbeat timeout ({leg.side})")
        self.dead_side = leg.side
        leg.transport.abort()


# The longest an active connection goes without a look from the sweeper.
MAX_RECHECK = 5.0


class Sweeper:
    """Heartbeats and idle timeouts for every relay from one timer, with no timer per connection.

    Relays wait in slots of one tick each, filed under the time they next need a
    look (see `Relay.sweep`): when a ping or a timeout is due, and at least every
    `recheck` (5 s at most) to notice traffic starting or stopping. Timeouts
    stay as precise as the tick, while a relay is looked at every few seconds
    rather than on every tick.
    """

    def __init__(self, tick: float, recheck: float) -> None:
        self.tick = tick
        self.recheck = recheck
        self.relays: set[Relay] = set()
        self._slots: dict[int, list[Relay]] = {}
        self._next_slot = 0  # the first slot not run yet
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.tick, self._run, loop)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def add(self, relay: Relay, now: float) -> None:
        """Watch `relay`; it leaves when it is discarded from `relays`."""
        self.relays.add(relay)
        self._file(relay, now + self.recheck)

    def retime(self, tick: float, recheck: float, now: float) -> None:
        """New timings (a reload): every relay gets a look at the next tick, on the new grid."""
        waiting = [relay for slot in self._slots.values() for relay in slot]
        self._slots.clear()
        self.tick, self.recheck = tick, recheck
        self._next_slot = self._slot(now)
        self._slots[self._next_slot] = waiting

    def _slot(self, when: float) -> int:
        return int(when / self.tick)

    def _file(self, relay: Relay, when: float) -> None:
        # The first slot that runs at `when` or later (a hair of float error forgiven).
        slot = max(math.ceil(when / self.tick - 1e-9), self._next_slot)
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = [relay]
        else:
            bucket.append(relay)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self.run_due(loop.time())
        self._timer = loop.call_later(self.tick, self._run, loop)

    def run_due(self, now: float) -> None:
        """Sweep the relays filed up to `now`, and file each again for its next look."""
        last = self._slot(now)
        # Relays filed during this run land in later slots.
        self._next_slot = last + 1
        due: list[Relay] = []
        # A few dozen slots at most (the longest wait over a tick), so scanning them is cheap.
        for slot in [slot for slot in self._slots if slot <= last]:
            due += self._slots.pop(slot)
        relays, recheck = self.relays, self.recheck
        for relay in due:
            if relay not in relays:
                continue  # closed since it was filed
            try:
                when = relay.sweep(now, recheck)
            except Exception:
                log.exception("conn=%d sweep failed; dropping the connection", relay.conn_id)
                relay.abort()
                continue
            if when is not None:
                self._file(relay, when)


def sweep_timing(settings: RelaySettings) -> tuple[float, float]:
    """(tick, recheck): how often the sweeper runs, and how long an active relay may go unseen.

    The tick is a quarter of the shortest enabled timer, 20 ms to 1 s: it bounds
    how late a timeout fires. Recheck is a quarter of the shorter of the
    heartbeat interval and the idle timeout, at least a tick and at most
    `MAX_RECHECK`: it bounds how late the sweeper notices that traffic stopped,
    so a ping may follow a peer's last bytes by up to `interval + recheck`.
    """
    timers = [t for t in (settings.heartbeat_interval, settings.heartbeat_timeout, settings.idle_timeout) if t]
    tick = min(1.0, max(0.02, min(timers, default=4.0) / 4))
    quiet = min([t for t in (settings.heartbeat_interval, settings.idle_timeout) if t], default=4.0)
    return tick, max(tick, min(MAX_RECHECK, quiet / 4))
