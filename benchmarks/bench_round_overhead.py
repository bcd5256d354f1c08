"""Round overhead of the real daemons: what a round costs beyond its slowest local training.

A whole federation on loopback, set up the way ``coordinator/demo.py`` does it: digits split IID
over N devices (.npz each), ``coordinator.toml`` from ``enrollment.init`` plus text edits, one
enrollment bundle and ``agent.toml`` per device, then one ``fedprune-coordinator run`` and N
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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator import enrollment  # noqa: E402
from coordinator.config import load_config  # noqa: E402
from edge_agent.data import load_dataset, partition_iid  # noqa: E402

BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results" / "round_overhead.json"
FEDERATION = "bench"
TARGET_S = 0.5
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log_time(line: str) -> float | None:
    """The unix time of a log line written with the CLIs' ``%(asctime)s`` format."""
    match = _STAMP.match(line)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def edit(text: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        if old not in text:
            raise RuntimeError(f"coordinator.toml template changed: {old!r} not found")
        text = text.replace(old, new, 1)
    return text


class Federation:
    """Files and processes of one benchmark federation; ``close`` ends everything it started."""

    def __init__(self, out: Path, devices: int, rounds: int, broker: str, in_subprocess: bool, heartbeat_s: float,
                 seed: int = 0) -> None:
        self.out = out
        self.rounds = rounds
        self.mosquitto = None
        self.names = [f"dev-{i}" for i in range(devices)]
        passwords = {name: "" for name in self.names}
        if broker == "mosquitto":
            from tests.integration.mosquitto import start_mosquitto

            self.mosquitto = start_mosquitto(FEDERATION, devices)
            passwords = {c.username: c.password for c in self.mosquitto.devices}
            url = self.mosquitto.url
        else:
            url = f"mqtt://127.0.0.1:{free_port()}"
        dataset = load_dataset("digits", seed)
        parts = partition_iid(dataset.y_train, devices, np.random.default_rng(seed))
        (out / "data").mkdir(parents=True)
        for name, idx in zip(self.names, parts):
            np.savez(out / "data" / f"{name}.npz", X=dataset.X_train[idx], y=dataset.y_train[idx])
        np.savez(out / "data" / "holdout.npz", X=dataset.X_test, y=dataset.y_test)
        self.config_path = out / "coordinator.toml"
        enrollment.init(config_path=self.config_path, state_dir=out / "state", federation=FEDERATION,
                        broker_url=url, embedded_broker=broker == "embedded")
        edits = [
            ("input_shape = [64]", "input_shape = [1, 8, 8]"),
            ("total = 20", f"total = {rounds}"),
            ("min_devices = 2", f"min_devices = {devices}"),
            ("quorum = 2", f"quorum = {devices}"),
            ("deadline_s = 120.0", "deadline_s = 120.0"),
            ("reannounce_s = 10.0", "reannounce_s = 120.0"),
            ("port = 9464", "port = -1"),
            ("# data =", f'data = "{out / "data" / "holdout.npz"}"'),
        ]
        if self.mosquitto is not None:
            edits += [('password = ""', f'password = "{self.mosquitto.coordinator.password}"'),
                      ("# ca_file =", f'ca_file = "{self.mosquitto.ca_file}"')]
        self.config_path.write_text(edit(self.config_path.read_text(), edits))
        config = load_config(self.config_path, env={})
        self.agent_configs = []
        for name in self.names:
            bundle = out / "devices" / name / "bundle.json"
            enrollment.enroll(config, name, bundle, broker_password=passwords[name])
            path = out / "devices" / name / "agent.toml"
            path.write_text(
                "[agent]\n"
                f'bundle = "{bundle}"\ndata = "{out / "data" / f"{name}.npz"}"\nstate_dir = "{bundle.parent / "state"}"\n'
                f"threads = 1\ntrain_in_subprocess = {str(in_subprocess).lower()}\nheartbeat_s = {heartbeat_s}\n"
            )
            self.agent_configs.append(path)
        self.logs = out / "logs"
        self.logs.mkdir()
        self.coordinator: subprocess.Popen | None = None
        self.agents: list[subprocess.Popen] = []

    def start(self) -> None:
        self.start_coordinator()
        self.wait_coordinator_subscribed()
        for i in range(len(self.agent_configs)):
            self.start_agent(i)

    def start_coordinator(self) -> subprocess.Popen:
        self.coordinator = subprocess.Popen(
            [BIN / "fedprune-coordinator", "run", "--config", self.config_path],
            stdout=open(self.logs / "coordinator.log", "wb"), stderr=subprocess.STDOUT, env=_ENV)
        return self.coordinator

    def wait_coordinator_subscribed(self, timeout_s: float = 120.0) -> None:
        """Agents started earlier would register into the void: the coordinator's session is new."""
        log = self.logs / "coordinator.log"
        deadline = time.monotonic() + timeout_s
        while "event=mqtt_connected" not in log.read_text(errors="replace"):
            if self.coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not connect; see {log}")
            time.sleep(0.1)

    def start_agent(self, i: int) -> subprocess.Popen:
        cfg = self.agent_configs[i]
        agent = subprocess.Popen([BIN / "fedprune-agent", "run", "--config", cfg],
                                 stdout=open(self.logs / f"{cfg.parent.name}.log", "wb"), stderr=subprocess.STDOUT,
                                 env=_ENV)
        self.agents.append(agent)
        return agent

    def history(self) -> list[dict]:
        path = self.out / "state" / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait(self, timeout_s: float) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        shown = 0
        while self.coordinator.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            history = self.history()
            for h in history[shown:]:
                print(f"  round {h['round']:3d}/{self.rounds}  duration {h['duration_s']:.2f} s", flush=True)
            shown = len(history)
        return self.history()

    def close(self) -> None:
        procs = [p for p in [*self.agents, self.coordinator] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.mosquitto is not None:
            self.mosquitto.close()


def analyse(fed: Federation, history: list[dict]) -> list[dict]:
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
    fed = Federation(out, args.devices, args.rounds, args.broker, args.subprocess, args.heartbeat)
    try:
        fed.start()
        history = fed.wait(args.timeout)
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
