"""The coordinator's side of a SecAgg+ round: collect, relay, unmask (see the package doc).

Each stage collects with ``on_*`` until the coordinator's deadline, then ``close_*`` fixes who
got through; a device that missed a stage has dropped out for the rest of the round. A device
outside the set a stage expects raises unknown_device, a second message from one device
duplicate, a message after its stage closed wrong_stage: the caller counts ``reason`` and drops
the message, and the round goes on.

A bad share may reach the coordinator: a revealer may forge it, or the owner may have dealt its
neighbour a bad one; nobody but the two can tell which. Each revealer holds the share at a known
point (its place among the owner's neighbours), so a share at another point is left out; a bad
value at the right point is caught when the secret it rebuilds fails the owner's commitment
(seed) or public key (mask key): ``result`` then rebuilds from other t-subsets. Either way the
(owner, revealer) pair is listed in ``bad_shares``; the rest of the reveal counts.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from fedprune.protocol.secagg.device import CIPHERTEXT_LEN
from fedprune.protocol.secagg.errors import SecAggError
from fedprune.protocol.secagg.field import check_vector, low_bits, pairwise_mask, prg
from fedprune.protocol.secagg.graph import neighbour_graph
from fedprune.protocol.secagg.keys import AdvertisedKeys, commit_seed, load_private, mask_seed, public_of
from fedprune.protocol.secagg.params import SecureParams
from fedprune.protocol.secagg.shamir import Share, decode_share, reconstruct_checked


class AggregatorSession:
    """The coordinator's side of one round: collects, relays, and unmasks. Knows no secret of an
    honest device until t of its neighbours reveal a share of it."""

    def __init__(self, devices: Sequence[str], params: SecureParams, seed: bytes, context: bytes, length: int) -> None:
        if type(seed) is not bytes or type(context) is not bytes:
            raise SecAggError("bad_params", "seed and context must be bytes")
        if type(length) is not int or length < 1:
            raise SecAggError("bad_params", f"length={length}: expected a positive int")
        self.params = params
        self.context = context
        self.length = length
        self.graph = neighbour_graph(devices, params.degree, seed)
        if params.threshold > params.degree_for(len(self.graph)):
            raise SecAggError("too_few_devices", f"{len(self.graph)} devices cannot meet threshold {params.threshold}")
        self._stage = "advertise"
        self._keys: dict[str, AdvertisedKeys] = {}
        self._ciphertexts: dict[str, dict[str, bytes]] = {}
        self._masked: dict[str, np.ndarray] = {}
        self._revealers: set[str] = set()
        self._points: dict[str, dict[str, int]] = {}  # owner -> neighbour -> the x of the share it holds
        self._shares: dict[str, dict[str, Share]] = {}  # survivor -> its seed's shares; dropped -> its mask key's
        self.bad_shares: set[tuple[str, str]] = set()  # (owner, revealer): misplaced, or off the owner's polynomial
        self._u1: frozenset[str] = frozenset()  # advertised (U1), shared (U2), masked (U3)
        self._u2: frozenset[str] = frozenset()
        self._u3: frozenset[str] = frozenset()

    def _expect(self, stage: str, device: str, members: Collection[str], seen: Collection[str] = ()) -> None:
        if self._stage != stage:
            raise SecAggError("wrong_stage", f"{stage} message from {device} while the round is at {self._stage}")
        if device not in members:
            raise SecAggError("unknown_device", f"{device} is not taking part in the {stage} stage")
        if device in seen:
            raise SecAggError("duplicate", f"{device} already sent its {stage} message")

    def _close(self, stage: str) -> None:
        if self._stage != stage:
            raise SecAggError("wrong_stage", f"closing {stage} while the round is at {self._stage}")
        self._stage = "ended"  # until the close succeeds: a round too small to go on stays stopped

    def _core(self, members: Collection[str]) -> frozenset[str]:
        """The largest subset in which every device has at least t neighbours: one with fewer could
        not have its secrets rebuilt, so it is left out before anyone masks against it."""
        core = set(members)
        while weak := {d for d in core if len(core.intersection(self.graph[d])) < self.params.threshold}:
            core -= weak
        if not core:
            raise SecAggError("too_few_devices", f"{len(members)} devices got through, too few to give each "
                                                 f"{self.params.threshold} neighbours")
        return frozenset(core)

    def on_advertise(self, device: str, keys: AdvertisedKeys) -> None:
        self._expect("advertise", device, self.graph, self._keys)
        if not isinstance(keys, AdvertisedKeys) or keys.seed_commitment is None:
            raise SecAggError("bad_key", f"{device} sent no AdvertisedKeys with a seed commitment")
        self._keys[device] = keys

    def close_advertise(self) -> frozenset[str]:
        """U1: the devices that advertised, less any left with fewer than t advertised neighbours."""
        self._close("advertise")
        self._u1 = self._core(self._keys)
        self._points = {u: {v: x for x, v in enumerate(sorted(v for v in self.graph[u] if v in self._u1), start=1)} for u in self._u1}
        self._stage = "share"
        return self._u1

    def keys_for(self, device: str) -> dict[str, AdvertisedKeys]:
        """What ``device`` needs for stage 2: the keys of its neighbours in U1."""
        self._expect("share", device, self._u1)
        return {v: self._keys[v] for v in self.graph[device] if v in self._u1}

    def on_shares(self, device: str, ciphertexts: Mapping[str, bytes]) -> None:
        """Exactly one ciphertext per neighbour in U1: pairwise masks cancel only if every pair of
        survivors exchanged shares both ways."""
        self._expect("share", device, self._u1, self._ciphertexts)
        expected = {v for v in self.graph[device] if v in self._u1}
        if extra := sorted(set(ciphertexts) - expected):
            raise SecAggError("not_a_neighbour", f"{device} addressed shares to {extra}")
        if missing := sorted(expected - set(ciphertexts)):
            raise SecAggError("missing_shares", f"{device} sent no shares to {missing}")
        if bad := sorted(v for v, ct in ciphertexts.items() if type(ct) is not bytes or len(ct) != CIPHERTEXT_LEN):
            raise SecAggError("bad_share_ciphertext", f"{device}'s shares for {bad} are not {CIPHERTEXT_LEN} bytes")
        self._ciphertexts[device] = dict(ciphertexts)

    def close_shares(self) -> frozenset[str]:
        """U2: the devices that shared, less any left with fewer than t neighbours that shared."""
        self._close("share")
        self._u2 = self._core(self._ciphertexts)
        self._stage = "mask"
        return self._u2

    def inbox_for(self, device: str) -> dict[str, bytes]:
        """Sender -> the ciphertext it addressed to ``device``, for senders in U2 only: exactly the
        neighbours ``device`` will mask against."""
        self._expect("mask", device, self._u2)
        return {s: self._ciphertexts[s][device] for s in self.graph[device] if s in self._u2}

    def on_masked(self, device: str, vector: np.ndarray) -> None:
        self._expect("mask", device, self._u2, self._masked)
        self._masked[device] = check_vector(vector, self.params.bits, self.length)

    def withdraw(self, device: str) -> None:
        """Leave out a masked vector before the mask stage closes (its sender was revoked): the
        device then counts as dropped, so only its mask key is revealed, never its seed."""
        self._expect("mask", device, self._u2)
        self._masked.pop(device, None)

    def close_masked(self) -> tuple[frozenset[str], frozenset[str]]:
        """(survivors U3, dropped U2 - U3): every device is asked to reveal against these two lists."""
        self._close("mask")
        if len(self._masked) < self.params.threshold:
            raise SecAggError("too_few_devices", f"{len(self._masked)} masked vectors, {self.params.threshold} needed")
        self._u3 = frozenset(self._masked)
        self._stage = "reveal"
        return self._u3, self._u2 - self._u3

    def on_reveal(self, device: str, shares: Mapping[str, bytes]) -> None:
        """Keep a survivor's shares: of each surviving neighbour's seed, of each dropped one's mask key."""
        self._expect("reveal", device, self._u3, self._revealers)
        strangers = sorted(p for p in shares if p not in self.graph[device] or p not in self._u2)
        if strangers:
            raise SecAggError("not_a_neighbour", f"{device} revealed shares of {strangers}")
        decoded = {p: decode_share(data) for p, data in shares.items()}
        self._revealers.add(device)
        for p, share in decoded.items():
            if share.x == self._points[p][device]:
                self._shares.setdefault(p, {})[device] = share
            else:
                self.bad_shares.add((p, device))

    def result(self) -> tuple[np.ndarray, frozenset[str]]:
        """The survivors' sum mod 2**bits, and the survivors: remove each survivor's self-mask and the
        masks each dropped device shared with surviving neighbours; the masks between two survivors
        cancel. SecAggError too_few_shares names a device whose secret has fewer than t shares in,
        bad_share one whose revealed shares hold no t genuine ones."""
        if self._stage != "reveal":
            raise SecAggError("wrong_stage", f"result asked while the round is at {self._stage}")
        bits, n = self.params.bits, self.length
        total = np.zeros(n, dtype=np.uint32)
        for u in sorted(self._u3):
            commitment = self._keys[u].seed_commitment
            seed = self._rebuild(u, f"self-mask seed of survivor {u}",
                                 lambda secret, u=u, c=commitment: commit_seed(secret, self.context, u) == c)
            total += self._masked[u] - prg(seed, n, bits)
        for u in sorted(self._u2 - self._u3):
            public = self._keys[u].mask_public
            key = load_private(self._rebuild(u, f"mask key of dropped device {u}",
                                             lambda secret, p=public: public_of(load_private(secret)) == p))
            for v in self.graph[u]:
                if v in self._u3:
                    total -= pairwise_mask(v, u, mask_seed(key, self._keys[v].mask_public, self.context, u, v), n, bits)
        return total & low_bits(bits), self._u3

    def _rebuild(self, owner: str, what: str, valid) -> bytes:
        suspects = {revealer for _, revealer in self.bad_shares}
        secret, off = reconstruct_checked(self._shares.get(owner, {}), self.params.threshold, what, valid, suspects)
        self.bad_shares.update((owner, revealer) for revealer in off)
        return secret
