"""The one-command demo: a real federation on this machine.

An embedded MQTT broker, a coordinator daemon and eight agent processes (each its own OS
process with its own keys and its own slice of scikit-learn's digits, Dirichlet label skew,
two devices with 80 % noisy labels) run the rounds over MQTT exactly as a deployment would.
Then it prints per-round accuracy, bytes and each device's importance score, and writes a plot.
Everything lands in ``demo-output/`` (the README's ``make demo`` runs this).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from coordinator import enrollment
from coordinator.broker import _free_port
from coordinator.config import load_config
from edge_agent.data import add_label_noise, load_dataset, partition_dirichlet

BIN = Path(sys.executable).parent


def prepare(out: Path, devices: int, noisy: int, rounds: int, seed: int) -> tuple[Path, list[Path], list[str]]:
    dataset = load_dataset("digits", seed)
    rng = np.random.default_rng(seed)
    parts = partition_dirichlet(dataset.y_train, devices, 0.5, rng, min_size=40)
    noisy_ids = sorted(rng.choice(devices, size=noisy, replace=False).tolist())
    names = [f"pi-{i + 1}" for i in range(devices)]
    (out / "data").mkdir(parents=True)
    for i, (name, idx) in enumerate(zip(names, parts)):
        y = dataset.y_train[idx]
        if i in noisy_ids:
            y = add_label_noise(y, 0.8, dataset.num_classes, rng, kind="symmetric")
        np.savez(out / "data" / f"{name}.npz", X=dataset.X_train[idx], y=y)
    np.savez(out / "data" / "holdout.npz", X=dataset.X_test, y=dataset.y_test)
    port = _free_port("127.0.0.1")
    config_path = out / "coordinator.toml"
    enrollment.init(config_path=config_path, state_dir=out / "state", federation="demo",
                    broker_url=f"mqtt://127.0.0.1:{port}", embedded_broker=True)
    text = config_path.read_text()
    for old, new in (
        ('input_shape = [64]', 'input_shape = [1, 8, 8]'),
        ('total = 20', f'total = {rounds}'),
        ('min_devices = 2', f'min_devices = {devices}'),
        ('quorum = 2', f'quorum = {devices - 2}'),
        ('deadline_s = 120.0', 'deadline_s = 30.0'),
        ('port = 9464', 'port = 0'),
        ('# data =', f'data = "{out / "data" / "holdout.npz"}"'),
    ):
        assert old in text, old
        text = text.replace(old, new, 1)
    config_path.write_text(text)
    config = load_config(config_path, env={})
    agent_configs = []
    for name in names:
        bundle = out / "devices" / name / "bundle.json"
        enrollment.enroll(config, name, bundle)
        agent_config = out / "devices" / name / "agent.toml"
        agent_config.write_text(
            "[agent]\n"
            f'bundle = "{bundle}"\ndata = "{out / "data" / f"{name}.npz"}"\nstate_dir = "{bundle.parent / "state"}"\n'
            "threads = 1\ntrain_in_subprocess = false\nheartbeat_s = 5.0\n"
        )
        agent_configs.append(agent_config)
    return config_path, agent_configs, [names[i] for i in noisy_ids]


def watch(state: Path, rounds: int, coordinator: subprocess.Popen, timeout_s: float) -> list[dict]:
    history_path = state / "history.jsonl"
    shown = 0
    started = time.monotonic()
    history: list[dict] = []
    while coordinator.poll() is None and time.monotonic() - started < timeout_s:
        time.sleep(0.5)
        if history_path.exists():
            history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
        for entry in history[shown:]:
            bar = "#" * int(30 * entry["round"] / rounds)
            print(f"\r  round {entry['round']:3d}/{rounds} [{bar:<30}] accuracy {entry.get('accuracy', float('nan')):.3f} "
                  f"({entry['received']}/{entry['selected']} updates, {entry['duration_s']:.1f} s)", flush=True)
        shown = len(history)
    return history


def report(history: list[dict], noisy: list[str], out: Path) -> None:
    print("\nround  accuracy  updates  bytes in (cum.)  bytes out (cum.)")
    for h in history:
        print(f"{h['round']:5d}  {h.get('accuracy', float('nan')):8.4f}  {h['received']:3d}/{h['selected']:<3d}"
              f"  {h['cum_bytes_in']:15,d}  {h['cum_bytes_out']:16,d}")
    last = next((h for h in reversed(history) if h.get("scores")), None)
    if last:
        print("\ndevice   noisy labels  importance r  quality q")
        for device, score in sorted(last["scores"].items()):
            print(f"{device:<8} {'yes' if device in noisy else 'no':>12}  {score['r']:12.4f}  {score['q']:9.4f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([h["round"] for h in history], [h.get("accuracy") for h in history], marker="o")
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("global model (digits, 8 devices over MQTT)")
    devices = sorted({d for h in history for d in h.get("scores", {})})
    for device in devices:
        points = [(h["round"], h["scores"][device]["r"]) for h in history if device in h.get("scores", {})]
        ax2.plot(*zip(*points), linestyle="--" if device in noisy else "-",
                 label=f"{device}{' (noisy)' if device in noisy else ''}")
    ax2.set_xlabel("round")
    ax2.set_ylabel("importance r")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=110)
    print(f"\nplot: {out / 'demo.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--noisy", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    started = time.monotonic()
    print(f"fedprune demo: {args.devices} devices ({args.noisy} with noisy labels), {args.rounds} rounds, in {out}")
    config_path, agent_configs, noisy = prepare(out, args.devices, args.noisy, args.rounds, args.seed)
    logs = out / "logs"
    logs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    coordinator = subprocess.Popen([BIN / "fedprune-coordinator", "run", "--config", config_path],
                                   stdout=open(logs / "coordinator.log", "wb"), stderr=subprocess.STDOUT, env=env)
    agents = []
    try:
        time.sleep(1.0)
        for cfg in agent_configs:
            agents.append(subprocess.Popen([BIN / "fedprune-agent", "run", "--config", cfg],
                                           stdout=open(logs / f"{cfg.parent.name}.log", "wb"),
                                           stderr=subprocess.STDOUT, env=env))
        history = watch(out / "state", args.rounds, coordinator, args.timeout)
    finally:
        for proc in [*agents, coordinator]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*agents, coordinator]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    if coordinator.returncode != 0 or len(history) < args.rounds:
        print(f"demo failed: coordinator exit {coordinator.returncode}, {len(history)} rounds; see {logs}",
              file=sys.stderr)
        return 1
    report(history, noisy, out)
    print(f"done in {time.monotonic() - started:.0f} s; logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
