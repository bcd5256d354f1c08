"""The simulation is the deployment's round code on an in-memory link: the coordinator daemon
checkpoints every round, each device's agent daemon trains, privatises, seals and audits what it
sends, and an option a fleet refuses is refused by the simulation with the same message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedprune.common.configkit import ConfigError
from fedprune.coordinator.config import ADAPTIVE_DENSITY_REFUSED
from fedprune.coordinator.core.strategy import StrategyConfig
from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.lab.simulate import SimulationConfig, run_simulation, write_outputs
from fedprune.coordinator.state import StateDir
from fedprune.edge_agent.audit import AuditLog
from fedprune.edge_agent.config import PrivacySection
from tests.coordinator.test_cli_errors import assert_user_error, coordinator

SMALL = SimulationConfig(n_clients=4, partition="iid", seed=1,
                         strategy=StrategyConfig(method="fedprune", rounds=3, sparsity=0.8, delta_t=1))


def test_the_simulation_runs_the_deployed_daemons_and_counts_the_bytes_they_sent(tmp_path: Path) -> None:
    result = run_simulation(SMALL, workdir=tmp_path)
    history = StateDir(tmp_path / "state").read_history()
    assert [h["round"] for h in history] == [1, 2, 3]
    assert [h["accuracy"] for h in history] == [r["accuracy"] for r in result.rounds]
    devices = sorted(p.name for p in (tmp_path / "devices").iterdir())
    assert devices == ["client000", "client001", "client002", "client003"]
    sent = 0
    for device in devices:
        records = list(AuditLog(tmp_path / "devices" / device / "state" / "audit.jsonl").records())
        assert sorted({r.round for r in records if r.message_type == "update"}) == [1, 2, 3]
        *in_rounds, goodbye = records  # the offline status of the agent's shutdown, after the last round
        assert goodbye.message_type == "status"
        sent += sum(r.bytes for r in in_rounds)
        assert list((tmp_path / "devices" / device / "state" / "models").glob("*.onnx")), "the release reached it"
    assert result.uplink_bytes == sent  # every byte an agent published, as its own audit log records it
    assert result.release_bytes > 0


def test_client_level_privacy_runs_in_the_simulation_as_on_a_device(tmp_path: Path) -> None:
    privacy = PrivacySection(enabled=True, clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=50.0)
    config = SimulationConfig(**{**SMALL.__dict__, "privacy": privacy})
    first = run_simulation(config, workdir=tmp_path / "a")
    assert [r["received"] for r in first.rounds] == [4, 4, 4]
    ledgers = list((tmp_path / "a" / "devices").glob("*/state/privacy-simulation.json"))
    assert len(ledgers) == 4 and all(json.loads(p.read_text())["rounds"] == 3 for p in ledgers)
    assert run_simulation(config, workdir=tmp_path / "b").rounds == first.rounds  # the noise is seeded here


def test_intermittent_clients_drop_out_and_register_again() -> None:
    config = SimulationConfig(**{**SMALL.__dict__, "availability": 0.5, "n_clients": 6,
                                 "strategy": StrategyConfig(rounds=6, sparsity=0.5)})
    result = run_simulation(config)
    assert len(result.rounds) == 6
    assert {r["selected"] for r in result.rounds} != {6}  # some rounds ran without the absent ones


def test_adaptive_density_is_refused_alike_by_simulate_and_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        SimulationConfig.from_dict({"strategy": {"adaptive_density": True}})
    assert str(refused.value) == ADAPTIVE_DENSITY_REFUSED
    sim = tmp_path / "sim.toml"
    sim.write_text("[strategy]\nadaptive_density = true\n")
    assert_user_error(coordinator("simulate", "--config", sim, "--out", tmp_path / "out"), ADAPTIVE_DENSITY_REFUSED)
    config = tmp_path / "coordinator.toml"
    enrollment.init(config_path=config, state_dir=tmp_path / "state", federation="fed1",
                    broker_url="mqtt://127.0.0.1:1883", embedded_broker=False)
    assert_user_error(coordinator("run", "--config", config, "--set", "strategy.adaptive_density=true"),
                      ADAPTIVE_DENSITY_REFUSED)


def test_devices_out_of_privacy_budget_decline_and_the_rounds_still_close(tmp_path: Path) -> None:
    """ε 8 at σ 1 pays for two rounds: then every device declines, as on a fleet, and the results still write."""
    config = SimulationConfig(**{**SMALL.__dict__, "privacy": PrivacySection(enabled=True),
                                 "strategy": StrategyConfig(rounds=4, sparsity=0.5)})
    result = run_simulation(config)
    assert [r["received"] for r in result.rounds] == [4, 4, 0, 0]
    assert write_outputs(result, tmp_path)


def test_rarely_available_clients_still_make_every_round() -> None:
    config = SimulationConfig(**{**SMALL.__dict__, "availability": 0.05, "strategy": StrategyConfig(rounds=3)})
    assert [r["selected"] >= 1 for r in run_simulation(config).rounds] == [True] * 3


def test_a_kept_federation_is_not_resumed_by_the_next_run(tmp_path: Path) -> None:
    run_simulation(SMALL, workdir=tmp_path)
    with pytest.raises(ConfigError, match="not empty"):
        run_simulation(SMALL, workdir=tmp_path)
