"""Scale: 1,000 devices against one real coordinator daemon over a real Mosquitto (TLS, ACL).

What runs: ``start_mosquitto`` (the integration tests' broker: per-device passwords, the ACL,
``max_queued_messages`` 20,000 and ``max_queued_bytes`` 256 MiB per client from the production
template); ``fedprune-coordinator run`` as a subprocess with 1,000 devices enrolled in its
registry (real X25519/Ed25519 identities); ``--procs`` device processes, each holding its share
of the devices as one ``MqttLink`` per device (its own TLS connection, password and ACL), an
``AgentChannel`` each, and *pre-generated* sealed updates instead of training (the digits MLP,
values only, as a device sends between readjust rounds). The coordinator's round is real:
registration of all devices, selection of all, the signed RoundTask to every device, 1,000
sealed updates in, leave-one-out contribution scores and aggregation, the checkpoint.

Measured: registration time (first Register published -> the coordinator logged all), round
time (the coordinator's own duration_s from open to close, plus its close_s), coordinator peak
memory (VmHWM), broker CPU seconds (utime + stime from /proc/<pid>/stat) per phase.

Run (~2-4 min on 2 cores; 1,000 TLS connections, ~1 GB RAM):
  .venv/bin/python benchmarks/bench_scale.py            (writes benchmarks/results/scale.json)
  .venv/bin/python benchmarks/bench_scale.py --devices 200 --procs 2   (a quick look)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedprune.coordinator.fleet import enrollment  # noqa: E402
from fedprune.coordinator.config import load_config  # noqa: E402
from fedprune.coordinator.config import model_spec  # noqa: E402
from fedprune.coordinator.fleet.registry_store import RegistryStore  # noqa: E402
from fedprune.coordinator.state import StateDir  # noqa: E402
from fedprune.coordinator.core.strategy import Strategy  # noqa: E402
from fedprune.common.models import init_params, model_layout  # noqa: E402
from fedprune.common.mqtt import LinkConfig, MqttLink  # noqa: E402
from fedprune.protocol.channel import AgentChannel  # noqa: E402
from fedprune.protocol.crypto import Identity, PublicIdentity  # noqa: E402
from fedprune.protocol.messages import Register, RoundTask, Update  # noqa: E402
from fedprune.protocol.sparse import SparseParams  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
FEDERATION = "scale"
BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")


# ---- a device process: many devices, no training ---------------------------------------------
def devices_process(job_path: Path) -> int:
    job = msgpack.unpackb(job_path.read_bytes(), raw=False, strict_map_key=False)
    config = load_config(Path(job["config"]), env={})
    layout = model_layout(model_spec(config))
    trainable = layout.subset(s.name for s in layout.trainable)
    masks = {k: np.frombuffer(v, bool).reshape(layout[k].shape) for k, v in job["masks"].items()}
    coordinator = PublicIdentity.from_bytes(job["coordinator"])
    inbox: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
    rng = np.random.default_rng(job["index"])
    channels, registers, updates = {}, {}, {}
    started = time.perf_counter()
    for device in job["devices"]:
        name = device["id"]
        ch = AgentChannel(federation=FEDERATION, device=name, identity=Identity.from_raw(*device["keys"]),
                          coordinator=coordinator, layout=layout)
        ch.remember_masks(0, masks)
        channels[name] = ch
        now = time.time()
        registers[name] = ch.send(Register(name, 4, 4096, "none", 100, "bench"), now)
        delta = {s.name: rng.standard_normal(s.shape).astype(np.float32) * 0.01 * (masks[s.name] if s.masked else 1)
                 for s in trainable}
        updates[name] = ch.send(Update(
            round=1, device=name, mask_version=0, n_examples=100, metrics={"train_loss": 1.0},
            class_losses={c: (1.0 + 0.01 * c, 10) for c in range(10)},
            delta=SparseParams.from_dense(trainable, delta, masks)), now + 1)
    pregen_s = time.perf_counter() - started
    links = {}
    for device in job["devices"]:
        name = device["id"]
        links[name] = MqttLink(
            LinkConfig(url=job["url"], client_id=name, username=name, password=device["password"],
                       ca_file=Path(job["ca_file"]), protocol="5"),
            subscriptions=[(f, 1) for f in channels[name].subscriptions],
            on_message=lambda topic, payload, name=name: inbox.put((name, topic, payload)))
    for link in links.values():
        link.wait_connected(120)
    print(json.dumps({"ready": True, "pregen_s": pregen_s}), flush=True)
    sys.stdin.readline()
    handles = [links[n].publish(p.topic, p.payload) for n, pubs in registers.items() for p in pubs]
    sent, answered, task_bytes = [], set(), 0
    deadline = time.monotonic() + job["timeout_s"]
    while len(answered) < len(links) and time.monotonic() < deadline:
        try:
            name, topic, payload = inbox.get(timeout=1.0)
        except queue.Empty:
            continue
        task_bytes += len(payload)
        message = channels[name].receive(topic, payload, time.time())
        if isinstance(message, RoundTask) and message.round == 1 and name in message.selected and name not in answered:
            answered.add(name)
            sent += [links[name].publish(p.topic, p.payload) for p in updates[name]]
    acked = all(h.wait(max(1.0, deadline - time.monotonic())) for h in handles + sent)
    print(json.dumps({"answered": len(answered), "acked": acked, "task_bytes": task_bytes,
                      "update_bytes": sum(len(p.payload) for pubs in updates.values() for p in pubs)}), flush=True)
    sys.stdin.readline()
    for link in links.values():
        link.close(timeout=0.2)
    return 0


# ---- measurement helpers --------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def status_kib(pid: int, key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def broker_pid(directory: Path) -> int:
    out = subprocess.run(["pgrep", "-f", str(directory / "mosquitto.conf")], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def wait_for(condition, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=400.0)
    parser.add_argument("--devices-job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devices_job is not None:
        return devices_process(args.devices_job)
    from tests.integration.mosquitto import start_mosquitto

    t_start = time.monotonic()
    broker = start_mosquitto(FEDERATION, args.devices)
    bpid = broker_pid(broker.directory)
    cpu_start = cpu_seconds(bpid)
    root = broker.directory / "coordinator"
    workers: list[subprocess.Popen] = []
    coordinator = None
    try:
        config_path = root / "coordinator.toml"
        enrollment.init(config_path=config_path, state_dir=root / "state", federation=FEDERATION, broker_url=broker.url,
                        embedded_broker=False, settings={
                            "broker": {"username": broker.coordinator.username, "password": broker.coordinator.password,
                                       "ca_file": str(broker.ca_file)},
                            "rounds": {"total": 2, "min_devices": args.devices, "quorum": args.devices,
                                       "deadline_s": args.timeout, "reannounce_s": args.timeout,
                                       "heartbeat_timeout_s": 3600.0},
                            "metrics": {"port": 0}})
        config = load_config(config_path, env={})
        state = StateDir(config.state.dir)
        identities = {c.username: Identity.generate() for c in broker.devices}
        with RegistryStore(state.root).edit(config.rounds.heartbeat_timeout_s) as registry:
            for name, identity in identities.items():
                registry.enroll(name, identity.public.signing, identity.public.agreement, now=time.time())
        # The daemon's own initial state (same seed, same code): the masks every device holds for mask_version 0.
        spec = model_spec(config)
        initial = Strategy(config.strategy).initial_state(model_layout(spec), init_params(spec, config.federation.seed),
                                                          np.random.default_rng(config.federation.seed))
        coordinator_public = Identity.from_pem((state.keys / "coordinator.pem").read_bytes()).public
        creds = list(broker.devices)
        for index in range(args.procs):
            share = creds[index::args.procs]
            job = root / f"devices-{index}.msgpack"
            job.write_bytes(msgpack.packb({
                "index": index, "config": str(config_path), "url": broker.url, "ca_file": str(broker.ca_file),
                "coordinator": coordinator_public.to_bytes(), "timeout_s": args.timeout,
                "masks": {k: np.ascontiguousarray(v).tobytes() for k, v in initial.masks.items()},
                "devices": [{"id": c.username, "password": c.password, "keys": list(identities[c.username].to_raw())}
                            for c in share]}, use_bin_type=True))
            workers.append(subprocess.Popen([sys.executable, __file__, "--devices-job", str(job)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        ready = [json.loads(w.stdout.readline()) for w in workers]
        connected_s = time.monotonic() - t_start
        print(f"{args.devices} devices connected over TLS from {args.procs} processes ({connected_s:.1f} s incl. "
              f"pre-generation {max(r['pregen_s'] for r in ready):.1f} s)")
        log_path = root / "coordinator.log"
        with log_path.open("wb") as log:
            coordinator = subprocess.Popen([str(BIN / "fedprune-coordinator"), "run", "--config", str(config_path)],
                                           stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        text = lambda: log_path.read_text(errors="replace")  # noqa: E731
        wait_for(lambda: "event=mqtt_connected" in text(), 120, "the coordinator's connection")
        cpu0, t0 = cpu_seconds(bpid), time.monotonic()
        for w in workers:
            w.stdin.write(b"go\n")
            w.stdin.flush()
        t_registered = wait_for(lambda: text().count("event=registered ") >= args.devices, args.timeout, "registration")
        cpu_registered = cpu_seconds(bpid)
        t_open = wait_for(lambda: "event=round_open round=1 " in text(), 60, "round 1 to open")
        t_closed = wait_for(lambda: state.read_history(), args.timeout, "round 1 to close")
        cpu_closed = cpu_seconds(bpid)
        hwm_kib, rss_kib = status_kib(coordinator.pid, "VmHWM"), status_kib(coordinator.pid, "VmRSS")
        entry = state.read_history()[0]
        reports = [json.loads(w.stdout.readline()) for w in workers]
        open_line = re.search(r"event=round_open round=1 selected=(\d+)", text())
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(60)
        for w in workers:
            w.stdin.write(b"bye\n")
            w.stdin.flush()
            w.wait(60)
    finally:
        for process in [*workers, *([coordinator] if coordinator else [])]:
            if process.poll() is None:
                process.kill()
        broker.close()
    n = args.devices
    doc = {
        "config": {"devices": n, "device_processes": args.procs, "model": "mlp 64-256-128-10 (digits)",
                   "broker": "mosquitto 2.0 (TLS, passwords, ACL), one connection per device",
                   "updates": "pre-generated sealed Update, values only (mask_version 0)"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()},
        "selected": int(open_line.group(1)), "received": entry["received"], "answered": sum(r["answered"] for r in reports),
        "all_acked": all(r["acked"] for r in reports),
        "connect_s": connected_s, "registration_s": t_registered - t0, "open_after_registration_s": t_open - t_registered,
        "round_duration_s": entry["duration_s"], "round_close_s": entry["close_s"],
        "round_wall_s": t_closed - t_open, "total_wall_s": time.monotonic() - t_start,
        "coordinator_vm_hwm_mib": hwm_kib / 1024, "coordinator_vm_rss_mib": rss_kib / 1024,
        "broker_cpu_s": {"tls_connects": cpu0 - cpu_start, "registration": cpu_registered - cpu0, "round": cpu_closed - cpu_registered,
                         "total": cpu_closed - cpu0},
        "update_bytes_each": reports[0]["update_bytes"] / max(1, len(creds[0::args.procs])),
        "task_bytes_per_device": reports[0]["task_bytes"] / max(1, len(creds[0::args.procs])),
        "bytes_in_total_round1": entry["cum_bytes_in"], "bytes_out_total_round1": entry["cum_bytes_out"],
    }
    rows = [("devices registered / selected / received", f"{n} / {doc['selected']} / {doc['received']}"),
            ("registration (all devices)", f"{doc['registration_s']:.1f} s"),
            ("round open -> all updates in (coordinator)", f"{doc['round_duration_s']:.1f} s"),
            ("close: contribution scores, aggregation", f"{doc['round_close_s']:.2f} s"),
            ("coordinator VmHWM", f"{doc['coordinator_vm_hwm_mib']:.0f} MiB"),
            ("broker CPU: TLS connects / registration / round",
             f"{doc['broker_cpu_s']['tls_connects']:.1f} / {doc['broker_cpu_s']['registration']:.1f} / "
             f"{doc['broker_cpu_s']['round']:.1f} s"),
            ("update size / task size", f"{doc['update_bytes_each'] / 1e3:.0f} kB / "
                                        f"{doc['task_bytes_per_device'] / 1e3:.0f} kB"),
            ("total wall", f"{doc['total_wall_s']:.0f} s")]
    print()
    for label, value in rows:
        print(f"{label:<44}{value:>20}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0 if doc["received"] == n else 1


if __name__ == "__main__":
    sys.exit(main())
