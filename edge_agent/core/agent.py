"""The agent's decisions: Idle -> Training -> Uploading -> Idle. Pure: no torch, no paho, no files.

Theory of operation. The daemon feeds it verified RoundTasks and the outcomes of the work it
asked for; it answers with actions for the daemon to carry out. From a finished training it
builds the Update that leaves the device: the trainable deltas on the mask, the privacy step
(clip and noise, when the device runs client-level DP), the values rounded to the task's
encoding with error feedback (``core/feedback.py``), the per-class losses only if the owner
allows them; a diverged training becomes a decline instead. A task is trained at most once,
and its update leaves the device once. The coordinator re-announces a round to the devices it
still waits for, so a task naming this device for a round it already uploaded means "not
received" only if the coordinator had time to receive the upload before it spoke: a task that
arrived before the upload was acknowledged (queued while training) or within a hold-off after it
(crossed the upload in flight) is ignored; a later one yields ``Resend`` of the cached sealed
update (same mask version only), and each resend doubles the hold-off. A task for an older
round, for a round already in progress or already failed, past its deadline, or not selecting
this device is ignored with a reason.
A governance decision (thermal, battery, training window, privacy budget) arrives as
``decline_reason`` and becomes a Status the coordinator can count, never a silent timeout; so
does a plain task under distributed DP, whose noise exists only inside a secure round's sum
(``distributed_dp_needs_secure``). Under distributed DP the secure participant clips and noises
(``core/secure.py``), and the masked vector's ``SendSecure`` names the cost the daemon charges
before it leaves.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable

import numpy as np

from fedprune.protocol.distributed_dp import (DISTRIBUTED, DISTRIBUTED_DP_NEEDS_SECURE, LOCAL, NOISE_MISMATCH,
                                              SkellamCost)
from fedprune.edge_agent.core.feedback import quantise_update
from fedprune.edge_agent.core.privacy import privatize
from fedprune.edge_agent.core.secure import DistributedDP, SecureAnswer, SecureDownlink, SecureParticipant
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.messages import RoundTask, Update
from fedprune.protocol.secagg import SecAggError
from fedprune.protocol.secure_messages import SecureKeys, SecureMasked
from fedprune.protocol.sparse import SparseParams

Params = dict[str, np.ndarray]
# A hostile device's hand on its own update (the lab's attacks): (task, honest delta, masks) -> delta.
# The core only calls it; what it does (train other shards, read files) is the lab's business.
Tamper = Callable[[RoundTask, Params, Params], Params]


# Longer than a task takes from the coordinator's check to the device, shorter than a round:
# a re-announcement that reaches the device this soon after its upload crossed it in flight.
RESEND_HOLDOFF_S = 5.0


class Phase(str, Enum):
    IDLE = "idle"
    TRAINING = "training"
    UPLOADING = "uploading"


@dataclass(frozen=True)
class Trained:
    """What local training returns, wherever it ran (in process or in a child)."""

    delta: Params
    buffers: Params
    masks: Params
    mask_changed: bool
    n_examples: int
    steps: int
    train_loss: float
    class_losses: dict[int, tuple[float, int]]
    seconds: float
    macs: int


@dataclass(frozen=True)
class PrivacyStep:
    """Client-level DP: clip to ``clip_norm``; ``local``: add N(0, (noise_multiplier·clip_norm)²) on
    held positions; ``distributed``: add a Skellam share inside a secure round's field instead."""

    clip_norm: float
    noise_multiplier: float
    rng: np.random.Generator
    mechanism: str = LOCAL


@dataclass(frozen=True)
class Train:
    task: RoundTask
    hyper: HyperParams  # the task's, with this device's own seed


@dataclass(frozen=True)
class Upload:
    """Send ``update`` (a secure round's first stage: ``SecureKeys``); with local DP on, the daemon
    charges the privacy ledger first (``norm_before_clip``)."""

    update: Update | SecureKeys
    norm_before_clip: float | None = None


@dataclass(frozen=True)
class SendSecure:
    """Send the answer to a secure round's stage (``edge_agent/core/secure.py``); with a ``cost``
    (a masked vector under distributed DP), the daemon charges the privacy ledger first."""

    message: SecureAnswer
    cost: SkellamCost | None = None


@dataclass(frozen=True)
class KeepResidual:
    """Persist the error-feedback residual (None: there is none left) before the next round."""

    residual: Params | None


@dataclass(frozen=True)
class Resend:
    round: int


@dataclass(frozen=True)
class Ignore:
    round: int
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Decline:
    round: int
    reason: str


@dataclass(frozen=True)
class ReportStatus:
    phase: Phase
    round: int


Action = Train | Upload | SendSecure | KeepResidual | Resend | Ignore | Decline | ReportStatus


@dataclass(frozen=True)
class _Sent:
    """The last uploaded round: when it last left the device, and how long to trust that it arrives."""

    round: int
    mask_version: int
    at: float
    holdoff: float
    session: bytes | None  # a secure round's: a new session for the same round is a new opening


class AgentCore:
    def __init__(self, device_id: str, resend_holdoff_s: float = RESEND_HOLDOFF_S, *,
                 privacy: PrivacyStep | None = None, report_class_losses: bool = True,
                 tamper: Tamper | None = None, residual: Params | None = None,
                 rng: np.random.Generator | None = None) -> None:
        self.device_id = device_id
        self.resend_holdoff_s = resend_holdoff_s
        self.privacy = privacy
        self.report_class_losses = report_class_losses
        self.tamper = tamper
        self.phase = Phase.IDLE
        self.active_round: int | None = None
        self.uploaded: _Sent | None = None
        self.failed_round: int | None = None
        self.residual = residual  # error feedback: what quantising earlier updates left behind
        self._next_residual: Params | None = None  # this upload's, kept once the broker has it
        self.secure: SecureParticipant | None = None  # the last secure round, until the next replaces it
        self.rng = rng if rng is not None else np.random.default_rng()  # stochastic rounding to the field

    def on_task(self, task: RoundTask, now: float, decline_reason: str | None = None,
                received_at: float | None = None) -> list[Action]:
        """``received_at`` is when the task reached the device (default ``now``): a task that
        waited in the queue while this device trained must not count as a fresh request."""
        if self.device_id not in task.selected:
            return [Ignore(task.round, "not_selected")]
        if self.uploaded is not None and task.round == self.uploaded.round:
            if task.secure is None or task.secure.session == self.uploaded.session:
                return self._repeated(task, now, now if received_at is None else received_at)
            self.uploaded = None  # the coordinator opened the round again (it restarted): fresh keys, once more
        if self.uploaded is not None and task.round < self.uploaded.round:
            return [Ignore(task.round, "stale_round")]
        if self.phase is not Phase.IDLE:
            return [Ignore(task.round, "busy" if task.round != self.active_round else "in_progress")]
        if task.round == self.failed_round:
            return [Ignore(task.round, "failed_this_round")]
        if now > task.deadline:
            return [Ignore(task.round, "past_deadline")]
        if self._distributed and task.secure is None:  # no secure sum to hide the noise shares in
            decline_reason = DISTRIBUTED_DP_NEEDS_SECURE
        elif task.secure is not None and not math.isclose(task.secure.noise_multiplier, self._noise_multiplier):
            decline_reason = f"{NOISE_MISMATCH}: the round is for σ={task.secure.noise_multiplier:g}, " \
                             f"this device adds σ={self._noise_multiplier:g} ([privacy] mechanism, noise_multiplier)"
        if decline_reason is not None:
            return [Decline(task.round, decline_reason)]
        self.phase, self.active_round = Phase.TRAINING, task.round
        return [ReportStatus(Phase.TRAINING, task.round), Train(task, task.hyper.for_device(self.device_id))]

    def on_trained(self, task: RoundTask, trained: Trained) -> list[Action]:
        """The update to send, or a decline when training diverged (a non-finite delta helps nobody)."""
        self._expect(Phase.TRAINING, task.round)
        if not all(np.all(np.isfinite(v)) for v in trained.delta.values()):
            return self.on_failed(task.round, "training_diverged")
        trainable = task.layout.subset(s.name for s in task.layout.trainable)
        delta = {s.name: trained.delta[s.name] for s in trainable}
        norm = None
        if self.privacy is not None and not self._distributed:
            delta, norm = privatize(delta, trained.masks, self.privacy.clip_norm, self.privacy.noise_multiplier,
                                    self.privacy.rng)
        if self.tamper is not None:  # a hostile device sends what it likes: its own privacy step is no bound on it
            delta = self.tamper(task, delta, trained.masks)
        self.phase = Phase.UPLOADING
        if task.secure is not None:
            return [Upload(self._secure_keys(task, trained, delta), norm)]
        # After the privacy step: the noise is in what gets rounded, and the residual is a
        # function of released, privatised deltas only (post-processing; the accountant holds).
        quantised = quantise_update(delta, trained.masks, task.update_values, self.residual, task.error_feedback)
        delta, self._next_residual = quantised.delta, quantised.residual
        update = Update(
            round=task.round, device=self.device_id, mask_version=task.mask_version, n_examples=trained.n_examples,
            metrics={"train_loss": trained.train_loss, "steps": trained.steps, "train_seconds": trained.seconds,
                     "macs": float(trained.macs)},
            class_losses=trained.class_losses if self.report_class_losses else {},
            delta=SparseParams.from_dense(trainable, delta, trained.masks, check=_finite(delta)),
            mask_changed=trained.mask_changed, buffers=trained.buffers,
        )
        return [Upload(update, norm)]

    def _secure_keys(self, task: RoundTask, trained: Trained, delta: Params) -> SecureKeys:
        """Start the round's secure stages: the update stays here; its report and keys leave."""
        base = task.params()
        buffer_delta = {name: np.asarray(v, dtype=np.float64) - base[name] for name, v in trained.buffers.items()}
        p = self.privacy
        dp = DistributedDP(p.clip_norm, p.noise_multiplier, p.rng) if self._distributed else None
        self.secure = SecureParticipant(device=self.device_id, federation=task.federation, round_number=task.round,
                                        setup=task.secure, layout=task.layout, masks=task.masks, delta=delta,
                                        buffer_delta=buffer_delta, rng=self.rng, dp=dp)
        return self.secure.keys(trained.n_examples, trained.class_losses if self.report_class_losses else {},
                                {"train_loss": trained.train_loss, "steps": trained.steps,
                                 "train_seconds": trained.seconds, "macs": float(trained.macs)})

    def on_secure(self, msg: SecureDownlink) -> list[Action]:
        """A secure round's next stage: answered once, in order; anything else is ignored with why."""
        if self.secure is None:
            return [Ignore(msg.round, "no_secure_round")]
        try:
            answer = self.secure.answer(msg)
        except SecAggError as exc:
            return [Ignore(msg.round, exc.reason, str(exc))]
        return [SendSecure(answer, self.secure.take_cost() if isinstance(answer, SecureMasked) else None)]

    @property
    def _distributed(self) -> bool:
        return self.privacy is not None and self.privacy.mechanism == DISTRIBUTED

    @property
    def _noise_multiplier(self) -> float:
        """The σ of the Skellam shares this device adds in a secure round (0: none)."""
        return self.privacy.noise_multiplier if self._distributed else 0.0

    def leave_secure(self, round_number: int) -> None:
        """The masked vector was not released (its privacy cost was refused): forget the round, so
        that a re-sent stage cannot get the vector out uncharged."""
        if self.secure is not None and self.secure.round == round_number:
            self.secure = None

    def on_uploaded(self, round_number: int, mask_version: int, now: float) -> list[Action]:
        """The broker acknowledged every chunk of the update at ``now``."""
        self._expect(Phase.UPLOADING, round_number)
        self.phase, self.active_round = Phase.IDLE, None
        session = self.secure.setup.session if self.secure is not None and self.secure.round == round_number else None
        self.uploaded = _Sent(round_number, mask_version, now, self.resend_holdoff_s, session)
        actions: list[Action] = [ReportStatus(Phase.IDLE, round_number)]
        if self._next_residual is not None or self.residual is not None:
            self.residual = self._next_residual
            actions.insert(0, KeepResidual(self.residual))
        return actions

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


def _finite(delta: Params) -> bool:
    """A tampered delta may be non-finite on purpose; the outside-mask check would misread NaN."""
    return all(np.all(np.isfinite(v)) for v in delta.values())
