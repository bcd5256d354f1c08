"""Safe msgpack: size limits, exact type checks, and the one translation of parser failures.

msgpack is fed only peer bytes we have already size-checked; its own length limits stop a
forged length prefix from allocating, our depth walk stops deep nesting, and every exception
the parser can raise is turned into ``DecodeError``/``TooLarge`` here, so nothing else escapes.
Field readers compare ``type(x) is T`` (``True`` is not an int, ``1`` is not a float).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import msgpack

from fedprune.protocol.errors import DecodeError, ProtocolError, TooLarge

T = TypeVar("T")
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Hard caps for everything decoded from a peer. Defaults fit a ~10M-parameter model."""

    max_message_bytes: int = 64 * MiB
    max_bin_len: int = 64 * MiB
    max_str_len: int = 4096
    max_array_len: int = 100_000
    max_map_len: int = 4096
    max_depth: int = 8
    max_tensors: int = 4096
    max_metrics: int = 64
    max_classes: int = 100_000
    max_selected: int = 100_000
    max_metadata: int = 256

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{name}={value!r}: expected a positive int")


DEFAULT_LIMITS = Limits()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=False)


def unpack(data: bytes | memoryview, limits: Limits, what: str) -> Any:
    """Parse one msgpack object under ``limits``; DecodeError/TooLarge for anything wrong."""
    if len(data) > limits.max_message_bytes:
        raise TooLarge(f"{what}: {len(data)} bytes exceeds the limit of {limits.max_message_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=limits.max_bin_len,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError, UnicodeDecodeError,
            msgpack.ExtraData, msgpack.StackError, msgpack.FormatError, msgpack.OutOfData) as exc:
        limit_hit = "exceeds max" in str(exc)
        cls = TooLarge if limit_hit else DecodeError
        raise cls(f"{what}: malformed msgpack ({type(exc).__name__}: {str(exc)[:120]})") from None
    except MemoryError:
        raise TooLarge(f"{what}: decoding needs more memory than allowed") from None
    check_depth(obj, limits.max_depth, what)
    return obj


def check_depth(obj: Any, max_depth: int, what: str) -> None:
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            children = item
        elif isinstance(item, dict):
            children = list(item.values())
        else:
            continue
        if depth > max_depth:
            raise TooLarge(f"{what}: nesting deeper than {max_depth}")
        stack.extend((child, depth + 1) for child in children)


def fail(what: str, expected: str, got: Any) -> DecodeError:
    shown = type(got).__name__ if isinstance(got, (bytes, list, dict)) else repr(got)[:60]
    return DecodeError(f"{what}: expected {expected}, got {shown}")


def as_int(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise fail(what, f"an int in {lo}..{hi}", value)
    return value


def as_float(value: Any, what: str, *, finite: bool = True) -> float:
    if type(value) is not float or (finite and not math.isfinite(value)):
        raise fail(what, "a finite float" if finite else "a float", value)
    return value


def as_bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise fail(what, "a bool", value)
    return value


def as_str(value: Any, what: str, max_len: int = 4096) -> str:
    if type(value) is not str or len(value) > max_len:
        raise fail(what, f"a string of at most {max_len} characters", value)
    return value


def as_bytes(value: Any, what: str, length: int | None = None) -> bytes:
    if type(value) is not bytes or (length is not None and len(value) != length):
        raise fail(what, "binary" if length is None else f"{length} bytes of binary", value)
    return value


def as_list(value: Any, what: str, max_len: int, length: int | None = None) -> list:
    if type(value) is not list or len(value) > max_len or (length is not None and len(value) != length):
        expected = f"an array of {length} items" if length is not None else f"an array of at most {max_len} items"
        raise fail(what, expected, value)
    return value


def as_map(value: Any, what: str, keys: frozenset[str], *, lenient: bool = False) -> dict:
    """A map with exactly ``keys``; with ``lenient`` (a newer minor version) extra keys are ignored."""
    if type(value) is not dict:
        raise fail(what, "a map", value)
    missing = keys - value.keys()
    extra = value.keys() - keys
    if missing or (extra and not lenient):
        raise DecodeError(f"{what}: missing keys {sorted(missing)}, unexpected keys {sorted(map(str, extra))[:8]}")
    return value


def construct(what: str, build: Callable[[], T]) -> T:
    """Run a validating constructor on peer data: its ValueError/TypeError becomes DecodeError."""
    try:
        return build()
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise DecodeError(f"{what}: {exc}") from None


# ------------------------------------------------------------------ framed bodies: meta + tail
#
# Tensor bytes do not go through msgpack (which would copy every binary on decode): a body is
#   u32 meta length | msgpack meta | tail
# where the meta names each tensor's byte length and the tail holds those bytes back to back in
# the order the meta lists them. Decoders take zero-copy numpy views of the tail.

_META_LEN = 4


class TailWriter:
    """Collects tensor bytes in order; ``add`` returns the length to record in the meta."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def add(self, data: bytes) -> int:
        self.parts.append(data)
        return len(data)


class TailReader:
    """Hands out consecutive slices of the tail; every byte must be claimed exactly once."""

    def __init__(self, tail: memoryview) -> None:
        self._tail = tail
        self._pos = 0

    def take(self, n: Any, what: str) -> memoryview:
        if type(n) is not int or n < 0 or self._pos + n > len(self._tail):
            raise DecodeError(f"{what}: length {n!r} runs past the {len(self._tail) - self._pos} bytes left")
        out = self._tail[self._pos : self._pos + n]
        self._pos += n
        return out

    def finish(self, what: str) -> None:
        if self._pos != len(self._tail):
            raise DecodeError(f"{what}: {len(self._tail) - self._pos} unclaimed bytes after the tensors")


def frame(meta: Any, tail: TailWriter) -> bytes:
    head = pack(meta)
    return b"".join([len(head).to_bytes(_META_LEN, "big"), head, *tail.parts])


def unframe(data: bytes | memoryview, limits: Limits, what: str) -> tuple[Any, TailReader]:
    """Meta object and a reader over the tail; DecodeError/TooLarge like ``unpack``."""
    if len(data) > limits.max_message_bytes:
        raise TooLarge(f"{what}: {len(data)} bytes exceeds the limit of {limits.max_message_bytes}")
    view = memoryview(data)
    if len(view) < _META_LEN:
        raise DecodeError(f"{what}: {len(view)} bytes cannot hold a framed body")
    n = int.from_bytes(view[:_META_LEN], "big")
    if n > len(view) - _META_LEN:
        raise DecodeError(f"{what}: meta length {n} exceeds the {len(view) - _META_LEN} bytes present")
    meta = unpack(view[_META_LEN : _META_LEN + n], limits, what)
    return meta, TailReader(view[_META_LEN + n :])
