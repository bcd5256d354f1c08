"""Does a device's data fit a model? Said without torch and without the arrays.

The agent loads its data once, keeps a ``DataSummary`` (a few numbers: the idle agent stays
small) and, on the first task naming a model spec, asks ``data_mismatch`` why the data cannot
train it. The task kind comes with the task, not with the data, so the summary keeps what every
kind's rule needs: the sample shape, the targets' columns, whether any target is fractional and
the distinct integer values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TASKS = ("classification", "regression", "multilabel")
# Distinct label values a summary keeps (the smallest); more are counted, not kept.
MAX_KEPT_LABELS = 1024


@dataclass(frozen=True)
class DataSummary:
    """What the fit check needs from local data, kept instead of the arrays (the idle agent stays small)."""

    sample_shape: tuple[int, ...]
    n_examples: int
    labels: tuple[int, ...]  # distinct integer values of y, ascending (the smallest MAX_KEPT_LABELS); () if fractional
    columns: int = 0  # y's second dimension; 0: y is 1-D
    fractional: bool = False  # some target is not an integer: regression targets
    more_labels: int = 0  # distinct integer values beyond the kept ones

    @classmethod
    def of(cls, X: np.ndarray, y: np.ndarray) -> "DataSummary":
        columns = int(y.shape[1]) if y.ndim == 2 else 0
        fractional = bool(y.dtype.kind == "f" and not np.all(y == np.round(y)))
        distinct = () if fractional else np.unique(y)
        return cls(tuple(int(d) for d in X.shape[1:]), int(len(y)), tuple(int(c) for c in distinct[:MAX_KEPT_LABELS]),
                   columns, fractional, max(0, len(distinct) - MAX_KEPT_LABELS))


def data_mismatch(summary: DataSummary, input_shape: tuple[int, ...], num_outputs: int,
                  task: str = "classification") -> str | None:
    """Why this data cannot train a model with ``input_shape`` and ``num_outputs`` (classes for
    classification) for ``task``, in a few words that say what to change (e.g. "13 features,
    model expects 64"), or None. The shape rule is the trainer's
    (``fedprune.common.models.as_model_input``): samples of exactly ``input_shape``, or flat rows
    of its size. Checking it here saves a training run that can only fail."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {TASKS}")
    problems = []
    shape, expected = summary.sample_shape, tuple(input_shape)
    if shape != expected and not (len(shape) == 1 and shape[0] == math.prod(expected)):
        if math.prod(shape) != math.prod(expected):
            problems.append(f"{math.prod(shape)} features, model expects {math.prod(expected)}")
        else:
            problems.append(f"samples of shape {shape}, model expects {expected} or flat rows")
    problems += {"classification": _classification, "regression": _regression,
                 "multilabel": _multilabel}[task](summary, num_outputs)
    return "; ".join(problems) or None


def _shown(values: tuple[int, ...], more: int = 0) -> str:
    rest = len(values) - 4 + more
    return ", ".join(map(str, values[:4])) + (f" and {rest} more" if rest > 0 else "")


def _columns(summary: DataSummary) -> str:
    n = summary.columns or 1
    return f"{n} column" + ("s" if n != 1 else "")


def _classification(summary: DataSummary, num_classes: int) -> list[str]:
    if summary.columns:
        return [f"targets have {_columns(summary)}, classification needs one label per sample "
                "(several 0/1 columns: task multilabel)"]
    if summary.fractional:
        return ["labels must be integers, found fractional targets (for those: task regression)"]
    negative = tuple(c for c in summary.labels if c < 0)
    if negative:
        return [f"labels must be non-negative, found {_shown(negative)}"]
    outside = tuple(c for c in summary.labels if c >= num_classes)
    if outside or summary.more_labels:
        return [f"labels {_shown(outside, summary.more_labels)} outside 0..{num_classes - 1}"]
    return []


def _regression(summary: DataSummary, num_outputs: int) -> list[str]:
    if (summary.columns or 1) != num_outputs:
        return [f"targets have {_columns(summary)}, model has {num_outputs} output" + ("s" if num_outputs != 1 else "")]
    return []


def _multilabel(summary: DataSummary, num_labels: int) -> list[str]:
    problems = _regression(summary, num_labels)
    if summary.fractional:
        problems.append("multi-label targets must be 0 or 1, found fractional values")
    else:
        other = tuple(c for c in summary.labels if c not in (0, 1))
        if other or summary.more_labels:
            problems.append(f"multi-label targets must be 0 or 1, found {_shown(other, summary.more_labels)}")
    return problems
