"""Rényi-DP bookkeeping both sides agree on: the orders, and the conversion to (ε, δ).

The device charges its ledger with it (``fedprune.edge_agent.core.privacy``) and the coordinator
reports the central ε of a secure round's sum with it (``fedprune.protocol.distributed_dp``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


# Fractional orders help only without subsampling (where RDP is exact for every α > 1); large
# orders matter for large σ, where the optimal α grows like σ·sqrt(2 log(1/δ)).
DEFAULT_ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, *map(float, range(2, 65)), 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0,
    768.0, 1024.0, 2048.0, 4096.0,
)


def orders_array(orders: tuple[float, ...]) -> np.ndarray:
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or not np.all(alphas > 1) or not np.all(np.isfinite(alphas)):
        raise ValueError("orders: expected a non-empty sequence of finite Rényi orders > 1")
    return alphas


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: tuple[float, ...] = DEFAULT_ORDERS) -> tuple[float, float]:
    """(ε, the order α that attains it) for (ε, δ)-DP, by the Canonne-Kamath-Steinke conversion."""
    if not (isinstance(delta, float) and 0 < delta < 1):
        raise ValueError(f"delta {delta!r}: expected a float in (0, 1), typically below 1/number of devices")
    alphas = orders_array(orders)
    rdp = np.asarray(rdp, dtype=np.float64)
    if rdp.shape != alphas.shape:
        raise ValueError(f"{rdp.shape[0] if rdp.ndim else 0} RDP values for {alphas.size} orders")
    if not np.any(rdp):
        return 0.0, float(alphas[-1])  # nothing released yet; the conversion alone would not reach 0
    with np.errstate(invalid="ignore"):
        eps = rdp + np.log1p(-1.0 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1)
    eps = np.where(np.isfinite(rdp), eps, np.inf)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(alphas[best])


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} {value!r}: expected a finite number > 0")
