"""Fixtures shared by the training tests (CPU and CUDA)."""

from __future__ import annotations

import pytest

from fedprune.coordinator.lab.datasets import load_dataset


@pytest.fixture(scope="module")
def digits():
    """200 digits training samples: enough for a few local epochs, quick on any device."""
    ds = load_dataset("digits", 0)
    return ds.X_train[:200], ds.y_train[:200]
