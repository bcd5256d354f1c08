"""The built-in models, as factories like any user's: ``model = "mlp"`` is short for
``model = "fedprune.common.zoo:mlp"`` (``fedprune.common.model_rules.ALIASES``).

Every factory takes the sample shape and the number of outputs plus its own keyword arguments
(``[federation.model_args]``) and returns a plain ``nn.Sequential`` of standard layers without
data-dependent control flow, so ``torch.onnx.export`` can trace it. Datasets give a canonical
shape with a channel axis (digits: (1, 8, 8); mnist1d: (1, 40)); the MLP flattens whatever it
gets, the CNNs need (C, H, W) or (C, L).

CNN widths are 32-64 by default because pruning needs width: at (16, 32) ERK left the 1-D CNN's
middle conv 6 % dense at 80 % sparsity and sparse trailed dense by 11 points, at (32, 64) by 1
on the validation split (docs/ALGORITHM_NOTES.md §7). GroupNorm is preferred over BatchNorm for
small, label-skewed local batches (docs/ALGORITHM.md §9.4).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

NORMS = ("none", "group", "batch")
_MAX_UNITS = 1 << 16


def _widths(value: Sequence[int], what: str, count: int | None = None) -> tuple[int, ...]:
    widths = tuple(value)
    if any(type(w) is not int or not 1 <= w <= _MAX_UNITS for w in widths):
        raise ValueError(f"{what}={list(widths)!r}: expected positive ints")
    if count is not None and len(widths) != count:
        raise ValueError(f"{what}={list(widths)!r}: expected {count} widths")
    return widths


def _head(layers: OrderedDict, n_in: int, hidden: tuple[int, ...], num_outputs: int) -> nn.Sequential:
    for i, width in enumerate(hidden):
        layers[f"fc{i}"] = nn.Linear(n_in, width)
        layers[f"relu_fc{i}"] = nn.ReLU()
        n_in = width
    layers["out"] = nn.Linear(n_in, num_outputs)
    return nn.Sequential(layers)


def mlp(input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (256, 128)) -> nn.Sequential:
    """Fully connected ReLU layers of widths ``hidden`` on the flattened sample."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    return _head(layers, math.prod(input_shape), _widths(hidden, "hidden"), num_outputs)


def cnn2d(input_shape: Sequence[int], num_outputs: int, channels: Sequence[int] = (32, 64), norm: str = "none",
          hidden: Sequence[int] = ()) -> nn.Sequential:
    """Two 3x3 conv blocks (conv, optional norm, ReLU, 2x max-pool), then the ``hidden`` head."""
    return _cnn(2, tuple(input_shape), num_outputs, channels, norm, hidden)


def cnn1d(input_shape: Sequence[int], num_outputs: int, channels: Sequence[int] = (32, 64), norm: str = "none",
          hidden: Sequence[int] = ()) -> nn.Sequential:
    """Two width-5 conv blocks over (C, L) series, then the ``hidden`` head."""
    return _cnn(1, tuple(input_shape), num_outputs, channels, norm, hidden)


def _cnn(dims: int, shape: tuple[int, ...], num_outputs: int, channels: Sequence[int], norm: str,
         hidden: Sequence[int]) -> nn.Sequential:
    problem = _cnn_shape_problem(dims, shape)
    if problem:
        raise ValueError(problem)
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: expected one of {NORMS}")
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if dims == 2 else (nn.Conv1d, nn.MaxPool1d)
    kernel, pad = (3, 1) if dims == 2 else (5, 2)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in, spatial = shape[0], list(shape[1:])
    for i, c_out in enumerate(_widths(channels, "channels", 2)):
        layers[f"conv{i}"] = conv(c_in, c_out, kernel, padding=pad)
        if norm != "none":
            layers[f"norm{i}"] = _norm(norm, c_out, dims)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = pool(2)
        spatial = [s // 2 for s in spatial]
        c_in = c_out
    layers["flatten"] = nn.Flatten()
    return _head(layers, c_in * math.prod(spatial), _widths(hidden, "hidden"), num_outputs)


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)


def _cnn_shape_problem(dims: int, shape: tuple[int, ...]) -> str | None:
    """Why the ``dims``-D CNN cannot take samples of ``shape``, with the fix; None when it can."""
    name, features = f"cnn{dims}d", math.prod(shape)
    if dims == 2 and len(shape) != 3:
        side = math.isqrt(features)
        example = f"[1, {side}, {side}]" if side * side == features else "[channels, height, width]"
        return f"cnn2d needs input_shape (C, H, W), got {shape}: e.g. {example}, or model = \"mlp\" for flat features"
    if dims == 1 and len(shape) != 2:
        return (f"cnn1d needs input_shape (C, L), got {shape}: e.g. [1, {features}] for one channel, "
                "or model = \"mlp\" for flat features")
    if min(shape[1:]) < 4:
        return (f"{name} needs spatial sizes >= 4 (two 2x poolings), got {shape}: use model = \"mlp\" "
                "for inputs this small")
    return None
