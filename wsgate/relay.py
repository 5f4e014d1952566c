"""The relay of one proxied connection after the 101, frame by frame.

Two `asyncio.Protocol` legs, one per side, share one code path with src and dst
swapped. Each leg scans what it reads with a `FrameScanner` and writes the
frames, byte for byte, to the other leg; only control frames, protocol
violations and requested frame boundaries leave the fast path.

Close handshake rules, per leg (its `CloseState`, see `wsgate.closing`):

- CLOSE_RECEIVED: the peer on this leg sent a Close frame.
- CLOSE_SENT: a Close frame was written to this leg; nothing more is written to it.
- CLOSED, a leg whose peer both sent and was sent a Close, is finished: its TCP
  connection is closed (after queued writes flush).
- The first Close, from either side or from the gateway, arms one deadline of
  `timeouts.close`; legs still unfinished then are dropped.

Which code each side hears when the gateway ends a connection is `wsgate.closing.POLICY`.

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
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .closing import (
    BACKEND, CLIENT, GATEWAY, ITS_ERROR, POLICY, Cause, CloseEvent, CloseState, Told, gateway_close,
)
from .errors import ProtocolError
from .frames import BOUNDARY, CloseCode, ControlFrame, FrameScanner, Opcode
from .leg import Leg, LegCounts, RateLimitedLeg, random_bytes
from .member import Member
from .turns import Turns

__all__ = [
    "BACKEND",
    "BULK_LEGS_PER_TURN",
    "CLIENT",
    "GATEWAY",
    "MAX_RECHECK",
    "Relay",
    "RelaySettings",
    "Sweeper",
    "sweep_timing",
]

log = logging.getLogger("wsgate.relay")

# Payload of the gateway's own pings; a pong echoing it is the gateway's to swallow.
_PING_PREFIX = b"wsgate-"

# Legs that yielded which may read again in one turn: with hundreds of busy connections, a
# quiet one's message waits behind this many large reads, not one on every busy connection.
BULK_LEGS_PER_TURN = 16

_CLOSE_SENT = CloseState.CLOSE_SENT
_CLOSED = CloseState.CLOSED


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
        "closing",
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
        member: Member,
        deflate: bool = False,
        conn_id: int = 0,
        on_closed: Callable[[Relay], None] | None = None,
        turns: Turns | None = None,
    ) -> None:
        limit = settings.max_message_size
        self.settings = settings
        client_scanner = FrameScanner(masked=True, max_message_size=limit, allow_rsv1=deflate)
        self.client: Leg
        if settings.frame_rate:
            self.client = RateLimitedLeg(
                self, CLIENT, client_transport, client_scanner,
                frame_rate=settings.frame_rate, frame_burst=settings.frame_burst,
            )
        else:
            self.client = Leg(self, CLIENT, client_transport, client_scanner)
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
        # True from the first close decision on (a Close from a side, a loss, the gateway's).
        self.closing = False
        self.closed_by = ""  # who made that decision: CLIENT, BACKEND or GATEWAY
        self._close_timer: asyncio.TimerHandle | None = None
        self.data_seen = 0
        self.idle_since = 0.0
        # The affinity key, pool member and route name this connection is pinned to.
        self.key = b""
        self.member = member
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

    def forward(self, src: Leg, items: list) -> None:
        """Forward scanner output from `src` to its peer, acting on control frames."""
        dst = src.peer
        counted = False
        for item in items:
            if item is BOUNDARY:
                dst.flush_queued()
            elif isinstance(item, ControlFrame):
                self._on_control(src, item)
            else:
                if not counted:
                    src.data_reads += 1
                    counted = True
                # Until a queued gateway Close goes out, the frame in flight completes.
                if dst.state < _CLOSE_SENT or dst.queued:
                    dst.transport.write(item)
        src.forwarding = not dst.queued and dst.state < _CLOSE_SENT

    def _on_control(self, src: Leg, frame: ControlFrame) -> None:
        dst = src.peer
        opcode = frame.opcode
        if opcode == Opcode.PONG and frame.payload == src.ping_payload:
            # The answer to the gateway's own ping: measure it, never forward it.
            src.bytes_withheld += len(frame.raw)
            if src.ping_sent_at:
                now = asyncio.get_running_loop().time()
                rtt = time.perf_counter() - src.ping_clock
                # The sweeper need not find out for itself: the peer is alive, quiet from now.
                src.ping_sent_at = 0.0
                src.quiet_since = now
                src.bytes_seen = src.bytes_received
                if src.rtts is None:
                    src.rtts = [rtt]
                elif len(src.rtts) < 64:  # bounded if the counts are never taken
                    src.rtts.append(rtt)
            return
        if opcode == Opcode.CLOSE:
            src.move(CloseEvent.RECEIVE_CLOSE)
            self._record(src.side, frame.close_code, "close frame")
            self._arm_close_timer()
            if dst.state < _CLOSE_SENT:
                dst.transport.write(frame.raw)
                dst.move(CloseEvent.SEND_CLOSE)
                dst.close_written = (frame.close_code, src.side)
            self._finish_legs()
            return
        if dst.state < _CLOSE_SENT:
            dst.transport.write(frame.raw)

    # -- failures and closes ----------------------------------------------------------

    def on_violation(self, src: Leg, exc: ProtocolError) -> None:
        """`src` broke the protocol: tell it why, tell the other side as the close policy says."""
        if src.lost or (src.sealed and src.transport.is_closing()):
            return
        if src.scanner.valid_prefix:
            prefix, src.scanner.valid_prefix = src.scanner.valid_prefix, []
            self.forward(src, prefix)
        log.info("conn=%d %s protocol violation: %d %s", self.conn_id, src.side, exc.close_code, exc.reason)
        told = POLICY[Cause.VIOLATION, src.side]
        to_src = exc.close_code  # the side at fault hears its error's code (ITS_ERROR)
        self._record(GATEWAY, to_src, f"{src.side} protocol violation: {exc.reason}")
        self._gateway_close(_code(told, src.peer), "", only=src.peer)
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
        if self.closing:
            return
        log.info("conn=%d %s over a limit: %s", self.conn_id, src.side, reason)
        self.limit_exceeded = limit
        told = POLICY[Cause.OVER_LIMIT, src.side]
        to_src = _code(told, src)
        self._record(GATEWAY, to_src, f"{src.side} {reason}")
        self._gateway_close(to_src, reason, only=src)
        self._gateway_close(_code(told, src.peer), "", only=src.peer)
        if not src.peer.queued:
            # The backend has its Close: the offender gets no close handshake.
            src.transport.pause_reading()
            src.transport.close()

    def on_leg_lost(self, leg: Leg) -> None:
        peer = leg.peer
        finished = leg.state is _CLOSED
        # Nothing more can be written to a lost leg.
        leg.move(CloseEvent.LOSE)
        if leg.queued and leg.close_written is not None and leg.close_written[1] == GATEWAY:
            leg.close_written = None  # the gateway's Close waited for a frame boundary, in vain
        leg.queued.clear()
        peer.forwarding = False
        if peer.lost:
            self._closed()
        elif not leg.scanner.at_boundary:
            # The close policy tells the peer nothing: hang up after what was already sent.
            self._record(leg.side, None, f"{leg.side} lost mid-frame")
            peer.transport.close()
        elif not finished:
            self._record(leg.side, None, f"{leg.side} lost")
            self._gateway_close(_code(POLICY[Cause.LOST, leg.side], peer), "", only=peer)

    def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "") -> None:
        """Close both sides with `code` (a gateway decision: see `wsgate.closing.gateway_close`)."""
        self._record(GATEWAY, code, reason)
        self._gateway_close(code, reason)

    def take_counts(self) -> tuple[LegCounts | None, LegCounts | None]:
        """What the client and backend legs counted since the last call (see `Leg.take_counts`)."""
        return self.client.take_counts(), self.backend.take_counts()

    def _gateway_close(self, code: int, reason: str, only: Leg | None = None) -> None:
        for leg in (self.client, self.backend) if only is None else (only,):
            if leg.lost:
                continue
            leg.send_close(code, reason)
            leg.peer.forwarding = False
        self._arm_close_timer()
        self._finish_legs()

    def _record(self, who: str, code: int | None, reason: str = "") -> None:
        if not self.closing:
            self.closing = True
            self.closed_by = who
            self.close_code = code
            self.close_reason = reason

    def _finish_legs(self) -> None:
        for leg in (self.client, self.backend):
            if leg.state is _CLOSED and not leg.queued:
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
        if self.closing:
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
                    leg.ping_clock = time.perf_counter()
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
                self.close(*gateway_close(Cause.IDLE_TIMEOUT))
                return None
            due = min(due, self.idle_since + settings.idle_timeout, soon)
        return None if due == math.inf else due

    def _on_dead(self, leg: Leg) -> None:
        log.info("conn=%d %s did not answer a ping: dropping it", self.conn_id, leg.side)
        # What the other side hears once this one is lost: the close policy's code for it.
        code = POLICY[Cause.HEARTBEAT_TIMEOUT, leg.side].code_for(leg.peer.side)
        self._record(GATEWAY, code, f"heartbeat timeout ({leg.side})")
        self.dead_side = leg.side
        leg.transport.abort()


def _code(told: Told, leg: Leg) -> int:
    """The code the close policy has `leg` hear; each caller's row tells that leg something."""
    code = told.code_for(leg.side)
    assert code is not None and code != ITS_ERROR, (told, leg.side)
    return code


# The longest an active connection goes without a look from the sweeper.
MAX_RECHECK = 5.0


class Sweeper:
    """Heartbeats and idle timeouts for every relay from one timer, with no timer per connection.

    Relays wait in slots of one tick each, filed under the time they next need a
    look (see `Relay.sweep`): when a ping or a timeout is due, and at least every
    `recheck` (5 s at most) to notice traffic starting or stopping. Timeouts
    stay as precise as the tick, while a relay is looked at every few seconds
    rather than on every tick. The slots hold weak references: a relay that
    closed is freed at once, not kept (with its legs and transports) until its
    slot comes round, which in a reconnect storm would be thousands of them.
    """

    def __init__(self, tick: float, recheck: float) -> None:
        self.tick = tick
        self.recheck = recheck
        self.relays: set[Relay] = set()
        self._slots: dict[int, list[weakref.ref[Relay]]] = {}
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
        waiting = [ref for slot in self._slots.values() for ref in slot]
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
            self._slots[slot] = [weakref.ref(relay)]
        else:
            bucket.append(weakref.ref(relay))

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self.run_due(loop.time())
        self._timer = loop.call_later(self.tick, self._run, loop)

    def run_due(self, now: float) -> None:
        """Sweep the relays filed up to `now`, and file each again for its next look."""
        last = self._slot(now)
        # Relays filed during this run land in later slots.
        self._next_slot = last + 1
        due: list[weakref.ref[Relay]] = []
        # A few dozen slots at most (the longest wait over a tick), so scanning them is cheap.
        for slot in [slot for slot in self._slots if slot <= last]:
            due += self._slots.pop(slot)
        relays, recheck = self.relays, self.recheck
        for ref in due:
            relay = ref()
            if relay is None or relay not in relays:
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
