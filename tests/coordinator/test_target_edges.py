"""The regression bin edges a coordinator puts in every round task (objectives.group_losses)."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.coordinator.daemon import target_edges


def test_the_coordinator_sends_the_octiles_of_its_held_out_targets():
    y = np.arange(1, 801, dtype=np.float32).reshape(400, 2)
    edges = target_edges("regression", (np.zeros((400, 3)), y))
    assert len(edges) == 2 and all(len(row) == 7 for row in edges)
    assert edges[0][3] == pytest.approx(np.median(y[:, 0])) and edges[1][0] == pytest.approx(np.quantile(y[:, 1], 0.125))
    assert target_edges("classification", (np.zeros((4, 3)), np.arange(4))) == ()
    assert target_edges("regression", None) == ()
