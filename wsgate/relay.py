"""The relay of one proxied connection after the 101.

Two `asyncio.Protocol` legs, one per side, share one code path with src and dst
swapped. Flow control is paired: when one leg's write buffer passes its high
water mark, reading from the other leg stops until the buffer drains.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("wsgate.relay")


class Leg(asyncio.Protocol):
    """One side of a relay; what it reads it writes to its peer leg."""

    __slots__ = ("relay", "side", "transport", "peer", "bytes_received", "lost")

    def __init__(self, relay: Relay, side: str, transport: asyncio.Transport) -> None:
        self.relay = relay
        self.side = side
        self.transport = transport
        self.peer: Leg = self  # set by Relay once both legs exist
        self.bytes_received = 0
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        # WebSocket has no half-close; the peer gets what was sent, then FIN.
        self.relay.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.on_leg_lost(self)

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


class Relay:
    """Pairs a client transport with a backend transport until both are closed."""

    __slots__ = ("client", "backend", "conn_id", "_on_closed", "closed")

    def __init__(
        self,
        client_transport: asyncio.Transport,
        backend_transport: asyncio.Transport,
        *,
        high_water: int,
        low_water: int,
        conn_id: int = 0,
        on_closed: Callable[[Relay], None] | None = None,
    ) -> None:
        self.client = Leg(self, "client", client_transport)
        self.backend = Leg(self, "backend", backend_transport)
        self.client.peer = self.backend
        self.backend.peer = self.client
        self.conn_id = conn_id
        self._on_closed = on_closed
        self.closed = False
        for leg in (self.client, self.backend):
            leg.transport.set_write_buffer_limits(high=high_water, low=low_water)

    def start(self, client_early: bytes = b"", backend_early: bytes = b"") -> None:
        """Take over both transports; bytes read during the handshake are relayed first."""
        for leg in (self.client, self.backend):
            leg.transport.set_protocol(leg)
        if backend_early:
            self.backend.data_received(backend_early)
        if client_early:
            self.client.data_received(client_early)
        if self.client.transport.is_closing() or self.backend.transport.is_closing():
            self.close()
            return
        for leg in (self.client, self.backend):
            leg.transport.resume_reading()

    def close(self) -> None:
        """Close both legs; each flushes what it still has to write first."""
        self.client.transport.close()
        self.backend.transport.close()

    def on_leg_lost(self, leg: Leg) -> None:
        leg.peer.transport.close()
        if self.client.lost and self.backend.lost and not self.closed:
            self.closed = True
            if self._on_closed is not None:
                self._on_closed(self)

    def abort(self) -> None:
        """Drop both legs at once, discarding buffered data."""
        self.client.transport.abort()
        self.backend.transport.abort()
