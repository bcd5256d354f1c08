from dataclasses import replace

import numpy as np
import pytest

from fedprune.protocol import codec
from fedprune.protocol.envelope import MINOR, Header, Suite, parse_header
from fedprune.protocol.errors import DecodeError, LayoutMismatch, TooLarge, UnknownMask, UnsupportedVersion
from fedprune.protocol.layout import ModelLayout
from fedprune.protocol.messages import Kind, ModelRelease, Register, Reject, RoundTask, State, Status, Update
from fedprune.protocol.sparse import MaskStore, ValueDtype
from fedprune.protocol.wire import Limits, TailWriter, as_map, frame
from tests.protocol.factories import (
    FED, LAYOUT, MODEL, T0, assert_sparse_equal, register, release, reject, rewrite_meta, status, task,
    split_body, task_body_at_minor_2, task_body_at_minor_4, task_body_at_minor_5, update,
)


def header(kind, sender="", round_=5, minor=MINOR):
    suite = Suite.SIGNED_ED25519 if sender == "" else Suite.SEALED_AES256_GCM
    return Header(kind, suite, FED, sender, round_, 1, T0, 0, minor)


def decode(kind, body, sender="", round_=5, **kw):
    kw.setdefault("layout_for", lambda _model: LAYOUT)
    return codec.decode_body(header(kind, sender, round_), body, **kw)


@pytest.mark.parametrize("msg", [register(), status(), reject(), release()], ids=lambda m: type(m).__name__)
def test_small_messages_round_trip_equal(msg):
    sender = getattr(msg, "device", "") if not isinstance(msg, (Reject, ModelRelease)) else ""
    assert decode(msg.KIND, codec.encode_body(msg), sender) == msg


def test_task_round_trips_and_omitted_masks_come_from_the_store(rng):
    t = task(rng)
    got = decode(Kind.TASK, codec.encode_body(t))
    assert_sparse_equal(got.weights, t.weights)
    assert (got.hyper, got.deadline, got.selected, got.model) == (t.hyper, t.deadline, t.selected, MODEL)
    lean = task(rng, include_masks=False, m=t.masks)
    body = codec.encode_body(lean)
    assert len(body) < len(codec.encode_body(t))
    with pytest.raises(UnknownMask):
        decode(Kind.TASK, body)
    store = MaskStore()
    store.put(t.mask_version, t.masks)
    assert not decode(Kind.TASK, body, masks=store).include_masks


@pytest.mark.parametrize("dtype", list(ValueDtype))
def test_update_round_trips_with_every_value_dtype(rng, dtype):
    t = task(rng)
    store = MaskStore()
    store.put(t.mask_version, t.masks)
    u = update(rng, t)
    got = decode(Kind.UPDATE, codec.encode_body(u, value_dtype=dtype), "dev-a", masks=store)
    assert (got.metrics, got.class_losses, got.n_examples, got.mask_changed) == (u.metrics, u.class_losses, 120, False)
    np.testing.assert_array_equal(got.buffers["bn.running_mean"], u.buffers["bn.running_mean"])
    if dtype == ValueDtype.FLOAT32:
        assert_sparse_equal(got.delta, u.delta)


def test_body_must_agree_with_the_authenticated_header(rng):
    body = codec.encode_body(register("dev-a"))
    with pytest.raises(DecodeError, match="sent by 'dev-b'"):
        decode(Kind.REGISTER, body, "dev-b")
    with pytest.raises(DecodeError, match="round 5 but the envelope says round 6"):
        decode(Kind.REJECT, codec.encode_body(reject()), round_=6)


def _body(**fields):
    return frame(fields, TailWriter())


REG = dict(dev="dev-a", cpu=4, ram=2048, acc="none", n=10, ver="1", mv=None)


@pytest.mark.parametrize(
    "change",
    [
        {"cpu": True}, {"cpu": 4.0}, {"cpu": 0}, {"ram": -1}, {"n": 2**64 - 1}, {"dev": "a/b"}, {"dev": b"dev-a"},
        {"mv": "1"}, {"acc": "x" * 65}, {"extra": 1},
    ],
)
def test_wrong_types_and_ranges_are_decode_errors(change):
    with pytest.raises(DecodeError):
        decode(Kind.REGISTER, _body(**{**REG, **change}), "dev-a")


def test_missing_keys_and_non_maps_are_decode_errors():
    with pytest.raises(DecodeError, match="missing keys"):
        decode(Kind.REGISTER, _body(dev="dev-a"), "dev-a")
    with pytest.raises(DecodeError):
        decode(Kind.REGISTER, frame([1, 2], TailWriter()), "dev-a")
    with pytest.raises(DecodeError, match="unclaimed"):
        decode(Kind.REGISTER, codec.encode_body(register()) + b"x", "dev-a")


def test_a_newer_minor_version_may_add_fields():
    body = _body(**REG, future="ignored")
    got = codec.decode_body(header(Kind.REGISTER, "dev-a", minor=MINOR + 1), body)
    assert got == Register("dev-a", 4, 2048, "none", 10, "1")


def decode_task_at(minor, body):
    return codec.decode_body(header(Kind.TASK, minor=minor), body, layout_for=lambda _m: LAYOUT)


def test_a_minor_0_task_without_the_sparse_lr_factor_means_the_plain_rule(rng):
    t = task(rng)
    old = rewrite_meta(task_body_at_minor_2(t), lambda meta: meta["hp"].pop("max_sparse_lr_factor"))
    assert decode_task_at(0, old).hyper.max_sparse_lr_factor == 1.0
    with pytest.raises(DecodeError, match=r"hyper: missing keys \['max_sparse_lr_factor'\]"):
        decode_task_at(2, old)
    with pytest.raises(DecodeError, match=r"hyper: missing keys \[\], unexpected keys \['max_sparse_lr_factor'\]"):
        decode_task_at(0, task_body_at_minor_2(t))


def test_a_task_names_the_update_encoding_and_its_base_and_a_minor_4_task_means_float32_full(rng):
    t = replace(task(rng), update_values=ValueDtype.INT8, error_feedback=False, base_round=2)
    got = decode_task_at(MINOR, codec.encode_body(t))
    assert (got.update_values, got.error_feedback, got.base_round) == (ValueDtype.INT8, False, 2)
    old = decode_task_at(4, task_body_at_minor_4(t))
    assert (old.update_values, old.error_feedback, old.base_round) == (ValueDtype.FLOAT32, True, None)
    with pytest.raises(DecodeError, match=r"missing keys \['base', 'ef', 'kind', 'margs', 'pkg', 'sec', 'tbin', 'tdig', 'uv'\]"):
        decode_task_at(MINOR, task_body_at_minor_4(t))
    with pytest.raises(DecodeError, match="update values"):
        decode_task_at(MINOR, rewrite_meta(codec.encode_body(t), lambda meta: meta.__setitem__("uv", 7)))
    with pytest.raises(DecodeError, match="task ef"):
        decode_task_at(MINOR, rewrite_meta(codec.encode_body(t), lambda meta: meta.__setitem__("ef", 1)))


def test_a_task_carries_the_factory_arguments_and_a_minor_5_task_means_a_plain_classifier(rng):
    t = task(rng)
    model = replace(t.model, args={"hidden": [32, 16], "dropout": 0.1, "act": "relu", "bias": True},
                    task="regression", package="mypkg 1.2.0", tensor_digests=LAYOUT.tensor_digests())
    got = decode_task_at(MINOR, codec.encode_body(replace(t, model=model)))
    assert got.model == model and dict(got.model.args)["hidden"] == (32, 16)
    edges = ((0.5, 1, 2), (0, 1, 2), (-1, 0, 1))  # regression with 3 targets: 3 edges each
    got = decode_task_at(MINOR, codec.encode_body(replace(t, model=model, target_edges=edges)))
    assert got.target_edges == ((0.5, 1.0, 2.0), (0.0, 1.0, 2.0), (-1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="target_edges"):
        replace(t, target_edges=edges)  # a classifier has no bins
    with pytest.raises(ValueError, match="target_edges"):
        replace(t, model=model, target_edges=edges[:2])  # one row per target
    old = decode_task_at(5, task_body_at_minor_5(replace(t, model=model, target_edges=edges)))
    assert (old.model.args, old.model.task, old.model.package, old.model.tensor_digests) == ((), "classification", "", b"")
    assert old.target_edges == ()
    with pytest.raises(DecodeError, match="model"):
        decode_task_at(MINOR, rewrite_meta(codec.encode_body(t), lambda meta: meta.__setitem__("margs", {"x": {"y": 1}})))
    with pytest.raises(DecodeError, match="task"):
        decode_task_at(MINOR, rewrite_meta(codec.encode_body(t), lambda meta: meta.__setitem__("kind", "ranking")))


def test_a_task_for_another_layout_names_the_first_tensor_that_differs(rng):
    t = task(rng)
    model = replace(t.model, tensor_digests=LAYOUT.tensor_digests())
    body = codec.encode_body(replace(t, model=model))
    other = ModelLayout(tuple(replace(spec, shape=(spec.shape[0] + 1, *spec.shape[1:])) if i == 1 else spec
                              for i, spec in enumerate(LAYOUT)))
    with pytest.raises(LayoutMismatch) as caught:
        codec.decode_body(header(Kind.TASK, minor=MINOR), body, layout_for=lambda _m: other)
    assert caught.value.round == t.round and caught.value.selected == t.selected and caught.value.model == model
    assert caught.value.detail.startswith(f"tensor 1 differs: {other.tensors[1].name}")


def test_the_class_loss_medians_key_stays_on_the_wire_empty_and_is_never_read(rng):
    """RoundTask lost the field in 1.3; 1.2 agents require the key, so it is written nil until the next major."""
    t = task(rng)
    body = codec.encode_body(t)
    assert split_body(body)[0]["clm"] is None
    with_medians = rewrite_meta(body, lambda meta: meta.__setitem__("clm", [[0, 1.5], [2, 0.25]]))
    for minor, legacy in ((1, task_body_at_minor_2(t)), (2, task_body_at_minor_2(t)), (MINOR, with_medians),
                          (MINOR + 1, with_medians)):
        got = decode_task_at(minor, legacy)
        assert_sparse_equal(got.weights, t.weights)
        assert (got.deadline, got.selected) == (t.deadline, t.selected)
    with pytest.raises(DecodeError, match=r"missing keys \['clm'\]"):
        decode_task_at(MINOR, rewrite_meta(body, lambda meta: meta.pop("clm")))


def test_status_state_must_be_in_the_fixed_set():
    body = _body(dev="dev-a", state="dancing", round=1, reason="", time=T0, rel=None, eps=None)
    with pytest.raises(DecodeError, match="dancing"):
        decode(Kind.STATUS, body, "dev-a")


STATUS_1_4 = Status("dev-a", State.IDLE, 5, "", T0, release=7, epsilon_left=1.25)


def decode_status_at(minor, body):
    return codec.decode_body(header(Kind.STATUS, "dev-a", minor=minor), body)


@pytest.mark.parametrize("msg", [STATUS_1_4, status(), Status("dev-a", "online", 0, "", T0, 0, 0)],
                         ids=["both_set", "both_unset", "zeros"])
def test_status_release_and_epsilon_left_round_trip(msg):
    body = codec.encode_body(msg)
    assert {k: split_body(body)[0][k] for k in ("rel", "eps")} == {"rel": msg.release, "eps": msg.epsilon_left}
    got = decode_status_at(MINOR, body)
    assert got == msg and type(got.epsilon_left) is type(msg.epsilon_left)


def test_a_1_3_status_reads_none_at_1_4_and_a_1_3_reader_ignores_the_new_keys():
    """1.4 added rel and eps to Status: required from 1.4 on (nil when unset), absent before."""
    body_1_3 = rewrite_meta(codec.encode_body(STATUS_1_4), lambda meta: [meta.pop("rel"), meta.pop("eps")])
    old = decode_status_at(3, body_1_3)
    assert (old.release, old.epsilon_left) == (None, None)
    assert old == Status("dev-a", State.IDLE, 5, "", T0)
    assert codec.encode_body(old) == rewrite_meta(body_1_3, lambda meta: meta.update(rel=None, eps=None))
    with pytest.raises(DecodeError, match=r"missing keys \['eps', 'rel'\]"):
        decode_status_at(4, body_1_3)  # at 1.4 the keys are required
    with pytest.raises(DecodeError, match=r"unexpected keys \['eps', 'rel'\]"):
        decode_status_at(3, codec.encode_body(STATUS_1_4))  # 1.3 never had them
    # what a 1.3 build does with a 1.4 status: it reads the header's minor as newer, so lenient
    # (as_map(lenient=4 > 3)) with its own keys, and drops the new ones
    meta = split_body(codec.encode_body(STATUS_1_4))[0]
    as_1_3 = as_map(meta, "status", frozenset({"dev", "state", "round", "reason", "time"}), lenient=True)
    assert {k: as_1_3[k] for k in ("dev", "state", "round", "reason", "time")} == {
        "dev": "dev-a", "state": "idle", "round": 5, "reason": "", "time": T0}
    # and this build reading a newer minor's status ignores keys it does not know, but needs rel and eps
    newer = rewrite_meta(codec.encode_body(STATUS_1_4), lambda meta: meta.__setitem__("future", 1))
    assert decode_status_at(MINOR + 1, newer) == STATUS_1_4
    with pytest.raises(DecodeError, match="unexpected keys"):
        decode_status_at(MINOR, newer)


@pytest.mark.parametrize(
    "rel, eps, match",
    [
        (None, -0.5, "epsilon_left"), (None, float("nan"), "epsilon_left"), (None, float("inf"), "epsilon_left"),
        (None, -float("inf"), "epsilon_left"), (None, 1, "epsilon_left"), (None, "1.0", "epsilon_left"),
        (None, True, "epsilon_left"), (2**32, None, "release"), (-1, None, "release"), (1.0, None, "release"),
        (True, None, "release"),
    ],
)
def test_invalid_release_or_epsilon_left_is_refused(rel, eps, match):
    body = rewrite_meta(codec.encode_body(status()), lambda meta: meta.update(rel=rel, eps=eps))
    with pytest.raises(DecodeError, match=match) as err:
        decode_status_at(MINOR, body)
    assert err.value.reason == "decode"
    if type(eps) is not int:  # an int epsilon is fine in our own code (stored as float)
        with pytest.raises((ValueError, TypeError), match=match):
            Status("dev-a", State.IDLE, 5, "", T0, release=rel, epsilon_left=eps)


def test_limits_are_enforced_as_too_large():
    small = Limits(max_str_len=4, max_message_bytes=4096, max_depth=3, max_bin_len=16, max_array_len=4)
    with pytest.raises(TooLarge):
        decode(Kind.REGISTER, codec.encode_body(register()), "dev-a", limits=small)
    with pytest.raises(TooLarge):
        decode(Kind.RELEASE, codec.encode_body(ModelRelease.of(1, b"x" * 5000)), limits=small)
    nested = frame({"a": [[[[1]]]]}, TailWriter())
    with pytest.raises(TooLarge, match="nesting"):
        decode(Kind.REGISTER, nested, "dev-a", limits=small)
    with pytest.raises(ValueError):
        Limits(max_depth=0)


def test_release_digest_is_checked_on_decode():
    body = _body(ver=1, sha="0" * 64, meta={}, onnx=b"abc")
    with pytest.raises(DecodeError, match="sha256"):
        decode(Kind.RELEASE, body)


def test_unknown_major_version_is_refused_with_an_actionable_message():
    raw = bytearray(header(Kind.REGISTER, "dev-a").pack())
    raw[2] = 2
    with pytest.raises(UnsupportedVersion, match="upgrade"):
        parse_header(bytes(raw))


def test_header_round_trips_and_rejects_unknown_flags():
    h = Header(Kind.STATUS, Suite.SEALED_CHACHA20_POLY1305, FED, "dev-a", 7, 2**64 - 1, T0, 1)
    packed = h.pack()
    assert parse_header(packed + b"rest") == (h, len(packed))
    bad = bytearray(packed)
    bad[6] = 0x80
    with pytest.raises(DecodeError, match="flags"):
        parse_header(bytes(bad))


@pytest.mark.parametrize(
    "build",
    [
        lambda: Register("dev a", 1, 1, "", 0, ""),
        lambda: Register("d", True, 1, "", 0, ""),
        lambda: Status("d", "asleep", 0, "", 0.0),
        lambda: Status("d", State.IDLE, 0, "", float("nan")),
        lambda: Reject(0, "d", "not a label"),
        lambda: ModelRelease(1, "00", {}, b""),
        lambda: ModelRelease.of(1, b"", {"k": [1]}),
        lambda: Update(0, "d", 0, 1, {"x": "1"}, {}, None),
    ],
)
def test_building_an_invalid_message_is_a_bug_raised_at_once(build):
    with pytest.raises((ValueError, TypeError)):
        build()


def test_numbers_given_as_ints_are_stored_as_floats(rng):
    s = Status("d", "idle", 0, "", 17, epsilon_left=2)
    assert type(s.time) is float and s.state is State.IDLE
    assert type(s.epsilon_left) is float and s.epsilon_left == 2.0
    assert isinstance(task(rng).deadline, float)


def test_task_validation_refuses_a_bad_selection(rng):
    t = task(rng)
    with pytest.raises(ValueError, match="distinct"):
        RoundTask(FED, 1, 1, MODEL, t.weights, t.hyper, T0, ("a", "a"))
