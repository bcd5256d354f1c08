"""Cosine scores, quality signals and importance (docs/ALGORITHM.md §4)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.coordinator.core import contribution as C


def _loo_bruteforce(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    big = (sigma[:, None] * u).sum(0)
    out = []
    for n in range(len(x)):
        rest = big - sigma[n] * u[n]
        out.append(u[n] @ rest / np.linalg.norm(rest) if np.linalg.norm(rest) > 1e-12 else 0.0)
    return np.array(out)


@given(hnp.arrays(np.float64, st.tuples(st.integers(2, 6), st.integers(2, 8)), elements=st.floats(-10, 10)))
def test_closed_form_loo_cosine_matches_bruteforce(x):
    if np.any(np.linalg.norm(x, axis=1) < 1e-3):
        return
    sigma = np.full(len(x), 1 / len(x))
    psi = C.loo_cosine(C.gram(x), sigma)
    assert np.all(np.isfinite(psi)) and np.all(np.abs(psi) <= 1 + 1e-9)
    # From the Gram matrix, ‖U - σ_n u_n‖² carries an absolute error of ~1e-16, so where the
    # other clients' unit updates cancel (the leave-one-out aggregate is ~1e-6 long) ψ_n keeps
    # only a few digits; there the brute force is compared loosely.
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    rest = np.linalg.norm(sigma @ u - sigma[:, None] * u, axis=1)
    tight = rest > 1e-4
    assert np.allclose(psi[tight], _loo_bruteforce(x, sigma)[tight], atol=1e-6)
    assert np.allclose(psi, _loo_bruteforce(x, sigma), atol=1e-3)


def test_loo_cosine_where_the_others_cancel_keeps_the_sign_and_most_digits():
    x = np.array([[1e-5, 7.0], [0.0, -1.0], [-1.0, -1.0]])
    sigma = np.full(3, 1 / 3)
    assert np.allclose(C.loo_cosine(C.gram(x), sigma), _loo_bruteforce(x, sigma), atol=1e-4)


def test_zero_norm_updates_give_no_nan():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.1]])
    psi = C.loo_cosine(C.gram(x), np.full(3, 1 / 3))
    assert np.all(np.isfinite(psi)) and psi[0] == 0.0
    assert np.all(np.isfinite(C.self_cosine(C.gram(np.zeros((2, 3))), np.full(2, 0.5))))


def test_sign_flipped_client_scores_negative():
    rng = np.random.default_rng(1)
    base = rng.normal(size=50)
    x = np.stack([base + 0.1 * rng.normal(size=50) for _ in range(5)] + [-base])
    psi = C.loo_cosine(C.gram(x), np.full(6, 1 / 6))
    assert psi[-1] < -0.9 and np.all(psi[:-1] > 0.5)


def test_loss_ratio_per_class_median():
    clients = [{0: (1.0, 10), 1: (1.0, 10)}, {0: (1.0, 10)}, {0: (5.0, 10), 1: (5.0, 2)}]
    med = C.class_medians(clients)
    assert med == {0: 1.0, 1: 3.0}
    ratio = C.loss_ratio(clients[2], med)
    assert ratio == pytest.approx(((5.05 / 1.05) + (5.05 / 3.05)) / 2)
    assert C.loss_ratio(clients[2], med, weighted=True) == pytest.approx((10 * 5.05 / 1.05 + 2 * 5.05 / 3.05) / 12)
    assert C.loss_quality(1.5) == 1.0 and C.loss_quality(3.0) == 0.5 and C.loss_quality(9.0) == 0.0
    assert C.loss_quality(None) == 1.0 and C.loss_ratio({}, med) is None
    # A larger offset damps ratios of tiny losses (a confident model), not of large ones.
    tiny = C.loss_ratio({0: (0.08, 10)}, {0: 0.02}, offset=0.5)
    assert tiny == pytest.approx(0.58 / 0.52) and C.loss_ratio({0: (0.08, 10)}, {0: 0.02}) > 1.8


def test_median_loss_ratio_ignores_a_minority_of_unlearned_classes_but_not_wrong_labels():
    medians = {c: 0.01 for c in range(4)}
    unlearned = {0: (0.01, 9), 1: (0.01, 9), 2: (1.0, 8), 3: (1.2, 5)}  # two classes the model missed
    mislabelled = {c: (2.3, 8) for c in range(4)}  # every class wrong
    assert C.loss_ratio(unlearned, medians, weighted=True) > 1.5
    assert C.loss_ratio(unlearned, medians, weighted=True, reduce="median") == pytest.approx(1.0)
    assert C.loss_ratio(mislabelled, medians, weighted=True, reduce="median") > 5


@given(hnp.arrays(np.float64, st.integers(1, 30), elements=st.floats(0, 1e3)), st.data())
def test_weighted_median_splits_the_weight(values, data):
    weights = data.draw(hnp.arrays(np.float64, len(values), elements=st.floats(0.01, 100)))
    m = C.weighted_median(values, weights)
    assert m in values
    assert weights[values < m].sum() < 0.5 * weights.sum() + 1e-9
    assert weights[values <= m].sum() >= 0.5 * weights.sum() - 1e-9


def test_quality_ema_clamp_and_importance_normalised():
    assert C.update_quality(1.0, -1.0, 0.5, 1e-3) == 1e-3
    assert C.update_quality(1.0, 0.0, 0.9, 1e-3) == pytest.approx(0.9)
    r = C.importance({"a": 1.0, "b": 0.5}, {"a": 100, "b": 100})
    assert sum(r.values()) == pytest.approx(1.0) and r["a"] == pytest.approx(2 / 3)
    w, fell = C.weights(np.zeros(3))
    assert fell and np.allclose(w, 1 / 3)
    assert C.neutral_quality({}) == 1.0 and C.neutral_quality({"a": 0.2, "b": 0.4}) == pytest.approx(0.3)


def test_relative_loss_quality_flags_outliers_only():
    ratios = [1.0, 1.01, 0.99, 1.02, 0.98, 1.4, None]
    x = C.relative_loss_quality(ratios)
    assert np.all(x[:5] == 1.0) and x[5] == 0.0 and x[6] == 1.0
    assert np.all(C.relative_loss_quality([1.0, 1.001, 0.999, 1.002]) == 1.0)  # spread floor
    assert np.all(C.relative_loss_quality([1.0, 9.0]) == 1.0)  # too few clients to judge


def test_loss_ratio_of_absurd_self_reports_is_finite_and_large_without_overflow():
    import warnings

    from fedprune.coordinator.core.contribution import RATIO_CAP, loss_ratio

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ratio = loss_ratio({0: (1e300, 2**63 - 1), 1: (0.1, 1)}, {0: 0.5, 1: 0.5}, weighted=True)
    assert np.isfinite(ratio) and ratio > RATIO_CAP / 2


def test_loss_ratio_leaves_out_the_classes_a_client_holds_most_of():
    """A clean client holding most of class 0 is scored on its held-out loss there against the
    others' training losses once it loses weight; with max_share that class is no evidence."""
    dominant = {0: (0.9, 60), 1: (0.1, 5)}
    peers = [{0: (0.1, 10), 1: (0.1, 20)}, {0: (0.1, 10), 1: (0.1, 20)}]
    reports = [dominant, *peers]
    medians, totals = C.class_medians(reports), C.class_totals(reports)
    assert totals == {0: 80, 1: 45}
    assert C.loss_ratio(dominant, medians, weighted=True) > 2
    assert C.loss_ratio(dominant, medians, weighted=True, totals=totals, max_share=0.5) == pytest.approx(1.0)
    # Every class dominated: no evidence at all, which the quality band reads as full weight.
    assert C.loss_ratio({0: (0.9, 60)}, medians, totals={0: 80}, max_share=0.5) is None
    # Wrong labels on shared classes are still seen.
    mislabelled = {0: (3.0, 10), 1: (3.0, 10)}
    reports = [mislabelled, *peers]
    assert C.loss_ratio(mislabelled, C.class_medians(reports), weighted=True,
                        totals=C.class_totals(reports), max_share=0.5) > 5
