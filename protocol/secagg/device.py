"""One device's side of a SecAgg+ round: advertise -> share -> mask -> reveal (see the package doc).

The device trusts the coordinator only to relay: everything it sends a neighbour is encrypted
to that neighbour, and it hands out each neighbour's secrets one kind at a time, never both.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedprune.protocol.secagg.errors import SecAggError
from fedprune.protocol.secagg.field import SEED_LEN, check_vector, low_bits, pairwise_mask, prg
from fedprune.protocol.secagg.keys import (
    TAG_LEN, AdvertisedKeys, commit_seed, mask_seed, open_shares, private_bytes, public_of, seal_shares,
)
from fedprune.protocol.secagg.params import SecureParams
from fedprune.protocol.secagg.shamir import SHARE_LEN, Share, decode_share, encode_share, split

CIPHERTEXT_LEN = 2 * SHARE_LEN + TAG_LEN
"""One device's shares for one neighbour on the wire: AEAD(seed share || mask-key share)."""


@dataclass(frozen=True)
class HeldShares:
    """What one neighbour entrusted to this device: a share of its self-mask seed and of its mask key."""

    seed: Share
    mask_key: Share


class DeviceSession:
    """One device's side of one round. ``context`` binds everything to federation, round and
    session (``SecureSetup.context``); it goes into every HKDF info, AEAD associated data and the
    seed commitment."""

    def __init__(self, device: str, params: SecureParams, context: bytes) -> None:
        if type(device) is not str or not device:
            raise SecAggError("bad_params", "a device id is a non-empty string")
        if type(context) is not bytes:
            raise SecAggError("bad_params", "context must be bytes")
        self.device = device
        self.params = params
        self.context = context
        self._stage = "advertise"
        self._share_private = X25519PrivateKey.generate()
        self._mask_private = X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(SEED_LEN)
        self._neighbours: dict[str, AdvertisedKeys] = {}
        self._held: dict[str, HeldShares] = {}
        self._revealed: dict[str, str] = {}  # neighbour -> "seed" | "mask_key", the one kind handed out

    @property
    def held(self) -> Mapping[str, HeldShares]:
        """The shares neighbours entrusted to this device (what a colluding device would pool)."""
        return MappingProxyType(self._held)

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            raise SecAggError("wrong_stage", f"{self.device}: {stage} asked while at {self._stage}")

    def advertise(self) -> AdvertisedKeys:
        """Stage 1: this round's public keys (made with the session, used in this round only) and
        the commitment to the self-mask seed."""
        self._expect("advertise")
        self._stage = "share"
        return AdvertisedKeys(public_of(self._share_private), public_of(self._mask_private),
                              commit_seed(self._seed, self.context, self.device))

    def share(self, neighbours: Mapping[str, AdvertisedKeys]) -> dict[str, bytes]:
        """Stage 2: split the self-mask seed and the mask private key t-of-m among the m neighbours
        that advertised, one share of each per neighbour, encrypted to it. Fewer than t neighbours
        could never reconstruct this device's secrets: refused (too_few_devices)."""
        self._expect("share")
        if self.device in neighbours:
            raise SecAggError("not_a_neighbour", f"{self.device} is not its own neighbour")
        if not all(isinstance(k, AdvertisedKeys) for k in neighbours.values()):
            raise SecAggError("bad_key", "neighbour keys must be AdvertisedKeys")
        t = self.params.threshold
        if len(neighbours) < t:
            raise SecAggError("too_few_devices", f"{self.device}: {len(neighbours)} neighbours advertised, {t} needed")
        peers = sorted(neighbours)
        xs = range(1, len(peers) + 1)
        seed_shares = split(self._seed, xs, t)
        key_shares = split(private_bytes(self._mask_private), xs, t)
        out = {
            peer: seal_shares(self._share_private, neighbours[peer].share_public, self.context, self.device, peer,
                              encode_share(s) + encode_share(k))
            for peer, s, k in zip(peers, seed_shares, key_shares)
        }
        self._neighbours = dict(neighbours)
        self._stage = "mask"
        return out

    def _open(self, sender: str, ciphertext: bytes) -> HeldShares:
        if type(ciphertext) is not bytes:
            raise SecAggError("bad_share_ciphertext", f"shares from {sender} are not bytes")
        plain = open_shares(self._share_private, self._neighbours[sender].share_public, self.context, sender,
                            self.device, ciphertext)
        try:
            if len(plain) != 2 * SHARE_LEN:
                raise SecAggError("bad_share", f"expected {2 * SHARE_LEN} bytes")
            return HeldShares(decode_share(plain[:SHARE_LEN]), decode_share(plain[SHARE_LEN:]))
        except SecAggError as exc:
            raise SecAggError("bad_share_ciphertext", f"shares from {sender} are malformed ({exc})") from None

    def mask(self, vector: np.ndarray, received: Mapping[str, bytes]) -> np.ndarray:
        """Stage 3: keep the shares that the neighbours in ``received`` (those that completed stage 2)
        sent here, and return vector + prg(seed) + the pairwise mask with each of them, mod 2**bits.
        Fewer than t of them could not reveal this device's seed: refused (too_few_devices)."""
        self._expect("mask")
        bits = self.params.bits
        v = check_vector(vector, bits)
        strangers = sorted(set(received) - set(self._neighbours))
        if strangers:
            raise SecAggError("not_a_neighbour", f"{self.device} did not share with {strangers}")
        if len(received) < self.params.threshold:
            raise SecAggError("too_few_devices", f"{self.device}: {len(received)} neighbours shared, "
                                                 f"{self.params.threshold} needed")
        held = {sender: self._open(sender, ct) for sender, ct in received.items()}
        masked = v + prg(self._seed, v.size, bits)
        for peer in received:
            seed = mask_seed(self._mask_private, self._neighbours[peer].mask_public, self.context, self.device, peer)
            masked += pairwise_mask(self.device, peer, seed, v.size, bits)
        self._held = held
        self._stage = "reveal"
        return masked & low_bits(bits)

    def reveal(self, survivors: Collection[str], dropped: Collection[str]) -> dict[str, bytes]:
        """Stage 4: the seed share of each surviving neighbour and the mask-key share of each dropped
        one (wire form, see ``shamir.encode_share``), for neighbours whose shares this device holds.
        Refuses (reveal_conflict) to hand out both kinds for one neighbour, now or across calls,
        and refuses a survivor list shorter than t (too_few_devices). May be asked again."""
        self._expect("reveal")
        alive, gone = set(survivors), set(dropped)
        if alive & gone or self.device in gone:
            raise SecAggError("reveal_conflict", f"{sorted(alive & gone | gone & {self.device})} listed as dropped "
                                                 "and surviving")
        if len(alive) < self.params.threshold:
            raise SecAggError("too_few_devices", f"{len(alive)} survivors, {self.params.threshold} needed")
        asked = {p: "seed" for p in alive if p in self._held} | {p: "mask_key" for p in gone if p in self._held}
        clash = sorted(p for p, kind in asked.items() if self._revealed.get(p, kind) != kind)
        if clash:
            raise SecAggError("reveal_conflict", f"{self.device} already revealed the other kind of share for {clash}")
        self._revealed.update(asked)
        return {p: encode_share(getattr(self._held[p], kind)) for p, kind in asked.items()}
