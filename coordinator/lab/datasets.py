"""The lab's datasets: the built-in benchmarks, validation splits, partitions across simulated
clients and label noise.

Every dataset has a canonical ``input_shape`` with a channel axis (digits (1, 8, 8), mnist1d
(1, 40)); ``X`` is float32 (N, *input_shape), labels int64. Randomness arrives as a seeded
``numpy.random.Generator`` (or an int seed for the datasets), so every split, partition and noisy
label set is reproducible. ``own_dataset`` reads the user's files with the agent's loader.
sklearn and mnist1d are coordinator extras, imported only when a
dataset is requested: a device never loads this module.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedprune.common.configkit import ConfigError
from fedprune.common.data import LocalDataError, load_local_data, read_csv_rows, validated
from fedprune.common.data_source import DataSource

DATASET_NAMES = ("digits", "mnist1d")
DATASET_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40)}  # the canonical input_shape of each
NOISE_KINDS = ("symmetric", "pairwise")
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int



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


def corrupt_targets(y: np.ndarray, rate: float, task: str, rng: np.random.Generator) -> np.ndarray:
    """The noisy device of a regression or multi-label task: each row is hit with probability
    ``rate``; a regression row takes another hit row's targets (the hit rows' targets shuffled:
    plausible values, wrong rows, as a mislabelled log is), a multi-label row has each of its
    labels flipped with probability ``rate``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate!r}: expected a number in [0, 1]")
    noisy = np.array(y, copy=True)
    if task == "multilabel":
        flips = rng.random(noisy.shape) < rate
        noisy[flips] = 1 - noisy[flips]
        return noisy
    hit = np.flatnonzero(rng.random(len(y)) < rate)
    noisy[hit] = noisy[rng.permutation(hit)]
    return noisy


# ---- the user's own data


def own_dataset(data: Path, source: DataSource, *, per_device: bool, test_data: Path | None, test_fraction: float,
                column: str | None, rng: np.random.Generator,
                task: str = "classification") -> tuple[Dataset, list[np.ndarray] | None]:
    """The lab's run on the user's files, read with the agent's loader (``source`` is the agent's
    [data] table). ``per_device``: ``data`` holds one subdirectory per device, each read as that
    device would read it; ``column``: ``data`` is one CSV whose column of that name (a site, a
    user) says whose row it is. Returns the dataset and, when the files decide them, each device's
    indices into its training part (else None: a partitioner splits it). The test part is
    ``test_data``, or a ``test_fraction`` held out of each device's data (stratified by class for a
    classifier, so that no device loses a class it holds to the test set alone). ``num_classes``
    is the number of outputs: classes, labels (multilabel) or targets (regression). Raises
    ConfigError naming the key."""
    holdout = ((lambda y, key: _stratified_holdout(_classes_of(y, key), test_fraction, rng)) if task == "classification"
               else (lambda y, key: np.sort(rng.permutation(len(y))[:max(1, round(test_fraction * len(y)))])))
    try:
        if per_device:
            folders = sorted(p for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
            if not folders:
                raise ConfigError(f"[simulation] data_dir {str(data)!r}: expected a directory with one subdirectory "
                                  "per device, each holding that device's data")
            shards = [load_local_data(folder, source) for folder in folders]
        elif column is not None:
            shards = _split_by_column(data, column, source)
        else:
            shards = [load_local_data(data, source)]
    except LocalDataError as exc:
        raise ConfigError(f"[simulation] {'data_dir' if per_device else 'data'}: {exc}") from None
    if test_data is not None:
        try:
            X_test, y_test = load_local_data(test_data, source)
        except LocalDataError as exc:
            raise ConfigError(f"[simulation] test_data: {exc}") from None
    elif per_device or column is not None:
        cuts = [holdout(y, "data") for _, y in shards]
        X_test, y_test = (np.concatenate(a) for a in zip(*[(X[c], y[c]) for (X, y), c in zip(shards, cuts)]))
        shards = [(np.delete(X, c, axis=0), np.delete(y, c, axis=0)) for (X, y), c in zip(shards, cuts)]
    else:
        (X, y), = shards
        cut = holdout(y, "data")
        X_test, y_test = X[cut], y[cut]
        shards = [(np.delete(X, cut, axis=0), np.delete(y, cut, axis=0))]
    shapes = sorted({X.shape[1:] for X, _ in shards})
    if len(shapes) > 1:
        raise ConfigError(f"[simulation] data_dir: the devices' samples differ in shape ({', '.join(map(str, shapes))}); "
                          "every device must read samples of one shape (see [data] image_size)")
    X_train, y_train = np.concatenate([X for X, _ in shards]), np.concatenate([y for _, y in shards])
    if X_test.shape[1:] != X_train.shape[1:]:
        raise ConfigError(f"[simulation] test_data: samples of shape {X_test.shape[1:]}, the training data's are "
                          f"{X_train.shape[1:]}")
    sizes = np.cumsum([len(y) for _, y in shards])[:-1]
    parts = np.split(np.arange(len(y_train)), sizes) if (per_device or column is not None) else None
    if task == "classification":
        y_train, y_test = _classes_of(y_train, "data"), _classes_of(y_test, "test_data")
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    else:
        num_classes = 1 if y_train.ndim == 1 else int(y_train.shape[1])
    return Dataset(X_train, y_train, X_test, y_test, tuple(X_train.shape[1:]), num_classes), parts


def _classes_of(y: np.ndarray, key: str) -> np.ndarray:
    """The simulation's federation is a classifier: y must be class indices."""
    if y.ndim != 1 or y.dtype.kind != "i" or y.min() < 0:
        raise ConfigError(f"[simulation] {key}: the simulation trains a classifier, so targets must be one "
                          f"non-negative integer label per sample; got y of shape {y.shape} ({y.dtype})")
    return y


def _split_by_column(path: Path, column: str, source: DataSource) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (X, y) per distinct value of ``column`` (in name order) of one CSV file with a header;
    the column says whose row it is, so it is not a feature."""
    if source.kind not in ("auto", "csv") or not path.is_file() or path.suffix.lower() != ".csv":
        raise ConfigError(f"[simulation] partition 'column:{column}': needs data = one CSV file with a header "
                          f"(and [data] format auto or csv); got {str(path)!r}")
    rows = read_csv_rows(path)
    header = [name.strip() for name in rows[0]] if rows else []
    if column not in header:
        raise ConfigError(f"[simulation] partition 'column:{column}': {path} has no column {column!r}; "
                          f"its header has {', '.join(header)}")
    where = header.index(column)
    owners = np.asarray([row[where].strip() if len(row) > where else "" for row in rows[1:]])
    try:
        table = np.asarray([[float(c) for i, c in enumerate(row) if i != where] for row in rows[1:]], dtype=np.float64)
    except ValueError as exc:
        raise LocalDataError(f"{path}: a cell outside column {column!r} is not a number ({exc})") from exc
    if table.ndim != 2 or table.shape[1] < source.label_columns + 1:
        raise LocalDataError(f"{path}: need feature columns and {source.label_columns} label column(s) beside {column!r}")
    L = source.label_columns
    shards = []
    for owner in sorted(set(owners)):
        rows_of = table[owners == owner]
        y = rows_of[:, -L:]
        shards.append(validated(path, rows_of[:, :-L], y[:, 0] if L == 1 else y))
    return shards
