"""Which groups should a regression device report for the loss-quality signal (§4.6)?

Classification devices report the received model's mean loss per class; the coordinator compares
each class with its median over the devices holding it (coordinator/core/contribution.py), and
its relative band ("loss_rel", the default) flags devices whose loss ratio is an outlier. For
regression there are no classes; this script compares three groupings of the same squared errors:

- ``whole``: one group, the MSE over the local set (all targets);
- ``per_target``: one group per target dimension;
- ``target_bins``: target dimension × 4 bins of the target value, at the quartiles of N(0, 1) in
  standardised target units (what ``fedprune.common.objectives.group_losses`` reports, chosen on
  this measurement; checked here against it).

Synthetic data: 8 Gaussian features, 2 standardised non-linear targets, 10 clients of ≈ 150
samples, split IID or skewed by target value (Dirichlet β = 0.5 over 5 quantile bins of target 0,
the analogue of label skew). Three clients are corrupted: ``shuffle`` (targets permuted within
the client) or ``noise`` (Gaussian noise of one target std added); ``clean`` corrupts none, to
count false flags. A dense MLP (64-32) trains with ``train_local`` (SGD lr 0.05, momentum 0.9,
batch 16, E = 2) and plain FedAvg (weights ∝ samples, every client kept, so every grouping is
measured on one trajectory). Each round, every client's report on the received model goes
through the coordinator's own code (class_medians, class_totals, loss_ratio, the "loss_rel"
and "loss" bands with StrategyConfig's defaults) and q_n = max(γ q + (1-γ) x, q_min).

    .venv/bin/python benchmarks/experiments/regression_signal.py --out benchmarks/results

writes regression_signal.json (every run's final ratios and q, and the mean q of its corrupted
and clean clients by round) and regression_signal.md (the table). CPU, about two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedprune.common import objectives  # noqa: E402
from fedprune.common.models import ModelSpec, init_params, model_layout, module_from_params  # noqa: E402
from fedprune.coordinator.core import contribution  # noqa: E402
from fedprune.coordinator.core.config import StrategyConfig  # noqa: E402
from fedprune.coordinator.core.methods import QUALITY_SIGNALS  # noqa: E402
from fedprune.edge_agent.training import train_local  # noqa: E402
from fedprune.protocol.hyperparams import HyperParams  # noqa: E402

FEATURES, TARGETS, CLIENTS, PER_CLIENT, NOISY = 8, 2, 10, 150, (0, 1, 2)
BIN_EDGES = np.array(objectives.REGRESSION_BIN_EDGES)
GROUPINGS = ("whole", "per_target", "target_bins")
SPEC = ModelSpec("mlp", (FEATURES,), TARGETS, args={"hidden": (64, 32)}, task="regression")
HP = HyperParams(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4)


def synthetic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    X = rng.standard_normal((n, FEATURES)).astype(np.float32)
    y0 = np.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2] + 0.5 * X[:, 3]
    y1 = X[:, 4] - 0.5 * X[:, 5] ** 2 + 0.5 * np.abs(X[:, 6]) + 0.3 * X[:, 7] * X[:, 0]
    y = np.stack([y0, y1], 1) + 0.1 * rng.standard_normal((n, TARGETS))
    return X, y.astype(np.float32)


def split(y: np.ndarray, kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices per client: IID, or Dirichlet(0.5) shares of 5 quantile bins of target 0."""
    if kind == "iid":
        return np.array_split(rng.permutation(len(y)), CLIENTS)
    bins = np.digitize(y[:, 0], np.quantile(y[:, 0], [0.2, 0.4, 0.6, 0.8]))
    parts: list[list[int]] = [[] for _ in range(CLIENTS)]
    for b in range(5):
        members = rng.permutation(np.flatnonzero(bins == b))
        cuts = (np.cumsum(rng.dirichlet(np.full(CLIENTS, 0.5))) * len(members)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    return [np.array(sorted(p)) for p in parts]


def corrupt(y: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "shuffle":
        return y[rng.permutation(len(y))]
    if kind == "noise":
        return (y + rng.standard_normal(y.shape)).astype(np.float32)
    return y


def reports(squared: np.ndarray, y: np.ndarray) -> dict[str, dict[int, tuple[float, int]]]:
    """The three candidate reports from one client's squared errors (N, T) and its targets."""
    n = len(y)
    out = {"whole": {0: (float(squared.mean()), n)},
           "per_target": {t: (float(squared[:, t].mean()), n) for t in range(TARGETS)}}
    bins = {}
    for t in range(TARGETS):
        which = np.digitize(y[:, t], BIN_EDGES)
        for b in np.unique(which):
            rows = which == b
            bins[t * 4 + int(b)] = (float(squared[rows, t].mean()), int(rows.sum()))
    out["target_bins"] = bins
    return out


def run(split_kind: str, corruption: str, seed: int, rounds: int) -> dict:
    rng = np.random.default_rng(seed)
    X, y = synthetic(CLIENTS * PER_CLIENT, rng)
    X_test, y_test = synthetic(2000, rng)
    mean, std = y.mean(0), y.std(0)
    y, y_test = (y - mean) / std, (y_test - mean) / std
    data = []
    for client, idx in enumerate(split(y, split_kind, rng)):
        local = y[idx] if client not in NOISY else corrupt(y[idx], corruption, rng)
        data.append((X[idx], local))
    cfg = StrategyConfig()
    params = init_params(SPEC, seed)
    masks = {t.name: np.ones(t.shape, bool) for t in model_layout(SPEC).masked}
    quality = {g: {band: np.ones(CLIENTS) for band in ("loss_rel", "loss")} for g in GROUPINGS}
    trace = {g: [] for g in GROUPINGS}
    sizes = np.array([len(yc) for _, yc in data], dtype=np.float64)
    for t in range(rounds):
        model = module_from_params(SPEC, params).eval()
        per_client = []
        for client, (Xc, yc) in enumerate(data):
            with torch.no_grad():
                squared = ((model(torch.from_numpy(Xc)) - torch.from_numpy(yc)) ** 2).double().numpy()
            candidate = reports(squared, yc)
            reference = objectives.group_losses("regression", model, torch.from_numpy(Xc), torch.from_numpy(yc), TARGETS)
            assert reference.keys() == candidate["target_bins"].keys()
            assert all(abs(reference[k][0] - v[0]) <= 1e-5 * (1 + v[0]) and reference[k][1] == v[1]
                       for k, v in candidate["target_bins"].items())
            per_client.append(candidate)
        for g in GROUPINGS:
            losses = [r[g] for r in per_client]
            medians = contribution.class_medians(losses)
            totals = contribution.class_totals(losses)
            ratios = [contribution.loss_ratio(r, medians, cfg.loss_weighted, cfg.loss_offset, cfg.loss_reduce,
                                              totals, cfg.loss_max_share) for r in losses]
            for band, q in quality[g].items():
                x = QUALITY_SIGNALS[band](ratios, cfg)
                q[:] = [contribution.update_quality(qn, xn, cfg.gamma, cfg.q_min) for qn, xn in zip(q, x)]
            trace[g].append({"ratio": [None if r is None else round(r, 3) for r in ratios],
                             **{f"q_{band}": np.round(q, 3).tolist() for band, q in quality[g].items()}})
        hp = HyperParams(**{**HP.to_dict(), "seed": seed * 1000 + t})
        results = [train_local(SPEC, params, masks, Xc, yc, hp.for_device(f"c{i}")) for i, (Xc, yc) in enumerate(data)]
        w = sizes / sizes.sum()
        params = {k: v + sum(wi * r.delta[k] for wi, r in zip(w, results)) if k in results[0].delta else v
                  for k, v in params.items()}
    final = objectives.evaluate("regression", module_from_params(SPEC, params), torch.from_numpy(X_test),
                                torch.from_numpy(y_test))
    noisy_ids = list(NOISY) if corruption != "clean" else []
    by_round = {g: {who: [round(float(np.mean(np.array(r["q_loss_rel"])[ids])), 3) if len(ids) else None
                          for r in trace[g]]
                    for who, ids in (("corrupted", noisy_ids), ("clean", [i for i in range(CLIENTS) if i not in noisy_ids]))}
                for g in GROUPINGS}
    return {"split": split_kind, "corruption": corruption, "seed": seed, "test_rmse": round(final.metrics["rmse"], 4),
            "sizes": sizes.astype(int).tolist(), "final": {g: trace[g][-1] for g in GROUPINGS},
            "mean_q_loss_rel_by_round": by_round}


FLAG = 0.5  # a client counts as flagged when its final q is below this


def summarise(runs: list[dict]) -> list[dict]:
    """Per split × corruption × grouping, over seeds: how many corrupted and clean clients end
    flagged (final q < FLAG) under each band, the corrupted clients' mean q and the least clean q."""
    rows = []
    for split_kind in ("iid", "skew"):
        for corruption in ("clean", "shuffle", "noise"):
            chosen = [r for r in runs if r["split"] == split_kind and r["corruption"] == corruption]
            noisy_ids = list(NOISY) if corruption != "clean" else []
            for g in GROUPINGS:
                row = {"split": split_kind, "corruption": corruption, "grouping": g,
                       "test_rmse": statistics.fmean(r["test_rmse"] for r in chosen)}
                for band in ("loss_rel", "loss"):
                    finals = [np.array(r["final"][g][f"q_{band}"]) for r in chosen]
                    noisy = np.concatenate([q[noisy_ids] for q in finals])
                    clean = np.concatenate([np.delete(q, noisy_ids) for q in finals])
                    row[f"{band}_noisy_flagged"] = f"{int((noisy < FLAG).sum())}/{len(noisy)}" if len(noisy) else None
                    row[f"{band}_clean_flagged"] = f"{int((clean < FLAG).sum())}/{len(clean)}"
                    row[f"{band}_noisy_mean_q"] = float(noisy.mean()) if len(noisy) else None
                    row[f"{band}_clean_min_q"] = float(clean.min())
                ratios = [r["final"][g]["ratio"] for r in chosen]
                row["ratio_noisy"] = (statistics.fmean(x for ratio in ratios for i, x in enumerate(ratio) if i in noisy_ids)
                                      if noisy_ids else None)
                row["ratio_clean"] = statistics.fmean(x for ratio in ratios for i, x in enumerate(ratio)
                                                      if i not in noisy_ids)
                rows.append(row)
    return rows


def table(rows: list[dict], rounds: int, seeds: int) -> str:
    num = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    txt = lambda v: "–" if v is None else v  # noqa: E731
    lines = [f"After {rounds} rounds, {seeds} seeds × 3 corrupted and 7 (clean: 10) clean clients. Flagged: final "
             f"q < {FLAG}. loss_rel: the default relative band; loss: the absolute band (§4.6). Ratio: mean final "
             "loss ratio.", "",
             "| split | corruption | grouping | loss_rel: corrupted flagged | clean flagged | corrupted mean q | "
             "min clean q | loss: corrupted flagged | clean flagged | ratio corrupted | ratio clean | test rmse |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['split']} | {r['corruption']} | {r['grouping']} | {txt(r['loss_rel_noisy_flagged'])} | "
                     f"{r['loss_rel_clean_flagged']} | {num(r['loss_rel_noisy_mean_q'])} | "
                     f"{num(r['loss_rel_clean_min_q'])} | {txt(r['loss_noisy_flagged'])} | {r['loss_clean_flagged']} | "
                     f"{num(r['ratio_noisy'])} | {num(r['ratio_clean'])} | {r['test_rmse']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [run(s, c, seed, args.rounds) for s in ("iid", "skew") for c in ("clean", "shuffle", "noise")
            for seed in range(args.seeds)]
    rows = summarise(runs)
    text = table(rows, args.rounds, args.seeds)
    print(text, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regression_signal.md").write_text(
        "# Regression groups for the loss-quality signal\n\n"
        "`.venv/bin/python benchmarks/experiments/regression_signal.py --out benchmarks/results` "
        f"(--rounds {args.rounds} --seeds {args.seeds}); design in the script's docstring.\n\n" + text)
    (args.out / "regression_signal.json").write_text(json.dumps(
        {"rounds": args.rounds, "seeds": args.seeds, "noisy_clients": list(NOISY), "summary": rows, "runs": runs},
        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
