"""The model: a MobileNet-style depthwise-separable CNN, named in the federation as
``model = "fedprune_images.nets:separable_cnn"``.

GroupNorm, not BatchNorm: BatchNorm's running mean and variance are buffers that every device
estimates on its own label-skewed batches of 32 and the coordinator averages, so the statistics
the released model uses at inference match no device's data; GroupNorm normalises each sample on
its own and behaves the same in training and at inference, with no state to federate.

Only the stem, the pointwise convolutions and the head are pruned (``fedprune_masked``): a depthwise
kernel is 9 weights per channel, under 5 % of the model, and pruning it switches spatial filters
off for almost no saving.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(4, channels), channels)


def separable_cnn(input_shape: Sequence[int], num_outputs: int, widths: Sequence[int] = (16, 32, 64)) -> nn.Sequential:
    """Conv stem, then two blocks of depthwise 3x3 (stride 2) and pointwise 1x1, each followed by
    GroupNorm and ReLU; global average pool; linear head. ``widths``: stem, block 1, block 2."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape {list(input_shape)}: expected [channels, height, width]")
    widths = tuple(widths)
    if len(widths) != 3 or any(type(w) is not int or w < 1 for w in widths):
        raise ValueError(f"widths={list(widths)}: expected three positive ints (stem, block 1, block 2)")
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False),
        stem_norm=_norm(widths[0]),
        stem_relu=nn.ReLU(),
    )
    for i, (c_in, c_out) in enumerate(zip(widths, widths[1:]), start=1):
        layers[f"dw{i}"] = nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False)
        layers[f"dw{i}_norm"] = _norm(c_in)
        layers[f"dw{i}_relu"] = nn.ReLU()
        layers[f"pw{i}"] = nn.Conv2d(c_in, c_out, 1, bias=False)
        layers[f"pw{i}_norm"] = _norm(c_out)
        layers[f"pw{i}_relu"] = nn.ReLU()
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(widths[-1], num_outputs)
    model = nn.Sequential(layers)
    model.fedprune_masked = ("stem.weight", "pw1.weight", "pw2.weight", "head.weight")
    return model
