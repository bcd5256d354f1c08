"""Error feedback for quantised updates: what rounding drops this round goes out with the next.

A federation may send update values as float16 or int8 (``RoundTask.update_values``). Each
device adds its residual (what earlier roundings left behind) to its new delta, quantises the
sum exactly as the wire will, sends that, and keeps the difference as its new residual. Over
rounds the sent updates add up to the true deltas up to one residual, instead of losing every
round's rounding error (int8 on its own biases small coordinates to zero: a value below half a
step never moves its weight).

The residual lives on the positions the update's mask holds. A position the mask drops (a
readjust pruned it) loses its residual: its weight is zero in the global model now, and a regrown
weight starts from zero too, so an old correction there would push a new weight by an error it
never had. Dense tensors (biases) keep theirs on every position.

Pure: the daemon persists ``Quantised.residual`` once the broker has the update
(``edge_agent.feedback_store``), so a device restarted between rounds keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedprune.protocol.quantise import ValueDtype, quantise_params

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class Quantised:
    delta: Params  # what the coordinator will decode: dense arrays, zero off the mask
    residual: Params | None  # what rounding left behind, on the mask; None without error feedback


def quantise_update(delta: Params, masks: Params, dtype: ValueDtype, residual: Params | None,
                    feedback: bool) -> Quantised:
    """``delta`` (plus ``residual`` when ``feedback``) as the coordinator will decode it from
    ``dtype``, per tensor over the values the update carries (the mask's positions, in order).
    A residual whose tensors do not match ``delta`` (another model) is ignored. float32 rounds
    nothing: it sends what is left of a residual and keeps none."""
    if residual is not None and not _fits(residual, delta):
        residual = None
    if dtype == ValueDtype.FLOAT32 and (residual is None or not feedback):
        return Quantised(delta, None)
    corrected = {name: np.asarray(values, dtype=np.float32) for name, values in delta.items()}
    if feedback and residual is not None:
        corrected = {name: values + residual[name] for name, values in corrected.items()}
    sent = quantise_params(corrected, masks, dtype)
    if not feedback or dtype == ValueDtype.FLOAT32:
        return Quantised(sent, None)
    kept = {name: np.where(masks.get(name, True), values - sent[name], np.float32(0)).astype(np.float32)
            for name, values in corrected.items()}
    return Quantised(sent, kept)


def _fits(residual: Params, delta: Params) -> bool:
    return residual.keys() == delta.keys() and all(residual[k].shape == np.shape(delta[k]) for k in delta)
