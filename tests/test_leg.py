"""A relay's close handshake and counts, played against fake transports.

Each test feeds bytes to the legs as a transport would and asserts what was
written to, and closed on, each side, in the mitmproxy playbook style. The
end-to-end behaviour over real sockets is tested in test_relay.py; here the
relay's close policy and the legs' close states are checked move by move.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from peers import Frame, client_frame, close_payload, read_frame, server_frame

from wsgate.closing import BACKEND, CLIENT, GATEWAY, Cause, CloseEvent, CloseState, gateway_close
from wsgate.errors import CloseStateError
from wsgate.member import Member
from wsgate.relay import Relay, RelaySettings

SETTINGS = RelaySettings(
    high_water=1 << 20,
    low_water=1 << 18,
    max_message_size=1 << 20,
    close_timeout=10.0,
    heartbeat_interval=0.0,
    heartbeat_timeout=0.0,
    idle_timeout=0.0,
)


class FakeTransport:
    """Records what a relay writes to one side and whether it hung up; reads come from the test."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False
        self.aborted = False
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.written += data

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def is_closing(self) -> bool:
        return self.closing

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0


async def frames_of(transport: FakeTransport) -> list[Frame]:
    """Every frame written to `transport` since the last look, unmasked."""
    reader = asyncio.StreamReader()
    reader.feed_data(bytes(transport.written))
    reader.feed_eof()
    transport.written.clear()
    frames: list[Frame] = []
    while not reader.at_eof():
        frames.append(await read_frame(reader))  # IncompleteReadError if a frame was cut short
    return frames


class Playbook:
    """One relay between two fake transports, and what it told whom."""

    def __init__(self) -> None:
        self.client = FakeTransport()
        self.backend = FakeTransport()
        self.closed: list[Relay] = []
        member = Member("ws://127.0.0.1:1", "127.0.0.1", 1, 1)
        self.relay = Relay(
            self.client,  # type: ignore[arg-type]
            self.backend,  # type: ignore[arg-type]
            SETTINGS,
            member=member,
            on_closed=self.closed.append,
        )
        self.relay.start()

    def lose(self, side: str) -> None:
        leg = self.relay.client if side == CLIENT else self.relay.backend
        leg.connection_lost(None)


@pytest.fixture
async def play() -> Playbook:
    return Playbook()


async def test_a_client_close_is_forwarded_and_answered(play: Playbook) -> None:
    relay = play.relay
    close = client_frame(0x8, close_payload(1000, "bye"))
    relay.client.data_received(close)
    # Forwarded byte for byte, still masked.
    assert bytes(play.backend.written) == close
    assert (relay.client.state, relay.backend.state) == (CloseState.CLOSE_RECEIVED, CloseState.CLOSE_SENT)
    assert relay.closing and relay.closed_by == CLIENT and relay.close_code == 1000
    play.backend.written.clear()
    relay.backend.data_received(server_frame(0x8, close_payload(1000, "bye")))
    assert [frame.close for frame in await frames_of(play.client)] == [(1000, "bye")]
    assert (relay.client.state, relay.backend.state) == (CloseState.CLOSED, CloseState.CLOSED)
    assert play.client.closing and play.backend.closing and not play.client.aborted
    play.lose(CLIENT)
    play.lose(BACKEND)
    assert (relay.client.state, relay.backend.state) == (CloseState.LOST, CloseState.LOST)
    assert play.closed == [relay]


async def test_a_backend_violation_gets_its_code_and_the_client_1014(play: Playbook) -> None:
    relay = play.relay
    # A backend must not mask its frames.
    relay.backend.data_received(client_frame(0x1, b"masked"))
    (to_backend,) = await frames_of(play.backend)
    assert to_backend.masked and to_backend.close[0] == 1002
    assert play.backend.closing  # no close handshake for the offender
    assert [frame.close for frame in await frames_of(play.client)] == [(1014, "")]
    assert not play.client.closing  # the client gets a close handshake
    assert (relay.closed_by, relay.close_code) == (GATEWAY, 1002)
    assert relay.close_reason.startswith("backend protocol violation")


async def test_a_client_violation_gets_its_code_and_the_backend_1001(play: Playbook) -> None:
    relay = play.relay
    # A client must mask its frames.
    relay.client.data_received(server_frame(0x1, b"unmasked"))
    (to_client,) = await frames_of(play.client)
    assert not to_client.masked and to_client.close[0] == 1002
    assert play.client.closing
    (to_backend,) = await frames_of(play.backend)
    assert to_backend.masked and to_backend.close == (1001, "")
    assert (relay.closed_by, relay.close_code) == (GATEWAY, 1002)


@pytest.mark.parametrize(("lost", "other", "code"), [(BACKEND, CLIENT, 1014), (CLIENT, BACKEND, 1001)])
async def test_a_side_lost_between_frames_leaves_the_other_a_close(
    play: Playbook, lost: str, other: str, code: int
) -> None:
    relay = play.relay
    play.lose(lost)
    transport = play.client if other == CLIENT else play.backend
    assert [frame.close for frame in await frames_of(transport)] == [(code, "")]
    assert (relay.closed_by, relay.close_code, relay.close_reason) == (lost, None, f"{lost} lost")
    assert not transport.closing  # it may still answer its Close
    assert not play.closed


async def test_a_side_lost_mid_frame_leaves_the_other_hung_up_on(play: Playbook) -> None:
    relay = play.relay
    frame = client_frame(0x2, bytes(1000))
    relay.client.data_received(frame[:300])
    play.lose(CLIENT)
    assert bytes(play.backend.written) == frame[:300]  # no Close after half a frame
    assert play.backend.closing
    assert relay.close_reason == "client lost mid-frame"


async def test_a_gateway_close_waits_for_the_frame_in_flight(play: Playbook) -> None:
    relay = play.relay
    frame = server_frame(0x2, bytes(1000))
    relay.backend.data_received(frame[:300])
    relay.close(*gateway_close(Cause.IDLE_TIMEOUT))
    # The backend hears its Close at once; the client's waits for the frame toward it to end.
    assert [f.close for f in await frames_of(play.backend)] == [(1001, "idle timeout")]
    assert bytes(play.client.written) == frame[:300]
    assert relay.client.state is CloseState.CLOSE_SENT and relay.client.queued
    relay.backend.data_received(frame[300:])
    (relayed, close) = await frames_of(play.client)
    assert relayed.payload == bytes(1000) and close.close == (1001, "idle timeout")
    assert not relay.client.queued
    assert relay.client.close_written == (1001, GATEWAY)


async def test_a_second_close_from_the_gateway_is_not_written(play: Playbook) -> None:
    relay = play.relay
    relay.close(1001, "first")
    relay.close(1012, "second")
    assert [f.close for f in await frames_of(play.client)] == [(1001, "first")]
    assert relay.close_reason == "first"
    with pytest.raises(CloseStateError, match="CLOSE_SENT on send close"):
        relay.client.move(CloseEvent.SEND_CLOSE)


async def test_counts_are_handed_over_once(play: Playbook) -> None:
    relay = play.relay
    for _ in range(3):
        relay.client.data_received(client_frame(0x1, b"hello"))
    relay.backend.data_received(server_frame(0x2, bytes(10)))
    upstream, downstream = relay.take_counts()
    assert upstream is not None and downstream is not None
    assert (upstream.side, upstream.frames, upstream.messages, upstream.payload) == (CLIENT, 3, 3, 15)
    assert upstream.size == 3 * len(client_frame(0x1, b"hello"))
    assert (downstream.side, downstream.messages, downstream.payload, downstream.size) == (BACKEND, 1, 10, 12)
    assert relay.take_counts() == (None, None)
