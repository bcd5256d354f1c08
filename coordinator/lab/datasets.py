"""The lab's datasets: the built-in benchmarks, validation splits, partitions across simulated
clients and label noise.

Every dataset has a canonical ``input_shape`` with a channel axis (digits (1, 8, 8), mnist1d
(1, 40)); ``X`` is float32 (N, *input_shape), labels int64. Randomness arrives as a seeded
``numpy.random.Generator`` (or an int seed for the datasets), so every split, partition and noisy
label set is reproducible. sklearn and mnist1d are coordinator extras, imported only when a
dataset is requested: a device never loads this module.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, replace

import numpy as np

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


# ---- a device's local data
