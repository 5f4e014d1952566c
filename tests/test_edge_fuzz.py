"""Property tests of the handshake path as a whole, through real sockets to a running gateway.

Arbitrary bytes and mutated upgrade requests, after a PROXY header (whole, cut, mutated
or none) and split arbitrarily across writes, go to a gateway whose one route takes every
host and path, on a plain listener and on one that requires the PROXY protocol. Whatever arrives, the answer is a
101 or one of the documented rejections (or a close without an answer), never a 500 or
a logged exception, and the backend sees a connection only when the client got a 101.
HYPOTHESIS_PROFILE picks the depth: "dev" (default, quick) or "ci" (deep).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peers import STEP_TIMEOUT, accept_upgrade, proxy_v1_header, proxy_v2_header, upgrade_request

from conftest import Backend, gateway_config

# Every test runs with each parser of the handshakes' heads.
pytestmark = pytest.mark.usefixtures("http_parser")

_DEPTH = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
PROFILE = settings(
    _DEPTH,
    # Each example is a connection, some of them a handshake timeout long: the deep
    # profile runs three times the quick one's examples, not ten.
    max_examples=min(_DEPTH.max_examples, 300),
    # One gateway serves every example; what each example checks is relative to its start.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# What a client may hear instead of a 101 (README, "Handshake rejections").
DOCUMENTED_REJECTIONS = {400, 404, 405, 408, 414, 426, 431}
HANDSHAKE_TIMEOUT = 0.3  # an undecided example waits this long for its 408

_VALID = upgrade_request(path="/chat?room=1", host="gateway.test")
_INSERTIONS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b"\r\n ",
    b"\r\n\r\n",
    b"\xff\xfe",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\nContent-Length: 5\r\n",
    b"Host: other.test\r\n",
    b"Sec-WebSocket-Key: short\r\n",
    b"/../",
    b"/%2e%2e/",
    b"%2E",
    b"http://other.test",
    b"X-Filler: " + b"a" * 20_000 + b"\r\n",
    b"X-Many: 1\r\n" * 150,
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
]


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    """A valid upgrade request with up to four insertions, deletions and byte flips."""
    data = bytearray(_VALID)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "flip"]))
        if kind == "insert":
            data[at:at] = draw(st.sampled_from(_INSERTIONS))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 20))]
        elif at < len(data):
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


handshake_bytes = st.one_of(
    st.binary(min_size=1, max_size=400),
    st.binary(max_size=200).map(lambda garbage: garbage + b"\r\n\r\n"),
    mutated_request(),
    mutated_request(),
)


_PROXY_HEADERS = [
    proxy_v1_header(("203.0.113.7", 51234)),
    proxy_v1_header(("2001:db8::7", 51234)),
    proxy_v1_header(None),
    proxy_v2_header(("203.0.113.7", 51234)),
    proxy_v2_header(("2001:db8::7", 51234), tlvs=((0x01, b"h2"), (0x04, b"\x00" * 40))),
    proxy_v2_header(None, local=True),
]


@st.composite
def proxy_header(draw: st.DrawFn) -> bytes:
    """A PROXY v1 or v2 header, whole, cut short, with a few bytes changed, or none at all."""
    data = bytearray(draw(st.sampled_from(_PROXY_HEADERS)))
    kind = draw(st.sampled_from(["whole", "whole", "cut", "flip", "none"]))
    if kind == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "none":
        data.clear()
    return bytes(data)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:]) if a < b]


@dataclass
class Answer:
    status: int | None  # None: closed without an HTTP answer


async def exchange(url: str, chunks: list[bytes]) -> Answer:
    """Write `chunks` one by one, then read the gateway's answer or its close."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for chunk in chunks:
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), STEP_TIMEOUT)
            except ConnectionError:
                break  # refused and closed before everything was sent: the answer is still there
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            partial = getattr(exc, "partial", b"")
            assert not partial, f"a partial answer: {partial!r}"
            return Answer(None)
        status_line = head.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 "), head
        return Answer(int(status_line.split(b" ", 2)[1]))
    finally:
        writer.close()


@pytest.fixture(params=[None, "any"], ids=["plain", "proxy_protocol"])
async def fuzz_target(
    request: pytest.FixtureRequest, start_gateway, raw_backend, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[str, Backend, bool]]:
    """A gateway on a plain listener, or on one that requires a PROXY header first."""
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        await reader.read()  # until the gateway closes the relay

    backend = await raw_backend(accept)
    config = gateway_config([backend.url], timeouts={"handshake": HANDSHAKE_TIMEOUT})
    config["listeners"][0]["proxy_protocol"] = request.param
    url = await start_gateway(config)
    with caplog.at_level(logging.ERROR, logger="wsgate"):
        yield url, backend, request.param is not None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("wsgate")]
    assert not errors, [r.getMessage() for r in errors]


@PROFILE
@given(header=proxy_header(), data=handshake_bytes, cuts=st.lists(st.integers(0, 1 << 16), max_size=8))
async def test_any_bytes_get_a_101_or_a_documented_rejection_and_only_a_101_reaches_a_backend(
    fuzz_target: tuple[str, Backend, bool], header: bytes, data: bytes, cuts: list[int]
) -> None:
    # On the plain listener a PROXY header is just more bytes before the request.
    url, backend, _ = fuzz_target
    seen_before = backend.connections
    answer = await exchange(url, split(header + data, cuts))
    if answer.status == 101:
        assert backend.connections == seen_before + 1
    else:
        assert answer.status is None or answer.status in DOCUMENTED_REJECTIONS, answer.status
        assert backend.connections == seen_before, f"the backend saw a connection for a {answer.status}"


async def test_the_valid_request_the_mutations_start_from_is_upgraded(
    fuzz_target: tuple[str, Backend, bool],
) -> None:
    # Guards the property above against passing because nothing is ever upgraded.
    url, backend, proxied = fuzz_target
    header = _PROXY_HEADERS[3] if proxied else b""
    answer = await exchange(url, split(header + _VALID, [7, 30, 60]))
    assert answer.status == 101
    assert backend.connections == 1
