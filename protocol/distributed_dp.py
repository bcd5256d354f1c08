"""Distributed differential privacy for secure aggregation: Skellam noise shares and their accountant. Pure math.

Theory of operation. In a secure-aggregation round every selected device n scales its clipped
update x_n (||x_n||_2 <= C) by its public weight w_n (the round's weights sum to 1), converts it
to integers at a common scale S with stochastic rounding (field units: v_n = round(S·w_n·x_n)),
adds an integer noise share, masks the result modulo 2^bits, and the coordinator learns only
Σ_n (v_n + noise_n) mod 2^bits. Reducing modulo 2^bits is post-processing: it can cost accuracy
(wrap-around), never privacy.
1. Parametrisation. Sk(μ) is the symmetric Skellam distribution: the difference of two
   independent Poisson(μ) variables, mean 0, variance 2μ. Independent Skellams add their μ, so n
   devices each adding Sk(μ/n) to every coordinate put exactly Sk(μ) into every coordinate of the
   sum. (Beware: some code parametrises by the variance, i.e. Poisson(var/2) − Poisson(var/2).)
2. RDP. ``rdp_skellam`` is the bound of Agarwal, Kairouz and Liu, "The Skellam Mechanism for
   Differentially Private Federated Learning" (NeurIPS 2021, arXiv:2110.04995): for an integer
   order α > 1 and an integer query with L1 sensitivity Δ1 and L2 sensitivity Δ2, releasing
   x + Sk(μ) on every coordinate is (α, ε(α))-RDP with
       ε(α) = α·Δ2²/(4μ) + min( ((2α−1)·Δ2² + 6·Δ1) / (16μ²),  3·Δ1/(4μ) ).
   This is the multi-dimensional statement (Corollary 3.6 there, summing the one-dimensional
   bound of Theorem 3.5 for two shifted Skellams over coordinates; these numbers were not
   re-checked against the paper's text and may differ between versions). What we followed is the
   formula, matched term by term to ``_skellam_rdp`` in google-research/federated,
   distributed_dp/accounting_utils.py, which works in unscaled units with variance V = 2μ/S²
   and sensitivities Δ/S; substituting gives exactly the expression above. The first term is the
   Gaussian RDP α·Δ2²/(2σ²) at the same variance σ² = 2μ; the second vanishes as μ grows.
   The bound is proved for integer α only; at a fractional order we use ε(⌈α⌉), valid because
   the Rényi divergence is non-decreasing in its order (van Erven and Harremoës 2014, Thm. 3).
   RDP composes by addition over rounds; ε at a target δ comes from ``protocol.rdp.epsilon_from_rdp``.
   tests/edge_agent/test_distributed_dp.py checks the bound against the exact Rényi divergence of
   two shifted Skellams, summed numerically (it is never below it, and within 5 % at μ = 50).
3. Sensitivity. Zero-out adjacency, as in ``privacy``: one device's contribution against none.
   The contribution is v_n = round(S·w_n·x_n). Stochastic rounding moves every coordinate by less
   than 1, so by the triangle inequality, deterministically (no failure probability),
       Δ2 = S·w_n·C + sqrt(d),
   the unconditional bound of Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian
   Mechanism for Federated Learning with Secure Aggregation" (ICML 2021, arXiv:2102.06387),
   i.e. ``rounded_l2_norm_bound`` with beta = 0 in the Google code; we do not use the tighter
   conditional-rounding bound (beta > 0), which needs the device to re-round until the norm is
   small and adds beta to δ. For integer vectors every non-zero |v_i| >= 1 gives |v_i| <= v_i², and
   Cauchy-Schwarz gives ||v||_1 <= sqrt(d)·||v||_2, hence Δ1 = Δ2·min(sqrt(d), Δ2) (the Google
   code's ``rounded_l1_norm_bound``; with this Δ2 >= sqrt(d) the sqrt(d) branch wins). The weight
   w_n must be public and data-independent (e.g. 1/n or a fixed share); a weight that grows with
   the device's example count is itself data-dependent and is NOT covered. Replace-one adjacency
   (two datasets of the same device) doubles both sensitivities.
4. Who is protected from whom.
   * Against the coordinator alone, secure aggregation shows it only the sum, which carries
     Sk(Σ survivors' μ_n): ``central_epsilon`` is the guarantee. Only the devices whose inputs are
     actually in the sum contribute noise, so with dropouts the sum carries less noise than
     planned: account with the number of survivors (or a lower bound on it, such as the secure
     aggregation threshold), never with the number selected.
   * Against a coordinator colluding with other devices, the colluders can subtract their own
     contributions, noise included, from the sum; an honest device is then protected only by the
     honest devices' noise, in the worst case its own Sk(μ/n): ``local_epsilon``, far weaker. With
     h honest survivors the guarantee is ``central_epsilon(mu_per_device, h, ...)``.
5. In a secure round (``mechanism = "distributed"``, ``edge_agent/core/secure.py``). The device
   clips its flattened vector to ||x||_2 <= C and, at the masking stage, adds Sk(``device_mu``)
   with μ_dev = (σ·S·w_max·C)²/(2t): t is the round's SecAgg threshold (``DeviceSession.reveal``
   refuses to unmask fewer than t survivors, so every sum holds at least t shares) and w_max the
   round's largest weight, announced by the coordinator. Any t shares put Sk((σ·S·w_max·C)²/2)
   into the sum, variance (σ·S·w_max·C)², std σ·w_max·C in value units: the central noise for
   the largest contribution's sensitivity w_max·C. The device charges ``SkellamCost`` at its own
   weight and μ = t·μ_dev; n > t survivors only add noise (the sum carries n·μ_dev, std
   σ·w_max·C·sqrt(n/t)), which the coordinator's fixed-point scale must leave room for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedprune.protocol.rdp import DEFAULT_ORDERS, check_positive, epsilon_from_rdp, orders_array as _orders

# Largest central μ ``mu_for_epsilon`` searches; numpy's Poisson sampler refuses λ near 1e19.
MAX_MU = 1e18
# [privacy] mechanism: Gaussian noise on the update itself, or Skellam shares inside a secure round.
LOCAL, DISTRIBUTED = "local", "distributed"
DISTRIBUTED_DP_NEEDS_SECURE = "distributed_dp_needs_secure"  # the decline of a plain task under DISTRIBUTED
# The decline of a secure task for another σ than the device adds (0 without distributed DP): more
# noise would wrap the sum, less would make the round's reported ε a lie.
NOISE_MISMATCH = "distributed_dp_noise_mismatch"


def skellam_noise(shape: tuple[int, ...], mu: float, rng: np.random.Generator) -> np.ndarray:
    """int64 samples of Sk(μ) = Poisson(μ) − Poisson(μ): mean 0, variance 2μ (μ = 0 gives zeros).

    Draws all of the first Poisson array, then all of the second, so a seeded ``rng`` gives the
    same noise on every machine.
    """
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"mu {mu!r}: expected a finite Poisson rate >= 0")
    if mu > MAX_MU:
        raise ValueError(f"mu {mu!r}: above {MAX_MU:g}, which the Poisson sampler cannot draw")
    shape = _shape(shape)
    first = rng.poisson(float(mu), size=shape).astype(np.int64, copy=False)
    second = rng.poisson(float(mu), size=shape).astype(np.int64, copy=False)
    return first - second


def rdp_skellam(l1: float, l2: float, mu: float, orders: tuple[float, ...] = DEFAULT_ORDERS) -> np.ndarray:
    """Per-order RDP of releasing x + Sk(μ) on every coordinate, for an integer query x with L1
    and L2 sensitivities ``l1`` and ``l2`` (field units).

    Agarwal, Kairouz and Liu (NeurIPS 2021), Corollary 3.6 (multi-dimensional form of Theorem
    3.5), as implemented by ``_skellam_rdp`` in google-research/federated distributed_dp:
        ε(α) = α·Δ2²/(4μ) + min(((2α−1)·Δ2² + 6·Δ1)/(16μ²), 3·Δ1/(4μ))   for integer α > 1.
    A fractional order α is charged ε(⌈α⌉) (Rényi divergence is non-decreasing in the order).
    """
    check_positive("l1", l1)
    check_positive("l2", l2)
    check_positive("mu", mu)
    alphas = np.ceil(_orders(orders))
    l1, l2sq, mu = float(l1), float(l2) ** 2, float(mu)
    gaussian = alphas * l2sq / (4.0 * mu)
    correction = np.minimum(((2.0 * alphas - 1.0) * l2sq + 6.0 * l1) / (16.0 * mu * mu), 3.0 * l1 / (4.0 * mu))
    return gaussian + correction


def sensitivities(clip_norm: float, scale: float, dimension: int, weight: float) -> tuple[float, float]:
    """(Δ1, Δ2) in field units of one device's round(scale·weight·x), ||x||_2 <= clip_norm, over
    ``dimension`` coordinates, stochastic rounding included.

    Δ2 = scale·weight·clip_norm + sqrt(d) (rounding moves each coordinate by < 1; the
    unconditional bound of Kairouz, Liu and Steinke 2021), Δ1 = Δ2·min(sqrt(d), Δ2) (Cauchy-Schwarz,
    and |v_i| <= v_i² for integers). Zero-out adjacency; ``weight`` must be public.
    """
    check_positive("clip_norm", clip_norm)
    check_positive("scale", scale)
    if isinstance(dimension, bool) or not isinstance(dimension, (int, np.integer)) or dimension < 1:
        raise ValueError(f"dimension {dimension!r}: expected an integer >= 1 (coordinates sent)")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight <= 1):
        raise ValueError(f"weight {weight!r}: expected 0 < w <= 1 (a round's weights sum to 1)")
    root_d = math.sqrt(int(dimension))
    l2 = float(scale) * float(weight) * float(clip_norm) + root_d
    return l2 * min(root_d, l2), l2


def rdp_round(mu: float, clip_norm: float, scale: float, dimension: int, weight: float,
              orders: tuple[float, ...] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one round whose sum carries Sk(``mu``): add these over rounds with different survivors."""
    l1, l2 = sensitivities(clip_norm, scale, dimension, weight)
    return rdp_skellam(l1, l2, mu, orders)


@dataclass(frozen=True)
class DistributedNoise:
    """One round's plan: central Skellam parameter mu for the sum, split across the expected
    number of surviving devices.

    If fewer than ``expected_devices`` survive, the sum carries only survivors·per_device() < mu:
    plan with a number of devices you can count on (e.g. the secure-aggregation threshold) and
    account with ``central_epsilon`` on the actual survivors.
    """

    mu: float
    expected_devices: int

    def __post_init__(self) -> None:
        check_positive("mu", self.mu)
        if type(self.expected_devices) is not int or self.expected_devices < 1:
            raise ValueError(f"expected_devices {self.expected_devices!r}: expected an integer >= 1")

    def per_device(self) -> float:
        """mu / expected_devices: each device adds Sk(mu / expected_devices) to every coordinate."""
        return float(self.mu) / self.expected_devices

    def sample(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """One device's noise share: int64 Sk(per_device()) of this shape."""
        return skellam_noise(shape, self.per_device(), rng)


def device_mu(noise_multiplier: float, scale: float, max_weight: float, clip_norm: float, threshold: int) -> float:
    """One device's share μ_dev = (σ·S·w_max·C)²/(2t) in a secure round: any ``threshold`` t
    shares together carry Sk((σ·S·w_max·C)²/2), Gaussian-like noise of std σ·w_max·C in value
    units for the largest weighted contribution (theory, point 5)."""
    check_positive("noise_multiplier", noise_multiplier)
    check_positive("scale", scale)
    check_positive("clip_norm", clip_norm)
    if isinstance(max_weight, bool) or not isinstance(max_weight, (int, float)) or not 0 <= max_weight <= 1:
        raise ValueError(f"max_weight {max_weight!r}: expected 0 <= w_max <= 1 (a round's weights sum to 1)")
    if type(threshold) is not int or threshold < 1:
        raise ValueError(f"threshold {threshold!r}: expected an integer >= 1 (the secure round's t)")
    return (float(noise_multiplier) * float(scale) * float(max_weight) * float(clip_norm)) ** 2 / (2 * threshold)


@dataclass(frozen=True)
class SkellamCost:
    """What releasing one share-noised, weighted vector costs a device: ``rdp_skellam`` at its
    sensitivities (field units) and the μ its sum carries at least. It answers ``rdp(orders)``
    like ``privacy.RoundCost``, so ``PrivacyBudget`` adds it to the same per-order RDP as the
    Gaussian rounds of local DP."""

    l1: float
    l2: float
    mu: float

    @classmethod
    def of_round(cls, clip_norm: float, scale: float, dimension: int, weight: float, mu: float) -> SkellamCost:
        return cls(*sensitivities(clip_norm, scale, dimension, weight), mu)

    def rdp(self, orders: tuple[float, ...] = DEFAULT_ORDERS) -> np.ndarray:
        return rdp_skellam(self.l1, self.l2, self.mu, orders)


def mu_for_epsilon(epsilon: float, delta: float, rounds: int, clip_norm: float, scale: float, dimension: int,
                   weight: float) -> float:
    """The smallest central μ (to a relative 1e-6, rounded up) whose ``rounds`` compositions of
    ``rdp_skellam`` at these sensitivities give at most ``epsilon`` at ``delta``."""
    check_positive("epsilon", epsilon)
    _check_rounds(rounds, minimum=1)
    l1, l2 = sensitivities(clip_norm, scale, dimension, weight)

    def spent(mu: float) -> float:
        return epsilon_from_rdp(rounds * rdp_skellam(l1, l2, mu), delta)[0]

    high = max(1.0, l2 * l2)
    while spent(high) > epsilon:
        high *= 4.0
        if high > MAX_MU:
            raise ValueError(f"no mu up to {MAX_MU:g} reaches epsilon {epsilon} in {rounds} rounds")
    low = high / 4.0
    while spent(low) <= epsilon:
        low, high = low / 4.0, low
        if low < 1e-12:
            return high
    while high / low > 1.0 + 1e-6:
        middle = math.sqrt(low * high)
        if spent(middle) > epsilon:
            low = middle
        else:
            high = middle
    return high


def central_epsilon(mu_per_device: float, surviving: int, rounds: int, delta: float, clip_norm: float, scale: float,
                    dimension: int, weight: float) -> float:
    """ε of the sum against the coordinator alone, after ``rounds`` rounds in which ``surviving``
    devices each added Sk(mu_per_device) (total μ = surviving·mu_per_device).

    Fewer survivors mean less noise in the sum and a larger ε: pass the devices whose inputs are
    actually in the sum, or a lower bound on them, never the number selected or planned.
    """
    check_positive("mu_per_device", mu_per_device)
    if type(surviving) is not int or surviving < 1:
        raise ValueError(f"surviving {surviving!r}: expected an integer >= 1 (devices in the sum)")
    _check_rounds(rounds, minimum=0)
    rdp = rounds * rdp_round(surviving * float(mu_per_device), clip_norm, scale, dimension, weight)
    return epsilon_from_rdp(rdp, delta)[0]


def local_epsilon(mu_per_device: float, rounds: int, delta: float, clip_norm: float, scale: float, dimension: int,
                  weight: float) -> float:
    """ε of one honest device against the coordinator colluding with every other device: only its
    own Sk(mu_per_device) protects it (``central_epsilon`` with one survivor)."""
    return central_epsilon(mu_per_device, 1, rounds, delta, clip_norm, scale, dimension, weight)


def _shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or any(
        isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in shape
    ):
        raise ValueError(f"shape {shape!r}: expected a tuple of integers >= 0")
    return tuple(int(n) for n in shape)


def _check_rounds(rounds: Any, minimum: int) -> None:
    if type(rounds) is not int or rounds < minimum:
        raise ValueError(f"rounds {rounds!r}: expected an integer >= {minimum}")
