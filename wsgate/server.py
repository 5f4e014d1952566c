"""Listeners and the handshake phase: parse, route, connect, check the 101, hand off.

Each accepted socket starts with a `_ClientHandshake` protocol that feeds h11
until the request head is complete, then a task picks a backend, connects with
a `_BackendHandshake` protocol and, on a valid 101, passes both transports to a
`Relay` by `set_protocol`. Bytes that arrive on either side before the hand-off
are kept and relayed first.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
import socket
import time
from collections.abc import Collection
from datetime import datetime, timezone
from typing import cast

import h11

from prometheus_client import CollectorRegistry

from . import __version__
from .balancer import Member, Pool, random_key
from .config import Config, Listener, load_config
from .errors import BackendUnavailable, ConfigError, HandshakeError
from .frames import CloseCode
from .handshake import (
    affinity_key,
    build_upstream_request,
    check_backend_response,
    check_client_request,
    check_origin,
    render_backend_reply,
    render_error,
    render_rejection,
    render_switching_protocols,
)
from .metrics import Metrics, close_code_label
from .relay import GATEWAY, Relay, RelaySettings, Sweeper, sweep_timing
from .routing import match_route
from .tls import ListenerTls, listener_contexts, peer_subject

log = logging.getLogger("wsgate.server")
# One JSON line per connection when it ends (see cli for the handler).
access_log = logging.getLogger("wsgate.access")

# Metrics lag the connections' own counters by at most this long.
METRICS_FLUSH_INTERVAL = 5.0


# Bounded `reason` labels for handshake rejections, by HTTP status.
_REJECTION_REASONS = {
    400: "bad_request",
    403: "origin",
    404: "no_route",
    405: "method",
    408: "timeout",
    426: "upgrade_required",
    431: "headers_too_large",
    503: "limit",
}


def _pools(config: Config) -> dict[str, Pool]:
    """A fresh pool per route (a bad backend CA file raises `ConfigError`)."""
    return {
        route.name: Pool(route, config.discovery, path=f"routes[{i}]")
        for i, route in enumerate(config.routes)
    }


def _version(config: Config) -> str:
    """A short digest of the effective config, for /status and the reload log."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]


def _relay_settings(config: Config) -> RelaySettings:
    return RelaySettings(
        high_water=config.flow_control.high_water,
        low_water=config.flow_control.low_water,
        max_message_size=config.limits.max_message_size,
        close_timeout=config.timeouts.close,
        heartbeat_interval=config.heartbeat.interval,
        heartbeat_timeout=config.heartbeat.timeout,
        idle_timeout=config.timeouts.idle,
    )


def key_hash(key: bytes) -> str:
    """A short stable digest of an affinity key: logs can group by it without holding it."""
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")

# A backend's refusal is relayed to the client; its body is cut at this size.
BACKEND_REPLY_BODY_LIMIT = 64 * 1024
_MAX_BACKEND_HEAD_SIZE = 64 * 1024


class Gateway:
    """Serves every listener of one config; `start` binds, `close` stops."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Certificates and CA files load here, so a bad one stops start-up with its key path.
        self.tls = listener_contexts(config)
        self.pools = _pools(config)
        self.tls_handshake_failures = 0
        self.tls_reload_failures = 0
        self._watch: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self._flush_task: asyncio.Task[None] | None = None
        self.draining = False
        self.loaded_at = time.time()
        self.config_version = _version(config)
        self.config_path: str | None = None  # where reload() reads the config from
        self._reload_lock = asyncio.Lock()
        # Listening sockets handed over by a supervisor, by listener name (workers > 1).
        self.inherited: dict[str, socket.socket] = {}
        self.relay_settings = _relay_settings(config)
        self._sweeper = Sweeper(*sweep_timing(self.relay_settings))
        self._servers: dict[str, asyncio.Server] = {}
        self._connections: set[_ClientHandshake] = set()
        self._relays = self._sweeper.relays
        self._all_closed = asyncio.Event()
        self._per_ip: dict[str, int] = {}
        self._ids = itertools.count(1)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) each listener is bound to, in config order."""
        return [
            self._servers[listener.name].sockets[0].getsockname()[:2]
            for listener in self.config.listeners
            if listener.name in self._servers
        ]

    @property
    def connection_count(self) -> int:
        return sum(self._per_ip.values())

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper.start()
        try:
            for pool in self.pools.values():
                await pool.start()
            for listener in self.config.listeners:
                await self._listen(listener)
            self._start_watching()
            self._flush_task = loop.create_task(self._flush_forever())
        except BaseException:
            await self.close()
            raise

    async def _listen(self, listener: Listener, server: asyncio.Server | None = None) -> None:
        """Accept on `listener`: on `server` if given (bound by `_bind`), else on a new one."""
        if server is None:
            server = await self._bind(listener)
        else:
            await server.start_serving()
        self._servers[listener.name] = server
        log.info(
            "listening on %s:%d (%s%s)",
            *server.sockets[0].getsockname()[:2], listener.name, ", TLS" if listener.tls else "",
        )

    async def _bind(self, listener: Listener, start_serving: bool = True) -> asyncio.Server:
        name = listener.name

        def protocol() -> _ClientHandshake:
            # The listener's current config, so a reload that changes only its TLS
            # settings applies to new connections without rebinding.
            return _ClientHandshake(self, self._listener_config(name))

        loop = asyncio.get_running_loop()
        inherited = self.inherited.get(name)
        if inherited is not None:
            return await loop.create_server(
                protocol, sock=inherited, backlog=1024, start_serving=start_serving
            )
        return await loop.create_server(
            protocol,
            listener.host,
            listener.port,
            reuse_address=True,
            backlog=1024,
            start_serving=start_serving,
        )

    def _listener_config(self, name: str) -> Listener:
        return next(listener for listener in self.config.listeners if listener.name == name)

    async def close(self) -> None:
        """Stop accepting, close every connection with 1001, drop what is left after `timeouts.close`."""
        for server in self._servers.values():
            server.close()
        for connection in list(self._connections):
            connection.transport.close()
        for relay in list(self._relays):
            relay.close(CloseCode.GOING_AWAY, "gateway shutting down")
        if self._relays:
            self._all_closed.clear()
            try:
                async with asyncio.timeout(self.config.timeouts.close):
                    await self._all_closed.wait()
            except TimeoutError:
                for relay in list(self._relays):
                    relay.abort()
        self._sweeper.stop()
        for task in (self._watch, self._flush_task):
            if task is not None:
                task.cancel()
        for pool in self.pools.values():
            await pool.stop()
        for server in self._servers.values():
            await server.wait_closed()

    async def drain(self) -> None:
        """Shut down gently: stop accepting, report not ready, close clients with 1001 spread
        evenly (with jitter) over `shutdown.drain_period`, and return when every connection
        has ended or at `shutdown.grace_period`, whichever comes first.
        """
        shutdown = self.config.shutdown
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.draining = True
        for server in self._servers.values():
            server.close()
        for connection in list(self._connections):
            connection.transport.close()
        log.info("draining %d connections over %.1fs", len(self._relays), shutdown.drain_period)
        handles = self._spread_closes(list(self._relays), CloseCode.GOING_AWAY, "going away")
        if self._relays:
            self._all_closed.clear()
            try:
                async with asyncio.timeout(max(0.0, shutdown.grace_period - (loop.time() - started))):
                    await self._all_closed.wait()
            except TimeoutError:
                log.warning("grace period over: dropping %d connections", len(self._relays))
                for relay in list(self._relays):
                    relay.abort()
        for handle in handles:
            handle.cancel()
        await self.close()

    async def reload(self) -> str | None:
        """Read `config_path` again and apply it; None on success, else why it was refused.

        An invalid file (or certificate) changes nothing: the old config keeps serving.
        """
        if self.config_path is None:
            return "this gateway was not started from a config file"
        # Two quick SIGHUPs must not interleave inside _apply, which awaits.
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> str | None:
        assert self.config_path is not None
        try:
            config = load_config(self.config_path)
            tls = listener_contexts(config)
            pools = _pools(config)
            # New and moved listeners are bound (not yet accepting) before anything
            # changes: an address in use refuses the reload instead of losing a listener.
            bound = await self._bind_listeners(config)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("failure").inc()
            log.error("reload refused; keeping the running config and the old certificates: %s", exc)
            return str(exc)
        await self._apply(config, tls, pools, bound)
        self.metrics.config_reloads.labels("success").inc()
        for name in tls:
            log.info("listener %s: certificates loaded", name)
        log.info("reloaded %s (config version %s)", self.config_path, self.config_version)
        return None

    async def _bind_listeners(self, config: Config) -> dict[str, asyncio.Server]:
        """Bind the listeners of `config` that are new or moved, without accepting yet."""
        if self.inherited:
            return {}  # a supervisor owns the sockets; see _apply_listeners
        current = {listener.name: listener.bind for listener in self.config.listeners}
        bound: dict[str, asyncio.Server] = {}
        try:
            for i, listener in enumerate(config.listeners):
                if current.get(listener.name) != listener.bind:
                    try:
                        bound[listener.name] = await self._bind(listener, start_serving=False)
                    except OSError as exc:
                        raise ConfigError(
                            f"listeners[{i}].bind",
                            f"cannot listen on {listener.bind}: {exc.strerror or exc}",
                            self.config_path,
                        ) from exc
        except BaseException:
            for server in bound.values():
                server.close()
            raise
        return bound

    async def _apply(
        self,
        config: Config,
        tls: dict[str, ListenerTls],
        pools: dict[str, Pool],
        bound: dict[str, asyncio.Server],
    ) -> None:
        """Swap in a validated config: new connections follow it, open ones stay put."""
        old_config, old_pools = self.config, self.pools
        removed: list[tuple[Relay, bool]] = []  # relays whose backend left, and whether to keep them
        for name, pool in pools.items():
            previous = old_pools.get(name)
            if previous is not None:
                pool.adopt(previous)
        for name, previous in old_pools.items():
            kept = {m.identity for m in pools[name].members} if name in pools else set()
            keep = previous.route.on_backend_removed == "keep"
            for member in previous.members:
                if member.identity not in kept:
                    removed.extend((relay, keep) for relay in member.relays)
        # From here on nothing can fail: swap everything at once.
        self.config, self.tls, self.pools = config, tls, pools
        self.relay_settings = _relay_settings(config)
        self._sweeper.retime(*sweep_timing(self.relay_settings), asyncio.get_running_loop().time())
        self.loaded_at = time.time()
        self.config_version = _version(config)
        for pool in old_pools.values():
            await pool.stop()
        for pool in pools.values():
            await pool.start()
        await self._apply_listeners(old_config, config, bound)
        closing = [relay for relay, keep in removed if not keep]
        if closing:
            self._spread_closes(closing, CloseCode.SERVICE_RESTART, "backend removed")
            log.info("closing %d connections on removed backends", len(closing))

    async def _apply_listeners(self, old: Config, new: Config, bound: dict[str, asyncio.Server]) -> None:
        """Start listeners that are new or moved (bound by `_bind_listeners`); close those
        that went; leave the rest alone."""
        before = {listener.name: listener for listener in old.listeners}
        after = {listener.name: listener for listener in new.listeners}
        if self.inherited:
            # A supervisor owns the sockets (workers > 1): they change with a restart only.
            if {n: l.bind for n, l in before.items()} != {n: l.bind for n, l in after.items()}:
                log.warning("listener changes take a restart when workers > 1; listeners unchanged")
            return
        for name, listener in before.items():
            if name not in after or after[name].bind != listener.bind:
                server = self._servers.pop(name, None)
                if server is not None:
                    server.close()  # its open connections carry on
                    log.info("stopped listening on %s (%s)", listener.bind, name)
        for name, listener in after.items():
            if name not in self._servers:
                await self._listen(listener, bound.get(name))

    def _spread_closes(self, relays: list[Relay], code: int, reason: str) -> list[asyncio.TimerHandle]:
        """Close `relays` spread evenly, with jitter, over `shutdown.drain_period`."""
        loop = asyncio.get_running_loop()
        relays = list(relays)
        random.shuffle(relays)
        # One slot per connection, a random moment within each: clients do not all
        # reconnect at the same instant, and the last close lands within the period.
        slot = self.config.shutdown.drain_period / max(1, len(relays))
        return [
            loop.call_later(i * slot + random.uniform(0, slot), relay.close, code, reason)
            for i, relay in enumerate(relays)
        ]

    def reload_tls(self) -> bool:
        """Load every listener's certificates again; new handshakes use them, open ones are untouched.

        A file that fails to load is logged and the listener keeps its old certificates.
        """
        ok = True
        for name, tls in self.tls.items():
            try:
                tls.reload()
            except ConfigError as exc:
                ok = False
                self.tls_reload_failures += 1
                log.error("listener %s: keeping the old certificates: %s", name, exc)
            else:
                log.info("listener %s: certificates loaded", name)
        if self.tls:
            self.metrics.config_reloads.labels("success" if ok else "failure").inc()
        return ok

    def _start_watching(self) -> None:
        intervals = [t.config.watch_interval for t in self.tls.values() if t.config.watch_interval]
        if intervals:
            self._watch = asyncio.get_running_loop().create_task(self._watch_files(min(intervals)))

    async def _watch_files(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if any(t.files_changed() for t in self.tls.values()):
                self.reload_tls()

    # -- observability ---------------------------------------------------------

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_INTERVAL)
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Move every connection's counts into the metrics; refresh the per-backend gauges."""
        metrics = self.metrics
        self._flush_relays(self._relays)
        now = asyncio.get_running_loop().time()
        for name, pool in self.pools.items():
            metrics.set_pool(name, pool.members, now)

    def _flush_relays(self, relays: Collection[Relay]) -> None:
        self.metrics.flush_relays(relays)
        for relay in relays:
            for leg in (relay.client, relay.backend):
                if leg.rtts:
                    histogram = self.metrics.series(self.metrics.heartbeat_rtt, leg.side)
                    for rtt in leg.rtts:
                        histogram.observe(rtt)
                    leg.rtts = None

    def _relay_finished(self, relay: Relay, client: str, client_cert: str | None) -> None:
        """Final counts and the access log line of a connection that ended."""
        metrics = self.metrics
        self._flush_relays((relay,))
        duration = asyncio.get_running_loop().time() - relay.started_at
        side = relay.closed_by or GATEWAY
        metrics.series(metrics.close_frames, close_code_label(relay.close_code), side).inc()
        metrics.series(metrics.connection_duration, relay.route_name).observe(duration)
        if relay.dead_side:
            metrics.heartbeat_timeouts.labels(relay.dead_side).inc()
        elif relay.close_reason == "idle timeout":
            metrics.idle_timeouts.labels(relay.route_name).inc()
        member = relay.member
        assert isinstance(member, Member)
        access_log.info(
            "",
            extra={
                "access": {
                    "client": client,
                    "route": relay.route_name,
                    "backend": member.identity,
                    "key_hash": key_hash(relay.key),
                    "status": 101,
                    "duration": round(duration, 3),
                    "bytes_in": relay.client.bytes_received,
                    "bytes_out": relay.backend.bytes_received,
                    "messages_in": relay.client.scanner.messages,
                    "messages_out": relay.backend.scanner.messages,
                    "close_code": relay.close_code,
                    "closed_by": side,
                    "reason": relay.close_reason,
                    "client_cert": client_cert,
                }
            },
        )

    def not_ready_reason(self) -> str | None:
        """Why /readyz should say 503, or None when ready."""
        if self.draining:
            return "draining"
        if not self._servers:
            return "not listening"
        if self.config.admin.ready_requires_backends:
            now = asyncio.get_running_loop().time()
            for name, pool in self.pools.items():
                if not any(member.available(now) for member in pool.members):
                    return f"route {name} has no healthy backend"
        return None

    def status(self) -> dict[str, object]:
        """What /status reports: config, routes and backends with health and load."""
        now = asyncio.get_running_loop().time()
        return {
            "version": __version__,
            "config": {"version": self.config_version, "loaded_at": _iso(self.loaded_at)},
            "draining": self.draining,
            "connections": len(self._relays),
            "routes": [
                {
                    "name": name,
                    "backends": [
                        {
                            "backend": member.identity,
                            "healthy": member.healthy,
                            "ejected": now < member.ejected_until,
                            "available": member.available(now),
                            "active_connections": member.active,
                            "weight": member.weight,
                        }
                        for member in pool.members
                    ],
                }
                for name, pool in self.pools.items()
            ],
        }

    # -- bookkeeping used by the protocols ------------------------------------

    def _admit(self, ip: str) -> str | None:
        """Count a new connection from `ip`, or say why it is refused."""
        limits = self.config.limits
        if self.connection_count >= limits.max_connections:
            return "the gateway is at its connection limit"
        if self._per_ip.get(ip, 0) >= limits.max_connections_per_ip:
            return "too many connections from your address"
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return None

    def _release(self, ip: str) -> None:
        left = self._per_ip[ip] - 1
        if left:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]

    def _pool_for(self, host: str, path: str) -> Pool | None:
        route = match_route(self.config.routes, host, path)
        return None if route is None else self.pools[route.name]


class _ClientHandshake(asyncio.Protocol):
    """A client connection until its upgrade is relayed or refused."""

    def __init__(self, gateway: Gateway, listener: Listener) -> None:
        self.gateway = gateway
        self.listener = listener
        self.transport: asyncio.Transport
        self.client_ip = ""
        self.conn_id = next(gateway._ids)
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=gateway.config.limits.max_header_bytes
        )
        self.early = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.admitted = False
        self.lost = False
        self.handed_off = False
        self.pool: Pool | None = None
        self.tls_task: asyncio.Task[None] | None = None
        # For metrics and the access log.
        self.client_address = "unknown"
        self.route_name = ""
        self.backend_tried = ""
        self.key = b""
        self.accepted_at = 0.0
        self.request_at = 0.0
        self.client_cert: str | None = None  # the verified client certificate's subject
        # Raw bytes (the ClientHello) read before start_tls takes the transport over.
        self.tls_early: bytearray | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # TCP_NODELAY needs no call here: uvloop and asyncio set it on every TCP transport.
        self.accepted_at = asyncio.get_running_loop().time()
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "unknown"
        self.client_address = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        tls = self.gateway.tls.get(self.listener.name)
        refusal = self.gateway._admit(self.client_ip)
        if refusal is not None:
            log.warning("conn=%d refused %s: %s", self.conn_id, self.client_ip, refusal)
            self.gateway.metrics.handshake_rejections.labels("limit").inc()
            self._account(503, "rejected", refusal)
            if tls is None:
                self._reply(render_error(503, refusal, [("Retry-After", "1")]))
            else:
                transport.close()  # no HTTP can be spoken before TLS; spend no handshake on it
            return
        self.admitted = True
        self.gateway._connections.add(self)
        if tls is None:
            self._start_request_timer()
            return
        # The ClientHello should wait in the kernel until start_tls takes over reading, but
        # uvloop starts reading right after connection_made whatever it did, so bytes that
        # still arrive first are kept in tls_early and handed to the TLS layer.
        self.tls_early = bytearray()
        self.transport.pause_reading()
        self.tls_task = asyncio.get_running_loop().create_task(self._start_tls(tls))

    async def _start_tls(self, tls: ListenerTls) -> None:
        loop = asyncio.get_running_loop()
        early, self.tls_early = self.tls_early, None
        if early:
            # start_tls installs its protocol before it first waits; this runs after that.
            loop.call_soon(_feed_protocol, self.transport, bytes(early))
        try:
            self.transport = await loop.start_tls(
                self.transport,
                self,
                tls.context,
                server_side=True,
                ssl_handshake_timeout=self.gateway.config.timeouts.handshake,
            )
        except (OSError, TimeoutError, EOFError) as exc:
            # Routine on a public port (scanners, plain HTTP, bad clients): count, don't shout.
            self.gateway.tls_handshake_failures += 1
            self.gateway.metrics.tls_handshake_failures.labels(self.listener.name).inc()
            log.debug("conn=%d %s TLS handshake failed: %r", self.conn_id, self.client_ip, exc)
            self.transport.close()
            self._finish()
            return
        self._start_request_timer()

    def _start_request_timer(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(
            self.gateway.config.timeouts.handshake, self._on_handshake_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self.tls_early is not None:
            # TLS bytes that beat start_tls (uvloop); keep them for the TLS layer.
            self.tls_early += data
            self.transport.pause_reading()
            return
        if self.task is not None:
            # The request is parsed; what follows is the client's first frames.
            self.early += data
            if len(self.early) > self.gateway.config.flow_control.high_water:
                self.transport.pause_reading()
            return
        self.h11.receive_data(data)
        self._next_request_event()

    def eof_received(self) -> bool:
        if self.task is None:
            self.transport.close()
        elif not self.handed_off:
            self.task.cancel()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done() and not self.handed_off:
            self.task.cancel()
        if not self.handed_off:
            self._finish()

    def _finish(self) -> None:
        self.gateway._connections.discard(self)
        if self.admitted:
            self.admitted = False
            self.gateway._release(self.client_ip)

    def _next_request_event(self) -> None:
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            self._reject(HandshakeError(exc.error_status_hint, _h11_reason(exc)))
            return
        if event is h11.NEED_DATA:
            return
        if isinstance(event, h11.Request):
            if self.timer is not None:
                self.timer.cancel()
            self.early += self.h11.trailing_data[0]
            self.request_at = asyncio.get_running_loop().time()
            self.task = asyncio.get_running_loop().create_task(self._proxy(event))
            return
        # ConnectionClosed before a full request: nothing to answer.
        self.transport.close()

    def _on_handshake_timeout(self) -> None:
        if self.task is None:
            log.info("conn=%d %s sent no complete request in time", self.conn_id, self.client_ip)
            self.gateway.metrics.handshake_rejections.labels("timeout").inc()
            self._account(408, "rejected", "request timeout")
            self._reply(render_error(408, "request timeout"))

    def _reply(self, data: bytes) -> None:
        self.transport.write(data)
        self.transport.close()

    def _reject(self, error: HandshakeError) -> None:
        log.info("conn=%d %s rejected: %d %s", self.conn_id, self.client_ip, error.status, error.reason)
        self.gateway.metrics.handshake_rejections.labels(_REJECTION_REASONS.get(error.status, "other")).inc()
        self._account(error.status, "rejected", error.reason)
        self._reply(render_rejection(error))

    def _account(self, status: int, outcome: str, reason: str, backend: str = "") -> None:
        """Count a handshake that ended without a relay, and log its access line."""
        route = self.route_name
        metrics = self.gateway.metrics
        metrics.series(metrics.connections, route, backend, outcome).inc()
        access_log.info(
            "",
            extra={
                "access": {
                    "client": self.client_address,
                    "route": route,
                    "backend": backend,
                    "key_hash": key_hash(self.key) if self.key else "",
                    "status": status,
                    "duration": round(asyncio.get_running_loop().time() - self.accepted_at, 3),
                    "reason": reason,
                    "client_cert": self.client_cert,
                }
            },
        )

    async def _proxy(self, request: h11.Request) -> None:
        try:
            handshake = check_client_request(request)
            pool = self.gateway._pool_for(handshake.host, handshake.path)
            if pool is None:
                raise HandshakeError(404, "no route for this host and path")
            route = pool.route
            self.route_name = route.name
            check_origin(handshake, route.allowed_origins)
            key = affinity_key(handshake, route.hash_key, self.client_ip)
            if key is None:
                key = self.client_ip.encode("ascii") if route.hash_fallback == "ip" else random_key()
            self.key = key
            tls = self.listener.tls
            if tls is not None and tls.client_ca is not None:
                self.client_cert = peer_subject(self.transport.get_extra_info)
            subject = self.client_cert if tls is not None and tls.forward_client_cert else None
            upstream = build_upstream_request(
                handshake,
                client_ip=self.client_ip,
                scheme="https" if tls else "http",
                host=route.upstream_host,
                strip_extensions=route.compression == "strip",
                client_cert_subject=subject,
            )
            await self._connect_backend(pool, key, upstream)
        except HandshakeError as exc:
            self._reject(exc)
        except BackendUnavailable as exc:
            self._account(exc.status, "backend_failed", exc.reason, self.backend_tried)
            self._reply(render_error(exc.status, exc.reason))
        except Exception:
            log.exception("conn=%d unexpected failure in the handshake", self.conn_id)
            self._account(500, "error", "internal error")
            self._reply(render_error(500, "internal error"))

    async def _connect_backend(self, pool: Pool, key: bytes, upstream: h11.Request) -> None:
        """Try the key's backends in order until one answers; relay its answer."""
        loop = asyncio.get_running_loop()
        failure = BackendUnavailable(503, "no backend available")
        metrics = self.gateway.metrics
        for member in pool.candidates(key, loop.time()):
            backend_transport: asyncio.Transport | None = None
            self.backend_tried = member.identity
            attempt_started = loop.time()
            member.pending += 1
            try:
                try:
                    async with asyncio.timeout(self.gateway.config.timeouts.connect):
                        backend_transport, answer = await loop.create_connection(
                            lambda: _BackendHandshake(upstream),
                            member.host,
                            member.port,
                            ssl=member.tls,
                            server_hostname=member.server_name,
                        )
                        outcome = await answer.outcome
                except TimeoutError:
                    raise BackendUnavailable(504, "backend did not answer in time") from None
                except OSError as exc:
                    raise BackendUnavailable(502, "backend unreachable") from exc
                if isinstance(outcome, h11.InformationalResponse):
                    negotiated = check_backend_response(outcome, upstream)
            except BackendUnavailable as exc:
                member.pending -= 1
                if backend_transport is not None:
                    backend_transport.close()
                cause = f" ({exc.__cause__})" if exc.__cause__ else ""
                log.warning(
                    "conn=%d backend %s: %s%s", self.conn_id, member.identity, exc.reason, cause
                )
                if pool.on_failed(member, loop.time(), exc.reason):
                    metrics.backend_ejections.labels(pool.route.name, member.identity).inc()
                failure = exc
                continue
            except BaseException:
                member.pending -= 1
                if backend_transport is not None:
                    backend_transport.close()
                raise
            member.pending -= 1
            pool.on_connected(member)
            metrics.series(metrics.backend_connect_duration, pool.route.name, member.identity).observe(
                loop.time() - attempt_started
            )
            if isinstance(outcome, h11.Response):
                # The backend answered: its refusal is the client's answer, not a failure.
                log.info(
                    "conn=%d backend %s refused the upgrade: %d",
                    self.conn_id, member.identity, outcome.status_code,
                )
                backend_transport.close()
                self._account(outcome.status_code, "backend_refused", "backend refused the upgrade", member.identity)
                self._reply(render_backend_reply(outcome, bytes(answer.body)))
                return
            self.transport.write(render_switching_protocols(negotiated))
            metrics.series(metrics.handshake_duration, pool.route.name).observe(loop.time() - self.request_at)
            metrics.series(metrics.connections, pool.route.name, member.identity, "upgraded").inc()
            self._hand_off(backend_transport, answer, negotiated.deflate, pool, member, key)
            return
        raise failure

    def _hand_off(
        self,
        backend_transport: asyncio.Transport,
        answer: _BackendHandshake,
        deflate: bool,
        pool: Pool,
        member: Member,
        key: bytes,
    ) -> None:
        gateway = self.gateway
        self.handed_off = True
        gateway._connections.discard(self)
        relay = Relay(
            self.transport,
            backend_transport,
            gateway.relay_settings,
            deflate=deflate,
            conn_id=self.conn_id,
            on_closed=self._on_relay_closed,
        )
        relay.key = key
        relay.member = member
        relay.route_name = pool.route.name
        gateway._sweeper.add(relay, asyncio.get_running_loop().time())
        if self.lost or answer.lost:
            # One side left during the hand-off; its protocol already saw the loss.
            if not answer.lost:
                backend_transport.close()
            if not self.lost:
                self.transport.write(bytes(answer.early))
                self.transport.close()
            gateway._relays.discard(relay)
            self.handed_off = False
            self._finish()
            return
        self.pool = pool
        pool.opened(member, relay)
        gateway.metrics.connection_opened(relay.route_name, member.identity)
        relay.start(client_early=bytes(self.early), backend_early=bytes(answer.early))
        current = gateway.pools.get(pool.route.name)
        if current is not pool and (current is None or member not in current.members):
            # A reload removed the backend while this handshake was under way; the
            # connections it had then were handled by _apply, this one is handled here.
            if pool.route.on_backend_removed != "keep":
                gateway._spread_closes([relay], CloseCode.SERVICE_RESTART, "backend removed")

    def _on_relay_closed(self, relay: Relay) -> None:
        gateway = self.gateway
        gateway._relays.discard(relay)
        if self.pool is not None:
            self.pool.closed(relay.member, relay)
            gateway.metrics.connection_closed(relay.route_name, relay.member.identity)
            gateway._relay_finished(relay, self.client_address, self.client_cert)
        if not gateway._relays:
            gateway._all_closed.set()
        self._finish()


def _feed_protocol(transport: asyncio.Transport, data: bytes) -> None:
    """Give `data` to the transport's current protocol as if the transport had read it."""
    protocol = transport.get_protocol()
    try:
        if hasattr(protocol, "buffer_updated"):
            view = memoryview(data)
            while view:
                buffer = protocol.get_buffer(len(view))
                size = min(len(buffer), len(view))
                buffer[:size] = view[:size]
                protocol.buffer_updated(size)
                view = view[size:]
        else:
            cast(asyncio.Protocol, protocol).data_received(data)
    except Exception:
        log.exception("handing early TLS bytes to the TLS layer failed")
        transport.abort()


def _h11_reason(exc: h11.RemoteProtocolError) -> str:
    if exc.error_status_hint == 431:
        return "request header block too large"
    return f"malformed request: {exc}"


class _BackendHandshake(asyncio.Protocol):
    """The backend leg until its answer to the upgrade is complete."""

    def __init__(self, request: h11.Request) -> None:
        self.request = request
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_BACKEND_HEAD_SIZE)
        self.outcome: asyncio.Future[h11.InformationalResponse | h11.Response] = (
            asyncio.get_running_loop().create_future()
        )
        self.response: h11.Response | None = None
        self.body = bytearray()
        self.early = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.h11.send(self.request) + self.h11.send(h11.EndOfMessage()))

    def data_received(self, data: bytes) -> None:
        if self.outcome.done():
            # After the 101 and before the hand-off: the backend's first frames.
            self.early += data
            return
        self.h11.receive_data(data)
        self._next_events()

    def eof_received(self) -> bool:
        if not self.outcome.done():
            if self.response is None:
                self._fail("backend closed the connection before answering")
            else:
                # A body without a length ends at EOF.
                self.h11.receive_data(b"")
                self._next_events()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.outcome.done():
            self._fail("backend closed the connection before answering")

    def _fail(self, reason: str) -> None:
        self.outcome.set_exception(BackendUnavailable(502, reason))
        if self.transport is not None:
            self.transport.close()

    def _next_events(self) -> None:
        try:
            while not self.outcome.done():
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    return
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        self.early += self.h11.trailing_data[0]
                        self.outcome.set_result(event)
                elif isinstance(event, h11.Response):
                    self.response = event
                elif isinstance(event, h11.Data):
                    room = BACKEND_REPLY_BODY_LIMIT - len(self.body)
                    self.body += event.data[:room]
                    if len(event.data) > room:
                        self._reply_complete()
                elif isinstance(event, h11.EndOfMessage):
                    self._reply_complete()
                else:
                    self._fail("backend closed the connection before answering")
        except h11.RemoteProtocolError as exc:
            self._fail(f"backend sent a malformed response: {exc}")

    def _reply_complete(self) -> None:
        assert self.response is not None
        self.outcome.set_result(self.response)
