"""Local data: what a device trains on and the coordinator evaluates on, read and checked.

``load_local_data`` reads a .npz (X, y) or CSV file, or a directory of them, with limits on size
and shape and a message naming the file for every problem; ``data_mismatch`` says, without
torch, why loaded data cannot train a model spec. ``X`` is float32 (N, *input_shape) and labels
are int64 in [0, num_classes); models flatten as they need (``fedprune.common.models``).
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_FILE_BYTES = 512 << 20
MAX_FEATURES = 1 << 20
# The decline reason of a device whose data does not fit the model: final for that model spec.
DATA_MISMATCH = "data_mismatch"


class LocalDataError(ValueError):
    """A local data file is missing, unreadable or malformed; the message names the file."""


def load_local_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read local training data: one ``.npz`` (arrays X, y) or CSV file (last column = label), or a
    directory whose ``*.npz`` and ``*.csv`` files are concatenated in name order.

    Returns X as float32 (N, ...) and y as int64 (N,). Raises LocalDataError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".npz", ".csv") and p.is_file())
        if not files:
            raise LocalDataError(f"{path}: no .npz or .csv files in this directory")
        _refuse_same_stem(path, files)
    elif path.is_file():
        files = [path]
    else:
        raise LocalDataError(f"{path}: no such file or directory")
    parts = [_read_file(f) for f in files]
    shapes = {X.shape[1:] for X, _ in parts}
    if len(shapes) > 1:
        detail = ", ".join(f"{f.name}: {X.shape[1:]}" for f, (X, _) in zip(files, parts))
        raise LocalDataError(f"{path}: files disagree on the sample shape ({detail})")
    return np.concatenate([X for X, _ in parts]), np.concatenate([y for _, y in parts])


def _refuse_same_stem(directory: Path, files: list[Path]) -> None:
    """Distinct files are shards and are concatenated; ``data.npz`` next to ``data.csv`` is almost
    always one data set in two formats, which would silently count every sample twice."""
    stems: dict[str, list[str]] = {}
    for f in files:
        stems.setdefault(f.stem.lower(), []).append(f.name)
    twins = [names for names in stems.values() if len(names) > 1]
    if twins:
        raise LocalDataError(f"{directory}: {' and '.join(twins[0])} look like one data set in two formats and "
                             "would be loaded twice; keep one of them (files with different names are "
                             "concatenated as shards)")


def _read_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise LocalDataError(f"{path}: unsupported file type {suffix!r}; expected .npz or .csv")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise LocalDataError(f"{path}: {size} bytes exceeds the {MAX_FILE_BYTES}-byte limit")
    if suffix == ".npz":
        arrays = _read_npz(path)
        X, y = arrays["X"], arrays["y"]
    else:
        X, y = _read_csv(path)
    return _validated(path, X, y)


def load_inputs(path: str | Path, labelled: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs to predict on: a .npz with X (and y, if there), or a CSV file (an optional header
    row, then numbers) whose last column is a label when ``labelled``. Returns X as float32 and
    y as int64 or None; raises LocalDataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LocalDataError(f"{path}: no such file")
    if path.suffix.lower() == ".npz":
        arrays = _read_npz(path, required=("X",))
        X, y = arrays["X"], arrays.get("y")
    else:
        table = _read_table(path)
        X, y = (table[:, :-1], table[:, -1]) if labelled else (table, None)
    if y is None:  # the same checks on X alone, against placeholder labels
        X, _ = _validated(path, X, np.zeros(len(X), dtype=np.int64))
        return X, None
    return _validated(path, X, y)


_ZIP_MAGIC = b"PK\x03\x04"


def _read_npz(path: Path, required: tuple[str, ...] = ("X", "y")) -> dict[str, np.ndarray]:
    """Checks the zip signature first: numpy takes any other file for a pickle and would blame
    ``allow_pickle``, a misleading hint for a file that is simply not a .npz."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(_ZIP_MAGIC))
        if magic != _ZIP_MAGIC:
            raise LocalDataError(f"{path}: not a .npz archive (a .npz is a zip of .npy arrays, as numpy.savez "
                                 f"writes it; this file starts with {magic!r}); re-export it with numpy.savez")
        with np.load(path, allow_pickle=False) as archive:
            missing = set(required) - set(archive.files)
            if missing:
                raise LocalDataError(f"{path}: missing array(s) {sorted(missing)}; found {archive.files}")
            return {name: archive[name] for name in ("X", "y") if name in archive.files}
    except LocalDataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise LocalDataError(f"{path}: damaged or truncated .npz archive ({exc}); copy or export it again") from exc


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = _read_table(path)
    if table.shape[1] < 2:
        raise LocalDataError(f"{path}: need at least one feature column and a label column")
    return table[:, :-1], table[:, -1]


def _read_table(path: Path) -> np.ndarray:
    """A numeric CSV table (float64, 2-D); a first row that is not numeric is a header."""
    try:
        with path.open("r", encoding="utf-8") as handle:
            first = handle.readline()
        skip = 0 if _is_numeric_row(first) else 1
        return np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LocalDataError(f"{path}: not a numeric CSV table ({exc})") from exc


def _is_numeric_row(line: str) -> bool:
    try:
        [float(cell) for cell in line.split(",")]
    except ValueError:
        return False
    return True


def _validated(path: Path, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if X.dtype.kind not in "fiu" or y.dtype.kind not in "fiu":
        raise LocalDataError(f"{path}: X and y must be numeric, got {X.dtype} and {y.dtype}")
    if X.ndim < 2 or y.ndim != 1 or len(X) != len(y):
        raise LocalDataError(f"{path}: expected X of shape (N, ...) and y of shape (N,), got {X.shape} and {y.shape}")
    if len(y) == 0:
        raise LocalDataError(f"{path}: no samples")
    if int(np.prod(X.shape[1:])) > MAX_FEATURES:
        raise LocalDataError(f"{path}: {X.shape[1:]} features per sample exceeds the limit {MAX_FEATURES}")
    X = X.astype(np.float32)
    if not np.all(np.isfinite(X)):
        raise LocalDataError(f"{path}: X contains NaN or infinite values")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise LocalDataError(f"{path}: labels must be integers")
    if y.min() < 0:
        raise LocalDataError(f"{path}: labels must be non-negative, found {y.min()}")
    return X, y.astype(np.int64)


# ---- does a device's data fit a model


@dataclass(frozen=True)
class DataSummary:
    """What the fit check needs from local data, kept instead of the arrays (the idle agent stays small)."""

    sample_shape: tuple[int, ...]
    n_examples: int
    labels: tuple[int, ...]  # distinct, ascending

    @classmethod
    def of(cls, X: np.ndarray, y: np.ndarray) -> "DataSummary":
        return cls(tuple(int(d) for d in X.shape[1:]), int(len(y)), tuple(int(c) for c in np.unique(y)))


def data_mismatch(summary: DataSummary, input_shape: tuple[int, ...], num_classes: int) -> str | None:
    """Why this data cannot train a model with ``input_shape`` and ``num_classes``, in a few
    words (e.g. "13 features, model expects 64"), or None. The shape rule is the trainer's
    (``fedprune.common.models.as_model_input``): samples of exactly ``input_shape``, or flat rows of
    its size. Checking it here, without torch, saves a training run that can only fail."""
    problems = []
    shape, expected = summary.sample_shape, tuple(input_shape)
    if shape != expected and not (len(shape) == 1 and shape[0] == math.prod(expected)):
        if math.prod(shape) != math.prod(expected):
            problems.append(f"{math.prod(shape)} features, model expects {math.prod(expected)}")
        else:
            problems.append(f"samples of shape {shape}, model expects {expected} or flat rows")
    outside = [c for c in summary.labels if c >= num_classes]
    if outside:
        shown = ", ".join(map(str, outside[:4])) + (f" and {len(outside) - 4} more" if len(outside) > 4 else "")
        problems.append(f"labels {shown} outside 0..{num_classes - 1}")
    return "; ".join(problems) or None
