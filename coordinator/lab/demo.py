"""The one-command demo: a real federation on this machine.

An embedded MQTT broker, a coordinator daemon and eight agent processes (each its own OS
process with its own keys and its own slice of scikit-learn's digits, Dirichlet label skew,
two devices with 80 % noisy labels) run the rounds over MQTT exactly as a deployment would.
Then it prints per-round accuracy, bytes and each device's importance score, and writes a plot.
Everything lands in ``demo-output/`` (the README's ``make demo`` runs this). ``--secure`` (``make
demo-secure``) runs the same federation under secure aggregation: the coordinator learns only
the weighted sum of the updates, and still finds the noisy devices from their loss reports.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from fedprune.coordinator.fleet.broker import free_port
from fedprune.coordinator.lab.localfed import BrokerAccess, LocalFederation


def watch(federation: LocalFederation, rounds: int, timeout_s: float) -> list[dict]:
    coordinator = federation.processes["coordinator"]
    shown = 0
    started = time.monotonic()
    history: list[dict] = []
    while time.monotonic() - started < timeout_s:
        running = coordinator.poll() is None
        time.sleep(0.5)
        history = federation.history()
        for entry in history[shown:]:
            bar = "#" * int(30 * entry["round"] / rounds)
            print(f"\r  round {entry['round']:3d}/{rounds} [{bar:<30}] accuracy {entry.get('accuracy', float('nan')):.3f} "
                  f"({entry['received']}/{entry['selected']} updates, {entry['duration_s']:.1f} s)", flush=True)
        shown = len(history)
        if not running:
            break
    return history


def status_page(federation: LocalFederation, wait_s: float = 10.0) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return federation.status_url()
        except RuntimeError:
            if time.monotonic() > deadline:
                return "not up yet (see logs/coordinator.log)"
            time.sleep(0.1)


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
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--secure", action="store_true", help="secure aggregation (SecAgg+): the coordinator sees only the sum")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    started = time.monotonic()
    names = tuple(f"pi-{i + 1}" for i in range(args.devices))
    noisy = tuple(sorted(np.random.default_rng(args.seed).choice(names, size=args.noisy, replace=False)))
    print(f"fedprune demo: {args.devices} devices ({', '.join(noisy)} with 80 % noisy labels), "
          f"{args.rounds} rounds{', secure aggregation' if args.secure else ''}, in {out}")
    federation = LocalFederation(
        root=out, broker=BrokerAccess(url=f"mqtt://127.0.0.1:{free_port()}", embedded=True),
        devices=names, rounds=args.rounds, noisy=noisy, seed=args.seed,
        settings={"federation": {"model": "mlp"}, "rounds": {"quorum": args.devices - 2, "deadline_s": 30.0},
                  **({"strategy": {"secure": True}} if args.secure else {})},
    )
    federation.prepare()
    try:
        federation.start()
        print(f"  live status page: {status_page(federation)} (open it while the rounds run)")
        history = watch(federation, args.rounds, args.timeout)
        if len(history) == args.rounds:
            federation.wait_for_release(1, timeout=60)
    finally:
        codes = federation.stop_all()
    if codes.get("coordinator") != 0 or len(history) < args.rounds:
        print(f"demo failed: coordinator exit {codes.get('coordinator')}, {len(history)} rounds; "
              f"see {out / 'logs'}", file=sys.stderr)
        return 1
    report(history, list(noisy), out)
    if args.secure:
        summed = [h["secure"].get("survivors", 0) for h in history if "secure" in h]
        print(f"\nsecure aggregation: every round the coordinator unmasked only the weighted sum of "
              f"{min(summed)}-{max(summed)} devices' updates; no update left a device unmasked")
    release = sorted((out / "state" / "releases").glob("model-v*.onnx"))[-1]
    print(f"\nfinal model released to every device: {release} ({release.stat().st_size:,} bytes, compact ONNX)")
    print("on-device inference (onnxruntime) on the held-out test set:")
    for name in names:
        done = federation.infer(name, out / "data" / "holdout.npz")
        if done.returncode != 0:
            print(f"  {name}: infer failed: {done.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"  {name}: {done.stderr.strip().splitlines()[-1]}")
    print(f"done in {time.monotonic() - started:.0f} s; logs in {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
