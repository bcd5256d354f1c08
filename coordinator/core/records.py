"""The values that cross the strategy seam, apart from the mathematics that makes them: what a
device sends (ClientUpdate), what the coordinator keeps between rounds and checkpoints
(GlobalState), what a round asks of the devices (RoundPlan) and what it reports (ClientScore,
RoundResult). The daemon, the simulator and the checkpoint code read these without the round's code.

Names used throughout (docs/ALGORITHM.md §1): ``psi`` ψ_n the leave-one-out cosine (logged, never
weighted by); ``q`` the quality state; ``importance`` and ``r`` r_n = s_n q_n / Σ_m s_m q_m over
every known client; ``w`` this round's aggregation weight; ``loss_ratio`` a client's per-class loss
against the round's class medians; ``rho`` only the kept fraction of §6 (``keep_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.layout import ModelLayout
from fedprune.protocol.messages import Update

Params = dict[str, np.ndarray]
Masks = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientUpdate:
    client_id: str
    n_examples: int
    delta: Params
    masks: Masks
    buffers: Params = field(default_factory=dict)
    train_loss: float = float("nan")
    class_losses: dict[int, tuple[float, int]] = field(default_factory=dict)

    @classmethod
    def from_update(cls, update: Update) -> ClientUpdate:
        """What the strategy needs from a decoded Update: dense deltas, masks, losses, size."""
        return cls(
            client_id=update.device, n_examples=update.n_examples, delta=update.delta_params(), masks=update.masks,
            buffers=dict(update.buffers), train_loss=update.metrics.get("train_loss", float("nan")),
            class_losses=dict(update.class_losses),
        )


@dataclass(frozen=True)
class GlobalState:
    layout: ModelLayout
    round: int
    params: Params
    masks: Masks
    mask_version: int
    densities: dict[str, float]
    counts: dict[str, int]
    quality: dict[str, float] = field(default_factory=dict)  # q_n
    data_sizes: dict[str, int] = field(default_factory=dict)
    importance: dict[str, float] = field(default_factory=dict)  # r_n
    trust: dict[str, float] = field(default_factory=dict)  # direction_gate "memory": EMA of cos > 0

    @property
    def trainable(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.layout if s.trainable)


@dataclass(frozen=True)
class RoundPlan:
    round: int
    selected: tuple[str, ...]
    hyper: HyperParams
    readjust: bool
    p_t: float
    client_masks: dict[str, Masks] = field(default_factory=dict)  # §6 sub-masks; absent = global mask
    keep_fraction: dict[str, float] = field(default_factory=dict)  # rho_n of §6

    def masks_for(self, client_id: str, state: GlobalState) -> Masks:
        return self.client_masks.get(client_id, state.masks)


@dataclass(frozen=True)
class ClientScore:
    psi: float | None  # None when the round had one valid update
    q: float
    r: float
    w: float
    quality_x: float | None  # this round's quality observation x_n; None: no signal
    loss_ratio: float | None
    update_norm: float | None  # None in a secure round: the coordinator never sees one update
    clip_factor: float = 1.0
    gated_by: str = ""  # "sybil", "chance" or "direction" when this round left the update out


@dataclass(frozen=True)
class RoundResult:
    state: GlobalState
    scores: dict[str, ClientScore]
    mask_churn: float
    n_valid: int
    rejected: dict[str, str]  # client_id -> reason
    aggregated: bool


@dataclass(frozen=True)
class SecureWeighting:
    """A secure round's weights, fixed before any device masks: one per reporting device (``ids``
    order), with the quality state and sizes they came from."""

    ids: tuple[str, ...]
    weights: np.ndarray
    quality: dict[str, float]
    sizes: dict[str, int]
    quality_x: tuple[float, ...] | None
    ratios: tuple[float | None, ...]
