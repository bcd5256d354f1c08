"""The seven plain messages of the protocol, as frozen dataclasses validated on construction.

Building an invalid message in our own code is a bug and raises ValueError/TypeError at the
line that did it; the codec runs the same checks on decoded data and turns their failure into
``DecodeError``. Numbers given as ints where a float is meant are stored as floats, so the
wire always carries one type per field.

Sparse tensors travel as ``SparseParams`` (values in mask order plus the mask they refer to);
call ``.to_dense()`` on them (or the ``params()``/``delta_params()`` helpers) for full arrays.

Why one file over 400 lines: these seven types are the contract most readers need, side by side;
the secure-aggregation stages, which only a secure round uses, are in ``secure_messages``.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar, Union

import numpy as np

from fedprune.protocol.crypto import KEY_ID_LEN, KEY_LEN, SEAL_OVERHEAD
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.model_args import TASK_KINDS, ModelArgs, normalise_args, normalise_target_edges
from fedprune.protocol.layout import DIGEST_LEN, ModelLayout
from fedprune.protocol.secure_setup import SecureSetup
from fedprune.protocol.sparse import Masks, Params, SparseParams, ValueDtype
from fedprune.protocol.topics import validate_id

U32 = 2**32 - 1
U63 = 2**63 - 1
LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_TEXT = 256
MAX_METRICS = 64
MAX_METADATA = 256
WRAPPED_KEY_LEN = KEY_LEN + SEAL_OVERHEAD


class Kind(enum.IntEnum):
    """Message type byte in the envelope header."""

    REGISTER = 1
    TASK = 2
    UPDATE = 3
    RELEASE = 4
    STATUS = 5
    REJECT = 6
    KEY = 7
    SECURE_KEYS = 8  # the secure-aggregation stages (protocol/secure_messages.py)
    SECURE_NEIGHBOURS = 9
    SECURE_SHARES = 10
    SECURE_INBOX = 11
    SECURE_MASKED = 12
    SECURE_UNMASK = 13
    SECURE_REVEAL = 14


class State(str, enum.Enum):
    ONLINE = "online"
    IDLE = "idle"
    TRAINING = "training"
    UPLOADING = "uploading"
    DECLINED = "declined"
    OFFLINE = "offline"


def _int(value: object, what: str, lo: int = 0, hi: int = U63) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{what}={value!r}: expected an int in {lo}..{hi}")
    return value


def _float(obj: object, name: str, *, finite: bool = True, lo: float | None = None) -> None:
    """Normalise ``obj.name`` to float in place (ints allowed, bools not)."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r}: expected a number")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    if lo is not None and not value >= lo:
        raise ValueError(f"{name}={value!r}: expected a number >= {lo}")
    object.__setattr__(obj, name, value)


def _text(value: object, what: str, max_len: int = MAX_TEXT) -> str:
    if type(value) is not str or len(value) > max_len or not value.isprintable():
        raise ValueError(f"{what}={value!r:.80}: expected printable text of at most {max_len} characters")
    return value


def _label(value: object, what: str) -> str:
    if type(value) is not str or not LABEL.fullmatch(value):
        raise ValueError(f"{what}={value!r:.80}: expected 1-64 characters from [A-Za-z0-9_.:-]")
    return value


def _metrics(metrics: object) -> dict[str, float]:
    """A report's metrics: at most MAX_METRICS name -> number, as floats."""
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise ValueError(f"metrics must be a dict of at most {MAX_METRICS} name -> float")
    checked = {}
    for name, value in metrics.items():
        _label(name, "metric name")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric {name}={value!r}: expected a number")
        checked[name] = float(value)
    return checked


def _class_losses(class_losses: object) -> dict[int, tuple[float, int]]:
    """Per-class (mean loss of the received model, example count), the loss-quality report."""
    if not isinstance(class_losses, dict):
        raise TypeError("class_losses must be a dict class -> (mean loss, count)")
    losses = {}
    for cls, pair in class_losses.items():
        _int(cls, "class", 0, 1_000_000)
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"class_losses[{cls}]: expected a (mean loss, count) tuple")
        mean, count = pair
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean) or mean < 0:
            raise ValueError(f"class_losses[{cls}] mean={mean!r}: expected a finite number >= 0")
        losses[cls] = (float(mean), _int(count, f"class_losses[{cls}] count", 1, U63))
    return losses


@dataclass(frozen=True)
class ModelRef:
    """Which model to train: a factory's import path (or built-in alias); no code ever travels.
    Since 1.6: ``args`` (``protocol.model_args``), ``task``, the sender's ``package`` ("name version"
    or "") and ``tensor_digests`` of its layout, so a receiver whose layout differs names the first
    tensor that does. A 1.5 sender meant none of these.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    args: ModelArgs = ()
    task: str = "classification"
    package: str = ""
    tensor_digests: bytes = b""

    def __post_init__(self) -> None:
        _label(self.name, "model name")
        if type(self.input_shape) is not tuple or not 1 <= len(self.input_shape) <= 8:
            raise ValueError(f"input_shape={self.input_shape!r}: expected a tuple of 1-8 ints")
        for d in self.input_shape:
            _int(d, "input_shape dimension", 1, U32)
        _int(self.num_classes, "num_classes", 1, 1_000_000)
        object.__setattr__(self, "args", normalise_args(self.args))
        if self.task not in TASK_KINDS:
            raise ValueError(f"task={self.task!r}: expected one of {TASK_KINDS}")
        _text(self.package, "package", 128)
        if type(self.tensor_digests) is not bytes or len(self.tensor_digests) % DIGEST_LEN:
            raise ValueError(f"tensor_digests must be bytes, {DIGEST_LEN} per tensor")


@dataclass(frozen=True)
class Register:
    """A device announcing itself (device -> coordinator, sealed)."""

    KIND: ClassVar[Kind] = Kind.REGISTER
    device: str
    cpu_count: int
    ram_mb: int
    accelerator: str
    n_examples: int
    agent_version: str
    cached_mask_version: int | None = None

    def __post_init__(self) -> None:
        validate_id(self.device, "device")
        _int(self.cpu_count, "cpu_count", 1, 65536)
        _int(self.ram_mb, "ram_mb", 1, U32)
        _text(self.accelerator, "accelerator", 64)
        _int(self.n_examples, "n_examples", 0, U63)
        _text(self.agent_version, "agent_version", 64)
        if self.cached_mask_version is not None:
            _int(self.cached_mask_version, "cached_mask_version", 0, U32)


@dataclass(frozen=True, eq=False)
class RoundTask:
    """Round ``round`` opens: global weights, hyper-parameters, deadline, who is selected.

    ``weights`` covers every tensor of the model layout. ``include_masks=False`` omits the mask
    when every selected device holds ``mask_version``; a receiver fills it in from its cache.

    Since 1.5: ``update_values``, how the devices' update values travel (one encoding for the
    whole federation), and ``error_feedback``, whether a device keeps what that encoding rounded
    off and adds it to its next update; ``base_round``, when set, makes ``weights`` the change
    since the weights of that round's task (zero where this task's mask is off): a device adds it
    to what it holds of that task. A 1.4 sender's task reads float32, feedback on, full weights.
    Since 1.6: ``target_edges``, a regression task's bin edges per target for its group losses.
    Since 1.7: ``secure``, set when the round runs under secure aggregation: the device answers
    with the secure stages (``secure_messages``) instead of an Update.
    """

    KIND: ClassVar[Kind] = Kind.TASK
    federation: str
    round: int
    mask_version: int
    model: ModelRef
    weights: SparseParams
    hyper: HyperParams
    deadline: float
    selected: tuple[str, ...]
    include_masks: bool = True
    update_values: ValueDtype = ValueDtype.FLOAT32
    error_feedback: bool = True
    base_round: int | None = None
    target_edges: tuple[tuple[float, ...], ...] = ()
    secure: SecureSetup | None = None

    def __post_init__(self) -> None:
        validate_id(self.federation, "federation")
        _int(self.round, "round", 0, U32)
        _int(self.mask_version, "mask_version", 0, U32)
        if not isinstance(self.model, ModelRef):
            raise TypeError("model must be a ModelRef")
        if not isinstance(self.weights, SparseParams):
            raise TypeError("weights must be SparseParams (SparseParams.from_dense(layout, params, masks))")
        if not isinstance(self.hyper, HyperParams):
            raise TypeError("hyper must be HyperParams")
        _float(self, "deadline", lo=0.0)
        if type(self.selected) is not tuple or len(set(self.selected)) != len(self.selected):
            raise ValueError("selected must be a tuple of distinct device ids")
        for device in self.selected:
            validate_id(device, "selected device")
        if type(self.include_masks) is not bool:
            raise TypeError("include_masks must be a bool")
        if not isinstance(self.update_values, ValueDtype):
            raise TypeError("update_values must be a ValueDtype")
        if type(self.error_feedback) is not bool:
            raise TypeError("error_feedback must be a bool")
        if self.base_round is not None:
            _int(self.base_round, "base_round", 0, self.round - 1)
        object.__setattr__(self, "target_edges", normalise_target_edges(self.target_edges, self.model.task,
                                                                        self.model.num_classes))
        if self.secure is not None and not isinstance(self.secure, SecureSetup):
            raise TypeError("secure must be a SecureSetup or None")

    @property
    def layout(self) -> ModelLayout:
        return self.weights.layout

    @property
    def masks(self) -> Masks:
        return self.weights.masks

    def params(self) -> Params:
        return self.weights.to_dense()


@dataclass(frozen=True, eq=False)
class Update:
    """A device's result for ``round`` (device -> coordinator, sealed).

    ``delta`` covers the trainable tensors; its masks are the base mask ``mask_version`` when
    ``mask_changed`` is False (then only values travel), or the device's new mask.
    ``class_losses[c] = (mean loss, count)`` of the received global model on local class ``c``.
    """

    KIND: ClassVar[Kind] = Kind.UPDATE
    round: int
    device: str
    mask_version: int
    n_examples: int
    metrics: dict[str, float]
    class_losses: dict[int, tuple[float, int]]
    delta: SparseParams
    mask_changed: bool = False
    buffers: Params = field(default_factory=dict)

    def __post_init__(self) -> None:
        _int(self.round, "round", 0, U32)
        validate_id(self.device, "device")
        _int(self.mask_version, "mask_version", 0, U32)
        _int(self.n_examples, "n_examples", 0, U63)
        object.__setattr__(self, "metrics", _metrics(self.metrics))
        object.__setattr__(self, "class_losses", _class_losses(self.class_losses))
        if not isinstance(self.delta, SparseParams):
            raise TypeError("delta must be SparseParams (SparseParams.from_dense(layout, delta, masks))")
        if any(not spec.trainable for spec in self.delta.layout):
            raise ValueError("delta covers trainable tensors only; buffers go in `buffers`")
        if type(self.mask_changed) is not bool:
            raise TypeError("mask_changed must be a bool")
        if not isinstance(self.buffers, dict):
            raise TypeError("buffers must be a dict name -> float32 array")
        for name, arr in self.buffers.items():
            if type(name) is not str or not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
                raise TypeError(f"buffer {name!r}: expected a name -> float array")
        object.__setattr__(self, "buffers", dict(self.buffers))

    @property
    def masks(self) -> Masks:
        return self.delta.masks

    def delta_params(self) -> Params:
        return self.delta.to_dense()


@dataclass(frozen=True)
class ModelRelease:
    """A released ONNX model (coordinator -> all, signed, retained). Build with ``ModelRelease.of``."""

    KIND: ClassVar[Kind] = Kind.RELEASE
    version: int
    sha256: str
    metadata: dict[str, str | int | float]
    onnx: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _int(self.version, "version", 0, U63)
        if type(self.onnx) is not bytes:
            raise TypeError("onnx must be bytes")
        if self.sha256 != hashlib.sha256(self.onnx).hexdigest():
            raise ValueError("sha256 does not match the onnx bytes (expected lowercase hex of their SHA-256)")
        if not isinstance(self.metadata, dict) or len(self.metadata) > MAX_METADATA:
            raise ValueError(f"metadata must be a dict of at most {MAX_METADATA} entries")
        for key, value in self.metadata.items():
            _label(key, "metadata key")
            if type(value) is str:
                _text(value, f"metadata[{key}]", 1024)
            elif type(value) is int:
                _int(value, f"metadata[{key}]", -U63, U63)
            elif type(value) is not float:
                raise TypeError(f"metadata[{key}]={value!r:.60}: expected str, int or float")
        object.__setattr__(self, "metadata", dict(self.metadata))

    @classmethod
    def of(cls, version: int, onnx: bytes, metadata: dict[str, str | int | float] | None = None) -> "ModelRelease":
        return cls(version, hashlib.sha256(onnx).hexdigest(), dict(metadata or {}), onnx)


# A Status(DECLINED) reason the coordinator acts on: the device does not hold the weights of the
# task a change was sent against (RoundTask.base_round); the re-announcement sends it full weights.
MISSING_BASE = "missing_base"


@dataclass(frozen=True)
class Status:
    """Device presence and progress (device -> coordinator, sealed; ``offline`` is the last will).

    Since 1.4: ``release``, the version of the ONNX model release the device serves (None: none
    installed), and ``epsilon_left``, its differential-privacy budget left for this federation
    (epsilon budget minus spent; None: no DP, or not reported). A 1.3 sender's status reads None.
    """

    KIND: ClassVar[Kind] = Kind.STATUS
    device: str
    state: State
    round: int
    reason: str
    time: float
    release: int | None = None
    epsilon_left: float | None = None

    def __post_init__(self) -> None:
        validate_id(self.device, "device")
        object.__setattr__(self, "state", State(self.state))
        _int(self.round, "round", 0, U32)
        _text(self.reason, "reason")
        _float(self, "time", lo=0.0)
        if self.release is not None:
            _int(self.release, "release", 0, U32)
        if self.epsilon_left is not None:
            _float(self, "epsilon_left", lo=0.0)


@dataclass(frozen=True)
class Reject:
    """The coordinator refusing a device's update (coordinator -> that device's inbox, signed).

    ``reason`` is a stable label (``late``, ``duplicate``, ``not_selected``...); ``detail`` is prose.
    """

    KIND: ClassVar[Kind] = Kind.REJECT
    round: int
    device: str
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        _int(self.round, "round", 0, U32)
        validate_id(self.device, "device")
        _label(self.reason, "reason")
        _text(self.detail, "detail")


@dataclass(frozen=True)
class KeyGrant:
    """The federation key ``key_id``, sealed to one member (coordinator -> its inbox, signed, retained).

    ``wrapped`` opens only with the member's X25519 key (``envelope.unwrap_group_key``); the
    message itself carries no secret a broker or another device could use.
    """

    KIND: ClassVar[Kind] = Kind.KEY
    device: str
    key_id: bytes
    wrapped: bytes

    def __post_init__(self) -> None:
        validate_id(self.device, "device")
        if type(self.key_id) is not bytes or len(self.key_id) != KEY_ID_LEN:
            raise ValueError(f"key_id must be {KEY_ID_LEN} bytes")
        if type(self.wrapped) is not bytes or len(self.wrapped) != WRAPPED_KEY_LEN:
            raise ValueError(f"wrapped must be {WRAPPED_KEY_LEN} bytes (ephemeral key, sealed key, tag)")


Message = Union[Register, RoundTask, Update, ModelRelease, Status, Reject, KeyGrant]

__all__ = [
    "Kind", "State", "ModelRef", "Register", "RoundTask", "Update", "ModelRelease", "Status", "Reject", "KeyGrant",
    "Message",
]
