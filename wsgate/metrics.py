"""Every Prometheus collector wsgate exports, defined in one place on a registry passed in.

The relay never calls into this module per frame: connections count in plain
integers, and `Metrics.flush_relays` turns the increments since the previous
flush into a few counter updates (at close and from a periodic task).

What a handshake or a connection's end counts goes into plain dicts and lists
(`PlainCounter`, `PlainHistogram`, `OpenConnections`), which the registry reads
when it is collected: prometheus-client's own `inc` and `observe` take a lock and
check their state, several Python calls each, and a handshake counts eight events.
They export the same series, names, labels and values as prometheus-client's
`Counter`, `Histogram` and `Gauge` would, `_created` included.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, Sample
from prometheus_client.utils import floatToGoString

from . import __version__
from .leg import LegCounts

# Directions of relayed traffic; the label is "client_to_backend" or "backend_to_client".
UPSTREAM = "client_to_backend"
DOWNSTREAM = "backend_to_client"
# What a relay's client leg reads goes upstream; what its backend leg reads, downstream.
_DIRECTIONS = (UPSTREAM, DOWNSTREAM)

# prometheus-client's switch for the `_created` series, read as prometheus-client reads it.
CREATED_SERIES = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true", "1", "t"
)


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


class PlainCounter:
    """A labelled counter kept in a dict, exported as prometheus-client's `Counter` exports it.

    A series appears at its first count, with that moment as its `_created`.
    """

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self._values: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, *labels: str) -> None:
        """Count one event in the series `labels` (one value per label name)."""
        values = self._values
        if labels in values:
            values[labels] += 1
        else:
            self._start(labels, 1)

    def add(self, labels: tuple[str, ...], amount: float) -> None:
        """Count `amount` (not negative) in the series `labels`."""
        assert amount >= 0, amount
        values = self._values
        if labels in values:
            values[labels] += amount
        else:
            self._start(labels, amount)

    def _start(self, labels: tuple[str, ...], amount: float) -> None:
        assert len(labels) == len(self.labels) and all(type(v) is str for v in labels), labels
        self._created[labels] = time.time()
        self._values[labels] = amount

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        created = self._created
        for labels, value in list(self._values.items()):
            family.add_metric(labels, float(value), created[labels] if CREATED_SERIES else None)
        yield family

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labels)


class PlainHistogram:
    """A histogram with one label, kept in plain lists, exported as prometheus-client's
    `Histogram` exports it (`with_created=False` leaves out its `_created` series).

    `observe_many` takes many observations of one value at once: the relay only knows
    each interval's totals, and a loop per message is what it must avoid.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
        with_created: bool = True,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = (*(float(bound) for bound in buckets), float("inf"))
        self._bound_texts = [floatToGoString(bound) for bound in self.bounds]
        self._with_created = with_created and CREATED_SERIES
        # Per label value: the count of each bucket (not cumulative), then the sum.
        self._series: dict[str, list[float]] = {}
        self._created: dict[str, float] = {}
        registry.register(self)

    def observe(self, label_value: str, value: float) -> None:
        series = self._series.get(label_value)
        if series is None:
            series = self._start(label_value)
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def observe_many(self, label_value: str, value: float, count: int) -> None:
        series = self._series.get(label_value)
        if series is None:
            series = self._start(label_value)
        series[bisect_left(self.bounds, value)] += count
        series[-1] += value * count

    def _start(self, label_value: str) -> list[float]:
        assert type(label_value) is str, label_value
        self._created[label_value] = time.time()
        series = self._series[label_value] = [0.0] * (len(self.bounds) + 1)
        return series

    def collect(self) -> Iterable[Metric]:
        family = Metric(self.name, self.documentation, "histogram")
        samples = family.samples
        bucket, label = self.name + "_bucket", self.label
        for label_value, series in list(self._series.items()):
            labels = {label: label_value}
            running = 0.0
            for bound_text, count in zip(self._bound_texts, series[:-1], strict=True):
                running += count
                samples.append(Sample(bucket, {label: label_value, "le": bound_text}, running))
            samples.append(Sample(self.name + "_count", labels, running))
            samples.append(Sample(self.name + "_sum", labels, series[-1]))
            if self._with_created:
                samples.append(Sample(self.name + "_created", labels, self._created[label_value]))
        yield family

    def describe(self) -> Iterable[Metric]:
        yield Metric(self.name, self.documentation, "histogram")


class OpenConnections:
    """The open connections per route and backend, kept in a dict, exported as a `Gauge`.

    A (route, backend) series exists from its first connection or from `track` on;
    it reads 0 while none is open, until `remove`.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        # Connections open by (route, backend); an entry only while at least one is.
        self.open: dict[tuple[str, str], int] = {}
        self.tracked: dict[tuple[str, str], None] = {}  # the exported series, in order
        registry.register(self)

    def track(self, route: str, backend: str) -> None:
        self.tracked[route, backend] = None

    def remove(self, route: str, backend: str) -> None:
        self.tracked.pop((route, backend), None)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=("route", "backend"))
        open_now = self.open
        for key in list(self.tracked):
            family.add_metric(key, float(open_now.get(key, 0)))
        yield family

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=("route", "backend"))


class Metrics:
    """The collectors, registered on `registry` (in the order /metrics lists them)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Backends each route's per-backend metrics have series for.
        self._pool_series: dict[str, set[str]] = {}
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        r = registry
        Info("wsgate_build", "Version of this wsgate build.", registry=r).info({"version": __version__})
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

        self.active_connections = OpenConnections(
            "wsgate_active_connections", "Open proxied WebSocket connections.", r
        )
        self.connections = PlainCounter(
            "wsgate_connections",
            "Client connections by how their handshake ended, and the protocol spoken (http/1.1, h2).",
            ("route", "outcome", "protocol"), r,
        )
        self.handshake_rejections = PlainCounter(
            "wsgate_handshake_rejections", "Handshakes answered with an HTTP error, by reason.",
            ("reason",), r,
        )
        self.handshake_duration = PlainHistogram(
            "wsgate_handshake_duration_seconds",
            "From the complete client request to the 101 sent to the client.",
            "route", _DURATION_BUCKETS, r,
        )
        self.backend_connect_duration = PlainHistogram(
            "wsgate_backend_connect_duration_seconds",
            "From starting to connect to a backend to its answer to the upgrade.",
            "route", _DURATION_BUCKETS, r,
        )
        self.connection_duration = PlainHistogram(
            "wsgate_connection_duration_seconds", "Lifetime of proxied connections, from the 101.",
            "route", _CONNECTION_BUCKETS, r,
        )
        self.messages = PlainCounter(
            "wsgate_messages", "WebSocket data messages relayed.", ("route", "direction"), r
        )
        self.frames = PlainCounter(
            "wsgate_frames", "WebSocket frames relayed (data and control).", ("route", "direction"), r
        )
        self.bytes = PlainCounter(
            "wsgate_bytes", "Bytes received for relaying, frame headers included.",
            ("route", "direction"), r,
        )
        self.message_size = PlainHistogram(
            "wsgate_message_size_bytes",
            "Payload sizes of data messages (fragments summed, compressed as relayed); within"
            " one connection's flush interval every message counts at that interval's mean size.",
            "direction", _SIZE_BUCKETS, r,
            with_created=False,  # as it has always been exported
        )
        self.close_frames = PlainCounter(
            "wsgate_close_frames",
            "Connections ended, by close code and by who closed (client, backend, gateway).",
            ("code", "side"), r,
        )
        self.heartbeat_rtt = PlainHistogram(
            "wsgate_heartbeat_rtt_seconds", "Round trip of the gateway's pings, by leg.",
            "side", _DURATION_BUCKETS, r,
        )
        self.heartbeat_timeouts = PlainCounter(
            "wsgate_heartbeat_timeouts", "Peers dropped for not answering a ping.", ("side",), r
        )
        self.idle_timeouts = PlainCounter(
            "wsgate_idle_timeouts", "Connections closed for carrying no data.", ("route",), r
        )
        self.limit_closes = PlainCounter(
            "wsgate_limit_closes",
            "Client connections closed with 1008 for going over a per-connection limit, by limit.",
            ("reason",), r,
        )
        self.flow_control_pauses = PlainCounter(
            "wsgate_flow_control_pauses",
            "Times reading one side stopped because the other side's buffer passed high water.",
            ("route", "direction"), r,
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
        self.tls_handshake_failures = PlainCounter(
            "wsgate_tls_handshake_failures", "Client TLS handshakes that failed.", ("listener",), r
        )
        self.proxy_protocol_errors = PlainCounter(
            "wsgate_proxy_protocol_errors",
            "Connections closed, unanswered, over their PROXY protocol header, by reason.",
            ("listener", "reason"), r,
        )
        # The only metrics with a backend label; a backend that leaves takes its series along.
        self._per_backend: tuple[Any, ...] = (
            self.active_connections, self.backend_up, self.backend_ejections
        )
        self.config_reloads = Counter(
            "wsgate_config_reloads", "Configuration reloads by result.", ["result"], registry=r
        )

    def series(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)` of a prometheus-client metric, remembered: its lookup costs
        microseconds."""
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
        gauge = self.active_connections
        key = (route, backend)
        gauge.open[key] = gauge.open.get(key, 0) + 1
        if key not in gauge.tracked:
            gauge.track(route, backend)
            self._pool_series.setdefault(route, set()).add(backend)

    def connection_closed(self, route: str, backend: str) -> None:
        open_now = self.active_connections.open
        key = (route, backend)
        left = open_now[key] - 1
        if left:
            open_now[key] = left
        else:
            del open_now[key]

    def flush_relays(self, relays: Iterable[CountedRelay]) -> None:
        """Add what `relays` counted since their previous flush, heartbeat round trips included.

        Each relay hands its counts over (and starts counting afresh); each count is a
        dict entry here, so a flush of 100,000 connections never calls prometheus-client.
        """
        frames, size, messages, pauses = self.frames, self.bytes, self.messages, self.flow_control_pauses
        for relay in relays:
            route = relay.route_name
            for counts, direction in zip(relay.take_counts(), _DIRECTIONS):
                if counts is None:
                    continue
                if counts.rtts:
                    side, rtt_histogram = counts.side, self.heartbeat_rtt
                    for rtt in counts.rtts:
                        rtt_histogram.observe(side, rtt)
                labels = (route, direction)
                if counts.frames:
                    frames.add(labels, counts.frames)
                if counts.size:
                    size.add(labels, counts.size)
                if counts.messages:
                    messages.add(labels, counts.messages)
                    mean = counts.payload / counts.messages
                    self.message_size.observe_many(direction, mean, counts.messages)
                if counts.pauses:
                    pauses.add(labels, counts.pauses)

    def set_pool(self, route: str, members: Iterable[Any], now: float) -> None:
        """Per-backend gauges of one route: open connections, availability, imbalance.

        Backends that left the pool (DNS, reload) lose every series once their connections are gone;
        only these metrics have a backend label, so series grow with routes, not with pod addresses.
        """
        members = list(members)
        open_now = self.active_connections.open
        current = {member.identity for member in members}
        for identity in self._pool_series.get(route, set()) - current:
            if open_now.get((route, identity), 0) == 0:
                for metric in self._per_backend:
                    self._remove(metric, route, identity)
            else:
                current.add(identity)
        self._pool_series[route] = current
        loads = []
        for member in members:
            self.active_connections.track(route, member.identity)
            self.series(self.backend_up, route, member.identity).set(1 if member.available(now) else 0)
            loads.append(member.active)
        mean = sum(loads) / len(loads) if loads else 0
        self.series(self.ring_imbalance, route).set(max(loads) / mean if mean else 0)
