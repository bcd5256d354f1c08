"""Check a grid's summary against the issue's targets; prints a Markdown table.

    .venv/bin/python benchmarks/experiments/targets.py benchmarks/results/current/summary.json

Labels follow benchmarks/experiments/current.toml: "<dataset>-<model>-b<beta>-<clean|sym|pair>"
settings and the methods "fedavg-dense", "feddst-0.8", "ours-0.8". A target whose runs are
missing from the summary is reported as "not run". ``--suffix=S`` reads methods labelled
"<method>S" instead (e.g. "ours-0.8-b16" in a grid that compares batch sizes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _mean(summary: dict, key: str) -> float | None:
    row = summary.get(key)
    return None if row is None else 100.0 * float(np.mean(row["final"]))


def checks(summary: dict) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []

    def add(name: str, detail: str, ok: bool | None) -> None:
        out.append((name, detail, ok))

    settings = sorted({k.rsplit("/", 1)[0] for k in summary})
    for s in [s for s in settings if s.endswith("b0.5-clean")]:
        dense, ours = _mean(summary, f"{s}/fedavg-dense"), _mean(summary, f"{s}/ours-0.8")
        tol = 1.5 if s.startswith("digits") else 3.0
        if dense is None or ours is None:
            add(f"clean 80 % within {tol} of dense: {s}", "not run", None)
            continue
        add(f"clean 80 % within {tol} of dense: {s}", f"ours {ours:.1f} vs dense {dense:.1f} ({ours - dense:+.1f})",
            ours >= dense - tol)
    for s in [s for s in settings if s.endswith("-clean")]:
        dst, ours = _mean(summary, f"{s}/feddst-0.8"), _mean(summary, f"{s}/ours-0.8")
        if dst is not None and ours is not None:
            add(f"clean: ours ≥ FedDST-style − 0.5: {s}", f"ours {ours:.1f} vs FedDST {dst:.1f} ({ours - dst:+.1f})",
                ours >= dst - 0.5)
    for s in [s for s in settings if s.endswith("-sym") or s.endswith("-pair")]:
        clean = s.rsplit("-", 1)[0] + "-clean"
        fa_c, fa_n = _mean(summary, f"{clean}/fedavg-dense"), _mean(summary, f"{s}/fedavg-dense")
        dst_n, ours_n = _mean(summary, f"{s}/feddst-0.8"), _mean(summary, f"{s}/ours-0.8")
        ours_c = _mean(summary, f"{clean}/ours-0.8")
        if None in (fa_c, fa_n, dst_n, ours_n, ours_c):
            add(f"noise: {s}", "not run", None)
            continue
        loss = fa_c - fa_n
        add(f"noise strong enough (FedAvg loses ≥ 3): {s}", f"FedAvg {fa_c:.1f} → {fa_n:.1f} ({-loss:+.1f})", loss >= 3)
        add(f"noise: ours recovers ≥ half of FedAvg's loss: {s}", f"ours {ours_n:.1f} vs FedAvg {fa_n:.1f} "
            f"+ half of {loss:.1f} = {fa_n + 0.5 * loss:.1f}", ours_n >= fa_n + 0.5 * loss)
        add(f"noise: ours loses ≤ half of FedAvg's loss: {s}", f"ours {ours_c:.1f} → {ours_n:.1f} ({ours_n - ours_c:+.1f}) "
            f"vs half of {loss:.1f}", ours_c - ours_n <= 0.5 * loss)
        add(f"noise: ours > FedDST-style: {s}", f"{ours_n:.1f} vs {dst_n:.1f}", ours_n > dst_n)
        add(f"noise: ours > dense FedAvg: {s}", f"{ours_n:.1f} vs {fa_n:.1f}", ours_n > fa_n)
        row = summary[f"{s}/ours-0.8"]
        add(f"noisy mean r ≤ ½ clean mean r: {s}", f"ratio {row['r_ratio']:.2f}", row["r_ratio"] <= 0.5)
        add(f"no clean client at q = 0 (q ≤ 0.01): {s}", f"min clean q {row['min_clean_q']:.2f}", row["min_clean_q"] > 0.01)
    for key, row in sorted(summary.items()):
        s, m = key.rsplit("/", 1)
        if m == "ours-0.8" and f"{s}/fedavg-dense" in summary:
            dense = summary[f"{s}/fedavg-dense"]["uplink_mb"]
            add(f"uplink ≤ 0.25 × dense: {s}", f"{row['uplink_mb']:.2f} / {dense:.2f} MB = {row['uplink_mb'] / dense:.3f}",
                row["uplink_mb"] <= 0.25 * dense)
    return out


def main(argv: list[str]) -> int:
    summary = json.loads(Path(argv[1]).read_text())
    suffix = next((a.split("=", 1)[1] for a in argv[2:] if a.startswith("--suffix=")), "")
    if suffix:
        summary = {k[: -len(suffix)]: v for k, v in summary.items() if k.endswith(suffix)}
    print("| target | measured | met |\n| --- | --- | --- |")
    for name, detail, ok in checks(summary):
        print(f"| {name} | {detail} | {'-' if ok is None else ('yes' if ok else '**no**')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
