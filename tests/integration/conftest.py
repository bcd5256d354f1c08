"""Broker fixtures: the real Mosquitto (TLS, passwords, ACL) and the embedded amqtt broker."""

from __future__ import annotations

from typing import Iterator

import pytest

from fedprune.coordinator.fleet.broker import EmbeddedBroker
from tests.integration.mosquitto import MosquittoBroker, mosquitto_for_test


@pytest.fixture
def mosquitto() -> Iterator[MosquittoBroker]:
    """A fresh Mosquitto for federation 'fed1' with a coordinator user and devices dev-0..dev-2."""
    yield from mosquitto_for_test()


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker
