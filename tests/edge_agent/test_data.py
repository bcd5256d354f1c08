"""Datasets, partitioners, label noise and a device's local files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedprune.common.data import DataSummary, LocalDataError, data_mismatch, load_inputs, load_local_data
from fedprune.common.data_source import DataSource
from fedprune.coordinator.lab.datasets import add_label_noise, load_dataset, partition_dirichlet, partition_iid, partition_quantity, split_validation


@pytest.mark.parametrize(
    "name, shape, n_train, n_test",
    [("digits", (1, 8, 8), None, None), ("mnist1d", (1, 40), 4000, 1000)],
)
def test_builtin_datasets_have_canonical_shapes_and_are_deterministic(name, shape, n_train, n_test):
    a, b = load_dataset(name, 0), load_dataset(name, 0)
    assert a.input_shape == shape and a.num_classes == 10
    assert a.X_train.shape[1:] == shape and a.X_train.dtype == np.float32
    assert a.y_train.dtype == np.int64 and set(np.unique(a.y_train)) == set(range(10))
    assert np.array_equal(a.X_train, b.X_train) and np.array_equal(a.y_test, b.y_test)
    if n_train is not None:
        assert (len(a.y_train), len(a.y_test)) == (n_train, n_test)
    a.X_train[:] = 0  # callers get copies: the cache must not be corrupted
    assert np.any(load_dataset(name, 0).X_train)


def test_digits_is_scaled_to_unit_range_with_a_stratified_seeded_split():
    ds = load_dataset("digits", 0)
    assert ds.X_train.min() >= 0.0 and ds.X_train.max() == 1.0
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert np.allclose(np.bincount(ds.y_test) / len(ds.y_test), 0.1, atol=0.02)
    other = load_dataset("digits", 1)
    assert not np.array_equal(ds.y_test, other.y_test)


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar10", 0)


def test_validation_split_comes_from_train_and_never_from_test(rng):
    ds = load_dataset("digits", 0)
    tuned = split_validation(ds, 0.2, rng)
    assert len(tuned.y_train) + len(tuned.y_test) == len(ds.y_train)
    rows = {r.tobytes() for r in ds.X_test}
    assert not any(r.tobytes() in rows for r in tuned.X_test)
    assert set(np.unique(tuned.y_test)) == set(range(10))


def _assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


@given(n=st.integers(1, 300), n_clients=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_iid_partition_covers_every_index_once_in_near_equal_shares(n, n_clients, seed):
    parts = partition_iid(np.zeros(n, dtype=np.int64), n_clients, np.random.default_rng(seed))
    _assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def _label_skew(y, parts, num_classes=10):
    """Mean total-variation distance between each client's label histogram and the global one."""
    global_hist = np.bincount(y, minlength=num_classes) / len(y)
    return np.mean([0.5 * np.abs(np.bincount(y[p], minlength=num_classes) / len(p) - global_hist).sum() for p in parts])


def test_dirichlet_partition_covers_every_index_respects_min_size_and_skews_with_low_beta():
    y = load_dataset("mnist1d", 0).y_train
    skew = {}
    for beta in (0.1, 0.5, 100.0):
        parts = partition_dirichlet(y, 20, beta, np.random.default_rng(5), min_size=15)
        _assert_exact_cover(parts, len(y))
        assert min(len(p) for p in parts) >= 15
        skew[beta] = _label_skew(y, parts)
    assert skew[0.1] > skew[0.5] > skew[100.0]
    assert skew[100.0] < 0.1 and skew[0.1] > 0.5


def test_dirichlet_partition_is_seeded_and_rejects_impossible_minimums():
    y = np.repeat(np.arange(10), 20)
    a = partition_dirichlet(y, 5, 0.5, np.random.default_rng(1))
    b = partition_dirichlet(y, 5, 0.5, np.random.default_rng(1))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    with pytest.raises(ValueError):
        partition_dirichlet(y, 21, 0.5, np.random.default_rng(1), min_size=10)
    with pytest.raises(ValueError):
        partition_dirichlet(y, 5, 0.0, np.random.default_rng(1))


@given(n_clients=st.integers(1, 30), min_size=st.integers(0, 10), seed=st.integers(0, 2**32 - 1))
def test_quantity_partition_covers_every_index_and_respects_min_size(n_clients, min_size, seed):
    y = np.arange(400) % 10
    parts = partition_quantity(y, n_clients, np.random.default_rng(seed), beta=0.3, min_size=min_size)
    assert len(parts) == n_clients
    _assert_exact_cover(parts, len(y))
    assert min(len(p) for p in parts) >= min_size


def test_quantity_partition_sizes_spread_more_with_low_beta():
    y = np.arange(4000) % 10
    spread = {
        beta: np.std([len(p) for p in partition_quantity(y, 20, np.random.default_rng(2), beta=beta)])
        for beta in (0.2, 100.0)
    }
    assert spread[0.2] > 5 * spread[100.0]


def test_symmetric_noise_replaces_labels_uniformly_at_the_given_rate():
    y = np.arange(20000) % 10
    noisy = add_label_noise(y, 0.5, 10, np.random.default_rng(3))
    # a replaced label may draw its own class: the wrong-label fraction is rate * (C - 1) / C.
    assert np.mean(noisy != y) == pytest.approx(0.45, abs=0.015)
    wrong = noisy[noisy != y]
    assert np.allclose(np.bincount(wrong, minlength=10) / len(wrong), 0.1, atol=0.01)
    assert np.array_equal(add_label_noise(y, 0.0, 10, np.random.default_rng(3)), y)


def test_pairwise_noise_flips_class_c_to_the_next_class():
    y = np.arange(20000) % 10
    noisy = add_label_noise(y, 0.3, 10, np.random.default_rng(4), kind="pairwise")
    flipped = noisy != y
    assert np.mean(flipped) == pytest.approx(0.3, abs=0.015)
    assert np.array_equal(noisy[flipped], (y[flipped] + 1) % 10)
    assert np.array_equal(add_label_noise(y, 1.0, 10, np.random.default_rng(4), kind="pairwise"), (y + 1) % 10)
    with pytest.raises(ValueError):
        add_label_noise(y, 1.5, 10, np.random.default_rng(4))
    with pytest.raises(ValueError):
        add_label_noise(y, 0.1, 10, np.random.default_rng(4), kind="asymmetric")


def test_local_data_reads_npz_and_csv_files_and_directories(tmp_path, rng):
    X1 = rng.random((5, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "a.npz", X=X1, y=np.arange(5))
    X, y = load_local_data(tmp_path / "a.npz")
    assert np.array_equal(X, X1) and y.dtype == np.int64 and list(y) == [0, 1, 2, 3, 4]

    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "b.csv").write_text("f0,f1,f2,label\n0.5,1,2,3\n1.5,2,3,0\n")
    (csv_dir / "c.csv").write_text("7,8,9,1\n")
    (csv_dir / "notes.txt").write_text("ignored")
    X, y = load_local_data(csv_dir)
    assert X.shape == (3, 3) and X.dtype == np.float32
    assert list(y) == [3, 0, 1] and X[0, 0] == 0.5


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("bad.npz", lambda p: p.write_bytes(b"not a zip"), "not a .npz archive"),
        ("nox.npz", lambda p: np.savez(p, y=np.arange(3)), "missing"),
        ("len.npz", lambda p: np.savez(p, X=np.zeros((3, 2)), y=np.arange(4)), "expected X of shape"),
        ("nan.npz", lambda p: np.savez(p, X=np.full((2, 2), np.nan), y=np.arange(2)), "NaN"),
        ("ynan.npz", lambda p: np.savez(p, X=np.zeros((2, 2)), y=np.array([0, np.nan])), "y contains NaN"),
        ("obj.npz", lambda p: np.savez(p, X=np.array(["a", "b"]).reshape(2, 1), y=np.arange(2)), "numeric"),
        ("text.csv", lambda p: p.write_text("a,b\nx,y\n"), "not a numeric CSV"),
        ("one.csv", lambda p: p.write_text("1\n2\n"), "feature column"),
        ("data.json", lambda p: p.write_text("{}"), "unsupported file type"),
    ],
)
def test_bad_local_files_raise_errors_naming_the_file(tmp_path, name, write, message):
    path = tmp_path / name
    write(path)
    with pytest.raises(LocalDataError, match=message) as info:
        load_local_data(path)
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_local_directories_must_hold_data_of_one_shape(tmp_path):
    with pytest.raises(LocalDataError, match="no .npz or .csv"):
        load_local_data(tmp_path)
    with pytest.raises(LocalDataError, match="no such file"):
        load_local_data(tmp_path / "missing")
    np.savez(tmp_path / "a.npz", X=np.zeros((2, 3)), y=np.arange(2))
    np.savez(tmp_path / "b.npz", X=np.zeros((2, 4)), y=np.arange(2))
    with pytest.raises(LocalDataError, match="disagree"):
        load_local_data(tmp_path)


def _savez_bytes(tmp_path: Path, n: int = 116) -> bytes:
    np.savez(tmp_path / "whole.npz", X=np.zeros((n, 13), np.float32), y=np.arange(n) % 3)
    return (tmp_path / "whole.npz").read_bytes()


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_a_truncated_npz_is_a_local_data_error_saying_so(tmp_path, cut):
    """Cut anywhere, np.load raised zipfile.BadZipFile (or zlib.error), which escaped as a traceback."""
    whole = _savez_bytes(tmp_path)
    path = tmp_path / "data" / "part.npz"
    path.parent.mkdir()
    path.write_bytes(whole[: int(len(whole) * cut)])
    with pytest.raises(LocalDataError, match=r"part\.npz: damaged or truncated \.npz archive"):
        load_local_data(path.parent)


def test_random_bytes_in_an_npz_are_not_blamed_on_pickling(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(LocalDataError, match=r"noise\.npz: not a \.npz archive") as info:
        load_local_data(path)
    assert "pickle" not in str(info.value)


def test_one_data_set_in_two_formats_is_refused_and_distinct_shards_are_concatenated(tmp_path):
    X, y = np.ones((116, 13), np.float32), np.arange(116) % 3
    np.savez(tmp_path / "data.npz", X=X, y=y)
    np.savetxt(tmp_path / "data.csv", np.column_stack([X, y]), delimiter=",")
    with pytest.raises(LocalDataError, match=r"data\.csv and data\.npz .*loaded twice; keep one"):
        load_local_data(tmp_path)
    (tmp_path / "data.csv").rename(tmp_path / "more.csv")
    X2, _ = load_local_data(tmp_path)
    assert len(X2) == 232


def test_inputs_to_predict_on_accept_a_header_and_name_the_file_when_wrong(tmp_path):
    csv = tmp_path / "samples.csv"
    csv.write_text("f0,f1,f2\n0.5,1,2\n1.5,2,3\n")
    X, y = load_inputs(csv)
    assert X.shape == (2, 3) and X.dtype == np.float32 and y is None
    X, y = load_inputs(csv, labelled=True)
    assert X.shape == (2, 2) and list(y) == [2, 3]
    with pytest.raises(LocalDataError, match="missing.csv: no such file"):
        load_inputs(tmp_path / "missing.csv")
    np.savez(tmp_path / "x.npz", X=np.zeros((4, 3)))
    X, y = load_inputs(tmp_path / "x.npz")
    assert X.shape == (4, 3) and y is None


@pytest.mark.parametrize("shape, labels, input_shape, expected", [
    ((13,), (0, 1, 2), (64,), "13 features, model expects 64"),
    ((64,), (0, 9), (1, 8, 8), None),  # flat rows of the right size
    ((1, 8, 8), (0, 9), (1, 8, 8), None),
    ((8, 8), (0,), (64,), r"samples of shape \(8, 8\), model expects \(64,\) or flat rows"),
    ((13,), (0, 3, 10, 99), (13,), r"labels 10, 99 outside 0\.\.9"),
    ((13,), (0, 10, 11, 12, 13, 14), (13,), "labels 10, 11, 12, 13 and 1 more outside"),
    ((13,), (3, 10), (64,), "13 features, model expects 64; labels 10 outside 0..9"),
])
def test_data_mismatch_names_features_and_labels_that_do_not_fit(shape, labels, input_shape, expected):
    summary = DataSummary(shape, 100, labels)
    problem = data_mismatch(summary, input_shape, 10)  # the 3-argument call: classification
    if expected is None:
        assert problem is None
    else:
        assert re.search(expected, problem), problem


def test_data_summary_keeps_shape_count_and_distinct_labels():
    summary = DataSummary.of(np.zeros((5, 13), np.float32), np.array([3, 1, 3, 99, 1]))
    assert summary == DataSummary((13,), 5, (1, 3, 99))


def test_targets_are_read_as_they_are_and_judged_by_the_fit_check(tmp_path):
    """Fractional and negative targets load (regression); only the task kind says they cannot be labels."""
    (tmp_path / "frac.csv").write_text("1,2,0.5\n3,4,-1.25\n")
    X, y = load_local_data(tmp_path / "frac.csv")
    assert X.shape == (2, 2) and y.dtype == np.float32 and y.tolist() == [0.5, -1.25]
    summary = DataSummary.of(X, y)
    assert summary.fractional and summary.labels == ()
    assert data_mismatch(summary, (2,), 10) == "labels must be integers, found fractional targets (for those: task regression)"
    assert data_mismatch(summary, (2,), 1, "regression") is None
    np.savez(tmp_path / "neg.npz", X=np.zeros((2, 2)), y=np.array([0, -1]))
    X, y = load_local_data(tmp_path / "neg.npz")
    assert y.dtype == np.int64
    assert data_mismatch(DataSummary.of(X, y), (2,), 10) == "labels must be non-negative, found -1"


def test_label_columns_make_a_csv_multi_target_and_npz_or_csv_formats_read_only_their_kind(tmp_path):
    (tmp_path / "a.csv").write_text("f0,f1,cat,dog\n0.5,1,1,0\n1.5,2,1,1\n")
    np.savez(tmp_path / "b.npz", X=np.zeros((3, 2)), y=np.zeros((3, 2)))
    X, y = load_local_data(tmp_path / "a.csv", DataSource(label_columns=2))
    assert X.shape == (2, 2) and y.shape == (2, 2) and y.dtype == np.int64 and y.tolist() == [[1, 0], [1, 1]]
    X, y = load_local_data(tmp_path, DataSource(format="csv", label_columns=2))
    assert len(X) == 2  # b.npz is not read
    X, y = load_local_data(tmp_path, DataSource(format="npz"))
    assert X.shape == (3, 2) and y.shape == (3, 2)
    X, y = load_local_data(tmp_path, DataSource(label_columns=2))
    assert X.shape == (5, 2) and y.shape == (5, 2)
    with pytest.raises(LocalDataError, match=r"a\.csv: unsupported file type '\.csv'; expected \.npz"):
        load_local_data(tmp_path / "a.csv", DataSource(format="npz"))
    with pytest.raises(LocalDataError, match=r"a\.csv: need at least one feature column and 4 target columns \(\[data\] label_columns\)"):
        load_local_data(tmp_path / "a.csv", DataSource(label_columns=4))
    np.savez(tmp_path / "c.npz", X=np.zeros((1, 2)), y=np.zeros(1))
    with pytest.raises(LocalDataError, match=r"files disagree on the target shape \(a\.csv: \(2,\), b\.npz: \(2,\), c\.npz: \(\)\)"):
        load_local_data(tmp_path, DataSource(label_columns=2))


@pytest.mark.parametrize("y, input_shape, outputs, task, expected", [
    (np.array([0.5, 1.5]), (13,), 1, "regression", None),
    (np.zeros((2, 3)), (13,), 1, "regression", "targets have 3 columns, model has 1 output"),
    (np.zeros(2), (13,), 2, "regression", "targets have 1 column, model has 2 outputs"),
    (np.zeros((2, 1)), (13,), 1, "regression", None),
    (np.array([[0, 1, 1], [1, 0, 0]]), (13,), 3, "multilabel", None),
    (np.array([[0, 2, 1], [5, 0, 0]]), (13,), 3, "multilabel", "multi-label targets must be 0 or 1, found 2, 5"),
    (np.array([[0, 0.5], [1, 0]]), (13,), 2, "multilabel", "multi-label targets must be 0 or 1, found fractional values"),
    (np.array([[0, 1], [1, 0]]), (64,), 3, "multilabel", "13 features, model expects 64; targets have 2 columns, model has 3 outputs"),
    (np.array([[0, 1], [1, 0]]), (13,), 10, "classification", "targets have 2 columns, classification needs one label per sample"),
])
def test_the_fit_check_judges_targets_by_the_task_kind(y, input_shape, outputs, task, expected):
    problem = data_mismatch(DataSummary.of(np.zeros((len(y), 13), np.float32), y), input_shape, outputs, task)
    assert problem == expected if expected is None or ";" in expected else problem.startswith(expected), problem


def test_the_fit_check_refuses_an_unknown_task_and_counts_labels_it_does_not_keep():
    with pytest.raises(ValueError, match="task 'ranking'"):
        data_mismatch(DataSummary((13,), 1, (0,)), (13,), 10, "ranking")
    summary = DataSummary.of(np.zeros((3000, 1), np.float32), np.arange(3000))
    assert len(summary.labels) == 1024 and summary.more_labels == 1976  # the idle agent keeps a bounded summary
    assert data_mismatch(summary, (1,), 1000) == "labels 1000, 1001, 1002, 1003 and 1996 more outside 0..999"
