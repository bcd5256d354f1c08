"""Golden wire vectors: stored bytes must still decode to the stored summary and re-encode byte
for byte. A failure here means the wire format changed: bump the schema version, then
regenerate with ``.venv/bin/python -m tests.protocol.test_vectors``, which writes the current
minor's group vectors and leaves the older files alone: the current reader still decodes them.

``valid.json`` (with ``invalid.json``) pins schema 1.1: every message kind, tasks and releases
signed only. ``group.json`` pins 1.2: tasks and releases encrypted under the federation key, and
the key grant that carries it to a member; ``group_1_3.json`` the same at 1.3, whose task has
no class-loss medians; ``group_1_4.json`` the same at 1.4, plus sealed statuses with and without
the release and epsilon left that 1.4 added (and invalid ones, to the coordinator);
``group_1_5.json`` the same at 1.5, plus a task asking for int8 updates without error feedback
whose weights are the change since the previous round's (and tasks with a bad or missing key);
``group_1_6.json`` the same at 1.6, plus a task for a factory's regression model with arguments,
package, tensor digests and AdamW (and tasks with a nested argument, an unknown task kind or
optimizer, or no arguments key); ``group_1_7.json`` the same at 1.7, plus a task for a round under
secure aggregation and one message of each of its seven stages (uplinks sealed, downlinks encrypted). A body of an older minor must decode to its
stored summary less the fields removed since (``VESTIGES``) and with the fields added since at
what its sender meant (``ADDITIONS``), and re-encode to its bytes with those keys at that value.
``valid.json`` and ``invalid.json`` are no longer generated: this build's encoder cannot write a
1.1 task (its generator is in the history before schema 1.3).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedprune.protocol import codec, crypto
from fedprune.protocol.channel import AgentChannel, CoordinatorChannel
from fedprune.protocol.chunks import split
from fedprune.protocol.crypto import GroupKey, Identity
from fedprune.protocol.envelope import (
    COORDINATOR, MINOR, Header, Suite, decrypt_broadcast, encrypt_broadcast, open_envelope, parse_header,
    sign_envelope, unwrap_group_key, verify_envelope,
)
from fedprune.protocol.errors import ProtocolError
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.messages import KeyGrant, Kind, State, Status
from fedprune.protocol.layout import ModelLayout, TensorSpec
from fedprune.protocol.secure_messages import (
    SECURE_UPLINKS, SecureInbox, SecureKeys, SecureMasked, SecureNeighbours, SecureReveal, SecureShares, SecureUnmask,
)
from fedprune.protocol.secure_setup import SecureSetup
from fedprune.protocol.sparse import MaskStore, SparseParams, ValueDtype
from tests.protocol.factories import rewrite_meta

VECTORS = Path(__file__).parent / "vectors"
VALID = VECTORS / "valid.json"
INVALID = VECTORS / "invalid.json"
GROUP_SINCE_MINOR = 2
# Body keys whose field a later minor removed: (kind, meta key, message field). They stay on the
# wire, written nil, so a body re-encodes with them nil.
VESTIGES = ((Kind.TASK, "clm", "class_loss_medians"),)
# Body keys a later minor added: (kind, meta key, message field, minor, wire value, summary value);
# a dotted key or field is nested (``hp.optimizer`` in the meta's ``hp`` map, ``model.args`` in the
# summary's ``model``). An older body lacks them, decodes with the field at what its sender meant
# (the summary value), and re-encodes with the key at the wire value (appended, in this order).
ADDITIONS = ((Kind.STATUS, "rel", "release", 4, None, None), (Kind.STATUS, "eps", "epsilon_left", 4, None, None),
             (Kind.TASK, "uv", "update_values", 5, int(ValueDtype.FLOAT32), int(ValueDtype.FLOAT32)),
             (Kind.TASK, "ef", "error_feedback", 5, True, True), (Kind.TASK, "base", "base_round", 5, None, None),
             (Kind.TASK, "hp.optimizer", "hyper.optimizer", 6, "sgd", "sgd"),
             (Kind.TASK, "margs", "model.args", 6, {}, []), (Kind.TASK, "kind", "model.task", 6, "classification",
                                                              "classification"),
             (Kind.TASK, "pkg", "model.package", 6, "", ""),
             (Kind.TASK, "tdig", "model.tensor_digests", 6, b"", hashlib.sha256(b"").hexdigest()),
             (Kind.TASK, "tbin", "target_edges", 6, [], []), (Kind.TASK, "sec", "secure", 7, None, None))


def _put(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        tree = tree[key]
    tree[leaf] = value


def group_file(minor: int) -> Path:
    """The encrypted-broadcast vectors of schema 1.<minor> (1.2's predate the suffix)."""
    return VECTORS / ("group.json" if minor == GROUP_SINCE_MINOR else f"group_1_{minor}.json")


def assert_current_reading(h: Header, msg, summary: dict, body: bytes, encoded: bytes, name: str) -> None:
    """``msg`` decoded from ``body`` (schema 1.<h.minor>) is the stored ``summary`` and re-encodes to
    ``body``, both less the fields later minors removed and plus those they added (their keys
    re-encode at the value the added field reads: what the older sender meant)."""
    gone = [(key, field, None, None) for kind, key, field in VESTIGES if kind is h.kind]
    added = [(key, field, wire, read) for kind, key, field, since, wire, read in ADDITIONS
             if kind is h.kind and h.minor < since]
    expected_summary = copy.deepcopy({k: v for k, v in summary.items() if k not in {f for _, f, _, _ in gone}})
    for _, field, _, read in added:
        _put(expected_summary, field, read)
    assert summarize(msg) == expected_summary, name
    keys = gone + added
    expected = (rewrite_meta(body, lambda meta: [_put(meta, key, wire) for key, _, wire, _ in keys]) if keys
                else bytes(body))
    assert encoded == expected, name


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
        dtype = ValueDtype(entry.get("value_dtype", 0))
        base = _decode(valid, valid["messages"][entry["masks_from"]])[1].masks if entry.get("masks_from") else None
        encoded = codec.encode_body(msg, value_dtype=dtype, base_masks=base)
        assert_current_reading(h, msg, entry["summary"], body, encoded, name)
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


def _group_key(pair) -> GroupKey:
    return GroupKey(bytes.fromhex(pair[0]), bytes.fromhex(pair[1]))


@pytest.mark.parametrize("minor", range(GROUP_SINCE_MINOR, MINOR + 1))
def test_group_vectors_decrypt_to_their_summary_and_re_encrypt_byte_for_byte(valid, minor):
    doc = _load(group_file(minor))
    ids = identities(valid["keys"])
    coordinator = ids["coordinator"]
    layout = layout_of(valid["layout"])
    key = _group_key(doc["group_key"])
    store = MaskStore()
    for name, entry in doc["messages"].items():
        envelope = bytes.fromhex(entry["envelope"])
        h, n = parse_header(envelope)
        assert h.minor == minor and (h.sender == COORDINATOR) != h.suite.sealed, name
        if h.suite is Suite.GROUP_AES256_GCM:
            body = decrypt_broadcast(envelope, n, coordinator.public, {key.key_id: key}.get)
            assert encrypt_broadcast(h, body, key, coordinator) == envelope, name
            assert envelope[n : n + crypto.KEY_ID_LEN] == key.key_id, name
        elif h.suite.sealed:  # an uplink (since 1.4: statuses), sealed with a fixed ephemeral key
            body = open_envelope(envelope, h, n, coordinator, ids[h.sender].public)
            assert _envelope(h, body, ids, entry["ephemeral"]) == envelope, name
        else:
            body = bytes(verify_envelope(envelope, n, coordinator.public))
        msg = codec.decode_body(h, body, layout_for=lambda _m: layout, masks=store)
        assert_current_reading(h, msg, entry["summary"], body, codec.encode_body(msg), name)
        if h.kind is Kind.KEY:  # the wrap: the uplink seal, coordinator -> device, bound to the grant's header
            device = ids[msg.device]
            assert unwrap_group_key(h.pack(), msg.key_id, msg.wrapped, device, coordinator.public) == key
            eph = X25519PrivateKey.from_private_bytes(bytes.fromhex(entry["ephemeral"]))
            assert crypto.seal(coordinator, device.public, key.secret, context=h.pack(), aad=h.pack() + key.key_id,
                               ephemeral=eph) == msg.wrapped


@pytest.mark.parametrize("minor", range(GROUP_SINCE_MINOR, MINOR + 1))
def test_invalid_group_vectors_fail_with_their_documented_reason(valid, minor):
    doc = _load(group_file(minor))
    ids = identities(valid["keys"])
    layout = layout_of(valid["layout"])
    for case in doc["cases"]:
        if case.get("to") == "coordinator":
            channel = CoordinatorChannel(federation=valid["federation"], identity=ids["coordinator"],
                                         devices={d: i.public for d, i in ids.items()}, layout=layout)
        else:
            channel = AgentChannel(federation=valid["federation"], device="dev-a", identity=ids["dev-a"],
                                   coordinator=ids["coordinator"].public, layout=layout)
            channel.group_keys.put(_group_key(doc["group_key"]))
        with pytest.raises(ProtocolError) as err:
            channel.receive(case["topic"], bytes.fromhex(case["payload"]), case["now"])
        assert err.value.reason == case["reason"], case["name"]


def generate_group() -> None:  # pragma: no cover - run by hand after a deliberate version bump
    """Write this build's minor's group vectors; those of older minors stay as they were."""
    from tests.protocol import factories as f

    rng = np.random.default_rng(2027)
    key = GroupKey(bytes.fromhex("a1a2a3a4a5a6a7a8"), bytes(range(64, 96)))
    other = GroupKey(bytes.fromhex("b1b2b3b4b5b6b7b8"), bytes(range(96, 128)))
    eph_hex = bytes(range(1, 33)).hex()
    ids = {"coordinator": f.COORD, **f.DEVICES}
    t = f.task(rng)
    statuses = (  # 1.4: release and epsilon left, set and unset
        ("status", Status("dev-a", State.IDLE, 5, "", f.T0 + 3, release=3, epsilon_left=2.75)),
        ("status_unset", Status("dev-a", State.TRAINING, 5, "", f.T0 + 4)),
    )
    messages, envelopes = {}, {}
    # 1.5: the update encoding, and a task whose weights are the change since an earlier task's
    quantised = dataclasses.replace(t, update_values=ValueDtype.INT8, error_feedback=False, base_round=t.round - 1)
    # 1.6: a factory's model with its arguments, task kind, package and tensor digests; AdamW
    own_model = dataclasses.replace(
        t, model=dataclasses.replace(t.model, args={"hidden": [32, 16], "dropout": 0.25, "act": "gelu", "bias": False},
                                     task="regression", package="mypkg 1.2.0", tensor_digests=f.LAYOUT.tensor_digests()),
        hyper=dataclasses.replace(t.hyper, optimizer="adamw"), target_edges=((-1.5, 0.0, 2.25), (10.0, 20.0, 40.0), (0.5, 0.75, 1.0)))
    # 1.7: a round under secure aggregation, and one message of each of its stages
    sid = bytes.fromhex("0102030405060708")
    secure = dataclasses.replace(t, secure=SecureSetup(sid, 16, 4, 3, 0.8))
    head = {"round": 5, "device": "dev-a", "session": sid}
    stages = (
        ("secure_keys", SecureKeys(**head, share_public=bytes(range(32)), mask_public=bytes(range(32, 64)),
                                   seed_commitment=bytes(range(128, 160)), noise_multiplier=0.8, n_examples=40, class_losses={0: (0.5, 10), 2: (1.25, 30)}, max_abs=0.03,
                                   metrics={"train_loss": 0.7})),
        ("secure_neighbours", SecureNeighbours(**head, weight=0.125, max_weight=0.25, value_range=0.5, scale=8192.0,
                                               keys={"dev-b": (bytes(range(64, 96)), bytes(range(96, 128)))})),
        ("secure_shares", SecureShares(**head, ciphertexts={"dev-b": bytes(range(152))})),
        ("secure_inbox", SecureInbox(**head, ciphertexts={"dev-b": bytes(range(100, 252))})),
        ("secure_masked", SecureMasked(**head, bits=12, values=rng.integers(0, 2**12, 301, dtype=np.uint32))),
        ("secure_unmask", SecureUnmask(**head, survivors=("dev-a", "dev-b"), dropped=("dev-c",))),
        ("secure_reveal", SecureReveal(**head, shares={"dev-b": bytes(range(68))})),
    )
    for i, (name, msg) in enumerate((("task", t), ("release", f.release()), ("key_grant", None), *statuses,
                                     ("task_int8_change", quantised), ("task_own_model", own_model),
                                     ("task_secure", secure), *stages)):
        seq, sent_at = 1_900_000_000_000_000 + i, f.T0 + i
        if isinstance(msg, (Status, *SECURE_UPLINKS)):
            h = Header(msg.KIND, Suite.SEALED_AES256_GCM, f.FED, msg.device, 5, seq, sent_at)
            env = _envelope(h, codec.encode_body(msg), ids, eph_hex)
        elif msg is None:
            h = Header(Kind.KEY, Suite.SIGNED_ED25519, f.FED, COORDINATOR, 5, seq, sent_at)
            eph = X25519PrivateKey.from_private_bytes(bytes.fromhex(eph_hex))
            wrapped = crypto.seal(f.COORD, f.DEVICES["dev-a"].public, key.secret, context=h.pack(),
                                  aad=h.pack() + key.key_id, ephemeral=eph)
            msg = KeyGrant("dev-a", key.key_id, wrapped)
            env = sign_envelope(h, codec.encode_body(msg), f.COORD)
        else:
            h = Header(msg.KIND, Suite.GROUP_AES256_GCM, f.FED, COORDINATOR, 5, seq, sent_at)
            env = encrypt_broadcast(h, codec.encode_body(msg), key, f.COORD)
        store = MaskStore()
        decoded = codec.decode_body(h, codec.encode_body(msg), layout_for=lambda _m: f.LAYOUT, masks=store)
        messages[name] = {"envelope": env.hex(), "summary": summarize(decoded)}
        if name == "key_grant" or isinstance(msg, (Status, *SECURE_UPLINKS)):
            messages[name]["ephemeral"] = eph_hex
        envelopes[name] = env

    def chunk(env: bytes) -> str:
        return split(env, transfer_id=1)[0].hex()

    task_env = envelopes["task"]
    n = parse_header(task_env)[1]
    swapped = task_env[:n] + other.key_id + task_env[n + crypto.KEY_ID_LEN :]
    h = parse_header(task_env)[0]
    under_other = encrypt_broadcast(h, codec.encode_body(t), other, f.COORD)
    legacy = sign_envelope(Header(h.kind, Suite.SIGNED_ED25519, h.federation, h.sender, h.round, h.seq, h.sent_at),
                           codec.encode_body(t), f.COORD)
    task_topic, inbox_a, inbox_b = f"fedprune/v1/{f.FED}/task", f"fedprune/v1/{f.FED}/inbox/dev-a", f"fedprune/v1/{f.FED}/inbox/dev-b"
    status_topic = f"fedprune/v1/{f.FED}/status/dev-a"

    def status_with(i: int, edit) -> str:
        """The first status's body with its meta edited, sealed by dev-a at this minor (a fresh seq)."""
        h = Header(Kind.STATUS, Suite.SEALED_AES256_GCM, f.FED, "dev-a", 5, 1_900_000_000_000_100 + i, f.T0 + 3)
        return chunk(_envelope(h, rewrite_meta(codec.encode_body(statuses[0][1]), edit), ids, eph_hex))

    def task_with(i: int, edit) -> str:
        """The task's body with its meta edited, encrypted at this minor (a fresh seq)."""
        h = Header(Kind.TASK, Suite.GROUP_AES256_GCM, f.FED, COORDINATOR, 5, 1_900_000_000_000_200 + i, f.T0 + 3)
        return chunk(encrypt_broadcast(h, rewrite_meta(codec.encode_body(t), edit), key, f.COORD))

    cases = [
        ("task_unknown_update_values", task_topic, task_with(0, lambda m: m.__setitem__("uv", 7)), "decode"),
        (f"task_without_ef_at_minor_{MINOR}", task_topic, task_with(1, lambda m: m.pop("ef")), "decode"),
        ("task_base_round_not_before_it", task_topic, task_with(2, lambda m: m.__setitem__("base", t.round)), "decode"),
        ("task_nested_model_argument", task_topic, task_with(3, lambda m: m.__setitem__("margs", {"a": {"b": 1}})), "decode"),
        ("task_unknown_task_kind", task_topic, task_with(4, lambda m: m.__setitem__("kind", "ranking")), "decode"),
        ("task_unknown_optimizer", task_topic, task_with(5, lambda m: m["hp"].__setitem__("optimizer", "lbfgs")), "decode"),
        (f"task_without_margs_at_minor_{MINOR}", task_topic, task_with(6, lambda m: m.pop("margs")), "decode"),
        ("task_descending_target_edges", task_topic, task_with(7, lambda m: m.__setitem__("tbin", [[2.0, 1.0]])), "decode"),
        ("swapped_key_id", task_topic, chunk(swapped), "bad_signature"),
        ("truncated_ciphertext", task_topic, chunk(task_env[:-100]), "bad_signature"),
        ("key_not_held", task_topic, chunk(under_other), "unknown_key"),
        (f"signed_only_task_at_minor_{MINOR}", task_topic, chunk(legacy), "decode"),
        ("grant_on_another_devices_inbox", inbox_b, chunk(envelopes["key_grant"]), "decode"),
        ("grant_as_a_task", task_topic, chunk(envelopes["key_grant"]), "decode"),
        ("task_on_an_inbox", inbox_a, chunk(task_env), "decode"),
    ]
    to_coordinator = [
        ("status_negative_epsilon_left", status_topic, status_with(0, lambda m: m.__setitem__("eps", -0.5)), "decode"),
        ("status_nan_epsilon_left", status_topic, status_with(1, lambda m: m.__setitem__("eps", float("nan"))), "decode"),
        ("status_release_over_u32", status_topic, status_with(2, lambda m: m.__setitem__("rel", 2**32)), "decode"),
        (f"status_without_rel_at_minor_{MINOR}", status_topic, status_with(3, lambda m: m.pop("rel")), "decode"),
        (f"status_unknown_key_at_minor_{MINOR}", status_topic, status_with(4, lambda m: m.__setitem__("x", 1)), "decode"),
    ]
    doc = {
        "comment": f"fedprune wire vectors, schema 1.{MINOR} (encrypted broadcasts, key grant, sealed statuses); "
                   "keys in valid.json; test keys only",
        "group_key": [key.key_id.hex(), key.secret.hex()],
        "messages": messages,
        "cases": [{"name": c, "topic": tp, "payload": p, "reason": r, "now": f.T0 + 3} for c, tp, p, r in cases]
        + [{"name": c, "topic": tp, "payload": p, "reason": r, "now": f.T0 + 3, "to": "coordinator"}
           for c, tp, p, r in to_coordinator],
    }
    group_file(MINOR).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":  # pragma: no cover
    generate_group()
