"""The gateway of one config: listeners, lifecycle (start, drain, close), hot reload,
metrics flushes and /status.

Connections are served by the upgrade protocols of `upgrade`, which hand each
upgraded connection to a `Relay`. What they share with the gateway (admission,
settings, pools, the open handshakes and relays) is its `Books` (books.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry

from . import __version__
from .balancer import Pool
from .books import Books
from .closing import Cause, gateway_close
from .config import Config, Listener, Log, format_host_port, keep_restart_settings, load_config
from .errors import ConfigError, ListenError
from .metrics import Metrics
from .relay import Relay
from .tls import ListenerTls, listener_contexts
from .upgrade import UpgradeProtocol

log = logging.getLogger("wsgate.gateway")


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


def iso_timestamp(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


class Gateway:
    """Serves every listener of one config; `start` binds, `close` stops."""

    def __init__(self, config: Config) -> None:
        # Certificates and CA files load here, so a bad one stops start-up with its key path.
        tls = listener_contexts(config)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.books = Books(config, tls, _pools(config), self.metrics)
        self._watch: asyncio.Task[None] | None = None
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
        self._servers: dict[str, asyncio.Server] = {}

    # The books own these; the gateway's readers (admin, workers, cli) find them here.
    @property
    def config(self) -> Config:
        return self.books.config

    @property
    def tls(self) -> dict[str, ListenerTls]:
        return self.books.tls

    @property
    def pools(self) -> dict[str, Pool]:
        return self.books.pools

    @property
    def tls_handshake_failures(self) -> int:
        return self.books.tls_handshake_failures

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
        return self.books.open_count

    @property
    def tracked_addresses(self) -> int:
        """How many addresses the new-connection rate limit keeps a bucket for."""
        return self.books.tracked_addresses

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.books.sweeper.start()
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

        def protocol() -> UpgradeProtocol:
            # The listener's current config, so a reload that changes only its TLS
            # settings applies to new connections without rebinding.
            return UpgradeProtocol(self.books, self._listener_config(name))

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
        self._stop_accepting()
        for relay in list(self.books.relays):
            relay.close(*gateway_close(Cause.SHUTDOWN))
        if not await self._relays_ended(self.config.timeouts.close):
            self._abort_relays()
        self.books.sweeper.stop()
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
        self._stop_accepting()
        relays = self.books.relays
        log.info("draining %d connections over %.1fs", len(relays), shutdown.drain_period)
        handles = self.books.spread_closes(list(relays), *gateway_close(Cause.SHUTDOWN))
        if not await self._relays_ended(max(0.0, shutdown.grace_period - (loop.time() - started))):
            log.warning("grace period over: dropping %d connections", len(relays))
            self._abort_relays()
        for handle in handles:
            handle.cancel()
        await self.close()

    def _stop_accepting(self) -> None:
        """Close the listeners and every connection still in its handshake."""
        for server in self._servers.values():
            server.close()
        for handshake in list(self.books.handshakes):
            handshake.transport.close()
        for session in list(self.books.sessions):
            session.go_away()

    async def _relays_ended(self, timeout: float) -> bool:
        """Wait up to `timeout` for the last open relay to end; whether none is left."""
        books = self.books
        if not books.relays:
            return True
        books.all_closed.clear()
        try:
            async with asyncio.timeout(timeout):
                await books.all_closed.wait()
        except TimeoutError:
            return False
        return True

    def _abort_relays(self) -> None:
        for relay in list(self.books.relays):
            relay.abort()

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
        books = self.books
        old_config, old_pools = books.config, books.pools
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
        books.apply(config, tls, pools)
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
            books.spread_closes(closing, *gateway_close(Cause.BACKEND_REMOVED))
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
        metrics.flush_relays(self.books.relays)
        now = asyncio.get_running_loop().time()
        for name, pool in self.pools.items():
            metrics.set_pool(name, pool.members, now)

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
            "connections": len(self.books.relays),
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
