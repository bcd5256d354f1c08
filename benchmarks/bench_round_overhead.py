"""Round overhead of the real daemons: what a round costs beyond its slowest local training.

A whole federation on loopback, built by ``fedprune.coordinator.lab.localfed.LocalFederation`` like the demo
and the integration tests: digits split IID over N devices (.npz each), a coordinator config,
one enrollment bundle and ``agent.toml`` per device, then one ``fedprune-coordinator run`` and N
``fedprune-agent run`` processes. The broker is either the real Mosquitto (TLS, passwords, ACL,
started exactly like the integration tests: ``tests/integration/mosquitto.start_mosquitto``) or
the embedded amqtt broker (``[broker] embedded = true``, as in the demo).

Per round, from the coordinator's ``history.jsonl`` (``duration_s``), the coordinator's log
(``round_open`` / ``round_closed`` timestamps) and every agent's ``event=trained ... seconds=S``:

  overhead = duration_s - max_n S_n          (target <= 0.5 s)
  first_start / last_start = when the first / last agent began training, after round_open
  tail     = round end (open + duration_s) - last agent's end of training: its upload + ingest + close
  close    = aggregation + evaluation + checkpoint (round_closed log - open - duration_s)
  cycle    = round_open(t+1) - round_open(t); cycle_overhead = cycle - max_n S_n

``duration_s`` is stamped when the round closes, *before* aggregation; ``cycle`` includes it.
S_n is measured inside training (perf_counter around ``train_local``, after data loading), so
with ``--subprocess`` the child's spawn, torch import and pipe I/O count as overhead, not training.
All N agents train at once on the machine's cores, so S_n includes CPU contention.
Round 1 (warm-up: first task carries the masks, first torch kernels) is reported separately.

Run (one at a time, ~3-6 min each on 2 cores):
  .venv/bin/python benchmarks/bench_round_overhead.py --broker mosquitto
  .venv/bin/python benchmarks/bench_round_overhead.py --broker embedded
  .venv/bin/python benchmarks/bench_round_overhead.py --broker mosquitto --subprocess --rounds 5
Each run updates its own entry in benchmarks/results/round_overhead.json.
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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedprune.coordinator.fleet.broker import free_port  # noqa: E402
from fedprune.coordinator.lab.localfed import BrokerAccess, LocalFederation  # noqa: E402
from tests.integration.mosquitto import MosquittoBroker, start_mosquitto  # noqa: E402

BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results" / "round_overhead.json"
FEDERATION = "bench"
TARGET_S = 0.5
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(line: str) -> float | None:
    """The unix time of a log line written with the CLIs' ``%(asctime)s`` format."""
    match = _STAMP.match(line)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


@dataclass
class BenchFederation:
    """A LocalFederation (IID digits, every agent on one broker) and the Mosquitto it may own."""

    fed: LocalFederation
    mosquitto: MosquittoBroker | None

    @property
    def logs(self) -> Path:
        return self.fed.root / "logs"

    @property
    def names(self) -> tuple[str, ...]:
        return self.fed.devices

    def close(self) -> None:
        self.fed.stop_all()
        if self.mosquitto is not None:
            self.mosquitto.close()


def build(out: Path, devices: int, rounds: int, broker: str, in_subprocess: bool, heartbeat_s: float,
          seed: int = 0) -> BenchFederation:
    mosquitto = None
    settings: dict = {"rounds": {"deadline_s": 120.0, "reannounce_s": 120.0}, "metrics": {"port": -1}}
    if broker == "mosquitto":
        mosquitto = start_mosquitto(FEDERATION, devices)
        access = mosquitto.access()
        names = tuple(c.username for c in mosquitto.devices)
        settings["broker"] = {"username": mosquitto.coordinator.username}
    else:
        access = BrokerAccess(url=f"mqtt://127.0.0.1:{free_port()}", embedded=True)
        names = tuple(f"dev-{i}" for i in range(devices))
    fed = LocalFederation(
        root=out, broker=access, devices=names, rounds=rounds, federation=FEDERATION, partition="iid", seed=seed,
        settings=settings, agent_sections={"agent": {"train_in_subprocess": in_subprocess, "heartbeat_s": heartbeat_s}},
    )
    try:
        fed.prepare()
    except BaseException:
        if mosquitto is not None:
            mosquitto.close()
        raise
    return BenchFederation(fed, mosquitto)


def wait(bench: BenchFederation, rounds: int, timeout_s: float) -> list[dict]:
    coordinator = bench.fed.processes["coordinator"]
    deadline = time.monotonic() + timeout_s
    shown = 0
    while coordinator.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        history = bench.fed.history()
        for h in history[shown:]:
            print(f"  round {h['round']:3d}/{rounds}  duration {h['duration_s']:.2f} s", flush=True)
        shown = len(history)
    return bench.fed.history()


def analyse(fed: BenchFederation, history: list[dict]) -> list[dict]:
    opened: dict[int, float] = {}
    closed: dict[int, float] = {}
    for line in (fed.logs / "coordinator.log").read_text(errors="replace").splitlines():
        t = log_time(line)
        f = fields(line)
        if t is not None and f.get("event") == "round_open":
            opened[int(f["round"])] = t
        elif t is not None and f.get("event") == "round_closed":
            closed[int(f["round"])] = t
    trained: dict[int, list[tuple[float, float]]] = {}  # round -> [(end time, seconds)]
    for name in fed.names:
        for line in (fed.logs / f"{name}.log").read_text(errors="replace").splitlines():
            t = log_time(line)
            f = fields(line)
            if t is not None and f.get("event") == "trained":
                trained.setdefault(int(f["round"]), []).append((t, float(f["seconds"])))
    rows = []
    for h in history:
        r = h["round"]
        runs = trained.get(r, [])
        if not runs or r not in opened:
            continue
        t_open = opened[r]
        max_train = max(s for _, s in runs)
        starts = [end - s for end, s in runs]
        row = {
            "round": r, "received": h["received"], "selected": h["selected"], "readjust": h["readjust"],
            "duration_s": h["duration_s"], "max_train_s": max_train, "mean_train_s": statistics.fmean(s for _, s in runs),
            "overhead_s": h["duration_s"] - max_train,
            "first_start_s": min(starts) - t_open, "last_start_s": max(starts) - t_open,
            "tail_s": t_open + h["duration_s"] - max(end for end, _ in runs),
            "close_s": closed[r] - t_open - h["duration_s"] if r in closed else None,
            "cycle_s": opened[r + 1] - t_open if r + 1 in opened else None,
            "cum_bytes_in": h["cum_bytes_in"], "cum_bytes_out": h["cum_bytes_out"],
        }
        row["cycle_overhead_s"] = row["cycle_s"] - max_train if row["cycle_s"] is not None else None
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    steady = [r for r in rows if r["round"] > 1]

    def stat(key: str) -> dict:
        values = [r[key] for r in steady if r[key] is not None]
        if not values:
            return {}
        return {"median": statistics.median(values), "max": max(values)}

    first = next((r for r in rows if r["round"] == 1), None)
    keys = ("overhead_s", "duration_s", "max_train_s", "first_start_s", "last_start_s", "tail_s", "close_s",
            "cycle_s", "cycle_overhead_s")
    return {
        "rounds_measured": len(steady),
        "steady": {k: stat(k) for k in keys},
        "round1": {k: first[k] for k in keys} if first else None,
        "target_overhead_s": TARGET_S,
        "meets_target": bool(steady) and statistics.median(r["overhead_s"] for r in steady) <= TARGET_S,
    }


def print_table(name: str, rows: list[dict], summary: dict) -> None:
    print(f"\n{name}")
    head = ("round", "duration", "max train", "overhead", "1st start", "last start", "tail", "close", "cycle")
    print("".join(f"{h:>11}" for h in head))
    for r in rows:
        cells = [r["round"], r["duration_s"], r["max_train_s"], r["overhead_s"], r["first_start_s"],
                 r["last_start_s"], r["tail_s"], r["close_s"], r["cycle_s"]]
        print(f"{cells[0]:>11d}" + "".join(f"{c:>11.3f}" if c is not None else f"{'-':>11}" for c in cells[1:]))
    s = summary["steady"]
    print(f"rounds 2..: overhead median {s['overhead_s']['median']:.3f} s, max {s['overhead_s']['max']:.3f} s "
          f"(target <= {TARGET_S} s); cycle overhead median {s['cycle_overhead_s'].get('median', float('nan')):.3f} s")
    if summary["round1"]:
        print(f"round 1 (warm-up): overhead {summary['round1']['overhead_s']:.3f} s, "
              f"duration {summary['round1']['duration_s']:.3f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--subprocess", action="store_true", help="agents train in a child (train_in_subprocess=true)")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="agent heartbeat_s")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--keep", action="store_true", help="keep the federation directory (logs) after the run")
    args = parser.parse_args(argv)
    name = f"{args.broker}-{'subprocess' if args.subprocess else 'inprocess'}"
    out = Path(tempfile.mkdtemp(prefix="fedprune-bench-rounds-"))
    print(f"{name}: {args.devices} agents, {args.rounds} rounds, digits MLP, in {out}")
    load_before = os.getloadavg()
    started = time.monotonic()
    fed = build(out, args.devices, args.rounds, args.broker, args.subprocess, args.heartbeat)
    try:
        fed.fed.start()
        history = wait(fed, args.rounds, args.timeout)
    finally:
        fed.close()
    wall = time.monotonic() - started
    rows = analyse(fed, history)
    if len(rows) < args.rounds:
        print(f"only {len(rows)}/{args.rounds} rounds completed; logs in {fed.logs}", file=sys.stderr)
        return 1
    summary = summarise(rows)
    print_table(name, rows, summary)
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc[name] = {
        "config": {"devices": args.devices, "rounds": args.rounds, "broker": args.broker,
                   "train_in_subprocess": args.subprocess, "threads": 1, "heartbeat_s": args.heartbeat,
                   "model": "mlp 64-256-128-10 (digits), fedprune, sparsity 0.8, 2 local epochs"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "wall_s": wall, "summary": summary, "rounds": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS} [{name}] in {wall:.0f} s")
    if args.keep:
        print(f"kept {out}")
    else:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
