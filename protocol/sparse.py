"""Sparse tensors on the wire: values in mask order, masks in their smallest encoding.

Theory of operation. Both sides hold the mask a round trains from (it travelled once, in a
RoundTask), so an update whose mask did not change carries, for each masked tensor, only the
values at the positions where the mask is True, in flattened C order, and no indices at all:
``nnz x value bytes`` is the physical bound and the encoding adds only a few bytes per tensor.
Dense tensors (biases, norms, buffers) travel in full.

A mask, when it must travel, is encoded per tensor as whichever of these is smallest:
``FULL``/``EMPTY`` (0 bytes), a bitmap (``np.packbits``, ceil(n/8) bytes), or the sorted active
indices delta-coded as fixed-width unsigned ints (1, 2 or 4 bytes, the narrowest that holds the
largest gap). An update's changed mask may instead be sent as its symmetric difference with the
base mask (a readjust moves few positions), again only where that is smaller.

Values are float32 (bit exact), float16 (relative error <= 2**-11 in the normal range), or int8
with one symmetric float32 scale per tensor (absolute error <= scale/2, scale = max|x|/127).
Everything decoded is checked against the layout and mask: counts, shapes, index order.
"""

from __future__ import annotations

import enum
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedprune.protocol.errors import DecodeError, UnknownMask
from fedprune.protocol.layout import ModelLayout, TensorSpec
from fedprune.protocol.quantise import F16_MAX, Masks, Params, ValueDtype, int8_scaled
from fedprune.protocol.wire import (
    DEFAULT_LIMITS, Limits, TailReader, TailWriter, as_bytes, as_float, as_int, as_list, fail, frame, pack, unframe, unpack,
)

F32_MAX = float(np.finfo(np.float32).max)


class MaskCode(enum.IntEnum):
    FULL = 0
    EMPTY = 1
    BITMAP = 2
    DELTA = 3


class MaskBasis(enum.IntEnum):
    ABSOLUTE = 0
    XOR_BASE = 1


# ---------------------------------------------------------------------------------------- masks


def mask_to_wire(mask: np.ndarray) -> list[Any]:
    """Smallest encoding of one bool mask: [FULL] | [EMPTY] | [BITMAP, bits] | [DELTA, width, gaps]."""
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    nnz = int(np.count_nonzero(flat))
    if nnz == flat.size:
        return [int(MaskCode.FULL)]
    if nnz == 0:
        return [int(MaskCode.EMPTY)]
    bitmap_bytes = (flat.size + 7) // 8
    if nnz < bitmap_bytes:
        idx = np.flatnonzero(flat)
        gaps = np.diff(idx, prepend=0)
        width = _delta_width(int(gaps.max()) + 1)
        if nnz * width < bitmap_bytes:
            return [int(MaskCode.DELTA), width, gaps.astype(f"<u{width}").tobytes()]
    return [int(MaskCode.BITMAP), np.packbits(flat).tobytes()]


def _delta_width(bound: int) -> int:
    return 1 if bound <= 0x100 else 2 if bound <= 0x10000 else 4


def mask_from_wire(obj: Any, spec: TensorSpec) -> np.ndarray:
    """Inverse of ``mask_to_wire`` for ``spec``'s shape; DecodeError on any inconsistency."""
    what = f"mask of {spec.name}"
    entry = as_list(obj, what, 3)
    if not entry:
        raise fail(what, "a non-empty array", entry)
    code = as_int(entry[0], f"{what} code", 0, len(MaskCode) - 1)
    size = spec.size
    if code in (MaskCode.FULL, MaskCode.EMPTY):
        as_list(entry, what, 1, length=1)
        return np.full(spec.shape, code == MaskCode.FULL, dtype=bool)
    if code == MaskCode.BITMAP:
        as_list(entry, what, 2, length=2)
        bits = as_bytes(entry[1], f"{what} bitmap", (size + 7) // 8)
        flat = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=None)
        if flat[size:].any():
            raise DecodeError(f"{what}: bitmap padding bits must be zero")
        return flat[:size].astype(bool).reshape(spec.shape)
    as_list(entry, what, 3, length=3)
    width = as_int(entry[1], f"{what} delta width", 1, 4)
    if width == 3:
        raise fail(f"{what} delta width", "1, 2 or 4", width)
    raw = as_bytes(entry[2], f"{what} deltas")
    if len(raw) % width or len(raw) // width > size:
        raise DecodeError(f"{what}: {len(raw)} delta bytes do not fit width {width} and size {size}")
    gaps = np.frombuffer(raw, dtype=f"<u{width}").astype(np.int64)
    if gaps.size == 0 or (gaps[1:] < 1).any():
        raise DecodeError(f"{what}: delta-coded indices must be non-empty and strictly increasing")
    idx = np.cumsum(gaps)
    if idx[-1] >= size:
        raise DecodeError(f"{what}: index {int(idx[-1])} out of range for size {size}")
    flat = np.zeros(size, dtype=bool)
    flat[idx] = True
    return flat.reshape(spec.shape)


def masks_to_wire(layout: ModelLayout, masks: Masks, base: Masks | None = None) -> list[Any]:
    """Per masked tensor ``[basis, encoding]``: absolute, or XOR with ``base`` where smaller."""
    check_masks(layout, masks)
    out = []
    for spec in layout.masked:
        absolute = mask_to_wire(masks[spec.name])
        entry = [int(MaskBasis.ABSOLUTE), absolute]
        if base is not None:
            relative = mask_to_wire(np.not_equal(masks[spec.name], base[spec.name]))
            if _wire_size(relative) < _wire_size(absolute):
                entry = [int(MaskBasis.XOR_BASE), relative]
        out.append(entry)
    return out


def _wire_size(entry: list[Any]) -> int:
    return sum(len(x) for x in entry if isinstance(x, bytes))


def masks_from_wire(obj: Any, layout: ModelLayout, base: Masks | None = None) -> Masks:
    specs = layout.masked
    entries = as_list(obj, "masks", len(specs), length=len(specs))
    out: Masks = {}
    for spec, entry in zip(specs, entries):
        basis, encoded = as_list(entry, f"mask entry of {spec.name}", 2, length=2)
        basis = as_int(basis, f"mask basis of {spec.name}", 0, len(MaskBasis) - 1)
        mask = mask_from_wire(encoded, spec)
        if basis == MaskBasis.XOR_BASE:
            if base is None:
                raise UnknownMask(f"mask of {spec.name} is relative to a base mask this side does not hold")
            mask = np.not_equal(mask, base[spec.name])
        mask.flags.writeable = False
        out[spec.name] = mask
    return out


def check_masks(layout: ModelLayout, masks: Masks) -> None:
    """ValueError unless ``masks`` has exactly the layout's masked tensors as bool arrays of their shape."""
    names = {s.name for s in layout.masked}
    if set(masks) != names:
        raise ValueError(f"masks must cover exactly the masked tensors {sorted(names)}, got {sorted(masks)}")
    for spec in layout.masked:
        m = masks[spec.name]
        if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.shape != spec.shape:
            raise ValueError(f"mask of {spec.name}: expected a bool array of shape {spec.shape}")


def encode_masks(layout: ModelLayout, masks: Masks) -> bytes:
    """Standalone mask bytes (e.g. for a cache on disk); same per-tensor encodings as the wire."""
    return pack([layout.fingerprint(), masks_to_wire(layout, masks)])


def decode_masks(data: bytes, layout: ModelLayout, limits: Limits = DEFAULT_LIMITS) -> Masks:
    top = as_list(unpack(data, limits, "masks"), "masks", 2, length=2)
    if as_bytes(top[0], "layout fingerprint", 8) != layout.fingerprint():
        raise DecodeError("masks were encoded for a different model layout")
    return masks_from_wire(top[1], layout)


# --------------------------------------------------------------------------------------- values


def values_to_wire(values: np.ndarray, dtype: ValueDtype, tail: TailWriter) -> list[Any]:
    """One tensor's active values into ``tail``; meta [FLOAT32, n] | [FLOAT16, n] | [INT8, scale, n]."""
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    dtype = ValueDtype(dtype)
    code = int(dtype)
    if dtype == ValueDtype.FLOAT32:
        return [code, tail.add(v.astype("<f4", copy=False).tobytes())]
    if dtype == ValueDtype.FLOAT16:
        with np.errstate(over="ignore"):
            half = v.astype("<f2")
        overflow = np.isinf(half) & np.isfinite(v)
        if overflow.any():
            raise ValueError(f"values up to {float(np.abs(v[overflow]).max()):.3g} overflow float16 (max {F16_MAX})")
        return [code, tail.add(half.tobytes())]
    scale, q = int8_scaled(v)
    return [code, scale, tail.add(q.tobytes())]


def values_from_wire(obj: Any, what: str, count: int, tail: TailReader) -> np.ndarray:
    """Decode ``count`` values to a read-only vector; DecodeError on wrong sizes or codes.

    float32 and float16 stay zero-copy views in their wire precision (widen with ``to_dense``);
    int8 is scaled to float32.
    """
    entry = as_list(obj, what, 3)
    if not entry:
        raise fail(what, "a non-empty array", entry)
    code = as_int(entry[0], f"{what} dtype", 0, len(ValueDtype) - 1)
    if code == ValueDtype.INT8:
        as_list(entry, what, 3, length=3)
        scale = as_float(entry[1], f"{what} scale")
        if scale < 0 or scale > F32_MAX or float(np.float32(scale)) != scale:
            raise fail(f"{what} scale", "a non-negative float32", scale)
        raw = _sized(entry[2], what, count, 1, tail)
        q = np.frombuffer(raw, dtype=np.int8)
        if (q == -128).any():
            raise DecodeError(f"{what}: int8 values must lie in -127..127")
        out = q.astype(np.float32) * np.float32(scale)
    else:
        as_list(entry, what, 2, length=2)
        width = 4 if code == ValueDtype.FLOAT32 else 2
        raw = _sized(entry[1], what, count, width, tail)
        out = np.frombuffer(raw, dtype=np.float32 if width == 4 else np.float16)  # zero-copy view
    out.flags.writeable = False
    return out


def _sized(length: Any, what: str, count: int, width: int, tail: TailReader) -> memoryview:
    if length != count * width or type(length) is not int:
        raise DecodeError(f"{what}: {length!r} value bytes, expected {count} values x {width} bytes")
    return tail.take(length, what)


# --------------------------------------------------------------------------------- SparseParams

_VALUE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_COUNTS: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()


def active_count(mask: np.ndarray) -> int:
    """Number of True positions; memoised for read-only masks that own their memory (MaskStore's)."""
    if mask.flags.writeable or mask.base is not None:
        return int(np.count_nonzero(mask))
    hit = _COUNTS.get(id(mask))
    if hit is not None and hit[0]() is mask:
        return hit[1]
    count = int(np.count_nonzero(mask))
    _COUNTS[id(mask)] = (weakref.ref(mask), count)
    while len(_COUNTS) > 4096:
        _COUNTS.popitem(last=False)
    return count


@dataclass(frozen=True, eq=False)
class SparseParams:
    """Tensors of ``layout``: masked ones as their active values in mask order, others in full.

    ``values[name]`` is a 1-D float32 vector (float16 when decoded from float16: values keep
    their wire precision until ``to_dense`` widens them); ``masks`` holds the mask of every
    masked tensor (the one the values refer to). Build with ``from_dense``; ``to_dense``
    scatters back to float32.
    """

    layout: ModelLayout
    masks: Masks
    values: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        check_masks(self.layout, self.masks)
        if list(self.values) != list(self.layout.names):
            raise ValueError(f"values must list exactly the layout's tensors in order {list(self.layout.names)}")
        for spec in self.layout:
            v = self.values[spec.name]
            expected = active_count(self.masks[spec.name]) if spec.masked else spec.size
            if not isinstance(v, np.ndarray) or v.dtype not in _VALUE_DTYPES or v.shape != (expected,):
                raise ValueError(f"values of {spec.name}: expected a float32 vector of {expected} values")

    @classmethod
    def from_dense(cls, layout: ModelLayout, params: Params, masks: Masks, *, check: bool = True) -> "SparseParams":
        """Gather the active values of ``params`` (keys: a subset of ``layout``) under ``masks``.

        With ``check``, a non-zero outside the mask is a ValueError: it would be silently lost.
        """
        sub = layout.subset(params)
        sub_masks = {s.name: masks[s.name] for s in sub.masked}
        check_masks(sub, sub_masks)
        values: dict[str, np.ndarray] = {}
        for spec in sub:
            arr = params[spec.name]
            if not isinstance(arr, np.ndarray) or arr.shape != spec.shape or arr.dtype.kind != "f":
                raise ValueError(f"{spec.name}: expected a float array of shape {spec.shape}")
            flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
            if spec.masked:
                m = sub_masks[spec.name].reshape(-1)
                if check and np.count_nonzero(flat[~m]):
                    raise ValueError(f"{spec.name}: non-zero values outside the mask would be dropped")
                flat = flat[m]
            values[spec.name] = flat
        return cls(sub, sub_masks, values)

    def to_dense(self) -> Params:
        """Full-shape float32 arrays, exact zeros outside the mask."""
        out: Params = {}
        for spec in self.layout:
            v = self.values[spec.name]
            if spec.masked:
                full = np.zeros(spec.size, dtype=np.float32)
                full[self.masks[spec.name].reshape(-1)] = v
            else:
                full = v.astype(np.float32)
            out[spec.name] = full.reshape(spec.shape)
        return out

    @property
    def nnz(self) -> int:
        return sum(v.size for v in self.values.values())

    def to_wire(self, dtype: ValueDtype, tail: TailWriter) -> list[Any]:
        return [values_to_wire(self.values[s.name], dtype, tail) for s in self.layout]

    @classmethod
    def from_wire(cls, obj: Any, layout: ModelLayout, masks: Masks, tail: TailReader) -> "SparseParams":
        entries = as_list(obj, "values", len(layout), length=len(layout))
        values = {}
        for spec, entry in zip(layout, entries):
            count = active_count(masks[spec.name]) if spec.masked else spec.size
            values[spec.name] = values_from_wire(entry, f"values of {spec.name}", count, tail)
        return cls(layout, {s.name: masks[s.name] for s in layout.masked}, values)


def encode_values(sparse: SparseParams, dtype: ValueDtype = ValueDtype.FLOAT32) -> bytes:
    """Standalone value bytes (layout fingerprint + per-tensor values); masks travel separately."""
    tail = TailWriter()
    return frame([sparse.layout.fingerprint(), sparse.to_wire(dtype, tail)], tail)


def decode_values(data: bytes, layout: ModelLayout, masks: Masks, limits: Limits = DEFAULT_LIMITS) -> SparseParams:
    meta, tail = unframe(data, limits, "values")
    top = as_list(meta, "values", 2, length=2)
    if as_bytes(top[0], "layout fingerprint", 8) != layout.fingerprint():
        raise DecodeError("values were encoded for a different model layout")
    out = SparseParams.from_wire(top[1], layout, masks, tail)
    tail.finish("values")
    return out


# ------------------------------------------------------------------------------------ MaskStore


class MaskStore:
    """The last few mask versions this side has seen, so tasks and updates can omit them."""

    def __init__(self, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError("MaskStore capacity must be at least 1")
        self._capacity = capacity
        self._masks: OrderedDict[int, Masks] = OrderedDict()

    def put(self, version: int, masks: Masks) -> None:
        frozen = {}
        for name, m in masks.items():
            m = np.array(m, dtype=bool)
            m.flags.writeable = False
            frozen[name] = m
        self._masks[version] = frozen
        self._masks.move_to_end(version)
        while len(self._masks) > self._capacity:
            self._masks.popitem(last=False)

    def get(self, version: int) -> Masks | None:
        return self._masks.get(version)

    def require(self, version: int) -> Masks:
        masks = self._masks.get(version)
        if masks is None:
            raise UnknownMask(
                f"mask version {version} is not cached here (have {sorted(self._masks)}); "
                "the sender must include the mask"
            )
        return masks

    @property
    def latest(self) -> int | None:
        return max(self._masks) if self._masks else None

    def __contains__(self, version: object) -> bool:
        return version in self._masks
