"""Deterministic building blocks for the protocol tests: layouts, keys, messages, channels."""

from __future__ import annotations

from typing import Any, Callable

import msgpack
import numpy as np

from fedprune.protocol import codec
from fedprune.protocol.channel import AgentChannel, CoordinatorChannel
from fedprune.protocol.crypto import GroupKey, Identity
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.layout import ModelLayout, TensorSpec
from fedprune.protocol.messages import ModelRef, ModelRelease, Register, Reject, RoundTask, State, Status, Update
from fedprune.protocol.sparse import Masks, MaskStore, Params, SparseParams

FED = "fed-1"
T0 = 1_800_000_000.0
MODEL = ModelRef("mlp", (12,), 3)
LAYOUT = ModelLayout(
    (
        TensorSpec("fc1.weight", (16, 12), masked=True),
        TensorSpec("fc1.bias", (16,), masked=False),
        TensorSpec("bn.running_mean", (16,), masked=False, trainable=False),
        TensorSpec("fc2.weight", (3, 16), masked=True),
        TensorSpec("fc2.bias", (3,), masked=False),
    )
)
TRAINABLE = ModelLayout(LAYOUT.trainable)


def identity(seed: int) -> Identity:
    """A fixed identity per seed, so vectors and tests are reproducible."""
    raw = np.random.default_rng(seed).bytes(64)
    return Identity.from_raw(raw[:32], raw[32:])


COORD = identity(1)
DEVICES = {"dev-a": identity(2), "dev-b": identity(3)}
GROUP = GroupKey(bytes(range(8)), bytes(range(100, 132)))  # the federation key both devices were granted


def masks(rng: np.random.Generator, density: float = 0.3, layout: ModelLayout = LAYOUT) -> Masks:
    return {s.name: rng.random(s.shape) < density for s in layout.masked}


def params(rng: np.random.Generator, m: Masks, layout: ModelLayout = LAYOUT) -> Params:
    out = {}
    for s in layout:
        arr = rng.standard_normal(s.shape).astype(np.float32)
        out[s.name] = np.where(m[s.name], arr, np.float32(0)) if s.masked else arr
    return out


def task(rng: np.random.Generator, round_: int = 5, mask_version: int = 2, include_masks: bool = True, m: Masks | None = None) -> RoundTask:
    m = masks(rng) if m is None else m
    return RoundTask(
        federation=FED, round=round_, mask_version=mask_version, model=MODEL,
        weights=SparseParams.from_dense(LAYOUT, params(rng, m), m),
        hyper=HyperParams(epochs=1, lr=0.1, readjust=True, prune_fraction=0.2),
        deadline=T0 + 60, selected=("dev-a", "dev-b"), include_masks=include_masks,
    )


def split_body(body: bytes | memoryview) -> tuple[Any, bytes]:
    """A framed body's msgpack meta (parsed, no limits: our own bytes) and its tensor tail."""
    n = int.from_bytes(body[:4], "big")
    return msgpack.unpackb(body[4 : 4 + n], raw=False), bytes(body[4 + n :])


def join_body(meta: Any, tail: bytes) -> bytes:
    head = msgpack.packb(meta, use_bin_type=True)
    return len(head).to_bytes(4, "big") + head + tail


def rewrite_meta(body: bytes | memoryview, edit: Callable[[dict], object]) -> bytes:
    """A framed body with its meta changed in place by ``edit``, tail untouched: what another
    version of the sender would have written (msgpack re-packs the rest byte for byte)."""
    meta, tail = split_body(body)
    edit(meta)
    return join_body(meta, tail)


def task_body_at_minor_6(t: RoundTask) -> bytes:
    """``t`` as a 1.6 coordinator encoded it: without the secure-aggregation key ``sec``."""
    return rewrite_meta(codec.encode_body(t), lambda meta: meta.pop("sec"))


def task_body_at_minor_5(t: RoundTask) -> bytes:
    """``t`` as a 1.5 coordinator encoded it: without the model keys ``margs``, ``kind``, ``pkg``, ``tdig``
    and the optimizer hyper-parameter."""
    def strip(meta: dict) -> None:
        for key in ("margs", "kind", "pkg", "tdig", "tbin", "sec"):
            meta.pop(key)
        meta["hp"].pop("optimizer", None)

    return rewrite_meta(codec.encode_body(t), strip)


def task_body_at_minor_4(t: RoundTask) -> bytes:
    """``t`` as a 1.3 or 1.4 coordinator encoded it: without the keys ``uv``, ``ef`` and ``base``."""
    return rewrite_meta(task_body_at_minor_5(t), lambda meta: (meta.pop("uv"), meta.pop("ef"), meta.pop("base")))


def task_body_at_minor_2(t: RoundTask) -> bytes:
    """``t`` as a 1.1 or 1.2 coordinator encoded it: with the class-loss medians key ``clm``
    (a 1.0 one also left out ``hp``'s ``max_sparse_lr_factor``)."""
    return rewrite_meta(task_body_at_minor_4(t), lambda meta: meta.__setitem__("clm", [[0, 1.5], [2, 0.25]]))


def task_world(rng: np.random.Generator) -> tuple[RoundTask, MaskStore, Masks]:
    """A task, a coordinator-side MaskStore that knows its mask version, and a changed copy of
    that mask (an update with ``new_masks`` travels as a delta against the stored one)."""
    t = task(rng)
    store = MaskStore()
    store.put(t.mask_version, t.masks)
    changed = {k: v.copy() for k, v in t.masks.items()}
    changed["fc2.weight"][0] = True
    return t, store, changed


def update(rng: np.random.Generator, t: RoundTask, device: str = "dev-a", new_masks: Masks | None = None) -> Update:
    m = t.masks if new_masks is None else new_masks
    delta = params(rng, m, TRAINABLE)
    return Update(
        round=t.round, device=device, mask_version=t.mask_version, n_examples=120,
        metrics={"train_loss": 0.5, "steps": 12}, class_losses={0: (1.25, 40), 1: (0.5, 80)},
        delta=SparseParams.from_dense(TRAINABLE, delta, m), mask_changed=new_masks is not None,
        buffers={"bn.running_mean": rng.standard_normal(16).astype(np.float32)},
    )


def register(device: str = "dev-a") -> Register:
    return Register(device, 4, 2048, "none", 120, "0.1.0", cached_mask_version=2)


def status(device: str = "dev-a", state: State = State.TRAINING, now: float = T0) -> Status:
    return Status(device, state, 5, "", now)


def release() -> ModelRelease:
    return ModelRelease.of(3, b"\x08\x07onnx-bytes" * 50, {"accuracy": 0.91, "round": 40, "model": "mlp"})


def reject(device: str = "dev-a") -> Reject:
    return Reject(5, device, "late", "deadline passed")


def coordinator_channel(**kw) -> CoordinatorChannel:
    """A coordinator whose federation key is ``GROUP``, already granted to both devices."""
    channel = CoordinatorChannel(
        federation=FED, identity=COORD, devices={d: i.public for d, i in DEVICES.items()}, layout=LAYOUT, **kw
    )
    channel.rekey({d: i.public for d, i in DEVICES.items()}, T0, key=GROUP)
    return channel


def agent_channel(device: str = "dev-a", **kw) -> AgentChannel:
    """A device that holds ``GROUP`` (as if its grant had arrived)."""
    channel = AgentChannel(
        federation=FED, device=device, identity=DEVICES[device], coordinator=COORD.public, layout=LAYOUT, **kw
    )
    channel.group_keys.put(GROUP)
    return channel


def deliver(channel, publications, now: float):
    """Feed publications to a channel; the messages that completed."""
    out = [channel.receive(p.topic, p.payload, now) for p in publications]
    return [m for m in out if m is not None]


def assert_sparse_equal(a: SparseParams, b: SparseParams) -> None:
    assert a.layout == b.layout
    for name in a.masks:
        np.testing.assert_array_equal(a.masks[name], b.masks[name])
    for name in a.values:
        assert a.values[name].tobytes() == b.values[name].tobytes(), name
