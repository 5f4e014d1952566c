"""Shared fixtures: real backends on 127.0.0.1 ephemeral ports and a gateway factory.

The asyncio shell (the gateway) and the peers (websockets, aiohttp) are imported
inside the fixtures that use them, so the core's tests are collected and run
where those are not installed.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

if TYPE_CHECKING:
    from wsgate.gateway import Gateway

# Every module's property tests read these; HYPOTHESIS_PROFILE picks one.
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# The `http_parser` that gateway_config writes; the `http_parser` fixture changes it.
HEAD_PARSER = ["auto"]


def gateway_config(backends: list[str], **sections: Any) -> dict[str, Any]:
    """A config mapping with one listener on an ephemeral port and one route."""
    route = {"name": "test", "backends": [{"url": url} for url in backends]}
    route.update(sections.pop("route", {}))
    return {
        "listeners": [{"name": "test", "bind": "127.0.0.1:0"}],
        "routes": [route, *sections.pop("extra_routes", [])],
        "http_parser": HEAD_PARSER[0],
        **sections,
    }


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run the tests on the loop production uses: uvloop where it installs.

    WSGATE_TEST_LOOP=asyncio runs them on stock asyncio instead.
    """
    if os.environ.get("WSGATE_TEST_LOOP") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="module", params=["compiled", "python"])
def scanner_implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a module's tests with the compiled fast path of the frame scanner, then without."""
    import wsgate.frames as frames

    compiled = frames.walk_frames
    if request.param == "compiled":
        try:
            from wsgate._speedups import walk_frames
        except ImportError:
            pytest.skip("wsgate._speedups is not built here (no C compiler or Python headers)")
        frames.walk_frames = walk_frames
    else:
        frames.walk_frames = None
    yield request.param
    frames.walk_frames = compiled


@pytest.fixture(scope="module", params=["h11", "httptools"])
def http_parser(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a module's tests with each parser of the handshakes' heads (see gateway_config)."""
    if request.param == "httptools":
        pytest.importorskip("httptools")
    HEAD_PARSER[0] = request.param
    yield request.param
    HEAD_PARSER[0] = "auto"


@pytest.fixture
async def start_gateway() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`await start_gateway(config_dict)` starts a gateway and returns its ws:// URL."""
    from wsgate.config import parse_config
    from wsgate.gateway import Gateway

    gateways: list[Gateway] = []

    async def start(config: dict[str, Any]) -> str:
        gateway = Gateway(parse_config(config))
        await gateway.start()
        gateways.append(gateway)
        host, port = gateway.addresses[0]
        return f"ws://{host}:{port}"

    yield start
    for gateway in gateways:
        await gateway.close()


@pytest.fixture
async def start_gateway_object() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Gateway]]]:
    """Like start_gateway, but returns the Gateway (for its counters and port)."""
    from wsgate.config import parse_config
    from wsgate.gateway import Gateway

    gateways: list[Gateway] = []

    async def start(config: dict[str, Any]) -> Gateway:
        gateway = Gateway(parse_config(config))
        await gateway.start()
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        await gateway.close()


@dataclass
class Backend:
    """A running test backend: its URL and what it saw."""

    url: str
    connections: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    closes: asyncio.Queue[tuple[int | None, str]] = field(default_factory=asyncio.Queue)


@pytest.fixture
async def ws_backend() -> AsyncIterator[Backend]:
    """A `websockets` echo server that records each request's headers."""
    import websockets

    backend = Backend(url="")

    def process_request(connection: Any, request: Any) -> None:
        backend.connections += 1
        backend.requests.append({k.lower(): v for k, v in request.headers.raw_items()} | {":path": request.path})

    async def echo(connection: Any) -> None:
        try:
            async for message in connection:
                backend.messages.append(message)
                if isinstance(message, str) and message.startswith("close "):
                    # "close CODE REASON" asks the backend to close the connection.
                    _, code, reason = message.split(" ", 2)
                    await connection.close(int(code), reason)
                    break
                await connection.send(message)
        finally:
            backend.closes.put_nowait((connection.close_code, connection.close_reason))

    def select_subprotocol(connection: Any, offered: list[str]) -> str | None:
        return next((p for p in ("chat.v2", "chat.v1") if p in offered), None)

    server = await websockets.serve(
        echo,
        "127.0.0.1",
        0,
        process_request=process_request,
        select_subprotocol=select_subprotocol,
        max_size=None,
    )
    port = server.sockets[0].getsockname()[1]
    backend.url = f"ws://127.0.0.1:{port}"
    yield backend
    server.close()
    await server.wait_closed()


@pytest.fixture
async def aiohttp_backend() -> AsyncIterator[Backend]:
    """An aiohttp echo server."""
    from aiohttp import WSMsgType, web

    backend = Backend(url="")

    async def echo(request: web.Request) -> web.WebSocketResponse:
        backend.connections += 1
        backend.requests.append({k.lower(): v for k, v in request.headers.items()})
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    backend.url = f"ws://127.0.0.1:{port}"
    yield backend
    await runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[[RawHandler], Awaitable[Backend]]]:
    """`await raw_backend(handler)` serves each connection with `handler(reader, writer)`."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> Backend:
        backend = Backend(url="")

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            backend.connections += 1
            try:
                await handler(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        backend.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return backend

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening, so connecting to it is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()
