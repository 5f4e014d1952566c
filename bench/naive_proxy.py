"""The proxy a Python user writes by hand: `python -m bench.naive_proxy --backend HOST:PORT`.

An aiohttp web server whose handler accepts the WebSocket, opens a
`ClientSession.ws_connect` to the backend (same path and query) and pumps
messages both ways with two tasks. Runs on uvloop. Two deliberate departures
from the most naive version, so the comparison is not unfair to it: the
client session's connection limit is lifted (aiohttp's default of 100 would
cap the idle-connection scenario) and the access log is off (the other
proxies run without one too). It prints `listening on HOST:PORT` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
import uvloop
from aiohttp import WSMsgType, web

from .wire import raise_nofile


async def _pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                dest: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    async for msg in source:
        if msg.type == WSMsgType.BINARY:
            await dest.send_bytes(msg.data)
        elif msg.type == WSMsgType.TEXT:
            await dest.send_str(msg.data)
        else:
            break


async def _handler(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    client = web.WebSocketResponse(max_msg_size=0)
    await client.prepare(request)
    async with session.ws_connect(request.app["backend"] + request.path_qs, max_msg_size=0) as backend:
        tasks = [asyncio.create_task(_pump(client, backend)), asyncio.create_task(_pump(backend, client))]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    await client.close()
    return client


async def _serve(host: str, port: int, backend: str) -> None:
    app = web.Application()
    app["backend"] = f"http://{backend}"
    app.router.add_get("/{tail:.*}", _handler)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app["session"] = session
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    assert site._server is not None and site._server.sockets  # type: ignore[attr-defined]
    bound = site._server.sockets[0].getsockname()  # type: ignore[attr-defined]
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backend", required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    raise_nofile()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.host, args.port, args.backend))


if __name__ == "__main__":
    main()
