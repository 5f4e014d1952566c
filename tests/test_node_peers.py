"""Node's `ws` as an independent peer on either side of the gateway.

The peers are small scripts in tests/node/ that take JSON-line commands on
stdin and report JSON-line events on stdout. `scripts/test.sh` installs `ws`
there with npm; without node or that install the tests skip, except under CI,
where they fail instead of silently not running.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import random
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import websockets
from conftest import gateway_config
from peers import STEP_TIMEOUT

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")
SIZES = [0, 125, 126, 65536, 1024 * 1024]
# A 1 MiB binary message is one ~1.4 MB base64 line on the peer's stdout.
_LINE_LIMIT = 8 * 1024 * 1024


def _missing() -> str | None:
    if NODE is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "ws" / "package.json").is_file():
        return "tests/node/node_modules/ws is missing (run: npm install --prefix tests/node)"
    return None


@pytest.fixture(autouse=True)
def _node_and_ws() -> None:
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the Node peer tests")
    pytest.skip(reason)


class NodePeer:
    """A running node script: commands in, events out, every read bounded."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def event(self, expected: str | None = None, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise AssertionError(f"node peer exited ({await self._stderr()})")
        event = json.loads(line)
        if expected is not None:
            assert event["event"] == expected, event
        return event

    async def _stderr(self) -> str:
        assert self.process.stderr is not None
        try:
            await asyncio.wait_for(self.process.wait(), STEP_TIMEOUT)
            return (await self.process.stderr.read()).decode(errors="replace").strip() or "no stderr"
        except TimeoutError:
            return "still running"

    async def stop(self) -> None:
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # the scripts exit when stdin closes
            try:
                await asyncio.wait_for(self.process.wait(), 2.0)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@asynccontextmanager
async def node_peer(script: str, *args: str) -> AsyncIterator[NodePeer]:
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE, str(NODE_DIR / script), *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=_LINE_LIMIT,
    )
    peer = NodePeer(process)
    try:
        yield peer
    finally:
        await peer.stop()


def text_of(size: int) -> str:
    """A text message of exactly `size` UTF-8 bytes, mostly two-byte characters."""
    return "é" * (size // 2) + "x" * (size % 2)


# -- a Node client through the gateway ---------------------------------------------------


@pytest.fixture(params=["ws_backend", "aiohttp_backend"])
def echo_backend(request: pytest.FixtureRequest) -> Any:
    """Each of conftest's echo backends in turn."""
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("compression", ["plain", "deflate"])
async def test_node_client_echo(request, start_gateway, echo_backend, compression):
    backend = echo_backend
    url = await start_gateway(gateway_config([backend.url]))
    sent: list[str | bytes] = []
    async with asyncio.timeout(3 * STEP_TIMEOUT), node_peer("client.mjs", url, compression) as node:
        opened = await node.event("open")
        assert ("permessage-deflate" in opened["extensions"]) == (compression == "deflate")
        for size in SIZES:
            text = text_of(size)
            await node.send(op="send", kind="text", data=text)
            echo = await node.event("message")
            assert (echo["kind"], echo["data"]) == ("text", text), f"text of {size} bytes"
            data = os.urandom(size)
            await node.send(op="send", kind="binary", data=base64.b64encode(data).decode())
            echo = await node.event("message")
            assert echo["kind"] == "binary"
            assert base64.b64decode(echo["data"]) == data, f"binary of {size} bytes"
            sent += [text, data]
        await node.send(op="close", code=1000, reason="")
        assert (await node.event("close"))["code"] == 1000
    if request.node.callspec.params["echo_backend"] == "ws_backend":  # the one that records them
        assert backend.messages == sent


DEFLATE_LIMIT = 256 * 1024


async def test_node_client_deflate_at_the_message_size_limit(start_gateway, ws_backend):
    # ws compresses as browsers do (zlib's default memLevel 8), here with the 4 KiB window
    # that the websockets backend asks of clients.
    url = await start_gateway(gateway_config([ws_backend.url], limits={"max_message_size": DEFLATE_LIMIT}))
    data = random.Random(1).randbytes(DEFLATE_LIMIT)
    async with asyncio.timeout(3 * STEP_TIMEOUT), node_peer("client.mjs", url, "deflate") as node:
        opened = await node.event("open")
        assert "permessage-deflate" in opened["extensions"]
        await node.send(op="send", kind="binary", data=base64.b64encode(data).decode())
        echo = await node.event("message")
        assert base64.b64decode(echo["data"]) == data
        # One byte more, sent uncompressed: an uncompressed message gets no allowance.
        await node.send(op="send", kind="binary", data=base64.b64encode(data + b"x").decode(), compress=False)
        closed = await node.event("close")
        assert closed["code"] == 1009
    assert ws_backend.messages == [data]
    assert await asyncio.wait_for(ws_backend.closes.get(), STEP_TIMEOUT) == (1001, "")


async def test_node_client_compressed_message_past_the_allowance_is_refused(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url], limits={"max_message_size": DEFLATE_LIMIT}))
    # docs/relay.md: the limit plus 5 bytes per 2,047 plus 64, and one byte more.
    data = random.Random(2).randbytes(DEFLATE_LIMIT + 5 * math.ceil(DEFLATE_LIMIT / 2047) + 65)
    async with asyncio.timeout(3 * STEP_TIMEOUT), node_peer("client.mjs", url, "deflate") as node:
        await node.event("open")
        await node.send(op="send", kind="binary", data=base64.b64encode(data).decode())
        closed = await node.event("close")
        assert closed["code"] == 1009
    assert ws_backend.messages == []


async def test_node_client_close_code_and_reason_reach_backend(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT), node_peer("client.mjs", url) as node:
        await node.event("open")
        await node.send(op="close", code=4000, reason="client done ✓")
        closed = await node.event("close")
        # The backend echoes the Close, and the gateway relays it back untouched.
        assert (closed["code"], closed["reason"]) == (4000, "client done ✓")
        assert await ws_backend.closes.get() == (4000, "client done ✓")


# Empty pings are common (Node's `ws.ping()` with no argument, and the heartbeat
# example in ws's README): their pongs must cross the gateway like any other.
PING_PAYLOADS = [
    pytest.param(b"node-ping \x00\xff", id="with-payload"),
    pytest.param(b"", id="empty"),
]
PONG_TIMEOUT = STEP_TIMEOUT


@pytest.mark.parametrize("payload", PING_PAYLOADS)
async def test_node_client_ping_gets_backend_pong(start_gateway, ws_backend, payload):
    url = await start_gateway(gateway_config([ws_backend.url]))
    async with asyncio.timeout(STEP_TIMEOUT), node_peer("client.mjs", url) as node:
        await node.event("open")
        await node.send(op="ping", data=base64.b64encode(payload).decode())
        pong = await node.event("pong", timeout=PONG_TIMEOUT)
        assert base64.b64decode(pong["data"]) == payload
        # The connection is still good after the control frames.
        await node.send(op="send", kind="text", data="after the pong")
        assert (await node.event("message"))["data"] == "after the pong"


# -- a Node server behind the gateway ------------------------------------------------------


@pytest.mark.parametrize("compression", ["plain", "deflate"])
async def test_websockets_client_to_node_server_echo(start_gateway, compression):
    async with asyncio.timeout(3 * STEP_TIMEOUT), node_peer("server.mjs", compression) as node:
        port = (await node.event("listening"))["port"]
        url = await start_gateway(gateway_config([f"ws://127.0.0.1:{port}"]))
        async with websockets.connect(
            url + "/room/1", max_size=None, compression="deflate" if compression == "deflate" else None
        ) as ws:
            connection = await node.event("connection")
            assert connection["url"] == "/room/1"
            assert connection["headers"]["x-forwarded-for"] == "127.0.0.1"
            negotiated = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert ("permessage-deflate" in negotiated) == (compression == "deflate")
            for size in SIZES:
                text = text_of(size)
                await ws.send(text)
                assert await ws.recv() == text, f"text of {size} bytes"
                assert (await node.event("message")) == {"event": "message", "kind": "text", "size": size}
                data = os.urandom(size)
                await ws.send(data)
                assert await ws.recv() == data, f"binary of {size} bytes"
                assert (await node.event("message")) == {"event": "message", "kind": "binary", "size": size}
        closed = await node.event("close")
        assert (closed["code"], closed["reason"]) == (1000, "")


async def test_node_server_close_code_and_reason_reach_client(start_gateway):
    async with asyncio.timeout(STEP_TIMEOUT), node_peer("server.mjs") as node:
        port = (await node.event("listening"))["port"]
        url = await start_gateway(gateway_config([f"ws://127.0.0.1:{port}"]))
        async with websockets.connect(url) as ws:
            await node.event("connection")
            await ws.send("hi")
            assert await ws.recv() == "hi"
            await node.event("message")
            await node.send(op="close", code=4001, reason="server done ✓")
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4001, "server done ✓")
        # The client's echo of the Close got back to the server through the gateway.
        closed = await node.event("close")
        assert (closed["code"], closed["reason"]) == (4001, "server done ✓")


@pytest.mark.parametrize("payload", PING_PAYLOADS)
async def test_node_server_ping_gets_client_pong(start_gateway, payload):
    async with asyncio.timeout(STEP_TIMEOUT), node_peer("server.mjs") as node:
        port = (await node.event("listening"))["port"]
        url = await start_gateway(gateway_config([f"ws://127.0.0.1:{port}"]))
        async with websockets.connect(url) as ws:
            await node.event("connection")
            await node.send(op="ping", data=base64.b64encode(payload).decode())
            # websockets answers the Ping by itself; the Pong must get back to the server.
            pong = await node.event("pong", timeout=PONG_TIMEOUT)
            assert base64.b64decode(pong["data"]) == payload
            await ws.send("after the pong")
            assert await ws.recv() == "after the pong"
