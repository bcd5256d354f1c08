"""AgentConfig: every knob of the device agent, declared once.

defaults < TOML (``--config``) < ``FEDPRUNE_AGENT_<SECTION>_<KEY>`` < ``--set section.key=value``.
This module is the only reader of ``os.environ`` on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from edge_agent.configkit import in_range, load, one_of, render_example, setting

ENV_PREFIX = "FEDPRUNE_AGENT_"


@dataclass(frozen=True)
class AgentSection:
    """Where the agent finds its enrollment, its data and its state."""

    bundle: Path = setting(Path("/etc/fedprune/bundle.json"), "enrollment bundle made by `fedprune-coordinator enroll`")
    data: Path = setting(Path("/var/lib/fedprune-agent/data"), "local training data: a .npz (X, y) or CSV file, or a directory of them")
    state_dir: Path = setting(Path("/var/lib/fedprune-agent"), "state directory (audit log, models, cached updates)")
    device: str = setting("cpu", "where to train: cpu, cuda (Jetson) or auto", check=one_of("cpu", "cuda", "auto"))
    threads: int = setting(0, "torch threads for training; 0 lets torch decide", check=in_range(0, 256))
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


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    broker: BrokerOverride = field(default_factory=BrokerOverride)
    inference: InferenceSection = field(default_factory=InferenceSection)


def load_config(path: Path | None, overrides: Mapping[str, str] | None = None,
                env: Mapping[str, str] | None = None) -> AgentConfig:
    return load(AgentConfig, toml_path=path, env=os.environ if env is None else env,
                env_prefix=ENV_PREFIX, overrides=overrides)


def example_config(values: Mapping[str, Mapping[str, object]] | None = None) -> str:
    return render_example(AgentConfig, "fedprune agent configuration", values)
