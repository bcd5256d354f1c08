"""A round counts only once its checkpoint is on disk: a failed write (disk full) keeps the
previous checkpoint, is counted, and is retried; nothing here needs a broker."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import coordinator.state as state_module
from coordinator import enrollment
from coordinator.config import load_config
from coordinator.daemon import COMMIT_RETRY_S, CoordinatorDaemon
from coordinator.rounds import CloseRound


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def daemon(tmp_path: Path, clock: Clock) -> CoordinatorDaemon:
    config_path = tmp_path / "coordinator.toml"
    enrollment.init(config_path=config_path, state_dir=tmp_path / "state", federation="f", broker_url="mqtt://127.0.0.1:1",
                    embedded_broker=False, settings={"rounds": {"total": 5}, "metrics": {"port": -1}})
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
    d._tick()
    assert d.metrics.value("checkpoint_failures_total") == 1, "retried before the back-off"
    monkeypatch.setattr(state_module, "atomic_write", real_write)
    clock.now += 2
    d._tick()
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
    assert [h["round"] for h in again.history] == [1, 2]
    assert again.rng.bit_generator.state == d.rng.bit_generator.state
