"""ERK budgets, exact mask sizes, schedule and the server re-prune (docs/ALGORITHM.md §3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fedprune.coordinator.core import masks as M
from fedprune.protocol.layout import ModelLayout, TensorSpec


def _layout(*shapes: tuple[int, ...]) -> ModelLayout:
    specs = []
    for i, shape in enumerate(shapes):
        specs.append(TensorSpec(f"l{i}.weight", shape, masked=True))
        specs.append(TensorSpec(f"l{i}.bias", (shape[0],), masked=False))
    return ModelLayout(tuple(specs))


MLP = _layout((256, 64), (128, 256), (10, 128))
CNN = _layout((16, 1, 3, 3), (32, 16, 3, 3), (10, 512))


@pytest.mark.parametrize("layout", [MLP, CNN])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
def test_erk_active_counts_sum_to_target_within_one_per_layer(layout, sparsity):
    d = M.erk_densities(layout, sparsity)
    k = M.active_counts(layout, d)
    total = sum(s.size for s in layout.masked)
    assert abs(sum(k.values()) - (1 - sparsity) * total) <= len(layout.masked)
    assert all(0 < d[n] <= 1.0 for n in d)


def test_small_layers_are_forced_dense_and_the_rest_rescaled():
    layout = _layout((512, 512), (512, 512), (10, 512))
    d = M.erk_densities(layout, 0.8)
    assert d["l2.weight"] == 1.0  # the 10-class output layer would exceed density 1 under ERK
    assert d["l0.weight"] == d["l1.weight"] < 1.0
    k = M.active_counts(layout, d)
    assert abs(sum(k.values()) - 0.2 * (2 * 512 * 512 + 5120)) <= 3


def test_config_dense_layers_and_uniform_and_er():
    d = M.erk_densities(MLP, 0.8, dense=["l2.weight"])
    assert d["l2.weight"] == 1.0
    u = M.erk_densities(MLP, 0.8, distribution="uniform")
    assert u == {"l0.weight": 1.0, "l1.weight": pytest.approx(0.2), "l2.weight": pytest.approx(0.2)}
    er = M.erk_densities(CNN, 0.8, distribution="er")
    assert er["l1.weight"] != M.erk_densities(CNN, 0.8)["l1.weight"]


def test_impossible_budget_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="budget"):
        M.erk_densities(MLP, 0.9, dense=["l1.weight"])
    with pytest.raises(ValueError, match="sparsity"):
        M.erk_densities(MLP, 1.0)
    with pytest.raises(ValueError, match="distribution"):
        M.erk_densities(MLP, 0.5, distribution="magic")
    with pytest.raises(ValueError, match="not prunable"):
        M.erk_densities(MLP, 0.5, dense=["l0.bias"])


@given(st.floats(0.0, 0.97), st.integers(0, 2**32 - 1))
def test_random_masks_have_exactly_k_active(sparsity, seed):
    d = M.erk_densities(CNN, sparsity)
    k = M.active_counts(CNN, d)
    m = M.random_masks(CNN, d, np.random.default_rng(seed))
    assert {n: int(v.sum()) for n, v in m.items()} == k
    assert all(m[s.name].shape == s.shape for s in CNN.masked)


def test_scaled_init_divides_sparse_layers_by_sqrt_density():
    params = {"a": np.ones((4, 4), np.float32), "b": np.ones(4, np.float32)}
    out = M.scale_sparse_init(params, {"a": 0.25})
    assert np.allclose(out["a"], 2.0) and np.allclose(out["b"], 1.0)


def test_cosine_schedule_and_readjust_rounds():
    assert M.prune_fraction(0, 0.5, 30) == pytest.approx(0.5)
    assert M.prune_fraction(15, 0.5, 30) == pytest.approx(0.25)
    assert M.prune_fraction(30, 0.5, 30) == 0.0
    assert [t for t in range(1, 61) if M.is_readjust_round(t, 5, 30)] == [5, 10, 15, 20, 25]
    assert not M.is_readjust_round(0, 5, 30)


def _reprune(values, votes, prev, k, min_votes=0):
    masks, churn = M.merge_and_reprune({"w": np.asarray(values, float)}, {"w": np.asarray(votes)},
                                       {"w": np.asarray(prev, bool)}, {"w": k}, min_votes)
    return masks["w"], churn


def test_reprune_keeps_largest_magnitudes_exactly_k():
    m, churn = _reprune([0.1, -5, 3, 0.2, 4], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], 3)
    assert m.tolist() == [False, True, True, False, True]
    assert churn == pytest.approx(1 / 3)


def test_reprune_ties_prefer_old_mask_then_lower_index():
    m, _ = _reprune([1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], 2)
    assert m.tolist() == [True, False, True, False]
    m, _ = _reprune([1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], 2)
    assert m.tolist() == [True, True, False, False]


def test_reprune_min_votes_and_fill_from_old_mask():
    # Position 4 has the largest value but one vote; with min_votes=2 only positions 0,1 qualify,
    # so the third slot is filled from m^t by magnitude (position 3 beats 2).
    m, _ = _reprune([0.5, 0.4, 0.1, 0.3, 9.0], [2, 2, 0, 0, 1], [0, 0, 1, 1, 0], 3, min_votes=2)
    assert m.tolist() == [True, True, False, True, False]


@given(st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_reprune_always_exact_k(k, seed):
    rng = np.random.default_rng(seed)
    n = 50
    prev = np.zeros(n, bool)
    prev[rng.choice(n, k, replace=False)] = True
    votes = rng.integers(0, 3, n)
    vals = np.round(rng.normal(size=n), 1)
    m, churn = _reprune(vals, votes, prev, k, min_votes=int(rng.integers(0, 3)))
    assert m.sum() == k and 0.0 <= churn <= 1.0


def test_nested_submask_is_subset_with_ceil_count():
    mask = {"w": np.array([1, 1, 1, 0, 1], bool)}
    params = {"w": np.array([0.1, -3.0, 0.1, 9.0, 2.0])}
    sub = M.nested_submask(params, mask, 0.5)["w"]
    assert sub.tolist() == [False, True, False, False, True]
    assert math.ceil(0.5 * 4) == sub.sum()
