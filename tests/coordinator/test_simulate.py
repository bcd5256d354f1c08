"""End to end: the simulation (the coordinator and agent daemons over an in-memory broker) learns digits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedprune.coordinator.lab.simulate import SimulationConfig, main, noise_summary, run_simulation
from fedprune.coordinator.core.strategy import StrategyConfig
from fedprune.common.configkit import ConfigError

SMALL = """
[simulation]
name = "tiny"
dataset = "digits"
model = "mlp"
n_clients = 8
partition = "iid"
noisy_fraction = 0.25
seed = 3

[strategy]
method = "fedprune"
rounds = 12
sparsity = 0.8
delta_t = 4
gamma = 0.5
[strategy.local]
epochs = 2
lr = 0.05
"""


def test_small_sparse_federation_learns_digits_and_writes_outputs(tmp_path):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(SMALL)
    assert main(cfg_path, tmp_path / "out", progress=False) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["final_score"] >= 0.7
    assert len(doc["rounds"]) == 12 and len(doc["noisy_clients"]) == 2
    assert any(r["readjust"] for r in doc["rounds"]) and 0.15 < doc["density"] < 0.25
    assert all(r["local_macs"] > 0 for r in doc["rounds"])
    assert all(len(r["scores"]) == 8 and all(s["psi"] is not None for s in r["scores"].values())
               for r in doc["rounds"])
    for png in ("accuracy_vs_round.png", "accuracy_vs_uplink.png", "importance_vs_round.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_simulation_is_reproducible_by_seed():
    cfg = SimulationConfig(n_clients=4, partition="iid", strategy=StrategyConfig(rounds=2, sparsity=0.5))
    a, b = run_simulation(cfg), run_simulation(cfg)
    assert a.rounds == b.rounds and a.final_score == b.final_score
    assert noise_summary(a)["r_noisy"] is None


def test_sparse_uplink_bytes_are_far_below_dense():
    def run(sparsity):
        cfg = SimulationConfig(n_clients=4, partition="iid", strategy=StrategyConfig(
            method="fedavg" if sparsity == 0 else "feddst", rounds=2, sparsity=sparsity, delta_t=1, t_end=2,
            update_values="float32", task_values="float32"))
        return run_simulation(cfg)

    dense, sparse = run(0.0), run(0.8)
    assert dense.uplink_bytes > 4 * 2 * 4 * dense.model_parameters  # float32 values, 4 clients, 2 rounds
    assert sparse.uplink_bytes < 0.3 * dense.uplink_bytes  # round 1 readjusts: masks travel too
    assert sparse.rounds[0]["uplink_bytes"] > sparse.rounds[1]["uplink_bytes"]


@pytest.mark.parametrize("doc,match", [
    ({"simulation": {"dataset": "cifar"}}, r"\[simulation\] dataset = 'cifar': expected one of"),
    ({"simulation": {"n_clients": 0}}, r"n_clients = 0: expected an int >= 1"),
    ({"simulation": {"colour": 1}}, r"unknown keys \['colour'\]"),
    ({"simulation": {"hidden": [32]}}, r"\[simulation\] hidden: a model argument; set it in \[simulation.model_args\]"),
    ({"simulation": {"model": "mypkg.nets"}}, r"\[simulation\] model='mypkg.nets': expected a built-in"),
    ({"simulation": {"model_args": {"hidden": {"a": 1}}}}, r"\[simulation\] model_args: model argument hidden"),
    ({"simulation": {"task": "ranking"}}, r"\[simulation\] task='ranking': expected one of"),
    ({"strategy": {"method": "x"}}, r"\[strategy\] method 'x': expected one of"),
    ({"extra": {}}, r"unknown tables"),
])
def test_config_errors_name_the_key(doc, match):
    with pytest.raises(ConfigError, match=match):
        SimulationConfig.from_dict(doc)


@pytest.mark.parametrize("sim,match", [
    ({"model": "cnn1d"}, r"\[federation\] model 'cnn1d' with arguments \{\}: ValueError: cnn1d needs input_shape \(C, L\)"),
    ({"model": "no_such_pkg.nets:make"}, r"cannot import 'no_such_pkg.nets' .*install the package"),
    ({"model": "mlp", "model_args": {"widths": [8]}}, r"unexpected keyword argument 'widths'.*fix the model arguments"),
])
def test_a_model_that_cannot_be_built_is_refused_before_the_first_round(sim, match):
    cfg = SimulationConfig.from_dict({"simulation": {"n_clients": 2, "partition": "iid", **sim},
                                      "strategy": {"rounds": 1}})
    with pytest.raises(ConfigError, match=match):
        run_simulation(cfg)


def test_missing_or_invalid_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        SimulationConfig.from_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[simulation\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        SimulationConfig.from_toml(bad)


def test_a_simulation_on_cuda_without_a_gpu_is_a_config_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = SimulationConfig(n_clients=2, partition="iid", strategy=StrategyConfig(rounds=1))
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        run_simulation(cfg, device="cuda")
    with pytest.raises(ConfigError, match="expected one of"):
        run_simulation(cfg, device="tpu")


def test_quantised_links_cut_both_directions_keep_accuracy_and_survive_devices_that_miss_tasks():
    """int8 updates with error feedback and int8 changes on the downlink, measured on the real
    encoded messages; with devices away 40 % of the rounds (so tasks they missed go out full),
    every round still gets the same updates as without quantisation."""
    def run(update_values, task_values, availability=1.0):
        cfg = SimulationConfig(n_clients=6, partition="iid", availability=availability, seed=1, strategy=StrategyConfig(
            rounds=10, sparsity=0.8, delta_t=3, update_values=update_values, task_values=task_values))
        return run_simulation(cfg)

    plain, quantised = run("float32", "float32"), run("int8", "int8_delta")
    assert quantised.uplink_bytes < 0.3 * plain.uplink_bytes
    assert quantised.downlink_bytes < 0.35 * plain.downlink_bytes
    assert quantised.final_score >= plain.final_score - 0.03
    away, away_quantised = run("float32", "float32", 0.6), run("int8", "int8_delta", 0.6)
    assert [r["received"] for r in away_quantised.rounds] == [r["received"] for r in away.rounds]
    assert away_quantised.downlink_bytes < 0.6 * away.downlink_bytes  # full tasks in float16
    assert away_quantised.final_score >= away.final_score - 0.05


# ---- own data: the files a fleet's devices would hold, read with the agent's loader


def _digits(n: int):
    from fedprune.coordinator.lab.datasets import load_dataset

    ds = load_dataset("digits", 0)
    return ds.X_train[:n], ds.y_train[:n]


def _own(tmp_path, sim: dict, data: dict | None = None, rounds: int = 2):
    doc = {"simulation": {"seed": 1, **sim}, "strategy": {"rounds": rounds, "sparsity": 0.5}}
    if data is not None:
        doc["data"] = data
    return run_simulation(SimulationConfig.from_dict(doc))


def test_own_image_folders_one_per_device_federate_with_a_held_out_test_set(tmp_path):
    from PIL import Image

    X, y = _digits(240)
    for i, (image, label) in enumerate(zip(X, y)):
        folder = tmp_path / "fleet" / f"pi-{i % 3}" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).astype("uint8"), mode="L").save(folder / f"{i}.png")
    result = _own(tmp_path, {"data_dir": str(tmp_path / "fleet"), "test_fraction": 0.25},
                  {"format": "image_folder", "grayscale": True})
    assert list(result.client_sizes) == ["client000", "client001", "client002"]  # one device per subdirectory
    assert 170 <= sum(result.client_sizes.values()) <= 190  # a quarter of each device's images held out
    assert len(result.rounds) == 2 and result.final_score > 0.2


def test_one_csv_split_by_a_site_column_that_is_not_a_feature(tmp_path):
    X, y = _digits(300)
    sites = np.array(["north", "south", "east"])[np.arange(300) % 3]
    rows = [",".join([site, *map(str, x.reshape(-1)), str(label)]) for site, x, label in zip(sites, X, y)]
    (tmp_path / "all.csv").write_text(",".join(["site", *[f"p{i}" for i in range(64)], "label"]) + "\n" + "\n".join(rows))
    np.savez(tmp_path / "test.npz", X=X[:50].reshape(50, -1), y=y[:50])
    result = _own(tmp_path, {"data": str(tmp_path / "all.csv"), "partition": "column:site", "model": "mlp",
                             "test_data": str(tmp_path / "test.npz")})
    assert sorted(result.client_sizes.values()) == [100, 100, 100]  # test_data given: nothing held out
    assert result.config["partition"] == "column:site" and result.final_score > 0.2


def test_one_data_set_partitioned_like_a_benchmark(tmp_path):
    X, y = _digits(200)
    np.savez(tmp_path / "mine.npz", X=X, y=y)
    result = _own(tmp_path, {"data": str(tmp_path / "mine.npz"), "n_clients": 4, "partition": "iid"}, rounds=1)
    assert len(result.client_sizes) == 4 and 150 <= sum(result.client_sizes.values()) <= 170


@pytest.mark.parametrize("doc, match", [
    ({"simulation": {"data": "a", "data_dir": "b"}}, r"\[simulation\] data_dir = 'b': expected either data_dir"),
    ({"simulation": {"partition": "column:site"}}, r"\[simulation\] partition = 'column:site': expected data = a CSV"),
    ({"simulation": {"partition": "column:"}}, r"\[simulation\] partition = 'column:': expected one of"),
    ({"simulation": {"test_data": "t.npz"}}, r"\[simulation\] test_data = 't.npz': expected data or data_dir"),
    ({"simulation": {"data": "a", "test_fraction": 1.5}}, r"\[simulation\] test_fraction = 1.5: expected a number in \(0, 1\)"),
    ({"simulation": {"data_dir": "d", "eval_split": "validation"}}, r"\[simulation\] eval_split = 'validation'"),
    ({"simulation": {"data": "a"}, "data": {"format": "sensor_csv"}}, r"\[data\] window: sensor_csv needs window"),
    ({"simulation": {"data": "a"}, "data": {"colour": 1}}, r"\[data\] colour: unknown key"),
])
def test_own_data_config_errors_name_the_key(doc, match):
    with pytest.raises(ConfigError, match=match):
        SimulationConfig.from_dict(doc)


def test_own_data_problems_at_run_name_the_key_and_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"\[simulation\] data_dir .*empty.*one subdirectory per device"):
        _own(tmp_path, {"data_dir": str(tmp_path / "empty")})
    (tmp_path / "empty" / "pi-1").mkdir()
    with pytest.raises(ConfigError, match=r"\[simulation\] data_dir: .*pi-1: no \.npz or \.csv files"):
        _own(tmp_path, {"data_dir": str(tmp_path / "empty")})
    (tmp_path / "reg.csv").write_text("".join(f"{i},{i / 3}\n" for i in range(20)))
    with pytest.raises(ConfigError, match=r"\[simulation\] data: the simulation trains a classifier"):
        _own(tmp_path, {"data": str(tmp_path / "reg.csv"), "n_clients": 2, "partition": "iid"})
    (tmp_path / "t.csv").write_text("site,a,label\nx,1,0\n")
    with pytest.raises(ConfigError, match=r"partition 'column:user': .*t\.csv has no column 'user'"):
        _own(tmp_path, {"data": str(tmp_path / "t.csv"), "partition": "column:user"})
    np.savez(tmp_path / "ok.npz", X=np.zeros((40, 3)), y=np.arange(40) % 2)
    with pytest.raises(ConfigError, match=r"\[simulation\] test_data: .*missing\.npz: no such file"):
        _own(tmp_path, {"data": str(tmp_path / "ok.npz"), "test_data": str(tmp_path / "missing.npz"),
                        "n_clients": 2, "partition": "iid"})
