"""Built-in echo backends for `wsgate demo` and `wsgate echo-backend`.

aiohttp already ships a complete WebSocket server, so the demo uses it rather
than a second hand-written implementation.
"""

from __future__ import annotations

from aiohttp import WSMsgType, web


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


class EchoBackends:
    """`count` echo servers on 127.0.0.1, each on a port of its own."""

    def __init__(self, count: int = 2) -> None:
        self.names = [f"echo-{i}" for i in range(1, count + 1)]
        self._runners: list[web.AppRunner] = []
        self.urls: list[str] = []

    async def start(self) -> None:
        for name in self.names:
            runner = web.AppRunner(_echo_app(name), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            host, port = runner.addresses[0][:2]
            self.urls.append(f"ws://{host}:{port}")

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()


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
