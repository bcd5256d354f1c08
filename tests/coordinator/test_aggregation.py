"""Combiners over sparse supports (docs/ALGORITHM.md §5): holders only, abstention, empty -> 0."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.coordinator.core import aggregation as A


def test_weighted_mean_dense_is_plain_weighted_average():
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    out, empty = A.weighted_mean(x, None, np.array([0.25, 0.75]))
    assert np.allclose(out, [2.5, 5.0]) and not empty.any()


def test_non_holders_abstain_and_empty_positions_are_flagged():
    x = np.array([[1.0, 0.0, 0.0], [3.0, 5.0, 0.0]])
    holds = np.array([[True, False, False], [True, True, False]])
    out, empty = A.weighted_mean(x, holds, np.array([0.5, 0.5]))
    assert out.tolist() == [2.0, 5.0, 0.0]  # position 1: only client 1 votes, no pull to 0
    assert empty.tolist() == [False, False, True]


def test_median_and_trimmed_mean_over_holders():
    x = np.array([[1.0, 10.0], [2.0, 0.0], [100.0, 30.0], [3.0, 0.0]])
    holds = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    med, empty = A.coordinate_median(x, holds)
    assert med.tolist() == [2.5, 20.0] and not empty.any()
    tm, _ = A.trimmed_mean(np.array([[1.0], [2.0], [3.0], [4.0], [1000.0]]), None, 0.2)
    assert tm.tolist() == [3.0]


@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 7), st.integers(1, 5)),
                  elements=st.floats(-1e3, 1e3)))
def test_median_matches_numpy_when_dense(x):
    med, _ = A.coordinate_median(x, None)
    assert np.allclose(med, np.median(x, axis=0))
    tm, _ = A.trimmed_mean(x, None, 0.0)
    assert np.allclose(tm, x.mean(axis=0))


def test_trim_fraction_is_validated():
    with pytest.raises(ValueError, match="trim"):
        A.trimmed_mean(np.zeros((2, 2)), None, 0.7)


def test_krum_picks_a_member_of_the_cluster():
    rng = np.random.default_rng(0)
    good = rng.normal(0, 0.1, (6, 20)) + 1.0
    bad = rng.normal(0, 0.1, (2, 20)) - 50.0
    x = np.vstack([good, bad])
    pick = A.krum_select(x @ x.T, n_byzantine=2, n_select=3)
    assert set(pick.tolist()) <= set(range(6)) and len(pick) == 3
