"""Timing shared by the benchmarks: one warm-up call, then the median of repeated calls
(robust to a shared machine's spikes)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm caches (allocator, static X25519 secrets, onnxruntime's first run)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
