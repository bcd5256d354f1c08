"""How well could a noisy client's labels be corrected by the global model? (ALGORITHM_NOTES §8)

Runs one federation (mnist1d MLP, β 0.5, 30 % of clients 80 % noisy, validation split, ours at
the committed defaults) for ROUNDS rounds, then, for every noisy client, compares with the true
labels: the given labels, the final global model's predictions, its predictions where confidence
>= 0.7 (coverage and precision), and the per-client Bayes correction argmax_k p(k|x)·T(y|k) with
T estimated from the soft confusion of predictions and given labels.

    .venv/bin/python benchmarks/experiments/label_correction_diag.py pairwise 30 [seed]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fedprune.coordinator.lab.simulate as sim  # noqa: E402
from fedprune.coordinator.core.strategy import StrategyConfig  # noqa: E402
from fedprune.common import data as data_mod  # noqa: E402
from fedprune.common.models import as_model_input, module_from_params  # noqa: E402


def main(kind: str, rounds: int, seed: int) -> None:
    cfg = sim.SimulationConfig(dataset="mnist1d", model="mlp", beta=0.5, noisy_fraction=0.3, noise_kind=kind,
                               eval_split="validation", seed=seed, strategy=StrategyConfig(rounds=rounds))
    final: dict = {}
    evaluate = sim.evaluate

    def keep_params(spec, params, X, y):
        final.update(spec=spec, params=params)
        return evaluate(spec, params, X, y)

    sim.evaluate = keep_params
    print(f"global accuracy after {rounds} rounds: {sim.run_simulation(cfg).final_accuracy:.3f}")
    dataset = data_mod.split_validation(data_mod.load_dataset(cfg.dataset, seed), cfg.validation_fraction,
                                        np.random.default_rng(seed + 1))
    true_parts = data_mod.partition_dirichlet(dataset.y_train, cfg.n_clients, cfg.beta,
                                              np.random.default_rng([seed, 1]), min_size=cfg.min_size)
    ids, shards, noisy, _ = sim._clients(cfg, dataset, np.random.default_rng([seed, 1]))
    spec = final["spec"]
    model = module_from_params(spec, final["params"]).eval()
    print("client   n  given  model  conf>=0.7 (cover/prec)  bayes")
    rows = []
    for cid, idx in zip(ids, true_parts):
        if cid not in noisy:
            continue
        X, given = shards[cid]
        truth = dataset.y_train[idx]
        with torch.no_grad():
            p = torch.softmax(model(torch.from_numpy(as_model_input(spec, X))), 1).double()
        conf, pred = (t.numpy() for t in p.max(1))
        onehot = torch.nn.functional.one_hot(torch.from_numpy(given.astype(np.int64)), spec.num_classes).double()
        confusion = p.T @ onehot + 1e-3
        transition = confusion / confusion.sum(1, keepdim=True)
        bayes = (p * transition[:, given].T).argmax(1).numpy()
        sure = conf >= 0.7
        row = [len(truth), (given == truth).mean(), (pred == truth).mean(), sure.mean(),
               (pred[sure] == truth[sure]).mean() if sure.any() else np.nan, (bayes == truth).mean()]
        rows.append(row)
        print(f"{cid} {row[0]:4d}  {row[1]:.2f}   {row[2]:.2f}   {row[3]:.2f} / {row[4]:.2f}            {row[5]:.2f}")
    mean = np.nanmean(np.array(rows, dtype=float), axis=0)
    print(f"mean     {mean[0]:4.0f}  {mean[1]:.2f}   {mean[2]:.2f}   {mean[3]:.2f} / {mean[4]:.2f}            {mean[5]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
