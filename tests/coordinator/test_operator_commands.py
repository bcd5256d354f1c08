"""The operator's commands as a user runs them: init, enroll, revoke, status, export, and the
exit code and message of a configuration mistake."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import numpy as np

from fedprune.coordinator.config import load_config
from fedprune.coordinator.daemon import CoordinatorDaemon
from fedprune.common.bundle import load_bundle

BIN = Path(sys.executable).parent


def cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedprune-coordinator"), *map(str, args)], capture_output=True, text=True,
                          check=check, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_init_enroll_revoke_status_and_export(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    cli("init", "--config", config, "--state", tmp_path / "state", "--federation", "plant-7")
    key = tmp_path / "state" / "keys" / "coordinator.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert "[rounds]" in config.read_text() and 'id = "plant-7"' in config.read_text()

    cli("enroll", "pi-1", "--config", config, "--out", tmp_path / "pi-1.json", "--broker-password", "pw")
    cli("enroll", "pi-2", "--config", config, "--out", tmp_path / "pi-2.json")
    bundle = load_bundle(tmp_path / "pi-1.json")
    assert (bundle.federation, bundle.device_id, bundle.broker_password) == ("plant-7", "pi-1", "pw")
    again = cli("enroll", "pi-1", "--config", config, "--out", tmp_path / "again.json", check=False)
    assert again.returncode == 78 and "already enrolled" in again.stderr
    assert not (tmp_path / "again.json").exists()

    cli("revoke", "pi-2", "--config", config)
    report = json.loads(cli("status", "--config", config, "--json").stdout)
    assert report["federation"] == "plant-7" and report["completed_rounds"] == 0
    assert {(d["id"], d["revoked"]) for d in report["devices"]} == {("pi-1", False), ("pi-2", True)}
    assert "pi-1" in cli("status", "--config", config).stdout

    CoordinatorDaemon(load_config(config, env={}))  # writes the round-0 checkpoint, touches no broker
    model = tmp_path / "model.onnx"
    out = cli("export", "--config", config, "--out", model, "--variant", "dense").stdout
    assert "round 0" in out
    onnx.checker.check_model(onnx.load(model))
    session = ort.InferenceSession(str(model))
    logits = session.run(None, {session.get_inputs()[0].name: np.zeros((3, 64), np.float32)})[0]
    assert logits.shape == (3, 10)


def test_a_wrong_config_value_exits_78_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    cli("init", "--config", config, "--state", tmp_path / "state")
    result = cli("status", "--config", config, "--set", "rounds.deadline_s=-3", check=False)
    assert result.returncode == 78
    assert "[rounds] deadline_s" in result.stderr or "rounds.deadline_s" in result.stderr
    result = cli("run", "--config", tmp_path / "absent.toml", check=False)
    assert result.returncode == 78 and "does not exist" in result.stderr


def test_init_refuses_to_overwrite_a_config(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    cli("init", "--config", config, "--state", tmp_path / "state")
    result = cli("init", "--config", config, "--state", tmp_path / "state", check=False)
    assert result.returncode == 78 and "--force" in result.stderr
