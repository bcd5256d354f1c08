"""ONNX releases per built-in model at 0 / 80 / 90 % sparsity: size, accuracy, latency, memory.

For each (dataset, model, sparsity) the model is trained briefly with train_local under an ERK
mask (so the int8 accuracy change is measured on a real model), exported, and measured:
- file sizes: dense ONNX, compact (bitmap) ONNX, int8 ONNX, gzip -9 of the dense and compact files;
- test accuracy of torch, ORT dense, ORT compact and ORT int8;
- latency at batch 1 and 64, ORT (dense file; the compact one runs the same folded graph) and
  ORT int8 next to torch eager in the same process, with 1 thread for both and with each
  library's default; median of repeats;
- session memory: the RSS growth from creating an onnxruntime session and running one batch,
  each in a fresh subprocess that never imports torch (what an inference-only agent pays).

    .venv/bin/python benchmarks/bench_onnx.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from timing import median_seconds  # noqa: E402

CONFIGS = [("digits", "mlp"), ("digits", "cnn2d"), ("mnist1d", "cnn1d")]
SPARSITIES = [0.0, 0.8, 0.9]
META = {"federation": "bench", "round": 0, "mask_version": 0}

_MEMORY_PROBE = """
import sys, numpy as np, onnxruntime as ort
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
model = open(sys.argv[1], 'rb').read()
before = rss()
s = ort.InferenceSession(model, providers=['CPUExecutionProvider'])
i = s.get_inputs()[0]
s.run(None, {i.name: np.zeros((64, *i.shape[1:]), np.float32)})
print(rss() - before, rss())
"""


def session_memory(model: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        f.write(model)
        f.flush()
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, f.name], capture_output=True, text=True, check=True,
            env=os.environ | {"OMP_NUM_THREADS": "1"},
        )
    delta, total = map(int, out.stdout.split())
    return delta, total


def train(dataset: str, model: str, sparsity: float):
    import numpy as np

    from fedprune.coordinator.core.masks import apply_masks, erk_densities, random_masks, scale_sparse_init
    from fedprune.coordinator.lab.datasets import load_dataset
    from fedprune.common.models import ModelSpec, init_params, model_layout
    from fedprune.edge_agent.training import train_local
    from fedprune.protocol.hyperparams import HyperParams

    ds = load_dataset(dataset, 0)
    spec = ModelSpec(model, ds.input_shape, ds.num_classes)
    layout = model_layout(spec)
    params = init_params(spec, 0)
    if sparsity > 0:
        densities = erk_densities(layout, sparsity)
        masks = random_masks(layout, densities, np.random.default_rng(0))
        params = apply_masks(scale_sparse_init(params, densities), masks)
    else:
        masks = {t.name: np.ones(t.shape, bool) for t in layout.masked}
    hp = HyperParams(epochs=8 if dataset == "digits" else 15, batch_size=32, lr=0.05, seed=0)
    result = train_local(spec, params, masks, ds.X_train, ds.y_train, hp)
    trained = {k: v + result.delta[k] if k in result.delta else v for k, v in params.items()}
    return spec, trained | result.buffers, ds


def measure(dataset: str, model: str, sparsity: float, repeats: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from fedprune.coordinator.export import compact_onnx, export_onnx, quantize_int8
    from fedprune.common.models import module_from_params

    spec, params, ds = train(dataset, model, sparsity)
    dense = export_onnx(spec, params, metadata=META)
    compact = compact_onnx(dense)
    int8 = quantize_int8(dense)
    row: dict = {
        "dataset": dataset, "model": model, "sparsity": sparsity,
        "bytes": {
            "dense": len(dense), "compact": len(compact), "int8": len(int8),
            "gzip_dense": len(gzip.compress(dense, 9)), "gzip_compact": len(gzip.compress(compact, 9)),
        },
    }
    module = module_from_params(spec, params).eval()

    def sessions(threads: int | None) -> dict[str, ort.InferenceSession]:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        return {
            name: ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
            for name, blob in (("dense", dense), ("compact", compact), ("int8", int8))
        }

    with torch.no_grad():
        torch_pred = module(torch.from_numpy(ds.X_test)).argmax(1).numpy()
    default = sessions(None)
    row["accuracy"] = {"torch": float((torch_pred == ds.y_test).mean())} | {
        name: float((s.run(None, {"input": ds.X_test})[0].argmax(1) == ds.y_test).mean()) for name, s in default.items()
    }
    default_torch_threads = torch.get_num_threads()
    row["latency_us"] = {}
    for label, threads in (("threads1", 1), ("default", None)):
        torch.set_num_threads(threads or default_torch_threads)
        ort_sessions = sessions(threads) if threads else default
        for batch in (1, 64):
            X = np.ascontiguousarray(ds.X_test[:batch])
            Xt = torch.from_numpy(X)
            n = repeats if batch == 1 else max(20, repeats // 4)
            with torch.no_grad():
                t_torch = median_seconds(lambda: module(Xt), n)
            t_ort = median_seconds(lambda: ort_sessions["dense"].run(None, {"input": X}), n)
            t_int8 = median_seconds(lambda: ort_sessions["int8"].run(None, {"input": X}), n)
            row["latency_us"][f"{label}_b{batch}"] = {
                "torch": round(t_torch * 1e6, 1), "ort": round(t_ort * 1e6, 1), "ort_int8": round(t_int8 * 1e6, 1),
            }
    torch.set_num_threads(default_torch_threads)
    row["session_rss_bytes"] = {name: session_memory(blob)[0] for name, blob in (("dense", dense), ("compact", compact), ("int8", int8))}
    row["process_rss_bytes_dense"] = session_memory(dense)[1]
    return row


def table(rows: list[dict]) -> str:
    head = (
        f"{'model':<14}{'sp':>4} | {'dense':>7}{'compact':>8}{'ratio':>6}{'gz(d)':>7}{'gz(c)':>7}{'int8':>7} | "
        f"{'acc':>6}{'int8':>7} | {'t1 b1 torch/ort/q8 us':>22} | {'t1 b64 torch/ort/q8 us':>23} | "
        f"{'def b64 torch/ort':>18} | {'sess MB d/c/q8':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        b, a, lat, mem = r["bytes"], r["accuracy"], r["latency_us"], r["session_rss_bytes"]
        t1, t64, d64 = lat["threads1_b1"], lat["threads1_b64"], lat["default_b64"]
        lines.append(
            f"{r['dataset'] + '/' + r['model']:<14}{r['sparsity']:>4} | {b['dense']:>7}{b['compact']:>8}"
            f"{b['compact'] / b['dense']:>6.2f}{b['gzip_dense']:>7}{b['gzip_compact']:>7}{b['int8']:>7} | "
            f"{a['dense']:>6.3f}{a['int8'] - a['dense']:>+7.3f} | "
            f"{t1['torch']:>7.0f}/{t1['ort']:>6.0f}/{t1['ort_int8']:>6.0f} | "
            f"{t64['torch']:>7.0f}/{t64['ort']:>6.0f}/{t64['ort_int8']:>7.0f} | "
            f"{d64['torch']:>9.0f}/{d64['ort']:>7.0f} | "
            f"{mem['dense'] / 2**20:>4.1f}/{mem['compact'] / 2**20:>4.1f}/{mem['int8'] / 2**20:>4.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx.json")
    args = parser.parse_args()
    import onnxruntime
    import torch

    rows = [measure(d, m, s, args.repeats) for d, m in CONFIGS for s in SPARSITIES]
    result = {
        "command": f"python benchmarks/bench_onnx.py --repeats {args.repeats}",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
