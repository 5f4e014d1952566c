"""Clients for the compose demo: connections through the gateway, each echoing messages at a steady pace.

Each client joins a room of its own (`?room=N`), sends `--rate` messages a second
of `--size` bytes, checks every echo, and reconnects when the gateway closes it
(a drain, a backend that went away). It stops after `--duration` seconds, or
when stopped, and prints what it did. Only aiohttp is needed, which the wsgate
image has: `python load.py --url ws://wsgate:8080/`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from dataclasses import dataclass

import aiohttp


@dataclass
class Tally:
    connections: int = 0
    echoed: int = 0
    mismatched: int = 0
    failures: int = 0


async def client(session: aiohttp.ClientSession, url: str, room: int, args: argparse.Namespace,
                 tally: Tally) -> None:
    """One client, reconnecting until cancelled."""
    separator = "&" if "?" in url else "?"
    while True:
        try:
            async with session.ws_connect(f"{url}{separator}room={room}", timeout=10) as ws:
                tally.connections += 1
                while True:
                    payload = os.urandom(args.size)
                    await ws.send_bytes(payload)
                    message = await ws.receive(timeout=10)
                    if message.type is not aiohttp.WSMsgType.BINARY:
                        break  # closed by the gateway: connect again
                    if message.data == payload:
                        tally.echoed += 1
                    else:
                        tally.mismatched += 1
                    await asyncio.sleep(1 / args.rate)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            tally.failures += 1
        # Pace reconnections, so that a gateway that is down is not flooded.
        await asyncio.sleep(1)


async def run(args: argparse.Namespace) -> Tally:
    tally = Tally()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with aiohttp.ClientSession() as session:
        clients = [asyncio.create_task(client(session, args.url, room, args, tally))
                   for room in range(args.connections)]
        try:
            await asyncio.wait_for(stop.wait(), args.duration or None)
        except asyncio.TimeoutError:
            pass
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080/", help="the gateway (ws://127.0.0.1:8080/)")
    parser.add_argument("--connections", type=int, default=50, help="clients open at once (50)")
    parser.add_argument("--rate", type=float, default=2.0, help="messages a second per client (2)")
    parser.add_argument("--size", type=int, default=256, help="bytes per message (256)")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds to run; 0 = until stopped (0)")
    args = parser.parse_args()
    tally = asyncio.run(run(args))
    print(f"load: {tally.connections} connections, {tally.echoed} messages echoed,"
          f" {tally.mismatched} mismatched, {tally.failures} failed connections", flush=True)
    return 0 if tally.echoed and not tally.mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
