"""The connection books: what the upgrade protocols and the gateway share, and nothing else.

The upgrade protocols (upgrade.py) take from here their connection ids, their
admission under the limits, the settings of the config in force, the pool of
their route, and the sweeper that watches their relays; they hand back each
relay that ends. The gateway (gateway.py) creates the books, swaps settings in
at a reload with `apply`, and reads the open handshakes and relays to stop or
drain them. The books import neither: each side sees only this object.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from json.encoder import encode_basestring_ascii
from typing import NamedTuple, Protocol

from .balancer import Pool
from .member import Member
from .config import Config, Limits, Route
from .errors import HandshakeError
from .forwarding import TrustedProxies
from .metrics import Metrics, close_code_label
from .ratelimit import TokenBuckets
from .relay import BULK_LEGS_PER_TURN, GATEWAY, Relay, RelaySettings, Sweeper, sweep_timing
from .routing import RequestFacts, Router, Shaping
from .tls import ListenerTls
from .turns import Turns

# One JSON line per connection when it ends (runtime.setup_logging installs its handler).
access_log = logging.getLogger("wsgate.access")


# The whole second iso_time formatted last, and its text to the second: all of a second's
# lines share it, and datetime's formatting is most of what a timestamp costs.
_formatted_second: tuple[float, str] = (math.nan, "")


def iso_time(timestamp: float) -> str:
    """ISO 8601 in UTC with its offset, to the millisecond: the same in every JSON log line."""
    global _formatted_second
    # Split as datetime.fromtimestamp splits: microseconds rounded half to even, then carried.
    fraction, second = math.modf(timestamp)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        second, micro = second + 1.0, micro - 1_000_000
    elif micro < 0:
        second, micro = second - 1.0, micro + 1_000_000
    formatted, text = _formatted_second
    if second != formatted:
        text = datetime.fromtimestamp(second, timezone.utc).isoformat(timespec="seconds")[:-6]
        _formatted_second = (second, text)
    return f"{text}.{micro // 1000:03d}+00:00"


# json.dumps's own escaping of a string (ASCII only, as json.dumps writes by default).
_json_string = encode_basestring_ascii


def _json_close(written: tuple[int | None, str] | None) -> str:
    """`json.dumps(_close_entry(written))`."""
    if written is None:
        return "null"
    code, sender = written
    return f'{{"code": {"null" if code is None else "%d" % code}, "by": {_json_string(sender)}}}'


class Access(NamedTuple):
    """One connection's access log fields; `relay` (with its counts) once it was relayed."""

    client: str
    route: str
    backend: str
    key: bytes
    status: int
    duration: float
    reason: str
    client_cert: str | None
    relay: Relay | None = None
    protocol: str = "http/1.1"  # what the client spoke: "http/1.1", or "h2" for a stream of HTTP/2


def access_line(timestamp: float, access: Access) -> str:
    """`json.dumps({"time": iso_time(timestamp), **access_entry(...)})`, without json.dumps.

    json.dumps builds its encoder and walks the dict on every call; the fields and
    their types are known here, so a template takes a third of the time.
    """
    client, route, backend, key, status, duration, reason, client_cert, relay, protocol = access
    relayed = ""
    if relay is not None:
        client_leg, backend_leg = relay.client, relay.backend
        code = relay.close_code
        relayed = (
            f', "bytes_in": {client_leg.bytes_received}, "bytes_out": {backend_leg.bytes_received}'
            f', "messages_in": {client_leg.scanner.messages}, "messages_out": {backend_leg.scanner.messages}'
            f', "close_code": {"null" if code is None else "%d" % code}'
            f', "closed_by": {_json_string(relay.closed_by or GATEWAY)}'
            f', "close_to_client": {_json_close(client_leg.close_written)}'
            f', "close_to_backend": {_json_close(backend_leg.close_written)}'
        )
    return (
        f'{{"time": "{iso_time(timestamp)}", "client": {_json_string(client)}'
        f', "route": {_json_string(route)}, "backend": {_json_string(backend)}'
        f', "key_hash": "{key_hash(key) if key else ""}", "status": {status:d}'
        f', "duration": {round(duration, 3)!r}{relayed}, "reason": {_json_string(reason)}'
        f', "client_cert": {"null" if client_cert is None else _json_string(client_cert)}'
        f', "protocol": {_json_string(protocol)}}}'
    )


def access_entry(access: Access) -> dict[str, object]:
    """The access log's fields for one connection, relayed (with its counts) or not."""
    client, route, backend, key, status, duration, reason, client_cert, relay, protocol = access
    entry: dict[str, object] = {
        "client": client,
        "route": route,
        "backend": backend,
        "key_hash": key_hash(key) if key else "",
        "status": status,
        "duration": round(duration, 3),
    }
    if relay is not None:
        entry.update(
            bytes_in=relay.client.bytes_received,
            bytes_out=relay.backend.bytes_received,
            messages_in=relay.client.scanner.messages,
            messages_out=relay.backend.scanner.messages,
            close_code=relay.close_code,
            closed_by=relay.closed_by or GATEWAY,
            close_to_client=_close_entry(relay.client.close_written),
            close_to_backend=_close_entry(relay.backend.close_written),
        )
    entry["reason"] = reason
    entry["client_cert"] = client_cert
    entry["protocol"] = protocol
    return entry


def spread_delays(count: int, period: float) -> list[float]:
    """When each of `count` closes happens, in order, within `period` seconds.

    One slot per connection and a random moment within each: clients do not all
    reconnect at the same instant, and the last close lands within the period.
    """
    slot = period / max(1, count)
    return [min(period, i * slot + random.uniform(0, slot)) for i in range(count)]


class AccessLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes access entries as JSON lines, `{"time": ..., **entry}`.

    A `LogRecord` costs a tenth of a handshake's CPU (the caller's frame, the
    thread, the process, the file name), none of which an access line shows. While
    this is the access logger's only handler and nothing filters, `log_access` hands
    it the line itself; anything else (a test's caplog, another handler) gets records.
    """

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": iso_time(record.created), **getattr(record, "access", {})})

    def write_line(self, line: str) -> None:
        """Write one formatted line, as `emit` would write a record's."""
        with self.lock:  # type: ignore[union-attr]
            stream = self.stream
            stream.write(line + self.terminator)
            stream.flush()


def _direct_access_handler() -> AccessLineHandler | None:
    """The handler to give access lines to directly, when logging's config allows it."""
    handlers = access_log.handlers
    if len(handlers) != 1 or access_log.filters or access_log.propagate:
        return None
    handler = handlers[0]
    if type(handler) is not AccessLineHandler or handler.filters or handler.level > logging.INFO:
        return None
    return handler

# Handshake steps (reading a request head, starting a backend connect) taken in one turn
# of the event loop at most. A burst of thousands of upgrades is then spread over many
# turns with the relays served between them, instead of holding the loop for seconds.
HANDSHAKE_STEPS_PER_TURN = 32


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


class OpenHandshake(Protocol):
    """A connection still in its handshake, as the books keep it: something to close."""

    @property
    def transport(self) -> asyncio.BaseTransport: ...


class OpenSession(Protocol):
    """A client's HTTP/2 connection, as the books keep it: something to drain."""

    def go_away(self) -> None: ...


def relay_settings(config: Config, route: Route | None = None) -> RelaySettings:
    """The relays' settings: the global ones, or with `route`'s overrides applied."""
    frame_rate = config.limits.max_frames_per_second
    if route is None:
        timeouts, heartbeat = config.timeouts, config.heartbeat
        max_message_size, flow = config.limits.max_message_size, config.flow_control
    else:
        timeouts, heartbeat, max_message_size, flow = config.route_settings(route)
    return RelaySettings(
        high_water=flow.high_water,
        low_water=flow.low_water,
        max_message_size=max_message_size,
        close_timeout=timeouts.close,
        heartbeat_interval=heartbeat.interval,
        heartbeat_timeout=heartbeat.timeout,
        idle_timeout=timeouts.idle,
        frame_rate=frame_rate.rate if frame_rate else 0.0,
        frame_burst=frame_rate.burst_size if frame_rate else 0,
    )


def route_relay_settings(config: Config, default: RelaySettings) -> dict[str, RelaySettings]:
    """Each route's relay settings, computed once per config; `default` where a route overrides none."""
    settings = {}
    for route in config.routes:
        own = relay_settings(config, route)
        settings[route.name] = default if own == default else own
    return settings


def sweep_timing_for(settings: list[RelaySettings]) -> tuple[float, float]:
    """One sweeper for every route: the finest tick and the shortest recheck any route needs."""
    timings = [sweep_timing(each) for each in settings]
    return min(tick for tick, _ in timings), min(recheck for _, recheck in timings)


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


def _proxy_senders(config: Config) -> dict[str, TrustedProxies]:
    """The peers each listener takes a PROXY header from, by listener name, where it names them."""
    return {
        listener.name: TrustedProxies(listener.proxy_protocol_from)
        for listener in config.listeners
        if listener.proxy_protocol_from is not None
    }


class Books:
    """Ids, admission, settings, pools and the open handshakes and relays of one gateway."""

    def __init__(
        self, config: Config, tls: dict[str, ListenerTls], pools: dict[str, Pool], metrics: Metrics
    ) -> None:
        self.metrics = metrics
        self.config = config
        self.tls = tls
        self.pools = pools
        self._route_rules(config)
        self.trusted_proxies = TrustedProxies(config.trusted_proxies)
        self.proxy_senders = _proxy_senders(config)
        self.sweeper = Sweeper(*sweep_timing_for([self.relay_settings, *self.route_settings.values()]))
        self.handshake_turns = Turns(HANDSHAKE_STEPS_PER_TURN)
        self.bulk_turns = Turns(BULK_LEGS_PER_TURN)
        self.handshakes: set[OpenHandshake] = set()
        # The clients' HTTP/2 connections (http2.py), each with its streams; drained by GOAWAY.
        self.sessions: set[OpenSession] = set()
        # The sweeper's own set: leaving it is how a relay leaves the sweeper.
        self.relays = self.sweeper.relays
        self.all_closed = asyncio.Event()  # set whenever the last open relay ends
        # Client TLS handshakes that failed (scanners, plain HTTP on a TLS port, timeouts).
        self.tls_handshake_failures = 0
        # Admitted connections: all of them, and by client address (an entry per address
        # with at least one, so the table is no larger than the connections).
        self.open_count = 0
        self.open_per_ip: dict[str, int] = {}
        self._new_connections = _new_connection_buckets(config.limits)
        self._ids = itertools.count(1)

    def apply(self, config: Config, tls: dict[str, ListenerTls], pools: dict[str, Pool]) -> None:
        """Swap in a reloaded config: new connections follow it, open ones keep their settings."""
        old_limits = self.config.limits
        self.config, self.tls, self.pools = config, tls, pools
        self._route_rules(config)
        self.trusted_proxies = TrustedProxies(config.trusted_proxies)
        self.proxy_senders = _proxy_senders(config)
        if config.limits.new_connections_per_ip != old_limits.new_connections_per_ip:
            self._new_connections = _new_connection_buckets(config.limits)  # every bucket full
        # Open relays keep the settings they started with, so the old routes' timings still count.
        timings = {id(r.settings): r.settings for r in self.relays}
        timings.update((id(each), each) for each in (self.relay_settings, *self.route_settings.values()))
        self.sweeper.retime(*sweep_timing_for(list(timings.values())), asyncio.get_running_loop().time())

    def _route_rules(self, config: Config) -> None:
        """What each route needs on every handshake, computed once per config."""
        self.relay_settings = relay_settings(config)
        self.route_settings = route_relay_settings(config, self.relay_settings)
        self.connect_timeouts = {
            route.name: config.route_settings(route).timeouts.connect for route in config.routes
        }
        self.router: Router[Route] = Router(config.routes)

    def next_id(self) -> int:
        return next(self._ids)

    @property
    def tracked_addresses(self) -> int:
        """How many addresses the new-connection rate limit keeps a bucket for."""
        return 0 if self._new_connections is None else len(self._new_connections)

    # -- admission -----------------------------------------------------------

    def admit(self) -> Refusal | None:
        """Count a new connection, or say why the gateway-wide cap refuses it."""
        if self.open_count >= self.config.limits.max_connections:
            return _AT_CAPACITY
        self.open_count += 1
        return None

    def admit_address(self, ip: str) -> Refusal | None:
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
        count = self.open_per_ip.get(ip, 0)
        if limits.max_connections_per_ip is not None and count >= limits.max_connections_per_ip:
            return _IP_AT_CAPACITY
        self.open_per_ip[ip] = count + 1
        return None

    def release(self, ip: str | None) -> None:
        """Give back an admitted connection; `ip` is the address it was counted under, if any."""
        self.open_count -= 1
        if ip is None:
            return
        left = self.open_per_ip[ip] - 1
        if left:
            self.open_per_ip[ip] = left
        else:
            del self.open_per_ip[ip]

    # -- routes and relays ---------------------------------------------------

    def pool_for(self, host: str, path: str, request: RequestFacts) -> Pool | None:
        route = self.router.route_for(host, path, request)
        return None if route is None else self.pools[route.name]

    def shaping(self, route_name: str) -> Shaping:
        return self.router.shaping[route_name]

    def backend_removed(self, pool: Pool, member: Member) -> bool:
        """Whether a reload removed `member` from its route since `pool` was chosen."""
        current = self.pools.get(pool.route.name)
        return current is not pool and (current is None or member not in current.members)

    def relay_opened(self, relay: Relay, pool: Pool, member: Member) -> None:
        """Watch a relay that is about to start, and count it on its backend."""
        self.sweeper.add(relay, asyncio.get_running_loop().time())
        pool.opened(member, relay)
        self.metrics.connection_opened(relay.route_name, member.identity)

    def relay_closed(
        self,
        pool: Pool,
        client: str,
        client_cert: str | None,
        counted_ip: str | None,
        relay: Relay,
        protocol: str = "http/1.1",
    ) -> None:
        """A relay's `on_closed`: its final counts and access log line, and its admission back."""
        self.relays.discard(relay)
        member = relay.member
        pool.closed(member, relay)
        self.metrics.connection_closed(relay.route_name, member.identity)
        self._relay_finished(relay, member, client, client_cert, protocol)
        if not self.relays:
            self.all_closed.set()
        self.release(counted_ip)

    def spread_closes(self, relays: list[Relay], code: int, reason: str) -> list[asyncio.Handle]:
        """Close `relays` spread evenly, with jitter, over `shutdown.drain_period`.

        The handles only cancel: uvloop runs a delay under a millisecond as `call_soon`.
        """
        loop = asyncio.get_running_loop()
        relays = list(relays)
        random.shuffle(relays)
        delays = spread_delays(len(relays), self.config.shutdown.drain_period)
        return [
            loop.call_later(delay, relay.close, code, reason)
            for relay, delay in zip(relays, delays, strict=True)
        ]

    # -- what a finished connection leaves behind ----------------------------

    def _relay_finished(
        self, relay: Relay, member: Member, client: str, client_cert: str | None, protocol: str
    ) -> None:
        """Final counts and the access log line of a connection that ended."""
        metrics = self.metrics
        metrics.flush_relays((relay,))
        duration = time.perf_counter() - relay.started_at
        side = relay.closed_by or GATEWAY
        metrics.close_frames.inc(close_code_label(relay.close_code), side)
        metrics.connection_duration.observe(relay.route_name, duration)
        if relay.dead_side:
            metrics.heartbeat_timeouts.inc(relay.dead_side)
        elif relay.close_reason == "idle timeout":
            metrics.idle_timeouts.inc(relay.route_name)
        if relay.limit_exceeded:
            metrics.limit_closes.inc(relay.limit_exceeded)
        self.log_access(
            client, relay.route_name, member.identity, relay.key, 101, duration, relay.close_reason,
            client_cert, relay, protocol,
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
        relay: Relay | None = None,
        protocol: str = "http/1.1",
    ) -> None:
        """The access log's line for one connection, relayed (with its counts) or not."""
        if not access_log.isEnabledFor(logging.INFO):
            return
        access = Access(client, route, backend, key, status, duration, reason, client_cert, relay, protocol)
        handler = _direct_access_handler()
        if handler is not None:
            try:
                handler.write_line(access_line(time.time(), access))
                return
            except Exception:
                pass  # the record below reports the failure logging's way
        access_log.info("", extra={"access": access_entry(access)})
