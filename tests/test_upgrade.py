"""The upgrade protocol against fakes of its two narrow interfaces: the books and a transport.

Each test feeds bytes and transport events to an `UpgradeProtocol`, then checks
what it wrote, whether it half-closed or closed, and what it asked of the books
(admission, release, the access log). No socket is opened: the end-to-end
behaviour through real sockets is tested in test_server.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import gateway_config
from peers import STEP_TIMEOUT, proxy_v1_header, upgrade_request
from prometheus_client import CollectorRegistry

from wsgate.books import Books, Refusal
from wsgate.config import Config, parse_config
from wsgate.errors import HandshakeError
from wsgate.forwarding import TrustedProxies
from wsgate.metrics import Metrics
from wsgate.turns import Turns
from wsgate.upgrade import UpgradeProtocol

# Every test runs with each parser of the handshakes' heads.
pytestmark = pytest.mark.usefixtures("http_parser")

PEER = ("203.0.113.5", 40000)


class FakeTransport(asyncio.Transport):
    """Keeps what the protocol writes; a close reaches the protocol as a real one does, later."""

    def __init__(self, protocol: asyncio.Protocol, peer: tuple[str, int] = PEER) -> None:
        super().__init__()
        self.protocol = protocol
        self.peer = peer
        self.written = bytearray()
        self.eof_written = False
        self.closed = False
        self.reading = True
        self.ended = asyncio.Event()  # set once the protocol half-closes or closes
        self.lost = asyncio.Event()  # set once the protocol's connection_lost has run

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof_written and not self.closed, "written after the end"
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True
        self.ended.set()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.ended.set()
            asyncio.get_running_loop().call_soon(self._lose)

    def _lose(self) -> None:
        self.protocol.connection_lost(None)
        self.lost.set()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def status(self) -> int:
        return int(self.written.split(b" ", 2)[1])


@dataclass
class FakeBooks:
    """The books as the protocol sees them, recording what it asks of them."""

    config: Config
    admit_refusal: Refusal | None = None
    address_refusal: Refusal | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    admitted: int = 0
    addresses: list[str] = field(default_factory=list)
    released: list[str | None] = field(default_factory=list)
    access: list[dict[str, Any]] = field(default_factory=list)
    handshakes: set[Any] = field(default_factory=set)
    tls: dict[str, Any] = field(default_factory=dict)
    tls_handshake_failures: int = 0
    routes_asked: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.registry)
        self.trusted_proxies = TrustedProxies(self.config.trusted_proxies)
        self.proxy_senders = {
            listener.name: TrustedProxies(listener.proxy_protocol_from)
            for listener in self.config.listeners
            if listener.proxy_protocol_from is not None
        }
        self.handshake_turns = Turns(32)

    def next_id(self) -> int:
        return 7

    def admit(self) -> Refusal | None:
        if self.admit_refusal is None:
            self.admitted += 1
        return self.admit_refusal

    def admit_address(self, ip: str) -> Refusal | None:
        if self.address_refusal is None:
            self.addresses.append(ip)
        return self.address_refusal

    def release(self, ip: str | None) -> None:
        self.released.append(ip)

    def pool_for(self, host: str, path: str, request: object) -> None:
        self.routes_asked.append((host, path))
        return None  # no route: the tests here end before any backend

    def log_access(self, client: str, route: str, backend: str, key: bytes, status: int,
                   duration: float, reason: str, client_cert: str | None, relay: object = None,
                   protocol: str = "http/1.1") -> None:
        self.access.append({"client": client, "status": status, "reason": reason})

    def count(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def make_config(**listener: Any) -> Config:
    config = gateway_config(["ws://127.0.0.1:9"], timeouts={"handshake": "2s"})
    config["listeners"][0].update(listener)
    return parse_config(config)


def connect(books: FakeBooks, peer: tuple[str, int] = PEER) -> tuple[UpgradeProtocol, FakeTransport]:
    """A protocol for the config's first listener, given its (fake) accepted connection."""
    protocol = UpgradeProtocol(books, books.config.listeners[0])  # type: ignore[arg-type]
    transport = FakeTransport(protocol, peer)
    protocol.connection_made(transport)
    return protocol, transport


async def ended(transport: FakeTransport) -> None:
    async with asyncio.timeout(STEP_TIMEOUT):
        await transport.ended.wait()


async def lost(transport: FakeTransport) -> None:
    async with asyncio.timeout(STEP_TIMEOUT):
        await transport.lost.wait()


def test_the_fake_books_offer_what_the_protocol_uses_of_the_books():
    # The fake stands for the real thing: every member it offers is one `Books` has.
    fake = FakeBooks(make_config())
    offered = {name for name in set(vars(fake)) | set(type(fake).__dict__) if not name.startswith("_")}
    own = {"admit_refusal", "address_refusal", "registry", "admitted", "addresses", "released", "access",
           "routes_asked", "count"}
    real = set(Books.__dict__) | set(Books.__init__.__code__.co_names)
    assert offered - own <= real


@pytest.mark.parametrize("chunk", [None, 1, 7])
async def test_a_request_with_no_route_is_answered_404_then_half_closed(chunk):
    books = FakeBooks(make_config())
    protocol, transport = connect(books)
    request = upgrade_request("/chat?room=1", host="nowhere.test")
    if chunk is None:
        protocol.data_received(request)
    else:
        # Split at every `chunk` bytes: more pieces than one turn's handshake steps, too.
        for i in range(0, len(request), chunk):
            protocol.data_received(request[i : i + chunk])
    await ended(transport)
    assert transport.status() == 404
    assert transport.eof_written and not transport.closed  # lingers, so the answer is read
    assert books.routes_asked == [("nowhere.test", "/chat")]
    assert books.addresses == [PEER[0]]
    assert books.handshakes == {protocol}
    protocol.data_received(b"more of the same")  # read and dropped
    assert protocol.eof_received() is False  # the client's EOF ends the linger
    transport.close()
    await lost(transport)
    assert books.handshakes == set()
    assert books.released == [PEER[0]]
    reason = "no route for this host and path"
    assert books.access == [{"client": "203.0.113.5:40000", "status": 404, "reason": reason}]
    assert books.count("wsgate_handshake_rejections_total", reason="no_route") == 1
    assert transport.reading


async def test_a_head_read_over_several_turns_pauses_reading_while_it_waits():
    books = FakeBooks(make_config())
    protocol, transport = connect(books)
    request = upgrade_request(host="nowhere.test")
    paused = False
    for byte in range(len(request)):
        protocol.data_received(request[byte : byte + 1])
        paused = paused or not transport.reading
    assert paused  # the 33rd step of the turn waited for the next
    await ended(transport)
    assert transport.status() == 404


async def test_a_malformed_head_is_answered_400_and_counted_once():
    books = FakeBooks(make_config())
    protocol, transport = connect(books)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    await ended(transport)
    assert transport.status() == 400
    transport.close()
    await lost(transport)
    assert books.released == [PEER[0]]
    assert books.routes_asked == []
    assert books.count("wsgate_handshake_rejections_total", reason="bad_request") == 1


async def test_a_connection_over_the_gateway_cap_is_refused_at_accept_and_never_released():
    refusal = Refusal("limit", HandshakeError(503, "the gateway is at its connection limit"))
    books = FakeBooks(make_config(), admit_refusal=refusal)
    protocol, transport = connect(books)
    assert transport.status() == 503
    assert transport.closed and not transport.eof_written  # no linger: nothing was read
    await lost(transport)
    assert books.released == [] and books.handshakes == set()
    assert books.access[0]["status"] == 503


async def test_an_address_over_its_cap_gives_back_the_gateway_wide_count_only():
    refusal = Refusal("ip_limit", HandshakeError(429, "too many connections from your address"))
    books = FakeBooks(make_config(), address_refusal=refusal)
    protocol, transport = connect(books)
    assert transport.status() == 429 and transport.closed
    await lost(transport)
    assert books.admitted == 1
    assert books.released == [None]  # counted in all, never under its address


async def test_a_client_that_sends_no_complete_head_in_time_gets_408():
    config = gateway_config(["ws://127.0.0.1:9"], timeouts={"handshake": "50ms"})
    books = FakeBooks(parse_config(config))
    protocol, transport = connect(books)
    protocol.data_received(b"GET / HTTP/1.1\r\n")
    await ended(transport)
    assert transport.status() == 408
    assert books.count("wsgate_handshake_rejections_total", reason="timeout") == 1


async def test_a_client_that_leaves_mid_head_is_released_without_an_answer():
    books = FakeBooks(make_config())
    protocol, transport = connect(books)
    protocol.data_received(b"GET / HTTP/1.1\r\n")
    assert protocol.eof_received() is False
    assert transport.closed
    await lost(transport)
    assert transport.written == b""
    assert books.released == [PEER[0]]
    assert books.access == []


async def test_a_proxy_header_names_the_client_the_limits_count():
    books = FakeBooks(make_config(proxy_protocol="v1"))
    protocol, transport = connect(books, peer=("10.0.0.2", 5000))
    assert books.addresses == []  # waits for the header
    header = proxy_v1_header(("198.51.100.7", 4242), ("10.0.0.2", 80))
    protocol.data_received(header + upgrade_request(host="nowhere.test"))
    await ended(transport)
    assert books.addresses == ["198.51.100.7"]
    assert transport.status() == 404
    transport.close()
    await lost(transport)
    assert books.released == ["198.51.100.7"]
    assert books.access[0]["client"] == "198.51.100.7:4242"


async def test_a_proxy_header_from_a_peer_not_allowed_to_send_one_is_closed_unanswered():
    books = FakeBooks(make_config(proxy_protocol="v1", proxy_protocol_from=["10.0.0.0/8"]))
    protocol, transport = connect(books, peer=("192.0.2.1", 5000))
    assert transport.closed and transport.written == b""
    protocol.data_received(proxy_v1_header(("198.51.100.7", 4242)))  # dropped: it is closing
    await lost(transport)
    assert books.released == [None]
    assert books.count("wsgate_proxy_protocol_errors_total", listener="test", reason="untrusted") == 1
