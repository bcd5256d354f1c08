"""Two summaries of the same grid side by side: did a change move any row by more than its seed spread?

    .venv/bin/python benchmarks/experiments/compare.py OLD/summary.json NEW/summary.json [--out TABLE]

OLD may also be ``REV:path`` (read with ``git show``), e.g. the committed summary before a re-run:
``HEAD:benchmarks/results/current/summary.json``. For every setting/method row present in both, it
prints the final accuracy (mean ± std over seeds) before and after, the difference of the means,
and whether that difference exceeds the larger of the two standard deviations (``moved``). Byte
columns are listed as well: they change by design when the accounting changes. Exit 0 always: a
row that moved is a finding to read, not a failure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any


def load(where: str) -> dict[str, Any]:
    if ":" in where and not Path(where).exists():
        return json.loads(subprocess.run(["git", "show", where], capture_output=True, text=True, check=True).stdout)
    return json.loads(Path(where).read_text())


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], int, int]:
    lines = ["| row | final acc % before | after | Δ mean | moved beyond seed spread | uplink MB/client before → after |",
             "| --- | --- | --- | --- | --- | --- |"]
    moved = compared = 0
    for row in sorted(set(old) & set(new)):
        (m0, s0), (m1, s1) = spread(old[row]["final"]), spread(new[row]["final"])
        beyond = abs(m1 - m0) > max(s0, s1)
        moved += beyond
        compared += 1
        lines.append(f"| {row} | {100 * m0:.1f} ± {100 * s0:.1f} | {100 * m1:.1f} ± {100 * s1:.1f} | "
                     f"{100 * (m1 - m0):+.1f} | {'**yes**' if beyond else 'no'} | "
                     f"{old[row]['uplink_mb']:.2f} → {new[row]['uplink_mb']:.2f} |")
    return lines, moved, compared


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    lines, moved, compared = compare(load(args.old), load(args.new))
    lines.append(f"\n{moved} of {compared} rows moved by more than their seed spread.")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
