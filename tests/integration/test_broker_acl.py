"""deploy/mosquitto/acl.template enforced by the real Mosquitto: who may write and read which topic.

Under MQTT v5 Mosquitto answers a forbidden publish with PUBACK 135, which MqttLink raises as
``PublishFailed``; a forbidden read is filtered at delivery (the SUBACK still grants it). "Never
delivered" is shown with a barrier: a later message from the same publisher that the subscriber
may read arrives first, and one broker thread queues per subscriber in order.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from fedprune.common.mqtt import MqttLink, PublishFailed
from fedprune.protocol.topics import (
    PREFIX, agent_filters, coordinator_filters, inbox_topic, register_topic, release_topic, status_topic, task_topic,
    update_topic,
)
from tests.integration.mosquitto import MosquittoBroker

pytestmark = pytest.mark.slow

WAIT_S = 10.0
FED = "fed1"
NOT_AUTHORIZED = 135


@pytest.fixture
def links(mosquitto: MosquittoBroker) -> Iterator[dict[str, MqttLink]]:
    """The coordinator and dev-0, dev-1 connected with their real subscriptions, plus greedy dev-2 on '#'."""
    made = {"coordinator": MqttLink(mosquitto.link_config(mosquitto.coordinator), [(f, 1) for f in coordinator_filters(FED)])}
    for device in mosquitto.devices[:2]:
        filters = agent_filters(FED, device.username)
        made[device.username] = MqttLink(mosquitto.link_config(device), [(f, 1) for f in filters])
    made["dev-2"] = MqttLink(mosquitto.link_config(mosquitto.devices[2]), [("#", 1)])
    try:
        for link in made.values():
            link.wait_connected(WAIT_S)
        yield made
    finally:
        for link in made.values():
            link.close()


def assert_refused(link: MqttLink, topic: str) -> None:
    with pytest.raises(PublishFailed) as failed:
        link.publish(topic, b"forbidden").wait(WAIT_S)
    assert failed.value.reason_code == NOT_AUTHORIZED
    assert topic in str(failed.value)


def next_message(link: MqttLink) -> tuple[str, bytes]:
    return link.messages.get(timeout=WAIT_S)


def test_device_cannot_publish_on_another_devices_update_topic(links: dict[str, MqttLink]) -> None:
    dev0, coordinator = links["dev-0"], links["coordinator"]
    assert_refused(dev0, update_topic(FED, "dev-1"))
    assert dev0.publish(update_topic(FED, "dev-0"), b"own").wait(WAIT_S)

    assert next_message(coordinator) == (update_topic(FED, "dev-0"), b"own")
    stats = dev0.stats()
    assert (stats.publish_failures, stats.publishes_acked, stats.disconnects) == (1, 1, 0)


def test_device_may_write_only_its_own_uplinks(links: dict[str, MqttLink]) -> None:
    dev0 = links["dev-0"]
    for topic in (register_topic(FED, "dev-0"), update_topic(FED, "dev-0"), status_topic(FED, "dev-0")):
        assert dev0.publish(topic, b"mine").wait(WAIT_S)
    for topic in (
        status_topic(FED, "dev-1"), register_topic(FED, "dev-1"), task_topic(FED), release_topic(FED, 0),
        inbox_topic(FED, "dev-0"), update_topic("fed2", "dev-0"), f"{PREFIX}/{FED}/anything",
    ):
        assert_refused(dev0, topic)


def test_device_cannot_read_another_devices_updates(links: dict[str, MqttLink]) -> None:
    dev1, greedy, coordinator = links["dev-1"], links["dev-2"], links["coordinator"]
    assert dev1.publish(update_topic(FED, "dev-1"), b"sealed update").wait(WAIT_S)
    assert next_message(coordinator) == (update_topic(FED, "dev-1"), b"sealed update")
    assert coordinator.publish(task_topic(FED), b"barrier").wait(WAIT_S)

    # dev-2 subscribed to '#' and was granted it, yet sees only what it may read
    assert next_message(greedy) == (task_topic(FED), b"barrier")
    assert greedy.stats().subscribe_refusals == 0


def test_device_reads_broadcasts_and_only_its_own_inbox(links: dict[str, MqttLink]) -> None:
    coordinator, dev0, dev1 = links["coordinator"], links["dev-0"], links["dev-1"]
    for topic in (task_topic(FED), release_topic(FED, 3), inbox_topic(FED, "dev-1"), inbox_topic(FED, "dev-0")):
        assert coordinator.publish(topic, topic.encode()).wait(WAIT_S)

    # dev-1's inbox was published before dev-0's, so dev-0 would have seen it third
    got0 = [next_message(dev0) for _ in range(3)]
    got1 = [next_message(dev1) for _ in range(3)]
    broadcasts = [(t, t.encode()) for t in (task_topic(FED), release_topic(FED, 3))]
    assert got0 == [*broadcasts, (inbox_topic(FED, "dev-0"), inbox_topic(FED, "dev-0").encode())]
    assert got1 == [*broadcasts, (inbox_topic(FED, "dev-1"), inbox_topic(FED, "dev-1").encode())]


def test_coordinator_writes_broadcasts_but_cannot_impersonate_a_device(links: dict[str, MqttLink]) -> None:
    coordinator = links["coordinator"]
    for topic in (update_topic(FED, "dev-0"), status_topic(FED, "dev-0"), task_topic("fed2")):
        assert_refused(coordinator, topic)
    assert coordinator.publish(task_topic(FED), b"ok").wait(WAIT_S)

