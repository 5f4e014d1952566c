"""The gateway end to end: real clients, real backends, real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable
from typing import Any

import aiohttp
import pytest
import websockets
from conftest import gateway_config
from peers import (
    PROXY_V2_SIGNATURE,
    STEP_TIMEOUT,
    accept_upgrade,
    client_frame,
    open_raw_client,
    proxy_v1_header,
    proxy_v2_header,
    raw_exchange,
    read_response_head,
    until,
    upgrade_request,
)

from wsgate.books import key_hash
from wsgate.config import parse_config
from wsgate.gateway import Gateway
from wsgate.handshake import accept_key
from wsgate.workers import bind_listener

# Every test runs with each parser of the handshakes' heads.
pytestmark = pytest.mark.usefixtures("http_parser")

SIZES = [0, 125, 126, 65535, 65536, 4 * 1024 * 1024]


def payload(size: int) -> bytes:
    return os.urandom(size)


# -- echo through the gateway ----------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
async def test_websockets_client_to_websockets_backend(start_gateway, ws_backend, size):
    url = await start_gateway(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, max_size=None) as ws:
            text = "é" * (size // 2)
            await ws.send(text)
            assert await ws.recv() == text
            data = payload(size)
            await ws.send(data)
            assert await ws.recv() == data


@pytest.mark.parametrize("size", SIZES)
async def test_aiohttp_client_to_aiohttp_backend(start_gateway, aiohttp_backend, size):
    url = await start_gateway(gateway_config([aiohttp_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, max_msg_size=0) as ws:
                text = "x" * size
                await ws.send_str(text)
                assert (await ws.receive()).data == text
                data = payload(size)
                await ws.send_bytes(data)
                assert (await ws.receive()).data == data


async def test_backend_chosen_subprotocol_reaches_client(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, subprotocols=["chat.v1", "chat.v2"]) as ws:
            assert ws.subprotocol in ("chat.v1", "chat.v2")
    assert ws_backend.requests[0]["sec-websocket-protocol"] == "chat.v1, chat.v2"


async def test_permessage_deflate_negotiated_end_to_end(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    message = ("wsgate relays compressed frames untouched. " * 25000)[: 1024 * 1024]
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, max_size=None, compression="deflate") as ws:
            assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
            await ws.send(message)
            assert await ws.recv() == message
    assert "permessage-deflate" in ws_backend.requests[0]["sec-websocket-extensions"]
    assert ws_backend.messages == [message]


async def test_compression_strip_removes_the_offer(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], route={"compression": "strip"}))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, compression="deflate") as ws:
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            await ws.send("plain")
            assert await ws.recv() == "plain"
    assert "sec-websocket-extensions" not in ws_backend.requests[0]


async def test_end_to_end_headers_forwarded_and_forwarding_headers_set(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    headers = {
        "Origin": "https://app.example",
        "Cookie": "session=abc",
        "Authorization": "Bearer t0ken",
        "X-Custom": "kept",
        "X-Forwarded-For": "203.0.113.7",
        "X-Real-IP": "198.51.100.1",
        "Keep-Alive": "timeout=5",
        "X-Hop": "dropped",
    }
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(
            url + "/room/7?user=ann",
            additional_headers={**headers, "Connection": "Upgrade, X-Hop"},
            origin=None,
        ) as ws:
            await ws.send("hi")
            await ws.recv()
    seen = ws_backend.requests[0]
    assert seen[":path"] == "/room/7?user=ann"
    assert seen["origin"] == "https://app.example"
    assert seen["cookie"] == "session=abc"
    assert seen["authorization"] == "Bearer t0ken"
    assert seen["x-custom"] == "kept"
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the client's own value is not believed
    assert seen["x-real-ip"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == url.removeprefix("ws://")
    assert seen["host"] == url.removeprefix("ws://")
    assert "keep-alive" not in seen and "x-hop" not in seen
    assert seen["connection"] == "Upgrade" and seen["upgrade"] == "websocket"


async def test_route_may_rewrite_host(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], route={"upstream_host": "chat.internal"}))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            await ws.send("x")
            await ws.recv()
    assert ws_backend.requests[0]["host"] == "chat.internal"


async def test_routes_match_host_and_path_prefix(start_gateway, ws_backend, aiohttp_backend):
    config = gateway_config(
        [ws_backend.url],
        route={"match": {"host": "*.example.com", "path_prefix": "/chat"}},
        extra_routes=[{"name": "fallback", "backends": [{"url": aiohttp_backend.url}]}],
    )
    url = await start_gateway(config)
    for host, path in [
        ("A.Example.com:443", "/chat/1"),
        ("example.com", "/chat"),
        ("b.example.com", "/other"),
        ("b.example.com", "/chatroom"),
    ]:
        status, _, _ = await raw_exchange(url, upgrade_request(path=path, host=host))
        assert status == 101
    assert ws_backend.connections == 1
    assert aiohttp_backend.connections == 3


async def test_path_prefix_raw_matches_a_plain_string_prefix(start_gateway, ws_backend, aiohttp_backend):
    config = gateway_config(
        [ws_backend.url],
        route={"match": {"path_prefix_raw": "/chat"}},
        extra_routes=[{"name": "fallback", "backends": [{"url": aiohttp_backend.url}]}],
        timeouts={"close": "50ms"},
    )
    url = await start_gateway(config)
    for path in ["/chatroom", "/chat/1", "/other"]:
        status, _, _ = await raw_exchange(url, upgrade_request(path=path))
        assert status == 101
    assert (ws_backend.connections, aiohttp_backend.connections) == (2, 1)


# -- rejected handshakes ------------------------------------------------------------


def _request_without(header: str) -> bytes:
    lines = upgrade_request().split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(header.lower().encode()))


REJECTIONS = [
    pytest.param(upgrade_request().replace(b"GET", b"POST", 1), 405, id="post"),
    pytest.param(upgrade_request().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400, id="http-1.0"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426, id="plain-http"),
    pytest.param(upgrade_request().replace(b"Upgrade: websocket", b"Upgrade: h2c"), 426, id="other-upgrade"),
    pytest.param(upgrade_request().replace(b"Connection: Upgrade", b"Connection: keep-alive"), 400, id="no-connection-upgrade"),
    pytest.param(_request_without("Sec-WebSocket-Key"), 400, id="missing-key"),
    pytest.param(upgrade_request(key="c2hvcnQ="), 400, id="short-key"),
    pytest.param(upgrade_request(key="not base64!!"), 400, id="bad-key"),
    pytest.param(_request_without("Sec-WebSocket-Version"), 400, id="missing-version"),
    pytest.param(upgrade_request().replace(b"Version: 13", b"Version: 8"), 426, id="version-8"),
    pytest.param(_request_without("Host"), 400, id="missing-host"),
    pytest.param(upgrade_request(extra="X-Big: " + "a" * 20000 + "\r\n"), 431, id="huge-headers"),
    pytest.param(b"BLAH\r\n\r\n", 400, id="garbage"),
    pytest.param(upgrade_request(host="other.test"), 404, id="no-route"),
    pytest.param(upgrade_request(extra="Content-Length: 4\r\n") + b"body", 400, id="with-body"),
    pytest.param(upgrade_request(extra="Origin: https://evil.example\r\n"), 403, id="bad-origin"),
]


@pytest.mark.parametrize(("request_bytes", "status"), REJECTIONS)
async def test_rejected_handshakes_never_reach_a_backend(start_gateway, ws_backend, request_bytes, status):
    route = {"match": {"host": "gateway.test"}, "allowed_origins": ["https://app.example"]}
    url = await start_gateway(gateway_config([ws_backend.url], route=route))
    got, headers, body = await raw_exchange(url, request_bytes)
    assert got == status
    assert body, "every rejection carries a short reason"
    if b"Version: 8" in request_bytes:
        assert headers["sec-websocket-version"] == "13"
    if status == 405:
        assert headers["allow"] == "GET"
    assert ws_backend.connections == 0


async def test_handshake_timeout_answers_408(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], timeouts={"handshake": "50ms"}))
    status, _, _ = await raw_exchange(url, b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert status == 408
    assert ws_backend.connections == 0


async def test_connection_limit_per_ip(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], limits={"max_connections_per_ip": 1}))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            status, headers, _ = await raw_exchange(url, upgrade_request())
            assert (status, headers["retry-after"]) == (429, "1")
            await ws.send("still fine")
            assert await ws.recv() == "still fine"


# -- backend failures -----------------------------------------------------------------


async def test_backend_refusing_connections_gives_502(start_gateway, closed_port):
    url = await start_gateway(gateway_config([f"ws://127.0.0.1:{closed_port}"]))
    status, _, body = await raw_exchange(url, upgrade_request())
    assert status == 502
    assert b"unreachable" in body


async def test_backend_that_never_answers_gives_504(start_gateway, raw_backend):
    never = asyncio.Event()

    async def silent(reader, writer):
        await never.wait()

    backend = await raw_backend(silent)
    url = await start_gateway(gateway_config([backend.url], timeouts={"connect": "100ms"}))
    status, _, _ = await raw_exchange(url, upgrade_request())
    assert status == 504
    assert backend.connections == 1
    never.set()


async def test_backend_refusal_is_relayed_with_body(start_gateway, raw_backend):
    async def forbid(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"error": "not your room"}'
        writer.write(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nX-Why: acl\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()

    url = await start_gateway(gateway_config([(await raw_backend(forbid)).url]))
    status, headers, body = await raw_exchange(url, upgrade_request())
    assert (status, body) == (403, b'{"error": "not your room"}')
    assert headers["content-type"] == "application/json" and headers["x-why"] == "acl"


def _answer_101(accept: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extra + b"\r\n"
    )


def _request_key(head: bytes) -> bytes:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"sec-websocket-key:"):
            return line.split(b":", 1)[1].strip()
    raise AssertionError("no key forwarded")


@pytest.mark.parametrize(
    ("answer", "client_extra"),
    [
        pytest.param(lambda key: _answer_101(b"d3JvbmcgYWNjZXB0IGtleQ=="), "", id="wrong-accept"),
        pytest.param(lambda key: _answer_101(b"")[:-2].replace(b"Sec-WebSocket-Accept: \r\n", b"") + b"\r\n", "", id="missing-accept"),
        pytest.param(lambda key: _answer_101(accept_key(key), b"Sec-WebSocket-Protocol: other\r\n"),
                     "Sec-WebSocket-Protocol: chat\r\n", id="unoffered-subprotocol"),
        pytest.param(lambda key: _answer_101(accept_key(key), b"Sec-WebSocket-Extensions: permessage-deflate\r\n"),
                     "", id="unoffered-extension"),
        pytest.param(lambda key: b"HTTP/1.1 200 OK\r\nbroken header line\r\n\r\n", "", id="malformed"),
    ],
)
async def test_broken_backend_101_gives_502(start_gateway, raw_backend, answer, client_extra):
    async def broken(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(_request_key(head)))
        await writer.drain()
        await reader.read()

    url = await start_gateway(gateway_config([(await raw_backend(broken)).url]))
    status, _, _ = await raw_exchange(url, upgrade_request(extra=client_extra))
    assert status == 502


async def test_backend_closing_before_answering_gives_502(start_gateway, raw_backend):
    async def hang_up(reader, writer):
        await reader.readuntil(b"\r\n\r\n")

    url = await start_gateway(gateway_config([(await raw_backend(hang_up)).url]))
    status, _, _ = await raw_exchange(url, upgrade_request())
    assert status == 502


# -- bytes around the handshake are never lost ---------------------------------------------


async def test_pipelined_first_frame_arrives(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(upgrade_request() + client_frame(0x1, b"first!"))
        status, _, _ = await read_response_head(reader)
        assert status == 101
        frame = await asyncio.wait_for(reader.readexactly(2 + 6), STEP_TIMEOUT)
        assert frame == b"\x81\x06first!"
    finally:
        writer.close()
    assert ws_backend.messages == ["first!"]


async def test_backend_first_message_in_same_write_as_101(start_gateway, raw_backend):
    async def greet(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(_answer_101(accept_key(_request_key(head))) + b"\x81\x05hello")
        await writer.drain()
        await reader.read(1)  # the client's close frame: hang up

    url = await start_gateway(gateway_config([(await raw_backend(greet)).url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            assert await ws.recv() == "hello"


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (1001, "going"), (4000, "custom reason")])
async def test_close_codes_cross_the_gateway_both_ways(start_gateway, ws_backend, code, reason):
    url = await start_gateway(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        ws = await websockets.connect(url)
        await ws.close(code=code, reason=reason)
        assert (ws.close_code, ws.close_reason) == (code, reason)
        assert await ws_backend.closes.get() == (code, reason)


async def test_backend_close_code_reaches_client(start_gateway, raw_backend):
    async def close_4001(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(_answer_101(accept_key(_request_key(head))) + b"\x88\x06" + struct.pack("!H", 4001) + b"done")
        await writer.drain()
        await reader.read(1)  # the client's close frame: hang up

    url = await start_gateway(gateway_config([(await raw_backend(close_4001)).url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
    assert (ws.close_code, ws.close_reason) == (4001, "done")


async def test_both_legs_use_tcp_nodelay(ws_backend):
    import socket

    from wsgate.config import parse_config
    from wsgate.gateway import Gateway

    gateway = Gateway(parse_config(gateway_config([ws_backend.url])))
    await gateway.start()
    host, port = gateway.addresses[0]
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            async with websockets.connect(f"ws://{host}:{port}") as ws:
                await ws.send("x")
                await ws.recv()
                (relay,) = gateway.books.relays
                for leg in (relay.client, relay.backend):
                    sock = leg.transport.get_extra_info("socket")
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        await gateway.close()


# -- the request head's size limit, however the head is split --------------------


async def _send_in_pieces(url: str, data: bytes, pieces: int) -> tuple[int, dict[str, str], bytes]:
    """Send `data` in `pieces` writes (each drained first), then read the gateway's answer."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        size = -(-len(data) // pieces)
        for start in range(0, len(data), size):
            writer.write(data[start : start + size])
            await writer.drain()
        return await read_response_head(reader)
    finally:
        writer.close()


@pytest.mark.parametrize("pieces", [1, 2, 5200], ids=["one-write", "two-writes", "byte-by-byte"])
@pytest.mark.parametrize(("limit", "head_extra"), [("1KiB", 5 * 1024), ("16KiB", 17 * 1024)])
async def test_oversized_head_answers_431_before_any_backend(
    start_gateway, ws_backend, pieces, limit, head_extra
):
    config = gateway_config([ws_backend.url], limits={"max_header_bytes": limit})
    url = await start_gateway(config)
    request = upgrade_request(extra="X-Big: " + "a" * head_extra + "\r\n")
    async with asyncio.timeout(STEP_TIMEOUT):
        status, _, _ = await _send_in_pieces(url, request, min(pieces, len(request)))
    assert status == 431
    assert ws_backend.connections == 0


async def test_head_at_the_limit_is_accepted(start_gateway, ws_backend):
    base = upgrade_request(extra="X-Pad: \r\n", key="dGhlIHNhbXBsZSBub25jZQ==")
    request = base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (1024 - len(base)))
    assert len(request) == 1024
    url = await start_gateway(gateway_config([ws_backend.url], limits={"max_header_bytes": "1KiB"}))
    status, _, _ = await raw_exchange(url, request)
    assert status == 101
    over = request.replace(b"X-Pad: ", b"X-Pad: p")
    status, _, _ = await raw_exchange(url, over)
    assert status == 431


async def test_nothing_past_the_head_limit_is_parsed(start_gateway, ws_backend):
    # A whole oversized head in one write is judged by its size alone: were it parsed,
    # the malformed line past the limit would make the answer a 400.
    url = await start_gateway(gateway_config([ws_backend.url], limits={"max_header_bytes": "1KiB"}))
    request = upgrade_request(extra="X-Pad: " + "p" * 2000 + "\r\nno colon here\r\n")
    status, _, _ = await raw_exchange(url, request)
    assert status == 431
    assert ws_backend.connections == 0


async def test_frames_in_the_same_write_as_the_head_may_exceed_the_head_limit(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], limits={"max_header_bytes": "1KiB"}))
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    message = b"m" * 3000
    try:
        writer.write(upgrade_request() + client_frame(0x2, message) + client_frame(0x1, b"second"))
        status, _, _ = await read_response_head(reader)
        assert status == 101
        echoed = await asyncio.wait_for(reader.readexactly(4 + len(message) + 2 + 6), STEP_TIMEOUT)
    finally:
        writer.close()
    assert echoed == b"\x82\x7e" + struct.pack("!H", len(message)) + message + b"\x81\x06second"


# -- request hygiene: refused before any backend is contacted ------------------------------


def _with_target(target: str) -> bytes:
    return upgrade_request().replace(b"GET / ", b"GET " + target.encode("latin-1") + b" ", 1)


def _with_header_lines(count: int) -> bytes:
    """A valid request grown to `count` header lines."""
    request = upgrade_request()
    padding = "".join(f"X-Pad-{i}: p\r\n" for i in range(count - request.count(b"\r\n") + 2))
    return upgrade_request(extra=padding)


HYGIENE_REJECTIONS = [
    pytest.param(_with_target("http://evil.test/"), 400, id="absolute-form-other-host"),
    pytest.param(_with_target("ws://gateway.test.evil.test/"), 400, id="absolute-form-host-suffix"),
    pytest.param(_with_target("evil.test:80"), 400, id="authority-form"),
    pytest.param(_with_target("/" + "t" * 8 * 1024), 414, id="target-over-8KiB"),
    pytest.param(_with_header_lines(101), 431, id="101-header-lines"),
    pytest.param(_with_target("/../../etc/passwd"), 400, id="dot-dot"),
    pytest.param(_with_target("/chat/./x"), 400, id="dot"),
    pytest.param(_with_target("/chat/.."), 400, id="trailing-dot-dot"),
    pytest.param(_with_target("/chat/%2e%2E/x"), 400, id="encoded-dot-dot"),
    pytest.param(_with_target("/chat/.%2e?x=1"), 400, id="half-encoded-dot-dot"),
    pytest.param(_with_target("/chat/%2E"), 400, id="encoded-dot"),
    pytest.param(_with_target("/chat%2f..%2fx"), 400, id="encoded-slash-dot-dot"),
    pytest.param(upgrade_request(extra="X-Nul: a\x00b\r\n"), 400, id="nul-in-value"),
    pytest.param(upgrade_request(extra="X-Cr: a\rb\r\n"), 400, id="cr-in-value"),
    pytest.param(upgrade_request(extra="X-Lf: a\nX-Injected: b\r\n"), 400, id="lf-in-value"),
    pytest.param(upgrade_request(extra="X-Fold: a\r\n b\r\n"), 400, id="obs-fold-space"),
    pytest.param(upgrade_request(extra="X-Fold: a\r\n\tb\r\n"), 400, id="obs-fold-tab"),
]


async def _accepting_backend(raw_backend):
    """A raw backend that completes every upgrade, then hangs up; `connections` counts TCP accepts."""

    async def accept(reader, writer):
        await accept_upgrade(reader, writer)

    return await raw_backend(accept)


@pytest.mark.parametrize("pieces", [1, 64], ids=["one-write", "many-writes"])
@pytest.mark.parametrize(("request_bytes", "status"), HYGIENE_REJECTIONS)
async def test_request_hygiene_refusals_never_reach_a_backend(
    start_gateway, raw_backend, request_bytes, status, pieces
):
    backend = await _accepting_backend(raw_backend)
    url = await start_gateway(gateway_config([backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        got, _, body = await _send_in_pieces(url, request_bytes, pieces)
        assert (got, backend.connections) == (status, 0)
        assert body, "every rejection carries a short reason"
        got, _, _ = await raw_exchange(url, upgrade_request())
    assert (got, backend.connections) == (101, 1), "the same gateway passes a clean request"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(upgrade_request(extra="X-Big: " + "a" * 64 * 1024 + "\r\n"), 431, id="64KiB-head"),
        pytest.param(_with_header_lines(10_000), 431, id="10000-header-lines"),
        pytest.param(_with_header_lines(10_000).replace(b"\r\n", b"\n"), 400, id="10000-bare-lf-lines"),
        pytest.param(b"GET /" + b"\xff" * 64 * 1024 + b" HTTP/1.1\r\n\r\n", 414, id="64KiB-binary-target"),
        pytest.param(b"GET /" + b"a" * 64 * 1024 + b"\r\n\r\n", 431, id="64KiB-http-0.9"),
        pytest.param(b"GET / HTTP/1.1\r\n" + b"\x00\r\n" * 20_000, 431, id="20000-binary-lines"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc" + bytes(64 * 1024), 400, id="tls-hello"),
    ],
)
async def test_huge_head_in_one_write_is_refused_without_a_backend(
    start_gateway, raw_backend, request_bytes, status
):
    backend = await _accepting_backend(raw_backend)
    url = await start_gateway(gateway_config([backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        got, _, _ = await raw_exchange(url, request_bytes)
    assert (got, backend.connections) == (status, 0)


@pytest.mark.parametrize(
    ("request_bytes", "forwarded_target"),
    [
        pytest.param(_with_target("/" + "t" * 8191), b"/" + b"t" * 8191, id="target-at-8KiB"),
        pytest.param(_with_header_lines(100), b"/", id="100-header-lines"),
        pytest.param(_with_target("/a..b/.c/d.?q=/../"), b"/a..b/.c/d.?q=/../", id="dots-not-segments"),
        pytest.param(_with_target("http://gateway.test/c?x=1"), b"/c?x=1", id="absolute-form-same-host"),
        pytest.param(_with_target("WS://Gateway.Test"), b"/", id="absolute-form-no-path"),
    ],
)
async def test_requests_at_the_hygiene_limits_pass(
    start_gateway, raw_backend, request_bytes, forwarded_target
):
    heads: list[bytes] = []

    async def accept(reader, writer):
        heads.append(await accept_upgrade(reader, writer))

    url = await start_gateway(gateway_config([(await raw_backend(accept)).url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        status, _, _ = await raw_exchange(url, request_bytes)
    assert status == 101
    (head,) = heads
    assert head.startswith(b"GET " + forwarded_target + b" HTTP/1.1\r\n")


async def test_target_and_header_count_limits_are_configurable(start_gateway, raw_backend):
    backend = await _accepting_backend(raw_backend)
    limits = {"max_target_bytes": "1KiB", "max_headers": 10}
    url = await start_gateway(gateway_config([backend.url], limits=limits))
    async with asyncio.timeout(STEP_TIMEOUT):
        assert (await raw_exchange(url, _with_target("/" + "t" * 1024)))[0] == 414
        assert (await raw_exchange(url, _with_header_lines(11)))[0] == 431
        assert (await raw_exchange(url, _with_target("/" + "t" * 1023)))[0] == 101
        assert (await raw_exchange(url, _with_header_lines(10)))[0] == 101
    assert backend.connections == 2


# -- backend response hygiene ------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda key: _answer_101(accept_key(key), b"Content-Length: 0\r\n"), id="content-length"),
        pytest.param(lambda key: _answer_101(accept_key(key), b"Transfer-Encoding: chunked\r\n"),
                     id="transfer-encoding"),
        pytest.param(lambda key: _answer_101(accept_key(key), b"X-Big: " + b"b" * 17 * 1024 + b"\r\n"),
                     id="head-over-max-header-bytes"),
        pytest.param(lambda key: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), id="garbage"),
        pytest.param(lambda key: b"SSH-2.0-OpenSSH_9.6\r\n\r\n", id="not-http"),
    ],
)
@pytest.mark.parametrize("pieces", [1, 16], ids=["one-write", "many-writes"])
async def test_bad_backend_101_gives_502_and_closes_the_backend(start_gateway, raw_backend, answer, pieces):
    after_answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def misbehave(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        data = answer(_request_key(head))
        size = -(-len(data) // pieces)
        try:
            for start in range(0, len(data), size):
                writer.write(data[start : start + size])
                await writer.drain()
            after_answer.set_result(await reader.read())
        except ConnectionError:
            # The gateway closed while the rest of the answer was on its way: a reset.
            after_answer.set_result(b"")

    url = await start_gateway(gateway_config([(await raw_backend(misbehave)).url]))
    async with asyncio.timeout(STEP_TIMEOUT):
        status, _, _ = await raw_exchange(url, upgrade_request())
        assert status == 502
        assert await after_answer == b"", "the gateway closed the backend connection"


async def test_426_sends_one_connection_header(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 426 ")
    connection_lines = [line for line in head.split(b"\r\n") if line.lower().startswith(b"connection:")]
    assert connection_lines == [b"Connection: Upgrade, close"]


# -- the client's address and the limits per address ----------------------------------


def ws_url(gateway: Gateway) -> str:
    host, port = gateway.addresses[0]
    return f"ws://{host}:{port}"


async def connect_from(url: str, local_host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the gateway from a chosen source address (all of 127.0.0.0/8 is local)."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), local_addr=(local_host, 0))


async def answer_at_accept(url: str, local_host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """What the gateway answers a connection that has sent nothing yet."""
    reader, writer = await connect_from(url, local_host)
    try:
        return await read_response_head(reader)
    finally:
        writer.close()


async def exchange_from(url: str, local_host: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect_from(url, local_host)
    try:
        writer.write(data)
        return await read_response_head(reader)
    finally:
        writer.close()


async def test_untrusted_peer_cannot_choose_its_forwarded_address(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], route={"hash_key": "ip"}))
    spoofed = "X-Forwarded-For: 203.0.113.7\r\nForwarded: for=198.51.100.9\r\nX-Real-IP: 192.0.2.1\r\n"
    status, _, _ = await raw_exchange(url, upgrade_request(extra=spoofed))
    assert status == 101
    seen = ws_backend.requests[0]
    assert (seen["x-forwarded-for"], seen["x-real-ip"]) == ("127.0.0.1", "127.0.0.1")
    assert "forwarded" not in seen


@pytest.mark.parametrize(
    ("header", "client", "chain"),
    [
        pytest.param(
            "X-Forwarded-For: 198.51.100.1, 203.0.113.9\r\nX-Forwarded-For: 10.1.2.3:5050\r\n",
            "203.0.113.9", "203.0.113.9, 10.1.2.3, 127.0.0.1", id="x-forwarded-for",
        ),
        pytest.param(
            'Forwarded: for=198.51.100.1, for="[2001:DB8::9]:4711";proto=https, for=10.1.2.3\r\n',
            "2001:db8::9", "2001:db8::9, 10.1.2.3, 127.0.0.1", id="forwarded",
        ),
        pytest.param(
            "X-Forwarded-For: 10.1.2.4\r\n", "10.1.2.4", "10.1.2.4, 127.0.0.1", id="all-trusted",
        ),
        pytest.param(
            "Forwarded: for=198.51.100.1, for=_hidden\r\n", "127.0.0.1", "127.0.0.1", id="obfuscated",
        ),
        pytest.param("X-Forwarded-For: 203.0.113.9, bogus\r\n", "127.0.0.1", "127.0.0.1", id="invalid"),
        pytest.param("", "127.0.0.1", "127.0.0.1", id="absent"),
    ],
)
async def test_trusted_peer_names_the_client(start_gateway, ws_backend, caplog, header, client, chain):
    caplog.set_level(logging.INFO, logger="wsgate.access")
    config = gateway_config([ws_backend.url], trusted_proxies=["127.0.0.1", "10.0.0.0/8"])
    url = await start_gateway(config)
    status, _, _ = await raw_exchange(url, upgrade_request(extra=header))
    assert status == 101
    seen = ws_backend.requests[0]
    assert (seen["x-forwarded-for"], seen["x-real-ip"]) == (chain, client)
    assert "forwarded" not in seen
    await until(lambda: any(r.name == "wsgate.access" for r in caplog.records), "the access line")
    (line,) = [r.access for r in caplog.records if r.name == "wsgate.access"]
    # The peer is logged with its port, as any client is; a client named by the proxy, without.
    assert line["client"] == client or (client == "127.0.0.1" and line["client"].startswith("127.0.0.1:"))
    assert line["key_hash"] == key_hash(client.encode())  # the route hashes by ip


async def test_per_ip_cap_counts_the_resolved_address(start_gateway, ws_backend):
    config = gateway_config(
        [ws_backend.url], trusted_proxies=["127.0.0.1"], limits={"max_connections_per_ip": 1}
    )
    url = await start_gateway(config)
    async with asyncio.timeout(STEP_TIMEOUT):
        _, first = await open_raw_client(url, extra="X-Forwarded-For: 203.0.113.1\r\n")
        _, second = await open_raw_client(url, extra="X-Forwarded-For: 203.0.113.2\r\n")
        again = upgrade_request(extra="X-Forwarded-For: 203.0.113.1\r\n")
        status, headers, _ = await raw_exchange(url, again)
        first.close()
        second.close()
    assert (status, headers["retry-after"]) == (429, "1")
    assert ws_backend.connections == 2


async def test_new_connections_over_the_rate_get_429_with_retry_after(start_gateway, ws_backend):
    limits = {"new_connections_per_ip": {"rate": "1/m", "burst": 2}}
    url = await start_gateway(gateway_config([ws_backend.url], limits=limits))
    async with asyncio.timeout(STEP_TIMEOUT):
        for _ in range(2):
            assert (await raw_exchange(url, upgrade_request()))[0] == 101
        status, headers, body = await answer_at_accept(url)
    assert status == 429 and body
    # One token a minute, and the second was spent a moment ago.
    assert 1 <= int(headers["retry-after"]) <= 60
    assert ws_backend.connections == 2


async def test_per_ip_cap_off_leaves_the_global_cap(start_gateway, ws_backend):
    limits = {"max_connections_per_ip": None, "max_connections": 2}
    url = await start_gateway(gateway_config([ws_backend.url], limits=limits))
    async with asyncio.timeout(STEP_TIMEOUT):
        _, first = await open_raw_client(url)
        _, second = await open_raw_client(url)
        status, headers, _ = await answer_at_accept(url)
        first.close()
        second.close()
    assert (status, headers["retry-after"]) == (503, "1")


async def test_bucket_table_stays_within_its_bound(start_gateway_object, ws_backend):
    limits = {"new_connections_per_ip": {"rate": "1/m", "burst": 1, "max_addresses": 4}}
    gateway = await start_gateway_object(
        gateway_config([ws_backend.url], trusted_proxies=["127.0.0.1"], limits=limits)
    )
    url = ws_url(gateway)

    def from_address(i: int) -> bytes:
        return upgrade_request(extra=f"X-Forwarded-For: 203.0.113.{i}\r\n")

    async with asyncio.timeout(STEP_TIMEOUT):
        for i in range(20):
            assert (await raw_exchange(url, from_address(i)))[0] == 101
            assert gateway.tracked_addresses <= 4
        assert gateway.tracked_addresses == 4
        # The latest address is remembered, with its one token spent; the first was
        # forgotten, so it starts again with a full bucket.
        assert (await raw_exchange(url, from_address(19)))[0] == 429
        assert (await raw_exchange(url, from_address(0)))[0] == 101


async def test_refused_and_relayed_connections_leave_no_count_behind(start_gateway_object, ws_backend):
    # Clients from 127.0.0.1 are admitted per address at accept; those from 127.0.0.2, a
    # trusted proxy, once their request head has named the client.
    limits = {
        "max_connections": 5,
        "max_connections_per_ip": 2,
        "new_connections_per_ip": {"rate": "1/m", "burst": 3},
    }
    gateway = await start_gateway_object(
        gateway_config([ws_backend.url], trusted_proxies=["127.0.0.2"], limits=limits)
    )
    url = ws_url(gateway)
    held: list[asyncio.StreamWriter] = []
    answers: list[tuple[int, bytes]] = []

    async def hold(local_host: str, client: str = "") -> None:
        reader, writer = await connect_from(url, local_host)
        held.append(writer)
        writer.write(upgrade_request(extra=f"X-Forwarded-For: {client}\r\n" if client else ""))
        assert (await read_response_head(reader))[0] == 101

    async def refused(answer: Awaitable[tuple[int, dict[str, str], bytes]]) -> None:
        status, _, body = await answer
        answers.append((status, body))
        # A refused connection gives back what it was counted for, however it was refused.
        await until(lambda: gateway.connection_count == len(held), "the refused connection's release")

    via_proxy = upgrade_request(extra="X-Forwarded-For: 203.0.113.1\r\n")
    async with asyncio.timeout(STEP_TIMEOUT):
        await hold("127.0.0.1")
        await hold("127.0.0.1")
        await refused(answer_at_accept(url))  # the cap of 2
        await refused(answer_at_accept(url))  # the bucket of 3, now empty
        await hold("127.0.0.2", "203.0.113.1")
        await hold("127.0.0.2", "203.0.113.1")
        await refused(exchange_from(url, "127.0.0.2", via_proxy))
        await refused(exchange_from(url, "127.0.0.2", via_proxy))
        await hold("127.0.0.2", "203.0.113.2")
        await refused(answer_at_accept(url, "127.0.0.3"))  # the global cap of 5
        assert gateway.books.open_per_ip == {"127.0.0.1": 2, "203.0.113.1": 2, "203.0.113.2": 1}
        for writer in held:
            writer.close()
        await until(lambda: gateway.connection_count == 0, "every connection's release")
    cap = b"too many connections from your address\n"
    rate = b"too many new connections from your address\n"
    full = b"the gateway is at its connection limit\n"
    assert answers == [(429, cap), (429, rate), (429, cap), (429, rate), (503, full)]
    assert gateway.books.open_per_ip == {}


# -- PROXY protocol listeners ---------------------------------------------------------


def proxy_config(backends: list[str], proxy_protocol: str = "any", **sections: Any) -> dict[str, Any]:
    config = gateway_config(backends, **sections)
    config["listeners"][0]["proxy_protocol"] = proxy_protocol
    return config


def proxy_errors(gateway: Gateway, reason: str) -> float:
    labels = {"listener": "test", "reason": reason}
    return gateway.registry.get_sample_value("wsgate_proxy_protocol_errors_total", labels) or 0.0


async def _unanswered(gateway: Gateway, data: bytes, eof: bool = False) -> bytes:
    """Send `data` (then EOF if asked) and return all the gateway sends until it closes."""
    host, port = gateway.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        try:
            return await asyncio.wait_for(reader.read(), STEP_TIMEOUT)
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


PROXY_HEADERS = [
    pytest.param("v1", proxy_v1_header(("203.0.113.7", 51234)), "203.0.113.7", id="v1-tcp4"),
    pytest.param("v1", proxy_v1_header(("2001:db8::7", 51234)), "2001:db8::7", id="v1-tcp6"),
    pytest.param("v1", proxy_v1_header(None), "127.0.0.1", id="v1-unknown"),
    pytest.param("v2", proxy_v2_header(("203.0.113.7", 51234), tlvs=((0xEA, b"vpce-1"),)), "203.0.113.7", id="v2"),
    pytest.param("any", proxy_v2_header(("2001:db8::7", 443)), "2001:db8::7", id="v2-inet6-on-any"),
    pytest.param("any", proxy_v1_header(("203.0.113.7", 1)), "203.0.113.7", id="v1-on-any"),
    pytest.param("v2", proxy_v2_header(("203.0.113.7", 9), local=True), "127.0.0.1", id="v2-local"),
]


@pytest.mark.parametrize("pieces", [1, 1000], ids=["one-write", "byte-by-byte"])
@pytest.mark.parametrize(("version", "header", "client_ip"), PROXY_HEADERS)
async def test_proxy_header_gives_the_backend_the_client_address(
    start_gateway_object, ws_backend, version, header, client_ip, pieces
):
    gateway = await start_gateway_object(proxy_config([ws_backend.url], version))
    data = header + upgrade_request()
    async with asyncio.timeout(STEP_TIMEOUT):
        status, _, _ = await _send_in_pieces(ws_url(gateway), data, min(pieces, len(data)))
    assert status == 101
    (seen,) = ws_backend.requests
    assert seen["x-real-ip"] == client_ip
    assert seen["x-forwarded-for"] == client_ip


async def test_proxy_source_address_is_the_ip_hash_key(start_gateway_object, ws_backend, aiohttp_backend):
    backends = [ws_backend.url, aiohttp_backend.url]
    gateway = await start_gateway_object(proxy_config(backends, "v2", route={"hash_key": "ip"}))
    pool = gateway.pools["test"]
    now = asyncio.get_running_loop().time()

    def owner(ip: str) -> str:
        return next(pool.candidates(ip.encode(), now)).identity

    # A source that the ring gives to the backend the socket's own address does not get.
    source = next(f"198.51.100.{n}" for n in range(1, 255) if owner(f"198.51.100.{n}") != owner("127.0.0.1"))
    chosen, other = (ws_backend, aiohttp_backend)[:: 1 if owner(source) == ws_backend.url else -1]
    for port in (1000, 2000, 3000):
        status, _, _ = await raw_exchange(ws_url(gateway), proxy_v2_header((source, port)) + upgrade_request())
        assert status == 101
    assert (chosen.connections, other.connections) == (3, 0)
    assert {request["x-real-ip"] for request in chosen.requests} == {source}


async def test_proxy_source_address_counts_against_the_per_ip_limit(start_gateway_object, ws_backend):
    config = proxy_config([ws_backend.url], "v1", limits={"max_connections_per_ip": 1})
    gateway = await start_gateway_object(config)
    host, port = gateway.addresses[0]
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(proxy_v1_header(("203.0.113.7", 1)) + upgrade_request())
            status, _, _ = await read_response_head(reader)
            assert status == 101
            again = proxy_v1_header(("203.0.113.7", 2)) + upgrade_request()
            status, _, _ = await raw_exchange(ws_url(gateway), again)
            assert status == 429
            other = proxy_v1_header(("203.0.113.8", 1)) + upgrade_request()
            status, _, _ = await raw_exchange(ws_url(gateway), other)
            assert status == 101
        finally:
            writer.close()


BAD_PROXY_STARTS = [
    pytest.param("any", upgrade_request(), False, "malformed", id="no-header"),
    pytest.param("v2", proxy_v1_header(("203.0.113.7", 1)) + upgrade_request(), False, "malformed", id="v1-on-v2"),
    pytest.param("v1", proxy_v2_header(("203.0.113.7", 1)) + upgrade_request(), False, "malformed", id="v2-on-v1"),
    pytest.param("any", b"PROXY TCP4 203.0.113.300 192.0.2.1 1 443\r\n", False, "malformed", id="v1-bad-address"),
    pytest.param("any", proxy_v1_header(("203.0.113.7", 1))[:20], True, "truncated", id="v1-truncated"),
    pytest.param("any", proxy_v2_header(("203.0.113.7", 1))[:20], True, "truncated", id="v2-truncated"),
    pytest.param("any", b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n", False, "too_large", id="v1-oversized"),
    pytest.param(
        "any", PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 60000) + bytes(60000), False, "too_large",
        id="v2-oversized",
    ),
]


@pytest.mark.parametrize(("version", "data", "eof", "reason"), BAD_PROXY_STARTS)
async def test_bad_proxy_header_closes_without_an_answer(
    start_gateway_object, ws_backend, version, data, eof, reason
):
    gateway = await start_gateway_object(proxy_config([ws_backend.url], version))
    assert await _unanswered(gateway, data, eof=eof) == b""
    assert proxy_errors(gateway, reason) == 1
    assert ws_backend.connections == 0
    assert gateway.connection_count == 0
    # The listener goes on serving.
    build = proxy_v2_header if version == "v2" else proxy_v1_header
    status, _, _ = await raw_exchange(ws_url(gateway), build(("203.0.113.7", 1)) + upgrade_request())
    assert status == 101


async def test_incomplete_proxy_header_is_dropped_at_the_handshake_timeout(start_gateway_object, ws_backend):
    config = proxy_config([ws_backend.url], timeouts={"handshake": "50ms"})
    gateway = await start_gateway_object(config)
    assert await _unanswered(gateway, proxy_v2_header(("203.0.113.7", 1))[:15]) == b""
    assert proxy_errors(gateway, "timeout") == 1
    assert ws_backend.connections == 0


async def test_proxy_header_only_from_proxy_protocol_from(start_gateway_object, ws_backend):
    data = proxy_v1_header(("203.0.113.7", 1)) + upgrade_request()
    config = proxy_config([ws_backend.url])
    config["listeners"][0]["proxy_protocol_from"] = ["10.0.0.0/8", "2001:db8::/32"]
    gateway = await start_gateway_object(config)
    assert await _unanswered(gateway, data) == b""
    assert proxy_errors(gateway, "untrusted") == 1
    assert ws_backend.connections == 0

    config["listeners"][0]["proxy_protocol_from"] = ["10.0.0.0/8", "127.0.0.0/8"]
    trusting = await start_gateway_object(config)
    status, _, _ = await raw_exchange(ws_url(trusting), data)
    assert status == 101
    assert ws_backend.requests[0]["x-real-ip"] == "203.0.113.7"


async def test_a_connection_awaiting_its_proxy_header_counts_against_max_connections(
    start_gateway_object, ws_backend
):
    gateway = await start_gateway_object(proxy_config([ws_backend.url], "v1", limits={"max_connections": 1}))
    host, port = gateway.addresses[0]
    async with asyncio.timeout(STEP_TIMEOUT):
        _, silent = await asyncio.open_connection(host, port)
        await until(lambda: gateway.connection_count == 1, "the silent connection to be admitted")
        status, headers, _ = await raw_exchange(ws_url(gateway), proxy_v1_header(("203.0.113.7", 1)))
        assert (status, headers["retry-after"]) == (503, "1")
        silent.close()
        await until(lambda: gateway.connection_count == 0, "the silent connection to be released")
        behind = proxy_v1_header(("203.0.113.7", 2)) + upgrade_request()
        status, _, _ = await raw_exchange(ws_url(gateway), behind)
    assert status == 101


# -- the accept queue ------------------------------------------------------------------------


def _accept_queue_limit(sock: socket.socket) -> int:
    # For a listening socket, Linux reports the accept queue's limit in tcp_info's tcpi_sacked.
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("=8B6I", info)[13]


def _somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except OSError:
        pytest.skip("no /proc/sys/net/core/somaxconn (not Linux)")


async def test_listeners_get_the_largest_accept_queue_the_kernel_allows(ws_backend):
    # A burst beyond the accept queue loses its SYNs, which come back a second or more later.
    cap = _somaxconn()
    if cap <= 1024:
        pytest.skip("net.core.somaxconn is too small here to tell a raised queue from the old one")
    gateway = Gateway(parse_config(gateway_config([ws_backend.url])))
    await gateway.start()
    try:
        (server,) = gateway._servers.values()
        assert _accept_queue_limit(server.sockets[0]) == min(cap, 65535)
    finally:
        await gateway.close()
    shared = bind_listener("127.0.0.1", 0)  # the supervisor's, for its workers
    try:
        assert _accept_queue_limit(shared) == min(cap, 65535)
    finally:
        shared.close()


# -- bursts of handshakes --------------------------------------------------------------------

BURST = 200


async def test_a_burst_of_handshakes_is_spread_over_turns_of_the_loop(ws_backend):
    # Every connection is accepted, then every head is in the kernel before the gateway
    # reads any: handled all in one turn, they would hold up every relay for as long as
    # the whole burst takes.
    from wsgate.books import HANDSHAKE_STEPS_PER_TURN

    limits = {"max_connections_per_ip": 2 * BURST}
    gateway = Gateway(parse_config(gateway_config([ws_backend.url], limits=limits)))
    await gateway.start()
    loop = asyncio.get_running_loop()
    clients: list[socket.socket] = []
    parsed_per_turn: list[int] = []
    connects_per_turn: list[int] = []
    try:
        for _ in range(BURST):
            clients.append(socket.create_connection(gateway.addresses[0], timeout=STEP_TIMEOUT))
        for _ in range(100_000):
            if len(gateway.books.handshakes) == BURST:
                break
            await asyncio.sleep(0)  # a turn of the loop, in which the gateway accepts
        assert len(gateway.books.handshakes) == BURST
        for client in clients:
            client.sendall(upgrade_request())
        watched = asyncio.Event()

        def each_turn(parsed_before: int, connects_before: int) -> None:
            relays = len(gateway.books.relays)
            parsed = sum(1 for c in gateway.books.handshakes if c.task is not None) + relays
            connects = sum(1 for c in gateway.books.handshakes if c.backend_tried) + relays
            parsed_per_turn.append(parsed - parsed_before)
            connects_per_turn.append(connects - connects_before)
            if connects < BURST and len(parsed_per_turn) < 100_000:
                loop.call_soon(each_turn, parsed, connects)
            else:
                watched.set()

        each_turn(0, 0)
        async with asyncio.timeout(STEP_TIMEOUT):
            await watched.wait()
            for client in clients:
                client.setblocking(False)
                head = await loop.sock_recv(client, 12)
                assert head == b"HTTP/1.1 101"
    finally:
        for client in clients:
            client.close()
        await gateway.close()
    assert sum(parsed_per_turn) == sum(connects_per_turn) == BURST
    assert max(parsed_per_turn) <= HANDSHAKE_STEPS_PER_TURN
    assert max(connects_per_turn) <= HANDSHAKE_STEPS_PER_TURN
