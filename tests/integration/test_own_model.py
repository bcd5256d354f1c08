"""A model from a package the user installed, on a real fleet: Mosquitto, a coordinator and three
agent processes. The arguments travel in the signed task, so every device builds the coordinator's
widths; a device with another version of the package builds another layout, declines every round
with the first tensor that differs and both versions, and the federation goes on without it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fedprune.coordinator.lab.localfed import LocalFederation
from tests.integration.mosquitto import MosquittoBroker

pytestmark = pytest.mark.slow

NETS = '''
from torch import nn


def make_model(input_shape, num_outputs, width={default}, cell="gru"):
    """A GRU over (channels, steps) windows; version {version} defaults to width {default}."""
    return Net(input_shape[0], num_outputs, width, cell)


class Net(nn.Module):
    def __init__(self, channels, outputs, width, cell):
        super().__init__()
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(channels, width, batch_first=True)
        self.head = nn.Linear(width, outputs)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(1, 2))
        return self.head(out[:, -1])
'''


def install(site: Path, version: str, default_width: int) -> Path:
    """``sensornet`` as pip leaves an installed package: the module and its dist-info."""
    (site / "sensornet").mkdir(parents=True)
    (site / "sensornet" / "__init__.py").write_text(NETS.format(default=default_width, version=version))
    info = site / f"sensornet-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sensornet\nVersion: {version}\n")
    (info / "top_level.txt").write_text("sensornet\n")
    return site


def sensor_windows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """3-channel windows of 24 steps: class c oscillates at frequency c + 1."""
    y = rng.integers(0, 3, size=n)
    t = np.arange(24) / 24
    phase = rng.uniform(0, 2 * np.pi, size=(n, 3, 1))
    X = np.sin(2 * np.pi * (y[:, None, None] + 1) * t + phase) + 0.3 * rng.standard_normal((n, 3, 24))
    return X.astype(np.float32), y.astype(np.int64)


def test_a_factory_model_trains_on_the_fleet_and_a_mismatched_package_is_refused_by_name(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    current = install(tmp_path / "site-1.1", "1.1.0", 16)
    older = install(tmp_path / "site-1.0", "1.0.0", 8)
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    devices = tuple(d.username for d in mosquitto.devices)
    for name, size in [*((d, 240) for d in devices), ("holdout", 300)]:
        X, y = sensor_windows(rng, size)
        np.savez(data / f"{name}.npz", X=X, y=y)
    stale = devices[2]
    pythonpath = os.pathsep.join(filter(None, [str(current), os.environ.get("PYTHONPATH", "")]))
    fed = LocalFederation(
        root=tmp_path / "fed", broker=mosquitto.access(), devices=devices, rounds=6, federation=mosquitto.federation,
        model="sensornet:make_model", model_args={"cell": "gru"}, input_shape=(3, 24), num_classes=3,
        device_data={name: data / f"{name}.npz" for name in devices}, holdout=data / "holdout.npz",
        env={"PYTHONPATH": pythonpath},
        agent_commands={stale: ("/usr/bin/env", f"PYTHONPATH={older}", sys.executable, "-m", "fedprune.edge_agent.cli")},
        settings={"broker": {"username": mosquitto.coordinator.username}, "metrics": {"port": -1},
                  "rounds": {"deadline_s": 60.0, "reannounce_s": 2.0, "min_devices": 2, "quorum": 2},
                  "strategy": {"sparsity": 0.8, "delta_t": 2, "local": {"optimizer": "adamw", "lr": 0.01}}})
    fed.prepare()
    fed.start()
    try:
        history = fed.wait_for_round(6, timeout=240)
    finally:
        codes = fed.stop_all()
    assert codes["coordinator"] == 0
    # round 1 may close on one update: the stale device's decline withdraws it, and quorum counts
    # the devices still expected
    assert all(entry["received"] == 2 for entry in history[1:]), [e["received"] for e in history]
    assert history[-1]["accuracy"] > 0.6, [e.get("accuracy") for e in history]

    stale_log = fed.log(stale)
    assert "event=layout_mismatch" in stale_log
    assert "sensornet 1.0.0" in stale_log and "sensornet 1.1.0" in stale_log
    assert "rnn.weight_ih_l0 (24, 3) masked here" in stale_log  # width 8 here: 3 gates x 8 rows
    coordinator_log = fed.log("coordinator")
    assert f"event=device_excluded device={stale} reason=layout_mismatch" in coordinator_log
    assert "coordinator_tensor=\"rnn.weight_ih_l0 (48, 3)\"" in coordinator_log or \
        "coordinator_tensor='rnn.weight_ih_l0 (48, 3)'" in coordinator_log or \
        "coordinator_tensor=rnn.weight_ih_l0 (48, 3)" in coordinator_log, coordinator_log[-2000:]
    assert "Traceback" not in stale_log and "Traceback" not in coordinator_log
