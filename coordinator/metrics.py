"""Operational counters and gauges in Prometheus text format, served on a tiny HTTP endpoint.

The registry is thread-safe (the MQTT thread, the round loop and the HTTP thread all touch it)
and knows each metric's help text and type, so ``/metrics`` is valid exposition format 0.0.4.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fedprune.common.configkit import ConfigError

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class _Meta:
    kind: str
    help: str


class Metrics:
    def __init__(self, namespace: str = "fedprune") -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        self._meta: dict[str, _Meta] = {}
        self._values: dict[str, dict[Labels, float]] = {}

    def declare(self, name: str, kind: str, help: str) -> None:
        if kind not in ("counter", "gauge"):
            raise ValueError(f"metric kind {kind!r}: expected counter or gauge")
        with self._lock:
            self._meta[name] = _Meta(kind, help)
            self._values.setdefault(name, {})

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        key = self._key(name, labels)
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        key = self._key(name, labels)
        with self._lock:
            self._values[name][key] = float(value)

    def clear(self, name: str) -> None:
        with self._lock:
            self._values[name].clear()

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(self._key(name, labels), 0.0)

    def _key(self, name: str, labels: dict[str, str]) -> Labels:
        if name not in self._meta:
            raise KeyError(f"metric {name!r} was never declared")
        return tuple(sorted((k, str(v)) for k, v in labels.items()))

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, meta in sorted(self._meta.items()):
                full = f"{self.namespace}_{name}"
                lines.append(f"# HELP {full} {meta.help}")
                lines.append(f"# TYPE {full} {meta.kind}")
                for labels, value in sorted(self._values[name].items()):
                    lines.append(f"{full}{_format_labels(labels)} {_format_value(value)}")
        return "\n".join(lines) + "\n"


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), chr(92) + "n")}"'
        for k, v in labels
    )
    return "{" + ",".join(escaped) + "}"


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class MetricsServer:
    """Serves ``GET /metrics`` on host:port in a daemon thread; port 0 picks a free port. A port it
    cannot bind is a ConfigError naming ``[metrics] port`` (exit 78, so systemd stops retrying)."""

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 0) -> None:
        registry = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"[metrics] port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); another process "
                "may hold it: set [metrics] port to a free port, 0 for any free one, or -1 to turn /metrics off"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def declare_metrics(metrics: Metrics) -> None:
    for name, kind, help_text in (
        ("rounds_completed_total", "counter", "Rounds aggregated and checkpointed."),
        ("updates_accepted_total", "counter", "Updates accepted into a round."),
        ("updates_rejected_total", "counter", "Updates and messages rejected, by reason."),
        ("updates_held_total", "counter", "Updates that arrived before their round opened (after a restart), held for it."),
        ("bytes_in_total", "counter", "MQTT payload bytes received."),
        ("bytes_out_total", "counter", "MQTT payload bytes published."),
        ("devices_online", "gauge", "Devices heard from within the heartbeat timeout."),
        ("device_importance", "gauge", "Importance score r of each device after the last round."),
        ("updates_gated_total", "counter", "Accepted updates the Byzantine defences left out of a round, by device and rule."),
        ("round_duration_seconds", "gauge", "Wall time of the last completed round."),
        ("current_round", "gauge", "Round in progress (or next to run)."),
        ("global_accuracy", "gauge", "Accuracy of the global model on the coordinator's evaluation set."),
        ("rounds_declined_total", "counter", "Rounds devices declined (governance, data_mismatch), by reason; once per device and round."),
        ("devices_excluded", "gauge", "Devices left out of selection until they register again, by reason (data_mismatch: their data does not fit the model)."),
        ("revocations_applied_total", "counter", "Devices the running daemon stopped accepting after the allow-list file changed (revoke)."),
        ("checkpoint_failures_total", "counter", "Checkpoint or registry writes that failed (e.g. disk full) and were retried."),
        ("reassembly_dropped_total", "counter", "Partial multi-chunk transfers dropped unfinished, by reason (source_transfers and source_bytes: a device over its own share; transfers and bytes: the overall bound; age: stale)."),
        ("reassembly_buffered_bytes", "gauge", "Bytes of partial multi-chunk transfers held for reassembly."),
    ):
        metrics.declare(name, kind, help_text)
