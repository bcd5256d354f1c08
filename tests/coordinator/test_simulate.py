"""End to end: the simulation (the coordinator and agent daemons over an in-memory broker) learns digits."""

from __future__ import annotations

import json

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
    assert doc["final_accuracy"] >= 0.7
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
    assert a.rounds == b.rounds and a.final_accuracy == b.final_accuracy
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
    ({"simulation": {"hidden": [32]}}, r"\[simulation\] hidden: no longer a simulation setting"),
    ({"strategy": {"method": "x"}}, r"\[strategy\] method 'x': expected one of"),
    ({"simulation": {"model": "cnn1d"}}, r"model: cnn1d needs"),
    ({"extra": {}}, r"unknown tables"),
])
def test_config_errors_name_the_key(doc, match):
    with pytest.raises(ConfigError, match=match):
        SimulationConfig.from_dict(doc)


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
    assert quantised.final_accuracy >= plain.final_accuracy - 0.03
    away, away_quantised = run("float32", "float32", 0.6), run("int8", "int8_delta", 0.6)
    assert [r["received"] for r in away_quantised.rounds] == [r["received"] for r in away.rounds]
    assert away_quantised.downlink_bytes < 0.6 * away.downlink_bytes  # full tasks in float16
    assert away_quantised.final_accuracy >= away.final_accuracy - 0.05
