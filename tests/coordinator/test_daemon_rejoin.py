"""A device that comes back must get back in: the coordinator believes a Register about the
device's mask cache, and updates that reach a restarted coordinator before their round
reopens are held for it, not dropped (their resends would be duplicates). No broker here."""

from __future__ import annotations

import pytest

from fedprune.coordinator.daemon import CoordinatorDaemon
from fedprune.protocol.messages import Register, RoundTask
from tests.fuzz.daemon_target import DaemonWorld, offline_link
from tests.fuzz.targets import Program


def register(world: DaemonWorld, device: str, cached_mask_version: int | None) -> None:
    world.feed(world.agents[device].send(Register(device, 2, 1024, "none", 120, "0.1.0",
                                                  cached_mask_version=cached_mask_version), world.clock.now))


def test_a_register_with_an_empty_mask_cache_gets_the_device_a_task_with_the_mask(
        world: DaemonWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    d = world.daemon
    version = d.state.mask_version
    register(world, "dev-0", version)
    register(world, "dev-1", version)
    sent: list[RoundTask] = []
    monkeypatch.setattr(d, "_publish_task", lambda task, now: sent.append(task))
    d.tick()
    assert d.rounds.open_round == 1 and not sent[-1].include_masks, "both hold the mask: values only"

    register(world, "dev-0", None)  # restarted: its cache is empty, whatever the coordinator recorded
    assert "dev-0" not in d.holders
    assert sent[-1].selected == ("dev-0",) and sent[-1].include_masks


def test_updates_delivered_before_the_resumed_round_reopens_count_in_it(world: DaemonWorld) -> None:
    d = world.daemon
    register(world, "dev-0", None)
    register(world, "dev-1", None)
    d.tick()
    assert d.rounds.open_round == 1
    upload = world._update(Program(bytes(8)), "dev-0", hostile=False)

    d.link.close(timeout=0.5)  # the coordinator dies; the broker keeps dev-0's upload for its session
    restarted = CoordinatorDaemon(world.config, clock=world.clock)
    restarted.link = offline_link()
    world.daemon = restarted
    world.feed(upload)  # delivered first on reconnect, before any tick reopens round 1
    assert restarted.metrics.value("updates_held_total") == 1
    assert restarted.metrics.value("updates_rejected_total", reason="unknown_mask") == 0, \
        "the resumed coordinator must know the mask version it checkpointed"

    restarted.tick()
    assert restarted.rounds.open_round == 1
    assert restarted.rounds.received == ("dev-0",)
    assert restarted.metrics.value("updates_accepted_total") == 1 and not restarted.early_updates
