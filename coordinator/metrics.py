"""The coordinator's Prometheus metrics, through ``prometheus_client``.

Each daemon owns its own registry (a simulation runs one coordinator per federation, tests run
many in one process), declared here in one table so that the dashboards in
``deploy/observability`` and the status page name the same series. The ``Metrics`` facade keeps
the daemon's calls short (``inc``, ``set``, ``observe`` by name) and lets the round code read a
counter back (``value``) for the history entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

NAMESPACE = "fedprune"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_SECONDS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
_TRAINING_SECONDS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
_BYTES = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without the namespace; counters end in _total as exposed
    kind: str  # counter, gauge or histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("rounds_completed_total", "counter", "Rounds aggregated and checkpointed."),
    MetricSpec("round_retries_total", "counter", "Rounds re-announced to the missing devices after a missed quorum."),
    MetricSpec("updates_accepted_total", "counter", "Updates accepted into a round."),
    MetricSpec("updates_rejected_total", "counter", "Updates and messages rejected, by reason.", ("reason",)),
    MetricSpec("updates_held_total", "counter", "Updates that arrived before their round opened (after a restart), held for it."),
    MetricSpec("updates_gated_total", "counter", "Accepted updates the Byzantine defences left out of a round, by device and rule.",
               ("device", "reason")),
    MetricSpec("bytes_in_total", "counter", "MQTT payload bytes received."),
    MetricSpec("bytes_out_total", "counter", "MQTT payload bytes published."),
    MetricSpec("rounds_declined_total", "counter", "Rounds devices declined (governance, data_mismatch), by reason; once per device and round.",
               ("reason",)),
    MetricSpec("secure_rounds_failed_total", "counter", "Secure rounds that ended without a sum (too few devices or shares left), by reason.",
               ("reason",)),
    MetricSpec("revocations_applied_total", "counter", "Devices the running daemon stopped accepting after the allow-list file changed (revoke)."),
    MetricSpec("checkpoint_failures_total", "counter", "Checkpoint or registry writes that failed (e.g. disk full) and were retried."),
    MetricSpec("reassembly_dropped_total", "counter", "Partial multi-chunk transfers dropped unfinished, by reason (source_transfers and source_bytes: a device over its own share; transfers and bytes: the overall bound; age: stale).",
               ("reason",)),
    MetricSpec("devices_online", "gauge", "Devices heard from within the heartbeat timeout."),
    MetricSpec("devices_enrolled", "gauge", "Devices on the allow-list (not revoked)."),
    MetricSpec("device_importance", "gauge", "Importance score r of each device after the last round.", ("device",)),
    MetricSpec("device_quality", "gauge", "Loss-quality score q of each device after the last round.", ("device",)),
    MetricSpec("current_round", "gauge", "Round in progress (or next to run)."),
    MetricSpec("global_accuracy", "gauge", "Accuracy of the global model on the coordinator's evaluation set (classification)."),
    MetricSpec("global_score", "gauge", "Headline metric of the global model on the coordinator's evaluation set: accuracy, F1 (multilabel) or R2 (regression)."),
    MetricSpec("global_loss", "gauge", "Loss of the global model on the coordinator's evaluation set."),
    MetricSpec("devices_excluded", "gauge", "Devices left out of selection until they register again, by reason (data_mismatch: their data does not fit the model; layout_mismatch: they build the model differently).",
               ("reason",)),
    MetricSpec("reassembly_buffered_bytes", "gauge", "Bytes of partial multi-chunk transfers held for reassembly."),
    MetricSpec("last_round_completed_timestamp_seconds", "gauge", "Unix time the last round was committed (0: none since start)."),
    MetricSpec("round_deadline_seconds", "gauge", "The configured round deadline ([rounds] deadline_s), for alert rules."),
    MetricSpec("broker_connected", "gauge", "1 while the coordinator's MQTT session is up."),
    MetricSpec("round_duration_seconds", "histogram", "Wall time from a round's task to its commit.", buckets=_SECONDS),
    MetricSpec("time_to_quorum_seconds", "histogram", "Time from a round's task until quorum was reached.", buckets=_SECONDS),
    MetricSpec("update_size_bytes", "histogram", "Size of each accepted update on the wire (all its chunks).", buckets=_BYTES),
    MetricSpec("device_training_seconds", "histogram", "Local training time the devices report with their updates.",
               buckets=_TRAINING_SECONDS),
)


class Metrics:
    def __init__(self, specs: tuple[MetricSpec, ...] = METRICS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._specs = {spec.name: spec for spec in specs}
        self._collectors = {spec.name: _collector(spec, self.registry) for spec in specs}
        # Counters' and gauges' values, kept beside the registry: the daemon reads them back
        # often, and prometheus_client answers a read only by collecting the whole metric.
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._child(name, "counter", labels).inc(amount)
        key = _key(name, labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._child(name, "gauge", labels).set(value)
        self._values[_key(name, labels)] = float(value)

    def observe(self, name: str, value: float) -> None:
        self._child(name, "histogram", {}).observe(value)

    def clear(self, name: str) -> None:
        self._collector(name).clear()
        self._values = {key: v for key, v in self._values.items() if key[0] != name}

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value (0 for a series never touched)."""
        self._spec(name)
        return self._values.get(_key(name, labels), 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _spec(self, name: str) -> MetricSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"metric {name!r} was never declared") from None

    def _collector(self, name: str):
        self._spec(name)
        return self._collectors[name]

    def _child(self, name: str, kind: str, labels: dict[str, str]):
        spec = self._spec(name)
        if spec.kind != kind:
            raise TypeError(f"metric {name!r} is a {spec.kind}, not a {kind}")
        collector = self._collectors[name]
        return collector.labels(**{k: str(v) for k, v in labels.items()}) if spec.labels else collector


def _key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted((k, str(v)) for k, v in labels.items()))


def _collector(spec: MetricSpec, registry: CollectorRegistry):
    name = f"{NAMESPACE}_{spec.name}"
    if spec.kind == "counter":
        return Counter(name.removesuffix("_total"), spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(name, spec.help, spec.labels, registry=registry)
    if spec.kind == "histogram":
        return Histogram(name, spec.help, spec.labels, buckets=spec.buckets, registry=registry)
    raise ValueError(f"metric kind {spec.kind!r}: expected counter, gauge or histogram")
