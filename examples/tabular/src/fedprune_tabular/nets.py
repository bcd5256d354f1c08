"""The model: ``model = "fedprune_tabular.nets:energy_mlp"``, an MLP from a meter row to kWh.

The CSV columns keep their units (hours, degrees, m², kWh), as a site's logger writes them, so
the model carries its own scaling: the inputs are standardised by ``center``/``scale`` and the
output is ``target_center + target_scale * net(x)``. The constants are model arguments, so they
travel in the signed round task and every site and the exported ONNX use the same ones; they
are nominal values for the fleet (no site sees the others' data to compute statistics), not
parameters, so federated averaging never moves them. The released model then takes raw rows
and answers in kWh.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# hour, weekday, temp_c, humidity_pct, occupancy_pct, floor_area_m2 (make_data.FEATURES)
CENTER = (11.5, 3.0, 15.0, 60.0, 35.0, 9000.0)
SCALE = (7.0, 2.0, 10.0, 20.0, 35.0, 5000.0)


class EnergyMLP(nn.Module):
    def __init__(self, n_in: int, num_outputs: int, hidden: tuple[int, ...], center: tuple[float, ...],
                 scale: tuple[float, ...], target_center: float, target_scale: float) -> None:
        super().__init__()
        self.center, self.scale = center, scale
        self.target_center, self.target_scale = target_center, target_scale
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(n_in, width), nn.ReLU()]
            n_in = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(n_in, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        center = torch.as_tensor(self.center, dtype=x.dtype, device=x.device)  # a constant in the ONNX graph
        scale = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
        return self.target_center + self.target_scale * self.out(self.body((x - center) / scale))


def energy_mlp(input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (64, 64),
               center: Sequence[float] = CENTER, scale: Sequence[float] = SCALE,
               target_center: float = 150.0, target_scale: float = 150.0) -> EnergyMLP:
    """ReLU layers of widths ``hidden`` on rows of ``input_shape`` = [features]."""
    if len(input_shape) != 1 or not len(center) == len(scale) == input_shape[0]:
        raise ValueError(f"input_shape {list(input_shape)}: expected [features] with one center and one scale "
                         f"per feature (got {len(center)} and {len(scale)})")
    if min(scale) <= 0 or target_scale <= 0:
        raise ValueError("scale and target_scale must be > 0")
    return EnergyMLP(input_shape[0], num_outputs, tuple(hidden), tuple(map(float, center)),
                     tuple(map(float, scale)), float(target_center), float(target_scale))
