"""Vectors mod 2**bits: the PRG that expands a seed into a mask, and the fixed-point map from floats.

Arithmetic stays in uint32, whose wrap-around is arithmetic mod 2**32; since 2**bits divides
2**32, masking with 2**bits - 1 at the end gives the sum mod 2**bits whatever came in between.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedprune.protocol.secagg.errors import SecAggError

SEED_LEN = 32
_NONCE = bytes(16)  # ChaCha20's 4-byte counter and 12-byte nonce; every seed is used for one stream


def low_bits(bits: int) -> np.uint32:
    return np.uint32((1 << bits) - 1)


def prg(seed: bytes, count: int, bits: int) -> np.ndarray:
    """``count`` values uniform in [0, 2**bits) as uint32: the ChaCha20 keystream under key ``seed``,
    read as little-endian u32 and cut to ``bits`` (uniform because 2**bits divides 2**32)."""
    if type(seed) is not bytes or len(seed) != SEED_LEN:
        raise SecAggError("bad_key", f"a PRG seed is {SEED_LEN} bytes")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(bytes(4 * count))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32) & low_bits(bits)


def pairwise_mask(own: str, peer: str, seed: bytes, count: int, bits: int) -> np.ndarray:
    """What ``own`` adds for its pair with ``peer``: +prg(seed) if own < peer else -prg(seed), so
    the two ends of a pair cancel in the sum."""
    stream = prg(seed, count, bits)
    return stream if own < peer else (-stream) & low_bits(bits)


def check_vector(vector: np.ndarray, bits: int, length: int | None = None) -> np.ndarray:
    """A 1-D integer vector with values in [0, 2**bits), as a new uint32 array."""
    v = np.asarray(vector)
    if v.ndim != 1 or v.dtype.kind not in "ui":
        raise SecAggError("bad_vector", f"expected a 1-D integer vector, got {v.dtype} of shape {v.shape}")
    if length is not None and v.size != length:
        raise SecAggError("wrong_length", f"expected {length} values, got {v.size}")
    if v.size and (int(v.min()) < 0 or int(v.max()) >> bits):
        raise SecAggError("bad_vector", f"values must lie in [0, 2**{bits})")
    return v.astype(np.uint32)


def to_field(x: np.ndarray, scale: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """x*scale rounded stochastically (up with probability equal to the fraction, so unbiased),
    negatives in two's complement mod 2**bits. The caller picks ``scale`` so that the *sum* over
    devices stays inside [-2**(bits-1), 2**(bits-1)); beyond that it wraps."""
    if not scale > 0:
        raise SecAggError("out_of_range", f"scale={scale}: expected > 0")
    y = np.asarray(x, dtype=np.float64) * scale
    if not np.all(np.abs(y) < 2.0**62):  # also refuses NaN and inf
        raise SecAggError("out_of_range", "x*scale must be finite and below 2**62 in magnitude")
    low = np.floor(y)
    rounded = low.astype(np.int64) + (rng.random(y.shape) < y - low)
    return (rounded & ((1 << bits) - 1)).astype(np.uint32)


def from_field(v: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """The signed reading of ``v`` in [-2**(bits-1), 2**(bits-1)), divided by ``scale``."""
    signed = np.asarray(v).astype(np.int64) & ((1 << bits) - 1)
    signed -= (signed >> (bits - 1)) << bits
    return signed / float(scale)
