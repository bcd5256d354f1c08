"""fedprune.edge_agent.core.privacy: clipping over held positions, noise only where the device holds weights,
the RDP accountant against independent numeric integration, and the budget ledger."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.edge_agent.core.privacy import (
    DEFAULT_ORDERS,
    PrivacyBudget,
    RoundCost,
    add_gaussian_noise,
    clip_update,
    compute_epsilon,
    epsilon_from_rdp,
    noise_multiplier_for,
    privatize,
    rdp_gaussian,
    rdp_subsampled_gaussian,
    update_norm,
)


def sparse_update(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    masks = {"fc1.weight": rng.random((64, 40)) < 0.2, "fc2.weight": rng.random((10, 64)) < 0.5}
    delta = {
        "fc1.weight": (rng.standard_normal((64, 40)) * masks["fc1.weight"]).astype(np.float32),
        "fc1.bias": rng.standard_normal(64).astype(np.float32),
        "fc2.weight": (rng.standard_normal((10, 64)) * masks["fc2.weight"]).astype(np.float32),
        "fc2.bias": rng.standard_normal(10).astype(np.float32),
    }
    return delta, masks


def flat(update: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.ravel().astype(np.float64) for v in update.values()])


# --- clipping --------------------------------------------------------------------------------


def test_clip_scales_to_C_and_keeps_direction(rng: np.random.Generator) -> None:
    delta, masks = sparse_update(rng)
    norm = np.linalg.norm(flat(delta))
    clipped, reported = clip_update(delta, C=norm / 4, masks=masks)
    assert reported == pytest.approx(norm, rel=1e-6)
    assert np.linalg.norm(flat(clipped)) == pytest.approx(norm / 4, rel=1e-5)
    assert np.allclose(flat(clipped) * 4, flat(delta), atol=1e-5)
    assert all(clipped[k].dtype == np.float32 for k in clipped)


def test_clip_leaves_a_short_update_alone(rng: np.random.Generator) -> None:
    delta, masks = sparse_update(rng)
    clipped, norm = clip_update(delta, C=1e6, masks=masks)
    assert all(np.array_equal(clipped[k], delta[k]) for k in delta)
    assert norm < 1e6


def test_clip_counts_only_held_positions_and_zeroes_the_rest(rng: np.random.Generator) -> None:
    delta, masks = sparse_update(rng)
    polluted = dict(delta, **{"fc1.weight": delta["fc1.weight"] + 100.0 * ~masks["fc1.weight"]})
    clipped, norm = clip_update(polluted, C=0.5, masks=masks)
    assert norm == pytest.approx(update_norm(delta), rel=1e-6)
    assert not clipped["fc1.weight"][~masks["fc1.weight"]].any()


@given(hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(-1e6, 1e6, width=32)), st.floats(1e-3, 1e3))
def test_clipped_norm_never_exceeds_C(values: np.ndarray, C: float) -> None:
    clipped, norm = clip_update({"w": values}, C)
    assert np.linalg.norm(clipped["w"].astype(np.float64)) <= C * (1 + 1e-5)
    assert norm == pytest.approx(np.linalg.norm(values.astype(np.float64)), rel=1e-6)


def test_clip_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        clip_update({"w": np.array([1.0, np.nan])}, 1.0)
    with pytest.raises(ValueError, match="C"):
        clip_update({"w": np.ones(3)}, 0.0)
    with pytest.raises(ValueError, match="shape"):
        clip_update({"w": np.ones(3)}, 1.0, masks={"w": np.ones(4, bool)})


# --- noise -----------------------------------------------------------------------------------


def test_noise_only_on_held_positions_with_std_sigma_C(rng: np.random.Generator) -> None:
    masks = {"w": rng.random(200_000) < 0.1}
    delta = {"w": np.zeros(200_000, np.float32), "b": np.zeros(50_000, np.float32)}
    noised = add_gaussian_noise(delta, masks, sigma=1.5, C=0.2, rng=rng)
    held = noised["w"][masks["w"]]
    assert not noised["w"][~masks["w"]].any(), "noise on pruned positions would break sparsity"
    assert np.count_nonzero(noised["w"]) == masks["w"].sum()
    # 20,000 and 50,000 draws: the sample std is within 3 % of 0.3 with overwhelming probability.
    assert held.std() == pytest.approx(0.3, rel=0.03)
    assert noised["b"].std() == pytest.approx(0.3, rel=0.03)
    assert abs(held.mean()) < 0.01


def test_noise_is_reproducible_and_zero_sigma_is_identity(rng: np.random.Generator) -> None:
    delta, masks = sparse_update(rng)
    a = add_gaussian_noise(delta, masks, 1.0, 1.0, np.random.default_rng(7))
    b = add_gaussian_noise(delta, masks, 1.0, 1.0, np.random.default_rng(7))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    same = add_gaussian_noise(delta, masks, 0.0, 1.0, rng)
    assert all(np.array_equal(same[k], delta[k]) for k in delta)


def test_privatize_clips_then_noises(rng: np.random.Generator) -> None:
    delta, masks = sparse_update(rng)
    released, norm = privatize(delta, masks, C=1.0, sigma=1e-6, rng=rng)
    assert norm > 1.0
    assert update_norm(released, masks) == pytest.approx(1.0, abs=1e-3)
    for name, mask in masks.items():
        assert not released[name][~mask].any()


# --- accountant ------------------------------------------------------------------------------


def exact_gaussian_delta(epsilon: float, sigma: float) -> float:
    """δ(ε) of one Gaussian mechanism (sensitivity 1, std σ) by integrating its privacy loss.

    Under P the privacy loss L is N(μ²/2, μ²) with μ = 1/σ, and δ(ε) = E_P[(1 − e^{ε−L})_+].
    """
    mu = 1.0 / sigma
    loss = np.linspace(mu * mu / 2 - 40 * mu, mu * mu / 2 + 40 * mu, 200_001)
    density = np.exp(-((loss - mu * mu / 2) ** 2) / (2 * mu * mu)) / (mu * math.sqrt(2 * math.pi))
    return float(np.trapezoid(density * np.clip(1 - np.exp(epsilon - loss), 0, None), loss))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
def test_one_gaussian_step_is_a_valid_and_tight_bound(sigma: float) -> None:
    epsilon = compute_epsilon(sigma, steps=1, delta=1e-5)
    assert exact_gaussian_delta(epsilon, sigma) <= 1e-5, "RDP must upper-bound the exact privacy curve"
    assert exact_gaussian_delta(0.8 * epsilon, sigma) > 1e-5, "and be within 25 % of it"


def test_unsampled_rdp_is_exact() -> None:
    assert np.allclose(rdp_gaussian(2.0, (2.0, 10.0)), [2 / 8, 10 / 8])
    assert np.array_equal(rdp_subsampled_gaussian(2.0, 1.0), rdp_gaussian(2.0))


@pytest.mark.parametrize("alpha,q,sigma", [(2, 0.1, 1.5), (3, 0.05, 1.0), (8, 0.2, 2.0), (5, 0.5, 0.8)])
def test_binomial_expansion_matches_the_integrated_renyi_divergence(alpha: int, q: float, sigma: float) -> None:
    x = np.linspace(-40 * sigma, 40 * sigma + 1, 400_001)
    base = np.exp(-(x**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    ratio = (1 - q) + q * np.exp((2 * x - 1) / (2 * sigma**2))  # mixture density / base density
    divergence = math.log(np.trapezoid(base * ratio**alpha, x)) / (alpha - 1)
    assert rdp_subsampled_gaussian(sigma, q, (float(alpha),))[0] == pytest.approx(divergence, rel=1e-6)


def test_non_integer_orders_are_unusable_when_subsampled() -> None:
    rdp = rdp_subsampled_gaussian(1.0, 0.1, (1.5, 2.0))
    assert math.isinf(rdp[0]) and math.isfinite(rdp[1])


# Cross-checked against dp-accounting 0.6.0 (RdpAccountant over DEFAULT_ORDERS): equal to 5 digits.
@pytest.mark.parametrize("sigma,q,steps,delta,expected", [
    (1.0, 1.0, 1, 1e-5, 4.75273),
    (4.0, 1.0, 50, 1e-5, 9.33786),
    (10.0, 1.0, 1000, 1e-6, 20.95298),
    (1.1, 256 / 60000, 14062, 1e-5, 2.59698),
    (2.0, 0.1, 200, 1e-5, 3.67975),
])
def test_reference_epsilons(sigma: float, q: float, steps: int, delta: float, expected: float) -> None:
    assert compute_epsilon(sigma, steps, delta, q) == pytest.approx(expected, abs=2e-5)


def test_epsilon_grows_with_steps_and_shrinks_with_noise_and_sampling() -> None:
    by_steps = [compute_epsilon(2.0, n, 1e-5) for n in (1, 2, 10, 100)]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == 4
    by_sigma = [compute_epsilon(s, 10, 1e-5) for s in (0.5, 1, 4, 16, 100)]
    assert by_sigma == sorted(by_sigma, reverse=True)
    assert by_sigma[-1] < 0.5
    assert compute_epsilon(1.0, 10, 1e-5, 0.01) < compute_epsilon(1.0, 10, 1e-5, 0.1) < compute_epsilon(1.0, 10, 1e-5)
    assert compute_epsilon(1.0, 0, 1e-5) == 0.0


def test_noise_multiplier_for_inverts_compute_epsilon() -> None:
    sigma = noise_multiplier_for(8.0, 1e-5, steps=100)
    assert compute_epsilon(sigma, 100, 1e-5) <= 8.0 < compute_epsilon(sigma * 0.99, 100, 1e-5)


def test_accountant_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilon_from_rdp(np.zeros(len(DEFAULT_ORDERS)), 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        rdp_gaussian(0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        rdp_subsampled_gaussian(1.0, 1.5)
    with pytest.raises(ValueError, match="orders"):
        rdp_gaussian(1.0, (1.0,))


# --- the ledger ------------------------------------------------------------------------------


def test_budget_declines_once_the_next_round_would_exceed_it() -> None:
    cost = RoundCost(noise_multiplier=4.0)
    budget = PrivacyBudget("fed-a", epsilon_budget=8.0, delta=1e-5)
    while budget.can_participate(cost):
        budget = budget.record(cost)
    assert budget.spent <= 8.0 < budget.epsilon_after(cost)
    assert budget.spent == pytest.approx(compute_epsilon(4.0, budget.rounds, 1e-5))
    assert compute_epsilon(4.0, budget.rounds + 1, 1e-5) > 8.0


def test_budget_survives_a_json_round_trip() -> None:
    budget = PrivacyBudget("fed-a", 3.0, 1e-6).record(RoundCost(2.0, sample_rate=0.1)).record(RoundCost(3.0))
    restored = PrivacyBudget.from_dict(json.loads(json.dumps(budget.to_dict())))
    assert restored == budget
    assert restored.spent == budget.spent
    assert budget.to_dict()["rdp"][0] == "inf"  # a fractional order after a subsampled round


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("rdp"),
    lambda d: d.update(format="something-else"),
    lambda d: d.update(rdp=[-1.0] * len(d["orders"])),
    lambda d: d.update(rdp=[0.0]),
    lambda d: d.update(delta=2.0),
    lambda d: d.update(rounds="3"),
    lambda d: d.update(orders=[0.5] * len(d["orders"])),
    lambda d: d.update(orders="2,3"),
    lambda d: d.update(rdp=[True] * len(d["orders"])),
])
def test_malformed_ledgers_are_rejected(mutate) -> None:
    data = PrivacyBudget("fed-a", 3.0, 1e-6).record(RoundCost(2.0)).to_dict()
    mutate(data)
    with pytest.raises(ValueError):
        PrivacyBudget.from_dict(data)


def test_round_cost_validates() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        RoundCost(1.0, sample_rate=0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        RoundCost(-1.0)
