"""Running an experiment's simulations: in this process, or on two forked workers (the
machine's two cores), reporting each result as it arrives."""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def run_jobs(run_one: Callable[[Any], dict], jobs: Sequence[Any], workers: int,
             report: Callable[[int, dict], None]) -> list[dict]:
    """``run_one`` over ``jobs`` (results in completion order), ``report(i, result)`` after each."""
    results: list[dict] = []
    if workers <= 1:
        for i, job in enumerate(jobs, 1):
            results.append(run_one(job))
            report(i, results[-1])
        return results
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for i, result in enumerate(pool.imap_unordered(run_one, jobs), 1):
            results.append(result)
            report(i, result)
    return results


def publish(out: Path, table: str, summary: dict, runs: int, started: float) -> None:
    """summary.json and summary.md under ``out``; the table on stdout, the time on stderr."""
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(table)
    print(table)
    print(f"{runs} runs in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def save_figure(fig: Any, axes: Sequence[Any], path: Path) -> None:
    """Grid and legend on every axis that has labelled lines, then the PNG, and the figure closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
