"""Sparsity budgets, masks and the mask schedule (docs/ALGORITHM.md §3), in numpy.

Theory of operation. The coordinator fixes, once per run, how many weights each prunable layer
may keep (k_l, from the Erdős–Rényi–Kernel densities d_l of §3.2). Every mask it ever produces
has exactly k_l active positions per layer: the random initial mask m^0 (§3.3) and the mask
m^{t+1} obtained after a readjust round by merging the client masks and re-pruning by magnitude
(§3.7). Readjusting happens on rounds t with t mod ΔT == 0 and t < T_end, with the cosine
fraction p^t (§3.5). Ties are always broken deterministically (stable sorts on (score, index)),
so that the coordinator and any replay of it agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fedprune.protocol.layout import ModelLayout, TensorSpec

Params = dict[str, np.ndarray]
Masks = dict[str, np.ndarray]

DISTRIBUTIONS = ("erk", "er", "uniform")
# ERK keeps dense a masked tensor with fewer weights than this per row (prod(shape[1:])): per output
# unit for Linear, conv and recurrent weights (a depthwise 3x3 kernel: 9; a first conv on one input
# channel; an LSTM reading 3 sensor channels); per input channel for a transposed conv, per entry
# for an embedding (a 8-wide embedding is kept whole).
# ERK's density grows with such a layer's sum/product of dims but falls below 1 at high sparsity:
# pruning a 9-tap kernel to 2-3 taps silences whole channels, which no regrowth brings back
# reliably, and the layer is a few hundred weights, under 1 % of the budget.
MIN_FAN_IN = 16


def _raw_density(spec: TensorSpec, distribution: str) -> float:
    shape = spec.shape
    if distribution == "er":
        shape = shape[:2]
    return sum(shape) / math.prod(shape)


def erk_densities(
    layout: ModelLayout,
    sparsity: float,
    distribution: str = "erk",
    dense: Iterable[str] = (),
) -> dict[str, float]:
    """Density d_l of every masked tensor for target sparsity α over the prunable weights.

    ``dense`` names masked tensors forced dense (config ``exclude``), as are tensors of fan-in
    below ``MIN_FAN_IN`` where the budget leaves room for them. Layers whose ERK density would exceed 1 are made dense and ε is solved
    again, so the total budget stays (1-α)·ΣN_l.
    """
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity={sparsity!r}: expected a number in [0, 1)")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r}: expected one of {DISTRIBUTIONS}")
    masked = layout.masked
    forced = set(dense)
    unknown = forced - {s.name for s in masked}
    if unknown:
        raise ValueError(f"dense layers {sorted(unknown)} are not prunable tensors of the layout")
    if not masked:
        return {}
    if distribution == "uniform":
        forced.add(masked[0].name)
        dens = {s.name: (1.0 if s.name in forced else 1.0 - sparsity) for s in masked}
        return dens
    narrow = {s.name for s in masked if math.prod(s.shape[1:]) < MIN_FAN_IN}
    if narrow - forced and sum(s.size for s in masked if s.name in forced | narrow) < (1.0 - sparsity) * sum(
            s.size for s in masked):
        forced |= narrow  # only where the budget affords it: a tiny model may be all narrow layers
    return _solve_erk(masked, sparsity, distribution, forced)


def _solve_erk(masked: Sequence[TensorSpec], sparsity: float, distribution: str, forced: set[str]) -> dict[str, float]:
    total = sum(s.size for s in masked)
    raw = {s.name: _raw_density(s, distribution) for s in masked}
    dense_set = set(forced)
    while True:
        budget = (1.0 - sparsity) * total - sum(s.size for s in masked if s.name in dense_set)
        free = [s for s in masked if s.name not in dense_set]
        if not free:
            break
        if budget <= 0:
            raise ValueError(
                f"sparsity={sparsity}: the layers kept dense {sorted(dense_set)} already exceed "
                f"the budget of {(1.0 - sparsity) * total:.0f} active weights"
            )
        eps = budget / sum(raw[s.name] * s.size for s in free)
        over = [s for s in free if eps * raw[s.name] > 1.0]
        if not over:
            break
        top = max(raw[s.name] for s in over)
        dense_set |= {s.name for s in over if raw[s.name] == top}
    return {s.name: (1.0 if s.name in dense_set else eps * raw[s.name]) for s in masked}


def active_counts(layout: ModelLayout, densities: Mapping[str, float]) -> dict[str, int]:
    """k_l = N_l - floor((1 - d_l)·N_l): the exact number of active weights per masked tensor."""
    return {s.name: s.size - math.floor((1.0 - densities[s.name]) * s.size) for s in layout.masked}


def random_masks(layout: ModelLayout, densities: Mapping[str, float], rng: np.random.Generator) -> Masks:
    """m^0: per layer exactly k_l positions drawn uniformly at random (§3.3)."""
    counts = active_counts(layout, densities)
    masks: Masks = {}
    for spec in layout.masked:
        flat = np.zeros(spec.size, dtype=bool)
        flat[rng.choice(spec.size, size=counts[spec.name], replace=False)] = True
        masks[spec.name] = flat.reshape(spec.shape)
    return masks


def apply_masks(params: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> Params:
    """θ ⊙ m for masked tensors; other tensors unchanged (copies throughout)."""
    return {
        name: (np.where(masks[name], value, 0).astype(value.dtype) if name in masks else value.copy())
        for name, value in params.items()
    }


def scale_sparse_init(params: Mapping[str, np.ndarray], densities: Mapping[str, float]) -> Params:
    """Scale each sparse layer's initial weights by 1/sqrt(d_l) so fan-in variance matches dense (§3.3)."""
    out: Params = {}
    for name, value in params.items():
        d = densities.get(name, 1.0)
        out[name] = (value / np.float32(math.sqrt(d))).astype(value.dtype) if d < 1.0 else value.copy()
    return out


def prune_fraction(t: int, p0: float, t_end: int) -> float:
    """p^t = (p^0/2)(1 + cos(π t / T_end)) for t < T_end, else 0 (§3.5)."""
    if t >= t_end or t_end <= 0:
        return 0.0
    return 0.5 * p0 * (1.0 + math.cos(math.pi * t / t_end))


def is_readjust_round(t: int, delta_t: int, t_end: int) -> bool:
    """Readjust on rounds t (>0) with t mod ΔT == 0 and t < T_end."""
    return delta_t > 0 and t > 0 and t % delta_t == 0 and t < t_end


def _stable_top(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores; ties resolve to the lower index (stable sort of -score)."""
    return np.argsort(-score, kind="stable")[:k]


def merge_and_reprune(
    values: Mapping[str, np.ndarray],
    votes: Mapping[str, np.ndarray],
    prev_masks: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    min_votes: int = 0,
) -> tuple[Masks, float]:
    """m^{t+1} from the merged client masks (§3.7); returns (masks, churn).

    ``values`` are the aggregated θ^{t+1} (dense arrays), ``votes[l]`` counts the valid clients
    holding each position. Candidates are positions with at least max(1, min_votes) votes; if
    more than k_l, keep the k_l largest |θ| (ties: positions already in m^t first, then the lower
    index); if fewer, fill from m^t by magnitude, then from anywhere. Churn is the fraction of
    Σk_l that changed.
    """
    new: Masks = {}
    changed = 0
    total = 0
    threshold = max(1, int(min_votes))
    for name, prev in prev_masks.items():
        k = int(counts[name])
        mag = np.abs(values[name].astype(np.float64).ravel())
        old = prev.ravel()
        cand = votes[name].ravel() >= threshold
        # Lexicographic key (candidate, |θ|, in m^t); argsort is stable, so lower index wins last ties.
        order = np.lexsort((~old, -mag, ~cand))
        if cand.sum() < k:
            # Too few candidates: keep them all, then the rest of m^t by magnitude, then anything.
            order = np.lexsort((-mag, ~old, ~cand))
        keep = order[:k]
        flat = np.zeros(old.size, dtype=bool)
        flat[keep] = True
        new[name] = flat.reshape(prev.shape)
        changed += int(np.count_nonzero(flat & ~old))
        total += k
    return new, (changed / total if total else 0.0)


def prune_and_regrow(
    values: Mapping[str, np.ndarray], prev_masks: Mapping[str, np.ndarray], p_t: float, rng: np.random.Generator
) -> tuple[Masks, float]:
    """The secure round's readjust: per layer drop the ⌊p_t·k_l⌋ held positions of smallest |θ| and
    grow as many at random among the positions held by neither mask (SET, Mocanu et al. 2018);
    k_l stays. Returns (masks, churn), churn as in ``merge_and_reprune``."""
    new: Masks = {}
    changed = total = 0
    for name, prev in prev_masks.items():
        old = prev.ravel()
        held = np.flatnonzero(old)
        n = min(int(math.floor(p_t * held.size)), int(old.size - held.size))
        flat = old.copy()
        if n > 0:
            mag = np.abs(values[name].astype(np.float64).ravel()[held])
            flat[held[np.argsort(mag, kind="stable")[:n]]] = False
            flat[rng.choice(np.flatnonzero(~old), size=n, replace=False)] = True
        new[name] = flat.reshape(prev.shape)
        changed += n
        total += held.size
    return new, (changed / total if total else 0.0)


def nested_submask(
    params: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], keep_fraction: float
) -> Masks:
    """Per layer the ⌈ρ·k_l⌉ positions of m with the largest |θ| (ties: lower index), §6."""
    if not (0.0 < keep_fraction <= 1.0):
        raise ValueError(f"keep_fraction={keep_fraction!r}: expected a number in (0, 1]")
    out: Masks = {}
    for name, mask in masks.items():
        flat = mask.ravel()
        k = math.ceil(keep_fraction * int(flat.sum()))
        score = np.where(flat, np.abs(params[name].astype(np.float64).ravel()), -np.inf)
        sub = np.zeros(flat.size, dtype=bool)
        sub[_stable_top(score, k)] = True
        out[name] = (sub & flat).reshape(mask.shape)
    return out


def votes_from(masks_list: Sequence[Mapping[str, np.ndarray]], names: Iterable[str]) -> dict[str, np.ndarray]:
    """Per masked tensor, how many of the given client masks hold each position."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        out[name] = np.sum([m[name] for m in masks_list], axis=0, dtype=np.int64)
    return out
