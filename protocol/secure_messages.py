"""The secure-aggregation stages of one round, as frozen dataclasses validated on construction.

A round whose RoundTask carries ``secure`` (``secure_setup.SecureSetup``) runs, after local
training, four device stages, each answering one coordinator message (SecAgg+, Bell et al., CCS
2020; ``fedprune.protocol.secagg`` holds the cryptography, docs/PRIVACY.md the argument):

1. ``SecureKeys``        device -> coordinator: two round public keys, a commitment to its
                         self-mask seed, the σ of distributed-DP noise it adds, and the
                         contribution report (examples, per-class losses of the received model,
                         max |update value|).
2. ``SecureNeighbours``  coordinator -> device: its neighbours' keys, its weight w_n, the round's
                         largest weight and the fixed-point scale; the device answers
                         ``SecureShares``: its Shamir shares, each encrypted to one neighbour.
3. ``SecureInbox``       coordinator -> device: the shares its neighbours encrypted to it; the
                         device answers ``SecureMasked``: its weighted, quantised, masked vector.
4. ``SecureUnmask``      coordinator -> device: who survived and who dropped; the device answers
                         ``SecureReveal``: one share per neighbour, never both kinds for one.

Every message names the round and the session (fresh per opening of a round), and travels like
the plain ones: uplinks sealed to the coordinator on the device's update topic, downlinks signed
and encrypted under the federation key on the device's inbox.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np

from fedprune.protocol.messages import Kind, U32, U63, _class_losses, _int, _metrics
from fedprune.protocol.secagg.keys import KEY_LEN
from fedprune.protocol.secure_setup import MAX_BITS, MIN_BITS, SESSION_LEN
from fedprune.protocol.topics import validate_id

MAX_PEERS = 4096
MAX_CIPHERTEXT = 512  # one encrypted share pair is about 170 bytes
MAX_SHARE = 128  # one revealed share is 68 bytes


def _session(value: object) -> None:
    if type(value) is not bytes or len(value) != SESSION_LEN:
        raise ValueError(f"session must be {SESSION_LEN} bytes")


def _peer_blobs(blobs: object, what: str, max_len: int) -> dict[str, bytes]:
    if not isinstance(blobs, dict) or len(blobs) > MAX_PEERS:
        raise ValueError(f"{what} must be a dict of at most {MAX_PEERS} device -> bytes")
    for device, blob in blobs.items():
        validate_id(device, f"{what} device")
        if type(blob) is not bytes or not 0 < len(blob) <= max_len:
            raise ValueError(f"{what}[{device}]: expected 1..{max_len} bytes")
    return dict(blobs)


def _number(value: object, what: str, lo: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < lo:
        raise ValueError(f"{what}={value!r}: expected a finite number >= {lo}")
    return float(value)


@dataclass(frozen=True)
class _Stage:
    round: int
    device: str
    session: bytes

    def __post_init__(self) -> None:
        _int(self.round, "round", 0, U32)
        validate_id(self.device, "device")
        _session(self.session)


@dataclass(frozen=True, kw_only=True)
class SecureKeys(_Stage):
    """Stage 1 (device): round keys; ``seed_commitment``, which lets the coordinator check the
    self-mask seed its neighbours' shares rebuild; ``noise_multiplier``, the σ of the Skellam
    share the device will add (0: none; otherwise the round's); and what the coordinator needs to
    weigh this device without seeing its update: ``class_losses`` as in ``Update``, ``max_abs``
    the largest |value| of the update (the coordinator picks one fixed-point range from them)."""

    KIND: ClassVar[Kind] = Kind.SECURE_KEYS
    share_public: bytes
    mask_public: bytes
    seed_commitment: bytes
    noise_multiplier: float
    n_examples: int
    class_losses: dict[int, tuple[float, int]]
    max_abs: float
    metrics: dict[str, float]

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("share_public", "mask_public", "seed_commitment"):
            if type(getattr(self, name)) is not bytes or len(getattr(self, name)) != KEY_LEN:
                raise ValueError(f"{name} must be {KEY_LEN} bytes")
        object.__setattr__(self, "noise_multiplier", _number(self.noise_multiplier, "noise_multiplier"))
        _int(self.n_examples, "n_examples", 0, U63)
        object.__setattr__(self, "class_losses", _class_losses(self.class_losses))
        object.__setattr__(self, "max_abs", _number(self.max_abs, "max_abs"))
        object.__setattr__(self, "metrics", _metrics(self.metrics))


@dataclass(frozen=True, kw_only=True)
class SecureNeighbours(_Stage):
    """Stage 2 (coordinator): the device's neighbours' (share key, mask key), its weight, the
    round's largest weight (what a device adding distributed-DP noise calibrates it to), the range
    R every device clips its update values to, and the scale that turns a weighted value into
    field units."""

    KIND: ClassVar[Kind] = Kind.SECURE_NEIGHBOURS
    weight: float
    max_weight: float
    value_range: float
    scale: float
    keys: dict[str, tuple[bytes, bytes]]

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("weight", "max_weight"):
            object.__setattr__(self, name, _number(getattr(self, name), name))
            if getattr(self, name) > 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: weights of a round sum to 1")
        for name in ("value_range", "scale"):
            object.__setattr__(self, name, _number(getattr(self, name), name))
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        keys = self.keys
        if not isinstance(keys, dict) or len(keys) > MAX_PEERS:
            raise ValueError(f"keys must be a dict of at most {MAX_PEERS} device -> (key, key)")
        for device, pair in keys.items():
            validate_id(device, "neighbour")
            if not (isinstance(pair, tuple) and len(pair) == 2
                    and all(type(k) is bytes and len(k) == KEY_LEN for k in pair)):
                raise ValueError(f"keys[{device}]: expected two {KEY_LEN}-byte keys")
        object.__setattr__(self, "keys", dict(keys))


@dataclass(frozen=True, kw_only=True)
class _Ciphertexts(_Stage):
    ciphertexts: dict[str, bytes]

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "ciphertexts", _peer_blobs(self.ciphertexts, "ciphertexts", MAX_CIPHERTEXT))


@dataclass(frozen=True, kw_only=True)
class SecureShares(_Ciphertexts):
    """Stage 2 (device): neighbour -> its encrypted shares (only that neighbour can open them)."""

    KIND: ClassVar[Kind] = Kind.SECURE_SHARES


@dataclass(frozen=True, kw_only=True)
class SecureInbox(_Ciphertexts):
    """Stage 3 (coordinator): sender -> the shares that sender encrypted to this device."""

    KIND: ClassVar[Kind] = Kind.SECURE_INBOX


@dataclass(frozen=True, eq=False, kw_only=True)
class SecureMasked(_Stage):
    """Stage 3 (device): the masked vector, integers mod 2**bits (uniform to anyone without the masks)."""

    KIND: ClassVar[Kind] = Kind.SECURE_MASKED
    bits: int
    values: np.ndarray

    def __post_init__(self) -> None:
        super().__post_init__()
        _int(self.bits, "bits", MIN_BITS, MAX_BITS)
        v = self.values
        if not isinstance(v, np.ndarray) or v.dtype != np.uint32 or v.ndim != 1:
            raise TypeError("values must be a 1-D uint32 array")
        if v.size and int(v.max()) >> self.bits:
            raise ValueError(f"values must lie below 2**{self.bits}")


@dataclass(frozen=True, kw_only=True)
class SecureUnmask(_Stage):
    """Stage 4 (coordinator): the devices whose vectors are in the sum, and those that dropped."""

    KIND: ClassVar[Kind] = Kind.SECURE_UNMASK
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("survivors", "dropped"):
            ids = getattr(self, name)
            if type(ids) is not tuple or len(set(ids)) != len(ids) or len(ids) > 1_000_000:
                raise ValueError(f"{name} must be a tuple of distinct device ids")
            for device in ids:
                validate_id(device, name)
        if set(self.survivors) & set(self.dropped):
            raise ValueError("a device cannot both survive and drop")


@dataclass(frozen=True, kw_only=True)
class SecureReveal(_Stage):
    """Stage 4 (device): neighbour -> one share (of its self-mask seed if it survived, of its mask
    key if it dropped)."""

    KIND: ClassVar[Kind] = Kind.SECURE_REVEAL
    shares: dict[str, bytes]

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "shares", _peer_blobs(self.shares, "shares", MAX_SHARE))


SecureMessage = Union[SecureKeys, SecureNeighbours, SecureShares, SecureInbox, SecureMasked, SecureUnmask,
                      SecureReveal]
SECURE_UPLINKS = (SecureKeys, SecureShares, SecureMasked, SecureReveal)
SECURE_DOWNLINKS = (SecureNeighbours, SecureInbox, SecureUnmask)
