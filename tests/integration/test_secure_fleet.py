"""Secure aggregation (SecAgg+) on a real fleet: Mosquitto, the coordinator and six agent
processes, with ``[strategy] secure = true``. The coordinator learns only the weighted sum of each
round: the broker never carries a plaintext ``Update``, only the secure stages. Contribution
weighting still works from what devices report before they mask (per-class losses), so devices
with noisy labels lose weight. A device killed in the middle of the secure stages drops out
(SecAgg+ recovers its masks) and the round still closes on the others' sum. A configuration that
would give updates away, or that needs each device's update, is refused at start (exit 78)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from fedprune.common.mqtt import MqttLink
from fedprune.coordinator.lab.localfed import BIN, BrokerAccess, LocalFederation
from fedprune.protocol.chunks import Reassembler
from fedprune.protocol.envelope import parse_header
from fedprune.protocol.messages import Kind
from fedprune.protocol.topics import coordinator_filters, parse_topic
from tests.integration.mosquitto import MosquittoBroker, mosquitto_for_test, wait_until

pytestmark = pytest.mark.slow

DEVICES = 6
NOISY = ("dev-4", "dev-5")
SECURE_UPLINKS = {Kind.SECURE_KEYS, Kind.SECURE_SHARES, Kind.SECURE_MASKED, Kind.SECURE_REVEAL}


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    yield from mosquitto_for_test(devices=DEVICES)


def secure_federation(broker: MosquittoBroker, root: Path, rounds: int, rounds_section: dict | None = None,
                      **overrides) -> LocalFederation:
    settings = {"broker": {"username": broker.coordinator.username}, "metrics": {"port": -1},
                "rounds": {"deadline_s": 20.0, "reannounce_s": 2.0, **(rounds_section or {})},
                "strategy": {"secure": True}}
    fed = LocalFederation(root=root, broker=broker.access(), devices=tuple(d.username for d in broker.devices),
                          rounds=rounds, federation=broker.federation, settings=settings, **overrides)
    fed.prepare()
    return fed


class Spy:
    """Every uplink the broker carries (a client with the coordinator's login, which may read
    them all), as (device, envelope kind, round) from each reassembled envelope's clear header."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.link = MqttLink(broker.link_config(broker.coordinator, client_id="secure-spy"),
                             subscriptions=[(f, 1) for f in coordinator_filters(broker.federation)])
        self.link.wait_connected(10)
        self.reassembler = Reassembler(max_payload=1 << 24)
        self.seen: list[tuple[str, Kind, int]] = []
        self.payloads = 0

    def drain(self) -> list[tuple[str, Kind, int]]:
        while True:
            try:
                topic, payload = self.link.messages.get_nowait()
            except queue.Empty:
                return self.seen
            if not payload:
                continue
            self.payloads += 1
            envelope = self.reassembler.feed(payload, time.time(), topic)
            if envelope is not None:
                header, _ = parse_header(envelope)
                self.seen.append((parse_topic(topic).device, header.kind, header.round))

    def saw(self, device: str, kind: Kind, round_number: int) -> bool:
        return (device, kind, round_number) in self.drain()

    def close(self) -> None:
        self.link.close()


def wait_for_log(fed: LocalFederation, name: str, pattern: str, timeout: float = 60.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, fed.log(name))
        if found:
            return found
        process = fed.processes.get(name)
        assert process is None or process.poll() is None, \
            f"{name} exited {process.returncode}:\n{fed.log(name)[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} in {name}'s log:\n{fed.log(name)[-3000:]}"
        time.sleep(0.01)


def test_a_secure_federation_learns_weighs_noisy_devices_down_and_never_carries_a_plain_update(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    rounds = 6
    fed = secure_federation(broker, tmp_path, rounds=rounds, noisy=NOISY)
    spy = Spy(broker)
    fed.start()
    try:
        history = fed.wait_for_round(rounds, timeout=240)
        assert fed.processes["coordinator"].wait(timeout=60) == 0, "the coordinator exits 0 after the last round"
        # every secure stage of every device and round reached the broker (the spy may trail the coordinator)
        expected = {(d, k, r) for d in fed.devices for k in SECURE_UPLINKS for r in range(1, rounds + 1)}
        wait_until(lambda: expected <= set(spy.drain()), 10, "every secure stage on the spy's link")
    finally:
        codes = fed.stop_all()
        spy.close()
    assert all(codes[d] == 0 for d in fed.devices), codes
    devices = set(fed.devices)

    assert [h["round"] for h in history] == list(range(1, rounds + 1))
    for entry in history:
        assert entry["secure"] == {"survivors": DEVICES, "dropped": []}, entry
        assert entry["received"] == entry["n_valid"] == DEVICES, entry
        assert set(entry["scores"]) == devices, entry["scores"]
        for device, score in entry["scores"].items():
            assert score["update_norm"] is None and score["psi"] is None, (device, score)
            assert score["gated_by"] == "", (device, score)
        assert abs(sum(s["w"] for s in entry["scores"].values()) - 1.0) < 1e-6
    accuracy = [h["accuracy"] for h in history]
    assert accuracy[-1] > 0.6 and accuracy[-1] > accuracy[0] + 0.2, accuracy  # chance: 0.1

    last = history[-1]["scores"]
    honest = [last[d]["q"] for d in devices - set(NOISY)]
    noisy = [last[d]["q"] for d in NOISY]
    assert max(noisy) < 0.5 * min(honest), (noisy, honest)
    assert max(last[d]["w"] for d in NOISY) < min(last[d]["w"] for d in devices - set(NOISY)), last

    # The broker carried registrations, statuses and the four secure stages of every device and
    # round, and never an Update.
    kinds = Counter(kind for _, kind, _ in spy.seen)
    assert Kind.UPDATE not in kinds, kinds
    assert set(kinds) <= {Kind.REGISTER, Kind.STATUS} | SECURE_UPLINKS, kinds
    assert {r for _, k, r in spy.seen if k in SECURE_UPLINKS} == set(range(1, rounds + 1))

    log = fed.log("coordinator")
    assert "Traceback" not in log
    assert len(re.findall(r"event=defences_off", log)) == 1, log[:3000]
    assert re.search(r"^\S+ \S+ WARNING \S+ event=defences_off reason=secure_aggregation "
                     r"defences=norm_clip,sybil_cos,chance_gate ", log, re.M), log[:3000]
    for round_number in range(1, rounds + 1):
        stages = re.findall(rf"event=secure_stage round={round_number} stage=(\w+)", log)
        assert stages == ["shares", "masked", "reveal"], (round_number, stages)
    assert "reason=wrong_mode" not in log and "event=secure_round_failed" not in log
    assert "event=secure_stage_rejected" not in log
    for device in fed.devices:
        agent_log = fed.log(device)
        assert "Traceback" not in agent_log
        for stage in ("SecureShares", "SecureMasked", "SecureReveal"):
            assert len(re.findall(rf"event=secure_stage round=\d+ stage={stage}", agent_log)) == rounds, (device, stage)


def test_a_device_killed_between_its_shares_and_its_masked_vector_drops_out_and_the_round_closes(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    """Deterministic staging with SIGSTOP: ``gate`` is frozen before it reports, so stage 1 cannot
    close; ``holder`` is frozen after it reported, so the shares stage cannot close; then the
    victim's shares reach the broker and it is killed before anyone masks. The shares stage
    completes with all six; the victim's last will tells the coordinator it is gone, so the masked
    stage closes on the other five without waiting out its deadline; the survivors reveal shares
    of its mask key, so the sum of the other five unmasks. Later rounds
    run on the five."""
    victim, holder, gate = "dev-0", "dev-1", "dev-2"
    stage_s = 15.0  # each stage's deadline (deadline_s): room for stage 1 with the gate frozen, then training
    fed = secure_federation(
        broker, tmp_path, rounds=10_000, rounds_section={"min_devices": DEVICES - 1, "quorum": DEVICES - 1,
                                                         "deadline_s": stage_s},
        # the gate trains in a child process: it cannot have reported within the moment it takes
        # to freeze it after the round opens
        device_sections={gate: {"agent": {"train_in_subprocess": True}}},
    )
    spy = Spy(broker)
    fed.start()
    stopped: list[str] = []
    try:
        for device in fed.devices:
            wait_for_log(fed, "coordinator", rf"event=registered device={device}\b")
        opened = re.findall(r"event=round_open round=(\d+)", fed.log("coordinator"))
        target = int(opened[-1]) + 1 if opened else 1  # the first round opened with all six online
        wait_for_log(fed, "coordinator", rf"event=round_open round={target} selected={DEVICES}\b")
        os.kill(fed.processes[gate].pid, signal.SIGSTOP)
        stopped.append(gate)
        assert not re.search(rf"event=update_accepted device={gate} round={target}\b", fed.log("coordinator"))

        for device in (victim, holder):
            wait_for_log(fed, "coordinator", rf"event=update_accepted device={device} round={target}\b")
        os.kill(fed.processes[holder].pid, signal.SIGSTOP)
        stopped.append(holder)
        assert not re.search(rf"event=(update_accepted device={gate} round={target}|secure_stage round={target})\b",
                             fed.log("coordinator")), "stage 1 closed before the gate was frozen"
        os.kill(fed.processes[gate].pid, signal.SIGCONT)
        stopped.remove(gate)

        wait_for_log(fed, "coordinator", rf"event=secure_stage round={target} stage=shares devices={DEVICES}\b")
        wait_until(lambda: spy.saw(victim, Kind.SECURE_SHARES, target), 30, "the victim's shares on the broker")
        assert not re.search(rf"event=secure_stage round={target} stage=masked", fed.log("coordinator"))
        fed.kill(victim)
        os.kill(fed.processes[holder].pid, signal.SIGCONT)
        stopped.remove(holder)

        history = fed.wait_for_round(target + 2, timeout=120)
    finally:
        for device in stopped:
            os.kill(fed.processes[device].pid, signal.SIGCONT)
        codes = fed.stop_all()
        spy.close()
    others = set(fed.devices) - {victim}
    assert codes["coordinator"] == 0 and all(codes[d] == 0 for d in others), codes

    entry = history[target - 1]
    assert entry["round"] == target
    assert entry["received"] == DEVICES, entry  # its keys and report arrived in stage 1
    assert entry["secure"] == {"survivors": DEVICES - 1, "dropped": [victim]}, entry["secure"]
    assert entry["n_valid"] == DEVICES - 1
    assert entry["scores"][victim]["gated_by"] == "dropped", entry["scores"][victim]
    assert all(entry["scores"][d]["gated_by"] == "" for d in others), entry["scores"]
    # its last will reached the coordinator during the shares stage: the masked stage did not wait for it
    assert entry["duration_s"] < stage_s, "the masked stage waited out its deadline for a device known gone"
    for later in history[target:target + 2]:
        assert later["secure"] == {"survivors": DEVICES - 1, "dropped": []}, later
        assert set(later["scores"]) == others, later["scores"]
    assert history[target + 1]["accuracy"] > 0.3, [h["accuracy"] for h in history]

    log = fed.log("coordinator")
    assert re.findall(rf"event=secure_stage round={target} stage=(\w+)", log) == ["shares", "masked", "reveal"]
    assert re.search(rf"event=secure_stage round={target} stage=reveal devices={DEVICES - 1}\b", log), log[-3000:]
    assert "event=secure_round_failed" not in log and "Traceback" not in log
    assert re.search(rf"event=device_offline device={victim}\b", log)


def toml_with(text: str, section: str, **values: object) -> str:
    """``text`` with ``key = value`` lines of ``[section]`` replaced (each key must be there)."""
    head = re.search(rf"^\[{re.escape(section)}\].*$", text, re.M)
    end = re.search(r"^\[", text[head.end():], re.M)
    body_end = head.end() + (end.start() if end else len(text) - head.end())
    body = text[head.end():body_end]
    for key, value in values.items():
        literal = f'"{value}"' if isinstance(value, str) else str(value)
        body, count = re.subn(rf"^{key} = .*$", f"{key} = {literal}", body, flags=re.M)
        assert count == 1, (section, key)
    return text[:head.end()] + body + text[body_end:]


REFUSALS = {  # case -> (section, values written into a valid secure config, what the message must name)
    "min_devices": ("rounds", {"min_devices": 2, "quorum": 2}, "[rounds] min_devices 2"),
    "quorum": ("rounds", {"quorum": 2}, "[rounds] min_devices 3 and quorum 2"),
    "krum": ("strategy", {"method": "krum"}, "[strategy] method 'krum'"),
    "median": ("strategy", {"method": "median"}, "[strategy] method 'median'"),
    "trimmed_mean": ("strategy", {"method": "trimmed_mean"}, "[strategy] method 'trimmed_mean'"),
    "normalized_step": ("strategy", {"step": "normalized"}, "[strategy] step 'normalized'"),
    "centered_clip": ("strategy", {"centered_clip": 1.5}, "[strategy] centered_clip 1.5"),
    "direction_gate": ("strategy", {"direction_gate": "round"}, "[strategy] direction_gate 'round'"),
}


def test_a_secure_config_that_would_give_updates_away_is_refused_at_start_naming_the_key(tmp_path: Path) -> None:
    """``fedprune-coordinator run`` on each refused config (all at once: each is a fresh process
    that stops at its config): exit 78, the key named, no traceback, no broker contacted."""
    LocalFederation(root=tmp_path / "valid", broker=BrokerAccess(url="mqtt://127.0.0.1:1"),
                    devices=("pi-1", "pi-2", "pi-3"), rounds=3,
                    settings={"strategy": {"secure": True}, "metrics": {"port": -1}}).prepare()
    valid = (tmp_path / "valid" / "coordinator.toml").read_text()
    runs = {}
    for case, (section, values, _) in REFUSALS.items():
        config = tmp_path / f"{case}.toml"
        config.write_text(toml_with(valid, section, **values))
        runs[case] = subprocess.Popen([str(BIN / "fedprune-coordinator"), "run", "--config", str(config)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = {case: (run.communicate(timeout=120), run.returncode) for case, run in runs.items()}
    for case, ((stdout, stderr), code) in results.items():
        named = REFUSALS[case][2]
        assert code == 78, (case, code, stderr[-2000:])
        assert named in stderr and "secure" in stderr, (case, stderr)
        assert "Traceback" not in stderr + stdout, (case, stderr)
        assert "event=mqtt_connected" not in stderr + stdout, case
