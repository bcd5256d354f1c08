"""Contribution scores (docs/ALGORITHM.md §4): u_n, U^t, psi_n^t, the quality q_n and importance r_n^t.

Theory of operation. Everything the cosine rules need is in the Gram matrix G = X Xᵀ of the
clients' flat updates Δθ_n (float64, zeros where a client holds no position): ‖Δθ_n‖ = sqrt(G_nn)
and ⟨u_n, u_m⟩ = G_nm / (‖Δθ_n‖‖Δθ_m‖). With the aggregate U = Σ σ_m u_m the leave-one-out cosine
psi_n = cos(u_n, U - σ_n u_n) has the closed form a_n / b_n of §4.2 step 4, so scoring N clients
costs one N×N matrix, never N passes over the model. psi is measured and logged, not weighted by.

A round produces a quality observation x_n in [0, 1] from the clients' loss ratios (a client's
per-class loss of the received model against the round's class medians, §4.6); the state q_n is
an exponential moving average with trade-off gamma, clamped at q_min, so a client's memory is
≈ 1/(1-gamma) participations whatever N is. Importance r_n = s_n q_n / Σ s_m q_m (the thesis's r)
and aggregation weights w_n ∝ s_n q_n over the valid set. The two bands on the loss ratio:

- ``loss_quality``: absolute, full weight up to ``full``× the class medians ("P2", §4.6);
- ``relative_loss_quality``: judged against this round's other clients (robust z).

All functions are pure: arrays and dicts in, arrays and dicts out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

EPS = 1e-12
LOSS_OFFSET = 0.05


def flatten(update: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """One client's update over the trainable tensors ``names`` as a float64 vector."""
    return np.concatenate([np.asarray(update[n], dtype=np.float64).ravel() for n in names])


def gram(flat: np.ndarray) -> np.ndarray:
    """G = X Xᵀ in float64 for X of shape (clients, dims)."""
    x = np.asarray(flat, dtype=np.float64)
    return x @ x.T


def norms(g: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(np.diag(g), 0.0, None))


def cosine_matrix(g: np.ndarray) -> np.ndarray:
    """⟨u_n, u_m⟩; rows/columns of zero-norm updates are 0."""
    nrm = norms(g)
    inv = np.where(nrm > EPS, 1.0 / np.where(nrm > EPS, nrm, 1.0), 0.0)
    return g * inv[:, None] * inv[None, :]


def cosine_to(flat: np.ndarray, reference: np.ndarray) -> np.ndarray | None:
    """cos(Δθ_n, reference) for every row of ``flat``; None if the reference is ≈ 0."""
    ref = np.asarray(reference, dtype=np.float64)
    ref_norm = float(np.linalg.norm(ref))
    if ref_norm <= EPS:
        return None
    nrm = np.linalg.norm(flat, axis=1)
    return (flat @ ref) / (np.where(nrm > EPS, nrm, 1.0) * ref_norm)


def loo_cosine(g: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """psi_n = cos(u_n, U - σ_n u_n) with U = Σ σ_m u_m (§4.2 step 4); 0 where b_n ≤ ε."""
    c = cosine_matrix(g)
    sigma = np.asarray(sigma, dtype=np.float64)
    uu = c @ sigma  # ⟨u_n, U⟩
    big_u2 = float(sigma @ c @ sigma)
    a = uu - sigma * np.diag(c)
    b2 = np.clip(big_u2 - 2.0 * sigma * uu + sigma**2 * np.diag(c), 0.0, None)
    b = np.sqrt(b2)
    return np.where(b > EPS, a / np.where(b > EPS, b, 1.0), 0.0)


def self_cosine(g: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """psi_n = cos(u_n, U), own term included, as CGSV publishes it (``leave_one_out = false``)."""
    c = cosine_matrix(g)
    w = np.asarray(weights, dtype=np.float64)
    uu = c @ w
    big_u = np.sqrt(max(float(w @ c @ w), 0.0))
    return uu / big_u if big_u > EPS else np.zeros_like(uu)


def _usable_reports(class_losses: Sequence[Mapping[int, tuple[float, int]]]) -> Iterator[tuple[int, float, int]]:
    """(class, mean loss, samples) of every per-class report that carries evidence."""
    for losses in class_losses:
        for c, (loss, count) in losses.items():
            if count > 0 and np.isfinite(loss):
                yield int(c), float(loss), int(count)


def class_medians(class_losses: Sequence[Mapping[int, tuple[float, int]]]) -> dict[int, float]:
    """m_c: median over clients holding class c of their mean loss on c."""
    per_class: dict[int, list[float]] = {}
    for c, loss, _ in _usable_reports(class_losses):
        per_class.setdefault(c, []).append(loss)
    return {c: float(np.median(v)) for c, v in per_class.items()}


def class_totals(class_losses: Sequence[Mapping[int, tuple[float, int]]]) -> dict[int, int]:
    """Samples per class over every client that reported a usable loss for it."""
    totals: dict[int, int] = {}
    for c, _, count in _usable_reports(class_losses):
        totals[c] = totals.get(c, 0) + count
    return totals


RATIO_CAP = 1e6
LOSS_REDUCE = ("mean", "median")


def loss_ratio(
    losses: Mapping[int, tuple[float, int]],
    medians: Mapping[int, float],
    weighted: bool = False,
    offset: float = LOSS_OFFSET,
    reduce: str = "mean",
    totals: Mapping[int, int] | None = None,
    max_share: float = 1.0,
) -> float | None:
    """n's loss ratio: the mean over n's classes of (ℓ_{n,c} + offset)/(m_c + offset); None if no usable class.

    ``weighted`` averages by n's sample count per class, so one rare class with a handful of
    samples cannot dominate a client's ratio. ``offset`` (nats) keeps ratios of tiny losses
    from exploding once the model is confident (§4.6 uses 0.05). ``reduce = "median"`` takes
    the (weighted) median instead: wrong labels raise every class's ratio, while a clean client
    whose few samples of some classes the model has not learned raises only those.

    With ``totals`` (samples per class over the round, ``class_totals``), a class of which n holds
    more than ``max_share`` is left out: the model's fit of that class follows n's own weight, so
    its median is no peer reference, and once n is down-weighted n's loss there is a held-out loss
    against the others' training losses, which would keep n excluded (ALGORITHM_NOTES §6).
    """
    ratios, counts = [], []
    for c, (loss, count) in losses.items():
        if count > 0 and np.isfinite(loss) and int(c) in medians:
            if totals is not None and count > max_share * totals.get(int(c), 0):
                continue
            # Past RATIO_CAP a client is simply "far worse"; the cap keeps self-reported extremes
            # (a loss of 1e300, a count of 2**63) from overflowing the mean.
            ratios.append(min((loss + offset) / (medians[int(c)] + offset), RATIO_CAP))
            counts.append(float(count))
    if not ratios:
        return None
    weights = np.asarray(counts) / max(counts) if weighted else np.ones(len(ratios))
    if reduce == "median":
        return weighted_median(np.asarray(ratios), weights)
    return float(np.average(ratios, weights=weights))


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The smallest value whose cumulative weight reaches half the total (lower median)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def loss_quality(ratio: float | None, full: float = 2.0, zero: float = 4.0) -> float:
    """x = 1 up to a loss ratio of ``full``, falling linearly to 0 at ``zero`` (§4.6: 2 and 4)."""
    if ratio is None:
        return 1.0
    return float(np.clip((zero - ratio) / (zero - full), 0.0, 1.0))


def relative_loss_quality(
    ratios: Sequence[float | None], full: float = 2.0, zero: float = 4.0, spread_floor: float = 0.05
) -> np.ndarray:
    """Robust relative band on the loss ratios of one round ("loss_rel").

    z_n = (ratio_n - median) / max(1.4826·MAD, spread_floor·median), median and MAD over the known
    ratios; x_n = 1 up to z = ``full``, falling linearly to 0 at z = ``zero``. Unlike the absolute
    band of §4.6 it does not wait for the model to become confident: it flags the clients whose
    loss ratio is an outlier among this round's clients, while ``spread_floor`` keeps a
    near-constant round (all clean) from turning tiny differences into large z.
    """
    known = np.array([ratio for ratio in ratios if ratio is not None], dtype=np.float64)
    if len(known) < 3:
        return np.ones(len(ratios))
    med = float(np.median(known))
    spread = max(1.4826 * float(np.median(np.abs(known - med))), spread_floor * med, EPS)
    z = np.array([0.0 if ratio is None else (ratio - med) / spread for ratio in ratios])
    return np.clip((zero - z) / (zero - full), 0.0, 1.0)


def update_quality(q: float, x: float, gamma: float, q_min: float) -> float:
    """q ← max(γ q + (1-γ) x, q_min) (§4.2 step 5)."""
    return max(gamma * q + (1.0 - gamma) * x, q_min)


def importance(quality: Mapping[str, float], sizes: Mapping[str, int]) -> dict[str, float]:
    """r_n = s_n q_n / Σ_m s_m q_m over every known client (falls back to s if Σ ≈ 0)."""
    raw = {k: sizes[k] * quality[k] for k in quality}
    total = sum(raw.values())
    if total <= EPS:
        total_s = sum(sizes[k] for k in quality) or 1
        return {k: sizes[k] / total_s for k in quality}
    return {k: v / total for k, v in raw.items()}


def weights(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """Normalise non-negative raw weights; (weights, fell_back) with uniform fallback if Σ ≈ 0."""
    values = np.asarray(values, dtype=np.float64)
    total = values.sum()
    if total <= EPS or not np.isfinite(total):
        return np.full(values.shape, 1.0 / len(values)), True
    return values / total, False


def neutral_quality(quality: Mapping[str, float]) -> float:
    """Initial q for a new client: the mean of the known clients' q, or 1 (§4.2 step 7)."""
    return float(np.mean(list(quality.values()))) if quality else 1.0
