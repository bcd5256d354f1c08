"""A round counts only once its checkpoint is on disk: a failed write (disk full) keeps the
previous checkpoint, is counted, and is retried; nothing here needs a broker."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import numpy as np
import pytest

import fedprune.coordinator.state as state_module
from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.config import load_config
from fedprune.coordinator.daemon import COMMIT_RETRY_S, CoordinatorDaemon
from fedprune.coordinator.core.rounds import CloseRound
from fedprune.protocol.messages import Update
from fedprune.protocol.sparse import SparseParams


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def daemon(tmp_path: Path, clock: Clock, strategy: dict | None = None) -> CoordinatorDaemon:
    config_path = tmp_path / "coordinator.toml"
    if not config_path.exists():
        enrollment.init(config_path=config_path, state_dir=tmp_path / "state", federation="f",
                        broker_url="mqtt://127.0.0.1:1", embedded_broker=False,
                        settings={"rounds": {"total": 5}, "metrics": {"port": -1}, "strategy": strategy or {}})
    return CoordinatorDaemon(load_config(config_path, env={}), clock=clock)


def close_empty_round(d: CoordinatorDaemon, clock: Clock) -> None:
    d.plan = d.strategy.plan_round(d.state, ["pi-1"], d.rng)
    d.round_started = clock.now
    d._close_round(CloseRound(d.plan.round, {}, False), clock.now)


def test_disk_full_keeps_the_previous_checkpoint_counts_and_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    d = daemon(tmp_path, clock)
    real_write = state_module.atomic_write

    def disk_full(path, data, mode=0o600):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module, "atomic_write", disk_full)
    close_empty_round(d, clock)
    assert d.metrics.value("checkpoint_failures_total") == 1
    assert d.metrics.value("rounds_completed_total") == 0
    assert d.state_dir.load_latest_checkpoint()["round"] == 0

    clock.now += COMMIT_RETRY_S - 1
    d.tick()
    assert d.metrics.value("checkpoint_failures_total") == 1, "retried before the back-off"
    monkeypatch.setattr(state_module, "atomic_write", real_write)
    clock.now += 2
    d.tick()
    assert d._pending_commit is None
    assert d.metrics.value("rounds_completed_total") == 1
    assert d.state_dir.load_latest_checkpoint()["round"] == 1


def test_a_restarted_daemon_resumes_from_the_last_committed_round(tmp_path: Path) -> None:
    clock = Clock()
    d = daemon(tmp_path, clock)
    close_empty_round(d, clock)
    close_empty_round(d, clock)
    again = CoordinatorDaemon(d.config, clock=clock)
    assert again.completed == 2
    assert [h["round"] for h in again.state_dir.read_history()] == [1, 2]
    assert again.rng.bit_generator.state == d.rng.bit_generator.state


def test_a_history_line_that_fails_after_its_checkpoint_is_written_once(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint on disk, history append fails half-way (disk full): the retry, or a restart
    in between, leaves the round in history.jsonl exactly once."""
    clock = Clock()
    d = daemon(tmp_path, clock)
    close_empty_round(d, clock)
    real_append = state_module.StateDir.append_history

    def torn_append(self, entry, committed_bytes):
        with self.history_path.open("a") as handle:
            handle.write('{"round": 2, "tor')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module.StateDir, "append_history", torn_append)
    close_empty_round(d, clock)
    assert d.state_dir.load_latest_checkpoint()["round"] == 2, "the checkpoint was written first"
    assert d.metrics.value("rounds_completed_total") == 1
    monkeypatch.setattr(state_module.StateDir, "append_history", real_append)
    restarted = CoordinatorDaemon(d.config, clock=clock)  # killed before the retry, then the disk freed
    assert restarted.completed == 2 and [h["round"] for h in restarted.state_dir.read_history()] == [1, 2]
    with d.state_dir.history_path.open("a") as handle:
        handle.write('{"round": 2, "tor')  # or it lived on and retries
    clock.now += COMMIT_RETRY_S + 1
    d.tick()
    assert d._pending_commit is None and d.metrics.value("rounds_completed_total") == 2
    assert [h["round"] for h in d.state_dir.read_history()] == [1, 2]
    assert d.history_bytes == d.state_dir.history_path.stat().st_size


def test_a_checkpoint_that_carries_the_whole_history_still_resumes(tmp_path: Path) -> None:
    """State directories written before the trail moved out of the checkpoint keep working."""
    clock = Clock()
    d = daemon(tmp_path, clock)
    close_empty_round(d, clock)
    close_empty_round(d, clock)
    history = d.state_dir.read_history()
    doc = d.state_dir.load_latest_checkpoint()
    del doc["history_bytes"], doc["last_entry"]
    d.state_dir.save_checkpoint(doc.pop("round"), {**doc, "history": history})
    d.state_dir.history_path.write_text("")
    again = CoordinatorDaemon(d.config, clock=clock)
    assert again.completed == 2 and again.state_dir.read_history() == history
    close_empty_round(again, clock)
    assert [h["round"] for h in again.state_dir.read_history()] == [1, 2, 3]
    assert again.state_dir.load_latest_checkpoint()["last_entry"]["round"] == 3, "the next checkpoint is the new format"
    assert [h["round"] for h in CoordinatorDaemon(d.config, clock=clock).state_dir.read_history()] == [1, 2, 3]


def test_gated_updates_are_counted_logged_and_trust_survives_a_restart(tmp_path: Path, caplog) -> None:
    """Colluding twins are left out by the sybil rule, counted per device and rule; the
    direction trust is checkpointed with the round and restored by a restarted daemon."""
    clock = Clock()
    caplog.set_level(logging.INFO, logger="fedprune.coordinator")
    d = daemon(tmp_path, clock, strategy={"direction_gate": "memory"})
    devices = [f"pi-{i}" for i in range(6)]
    d.plan = d.strategy.plan_round(d.state, devices, d.rng)
    d.round_started = clock.now
    trainable = d.layout.subset(s.name for s in d.layout.trainable)
    rng = np.random.default_rng(0)
    direction = {s.name: rng.normal(size=s.shape).astype(np.float32) for s in trainable}
    twin = {k: -v for k, v in direction.items()}
    updates = {}
    for i, device in enumerate(devices):
        delta = twin if i >= 4 else {k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32) for k, v in direction.items()}
        masked = {k: np.where(d.state.masks[k], v, 0).astype(np.float32) if k in d.state.masks else v
                  for k, v in delta.items()}
        updates[device] = Update(round=d.plan.round, device=device, mask_version=d.state.mask_version, n_examples=50,
                                 metrics={}, class_losses={0: (1.0, 50)},
                                 delta=SparseParams.from_dense(trainable, masked, d.state.masks))
    d._close_round(CloseRound(d.plan.round, updates, True), clock.now)
    assert d.metrics.value("updates_gated_total", device="pi-4", reason="sybil") == 1
    assert d.metrics.value("updates_gated_total", device="pi-5", reason="sybil") == 1
    assert d.metrics.value("updates_gated_total", device="pi-0", reason="sybil") == 0
    assert "event=update_gated device=pi-4 round=1 reason=sybil" in caplog.text
    assert d.state_dir.read_history()[-1]["scores"]["pi-4"]["gated_by"] == "sybil"
    trust = dict(d.state.trust)
    assert set(trust) == set(devices)
    restarted = daemon(tmp_path, clock)
    assert restarted.state.trust == trust and restarted.completed == 1


def test_the_central_privacy_accountant_survives_a_restart_after_any_round(tmp_path: Path) -> None:
    """Distributed DP: the RDP of every released sum is in each history entry, so a restart after a
    round without a sum (failed, nobody answered) resumes the accountant, not a fresh one."""
    clock = Clock()
    config_path = tmp_path / "coordinator.toml"
    enrollment.init(config_path=config_path, state_dir=tmp_path / "state", federation="f",
                    broker_url="mqtt://127.0.0.1:1", embedded_broker=False,
                    settings={"rounds": {"total": 5, "min_devices": 3, "quorum": 3}, "metrics": {"port": -1},
                              "strategy": {"secure": True, "secure_noise_multiplier": 1.0, "norm_clip": 0.0,
                                           "sybil_cos": 0.0, "chance_gate": 0.0}})
    d = CoordinatorDaemon(load_config(config_path, env={}), clock=clock)
    spent = d._central_epsilon({"mu": 1e6, "clip_norm": 1.0, "scale": 100.0, "dimension": 50, "weight_max": 0.3})
    close_empty_round(d, clock)  # a round with no sum after the one that released noise
    again = CoordinatorDaemon(d.config, clock=clock)
    np.testing.assert_allclose(again.central_rdp, d.central_rdp)
    assert again._central_epsilon({"mu": 1e6, "clip_norm": 1.0, "scale": 100.0, "dimension": 50,
                                   "weight_max": 0.3})["epsilon_total"] > spent["epsilon_total"]
