"""Client-level DP at equal ε: local Gaussian noise on each update against distributed Skellam
noise inside secure aggregation's masked sum, on the digits MLP at 80 % sparsity with 50 devices.

Arms, each through ``fedprune.coordinator.api.simulate`` (the daemons' own code on an in-memory
broker), Dirichlet beta = 0.5, defences off (norm_clip, sybil_cos, chance_gate = 0: a secure
round cannot run them), every device's [privacy] the same:

- none:        plain rounds, no DP
- local:       plain rounds, [privacy] mechanism = "local": clip to C, add N(0, (σC)²) to the
               update; σ = ``noise_multiplier_for(ε, δ, rounds)``, so the ledger spends ε
- distributed: secure = true (``--bits``), [privacy] mechanism = "distributed": clip to C, add a
               Skellam share in field units; σ found with ``distributed_dp.mu_for_epsilon`` so
               that a device whose weight is the round's largest spends ε in ``rounds`` rounds
               (``distributed_sigma``); [strategy] secure_noise_multiplier = that σ

The ε of the local arm holds against anyone who sees an update; the ε of the distributed arm
against the coordinator, with at least t (the SecAgg threshold) honest devices in each sum.
Reported: final accuracy, the ε each arm's device ledgers actually hold at the end (largest and
mean over devices, and the fewest rounds a device charged), uplink bytes per device and round, and
the standard deviation of the noise in one coordinate of the aggregate (value units).

    .venv/bin/python benchmarks/experiments/secure_dp.py [--seeds 0 1] [--rounds 30] [--epsilon 8] [--workers 2]

writes benchmarks/results/secure_dp.json and benchmarks/results/secure_dp.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from jobs import run_jobs  # noqa: E402  (beside this script)

DELTA = 1e-5
CLIP = 0.5  # about the median update norm of the first rounds (0.57-0.76)
SPARSITY = 0.8
OFF = {"norm_clip": 0.0, "sybil_cos": 0.0, "chance_gate": 0.0}
ARMS = ("none", "local", "distributed")


def vector_dimension(sparsity: float) -> int:
    """Coordinates a device masks in a secure round of the digits MLP (``secure_vector``)."""
    from fedprune.common.models import ModelSpec, model_layout
    from fedprune.coordinator.core import masks as masks_mod
    from fedprune.protocol.secure_vector import vector_length

    layout = model_layout(ModelSpec("mlp", (1, 8, 8), 10))
    masks = masks_mod.random_masks(layout, masks_mod.erk_densities(layout, sparsity), np.random.default_rng(0))
    return vector_length(layout, masks)


def distributed_sigma(epsilon: float, rounds: int, devices: int, bits: int, dimension: int) -> float:
    """σ at which a device of weight w = w_max spends ``epsilon`` in ``rounds`` rounds. Its cost
    depends on S·w_max·C only through rounding (Δ2 = S·w·C + sqrt(d)) and the Skellam
    correction, both largest at the smallest w_max a round can have, 1/devices: the σ found
    there keeps every device within ε. S follows σ (the coordinator's headroom), hence a fixed
    point of σ -> scale -> ``mu_for_epsilon`` -> σ."""
    from fedprune.coordinator.core.secure_round import field_scale
    from fedprune.protocol.distributed_dp import mu_for_epsilon
    from fedprune.edge_agent.core.privacy import noise_multiplier_for
    from fedprune.protocol.secagg import SecureParams

    t = SecureParams.for_devices(devices, bits).threshold
    w = 1.0 / devices
    sigma = noise_multiplier_for(epsilon, DELTA, rounds)
    for _ in range(50):
        scale = field_scale(bits, devices, CLIP, sigma * w * CLIP * math.sqrt(devices / t))
        mu = mu_for_epsilon(epsilon, DELTA, rounds, CLIP, scale, dimension, w)  # the sum's μ = t·μ_dev
        sigma, last = math.sqrt(2 * mu) / (scale * w * CLIP), sigma
        if abs(sigma - last) < 1e-6 * sigma:
            break
    return sigma


def run_one(job: tuple[str, int, int, int, float, float, int]) -> dict:
    import logging

    logging.disable(logging.WARNING)
    from fedprune.coordinator.api import simulate

    arm, seed, devices, rounds, epsilon, sigma, bits = job
    strategy = {"rounds": rounds, "sparsity": SPARSITY, **OFF}
    privacy = {}
    if arm != "none":
        privacy = {"enabled": True, "mechanism": arm, "clip_norm": CLIP, "noise_multiplier": sigma,
                   "epsilon_budget": epsilon, "delta": DELTA, "report_class_losses": True}
    if arm == "distributed":
        strategy.update(secure=True, secure_bits=bits, secure_noise_multiplier=sigma)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="secure-dp-") as workdir:
        run = simulate(strategy=strategy, privacy=privacy, n_clients=devices, seed=seed, workdir=workdir)
        ledgers = [json.loads(p.read_text()) for p in Path(workdir).glob("federation/devices/*/state/privacy-*.json")]
    history = run.history
    return {
        "arm": arm, "seed": seed, "sigma": sigma, "final": history[-1]["score"],
        "best": max(e.get("score", 0.0) for e in history),
        "epsilon_max": max((g["epsilon_spent"] for g in ledgers), default=0.0),
        "epsilon_mean": float(np.mean([g["epsilon_spent"] for g in ledgers])) if ledgers else 0.0,
        "ledger_rounds_min": min((g["rounds"] for g in ledgers), default=0),
        "in_sum_min": min(e.get("secure", {}).get("survivors", e["received"]) for e in history),
        "uplink_per_device_round": run.result.uplink_bytes / (devices * rounds),
        "noise_std": noise_std(arm, sigma, history),
        "seconds": time.perf_counter() - started,
    }


def noise_std(arm: str, sigma: float, history: list[dict]) -> float:
    """Mean over rounds of the std of one aggregate coordinate's noise, value units: local,
    σ·C·sqrt(Σ w_n²) (the weights the coordinator used); distributed, sqrt(2μ)/S of the sum's
    Skellam noise over the survivors (the weights sum to 1)."""
    if arm == "none":
        return 0.0
    if arm == "local":
        return float(np.mean([sigma * CLIP * math.sqrt(sum(s["w"] ** 2 for s in e["scores"].values()))
                              for e in history]))
    return float(np.mean([math.sqrt(2 * e["secure"]["noise"]["mu"]) / e["secure"]["noise"]["scale"]
                          for e in history if "noise" in e.get("secure", {})]))


def table(results: list[dict], args: argparse.Namespace, command: str) -> str:
    seeds = sorted({r["seed"] for r in results})
    lines = [f"Digits MLP, {int(100 * SPARSITY)} % sparse, {args.devices} devices (Dirichlet 0.5), {args.rounds} rounds, "
             f"defences off, C = {CLIP}, target ε = {args.epsilon:g} at δ = {DELTA:g}; seeds {seeds} (mean ± std). "
             f"Distributed DP in secure mode at secure_bits = {args.bits}.", "",
             "| arm | σ | final accuracy % | best % | ledger ε, largest | ledger ε, mean | fewest rounds charged | "
             "uplink B / device / round | aggregate noise std / coordinate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in ARMS:
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue
        acc = [100 * r["final"] for r in rows]
        lines.append(f"| {arm} | {rows[0]['sigma']:.3f} | {np.mean(acc):.1f} ± {np.std(acc):.1f} | "
                     f"{100 * np.mean([r['best'] for r in rows]):.1f} | {max(r['epsilon_max'] for r in rows):.3f} | "
                     f"{np.mean([r['epsilon_mean'] for r in rows]):.3f} | {min(r['ledger_rounds_min'] for r in rows)} | "
                     f"{np.mean([r['uplink_per_device_round'] for r in rows]):,.0f} | "
                     f"{np.mean([r['noise_std'] for r in rows]):.4f} |")
    return "\n".join(lines) + f"\n\nCommand: `{command}`\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--bits", type=int, default=20)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    from fedprune.edge_agent.core.privacy import noise_multiplier_for

    sigmas = {"none": 0.0, "local": noise_multiplier_for(args.epsilon, DELTA, args.rounds),
              "distributed": distributed_sigma(args.epsilon, args.rounds, args.devices, args.bits,
                                               vector_dimension(SPARSITY))}
    jobs = [(arm, seed, args.devices, args.rounds, args.epsilon, sigmas[arm], args.bits)
            for arm in sorted(args.arms, key=lambda a: a != "distributed") for seed in args.seeds]  # slowest first
    started = time.perf_counter()
    results = run_jobs(run_one, jobs, args.workers,
                       lambda i, r: print(f"  [{i}/{len(jobs)}] {r['arm']} seed={r['seed']}: {r['final']:.4f}, "
                                          f"ε {r['epsilon_max']:.3f} ({r['seconds']:.0f} s)", file=sys.stderr))
    command = ".venv/bin/python benchmarks/experiments/secure_dp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(results, args, command.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "secure_dp.json").write_text(json.dumps({"command": command.strip(), "delta": DELTA, "clip_norm": CLIP,
                                                          "sigmas": sigmas, "results": results}, indent=1))
    (args.out / "secure_dp.md").write_text(text)
    print(text)
    print(f"{len(jobs)} runs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
