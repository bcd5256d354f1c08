"""Findings of the fuzzers, each pinned as a plain test (inputs live in tests/fuzz/corpus/)."""

from __future__ import annotations

from tests.fuzz.daemon_target import DaemonWorld
from tests.fuzz.targets import Program


def test_a_round_whose_only_update_is_rejected_by_the_strategy_still_counts_once(world: DaemonWorld) -> None:
    """An enrolled device's sealed update with n_examples=0 passes the round machine but the
    strategy rejects it ('no_data'); the round must close once and the next one be round 2."""
    d = world.daemon
    for device in (0, 1):  # Register dev-0, dev-1
        world.run(bytes([0, device, 0, 1, 0, 0, 0, 0, 0]))
    world.run(bytes([6, 1]))  # time moves: round 1 opens
    assert d.rounds.open_round == 1
    world.feed(world._update(Program(bytes([0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])), "dev-0", hostile=True))
    world.clock.now += 2 * d.config.rounds.deadline_s
    d.tick()  # the deadline closes round 1 with the one (rejected) update
    assert d.state_dir.read_history()[-1]["rejected"] == {"dev-0": "no_data"}
    d.tick()  # the next round opens
    assert [h["round"] for h in d.state_dir.read_history()] == [1]
    assert d.completed == 1
    assert d.rounds.open_round == 2
    assert d.state_dir.load_latest_checkpoint()["state_round"] == 2
