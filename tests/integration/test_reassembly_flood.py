"""One device with valid credentials cannot exhaust the coordinator's reassembly buffer, nor
evict another device's update (the field attacks: 3,200 partial 128 KiB chunks took the
coordinator from 263 to 526 MB RSS for good; 64 partial transfers from one device evicted
another's in-flight update). The coordinator runs as a real daemon over the real Mosquitto; the
hostile device publishes on its own topic with its own broker login, as the ACL allows."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fedprune.common.mqtt import MqttLink
from fedprune.protocol.channel import sender_share
from fedprune.protocol.chunks import DEFAULT_MAX_CHUNK, HEADER_SIZE, split
from fedprune.protocol.topics import update_topic
from tests.integration.daemons import connected_coordinator, federation, zero_update
from tests.integration.mosquitto import MosquittoBroker, wait_until

pytestmark = pytest.mark.slow

PIECE = DEFAULT_MAX_CHUNK - HEADER_SIZE


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def first_chunks(transfers: int, chunks_each: int, start_id: int) -> list[bytes]:
    """The first chunk of each of ``transfers`` transfers that never finish (128 KiB each)."""
    return [split(os.urandom(PIECE * chunks_each), transfer_id=start_id + i)[0] for i in range(transfers)]


def test_a_flooding_device_keeps_to_its_share_and_an_honest_update_still_arrives(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    clock = Clock()
    fed = federation(mosquitto, tmp_path, deadline_s=600.0, quorum=2, min_devices=2)
    coordinator = connected_coordinator(fed, clock)
    honest_link, hostile = (MqttLink(mosquitto.link_config(device)) for device in mosquitto.devices[:2])
    try:
        honest_link.wait_connected(10)
        hostile.wait_connected(10)
        for device in ("dev-0", "dev-1"):
            coordinator.registry.seen(device, clock.now)
        coordinator.tick()
        assert coordinator.rounds.open_round == 1
        share = sender_share(coordinator.layout)
        reassembler = coordinator.channel.reassembler
        honest = zero_update(fed, coordinator, "dev-0", clock.now, max_chunk=10_000)
        assert len(honest) == 5
        # Between the honest chunks: 80 partial transfers of 4 x 128 KiB (each fits the share),
        # then 20 chunks of 64-chunk transfers (8 MiB each, over the share).
        floods = [first_chunks(80, 4, 1000 * k) + first_chunks(20, 64, 1000 * k + 500) for k in range(len(honest))]
        most_held = 0
        received = 0
        for flood, chunk in zip(floods, honest):
            handles = [hostile.publish(update_topic(fed.federation, "dev-1"), c) for c in flood]
            handles.append(honest_link.publish(chunk.topic, chunk.payload))
            assert all(h.wait(30) for h in handles)
            received += len(flood) + 1
            wait_until(lambda: coordinator.link.stats().messages_in >= received, 30, "the coordinator to receive")
            while not coordinator.link.messages.empty():
                coordinator.on_message(*coordinator.link.messages.get_nowait())
                most_held = max(most_held, reassembler.held_by("dev-1")[1])
        coordinator.tick()
        assert coordinator.rounds.received == ("dev-0",), "the honest device's 5-chunk update arrived"
        assert 0 < most_held <= share, f"dev-1 held {most_held} bytes; its share is {share}"
        assert reassembler.buffered_bytes <= share
        metrics = coordinator.metrics
        assert metrics.value("reassembly_dropped_total", reason="source_transfers") >= 5 * 80 - 4
        assert metrics.value("updates_rejected_total", reason="too_large") == 5 * 20
        assert metrics.value("reassembly_dropped_total", reason="transfers") == 0

        clock.now += reassembler.max_age + 1  # no further chunk arrives: the tick alone expires the rest
        coordinator.tick()
        assert reassembler.buffered_bytes == 0 and len(reassembler) == 0
        assert metrics.value("reassembly_dropped_total", reason="age") == 4
    finally:
        honest_link.close()
        hostile.close()
        coordinator.link.close()
