"""Unit tests of wsgate.metrics: bounded labels, the bulk histogram, pool gauges."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from wsgate.metrics import Metrics, close_code_label


@pytest.mark.parametrize(
    ("code", "label"),
    [(None, "none"), (1000, "1000"), (1014, "1014"), (1015, "1015"), (3001, "3xxx"), (4999, "4xxx"),
     (1016, "other"), (999, "other"), (5000, "other")],
)
def test_close_code_labels_are_bounded(code, label):
    assert close_code_label(code) == label


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
