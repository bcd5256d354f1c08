"""CoordinatorConfig: every knob of the daemon, declared once.

Loaded from defaults < TOML (``--config``) < ``FEDPRUNE_COORDINATOR_<SECTION>_<KEY>`` <
``--set section.key=value``; validated into frozen dataclasses. ``init`` renders the commented
example from the same declarations. This module is the only reader of ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from fedprune.coordinator.core.config import StrategyConfig
from fedprune.common.configkit import ConfigError, FreeTable, in_range, load, one_of, render_example, setting
from fedprune.common.data_source import DataSource
from fedprune.common.model_rules import TASK_KINDS, normalise_args, reference_problem, task_problem
from fedprune.protocol.topics import is_valid_id

ENV_PREFIX = "FEDPRUNE_COORDINATOR_"
SECURE_MIN_DEVICES = 3  # a secure sum of two devices would give each the other's update
# Refused by `run` and `simulate` alike: a sub-mask per device needs a task per device, and the
# task is one broadcast encrypted to the members (N tasks would multiply every device's downlink).
ADAPTIVE_DENSITY_REFUSED = ("[strategy] adaptive_density = true: per-device sub-masks need a task per device, "
                            "which the coordinator does not send (the task is one broadcast); set it to false")


def _broker_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or "://" not in value:
        return "mqtt://host:port or mqtts://host:port"
    try:
        parts.port
    except ValueError:
        return "a port number in 1..65535"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _valid_id(value: str) -> str | None:
    return None if is_valid_id(value) else "1-64 characters from A-Z a-z 0-9 . _ -"


def _command_line(value: str) -> str | None:
    try:
        shlex.split(value)
    except ValueError:
        return "a command line with balanced quotes (it runs without a shell)"
    return None


def _positive_dims(value: tuple[int, ...]) -> str | None:
    return None if value and all(d > 0 for d in value) else "a non-empty list of positive ints"


@dataclass(frozen=True)
class FederationSection:
    """Which federation this coordinator runs and which model it trains."""

    id: str = setting("demo", "federation id; part of every topic", check=_valid_id)
    model: str = setting("mlp", "model factory: a built-in (mlp, cnn2d, cnn1d) or an import path such as \"mypkg.nets:make_model\", installed here and on every device", check=reference_problem)
    model_args: FreeTable = setting(FreeTable(), "keyword arguments of the model factory (they travel in the signed round task), e.g. { hidden = [64, 32] }")
    task: str = setting("classification", "what the model learns: classification, regression or multilabel", check=one_of(*TASK_KINDS))
    input_shape: tuple[int, ...] = setting((64,), "shape of one input sample (digits: [64] for mlp, [1, 8, 8] for cnn2d)", check=_positive_dims)
    num_classes: int = setting(10, "number of outputs: classes, labels (multilabel) or targets (regression)", check=in_range(1, 100_000))
    seed: int = setting(0, "seed of the initial model, masks and device selection", check=in_range(0, 2**31 - 1))

    def __post_init__(self) -> None:
        """The rules that need no torch, checked at load so every command refuses them; whether
        the factory builds is checked where the model is built (``run``)."""
        problem = reference_problem(self.model) or task_problem(self.task, self.num_classes)
        if problem:
            raise ValueError(problem)
        try:
            normalise_args(self.model_args)
        except ValueError as exc:
            raise ValueError(f"model_args: {exc}") from None


@dataclass(frozen=True)
class BrokerSection:
    """The MQTT broker; `embedded = true` starts an in-process amqtt broker (demo only, no ACLs)."""

    url: str = setting("mqtt://127.0.0.1:1883", "broker URL, mqtt://host:port or mqtts://host:port", check=_broker_url)
    embedded: bool = setting(False, "start an embedded amqtt broker on the URL's port (single box and demo; not a security boundary)")
    username: str = setting("coordinator", "broker user name")
    password: str = setting("", "broker password (prefer the env FEDPRUNE_COORDINATOR_BROKER_PASSWORD)", secret=True)
    ca_file: Path | None = setting(None, "CA certificate that signed the broker's certificate (mqtts)")
    cert_file: Path | None = setting(None, "client certificate for mutual TLS")
    key_file: Path | None = setting(None, "client private key for mutual TLS")
    max_message_kib: int = setting(128, "largest MQTT message sent; larger payloads are chunked", check=in_range(4, 256 * 1024))
    password_file: Path | None = setting(None, "Mosquitto password file `revoke` removes the device's user from (provision sets it to its passwd); unset: remove it yourself")
    reload_command: str = setting("", "command `revoke` runs after changing password_file, so the broker reloads it and closes the device's session, e.g. 'systemctl reload mosquitto'; empty: reload it yourself", check=_command_line)


@dataclass(frozen=True)
class RoundsSection:
    """How rounds are run."""

    total: int = setting(20, "rounds to run (T)", check=in_range(1, 1_000_000))
    min_devices: int = setting(2, "online devices needed before a round starts", check=in_range(1, 1_000_000))
    quorum: int = setting(2, "updates needed to aggregate at the deadline", check=in_range(1, 1_000_000))
    deadline_s: float = setting(120.0, "seconds a round waits for updates", check=in_range(0.1, 86_400))
    on_missed_quorum: str = setting("retry", "at the deadline without quorum: close with what arrived, or retry", check=one_of("close", "retry"))
    max_retries: int = setting(2, "re-announcements of a round that missed quorum", check=in_range(0, 100))
    reannounce_s: float = setting(10.0, "re-send the task to selected devices that have not answered, every this many seconds", check=in_range(0.5, 3600))
    heartbeat_timeout_s: float = setting(90.0, "a device is offline when silent this long", check=in_range(1, 86_400))


@dataclass(frozen=True)
class StateSection:
    """Where the coordinator keeps keys, registry and checkpoints."""

    dir: Path = setting(Path("fedprune-state"), "state directory (keys, registry, checkpoints)")
    keep_checkpoints: int = setting(3, "checkpoints kept", check=in_range(1, 1000))


@dataclass(frozen=True)
class EvaluationSection:
    """Held-out data the coordinator evaluates the global model on (never used for training)."""

    data: Path | None = setting(None, "a .npz (X, y) or CSV file or directory, an image folder...; empty: no evaluation")
    every_rounds: int = setting(1, "evaluate every this many rounds (and after the last)", check=in_range(1, 1_000_000))
    source: DataSource = field(default_factory=DataSource, metadata={
        "help": "how to read [evaluation] data: the keys of an agent.toml's [data] table (docs/DATA.md)"})


@dataclass(frozen=True)
class MetricsSection:
    """The operator's HTTP endpoint: the status page at /, /status.json and Prometheus /metrics."""

    host: str = setting("127.0.0.1", "address it listens on; anything but loopback needs token_file")
    port: int = setting(9464, "its port; 0 picks a free one; -1 disables it", check=in_range(-1, 65535))
    token_file: Path | None = setting(None, "file holding the bearer token every request must carry (Authorization: Bearer ...); required when host is not a loopback address")

    def __post_init__(self) -> None:
        if self.port >= 0 and self.token_file is None and not is_loopback(self.host):
            raise ValueError(f"host {self.host!r} listens beyond this machine: set [metrics] token_file to a file "
                             "holding a bearer token (e.g. `openssl rand -hex 32 > metrics.token`), or host = "
                             "\"127.0.0.1\" behind a reverse proxy")


@dataclass(frozen=True)
class ExportSection:
    """ONNX releases of the pruned global model, signed and published retained to every device."""

    every_rounds: int = setting(0, "also release every this many rounds; 0: only after the last round", check=in_range(0, 1_000_000))
    opset: int = setting(18, "ONNX opset of the export", check=in_range(13, 20))
    variant: str = setting("compact", "what devices receive: compact (sparse weights, smallest), dense, or int8 (MatMul/Gemm quantized)", check=one_of("compact", "dense", "int8"))


@dataclass(frozen=True)
class CoordinatorConfig:
    federation: FederationSection = field(default_factory=FederationSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    state: StateSection = field(default_factory=StateSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    export: ExportSection = field(default_factory=ExportSection)

    def __post_init__(self) -> None:
        if self.rounds.quorum > self.rounds.min_devices:
            raise ConfigError(
                f"[rounds] quorum {self.rounds.quorum}: expected at most min_devices ({self.rounds.min_devices})"
            )
        if self.strategy.adaptive_density:
            raise ConfigError(ADAPTIVE_DENSITY_REFUSED)
        if self.strategy.secure and min(self.rounds.min_devices, self.rounds.quorum) < SECURE_MIN_DEVICES:
            raise ConfigError(f"[rounds] min_devices {self.rounds.min_devices} and quorum {self.rounds.quorum}: "
                              f"[strategy] secure = true needs both >= {SECURE_MIN_DEVICES} (with fewer devices the sum "
                              "would give away each device's update)")
        if self.strategy.rounds != self.rounds.total:
            object.__setattr__(self, "strategy", _with_rounds(self.strategy, self.rounds.total))


def _with_rounds(strategy: StrategyConfig, total: int) -> StrategyConfig:
    """The schedule (T_end, ΔT) follows [rounds] total; one number, not two to keep in sync."""
    from dataclasses import replace

    return replace(strategy, rounds=total)


def load_config(path: Path | None, overrides: Mapping[str, str] | None = None,
                env: Mapping[str, str] | None = None) -> CoordinatorConfig:
    return load(CoordinatorConfig, toml_path=path, env=os.environ if env is None else env,
                env_prefix=ENV_PREFIX, overrides=overrides)


def example_config(values: Mapping[str, Mapping[str, object]] | None = None) -> str:
    return render_example(CoordinatorConfig, "fedprune coordinator configuration", values)


def model_spec(config: CoordinatorConfig):
    """The federation's model as ``fedprune.common.models.ModelSpec`` (imported on use: it loads torch)."""
    from fedprune.common.models import ModelSpec

    f = config.federation
    return ModelSpec(f.model, tuple(f.input_shape), f.num_classes, args=f.model_args, task=f.task)
