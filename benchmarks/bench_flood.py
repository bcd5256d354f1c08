"""A hostile device with valid credentials floods the coordinator with partial transfers: what
it costs the coordinator's memory, and whether an honest device's rounds go on meanwhile.

A real federation on loopback: Mosquitto with TLS, passwords and per-device ACLs
(``tests/integration/mosquitto.start_mosquitto``), ``fedprune-coordinator run`` and one honest
``fedprune-agent run`` (dev-0) on digits; dev-1 logs in with its own broker credentials and,
as its ACL allows, publishes on its own update topic ``--chunks`` chunks of 128 KiB (the
broker's default message size), ``--per-transfer`` - 1 of each transfer's ``--per-transfer``
chunks, so no transfer ever completes: the field attack (3,200 partial 128 KiB chunks).

Measured: the coordinator's VmRSS (``/proc/<pid>/status``) before the flood, its peak while the
flood is fed (sampled every 50 ms) and 10 s after; rounds that closed with dev-0's update while
the flood ran; what ``/metrics`` counted (``reassembly_dropped_total``, ``updates_rejected_total``).

Run (about 1 min per tree on 2 cores):
  .venv/bin/python benchmarks/bench_flood.py --baseline 83ce574
  .venv/bin/python benchmarks/bench_flood.py --baseline 83ce574 --per-transfer 4
Writes a table to stdout and benchmarks/results/flood_<chunks>x<per-transfer>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baseline import add_arguments, describe, side_by_side  # noqa: E402
from fedprune.coordinator.lab.localfed import LocalFederation  # noqa: E402
from fedprune.common.mqtt import MqttLink  # noqa: E402
from fedprune.protocol.chunks import DEFAULT_MAX_CHUNK, HEADER_SIZE, split  # noqa: E402
from fedprune.protocol.topics import update_topic  # noqa: E402
from tests.integration.mosquitto import start_mosquitto  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FEDERATION = "bench"
PIECE = DEFAULT_MAX_CHUNK - HEADER_SIZE


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def counters(metrics: str, name: str) -> dict[str, float]:
    return {reason: float(v) for reason, v in re.findall(rf'fedprune_{name}\{{reason="([^"]+)"\}} (\S+)', metrics)}


def flood(link: MqttLink, chunks: int, per_transfer: int) -> float:
    """Publish the flood (each acknowledged by the broker); seconds it took."""
    started = time.monotonic()
    topic = update_topic(FEDERATION, "dev-1")
    body = os.urandom(PIECE * per_transfer)
    sent, transfer = 0, 0
    while sent < chunks:
        transfer += 1
        pieces = split(body, transfer_id=transfer)[: per_transfer - 1]
        handles = [link.publish(topic, c) for c in pieces[: chunks - sent]]
        assert all(h.wait(60) for h in handles), "the broker did not acknowledge the flood"
        sent += len(handles)
    return time.monotonic() - started


def measure(args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix="fedprune-bench-flood-"))
    mosquitto = start_mosquitto(FEDERATION, 2)
    access = mosquitto.access()
    fed = LocalFederation(root=out, broker=access, devices=("dev-0", "dev-1"), rounds=10_000, federation=FEDERATION,
                          partition="iid", settings={"broker": {"username": mosquitto.coordinator.username},
                                                     "rounds": {"min_devices": 1, "quorum": 1, "deadline_s": 30.0}})
    print(f"{ROOT}: {args.chunks} partial 128 KiB chunks from dev-1 ({args.per_transfer - 1} of each "
          f"{args.per_transfer}-chunk transfer) while dev-0 trains, Mosquitto TLS", flush=True)
    hostile = None
    try:
        fed.prepare()
        fed.start_coordinator()
        fed.wait_for_coordinator()
        fed.start_agent("dev-0")
        fed.wait_for_round(3, 120)
        pid = fed.processes["coordinator"].pid
        before = rss_mb(pid)
        rounds_before = len(fed.history())
        hostile = MqttLink(mosquitto.link_config(mosquitto.devices[1]))
        hostile.wait_connected(10)
        peak, done = before, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        seconds = flood(hostile, args.chunks, args.per_transfer)
        time.sleep(10)
        done.set()
        sampler.join()
        after = rss_mb(pid)
        history = fed.history()[rounds_before:]
        metrics = fed.metrics_text()
    finally:
        if hostile is not None:
            hostile.close()
        fed.stop_all()
        mosquitto.close()
        shutil.rmtree(out, ignore_errors=True)
    return {
        "commit": describe(), "rss_before_mb": before, "rss_peak_mb": peak, "rss_after_10s_mb": after,
        "flood_seconds": seconds, "rounds_during_flood": len(history),
        "rounds_with_honest_update": sum(h["received"] for h in history),
        "reassembly_dropped": counters(metrics, "reassembly_dropped_total"),
        "rejected": counters(metrics, "updates_rejected_total"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3200)
    parser.add_argument("--per-transfer", type=int, default=65, help="chunks a flood transfer claims")
    add_arguments(parser)
    args = parser.parse_args(argv)
    runs = side_by_side(Path(__file__), argv, args, measure)
    if runs is None:
        return 0
    print(f"\n{'':>10}{'commit':>14}{'RSS before':>12}{'peak':>8}{'after 10 s':>12}{'flood s':>9}{'rounds':>8}"
          f"{'honest':>8}  dropped / rejected")
    for name, r in runs.items():
        print(f"{name:>10}{r['commit']:>14}{r['rss_before_mb']:>10.1f}MB{r['rss_peak_mb']:>6.1f}MB"
              f"{r['rss_after_10s_mb']:>10.1f}MB{r['flood_seconds']:>9.1f}{r['rounds_during_flood']:>8}"
              f"{r['rounds_with_honest_update']:>8}  {r['reassembly_dropped'] or '-'} / {r['rejected'] or '-'}")
    doc = {"command": "benchmarks/bench_flood.py " + " ".join(argv),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "config": {"chunks": args.chunks, "per_transfer": args.per_transfer, "chunk_bytes": DEFAULT_MAX_CHUNK,
                      "model": "mlp (digits)"}, **runs}
    out = RESULTS / f"flood_{args.chunks}x{args.per_transfer}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
