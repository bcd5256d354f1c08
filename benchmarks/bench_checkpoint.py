"""Commit cost of one round: the checkpoint and the history line, as the round number grows.

The coordinator commits every round with ``StateDir.save_checkpoint`` (atomic write + fsync) and
``StateDir.append_history``. The checkpoint used to carry the whole history (every round's entry,
with every device's scores); it now carries the round's own entry and the committed size of
history.jsonl. Both formats go through the same writer here, side by side in one run, on the
default coordinator model (digits MLP at its configured sparsity) with ``--devices`` score
entries per round, shaped as the daemon writes them (``ClientScore`` fields).

Measured at each round in ``--at``: bytes of the checkpoint written and the median wall time of
the commit (checkpoint + history line) over ``--repeats`` commits, in a temp directory on the
same disk as the system temp dir.

Run (~1 min on 2 cores):
  .venv/bin/python benchmarks/bench_checkpoint.py     (writes benchmarks/results/checkpoint.json)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from fedprune.coordinator.config import load_config  # noqa: E402
from fedprune.coordinator.config import model_spec  # noqa: E402
from fedprune.coordinator.state import StateDir  # noqa: E402
from fedprune.coordinator.core.strategy import ClientScore, Strategy  # noqa: E402
from fedprune.common.models import init_params, model_layout  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "checkpoint.json"


def round_entry(round_number: int, devices: int, rng: np.random.Generator) -> dict:
    """A history entry of the daemon's shape with one score per device."""
    values = {f.name: float(rng.random()) for f in fields(ClientScore) if f.name != "gated_by"}
    scores = {f"device-{i:05d}": asdict(ClientScore(**{**values, "q": float(rng.random())})) for i in range(devices)}
    return {"round": round_number, "selected": devices, "received": devices, "duration_s": 4.2, "rejected": {},
            "scores": scores, "mask_churn": 0.01, "accuracy": 0.9, "loss": 0.3, "close_s": 0.5}


def state_document() -> dict:
    config = load_config(None)
    spec = model_spec(config)
    state = Strategy(config.strategy).initial_state(model_layout(spec), init_params(spec, 0), np.random.default_rng(0))
    return {"state_round": 1, "params": state.params, "masks": state.masks, "mask_version": 0,
            "densities": state.densities, "counts": state.counts, "quality": {}, "data_sizes": {},
            "importance": {}, "trust": {}, "rng": "{}", "holders": {}, "release_version": 0}


def measure(at: list[int], devices: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    base = state_document()
    entries = [round_entry(r, devices, rng) for r in range(1, min(max(at), 50) + 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("last entry + committed size", "whole history"):
            state = StateDir(Path(tmp) / fmt.replace(" ", "_"), keep=3)
            state.ensure()
            for round_number in at:
                entry = dict(entries[(round_number - 1) % len(entries)], round=round_number)
                if fmt == "whole history":
                    trail = [dict(entries[(r - 1) % len(entries)], round=r) for r in range(1, round_number + 1)]
                    document = {**base, "history": trail}
                else:
                    document = {**base, "history_bytes": 0, "last_entry": entry}

                def commit() -> None:
                    state.save_checkpoint(round_number, document)
                    state.append_history(entry, 0)

                seconds = median_seconds(commit, repeats)
                size = (state.checkpoints / f"round-{round_number:06d}.ckpt").stat().st_size
                rows.append({"format": fmt, "round": round_number, "devices": devices,
                             "checkpoint_bytes": int(size), "commit_ms": seconds * 1e3})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--at", type=int, nargs="+", default=[1, 10, 100, 500])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = measure(sorted(args.at), args.devices, args.repeats)
    print("| format | round | devices | checkpoint MB | commit ms |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['format']} | {row['round']} | {row['devices']} | {row['checkpoint_bytes'] / 1e6:.2f} "
              f"| {row['commit_ms']:.1f} |")
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                   "command": " ".join(["benchmarks/bench_checkpoint.py", *sys.argv[1:]]),
                                   "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
