"""ModelLayout: the index space that masks, sparse values and updates refer to.

Both sides derive the layout from the model by name (never from the wire), so a tensor is
identified by its position in this ordered list. Masked tensors are the prunable weights;
dense tensors (biases, normalisation parameters) always travel in full. Buffers such as
BatchNorm running statistics are listed with ``trainable=False``: they travel as values but
never enter updates' norms or contribution scores.
"""

from __future__ import annotations

import hashlib
import math
from functools import cached_property
from dataclasses import dataclass
from typing import Iterable, Iterator

DIGEST_LEN = 2  # bytes per tensor in ModelLayout.tensor_digests: enough to point at a difference


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    masked: bool
    trainable: bool = True

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("tensor name must be a non-empty string")
        if any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise ValueError(f"tensor {self.name}: shape {self.shape} must be non-negative ints")
        if self.masked and not self.trainable:
            raise ValueError(f"tensor {self.name}: a buffer cannot be masked")

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelLayout:
    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("tensor names in a layout must be unique")

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> TensorSpec:
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def masked(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.masked)

    @property
    def dense(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if not t.masked)

    @property
    def trainable(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.trainable)

    @property
    def buffers(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if not t.trainable)

    @property
    def num_parameters(self) -> int:
        return sum(t.size for t in self.tensors if t.trainable)

    def subset(self, names: "Iterable[str]") -> "ModelLayout":
        """The tensors named in ``names``, kept in this layout's order; KeyError for an unknown name."""
        wanted = set(names)
        unknown = wanted - set(self.names)
        if unknown:
            raise KeyError(f"not in layout: {sorted(unknown)}")
        return ModelLayout(tuple(t for t in self.tensors if t.name in wanted))

    def fingerprint(self) -> bytes:
        """8 bytes identifying names, shapes and roles, so both sides can tell they share a layout."""
        return self._fingerprint

    def tensor_digests(self) -> bytes:
        """``DIGEST_LEN`` bytes per tensor (name, shape, roles), in layout order: sent beside the
        fingerprint so that a receiver whose layout differs can say where (``first_difference``)."""
        return b"".join(hashlib.sha256(_canonical(t).encode()).digest()[:DIGEST_LEN] for t in self.tensors)

    def first_difference(self, digests: bytes) -> str:
        """Where this layout departs from the one ``digests`` describe, in words."""
        theirs = [digests[i:i + DIGEST_LEN] for i in range(0, len(digests), DIGEST_LEN)]
        if not theirs:
            return "the sender named no tensors"
        for i, tensor in enumerate(self.tensors):
            if i >= len(theirs):
                return f"{len(theirs)} tensors there, {len(self.tensors)} here; the first extra here is {_described(tensor)}"
            if hashlib.sha256(_canonical(tensor).encode()).digest()[:DIGEST_LEN] != theirs[i]:
                return f"tensor {i} differs: {_described(tensor)} here"
        if len(theirs) > len(self.tensors):
            return f"{len(theirs)} tensors there, {len(self.tensors)} here (after {self.tensors[-1].name})"
        return "no tensor differs"

    @cached_property
    def trainable_layout(self) -> "ModelLayout":
        """The trainable tensors alone: what an update's delta covers."""
        return ModelLayout(self.trainable)

    @cached_property
    def _fingerprint(self) -> bytes:
        canon = ";".join(_canonical(t) for t in self.tensors)
        return hashlib.sha256(canon.encode()).digest()[:8]


def _canonical(t: TensorSpec) -> str:
    return f"{t.name}:{'x'.join(map(str, t.shape))}:{int(t.masked)}{int(t.trainable)}"


def _described(t: TensorSpec) -> str:
    role = "masked" if t.masked else ("dense" if t.trainable else "buffer")
    return f"{t.name} {t.shape} {role}"
