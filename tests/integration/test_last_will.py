"""A device that loses its connection twice is seen offline twice. The last will is sealed and
replay-checked; one registered once and sent again after a reconnect was refused as a replay,
and the coordinator kept counting the device online until its heartbeat timed out. Real
coordinator and agent daemons, the real Mosquitto, the agent's connection cut in a TCP relay."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.integration.cutter import TcpCutter
from tests.integration.daemons import connected_agent, connected_coordinator, federation, step
from tests.integration.mosquitto import MosquittoBroker

pytestmark = pytest.mark.slow


def test_every_lost_connection_reaches_the_coordinator_as_a_fresh_last_will(
        mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fed = federation(mosquitto, tmp_path, total=50, min_devices=5, quorum=1)  # no round opens: presence only
    relay = TcpCutter(mosquitto.port)
    with (fed.root / "devices" / "dev-0" / "agent.toml").open("a") as toml:
        toml.write(f'[broker]\nurl = "mqtts://127.0.0.1:{relay.port}"\n')
    coordinator = connected_coordinator(fed)
    agent = connected_agent(fed, "dev-0")

    def until(online: bool, why: str) -> None:
        deadline = time.monotonic() + 30
        while ("dev-0" in coordinator.registry.online(time.time())) != online:
            assert time.monotonic() < deadline, why
            step(coordinator, agent)

    caplog.set_level(logging.INFO, logger="fedprune.coordinator")
    try:
        until(True, "dev-0 did not register")
        for drop in (1, 2, 3):
            relay.cut()
            until(False, f"drop {drop}: the coordinator still counts dev-0 online")
            until(True, f"drop {drop}: dev-0 did not come back")
        # No status (the last will included) is refused. A Register in flight when the link is cut
        # is sent again by the client after the reconnect and may arrive after the fresh one; the
        # replay guard rightly drops that older copy, which says nothing the newer one does not.
        refused = [r.fields for r in caplog.records if getattr(r, "event", "") == "message_rejected"]
        assert not [f for f in refused if "/status/" in f["topic"]], refused
        assert all(f["reason"] == "replayed" and "/register/" in f["topic"] for f in refused), refused
        assert coordinator.metrics.value("updates_rejected_total", reason="stale") == 0
    finally:
        agent.link.close()
        coordinator.link.close()
        relay.close()
