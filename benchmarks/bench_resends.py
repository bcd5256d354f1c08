"""Uplink amplification: bytes of updates on the wire against the bytes of distinct updates,
when local training outlasts the coordinator's re-announcement interval.

A real federation on loopback (``fedprune.coordinator.lab.localfed.LocalFederation``): Mosquitto with TLS,
passwords and per-device ACLs (``tests/integration/mosquitto.start_mosquitto``), one
``fedprune-coordinator run`` and N ``fedprune-agent run`` processes on IID digits. The
coordinator re-announces every ``--reannounce`` seconds to the devices it still waits for, and
local training is made to take at least ``--ratio`` times that (more local epochs), so every
device sees several re-announcements queued while it trains: the situation of a Pi whose torch
start or training is slower than ``reannounce_s``.

Measured, per round, from every agent's audit log (``audit.jsonl``: each publication's bytes and
SHA-256, written by the agent as it publishes): update bytes sent, and bytes of distinct update
chunks (each SHA-256 once). Their ratio is the amplification (target <= 1.05). The coordinator's
``/metrics`` gives the duplicates that arrived (``updates_rejected_total`` for ``duplicate`` and
``duplicate_transfer``) and the agents' logs the training seconds and resends.

``--baseline REF`` first runs the same measurement on commit REF (this script, in a git
worktree of REF), so the table puts the old and the current behaviour side by side.

Run (about 2 min per tree on 2 cores):
  .venv/bin/python benchmarks/bench_resends.py --baseline 83ce574
Writes a table to stdout and benchmarks/results/resends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baseline import add_arguments, describe, side_by_side  # noqa: E402
from fedprune.coordinator.lab.localfed import LocalFederation  # noqa: E402
from tests.integration.mosquitto import start_mosquitto  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "resends.json"
FEDERATION = "bench"
TARGET = 1.05


def federation(out: Path, devices: int, rounds: int, reannounce_s: float, epochs: int, in_subprocess: bool):
    mosquitto = start_mosquitto(FEDERATION, devices)
    access = mosquitto.access()
    fed = LocalFederation(
        root=out, broker=access, devices=tuple(c.username for c in mosquitto.devices), rounds=rounds,
        federation=FEDERATION, partition="iid",
        settings={"broker": {"username": mosquitto.coordinator.username},
                  "rounds": {"reannounce_s": reannounce_s, "deadline_s": 300.0}},
        agent_sections={"agent": {"train_in_subprocess": in_subprocess}},
    )
    try:
        fed.prepare()
    except BaseException:
        mosquitto.close()
        raise
    # `init` takes flat keys only; the local hyper-parameters are the [strategy.local] sub-table it wrote.
    text = fed.config_path.read_text()
    head, local = text.split("[strategy.local]", 1)
    fed.config_path.write_text(head + "[strategy.local]" + re.sub(r"(?m)^epochs = \d+$", f"epochs = {epochs}", local, 1))
    return fed, mosquitto


def update_traffic(fed: LocalFederation) -> dict[int, dict[str, int]]:
    """Per round: update bytes published by all agents, and bytes of distinct chunks among them."""
    sent: dict[int, int] = defaultdict(int)
    distinct: dict[int, dict[str, int]] = defaultdict(dict)
    for name in fed.devices:
        audit = fed.root / "devices" / name / "state" / "audit.jsonl"
        for line in audit.read_text().splitlines():
            record = json.loads(line)
            if record["message_type"] == "update":
                sent[record["round"]] += record["bytes"]
                distinct[record["round"]][record["sha256"]] = record["bytes"]
    return {r: {"sent": sent[r], "distinct": sum(distinct[r].values())} for r in sorted(sent)}


def agent_events(fed: LocalFederation) -> tuple[list[float], int]:
    """Training seconds of every local run, and the number of resends the agents made."""
    seconds, resends = [], 0
    for name in fed.devices:
        text = fed.log(name)
        seconds += [float(s) for s in re.findall(r"event=trained .*?seconds=([\d.]+)", text)]
        resends += text.count("event=resend ")
    return seconds, resends


def duplicates_seen(metrics: str) -> dict[str, float]:
    found = re.findall(r'updates_rejected_total\{reason="(duplicate|duplicate_transfer)"\} (\S+)', metrics)
    return {reason: float(value) for reason, value in found}


def measure(args: argparse.Namespace) -> dict:
    """Run one federation with this source tree; the summary and per-round traffic."""
    out = Path(tempfile.mkdtemp(prefix="fedprune-bench-resends-"))
    # One round more than measured: the coordinator (and its /metrics) is still up after round N.
    fed, mosquitto = federation(out, args.devices, args.rounds + 1, args.reannounce, args.epochs, not args.inprocess)
    print(f"{ROOT}: {args.devices} agents, {args.rounds} rounds, reannounce_s {args.reannounce}, {args.epochs} "
          f"local epochs, train_in_subprocess {not args.inprocess}, Mosquitto TLS", flush=True)
    started = time.monotonic()
    try:
        fed.start()
        history = fed.wait_for_round(args.rounds, args.timeout)[: args.rounds]
        duplicates = duplicates_seen(fed.metrics_text())
    finally:
        fed.stop_all()
        mosquitto.close()
    traffic = {r: t for r, t in update_traffic(fed).items() if r <= args.rounds}
    seconds, resends = agent_events(fed)
    shutil.rmtree(out, ignore_errors=True)
    sent, distinct = sum(t["sent"] for t in traffic.values()), sum(t["distinct"] for t in traffic.values())
    return {
        "commit": describe(), "median_train_s": statistics.median(seconds),
        "train_over_reannounce": statistics.median(seconds) / args.reannounce,
        "update_bytes_sent": sent, "update_bytes_distinct": distinct, "amplification": sent / distinct,
        "resends": resends, "duplicates_at_coordinator": duplicates, "wall_s": time.monotonic() - started,
        "rounds": [{"round": h["round"], "received": h["received"], "duration_s": h["duration_s"],
                    **traffic.get(h["round"], {"sent": 0, "distinct": 0})} for h in history],
    }


def print_rounds(name: str, run: dict) -> None:
    print(f"\n{name} ({run['commit']}): median local training {run['median_train_s']:.2f} s = "
          f"{run['train_over_reannounce']:.1f} x reannounce_s")
    print(f"{'round':>6}{'updates':>9}{'sent B':>11}{'distinct B':>12}{'sent/distinct':>15}{'duration s':>12}")
    for r in run["rounds"]:
        ratio = r["sent"] / r["distinct"] if r["distinct"] else float("nan")
        print(f"{r['round']:>6}{r['received']:>9}{r['sent']:>11}{r['distinct']:>12}{ratio:>15.3f}{r['duration_s']:>12.2f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reannounce", type=float, default=0.5, help="coordinator rounds.reannounce_s")
    parser.add_argument("--ratio", type=float, default=3.0, help="local training at least this x reannounce_s")
    parser.add_argument("--epochs", type=int, default=15, help="local epochs (raise if training is too fast)")
    parser.add_argument("--inprocess", action="store_true", help="train_in_subprocess = false")
    parser.add_argument("--timeout", type=float, default=600.0)
    add_arguments(parser)
    args = parser.parse_args(argv)
    runs = side_by_side(Path(__file__), argv, args, measure)
    if runs is None:
        return 0
    for name, run in runs.items():
        print_rounds(name, run)
    print(f"\n{'':>12}{'commit':>14}{'train/reannounce':>18}{'sent B':>11}{'distinct B':>12}{'amplification':>15}"
          f"{'resends':>9}{'duplicates':>12}")
    for name, run in runs.items():
        duplicates = int(sum(run["duplicates_at_coordinator"].values()))
        print(f"{name:>12}{run['commit']:>14}{run['train_over_reannounce']:>18.1f}{run['update_bytes_sent']:>11}"
              f"{run['update_bytes_distinct']:>12}{run['amplification']:>15.3f}{run['resends']:>9}{duplicates:>12}")
    ours = runs["this tree"]
    doc = {
        "command": "benchmarks/bench_resends.py " + " ".join(argv),
        "config": {"devices": args.devices, "rounds": args.rounds, "reannounce_s": args.reannounce,
                   "local_epochs": args.epochs, "train_in_subprocess": not args.inprocess,
                   "broker": "mosquitto (TLS, passwords, ACL)", "model": "mlp (digits), sparsity 0.8"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "target_amplification": TARGET,
        "meets_target": ours["amplification"] <= TARGET and ours["train_over_reannounce"] >= args.ratio,
        **runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    if ours["train_over_reannounce"] < args.ratio:
        print(f"local training was only {ours['train_over_reannounce']:.1f} x reannounce_s: raise --epochs",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
