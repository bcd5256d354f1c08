"""Quantised links in a real federation: Mosquitto, a coordinator and three agent processes.
int8 updates with error feedback and int8 task changes cut both links to about a quarter of the
float32 run's bytes per device per round, and an agent killed with SIGKILL mid-federation comes
back, gets the full weights (it holds none) and keeps its error-feedback residual from disk."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from fedprune.coordinator.lab.localfed import LocalFederation
from fedprune.edge_agent.core.held_weights import HeldWeights
from tests.integration import daemons
from tests.integration.mosquitto import MosquittoBroker, start_mosquitto

pytestmark = pytest.mark.slow


def federation(broker: MosquittoBroker, root: Path, rounds: int, **strategy) -> LocalFederation:
    access = broker.access()
    fed = LocalFederation(root=root, broker=access, devices=tuple(d.username for d in broker.devices), rounds=rounds,
                          federation=broker.federation, partition="iid",
                          settings={"broker": {"username": broker.coordinator.username}, "metrics": {"port": -1},
                                    "rounds": {"deadline_s": 60.0, "reannounce_s": 2.0},
                                    "strategy": {"sparsity": 0.8, "delta_t": 4, **strategy}})
    fed.prepare()
    return fed


def steady(history: list[dict]) -> tuple[float, float]:
    """Median update bytes per device and task bytes, over rounds that carry no masks."""
    rows, before = [], 0
    for entry in history:
        if entry["round"] > 1 and not entry["readjust"] and entry["update_bytes"]:
            rows.append((statistics.fmean(entry["update_bytes"].values()), entry["cum_bytes_out"] - before))
        before = entry["cum_bytes_out"]
    return statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)


def test_int8_links_cost_a_quarter_and_survive_an_agent_killed_mid_federation(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    plain = federation(mosquitto, tmp_path / "float32", rounds=8, update_values="float32", task_values="float32")
    plain.start()
    try:
        plain_history = plain.wait_for_round(8, timeout=180)
    finally:
        plain.stop_all()

    second = start_mosquitto(federation=mosquitto.federation, devices=len(mosquitto.devices))
    try:
        fed = federation(second, tmp_path / "int8", rounds=24)  # the defaults: int8 updates, int8 task changes
        fed.start()
        victim = fed.devices[1]
        residual = fed.root / "devices" / victim / "state" / f"residual-{second.federation}.npz"
        try:
            fed.wait_for_round(5, timeout=180)
            assert residual.exists()
            fed.kill(victim)  # SIGKILL: no last words, whatever it was doing
            fed.start_agent(victim)
            history = fed.wait_for_round(24, timeout=240)
        finally:
            codes = fed.stop_all()
        assert codes["coordinator"] == 0
        assert all(entry["received"] == 3 for entry in history), [e["received"] for e in history]
        assert "event=residual_unreadable" not in fed.log(victim)
        assert all((fed.root / "devices" / d / "state" / f"residual-{second.federation}.npz").exists()
                   for d in fed.devices)
        assert fed.log("coordinator").count(f"event=registered device={victim} ") >= 2  # killed before the end
        assert "reason=missing_base" not in fed.log("coordinator")  # its register made the task full
    finally:
        second.close()

    plain_update, plain_task = steady(plain_history)
    update, task = steady(history)
    assert update < 0.3 * plain_update and task < 0.3 * plain_task
    assert history[-1]["accuracy"] >= plain_history[-1]["accuracy"] - 0.05


def test_a_device_that_lost_the_base_of_a_change_declines_and_is_sent_the_whole_weights(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """The coordinator believes the device holds the last task's weights (it never registered
    again), but the device lost them: it declines with missing_base, and the re-announcement
    carries the held weights in float32, from which it trains."""
    fed = daemons.federation(mosquitto, tmp_path, total=4, deadline_s=60.0)
    coordinator = daemons.connected_coordinator(fed)
    agent = daemons.connected_agent(fed, "dev-0")
    try:
        deadline = time.monotonic() + 60
        while coordinator.completed < 2:
            assert time.monotonic() < deadline, "rounds 1-2 did not complete"
            daemons.step(coordinator, agent)
        assert "dev-0" in coordinator.downlink.holders
        agent.held = HeldWeights()  # as if the broker had dropped the last task on its way
        while coordinator.completed < 3:
            assert time.monotonic() < deadline, "round 3 did not complete"
            daemons.step(coordinator, agent)
        assert coordinator.metrics.value("rounds_declined_total", reason="missing_base") == 1
        assert coordinator.state_dir.read_history()[-1]["received"] == 1
        held = agent.held.of_round(3)
        assert all(held[name].tobytes() == coordinator.downlink.held[name].tobytes() for name in held)
    finally:
        agent.link.close()
        coordinator.link.close()
