"""Stages 2-4 of a secure round at the coordinator: relay keys and shares, collect the masked
vectors, unmask their sum. Pure: messages in, messages out, ``now`` passed in.

Theory of operation. Stage 1 runs in the round machine like a plain round (``SecureKeys``
stand in for updates: selection, quorum, deadline, retries and revocations are the same). Its
close hands the reports here with the weights the strategy drew from them. From then on each
stage waits until every device it expects has answered or the stage deadline passes, and a
device that misses a stage has dropped out (SecAgg+ recovers its masks). The result is the
weighted mean of the survivors' updates, w renormalised over them, and nothing else: a failure
(fewer devices left than the threshold, too few shares) closes the round without it, with a
reason the daemon logs. A device known to be gone (last will, revocation, decline) is not waited
for at this stage or any later one; one revoked before the mask stage closes has its vector left
out (it counts as dropped); after that close its vector is in the sum, since leaving it out would
need both of its secrets. Bad shares (misplaced, or off their owner's polynomial: the owner or
the revealer lied) are left out and listed in the outcome (``bad_shares``).

Fixed point: the devices report max |value| of their update; the range R is the largest report,
but at most ``RANGE_OVER_MEDIAN`` times their median, so one device cannot coarsen everyone's
precision by lying, and each device clips its weighted values to it. The scale leaves room for
one unit of rounding per device: |Σ w_n x_n| <= R because the weights sum to 1.

Distributed DP ([strategy] secure_noise_multiplier σ > 0, announced in ``SecureSetup``; a device
that does not add noise at exactly that σ declines, keys that declare another σ are refused by
the daemon): the devices clip their vectors to L2 norm C and report C, so R = C, and each adds a
Skellam share μ_dev = (σ·S·w_max·C)²/(2t) in field units (``protocol/distributed_dp.py``, point
5: t the threshold, w_max the largest weight, announced in stage 2). n such shares have std σ·S·w_max·C·sqrt(n/t); the scale keeps
``NOISE_HEADROOM`` of those beside R, so the sum wraps with probability below 1e-14 a
coordinate. The round's history records ``noise``: σ, the μ of its sum (survivors·μ_dev), S,
w_max, C and the vector's length, all that ``distributed_dp.rdp_round`` needs for its RDP
against the coordinator; the ε accountant lives with the devices' ledgers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedprune.protocol.layout import ModelLayout
from fedprune.protocol.secagg import AdvertisedKeys, AggregatorSession, SecAggError, from_field
from fedprune.protocol.secure_messages import (SecureInbox, SecureKeys, SecureMasked, SecureNeighbours, SecureReveal,
                                               SecureShares, SecureUnmask)
from fedprune.protocol.secure_setup import SecureSetup
from fedprune.protocol.secure_vector import unflatten, vector_length

RANGE_OVER_MEDIAN = 4.0
NOISE_HEADROOM = 8.0  # standard deviations of the devices' summed noise that the field leaves room for
Downlink = SecureNeighbours | SecureInbox | SecureUnmask


@dataclass(frozen=True)
class SecureSum:
    """What a secure round lets the coordinator learn: Σ w_n Δ_n / Σ w_n over the survivors."""

    mean_delta: dict[str, np.ndarray]
    buffer_delta: dict[str, np.ndarray]
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    bad_shares: tuple[tuple[str, str], ...]  # (owner, revealer)


@dataclass(frozen=True)
class SecureFailed:
    reason: str
    detail: str


def value_range(reports: Mapping[str, SecureKeys]) -> float:
    highs = np.array([r.max_abs for r in reports.values()], dtype=np.float64)
    if highs.size == 0 or not highs.max() > 0:
        return 1.0
    median = float(np.median(highs))
    return float(highs.max()) if median <= 0 else min(float(highs.max()), RANGE_OVER_MEDIAN * median)


def field_scale(bits: int, devices: int, value_range: float, noise_std: float = 0.0) -> float:
    """Field units per unit of value: the sum of ``devices`` weighted values within R, plus one
    unit of stochastic rounding each and ``NOISE_HEADROOM`` times the summed noise's standard
    deviation ``noise_std`` (value units), stays below 2**(bits-1)."""
    room = (1 << (bits - 1)) - 1 - devices
    if room < 1:
        raise SecAggError("bad_params", f"bits={bits} leave no room for {devices} devices")
    scale = room / (value_range + NOISE_HEADROOM * noise_std)
    if not (math.isfinite(scale) and scale > 0):
        raise SecAggError("bad_params", f"range {value_range:g} with noise std {noise_std:g} leaves no fixed-point scale")
    return scale


class SecureCollection:
    def __init__(self, *, federation: str, round_number: int, setup: SecureSetup, layout: ModelLayout,
                 masks: Mapping[str, np.ndarray], reports: Mapping[str, SecureKeys], weights: Mapping[str, float],
                 stage_s: float, now: float) -> None:
        self.round = round_number
        self.setup = setup
        self.layout, self.masks = layout, masks
        self.weights = dict(weights)
        self.stage_s = stage_s
        ids = sorted(reports)
        self.dimension = vector_length(layout, masks)
        self.aggregator = AggregatorSession(ids, setup.params, setup.session, setup.context(federation, round_number),
                                            self.dimension)
        for device in ids:
            report = reports[device]
            self.aggregator.on_advertise(device, AdvertisedKeys(report.share_public, report.mask_public,
                                                                report.seed_commitment))
        self.expected = self.aggregator.close_advertise()
        self.value_range = value_range(reports)
        self.max_weight = max(min(1.0, self.weights[d]) for d in self.expected)
        shares = len(self.expected) / setup.threshold  # n shares: n/t times the variance the devices calibrate
        noise_std = setup.noise_multiplier * self.max_weight * self.value_range * shares**0.5
        self.scale = field_scale(setup.bits, len(ids), self.value_range, noise_std)
        self.stage = "shares"
        self.answered: set[str] = set()
        self.gone: set[str] = set()
        self.deadline = now + stage_s
        self.dropped: frozenset[str] = frozenset()
        self.sent: dict[str, Downlink] = {
            d: SecureNeighbours(round=self.round, device=d, session=setup.session, weight=min(1.0, self.weights[d]),
                                max_weight=self.max_weight, value_range=self.value_range, scale=self.scale,
                                keys={v: (k.share_public, k.mask_public) for v, k in self.aggregator.keys_for(d).items()})
            for d in sorted(self.expected)}

    def outbox(self) -> list[Downlink]:
        """The current stage's messages to the devices that have not answered it (all of them when
        the stage begins; the rest again after a broker outage)."""
        return [m for d, m in self.sent.items() if d in self.expected and d not in self.answered]

    def postpone(self, paused_s: float) -> None:
        self.deadline += paused_s

    def noise(self, survivors: int) -> dict[str, float]:
        """The round's distributed-DP noise as the coordinator expects it, for its history: the
        μ of the sum's Skellam noise (field units) and what its sensitivity depends on."""
        std = self.setup.noise_multiplier * self.scale * self.max_weight * self.value_range
        return {"sigma": self.setup.noise_multiplier, "mu": survivors * std**2 / (2 * self.setup.threshold),
                "scale": self.scale, "weight_max": self.max_weight, "clip_norm": self.value_range,
                "dimension": self.dimension}

    def forget(self, device: str, revoked: bool = False) -> None:
        """Stop waiting for a device known to be gone (its last will, a decline, a revocation), at
        this stage and every later one. A revoked device's masked vector is also left out while
        the mask stage is open; another's stays in, its sender's going is no reason to lose it."""
        self.gone.add(device)
        self.expected = frozenset(self.expected - self.gone)
        if revoked and self.stage == "masked" and device in self.sent:
            self.aggregator.withdraw(device)

    def on_message(self, msg: SecureShares | SecureMasked | SecureReveal) -> str:
        """'' when taken, else the reason it was not (counted by the caller)."""
        if msg.session != self.setup.session:
            return "wrong_session"
        try:
            if isinstance(msg, SecureShares):
                self.aggregator.on_shares(msg.device, msg.ciphertexts)
            elif isinstance(msg, SecureMasked):
                if msg.bits != self.setup.bits:
                    return "wrong_bits"
                self.aggregator.on_masked(msg.device, msg.values)
            else:
                self.aggregator.on_reveal(msg.device, msg.shares)
        except SecAggError as exc:
            return exc.reason
        self.answered.add(msg.device)
        return ""

    def tick(self, now: float) -> list[Downlink] | SecureSum | SecureFailed | None:
        """The next stage's messages once this one is complete or overdue; the outcome at the end."""
        if not self.expected <= self.answered and now <= self.deadline:
            return None
        self.answered, self.deadline = set(), now + self.stage_s
        try:
            if self.stage == "shares":
                shared, self.stage = self.aggregator.close_shares(), "masked"
                self.sent = {d: SecureInbox(round=self.round, device=d, session=self.setup.session,
                                            ciphertexts=self.aggregator.inbox_for(d)) for d in sorted(shared)}
                self.expected = frozenset(shared - self.gone)
                return self.outbox()
            if self.stage == "masked":
                survivors, self.dropped = self.aggregator.close_masked()
                self.stage = "reveal"
                self.sent = {d: SecureUnmask(round=self.round, device=d, session=self.setup.session,
                                             survivors=tuple(sorted(survivors)), dropped=tuple(sorted(self.dropped)))
                             for d in sorted(survivors)}
                self.expected = frozenset(survivors - self.gone)
                return self.outbox()
            total, survivors = self.aggregator.result()
        except SecAggError as exc:
            return SecureFailed(exc.reason, str(exc))
        weight = sum(self.weights[d] for d in survivors)
        if not weight > 0:
            return SecureFailed("zero_weight", "every device that survived the round has weight 0")
        vector = from_field(total, self.scale, self.setup.bits) / weight
        delta, buffers = unflatten(self.layout, self.masks, vector)
        return SecureSum(delta, buffers, tuple(sorted(survivors)), tuple(sorted(self.dropped)),
                         tuple(sorted(self.aggregator.bad_shares)))
