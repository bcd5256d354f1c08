"""Whole federations as real processes: a coordinator daemon and agent daemons over a real
Mosquitto (TLS, password file, ACL), and over the embedded broker."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from fedprune.coordinator.fleet.broker import free_port
from fedprune.coordinator.lab.localfed import BrokerAccess, LocalFederation
from tests.integration.mosquitto import MosquittoBroker, start_mosquitto

pytestmark = pytest.mark.slow

DEVICES = 5


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: run scripts/bootstrap.sh --test-tools")
    server = start_mosquitto(federation="fed1", devices=DEVICES)
    try:
        yield server
    finally:
        server.close()


def federation_on(broker: MosquittoBroker, root: Path, rounds: int, **overrides) -> LocalFederation:
    access = BrokerAccess(
        url=broker.url, ca_file=broker.ca_file, coordinator_password=broker.coordinator.password,
        device_passwords={d.username: d.password for d in broker.devices},
    )
    settings = {"broker": {"username": broker.coordinator.username}, "rounds": {"deadline_s": 20.0}}
    for section, table in overrides.pop("settings", {}).items():
        settings.setdefault(section, {}).update(table)
    federation = LocalFederation(root=root, broker=access, devices=tuple(d.username for d in broker.devices),
                                 rounds=rounds, federation=broker.federation, settings=settings, **overrides)
    federation.prepare()
    return federation


def rounds_of(history: list[dict]) -> list[int]:
    return [h["round"] for h in history]


def test_five_agents_complete_a_federation_and_every_agent_serves_the_final_model(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    fed = federation_on(broker, tmp_path, rounds=8)
    fed.start()
    try:
        history = fed.wait_for_round(8, timeout=180)
        assert fed.processes["coordinator"].wait(timeout=60) == 0, "the coordinator exits 0 after the last round"
        fed.wait_for_release(1, timeout=60)
        codes = fed.stop_all()
    finally:
        fed.stop_all()
    assert rounds_of(history) == list(range(1, 9))
    assert all(h["received"] == DEVICES for h in history)
    final = history[-1]["accuracy"]
    assert final > 0.5, history[-1]
    assert final > history[0]["accuracy"] + 0.2
    assert all(codes[d] == 0 for d in fed.devices), codes
    for device in fed.devices:
        result = fed.infer(device, fed.root / "data" / "holdout.npz")
        assert result.returncode == 0, result.stderr
        accuracy = float(re.search(r"accuracy (\d\.\d+)", result.stderr).group(1))
        assert abs(accuracy - final) < 0.01, (device, accuracy, final)


def test_coordinator_killed_mid_round_resumes_without_losing_or_repeating_rounds(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    fed = federation_on(broker, tmp_path, rounds=6)
    fed.start()
    try:
        fed.wait_for_round(2, timeout=120)
        fed.kill("coordinator")
        killed_at = len(fed.history())
        fed.start_coordinator()
        history = fed.wait_for_round(6, timeout=180)
        assert "event=resumed completed_rounds=%d" % killed_at in fed.log("coordinator")
    finally:
        fed.stop_all()
    assert rounds_of(history) == list(range(1, 7))
    assert history[-1]["accuracy"] > 0.4


def test_broker_restarted_mid_round_agents_and_coordinator_reconnect_and_finish(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    fed = federation_on(broker, tmp_path, rounds=5)
    fed.start()
    try:
        fed.wait_for_round(2, timeout=120)
        broker.restart()
        history = fed.wait_for_round(5, timeout=180)
    finally:
        fed.stop_all()
    assert rounds_of(history) == list(range(1, 6))
    assert len(re.findall(r"event=mqtt_connected", fed.log("coordinator"))) >= 2


def test_an_agent_killed_mid_round_lets_the_round_close_at_its_deadline(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    victim = broker.devices[0].username
    fed = federation_on(
        broker, tmp_path, rounds=3,
        settings={"rounds": {"quorum": DEVICES - 1, "min_devices": DEVICES - 1, "deadline_s": 20.0,
                             "on_missed_quorum": "close"}},
        device_sections={victim: {"agent": {"train_in_subprocess": True}}},
    )
    fed.start_coordinator()
    try:
        fed.wait_for_coordinator()
        fed.start_agent(victim)
        wait_for_log(fed, f"event=registered device={victim}")
        for name in fed.devices[1:]:
            fed.start_agent(name)
        wait_for_log(fed, "event=round_open round=1")
        fed.kill(victim)
        history = fed.wait_for_round(3, timeout=120)
    finally:
        fed.stop_all()
    assert rounds_of(history) == [1, 2, 3]
    first = history[0]
    assert first["received"] == first["selected"] - 1
    assert first["duration_s"] >= 20.0
    assert all(h["received"] == h["selected"] == DEVICES - 1 for h in history[1:])


def wait_for_log(fed: LocalFederation, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in fed.log("coordinator"):
        assert time.monotonic() < deadline, f"no {text!r} in the coordinator log:\n{fed.log('coordinator')[-2000:]}"
        time.sleep(0.05)


def test_the_same_federation_runs_on_the_embedded_broker(tmp_path: Path) -> None:
    fed = LocalFederation(root=tmp_path, broker=BrokerAccess(url=f"mqtt://127.0.0.1:{free_port()}", embedded=True),
                          devices=tuple(f"pi-{i}" for i in range(DEVICES)), rounds=10_000)
    fed.prepare()
    try:
        fed.start()
        fed.wait_for_round(8, timeout=180)
        deadline = time.monotonic() + 10
        while True:  # the counter follows the history line by a moment
            metrics = fed.metrics_text()
            completed = int(float(re.search(r"^fedprune_rounds_completed_total (\S+)$", metrics, re.M).group(1)))
            if completed >= 8 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        codes = fed.stop_all()
    history = fed.history()
    assert rounds_of(history) == list(range(1, len(history) + 1))
    assert history[7]["accuracy"] > 0.4
    assert completed >= 8
    assert re.search(r'fedprune_device_importance\{device="pi-0"\} 0\.\d+', metrics)
    assert codes["coordinator"] == 0


def test_forged_and_replayed_updates_are_rejected_and_counted(broker: MosquittoBroker, tmp_path: Path) -> None:
    """An attacker holding dev-1's broker password but not its key, and a replay of dev-2's
    round-1 update in a later round: both reach the coordinator (the ACL allows the topics),
    both are rejected with a reason, counted in /metrics, and the federation carries on."""
    import numpy as np

    from fedprune.common.mqtt import MqttLink
    from fedprune.protocol.channel import AgentChannel
    from fedprune.protocol.crypto import Identity
    from fedprune.protocol.messages import Update
    from fedprune.protocol.sparse import SparseParams
    from fedprune.protocol.topics import update_topic

    fed = federation_on(broker, tmp_path, rounds=10_000)
    forger_id, replay_id = broker.devices[1], broker.devices[2]
    recorder = MqttLink(broker.link_config(broker.coordinator, client_id="recorder"),
                        subscriptions=[(update_topic(broker.federation, replay_id.username), 1)])
    recorder.wait_connected(10)
    fed.start()
    try:
        fed.wait_for_round(1, timeout=120)
        recorded = []
        while not recorder.messages.empty():
            recorded.append(recorder.messages.get_nowait())
        assert recorded, "the recorder saw no update from dev-2"
        fed.wait_for_round(2, timeout=60)

        coordinator_public = _coordinator_public(fed)
        layout = _federation_layout(fed)
        forger = AgentChannel(federation=broker.federation, device=forger_id.username, identity=Identity.generate(),
                              coordinator=coordinator_public, layout=layout)
        trainable = layout.subset(s.name for s in layout.trainable)
        masks = {s.name: np.ones(s.shape, bool) for s in trainable.masked}
        delta = {s.name: np.full(s.shape, 9.0, np.float32) for s in trainable}
        forged = Update(round=3, device=forger_id.username, mask_version=0, n_examples=10_000, metrics={},
                        class_losses={}, delta=SparseParams.from_dense(trainable, delta, masks))
        with MqttLink(broker.link_config(forger_id, client_id="forger")) as forger_link, \
                MqttLink(broker.link_config(replay_id, client_id="replayer")) as replay_link:
            forger_link.wait_connected(10)
            replay_link.wait_connected(10)
            for topic, payload in forger.send(forged, time.time()):
                assert forger_link.publish(topic, payload).wait(10)
            for topic, payload in recorded:
                assert replay_link.publish(topic, payload).wait(10)
            deadline = time.monotonic() + 30
            while True:
                metrics = fed.metrics_text()
                if 'reason="open_failed"' in metrics and re.search(r'reason="(replayed|stale|duplicate_transfer)"', metrics):
                    break
                assert time.monotonic() < deadline, metrics
                time.sleep(0.2)
        still_going = len(fed.history()) + 3
        fed.wait_for_round(still_going, timeout=60)
    finally:
        recorder.close()
        codes = fed.stop_all()
    history = fed.history()
    assert rounds_of(history) == list(range(1, len(history) + 1))
    assert "event=message_rejected" in fed.log("coordinator")
    assert codes["coordinator"] == 0, "SIGTERM must stop the coordinator cleanly"


def _coordinator_public(fed: LocalFederation):
    from fedprune.common.bundle import load_bundle

    return load_bundle(fed.root / "devices" / fed.devices[0] / "bundle.json").coordinator


def _federation_layout(fed: LocalFederation):
    from fedprune.coordinator.config import load_config
    from fedprune.coordinator.config import model_spec
    from fedprune.common.models import model_layout

    return model_layout(model_spec(load_config(fed.config_path, env={})))
