"""The close policy: who hears which Close code when a relayed connection ends, in one table.

Sans-I/O: the relay, the balancer, the gateway and the upgrade phase look their
decisions up here and do the writing themselves.

`POLICY` maps (what happened, the side it happened on) to what each side is
told: a close code, or None when that side hears no Close (it is gone, is being
dropped, or is hung up on). `GATEWAY` as the side means the gateway's own
decision, which both sides hear alike, with the table's reason in their Close
frames. When one side is at fault, it alone hears why (its error's reason);
the other side hears the code with no reason.

A leg's close handshake is a small state machine, `CloseState`, with its moves
listed in `TRANSITIONS` (h11's style): a move the table does not list is a bug
in the relay and raises `CloseStateError`.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple

from .errors import CloseStateError
from .frames import CloseCode

__all__ = [
    "BACKEND",
    "CLIENT",
    "GATEWAY",
    "ITS_ERROR",
    "POLICY",
    "TRANSITIONS",
    "Cause",
    "CloseEvent",
    "CloseState",
    "Told",
    "gateway_close",
    "next_state",
]

CLIENT: Final = "client"
BACKEND: Final = "backend"
GATEWAY: Final = "gateway"


class Cause(enum.Enum):
    """What ended, or began to end, a relayed connection, other than a peer's own Close."""

    VIOLATION = "protocol violation"
    OVER_LIMIT = "over a limit"
    LOST = "lost"
    LOST_MID_FRAME = "lost mid-frame"
    HEARTBEAT_TIMEOUT = "heartbeat timeout"
    IDLE_TIMEOUT = "idle timeout"
    SHUTDOWN = "shutdown"
    BACKEND_REMOVED = "backend removed"
    REBALANCING = "rebalancing"


# The side at fault hears the close code its own error carries (1002, 1007, 1009...).
ITS_ERROR: Final = 0


class Told(NamedTuple):
    """The close code each side hears (None: no Close), and the reason of a gateway's own close."""

    client: int | None
    backend: int | None
    reason: str = ""

    def code_for(self, side: str) -> int | None:
        """The code `side` hears."""
        return self.client if side == CLIENT else self.backend


POLICY: Final[dict[tuple[Cause, str], Told]] = {
    (Cause.VIOLATION, CLIENT): Told(ITS_ERROR, CloseCode.GOING_AWAY),
    (Cause.VIOLATION, BACKEND): Told(CloseCode.BAD_GATEWAY, ITS_ERROR),
    # Only a client has per-connection limits (its frame rate).
    (Cause.OVER_LIMIT, CLIENT): Told(CloseCode.POLICY_VIOLATION, CloseCode.GOING_AWAY),
    (Cause.LOST, CLIENT): Told(None, CloseCode.GOING_AWAY),
    (Cause.LOST, BACKEND): Told(CloseCode.BAD_GATEWAY, None),
    # A frame cut short toward the other side can never be completed, so no Close can
    # follow it: that side is hung up on after the bytes already relayed.
    (Cause.LOST_MID_FRAME, CLIENT): Told(None, None),
    (Cause.LOST_MID_FRAME, BACKEND): Told(None, None),
    # The silent side is dropped; the other then hears what it would if that side were lost.
    (Cause.HEARTBEAT_TIMEOUT, CLIENT): Told(None, CloseCode.GOING_AWAY),
    (Cause.HEARTBEAT_TIMEOUT, BACKEND): Told(CloseCode.BAD_GATEWAY, None),
    (Cause.IDLE_TIMEOUT, GATEWAY): Told(CloseCode.GOING_AWAY, CloseCode.GOING_AWAY, "idle timeout"),
    (Cause.SHUTDOWN, GATEWAY): Told(CloseCode.GOING_AWAY, CloseCode.GOING_AWAY, "going away"),
    (Cause.BACKEND_REMOVED, GATEWAY): Told(
        CloseCode.SERVICE_RESTART, CloseCode.SERVICE_RESTART, "backend removed"
    ),
    (Cause.REBALANCING, GATEWAY): Told(CloseCode.SERVICE_RESTART, CloseCode.SERVICE_RESTART, "rebalancing"),
}


def gateway_close(cause: Cause) -> tuple[int, str]:
    """(code, reason) of a close the gateway decides on its own, as `Relay.close` takes them."""
    told = POLICY[cause, GATEWAY]
    assert told.client is not None and told.client == told.backend, cause
    return told.client, told.reason


class CloseState(enum.IntEnum):
    """Where one leg's close handshake stands; what is true of the leg now.

    From CLOSE_SENT on, nothing more is written to the leg: a Close was written
    (or waits for a frame boundary), or its connection is gone.
    """

    OPEN = 0
    CLOSE_RECEIVED = 1  # its peer sent a Close; none was written to it yet
    CLOSE_SENT = 2  # a Close was written to it; its peer's is awaited
    CLOSED = 3  # both Closes: its connection is closed once what waits is written
    LOST = 4  # its connection is gone


# A StrEnum: a str's hash is computed in C, a plain Enum member's in Python, at every move.
class CloseEvent(enum.StrEnum):
    """What moves a leg's close state."""

    RECEIVE_CLOSE = "receive close"  # a Close frame arrived from the leg's peer
    SEND_CLOSE = "send close"  # a Close frame was written (or queued) to the leg
    LOSE = "lose"  # the leg's connection ended


# Every allowed move; anything else is a bug in the relay. A second Close received is
# forwarded nowhere and moves nothing; a Close is sent at most once (the relay checks
# before sending), and a lost leg hears nothing more.
TRANSITIONS: Final[dict[tuple[CloseState, CloseEvent], CloseState]] = {
    (CloseState.OPEN, CloseEvent.RECEIVE_CLOSE): CloseState.CLOSE_RECEIVED,
    (CloseState.OPEN, CloseEvent.SEND_CLOSE): CloseState.CLOSE_SENT,
    (CloseState.OPEN, CloseEvent.LOSE): CloseState.LOST,
    (CloseState.CLOSE_RECEIVED, CloseEvent.RECEIVE_CLOSE): CloseState.CLOSE_RECEIVED,
    (CloseState.CLOSE_RECEIVED, CloseEvent.SEND_CLOSE): CloseState.CLOSED,
    (CloseState.CLOSE_RECEIVED, CloseEvent.LOSE): CloseState.LOST,
    (CloseState.CLOSE_SENT, CloseEvent.RECEIVE_CLOSE): CloseState.CLOSED,
    (CloseState.CLOSE_SENT, CloseEvent.LOSE): CloseState.LOST,
    (CloseState.CLOSED, CloseEvent.RECEIVE_CLOSE): CloseState.CLOSED,
    (CloseState.CLOSED, CloseEvent.LOSE): CloseState.LOST,
}


def next_state(state: CloseState, event: CloseEvent) -> CloseState:
    """The state `event` moves a leg in `state` to; CloseStateError if the table has no such move."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise CloseStateError(state.name, event.value) from None
