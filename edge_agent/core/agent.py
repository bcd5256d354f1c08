"""The agent's state machine: Idle -> Training -> Uploading -> Idle. Pure: no torch, no paho.

Theory of operation. The daemon feeds it verified RoundTasks and the outcomes of the work it
asked for; it answers with actions for the daemon to carry out. A task is trained at most once,
and its update leaves the device once. The coordinator re-announces a round to the devices it
still waits for, so a task naming this device for a round it already uploaded means "not
received" only if the coordinator had time to receive the upload before it spoke: a task that
arrived before the upload was acknowledged (queued while training) or within a hold-off after it
(crossed the upload in flight) is ignored; a later one yields ``Resend`` of the cached sealed
update (same mask version only), and each resend doubles the hold-off. A task for an older
round, for a round already in progress or already failed, past its deadline, or not selecting
this device is ignored with a reason.
A governance decision (thermal, battery, training window, privacy budget) arrives as
``decline_reason`` and becomes a Status the coordinator can count, never a silent timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from fedprune.protocol.messages import RoundTask


# Longer than a task takes from the coordinator's check to the device, shorter than a round:
# a re-announcement that reaches the device this soon after its upload crossed it in flight.
RESEND_HOLDOFF_S = 5.0


class Phase(str, Enum):
    IDLE = "idle"
    TRAINING = "training"
    UPLOADING = "uploading"


@dataclass(frozen=True)
class Train:
    task: RoundTask


@dataclass(frozen=True)
class Upload:
    round: int


@dataclass(frozen=True)
class Resend:
    round: int


@dataclass(frozen=True)
class Ignore:
    round: int
    reason: str


@dataclass(frozen=True)
class Decline:
    round: int
    reason: str


@dataclass(frozen=True)
class ReportStatus:
    phase: Phase
    round: int


Action = Train | Upload | Resend | Ignore | Decline | ReportStatus


@dataclass(frozen=True)
class _Sent:
    """The last uploaded round: when it last left the device, and how long to trust that it arrives."""

    round: int
    mask_version: int
    at: float
    holdoff: float


class AgentCore:
    def __init__(self, device_id: str, resend_holdoff_s: float = RESEND_HOLDOFF_S) -> None:
        self.device_id = device_id
        self.resend_holdoff_s = resend_holdoff_s
        self.phase = Phase.IDLE
        self.active_round: int | None = None
        self.uploaded: _Sent | None = None
        self.failed_round: int | None = None

    def on_task(self, task: RoundTask, now: float, decline_reason: str | None = None,
                received_at: float | None = None) -> list[Action]:
        """``received_at`` is when the task reached the device (default ``now``): a task that
        waited in the queue while this device trained must not count as a fresh request."""
        if self.device_id not in task.selected:
            return [Ignore(task.round, "not_selected")]
        if self.uploaded is not None and task.round == self.uploaded.round:
            return self._repeated(task, now, now if received_at is None else received_at)
        if self.uploaded is not None and task.round < self.uploaded.round:
            return [Ignore(task.round, "stale_round")]
        if self.phase is not Phase.IDLE:
            return [Ignore(task.round, "busy" if task.round != self.active_round else "in_progress")]
        if task.round == self.failed_round:
            return [Ignore(task.round, "failed_this_round")]
        if now > task.deadline:
            return [Ignore(task.round, "past_deadline")]
        if decline_reason is not None:
            return [Decline(task.round, decline_reason)]
        self.phase, self.active_round = Phase.TRAINING, task.round
        return [ReportStatus(Phase.TRAINING, task.round), Train(task)]

    def on_trained(self, round_number: int) -> list[Action]:
        self._expect(Phase.TRAINING, round_number)
        self.phase = Phase.UPLOADING
        return [Upload(round_number)]

    def on_uploaded(self, round_number: int, mask_version: int, now: float) -> list[Action]:
        """The broker acknowledged every chunk of the update at ``now``."""
        self._expect(Phase.UPLOADING, round_number)
        self.phase, self.active_round = Phase.IDLE, None
        self.uploaded = _Sent(round_number, mask_version, now, self.resend_holdoff_s)
        return [ReportStatus(Phase.IDLE, round_number)]

    def _repeated(self, task: RoundTask, now: float, received_at: float) -> list[Action]:
        sent = self.uploaded
        if task.mask_version != sent.mask_version or self.phase is not Phase.IDLE:
            return [Ignore(task.round, "already_uploaded")]
        if received_at < sent.at + sent.holdoff:
            return [Ignore(task.round, "answered_recently")]
        self.uploaded = replace(sent, at=now, holdoff=2 * sent.holdoff)
        return [Resend(task.round)]

    def on_failed(self, round_number: int, reason: str, retry: bool = False) -> list[Action]:
        """Training or upload failed (out of memory, broker gone for too long): report and go idle.
        Unless ``retry`` (the broker was away: the next announcement may find it back), the round
        is not trained again: a re-announcement would only repeat the same failure and decline."""
        self._expect(self.phase, round_number)
        self.phase, self.active_round = Phase.IDLE, None
        self.failed_round = None if retry else round_number
        return [Decline(round_number, reason), ReportStatus(Phase.IDLE, round_number)]

    def _expect(self, phase: Phase, round_number: int) -> None:
        if self.phase is not phase or self.active_round != round_number:
            raise RuntimeError(
                f"agent is {self.phase.value} for round {self.active_round}, not {phase.value} for {round_number}"
            )
