"""Byzantine clients for the simulation: what an attacker sends instead of its honest update.

Only the simulator uses this (benchmarks/robustness); a device never does. The threat model is
the one a deployment faces: an attacker holds a valid device key, receives the round's task, may
train honestly to look normal, and then uploads whatever it likes. It also reports the per-class
losses of its honest local evaluation, so a defence that trusts self-reported metrics alone gains
nothing against it. Every attacker keeps its honest mask: poisoned values sit on the positions
it holds, as any well-formed Update must.

Kinds (``scale`` is the attack's magnitude, 10 by default):

- ``sign_flip``: −Δ, the honest update reversed;
- ``scaled``: scale·Δ, the honest update boosted to dominate a plain mean;
- ``gaussian``: N(0, σ²) on held positions with σ = scale × the RMS of the honest update;
- ``free_rider_zero``: an all-zero update (no training, claims its data share);
- ``free_rider_stale``: the previous round's global step on its positions, a plausible update
  that costs no training (zero in round 1);
- ``label_flip``: honest training on labels mapped c → C−1−c (applied to the shard, not here);
- ``collude``: all attackers upload one identical update, −mean of their honest updates: a
  coordinated reversal that also looks like a tight cluster to distance-based rules (Krum);
- ``absent``: the attackers never take part. Not an attack but the benchmark's yardstick: the
  accuracy of the honest clients alone, which no defence can beat, since a defence that drops
  an attacker also loses that client's data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Params = dict[str, np.ndarray]

ATTACKS = ("none", "sign_flip", "scaled", "gaussian", "free_rider_zero", "free_rider_stale", "label_flip", "collude",
           "absent")


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """c → C−1−c for every label: the attacker trains, honestly, on a consistently wrong task."""
    return (num_classes - 1 - np.asarray(labels)).astype(np.asarray(labels).dtype)


def _on_mask(value: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return value if mask is None else np.where(mask, value, 0.0).astype(value.dtype)


def poison(kind: str, honest: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], rng: np.random.Generator,
           scale: float, previous_step: Mapping[str, np.ndarray] | None) -> Params:
    """The update an attacker of ``kind`` sends in place of its honest ``honest`` update.

    ``collude`` is set by :func:`collude` over all attackers at once, ``label_flip`` poisons the
    data and ``absent`` clients send nothing, so these return the honest update here."""
    if kind in ("none", "label_flip", "collude", "absent"):
        return dict(honest)
    if kind == "sign_flip":
        return {k: -v for k, v in honest.items()}
    if kind == "scaled":
        return {k: (scale * v).astype(v.dtype) for k, v in honest.items()}
    if kind == "gaussian":
        total = sum(float(np.sum(np.square(v, dtype=np.float64))) for v in honest.values())
        size = sum(int(np.count_nonzero(masks[k])) if k in masks else v.size for k, v in honest.items())
        sigma = scale * np.sqrt(total / max(size, 1))
        return {k: _on_mask(rng.normal(0.0, sigma, v.shape).astype(v.dtype), masks.get(k)) for k, v in honest.items()}
    if kind == "free_rider_zero":
        return {k: np.zeros_like(v) for k, v in honest.items()}
    if kind == "free_rider_stale":
        if previous_step is None:
            return {k: np.zeros_like(v) for k, v in honest.items()}
        return {k: _on_mask(np.asarray(previous_step[k], dtype=v.dtype), masks.get(k)) for k, v in honest.items()}
    raise ValueError(f"attack {kind!r}: expected one of {ATTACKS}")


def collude(honest_updates: Sequence[Mapping[str, np.ndarray]],
            masks: Sequence[Mapping[str, np.ndarray]]) -> list[Params]:
    """One shared poisoned update, −mean of the colluders' honest updates, on each one's own mask."""
    names = list(honest_updates[0])
    shared = {k: -np.mean([np.asarray(u[k], dtype=np.float64) for u in honest_updates], axis=0) for k in names}
    return [{k: _on_mask(shared[k].astype(honest_updates[0][k].dtype), m.get(k)) for k in names} for m in masks]
