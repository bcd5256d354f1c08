"""The model: ``model = "fedprune_sensors.nets:conv_gru"``, a GRU classifier over sensor windows.

A window arrives as (channels, steps), the layout fedprune's sensor_csv reader gives. A strided
1-D convolution first halves the steps and mixes the channels (a sensor's axes are only
meaningful together, and the mounting of the device differs from wearer to wearer); the GRU then
reads 25 steps instead of 50, half the sequential work on a device's CPU, and the class comes
from its last hidden state. The conv, the GRU's weight matrices and the head are pruned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvGRU(nn.Module):
    def __init__(self, channels: int, num_outputs: int, features: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, features, 5, stride=2, padding=2)
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).transpose(1, 2)  # (N, steps, features): batch_first for the GRU
        out, _ = self.gru(h)
        return self.head(out[:, -1])


def conv_gru(input_shape: Sequence[int], num_outputs: int, features: int = 32, hidden: int = 48) -> ConvGRU:
    """``input_shape`` = [channels, window]; ``features``: conv channels; ``hidden``: GRU width."""
    if len(input_shape) != 2:
        raise ValueError(f"input_shape {list(input_shape)}: expected [channels, window] (sensor_csv windows)")
    return ConvGRU(input_shape[0], num_outputs, features, hidden)
