"""``fedprune-coordinator revoke`` against what runs: a live ``fedprune-coordinator run`` over the
real Mosquitto (the revocation reaches the running daemon within one tick, the open round stops
waiting for the device, and no save or restart brings it back), and a Mosquitto running on the
files ``provision`` wrote (the revoked device is disconnected and can neither log in again nor
read another task).

The devices of the first test are the test itself: genuine keys from their bundles, genuinely
sealed Register and Update messages published with their own broker credentials, so the test
decides who uploads when."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.config import CoordinatorConfig
from fedprune.coordinator.config import model_spec
from fedprune.coordinator.lab.localfed import LocalFederation
from fedprune.coordinator.core.strategy import Strategy
from fedprune.common.bundle import load_bundle
from fedprune.common.models import init_params, model_layout
from fedprune.common.mqtt import BrokerRefused, MqttLink
from fedprune.protocol.channel import AgentChannel
from fedprune.protocol.messages import Register, Update
from fedprune.protocol.sparse import SparseParams
from fedprune.protocol.topics import task_topic
from tests.integration.mosquitto import MosquittoBroker, wait_until
from tests.integration.test_provision import FED, NOT_AUTHORIZED, WAIT_S, needs_passwd, provisioned_broker

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DEADLINE_S = 120.0  # a round that waits for the revoked device would take this long


class Device:
    """One enrolled device, driven by the test: its bundle's keys, its own broker login."""

    def __init__(self, fed: LocalFederation, broker: MosquittoBroker, name: str, config: CoordinatorConfig) -> None:
        bundle = load_bundle(fed.root / "devices" / name / "bundle.json")
        spec = model_spec(config)
        self.layout = model_layout(spec)
        # The daemon's round-1 state, from the same seed and code: the masks of mask_version 0.
        self.initial = Strategy(config.strategy).initial_state(
            self.layout, init_params(spec, config.federation.seed), np.random.default_rng(config.federation.seed))
        self.name = name
        self.channel = AgentChannel(federation=fed.federation, device=name, identity=bundle.identity,
                                    coordinator=bundle.coordinator, layout=self.layout)
        self.channel.remember_masks(self.initial.mask_version, self.initial.masks)
        self.link = MqttLink(broker.link_config(next(d for d in broker.devices if d.username == name)))
        self.link.wait_connected(WAIT_S)

    def register(self) -> None:
        self._send(Register(self.name, cpu_count=1, ram_mb=512, accelerator="none", n_examples=50,
                            agent_version="test", cached_mask_version=self.initial.mask_version))

    def upload(self, round_number: int) -> None:
        trainable = self.layout.subset(spec.name for spec in self.layout.trainable)
        rng = np.random.default_rng(round_number)
        masks = self.initial.masks
        delta = SparseParams.from_dense(trainable, {
            s.name: (rng.normal(0, 1e-3, s.shape) * (masks[s.name] if s.masked else 1)).astype(np.float32)
            for s in trainable}, masks)
        self._send(Update(round=round_number, device=self.name, mask_version=self.initial.mask_version, n_examples=50,
                          metrics={"train_loss": 0.5}, class_losses={}, delta=delta, mask_changed=False))

    def _send(self, message: Register | Update) -> None:
        for publication in self.channel.send(message, time.time()):
            assert self.link.publish(publication.topic, publication.payload, qos=1).wait(WAIT_S)


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedprune-coordinator"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)


def status(fed: LocalFederation) -> dict[str, bool]:
    result = cli("status", "--config", fed.config_path, "--json")
    assert result.returncode == 0, result.stderr
    return {d["device"]: d["state"] == "revoked" for d in json.loads(result.stdout)["devices"]}


def metric(fed: LocalFederation, name: str, labels: str = "") -> float:
    match = re.search(rf"^fedprune_{name}{re.escape(labels)} (\S+)$", fed.metrics_text(), re.M)
    return float(match.group(1)) if match else 0.0


def test_a_revoke_reaches_the_live_daemon_within_a_tick_and_survives_its_saves_and_a_restart(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    names = tuple(d.username for d in mosquitto.devices)
    access = mosquitto.access()
    fed = LocalFederation(root=tmp_path, broker=access, devices=names, federation=mosquitto.federation, rounds=5,
                          settings={"broker": {"username": mosquitto.coordinator.username},
                                    "rounds": {"min_devices": 3, "quorum": 2, "deadline_s": DEADLINE_S,
                                               "reannounce_s": 1.0, "on_missed_quorum": "close"}})
    config = fed.prepare()
    devices = {name: Device(fed, mosquitto, name, config) for name in names}
    log = lambda: fed.log("coordinator")  # noqa: E731
    try:
        fed.start_coordinator()
        fed.wait_for_coordinator(60)
        deadline = time.monotonic() + 60
        while "event=round_open round=1 selected=3" not in log():  # Registers sent before its session may be lost
            assert time.monotonic() < deadline, log()[-3000:]
            for device in devices.values():
                device.register()
            time.sleep(0.5)
        devices["dev-0"].upload(1)
        devices["dev-1"].upload(1)
        wait_until(lambda: log().count("event=update_accepted") == 2, 15, "dev-0's and dev-1's updates")

        # Round 1 now waits for dev-2 only (deadline 120 s); the operator revokes it meanwhile.
        revoked = cli("revoke", "dev-2", "--config", fed.config_path)
        assert revoked.returncode == 0, revoked.stderr
        revoked_at = time.monotonic()
        assert "[broker] password_file is not set" in revoked.stdout  # this broker is not the provisioned one
        wait_until(lambda: "event=device_revoked device=dev-2" in log(), 5, "the daemon to apply the revocation")
        logged = re.search(r"^(\S+ \S+) WARNING \S+ event=device_revoked device=dev-2", log(), re.M).group(1)
        applied_s = datetime.strptime(logged, "%Y-%m-%d %H:%M:%S,%f").timestamp() - (
            fed.state_dir / "allowlist.msgpack").stat().st_mtime
        assert applied_s < 1.0, f"the daemon applied the revocation {applied_s:.3f} s after the file changed"
        history = fed.wait_for_round(1, timeout=10)
        assert time.monotonic() - revoked_at < 10, "the open round waited for the revoked device"
        assert history[0]["received"] == 2 and set(history[0]["scores"]) == {"dev-0", "dev-1"}
        assert metric(fed, "devices_online") == 2 and metric(fed, "revocations_applied_total") == 1

        devices["dev-2"].upload(1)
        devices["dev-2"].register()
        wait_until(lambda: metric(fed, "updates_rejected_total", '{reason="unknown_sender"}') >= 2, 10,
                   "dev-2's update and Register to be rejected as unknown_sender")
        assert "event=update_accepted device=dev-2" not in log()

        # An enrollment while it runs counts too; the daemon's saves (after the round, after dev-0's
        # Register) neither bring dev-2 back nor drop dev-9.
        enrolled = cli("enroll", "dev-9", "--config", fed.config_path, "--out", tmp_path / "dev-9.json")
        assert enrolled.returncode == 0, enrolled.stderr
        wait_until(lambda: "event=device_enrolled device=dev-9" in log(), 5, "the daemon to apply the enrollment")
        devices["dev-0"].register()
        time.sleep(6)  # > REGISTRY_SAVE_S: the batched save has run
        assert status(fed) == {"dev-0": False, "dev-1": False, "dev-2": True, "dev-9": False}

        assert fed.stop_all()["coordinator"] == 0
        fed.start_coordinator()
        wait_until(lambda: log().count("event=mqtt_connected") == 2, 60, "the restarted coordinator's session")
        assert status(fed) == {"dev-0": False, "dev-1": False, "dev-2": True, "dev-9": False}
        deadline = time.monotonic() + 15
        while metric(fed, "updates_rejected_total", '{reason="unknown_sender"}') < 1:
            assert time.monotonic() < deadline, "the restarted daemon did not reject dev-2"
            devices["dev-2"].register()
            time.sleep(0.5)
        print(f"the live daemon applied the revocation {applied_s:.3f} s after revoke wrote the allow-list")
    finally:
        fed.stop_all()
        for device in devices.values():
            device.link.close()


@needs_passwd
def test_a_revoked_device_is_cut_off_a_provisioned_mosquitto_while_connected_and_after(tmp_path: Path) -> None:
    with provisioned_broker(FED, ("dev-1", "dev-2")) as broker:
        passwd = broker.report.out / "passwd"
        assert broker.config.broker.password_file == passwd, "provision tells revoke where the password file is"
        before = passwd.stat()
        coordinator = broker.link(broker.config.broker.username, broker.config.broker.password)
        victim = broker.link("dev-1", broker.device_password("dev-1"), [task_topic(FED)])
        witness = broker.link("dev-2", broker.device_password("dev-2"), [task_topic(FED)])
        try:
            assert coordinator.publish(task_topic(FED), b"task 1").wait(WAIT_S)
            wait_until(lambda: victim.messages.qsize() == 1 and witness.messages.qsize() == 1, WAIT_S, "task 1")

            config = dataclasses.replace(broker.config, broker=dataclasses.replace(
                broker.config.broker, reload_command=f"kill -HUP {broker.pid}"))
            started = time.monotonic()
            done = enrollment.revoke(config, "dev-1")
            assert done.user_removed and "dev-1" not in passwd.read_text()
            wait_until(lambda: not victim.connected, WAIT_S, "Mosquitto to drop dev-1's open session")
            dropped_s = time.monotonic() - started
            after = passwd.stat()
            assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
                before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode)), "Mosquitto must still read it"

            assert coordinator.publish(task_topic(FED), b"task 2").wait(WAIT_S)
            wait_until(lambda: witness.messages.qsize() == 2, WAIT_S, "task 2 at the device still enrolled")
            time.sleep(1.0)  # the victim's link keeps retrying with its old password meanwhile
            assert victim.messages.qsize() == 1 and not victim.connected, "the revoked device read task 2"
            assert victim.refusal is not None and victim.refusal.reason_code == NOT_AUTHORIZED
            assert coordinator.connected and witness.connected

            fresh = MqttLink(dataclasses.replace(victim.config, client_id="dev-1-again"), [(task_topic(FED), 1)])
            try:
                with pytest.raises(BrokerRefused) as refused:
                    fresh.wait_connected(WAIT_S)
                assert refused.value.reason_code == NOT_AUTHORIZED
            finally:
                fresh.close()
            print(f"Mosquitto dropped the revoked device's session {dropped_s:.3f} s after revoke() began")
        finally:
            for link in (coordinator, victim, witness):
                link.close()
