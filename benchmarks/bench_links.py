"""Bytes on the wire per device per round, by value encoding, in a real federation.

Each setting runs its own federation on loopback exactly as the integration tests do: a fresh
Mosquitto (TLS, passwords, ACL; ``tests/integration/mosquitto.start_mosquitto``), one
``fedprune-coordinator run`` and N ``fedprune-agent run`` processes, digits split IID, the
MLP at 80 % sparsity. Per round, from the coordinator's ``history.jsonl``: each device's update
as it arrived (``update_bytes``: every chunk of the sealed transfer) and what the coordinator
published (``cum_bytes_out``: tasks and releases, once per publication; the broker fans a task
out to every device, so each device receives that much). Round 1 (full task with masks) and
the readjust rounds (masks travel) are kept apart from the steady rounds.

Run (about 2 min on 2 cores):
  .venv/bin/python benchmarks/bench_links.py [--devices 4] [--rounds 12]
Writes benchmarks/results/links.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedprune.coordinator.lab.localfed import LocalFederation  # noqa: E402
from tests.integration.mosquitto import start_mosquitto  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "links.json"
FEDERATION = "links"
# (label, [strategy] update_values, error_feedback, task_values)
SETTINGS = (
    ("float32", "float32", True, "float32"),
    ("float16", "float16", True, "float16"),
    ("int8 + feedback, int8 changes", "int8", True, "int8_delta"),
)


def run_federation(root: Path, devices: int, rounds: int, update_values: str, feedback: bool,
                   task_values: str) -> list[dict]:
    mosquitto = start_mosquitto(FEDERATION, devices)
    try:
        access = mosquitto.access()
        fed = LocalFederation(
            root=root, broker=access, devices=tuple(c.username for c in mosquitto.devices), rounds=rounds,
            federation=FEDERATION, partition="iid",
            settings={"broker": {"username": mosquitto.coordinator.username}, "metrics": {"port": -1},
                      "rounds": {"deadline_s": 120.0},
                      "strategy": {"sparsity": 0.8, "update_values": update_values, "error_feedback": feedback,
                                   "task_values": task_values}})
        fed.prepare()
        fed.start()
        try:
            history = fed.wait_for_round(rounds, timeout=60 + 20 * rounds)
        finally:
            fed.stop_all()
        return history
    finally:
        mosquitto.close()


def per_round(history: list[dict]) -> list[dict]:
    rows, before = [], 0
    for entry in history:
        sizes = list(entry.get("update_bytes", {}).values())
        rows.append({"round": entry["round"], "readjust": entry["readjust"], "accuracy": entry.get("accuracy"),
                     "update_bytes_per_device": statistics.fmean(sizes) if sizes else None,
                     "task_bytes": entry["cum_bytes_out"] - before})
        before = entry["cum_bytes_out"]
    return rows


def summarise(rows: list[dict]) -> dict:
    steady = [r for r in rows if r["round"] > 1 and not r["readjust"]]
    return {
        "update_bytes_per_device_steady": statistics.median(r["update_bytes_per_device"] for r in steady),
        "task_bytes_steady": statistics.median(r["task_bytes"] for r in steady),
        "update_bytes_per_device_all": statistics.fmean(r["update_bytes_per_device"] for r in rows),
        "task_bytes_all": statistics.fmean(r["task_bytes"] for r in rows),
        "round1_task_bytes": rows[0]["task_bytes"],
        "final_accuracy": rows[-1]["accuracy"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp:
        for i, (label, update_values, feedback, task_values) in enumerate(SETTINGS):
            print(f"{label}: {args.devices} devices, {args.rounds} rounds on Mosquitto ...", flush=True)
            started = time.monotonic()
            history = run_federation(Path(tmp) / str(i), args.devices, args.rounds, update_values, feedback,
                                     task_values)
            rows = per_round(history)
            results[label] = {"update_values": update_values, "error_feedback": feedback, "task_values": task_values,
                              "summary": summarise(rows), "rounds": rows,
                              "wall_s": round(time.monotonic() - started, 1)}
    base = results[SETTINGS[0][0]]["summary"]
    print(f"\n{'setting':<32} {'update B/device':>16} {'x':>6} {'task B':>10} {'x':>6} {'accuracy':>9}  "
          "(steady rounds: median)")
    for label, result in results.items():
        s = result["summary"]
        s["update_ratio_steady"] = s["update_bytes_per_device_steady"] / base["update_bytes_per_device_steady"]
        s["task_ratio_steady"] = s["task_bytes_steady"] / base["task_bytes_steady"]
        print(f"{label:<32} {s['update_bytes_per_device_steady']:>16,.0f} {s['update_ratio_steady']:>6.3f} "
              f"{s['task_bytes_steady']:>10,.0f} {s['task_ratio_steady']:>6.3f} {s['final_accuracy']:>9.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": " ".join(["benchmarks/bench_links.py", *sys.argv[1:]]), "devices": args.devices,
        "rounds": args.rounds, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": results}, indent=1) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
