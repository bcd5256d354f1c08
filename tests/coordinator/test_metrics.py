"""The metrics registry (prometheus_client) and the operator's HTTP endpoint: routes, token, headers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedprune.common.configkit import ConfigError
from fedprune.coordinator.config import load_config
from fedprune.coordinator.core.registry import DeviceRecord
from fedprune.coordinator.fleet_view import EventFeed, LiveRound, RoundTrail, ViewInputs, build_view
from fedprune.coordinator.metrics import METRICS, Metrics
from fedprune.coordinator.operator_server import OperatorServer, read_token

TOKEN = "s3cret-token-0123456789abcdef"


def families(m: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def test_counters_gauges_and_histograms_render_as_valid_exposition_with_labels() -> None:
    m = Metrics()
    m.inc("updates_rejected_total", reason="late")
    m.inc("updates_rejected_total", 2, reason="late")
    m.inc("updates_rejected_total", reason='bad"quote')
    m.set("device_importance", 0.125, device="pi-1")
    for seconds in (0.3, 4.0, 45.0):
        m.observe("round_duration_seconds", seconds)
    parsed = families(m)
    rejected = {s.labels["reason"]: s.value for s in parsed["fedprune_updates_rejected"].samples
                if s.name.endswith("_total")}
    assert rejected == {"late": 3.0, 'bad"quote': 1.0}
    assert parsed["fedprune_updates_rejected"].type == "counter"
    assert parsed["fedprune_round_duration_seconds"].type == "histogram"
    buckets = {s.labels["le"]: s.value for s in parsed["fedprune_round_duration_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["0.5"] == 1 and buckets["5.0"] == 2 and buckets["+Inf"] == 3
    assert m.value("updates_rejected_total", reason="late") == 3
    assert m.value("device_importance", device="pi-1") == 0.125
    assert m.value("bytes_in_total") == 0  # declared, never touched
    for name, labels in (("updates_rejected_total", {"reason": "late"}), ("device_importance", {"device": "pi-1"})):
        assert m.value(name, **labels) == m.registry.get_sample_value(f"fedprune_{name}", labels)
    m.clear("device_importance")
    assert m.value("device_importance", device="pi-1") == 0
    assert m.registry.get_sample_value("fedprune_device_importance", {"device": "pi-1"}) is None


def test_every_declared_metric_is_exposed_under_its_name() -> None:
    """What deploy/observability's dashboards and alerts may query (tests/test_dashboards.py)."""
    text = Metrics().render().decode()
    for spec in METRICS:
        assert f"# TYPE fedprune_{spec.name} {spec.kind}" in text


def test_misuse_is_a_bug_not_a_silent_series() -> None:
    m = Metrics()
    with pytest.raises(KeyError, match="never declared"):
        m.inc("nope")
    with pytest.raises(TypeError, match="is a gauge"):
        m.inc("devices_online")
    with pytest.raises(ValueError):
        m.inc("updates_rejected_total", -1, reason="late")


def view():
    record = DeviceRecord("pi-<1>", b"s" * 32, b"k" * 32, 0.0, online=True, last_seen=99.0, release=2,
                          epsilon_left=1.5, last_decline={"round": 3, "reason": "governance: <b>battery</b>",
                                                          "time": 98.0})
    trail = RoundTrail([{"round": 1, "received": 1, "selected": 1, "accuracy": 0.5, "loss": 1.2, "cum_bytes_in": 900,
                         "cum_bytes_out": 1200, "duration_s": 2.0, "scores": {"pi-<1>": {"r": 1.0, "q": 0.9}},
                         "update_bytes": {"pi-<1>": 800}}])
    feed = EventFeed()
    feed.record("WARNING", "update_rejected", {"device": "pi-<1>", "reason": "<script>alert(1)</script>"}, 99.5)
    return build_view(ViewInputs(
        federation="plant-7", total_rounds=5, completed_rounds=1, records=(record,), online=("pi-<1>",), trail=trail,
        importance={"pi-<1>": 1.0}, quality={"pi-<1>": 0.9}, live=LiveRound(2, "training", 160.0, 1, 1, 0),
        events=feed.snapshot()), 100.0, running=True)


def get(url: str, headers: dict[str, str] | None = None):
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5)


def test_endpoint_serves_page_json_metrics_and_health_on_loopback_without_a_token() -> None:
    m = Metrics()
    m.inc("updates_rejected_total", reason="replayed")
    server = OperatorServer(m, view, port=0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        page = get(f"{base}/")
        assert page.headers["Content-Type"].startswith("text/html")
        assert "script-src 'sha256-" in page.headers["Content-Security-Policy"]
        html = page.read().decode()
        assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html  # device text is escaped
        assert 'data-field="completed_rounds">1<' in html
        document = json.loads(get(f"{base}/status.json").read())
        assert document["completed_rounds"] == 1 and document["devices"][0]["bytes_sent"] == 800
        assert document["devices"][0]["last_problem"] == "round 3 declined: governance: <b>battery</b>"
        assert 'reason="replayed"' in get(f"{base}/metrics").read().decode()
        assert get(f"{base}/healthz").read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as missing:
            get(f"{base}/other")
        assert missing.value.code == 404
    finally:
        server.stop()


def test_a_token_guards_every_route_but_health_and_a_browser_gets_it_once_as_a_cookie() -> None:
    server = OperatorServer(Metrics(), view, port=0, token=TOKEN).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        for path in ("/", "/status.json", "/metrics"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                get(base + path)
            assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"].startswith("Bearer")
            with pytest.raises(urllib.error.HTTPError):
                get(base + path, {"Authorization": "Bearer wrong-token-0123456789"})
            assert get(base + path, {"Authorization": f"Bearer {TOKEN}"}).status == 200
        assert get(f"{base}/healthz").status == 200

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        with pytest.raises(urllib.error.HTTPError) as login:
            urllib.request.build_opener(NoRedirect).open(f"{base}/?token={TOKEN}", timeout=5)
        assert login.value.code == 303
        cookie = login.value.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert get(f"{base}/", {"Cookie": cookie.split(";")[0]}).status == 200
        with pytest.raises(urllib.error.HTTPError):
            get(f"{base}/?token=not-the-token-at-all")
    finally:
        server.stop()


def test_listening_beyond_loopback_without_a_token_file_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[metrics\] host '0.0.0.0' listens beyond this machine: set \[metrics\] token_file"):
        load_config(None, {"metrics.host": "0.0.0.0"}, env={})
    assert load_config(None, {"metrics.host": "0.0.0.0", "metrics.port": "-1"}, env={}).metrics.port == -1
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        read_token(short)
    with pytest.raises(ConfigError, match="cannot read it"):
        read_token(tmp_path / "missing.token")
    good = tmp_path / "metrics.token"
    good.write_text(TOKEN + "\n")
    assert read_token(good) == TOKEN


def test_a_port_in_use_is_a_config_error_naming_the_key() -> None:
    first = OperatorServer(Metrics(), view, port=0).start()
    try:
        with pytest.raises(ConfigError, match=r"\[metrics\] port"):
            OperatorServer(Metrics(), view, port=first.port)
    finally:
        first.stop()
