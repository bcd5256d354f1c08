"""Value dtypes on the wire, and what a receiver decodes from each: the sender's error feedback
(``edge_agent/core/feedback.py``) and the coordinator's int8 task changes
(``coordinator/core/downlink.py``) keep exactly the difference between a value and its decode.

float32 is exact, float16 has relative error <= 2**-11 in the normal range, int8 has one
symmetric float32 scale per tensor (scale = max|x|/127, absolute error <= scale/2). Quantising
a decoded vector again gives it back unchanged, so the coordinator's copy of what the devices
hold and the devices' own agree bit for bit.
"""

from __future__ import annotations

import enum

import numpy as np

Params = dict[str, np.ndarray]
Masks = dict[str, np.ndarray]

F16_MAX = float(np.finfo(np.float16).max)


class ValueDtype(enum.IntEnum):
    FLOAT32 = 0
    FLOAT16 = 1
    INT8 = 2


def int8_scaled(v: np.ndarray) -> tuple[float, np.ndarray]:
    """Symmetric per-tensor int8: scale = max|v|/127 (a float32), q = rint(v/scale) in -127..127."""
    if not np.isfinite(v).all():
        raise ValueError("int8 values must be finite")
    peak = float(np.abs(v).max()) if v.size else 0.0
    scale = float(np.float32(peak / 127.0))
    q = np.zeros(v.shape, np.int8) if scale == 0.0 else np.clip(np.rint(v / np.float32(scale)), -127, 127).astype(np.int8)
    return scale, q


def quantise(values: np.ndarray, dtype: ValueDtype) -> np.ndarray:
    """What a receiver decodes from ``values`` sent as ``dtype``, as a new float32 vector: the
    sender's error feedback keeps ``values - quantise(values, dtype)``. float16 saturates at
    +-65504 instead of refusing (the feedback carries the excess into the next update). Sending
    the result as ``dtype`` again decodes to it unchanged (tests/protocol/test_sparse.py).
    """
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    dtype = ValueDtype(dtype)
    if dtype == ValueDtype.FLOAT32:
        return v.copy()
    if dtype == ValueDtype.FLOAT16:
        return np.clip(v, -F16_MAX, F16_MAX).astype(np.float16).astype(np.float32)
    scale, q = int8_scaled(v)
    return q.astype(np.float32) * np.float32(scale)


def quantise_params(params: Params, masks: Masks, dtype: ValueDtype) -> Params:
    """Each tensor as a receiver decodes it from SparseParams sent as ``dtype``: quantised over
    the values that travel (a masked tensor's active positions, in order), zero elsewhere."""
    out: Params = {}
    for name, values in params.items():
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        carried = masks[name].reshape(-1) if name in masks else slice(None)
        decoded = np.zeros(flat.shape, np.float32)
        decoded[carried] = quantise(flat[carried], dtype)
        out[name] = decoded.reshape(np.shape(values))
    return out
