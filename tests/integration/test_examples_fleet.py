"""The three example projects on a real fleet, as their READMEs deploy them: Mosquitto, the
coordinator and three agent processes, the model's package importable by all (as `pip install`
leaves it), each device reading its own files with the example's [data] table and the coordinator
its held-out set with the same table. The federation learns, releases its model to every device,
and each device serves it: `fedprune-agent infer` on the held-out files and POST /predict."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedprune.common.configkit import load_section
from fedprune.common.data import load_local_data
from fedprune.common.data_source import DataSource
from fedprune.coordinator.lab.localfed import LocalFederation
from tests.integration.mosquitto import MosquittoBroker

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# example -> (data maker arguments for three small devices, the held-out set, the score it must beat)
CASES = {
    "images": (["--per-device", "160", "--test", "150"], "test", 0.2),
    "sensors": (["--sessions", "2", "--seconds", "90"], "test", 0.2),
    "tabular": (["--days", "14"], "test.csv", 0.0),
}


def read_toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_an_example_learns_on_a_fleet_and_every_device_serves_its_release(
        name: str, mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    maker_args, holdout, floor = CASES[name]
    source = str(EXAMPLES / name / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH", "")]))}
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", f"fedprune_{name}.make_data", "--out", str(data), "--devices", "3",
                    "--seed", "1", *maker_args], check=True, env=env, capture_output=True, timeout=120)
    coordinator, agent = read_toml(EXAMPLES / name / "coordinator.toml"), read_toml(EXAMPLES / name / "agent.toml")
    federation, devices = coordinator["federation"], tuple(d.username for d in mosquitto.devices)
    folders = sorted(p for p in (data / "devices").iterdir() if p.is_dir())
    device_files = {d: (f / "readings.csv" if (f / "readings.csv").exists() else f) for d, f in zip(devices, folders)}
    fed = LocalFederation(
        root=tmp_path / "fed", broker=mosquitto.access(), devices=devices, rounds=5, federation=mosquitto.federation,
        model=federation["model"], model_args=federation.get("model_args", {}), task=federation["task"],
        input_shape=tuple(federation["input_shape"]), num_classes=federation["num_classes"],
        device_data=device_files, holdout=data / holdout, data_section=agent["data"], env={"PYTHONPATH": env["PYTHONPATH"]},
        agent_sections={"inference": {"http_port": 0}},
        settings={"broker": {"username": mosquitto.coordinator.username}, "metrics": {"port": -1},
                  "rounds": {"deadline_s": 120.0, "reannounce_s": 2.0},
                  "strategy": {**coordinator["strategy"], "sparsity": 0.8, "local": coordinator["strategy"]["local"]},
                  "export": {"variant": coordinator["export"]["variant"]}})
    fed.prepare()
    fed.start()
    try:
        history = fed.wait_for_round(5, timeout=300)
        fed.wait_for_release(1, timeout=60)
        served = [json.loads(_post(_predict_url(fed.log(d)), _rows(data / holdout, agent["data"]))) for d in devices]
    finally:
        codes = fed.stop_all()
    assert codes["coordinator"] == 0
    assert all(entry["received"] == 3 for entry in history), [e["received"] for e in history]
    assert history[-1]["score_name"] == {"regression": "r2"}.get(federation["task"], "accuracy")
    assert history[-1]["score"] > floor, [e["score"] for e in history]
    assert "Traceback" not in fed.log("coordinator")

    for device in devices:
        result = fed.infer(device, data / holdout, labels=holdout.endswith(".csv"))  # a table's last column
        assert result.returncode == 0, result.stderr
        summary = result.stderr.strip().splitlines()[-1]  # e.g. "model release 1 (regression): 504 predictions, rmse 41.2"
        assert f"({federation['task']})" in summary and ("accuracy" in summary or "rmse" in summary), summary
        rows = (fed.root / "devices" / device / "predictions.csv").read_text().splitlines()
        assert len(rows) > 10 and rows[0].startswith("row,prediction")
    for reply in served:
        assert reply["model_version"] == 1 and reply["task"] == federation["task"] and len(reply["predictions"]) == 5
        kind = int if federation["task"] == "classification" else float
        assert all(isinstance(p, kind) for p in reply["predictions"])


def _predict_url(log: str) -> str:
    return re.findall(r"event=inference_listening url=(\S+)", log)[-1]


def _rows(path: Path, data_section: dict) -> list:
    """Five held-out samples, read as the device reads its own files, as a JSON request's rows."""
    X, _ = load_local_data(path, load_section(DataSource, data_section, "data"))
    return np.asarray(X[:5]).tolist()


def _post(url: str, rows: list) -> bytes:
    request = urllib.request.Request(url, data=json.dumps({"inputs": rows}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return reply.read()
