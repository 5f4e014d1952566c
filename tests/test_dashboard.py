"""The admin dashboard: its page from package data, its live feed, and the demo's controls.

Real gateways and admin servers on 127.0.0.1:0, real WebSocket clients
(websockets) and aiohttp's HTTP client reading the Server-Sent Events. The demo's
chat backends run in-process, as `wsgate demo` runs them. Every wait is bounded:
a feed is read for at most a number of events, under a timeout.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from conftest import gateway_config
from peers import STEP_TIMEOUT

from wsgate.admin import AdminServer
from wsgate.config import parse_config
from wsgate.dashboard import DASHBOARD_DIRECTORY, FEED_INTERVAL
from wsgate.demo import CHAT_PAGE_DIRECTORY, ChatBackends
from wsgate.gateway import Gateway

REPO = Path(__file__).resolve().parent.parent
# Enough events to see any change the gateway makes within STEP_TIMEOUT.
MAX_EVENTS = int(STEP_TIMEOUT / FEED_INTERVAL) + 2


class Served:
    """An in-process gateway, its admin server (with the demo's controls when given) and a client."""

    def __init__(self, gateway: Gateway, admin: AdminServer, session: aiohttp.ClientSession) -> None:
        self.gateway = gateway
        self.admin = admin
        self.session = session
        self.admin_url = "http://%s:%d" % admin.address
        self.ws_url = "ws://%s:%d" % gateway.addresses[0]

    async def feed_until(self, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event of /dashboard/events for which `condition` holds."""
        seen = []
        async with asyncio.timeout(STEP_TIMEOUT):
            async with self.session.get(self.admin_url + "/dashboard/events") as response:
                assert response.status == 200
                assert response.content_type == "text/event-stream"
                while len(seen) < MAX_EVENTS:
                    line = await response.content.readline()
                    assert line, "the feed ended"
                    if line.startswith(b"data: "):
                        event = json.loads(line[6:])
                        seen.append(event)
                        if condition(event):
                            return event
        raise AssertionError(f"no event matched in {len(seen)}: the last was {seen[-1:]}")

    async def post(self, path: str, host: str | None = None, **headers: str) -> tuple[int, str]:
        url = self.admin_url + path
        if host is not None:
            headers["Host"] = host
        async with asyncio.timeout(STEP_TIMEOUT):
            async with self.session.post(url, headers=headers) as response:
                return response.status, await response.text()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """`await serve(config_dict, demo=None)`: a gateway and its admin server, started."""
    started: list[Served] = []
    session = aiohttp.ClientSession()

    async def start(config: dict[str, Any], demo: ChatBackends | None = None) -> Served:
        gateway = Gateway(parse_config(config))
        await gateway.start()
        admin = AdminServer(gateway, demo=demo)
        await admin.start("127.0.0.1", 0)
        served = Served(gateway, admin, session)
        started.append(served)
        return served

    yield start
    for served in started:
        await served.admin.close()
        await served.gateway.close()
    await session.close()


@pytest.fixture
async def chats() -> AsyncIterator[ChatBackends]:
    backends = ChatBackends(3)
    await backends.start()
    yield backends
    await backends.close()


def demo_config(chats: ChatBackends, **route: Any) -> dict[str, Any]:
    """The route `wsgate demo` runs, with quick health checks and rebalancing."""
    return gateway_config(chats.urls, route={
        "hash_key": "query:room",
        "health_check": {"type": "http", "path": "/healthz", "interval": "50ms", "timeout": "1s",
                         "healthy_threshold": 1, "unhealthy_threshold": 1},
        "passive_ejection": {"failures": 1, "backoff": "100ms", "max_backoff": "1s"},
        "static": str(CHAT_PAGE_DIRECTORY),
        **route,
    })


async def hello(ws: Any) -> dict[str, Any]:
    async with asyncio.timeout(STEP_TIMEOUT):
        message = json.loads(await ws.recv())
    assert message["type"] == "hello"
    return message


# -- the feed ---------------------------------------------------------------------------


async def test_the_feed_follows_connections_messages_and_health(serve, ws_backend, closed_port):
    served = await serve(gateway_config(
        [ws_backend.url, f"ws://127.0.0.1:{closed_port}"],
        route={"health_check": {"type": "tcp", "interval": "50ms", "timeout": "1s",
                                "healthy_threshold": 1, "unhealthy_threshold": 1}},
        heartbeat={"interval": "50ms", "timeout": "1s"},
    ))
    down = f"ws://127.0.0.1:{closed_port}"
    first = await served.feed_until(lambda e: True)
    assert first["connections"] == 0 and first["demo"] is False
    async with websockets.connect(served.ws_url) as one, websockets.connect(served.ws_url) as two:
        for ws in (one, two):
            for i in range(10):
                await ws.send(f"message {i}")
                assert await asyncio.wait_for(ws.recv(), STEP_TIMEOUT) == f"message {i}"

        def live(event: dict[str, Any]) -> bool:
            backends = {b["backend"]: b for b in event["routes"][0]["backends"]}
            return (
                event["connections"] == 2
                and backends[ws_backend.url]["active_connections"] == 2
                and not backends[down]["available"]
                and event["heartbeat_rtt"]["backend"] is not None
            )

        event = await served.feed_until(live)
        backends = {b["backend"]: b for b in event["routes"][0]["backends"]}
        # With the closed port unavailable, every sampled key goes to the other backend.
        assert backends[ws_backend.url]["key_share"] == 1.0
        assert 0 < backends[down]["ring_share"] < 1
        assert event["handshakes"]["upgraded"] == 2
        # The messages were counted once read; a rate shows in some event while they are recent.
        await one.send("one more")
        await asyncio.wait_for(one.recv(), STEP_TIMEOUT)
        busy = await served.feed_until(lambda e: e["messages_per_second"].get("client_to_backend", 0) > 0)
        assert busy["bytes_per_second"]["client_to_backend"] > 0
    closed = await served.feed_until(lambda e: e["connections"] == 0 and e["recent_closes"])
    assert {(c["code"], c["side"]) for c in closed["recent_closes"]} == {("1000", "client")}


async def test_the_feed_lists_reloads(serve, ws_backend, tmp_path):
    path = tmp_path / "wsgate.yaml"
    config = gateway_config([ws_backend.url])
    path.write_text(json.dumps(config))
    served = await serve(config)
    served.gateway.config_path = str(path)
    await served.feed_until(lambda e: True)  # the first reading, which later ones are compared with
    assert await served.gateway.reload() is None
    event = await served.feed_until(lambda e: e["reloads"]["recent"])
    assert event["reloads"]["totals"] == {"success": 1}
    assert [r["result"] for r in event["reloads"]["recent"]] == ["success"]
    assert event["reloads"]["recent"][0]["version"] == served.gateway.config_version


# -- the page, from package data ------------------------------------------------------------


async def test_the_dashboard_page_and_its_files_are_served_from_package_data(serve, ws_backend):
    served = await serve(gateway_config([ws_backend.url]))
    async with served.session.get(served.admin_url + "/dashboard") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
        page = await response.text()
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert referenced and all(ref.startswith("/dashboard/") for ref in referenced if ref != "data:,")
    for ref in (ref for ref in referenced if ref != "data:,"):
        async with served.session.get(served.admin_url + ref) as response:
            assert response.status == 200, ref
    for path in ("/dashboard/..%2fadmin.py", "/dashboard/missing.js", "/dashboard/.hidden"):
        async with served.session.get(served.admin_url + path) as response:
            assert response.status == 404, path


def test_every_page_file_ships_in_the_wheel_and_loads_nothing_from_elsewhere():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    files = [p for d in (DASHBOARD_DIRECTORY, CHAT_PAGE_DIRECTORY) for p in d.iterdir()]
    assert {p.name for p in files} >= {"index.html", "dashboard.js", "chat.js"}
    for path in files:
        package = path.parent.relative_to(REPO).as_posix().replace("/", ".")
        assert package in setuptools["packages"], package
        patterns = setuptools["package-data"][package]
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns), path
        # No CDN, no web font: nothing names another host.
        elsewhere = r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|@font-face"
        assert not re.search(elsewhere, path.read_text()), path


# -- the demo's controls --------------------------------------------------------------------


async def test_only_the_dashboard_itself_may_press_the_demo_buttons(serve, chats):
    served = await serve(demo_config(chats), demo=chats)
    own = served.admin_url
    refusals = [
        {"Origin": "http://evil.example"},
        # A name rebound to 127.0.0.1 sends its own name as Host and Origin.
        {"Origin": "http://evil.example:%d" % served.admin.address[1],
         "host": "evil.example:%d" % served.admin.address[1]},
        {"Origin": own, "Content-Type": "text/plain"},
    ]
    for headers in refusals:
        host = headers.pop("host", None)
        status, body = await served.post("/dashboard/demo/chat-1/stop", host, **headers)
        assert status in (403, 415), (headers, body)
        assert chats.by_name("chat-1").running
    # The page's own origin is let through for its buttons, not for the rest of the admin API.
    status, body = await served.post("/reload", Origin=own)
    assert status == 403, body
    status, body = await served.post("/dashboard/demo/chat-1/stop", Origin=own)
    assert status == 200, body
    assert json.loads(body) == {"name": "chat-1", "running": False}
    assert not chats.by_name("chat-1").running
    status, _ = await served.post("/dashboard/demo/chat-1/start")
    assert status == 200 and chats.by_name("chat-1").running
    status, _ = await served.post("/dashboard/demo/nobody/stop")
    assert status == 404


async def test_without_the_demo_the_dashboard_has_no_buttons(serve, ws_backend):
    served = await serve(gateway_config([ws_backend.url]))
    status, _ = await served.post("/dashboard/demo/chat-1/stop")
    assert status in (404, 405)
    assert (await served.feed_until(lambda e: True))["demo"] is False


async def test_a_stopped_demo_backend_gives_its_room_1014_and_the_next_backend_in_the_keys_order(
    serve, chats
):
    served = await serve(demo_config(chats, rebalance={"max_fraction": 1.0, "period": "500ms"}), demo=chats)
    pool = served.gateway.pools["test"]
    order = [pool.ring.identities[i] for i in pool.ring.order(b"kitchen")]
    names = {backend.url: backend.name for backend in chats.backends}
    home, fallback = names[order[0]], names[order[1]]
    url = served.ws_url + "/chat?room=kitchen"
    async with websockets.connect(url) as ws:
        assert ws.response.headers["X-Demo-Backend"] == home
        assert (await hello(ws))["backend"] == home
        status, _ = await served.post("/dashboard/demo/%s/stop" % home)
        assert status == 200
        async with asyncio.timeout(STEP_TIMEOUT):
            await ws.wait_closed()
        assert ws.close_code == 1014
    async with websockets.connect(url) as ws:
        assert (await hello(ws))["backend"] == fallback
        event = await served.feed_until(lambda e: True)
        stopped = next(b for b in event["routes"][0]["backends"] if b["backend"] == order[0])
        assert stopped["demo"] == {"name": home, "url": order[0], "running": False, "clients": 0}
        assert stopped["active_connections"] == 0
        await served.post("/dashboard/demo/%s/start" % home)
        # Back up, the backend gets its key again: the rebalance moves the room home with 1012.
        async with asyncio.timeout(STEP_TIMEOUT):
            await ws.wait_closed()
        assert ws.close_code == 1012
    async with websockets.connect(url) as ws:
        assert (await hello(ws))["backend"] == home
