"""Distributed DP through the deployed daemons (``fedprune.coordinator.api.simulate``): in a secure
federation every device's ledger holds exactly the Skellam cost of its own rounds and the
coordinator's history the noise it planned for; a round that no longer fits a device's budget
stops it before its masked vector leaves; a plain federation is declined with a reason the
coordinator records; and the configurations that cannot work are refused naming the keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedprune.common.configkit import ConfigError
from fedprune.coordinator.api import simulate
from fedprune.coordinator.core.config import StrategyConfig
from fedprune.coordinator.fleet.registry_store import RegistryStore
from fedprune.edge_agent.config import load_config
from fedprune.protocol.distributed_dp import DISTRIBUTED_DP_NEEDS_SECURE, SkellamCost, rdp_round
from fedprune.protocol.rdp import epsilon_from_rdp
from fedprune.edge_agent.core.privacy import DEFAULT_ORDERS, PRIVACY_BUDGET_EXHAUSTED, compute_epsilon
from fedprune.edge_agent.status import device_status
from fedprune.protocol.secagg import SecureParams

N, C, SIGMA = 6, 0.5, 1.0
OFF = {"sparsity": 0.8, "norm_clip": 0.0, "sybil_cos": 0.0, "chance_gate": 0.0}
DP = {"enabled": True, "mechanism": "distributed", "clip_norm": C, "noise_multiplier": SIGMA}


def run(tmp_path: Path, strategy: dict, privacy: dict, rounds: int = 2):
    return simulate(strategy={"rounds": rounds, **OFF, **strategy}, privacy=privacy, n_clients=N, seed=0,
                    partition="iid", workdir=tmp_path)


def ledgers(tmp_path: Path) -> dict[str, dict]:
    return {p.parts[-3]: json.loads(p.read_text())
            for p in (tmp_path / "federation" / "devices").glob("*/state/privacy-*.json")}


def devices(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "federation" / "devices").iterdir())


def test_every_ledger_holds_the_skellam_cost_of_its_own_weight_in_each_round(tmp_path):
    result = run(tmp_path, {"secure": True, "secure_bits": 16, "secure_noise_multiplier": SIGMA},
                 {**DP, "epsilon_budget": 100.0})
    t = SecureParams.for_devices(N, 16).threshold
    expected = {}
    for entry in result.history:
        noise = entry["secure"]["noise"]
        assert entry["secure"]["survivors"] == N and noise["sigma"] == SIGMA and noise["clip_norm"] == C
        share = noise["mu"] / N  # each survivor's μ_dev; the device charges t of them
        for device, score in entry["scores"].items():
            cost = SkellamCost.of_round(C, noise["scale"], noise["dimension"], score["w"], t * share)
            expected[device] = expected.get(device, 0.0) + cost.rdp(DEFAULT_ORDERS)
    found = ledgers(tmp_path)
    assert sorted(found) == sorted(expected) and len(found) == N
    for device, ledger in found.items():
        assert ledger["rounds"] == 2
        np.testing.assert_allclose(ledger["rdp"], expected[device], rtol=1e-9)
    # the coordinator's report: the central ε of the sums so far, at the round's largest weight
    first, second = (e["secure"] for e in result.history)
    rounds_rdp = [rdp_round(e["noise"]["mu"], C, e["noise"]["scale"], e["noise"]["dimension"], e["noise"]["weight_max"])
                  for e in (first, second)]
    assert first["epsilon_total"] == pytest.approx(first["epsilon_round"])
    assert second["epsilon_total"] == pytest.approx(epsilon_from_rdp(sum(rounds_rdp), 1e-5)[0], rel=1e-5)
    assert second["epsilon_total"] > max(first["epsilon_round"], second["epsilon_round"])


def test_a_round_that_no_longer_fits_stops_the_device_before_its_masked_vector_leaves(tmp_path):
    """At 12 bits rounding makes the exact cost at least twice the Gaussian screen applied before
    training: with a budget just above the screen every device trains, then drops out at the
    masking stage, declining with the budget's reason; nothing is charged and no sum is formed."""
    screen = compute_epsilon(SIGMA, 1, 1e-5)
    result = run(tmp_path, {"secure": True, "secure_bits": 12, "secure_noise_multiplier": SIGMA},
                 {**DP, "epsilon_budget": 1.2 * screen}, rounds=1)
    (entry,) = result.history
    assert entry["received"] == N  # stage 1 (keys) went out: the screen let every device train
    assert "failed" in entry["secure"]  # no masked vector arrived
    assert ledgers(tmp_path) == {}
    for state in devices(tmp_path):
        assert [(d["round"], d["reason"]) for d in device_status(state / "state")["declines"]] == [
            (1, PRIVACY_BUDGET_EXHAUSTED)]
    registry = RegistryStore(tmp_path / "federation" / "state").read(90.0)
    assert {r.last_decline["reason"] for r in registry.devices()} == {PRIVACY_BUDGET_EXHAUSTED}


def test_a_plain_federation_of_distributed_dp_devices_is_declined_and_the_coordinator_records_why(tmp_path):
    result = run(tmp_path, {}, {**DP, "epsilon_budget": 100.0}, rounds=1)
    assert [e["received"] for e in result.history] == [0]
    assert ledgers(tmp_path) == {}
    registry = RegistryStore(tmp_path / "federation" / "state").read(90.0)
    assert {r.last_decline["reason"] for r in registry.devices()} == {DISTRIBUTED_DP_NEEDS_SECURE}
    assert len(registry.devices()) == N


def test_configurations_that_cannot_work_are_refused_naming_the_keys():
    with pytest.raises(ConfigError, match=r"\[privacy\] mechanism 'distributed' needs enabled = true"):
        load_config(None, overrides={"privacy.mechanism": "distributed"}, env={})
    with pytest.raises(ConfigError, match=r"privacy.mechanism.*one of 'local', 'distributed'"):
        load_config(None, overrides={"privacy.mechanism": "central"}, env={})
    assert load_config(None, overrides={"privacy.enabled": "true", "privacy.mechanism": "distributed"},
                       env={}).privacy.mechanism == "distributed"
    with pytest.raises(ValueError, match=r"secure_noise_multiplier 1.0 needs secure = true"):
        StrategyConfig(secure_noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"\[strategy\] secure_noise_multiplier -1.0: expected a number >= 0"):
        StrategyConfig(secure=True, secure_noise_multiplier=-1.0)
    assert StrategyConfig(secure=True, secure_noise_multiplier=1.0).secure_noise_multiplier == 1.0
    with pytest.raises(ConfigError, match="secure_noise_multiplier"):
        simulate(strategy={"rounds": 1, "secure_noise_multiplier": 0.5}, n_clients=3)
