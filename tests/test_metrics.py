"""Unit tests of wsgate.metrics: bounded labels, the plain collectors, the bulk histogram, pool gauges."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from wsgate.metrics import Metrics, OpenConnections, PlainCounter, PlainHistogram, close_code_label


@pytest.mark.parametrize(
    ("code", "label"),
    [(None, "none"), (1000, "1000"), (1014, "1014"), (1015, "1015"), (3001, "3xxx"), (4999, "4xxx"),
     (1016, "other"), (999, "other"), (5000, "other")],
)
def test_close_code_labels_are_bounded(code, label):
    assert close_code_label(code) == label


def without_created_times(registry: CollectorRegistry, generate: Callable[..., bytes]) -> str:
    """The registry's exposition with each `_created` value replaced by a mark."""
    return re.sub(r"^(\w+_created(\{[^}]*\})?) \S+$", r"\1 CREATED", generate(registry).decode(), flags=re.M)


@pytest.mark.parametrize("generate", [generate_latest, generate_openmetrics], ids=["text", "openmetrics"])
def test_the_plain_collectors_export_what_prometheus_client_s_own_would(generate):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = PlainCounter("t_events", "Events.", ("route", "outcome"), ours)
    their_counter = Counter("t_events", "Events.", ["route", "outcome"], registry=theirs)
    unused = PlainCounter("t_unused", "Never counted.", ("reason",), ours)
    Counter("t_unused", "Never counted.", ["reason"], registry=theirs)
    histogram = PlainHistogram("t_seconds", "Durations.", "route", (0.001, 0.01, 1), ours)
    their_histogram = Histogram(
        "t_seconds", "Durations.", ["route"], buckets=(0.001, 0.01, 1), registry=theirs
    )
    gauge = OpenConnections("t_open", "Open.", ours)
    their_gauge = Gauge("t_open", "Open.", ["route", "backend"], registry=theirs)

    for labels in (("a", "ok"), ("b", "failed"), ("a", "ok")):
        counter.inc(*labels)
        their_counter.labels(*labels).inc()
    counter.add(("b", "failed"), 1 << 40)
    their_counter.labels("b", "failed").inc(1 << 40)
    for route, value in (("a", 0.0005), ("a", 0.001), ("b", 0.002), ("a", 0.5), ("a", 7.0), ("b", 0.0)):
        histogram.observe(route, value)
        their_histogram.labels(route).observe(value)
    gauge.open["r", "busy"] = 2
    for backend in ("busy", "idle"):
        gauge.track("r", backend)
    their_gauge.labels("r", "busy").set(2)
    their_gauge.labels("r", "idle").set(0)

    exported = without_created_times(ours, generate)
    assert exported == without_created_times(theirs, generate)
    assert exported.count("CREATED") == 4  # every counted series has its _created, as theirs
    assert unused.name in exported


def test_a_series_is_created_at_its_first_count():
    registry = CollectorRegistry()
    counter = PlainCounter("t_events", "Events.", ("reason",), registry)
    histogram = PlainHistogram("t_seconds", "Durations.", "route", (1.0,), registry)
    before = time.time()
    counter.inc("x")
    histogram.observe("r", 0.5)
    after = time.time()
    assert before <= registry.get_sample_value("t_events_created", {"reason": "x"}) <= after
    assert before <= registry.get_sample_value("t_seconds_created", {"route": "r"}) <= after


def test_bulk_histogram_counts_every_message_in_one_call():
    metrics = Metrics(CollectorRegistry())
    metrics.message_size.observe_many("client_to_backend", 100.0, 1000)
    metrics.message_size.observe_many("client_to_backend", 5000.0, 10)
    registry = metrics.registry
    sample = registry.get_sample_value
    labels = {"direction": "client_to_backend"}
    assert sample("wsgate_message_size_bytes_count", labels) == 1010
    assert sample("wsgate_message_size_bytes_sum", labels) == 100.0 * 1000 + 5000.0 * 10
    assert sample("wsgate_message_size_bytes_bucket", {**labels, "le": "64.0"}) == 0
    assert sample("wsgate_message_size_bytes_bucket", {**labels, "le": "256.0"}) == 1000
    assert sample("wsgate_message_size_bytes_bucket", {**labels, "le": "+Inf"}) == 1010
    # Exported without a _created series, as it always was.
    assert sample("wsgate_message_size_bytes_created", labels) is None


@dataclass
class _Member:
    identity: str
    active: int = 0
    up: bool = True

    def available(self, now: float) -> bool:
        return self.up


def test_pool_gauges_drop_backends_that_left_once_their_connections_ended():
    metrics = Metrics(CollectorRegistry())
    sample = metrics.registry.get_sample_value
    a, b = _Member("ws://10.0.0.1:80", active=3), _Member("ws://10.0.0.2:80", active=1)
    metrics.connection_opened("chat", b.identity)
    metrics.set_pool("chat", [a, b], 0.0)
    assert sample("wsgate_backend_up", {"route": "chat", "backend": b.identity}) == 1
    assert sample("wsgate_ring_imbalance", {"route": "chat"}) == 3 / 2
    # b leaves the pool (DNS) while one connection is still open on it: its series stay.
    metrics.set_pool("chat", [a], 0.0)
    assert sample("wsgate_active_connections", {"route": "chat", "backend": b.identity}) == 1
    metrics.connection_closed("chat", b.identity)
    metrics.set_pool("chat", [a], 0.0)
    assert sample("wsgate_active_connections", {"route": "chat", "backend": b.identity}) is None
    assert sample("wsgate_backend_up", {"route": "chat", "backend": b.identity}) is None
    assert sample("wsgate_backend_up", {"route": "chat", "backend": a.identity}) == 1


def test_a_backend_that_left_before_any_flush_loses_every_series():
    metrics = Metrics(CollectorRegistry())
    sample = metrics.registry.get_sample_value
    a, gone = _Member("ws://10.0.0.1:80"), "ws://10.0.0.2:80"
    metrics.connection_opened("chat", gone)
    metrics.series(metrics.backend_ejections, "chat", gone).inc()
    metrics.connection_closed("chat", gone)
    metrics.set_pool("chat", [a], 0.0)
    labels = {"route": "chat", "backend": gone}
    assert sample("wsgate_active_connections", labels) is None
    assert sample("wsgate_backend_ejections_total", labels) is None
    assert sample("wsgate_backend_up", {"route": "chat", "backend": a.identity}) == 1
