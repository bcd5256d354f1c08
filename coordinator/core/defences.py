"""fedprune's Byzantine defences (docs/ROBUSTNESS.md): a second theory of operation beside the
contribution weights, so it lives apart from the round.

Self-reported losses cannot expose a poisoned update sent with honest-looking metrics, so the
geometry of the updates is checked too, with rules a clean client under label skew does not trip:

- clip: scale an update down to ``norm_clip`` × the round's median norm (boosted, noise);
- "sybil": a near-identical twin (cosine >= ``sybil_cos``), which independent clients' data never
  produce (colluders);
- "chance": no other update correlates with it beyond chance, ``chance_gate``/sqrt(nnz) (noise; a
  clean client shares classes, hence directions, with some others);
- "direction": the cosine with the trimmed mean of the updates admitted so far is <= 0 this round
  ("round"), or has been in most recent rounds ("memory": trust_n, the γ-average of [cosine > 0],
  below ``trust_threshold``). Sybils are kept out of that reference (identical updates survive
  trimming); distrusted clients are not: a reference of trusted clients only entrenched an early
  wrong majority on digits under 30 % sign flips (honest gated 56 % of rounds, accuracy 9.8 %
  against 80.1 %);
- centered clipping (Karimireddy et al., ICML 2021), opt-in: deviations from a robust centre are
  clipped, so an update far from it pulls the mean by at most its weight × τ.

Rounds with fewer than 3 updates cannot compare and apply only the stored trust. A gate that would
leave nobody leaves everybody in. Baselines stay textbook: the round runs this for fedprune only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

import fedprune.coordinator.core.aggregation as aggregation
import fedprune.coordinator.core.contribution as contribution
from fedprune.coordinator.core.config import StrategyConfig
from fedprune.coordinator.core.records import ClientUpdate
from fedprune.protocol.layout import ModelLayout


@dataclass(frozen=True)
class Screening:
    """What the defences decided about one round's updates, in the order they came."""

    clip: np.ndarray  # factor <= 1 applied to each update
    gated_by: list[str]  # why each update was left out ("sybil", "chance", "direction"), "" if admitted
    trust: dict[str, float]  # the direction trust after this round

    @classmethod
    def admit_all(cls, n: int, trust: Mapping[str, float]) -> Screening:
        return cls(np.ones(n), [""] * n, dict(trust))

    @property
    def admitted(self) -> np.ndarray:
        return np.array([not reason for reason in self.gated_by])


def screen(cfg: StrategyConfig, flat: np.ndarray, nrm: np.ndarray, g: np.ndarray, ids: Sequence[str],
           trust: Mapping[str, float]) -> Screening:
    """Clip factors, the gate and the new trust for the flat updates ``flat`` (norms ``nrm``, Gram ``g``)."""
    n = len(nrm)
    clip = np.ones(n)
    why = [""] * n
    trust = dict(trust)

    def drop(mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask):
            why[i] = why[i] or reason

    trusted = np.array([trust.get(c, 1.0) >= cfg.trust_threshold for c in ids])
    if n < 3:
        if cfg.direction_gate == "memory" and trusted.any():
            drop(~trusted, "direction")
        return Screening(clip, why, trust)
    if cfg.norm_clip > 0:
        clip = np.minimum(1.0, cfg.norm_clip * float(np.median(nrm)) / nrm)
    pairwise = contribution.cosine_matrix(g)
    np.fill_diagonal(pairwise, 0.0)
    if cfg.sybil_cos > 0:
        drop((pairwise >= cfg.sybil_cos).any(axis=1), "sybil")
    if cfg.chance_gate > 0:
        nnz = np.maximum(np.count_nonzero(flat, axis=1), 1)
        drop(np.abs(pairwise).max(axis=1) < cfg.chance_gate / np.sqrt(nnz), "chance")
    admitted = np.array([not w for w in why])
    if cfg.direction_gate != "off" and admitted.sum() >= 3:
        reference, _ = aggregation.trimmed_mean(flat[admitted], None, cfg.trim_fraction)
        cos = contribution.cosine_to(flat, reference)
        if cos is not None:
            along = cos > 0
            if cfg.direction_gate == "memory":
                for c, a in zip(ids, along):
                    trust[c] = cfg.trust_gamma * trust.get(c, 1.0) + (1.0 - cfg.trust_gamma) * float(a)
                along = np.array([trust[c] >= cfg.trust_threshold for c in ids])
            drop(~along, "direction")
    if all(why):
        why = [""] * n
    return Screening(clip, why, trust)


def centered_clip(cfg: StrategyConfig, layout: ModelLayout, valid: Sequence[ClientUpdate], flat: np.ndarray,
                  gate: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """One step from a robust centre: v = trimmed mean of the admitted updates over the positions
    each holds, c_n = min(1, τ/‖x_n − v‖) measured on n's held positions, τ = ``centered_clip`` ×
    the median deviation; the combiner then sees v + c_n (x_n − v). Returns (v, c), or None when
    off or with fewer than 3 admitted updates."""
    if cfg.centered_clip <= 0 or gate.sum() < 3:
        return None
    specs = [spec for spec in layout if spec.trainable]
    holds = np.stack([
        np.concatenate([np.asarray(u.masks[s.name], dtype=bool).ravel() if s.masked
                        else np.ones(int(np.prod(s.shape)), dtype=bool) for s in specs])
        for u in valid])
    center, _ = aggregation.trimmed_mean(flat[gate], holds[gate], cfg.trim_fraction)
    deviation = np.linalg.norm(np.where(holds, flat - center, 0.0), axis=1)
    tau = cfg.centered_clip * float(np.median(deviation[gate]))
    factors = np.where(deviation > tau, tau / np.where(deviation > 0, deviation, 1.0), 1.0)
    return center, factors
