"""WebSockets over HTTP/2 (RFC 8441) end to end: an `h2`-driven client over real TLS, real backends.

The client (tests/h2peer.py) speaks HTTP/2 with the `h2` library and WebSocket
frames with tests/codec.py; the backends are the `websockets` echo server of
conftest.py. Certificates come from trustme. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import h2.errors
import h2.settings
import pytest
import trustme
import websockets
from conftest import gateway_config
from h2peer import H2Client
from peers import STEP_TIMEOUT, until

from wsgate.frames import Opcode
from wsgate.gateway import Gateway

Start = Callable[..., Awaitable[Gateway]]
SETTINGS = h2.settings.SettingCodes


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, dict[str, str]]:
    directory = tmp_path_factory.mktemp("h2-pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "gateway.test")
    cert, key = directory / "gateway.crt", directory / "gateway.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return ca, {"cert": str(cert), "key": str(key)}


@pytest.fixture
def client_context(certificate: tuple[trustme.CA, dict[str, str]]) -> Callable[[], ssl.SSLContext]:
    def make() -> ssl.SSLContext:
        context = ssl.create_default_context()
        certificate[0].configure_trust(context)
        return context

    return make


class AccessLog(logging.Handler):
    """The access log's records; `await next()` waits for the next one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        access = getattr(record, "access", None)
        self.queue.put_nowait(access if access is not None else json.loads(record.getMessage()))

    async def next(self) -> dict[str, Any]:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await self.queue.get()


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    logger = logging.getLogger("wsgate.access")
    handler, level = AccessLog(), logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
async def h2_gateway(
    start_gateway_object: Start, ws_backend: Any, certificate: tuple[trustme.CA, dict[str, str]]
) -> Callable[..., Awaitable[Gateway]]:
    """`await h2_gateway(**sections)`: a gateway with one TLS listener, `http2: true` unless told."""

    async def start(http2: bool = True, listener: dict[str, Any] | None = None, **sections: Any) -> Gateway:
        config = gateway_config([ws_backend.url], **sections)
        config["listeners"][0].update(tls=certificate[1], http2=http2, **(listener or {}))
        return await start_gateway_object(config)

    return start


@pytest.fixture
async def clients() -> AsyncIterator[list[H2Client]]:
    opened: list[H2Client] = []
    yield opened
    for client in opened:
        await client.close()


def port_of(gateway: Gateway) -> int:
    return gateway.addresses[0][1]


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    return gateway.registry.get_sample_value(name, labels) or 0.0


async def connect(gateway: Gateway, context: Callable[[], ssl.SSLContext], clients: list[H2Client],
                  read: bool = True) -> H2Client:
    client = await H2Client.connect(port_of(gateway), context(), read=read)
    clients.append(client)
    return client


async def alpn_selected(port: int, context: ssl.SSLContext, offered: list[str]) -> str | None:
    context.set_alpn_protocols(offered)
    async with asyncio.timeout(STEP_TIMEOUT):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    selected = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    writer.close()
    return selected


# -- negotiation ------------------------------------------------------------------------------


async def test_an_http2_listener_offers_h2_first_and_http11_and_serves_both(h2_gateway, client_context):
    gateway = await h2_gateway()
    port = port_of(gateway)
    assert await alpn_selected(port, client_context(), ["h2", "http/1.1"]) == "h2"
    assert await alpn_selected(port, client_context(), ["http/1.1", "h2"]) == "h2"  # the server's preference
    assert await alpn_selected(port, client_context(), ["http/1.1"]) == "http/1.1"
    # A WebSocket over HTTP/1.1 still works on the same listener.
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(f"wss://127.0.0.1:{port}/", ssl=client_context()) as ws:
            await ws.send("over http/1.1")
            assert await ws.recv() == "over http/1.1"


async def test_a_listener_without_http2_offers_no_h2(h2_gateway, client_context):
    gateway = await h2_gateway(http2=False)
    assert await alpn_selected(port_of(gateway), client_context(), ["h2", "http/1.1"]) == "http/1.1"


async def test_the_settings_advertise_extended_connect_and_the_stream_limit(
    h2_gateway, client_context, clients
):
    gateway = await h2_gateway(listener={"http2_max_streams": 7}, flow_control={"high_water": "128KiB"})
    client = await connect(gateway, client_context, clients)
    settings = client.server_settings
    assert settings.enable_connect_protocol == 1
    await until(lambda: settings.max_concurrent_streams == 7, "the second SETTINGS")
    assert settings.initial_window_size == 128 * 1024


# -- streams ------------------------------------------------------------------------------------


async def test_several_streams_on_one_connection_each_echo_through_their_own_backend_connection(
    h2_gateway, client_context, clients, ws_backend
):
    gateway = await h2_gateway()
    client = await connect(gateway, client_context, clients)
    streams = [
        client.websocket(f"/room/{i}", [(b"sec-websocket-protocol", b"chat.v1, chat.v2")]) for i in range(3)
    ]
    for stream in streams:
        headers = await stream.headers()
        assert stream.status == 200  # RFC 8441's answer, not 101
        assert headers[b"sec-websocket-protocol"] == b"chat.v2"
        assert not {b"upgrade", b"connection", b"sec-websocket-accept"} & headers.keys()
    for round_ in range(3):
        for i, stream in enumerate(streams):
            await stream.send_message(f"stream {i} round {round_}")
        for i, stream in enumerate(streams):
            assert await stream.message() == f"stream {i} round {round_}"
    await streams[1].send_message(b"\x00\xffbinary" * 5000)  # several DATA frames each way
    assert await streams[1].message() == b"\x00\xffbinary" * 5000
    assert ws_backend.connections == 3
    paths = sorted(request[":path"] for request in ws_backend.requests)
    assert paths == ["/room/0", "/room/1", "/room/2"]
    # The client sent no Sec-WebSocket-Key: the gateway made a fresh one for each backend connection.
    keys = {request["sec-websocket-key"] for request in ws_backend.requests}
    assert len(keys) == 3 and all(len(key) == 24 for key in keys)
    assert all(request["host"] == "gateway.test" for request in ws_backend.requests)


async def test_close_codes_go_both_ways_and_end_the_stream(h2_gateway, client_context, clients, ws_backend):
    gateway = await h2_gateway()
    client = await connect(gateway, client_context, clients)
    # The client closes: the backend hears its code, the echo comes back, then END_STREAM.
    by_client = client.websocket("/")
    await by_client.headers()
    await by_client.send_close(4000, "client done")
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await ws_backend.closes.get() == (4000, "client done")
    assert await by_client.close_frame() == (4000, "client done")
    await by_client.wait_ended()
    # The backend closes: the client gets its code, then END_STREAM.
    by_backend = client.websocket("/")
    await by_backend.headers()
    await by_backend.send_message("close 4001 backend done")
    assert await by_backend.close_frame() == (4001, "backend done")
    await by_backend.send_close(4001, "backend done")
    await by_backend.wait_ended()
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await ws_backend.closes.get() == (4001, "backend done")
    # The connection itself goes on.
    third = client.websocket("/")
    await third.headers()
    await third.send_message("still here")
    assert await third.message() == "still here"


async def test_a_client_reset_closes_the_backend_with_1001_and_spares_the_other_streams(
    h2_gateway, client_context, clients, ws_backend
):
    gateway = await h2_gateway()
    client = await connect(gateway, client_context, clients)
    doomed, kept = client.websocket("/"), client.websocket("/")
    for stream in (doomed, kept):
        await stream.headers()
        await stream.send_message("hello")
        assert await stream.message() == "hello"
    doomed.cancel()
    async with asyncio.timeout(STEP_TIMEOUT):
        assert (await ws_backend.closes.get())[0] == 1001
    await kept.send_message("after the reset")
    assert await kept.message() == "after the reset"
    await until(lambda: metric(gateway, "wsgate_active_connections", route="test",
                               backend=ws_backend.url) == 1, "one relay left")


async def test_a_path_no_route_takes_gets_404_over_h2_and_a_route_without_static_426(
    h2_gateway, client_context, clients, access_log
):
    gateway = await h2_gateway(route={"match": {"path_prefix": "/ws"}})
    client = await connect(gateway, client_context, clients)
    unrouted = client.websocket("/elsewhere")
    assert (await unrouted.headers())[b":status"] == b"404"
    await unrouted.wait_ended()
    entry = await access_log.next()
    assert (entry["status"], entry["protocol"]) == (404, "h2")
    plain = client.request([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/ws/page"),
                            (b":authority", b"gateway.test")], end_stream=True)
    assert (await plain.headers())[b":status"] == b"426"
    await plain.wait_ended()
    # Both streams ended; the connection serves the next one.
    good = client.websocket("/ws")
    assert (await good.headers())[b":status"] == b"200"


async def test_a_route_s_static_page_is_served_over_h2(h2_gateway, client_context, clients, tmp_path):
    (tmp_path / "index.html").write_text("<p>over h2</p>")
    gateway = await h2_gateway(route={"static": str(tmp_path)})
    client = await connect(gateway, client_context, clients)
    page = client.request([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                           (b":authority", b"gateway.test")], end_stream=True)
    headers = await page.headers()
    assert headers[b":status"] == b"200" and headers[b"content-type"].startswith(b"text/html")
    await page.wait_ended()
    assert bytes(page.data) == b"<p>over h2</p>"
    assert not {b"connection", b"keep-alive", b"transfer-encoding"} & headers.keys()


@pytest.mark.parametrize(
    "header",
    [
        (b"x-test", b"a\r\nx-injected: 1"),
        (b"x-test", b"a\nx-injected: 1"),
        (b"x-test", b"a\x00b"),
        (b"x-test\r\nx-injected", b"1"),
        (b"x test", b"1"),
        (b"X-Upper", b"1"),
        (b":status", b"200"),
        (b"", b"empty name"),
    ],
    ids=["crlf-value", "lf-value", "nul-value", "crlf-name", "space-name", "uppercase-name",
         "pseudo-after-header", "empty-name"],
)
async def test_header_injection_is_refused_before_anything_reaches_a_backend(
    h2_gateway, client_context, clients, ws_backend, header
):
    gateway = await h2_gateway()
    client = await connect(gateway, client_context, clients)
    client.conn.config.validate_outbound_headers = False
    client.conn.config.normalize_outbound_headers = False
    bad = client.websocket("/", [header])
    refused = asyncio.ensure_future(bad.wait_reset())
    answered = asyncio.ensure_future(bad.headers())
    done, pending = await asyncio.wait([refused, answered], timeout=STEP_TIMEOUT,
                                       return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    assert done, ("neither an answer nor a reset", client.goaway.done() and client.goaway.result())
    if answered in done:
        assert (await answered)[b":status"] == b"400"
    assert ws_backend.connections == 0
    # Refused as a stream error: the connection and its other streams go on.
    good = client.websocket("/")
    assert (await good.headers())[b":status"] == b"200"
    await good.send_message("fine")
    assert await good.message() == "fine"
    assert ws_backend.connections == 1
    assert all("x-injected" not in request for request in ws_backend.requests)


async def test_split_cookie_headers_are_joined_for_the_backend(
    h2_gateway, client_context, clients, ws_backend
):
    gateway = await h2_gateway()
    client = await connect(gateway, client_context, clients)
    stream = client.websocket("/", [(b"cookie", b"a=1"), (b"x-other", b"y"), (b"cookie", b"b=2")])
    assert (await stream.headers())[b":status"] == b"200"
    assert ws_backend.requests[0]["cookie"] == "a=1; b=2"
    assert ws_backend.requests[0]["x-other"] == "y"


async def test_a_message_over_the_size_limit_closes_only_its_stream_with_1009(
    h2_gateway, client_context, clients, ws_backend
):
    gateway = await h2_gateway(limits={"max_message_size": "1KiB"})
    client = await connect(gateway, client_context, clients)
    big, small = client.websocket("/"), client.websocket("/")
    await big.headers()
    await small.headers()
    await big.send_message("x" * 2000)
    assert (await big.close_frame())[0] == 1009
    async with asyncio.timeout(STEP_TIMEOUT):
        assert (await ws_backend.closes.get())[0] == 1001
    await small.send_message("y" * 1000)
    assert await small.message() == "y" * 1000


def ignore_stream_limit(client: H2Client) -> None:
    """Make the client's h2 forget the gateway's MAX_CONCURRENT_STREAMS, as a bad client would."""
    client.conn.remote_settings[SETTINGS.MAX_CONCURRENT_STREAMS] = 1000
    client.conn.remote_settings.acknowledge()


async def test_streams_over_the_limit_are_refused_and_the_others_go_on(
    h2_gateway, client_context, clients, ws_backend
):
    gateway = await h2_gateway(listener={"http2_max_streams": 2})
    client = await connect(gateway, client_context, clients)
    await until(lambda: client.server_settings.max_concurrent_streams == 2, "the stream limit")
    kept = [client.websocket("/"), client.websocket("/")]
    for stream in kept:
        await stream.headers()
    ignore_stream_limit(client)
    extra = client.websocket("/")
    assert await extra.wait_reset() == h2.errors.ErrorCodes.REFUSED_STREAM
    assert metric(gateway, "wsgate_handshake_rejections_total", reason="stream_limit") == 1
    for stream in kept:
        await stream.send_message("still open")
        assert await stream.message() == "still open"
    # A stream that ends makes room for another.
    await kept[0].send_close(1000)
    await kept[0].wait_ended()
    kept[0].end()
    later = client.websocket("/")
    assert (await later.headers())[b":status"] == b"200"
    assert ws_backend.connections == 3


async def test_streams_sent_before_the_client_read_the_limit_are_refused_too(
    h2_gateway, client_context, clients, ws_backend
):
    gateway = await h2_gateway(listener={"http2_max_streams": 2})
    client = await connect(gateway, client_context, clients, read=False)
    streams = [client.websocket("/") for _ in range(4)]  # the client's h2 knows no limit yet
    await client.start_reading()
    for stream in streams[:2]:
        assert (await stream.headers())[b":status"] == b"200"
    for stream in streams[2:]:
        assert await stream.wait_reset() == h2.errors.ErrorCodes.REFUSED_STREAM
    assert ws_backend.connections == 2


async def test_streams_count_as_connections_under_the_per_ip_limit(
    h2_gateway, client_context, clients, ws_backend
):
    # The TCP connection takes one of the address's three; each open stream one more.
    gateway = await h2_gateway(limits={"max_connections_per_ip": 3})
    client = await connect(gateway, client_context, clients)
    first, second = client.websocket("/"), client.websocket("/")
    for stream in (first, second):
        assert (await stream.headers())[b":status"] == b"200"
    third = client.websocket("/")
    assert (await third.headers())[b":status"] == b"429"
    await third.wait_ended()
    await first.send_close(1000)
    await first.wait_ended()
    again = client.websocket("/")
    assert (await again.headers())[b":status"] == b"200"


async def test_a_client_end_stream_closes_the_backend_with_1001(
    h2_gateway, client_context, clients, ws_backend
):
    gateway = await h2_gateway()
    client = await connect(gateway, client_context, clients)
    stream = client.websocket("/")
    await stream.headers()
    await stream.send_message("bye")
    assert await stream.message() == "bye"
    stream.end()
    async with asyncio.timeout(STEP_TIMEOUT):
        assert (await ws_backend.closes.get())[0] == 1001
    await stream.wait_ended()


async def test_drain_closes_every_stream_with_1001_and_sends_goaway(
    h2_gateway, client_context, clients, ws_backend
):
    gateway = await h2_gateway(shutdown={"drain_period": "100ms", "grace_period": "5s"})
    client = await connect(gateway, client_context, clients)
    streams = [client.websocket("/") for _ in range(3)]
    for stream in streams:
        await stream.headers()
    draining = asyncio.create_task(gateway.drain())
    async with asyncio.timeout(STEP_TIMEOUT):
        goaway = await asyncio.shield(client.goaway)
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == streams[-1].stream_id  # the open streams go on to their close
    for stream in streams:
        assert (await stream.close_frame())[0] == 1001
        await stream.send_close(1001)
        await stream.wait_ended()
    async with asyncio.timeout(STEP_TIMEOUT):
        await draining
    for _ in streams:
        async with asyncio.timeout(STEP_TIMEOUT):
            assert (await ws_backend.closes.get())[0] == 1001
    await client.wait_closed()  # the last stream's end closed the connection
    await until(lambda: not gateway.books.sessions, "the session's end")


async def test_the_protocol_label_and_access_log_field_tell_h2_from_http11(
    h2_gateway, client_context, clients, access_log
):
    gateway = await h2_gateway()
    port = port_of(gateway)
    client = await connect(gateway, client_context, clients)
    stream = client.websocket("/")
    await stream.headers()
    await stream.send_close(1000)
    await stream.wait_ended()
    h2_entry = await access_log.next()
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(f"wss://127.0.0.1:{port}/", ssl=client_context()) as ws:
            await ws.send("x")
            await ws.recv()
    http11_entry = await access_log.next()
    assert (h2_entry["status"], h2_entry["protocol"], h2_entry["close_code"]) == (101, "h2", 1000)
    assert (http11_entry["status"], http11_entry["protocol"]) == (101, "http/1.1")
    assert h2_entry["client"].startswith("127.0.0.1:")
    for protocol in ("h2", "http/1.1"):
        assert metric(gateway, "wsgate_connections_total", route="test", outcome="upgraded",
                      protocol=protocol) == 1
    bad = client.websocket("/", [(b"sec-websocket-version", b"8")])
    assert (await bad.headers())[b":status"] == b"426"
    rejected = await access_log.next()
    assert (rejected["status"], rejected["protocol"]) == (426, "h2")
    # Refused before routing, as over HTTP/1.1: no route.
    assert metric(gateway, "wsgate_connections_total", route="", outcome="rejected", protocol="h2") == 1


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + b"\x00" * 8,  # GOAWAY on a stream, not stream 0
     b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # WINDOW_UPDATE of 0 on the connection
     # A frame header declaring more than SETTINGS_MAX_FRAME_SIZE: refused on sight, not
     # once that much has been read (h2 alone would buffer up to 16 MiB to look at it).
     b"\x00\x40\x01\x00\x00\x00\x00\x00\x01",
     b"\xff" * 64],
    ids=["goaway-on-a-stream", "zero-window-update", "overlong-frame", "nonsense"],
)
async def test_a_protocol_error_ends_only_that_connection_with_goaway(
    h2_gateway, client_context, clients, ws_backend, garbage
):
    gateway = await h2_gateway()
    victim = await connect(gateway, client_context, clients)
    stream = victim.websocket("/")
    await stream.headers()
    victim.writer.write(garbage)
    async with asyncio.timeout(STEP_TIMEOUT):
        goaway = await asyncio.shield(victim.goaway)
    assert goaway.error_code in (h2.errors.ErrorCodes.PROTOCOL_ERROR, h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
    await victim.wait_closed()
    async with asyncio.timeout(STEP_TIMEOUT):
        assert (await ws_backend.closes.get())[0] == 1001
    other = await connect(gateway, client_context, clients)
    fine = other.websocket("/")
    await fine.headers()
    await fine.send_message("unharmed")
    assert await fine.message() == "unharmed"
    await until(lambda: len(gateway.books.sessions) == 1, "the bad connection's session gone")


async def test_a_stream_whose_client_reads_nothing_is_held_while_another_flows_with_bounded_memory(
    h2_gateway, client_context, clients, ws_backend
):
    high, low = 64 * 1024, 16 * 1024
    gateway = await h2_gateway(flow_control={"high_water": high, "low_water": low})
    client = await connect(gateway, client_context, clients)
    slow, fast = client.websocket("/slow"), client.websocket("/fast")
    for stream in (slow, fast):
        await stream.headers()
    session = next(iter(gateway.books.sessions))
    slow_transport = session.streams[slow.stream_id]
    slow.hold()
    message, count = b"s" * 32 * 1024, 1024  # 32 MiB: more than the sockets on the way hold

    async def flood() -> None:
        for _ in range(count):
            await slow.send_message(message)

    flooding = asyncio.create_task(flood())
    try:
        # The client's window for the slow stream closed: the gateway stops writing to it, the
        # relay stops reading its backend, the backend stops reading, the gateway stops reading
        # the client's stream, and the client's own sending stops for want of window.
        await until(lambda: slow_transport.writing_paused, "the slow stream's writing paused")
        await until(lambda: not slow_transport.is_reading(), "the slow stream's reading paused")
        await until(lambda: slow.client.conn.local_flow_control_window(slow.stream_id) == 0,
                    "the client's window for the slow stream closed")
        assert not flooding.done()
        for i in range(20):
            await fast.send_message(f"fast {i} " + "f" * 10_000)
            assert await fast.message() == f"fast {i} " + "f" * 10_000
        # What the gateway holds for the slow stream is bounded by the watermarks and windows,
        # not by what the client sent.
        read_size = 256 * 1024  # the most one read of the backend hands the stream at once
        assert slow_transport.get_write_buffer_size() <= high + read_size
        assert sum(length for _, length in slow_transport.received) <= session.stream_window
        assert not fast_paused(session, fast.stream_id)
    finally:
        slow.release()
    async with asyncio.timeout(STEP_TIMEOUT * 3):
        await flooding
        for _ in range(count):
            assert await slow.message() == message


def fast_paused(session: Any, stream_id: int) -> bool:
    transport = session.streams[stream_id]
    return transport.writing_paused or not transport.is_reading()


# -- routes and heartbeats per stream ---------------------------------------------------------


async def test_streams_take_routes_by_their_conditions_with_the_route_s_shaping_and_heartbeat(
    h2_gateway, client_context, clients, ws_backend
):
    gateway = await h2_gateway(
        route={
            "name": "chat", "match": {"path_prefix": "/chat", "subprotocol": "chat.v1"},
            "strip_prefix": "/chat", "request_headers": {"set": {"X-Route": "chat"}},
            "response_headers": {"set": {"X-Served-By": "chat"}},
            "heartbeat": {"interval": "100ms", "timeout": "5s"},
        },
        extra_routes=[{"name": "plain", "backends": [{"url": ws_backend.url}]}],
        heartbeat={"interval": "300s"},
    )
    client = await connect(gateway, client_context, clients)
    chat = client.websocket("/chat/room?id=7", extra=[(b"sec-websocket-protocol", b"chat.v1")])
    plain = client.websocket("/chat/room", extra=[(b"sec-websocket-protocol", b"chat.v2")])
    chat_head, plain_head = await chat.headers(), await plain.headers()
    assert (chat.status, plain.status) == (200, 200)
    assert chat_head[b"x-served-by"] == b"chat" and b"x-served-by" not in plain_head
    by_path = {request[":path"]: request for request in ws_backend.requests}
    assert by_path["/room?id=7"]["x-route"] == "chat"
    assert "x-route" not in by_path["/chat/room"]
    # Only the chat route's stream is pinged by the gateway, every 100 ms.
    assert (await chat.frame())[0] == Opcode.PING
    await plain.send_message("no ping here")
    assert await plain.message() == "no ping here"
    await until(lambda: metric(gateway, "wsgate_connections_total", route="chat", outcome="upgraded",
                               protocol="h2") == 1
                and metric(gateway, "wsgate_connections_total", route="plain", outcome="upgraded",
                           protocol="h2") == 1,
                "one h2 connection counted on each route")
