"""fedprune.protocol.distributed_dp: Skellam noise shares, the Skellam RDP bound against the exact
Rényi divergence of shifted Skellams, sensitivities of rounded vectors, and the central/local accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedprune.protocol.distributed_dp import (
    DistributedNoise,
    central_epsilon,
    local_epsilon,
    mu_for_epsilon,
    rdp_round,
    rdp_skellam,
    sensitivities,
    skellam_noise,
)
from fedprune.edge_agent.core.privacy import DEFAULT_ORDERS, compute_epsilon

DELTA = 1e-5
# A round of 50 devices with weight 1/50, 1000 coordinates, clip 1, scale 1e4: Δ2 = 200 + sqrt(1000).
C, S, D, N = 1.0, 1e4, 1000, 50
W = 1.0 / N


# log(n!) for n = 0..2047, by exact summation: the pmf below needs factorials up to 2·terms.
LOG_FACTORIAL = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, 2048, dtype=np.float64)))))


def skellam_log_pmf(mu: float, ks: np.ndarray, terms: int = 700) -> np.ndarray:
    """log P[Sk(μ) = k] = −2μ + log Σ_j μ^(2j+|k|) / (j! (j+|k|)!), summed in log space."""
    j = np.arange(terms)[None, :]
    k = np.abs(np.asarray(ks))[:, None]
    t = (2 * j + k) * math.log(mu) - LOG_FACTORIAL[j + k] - LOG_FACTORIAL[j]
    top = t.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(t - top).sum(axis=1)) - 2 * mu


def renyi_shifted_skellam(mu: float, shift: int, alpha: int, support: int = 400) -> float:
    """D_α(Sk(μ) + shift || Sk(μ)) by direct summation (the tails beyond ±support are negligible)."""
    ks = np.arange(-support - shift, support + 1)
    log_pmf = skellam_log_pmf(mu, ks)  # log P[Sk = k]; P[Sk + shift = k] is the same array moved by shift
    log_p, log_q = log_pmf[:-shift], log_pmf[shift:]
    t = alpha * log_p + (1 - alpha) * log_q
    top = t.max()
    return float((top + math.log(np.exp(t - top).sum())) / (alpha - 1))


# --- noise -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mu", [0.5, 3.0, 40.0])
def test_skellam_noise_is_integer_with_mean_zero_and_variance_two_mu(mu: float) -> None:
    noise = skellam_noise((400, 500), mu, np.random.default_rng(7))
    assert noise.dtype == np.int64 and noise.shape == (400, 500)
    n = noise.size
    assert abs(noise.mean()) < 5 * math.sqrt(2 * mu / n)
    # Relative standard error of the sample variance is sqrt((2 + 1/(2μ))/n) < 0.004 here.
    assert noise.var() == pytest.approx(2 * mu, rel=0.03)


def test_skellam_noise_is_reproducible_and_zero_mu_is_zero() -> None:
    first = skellam_noise((1000,), 5.0, np.random.default_rng(3))
    assert np.array_equal(first, skellam_noise((1000,), 5.0, np.random.default_rng(3)))
    assert not np.array_equal(first, skellam_noise((1000,), 5.0, np.random.default_rng(4)))
    zero = skellam_noise((3, 4), 0.0, np.random.default_rng(3))
    assert zero.dtype == np.int64 and not zero.any()


def test_the_sum_of_n_shares_is_skellam_of_the_total() -> None:
    mu, n, draws = 30.0, N, 100_000
    plan = DistributedNoise(mu=mu, expected_devices=n)
    assert plan.per_device() == pytest.approx(mu / n)
    rng = np.random.default_rng(11)
    total = sum(plan.sample((draws,), rng) for _ in range(n))
    assert total.dtype == np.int64
    assert abs(total.mean()) < 5 * math.sqrt(2 * mu / draws)
    assert total.var() == pytest.approx(2 * mu, rel=0.03)
    # Not only the variance: the frequency of each value near 0 matches the exact Sk(μ) pmf.
    ks = np.arange(-3, 4)
    exact = np.exp(skellam_log_pmf(mu, ks))
    seen = np.array([(total == k).mean() for k in ks])
    assert np.all(np.abs(seen - exact) < 5 * np.sqrt(exact * (1 - exact) / draws))


def test_noise_rejects_bad_parameters() -> None:
    rng = np.random.default_rng(0)
    for mu in (-1.0, math.nan, math.inf, True, "3"):
        with pytest.raises(ValueError):
            skellam_noise((2,), mu, rng)  # type: ignore[arg-type]
    for shape in ([2, 3], (2, -1), (2.0,)):
        with pytest.raises(ValueError):
            skellam_noise(shape, 1.0, rng)  # type: ignore[arg-type]
    for mu, devices in ((0.0, 3), (1.0, 0), (1.0, 2.0)):
        with pytest.raises(ValueError):
            DistributedNoise(mu=mu, expected_devices=devices)  # type: ignore[arg-type]


# --- the RDP bound ---------------------------------------------------------------------------


@pytest.mark.parametrize("mu", [1.0, 10.0, 50.0])
def test_reference_pmf_is_a_distribution_with_variance_two_mu(mu: float) -> None:
    ks = np.arange(-400, 401)
    pmf = np.exp(skellam_log_pmf(mu, ks))
    assert pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert (pmf * ks).sum() == pytest.approx(0.0, abs=1e-9)
    assert (pmf * ks**2).sum() == pytest.approx(2 * mu, rel=1e-9)


@pytest.mark.parametrize("mu", [1.0, 2.0, 10.0, 50.0])
@pytest.mark.parametrize("shift", [1, 2, 5])
@pytest.mark.parametrize("alpha", [2, 3, 8, 16])
def test_bound_holds_against_the_exact_renyi_divergence(mu: float, shift: int, alpha: int) -> None:
    """One coordinate shifted by Δ: Δ1 = |Δ|, Δ2 = |Δ|. The bound must never be below the truth."""
    exact = renyi_shifted_skellam(mu, shift, alpha)
    bound = float(rdp_skellam(shift, shift, mu, (float(alpha),))[0])
    assert exact <= bound * (1 + 1e-9)
    if mu == 50.0 and shift <= 2 and alpha <= 8:
        assert bound <= 1.05 * exact  # and tight once the noise dominates the shift


def test_rdp_grows_with_order_and_shrinks_with_mu() -> None:
    l1, l2 = sensitivities(C, S, D, W)
    rdp = rdp_skellam(l1, l2, 1e5)
    assert rdp.shape == (len(DEFAULT_ORDERS),)
    assert np.all(np.diff(rdp) >= 0)
    integer = [float(a) for a in range(2, 65)]
    assert np.all(np.diff(rdp_skellam(l1, l2, 1e5, tuple(integer))) > 0)
    # A fractional order is charged the next integer's value.
    assert rdp_skellam(l1, l2, 1e5, (1.5, 2.0, 2.25, 3.0))[[0, 2]] == pytest.approx(
        rdp_skellam(l1, l2, 1e5, (2.0, 3.0)))
    mus = [1e2, 1e3, 1e4, 1e5, 1e6]
    rows = np.array([rdp_skellam(l1, l2, mu) for mu in mus])
    assert np.all(np.diff(rows, axis=0) < 0)


def test_rdp_tends_to_the_gaussian_with_the_same_variance() -> None:
    """σ² = 2μ: Gaussian RDP α·Δ2²/(2σ²); the Skellam excess vanishes as μ grows."""
    l1, l2 = 30.0, 10.0
    alphas = tuple(float(a) for a in (2, 8, 32, 64))
    ratios = []
    for mu in (1e1, 1e2, 1e4, 1e6):
        gaussian = np.asarray(alphas) * l2**2 / (2 * (2 * mu))
        ratio = rdp_skellam(l1, l2, mu, alphas) / gaussian
        assert np.all(ratio >= 1)
        ratios.append(ratio)
    ratios_arr = np.array(ratios)
    assert np.all(np.diff(ratios_arr, axis=0) < 0)
    assert np.all(ratios_arr[-1] < 1 + 1e-6)
    assert ratios_arr[0].max() > 1.05  # at small μ the correction term is not negligible


def test_rdp_rejects_bad_parameters() -> None:
    for l1, l2, mu in ((0.0, 1.0, 1.0), (1.0, -1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 1.0, math.inf)):
        with pytest.raises(ValueError):
            rdp_skellam(l1, l2, mu)
    with pytest.raises(ValueError):
        rdp_skellam(1.0, 1.0, 1.0, (1.0, 2.0))


# --- sensitivities ---------------------------------------------------------------------------


def test_sensitivities_formula() -> None:
    l1, l2 = sensitivities(C, S, D, W)
    assert l2 == pytest.approx(S * W * C + math.sqrt(D))
    assert l1 == pytest.approx(math.sqrt(D) * l2)  # sqrt(d) < Δ2 here
    # With the unconditional rounding bound Δ2 >= sqrt(d), so Cauchy-Schwarz always wins the min.
    l1_small, l2_small = sensitivities(1.0, 2.0, 10_000, 0.5)
    assert l2_small == pytest.approx(1.0 + 100.0) and l1_small == pytest.approx(100.0 * 101.0)


def test_sensitivities_bound_stochastically_rounded_updates() -> None:
    rng = np.random.default_rng(5)
    clip, scale, dim, weight = 1.0, 300.0, 400, 0.1
    l1, l2 = sensitivities(clip, scale, dim, weight)
    worst_l1 = worst_l2 = 0.0
    for _ in range(200):
        x = rng.standard_normal(dim) * (rng.random(dim) < 0.3)  # sparse and dense-ish updates
        x *= clip / np.linalg.norm(x)
        y = scale * weight * x
        v = np.floor(y) + (rng.random(dim) < y - np.floor(y))  # unbiased stochastic rounding
        worst_l2, worst_l1 = max(worst_l2, np.linalg.norm(v)), max(worst_l1, np.abs(v).sum())
    assert worst_l2 <= l2 and worst_l1 <= l1


def test_sensitivities_reject_bad_parameters() -> None:
    for args in ((0.0, S, D, W), (C, -1.0, D, W), (C, S, 0, W), (C, S, 10.5, W), (C, S, D, 0.0), (C, S, D, 1.5)):
        with pytest.raises(ValueError):
            sensitivities(*args)  # type: ignore[arg-type]


# --- the accountant --------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon, rounds", [(0.5, 1), (1.0, 10), (4.0, 100)])
def test_mu_for_epsilon_round_trips_through_central_epsilon(epsilon: float, rounds: int) -> None:
    mu = mu_for_epsilon(epsilon, DELTA, rounds, C, S, D, W)
    plan = DistributedNoise(mu=mu, expected_devices=N)
    got = central_epsilon(plan.per_device(), N, rounds, DELTA, C, S, D, W)
    assert got == pytest.approx(epsilon, rel=0.01) and got <= epsilon * (1 + 1e-9)
    # Smallest: 1 % less noise already overshoots the target.
    assert central_epsilon(0.99 * mu / N, N, rounds, DELTA, C, S, D, W) > epsilon


def test_fewer_survivors_mean_a_larger_central_epsilon() -> None:
    mu = mu_for_epsilon(1.0, DELTA, 10, C, S, D, W)
    per_device = DistributedNoise(mu=mu, expected_devices=N).per_device()
    eps = [central_epsilon(per_device, s, 10, DELTA, C, S, D, W) for s in (N, 40, 25, 10, 1)]
    assert np.all(np.diff(eps) > 0)
    assert eps[-1] == local_epsilon(per_device, 10, DELTA, C, S, D, W)


def test_local_epsilon_is_far_weaker_than_central() -> None:
    mu = mu_for_epsilon(1.0, DELTA, 10, C, S, D, W)
    central = central_epsilon(mu / N, N, 10, DELTA, C, S, D, W)
    local = local_epsilon(mu / N, 10, DELTA, C, S, D, W)
    # Gaussian-like scaling: ε grows about like the noise std ratio sqrt(50) ≈ 7 (here 9.2).
    assert local > 5 * central


def test_rounds_compose_and_zero_rounds_cost_nothing() -> None:
    eps = [central_epsilon(1e5, N, r, DELTA, C, S, D, W) for r in (1, 2, 10, 100)]
    assert np.all(np.diff(eps) > 0)
    assert central_epsilon(1e5, N, 0, DELTA, C, S, D, W) == 0.0
    assert np.allclose(10 * rdp_round(N * 1e5, C, S, D, W),
                       sum(rdp_round(N * 1e5, C, S, D, W) for _ in range(10)))


@pytest.mark.parametrize("epsilon, rounds", [(1.0, 10), (4.0, 100)])
def test_skellam_matches_the_gaussian_accountant_at_large_mu(epsilon: float, rounds: int) -> None:
    """Same variance σ² = 2μ (field units), noise multiplier σ/Δ2 in privacy.compute_epsilon.

    Tolerance: the Skellam ε is never below the Gaussian one (its RDP is the Gaussian RDP plus a
    non-negative term) and within 0.1 % of it at these μ (~4e6, where the excess is ~1e-7).
    """
    mu = mu_for_epsilon(epsilon, DELTA, rounds, C, S, D, W)
    skellam = central_epsilon(mu / N, N, rounds, DELTA, C, S, D, W)
    _, l2 = sensitivities(C, S, D, W)
    gaussian = compute_epsilon(math.sqrt(2 * mu) / l2, rounds, DELTA)
    assert gaussian <= skellam <= 1.001 * gaussian
    # At small μ (tiny sensitivities, little noise) the two visibly differ, as the bound says.
    l1_small, l2_small = sensitivities(1.0, 1.0, 4, 1.0)
    small_skellam = central_epsilon(10.0, 1, 1, DELTA, 1.0, 1.0, 4, 1.0)
    small_gaussian = compute_epsilon(math.sqrt(20.0) / l2_small, 1, DELTA)
    assert small_skellam > 1.02 * small_gaussian


def test_accountant_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        mu_for_epsilon(0.0, DELTA, 10, C, S, D, W)
    with pytest.raises(ValueError):
        mu_for_epsilon(1.0, DELTA, 0, C, S, D, W)
    with pytest.raises(ValueError):
        mu_for_epsilon(1.0, 1, 10, C, S, D, W)  # type: ignore[arg-type]  # delta must be a float
    with pytest.raises(ValueError):
        central_epsilon(1e5, 0, 10, DELTA, C, S, D, W)
    with pytest.raises(ValueError):
        central_epsilon(0.0, N, 10, DELTA, C, S, D, W)
    with pytest.raises(ValueError):
        local_epsilon(1e5, -1, DELTA, C, S, D, W)
