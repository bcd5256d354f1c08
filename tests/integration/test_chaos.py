"""Chaos: a 30-round federation over the real Mosquitto while the coordinator, the broker and
random agents are SIGKILLed and restarted at random points.

The schedule comes from one seed, printed at the start (set FEDPRUNE_CHAOS_SEED to replay it).
A SIGKILLed Mosquitto comes back at its last autosave (docs/INFRA.md): queued and retained messages
newer than that are lost and some delivered ones come again, so the coordinator's checkpoint is
the source of truth and duplicates must be harmless. Afterwards every round 1..30 completed
exactly once (history.jsonl and the checkpoint agree), the checkpoint is consistent, every
device took part again after the last fault (a restarted agent is not locked out), and the final
accuracy is within noise of an undisturbed run of the same federation and seed.

Rounds open only when all five devices are online: with the quorum alone, the rounds after the
last fault finish in a second or two with the three devices that were not restarting, and the
label-skewed model then ends wherever those three pull it, which says nothing about the faults.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from fedprune.coordinator.config import load_config
from fedprune.coordinator.config import model_spec
from fedprune.coordinator.lab.localfed import LocalFederation
from fedprune.coordinator.state import StateDir
from fedprune.common.models import model_layout
from tests.integration.mosquitto import MosquittoBroker, start_mosquitto

pytestmark = pytest.mark.slow

DEVICES = 5
ROUNDS = 30
CHAOS_S = 75.0  # faults are injected for at most this long, then the federation must finish alone
CALM_ROUNDS = 4  # no fault is injected once this few rounds remain
# Undisturbed, the digits MLP ends near 0.95; a chaotic run can lose a device for a round (killed
# mid-round, the round closes at its deadline without it), so it may end a little lower, but a
# fault that corrupted the model or lost rounds ends far below this.
ACCURACY_MARGIN = 0.10


def federation_on(broker: MosquittoBroker, root: Path, seed: int) -> LocalFederation:
    access = broker.access()
    settings = {"broker": {"username": broker.coordinator.username},
                "rounds": {"deadline_s": 6.0, "quorum": 3, "min_devices": DEVICES, "on_missed_quorum": "close",
                           "reannounce_s": 1.0, "heartbeat_timeout_s": 15.0}}
    fed = LocalFederation(root=root, broker=access, devices=tuple(d.username for d in broker.devices), rounds=ROUNDS,
                          federation=broker.federation, settings=settings, seed=seed)
    fed.prepare()
    return fed


def fresh_broker() -> MosquittoBroker:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: run scripts/bootstrap.sh --test-tools")
    return start_mosquitto(federation="fed1", devices=DEVICES)


def run_undisturbed(root: Path, seed: int) -> list[dict]:
    broker = fresh_broker()
    fed = federation_on(broker, root, seed)
    fed.start()
    try:
        return fed.wait_for_round(ROUNDS, timeout=180)
    finally:
        fed.stop_all()
        broker.close()


def run_chaos(fed: LocalFederation, broker: MosquittoBroker, rng: random.Random) -> tuple[list[str], int]:
    """Kill something 0.1-1 s after the previous fault (each kind at least once, first, in a random
    order) and after at least one more round completed, so faults spread over the rounds, until
    CHAOS_S is up or only CALM_ROUNDS rounds remain; each victim comes back after 0-2 s.
    Returns the events and the number of rounds completed at the last one."""
    events: list[str] = []
    first = rng.sample(["coordinator", "broker", "agent"], 3)
    started = time.monotonic()
    at_round = 0
    while time.monotonic() - started < CHAOS_S:
        time.sleep(rng.uniform(0.1, 1.0))
        done = len(fed.history())
        if not first and done >= ROUNDS - CALM_ROUNDS:
            break
        if not first and done <= at_round:
            continue
        victim = first.pop() if first else rng.choice(["coordinator", "broker", "agent", "agent"])
        down_s = rng.uniform(0.0, 2.0)
        at_round = done
        if victim == "coordinator":
            fed.kill("coordinator")
            time.sleep(down_s)
            fed.start_coordinator()
        elif victim == "broker":
            broker.kill()
            time.sleep(down_s)
            broker.start()
        else:
            victim = rng.choice(fed.devices)
            fed.kill(victim)
            time.sleep(down_s)
            fed.start_agent(victim)
        events.append(f"{victim}@round{at_round}+{down_s:.1f}s")
    return events, at_round


def assert_checkpoint_consistent(fed: LocalFederation) -> dict:
    checkpoint = StateDir(fed.state_dir).load_latest_checkpoint()
    assert checkpoint is not None
    layout = model_layout(model_spec(load_config(fed.config_path, env={})))
    assert checkpoint["round"] == ROUNDS and checkpoint["state_round"] == ROUNDS + 1
    for spec in layout:
        weights = checkpoint["params"][spec.name]
        assert weights.shape == spec.shape and np.all(np.isfinite(weights)), spec.name
        if spec.masked:
            mask = checkpoint["masks"][spec.name]
            assert mask.shape == spec.shape and mask.dtype == bool, spec.name
            assert int(mask.sum()) == int(checkpoint["counts"][spec.name]), (spec.name, int(mask.sum()))
            assert not np.any(weights[~mask]), f"{spec.name}: weights outside the mask"
    enrolled = set(fed.devices)
    assert set(checkpoint["quality"]) <= enrolled and set(checkpoint["importance"]) <= enrolled
    assert all(math.isfinite(v) for v in checkpoint["importance"].values())
    assert checkpoint["last_entry"]["round"] == ROUNDS
    return checkpoint


@pytest.mark.timeout(420)
def test_federation_survives_random_kills_of_coordinator_broker_and_agents(tmp_path: Path) -> None:
    seed = int(os.environ.get("FEDPRUNE_CHAOS_SEED", random.SystemRandom().randrange(2**31)))
    print(f"FEDPRUNE_CHAOS_SEED={seed}")
    baseline = run_undisturbed(tmp_path / "undisturbed", seed % 1000)

    broker = fresh_broker()
    fed = federation_on(broker, tmp_path / "chaos", seed % 1000)
    fed.start()
    try:
        events, last_fault_round = run_chaos(fed, broker, random.Random(seed))
        print(f"chaos events ({len(events)}): {' '.join(events)}")
        history = fed.wait_for_round(ROUNDS, timeout=180)
        codes = fed.stop_all()
    finally:
        fed.stop_all()
        broker.close()
    assert events, "no fault was injected"
    assert codes["coordinator"] == 0, fed.log("coordinator")[-3000:]
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1)), "a round was lost or repeated"
    checkpoint = assert_checkpoint_consistent(fed)
    assert checkpoint["last_entry"] == history[-1], "history.jsonl and the checkpoint disagree"
    after_committed = (fed.state_dir / "history.jsonl").read_bytes()[checkpoint["history_bytes"]:]
    assert after_committed.count(b"\n") == 1 and json.loads(after_committed) == history[-1], \
        "history.jsonl holds more or less than was committed"
    after_faults = [h for h in history if h["round"] > last_fault_round + 1]
    rejoined = set().union(*(h.get("scores", {}) for h in after_faults))
    assert rejoined == set(fed.devices), (f"devices without an update after the last fault: "
                                          f"{sorted(set(fed.devices) - rejoined)}", events)
    chaos, calm = history[-1]["accuracy"], baseline[-1]["accuracy"]
    print(f"final accuracy: chaos {chaos:.4f}, undisturbed {calm:.4f}")
    assert chaos >= calm - ACCURACY_MARGIN, (chaos, calm, events)
