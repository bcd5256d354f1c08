"""Local-training cost per built-in model: dense vs 80 % vs 90 % sparse (ERK masks).

For each (model, sparsity) a fresh subprocess trains a 100-sample client with train_local and
reports: the wall time of one local epoch (marginal: (t(E=5) - t(E=1)) / 4, so model build and
the class-loss pass are excluded), the fixed per-call overhead, the same for a readjust round,
forward MACs per example (count_macs, sparse-aware), LocalResult.flops, and the subprocess's
peak RSS (ru_maxrss, includes importing torch). Times are the minimum over repeats: the
least-disturbed run on a shared machine, where medians drift with other load.

Unstructured sparsity does not make dense torch kernels faster: masked weights are stored and
multiplied as zeros, so wall time stays roughly flat while MACs fall. The MAC column is what a
sparse kernel could save, not what this code saves.

    .venv/bin/python benchmarks/bench_training.py [--repeats 15] [--threads 1] [--device cuda --out FILE]

On a GPU host, ``--device cuda`` times the same cells with train_local on CUDA (the Jetson path);
each subprocess then pays CUDA's context start, which the warm-up keeps out of the times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [("digits", "mlp"), ("digits", "cnn2d"), ("mnist1d", "mlp"), ("mnist1d", "cnn1d")]
SPARSITIES = [0.0, 0.8, 0.9]
CLIENT_SIZE = 100
BATCH = 32


def measure(dataset: str, model: str, sparsity: float, repeats: int, threads: int, device: str) -> dict:
    """Runs inside the subprocess: one (model, sparsity) cell of the table."""
    import numpy as np
    import torch

    from fedprune.coordinator.core.masks import apply_masks, erk_densities, random_masks, scale_sparse_init
    from fedprune.coordinator.lab.datasets import load_dataset
    from fedprune.common.models import ModelSpec, count_macs, init_params, model_layout
    from fedprune.edge_agent.training import train_local
    from fedprune.protocol.hyperparams import HyperParams

    torch.set_num_threads(threads)
    ds = load_dataset(dataset, 0)
    X, y = ds.X_train[:CLIENT_SIZE], ds.y_train[:CLIENT_SIZE]
    spec = ModelSpec(model, ds.input_shape, ds.num_classes)
    layout = model_layout(spec)
    rng = np.random.default_rng(0)
    params = init_params(spec, 0)
    if sparsity > 0:
        densities = erk_densities(layout, sparsity)
        masks = random_masks(layout, densities, rng)
        params = apply_masks(scale_sparse_init(params, densities), masks)
    else:
        masks = {t.name: np.ones(t.shape, bool) for t in layout.masked}

    def timed(**hp_kwargs) -> tuple[float, object]:
        times, result = [], None
        for r in range(repeats):
            hp = HyperParams(batch_size=BATCH, seed=r, **hp_kwargs)
            start = time.perf_counter()
            result = train_local(spec, params, masks, X, y, hp, device=device)
            times.append(time.perf_counter() - start)
        return min(times), result

    timed(epochs=1)  # warm-up: first-call allocations and lazy init
    t1, _ = timed(epochs=1)
    t5, res5 = timed(epochs=5)
    t5_readjust, res_readjust = timed(epochs=5, readjust=True, prune_fraction=0.3) if sparsity else (None, None)
    epoch = (t5 - t1) / 4
    nnz = sum(int(m.sum()) for m in masks.values())
    return {
        "dataset": dataset,
        "model": model,
        "device": device,
        "sparsity": sparsity,
        "prunable_weights": sum(t.size for t in layout.masked),
        "active_weights": nnz,
        "params_total": layout.num_parameters,
        "epoch_ms": 1e3 * epoch,
        "overhead_ms": 1e3 * (t1 - epoch),
        "round_e5_ms": 1e3 * t5,
        "round_e5_readjust_ms": None if t5_readjust is None else 1e3 * t5_readjust,
        "forward_macs_per_example": count_macs(spec, masks),
        "round_e5_macs": res5.flops,
        "round_e5_readjust_macs": None if res_readjust is None else res_readjust.flops,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where train_local runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training.json",
                        help="results JSON (default: benchmarks/results/training.json)")
    parser.add_argument("--one", nargs=3, metavar=("DATASET", "MODEL", "SPARSITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        dataset, model, sparsity = args.one
        print(json.dumps(measure(dataset, model, float(sparsity), args.repeats, args.threads, args.device)))
        return

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device here")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
    rows = []
    for dataset, model in CONFIGS:
        for sparsity in SPARSITIES:
            cmd = [sys.executable, __file__, "--repeats", str(args.repeats), "--threads", str(args.threads),
                   "--device", args.device, "--one", dataset, model, str(sparsity)]
            out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{dataset} {model} {sparsity} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    header = (f"{'dataset':8} {'model':6} {'sparse':>6} {'active/prunable':>17} {'epoch ms':>9} {'overhead ms':>11} "
              f"{'E5 ms':>7} {'E5+readj ms':>11} {'fwd MACs':>9} {'E5 MACs':>11} {'RSS MiB':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        readjust = "-" if r["round_e5_readjust_ms"] is None else f"{r['round_e5_readjust_ms']:.1f}"
        print(f"{r['dataset']:8} {r['model']:6} {r['sparsity']:6.1f} "
              f"{r['active_weights']:>8}/{r['prunable_weights']:<8} {r['epoch_ms']:9.2f} {r['overhead_ms']:11.2f} "
              f"{r['round_e5_ms']:7.1f} {readjust:>11} {r['forward_macs_per_example']:9d} "
              f"{r['round_e5_macs']:11d} {r['peak_rss_mib']:8.0f}")
    print(f"\n{args.device}: client of {CLIENT_SIZE} samples, batch {BATCH}, {args.threads} thread(s), min of {args.repeats}; "
          "wall time uses dense kernels (zeros are multiplied), MACs count active weights only.")

    report = {
        "benchmark": "training",
        "client_size": CLIENT_SIZE,
        "batch_size": BATCH,
        "threads": args.threads,
        "device": args.device,
        "device_name": _device_name(args.device),
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def _device_name(device: str) -> str:
    if device == "cpu":
        return platform.processor() or platform.machine()
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()
