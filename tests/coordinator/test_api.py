"""The Python API: a notebook's federation from arrays and a factory, on the simulate command's code."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedprune.common.configkit import ConfigError
from fedprune.coordinator import api
from fedprune.coordinator.config import load_config
from fedprune.coordinator.export import read_metadata


def regression_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    X = rng.standard_normal((n, 6)).astype(np.float32)
    return X, (np.sin(X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * rng.standard_normal(n)).astype(np.float32)


def test_a_regression_simulation_from_arrays_returns_its_history_and_a_model_that_exports(tmp_path):
    rng = np.random.default_rng(0)
    run = api.simulate(model="mlp", model_args={"hidden": [32, 16]}, task="regression",
                       data=regression_data(rng, 600), test=regression_data(rng, 200), n_clients=4, partition="iid",
                       strategy={"rounds": 6, "sparsity": 0.5}, workdir=tmp_path / "run")
    scores = [entry["score"] for entry in run.history]
    assert len(run.history) == 6 and run.result.score_name == "r2"
    assert scores[-1] > 0.3 and scores[-1] > scores[0]
    assert {"mae", "rmse", "r2", "loss"} <= set(run.history[-1])
    X = rng.standard_normal((50, 6)).astype(np.float32)
    with torch.no_grad():
        expected = run.module()(torch.from_numpy(X)).numpy()
    path = run.export(tmp_path / "model.onnx", variant="compact")
    got = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert read_metadata(path.read_bytes())["task"] == "regression"
    assert (tmp_path / "run" / "inputs" / "data.npz").exists()  # arrays reach the devices as files


def test_a_mapping_of_devices_is_one_directory_per_device(tmp_path):
    rng = np.random.default_rng(1)
    devices = {}
    for i in range(3):
        X = rng.standard_normal((80, 1, 8, 8)).astype(np.float32)
        devices[f"site-{i}"] = (X, (X.mean(axis=(1, 2, 3)) > 0).astype(np.int64))
    run = api.simulate(model="cnn2d", model_args={"channels": [4, 8]}, data=devices, test_fraction=0.25,
                       strategy={"rounds": 2, "sparsity": 0.5}, workdir=tmp_path)
    assert sorted(run.result.client_sizes) == ["client000", "client001", "client002"]
    assert run.result.score_name == "accuracy" and "accuracy" in run.history[-1]


@pytest.mark.parametrize("kwargs,match", [
    ({"data": (np.zeros((10, 2)),)}, r"data: expected an \(X, y\) pair"),
    ({"test": "x.npz"}, r"test: a held-out set needs data"),
    ({"model": "mlp", "colour": 3}, r"\[simulation\] unknown keys \['colour'\]"),
    ({"strategy": {"rounds": 0}}, r"\[strategy\] rounds"),
    ({"task": "regression"}, r"\[simulation\] task = 'regression': expected 'classification' with the built-in"),
])
def test_malformed_arguments_are_config_errors_naming_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        api.simulate(**kwargs)


def test_coordinator_config_writes_what_init_writes_with_the_model(tmp_path):
    config = api.coordinator_config(config_path=tmp_path / "coordinator.toml", state_dir=tmp_path / "state",
                                    federation="plant-7", model="tests.nets:recurrent",
                                    model_args={"cell": "lstm", "hidden": 24, "widths": [8, 4]}, input_shape=(3, 50),
                                    num_classes=4,
                                    settings={"rounds": {"total": 30}})
    again = load_config(tmp_path / "coordinator.toml", env={})
    assert again == config
    assert (config.federation.model, dict(config.federation.model_args)) == ("tests.nets:recurrent",
                                                                             {"cell": "lstm", "hidden": 24, "widths": [8, 4]})
    assert config.rounds.total == 30 and (tmp_path / "state").is_dir()
