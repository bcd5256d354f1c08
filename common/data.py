"""Local data: what a device trains on and the coordinator evaluates on, read and checked.

``load_local_data`` reads a .npz (X, y) or CSV file, or a directory of them, an image folder, a
sensor recording or what a user's factory returns (``DataSource`` says which), with limits on
size and shape and a message naming the file for every problem. ``X`` is float32
(N, *input_shape); ``y`` is read as it is (int64 when every value is an integer, else float32;
(N,) or (N, T)), because the device learns the task kind only from the round task: the fit
check ``data_mismatch`` (``fedprune.common.data_fit``) judges y per task kind, without torch.
"""

from __future__ import annotations

import csv
import zipfile
import zlib
from pathlib import Path

import numpy as np

from fedprune.common.data_fit import DataSummary, data_mismatch  # noqa: F401  # re-exported: callers import them from here
from fedprune.common.data_source import DataSource

MAX_FILE_BYTES = 512 << 20
MAX_FEATURES = 1 << 20
# The decline reason of a device whose data does not fit the model: final for that model spec.
DATA_MISMATCH = "data_mismatch"


class LocalDataError(ValueError):
    """A local data file is missing, unreadable or malformed; the message names the file."""


def load_local_data(path: str | Path, source: DataSource | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read local training data as ``source`` (default: format auto) says: ``auto`` reads one
    ``.npz`` (arrays X, y) or CSV file (the last ``label_columns`` columns are targets), or a
    directory whose ``*.npz`` and ``*.csv`` files are concatenated in name order; ``npz`` and
    ``csv`` read only that kind.

    Returns X as float32 (N, ...) and y as int64 or float32, (N,) or (N, T). Raises
    LocalDataError naming the file.
    """
    path, source = Path(path), source or DataSource()
    kind = source.kind
    if kind in ("image_folder", "sensor_csv", "factory"):
        from fedprune.common import data_factory, data_images, data_sensor

        reader = {"image_folder": data_images.read_image_folder, "sensor_csv": data_sensor.read_sensor_csv,
                  "factory": data_factory.call_factory}[kind]
        X, y = reader(path, source)
        return validated(path, X, y)
    suffixes = (".npz", ".csv") if kind == "auto" else (f".{kind}",)
    listed = " or ".join(suffixes)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file())
        if not files:
            raise LocalDataError(f"{path}: no {listed} files in this directory")
        _refuse_same_stem(path, files)
    elif path.is_file():
        files = [path]
    else:
        raise LocalDataError(f"{path}: no such file or directory")
    parts = [_read_file(f, suffixes, source.label_columns) for f in files]
    for what, axis in (("sample", 0), ("target", 1)):
        shapes = {part[axis].shape[1:] for part in parts}
        if len(shapes) > 1:
            detail = ", ".join(f"{f.name}: {part[axis].shape[1:]}" for f, part in zip(files, parts))
            raise LocalDataError(f"{path}: files disagree on the {what} shape ({detail})")
    y = np.concatenate([y for _, y in parts])
    return np.concatenate([X for X, _ in parts]), y.astype(np.float32) if y.dtype.kind == "f" else y


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


def _read_file(path: Path, suffixes: tuple[str, ...], label_columns: int) -> tuple[np.ndarray, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise LocalDataError(f"{path}: unsupported file type {suffix!r}; expected {' or '.join(suffixes)}")
    check_size(path)
    if suffix == ".npz":
        arrays = _read_npz(path)
        X, y = arrays["X"], arrays["y"]
    else:
        X, y = _read_csv(path, label_columns)
    return validated(path, X, y)


def check_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise LocalDataError(f"{path}: {size} bytes exceeds the {MAX_FILE_BYTES}-byte limit")


def read_csv_rows(path: Path) -> list[list[str]]:
    """A CSV file's rows as text, within the size limit; LocalDataError naming the file otherwise."""
    check_size(path)
    try:
        with path.open("r", encoding="utf-8", newline="") as handle:
            return list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LocalDataError(f"{path}: not a readable CSV file ({exc})") from exc


def load_inputs(path: str | Path, labelled: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs to predict on: a .npz with X (and y, if there), or a CSV file (an optional header
    row, then numbers) whose last column is a label when ``labelled``. Returns X as float32 and
    y as int64 (float32 for fractional targets) or None; raises LocalDataError naming the file."""
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
        X, _ = validated(path, X, np.zeros(len(X), dtype=np.int64))
        return X, None
    return validated(path, X, y)


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


def _read_csv(path: Path, label_columns: int = 1) -> tuple[np.ndarray, np.ndarray]:
    table = _read_table(path)
    if table.shape[1] < label_columns + 1:
        what = "a label column" if label_columns == 1 else f"{label_columns} target columns ([data] label_columns)"
        raise LocalDataError(f"{path}: need at least one feature column and {what}")
    y = table[:, -label_columns:]
    return table[:, :-label_columns], y[:, 0] if label_columns == 1 else y


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


def validated(path: Path, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The checks every loader's output passes: numeric, (N, ...) and (N,) or (N, T), finite, within
    limits. y is returned as int64 when every value is an integer (class labels, 0/1 multi-label
    targets), else float32 (regression targets); whether it fits the task is ``data_mismatch``'s call."""
    if X.dtype.kind not in "fiu" or y.dtype.kind not in "fiub":
        raise LocalDataError(f"{path}: X and y must be numeric, got {X.dtype} and {y.dtype}")
    if X.ndim < 2 or y.ndim not in (1, 2) or len(X) != len(y):
        raise LocalDataError(f"{path}: expected X of shape (N, ...) and y of shape (N,) or (N, T), "
                             f"got {X.shape} and {y.shape}")
    if len(y) == 0 or y.size == 0:
        raise LocalDataError(f"{path}: no samples")
    if int(np.prod(X.shape[1:])) > MAX_FEATURES:
        raise LocalDataError(f"{path}: {X.shape[1:]} features per sample exceeds the limit {MAX_FEATURES}")
    X = X.astype(np.float32)
    if not np.all(np.isfinite(X)):
        raise LocalDataError(f"{path}: X contains NaN or infinite values")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise LocalDataError(f"{path}: y contains NaN or infinite values; drop or fill those rows")
        if not np.all(y == np.round(y)):
            return X, y.astype(np.float32)
    return X, y.astype(np.int64)

