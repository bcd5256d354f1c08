"""An update leaves the device once: re-announcements that queue up while a device trains are
not answered with more copies of it (the field defect: 610 update sends for 90 updates, 6.8x
the uplink). The coordinator and an agent run as real daemons over the real Mosquitto; the
agent's loop is held back while the coordinator re-announces, as a slow Pi's is by training."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.daemons import connected_agent, connected_coordinator, federation, step
from tests.integration.mosquitto import MosquittoBroker, wait_until

pytestmark = pytest.mark.slow


def update_records(fed_root: Path, device: str) -> list[dict]:
    audit = fed_root / "devices" / device / "state" / "audit.jsonl"
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r["message_type"] == "update"]


def test_re_announcements_queued_while_training_send_the_update_once(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    fed = federation(mosquitto, tmp_path, total=2, reannounce_s=0.5, deadline_s=60.0)
    coordinator = connected_coordinator(fed)
    agent = connected_agent(fed, "dev-0")
    try:
        deadline = time.monotonic() + 30
        while coordinator.rounds.open_round != 1:
            assert time.monotonic() < deadline, "round 1 did not open"
            step(coordinator, agent)
        # The agent is busy (its loop does not run) while the coordinator re-announces 4 times.
        announce_until = time.monotonic() + 4 * 0.5 + 0.3
        while time.monotonic() < announce_until:
            while not coordinator.link.messages.empty():
                coordinator.on_message(*coordinator.link.messages.get_nowait())
            coordinator.tick()
            time.sleep(0.02)
        wait_until(lambda: agent.inbox.qsize() >= 5, 10, "the task and its re-announcements to reach the agent")
        while coordinator.completed < 2:
            assert time.monotonic() < deadline + 60, "the rounds did not complete"
            step(coordinator, agent)
        sent = update_records(fed.root, "dev-0")
        assert sorted({r["round"] for r in sent}) == [1, 2]
        assert len(sent) == len({r["sha256"] for r in sent}), f"an update was sent more than once: {sent}"
        assert coordinator.metrics.value("updates_rejected_total", reason="duplicate_transfer") == 0
    finally:
        agent.link.close()
        coordinator.link.close()
