"""Client-level differential privacy for what leaves the device: clip, noise, account, budget. Pure math.

Theory of operation. One round's update Δθ_n (``LocalResult.delta``: every trainable tensor,
exact zeros outside the device's mask m_n) is the only data-derived vector this module protects.
1. ``clip_update`` scales Δθ_n so its global L2 norm over the positions the device holds is at
   most C. Any single device's contribution then has L2 sensitivity C against "the device
   contributed nothing" (zero-out adjacency, as in DP-FedAvg); between two arbitrary local
   datasets of the same device it is 2C.
2. ``add_gaussian_noise`` adds N(0, (σC)²) to every held position and nothing elsewhere. The
   positions outside m_n are not sent at all (values travel in mask order), so noise there
   would be discarded by the encoder, or, if it were sent, turn a sparse update dense and
   multiply its size for no privacy gain: the mechanism releases only the held coordinates,
   so only they need noise. This relies on m_n being public, which holds on rounds without a
   client readjust (m_n = m^t, chosen by the coordinator); a client-grown mask is data
   dependent and is NOT covered (see docs/PRIVACY.md).
3. The accountant tracks Rényi DP (RDP) over a grid of orders α. The Gaussian mechanism with
   noise multiplier σ (std / sensitivity) is exactly α/(2σ²)-RDP. With Poisson subsampling at
   rate q, integer orders use the binomial expansion of Mironov, Talwar and Zhang (2019), "Rényi
   Differential Privacy of the Sampled Gaussian Mechanism", §3.3:
       A_α = Σ_{k=0..α} C(α,k) (1−q)^{α−k} q^k exp((k²−k)/(2σ²)),  RDP(α) = log(A_α)/(α−1).
   RDP composes by addition over rounds; ε for a target δ uses the conversion of Canonne, Kamath
   and Steinke (2020) / Balle et al. (2020):
       ε = min_α  RDP(α) + log((α−1)/α) − (log δ + log α)/(α−1).
   Subsampling amplification holds only against an observer who does not learn whether the
   device's data was used; the coordinator selects devices itself, so against it q = 1.
4. ``PrivacyBudget`` is the device's own ledger for one federation: the RDP it has spent, a
   budget ε and δ. The daemon checks ``can_participate`` before training and declines with
   ``privacy_budget_exhausted``; it records a round before the noised update leaves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from fedprune.protocol.rdp import DEFAULT_ORDERS, check_positive, epsilon_from_rdp, orders_array as _orders

PRIVACY_BUDGET_EXHAUSTED = "privacy_budget_exhausted"
BUDGET_FORMAT = "fedprune-privacy-budget/1"

Arrays = Mapping[str, np.ndarray]


def _held(name: str, array: np.ndarray, masks: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """The bool mask of positions the device holds in tensor ``name`` (None = all of them)."""
    if masks is None or name not in masks:
        return None
    mask = np.asarray(masks[name], dtype=bool)
    if mask.shape != array.shape:
        raise ValueError(f"mask of {name!r} has shape {mask.shape}, its tensor {array.shape}")
    return mask


def update_norm(delta: Arrays, masks: Mapping[str, np.ndarray] | None = None) -> float:
    """Global L2 norm over all tensors, counting only held positions; accumulated in float64."""
    total = 0.0
    for name, value in delta.items():
        array = np.asarray(value)
        mask = _held(name, array, masks)
        held = array if mask is None else array[mask]
        total += float(np.sum(np.square(held, dtype=np.float64)))
    if not math.isfinite(total):
        raise ValueError("update has a non-finite value: refusing to clip or release it")
    return math.sqrt(total)


def clip_update(
    delta: Arrays, C: float, masks: Mapping[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], float]:
    """(Δθ scaled to global L2 norm <= C over held positions, its norm before clipping).

    Positions outside ``masks`` are set to exactly 0 (they are not part of the update); tensors
    absent from ``masks`` are dense. Dtypes are kept.
    """
    check_positive("C", C)
    norm = update_norm(delta, masks)
    scale = min(1.0, C / norm) if norm > 0 else 1.0
    clipped: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        array = np.asarray(value)
        out = (array * scale).astype(array.dtype, copy=False)
        mask = _held(name, array, masks)
        clipped[name] = out if mask is None else np.where(mask, out, np.zeros((), array.dtype))
    return clipped, norm


def add_gaussian_noise(
    delta: Arrays, masks: Mapping[str, np.ndarray], sigma: float, C: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Δθ + N(0, (σC)²) at every held position; positions outside the mask stay exactly 0.

    Draws one normal per held position, tensors in ``delta``'s order, so a seeded ``rng`` gives
    the same noise on every machine.
    """
    check_positive("C", C)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma {sigma!r}: expected a finite noise multiplier >= 0")
    std = float(sigma) * float(C)
    noised: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        array = np.asarray(value)
        dtype = array.dtype if array.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        mask = _held(name, array, masks)
        out = array.astype(dtype, copy=True)
        if mask is None:
            out += (std * rng.standard_normal(array.shape)).astype(dtype)
        else:
            out[~mask] = 0
            out[mask] += (std * rng.standard_normal(int(mask.sum()))).astype(dtype)
        noised[name] = out
    return noised


def privatize(
    delta: Arrays, masks: Mapping[str, np.ndarray], C: float, sigma: float, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], float]:
    """Clip to C, then add N(0, (σC)²) on held positions: (released update, norm before clipping)."""
    clipped, norm = clip_update(delta, C, masks)
    return add_gaussian_noise(clipped, masks, sigma, C, rng), norm


# --- accountant ------------------------------------------------------------------------------


def rdp_gaussian(noise_multiplier: float, orders: tuple[float, ...] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one Gaussian mechanism with std = noise_multiplier x sensitivity: exactly α/(2σ²)."""
    check_positive("noise_multiplier", noise_multiplier)
    alphas = _orders(orders)
    return alphas / (2.0 * noise_multiplier**2)


def rdp_subsampled_gaussian(
    noise_multiplier: float, sample_rate: float, orders: tuple[float, ...] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP of the Poisson-subsampled Gaussian mechanism per order (inf at non-integer α when q < 1)."""
    check_positive("noise_multiplier", noise_multiplier)
    if not (isinstance(sample_rate, (int, float)) and 0 <= sample_rate <= 1):
        raise ValueError(f"sample_rate {sample_rate!r}: expected a probability 0..1")
    alphas = _orders(orders)
    if sample_rate == 1:
        return rdp_gaussian(noise_multiplier, orders)
    if sample_rate == 0:
        return np.zeros_like(alphas)
    out = np.full(alphas.shape, np.inf)
    for i, alpha in enumerate(alphas):
        if alpha == int(alpha):
            out[i] = _log_a_integer(int(alpha), float(sample_rate), float(noise_multiplier)) / (alpha - 1)
    return out


def _log_a_integer(alpha: int, q: float, sigma: float) -> float:
    """log A_α for integer α (Mironov et al. 2019, §3.3), summed in log space."""
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binomial = np.concatenate(([0.0], np.cumsum(np.log((alpha - k[1:] + 1) / k[1:]))))
    terms = log_binomial + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
    top = terms.max()
    return float(top + math.log(np.sum(np.exp(terms - top))))


def compute_epsilon(
    noise_multiplier: float, steps: int, delta: float, sample_rate: float = 1.0,
    orders: tuple[float, ...] = DEFAULT_ORDERS,
) -> float:
    """ε after ``steps`` compositions of the (subsampled) Gaussian mechanism, for this δ."""
    if type(steps) is not int or steps < 0:
        raise ValueError(f"steps {steps!r}: expected an integer >= 0")
    rdp = steps * rdp_subsampled_gaussian(noise_multiplier, sample_rate, orders)
    return epsilon_from_rdp(rdp, delta, orders)[0]


def noise_multiplier_for(
    target_epsilon: float, delta: float, steps: int, sample_rate: float = 1.0,
    orders: tuple[float, ...] = DEFAULT_ORDERS,
) -> float:
    """The smallest σ (to 0.1 %) whose ε after ``steps`` rounds is at most ``target_epsilon``."""
    check_positive("target_epsilon", target_epsilon)
    low, high = 1e-3, 1.0
    while compute_epsilon(high, steps, delta, sample_rate, orders) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon}")
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        if compute_epsilon(middle, steps, delta, sample_rate, orders) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


# --- the device's ledger ---------------------------------------------------------------------


@dataclass(frozen=True)
class RoundCost:
    """The privacy cost of releasing one noised update: noise multiplier σ, sampling rate q."""

    noise_multiplier: float
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        check_positive("noise_multiplier", self.noise_multiplier)
        if not (isinstance(self.sample_rate, (int, float)) and 0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate {self.sample_rate!r}: expected 0 < q <= 1 (1 against the coordinator)")

    def rdp(self, orders: tuple[float, ...]) -> np.ndarray:
        return rdp_subsampled_gaussian(self.noise_multiplier, self.sample_rate, orders)


@dataclass(frozen=True)
class PrivacyBudget:
    """What this device has spent in one federation, and what it allows. Immutable: ``record``
    returns the next state, which the daemon persists before the update is sent."""

    federation: str
    epsilon_budget: float
    delta: float
    rounds: int = 0
    rdp: tuple[float, ...] = ()
    orders: tuple[float, ...] = field(default=DEFAULT_ORDERS)

    def __post_init__(self) -> None:
        if not isinstance(self.federation, str) or not self.federation:
            raise ValueError("federation: expected a non-empty id")
        check_positive("epsilon_budget", self.epsilon_budget)
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ValueError(f"delta {self.delta!r}: expected a float in (0, 1)")
        if type(self.rounds) is not int or self.rounds < 0:
            raise ValueError(f"rounds {self.rounds!r}: expected an integer >= 0")
        orders = tuple(float(a) for a in self.orders)
        _orders(orders)
        rdp = tuple(float(r) for r in self.rdp) if self.rdp else (0.0,) * len(orders)
        if len(rdp) != len(orders) or any(not (r >= 0) for r in rdp):
            raise ValueError(f"rdp: expected {len(orders)} values >= 0, one per order")
        object.__setattr__(self, "orders", orders)
        object.__setattr__(self, "rdp", rdp)

    @property
    def spent(self) -> float:
        """ε spent so far at this budget's δ."""
        return epsilon_from_rdp(np.asarray(self.rdp), self.delta, self.orders)[0]

    def epsilon_after(self, cost: RoundCost) -> float:
        return epsilon_from_rdp(np.asarray(self.rdp) + cost.rdp(self.orders), self.delta, self.orders)[0]

    def can_participate(self, cost: RoundCost) -> bool:
        return self.epsilon_after(cost) <= self.epsilon_budget

    def record(self, cost: RoundCost) -> PrivacyBudget:
        total = np.asarray(self.rdp) + cost.rdp(self.orders)
        return PrivacyBudget(self.federation, self.epsilon_budget, self.delta, self.rounds + 1,
                             tuple(float(r) for r in total), self.orders)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUDGET_FORMAT, "federation": self.federation, "epsilon_budget": self.epsilon_budget,
            "delta": self.delta, "rounds": self.rounds, "epsilon_spent": self.spent,
            "orders": list(self.orders), "rdp": [r if math.isfinite(r) else "inf" for r in self.rdp],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyBudget:
        """Inverse of ``to_dict``; a malformed ledger is a ValueError (never silently reset)."""
        if not isinstance(data, Mapping) or data.get("format") != BUDGET_FORMAT:
            raise ValueError(f"privacy budget: expected a mapping with format {BUDGET_FORMAT!r}")
        try:
            orders, rdp = data["orders"], data["rdp"]
            if not isinstance(orders, list) or not isinstance(rdp, list):
                raise TypeError("orders and rdp must be lists")
            return cls(
                federation=data["federation"],
                epsilon_budget=data["epsilon_budget"],
                delta=data["delta"],
                rounds=data["rounds"],
                rdp=tuple(math.inf if r == "inf" else _number(r) for r in rdp),
                orders=tuple(_number(a) for a in orders),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"privacy budget: {exc}") from None


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r} is not a number")
    return float(value)
