"""A device revoked on the coordinator alone (its broker login still works) cannot read the
tasks under the new federation key; it asks for the key less and less often and says so once,
instead of registering every 2 s and logging a warning for every task."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.config import load_config
from tests.integration.daemons import connected_agent, connected_coordinator, federation
from tests.integration.mosquitto import MosquittoBroker, wait_until

pytestmark = pytest.mark.slow


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_revoked_agent_backs_off_asking_for_the_key(mosquitto: MosquittoBroker, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    fed = federation(mosquitto, tmp_path, total=1000)
    coordinator = connected_coordinator(fed)
    clock = Clock()
    agent = connected_agent(fed, "dev-0", clock)

    def step() -> None:
        agent._maybe_register()
        while not agent.inbox.empty():
            agent._on_message(*agent.inbox.get_nowait())
        while not coordinator.link.messages.empty():
            coordinator.on_message(*coordinator.link.messages.get_nowait())
        coordinator.registry.seen("dev-1", time.time())  # another device keeps the rounds going
        coordinator.tick()
        time.sleep(0.02)

    try:
        with caplog.at_level(logging.INFO, logger="fedprune.agent"):
            wait_until(lambda: step() or "event=key_installed" in caplog.text, 20, "dev-0 to get the key")
            enrollment.revoke(load_config(fed.config_path, env={}), "dev-0")
            caplog.clear()
            for _ in range(600):  # a minute on the agent's clock; a task re-announced every 2-3 s of it
                step()
                clock.now += 0.1
        asked = caplog.text.count("reason=key_missing")
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "reason=unknown_key" in r.getMessage()]
        assert coordinator.metrics.value("revocations_applied_total") == 1
        assert 3 <= asked <= 6, f"asked for the key {asked} times in 60 s (2, 4, 8, ... s apart)"
        assert len(warned) == 1, [r.getMessage() for r in warned]
    finally:
        agent.link.close()
        coordinator.link.close()
