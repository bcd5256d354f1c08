"""The round machine: which updates count for the open round, and when the round closes.

Theory of operation. At most one round is open. ``open`` names the round number, the selected
devices and the deadline. Each arriving update is either accepted (first update of a selected
device for the open round, before the deadline) or rejected with a stable reason that the
daemon counts. ``tick(now)`` decides the close: as soon as every selected device has
reported, or at the deadline. At the deadline a round with at least ``quorum`` updates closes;
one short of quorum is re-announced (``retry``, up to ``max_retries`` times, keeping the updates
already accepted) or closed with what it has (``close``). A closed round with no updates keeps
the global model. A selected device that withdraws (its data cannot train this model) is no
longer waited for, and quorum counts only the devices still expected. Nothing here reads a
clock or does I/O: ``now`` is passed in, so the daemon, the simulation and the tests drive the
same machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

Update = TypeVar("Update")

REJECT_REASONS = ("no_open_round", "wrong_round", "not_selected", "duplicate", "late")


@dataclass(frozen=True)
class RoundPolicy:
    quorum: int = 1
    deadline_s: float = 60.0
    on_missed_quorum: str = "close"
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise ValueError(f"quorum={self.quorum}: expected at least 1")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline_s={self.deadline_s}: expected a positive number of seconds")
        if self.on_missed_quorum not in ("close", "retry"):
            raise ValueError(f"on_missed_quorum={self.on_missed_quorum!r}: expected 'close' or 'retry'")
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries}: expected a non-negative int")


@dataclass(frozen=True)
class Accepted:
    device_id: str


@dataclass(frozen=True)
class Rejected:
    device_id: str
    reason: str


@dataclass(frozen=True)
class CloseRound(Generic[Update]):
    round: int
    updates: dict[str, Update]
    reached_quorum: bool


@dataclass(frozen=True)
class RetryRound:
    round: int
    attempt: int
    deadline: float
    missing: tuple[str, ...]


@dataclass
class _OpenRound(Generic[Update]):
    number: int
    selected: frozenset[str]
    deadline: float
    attempt: int = 0
    updates: dict[str, Update] = field(default_factory=dict)
    withdrawn: set[str] = field(default_factory=set)

    @property
    def missing(self) -> frozenset[str]:
        return self.selected - self.withdrawn - self.updates.keys()


class RoundMachine(Generic[Update]):
    def __init__(self, policy: RoundPolicy) -> None:
        self.policy = policy
        self._open: _OpenRound[Update] | None = None

    @property
    def open_round(self) -> int | None:
        return self._open.number if self._open else None

    @property
    def deadline(self) -> float | None:
        return self._open.deadline if self._open else None

    @property
    def received(self) -> tuple[str, ...]:
        return tuple(self._open.updates) if self._open else ()

    @property
    def missing(self) -> tuple[str, ...]:
        """Selected devices still expected to report: neither received nor withdrawn; sorted."""
        return tuple(sorted(self._open.missing)) if self._open else ()

    def withdraw(self, device_id: str, round_number: int) -> bool:
        """Stop waiting for a selected device of the open round that cannot take part; False
        when there is nothing to withdraw (another round, not selected, already reported)."""
        current = self._open
        if current is None or current.number != round_number or device_id not in current.missing:
            return False
        current.withdrawn.add(device_id)
        return True

    def discard(self, device_id: str) -> bool:
        """Take a revoked device out of the open round: its update, if one came, is dropped (a
        revoked key's update is never aggregated) and the round no longer waits for it. False
        when no open round selected it."""
        current = self._open
        if current is None or device_id not in current.selected:
            return False
        current.updates.pop(device_id, None)
        current.withdrawn.add(device_id)
        return True

    def open(self, number: int, selected: tuple[str, ...], now: float) -> None:
        if self._open is not None:
            raise RuntimeError(f"round {self._open.number} is still open")
        if not selected:
            raise ValueError("a round needs at least one selected device")
        self._open = _OpenRound(number, frozenset(selected), now + self.policy.deadline_s)

    def postpone(self, seconds: float) -> float:
        """Move the open round's deadline on by ``seconds`` (time nobody could reach the
        coordinator does not count against the devices); returns the new deadline."""
        if self._open is None:
            raise RuntimeError("no round is open")
        if seconds < 0:
            raise ValueError("a deadline can only move later")
        self._open.deadline += seconds
        return self._open.deadline

    def on_update(self, device_id: str, round_number: int, update: Update, now: float) -> Accepted | Rejected:
        current = self._open
        if current is None:
            return Rejected(device_id, "no_open_round")
        if round_number != current.number:
            return Rejected(device_id, "wrong_round")
        if device_id not in current.selected:
            return Rejected(device_id, "not_selected")
        if device_id in current.updates:
            return Rejected(device_id, "duplicate")
        if now > current.deadline:
            return Rejected(device_id, "late")
        current.updates[device_id] = update
        return Accepted(device_id)

    def tick(self, now: float) -> CloseRound[Update] | RetryRound | None:
        current = self._open
        if current is None:
            return None
        missing = current.missing
        if missing and now <= current.deadline:
            return None
        expected = len(current.selected) - len(current.withdrawn)
        quorum = len(current.updates) >= max(1, min(self.policy.quorum, expected))
        if (quorum or not missing or self.policy.on_missed_quorum == "close"
                or current.attempt >= self.policy.max_retries):
            self._open = None
            return CloseRound(current.number, dict(current.updates), quorum)
        current.attempt += 1
        current.deadline = now + self.policy.deadline_s
        return RetryRound(current.number, current.attempt, current.deadline, tuple(sorted(missing)))
