"""Built-in backends: the chat servers of `wsgate demo` with the controls that stop
and start them, and the echo server of `wsgate echo-backend`.

Each backend is a small room-broadcast server: every text message a client
sends goes to every client of the same room (`?room=NAME`) on that backend,
the sender included, wrapped in a JSON envelope naming the backend. Its first
message, and the `X-Demo-Backend` header of its 101, name the backend too, so
the demo page can show which backend serves a room. aiohttp already ships a
complete WebSocket server, so the demo uses it rather than a second one.

`stop` makes a backend fail the way a crashed process does: it stops listening
and drops its connections without a Close frame, so the gateway tells their
clients 1014 and new handshakes fail over along each key's order. `start`
listens on the same port again.
"""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import WSMsgType, web

# The chat page `wsgate demo` serves on its listener (the route's `static` directory).
CHAT_PAGE_DIRECTORY = Path(__file__).parent / "static" / "chat"
BACKEND_HEADER = "X-Demo-Backend"


class ChatBackend:
    """One room-broadcast server on 127.0.0.1, which can be stopped and started again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.rooms: dict[str, set[web.WebSocketResponse]] = {}
        self._transports: set[object] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._site is not None

    @property
    def connections(self) -> int:
        return sum(len(clients) for clients in self.rooms.values())

    async def start(self) -> None:
        """Listen (on the port of the first start, once there was one)."""
        if self._site is not None:
            return
        if self._runner is None:
            app = web.Application()
            app.router.add_get("/{tail:.*}", self._serve)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self._site = site
        self.port = self._runner.addresses[-1][1]

    async def stop(self) -> None:
        """Stop listening and drop every connection without a Close frame, as a crash would."""
        if self._site is None:
            return
        site, self._site = self._site, None
        await site.stop()
        for transport in list(self._transports):
            transport.abort()  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            # What an http health check reads.
            return web.Response(text=f"{self.name}: a demo chat backend\n")
        room = request.query.get("room", "lobby")[:64]
        ws = web.WebSocketResponse()
        ws.headers[BACKEND_HEADER] = self.name
        await ws.prepare(request)
        transport = request.transport
        clients = self.rooms.setdefault(room, set())
        clients.add(ws)
        self._transports.add(transport)
        try:
            await ws.send_str(self._envelope("hello", room, peers=len(clients)))
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    envelope = self._envelope("message", room, data=message.data)
                    for client in list(clients):
                        if not client.closed:
                            await client.send_str(envelope)
        finally:
            clients.discard(ws)
            if not clients:
                self.rooms.pop(room, None)
            self._transports.discard(transport)
        return ws

    def _envelope(self, kind: str, room: str, **fields: object) -> str:
        return json.dumps({"type": kind, "backend": self.name, "room": room, **fields})


class ChatBackends:
    """`count` chat backends named chat-1, chat-2, ...: what the demo dashboard's buttons control."""

    def __init__(self, count: int = 3) -> None:
        self.backends = [ChatBackend(f"chat-{i}") for i in range(1, count + 1)]

    @property
    def urls(self) -> list[str]:
        return [backend.url for backend in self.backends]

    def by_name(self, name: str) -> ChatBackend | None:
        return next((backend for backend in self.backends if backend.name == name), None)

    def states(self) -> list[dict[str, object]]:
        """What the dashboard shows of each: name, URL (the gateway's backend identity), running."""
        return [
            {"name": b.name, "url": b.url, "running": b.running, "clients": b.connections}
            for b in self.backends
        ]

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()

    async def close(self) -> None:
        for backend in self.backends:
            await backend.close()


def _echo_app(name: str) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text=f"{name}: a WebSocket echo backend\n")
        ws = web.WebSocketResponse()
        ws.headers["X-Echo-Backend"] = name
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    return app


async def start_echo_backend(host: str, port: int, name: str) -> web.AppRunner:
    """One echo server on host:port, answering as `name`, for `wsgate echo-backend`."""
    runner = web.AppRunner(_echo_app(name), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
