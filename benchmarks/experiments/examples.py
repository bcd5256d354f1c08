"""The three example projects (examples/images, sensors, tabular) at 80 % sparsity against dense
FedAvg and FedDST-style, with their bytes (docs/RESULTS.md, "Your own model: the three examples").

For each example and seed, the example's data maker writes its data into a scratch directory
(data seed = run seed: ``python -m fedprune_<x>.make_data --out DIR --devices 8 --seed S``), and
the example's own simulate.toml runs three times, only [strategy] method/sparsity and the seed
changed:

- ours:   method = "fedprune", sparsity = 0.8
- dense:  method = "fedavg",   sparsity = 0.0
- feddst: method = "feddst",   sparsity = 0.8

Everything else is the example's (model, [data], rounds, [strategy.local]) and the kit's defaults,
the links' int8 encodings included, for all three arms: bytes are the encoded messages as the
links carried them. Runs are cached under <out>/runs/ keyed by the resolved config and the
example's sources, so a re-run computes only what is missing.

    .venv/bin/python benchmarks/experiments/examples.py --out benchmarks/results/examples [--seeds 0 1 2] [--only images]

writes <out>/summary.json, <out>/summary.md and <out>/<example>.png.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tomllib  # noqa: E402

import numpy as np  # noqa: E402

from jobs import publish, run_jobs, save_figure  # noqa: E402  (beside this script)

ENGINE = 1  # bump when what a run records changes for the same config
EXAMPLES = ("images", "sensors", "tabular")
ARMS = {
    "ours": {"method": "fedprune", "sparsity": 0.8},
    "dense": {"method": "fedavg", "sparsity": 0.0},
    "feddst": {"method": "feddst", "sparsity": 0.8},
}
ARM_LABELS = {"ours": "ours 80 %", "dense": "dense FedAvg", "feddst": "FedDST-style 80 %"}
DEVICES = 8
# Issue 18's target: ours within 2 points of dense FedAvg (classification), or final RMSE within
# 5 % of dense's (regression), at <= 0.25 x dense FedAvg's uplink.
TARGET_POINTS = 2.0
TARGET_REL_RMSE = 0.05
TARGET_UPLINK = 0.25

for _name in EXAMPLES:  # the examples' packages, as `pip install -e examples/<x>` would provide
    _src = str(ROOT / "examples" / _name / "src")
    if _src not in sys.path:
        sys.path.insert(0, _src)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "examples" / n / "src") for n in EXAMPLES] + [p for p in [os.environ.get("PYTHONPATH")] if p])


def example_doc(example: str) -> dict[str, Any]:
    return tomllib.loads((ROOT / "examples" / example / "simulate.toml").read_text())


ROUNDS: int | None = None  # --rounds: a diagnostic override of the examples' rounds


def arm_doc(example: str, arm: str, seed: int) -> dict[str, Any]:
    """The example's simulate.toml with the arm's [strategy] method/sparsity and the run seed
    (data paths still relative, as in the file: "data/...")."""
    doc = copy.deepcopy(example_doc(example))
    doc["strategy"].update(ARMS[arm])
    if ROUNDS is not None:
        doc["strategy"]["rounds"] = ROUNDS
    doc["simulation"]["seed"] = seed
    doc["simulation"]["name"] = f"{example}/{arm}/s{seed}"
    return doc


def _sources_hash(example: str) -> str:
    h = hashlib.sha256()
    for path in sorted((ROOT / "examples" / example / "src").rglob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run_key(example: str, arm: str, seed: int) -> str:
    from fedprune.coordinator.lab.simulate import SimulationConfig

    resolved = SimulationConfig.from_dict(arm_doc(example, arm, seed)).to_dict()
    resolved.update(engine=ENGINE, sources=_sources_hash(example), devices=DEVICES)
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=list).encode()).hexdigest()[:12]
    return f"{example}-{arm}-s{seed}-{digest}"


def make_data(example: str, seed: int, scratch: Path) -> Path:
    """The example's data for this seed (made once per scratch directory)."""
    out = scratch / example / f"s{seed}"
    done = out / ".done"
    if not done.exists():
        maker = importlib.import_module(f"fedprune_{example}.make_data")
        maker.main(["--out", str(out), "--devices", str(DEVICES), "--seed", str(seed)])
        done.write_text("ok\n")
    return out


def _absolute(doc: dict[str, Any], data: Path) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    sim = doc["simulation"]
    for key in ("data_dir", "data", "test_data"):
        if sim.get(key):
            rel = Path(sim[key])
            sim[key] = str(data / rel.relative_to("data")) if rel.parts[0] == "data" else str(data / rel)
    return doc


def run_one(job: tuple[str, str, int, str, str, int | None]) -> dict[str, Any]:
    global ROUNDS
    example, arm, seed, cache_dir, scratch, ROUNDS = job
    path = Path(cache_dir) / f"{run_key(example, arm, seed)}.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch

    torch.set_num_threads(1)
    logging.getLogger("fedprune").setLevel(logging.ERROR)
    from fedprune.coordinator.lab.simulate import SimulationConfig, run_simulation

    data = make_data(example, seed, Path(scratch))
    doc = _absolute(arm_doc(example, arm, seed), data)
    start = time.perf_counter()
    result = run_simulation(SimulationConfig.from_dict(doc))
    seconds = time.perf_counter() - start
    evald = [r for r in result.rounds if r.get("score") is not None]
    last = evald[-1]
    extra = [k for k in ("rmse", "mae", "r2", "accuracy") if k in last]
    out = {
        "example": example, "arm": arm, "seed": seed, "doc": arm_doc(example, arm, seed),
        "score_name": result.score_name, "final_score": result.final_score, "best_score": result.best_score,
        "final_metrics": {k: last[k] for k in extra},
        "uplink_bytes": result.uplink_bytes, "downlink_bytes": result.downlink_bytes,
        "n_clients": len(result.client_sizes), "train_samples": int(sum(result.client_sizes.values())),
        "rounds": len(result.rounds), "density": result.density, "model_parameters": result.model_parameters,
        "seconds": seconds,
        # round, score, cumulative uplink, cumulative downlink (all devices), then the extra metrics
        "curve_keys": ["round", "score", "cum_uplink_bytes", "cum_downlink_bytes", *extra],
        "curve": [[r["round"], r["score"], r["cum_uplink_bytes"], r["cum_downlink_bytes"], *[r.get(k) for k in extra]]
                  for r in evald],
    }
    path.write_text(json.dumps(out))
    return out


def _stat(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std()), "values": [float(x) for x in v]}


def _fmt(stat: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['sd'] * scale:.{digits}f}"


def summarise(results: list[dict[str, Any]], examples: list[str]) -> tuple[str, dict[str, Any]]:
    summary: dict[str, Any] = {
        "arms": {a: ARM_LABELS[a] + f" ({v['method']}, sparsity {v['sparsity']})" for a, v in ARMS.items()},
        "links": "kit defaults on every arm: update_values int8 (error feedback), task_values int8_delta",
        "target": {"points": TARGET_POINTS, "rel_rmse": TARGET_REL_RMSE, "uplink_ratio": TARGET_UPLINK},
        "examples": {},
    }
    lines = [
        "| example (final score, mean ± sd over seeds) | arm | final | best | final RMSE (× dense) | "
        "uplink MB, all devices | uplink × dense | downlink × dense | density | s/run | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for example in examples:
        rs_all = [r for r in results if r["example"] == example]
        if not rs_all:
            continue
        name = rs_all[0]["score_name"]
        regression = name == "r2"
        scale, unit = (1.0, "R²") if regression else (100.0, "%")
        by_arm = {a: sorted([r for r in rs_all if r["arm"] == a], key=lambda r: r["seed"]) for a in ARMS}
        dense = by_arm["dense"]
        dense_seed = {r["seed"]: r for r in dense}
        ex: dict[str, Any] = {"score_name": name, "rounds": rs_all[0]["rounds"], "n_clients": rs_all[0]["n_clients"],
                              "arms": {}}
        for arm, rs in by_arm.items():
            if not rs:
                continue
            row: dict[str, Any] = {
                "seeds": [r["seed"] for r in rs],
                "final": _stat([r["final_score"] for r in rs]), "best": _stat([r["best_score"] for r in rs]),
                "uplink_bytes": _stat([r["uplink_bytes"] for r in rs]),
                "downlink_bytes": _stat([r["downlink_bytes"] for r in rs]),
                "density": float(np.mean([r["density"] for r in rs])),
                # a device's uplink in a typical round: the median step of the cumulative count
                "uplink_bytes_per_device_round": float(np.median(np.concatenate(
                    [np.diff([c[2] for c in r["curve"]]) / r["n_clients"] for r in rs]))),
                "model_parameters": rs[0]["model_parameters"],
                "seconds": float(np.mean([r["seconds"] for r in rs])),
            }
            if regression:
                row["final_rmse"] = _stat([r["final_metrics"]["rmse"] for r in rs])
                row["final_mae"] = _stat([r["final_metrics"]["mae"] for r in rs])
            if dense:
                row["uplink_ratio"] = row["uplink_bytes"]["mean"] / float(np.mean([r["uplink_bytes"] for r in dense]))
                row["downlink_ratio"] = row["downlink_bytes"]["mean"] / float(np.mean([r["downlink_bytes"] for r in dense]))
                paired = [r for r in rs if r["seed"] in dense_seed]
                row["final_minus_dense"] = _stat([r["final_score"] - dense_seed[r["seed"]]["final_score"] for r in paired])
                if regression:
                    # relative RMSE error against dense on the same seed (same data): rmse / rmse_dense - 1
                    row["rmse_rel_to_dense"] = _stat([r["final_metrics"]["rmse"] / dense_seed[r["seed"]]["final_metrics"]["rmse"] - 1
                                                      for r in paired])
                if arm != "dense":
                    if regression:
                        quality_ok = row["final_rmse"]["mean"] <= (1 + TARGET_REL_RMSE) * by_mean(dense, "rmse")
                    else:
                        quality_ok = (row["final"]["mean"] - by_mean(dense, None)) * 100 >= -TARGET_POINTS
                    row["target"] = {"quality": bool(quality_ok), "uplink": bool(row["uplink_ratio"] <= TARGET_UPLINK),
                                     "met": bool(quality_ok and row["uplink_ratio"] <= TARGET_UPLINK)}
            ex["arms"][arm] = row
            rmse = "-"
            if regression:
                rel = row.get("rmse_rel_to_dense")
                rmse = f"{_fmt(row['final_rmse'])} kWh" + (f" ({1 + rel['mean']:.3f})" if rel else "")
            up = f"{row.get('uplink_ratio', float('nan')):.3f}"
            down = f"{row.get('downlink_ratio', float('nan')):.3f}"
            digits = 3 if regression else 1
            lines.append(
                f"| {example} ({unit}) | {ARM_LABELS[arm]} | {_fmt(row['final'], scale, digits)} | "
                f"{_fmt(row['best'], scale, digits)} | {rmse} | {row['uplink_bytes']['mean'] / 1e6:.3f} | {up} | {down} | "
                f"{row['density']:.2f} | {row['seconds']:.0f} | {len(rs)} |")
        summary["examples"][example] = ex
    lines.append("")
    lines.append("Target (issue 18): ours within 2 points of dense FedAvg (regression: final RMSE within 5 % "
                 "of dense's) at <= 0.25 × its uplink.")
    for example, ex in summary["examples"].items():
        for arm in ("ours", "feddst"):
            t = ex["arms"].get(arm, {}).get("target")
            if t:
                lines.append(f"- {example} {ARM_LABELS[arm]}: {'met' if t['met'] else 'missed'} "
                             f"(quality {'ok' if t['quality'] else 'missed'}, uplink {'ok' if t['uplink'] else 'missed'})")
    return "\n".join(lines) + "\n", summary


def by_mean(rs: list[dict[str, Any]], metric: str | None) -> float:
    return float(np.mean([r["final_metrics"][metric] if metric else r["final_score"] for r in rs]))


def plot(results: list[dict[str, Any]], examples: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    for example in examples:
        rs_all = [r for r in results if r["example"] == example]
        if not rs_all:
            continue
        regression = rs_all[0]["score_name"] == "r2"
        scale = 1.0 if regression else 100.0
        ylabel = "test R²" if regression else "test accuracy (%)"
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        lows = []
        for arm in ARMS:
            rs = [r for r in rs_all if r["arm"] == arm]
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            curves = np.array([[row[:4] for row in r["curve"][:n]] for r in rs], dtype=float)
            mean = curves.mean(axis=0)
            label = f"{ARM_LABELS[arm]} ({len(rs)} seeds)"
            axes[0].plot(mean[:, 0], scale * mean[:, 1], label=label)
            axes[1].plot(mean[:, 2] / 1e6, scale * mean[:, 1], label=label)
            lows.append(float(np.quantile(scale * mean[:, 1], 0.2)))
        axes[0].set(xlabel="round", ylabel=ylabel, title=f"{example}: mean over seeds")
        axes[1].set(xlabel="cumulative uplink, all devices (MB)", ylabel=ylabel, title="against uplink bytes")
        if regression and lows:  # early rounds' R² can be far below 0
            for ax in axes:
                ax.set_ylim(bottom=max(min(lows), -1.0), top=1.0)
        save_figure(fig, axes, out / f"{example}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=EXAMPLES, help="these examples only")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--workers", type=int, default=1, help="processes (at most 2 on the shared machine)")
    parser.add_argument("--rounds", type=int, help="diagnostics: override every example's rounds (not the documented runs)")
    parser.add_argument("--scratch", help="where the generated data goes (default: a temporary directory)")
    parser.add_argument("--summarise-only", action="store_true", help="summarise the cached runs, compute nothing")
    args = parser.parse_args(argv)
    global ROUNDS
    ROUNDS = args.rounds
    examples = list(args.only or EXAMPLES)
    out = Path(args.out)
    cache = out / "runs"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.scratch:
        scratch = Path(args.scratch)
        scratch.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="fedprune-examples-")
        scratch = Path(tmp.name)
    jobs = [(e, a, s, str(cache), str(scratch), args.rounds) for e in examples for s in args.seeds for a in args.arms]
    start = time.perf_counter()
    results: list[dict[str, Any]] = []

    def report(i: int, res: dict[str, Any]) -> None:
        s = res["final_score"] * (1 if res["score_name"] == "r2" else 100)
        print(f"[{i}/{len(jobs)}] {res['example']} {res['arm']} s{res['seed']}: {res['score_name']} {s:.3f}, "
              f"uplink {res['uplink_bytes'] / 1e6:.3f} MB, {res['seconds']:.0f} s", file=sys.stderr, flush=True)

    try:
        if args.summarise_only:
            for e, a, s, *_ in jobs:
                p = cache / f"{run_key(e, a, s)}.json"
                if p.exists():
                    results.append(json.loads(p.read_text()))
        else:
            workers = max(1, min(2, args.workers))
            if workers > 1:
                for e in examples:  # make each seed's data once, before the workers race for it
                    for s in args.seeds:
                        if not all((cache / f"{run_key(e, a, s)}.json").exists() for a in args.arms):
                            make_data(e, s, scratch)
            results = run_jobs(run_one, jobs, workers, report)
    finally:
        if tmp is not None:
            tmp.cleanup()
    # The summary covers every example with cached runs for these seeds, not only those run now.
    shown = []
    for e in EXAMPLES:
        for s in args.seeds:
            for a in args.arms:
                p = cache / f"{run_key(e, a, s)}.json"
                if p.exists():
                    shown.append(json.loads(p.read_text()))
    shown_examples = [e for e in EXAMPLES if any(r["example"] == e for r in shown)]
    table, summary = summarise(shown, shown_examples)
    summary["command"] = f".venv/bin/python benchmarks/experiments/examples.py --out {args.out} --seeds " + " ".join(
        map(str, args.seeds)) + (" --only " + " ".join(args.only) if args.only else "")
    summary["seeds"] = args.seeds
    summary["seconds_of_runs"] = float(sum(r["seconds"] for r in shown))
    plot(shown, shown_examples, out)
    publish(out, table, summary, len(jobs), start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
