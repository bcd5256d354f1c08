"""Trace one client's scores through a simulated federation (ALGORITHM_NOTES §6).

Runs one federation (validation split, the committed defaults) and prints, for the chosen
client, every ``--every`` rounds: its loss ratio ρ, quality x, q, local train loss, and per
class (ratio to the class median, samples, mean loss of the received model), beside the round's
median train loss; then, per class the client holds, every holder's (samples, loss) in the last
round, in how many rounds the norm clip shortened the client's update, and how holders' sample
counts rank against their mean losses. ``--norm-clip 0`` turns that clip off,
``--loss-max-share 1`` counts every class in the loss ratio (the default before §6's fix);
``--out`` keeps the whole trace as JSON.

    .venv/bin/python benchmarks/experiments/client_trace.py --dataset digits --model cnn2d --beta 0.1 --seed 2 --client client016
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fedprune.coordinator.core.contribution as contribution  # noqa: E402
import fedprune.coordinator.lab.simulate as sim  # noqa: E402
from fedprune.coordinator.core.strategy import Strategy, StrategyConfig  # noqa: E402


def _holder_bias(trace: list[dict], noisy: set[str], from_round: int = 10) -> str:
    """Do clients holding more samples of a class report a higher mean loss on it? Per round
    (from ``from_round``) and class with at least four clean holders, the rank correlation of
    holders' sample counts with their mean losses (ALGORITHM_NOTES §6)."""
    correlations = []
    for rec in trace:
        if rec["round"] < from_round:
            continue
        per_class: dict[int, list[tuple[int, float]]] = {}
        for cid, classes in rec["classes"].items():
            if cid not in noisy:
                for c, (_, n, loss) in classes.items():
                    per_class.setdefault(c, []).append((n, loss))
        for holders in per_class.values():
            counts, losses = np.array(holders).T
            if len(holders) >= 4 and np.ptp(counts) > 0 and np.ptp(losses) > 0:
                correlations.append(spearmanr(counts, losses).statistic)
    c = np.array(correlations)
    return (f"clean holders from round {from_round}: rank correlation of samples with mean loss {c.mean():.2f} "
            f"on average, positive in {100 * (c > 0).mean():.0f} % of {len(c)} (round, class) pairs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--noisy-fraction", type=float, default=0.0)
    ap.add_argument("--noise-kind", default="symmetric")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--client", required=True)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--norm-clip", type=float, help="override strategy.norm_clip (0 = off)")
    ap.add_argument("--loss-max-share", type=float, help="override strategy.loss_max_share (1 = count every class)")
    ap.add_argument("--rel-full", type=float, help="override strategy.rel_full (the band's full-weight end)")
    ap.add_argument("--rel-zero", type=float, help="override strategy.rel_zero (the band's zero-weight end)")
    ap.add_argument("--out")
    args = ap.parse_args()
    overrides = {"norm_clip": args.norm_clip, "loss_max_share": args.loss_max_share,
                 "rel_full": args.rel_full, "rel_zero": args.rel_zero}
    strategy = StrategyConfig(**{k: v for k, v in overrides.items() if v is not None})
    cfg = sim.SimulationConfig(dataset=args.dataset, model=args.model, beta=args.beta, seed=args.seed,
                               noisy_fraction=args.noisy_fraction, noise_kind=args.noise_kind, eval_split="validation",
                               strategy=strategy)
    trace: list[dict] = []
    finish_round = Strategy.finish_round

    def traced(self, state, plan, updates):
        result = finish_round(self, state, plan, updates)
        medians = contribution.class_medians([u.class_losses for u in updates])
        offset = self.config.loss_offset
        trace.append({
            "round": plan.round,
            "classes": {u.client_id: {c: [(loss + offset) / (medians[c] + offset), n, loss]
                                      for c, (loss, n) in u.class_losses.items()} for u in updates},
            "scores": {c: [s.loss_ratio, s.quality_x, s.q, s.clip_factor] for c, s in result.scores.items()},
            "train_loss": {u.client_id: u.train_loss for u in updates},
        })
        return result

    Strategy.finish_round = traced
    result = sim.run_simulation(cfg)
    clipped = sum(rec["scores"][args.client][3] < 1.0 for rec in trace if args.client in rec["scores"])
    print(f"final accuracy {result.final_accuracy:.4f}; {args.client}: {result.client_sizes[args.client]} samples, "
          f"{'noisy' if args.client in result.noisy_clients else 'clean'}, update clipped in {clipped} of {len(trace)} rounds")
    print("round   rho     x      q     train loss (round median)   per class: ratio / samples / loss")
    for rec in trace:
        if rec["round"] % args.every and rec["round"] != 1:
            continue
        rho, x, q, _ = rec["scores"][args.client]
        classes = "  ".join(f"{c}: {r:.2f}/{n}/{loss:.3f}" for c, (r, n, loss) in sorted(rec["classes"][args.client].items()))
        median_tl = float(np.median(list(rec["train_loss"].values())))
        print(f"{rec['round']:5d}  {rho:.3f}  {x:.2f}  {q:.3f}  {rec['train_loss'][args.client]:.3f} ({median_tl:.3f})   {classes}")
    last = trace[-1]["classes"]
    for c in sorted(last[args.client]):
        holders = sorted(((v[c][1], round(v[c][2], 3), cid) for cid, v in last.items() if c in v), reverse=True)
        print(f"class {c} holders (samples, loss): {holders}")
    print(_holder_bias(trace, set(result.noisy_clients)))
    if args.out:
        Path(args.out).write_text(json.dumps({"noisy": result.noisy_clients, "sizes": result.client_sizes, "trace": trace}))


if __name__ == "__main__":
    main()
