"""A broker in memory, for the simulation: the daemons' own code over a link that is a function call.

The coordinator and every agent get a ``MemoryLink`` with the same surface as ``MqttLink``
(publish, acknowledgements, counters, the callback or queue for inbound messages), so the
simulation drives the deployed round code and its byte counts are the bytes a broker would
carry. Delivery is synchronous and in publish order; retained messages reach later subscribers;
a dropped link publishes its last will, as a broker does when a device vanishes; the will is
asked of its owner at each (re)connect, as a client registers a fresh one in each CONNECT. What MQTT adds
on a network (QoS retries, persistent sessions, TLS) is the real broker's job and is tested
against Mosquitto, not here. Byte counters count publish payloads, as ``MqttLink``'s do: MQTT
framing, the CONNECT that carries the will, and TLS are not in them.
"""

from __future__ import annotations

import queue
from dataclasses import asdict
from typing import Callable, Sequence

from fedprune.common.link import LinkStats
from fedprune.common.mqtt import MAX_MESSAGE_BYTES, LastWill, PayloadTooLarge, PublishFailed
from fedprune.protocol.topics import parse_topic


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` one level, ``#`` the rest."""
    want, have = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def _count(by_kind: dict[str, int], topic: str, size: int) -> None:
    kind = parse_topic(topic).kind.value
    by_kind[kind] = by_kind.get(kind, 0) + size


class _Acknowledged:
    """A publish the in-memory broker has already delivered."""

    def wait(self, timeout: float | None) -> bool:
        return True


class MemoryLink:
    def __init__(self, broker: MemoryBroker, client_id: str, subscriptions: Sequence[tuple[str, int]],
                 on_message: Callable[[str, bytes], None] | None, will: Callable[[], LastWill] | None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.filters = tuple(f for f, _ in subscriptions)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._deliver = on_message or (lambda topic, payload: self.messages.put((topic, payload)))
        self.will_factory = will
        self.will: LastWill | None = None
        self.counters = asdict(LinkStats())
        self.bytes_in_by_kind: dict[str, int] = {}  # by topic kind (task, update, release, ...)
        self.bytes_out_by_kind: dict[str, int] = {}
        self._connected = False
        self.refusal = None

    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> LinkStats:
        return LinkStats(**self.counters)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> _Acknowledged:
        if not self._connected:
            raise PublishFailed(topic, "not connected")
        if len(payload) > self.broker.max_message_bytes:
            raise PayloadTooLarge(topic, len(payload), self.broker.max_message_bytes)
        self.counters["messages_out"] += 1
        self.counters["bytes_out"] += len(payload)
        _count(self.bytes_out_by_kind, topic, len(payload))
        self.broker.route(topic, bytes(payload), retain)
        return _Acknowledged()

    def receive(self, topic: str, payload: bytes) -> None:
        self.counters["messages_in"] += 1
        self.counters["bytes_in"] += len(payload)
        _count(self.bytes_in_by_kind, topic, len(payload))
        self._deliver(topic, payload)

    def reconnect(self) -> None:
        """Connect (again): retained messages on the subscriptions arrive, as after a broker CONNACK."""
        self._connected = True
        self.counters["connects"] += 1
        self.will = self.will_factory() if self.will_factory is not None else None
        for topic, payload in list(self.broker.retained.items()):
            if any(matches(f, topic) for f in self.filters):
                self.receive(topic, payload)

    def drop(self) -> None:
        """Vanish without a goodbye: the broker publishes the last will."""
        if not self._connected:
            return
        self._connected = False
        self.counters["disconnects"] += 1
        if self.will is not None:
            self.broker.route(self.will.topic, self.will.payload, retain=False)

    def close(self) -> None:
        self._connected = False


class MemoryBroker:
    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.links: list[MemoryLink] = []
        self.retained: dict[str, bytes] = {}

    def connect(self, client_id: str, subscriptions: Sequence[tuple[str, int]] = (),
                on_message: Callable[[str, bytes], None] | None = None,
                will: Callable[[], LastWill] | None = None) -> MemoryLink:
        link = MemoryLink(self, client_id, subscriptions, on_message, will)
        self.links.append(link)
        link.reconnect()
        return link

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for link in self.links:
            if link.connected and any(matches(f, topic) for f in link.filters):
                link.receive(topic, payload)
