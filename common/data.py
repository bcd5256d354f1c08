"""Datasets: built-in benchmarks for simulation, a device's local files, partitioners, label noise.

Shapes: every dataset has a canonical ``input_shape`` with a channel axis (digits (1, 8, 8),
mnist1d (1, 40)) and ``X`` is float32 (N, *input_shape); models flatten as they need
(edge_agent.models). Labels are int64 in [0, num_classes).

Randomness arrives as a seeded ``numpy.random.Generator`` (or an int seed for the built-in
datasets), so every split, partition and noisy label set is reproducible. sklearn and mnist1d are
coordinator-side dependencies, imported only when a built-in dataset is requested; a device only
needs ``load_local_data``.
"""

from __future__ import annotations

import functools
import math
import random
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

DATASET_NAMES = ("digits", "mnist1d")
DATASET_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40)}  # the canonical input_shape of each
NOISE_KINDS = ("symmetric", "pairwise")
DIGITS_TEST_FRACTION = 0.2
MAX_FILE_BYTES = 512 << 20
MAX_FEATURES = 1 << 20
# The decline reason of a device whose data does not fit the model: final for that model spec.
DATA_MISMATCH = "data_mismatch"


@dataclass(frozen=True)
class Dataset:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int


class LocalDataError(ValueError):
    """A local data file is missing, unreadable or malformed; the message names the file."""


def load_dataset(name: str, seed: int) -> Dataset:
    """A built-in benchmark, deterministic from ``seed``.

    digits: sklearn's 8x8 digits scaled to [0, 1]; ``seed`` drives a stratified 80/20 split.
    mnist1d: generated procedurally with the mnist1d package (never downloaded); ``seed`` is the
    generator's seed, with the package's defaults otherwise (5000 samples: 4000 train, 1000 test).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}: expected one of {DATASET_NAMES}")
    if not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise ValueError(f"seed={seed!r}: expected an int in [0, 2**32)")
    cached = _load_cached(name, seed)
    return replace(cached, **{f: getattr(cached, f).copy() for f in ("X_train", "y_train", "X_test", "y_test")})


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, seed: int) -> Dataset:
    return _digits(seed) if name == "digits" else _mnist1d(seed)


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    test = _stratified_holdout(y, DIGITS_TEST_FRACTION, np.random.default_rng(seed))
    train = np.setdiff1d(np.arange(len(y)), test)
    return Dataset(X[train], y[train], X[test], y[test], (1, 8, 8), 10)


def _mnist1d(seed: int) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    # make_dataset seeds the global `random` and `numpy.random` states; restore them afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    length = args.final_seq_length
    return Dataset(
        np.asarray(data["x"], dtype=np.float32).reshape(-1, 1, length),
        np.asarray(data["y"], dtype=np.int64),
        np.asarray(data["x_test"], dtype=np.float32).reshape(-1, 1, length),
        np.asarray(data["y_test"], dtype=np.int64),
        (1, length),
        10,
    )


def _stratified_holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a held-out set with about ``fraction`` of every class (at least one)."""
    held = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[:n])
    return np.sort(np.concatenate(held))


def split_validation(dataset: Dataset, fraction: float, rng: np.random.Generator) -> Dataset:
    """Carve a stratified validation set out of the training split for tuning.

    Returns a Dataset whose train part is the rest of the training data and whose test part is the
    validation set, so tuning code runs unchanged and never sees the real test split.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction!r}: expected a number in (0, 1)")
    val = _stratified_holdout(dataset.y_train, fraction, rng)
    train = np.setdiff1d(np.arange(len(dataset.y_train)), val)
    return replace(
        dataset,
        X_train=dataset.X_train[train],
        y_train=dataset.y_train[train],
        X_test=dataset.X_train[val],
        y_test=dataset.y_train[val],
    )


# ---- partitioners: each returns one sorted int64 index array per client, covering every index once


def _check_clients(n: int, n_clients: int, min_size: int) -> None:
    if not (isinstance(n_clients, int) and n_clients >= 1):
        raise ValueError(f"n_clients={n_clients!r}: expected a positive int")
    if min_size < 0 or n_clients * min_size > n:
        raise ValueError(f"cannot give {n_clients} clients at least {min_size} of {n} samples each")


def partition_iid(y: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly shuffled, near-equal shares (sizes differ by at most one)."""
    _check_clients(len(y), n_clients, 0)
    return [np.sort(part) for part in np.array_split(rng.permutation(len(y)), n_clients)]


def partition_dirichlet(
    y: np.ndarray,
    n_clients: int,
    beta: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label skew: each class is split over clients by proportions ~ Dir(beta); lower beta, more skew.

    As in the common FL code (Hsu et al. 2019; NIID-Bench): a client that already holds its fair
    share N/n_clients gets no more of the next class, and the draw is repeated until every client
    has at least ``min_size`` samples.
    """
    if not beta > 0:
        raise ValueError(f"beta={beta!r}: expected a positive number")
    y = np.asarray(y)
    _check_clients(len(y), n_clients, min_size)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        sizes = np.zeros(n_clients, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(n_clients, beta))
            p = p * (sizes < len(y) / n_clients)
            p = p / p.sum() if p.sum() > 0 else np.full(n_clients, 1.0 / n_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
    raise ValueError(f"no Dirichlet(beta={beta}) partition gave every client {min_size} samples in {max_tries} draws")


def partition_quantity(
    y: np.ndarray, n_clients: int, rng: np.random.Generator, beta: float = 0.5, min_size: int = 10
) -> list[np.ndarray]:
    """Quantity skew with IID labels: sizes are min_size plus a Dir(beta) share of the rest."""
    if not beta > 0:
        raise ValueError(f"beta={beta!r}: expected a positive number")
    _check_clients(len(y), n_clients, min_size)
    spare = len(y) - n_clients * min_size
    raw = rng.dirichlet(np.full(n_clients, beta)) * spare
    extra = np.floor(raw).astype(np.int64)
    leftover = spare - int(extra.sum())
    extra[np.argsort(-(raw - extra), kind="stable")[:leftover]] += 1
    cuts = np.cumsum(min_size + extra)[:-1]
    return [np.sort(part) for part in np.split(rng.permutation(len(y)), cuts)]


def add_label_noise(
    y: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator, kind: str = "symmetric"
) -> np.ndarray:
    """A noisy copy of ``y``; each label is corrupted independently with probability ``rate``.

    symmetric: the label is replaced by a class drawn uniformly from all ``num_classes`` (it may
    draw the true class, so the expected fraction of wrong labels is rate * (C - 1) / C; this is
    the prototype's "labels replaced uniformly at random"). pairwise: class c becomes (c + 1) mod C.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate!r}: expected a number in [0, 1]")
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {NOISE_KINDS}")
    y = np.asarray(y, dtype=np.int64)
    hit = rng.random(len(y)) < rate
    noisy = y.copy()
    if kind == "symmetric":
        noisy[hit] = rng.integers(0, num_classes, size=int(hit.sum()))
    else:
        noisy[hit] = (y[hit] + 1) % num_classes
    return noisy


# ---- a device's local data


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
