"""What secure aggregation costs per round, beside plain mode (and beside Flower's SecAgg+,
measured in its own virtualenv by benchmarks/flower_secagg/run.py), for 10, 50 and 200 devices.

Model: the digits MLP (64-256-128-10), 80 % sparse (ERK, the coordinator's own initial state).
Every message is a real one, encoded, sealed or encrypted and chunked by the channels the daemons
use (``fedprune.protocol.channel``), and every step is the daemons' own code: the agents'
``SecureParticipant`` (SecAgg+ session, fixed point, masking) and the coordinator's
``SecureCollection`` and ``Strategy``. Updates are random on the mask (their content does not
change sizes or times), with the default int8 values and error feedback in plain mode.

Measured per device and round:
- uplink bytes: plain, one Update (values only, mask unchanged); secure, the four stages
  (keys and loss report, encrypted shares, masked vector, revealed shares);
- added downlink bytes: the three secure downlinks (the task broadcast is the same in both modes);
- coordinator CPU (process time): decoding every uplink plus aggregating (plain: ``finish_round``
  with the defences off, as a secure round runs; secure: relaying, unmasking, ``finish_secure_round``);
- device CPU: the secure stages of the slowest device, and the round time they add on the
  critical path: coordinator CPU + the slowest device at each stage (three more exchanges on the
  network come on top: one per extra stage, not measured here).

Dropouts: how many rounds complete when each device drops out with probability p at a random
stage (after advertising: before sharing, before masking, or before revealing), with the
default degree and with the complete graph, over ``--trials`` rounds of the real SecAgg+ sessions
(``fedprune.protocol.secagg``, vectors of 8 values: only the graph and the shares matter).

Run (about 3 min on 2 cores):
  .venv/bin/python benchmarks/bench_secagg.py
Writes a table to stdout and benchmarks/results/secagg.json; with benchmarks/results/secagg_flower.json
present (its own command is in benchmarks/flower_secagg/README.md), Flower's rows join the table:
Flower sends the dense float32 model and its SecAgg+ masks int64 values, so its "x plain" is
against Flower's own plain round and its device CPU is Flower's client CPU per client.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedprune.common.models import ModelSpec, init_params, model_layout  # noqa: E402
from fedprune.coordinator.core.config import StrategyConfig  # noqa: E402
from fedprune.coordinator.core.records import ClientUpdate  # noqa: E402
from fedprune.coordinator.core.secure_round import SecureCollection, SecureSum  # noqa: E402
from fedprune.coordinator.core.strategy import Strategy  # noqa: E402
from fedprune.edge_agent.core.secure import SecureParticipant  # noqa: E402
from fedprune.protocol.channel import AgentChannel, CoordinatorChannel  # noqa: E402
from fedprune.protocol.crypto import GroupKey, Identity  # noqa: E402
from fedprune.protocol.hyperparams import HyperParams  # noqa: E402
from fedprune.protocol.messages import ModelRef, RoundTask, Update  # noqa: E402
from fedprune.protocol.secagg import SecureParams  # noqa: E402
from fedprune.protocol.secure_setup import SecureSetup  # noqa: E402
from fedprune.protocol.sparse import SparseParams, ValueDtype  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "secagg.json"
FLOWER = ROOT / "benchmarks" / "results" / "secagg_flower.json"
FED = "bench"
SPEC = ModelSpec("mlp", (1, 8, 8), 10)


class World:
    """n enrolled devices and a coordinator holding the federation key, at round 1."""

    def __init__(self, n: int, seed: int) -> None:
        self.layout = model_layout(SPEC)
        self.strategy = Strategy(StrategyConfig(norm_clip=0.0, sybil_cos=0.0, chance_gate=0.0))
        rng = np.random.default_rng(seed)
        self.state = self.strategy.initial_state(self.layout, init_params(SPEC, seed), rng)
        self.devices = tuple(f"d{i:03d}" for i in range(n))
        ids = {d: Identity.generate() for d in self.devices}
        self.coordinator_id = Identity.generate()
        self.channel = CoordinatorChannel(federation=FED, identity=self.coordinator_id,
                                          devices={d: i.public for d, i in ids.items()}, layout=self.layout)
        key = GroupKey.generate()
        self.channel.rekey({d: i.public for d, i in ids.items()}, time.time(), key=key)
        self.agents = {}
        for d, identity in ids.items():
            agent = AgentChannel(federation=FED, device=d, identity=identity, coordinator=self.coordinator_id.public,
                                 layout=self.layout)
            agent.group_keys.put(key)
            self.agents[d] = agent
        self.rng = rng

    def task(self, secure: SecureSetup | None) -> RoundTask:
        plan = self.strategy.plan_round(self.state, self.devices, self.rng)
        self.plan = plan
        return RoundTask(federation=FED, round=1, mask_version=0, model=ModelRef("mlp", (1, 8, 8), 10),
                         weights=SparseParams.from_dense(self.layout, self.state.params, self.state.masks),
                         hyper=replace(HyperParams(), readjust=False), deadline=time.time() + 3600,
                         selected=self.devices, update_values=ValueDtype.INT8, secure=secure)

    def deliver(self, task: RoundTask) -> None:
        publications = self.channel.send(task, time.time())
        for agent in self.agents.values():
            for p in publications:
                agent.receive(p.topic, p.payload, time.time())

    def delta(self) -> dict[str, np.ndarray]:
        out = {}
        for spec in self.layout.trainable:
            value = self.rng.normal(0, 0.02, spec.shape).astype(np.float32)
            out[spec.name] = np.where(self.state.masks[spec.name], value, 0).astype(np.float32) if spec.masked else value
        return out


def losses(rng: np.random.Generator) -> dict[int, tuple[float, int]]:
    return {c: (float(rng.uniform(0.2, 1.0)), int(rng.integers(1, 20))) for c in range(10)}


def plain_round(n: int, seed: int) -> dict:
    world = World(n, seed)
    task = world.task(None)
    world.deliver(task)
    trainable = world.layout.trainable_layout
    sizes, received = [], []
    for d in world.devices:
        update = Update(round=1, device=d, mask_version=0, n_examples=30, metrics={"train_loss": 0.5},
                        class_losses=losses(world.rng),
                        delta=SparseParams.from_dense(trainable, world.delta(), world.state.masks))
        publications = world.agents[d].send(update, time.time(), value_dtype=ValueDtype.INT8)
        sizes.append(sum(len(p.payload) for p in publications))
        received.append(publications)
    cpu = time.process_time()
    updates = []
    for publications in received:
        for p in publications:
            msg = world.channel.receive(p.topic, p.payload, time.time())
        updates.append(ClientUpdate.from_update(msg))
    world.strategy.finish_round(world.state, world.plan, updates)
    return {"n": n, "mode": "plain", "uplink_bytes_per_device": float(np.mean(sizes)), "added_downlink_bytes_per_device": 0.0,
            "coordinator_cpu_s": time.process_time() - cpu, "device_cpu_s": 0.0, "added_round_s": 0.0}


def secure_round(n: int, seed: int, bits: int) -> dict:
    world = World(n, seed)
    params = SecureParams.for_devices(n, bits)
    setup = SecureSetup(bytes(8), bits, params.degree, params.threshold)
    task = world.task(setup)
    world.deliver(task)
    up = dict.fromkeys(world.devices, 0)
    down = dict.fromkeys(world.devices, 0)
    device_cpu = dict.fromkeys(world.devices, 0.0)
    stage_max: list[float] = []
    coordinator_cpu = 0.0

    def send_up(device: str, message) -> object:
        nonlocal coordinator_cpu
        publications = world.agents[device].send(message, time.time())
        up[device] += sum(len(p.payload) for p in publications)
        start = time.process_time()
        for p in publications:
            got = world.channel.receive(p.topic, p.payload, time.time())
        coordinator_cpu += time.process_time() - start
        return got

    participants, reports, stage = {}, {}, {}
    for d in world.devices:
        start = time.process_time()
        participants[d] = SecureParticipant(device=d, federation=FED, round_number=1, setup=setup, layout=world.layout,
                                            masks=world.state.masks, delta=world.delta(), buffer_delta={},
                                            rng=np.random.default_rng(seed))
        keys = participants[d].keys(30, losses(world.rng), {"train_loss": 0.5})
        stage[d] = time.process_time() - start
        reports[d] = send_up(d, keys)
    stage_max.append(max(stage.values()))
    for d, s in stage.items():
        device_cpu[d] += s
    start = time.process_time()
    weighting = world.strategy.secure_weights(world.state, {d: (r.n_examples, r.class_losses) for d, r in reports.items()})
    collection = SecureCollection(federation=FED, round_number=1, setup=setup, layout=world.layout,
                                  masks=world.state.masks, reports=reports,
                                  weights=dict(zip(weighting.ids, weighting.weights.tolist())), stage_s=60.0, now=0.0)
    outgoing = collection.outbox()
    coordinator_cpu += time.process_time() - start
    now = 0.0
    while isinstance(outgoing, list):
        stage = {}
        for message in outgoing:
            start = time.process_time()
            publications = world.channel.send(message, time.time())
            coordinator_cpu += time.process_time() - start
            down[message.device] += sum(len(p.payload) for p in publications)
            agent = world.agents[message.device]
            start = time.process_time()
            for p in publications:
                got = agent.receive(p.topic, p.payload, time.time())
            answer = participants[message.device].answer(got)
            stage[message.device] = time.process_time() - start
            received = send_up(message.device, answer)
            start = time.process_time()
            assert collection.on_message(received) == ""
            coordinator_cpu += time.process_time() - start
        stage_max.append(max(stage.values()))
        for d, s in stage.items():
            device_cpu[d] += s
        now += 1.0
        start = time.process_time()
        outgoing = collection.tick(now) if collection.answered >= collection.expected else None
        coordinator_cpu += time.process_time() - start
    assert isinstance(outgoing, SecureSum), outgoing
    start = time.process_time()
    world.strategy.finish_secure_round(world.state, world.plan, weighting, outgoing.mean_delta, outgoing.buffer_delta,
                                       outgoing.survivors, world.rng)
    coordinator_cpu += time.process_time() - start
    return {"n": n, "mode": f"secure-{bits}bit", "degree": params.degree, "threshold": params.threshold,
            "uplink_bytes_per_device": float(np.mean(list(up.values()))),
            "added_downlink_bytes_per_device": float(np.mean(list(down.values()))),
            "coordinator_cpu_s": coordinator_cpu, "device_cpu_s": max(device_cpu.values()),
            "added_round_s": sum(stage_max) + coordinator_cpu}


def dropout_trial(n: int, degree: int | None, p: float, rng: np.random.Generator) -> bool:
    """One round in which each device drops with probability p at a random stage; True if it completes."""
    from fedprune.protocol.secagg import AggregatorSession, DeviceSession, SecAggError

    params = SecureParams.for_devices(n, 16, degree)
    ids = [f"d{i:03d}" for i in range(n)]
    leave = {d: int(rng.integers(1, 4)) if rng.random() < p else 4 for d in ids}  # stage before which it goes
    context, seed = b"bench", bytes(rng.integers(0, 256, 8, dtype=np.uint8))
    try:
        coordinator = AggregatorSession(ids, params, seed, context, 8)
        devices = {d: DeviceSession(d, params, context) for d in ids}
        for d in ids:
            coordinator.on_advertise(d, devices[d].advertise())
        for d in coordinator.close_advertise():
            if leave[d] > 1:
                coordinator.on_shares(d, devices[d].share(coordinator.keys_for(d)))
        for d in coordinator.close_shares():
            if leave[d] > 2:
                coordinator.on_masked(d, devices[d].mask(np.zeros(8, np.uint32), coordinator.inbox_for(d)))
        survivors, dropped = coordinator.close_masked()
        for d in survivors:
            if leave[d] > 3:
                coordinator.on_reveal(d, devices[d].reveal(survivors, dropped))
        coordinator.result()
    except SecAggError:
        return False
    return True


def dropout_rows(sizes: list[int], rates: list[float], trials: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        for degree in (None, n - 1 + (n - 1) % 2):
            k = SecureParams.for_devices(n, 16, degree).degree
            for p in rates:
                done = sum(dropout_trial(n, degree, p, rng) for _ in range(trials))
                rows.append({"n": n, "degree": k, "dropout": p, "completed": done / trials, "trials": trials})
    return rows


def dropout_table(rows: list[dict]) -> str:
    rates = sorted({r["dropout"] for r in rows})
    lines = [f"{'n':>4} {'degree':>7} " + " ".join(f"{f'{int(100 * p)} % drop':>10}" for p in rates)]
    for n, k in sorted({(r["n"], r["degree"]) for r in rows}):
        done = {r["dropout"]: r["completed"] for r in rows if r["n"] == n and r["degree"] == k}
        lines.append(f"{n:>4} {k:>7} " + " ".join(f"{done[p]:>10.2f}" for p in rates))
    return "rounds completed (fraction):\n" + "\n".join(lines)


def table(rows: list[dict], flower: list[dict]) -> str:
    head = (f"{'n':>4} {'mode':<16} {'k/t':>6} {'uplink B/dev':>13} {'x plain':>8} {'+down B/dev':>12} "
            f"{'coord CPU s':>12} {'device CPU s':>13} {'+round s':>9}")
    lines = [head]
    plain = {r["n"]: r["uplink_bytes_per_device"] for r in rows if r["mode"] == "plain"}
    for r in rows:
        kt = f"{r['degree']}/{r['threshold']}" if "degree" in r else "-"
        lines.append(f"{r['n']:>4} {r['mode']:<16} {kt:>6} {r['uplink_bytes_per_device']:>13,.0f} "
                     f"{r['uplink_bytes_per_device'] / plain[r['n']]:>8.2f} {r['added_downlink_bytes_per_device']:>12,.0f} "
                     f"{r['coordinator_cpu_s']:>12.3f} {r['device_cpu_s']:>13.3f} {r['added_round_s']:>9.3f}")
    flower_plain = {r["n"]: r for r in flower if r["mode"] == "plain"}
    for r in flower:
        base = flower_plain[r["n"]]
        lines.append(f"{r['n']:>4} {'flower-' + r['mode']:<16} {'-':>6} {r['uplink_bytes_per_client']:>13,.0f} "
                     f"{r['uplink_bytes_per_client'] / base['uplink_bytes_per_client']:>8.2f} "
                     f"{r['downlink_bytes_per_client'] - base['downlink_bytes_per_client']:>12,.0f} "
                     f"{r['server_cpu_seconds']:>12.3f} {r['client_cpu_seconds_per_client']:>13.3f} {'':>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--bits", type=int, nargs="+", default=[12, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dropout-devices", type=int, nargs="+", default=[10, 30, 50])
    parser.add_argument("--dropout-rates", type=float, nargs="+", default=[0.05, 0.1, 0.2, 1 / 3])
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args(argv)
    rows = []
    for n in args.devices:
        rows.append(plain_round(n, args.seed))
        for bits in args.bits:
            rows.append(secure_round(n, args.seed, bits))
        print(f"  measured {n} devices", file=sys.stderr)
    flower = json.loads(FLOWER.read_text()) if FLOWER.exists() else []
    print(table(rows, flower))
    dropouts = dropout_rows(args.dropout_devices, args.dropout_rates, args.trials, args.seed)
    print(dropout_table(dropouts))
    args.out.write_text(json.dumps({"command": "benchmarks/bench_secagg.py " + " ".join(argv or sys.argv[1:]),
                                    "machine": platform.platform(), "rows": rows, "dropouts": dropouts},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
