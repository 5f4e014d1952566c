"""The gateway end to end: real clients, real backends, real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import aiohttp
import pytest
import websockets
from conftest import gateway_config
from peers import STEP_TIMEOUT, client_frame, raw_exchange, read_response_head, upgrade_request

from wsgate.config import parse_config
from wsgate.gateway import Gateway
from wsgate.handshake import accept_key
from wsgate.workers import bind_listener

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
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
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
    for host, path in [("A.Example.com:443", "/chat/1"), ("example.com", "/chat"), ("b.example.com", "/other")]:
        status, _, _ = await raw_exchange(url, upgrade_request(path=path, host=host))
        assert status == 101
    assert ws_backend.connections == 1
    assert aiohttp_backend.connections == 2


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
            status, _, _ = await raw_exchange(url, upgrade_request())
            assert status == 503
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
                (relay,) = gateway._relays
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
    from wsgate.server import HANDSHAKE_STEPS_PER_TURN

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
            if len(gateway._connections) == BURST:
                break
            await asyncio.sleep(0)  # a turn of the loop, in which the gateway accepts
        assert len(gateway._connections) == BURST
        for client in clients:
            client.sendall(upgrade_request())
        watched = asyncio.Event()

        def each_turn(parsed_before: int, connects_before: int) -> None:
            relays = len(gateway._relays)
            parsed = sum(1 for c in gateway._connections if c.task is not None) + relays
            connects = sum(1 for c in gateway._connections if c.backend_tried) + relays
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
