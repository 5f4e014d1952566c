"""The floor under a Python relay: `python -m bench.bare_relay --backend HOST:PORT`.

Two asyncio Protocols on uvloop and nothing else: the client's first read (the
request head, which the load generator sends whole) is passed to a new backend
connection as is, and from then on every read on either side is written to the
other. No parsing, no checks, no frame scan, no log, no metrics, no timers. What
wsgate spends above this per message or per handshake is its own work; what this
spends is what Python on uvloop costs per wakeup. It prints `listening on HOST:PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import uvloop

from .wire import raise_nofile


class _Backend(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, backend_address: tuple[str, int]) -> None:
        self.backend_address = backend_address
        self.backend: _Backend | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.backend is not None:
            self.backend.transport.write(data)
        elif self.early:
            self.early.append(data)
        else:
            self.early.append(data)
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, backend = await loop.create_connection(lambda: _Backend(self), *self.backend_address)
        except OSError:
            self.transport.close()
            return
        backend.transport.write(b"".join(self.early))
        self.early.clear()
        self.backend = backend

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backend is not None:
            self.backend.transport.close()


async def _serve(host: str, port: int, backend: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(backend), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backend", required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    raise_nofile()
    host, _, port = args.backend.rpartition(":")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.host, args.port, (host, int(port))))


if __name__ == "__main__":
    main()
