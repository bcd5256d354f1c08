"""Golden wire vectors: stored bytes must still decode to the stored summary and re-encode byte
for byte. A failure here means the wire format changed: bump the schema version, then
regenerate with ``.venv/bin/python -m tests.protocol.test_vectors``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import codec, crypto
from protocol.channel import AgentChannel, CoordinatorChannel
from protocol.chunks import split
from protocol.crypto import Identity
from protocol.envelope import (
    COORDINATOR, FLAG_LAST_WILL, Header, Suite, open_envelope, parse_header, sign_envelope, verify_envelope,
)
from protocol.errors import ProtocolError
from protocol.hyperparams import HyperParams
from protocol.layout import ModelLayout, TensorSpec
from protocol.sparse import MaskStore, SparseParams, ValueDtype

VECTORS = Path(__file__).parent / "vectors"
VALID = VECTORS / "valid.json"
INVALID = VECTORS / "invalid.json"


def summarize(value):
    """A JSON-able fingerprint of a decoded message: scalars verbatim, arrays and bytes by SHA-256."""
    if isinstance(value, SparseParams):
        return {"masks": summarize(value.masks), "values": summarize(value.values)}
    if isinstance(value, HyperParams):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: summarize(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        return hashlib.sha256(str(value.dtype).encode() + str(value.shape).encode() + value.tobytes()).hexdigest()
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): summarize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [summarize(v) for v in value]
    return value


def layout_of(spec) -> ModelLayout:
    return ModelLayout(tuple(TensorSpec(n, tuple(s), m, t) for n, s, m, t in spec))


def identities(keys) -> dict[str, Identity]:
    return {name: Identity.from_raw(bytes.fromhex(s), bytes.fromhex(a)) for name, (s, a) in keys.items()}


def _envelope(h: Header, body: bytes, ids, eph_hex: str | None) -> bytes:
    head = h.pack()
    if h.suite is Suite.SIGNED_ED25519:
        return sign_envelope(h, body, ids["coordinator"])
    eph = X25519PrivateKey.from_private_bytes(bytes.fromhex(eph_hex))
    sealed = crypto.seal(ids[h.sender], ids["coordinator"].public, body, context=head, aad=head,
                         aead=crypto.Aead(h.suite.value), ephemeral=eph)
    return head + sealed


def _load(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def valid():
    return _load(VALID)


def _decode(doc, entry):
    ids = identities(doc["keys"])
    layout = layout_of(doc["layout"])
    envelope = bytes.fromhex(entry["envelope"])
    h, n = parse_header(envelope)
    if h.sender == COORDINATOR:
        body = verify_envelope(envelope, n, ids["coordinator"].public)
    else:
        body = open_envelope(envelope, h, n, ids["coordinator"], ids[h.sender].public)
    store = MaskStore()
    if entry.get("masks_from"):
        base = _decode(doc, doc["messages"][entry["masks_from"]])[1]
        store.put(base.mask_version, base.masks)
    return h, codec.decode_body(h, body, layout_for=lambda _m: layout, masks=store), bytes(body), ids


def test_vectors_decode_to_their_summary_and_re_encode_byte_for_byte(valid):
    assert len(valid["messages"]) >= 6
    for name, entry in valid["messages"].items():
        h, msg, body, ids = _decode(valid, entry)
        assert summarize(msg) == entry["summary"], name
        dtype = ValueDtype(entry.get("value_dtype", 0))
        base = _decode(valid, valid["messages"][entry["masks_from"]])[1].masks if entry.get("masks_from") else None
        assert codec.encode_body(msg, value_dtype=dtype, base_masks=base) == body, name
        assert _envelope(h, body, ids, entry.get("ephemeral")).hex() == entry["envelope"], name


def test_invalid_vectors_fail_with_their_documented_reason():
    doc = _load(INVALID)
    valid = _load(VALID)
    ids = identities(valid["keys"])
    layout = layout_of(valid["layout"])
    for case in doc["cases"]:
        if case["to"] == "coordinator":
            channel = CoordinatorChannel(federation=valid["federation"], identity=ids["coordinator"],
                                         devices={d: i.public for d, i in ids.items()}, layout=layout)
        else:
            channel = AgentChannel(federation=valid["federation"], device="dev-a", identity=ids["dev-a"],
                                   coordinator=ids["coordinator"].public, layout=layout)
        with pytest.raises(ProtocolError) as err:
            channel.receive(case["topic"], bytes.fromhex(case["payload"]), case["now"])
        assert err.value.reason == case["reason"], case["name"]


def generate() -> None:  # pragma: no cover - run by hand after a deliberate version bump
    from tests.protocol import factories as f

    rng = np.random.default_rng(2026)
    t = f.task(rng)
    new = {k: v.copy() for k, v in t.masks.items()}
    new["fc2.weight"][1] = True
    keys = {"coordinator": f.COORD, **f.DEVICES}
    plan = {
        "task": (t, t.round, ValueDtype.FLOAT32, None, 0),
        "update": (f.update(rng, t), 5, ValueDtype.FLOAT32, "task", 0),
        "update_int8_new_mask": (f.update(rng, t, new_masks=new), 5, ValueDtype.INT8, "task", 0),
        "register": (f.register(), 0, ValueDtype.FLOAT32, None, 0),
        "status_will": (f.Status("dev-a", f.State.OFFLINE, 5, "connection lost", f.T0), 5, ValueDtype.FLOAT32, None, FLAG_LAST_WILL),
        "release": (f.release(), 5, ValueDtype.FLOAT32, None, 0),
        "reject": (f.reject(), 5, ValueDtype.FLOAT32, None, 0),
    }
    store = MaskStore()
    store.put(t.mask_version, t.masks)
    messages = {}
    for i, (name, (msg, rnd, dtype, masks_from, flags)) in enumerate(plan.items()):
        sender = getattr(msg, "device", "") if msg.KIND in (1, 3, 5) else ""
        suite = Suite.SIGNED_ED25519 if not sender else Suite.SEALED_AES256_GCM
        h = Header(msg.KIND, suite, f.FED, sender, rnd, 1_800_000_000_000_000 + i, f.T0 + i, flags)
        base = t.masks if masks_from else None
        body = codec.encode_body(msg, value_dtype=dtype, base_masks=base)
        env = _envelope(h, body, keys, bytes(range(32)).hex())
        decoded = codec.decode_body(h, body, layout_for=lambda _m: f.LAYOUT, masks=store)  # lossy dtypes
        entry = {"envelope": env.hex(), "summary": summarize(decoded), "value_dtype": int(dtype)}
        if suite.sealed:
            entry["ephemeral"] = bytes(range(32)).hex()
        if masks_from:
            entry["masks_from"] = masks_from
        messages[name] = entry
    doc = {
        "comment": "fedprune wire vectors, schema 1.0; test keys only",
        "federation": f.FED,
        "layout": [[s.name, list(s.shape), s.masked, s.trainable] for s in f.LAYOUT],
        "keys": {k: [x.hex() for x in v.to_raw()] for k, v in keys.items()},
        "messages": messages,
    }
    VECTORS.mkdir(exist_ok=True)
    VALID.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")

    def chunk(env: bytes) -> str:
        return split(env, transfer_id=1)[0].hex()

    reg = bytes.fromhex(messages["register"]["envelope"])
    rej = bytes.fromhex(messages["reject"]["envelope"])
    v2 = bytearray(reg)
    v2[2] = 2
    flipped = bytearray(reg)
    flipped[-1] ^= 1
    forged_sig = bytearray(rej)
    forged_sig[-5] ^= 1
    bad_chunk = bytearray(bytes.fromhex(chunk(reg)))
    bad_chunk[2] = 9
    up, down = "fedprune/v1/fed-1/register/dev-a", "fedprune/v1/fed-1/inbox/dev-a"
    cases = [
        ("unknown_major_version", up, chunk(bytes(v2)), "coordinator", "unsupported_version"),
        ("sealed_byte_flipped", up, chunk(bytes(flipped)), "coordinator", "open_failed"),
        ("signature_byte_flipped", down, chunk(bytes(forged_sig)), "agent", "bad_signature"),
        ("chunk_version_9", up, bytes(bad_chunk).hex(), "coordinator", "unsupported_version"),
        ("bad_magic", up, chunk(b"XX" + reg[2:]), "coordinator", "decode"),
        ("stale_timestamp", up, chunk(reg), "coordinator", "stale"),
        ("wrong_device_topic", "fedprune/v1/fed-1/register/dev-b", chunk(reg), "coordinator", "decode"),
    ]
    INVALID.write_text(json.dumps({"cases": [
        {"name": n, "topic": tp, "payload": p, "to": to, "reason": rs,
         "now": f.T0 + (10_000 if n == "stale_timestamp" else 3)} for n, tp, p, to, rs in cases
    ]}, indent=1) + "\n")


if __name__ == "__main__":  # pragma: no cover
    generate()
