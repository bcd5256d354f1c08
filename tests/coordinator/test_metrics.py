from __future__ import annotations

import urllib.request

import pytest

from fedprune.coordinator.metrics import Metrics, MetricsServer


def registry() -> Metrics:
    m = Metrics()
    m.declare("updates_rejected_total", "counter", "Updates rejected, by reason.")
    m.declare("device_importance", "gauge", "Importance score r per device.")
    return m


def test_renders_prometheus_text_with_help_type_and_labels() -> None:
    m = registry()
    m.inc("updates_rejected_total", reason="late")
    m.inc("updates_rejected_total", 2, reason="late")
    m.inc("updates_rejected_total", reason='bad"quote')
    m.set("device_importance", 0.125, device="pi-1")
    text = m.render()
    assert "# HELP fedprune_updates_rejected_total Updates rejected, by reason.\n" in text
    assert "# TYPE fedprune_updates_rejected_total counter\n" in text
    assert 'fedprune_updates_rejected_total{reason="late"} 3\n' in text
    assert 'fedprune_updates_rejected_total{reason="bad\\"quote"} 1\n' in text
    assert 'fedprune_device_importance{device="pi-1"} 0.125\n' in text
    assert m.value("updates_rejected_total", reason="late") == 3


def test_undeclared_metrics_and_negative_counter_steps_are_bugs() -> None:
    m = registry()
    with pytest.raises(KeyError):
        m.inc("nope")
    with pytest.raises(ValueError):
        m.inc("updates_rejected_total", -1, reason="late")


def test_http_endpoint_serves_metrics_and_404s_elsewhere() -> None:
    m = registry()
    m.inc("updates_rejected_total", reason="replayed")
    server = MetricsServer(m, port=0).start()
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
        assert 'reason="replayed"' in body
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
    finally:
        server.stop()
