"""What each selectable variant does, as tables: the round in strategy.py looks its behaviour up
here instead of branching on names, so adding a baseline is one row, not edits in five places.

- ``METHODS``: how a method weighs and combines the updates, and whether it moves the mask;
- ``STEPS``: how long each update is before it is combined (docs/ALGORITHM.md §4.3);
- ``QUALITY_SIGNALS``: the round's quality observation x_n from the clients' loss ratios (§4.6).

The thesis's cosine ψ_n is no signal here: it is computed and logged every round, never weighted by
(docs/ALGORITHM.md §4.5.1 measured it losing under label skew).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import fedprune.coordinator.core.aggregation as aggregation
import fedprune.coordinator.core.contribution as contribution

# One tensor: (contributions x (n, *shape), holdings or None, weights w, trim fraction) -> (value, empty)
Combine = Callable[[np.ndarray, np.ndarray | None, np.ndarray, float], tuple[np.ndarray, np.ndarray]]


def _mean(x: np.ndarray, holds: np.ndarray | None, w: np.ndarray, trim: float) -> tuple[np.ndarray, np.ndarray]:
    return aggregation.weighted_mean(x, holds, w)


def _median(x: np.ndarray, holds: np.ndarray | None, w: np.ndarray, trim: float) -> tuple[np.ndarray, np.ndarray]:
    return aggregation.coordinate_median(x, holds)


def _trimmed(x: np.ndarray, holds: np.ndarray | None, w: np.ndarray, trim: float) -> tuple[np.ndarray, np.ndarray]:
    return aggregation.trimmed_mean(x, holds, trim)


@dataclass(frozen=True)
class Method:
    """One row of the method table: everything a method does differently from the shared round."""

    combine: Combine  # per tensor, over the holders of each position (§5)
    quality_weights: bool = False  # w ∝ s·q, q from the configured quality signal; else w = s and q stays neutral
    defended: bool = False  # the Byzantine defences of defences.py screen the updates
    readjusts: bool = True  # merges and re-prunes the mask on readjust rounds (when sparse)
    krum: bool = False  # only the Krum pick is combined, with equal weights
    needs_sparsity: bool = False  # refused at sparsity 0


METHODS: dict[str, Method] = {
    "fedavg": Method(_mean, readjusts=False),  # static m^0 when sparse
    "feddst": Method(_mean, needs_sparsity=True),  # dense FedDST is FedAvg
    "fedprune": Method(_mean, quality_weights=True, defended=True),
    "median": Method(_median),
    "trimmed_mean": Method(_trimmed),
    "krum": Method(_mean, krum=True),
}

# (weights w, update norms after clipping, clip factors) -> the factor each update is scaled by
Step = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

STEPS: dict[str, Step] = {
    # θ += η_g Σ w_n Δθ_n: with η_g = 1 the weighted model average (the thesis's formula)
    "plain": lambda w, norms, clip: clip,
    # every update rescaled to the weighted mean norm L, so inflating a norm buys no influence
    "normalized": lambda w, norms, clip: float(np.dot(w, norms)) / norms * clip,
}

# (loss ratios of the round's clients, the StrategyConfig with the bands) -> x_n in [0, 1];
# None: no observation (q stays put). The config is not imported here: it imports these tables.
Signal = Callable[[Sequence[float | None], Any], np.ndarray]


def _absolute_band(ratios: Sequence[float | None], cfg: Any) -> np.ndarray:
    return np.array([contribution.loss_quality(ratio, cfg.loss_full, cfg.loss_zero) for ratio in ratios])


def _relative_band(ratios: Sequence[float | None], cfg: Any) -> np.ndarray:
    return contribution.relative_loss_quality(ratios, cfg.rel_full, cfg.rel_zero, cfg.rel_spread_floor)


QUALITY_SIGNALS: dict[str, Signal | None] = {
    "loss_rel": _relative_band,  # default: a loss ratio judged against this round's others
    "loss": _absolute_band,  # §4.6 "P2": full weight up to loss_full × the class medians
    "none": None,
}
