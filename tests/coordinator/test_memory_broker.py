"""The simulation's broker keeps the MQTT rules the daemons rely on: wildcards, retained messages
for later subscribers, the last will of a vanished client, the size limit, counters."""

from __future__ import annotations

import pytest

from fedprune.common.mqtt import LastWill, PayloadTooLarge, PublishFailed
from fedprune.coordinator.lab.memory_broker import MemoryBroker, matches


@pytest.mark.parametrize("topic_filter,topic,expected", [
    ("a/+/c", "a/b/c", True), ("a/+/c", "a/b/d", False), ("a/#", "a/b/c", True), ("a/#", "a", True),
    ("a/b", "a/b/c", False), ("+/+", "a/b", True), ("a/+", "a", False),
])
def test_filters_match_as_mqtt_says(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


def test_retained_messages_reach_later_subscribers_and_an_empty_payload_clears_them() -> None:
    broker = MemoryBroker()
    sender = broker.connect("s")
    sender.publish("fedprune/v1/f/release/0", b"model", retain=True)
    late = broker.connect("late", [("fedprune/v1/f/release/+", 1)])
    assert late.messages.get_nowait() == ("fedprune/v1/f/release/0", b"model")
    sender.publish("fedprune/v1/f/release/0", b"", retain=True)
    assert broker.retained == {}


def test_a_dropped_link_publishes_its_will_and_refuses_to_publish_until_it_reconnects() -> None:
    broker = MemoryBroker()
    coordinator = broker.connect("c", [("fedprune/v1/f/status/+", 1)])
    wills = iter([b"gone", b"gone again"])
    device = broker.connect("d", will=lambda: LastWill("fedprune/v1/f/status/d", next(wills), 1))
    device.drop()
    assert coordinator.messages.get_nowait() == ("fedprune/v1/f/status/d", b"gone")
    with pytest.raises(PublishFailed):
        device.publish("fedprune/v1/f/status/d", b"x")
    device.reconnect()
    assert device.publish("fedprune/v1/f/status/d", b"back").wait(0)
    assert device.stats().connects == 2 and device.stats().disconnects == 1
    coordinator.messages.get_nowait()
    device.drop()  # a fresh will from the reconnect: a replayed one would be refused by the coordinator
    assert coordinator.messages.get_nowait() == ("fedprune/v1/f/status/d", b"gone again")
    assert device.bytes_out_by_kind == {"status": 4}  # wills are the broker's publishes, not the client's


def test_payloads_over_the_broker_limit_are_refused_like_mqtt_link_does() -> None:
    broker = MemoryBroker(max_message_bytes=10)
    with pytest.raises(PayloadTooLarge):
        broker.connect("s").publish("fedprune/v1/f/task", b"x" * 11)
