"""AgentConfig: every knob of the device agent, declared once.

defaults < TOML (``--config``) < ``FEDPRUNE_AGENT_<SECTION>_<KEY>`` < ``--set section.key=value``.
This module is the only reader of ``os.environ`` on the device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from fedprune.common.configkit import in_range, load, one_of, render_example, setting
from fedprune.common.data_source import DataSource
from fedprune.common.models import TRAINING_DEVICES
from fedprune.protocol.distributed_dp import DISTRIBUTED, LOCAL
from fedprune.edge_agent.core.guard import GovernanceConfig

ENV_PREFIX = "FEDPRUNE_AGENT_"


@dataclass(frozen=True)
class AgentSection:
    """Where the agent finds its enrollment, its data and its state."""

    bundle: Path = setting(Path("/etc/fedprune/bundle.json"), "enrollment bundle made by `fedprune-coordinator enroll`")
    data: Path = setting(Path("/var/lib/fedprune-agent/data"), "local training data: a .npz (X, y) or CSV file, or a directory of them; [data] says how to read other kinds")
    state_dir: Path = setting(Path("/var/lib/fedprune-agent"), "state directory (audit log, models, cached updates)")
    device: str = setting("cpu", "where to train: cpu, cuda (Jetson) or auto", check=one_of(*TRAINING_DEVICES))
    train_in_subprocess: bool = setting(True, "train in a short-lived child so the idle agent never holds torch (small RSS)")
    heartbeat_s: float = setting(30.0, "seconds between status heartbeats", check=in_range(1, 3600))
    upload_timeout_s: float = setting(60.0, "seconds to wait for the broker to acknowledge an update", check=in_range(1, 3600))


@dataclass(frozen=True)
class BrokerOverride:
    """Override what the bundle says about the broker (e.g. a local address); empty keeps the bundle's."""

    url: str = setting("", "broker URL; empty: the bundle's")
    ca_file: Path | None = setting(None, "CA certificate file; empty: the bundle's embedded CA")


@dataclass(frozen=True)
class InferenceSection:
    """On-device inference with the newest verified ONNX release."""

    accelerator: str = setting("cpu", "onnxruntime execution provider: cpu, cuda (Jetson, onnxruntime-gpu) or auto", check=one_of("cpu", "cuda", "auto"))
    keep_releases: int = setting(3, "model releases kept on disk", check=in_range(1, 100))
    http_port: int = setting(-1, "serve POST /predict on 127.0.0.1 at this port; 0 picks one; -1 disables", check=in_range(-1, 65535))
    http_host: str = setting("127.0.0.1", "address of the inference endpoint (keep it on localhost unless you front it)")


def _positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "a finite number > 0"


def _probability(value: float) -> str | None:
    return None if 0 < value < 1 else "a number strictly between 0 and 1, typically below 1/number of devices"


@dataclass(frozen=True)
class GovernanceSection:
    """The device owner's limits: instead of training, decline the round with a reason the coordinator counts."""

    max_threads: int = setting(0, "torch threads for training; 0: all cores but one", check=in_range(0, 256))
    memory_ceiling_mb: float = setting(512.0, "MiB one training run may take; decline (memory_low) when less is available", check=in_range(0, 1 << 20))
    training_windows: tuple[str, ...] = setting((), 'local-time windows when training is allowed, e.g. ["22:00-06:00"]; empty: any time')
    thermal_limit_c: float = setting(75.0, "decline (too_hot) at or above this CPU/GPU/SoC temperature", check=in_range(-40, 150))
    thermal_resume_c: float = setting(65.0, "after too_hot, train again only below this temperature", check=in_range(-40, 150))
    min_battery_percent: float = setting(30.0, "on battery, decline (battery_low) below this level", check=in_range(0, 100))
    require_ac_power: bool = setting(False, "decline (on_battery) whenever the device runs on battery")
    sysfs_root: Path = setting(Path("/"), "root of the sys/ and proc/ trees the readings come from")

    def __post_init__(self) -> None:
        self.limits()

    def limits(self) -> GovernanceConfig:
        """The pure guard's view; raises ValueError (a ConfigError when loading) on inconsistent limits."""
        return GovernanceConfig(
            max_threads=self.max_threads or None, memory_ceiling_mb=self.memory_ceiling_mb,
            training_windows=self.training_windows, thermal_limit_c=self.thermal_limit_c,
            thermal_resume_c=self.thermal_resume_c, min_battery_percent=self.min_battery_percent,
            require_ac_power=self.require_ac_power,
        )


@dataclass(frozen=True)
class PrivacySection:
    """Client-level differential privacy of each update (docs/PRIVACY.md): clip to C, add noise of σ·C, spend a budget.

    ``local`` noises each update itself (N(0, (σC)²)): its ε holds against anyone who sees it.
    ``distributed`` needs secure aggregation: each device adds a share of Skellam noise inside the
    masked field, so that the sum the coordinator unmasks carries the noise of one central
    mechanism (std σ·w_max·C) instead of one per device; its ε holds against the coordinator, as
    long as the devices in the sum are honest (``fedprune.protocol.distributed_dp``).
    """

    enabled: bool = setting(False, "clip and noise every update before it leaves, and keep the device's ε ledger")
    mechanism: str = setting("local", "local: Gaussian noise on the update itself; distributed: a share of Skellam noise inside a secure round's masked sum (plain tasks are then declined: distributed_dp_needs_secure)", check=one_of(LOCAL, DISTRIBUTED))
    clip_norm: float = setting(1.0, "C: the update's global L2 norm is clipped to this", check=_positive)
    noise_multiplier: float = setting(1.0, "σ: noise of standard deviation σ·C (local: on every sent position; distributed: in the sum, for the largest weighted contribution)", check=_positive)
    epsilon_budget: float = setting(8.0, "ε this device may spend in one federation; then it declines (privacy_budget_exhausted)", check=_positive)
    delta: float = setting(1e-5, "δ of the (ε, δ) guarantee", check=_probability)
    report_class_losses: bool = setting(True, "send per-class losses (they reveal which classes the device holds; not covered by DP)")

    def __post_init__(self) -> None:
        if self.mechanism == DISTRIBUTED and not self.enabled:
            raise ValueError(f"[privacy] mechanism {DISTRIBUTED!r} needs enabled = true (or mechanism {LOCAL!r})")


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    data: DataSource = field(default_factory=DataSource)
    broker: BrokerOverride = field(default_factory=BrokerOverride)
    inference: InferenceSection = field(default_factory=InferenceSection)
    governance: GovernanceSection = field(default_factory=GovernanceSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)

    def training_threads(self, cpu_count: int) -> int:
        """[governance] max_threads, else all cores but one."""
        return GovernanceConfig(max_threads=self.governance.max_threads or None).training_threads(cpu_count)


def load_config(path: Path | None, overrides: Mapping[str, str] | None = None,
                env: Mapping[str, str] | None = None) -> AgentConfig:
    return load(AgentConfig, toml_path=path, env=os.environ if env is None else env,
                env_prefix=ENV_PREFIX, overrides=overrides)


def example_config(values: Mapping[str, Mapping[str, object]] | None = None) -> str:
    return render_example(AgentConfig, "fedprune agent configuration", values)
