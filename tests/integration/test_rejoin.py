"""The coordinator and an agent as real daemons in this process, over the real Mosquitto,
driven step by step: an agent handed a task without the mask it lacks asks again and trains in
that round, and rounds wait while the coordinator has lost the broker (an upload that waited out
the outage is not late)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from fedprune.edge_agent.config import load_config as load_agent_config
from fedprune.edge_agent.daemon import AgentDaemon
from fedprune.protocol.sparse import MaskStore
from tests.integration.daemons import connected_coordinator, federation, step, zero_update
from tests.integration.mosquitto import MosquittoBroker, wait_until

pytestmark = pytest.mark.slow


def test_an_agent_given_a_task_without_the_mask_it_lacks_asks_again_and_trains_in_that_round(
        mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fed = federation(mosquitto, tmp_path)
    coordinator = connected_coordinator(fed)
    agent = AgentDaemon(load_agent_config(tmp_path / "devices" / "dev-0" / "agent.toml", env={}))
    agent.link = agent.open_link()
    try:
        deadline = time.monotonic() + 60
        while coordinator.completed < 1:
            assert time.monotonic() < deadline, "round 1 did not complete"
            step(coordinator, agent)
        assert coordinator.holders == {"dev-0": coordinator.state.mask_version}

        # The agent restarts (its cache and the messages on their way to it are lost) and the
        # Register that would say so never arrives: the coordinator still records the mask as
        # held, so round 2 goes out as values only.
        while coordinator.rounds.open_round != 2:
            coordinator.tick()
            time.sleep(0.02)
        time.sleep(0.2)
        while not agent.inbox.empty():
            agent.inbox.get_nowait()
        agent.channel.masks = MaskStore(4)
        assert not coordinator._task.include_masks
        with caplog.at_level(logging.INFO, logger="fedprune.agent"):
            while coordinator.completed < 2:
                assert time.monotonic() < deadline, "round 2 did not complete"
                step(coordinator, agent)
        assert "reason=unknown_mask" in caplog.text and "reason=mask_missing" in caplog.text
        assert coordinator.state_dir.read_history()[1]["received"] == 1
    finally:
        agent.link.close()
        coordinator.link.close()


def test_rounds_wait_while_the_coordinator_has_lost_the_broker(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    class Clock:
        now = 1_900_000_000.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    fed = federation(mosquitto, tmp_path, deadline_s=5.0)
    coordinator = connected_coordinator(fed, clock)
    try:
        coordinator.registry.seen("dev-0", clock.now)
        coordinator.tick()
        assert coordinator.rounds.open_round == 1
        deadline = coordinator.rounds.deadline

        mosquitto.kill()
        wait_until(lambda: not coordinator.link.connected, 10, "the coordinator to notice the broker is gone")
        coordinator.tick()
        clock.now += 60
        coordinator.tick()
        assert coordinator.rounds.open_round == 1 and coordinator.completed == 0, "a round closed with nobody reachable"

        mosquitto.start()
        wait_until(lambda: coordinator.link.connected, 15, "the coordinator to reconnect")
        for publication in zero_update(fed, coordinator, "dev-0", clock.now):  # queued while it was away
            coordinator.on_message(publication.topic, publication.payload)
        assert coordinator.rounds.received == ("dev-0",), "an upload that waited out the outage is not late"
        assert coordinator.rounds.deadline == pytest.approx(deadline + 60, abs=0.1)
        assert coordinator._task.deadline == coordinator.rounds.deadline, "devices are told the new deadline"
        coordinator.tick()
        assert coordinator.completed == 1, "the one selected device answered: the round closes"
    finally:
        coordinator.link.close()
