"""The scenarios: what each one sends, how it is checked first, and what it reports."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from . import procstat
from .loadgen import Job, LoadGen, split
from .targets import HOST, Target, client_context
from .wire import (
    OP_BINARY,
    OP_CLOSE,
    SMALL_PAYLOAD,
    ZERO_MASK,
    accept_key,
    client_frame,
    header_value,
    new_key,
    push_payload,
    server_frame,
    upgrade_request,
)

KiB, MiB = 1024, 1024 * 1024
SATURATED = 0.9  # share of a core (or of the machine) above which a warning is printed


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    fmt: str = "{:,.0f}"
    proxy_only: bool = False  # n/a for direct connections (proxy CPU, proxy RSS)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # the load generator's job kind
    path: str
    summary: str
    metrics: tuple[Metric, ...]
    size: int = 32
    conns: int = 1
    depth: int = 1
    rate: float = 0.0  # per connection, latency only
    long_window: bool = False  # uses the latency window length


def _cpu(per: str) -> Metric:
    return Metric("cpu_us", f"proxy CPU µs/{per}", False, "{:,.1f}", proxy_only=True)


_GBPS = Metric("gb_per_s", "GB/s", True, "{:.2f}")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("small_pipelined", "pipelined", "/echo32",
             "32 B binary echo, 50 connections x 16 in flight: echoed messages/s",
             (Metric("msg_per_s", "msg/s", True), _cpu("msg")), size=32, conns=50, depth=16),
    Scenario("echo_64k", "pipelined", "/echo",
             "64 KiB echo, 8 connections x 2 in flight: echoed payload bytes/s received by the clients",
             (_GBPS, _cpu("msg")), size=64 * KiB, conns=8, depth=2),
    Scenario("echo_1m", "pipelined", "/echo",
             "1 MiB echo, 8 connections x 2 in flight: echoed payload bytes/s received by the clients",
             (_GBPS, _cpu("msg")), size=MiB, conns=8, depth=2),
    Scenario("push_64k", "push", "/push?size=65536",
             "backend pushes 64 KiB messages to 4 connections: payload bytes/s received",
             (_GBPS, _cpu("msg")), size=64 * KiB, conns=4),
    Scenario("push_1m", "push", "/push?size=1048576",
             "backend pushes 1 MiB messages to 4 connections: payload bytes/s received",
             (_GBPS, _cpu("msg")), size=MiB, conns=4),
    Scenario("latency", "latency", "/echo32",
             "32 B round trips at 2,000 msg/s (10 connections x 200/s, one in flight, fixed grid)",
             (Metric("p50_us", "p50 µs", False, "{:,.0f}"), Metric("p99_us", "p99 µs", False, "{:,.0f}"),
              Metric("p999_us", "p99.9 µs", False, "{:,.0f}"),
              Metric("added_p50_us", "p50 added over direct µs", False, "{:,.0f}", proxy_only=True),
              Metric("added_p99_us", "p99 added over direct µs", False, "{:,.0f}", proxy_only=True),
              _cpu("msg")),
             conns=10, rate=200.0, long_window=True),
    Scenario("idle_rss", "idle", "/echo32",
             "RSS of the proxy's processes per idle upgraded connection",
             (Metric("kib_per_conn", "KiB/connection", False, "{:,.1f}", proxy_only=True),), conns=10_000),
    Scenario("handshakes", "handshake", "/echo",
             "32 loops of connect, upgrade, read the 101, close: handshakes/s",
             (Metric("per_s", "handshakes/s", True), _cpu("handshake")), conns=32),
    Scenario("sessions", "session", "/echo",
             "32 loops of connect, upgrade, one 32 B echo, close handshake, TCP close: sessions/s",
             (Metric("per_s", "sessions/s", True), _cpu("session")), conns=32),
)
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass(frozen=True)
class Timing:
    warmup: float
    window: float
    latency_window: float
    idle_conns: int
    settle: float  # wait before reading RSS


# Load reaches its steady state within milliseconds (connections are open
# before the start signal), so half a second of warm-up is plenty.
DEFAULT_TIMING = Timing(warmup=0.5, window=3.0, latency_window=5.0, idle_conns=10_000, settle=2.0)
QUICK_TIMING = Timing(warmup=0.2, window=0.7, latency_window=1.5, idle_conns=1_000, settle=0.3)


class NotApplicable(Exception):
    """This target cannot do this scenario; the message says why."""


class CheckFailed(Exception):
    """The target did not relay the check message intact; no figure is taken."""


# -- the correctness check made before each run --------------------------------


def _recv_exactly(sock: socket.socket, count: int, buffered: bytes) -> tuple[bytes, bytes]:
    data = bytearray(buffered)
    while len(data) < count:
        chunk = sock.recv(max(count - len(data), 65536))
        if not chunk:
            raise CheckFailed(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data[:count]), bytes(data[count:])


def _open(target: Target) -> socket.socket:
    """A blocking connection to the target, over TLS for TLS targets."""
    sock = socket.create_connection((HOST, target.port), timeout=10)
    if not target.tls:
        return sock
    assert target.certs is not None
    try:
        return client_context(target.certs.ca_pem).wrap_socket(sock, server_hostname=target.certs.server_name)
    except BaseException:
        sock.close()
        raise


def _upgrade(target: Target, path: str) -> tuple[socket.socket, bytes]:
    port = target.port
    sock = _open(target)
    key = new_key()
    sock.sendall(upgrade_request(HOST, port, path, key))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise CheckFailed(f"{path}: connection closed during the upgrade")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise CheckFailed(f"{path}: upgrade refused: {head.splitlines()[0]!r}")
    if header_value(head, b"sec-websocket-accept") != accept_key(key):
        raise CheckFailed(f"{path}: wrong Sec-WebSocket-Accept")
    return sock, rest


def _check_echo(target: Target, path: str, payload: bytes, mask_key: bytes) -> None:
    sock, rest = _upgrade(target, path)
    with sock:
        sock.sendall(client_frame(payload, OP_BINARY, mask_key))
        want = server_frame(payload)
        got, rest = _recv_exactly(sock, len(want), rest)
        if got != want:
            raise CheckFailed(f"{path}: the echo of a {len(payload)}-byte message differs from what was sent")
        sock.sendall(client_frame((1000).to_bytes(2, "big"), OP_CLOSE, os.urandom(4)))
        closing = server_frame((1000).to_bytes(2, "big"), OP_CLOSE)
        got, _ = _recv_exactly(sock, len(closing), rest)
        if got != closing:
            raise CheckFailed(f"{path}: bad close handshake reply {got!r}")


def _check_push(target: Target, path: str, size: int) -> None:
    sock, rest = _upgrade(target, path)
    with sock:
        want = server_frame(push_payload(size))
        got, _ = _recv_exactly(sock, len(want), rest)
        if got != want:
            raise CheckFailed(f"{path}: the pushed {size}-byte message arrived altered")


def check(scenario: Scenario, target: Target) -> None:
    """One message through the target, compared byte for byte, before any figure is taken."""
    if scenario.kind == "push":
        _check_push(target, scenario.path, scenario.size)
        return
    # A random payload under a random mask: whatever the proxy does to frames, the payload must come back.
    _check_echo(target, "/echo", os.urandom(scenario.size), os.urandom(4))
    if scenario.path == "/echo32":
        _check_echo(target, "/echo32", SMALL_PAYLOAD, ZERO_MASK)


# -- helpers ---------------------------------------------------------------------


def backend_open(backend_port: int) -> int:
    """Open WebSocket connections on the backend, from its /stats."""
    with socket.create_connection((HOST, backend_port), timeout=5) as sock:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: bench\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return int(json.loads(data.partition(b"\r\n\r\n")[2])["open"])


def quiesce(backend_port: int, timeout: float = 15.0) -> bool:
    """Waits until the previous run's connections are gone at the backend."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend_open(backend_port) == 0:
            return True
        time.sleep(0.1)
    return False


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def _sleep_until(monotonic: float) -> None:
    delay = monotonic - time.monotonic()
    if delay > 0:
        time.sleep(delay)


@dataclass
class Context:
    """What every run needs."""

    pool: LoadGen
    backend: Target
    timing: Timing
    sources: tuple[str, ...]
    procs: int
    fd_limit: int
    notes: list[str] = field(default_factory=list)


def _jobs(ctx: Context, scenario: Scenario, target: Target, conns: int, window: float) -> list[Job]:
    shares = split(conns, ctx.procs)
    certs = target.certs if target.tls else None
    jobs, first = [], 0
    for share in shares:
        jobs.append(Job(
            kind=scenario.kind, port=target.port, path=scenario.path, conns=share, size=scenario.size,
            depth=scenario.depth, rate=scenario.rate, warmup=ctx.timing.warmup, window=window,
            sources=ctx.sources, first_source=first,
            tls_ca=certs.ca_pem if certs else "", server_name=certs.server_name if certs else "",
        ))
        first += share
    return jobs


def _saturation(cpu: dict[str, float]) -> list[str]:
    """Warnings for a generator process, the backend or the machine near its limit."""
    warnings = []
    for name, used in cpu.items():
        if (name.startswith("generator") or name == "backend") and used > SATURATED:
            warnings.append(f"{name} at {used:.0%} of a core")
    if cpu.get("machine", 0) > SATURATED:
        warnings.append(f"machine at {cpu['machine']:.0%} of all CPUs")
    return warnings


def run(ctx: Context, scenario: Scenario, target: Target) -> dict[str, Any]:
    """One measurement of `scenario` through `target`: metrics plus `warnings`."""
    if scenario.kind == "idle" and not target.pids():
        raise NotApplicable("no proxy process to measure")
    if not quiesce(ctx.backend.port):
        ctx.notes.append(f"{scenario.name}/{target.name}: connections of the previous run were still open")
    if scenario.kind == "idle":
        # A fresh process: memory freed by earlier runs (1 MiB messages) can stay
        # resident, and new connections reusing it would look cheaper than they are.
        target.restart()
    check(scenario, target)
    if scenario.kind == "idle":
        return _run_idle(ctx, scenario, target)
    return _run_windowed(ctx, scenario, target)


def _run_windowed(ctx: Context, scenario: Scenario, target: Target) -> dict[str, Any]:
    timing = ctx.timing
    window = timing.latency_window if scenario.long_window else timing.window
    ctx.pool.submit(_jobs(ctx, scenario, target, scenario.conns, window))
    ready = ctx.pool.gather("ready", timeout=60)
    failed = [info for info in ready if info.get("failed")]
    if failed:
        raise CheckFailed(f"{sum(i['failed'] for i in failed)} connections failed: {failed[0]['error']}")
    groups = {"proxy": target.pids(), "backend": ctx.backend.pids()}
    groups.update({f"generator {i + 1}": [pid] for i, pid in enumerate(ctx.pool.pids)})
    sampler = procstat.CpuSampler(groups)
    t_go = time.monotonic() + 0.2
    ctx.pool.go(t_go)
    _sleep_until(t_go + timing.warmup)
    sampler.start(time.monotonic())
    _sleep_until(t_go + timing.warmup + window)
    cpu = sampler.stop(time.monotonic())
    results = ctx.pool.gather("done", timeout=timing.warmup + window + 30)

    rate = sum(r["count"] / r["elapsed"] for r in results if r["elapsed"] > 0)
    warnings = _saturation(cpu)
    bad = [r["bad"] for r in results if r.get("bad")]
    if bad:
        raise CheckFailed(bad[0])
    if any(r.get("unchecked") for r in results) and scenario.kind == "pipelined":
        warnings.append("some connections got no reply at all")
    lost = sum(r.get("lost", 0) for r in results)
    if lost and scenario.kind not in ("handshake", "session"):
        warnings.append(f"{lost} connections lost during the run")
    errors = sum(r.get("errors", 0) for r in results)
    if errors:
        first = next(r["error"] for r in results if r.get("error"))
        warnings.append(f"{errors} failed attempts ({first})")
    sample: dict[str, Any] = {"rate": rate, "cpu": cpu}
    proxy_cpu = cpu["proxy"] if target.pids() else None
    if scenario.kind in ("pipelined", "push"):
        sample["msg_per_s"] = rate
        sample["gb_per_s"] = rate * scenario.size / 1e9
    elif scenario.kind in ("handshake", "session"):
        sample["per_s"] = rate
    elif scenario.kind == "latency":
        latencies = sorted(ns / 1000 for r in results for ns in r["samples"])
        sample.update(p50_us=percentile(latencies, 0.50), p99_us=percentile(latencies, 0.99),
                      p999_us=percentile(latencies, 0.999), msg_per_s=rate, count=len(latencies),
                      latencies_us=[round(v, 1) for v in latencies])
        late = sum(r["late"] for r in results)
        if late:
            warnings.append(f"{late} sends held back by a late reply (counted from their slot)")
        expected = scenario.rate * scenario.conns
        if rate < 0.95 * expected:
            warnings.append(f"achieved {rate:,.0f} msg/s of the {expected:,.0f} scheduled")
    if proxy_cpu is not None and rate > 0:
        sample["cpu_us"] = proxy_cpu / rate * 1e6
    sample["warnings"] = warnings
    return sample


def _run_idle(ctx: Context, scenario: Scenario, target: Target) -> dict[str, Any]:
    timing = ctx.timing
    conns = min(timing.idle_conns, (ctx.fd_limit - 300) // 2)
    time.sleep(timing.settle / 2)
    before = procstat.tree_rss_kib(target.pids())
    ctx.pool.submit(_jobs(ctx, scenario, target, conns, 0.0))
    ready = ctx.pool.gather("ready", timeout=200)
    opened = sum(info["open"] for info in ready)
    warnings = []
    if opened < conns:
        error = next(i["error"] for i in ready if i.get("error"))
        warnings.append(f"only {opened:,} of {conns:,} connections opened ({error})")
    time.sleep(timing.settle)
    after = procstat.tree_rss_kib(target.pids())
    ctx.pool.go(time.monotonic())
    ctx.pool.gather("done", timeout=60)
    if opened == 0:
        raise CheckFailed("no idle connection could be opened")
    return {"kib_per_conn": (after - before) / opened, "rss_before_kib": before, "rss_after_kib": after,
            "conns": opened, "warnings": warnings}
