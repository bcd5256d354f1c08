"""Combiners over sparse supports (docs/ALGORITHM.md §4.3 and §5), in numpy.

Each combiner takes, for one tensor, the stacked client contributions ``x`` (shape (n, *shape))
and the stacked holdings ``holds`` (bool, same shape; None for dense tensors, which every valid
client holds). Position j is combined over H_j = {n : holds[n, j]} only: a client that does not
hold j abstains rather than voting 0. Every combiner returns (value, empty) where ``empty`` marks
positions with H_j = ∅; the caller sets θ_j = 0 there (§5), so those positions leave the mask.

Krum works on whole updates, so it is a selection over the Gram matrix of flat updates: it picks
the client(s) whose update is closest to its n - f - 2 nearest neighbours.
"""

from __future__ import annotations

import numpy as np

COMBINERS = ("mean", "median", "trimmed_mean")


def _holders(x: np.ndarray, holds: np.ndarray | None) -> np.ndarray:
    return np.ones(x.shape, dtype=bool) if holds is None else np.asarray(holds, dtype=bool)


def weighted_mean(x: np.ndarray, holds: np.ndarray | None, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ_{n∈H_j} w_n x_{n,j} / Σ_{n∈H_j} w_n per position; weights renormalised over holders."""
    w64 = np.asarray(w, dtype=np.float64)
    if holds is None:
        num = np.tensordot(w64, x, axes=1)
        den = np.full(x.shape[1:], w64.sum())
        empty = np.zeros(x.shape[1:], dtype=bool) if len(w64) else np.ones(x.shape[1:], dtype=bool)
    else:
        h = np.asarray(holds, dtype=bool)
        num = np.tensordot(w64, np.where(h, x, 0.0), axes=1)
        den = np.tensordot(w64, h.astype(np.float64), axes=1)
        empty = ~np.any(h, axis=0)
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, num / safe, 0.0), empty


def coordinate_median(x: np.ndarray, holds: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Median of the holders' values per position (even counts: mean of the two middle values)."""
    return trimmed_mean(x, holds, trim=0.5)


def trimmed_mean(x: np.ndarray, holds: np.ndarray | None, trim: float) -> tuple[np.ndarray, np.ndarray]:
    """Per position, drop floor(trim·h_j) values from each end of the h_j holders' values, average the rest.

    ``trim = 0.5`` is the median (at least one value, two for even h_j, always remains).
    """
    if not (0.0 <= trim <= 0.5):
        raise ValueError(f"trim={trim!r}: expected a fraction in [0, 0.5]")
    h = _holders(x, holds)
    n = x.shape[0]
    srt = np.sort(np.where(h, np.asarray(x, dtype=np.float64), np.inf), axis=0)
    count = h.sum(axis=0)
    cut = np.floor(trim * count).astype(np.int64)
    cut = np.minimum(cut, (count - 1) // 2)  # keep the middle one (odd) or two (even)
    cut = np.maximum(cut, 0)
    lo = cut
    hi = count - cut  # exclusive
    finite = np.where(np.isfinite(srt), srt, 0.0)
    csum = np.concatenate([np.zeros((1,) + srt.shape[1:]), np.cumsum(finite, axis=0)], axis=0)
    hi_c = np.clip(hi, 0, n)[None]
    lo_c = np.clip(lo, 0, n)[None]
    total = np.take_along_axis(csum, hi_c, axis=0)[0] - np.take_along_axis(csum, lo_c, axis=0)[0]
    kept = hi - lo
    empty = count == 0
    return np.where(empty, 0.0, total / np.where(kept > 0, kept, 1)), empty


def krum_select(g: np.ndarray, n_byzantine: int, n_select: int = 1) -> np.ndarray:
    """(Multi-)Krum: indices of the ``n_select`` updates with the smallest sum of squared
    distances to their n - f - 2 nearest neighbours (Blanchard et al., NeurIPS 2017)."""
    n = g.shape[0]
    if n == 0:
        raise ValueError("krum needs at least one update")
    diag = np.diag(g)
    d2 = np.clip(diag[:, None] + diag[None, :] - 2.0 * g, 0.0, None)
    neighbours = max(n - n_byzantine - 2, 1)
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(d2[i], i)
        scores[i] = np.sort(others)[: min(neighbours, len(others))].sum() if len(others) else 0.0
    return np.argsort(scores, kind="stable")[: max(1, min(n_select, n))]
