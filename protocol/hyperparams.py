"""Local-training hyper-parameters: what a RoundTask tells a device to do this round.

Pure data shared by the coordinator's strategy (which decides them) and the agent's trainer
(which obeys them), so neither side imports the other's code.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

GROWTH_MODES = ("gradient", "random")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class HyperParams:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    readjust: bool = False
    prune_fraction: float = 0.0
    growth: str = "gradient"
    prox_mu: float = 0.0
    seed: int = 0
    # A masked layer of density d trains at lr * min(1/d, this): with scaled init, one SGD step
    # moves a sparse layer's output ∝ d (its active inputs), so sparse layers learn d times
    # slower than dense ones. 1.0 = the plain rule (docs/ALGORITHM_NOTES.md §5).
    max_sparse_lr_factor: float = 1.0
    # "sgd" (momentum, coupled weight decay) or "adamw" (betas (0.9, 0.999): ``momentum`` is
    # SGD's only; decoupled weight decay). The mask holds on either's moments
    # (fedprune.edge_agent.training.MaskedOptimizer). AdamW wants a far smaller lr (≈ 1e-3).
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and 1 <= self.epochs <= 1000):
            raise ValueError(f"epochs={self.epochs!r}: expected an int in 1..1000")
        if not (isinstance(self.batch_size, int) and 1 <= self.batch_size <= 65536):
            raise ValueError(f"batch_size={self.batch_size!r}: expected an int in 1..65536")
        for name in ("lr", "momentum", "weight_decay", "prox_mu"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1e3):
                raise ValueError(f"{name}={value!r}: expected a non-negative number")
        factor = self.max_sparse_lr_factor
        if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and 1.0 <= factor <= 1e3):
            raise ValueError(f"max_sparse_lr_factor={factor!r}: expected a number in [1, 1000]")
        if not (0.0 <= self.prune_fraction <= 1.0):
            raise ValueError(f"prune_fraction={self.prune_fraction!r}: expected a number in [0, 1]")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.growth not in GROWTH_MODES:
            raise ValueError(f"growth={self.growth!r}: expected one of {GROWTH_MODES}")
        if not isinstance(self.readjust, bool):
            raise ValueError(f"readjust={self.readjust!r}: expected a bool")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed!r}: expected a non-negative int below 2**63")

    def for_device(self, device_id: str) -> "HyperParams":
        """The round's seed mixed with a stable hash of the device id (crc32): one task, a
        different but reproducible shuffle and regrowth on every device."""
        seed = (self.seed * 1_000_003 + zlib.crc32(device_id.encode())) % (2**63)
        return replace(self, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HyperParams":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown hyper-parameters: {sorted(unknown)}")
        return cls(**data)
