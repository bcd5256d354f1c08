"""The three example projects under examples/ work as their READMEs say: the data makers write
files fedprune's loader reads with the example's [data] table, the fleet configs agree with the
simulation's, a short simulation trains, and the trained model exports to ONNX (dense, compact,
int8) that onnxruntime runs as torch does and the Predictor reads as the task's kind."""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedprune.common.data import load_local_data
from fedprune.common.models import ModelSpec, model_layout, module_from_params
from fedprune.coordinator.config import load_config as coordinator_config
from fedprune.coordinator.config import model_spec
from fedprune.coordinator.export import compact_onnx, export_onnx, quantize_int8
from fedprune.coordinator.lab.simulate import SimulationConfig, run_simulation
from fedprune.coordinator.state import StateDir
from fedprune.edge_agent.config import load_config as agent_config
from fedprune.edge_agent.inference import Predictor

from .conftest import EXAMPLES


@dataclass(frozen=True)
class Example:
    name: str
    package: str
    make_args: tuple[str, ...]  # small data: a few seconds of simulation
    test_data: str  # relative to the data maker's --out
    rounds: int = 3
    devices: int = 3
    beats_chance: bool = True  # within `rounds`; the images' CNN only lowers its loss in a short run


CASES = {
    "images": Example("images", "fedprune_images", ("--per-device", "120", "--test", "100"), "test",
                      rounds=8, devices=6, beats_chance=False),
    "sensors": Example("sensors", "fedprune_sensors", ("--sessions", "2", "--seconds", "60"), "test"),
    "tabular": Example("tabular", "fedprune_tabular", ("--days", "10"), "test.csv"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def made(request, tmp_path_factory):
    """An example, its simulate.toml pointed at freshly made data (a few devices), and that data."""
    case = CASES[request.param]
    out = tmp_path_factory.mktemp(case.name)
    importlib.import_module(f"{case.package}.make_data").main(
        ["--out", str(out), "--devices", str(case.devices), "--seed", "1", *case.make_args])
    config = SimulationConfig.from_toml(EXAMPLES / case.name / "simulate.toml")
    config = dataclasses.replace(config, data_dir=str(out / "devices"), test_data=str(out / case.test_data),
                                 strategy=dataclasses.replace(config.strategy, rounds=case.rounds))
    return case, config, out


@pytest.fixture(scope="module")
def trained(made, tmp_path_factory):
    """A few rounds of the example's federation; the result and the last checkpoint's model."""
    case, config, _ = made
    workdir = tmp_path_factory.mktemp(f"{case.name}-federation")
    result = run_simulation(config, workdir=workdir)
    checkpoint = StateDir(workdir / "state").load_latest_checkpoint()
    return result, _fleet_spec(case), checkpoint["params"]


def _fleet_spec(case: Example) -> ModelSpec:
    """The model of the example's coordinator.toml, as the fleet builds it."""
    return model_spec(coordinator_config(EXAMPLES / case.name / "coordinator.toml", env={}))


def test_the_data_maker_writes_what_the_fleet_configs_read(made) -> None:
    """Each device's files, and the test set, load with the [data] of simulate.toml, which is the
    agent.toml's; their samples fit the coordinator.toml's model, as the agent's fit check asks."""
    case, config, out = made
    assert agent_config(EXAMPLES / case.name / "agent.toml", env={}).data == config.source
    spec = _fleet_spec(case)
    assert spec == ModelSpec(config.model, spec.input_shape, spec.num_classes, args=config.model_args, task=config.task)
    devices = sorted((out / "devices").iterdir())
    assert len(devices) == case.devices
    for path in [*devices, out / case.test_data]:
        X, y = load_local_data(path, config.source)
        assert X.dtype == np.float32 and X.shape[1:] == spec.input_shape and len(X) >= 20, path
        if spec.task == "classification":
            assert y.dtype == np.int64 and y.min() >= 0 and y.max() < spec.num_classes
        else:
            assert y.dtype == np.float32 and y.ndim == 1 and y.min() >= 0
    if spec.task == "classification":  # label skew: the devices do not hold the classes alike
        shares = [np.bincount(load_local_data(d, config.source)[1], minlength=spec.num_classes) for d in devices]
        assert len({int(s.argmax()) for s in shares}) > 1


def test_a_short_simulation_trains(trained, made) -> None:
    case, _, _ = made
    result, spec, params = trained
    assert len(result.rounds) == case.rounds and len(result.client_sizes) == case.devices
    assert result.uplink_bytes > 0 and result.downlink_bytes > 0
    assert 0.2 < result.density < 0.6  # sparsity 0.6-0.7 of the masked weights
    last = result.rounds[-1]
    assert math.isfinite(last["loss"])
    if spec.task == "classification":
        assert 0.0 <= last["accuracy"] <= 1.0
        if case.beats_chance:
            assert max(r["accuracy"] for r in result.rounds) >= 1.2 / spec.num_classes
        else:
            assert last["loss"] < result.rounds[0]["loss"]
    else:
        first = result.rounds[0]
        assert last["rmse"] < first["rmse"] and last["mae"] <= last["rmse"]
    assert set(params) == {t.name for t in model_layout(spec)}


def _inputs(made, count: int = 500) -> np.ndarray:
    """Realistic inputs: held-out samples, drawn with replacement and jittered."""
    case, config, out = made
    X, _ = load_local_data(out / case.test_data, config.source)
    rng = np.random.default_rng(0)
    picked = X[rng.integers(len(X), size=count)]
    return (picked + 0.05 * X.std(axis=0) * rng.standard_normal(picked.shape)).astype(np.float32)


def test_the_trained_model_exports_and_serves(trained, made) -> None:
    result, spec, params = trained
    meta = {"federation": "example", "round": len(result.rounds), "mask_version": 1}
    dense = export_onnx(spec, params, metadata=meta)
    compact = compact_onnx(dense)
    X = _inputs(made)
    with torch.no_grad():
        expected = module_from_params(spec, params).eval()(torch.from_numpy(X)).numpy()
    for model in (dense, compact):
        predictor = Predictor(model)
        assert predictor.task == spec.task
        np.testing.assert_allclose(predictor.predict(X), expected, rtol=1e-5, atol=1e-5)
    assert len(compact) < len(dense)
    served = Predictor(compact).predictions(X)
    int8 = Predictor(quantize_int8(dense)).predict(X)
    if spec.task == "classification":
        assert served.dtype == np.int64 and served.shape == (len(X),)
        np.testing.assert_array_equal(served, expected.argmax(axis=1))
        assert np.mean(int8.argmax(axis=1) == served) > 0.9
    else:
        assert served.dtype == np.float32 and served.shape == (len(X),)
        np.testing.assert_allclose(served, expected[:, 0], rtol=1e-5, atol=1e-5)
        assert np.sqrt(np.mean((int8[:, 0] - served) ** 2)) < 0.05 * served.std()
