"""Where one handshake's and one quiet message's work goes: `python -m bench.handshake_profile`.

A gateway runs in this process on the loop wsgate uses (uvloop where installed),
logging as `wsgate run` does (access lines to /dev/null here), in front of the
benchmark's echo backend (a child process). A client thread with blocking
sockets drives it; profilers and counters see only the loop's thread, so the
client's own work is not counted.

Three passes, each after a warm-up:

1. **CPU**: the loop thread's CPU time per handshake (connect, upgrade, read the
   101, TCP close, and the relay's teardown) and per quiet message (one 32-byte
   message echoed on one open connection, the next sent after the reply), unprofiled.
2. **Calls**: cProfile's count of Python and C function calls per handshake and per
   message, grouped by the handshake event each function serves (see `EVENTS`), with
   each event's share of the profiled time. The shares are of profiled time, which
   inflates small functions; the CPU figure of pass 1 is the real total.
3. **Memory**: allocated blocks (`sys.getallocatedblocks`) held per open relay,
   left behind per finished handshake, and the gen-0 collections per 1,000 handshakes.

`--json` prints the figures as JSON; the default is the Markdown tables of
docs/benchmark/handshake-profile.md.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import logging
import os
import pstats
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .wire import client_frame, new_key, set_nodelay, upgrade_request

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

# Which event of a handshake a function serves, by the first rule its file and name match
# (the file's tail, then the function's name; "" matches anything). The table of the note
# lists the events in this order.
EVENTS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("accept", "the listener's accept, admission, ids, the handshake timer", (
        ("upgrade.py", "connection_made"), ("upgrade.py", "_admit"), ("upgrade.py", "_address_known"),
        ("upgrade.py", "_start_request_timer"), ("upgrade.py", "__init__"), ("books.py", "admit"),
        ("books.py", "admit_address"), ("books.py", "next_id"), ("ratelimit.py", ""),
        ("forwarding.py", ""), ("ipaddress.py", ""), ("units.py", "format_host_port"),
        ("gateway.py", ""),
    )),
    ("parse", "the head read and parsed (HeadReader, h11)", (
        ("h11/", ""), ("heads.py", ""),
        ("upgrade.py", "data_received"), ("upgrade.py", "_receive_head"),
        ("upgrade.py", "_next_request_event"), ("turns.py", ""),
    )),
    ("check", "RFC 6455 rules on the request, and on the backend's 101", (
        ("handshake.py", "check_client_request"), ("handshake.py", "_header"),
        ("handshake.py", "_tokens"), ("handshake.py", "_is_valid_key"), ("handshake.py", "_split_host"),
        ("handshake.py", "_origin_form"), ("handshake.py", "_has_dot_segment"),
        ("handshake.py", "_extension_names"), ("handshake.py", "check_origin"),
        ("handshake.py", "check_backend_response"), ("handshake.py", "accept_key"),
        ("handshake.py", "end_to_end"), ("handshake.py", "_without_hops"), ("base64.py", ""),
        ("handshake.py", "__init__"),
        ("handshake.py", "<"),  # the comprehensions of the header helpers
    )),
    ("route", "the route and the affinity key", (
        ("books.py", "pool_for"), ("routing.py", ""), ("handshake.py", "affinity_key"),
        ("balancer.py", "random_key"),
    )),
    ("pick", "the backend order and its bookkeeping", (
        ("balancer.py", ""), ("hashring.py", ""), ("member.py", ""), ("health.py", ""),
    )),
    ("request out", "the upstream request built and sent", (
        ("handshake.py", "build_upstream_request"), ("upstream.py", "connection_made"),
    )),
    ("connect", "the backend connection opened, the task and its timeout", (
        ("upgrade.py", "_proxy"), ("upgrade.py", "_connect_backend"), ("upstream.py", "__init__"),
        ("asyncio/timeouts.py", ""), ("asyncio/tasks.py", ""), ("asyncio/events.py", ""),
        ("asyncio/base_events.py", ""), ("asyncio/futures.py", ""), ("<lambda>", ""),
    )),
    ("response in", "the backend's head read", (
        ("upstream.py", ""),
    )),
    ("101 out", "the 101 rendered and written", (
        ("handshake.py", "render_"), ("handshake.py", "_reason_phrase"), ("enum.py", ""),
    )),
    ("hand-off", "the relay built and started, filed with the sweeper", (
        ("upgrade.py", "_hand_off"), ("books.py", "relay_opened"), ("relay.py", "__init__"),
        ("relay.py", "start"), ("leg.py", "__init__"), ("frames.py", "__init__"),
        ("sweeper", ""), ("books.py", "backend_removed"),
    )),
    ("log", "the access line", (
        ("logging/", ""), ("runtime.py", ""), ("books.py", "log_access"), ("books.py", "key_hash"),
        ("books.py", "write_line"), ("books.py", "iso_time"), ("books.py", "_direct_access_handler"),
        ("books.py", "_close_entry"), ("books.py", "_json_close"), ("books.py", "access_"),
        ("json/", ""), ("hashlib", ""),
    )),
    ("metrics", "prometheus-client children and counts", (
        ("metrics.py", ""), ("prometheus_client/", ""),
    )),
    ("relay", "the relay's reads and writes (the close, in a handshake)", (
        ("relay.py", ""), ("leg.py", ""), ("frames.py", ""), ("closing.py", ""),
    )),
    ("teardown", "connection_lost on both sides, admission and relay given back", (
        ("upgrade.py", "connection_lost"), ("upgrade.py", "_finish"), ("upgrade.py", "eof_received"),
        ("books.py", ""),
    )),
)


def event_of(filename: str, function: str) -> str:
    """The event a profiled function is counted under; "other" when no rule matches."""
    if filename == "~":
        # A C function: cProfile names it "<built-in method x>" or "<method 'y' of 'z' objects>".
        return "C: " + function.split(" of ")[0].strip("<>'").removeprefix("built-in method ")
    for event, _, rules in EVENTS:
        for file_part, name_part in rules:
            if file_part in filename and function.startswith(name_part):
                return event
            if file_part == "<lambda>" and function == "<lambda>":
                return event
    return "other"


# -- the client (its own thread, blocking sockets) ------------------------------------


def _upgrade(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port))
    set_nodelay(sock)
    sock.sendall(upgrade_request(HOST, port, "/echo", new_key()))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the gateway closed before its 101")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"no 101: {head[:40]!r}")
    return sock


def handshakes(port: int, count: int) -> None:
    """`count` handshakes one after another: connect, upgrade, read the 101, close."""
    for _ in range(count):
        _upgrade(port).close()


def quiet_messages(port: int, count: int) -> None:
    """`count` 32-byte messages on one connection, each sent after the previous echo."""
    sock = _upgrade(port)
    frame = client_frame(b"x" * 32)
    for _ in range(count):
        sock.sendall(frame)
        got = 0
        while got < 34:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the gateway closed during the messages")
            got += len(chunk)
    sock.close()


# -- the gateway side ------------------------------------------------------------------


async def _settle(books: Any) -> None:
    """Wait (bounded) until every handshake and relay of the pass has ended."""
    for _ in range(500):
        if not books.handshakes and not books.relays:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("connections still open after 5 s")


async def _drive(books: Any, client: Callable[[], None]) -> None:
    await asyncio.to_thread(client)
    await _settle(books)


async def measure(
    backend_port: int, rounds: int, messages: int, gc_threshold: int | None = None
) -> dict[str, Any]:
    from wsgate.config import parse_config
    from wsgate.gateway import Gateway

    config = parse_config({
        "listeners": [{"name": "bench", "bind": f"{HOST}:0"}],
        "admin": {"enabled": False},
        "routes": [{"name": "bench", "backends": [{"url": f"ws://{HOST}:{backend_port}"}]}],
        "timeouts": {"handshake": "10s", "connect": "5s", "idle": 0, "close": "5s"},
        "limits": {"max_connections": 100000, "max_connections_per_ip": 100000, "max_message_size": 0},
    })
    gateway = Gateway(config)
    await gateway.start()
    books = gateway.books
    port = gateway.addresses[0][1]
    gc.collect()
    gc.freeze()  # as `wsgate run` does once started
    if gc_threshold is not None:
        gc.set_threshold(gc_threshold, *gc.get_threshold()[1:])
    results: dict[str, Any] = {"rounds": rounds, "messages": messages, "gc_threshold": gc.get_threshold()}
    try:
        passes: dict[str, tuple[Callable[[], None], int]] = {
            "handshake": (lambda: handshakes(port, rounds), rounds),
            "message": (lambda: quiet_messages(port, messages), messages),
        }
        for name, (client, count) in passes.items():
            await _drive(books, client)  # warm-up: caches, children, code paths
            cpu = time.thread_time()
            await _drive(books, client)
            results[f"{name}_cpu_us"] = (time.thread_time() - cpu) / count * 1e6
            profile = cProfile.Profile()
            profile.enable()
            await _drive(books, client)
            profile.disable()
            results[f"{name}_calls"] = _calls_by_event(profile, count)
        results.update(await _memory(books, port, rounds))
    finally:
        await gateway.close()
    return results


def _calls_by_event(profile: cProfile.Profile, count: int) -> dict[str, Any]:
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    calls: dict[str, float] = defaultdict(float)
    seconds: dict[str, float] = defaultdict(float)
    functions: list[tuple[float, str]] = []
    python_calls = c_calls = 0.0
    for (filename, line, function), (_, ncalls, tottime, _, _) in stats.items():
        event = event_of(filename, function)
        per = ncalls / count
        if event.startswith("C: "):
            c_calls += per
            # A C call's time belongs to the Python function that made it; cProfile gives it
            # its own line, so it is counted in its own bucket and shown in the list below.
            seconds["C functions"] += tottime
        else:
            python_calls += per
            calls[event] += per
            seconds[event] += tottime
        where = f"{Path(filename).name}:{line}" if filename != "~" else "C"
        functions.append((per, f"{function} ({where})"))
    total = sum(seconds.values()) or 1.0
    functions.sort(reverse=True)
    return {
        "python": python_calls,
        "c": c_calls,
        "by_event": dict(calls),
        "time_share": {event: share / total for event, share in seconds.items()},
        "top": [(round(per, 2), name) for per, name in functions[:25]],
    }


async def _memory(books: Any, port: int, rounds: int) -> dict[str, float]:
    """Blocks held per open relay and left per finished handshake; gen-0 collections."""
    open_count = min(rounds, 200)
    gc.collect()
    before = sys.getallocatedblocks()
    collections = gc.get_stats()[0]["collections"]
    await _drive(books, lambda: handshakes(port, rounds))
    gen0 = gc.get_stats()[0]["collections"] - collections
    gc.collect()
    left = sys.getallocatedblocks() - before
    socks = await asyncio.to_thread(lambda: [_upgrade(port) for _ in range(open_count)])
    for _ in range(500):
        if len(books.relays) == open_count:
            break
        await asyncio.sleep(0.01)
    gc.collect()
    held = sys.getallocatedblocks() - before - left
    # What the upgrade phase may leave behind on an open relay: nothing, once handed off.
    from wsgate.upgrade import UpgradeProtocol
    from wsgate.upstream import BackendHandshake

    phase_objects = sum(isinstance(o, (UpgradeProtocol, BackendHandshake)) for o in gc.get_objects())
    for sock in socks:
        sock.close()
    await _settle(books)
    return {
        "blocks_per_open_relay": held / open_count,
        "upgrade_objects_per_open_relay": phase_objects / open_count,
        "blocks_left_per_handshake": left / rounds,
        "gen0_per_1000_handshakes": gen0 * 1000 / rounds,
    }


# -- output ----------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Handshakes per pass: {results['rounds']}; quiet messages per pass: {results['messages']}; "
        f"gc thresholds {results['gc_threshold']}.",
        "",
        "| event | what | Python calls / handshake | profiled time share | "
        "Python calls / message | profiled time share |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    hand, message = results["handshake_calls"], results["message_calls"]
    for event, what, _ in (*EVENTS, ("other", "anything not matched above", ()),
                           ("C functions", "builtins and C methods (uvloop, bytes, dict...)", ())):
        row = [hand["by_event"].get(event, 0.0), hand["time_share"].get(event, 0.0),
               message["by_event"].get(event, 0.0), message["time_share"].get(event, 0.0)]
        if not any(row):
            continue
        lines.append(f"| {event} | {what} | {row[0]:.1f} | {row[1]:.0%} | {row[2]:.1f} | {row[3]:.0%} |")
    lines += [
        f"| **all** | | **{hand['python']:.0f}** Python + {hand['c']:.0f} C | | "
        f"**{message['python']:.0f}** Python + {message['c']:.0f} C | |",
        "",
        f"Loop-thread CPU, unprofiled: {results['handshake_cpu_us']:.0f} µs per handshake, "
        f"{results['message_cpu_us']:.1f} µs per quiet message.",
        f"Memory: {results['blocks_per_open_relay']:.0f} allocated blocks held per open relay, "
        f"{results['blocks_left_per_handshake']:.2f} left per finished handshake, "
        f"{results['upgrade_objects_per_open_relay']:.2f} upgrade-phase protocols alive per open relay; "
        f"{results['gen0_per_1000_handshakes']:.0f} gen-0 collections per 1,000 handshakes.",
        "",
        "Most-called functions per handshake:",
        "",
    ]
    lines += [f"- {per:g} × {name}" for per, name in hand["top"]]
    lines += ["", "Most-called functions per quiet message:", ""]
    lines += [f"- {per:g} × {name}" for per, name in message["top"] if per >= 0.5]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=2000, help="handshakes per pass (default %(default)s)")
    parser.add_argument("--messages", type=int, default=5000,
                        help="quiet messages per pass (default %(default)s)")
    parser.add_argument("--gc-threshold", type=int, help="gen-0 threshold to run with (default Python's)")
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    args = parser.parse_args()
    from wsgate.runtime import loop_factory, setup_logging

    setup_logging("info", "json")
    # Access lines are formatted and written as in production, to nowhere.
    devnull = open(os.devnull, "w")
    for handler in logging.getLogger("wsgate.access").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(devnull)
    backend = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_backend", "--port", "0"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert backend.stdout is not None
        backend_port = int(backend.stdout.readline().rsplit(":", 1)[1])
        factory = loop_factory()
        with asyncio.Runner(loop_factory=factory) as runner:
            results = runner.run(measure(backend_port, args.rounds, args.messages, args.gc_threshold))
    finally:
        backend.terminate()
        backend.wait(5)
    print(json.dumps(results, indent=2) if args.json else markdown(results))
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "loop"
    sys.exit(main())
