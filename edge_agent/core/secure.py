"""A device's side of a secure round after training: the stages of ``protocol/secure_messages.py``.
Pure: messages in, messages out; the randomness is the session's own and a seeded generator.

What leaves the device: round keys and the contribution report (examples, per-class losses of
the received model, max |update value|); Shamir shares encrypted to its neighbours; its update,
clipped to the round's range R, times its weight w, stochastically rounded to the field and
masked; one share per neighbour at the end. The update itself never leaves unmasked.

Under distributed DP (``DistributedDP``) the device first clips its whole vector (update and
buffer changes) to L2 norm C and reports C as its max |value|, so the range depends on no data;
before masking it adds its Skellam share of noise in field units, calibrated to the round's
threshold and largest weight (``distributed_dp``, point 5), and names the round's ``cost`` for
the daemon to charge before the masked vector leaves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedprune.protocol.distributed_dp import MAX_MU, SkellamCost, device_mu, skellam_noise
from fedprune.protocol.secagg import AdvertisedKeys, DeviceSession, SecAggError, to_field
from fedprune.protocol.secure_messages import (SecureInbox, SecureKeys, SecureMasked, SecureNeighbours, SecureReveal,
                                               SecureShares, SecureUnmask)
from fedprune.protocol.secure_setup import SecureSetup
from fedprune.protocol.secure_vector import flatten

SecureDownlink = SecureNeighbours | SecureInbox | SecureUnmask
SecureAnswer = SecureShares | SecureMasked | SecureReveal
# Refusals that mean the coordinator or a neighbour broke the protocol, not a late or repeated message.
SUSPECT_REASONS = frozenset({"reveal_conflict", "weight_above_max", "bad_share_ciphertext", "bad_key",
                             "not_a_neighbour", "noise_out_of_range"})


@dataclass(frozen=True)
class DistributedDP:
    """[privacy] mechanism = "distributed": clip the vector to ``clip_norm`` C, add a share of
    Skellam noise for σ = ``noise_multiplier`` inside the field, drawn from ``rng`` (the privacy
    step's: a simulation seeds it)."""

    clip_norm: float
    noise_multiplier: float
    rng: np.random.Generator


class SecureParticipant:
    """One device, one opening of one round. Answers each stage once, in order; the same stage
    message again (re-sent after a broker outage) gets the same answer; anything else (another
    round or session, an out-of-order stage) raises SecAggError."""

    def __init__(self, *, device: str, federation: str, round_number: int, setup: SecureSetup, layout, masks,
                 delta: Mapping[str, np.ndarray], buffer_delta: Mapping[str, np.ndarray], rng: np.random.Generator,
                 dp: DistributedDP | None = None) -> None:
        self.device, self.round, self.setup, self.dp = device, round_number, setup, dp
        # a hostile device's tampered delta may be non-finite; what it masks is its business, but no crash here
        self.vector = np.nan_to_num(flatten(layout, masks, delta, buffer_delta), posinf=1e30, neginf=-1e30)
        if dp is not None:
            norm = float(np.linalg.norm(self.vector))
            if norm > dp.clip_norm:
                self.vector = self.vector * (dp.clip_norm / norm)
        self.session = DeviceSession(device, setup.params, setup.context(federation, round_number))
        self.rng = rng
        self._cost: SkellamCost | None = None  # with the masked vector: what releasing it costs this device
        self._neighbours: SecureNeighbours | None = None
        self._expect = SecureNeighbours
        self._last: tuple[SecureDownlink, SecureAnswer] | None = None

    def keys(self, n_examples: int, class_losses: dict[int, tuple[float, int]], metrics: dict[str, float]) -> SecureKeys:
        advertised = self.session.advertise()
        if self.dp is not None:  # the bound, not the data: the range R tells nothing about this update
            max_abs = self.dp.clip_norm
        else:
            max_abs = float(np.max(np.abs(self.vector))) if self.vector.size else 0.0
        return SecureKeys(round=self.round, device=self.device, session=self.setup.session,
                          share_public=advertised.share_public, mask_public=advertised.mask_public,
                          seed_commitment=advertised.seed_commitment,
                          noise_multiplier=0.0 if self.dp is None else self.dp.noise_multiplier,
                          n_examples=n_examples, class_losses=class_losses, max_abs=max_abs, metrics=metrics)

    def take_cost(self) -> SkellamCost | None:
        """What releasing the masked vector costs, once: a re-sent answer is not charged again."""
        cost, self._cost = self._cost, None
        return cost

    def answer(self, msg: SecureDownlink) -> SecureAnswer:
        if msg.round != self.round or msg.session != self.setup.session:
            raise SecAggError("wrong_session", f"stage for round {msg.round} of another session")
        if self._last is not None and msg == self._last[0]:
            return self._last[1]
        answer = self._answer(msg)
        self._last = (msg, answer)
        return answer

    def _answer(self, msg: SecureDownlink) -> SecureAnswer:
        if type(msg) is not self._expect:
            raise SecAggError("wrong_stage", f"{type(msg).__name__} while expecting "
                                             f"{self._expect.__name__ if self._expect else 'nothing'}")
        head = {"round": self.round, "device": self.device, "session": self.setup.session}
        if isinstance(msg, SecureNeighbours):
            if msg.weight > msg.max_weight:  # the noise is calibrated to w_max: a larger weight would outgrow it
                raise SecAggError("weight_above_max", f"weight {msg.weight} above the round's largest {msg.max_weight}")
            self._neighbours, self._expect = msg, SecureInbox
            peers = {d: AdvertisedKeys(share, mask) for d, (share, mask) in msg.keys.items()}
            return SecureShares(**head, ciphertexts=self.session.share(peers))
        if isinstance(msg, SecureInbox):
            self._expect = SecureUnmask
            plan = self._neighbours
            weighted = plan.weight * np.clip(self.vector, -plan.value_range, plan.value_range)
            field = to_field(weighted, plan.scale, self.setup.bits, self.rng)
            if self.dp is not None:
                field = self._noised(field, plan)
            self.vector = np.zeros(0)  # the clear update is not kept past its masking
            return SecureMasked(**head, bits=self.setup.bits, values=self.session.mask(field, msg.ciphertexts))
        self._expect = None
        return SecureReveal(**head, shares=self.session.reveal(msg.survivors, msg.dropped))

    def _noised(self, field: np.ndarray, plan: SecureNeighbours) -> np.ndarray:
        """``field`` plus this device's Skellam share, mod 2**bits; sets ``cost`` (none at weight 0:
        no data in the vector, but the share still goes in, the others' guarantee counts on it)."""
        dp, t = self.dp, self.setup.threshold
        mu = device_mu(dp.noise_multiplier, plan.scale, plan.max_weight, dp.clip_norm, t)
        if mu > MAX_MU:
            raise SecAggError("noise_out_of_range", f"share mu {mu:.3g} above {MAX_MU:g}: the round's scale "
                                                    f"{plan.scale:g} leaves no room for noise")
        noise = skellam_noise(field.shape, mu, dp.rng)
        self._cost = (SkellamCost.of_round(dp.clip_norm, plan.scale, field.size, plan.weight, t * mu)
                     if plan.weight > 0 and field.size else None)
        return ((field.astype(np.int64) + noise) & ((1 << self.setup.bits) - 1)).astype(np.uint32)
