"""A device's side of a secure round after training: the stages of ``protocol/secure_messages.py``.
Pure: messages in, messages out; the randomness is the session's own and a seeded generator.

What leaves the device: round keys and the contribution report (examples, per-class losses of
the received model, max |update value|); Shamir shares encrypted to its neighbours; its update,
clipped to the round's range R, times its weight w, stochastically rounded to the field and
masked; one share per neighbour at the end. The update itself never leaves unmasked.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedprune.protocol.secagg import AdvertisedKeys, DeviceSession, SecAggError, to_field
from fedprune.protocol.secure_messages import (SecureInbox, SecureKeys, SecureMasked, SecureNeighbours, SecureReveal,
                                               SecureShares, SecureUnmask)
from fedprune.protocol.secure_setup import SecureSetup
from fedprune.protocol.secure_vector import flatten

SecureDownlink = SecureNeighbours | SecureInbox | SecureUnmask
SecureAnswer = SecureShares | SecureMasked | SecureReveal


class SecureParticipant:
    """One device, one opening of one round. Answers each stage once, in order; anything else
    (another round or session, a repeated or out-of-order stage) raises SecAggError."""

    def __init__(self, *, device: str, federation: str, round_number: int, setup: SecureSetup, layout, masks,
                 delta: Mapping[str, np.ndarray], buffer_delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> None:
        self.device, self.round, self.setup = device, round_number, setup
        # a hostile device's tampered delta may be non-finite; what it masks is its business, but no crash here
        self.vector = np.nan_to_num(flatten(layout, masks, delta, buffer_delta), posinf=1e30, neginf=-1e30)
        self.session = DeviceSession(device, setup.params, setup.context(federation, round_number))
        self.rng = rng
        self._neighbours: SecureNeighbours | None = None
        self._expect = SecureNeighbours

    def keys(self, n_examples: int, class_losses: dict[int, tuple[float, int]], metrics: dict[str, float]) -> SecureKeys:
        advertised = self.session.advertise()
        return SecureKeys(round=self.round, device=self.device, session=self.setup.session,
                          share_public=advertised.share_public, mask_public=advertised.mask_public,
                          n_examples=n_examples, class_losses=class_losses,
                          max_abs=float(np.max(np.abs(self.vector))) if self.vector.size else 0.0, metrics=metrics)

    @property
    def finished(self) -> bool:
        return self._expect is None

    def answer(self, msg: SecureDownlink) -> SecureAnswer:
        if msg.round != self.round or msg.session != self.setup.session:
            raise SecAggError("wrong_session", f"stage for round {msg.round} of another session")
        if type(msg) is not self._expect:
            raise SecAggError("wrong_stage", f"{type(msg).__name__} while expecting "
                                             f"{self._expect.__name__ if self._expect else 'nothing'}")
        head = {"round": self.round, "device": self.device, "session": self.setup.session}
        if isinstance(msg, SecureNeighbours):
            self._neighbours, self._expect = msg, SecureInbox
            peers = {d: AdvertisedKeys(share, mask) for d, (share, mask) in msg.keys.items()}
            return SecureShares(**head, ciphertexts=self.session.share(peers))
        if isinstance(msg, SecureInbox):
            self._expect = SecureUnmask
            plan = self._neighbours
            weighted = plan.weight * np.clip(self.vector, -plan.value_range, plan.value_range)
            field = to_field(weighted, plan.scale, self.setup.bits, self.rng)
            self.vector = np.zeros(0)  # the clear update is not kept past its masking
            return SecureMasked(**head, bits=self.setup.bits, values=self.session.mask(field, msg.ciphertexts))
        self._expect = None
        return SecureReveal(**head, shares=self.session.reveal(msg.survivors, msg.dropped))
