"""`python -m bench.idle`: many idle upgraded connections held by one wsgate process, heartbeats on.

The run the main benchmark leaves out because it needs a large open-file limit:
`--conns` idle connections (100,000 by default) through one wsgate process
with heartbeats every `--heartbeat` seconds, which the clients and the
backends answer. It reports the gateway's RSS per connection, its CPU while
the connections sit idle (percent of one core, and per connection), the pings
each client answered and the connections lost.

One gateway process holds two descriptors per connection, so 100,000
connections need an open-file limit of about 200,500 for it (`ulimit -n`);
the clients and backends are spread over processes of their own. Where the
hard limit is lower, the run says so and holds as many as the limit allows.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import shutil
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import uvloop

from . import procstat
from .loadgen import Job, connect_from_source
from .report import write_run
from .targets import REPO, Proc
from .wire import OP_CLOSE, OP_PING, OP_PONG, client_frame, new_key, raise_nofile, upgrade_request

# Descriptors a process keeps besides its connections.
_FD_MARGIN = 500
# Connections one (client address, server address) pair can have: the ephemeral port range.
_PORTS_PER_PAIR = 25_000
_SOURCES = tuple(f"127.0.0.{i}" for i in range(1, 9))
_CONNECT_CONCURRENCY = 256


class _IdleClient(asyncio.Protocol):
    """Upgrades, then only answers pings (with a pong) and counts them."""

    def __init__(self, request: bytes, opened: asyncio.Future[None]) -> None:
        self.request = request
        self.opened = opened
        self.buffer = b""
        self.upgraded = False
        self.pings = 0
        self.lost = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buffer.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(self.buffer.split(b"\r\n", 1)[0].decode()))
                return
            self.upgraded = True
            self.buffer = self.buffer[end + 4 :]
            self.opened.set_result(None)
        self._frames()

    def _frames(self) -> None:
        # Only the gateway's pings (and a Close) arrive on an idle connection: short frames.
        assert self.transport is not None
        while len(self.buffer) >= 2:
            opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            if length >= 126 or len(self.buffer) < 2 + length:
                return
            payload, self.buffer = self.buffer[2 : 2 + length], self.buffer[2 + length :]
            if opcode == OP_PING:
                self.pings += 1
                self.transport.write(client_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"lost before the 101 ({exc})"))


async def _open(port: int, count: int, first: int, clients: list[_IdleClient]) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(_CONNECT_CONCURRENCY)
    errors: list[str] = []

    async def one(index: int) -> None:
        async with gate:
            opened: asyncio.Future[None] = loop.create_future()
            client = _IdleClient(upgrade_request("127.0.0.1", port, "/echo", new_key()), opened)
            try:
                await connect_from_source(lambda: client, job, index)
                await asyncio.wait_for(opened, 30)
                clients.append(client)
            except (OSError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    job = Job(kind="idle", port=port, path="/echo", conns=count, sources=_SOURCES, first_source=first)
    await asyncio.gather(*(one(i) for i in range(count)))
    return count - len(errors), errors[0] if errors else ""


def _client_process(port: int, count: int, first: int, pipe: Connection) -> None:
    """Opens `count` idle connections, reports, holds them until told to stop, reports the
    pings answered since the window's start and the connections lost."""
    raise_nofile()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        clients: list[_IdleClient] = []
        opened, error = await _open(port, count, first, clients)
        pipe.send({"opened": opened, "error": error})
        stop = asyncio.Event()
        at_mark = [0] * len(clients)

        def on_message() -> None:
            # "mark": the measured window starts; "stop": it has ended.
            if pipe.recv() == "mark":
                at_mark[:] = [c.pings for c in clients]
            else:
                stop.set()

        loop.add_reader(pipe.fileno(), on_message)
        await stop.wait()
        loop.remove_reader(pipe.fileno())
        pings = [c.pings - before for c, before in zip(clients, at_mark)]
        pipe.send({"lost": sum(c.lost for c in clients), "pings": pings})
        for client in clients:
            if client.transport is not None:
                client.transport.abort()

    uvloop.run(main())


def _config(backend_ports: list[int], conns: int, heartbeat: float) -> str:
    backends = "".join(f"      - url: ws://127.0.0.1:{port}\n" for port in backend_ports)
    return (
        "# Written by bench.idle: idle connections, heartbeats on, no idle timeout.\n"
        "listeners:\n  - name: idle\n    bind: 127.0.0.1:0\n"
        "admin:\n  enabled: false\n"
        "routes:\n  - name: idle\n"
        # No request carries the header: every connection gets a random key, spread evenly.
        "    hash_key: header:X-Bench-Absent\n    hash_fallback: random\n"
        f"    backends:\n{backends}"
        f"heartbeat: {{interval: {heartbeat}s, timeout: {min(heartbeat or 10.0, 10.0)}s}}\n"
        "timeouts: {idle: 0, handshake: 30s, connect: 10s}\n"
        f"limits: {{max_connections: {conns + 1000}, max_connections_per_ip: {conns + 1000}}}\n"
        "log: {level: info, access: false}\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--conns", type=int, default=100_000, help="idle connections (default %(default)s)")
    parser.add_argument("--heartbeat", type=float, default=30.0,
                        help="wsgate's heartbeat interval in seconds, 0 for none (default %(default)s, as wsgate's)")
    parser.add_argument("--window", type=float, help="seconds measured while idle (default 2 heartbeats, or 60)")
    parser.add_argument("--procs", type=int, default=4, help="client processes (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "results", help="results folder (default %(default)s)")
    args = parser.parse_args(argv)
    if args.conns < 1 or args.procs < 1 or args.heartbeat < 0:
        parser.error("--conns and --procs must be positive, --heartbeat not negative")
    args.window = args.window or 2 * args.heartbeat or 60.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_nofile()
    conns = args.conns
    notes = []
    fits = (limit - _FD_MARGIN) // 2
    if conns > fits:
        notes.append(
            f"the open-file limit is {limit:,}: one gateway process can hold {fits:,} connections,"
            f" not {conns:,} (that needs ulimit -n {2 * conns + _FD_MARGIN:,} or more)"
        )
        conns = fits
    per_process = limit - _FD_MARGIN
    # Backends: enough for their descriptors (with room for an uneven random spread) and
    # for the gateway's ports toward each of them.
    backend_count = max(math.ceil(conns * 1.2 / per_process), math.ceil(conns / _PORTS_PER_PAIR))
    procs = max(args.procs, math.ceil(conns / per_process))
    workdir = Path(tempfile.mkdtemp(prefix="wsgate-idle-"))
    started: list[Proc] = []
    workers: list[tuple[multiprocessing.Process, Connection]] = []
    try:
        backend_ports = []
        for i in range(backend_count):
            backend = Proc(f"backend{i}", [sys.executable, "-m", "bench.echo_backend", "--port", "0"], workdir)
            started.append(backend)
            backend_ports.append(backend.wait_for_port())
        config = workdir / "wsgate.yaml"
        config.write_text(_config(backend_ports, conns, args.heartbeat))
        gateway = Proc("wsgate", [sys.executable, "-m", "wsgate", "run", "-c", str(config)], workdir)
        started.append(gateway)
        port = gateway.wait_for_port()
        time.sleep(1.0)
        rss_before = procstat.rss_kib(gateway.pid)
        print(f"bench.idle: opening {conns:,} connections through wsgate (heartbeat {args.heartbeat or 'off'})"
              f" from {procs} client processes, {backend_count} backend processes", flush=True)
        opened_at = time.monotonic()
        context = multiprocessing.get_context("spawn")
        share, first = conns // procs, 0
        for i in range(procs):
            count = share + (1 if i < conns % procs else 0)
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_client_process, args=(port, count, first, child_end), daemon=True)
            process.start()
            workers.append((process, parent_end))
            first += count
        reports = [pipe.recv() for _, pipe in workers]
        opened = sum(r["opened"] for r in reports)
        errors = [r["error"] for r in reports if r["error"]]
        if errors:
            notes.append(f"{conns - opened:,} connections failed to open ({errors[0]})")
        open_seconds = time.monotonic() - opened_at
        time.sleep(2.0)  # let the last handshakes' garbage go before measuring
        rss_after = procstat.rss_kib(gateway.pid)
        for _, pipe in workers:
            pipe.send("mark")
        cpu_start, wall_start = procstat.cpu_seconds(gateway.pid), time.monotonic()
        time.sleep(args.window)
        cpu = procstat.cpu_seconds(gateway.pid) - cpu_start
        wall = time.monotonic() - wall_start
        for _, pipe in workers:
            pipe.send("stop")
        finals = [pipe.recv() for _, pipe in workers]
    except BaseException:
        print(f"bench.idle: failed; the processes' logs are in {workdir}", file=sys.stderr)
        raise
    finally:
        for process, _ in workers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        for proc in reversed(started):
            proc.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    pings = sorted(p for final in finals for p in final["pings"])
    lost = sum(final["lost"] for final in finals)
    result: dict[str, Any] = {
        "connections": opened,
        "requested": args.conns,
        "open_file_limit": limit,
        "heartbeat_s": args.heartbeat,
        "window_s": round(wall, 1),
        "open_seconds": round(open_seconds, 1),
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_after_mib": round(rss_after / 1024, 1),
        "kib_per_conn": round((rss_after - rss_before) / max(opened, 1), 2),
        "idle_cpu_percent": round(100 * cpu / wall, 2),
        "idle_cpu_us_per_conn_per_s": round(1e6 * cpu / wall / max(opened, 1), 3),
        # Each client ping has a backend ping beside it: two pings and two pongs per round.
        "pings_per_s": round(2 * sum(pings) / wall),
        "cpu_us_per_ping": round(1e6 * cpu / (2 * sum(pings)), 1) if sum(pings) else None,
        "pings_per_conn_min": pings[0] if pings else 0,
        "pings_per_conn_median": pings[len(pings) // 2] if pings else 0,
        "pings_expected_per_conn": round(wall / args.heartbeat, 1) if args.heartbeat else 0,
        "lost": lost,
        "notes": notes,
    }
    _report(result, args.out)
    return 0 if opened and not lost else 1


def _report(result: dict[str, Any], out: Path) -> None:
    rows = [
        ("connections held", f"{result['connections']:,} (asked for {result['requested']:,})"),
        ("RSS per connection", f"{result['kib_per_conn']:.2f} KiB"
         f" ({result['rss_before_mib']} MiB before, {result['rss_after_mib']} MiB after)"),
        ("CPU while idle", f"{result['idle_cpu_percent']:.2f}% of one core,"
         f" {result['idle_cpu_us_per_conn_per_s']:.3f} µs per connection per second"),
        ("pings answered per client", f"median {result['pings_per_conn_median']}, min"
         f" {result['pings_per_conn_min']} in {result['window_s']} s (heartbeat {result['heartbeat_s']:g} s)"),
        ("gateway pings (both legs)", f"{result['pings_per_s']:,}/s,"
         f" {result['cpu_us_per_ping'] or 0:.1f} µs of gateway CPU per ping and pong"),
        ("connections lost", f"{result['lost']:,}"),
    ]
    print("\n| measure | wsgate |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"bench.idle: wrote {write_run(out, 'idle', result)}")


if __name__ == "__main__":
    sys.exit(main())
