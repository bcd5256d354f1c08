"""The operator's commands as a user runs them: init, enroll, revoke, status, export, and the
exit code and message of a configuration mistake."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import onnx
import onnxruntime as ort
import numpy as np

from fedprune.coordinator.config import CoordinatorConfig, example_config, load_config
from fedprune.coordinator.core.config import LOCAL_HELP, StrategyConfig
from fedprune.coordinator.daemon import CoordinatorDaemon
from fedprune.common.bundle import load_bundle
from fedprune.protocol.hyperparams import HyperParams

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
    assert {(d["device"], d["state"] == "revoked") for d in report["devices"]} == {("pi-1", False), ("pi-2", True)}
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


def helped_keys(text: str) -> dict[str, dict[str, str]]:
    """{table: {key: the comment line above it}} for every key of a rendered config, set or not."""
    found: dict[str, dict[str, str]] = {}
    table, previous = "", ""
    for line in text.splitlines():
        if line.startswith("["):
            table = line[1:line.index("]")]
        elif (key := re.match(r"(\w+) = |# (\w+) =$", line)) and previous.startswith("# "):
            found.setdefault(table, {})[key.group(1) or key.group(2)] = previous[2:]
        previous = line
    return found


def test_init_writes_every_strategy_key_with_its_help_and_loads_back_to_the_defaults(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    cli("init", "--config", config, "--state", tmp_path / "state")
    helped = helped_keys(config.read_text())
    assert helped["strategy"] == {f.name: f.metadata["help"] for f in fields(StrategyConfig) if f.name != "local"}
    assert helped["strategy.local"] == LOCAL_HELP and set(LOCAL_HELP) == {f.name for f in fields(HyperParams)}
    default = CoordinatorConfig()
    loaded = load_config(config, env={})
    assert replace(loaded, state=default.state) == default  # init sets only the state directory
    assert loaded.state.dir == (tmp_path / "state").resolve()


def test_init_renders_strategy_local_settings_given_as_a_table(tmp_path: Path) -> None:
    """``init`` with [strategy.local] values raised TypeError: the table came as a mapping."""
    config = tmp_path / "coordinator.toml"
    config.write_text(example_config({"strategy": {"method": "feddst", "local": {"epochs": 3, "lr": 0.1}}}))
    strategy = load_config(config, env={}).strategy
    assert strategy.method == "feddst" and strategy.local == replace(StrategyConfig().local, epochs=3, lr=0.1)
