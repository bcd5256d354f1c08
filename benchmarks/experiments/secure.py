"""Secure aggregation against plain mode on the digits MLP at 80 % sparsity with 50 devices
(docs/RESULTS.md, "Secure aggregation"): accuracy, uplink per device and round, and whether the
loss quality still finds the noisy devices when the coordinator sees only the weighted sum.

Arms, each through ``fedprune.coordinator.api.simulate`` (the daemons' own code on an in-memory
broker), 50 devices, Dirichlet beta = 0.5, 60 rounds, the kit's defaults otherwise:

- plain:        method fedprune, defences off (norm_clip, sybil_cos, chance_gate = 0): what a
                secure round runs, so the difference is secure aggregation alone
- plain+def:    plain mode with the default defences, for reference
- secure-12:    secure = true, secure_bits = 12 (the default)
- secure-16:    secure = true, secure_bits = 16

and the same four with 20 % noisy devices (80 % of their labels flipped, ``noisy_fraction``), where
the quality q of the noisy devices is reported. Mask evolution differs by design: plain rounds
merge the devices' own regrowth votes; secure rounds regrow at random around the aggregate (SET).

    .venv/bin/python benchmarks/experiments/secure.py --out benchmarks/results/secure [--seeds 0 1 2] [--workers 2]

writes <out>/summary.json and <out>/summary.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from jobs import publish, run_jobs  # noqa: E402  (beside this script)

OFF = {"norm_clip": 0.0, "sybil_cos": 0.0, "chance_gate": 0.0}
ARMS = {
    "plain": OFF,
    "plain+def": {},
    "secure-12": {**OFF, "secure": True, "secure_bits": 12},
    "secure-16": {**OFF, "secure": True, "secure_bits": 16},
}


def run_one(job: tuple[str, float, int, int, int]) -> dict:
    import logging

    logging.disable(logging.WARNING)
    from fedprune.coordinator.api import simulate

    arm, noisy, seed, devices, rounds = job
    started = time.perf_counter()
    run = simulate(strategy={"rounds": rounds, **ARMS[arm]}, n_clients=devices, seed=seed, noisy_fraction=noisy)
    history = run.history
    last = history[-1]
    noisy_ids = set(run.result.noisy_clients)
    q = {d: s["q"] for d, s in last.get("scores", {}).items()}
    per_device = [b for e in history for b in e["update_bytes"].values()]
    return {"arm": arm, "noisy": noisy, "seed": seed, "final": last["score"],
            "best": max(e.get("score", 0.0) for e in history), "uplink_per_device_round": float(np.mean(per_device)),
            "q_noisy": float(np.mean([q[d] for d in noisy_ids if d in q])) if noisy_ids else None,
            "q_clean": float(np.mean([v for d, v in q.items() if d not in noisy_ids])) if q else None,
            "failed_rounds": sum(1 for e in history if "failed" in e.get("secure", {})),
            "seconds": time.perf_counter() - started}


def table(results: list[dict], devices: int, rounds: int) -> str:
    lines = [f"Digits MLP, 80 % sparse, {devices} devices, {rounds} rounds; mean ± std over seeds "
             f"{sorted({r['seed'] for r in results})}.", "",
             "| noisy devices | arm | final accuracy | best | uplink B / device / round | x plain | q noisy | q clean | failed rounds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for noisy in sorted({r["noisy"] for r in results}):
        plain = np.mean([r["uplink_per_device_round"] for r in results if r["arm"] == "plain" and r["noisy"] == noisy])
        for arm in ARMS:
            rows = [r for r in results if r["arm"] == arm and r["noisy"] == noisy]
            if not rows:
                continue
            acc = [100 * r["final"] for r in rows]
            up = np.mean([r["uplink_per_device_round"] for r in rows])
            qn = [r["q_noisy"] for r in rows if r["q_noisy"] is not None]
            qc = [r["q_clean"] for r in rows if r["q_clean"] is not None]
            lines.append(f"| {int(100 * noisy)} % | {arm} | {np.mean(acc):.1f} ± {np.std(acc):.1f} | "
                         f"{100 * np.mean([r['best'] for r in rows]):.1f} | {up:,.0f} | {up / plain:.2f} | "
                         f"{np.mean(qn):.3f} | {np.mean(qc):.3f} | {sum(r['failed_rounds'] for r in rows)} |"
                         if qn else
                         f"| {int(100 * noisy)} % | {arm} | {np.mean(acc):.1f} ± {np.std(acc):.1f} | "
                         f"{100 * np.mean([r['best'] for r in rows]):.1f} | {up:,.0f} | {up / plain:.2f} | - | - | "
                         f"{sum(r['failed_rounds'] for r in rows)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "secure")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--noisy", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(arm, noisy, seed, args.devices, args.rounds) for noisy in args.noisy for seed in args.seeds
            for arm in args.arms]
    started = time.perf_counter()
    results = run_jobs(run_one, jobs, args.workers,
                       lambda i, r: print(f"  [{i}/{len(jobs)}] {r['arm']} noisy={r['noisy']} seed={r['seed']}: "
                                          f"{r['final']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr))
    command = "benchmarks/experiments/secure.py " + " ".join(argv if argv is not None else sys.argv[1:])
    publish(args.out, table(results, args.devices, args.rounds) + f"\nCommand: `{command}`\n",
            {"command": command, "results": results}, len(jobs), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
