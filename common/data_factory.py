"""A user's data factory, named by import path: ``"package.module:function"``, called as
``function(path, **args)``. Whatever it returns passes the same checks as a file's contents,
so a factory can read any format without the agent learning it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedprune.common.data import LocalDataError
from fedprune.common.data_source import DataSource
from fedprune.common.references import UnresolvedReference, resolve_callable


def call_factory(path: Path, source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) as the factory returns them; LocalDataError names the factory, the path and the fix."""
    spec = source.factory
    where = f"{path}: [data] factory {spec!r}"
    try:
        function = resolve_callable(spec)
    except UnresolvedReference as exc:
        raise LocalDataError(f"{where}: {exc}; install its package in the agent's environment or add its folder "
                             "to PYTHONPATH, and name a function that takes (path, **args) and returns (X, y)") from None
    try:
        result = function(path, **source.args)
    except Exception as exc:  # the user's code: any failure is reported as theirs, with the path
        raise LocalDataError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(a, np.ndarray) for a in result)):
        got = type(result).__name__ + (f" of {', '.join(type(a).__name__ for a in result)}"
                                       if isinstance(result, (tuple, list)) else "")
        raise LocalDataError(f"{where} returned {got}; it must return a tuple (X, y) of numpy arrays "
                             "(convert tensors with .numpy())")
    return result
