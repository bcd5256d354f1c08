"""Sensor recordings: CSV files with a header (a timestamp column, channel columns, target
columns) cut into windows of ``window`` rows every ``stride`` rows, read as float32
(N, channels, window).

A window never spans two files (each is one recording) nor a step between timestamps larger
than ``max_gap`` (the sensor was off: the rows either side are not one signal). A window's
target is its last row's: what a model running on the live stream predicts at that moment, and
defined for regression and multi-label targets too, where a majority vote is not.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np

from fedprune.common.data import LocalDataError, read_csv_rows
from fedprune.common.data_source import DataSource


def read_sensor_csv(path: Path, source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    """Windows of one CSV file, or of every ``*.csv`` in a directory (name order, one recording each)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
        if not files:
            raise LocalDataError(f"{path}: no .csv files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise LocalDataError(f"{path}: no such file or directory")
    parts = [_windows(f, source) for f in files]
    kept = [(f, X, y) for f, (X, y) in zip(files, parts) if len(X)]
    if not kept:
        raise LocalDataError(f"{path}: no recording (or stretch between gaps) has {source.window} rows; "
                             "lower [data] window or raise [data] max_gap")
    headers = {X.shape[1] for _, X, _ in kept}
    if len(headers) > 1:
        detail = ", ".join(f"{f.name}: {X.shape[1]}" for f, X, _ in kept)
        raise LocalDataError(f"{path}: files disagree on the number of channels ({detail})")
    return np.concatenate([X for _, X, _ in kept]), np.concatenate([y for _, _, y in kept])


def _windows(path: Path, source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    times, channels, targets = _read(path, source)
    stride = source.stride or source.window
    cuts = np.flatnonzero(np.diff(times) < 0)
    if len(cuts):
        raise LocalDataError(f"{path}: timestamps go back at data row {cuts[0] + 3}; sort the recording by time")
    breaks = np.flatnonzero(np.diff(times) > source.max_gap) + 1 if source.max_gap is not None else np.array([], int)
    starts = []
    for begin, end in zip(np.r_[0, breaks], np.r_[breaks, len(times)]):
        starts += range(begin, end - source.window + 1, stride)
    index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(source.window)
    X = channels[index].transpose(0, 2, 1) if len(starts) else np.zeros((0, channels.shape[1], source.window))
    y = targets[index[:, -1]] if len(starts) else targets[:0]
    return X.astype(np.float32), y[:, 0] if y.shape[1] == 1 else y


def _read(path: Path, source: DataSource) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Timestamps (float: numbers as written, ISO 8601 as seconds), channels and targets, as float64."""
    rows = read_csv_rows(path)
    if not rows:
        raise LocalDataError(f"{path}: empty file; a sensor CSV starts with a header row")
    header = [name.strip() for name in rows[0]]
    if source.timestamp_column and source.timestamp_column not in header:
        raise LocalDataError(f"{path}: no column {source.timestamp_column!r} ([data] timestamp_column); "
                             f"the header has {', '.join(header)}")
    stamp = header.index(source.timestamp_column) if source.timestamp_column else 0
    n_targets = source.label_columns
    target_cols = list(range(len(header) - n_targets, len(header)))
    channel_cols = [i for i in range(len(header) - n_targets) if i != stamp]
    if stamp in target_cols or not channel_cols:
        raise LocalDataError(f"{path}: need a timestamp column, at least one channel column and {n_targets} "
                             f"target column(s); the header has {', '.join(header)}")
    values = np.empty((len(rows) - 1, len(header)))
    times = np.empty(len(rows) - 1)
    for r, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise LocalDataError(f"{path}: data row {r + 2} has {len(row)} cells, the header {len(header)}")
        try:
            times[r] = _timestamp(row[stamp])
            values[r] = [float(cell) if i != stamp else 0.0 for i, cell in enumerate(row)]
        except ValueError as exc:
            raise LocalDataError(f"{path}: data row {r + 2}: {exc}") from exc
    if not np.all(np.isfinite(values)):
        raise LocalDataError(f"{path}: NaN or infinite values; drop or fill those rows")
    return times, values[:, channel_cols], values[:, target_cols]


def _timestamp(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        try:
            return datetime.fromisoformat(cell.strip()).timestamp()
        except ValueError:
            raise ValueError(f"timestamp {cell!r} is neither a number nor ISO 8601") from None
