"""Side-by-side report of the adversarial-client grid (benchmarks/robustness/grid.toml).

    .venv/bin/python benchmarks/experiments/run.py benchmarks/robustness/grid.toml \
        --out benchmarks/results/robustness --workers 2
    .venv/bin/python benchmarks/robustness/report.py benchmarks/results/robustness

prints, per dataset, final test accuracy for every attack × attacker fraction × aggregator, the
issue's two targets for each fedprune variant (beside the accuracy of the honest clients alone,
attack "absent", which bounds what any defence that drops attackers can reach), and how often the defences acted on attackers vs
honest clients; writes <dir>/report.md, <dir>/report.json and docs/robustness_<dataset>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OURS = ("ours", "ours-hardened")
ROBUST = ("median", "trimmed_mean", "krum")
LOSS_BUDGET = 2.0  # points against the attack-free accuracy, at 30 % attackers
BASELINE_MARGIN = 1.0  # points behind the best robust baseline


Key = tuple[str, str, int, str]  # dataset, attack, attackers %, method


def _split(setting: str) -> tuple[str, str, int]:
    """"digits-sign_flip-30" -> ("digits", "sign_flip", 30); ValueError for other labels."""
    dataset, rest = setting.split("-", 1)
    attack, fraction = rest.rsplit("-", 1)
    return dataset, attack, int(fraction)


def load(out_dir: Path) -> tuple[dict[Key, float], dict[Key, dict[str, Any]]]:
    """Accuracy and defence statistics per run of the current grid (summary.json holds only
    those, unlike runs/, which keeps every run ever cached)."""
    summary = json.loads((out_dir / "summary.json").read_text())
    acc: dict[Key, float] = {}
    rows: dict[Key, dict[str, Any]] = {}
    for label, row in summary.items():
        setting, method = label.rsplit("/", 1)
        try:
            key = (*_split(setting), method)
        except ValueError:
            print(f"skipping {label}: not a <dataset>-<attack>-<percent> setting", file=sys.stderr)
            continue
        acc[key] = 100 * float(np.mean(row["final"]))
        rows[key] = row
    return acc, rows


def targets(acc: dict, dataset: str, attacks: list[str], method: str) -> list[dict[str, Any]]:
    clean = acc.get((dataset, "none", 0, method))
    if clean is None:
        return []
    honest_only = acc.get((dataset, "absent", 30, method))
    rows = []
    for attack in [a for a in attacks if a != "absent"]:
        mine = acc.get((dataset, attack, 30, method))
        robust = {m: acc[(dataset, attack, 30, m)] for m in ROBUST if (dataset, attack, 30, m) in acc}
        if mine is None or not robust:
            continue
        best_name = max(robust, key=robust.get)
        rows.append({
            "dataset": dataset, "method": method, "attack": attack, "clean": clean, "attacked": mine,
            "loss": clean - mine, "loss_met": clean - mine < LOSS_BUDGET,
            "honest_only": honest_only,
            "best_robust": best_name, "best_robust_acc": robust[best_name],
            "behind_best": robust[best_name] - mine, "baseline_met": robust[best_name] - mine <= BASELINE_MARGIN,
        })
    return rows


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(acc: dict, dataset: str, attacks: list[str], methods: list[str]) -> list[str]:
    lines = [f"\n### {dataset}: final test accuracy (%)\n",
             "| attack | attackers | " + " | ".join(methods) + " |",
             "| --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    rows = [("none", 0)] + [(a, f) for a in attacks for f in (10, 30)]
    for attack, fraction in rows:
        vals = [acc.get((dataset, attack, fraction, m)) for m in methods]
        if all(v is None for v in vals):
            continue
        best = max(v for v in vals if v is not None)
        cells = ["-" if v is None else (f"**{v:.1f}**" if v == best else f"{v:.1f}") for v in vals]
        lines.append(f"| {attack} | {fraction} % | " + " | ".join(cells) + " |")
    return lines


def gate_table(gates: dict[Key, dict[str, Any]], dataset: str, attacks: list[str]) -> list[str]:
    lines = [f"\n### {dataset}: how often the defences acted (fraction of client-rounds, 30 % attackers)\n",
             "| attack | method | clipped: attackers / honest | gated: attackers / honest |",
             "| --- | --- | --- | --- |"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for attack in attacks:
        for method in OURS:
            run = gates.get((dataset, attack, 30, method))
            if run is None:
                continue
            lines.append(f"| {attack} | {method} | {f(run.get('clipped_attackers'))} / {f(run.get('clipped_honest'))} | "
                         f"{f(run.get('gated_attackers'))} / {f(run.get('gated_honest'))} |")
    return lines


def plot(acc: dict, dataset: str, attacks: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    width = 0.8 / len(methods)
    x = np.arange(len(attacks))
    for ax, fraction in zip(axes, (10, 30)):
        for i, method in enumerate(methods):
            vals = [acc.get((dataset, a, fraction, method), np.nan) for a in attacks]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=method)
        clean = acc.get((dataset, "none", 0, "ours"))
        if clean is not None:
            ax.axhline(clean, color="black", lw=0.8, ls="--", label="ours, no attack")
        ax.set_xticks(x, [a.replace("_", "\n") for a in attacks], fontsize=8)
        ax.set(title=f"{dataset}, {fraction} % attackers", ylabel="final test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="the --out folder of run.py for grid.toml")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs", help="where the PNGs go")
    args = parser.parse_args(argv)
    acc, gates = load(args.out_dir)
    order = OURS + ("fedavg",) + ROBUST
    methods = sorted({k[3] for k in acc}, key=lambda m: (order.index(m) if m in order else len(order), m))
    lines, report = [], {"accuracy": [], "targets": []}
    for dataset in sorted({k[0] for k in acc}):
        attacks = sorted({k[1] for k in acc if k[0] == dataset and k[1] != "none"})
        lines += table(acc, dataset, attacks, methods)
        lines += gate_table(gates, dataset, attacks)
        lines += [f"\n### {dataset}: targets at 30 % attackers\n",
                  "| method | attack | clean → attacked | loss < 2 | honest clients alone | best robust baseline | behind it ≤ 1 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for method in OURS:
            for row in targets(acc, dataset, attacks, method):
                report["targets"].append(row)
                lines.append(
                    f"| {method} | {row['attack']} | {row['clean']:.1f} → {row['attacked']:.1f} ({-row['loss']:+.1f}) | "
                    f"{'yes' if row['loss_met'] else '**no**'} | {_opt(row['honest_only'])} | "
                    f"{row['best_robust']} {row['best_robust_acc']:.1f} | "
                    f"{'yes' if row['baseline_met'] else '**no**'} ({-row['behind_best']:+.1f}) |")
        plot(acc, dataset, attacks, methods, args.plots / f"robustness_{dataset}.png")
    report["accuracy"] = [{"dataset": d, "attack": a, "attackers_pct": f, "method": m, "final_accuracy_pct": v}
                          for (d, a, f, m), v in sorted(acc.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out_dir / "report.md").write_text(text)
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
