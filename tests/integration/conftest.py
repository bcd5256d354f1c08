"""Broker fixtures: the real Mosquitto (TLS, passwords, ACL) and the embedded amqtt broker."""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

from fedprune.coordinator.fleet.broker import EmbeddedBroker
from tests.integration.mosquitto import MosquittoBroker, start_mosquitto


@pytest.fixture
def mosquitto() -> Iterator[MosquittoBroker]:
    """A fresh Mosquitto for federation 'fed1' with a coordinator user and devices dev-0..dev-2."""
    if shutil.which("mosquitto") is None:
        message = "mosquitto is not installed (scripts/bootstrap.sh --test-tools)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must run the broker tests, not skip them")
        pytest.skip(message)
    broker = start_mosquitto()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker
