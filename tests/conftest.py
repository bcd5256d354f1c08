"""Shared fixtures: seeded randomness, hypothesis profiles (fewer examples under CI), and a
coordinator daemon with enrolled devices and no broker (the fuzz target's world)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from tests.fuzz.daemon_target import DaemonWorld

settings.register_profile("dev", max_examples=200, deadline=None)
settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261126)


@pytest.fixture
def world() -> Iterator[DaemonWorld]:
    from tests.fuzz import daemon_target  # imported on use: it loads the whole coordinator

    w = daemon_target.DaemonWorld()
    try:
        yield w
    finally:
        w.daemon.link.close(timeout=0.5)
        w.close()
