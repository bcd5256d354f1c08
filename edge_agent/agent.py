"""The agent's state machine: Idle -> Training -> Uploading -> Idle. Pure: no torch, no paho.

Theory of operation. The daemon feeds it verified RoundTasks and the outcomes of the work it
asked for; it answers with actions for the daemon to carry out. A task is trained at most once:
a task for a round already uploaded (broker redelivery, or a coordinator that restarted and
re-announced the round) yields ``Resend`` of the cached sealed update instead of a second
training run, as long as the mask version is the same; a task for an older round, for a round
already in progress, past its deadline, or not selecting this device is ignored with a reason.
A governance decision (thermal, battery, training window, privacy budget) arrives as
``decline_reason`` and becomes a Status the coordinator can count, never a silent timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from protocol.messages import RoundTask


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


class AgentCore:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.phase = Phase.IDLE
        self.active_round: int | None = None
        self.uploaded: tuple[int, int] | None = None

    def on_task(self, task: RoundTask, now: float, decline_reason: str | None = None) -> list[Action]:
        if self.device_id not in task.selected:
            return [Ignore(task.round, "not_selected")]
        if self.uploaded is not None and task.round == self.uploaded[0]:
            if task.mask_version == self.uploaded[1] and self.phase is Phase.IDLE:
                return [Resend(task.round)]
            return [Ignore(task.round, "already_uploaded")]
        if self.uploaded is not None and task.round < self.uploaded[0]:
            return [Ignore(task.round, "stale_round")]
        if self.phase is not Phase.IDLE:
            return [Ignore(task.round, "busy" if task.round != self.active_round else "in_progress")]
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

    def on_uploaded(self, round_number: int, mask_version: int) -> list[Action]:
        self._expect(Phase.UPLOADING, round_number)
        self.phase, self.active_round = Phase.IDLE, None
        self.uploaded = (round_number, mask_version)
        return [ReportStatus(Phase.IDLE, round_number)]

    def on_failed(self, round_number: int, reason: str) -> list[Action]:
        """Training or upload failed (out of memory, broker gone for too long): report and go idle."""
        self._expect(self.phase, round_number)
        self.phase, self.active_round = Phase.IDLE, None
        return [Decline(round_number, reason), ReportStatus(Phase.IDLE, round_number)]

    def _expect(self, phase: Phase, round_number: int) -> None:
        if self.phase is not phase or self.active_round != round_number:
            raise RuntimeError(
                f"agent is {self.phase.value} for round {self.active_round}, not {phase.value} for {round_number}"
            )
