"""Message bodies <-> bytes, under ``Limits``, with exact types on every field.

A body is ``u32 meta length | msgpack meta | tensor tail`` (see ``wire.frame``): the meta is a
msgpack map with short keys (one schema per ``Kind`` below); tensors are listed in the meta as
per-tensor ``[dtype, byte length]`` in layout order, never by name, and their bytes follow in
the tail, so a decoder views them in place instead of copying. The layout fingerprint in the
meta proves both sides mean the same tensors. A newer minor version may add keys, which an
older reader ignores; at the same minor an unknown key is an error. A key the model no longer
has stays on the wire, written empty and ignored, until the next major: older readers require it.

``decode_body`` is the decoder's one entry point: whatever goes wrong inside it (msgpack, numpy,
a validating constructor) leaves as a ``ProtocolError`` subclass, never anything else.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable

import numpy as np

from fedprune.protocol.envelope import MINOR, Header
from fedprune.protocol.errors import DecodeError, LayoutMismatch, ProtocolError, TooLarge
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.layout import ModelLayout
from fedprune.protocol.model_args import MAX_ARGS
from fedprune.protocol.crypto import KEY_ID_LEN
from fedprune.protocol.messages import (
    WRAPPED_KEY_LEN, KeyGrant, Kind, Message, ModelRef, ModelRelease, Register, Reject, RoundTask, State, Status, Update,
)
from fedprune.protocol import secure_codec
from fedprune.protocol.secure_messages import SECURE_DOWNLINKS, SECURE_UPLINKS, SecureMessage
from fedprune.protocol.secure_setup import SESSION_LEN, SecureSetup
from fedprune.protocol.sparse import MaskStore, SparseParams, ValueDtype, masks_from_wire, masks_to_wire, values_from_wire
from fedprune.protocol.wire import (
    DEFAULT_LIMITS,
    Limits,
    as_bytes,
    as_float,
    as_int,
    as_list,
    as_map,
    as_str,
    TailReader,
    TailWriter,
    construct,
    fail,
    frame,
    unframe,
)

LayoutFor = Callable[[ModelRef], ModelLayout]
_HP_TYPES = {f.name: {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)] for f in fields(HyperParams)}
# Hyper-parameters added after minor 0, by the minor that added them: a sender of an older minor
# leaves them out, and the receiver takes the dataclass default (what that sender meant).
_HP_SINCE_MINOR = {"max_sparse_lr_factor": 1, "optimizer": 6}

_TASK_KEYS = frozenset({"fed", "round", "mv", "model", "lfp", "masks", "w", "hp", "deadline", "sel"})
# Status keys added after minor 3, by the minor that added them: a sender of an older minor leaves
# them out and the field reads None; from that minor on the key is required (nil when unset).
_STATUS_KEYS = frozenset({"dev", "state", "round", "reason", "time"})
_STATUS_SINCE_MINOR = {"rel": 4, "eps": 4}
# Task keys added after minor 4, by the minor that added them, with what a sender of an older
# minor meant: float32 updates (it knew no other), error feedback on (moot for float32), full weights.
_TASK_SINCE_MINOR = {"uv": (5, int(ValueDtype.FLOAT32)), "ef": (5, True), "base": (5, None), "tbin": (6, []),
                     "sec": (7, None)}
# Since minor 6 the task's model carries its factory's arguments, task kind, the sender's package
# and per-tensor digests; a 1.5 sender meant a built-in without arguments, classification.
_MODEL_SINCE_MINOR = {"margs": (6, {}), "kind": (6, "classification"), "pkg": (6, ""), "tdig": (6, b"")}
SECURE_TYPES = SECURE_UPLINKS + SECURE_DOWNLINKS
# Task keys without a field since a minor, still written (empty) and required, never read: a 1.2
# agent requires them in every task. Dropped at the next major.
_TASK_VESTIGES = {"clm": None}  # class-loss medians: never set, never read; no field since 1.3


# ------------------------------------------------------------------------------------ encoding


def encode_body(msg: Message | SecureMessage, *, value_dtype: ValueDtype = ValueDtype.FLOAT32, base_masks: dict | None = None) -> bytes:
    """Framed body of ``msg``. ``base_masks``: the mask an Update trained from (for XOR coding)."""
    tail = TailWriter()
    if isinstance(msg, Register):
        obj: dict[str, Any] = {
            "dev": msg.device, "cpu": msg.cpu_count, "ram": msg.ram_mb, "acc": msg.accelerator,
            "n": msg.n_examples, "ver": msg.agent_version, "mv": msg.cached_mask_version,
        }
    elif isinstance(msg, RoundTask):
        obj = {
            "fed": msg.federation, "round": msg.round, "mv": msg.mask_version,
            "model": [msg.model.name, list(msg.model.input_shape), msg.model.num_classes],
            "lfp": msg.layout.fingerprint(),
            "masks": masks_to_wire(msg.layout, msg.masks) if msg.include_masks else None,
            "w": msg.weights.to_wire(value_dtype, tail),
            "hp": {k: _HP_TYPES[k](v) for k, v in msg.hyper.to_dict().items()},
            "deadline": msg.deadline, "sel": list(msg.selected), **_TASK_VESTIGES,
            "uv": int(msg.update_values), "ef": msg.error_feedback, "base": msg.base_round,
            "margs": dict(msg.model.args), "kind": msg.model.task, "pkg": msg.model.package,
            "tdig": msg.model.tensor_digests, "tbin": [list(row) for row in msg.target_edges],
            "sec": None if msg.secure is None else [msg.secure.session, msg.secure.bits, msg.secure.degree,
                                                    msg.secure.threshold, msg.secure.noise_multiplier],
        }
    elif isinstance(msg, Update):
        obj = {
            "round": msg.round, "dev": msg.device, "mv": msg.mask_version, "n": msg.n_examples,
            "metrics": msg.metrics,
            "cl": [[c, m, n] for c, (m, n) in sorted(msg.class_losses.items())],
            "lfp": msg.delta.layout.fingerprint(),
            "mask": masks_to_wire(msg.delta.layout, msg.masks, base_masks) if msg.mask_changed else None,
            "d": msg.delta.to_wire(value_dtype, tail),
            "buf": {name: tail.add(np.ascontiguousarray(a, dtype="<f4").tobytes()) for name, a in msg.buffers.items()},
        }
    elif isinstance(msg, ModelRelease):
        obj = {"ver": msg.version, "sha": msg.sha256, "meta": msg.metadata, "onnx": msg.onnx}
    elif isinstance(msg, Status):
        obj = {"dev": msg.device, "state": msg.state.value, "round": msg.round, "reason": msg.reason, "time": msg.time,
               "rel": msg.release, "eps": msg.epsilon_left}
    elif isinstance(msg, Reject):
        obj = {"round": msg.round, "dev": msg.device, "reason": msg.reason, "detail": msg.detail}
    elif isinstance(msg, KeyGrant):
        obj = {"dev": msg.device, "kid": msg.key_id, "wk": msg.wrapped}
    elif msg.KIND in secure_codec.SECURE_KINDS:
        obj = secure_codec.encode(msg, tail)
    else:
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    return frame(obj, tail)


# ------------------------------------------------------------------------------------ decoding


def decode_body(
    header: Header,
    body: bytes | memoryview,
    *,
    limits: Limits = DEFAULT_LIMITS,
    layout_for: LayoutFor | None = None,
    masks: MaskStore | None = None,
) -> Message:
    """Decode and validate the body that ``header`` announced.

    ``layout_for`` resolves a task's model (or, for updates, is called with None: the
    coordinator's one model); ``masks`` supplies mask versions omitted from the wire. Pure:
    storing a task's masks is the caller's decision, made after authentication.
    """
    try:
        what = f"{header.kind.name.lower()} body"
        obj, tail = unframe(body, limits, what)
        if header.kind in secure_codec.SECURE_KINDS:
            msg = secure_codec.decode(header.kind, obj, header.minor > MINOR, limits, tail)
        else:
            decoder = _DECODERS[header.kind]
            msg = decoder(obj, header.minor, limits, layout_for, masks if masks is not None else MaskStore(), tail)
        tail.finish(what)
        _check_matches_header(msg, header)
        return msg
    except ProtocolError:
        raise
    except MemoryError:
        raise TooLarge(f"{header.kind.name.lower()} body needs more memory than allowed") from None
    except Exception as exc:  # the one translation point: nothing but ProtocolError leaves a decoder
        raise DecodeError(f"{header.kind.name.lower()} body: {type(exc).__name__}: {str(exc)[:160]}") from None


def _check_matches_header(msg: Message, header: Header) -> None:
    """The authenticated header and the body must tell the same story (no cut-and-paste)."""
    device = getattr(msg, "device", None)
    if header.sender and device != header.sender:
        raise DecodeError(f"body names device {device!r} but the envelope was sent by {header.sender!r}")
    rnd = getattr(msg, "round", None)
    if rnd is not None and isinstance(msg, (RoundTask, Update, Reject, *SECURE_TYPES)) and rnd != header.round:
        raise DecodeError(f"body is for round {rnd} but the envelope says round {header.round}")
    if isinstance(msg, RoundTask) and msg.federation != header.federation:
        raise DecodeError(f"task for federation {msg.federation!r} arrived in {header.federation!r}")
    if header.last_will and not (isinstance(msg, Status) and msg.state is State.OFFLINE):
        raise DecodeError("the last-will flag is only valid on an offline Status")


def _register(obj: Any, minor: int, limits: Limits, *_: Any) -> Register:
    m = as_map(obj, "register", frozenset({"dev", "cpu", "ram", "acc", "n", "ver", "mv"}), lenient=minor > MINOR)
    mv = m["mv"]
    return construct("register", lambda: Register(
        device=as_str(m["dev"], "device", 64), cpu_count=as_int(m["cpu"], "cpu_count", 1, 65536),
        ram_mb=as_int(m["ram"], "ram_mb", 1, 2**32 - 1), accelerator=as_str(m["acc"], "accelerator", 64),
        n_examples=as_int(m["n"], "n_examples", 0, 2**63 - 1), agent_version=as_str(m["ver"], "agent_version", 64),
        cached_mask_version=None if mv is None else as_int(mv, "cached_mask_version", 0, 2**32 - 1),
    ))


def _layout_checked(
    layout_for: LayoutFor | None, model: ModelRef | None, fingerprint: Any, *, trainable_only: bool = False
) -> ModelLayout:
    if layout_for is None:
        raise DecodeError("no model layout configured to decode tensors")
    try:
        layout = layout_for(model)  # type: ignore[arg-type]
    except (KeyError, ValueError) as exc:
        if model is None:
            raise DecodeError(f"no model layout here: {exc}") from None
        raise LayoutMismatch(f"model {model.name!r} cannot be built here: {exc}",
                             detail=f"cannot build it here: {exc}"[:200]) from None
    covered = layout.trainable_layout if trainable_only else layout
    if as_bytes(fingerprint, "layout fingerprint", 8) != covered.fingerprint():
        detail = covered.first_difference(model.tensor_digests) if model is not None and model.tensor_digests else ""
        raise LayoutMismatch("tensors were encoded for a different model layout (fingerprint mismatch)"
                             + (f": {detail}" if detail else ""), detail=detail)
    return layout


def _model_ref(m: dict, since: dict) -> ModelRef:
    name, shape, ncls = as_list(m["model"], "model", 3, length=3)
    args, kind, package, digests = (m[k] if k in since else default for k, (_, default) in _MODEL_SINCE_MINOR.items())
    if type(args) is not dict or len(args) > MAX_ARGS:
        raise fail("model args", f"a map of at most {MAX_ARGS} entries", args)
    if type(digests) is not bytes or len(digests) > 2 * 4096:
        raise fail("tensor digests", "binary of at most 8192 bytes", digests)
    return construct("model", lambda: ModelRef(
        as_str(name, "model name", 64),
        tuple(as_int(d, "input dimension", 1, 2**32 - 1) for d in as_list(shape, "input_shape", 8)),
        as_int(ncls, "num_classes", 1, 1_000_000),
        args=args, task=as_str(kind, "task kind", 32), package=as_str(package, "package", 128),
        tensor_digests=digests,
    ))


def _task(
    obj: Any, minor: int, limits: Limits, layout_for: LayoutFor | None, store: MaskStore, tail: TailReader
) -> RoundTask:
    since = {k: first for k, (first, _) in (_TASK_SINCE_MINOR | _MODEL_SINCE_MINOR).items() if first <= minor}
    keys = _TASK_KEYS | _TASK_VESTIGES.keys() | since.keys()
    m = as_map(obj, "task", keys, lenient=minor > MINOR)
    uv, ef, base, tbin, sec = (m[k] if k in since else default for k, (_, default) in _TASK_SINCE_MINOR.items())
    if type(ef) is not bool:
        raise fail("task ef", "bool", ef)
    edges = tuple(tuple(as_float(v, "target edge") for v in as_list(row, "target edges", 15))
                  for row in as_list(tbin, "target edges", 256))
    model = _model_ref(m, since)
    round_number = as_int(m["round"], "round", 0, 2**32 - 1)
    selected = tuple(as_str(d, "selected device", 64) for d in as_list(m["sel"], "selected", limits.max_selected))
    try:
        layout = _layout_checked(layout_for, model, m["lfp"])
    except LayoutMismatch as exc:
        raise LayoutMismatch(str(exc), model=model, round=round_number, selected=selected, detail=exc.detail) from None
    if len(layout) > limits.max_tensors:
        raise TooLarge(f"layout of {len(layout)} tensors exceeds max_tensors={limits.max_tensors}")
    mv = as_int(m["mv"], "mask_version", 0, 2**32 - 1)
    included = m["masks"] is not None
    masks = masks_from_wire(m["masks"], layout) if included else store.require(mv)
    weights = SparseParams.from_wire(m["w"], layout, masks, tail)
    hp_keys = {k: t for k, t in _HP_TYPES.items() if _HP_SINCE_MINOR.get(k, 0) <= minor}
    hp_map = as_map(m["hp"], "hyper", frozenset(hp_keys), lenient=minor > MINOR)
    hp = {}
    for key, typ in hp_keys.items():
        if type(hp_map[key]) is not typ:
            raise fail(f"hyper {key}", typ.__name__, hp_map[key])
        hp[key] = hp_map[key]
    return construct("task", lambda: RoundTask(
        federation=as_str(m["fed"], "federation", 64), round=round_number,
        mask_version=mv, model=model, weights=weights, hyper=HyperParams(**hp),
        deadline=as_float(m["deadline"], "deadline"), selected=selected, include_masks=included,
        update_values=ValueDtype(as_int(uv, "update values", 0, len(ValueDtype) - 1)), error_feedback=ef,
        base_round=None if base is None else as_int(base, "base round", 0, 2**32 - 1), target_edges=edges,
        secure=_secure_setup(sec),
    ))


def _secure_setup(sec: Any) -> SecureSetup | None:
    if sec is None:
        return None
    session, bits, degree, threshold, sigma = as_list(sec, "secure setup", 5, length=5)
    return construct("secure setup", lambda: SecureSetup(
        as_bytes(session, "session", SESSION_LEN), as_int(bits, "bits", 0, 64), as_int(degree, "degree", 0, 4096),
        as_int(threshold, "threshold", 0, 4096), as_float(sigma, "noise multiplier")))


def _update(
    obj: Any, minor: int, limits: Limits, layout_for: LayoutFor | None, store: MaskStore, tail: TailReader
) -> Update:
    keys = frozenset({"round", "dev", "mv", "n", "metrics", "cl", "lfp", "mask", "d", "buf"})
    m = as_map(obj, "update", keys, lenient=minor > MINOR)
    full = _layout_checked(layout_for, None, m["lfp"], trainable_only=True)
    trainable = full.trainable_layout
    mv = as_int(m["mv"], "mask_version", 0, 2**32 - 1)
    base = store.get(mv)
    changed = m["mask"] is not None
    if changed:
        masks = masks_from_wire(m["mask"], trainable, base)
    else:
        masks = store.require(mv)
    delta = SparseParams.from_wire(m["d"], trainable, masks, tail)
    metrics_map = m["metrics"]
    if type(metrics_map) is not dict or len(metrics_map) > limits.max_metrics:
        raise fail("metrics", f"a map of at most {limits.max_metrics} entries", metrics_map)
    metrics = {as_str(k, "metric name", 64): as_float(v, f"metric {k}", finite=False) for k, v in metrics_map.items()}
    losses = {}
    for triple in as_list(m["cl"], "class_losses", limits.max_classes):
        c, mean, count = as_list(triple, "class loss", 3, length=3)
        losses[as_int(c, "class", 0, 1_000_000)] = (as_float(mean, "class mean loss"), as_int(count, "class count", 1, 2**63 - 1))
    buf_map = m["buf"]
    names = {s.name for s in full.buffers}
    if type(buf_map) is not dict or set(buf_map) != names:
        raise DecodeError(f"buffers must be exactly {sorted(names)}")
    buffers = {}
    for spec in full.buffers:
        arr = values_from_wire([int(ValueDtype.FLOAT32), buf_map[spec.name]], f"buffer {spec.name}", spec.size, tail)
        buffers[spec.name] = arr.reshape(spec.shape)
    return construct("update", lambda: Update(
        round=as_int(m["round"], "round", 0, 2**32 - 1), device=as_str(m["dev"], "device", 64), mask_version=mv,
        n_examples=as_int(m["n"], "n_examples", 0, 2**63 - 1), metrics=metrics, class_losses=losses,
        delta=delta, mask_changed=changed, buffers=buffers,
    ))


def _release(obj: Any, minor: int, limits: Limits, *_: Any) -> ModelRelease:
    m = as_map(obj, "release", frozenset({"ver", "sha", "meta", "onnx"}), lenient=minor > MINOR)
    meta = m["meta"]
    if type(meta) is not dict or len(meta) > limits.max_metadata:
        raise fail("metadata", f"a map of at most {limits.max_metadata} entries", meta)
    for key, value in meta.items():
        if type(value) not in (str, int, float):
            raise fail(f"metadata {key}", "str, int or float", value)
    return construct("release", lambda: ModelRelease(
        version=as_int(m["ver"], "version", 0, 2**63 - 1), sha256=as_str(m["sha"], "sha256", 64),
        metadata=meta, onnx=as_bytes(m["onnx"], "onnx"),
    ))


def _status(obj: Any, minor: int, limits: Limits, *_: Any) -> Status:
    since = frozenset(k for k, first in _STATUS_SINCE_MINOR.items() if first <= minor)
    m = as_map(obj, "status", _STATUS_KEYS | since, lenient=minor > MINOR)
    rel, eps = (m[k] if k in since else None for k in ("rel", "eps"))
    return construct("status", lambda: Status(
        device=as_str(m["dev"], "device", 64), state=State(as_str(m["state"], "state", 16)),
        round=as_int(m["round"], "round", 0, 2**32 - 1), reason=as_str(m["reason"], "reason", 256),
        time=as_float(m["time"], "time"),
        release=None if rel is None else as_int(rel, "release", 0, 2**32 - 1),
        epsilon_left=None if eps is None else as_float(eps, "epsilon_left"),
    ))


def _reject(obj: Any, minor: int, limits: Limits, *_: Any) -> Reject:
    m = as_map(obj, "reject", frozenset({"round", "dev", "reason", "detail"}), lenient=minor > MINOR)
    return construct("reject", lambda: Reject(
        round=as_int(m["round"], "round", 0, 2**32 - 1), device=as_str(m["dev"], "device", 64),
        reason=as_str(m["reason"], "reason", 64), detail=as_str(m["detail"], "detail", 256),
    ))


def _key(obj: Any, minor: int, limits: Limits, *_: Any) -> KeyGrant:
    m = as_map(obj, "key grant", frozenset({"dev", "kid", "wk"}), lenient=minor > MINOR)
    return construct("key grant", lambda: KeyGrant(
        device=as_str(m["dev"], "device", 64), key_id=as_bytes(m["kid"], "key id", KEY_ID_LEN),
        wrapped=as_bytes(m["wk"], "wrapped key", WRAPPED_KEY_LEN),
    ))


_DECODERS: dict[Kind, Callable[..., Message]] = {
    Kind.REGISTER: _register,
    Kind.TASK: _task,
    Kind.UPDATE: _update,
    Kind.RELEASE: _release,
    Kind.STATUS: _status,
    Kind.REJECT: _reject,
    Kind.KEY: _key,
}
