"""Every Prometheus collector wsgate exports, defined in one place on a registry passed in.

The relay never calls into this module per frame: connections count in plain
integers, and `Metrics.flush_relays` turns the increments since the previous
flush into a few counter updates (at close and from a periodic task).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from . import __version__
from .leg import LegCounts

# Directions of relayed traffic; the label is "client_to_backend" or "backend_to_client".
UPSTREAM = "client_to_backend"
DOWNSTREAM = "backend_to_client"
# What a relay's client leg reads goes upstream; what its backend leg reads, downstream.
_DIRECTIONS = (UPSTREAM, DOWNSTREAM)


class CountedRelay(Protocol):
    """What the metrics need of a relay: its route, and its counts since they were last taken."""

    route_name: str

    def take_counts(self) -> tuple[LegCounts | None, LegCounts | None]: ...

_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_CONNECTION_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
_SIZE_BUCKETS = tuple(float(1 << shift) for shift in range(4, 25, 2))  # 16 B .. 16 MiB


def close_code_label(code: int | None) -> str:
    """A bounded label for a close code: the registered ones as is, private ranges grouped."""
    if code is None:
        return "none"
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"


class BulkHistogram:
    """A histogram with one label that takes many observations of one value at once.

    prometheus-client's Histogram observes one value per call; the relay only
    knows each interval's totals, and a loop per message is what it must avoid.
    """

    def __init__(self, name: str, documentation: str, label: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = (*buckets, float("inf"))
        self._series: dict[str, tuple[list[int], list[float]]] = {}

    def observe_many(self, label_value: str, value: float, count: int) -> None:
        counts, total = self._series.setdefault(label_value, ([0] * len(self.bounds), [0.0]))
        counts[bisect_left(self.bounds, value)] += count
        total[0] += value * count

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for label_value, (counts, total) in self._series.items():
            cumulative, running = [], 0
            for bound, count in zip(self.bounds, counts, strict=True):
                running += count
                cumulative.append((floatToGoString(bound), running))
            family.add_metric([label_value], cumulative, total[0])
        yield family

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])


class Metrics:
    """The collectors, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Backends each route's gauges have series for, and open connections per (route, backend).
        self._pool_series: dict[str, set[str]] = {}
        self._open: dict[tuple[str, str], int] = {}
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        r = registry
        Info("wsgate_build", "Version of this wsgate build.", registry=r).info({"version": __version__})
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

        self.active_connections = Gauge(
            "wsgate_active_connections", "Open proxied WebSocket connections.",
            ["route", "backend"], registry=r,
        )
        self.connections = Counter(
            "wsgate_connections", "Client connections by how their handshake ended.",
            ["route", "outcome"], registry=r,
        )
        self.handshake_rejections = Counter(
            "wsgate_handshake_rejections", "Handshakes answered with an HTTP error, by reason.",
            ["reason"], registry=r,
        )
        self.handshake_duration = Histogram(
            "wsgate_handshake_duration_seconds",
            "From the complete client request to the 101 sent to the client.",
            ["route"], buckets=_DURATION_BUCKETS, registry=r,
        )
        self.backend_connect_duration = Histogram(
            "wsgate_backend_connect_duration_seconds",
            "From starting to connect to a backend to its answer to the upgrade.",
            ["route"], buckets=_DURATION_BUCKETS, registry=r,
        )
        self.connection_duration = Histogram(
            "wsgate_connection_duration_seconds", "Lifetime of proxied connections, from the 101.",
            ["route"], buckets=_CONNECTION_BUCKETS, registry=r,
        )
        self.messages = Counter(
            "wsgate_messages", "WebSocket data messages relayed.", ["route", "direction"], registry=r
        )
        self.frames = Counter(
            "wsgate_frames", "WebSocket frames relayed (data and control).",
            ["route", "direction"], registry=r,
        )
        self.bytes = Counter(
            "wsgate_bytes", "Bytes received for relaying, frame headers included.",
            ["route", "direction"], registry=r,
        )
        self.message_size = BulkHistogram(
            "wsgate_message_size_bytes",
            "Payload sizes of data messages (fragments summed, compressed as relayed); within"
            " one connection's flush interval every message counts at that interval's mean size.",
            "direction", _SIZE_BUCKETS,
        )
        r.register(self.message_size)
        self.close_frames = Counter(
            "wsgate_close_frames",
            "Connections ended, by close code and by who closed (client, backend, gateway).",
            ["code", "side"], registry=r,
        )
        self.heartbeat_rtt = Histogram(
            "wsgate_heartbeat_rtt_seconds", "Round trip of the gateway's pings, by leg.",
            ["side"], buckets=_DURATION_BUCKETS, registry=r,
        )
        self.heartbeat_timeouts = Counter(
            "wsgate_heartbeat_timeouts", "Peers dropped for not answering a ping.", ["side"], registry=r
        )
        self.idle_timeouts = Counter(
            "wsgate_idle_timeouts", "Connections closed for carrying no data.", ["route"], registry=r
        )
        self.limit_closes = Counter(
            "wsgate_limit_closes",
            "Client connections closed with 1008 for going over a per-connection limit, by limit.",
            ["reason"], registry=r,
        )
        self.flow_control_pauses = Counter(
            "wsgate_flow_control_pauses",
            "Times reading one side stopped because the other side's buffer passed high water.",
            ["route", "direction"], registry=r,
        )
        self.ring_imbalance = Gauge(
            "wsgate_ring_imbalance", "Open connections on the busiest backend over the mean.",
            ["route"], registry=r,
        )
        self.backend_up = Gauge(
            "wsgate_backend_up", "1 when the backend takes new connections (healthy, not ejected).",
            ["route", "backend"], registry=r,
        )
        self.backend_ejections = Counter(
            "wsgate_backend_ejections", "Passive ejections after consecutive failures.",
            ["route", "backend"], registry=r,
        )
        self.tls_handshake_failures = Counter(
            "wsgate_tls_handshake_failures", "Client TLS handshakes that failed.", ["listener"], registry=r
        )
        self.proxy_protocol_errors = Counter(
            "wsgate_proxy_protocol_errors",
            "Connections closed, unanswered, over their PROXY protocol header, by reason.",
            ["listener", "reason"], registry=r,
        )
        # The only metrics with a backend label; a backend that leaves takes its series along.
        self._per_backend = (self.active_connections, self.backend_up, self.backend_ejections)
        self.config_reloads = Counter(
            "wsgate_config_reloads", "Configuration reloads by result.", ["result"], registry=r
        )

    def series(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: prometheus-client's lookup costs microseconds."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
            if metric in self._per_backend:
                # Remembered from its first series, so that set_pool can remove it when it leaves.
                self._pool_series.setdefault(labels[0], set()).add(labels[1])
        return child

    def _remove(self, metric: Any, *labels: str) -> None:
        self._children.pop((metric, labels), None)
        try:
            metric.remove(*labels)
        except KeyError:
            pass

    def connection_opened(self, route: str, backend: str) -> None:
        self.series(self.active_connections, route, backend).inc()
        self._open[route, backend] = self._open.get((route, backend), 0) + 1

    def connection_closed(self, route: str, backend: str) -> None:
        self.series(self.active_connections, route, backend).dec()
        left = self._open[route, backend] - 1
        if left:
            self._open[route, backend] = left
        else:
            del self._open[route, backend]

    def flush_relays(self, relays: Iterable[CountedRelay]) -> None:
        """Add what `relays` counted since their previous flush, heartbeat round trips included.

        Each relay hands its counts over (and starts counting afresh). Sums are taken
        in plain integers first, so prometheus-client is called once per series, not
        once per connection: a flush of 100,000 connections stays cheap.
        """
        totals: dict[tuple[Any, str, str], int] = {}
        for relay in relays:
            route = relay.route_name
            for counts, direction in zip(relay.take_counts(), _DIRECTIONS):
                if counts is None:
                    continue
                if counts.rtts:
                    histogram = self.series(self.heartbeat_rtt, counts.side)
                    for rtt in counts.rtts:
                        histogram.observe(rtt)
                for metric, delta in (
                    (self.frames, counts.frames),
                    (self.bytes, counts.size),
                    (self.messages, counts.messages),
                    (self.flow_control_pauses, counts.pauses),
                ):
                    if delta:
                        key = (metric, route, direction)
                        totals[key] = totals.get(key, 0) + delta
                if counts.messages:
                    mean = counts.payload / counts.messages
                    self.message_size.observe_many(direction, mean, counts.messages)
        for (metric, route, direction), delta in totals.items():
            self.series(metric, route, direction).inc(delta)

    def set_pool(self, route: str, members: Iterable[Any], now: float) -> None:
        """Per-backend gauges of one route: open connections, availability, imbalance.

        Backends that left the pool (DNS, reload) lose every series once their connections are gone;
        only these metrics have a backend label, so series grow with routes, not with pod addresses.
        """
        members = list(members)
        current = {member.identity for member in members}
        for identity in self._pool_series.get(route, set()) - current:
            if self._open.get((route, identity), 0) == 0:
                for metric in self._per_backend:
                    self._remove(metric, route, identity)
            else:
                current.add(identity)
        self._pool_series[route] = current
        loads = []
        for member in members:
            self.series(self.active_connections, route, member.identity).set(member.active)
            self.series(self.backend_up, route, member.identity).set(1 if member.available(now) else 0)
            loads.append(member.active)
        mean = sum(loads) / len(loads) if loads else 0
        self.series(self.ring_imbalance, route).set(max(loads) / mean if mean else 0)
