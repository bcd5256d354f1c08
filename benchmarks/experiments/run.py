"""Run an experiment grid of simulated federations and summarise it (tables, JSON, PNG plots).

A grid TOML has a [base] document (the [simulation] and [strategy] tables of a simulation config),
a list of [[setting]] (data/model variations), a list of [[method]] (strategy variations) and
``seeds``; every setting × method × seed is one ``fedprune.coordinator.lab.simulate.run_simulation`` call.
Runs go to a pool of at most 2 processes with one torch thread each (the machine is shared), and
each run's JSON is cached under <out>/runs/, so re-running a grid only computes what is missing.

    .venv/bin/python benchmarks/experiments/run.py benchmarks/experiments/current.toml \
        --out benchmarks/results/current --workers 2

prints a Markdown table and writes <out>/summary.json, <out>/summary.md and per-setting plots.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

# Bump when the simulator changes what a run measures for the same config (2: the daemons over an
# in-memory broker, bytes as the links carried them; 3: the curves carry the downlink too).
ENGINE = 3

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tomllib  # noqa: E402

import numpy as np  # noqa: E402

from jobs import publish, run_jobs, save_figure  # noqa: E402  (beside this script)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of the grid as {setting, method, seed, doc} (doc = a simulation config document)."""
    runs = []
    base = grid.get("base", {})
    for setting in grid["setting"]:
        for method in grid["method"]:
            if method.get("only") and setting["label"] not in method["only"]:
                continue
            for seed in grid["seeds"]:
                doc = _merge(base, {k: v for k, v in setting.items() if k in ("simulation", "strategy")})
                doc = _merge(doc, {k: v for k, v in method.items() if k in ("simulation", "strategy")})
                doc = _merge(doc, {"simulation": {"seed": seed, "name": f"{setting['label']}/{method['label']}/s{seed}"}})
                runs.append({"setting": setting["label"], "method": method["label"], "seed": seed, "doc": doc})
    return runs


def _key(doc: dict[str, Any]) -> str:
    """Cache key of the fully resolved config, defaults included, so that a changed default
    recomputes a run instead of serving a result the current code would not produce. Fields a
    baseline ignores (it neither scores quality nor gates: the loss-quality signal's settings,
    its memory γ and the trust gate's memory) are left out, so changing their default does not
    recompute runs it cannot affect."""
    from fedprune.coordinator.lab.simulate import SimulationConfig

    resolved = SimulationConfig.from_dict(doc).to_dict()
    strategy = resolved["strategy"]
    if strategy["method"] != "fedprune":
        for name in [n for n in strategy if n == "quality" or n.startswith(("loss_", "rel_"))]:
            del strategy[name]
        del strategy["gamma"]
        del strategy["trust_gamma"]
    resolved["engine"] = ENGINE  # a result cached by another simulator is not this one's
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=list).encode()).hexdigest()[:16]


def run_one(job: tuple[dict[str, Any], str]) -> dict[str, Any]:
    run, cache_dir = job
    path = Path(cache_dir) / f"{_key(run['doc'])}.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch

    torch.set_num_threads(1)
    logging.getLogger("fedprune").setLevel(logging.ERROR)  # the daemons' warnings (gated updates) are in the results
    from fedprune.coordinator.lab.simulate import SimulationConfig, noise_summary, run_simulation

    start = time.perf_counter()
    result = run_simulation(SimulationConfig.from_dict(run["doc"]))
    n = len(result.client_sizes)
    evald = [r for r in result.rounds if "accuracy" in r]
    out = {
        "setting": run["setting"], "method": run["method"], "seed": run["seed"], "doc": run["doc"],
        "final_accuracy": result.final_score, "best_accuracy": result.best_score,
        "uplink_bytes_per_client": result.uplink_bytes / n, "downlink_bytes_per_client": result.downlink_bytes / n,
        "macs_per_client_round": float(np.mean([r["local_macs"] for r in result.rounds])) / n,
        "density": result.density, "seconds": time.perf_counter() - start,
        "curve": [[r["round"], r["accuracy"], r["cum_uplink_bytes"] / n, r["cum_downlink_bytes"] / n] for r in evald],
        "r_trace": {c: [[rec["round"], rec["scores"][c]["r"]] for rec in result.rounds if c in rec["scores"]]
                    for c in result.client_sizes},
        "final_psi": {c: s["psi"] for c, s in _last_scores(result).items()},
        "noisy_clients": result.noisy_clients, **noise_summary(result),
        "attackers": result.attackers, **_attack_summary(result),
    }
    path.write_text(json.dumps(out))
    return out


def _attack_summary(result) -> dict[str, float | None]:
    """How often the defences acted on attackers vs honest clients (gate, clip), and their final r."""
    bad = set(result.attackers)
    gated = {True: [], False: []}
    clipped = {True: [], False: []}
    for rec in result.rounds:
        for c, s in rec["scores"].items():
            gated[c in bad].append(bool(s.get("gated_by")))
            clipped[c in bad].append(s.get("clip_factor", 1.0) < 1.0)
    last = _last_scores(result)
    r_bad = [s["r"] for c, s in last.items() if c in bad]

    def frac(xs: list[bool]) -> float | None:
        return float(np.mean(xs)) if xs else None

    return {"gated_attackers": frac(gated[True]), "gated_honest": frac(gated[False]),
            "clipped_attackers": frac(clipped[True]), "clipped_honest": frac(clipped[False]),
            "r_attackers": float(np.mean(r_bad)) if r_bad else None}


def _last_scores(result) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for rec in result.rounds:
        last.update(rec["scores"])
    return last


def _ms(values: list[float], scale: float = 100.0) -> str:
    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def summarise(results: list[dict[str, Any]], grid: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    methods = [m["label"] for m in grid["method"]]
    lines, summary = [], {}
    for setting in [s["label"] for s in grid["setting"]]:
        lines += [f"\n### {setting}\n",
                  "| method | final acc (%) | best acc (%) | uplink MB/client | downlink MB/client | MMAC/client/round | r noisy/clean | min clean r / mean | min clean q | n |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for method in methods:
            rs = [r for r in results if r["setting"] == setting and r["method"] == method]
            if not rs:
                continue
            ratio = [r["r_ratio"] for r in rs if r["r_ratio"] is not None]
            minr = [r["min_clean_r_rel"] for r in rs if r["min_clean_r_rel"] is not None]
            minq = [r["min_clean_q"] for r in rs if r.get("min_clean_q") is not None]
            row = {
                "final": [r["final_accuracy"] for r in rs], "best": [r["best_accuracy"] for r in rs],
                "uplink_mb": float(np.mean([r["uplink_bytes_per_client"] for r in rs])) / 1e6,
                "downlink_mb": float(np.mean([r["downlink_bytes_per_client"] for r in rs])) / 1e6,
                "mmac": float(np.mean([r["macs_per_client_round"] for r in rs])) / 1e6,
                "r_ratio": float(np.mean(ratio)) if ratio else None,
                "min_clean_r_rel": float(np.min(minr)) if minr else None,
                "min_clean_q": float(np.min(minq)) if minq else None, "n": len(rs),
            }
            for key in ("gated_attackers", "gated_honest", "clipped_attackers", "clipped_honest"):
                vals = [r[key] for r in rs if r.get(key) is not None]
                row[key] = float(np.mean(vals)) if vals else None
            summary[f"{setting}/{method}"] = row
            ratio_s = "-" if row["r_ratio"] is None else f"{row['r_ratio']:.2f}"
            minr_s = "-" if row["min_clean_r_rel"] is None else f"{row['min_clean_r_rel']:.2f}"
            minq_s = "-" if row["min_clean_q"] is None else f"{row['min_clean_q']:.2f}"
            lines.append(
                f"| {method} | {_ms(row['final'])} | {_ms(row['best'])} | {row['uplink_mb']:.2f} | "
                f"{row['downlink_mb']:.2f} | {row['mmac']:.1f} | {ratio_s} | {minr_s} | {minq_s} | {row['n']} |")
    return "\n".join(lines) + "\n", summary


def plot(results: list[dict[str, Any]], grid: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    for setting in [s["label"] for s in grid["setting"]]:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for method in [m["label"] for m in grid["method"]]:
            rs = [r for r in results if r["setting"] == setting and r["method"] == method]
            if not rs:
                continue
            curves = np.array([r["curve"] for r in rs])  # seeds × rounds × (round, acc, cum uplink, cum downlink)
            mean = curves.mean(axis=0)
            axes[0].plot(mean[:, 0], 100 * mean[:, 1], label=method)
            axes[1].plot((mean[:, 2] + mean[:, 3]) / 1e6, 100 * mean[:, 1], label=method)
            if method == grid.get("plot_scores_of", "fedprune-0.8"):
                r0 = rs[0]
                for cid, pts in r0["r_trace"].items():
                    pts = np.array(pts)
                    axes[2].plot(pts[:, 0], pts[:, 1], color="tab:red" if cid in r0["noisy_clients"] else "tab:blue",
                                 lw=0.8, alpha=0.7)
                axes[2].plot([], [], color="tab:blue", label="clean")
                if r0["noisy_clients"]:
                    axes[2].plot([], [], color="tab:red", label="noisy")
                axes[2].set_title(f"r_n of {method}, seed {r0['seed']}")
        axes[0].set(xlabel="round", ylabel="test accuracy (%)", title=setting)
        axes[1].set(xlabel="cumulative bytes per client, uplink + downlink (MB)", ylabel="test accuracy (%)")
        axes[2].set(xlabel="round", ylabel="importance r_n")
        save_figure(fig, axes, out / f"{setting}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grid", help="grid TOML file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--workers", type=int, default=2, help="processes (at most 2 on the shared machine)")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the grid's seeds")
    parser.add_argument("--summarise-only", action="store_true", help="summarise the cached runs, compute nothing")
    args = parser.parse_args(argv)
    grid = tomllib.loads(Path(args.grid).read_text())
    if args.seeds:
        grid["seeds"] = args.seeds
    out = Path(args.out)
    cache = out / "runs"
    cache.mkdir(parents=True, exist_ok=True)
    runs = expand(grid)
    jobs = [(r, str(cache)) for r in runs]
    workers = max(1, min(2, args.workers))
    start = time.perf_counter()
    results = []
    if args.summarise_only:
        paths = [cache / f"{_key(r['doc'])}.json" for r in runs]
        results = [json.loads(p.read_text()) for p in paths if p.exists()]
    else:
        results = run_jobs(run_one, jobs, workers, lambda i, res: print(
            f"[{i}/{len(jobs)}] {res['setting']} {res['method']} s{res['seed']}: {100 * res['final_accuracy']:.1f}%",
            file=sys.stderr, flush=True))
    table, summary = summarise(results, grid)
    plot(results, grid, out)
    publish(out, table, summary, len(jobs), start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
