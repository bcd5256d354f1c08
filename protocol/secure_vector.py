"""The one vector a device masks in a secure round, and its inverse: both sides must agree on
every position, so the order is part of the contract.

Order: every trainable tensor in layout order, a masked one at the positions of the round's
global mask in row-major order (devices train inside that mask in a secure round), then every
buffer (BatchNorm statistics) as its change since the task's, except the counters
(``num_batches_tracked``), which are not averages and stay with the coordinator.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedprune.protocol.layout import ModelLayout, TensorSpec

Params = dict[str, np.ndarray]


def _summed(spec: TensorSpec) -> bool:
    return spec.trainable or not spec.name.endswith("num_batches_tracked")


def vector_length(layout: ModelLayout, masks: Mapping[str, np.ndarray]) -> int:
    return sum(int(np.count_nonzero(masks[s.name])) if s.masked else s.size for s in layout if _summed(s))


def flatten(layout: ModelLayout, masks: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray],
            buffer_delta: Mapping[str, np.ndarray]) -> np.ndarray:
    parts = []
    for spec in layout:
        if not _summed(spec):
            continue
        value = np.asarray(delta[spec.name] if spec.trainable else buffer_delta[spec.name], dtype=np.float64)
        parts.append(value[np.asarray(masks[spec.name], dtype=bool)] if spec.masked else value.ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(layout: ModelLayout, masks: Mapping[str, np.ndarray], vector: np.ndarray) -> tuple[Params, Params]:
    """(dense trainable deltas, zero off the mask; float buffer changes) from a flattened vector."""
    if vector.shape != (vector_length(layout, masks),):
        raise ValueError(f"vector of {vector.shape} does not fit the layout's {vector_length(layout, masks)} positions")
    delta: Params = {}
    buffers: Params = {}
    start = 0
    for spec in layout:
        if not _summed(spec):
            continue
        if spec.masked:
            held = np.asarray(masks[spec.name], dtype=bool)
            dense = np.zeros(spec.shape)
            count = int(np.count_nonzero(held))
            dense[held] = vector[start:start + count]
        else:
            count = spec.size
            dense = vector[start:start + count].reshape(spec.shape)
        (delta if spec.trainable else buffers)[spec.name] = dense
        start += count
    return delta, buffers
