"""The close policy and a leg's close-state machine, without sockets or an event loop."""

from __future__ import annotations

import itertools

import pytest

from wsgate.closing import (
    BACKEND,
    CLIENT,
    GATEWAY,
    ITS_ERROR,
    POLICY,
    TRANSITIONS,
    Cause,
    CloseEvent,
    CloseState,
    gateway_close,
    next_state,
)
from wsgate.errors import CloseStateError

OPEN, RECEIVED, SENT, CLOSED, LOST = (
    CloseState.OPEN, CloseState.CLOSE_RECEIVED, CloseState.CLOSE_SENT, CloseState.CLOSED, CloseState.LOST
)
RECEIVE, SEND, LOSE = CloseEvent.RECEIVE_CLOSE, CloseEvent.SEND_CLOSE, CloseEvent.LOSE

# (state, event, the state it moves to, or None where the move is a bug).
MOVES = [
    (OPEN, RECEIVE, RECEIVED),
    (OPEN, SEND, SENT),
    (OPEN, LOSE, LOST),
    (RECEIVED, RECEIVE, RECEIVED),  # a second Close from the peer moves nothing
    (RECEIVED, SEND, CLOSED),
    (RECEIVED, LOSE, LOST),
    (SENT, RECEIVE, CLOSED),
    (SENT, SEND, None),  # nothing is written after a Close
    (SENT, LOSE, LOST),
    (CLOSED, RECEIVE, CLOSED),
    (CLOSED, SEND, None),
    (CLOSED, LOSE, LOST),
    (LOST, RECEIVE, None),  # a lost leg reads nothing more
    (LOST, SEND, None),
    (LOST, LOSE, None),  # and is lost once
]


def test_the_moves_cover_every_state_and_event() -> None:
    assert {(state, event) for state, event, _ in MOVES} == set(itertools.product(CloseState, CloseEvent))


@pytest.mark.parametrize(("state", "event", "expected"), MOVES, ids=lambda v: getattr(v, "name", str(v)))
def test_close_state_moves(state: CloseState, event: CloseEvent, expected: CloseState | None) -> None:
    if expected is None:
        assert (state, event) not in TRANSITIONS
        with pytest.raises(CloseStateError, match=f"from {state.name} on {event.value}"):
            next_state(state, event)
    else:
        assert next_state(state, event) is expected


@pytest.mark.parametrize(
    "events",
    [[RECEIVE, SEND], [SEND, RECEIVE]],
    ids=["peer-closes-first", "gateway-closes-first"],
)
def test_a_close_handshake_either_way_round_finishes_the_leg(events: list[CloseEvent]) -> None:
    state = OPEN
    for event in events:
        state = next_state(state, event)
    assert state is CLOSED
    assert next_state(state, LOSE) is LOST


def test_nothing_is_written_from_close_sent_on() -> None:
    # The relay writes to a leg only below CLOSE_SENT; every state from there on forbids SEND_CLOSE.
    assert [state for state in CloseState if state >= SENT] == [SENT, CLOSED, LOST]
    assert all((state, SEND) not in TRANSITIONS for state in CloseState if state >= SENT)


# (cause, side, what the client hears, what the backend hears): the table of docs/relay.md.
TOLD = [
    (Cause.VIOLATION, CLIENT, ITS_ERROR, 1001),
    (Cause.VIOLATION, BACKEND, 1014, ITS_ERROR),
    (Cause.OVER_LIMIT, CLIENT, 1008, 1001),
    (Cause.LOST, CLIENT, None, 1001),
    (Cause.LOST, BACKEND, 1014, None),
    (Cause.LOST_MID_FRAME, CLIENT, None, None),
    (Cause.LOST_MID_FRAME, BACKEND, None, None),
    (Cause.HEARTBEAT_TIMEOUT, CLIENT, None, 1001),
    (Cause.HEARTBEAT_TIMEOUT, BACKEND, 1014, None),
    (Cause.IDLE_TIMEOUT, GATEWAY, 1001, 1001),
    (Cause.SHUTDOWN, GATEWAY, 1001, 1001),
    (Cause.BACKEND_REMOVED, GATEWAY, 1012, 1012),
    (Cause.REBALANCING, GATEWAY, 1012, 1012),
]


def test_the_policy_has_exactly_these_rows() -> None:
    assert set(POLICY) == {(cause, side) for cause, side, _, _ in TOLD}


@pytest.mark.parametrize(("cause", "side", "to_client", "to_backend"), TOLD, ids=lambda v: str(v))
def test_who_hears_what(cause: Cause, side: str, to_client: int | None, to_backend: int | None) -> None:
    told = POLICY[cause, side]
    assert (told.client, told.backend) == (to_client, to_backend)
    assert (told.code_for(CLIENT), told.code_for(BACKEND)) == (to_client, to_backend)


def test_a_silent_side_hears_what_it_would_if_it_were_lost() -> None:
    # The sweeper drops a silent side; the relay then handles it as lost, so both rows must agree.
    for side in (CLIENT, BACKEND):
        assert POLICY[Cause.HEARTBEAT_TIMEOUT, side] == POLICY[Cause.LOST, side]


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        (Cause.IDLE_TIMEOUT, (1001, "idle timeout")),
        (Cause.SHUTDOWN, (1001, "going away")),
        (Cause.BACKEND_REMOVED, (1012, "backend removed")),
        (Cause.REBALANCING, (1012, "rebalancing")),
    ],
)
def test_gateway_closes_tell_both_sides_the_same(cause: Cause, expected: tuple[int, str]) -> None:
    assert gateway_close(cause) == expected


def test_only_gateway_decisions_are_gateway_closes() -> None:
    with pytest.raises(KeyError):
        gateway_close(Cause.LOST)
