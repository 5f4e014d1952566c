"""The gateway of one config: listeners, lifecycle (start, drain, close), hot reload,
metrics flushes, the access log and /status.

Connections are served by the handshake protocols of `server`, which hand each
upgraded connection to a `Relay`; the gateway keeps the books: connections per
address, open relays, pools, and what the admin server reports.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry

from . import __version__
from .balancer import Member, Pool
from .config import Config, Limits, Listener, Log, format_host_port, keep_restart_settings, load_config
from .errors import ConfigError, HandshakeError, ListenError
from .forwarding import TrustedProxies
from .frames import CloseCode
from .metrics import Metrics, close_code_label
from .ratelimit import TokenBuckets
from .relay import BULK_LEGS_PER_TURN, GATEWAY, Relay, RelaySettings, Sweeper, sweep_timing
from .routing import match_route
from .upgrade import HANDSHAKE_STEPS_PER_TURN, ClientHandshake
from .tls import ListenerTls, listener_contexts
from .turns import Turns

log = logging.getLogger("wsgate.gateway")

# The Close reason of a shutdown, drained or immediate: what docs/relay.md promises.
SHUTDOWN_REASON = "going away"

# One JSON line per connection when it ends (see cli for the handler).
access_log = logging.getLogger("wsgate.access")

# Metrics lag the connections' own counters by at most this long.
METRICS_FLUSH_INTERVAL = 5.0

# The accept queue asked of the kernel, which caps it at net.core.somaxconn: a burst of
# connections waits there until accepted, where a full queue drops SYNs that are then
# retried only a second or more later.
LISTEN_BACKLOG = 65535


def _pools(config: Config) -> dict[str, Pool]:
    """A fresh pool per route (a bad backend CA file raises `ConfigError`)."""
    return {
        route.name: Pool(route, config.discovery, path=f"routes[{i}]")
        for i, route in enumerate(config.routes)
    }


def config_digest(config: Config) -> str:
    """A short digest of the effective config, for /status and the reload log."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]


def _relay_settings(config: Config) -> RelaySettings:
    frame_rate = config.limits.max_frames_per_second
    return RelaySettings(
        high_water=config.flow_control.high_water,
        low_water=config.flow_control.low_water,
        max_message_size=config.limits.max_message_size,
        close_timeout=config.timeouts.close,
        heartbeat_interval=config.heartbeat.interval,
        heartbeat_timeout=config.heartbeat.timeout,
        idle_timeout=config.timeouts.idle,
        frame_rate=frame_rate.rate if frame_rate else 0.0,
        frame_burst=frame_rate.burst_size if frame_rate else 0,
    )


def key_hash(key: bytes) -> str:
    """A short stable digest of an affinity key: logs can group by it without holding it."""
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def _close_entry(written: tuple[int | None, str] | None) -> dict[str, object] | None:
    """The access log's record of the Close frame sent to one side; None when it got none."""
    if written is None:
        return None
    code, sender = written
    return {"code": code, "by": sender}


def _new_connection_buckets(limits: Limits) -> TokenBuckets | None:
    setting = limits.new_connections_per_ip
    if setting is None:
        return None
    return TokenBuckets(setting.rate, setting.burst, setting.max_addresses)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A connection the limits turn away: its answer, and its `handshake_rejections` reason."""

    label: str
    error: HandshakeError


_AT_CAPACITY = Refusal(
    "limit", HandshakeError(503, "the gateway is at its connection limit", [("Retry-After", "1")])
)
_IP_AT_CAPACITY = Refusal(
    "ip_limit", HandshakeError(429, "too many connections from your address", [("Retry-After", "1")])
)


def iso_timestamp(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


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
        self.config_version = config_digest(config)
        self.config_path: str | None = None  # where reload() reads the config from
        # Set by whoever set up the process's logging from `log`, so that a reload changes it too.
        self.apply_log: Callable[[Log], None] | None = None
        # The key paths whose values in the file wait for a restart, as of the last reload.
        self.restart_needed: list[str] = []
        self._reload_lock = asyncio.Lock()
        # Listening sockets handed over by a supervisor, by listener name (workers > 1).
        self.inherited: dict[str, socket.socket] = {}
        self.relay_settings = _relay_settings(config)
        self._sweeper = Sweeper(*sweep_timing(self.relay_settings))
        self.handshake_turns = Turns(HANDSHAKE_STEPS_PER_TURN)
        self.bulk_turns = Turns(BULK_LEGS_PER_TURN)
        self._servers: dict[str, asyncio.Server] = {}
        self._connections: set[ClientHandshake] = set()
        self._relays = self._sweeper.relays
        self._all_closed = asyncio.Event()
        self.trusted_proxies = TrustedProxies(config.trusted_proxies)
        self.proxy_senders = _proxy_senders(config)
        # Admitted connections: all of them, and by client address (an entry per address
        # with at least one, so the table is no larger than the connections).
        self._open_count = 0
        self._per_ip: dict[str, int] = {}
        self._new_connections = _new_connection_buckets(config.limits)
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
        return self._open_count

    @property
    def tracked_addresses(self) -> int:
        """How many addresses the new-connection rate limit keeps a bucket for."""
        return 0 if self._new_connections is None else len(self._new_connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper.start()
        try:
            for pool in self.pools.values():
                await pool.start()
            # Every listener is bound before any accepts or is logged: a port in use
            # fails the start with one error naming its key, and nothing half-started.
            bound = await self._bind_unserved(list(enumerate(self.config.listeners)))
            for listener in self.config.listeners:
                await self._listen(listener, bound[listener.name])
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
            "listening on %s (%s%s)",
            format_host_port(*server.sockets[0].getsockname()[:2]),
            listener.name,
            ", TLS" if listener.tls else "",
        )

    async def _bind(self, listener: Listener, start_serving: bool = True) -> asyncio.Server:
        name = listener.name

        def protocol() -> ClientHandshake:
            # The listener's current config, so a reload that changes only its TLS
            # settings applies to new connections without rebinding.
            return ClientHandshake(self, self._listener_config(name))

        loop = asyncio.get_running_loop()
        inherited = self.inherited.get(name)
        if inherited is not None:
            return await loop.create_server(
                protocol, sock=inherited, backlog=LISTEN_BACKLOG, start_serving=start_serving
            )
        return await loop.create_server(
            protocol,
            listener.host,
            listener.port,
            reuse_address=True,
            backlog=LISTEN_BACKLOG,
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
            relay.close(CloseCode.GOING_AWAY, SHUTDOWN_REASON)
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
        handles = self._spread_closes(list(self._relays), CloseCode.GOING_AWAY, SHUTDOWN_REASON)
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
            config, kept = keep_restart_settings(
                self.config, load_config(self.config_path), supervised=bool(self.inherited)
            )
            tls = listener_contexts(config)
            pools = _pools(config)
            # New and moved listeners are bound (not yet accepting) before anything
            # changes: an address in use refuses the reload instead of losing a listener.
            bound = await self._bind_listeners(config)
        except ConfigError as exc:
            self._count_reload("failure")
            log.error("reload refused; keeping the running config and the old certificates: %s", exc)
            return str(exc)
        await self._apply(config, tls, pools, bound)
        self.restart_needed = kept
        self._count_reload("success")
        for name in tls:
            log.info("listener %s: certificates loaded", name)
        log.info("reloaded %s (config version %s)", self.config_path, self.config_version)
        if kept:
            log.warning("ignored until a restart: %s", ", ".join(kept))
        return None

    def _count_reload(self, result: str) -> None:
        # A worker's reloads are its supervisor's, which counts each once for all workers.
        if not self.inherited:
            self.metrics.config_reloads.labels(result).inc()

    async def _bind_unserved(self, listeners: list[tuple[int, Listener]]) -> dict[str, asyncio.Server]:
        """Bind each (index in the config, listener), not accepting yet: all of them, or none
        and a `ListenError` naming the first that failed."""
        bound: dict[str, asyncio.Server] = {}
        try:
            for i, listener in listeners:
                try:
                    bound[listener.name] = await self._bind(listener, start_serving=False)
                except OSError as exc:
                    raise ListenError.from_os_error(f"listeners[{i}].bind", listener.bind, exc) from exc
        except BaseException:
            for server in bound.values():
                server.close()
            raise
        return bound

    async def _bind_listeners(self, config: Config) -> dict[str, asyncio.Server]:
        """Bind the listeners of `config` that are new or moved, without accepting yet."""
        if self.inherited:
            return {}  # a supervisor owns the sockets; see _apply_listeners
        current = {listener.name: listener.bind for listener in self.config.listeners}
        changed = [
            (i, listener)
            for i, listener in enumerate(config.listeners)
            if current.get(listener.name) != listener.bind
        ]
        try:
            return await self._bind_unserved(changed)
        except ListenError as exc:
            # For a reload, a port in use is a reason to refuse the file.
            message = f"cannot listen on {exc.address}: {exc.reason}"
            raise ConfigError(exc.path, message, self.config_path) from exc

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
        if config.log != old_config.log and self.apply_log is not None:
            self.apply_log(config.log)  # first, so that what the reload logs follows it
        self.config, self.tls, self.pools = config, tls, pools
        self.relay_settings = _relay_settings(config)
        self.trusted_proxies = TrustedProxies(config.trusted_proxies)
        self.proxy_senders = _proxy_senders(config)
        if config.limits.new_connections_per_ip != old_config.limits.new_connections_per_ip:
            self._new_connections = _new_connection_buckets(config.limits)  # every bucket full
        self._sweeper.retime(*sweep_timing(self.relay_settings), asyncio.get_running_loop().time())
        self.loaded_at = time.time()
        self.config_version = config_digest(config)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._start_watching()  # at the new watch_interval, over the new certificates
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
        if self.inherited:
            # A supervisor owns the sockets (workers > 1): keep_restart_settings kept them.
            return
        before = {listener.name: listener for listener in old.listeners}
        after = {listener.name: listener for listener in new.listeners}
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
        metrics.flush_relays(self._relays)
        now = asyncio.get_running_loop().time()
        for name, pool in self.pools.items():
            metrics.set_pool(name, pool.members, now)

    def _relay_finished(self, relay: Relay, client: str, client_cert: str | None) -> None:
        """Final counts and the access log line of a connection that ended."""
        metrics = self.metrics
        metrics.flush_relays((relay,))
        duration = time.perf_counter() - relay.started_at
        side = relay.closed_by or GATEWAY
        metrics.series(metrics.close_frames, close_code_label(relay.close_code), side).inc()
        metrics.series(metrics.connection_duration, relay.route_name).observe(duration)
        if relay.dead_side:
            metrics.heartbeat_timeouts.labels(relay.dead_side).inc()
        elif relay.close_reason == "idle timeout":
            metrics.idle_timeouts.labels(relay.route_name).inc()
        if relay.limit_exceeded:
            metrics.series(metrics.limit_closes, relay.limit_exceeded).inc()
        member = relay.member
        assert isinstance(member, Member)
        self.log_access(
            client, relay.route_name, member.identity, relay.key, 101, duration, relay.close_reason,
            client_cert,
            bytes_in=relay.client.bytes_received,
            bytes_out=relay.backend.bytes_received,
            messages_in=relay.client.scanner.messages,
            messages_out=relay.backend.scanner.messages,
            close_code=relay.close_code,
            closed_by=side,
            close_to_client=_close_entry(relay.client.close_written),
            close_to_backend=_close_entry(relay.backend.close_written),
        )

    def log_access(
        self,
        client: str,
        route: str,
        backend: str,
        key: bytes,
        status: int,
        duration: float,
        reason: str,
        client_cert: str | None,
        **relayed: object,
    ) -> None:
        """The access log's line for one connection, relayed (with its counts) or not."""
        access_log.info(
            "",
            extra={
                "access": {
                    "client": client,
                    "route": route,
                    "backend": backend,
                    "key_hash": key_hash(key) if key else "",
                    "status": status,
                    "duration": round(duration, 3),
                    **relayed,
                    "reason": reason,
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
            "config": {
                "version": self.config_version,
                "loaded_at": iso_timestamp(self.loaded_at),
                "restart_needed": self.restart_needed,
            },
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

    def _admit(self) -> Refusal | None:
        """Count a new connection, or say why the gateway-wide cap refuses it."""
        if self._open_count >= self.config.limits.max_connections:
            return _AT_CAPACITY
        self._open_count += 1
        return None

    def _admit_address(self, ip: str) -> Refusal | None:
        """Count an admitted connection under its client address, or say why that address
        is refused: over its rate of new connections, or at its cap of open ones."""
        limits = self.config.limits
        if self._new_connections is not None:
            wait = self._new_connections.take(ip, time.monotonic())
            if wait:
                retry_after = str(max(1, math.ceil(wait)))
                error = HandshakeError(
                    429, "too many new connections from your address", [("Retry-After", retry_after)]
                )
                return Refusal("rate_limit", error)
        count = self._per_ip.get(ip, 0)
        if limits.max_connections_per_ip is not None and count >= limits.max_connections_per_ip:
            return _IP_AT_CAPACITY
        self._per_ip[ip] = count + 1
        return None

    def _release(self, ip: str | None) -> None:
        """Give back an admitted connection; `ip` is the address it was counted under, if any."""
        self._open_count -= 1
        if ip is None:
            return
        left = self._per_ip[ip] - 1
        if left:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]

    def _pool_for(self, host: str, path: str) -> Pool | None:
        route = match_route(self.config.routes, host, path)
        return None if route is None else self.pools[route.name]


def _proxy_senders(config: Config) -> dict[str, TrustedProxies]:
    """The peers each listener takes a PROXY header from, by listener name, where it names them."""
    return {
        listener.name: TrustedProxies(listener.proxy_protocol_from)
        for listener in config.listeners
        if listener.proxy_protocol_from is not None
    }
