"""Agent memory: idle RSS of a running ``fedprune-agent run`` and its peak while training.

A digits-MLP federation of two devices over the real Mosquitto (TLS, passwords, ACL), set up by
``bench_round_overhead.build`` (a LocalFederation). The coordinator waits for two online devices, so:

1. idle: only agent A runs. It is connected, registered (the coordinator logged
   ``event=registered``) and heartbeating, with no round (``min_devices = 2``). Its
   /proc/<pid>/status VmRSS is sampled for ``--idle`` seconds (target <= 80 MB with
   ``train_in_subprocess = true``: the daemon never imports torch).
2. training: agent B starts, the rounds run. The process trees of both agents are sampled every
   10 ms: VmRSS/VmHWM of each daemon and of every child it spawns (``python -m edge_agent.worker``:
   the one-off layout child at the first task, then one training child per round).
3. idle again after the last round: the daemons' VmRSS once the children are gone.

``--inprocess`` runs the same with ``train_in_subprocess = false`` (torch imported at start; the
training peak is the daemon's own VmHWM).

Run (each ~1-2 min on 2 cores):
  .venv/bin/python benchmarks/bench_agent_rss.py
  .venv/bin/python benchmarks/bench_agent_rss.py --inprocess
Each run updates its entry in benchmarks/results/agent_rss.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_round_overhead import build  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "agent_rss.json"
TARGET_IDLE_MB = 80.0
SAMPLE_S = 0.01


def status_kb(pid: int) -> dict[str, int] | None:
    """VmRSS and VmHWM (kB) of ``pid``; None once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out if len(out) == 2 else None


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


class TreeSampler:
    """Peak VmRSS/VmHWM of one daemon and of each child it spawned, sampled every call."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.daemon_rss: list[int] = []
        self.daemon_hwm = 0
        self.child_hwm: dict[int, int] = {}
        self.child_seen: dict[int, float] = {}

    def sample(self) -> None:
        own = status_kb(self.pid)
        if own is not None:
            self.daemon_rss.append(own["VmRSS"])
            self.daemon_hwm = max(self.daemon_hwm, own["VmHWM"])
        for child in children(self.pid):
            got = status_kb(child)
            if got is not None:
                self.child_seen.setdefault(child, time.monotonic())
                self.child_hwm[child] = max(self.child_hwm.get(child, 0), got["VmHWM"])


def mb(kb: float) -> float:
    return kb / 1024


def sample_idle(pid: int, seconds: float) -> dict:
    rss = []
    hwm = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = status_kb(pid)
        if got is None:
            raise RuntimeError(f"agent {pid} exited while idle")
        if children(pid):
            raise RuntimeError("the idle agent has a child process: a round started?")
        rss.append(got["VmRSS"])
        hwm = got["VmHWM"]
        time.sleep(0.1)
    return {"rss_median_mb": mb(statistics.median(rss)), "rss_max_mb": mb(max(rss)), "hwm_mb": mb(hwm),
            "samples": len(rss), "seconds": seconds}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inprocess", action="store_true", help="train_in_subprocess = false")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=15.0, help="seconds of idle sampling")
    args = parser.parse_args(argv)
    name = "inprocess" if args.inprocess else "subprocess"
    out = Path(tempfile.mkdtemp(prefix="fedprune-bench-rss-"))
    print(f"agent RSS, train_in_subprocess={not args.inprocess}, 2 agents, {args.rounds} rounds, in {out}")
    fed = build(out, devices=2, rounds=args.rounds, broker="mosquitto", in_subprocess=not args.inprocess,
                heartbeat_s=5.0)
    coordinator_log = fed.logs / "coordinator.log"
    try:
        coordinator = fed.fed.start_coordinator()
        fed.fed.wait_for_coordinator()
        a = fed.fed.start_agent(fed.names[0])
        wait_for(lambda: "event=registered device=dev-0" in coordinator_log.read_text(errors="replace"), 120,
                 "dev-0 to register")
        time.sleep(1.0)  # let the first heartbeat go out
        idle = sample_idle(a.pid, args.idle)
        audit = out / "devices" / "dev-0" / "state" / "audit.jsonl"
        sent = [json.loads(line)["message_type"] for line in audit.read_text().splitlines()]
        idle["sent_since_start"] = {kind: sent.count(kind) for kind in sorted(set(sent))}
        print(f"idle agent: VmRSS median {idle['rss_median_mb']:.1f} MB, VmHWM {idle['hwm_mb']:.1f} MB, "
              f"sent since start {idle['sent_since_start']}")
        b = fed.fed.start_agent(fed.names[1])
        samplers = [TreeSampler(a.pid), TreeSampler(b.pid)]
        deadline = time.monotonic() + 600
        while coordinator.poll() is None and time.monotonic() < deadline:
            for s in samplers:
                s.sample()
            time.sleep(SAMPLE_S)
        if len(fed.fed.history()) < args.rounds:
            raise RuntimeError(f"only {len(fed.fed.history())}/{args.rounds} rounds ran; logs in {fed.logs}")
        wait_for(lambda: not children(a.pid) and not children(b.pid), 30, "training children to exit")
        after = [sample_idle(p.pid, 3.0) for p in (a, b)]
    finally:
        fed.close()
    rows = []
    for label, s, idle_after in zip(("dev-0", "dev-1"), samplers, after):
        child_peaks = [mb(v) for _, v in sorted(s.child_hwm.items(), key=lambda kv: s.child_seen[kv[0]])]
        rows.append({
            "agent": label, "daemon_hwm_mb": mb(s.daemon_hwm), "children": len(child_peaks),
            "child_hwm_mb": child_peaks, "child_hwm_max_mb": max(child_peaks) if child_peaks else None,
            "idle_after_rss_mb": idle_after["rss_median_mb"],
            "training_peak_mb": max(child_peaks) if (child_peaks and not args.inprocess) else mb(s.daemon_hwm),
        })
    print(f"\n{'agent':<7}{'daemon HWM':>12}{'children':>10}{'child HWM max':>15}{'train peak':>12}{'idle after':>12}  MB")
    for r in rows:
        child = f"{r['child_hwm_max_mb']:.1f}" if r["child_hwm_max_mb"] is not None else "-"
        print(f"{r['agent']:<7}{r['daemon_hwm_mb']:>12.1f}{r['children']:>10d}{child:>15}"
              f"{r['training_peak_mb']:>12.1f}{r['idle_after_rss_mb']:>12.1f}")
    print(f"idle (before any round): {idle['rss_median_mb']:.1f} MB VmRSS (target <= {TARGET_IDLE_MB} MB "
          f"for train_in_subprocess=true)")
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc[name] = {
        "config": {"devices": 2, "rounds": args.rounds, "broker": "mosquitto (TLS)", "train_in_subprocess": not args.inprocess,
                   "threads": 1, "heartbeat_s": 5.0, "model": "mlp 64-256-128-10 (digits)"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "idle_before_rounds": idle,
        "target_idle_mb": TARGET_IDLE_MB,
        "meets_target": idle["rss_median_mb"] <= TARGET_IDLE_MB if not args.inprocess else None,
        "agents": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS} [{name}]")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
