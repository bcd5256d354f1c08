"""Bodies of the secure-aggregation stages (``secure_messages``) <-> bytes, under ``Limits``.

Same framing as ``codec``: a msgpack meta with short keys, and the one tensor (a masked vector)
in the tail, packed at exactly ``bits`` bits per value: a masked value is uniform over
[0, 2**bits), so no other coding could make it smaller.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedprune.protocol.errors import DecodeError
from fedprune.protocol.messages import Kind
from fedprune.protocol.secure_messages import (
    KEY_LEN, MAX_CIPHERTEXT, MAX_PEERS, MAX_SHARE, SecureInbox, SecureKeys, SecureMasked, SecureMessage,
    SecureNeighbours, SecureReveal, SecureShares, SecureUnmask,
)
from fedprune.protocol.secure_setup import MAX_BITS, SESSION_LEN
from fedprune.protocol.wire import (Limits, TailReader, TailWriter, as_bytes, as_float, as_int, as_list, as_map,
                                    as_str, construct, fail)

_KEYS = {
    Kind.SECURE_KEYS: frozenset({"round", "dev", "sid", "kc", "km", "bc", "nm", "n", "cl", "max", "metrics"}),
    Kind.SECURE_NEIGHBOURS: frozenset({"round", "dev", "sid", "w", "wmax", "range", "scale", "keys"}),
    Kind.SECURE_SHARES: frozenset({"round", "dev", "sid", "ct"}),
    Kind.SECURE_INBOX: frozenset({"round", "dev", "sid", "ct"}),
    Kind.SECURE_MASKED: frozenset({"round", "dev", "sid", "bits", "len", "y"}),
    Kind.SECURE_UNMASK: frozenset({"round", "dev", "sid", "ok", "drop"}),
    Kind.SECURE_REVEAL: frozenset({"round", "dev", "sid", "sh"}),
}
SECURE_KINDS = frozenset(_KEYS)
UNPACK_BLOCK = 1 << 16


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """The low ``bits`` bits of each uint32, back to back (little-endian bit order)."""
    planes = np.unpackbits(values.astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    return np.packbits(planes[:, :bits], bitorder="little").tobytes()


def unpack_bits(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """The inverse of ``pack_bits``, in blocks of ``UNPACK_BLOCK`` values: the bit planes take 32
    bytes a value, so one block at a time keeps a large vector's decoding near its output size."""
    if len(data) != (count * bits + 7) // 8:
        raise DecodeError(f"masked vector: {len(data)} bytes do not hold {count} values of {bits} bits")
    raw = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(count, dtype=np.uint32)
    for start in range(0, count, UNPACK_BLOCK):  # a block of 8 values spans whole bytes
        n = min(UNPACK_BLOCK, count - start)
        chunk = raw[start * bits // 8: (start * bits + n * bits + 7) // 8]
        planes = np.unpackbits(chunk, bitorder="little")[: n * bits].reshape(n, bits)
        full = np.zeros((n, 32), dtype=np.uint8)
        full[:, :bits] = planes
        out[start: start + n] = np.packbits(full, axis=1, bitorder="little").view("<u4").reshape(n)
    return out


def encode(msg: SecureMessage, tail: TailWriter) -> dict[str, Any]:
    obj: dict[str, Any] = {"round": msg.round, "dev": msg.device, "sid": msg.session}
    if isinstance(msg, SecureKeys):
        obj.update(kc=msg.share_public, km=msg.mask_public, bc=msg.seed_commitment, nm=msg.noise_multiplier,
                   n=msg.n_examples, max=msg.max_abs, metrics=msg.metrics,
                   cl=[[c, m, n] for c, (m, n) in sorted(msg.class_losses.items())])
    elif isinstance(msg, SecureNeighbours):
        obj.update(w=msg.weight, wmax=msg.max_weight, range=msg.value_range, scale=msg.scale,
                   keys={d: [c, m] for d, (c, m) in msg.keys.items()})
    elif isinstance(msg, (SecureShares, SecureInbox)):
        obj.update(ct=msg.ciphertexts)
    elif isinstance(msg, SecureMasked):
        obj.update(bits=msg.bits, len=int(msg.values.size), y=tail.add(pack_bits(msg.values, msg.bits)))
    elif isinstance(msg, SecureUnmask):
        obj.update(ok=list(msg.survivors), drop=list(msg.dropped))
    elif isinstance(msg, SecureReveal):
        obj.update(sh=msg.shares)
    else:
        raise TypeError(f"not a secure-aggregation message: {type(msg).__name__}")
    return obj


def decode(kind: Kind, obj: Any, lenient: bool, limits: Limits, tail: TailReader) -> SecureMessage:
    what = kind.name.lower().replace("_", " ")
    m = as_map(obj, what, _KEYS[kind], lenient=lenient)
    head = {"round": as_int(m["round"], "round", 0, 2**32 - 1), "device": as_str(m["dev"], "device", 64),
            "session": as_bytes(m["sid"], "session", SESSION_LEN)}
    if kind is Kind.SECURE_KEYS:
        metrics = m["metrics"]
        if type(metrics) is not dict or len(metrics) > limits.max_metrics:
            raise fail("metrics", f"a map of at most {limits.max_metrics} entries", metrics)
        losses = {}
        for triple in as_list(m["cl"], "class_losses", limits.max_classes):
            c, mean, count = as_list(triple, "class loss", 3, length=3)
            losses[as_int(c, "class", 0, 1_000_000)] = (as_float(mean, "class mean loss"),
                                                        as_int(count, "class count", 1, 2**63 - 1))
        return construct(what, lambda: SecureKeys(
            **head, share_public=as_bytes(m["kc"], "share key", KEY_LEN), mask_public=as_bytes(m["km"], "mask key", KEY_LEN),
            seed_commitment=as_bytes(m["bc"], "seed commitment", KEY_LEN),
            noise_multiplier=as_float(m["nm"], "noise multiplier"),
            n_examples=as_int(m["n"], "n_examples", 0, 2**63 - 1), class_losses=losses,
            max_abs=as_float(m["max"], "max_abs"),
            metrics={as_str(k, "metric name", 64): as_float(v, f"metric {k}") for k, v in metrics.items()}))
    if kind is Kind.SECURE_NEIGHBOURS:
        keys = _peer_map(m["keys"], "keys")
        pairs = {d: tuple(as_bytes(k, "neighbour key", KEY_LEN) for k in as_list(v, "key pair", 2, length=2))
                 for d, v in keys.items()}
        return construct(what, lambda: SecureNeighbours(
            **head, weight=as_float(m["w"], "weight"), max_weight=as_float(m["wmax"], "max weight"),
            value_range=as_float(m["range"], "value range"), scale=as_float(m["scale"], "scale"), keys=pairs))
    if kind in (Kind.SECURE_SHARES, Kind.SECURE_INBOX):
        blobs = {d: as_bytes(v, "ciphertext") for d, v in _peer_map(m["ct"], "ciphertexts").items()}
        cls = SecureShares if kind is Kind.SECURE_SHARES else SecureInbox
        if any(len(b) > MAX_CIPHERTEXT for b in blobs.values()):
            raise fail("ciphertext", f"at most {MAX_CIPHERTEXT} bytes", "longer")
        return construct(what, lambda: cls(**head, ciphertexts=blobs))
    if kind is Kind.SECURE_MASKED:
        bits = as_int(m["bits"], "bits", 8, MAX_BITS)
        count = as_int(m["len"], "length", 0, limits.max_message_bytes * 8 // bits)
        values = unpack_bits(tail.take(as_int(m["y"], "masked bytes", 0, limits.max_message_bytes), "masked vector"),
                             bits, count)
        return construct(what, lambda: SecureMasked(**head, bits=bits, values=values))
    if kind is Kind.SECURE_UNMASK:
        ids = [tuple(as_str(d, "device", 64) for d in as_list(m[k], k, limits.max_selected)) for k in ("ok", "drop")]
        return construct(what, lambda: SecureUnmask(**head, survivors=ids[0], dropped=ids[1]))
    shares = {d: as_bytes(v, "share") for d, v in _peer_map(m["sh"], "shares").items()}
    if any(len(b) > MAX_SHARE for b in shares.values()):
        raise fail("share", f"at most {MAX_SHARE} bytes", "longer")
    return construct(what, lambda: SecureReveal(**head, shares=shares))


def _peer_map(value: Any, what: str) -> dict:
    if type(value) is not dict or len(value) > MAX_PEERS:
        raise fail(what, f"a map of at most {MAX_PEERS} devices", value)
    return value
