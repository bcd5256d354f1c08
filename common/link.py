"""The link both daemons talk through: MQTT on a fleet (``fedprune.common.mqtt.MqttLink``), in
memory in the simulation (``fedprune.coordinator.lab.memory_broker``).

The daemons only publish, read ``connected`` and the counters, and wait on acknowledgements;
inbound messages reach them through the callback (or queue) the link was built with. Anything
that offers this much can carry a federation, so the round code never knows which one it has.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class LinkStats:
    """A snapshot of the link's counters, for metrics."""

    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    publishes_acked: int = 0
    publish_failures: int = 0
    oversize_refused: int = 0
    messages_dropped: int = 0
    connects: int = 0
    connect_failures: int = 0
    reconnects: int = 0
    disconnects: int = 0
    subscribe_refusals: int = 0


class Acknowledgement(Protocol):
    def wait(self, timeout: float | None) -> bool:
        """True once the broker acknowledged the publish, False if still pending after ``timeout``."""


class Link(Protocol):
    messages: queue.Queue[tuple[str, bytes]]  # inbound (topic, payload), unless built with a callback

    @property
    def connected(self) -> bool: ...

    @property
    def refusal(self) -> Exception | None:
        """Why the broker refused the login, if it did (final for a device that never connected)."""

    def stats(self) -> LinkStats: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Acknowledgement: ...

    def close(self) -> None: ...
