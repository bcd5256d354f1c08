"""The built-in models' names and input-shape rules, without torch.

``fedprune.common.models.ModelSpec`` enforces them when it builds a model; the coordinator's config
checks them at load, so ``status``, ``run`` and ``enroll`` refuse a model that cannot be built
with one message, without importing torch (~200 MB, seconds on a small board).
"""

from __future__ import annotations

import math

MODEL_NAMES = ("mlp", "cnn2d", "cnn1d")


def input_shape_problem(name: str, shape: tuple[int, ...]) -> str | None:
    """Why model ``name`` cannot take samples of ``shape``, with the fix; None when it can."""
    features = math.prod(shape)
    if name == "cnn2d" and len(shape) != 3:
        side = math.isqrt(features)
        example = f"[1, {side}, {side}]" if side * side == features else "[channels, height, width]"
        return f"cnn2d needs input_shape (C, H, W), got {shape}: e.g. {example}, or model = \"mlp\" for flat features"
    if name == "cnn1d" and len(shape) != 2:
        return (f"cnn1d needs input_shape (C, L), got {shape}: e.g. [1, {features}] for one channel, "
                "or model = \"mlp\" for flat features")
    if name != "mlp" and min(shape[1:]) < 4:
        return (f"{name} needs spatial sizes >= 4 (two 2x poolings), got {shape}: use model = \"mlp\" "
                "for inputs this small")
    return None
