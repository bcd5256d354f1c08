"""The device's privacy ledger on disk.

``fedprune.edge_agent.core.privacy`` is the math (clip, noise, accountant, ``PrivacyBudget``) and
the agent core applies the mechanism to each update; this shell keeps one budget per federation
in the state directory (``privacy-<federation>.json``, 0600, replaced atomically). ``charge``
records the round's cost and persists the ledger *before* the daemon publishes the noised
update, so a crash after sending can only over-count, never forget a release. The file holds
per-order RDP, so local rounds (Gaussian, ``RoundCost``) and distributed ones (Skellam,
``distributed_dp.SkellamCost``, known only once the coordinator has announced the round's scale
and weights) add up in one ledger of one format. Before training, ``exhausted`` asks whether a
round at σ (the Gaussian cost) still fits; a distributed round is then checked again at its exact
cost (``fits``) before its masked vector leaves, and the device drops out if it no longer fits. A ledger that cannot be read is an error, never a silent reset: resetting it
would let a device spend its budget twice. The owner's current ε budget and δ apply to the RDP
already spent, so raising or lowering the budget in the config takes effect on restart.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fedprune.common.configkit import ConfigError
from fedprune.common.fsutil import atomic_write
from fedprune.protocol.distributed_dp import SkellamCost
from fedprune.edge_agent.core.privacy import PrivacyBudget, RoundCost

LEDGER_GLOB = "privacy-*.json"


class LedgerError(ConfigError):
    """The privacy ledger is unreadable or belongs to another federation; the message names the file and the fix."""


def ledger_path(state_dir: Path, federation: str) -> Path:
    return Path(state_dir) / f"privacy-{federation}.json"


def read_budget(path: Path) -> PrivacyBudget | None:
    """The stored budget, None when there is none yet; LedgerError when the file is damaged."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return PrivacyBudget.from_dict(json.loads(raw))
    except ValueError as exc:
        raise LedgerError(
            f"{path}: unreadable privacy ledger ({exc}); it is never reset automatically: restore it from a "
            "backup, or move it away only if you accept that this device's spent budget is forgotten"
        ) from None


class PrivacyLedger:
    """One federation's budget on disk and the mechanism (C, σ) each round spends it on (the agent core applies it)."""

    def __init__(self, path: Path, federation: str, *, epsilon_budget: float, delta: float, clip_norm: float,
                 noise_multiplier: float) -> None:
        self.path = Path(path)
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.cost = RoundCost(noise_multiplier, sample_rate=1.0)
        stored = read_budget(self.path)
        if stored is not None and stored.federation != federation:
            raise LedgerError(f"{self.path}: ledger of federation {stored.federation!r}, not {federation!r}")
        if stored is None:
            self.budget = PrivacyBudget(federation, epsilon_budget, delta)
        else:
            self.budget = dataclasses.replace(stored, epsilon_budget=epsilon_budget, delta=delta)

    @property
    def exhausted(self) -> bool:
        """True when one more round at σ (Gaussian, the local mechanism's cost) would exceed the budget."""
        return not self.fits(self.cost)

    def fits(self, cost: RoundCost | SkellamCost) -> bool:
        return self.budget.can_participate(cost)

    def charge(self, cost: RoundCost | SkellamCost | None = None) -> None:
        """Record one round's spend (default: the local mechanism's); on disk when this returns,
        before the update that spends it leaves."""
        cost = self.cost if cost is None else cost
        if not self.fits(cost):
            raise RuntimeError("privacy budget exhausted: the daemon must decline before this round's release")
        spent = self.budget.record(cost)
        atomic_write(self.path, json.dumps(spent.to_dict(), indent=1).encode(), mode=0o600)
        self.budget = spent  # only once on disk: a failed write spends nothing
