"""A model factory's keyword arguments and the task kinds: what a ModelRef carries besides the
factory's name, checked on both sides with the same rules.

Values are what TOML and msgpack both carry exactly: bool, int, float, str, or a flat list of
them; they are stored as a sorted tuple of (key, value) pairs so that a ModelRef hashes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Union

TASK_KINDS = ("classification", "regression", "multilabel")
# Each kind's headline metric (fedprune.common.objectives.Evaluation.score), higher-better, 1 at best.
HEADLINE = {"classification": "accuracy", "regression": "r2", "multilabel": "f1"}
MAX_ARGS = 32
MAX_ARG_ITEMS = 64
MAX_ARG_TEXT = 128

Scalar = Union[bool, int, float, str]
ArgValue = Union[Scalar, tuple[Scalar, ...]]
ModelArgs = tuple[tuple[str, ArgValue], ...]


def normalise_args(args: Mapping[str, object] | ModelArgs) -> ModelArgs:
    """Factory keyword arguments as a sorted, hashable tuple; lists become tuples. Values are what
    TOML and msgpack both carry exactly: bool, int, float, str, or a flat list of them."""
    items = args.items() if isinstance(args, Mapping) else args
    out: dict[str, ArgValue] = {}
    for key, value in items:
        if not isinstance(key, str) or not key.isidentifier() or key in ("input_shape", "num_outputs"):
            raise ValueError(f"model argument {key!r}: expected a Python identifier other than input_shape and "
                             "num_outputs (those come from [federation] input_shape and num_classes)")
        out[key] = _arg_value(key, value)
    if len(out) > MAX_ARGS:
        raise ValueError(f"{len(out)} model arguments: at most {MAX_ARGS}")
    return tuple(sorted(out.items()))


def _arg_value(key: str, value: object) -> ArgValue:
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ARG_ITEMS:
            raise ValueError(f"model argument {key}: a list of at most {MAX_ARG_ITEMS} items")
        return tuple(_scalar(key, v) for v in value)
    return _scalar(key, value)


def _scalar(key: str, value: object) -> Scalar:
    if isinstance(value, float) and value != value:
        raise ValueError(f"model argument {key}: NaN is not a value")
    if isinstance(value, str) and (len(value) > MAX_ARG_TEXT or not value.isprintable()):
        raise ValueError(f"model argument {key}: text of at most {MAX_ARG_TEXT} printable characters")
    if type(value) not in (bool, int, float, str):
        raise ValueError(f"model argument {key}={value!r:.60}: expected a bool, int, float, string or a flat list "
                         "of them")
    return value  # type: ignore[return-value]


def normalise_target_edges(rows: object, task: str, outputs: int) -> tuple[tuple[float, ...], ...]:
    """A regression task's bin edges per target (``RoundTask.target_edges``): none, or for each of
    the ``outputs`` targets 1-15 finite ascending floats, as many for each; ValueError otherwise."""
    edges = tuple(tuple(float(v) for v in row) for row in rows)  # type: ignore[union-attr]
    if edges and (task != "regression" or len(edges) != outputs or len({len(r) for r in edges}) > 1 or any(
            not 1 <= len(r) <= 15 or not all(map(math.isfinite, r)) or list(r) != sorted(r) for r in edges)):
        raise ValueError("target_edges: a regression task's 1-15 finite ascending bin edges per target, as many "
                         "for each target")
    return edges
