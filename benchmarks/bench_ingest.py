"""Coordinator ingest: how fast the coordinator turns sealed updates from the broker into rounds.

What is measured (the daemon's ingest path minus its main loop, with the daemon's own objects):
a 1.08M-parameter model (``mlp``, input_shape [4096], hidden 256-128, 10 classes: a layout the
coordinator config can name), ERK masks at 90 % sparsity, ``--devices`` enrolled devices (real
identities in a ``fedprune.coordinator.core.registry.Registry``) and ``--rounds`` rounds, so rounds x devices
sealed updates (default 50 x 20 = 1,000). Masks do not change (no readjust round), so each
update carries values only, as between readjust rounds.

1. A publisher process pre-generates every update with ``AgentChannel.send`` (sealed to the
   coordinator, chunked to 128 KiB) and connects one ``MqttLink`` per device (TLS, its own
   password; the ACL allows only its own topics) to the real Mosquitto, started as the
   integration tests start it.
2. The coordinator's ``MqttLink`` (persistent session, QoS 1) subscribes; round 1 is opened and
   its RoundTask published. The publisher then publishes round after round (waiting for the
   PUBACKs of a round before the next), while the coordinator's link collects every chunk.
3. Timed, in the coordinator process, in arrival order: ``CoordinatorChannel.receive``
   (reassembly + SHA-256 + X25519/HKDF + AES-256-GCM open + replay + decode), ``Registry.seen``,
   ``RoundMachine.on_update``, ``RoundMachine.tick``; at each close, the daemon's conversion to
   ``ClientUpdate`` + ``Strategy.finish_round`` (fedprune: leave-one-out cosine, quality, sparse
   aggregation); then ``plan_round`` + the next RoundTask signed, chunked and published.
4. In the same run, raw AES-256-GCM decryption (``cryptography``'s AESGCM) of the same bytes
   (each update's chunks joined, encrypted once with a random key): the crypto floor.

Broker delivery is measured apart (publisher wall time) so the coordinator figures are pure
coordinator CPU on one thread. A cProfile of ``receive`` over the first rounds says where its time
goes.

Run (~2-4 min on 2 cores, ~2 GB RAM):
  .venv/bin/python benchmarks/bench_ingest.py        (writes benchmarks/results/ingest.json)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import queue
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedprune.coordinator.core.registry import Registry  # noqa: E402
from fedprune.coordinator.core.rounds import Accepted, CloseRound, RoundMachine, RoundPolicy  # noqa: E402
from fedprune.coordinator.core.records import ClientUpdate  # noqa: E402
from fedprune.coordinator.core.strategy import Strategy, StrategyConfig  # noqa: E402
from fedprune.common.models import ModelSpec, init_params, model_layout  # noqa: E402
from fedprune.common.mqtt import LinkConfig, MqttLink  # noqa: E402
from fedprune.protocol.channel import AgentChannel, CoordinatorChannel  # noqa: E402
from fedprune.protocol.crypto import Identity, PublicIdentity  # noqa: E402
from fedprune.protocol.messages import ModelRef, RoundTask, Update  # noqa: E402
from fedprune.protocol.sparse import SparseParams  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ingest.json"
FEDERATION = "bench"
SPEC = ModelSpec("mlp", (4096,), 10)
MAX_CHUNK = 128 * 1024
MB = 1e6


def arrays_out(arrays: dict[str, np.ndarray]) -> dict:
    return {k: [v.dtype.str, list(v.shape), np.ascontiguousarray(v).tobytes()] for k, v in arrays.items()}


def arrays_in(packed: dict) -> dict[str, np.ndarray]:
    return {k: np.frombuffer(raw, dtype=np.dtype(dt)).reshape(shape).copy() for k, (dt, shape, raw) in packed.items()}


# ---- the publisher process ------------------------------------------------------------------------
def publisher(job_path: Path) -> int:
    job = msgpack.unpackb(job_path.read_bytes(), raw=False, strict_map_key=False)
    layout = model_layout(SPEC)
    trainable = layout.subset(s.name for s in layout.trainable)
    masks = {k: v.astype(bool) for k, v in arrays_in(job["masks"]).items()}
    coordinator = PublicIdentity.from_bytes(job["coordinator"])
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    channels, bases = {}, {}
    for device in job["devices"]:
        ch = AgentChannel(federation=FEDERATION, device=device["id"], identity=Identity.from_raw(*device["keys"]),
                          coordinator=coordinator, layout=layout, max_chunk=MAX_CHUNK)
        ch.remember_masks(job["mask_version"], masks)
        channels[device["id"]] = ch
        bases[device["id"]] = {s.name: (rng.standard_normal(s.shape).astype(np.float32) * 0.01)
                               * (masks[s.name] if s.masked else 1) for s in trainable}
    rounds = []
    for r in range(1, job["rounds"] + 1):
        pubs = []
        for device_id, ch in channels.items():
            scale = np.float32(1 + 0.05 * r)
            update = Update(
                round=r, device=device_id, mask_version=job["mask_version"], n_examples=100 + r,
                metrics={"train_loss": 1.0, "steps": 8.0, "train_seconds": 1.0},
                class_losses={c: (1.0 + 0.01 * c, 10) for c in range(SPEC.num_classes)},
                delta=SparseParams.from_dense(trainable, {k: v * scale for k, v in bases[device_id].items()}, masks),
            )
            pubs.append(ch.send(update, time.time()))
        rounds.append(pubs)
    pregen_s = time.perf_counter() - started
    chunks = sum(len(p) for pubs in rounds for p in pubs)
    wire = sum(len(c.payload) for pubs in rounds for p in pubs for c in p)
    links = {d["id"]: MqttLink(LinkConfig(url=job["url"], client_id=d["id"], username=d["id"],
                                          password=d["password"], ca_file=Path(job["ca_file"]), protocol="5"))
             for d in job["devices"]}
    for link in links.values():
        link.wait_connected(30)
    print(json.dumps({"ready": True, "chunks": chunks, "wire_bytes": wire, "pregen_s": pregen_s,
                      "chunks_per_update": [len(p) for p in rounds[0]]}), flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    for pubs in rounds:
        handles = [links[p[0].topic.rsplit("/", 1)[1]].publish(c.topic, c.payload, qos=1) for p in pubs for c in p]
        for handle in handles:
            if not handle.wait(120):
                raise RuntimeError("no PUBACK within 120 s")
    print(json.dumps({"published_s": time.perf_counter() - started}), flush=True)
    for link in links.values():
        link.close()
    return 0


# ---- the coordinator side -------------------------------------------------------------------------
class Coordinator:
    """The daemon's ingest objects, wired as ``CoordinatorDaemon`` wires them."""

    def __init__(self, devices: dict[str, Identity], rounds: int, link: MqttLink | None) -> None:
        self.identity = Identity.generate()
        self.registry = Registry(90.0)
        for device_id, identity in devices.items():
            self.registry.enroll(device_id, identity.public.signing, identity.public.agreement, now=time.time())
            self.registry.seen(device_id, time.time())  # as its Register would
        self.layout = model_layout(SPEC)
        self.strategy = Strategy(StrategyConfig(method="fedprune", sparsity=0.9, rounds=rounds, delta_t=rounds + 1))
        self.rng = np.random.default_rng(0)
        self.state = self.strategy.initial_state(self.layout, init_params(SPEC, 0), self.rng)
        self.channel = CoordinatorChannel(federation=FEDERATION, identity=self.identity, devices=self._device_key,
                                          layout=self.layout, max_chunk=MAX_CHUNK)
        # Tasks go out encrypted under a federation key; the recorded devices never read them, so
        # their grants are not published.
        self.channel.rekey({d: i.public for d, i in devices.items()}, time.time())
        self.rounds: RoundMachine[Update] = RoundMachine(RoundPolicy(quorum=len(devices), deadline_s=3600.0))
        self.link = link
        self.plan = None
        self.timers = {"receive": 0.0, "accept": 0.0, "close": 0.0, "open": 0.0}
        self.close_times: list[float] = []
        self.accepted = 0
        self.rejected: dict[str, int] = {}

    def _device_key(self, device_id: str) -> PublicIdentity | None:
        record = self.registry.get(device_id)
        return None if record is None else PublicIdentity(record.sign_public, record.kx_public)

    def open_round(self) -> None:
        now = time.time()
        self.plan = self.strategy.plan_round(self.state, self.registry.online(now), self.rng)
        task = RoundTask(
            federation=FEDERATION, round=self.plan.round, mask_version=self.state.mask_version,
            model=ModelRef(SPEC.name, SPEC.input_shape, SPEC.num_classes),
            weights=SparseParams.from_dense(self.layout, self.state.params, self.state.masks),
            hyper=self.plan.hyper, deadline=now + 3600.0, selected=self.plan.selected,
            include_masks=self.plan.round == 1,
        )
        self.rounds.open(self.plan.round, self.plan.selected, now)
        for publication in self.channel.send(task, now):
            if self.link is not None:
                self.link.publish(publication.topic, publication.payload, qos=1)

    def ingest(self, topic: str, payload: bytes) -> None:
        t0 = time.perf_counter()
        now = time.time()
        message = self.channel.receive(topic, payload, now)
        t1 = time.perf_counter()
        self.timers["receive"] += t1 - t0
        if message is None:
            return
        self.registry.seen(message.device, now)
        verdict = self.rounds.on_update(message.device, message.round, message, now)
        if isinstance(verdict, Accepted):
            self.accepted += 1
        else:
            self.rejected[verdict.reason] = self.rejected.get(verdict.reason, 0) + 1
        action = self.rounds.tick(now)
        t2 = time.perf_counter()
        self.timers["accept"] += t2 - t1
        if isinstance(action, CloseRound):
            self.close(action)
            t3 = time.perf_counter()
            self.open_round()
            self.timers["close"] += t3 - t2
            self.close_times.append(t3 - t2)
            self.timers["open"] += time.perf_counter() - t3

    def close(self, closed: CloseRound[Update]) -> None:
        updates = [ClientUpdate.from_update(u) for u in closed.updates.values()]
        result = self.strategy.finish_round(self.state, self.plan, updates)
        if result.rejected:
            raise RuntimeError(f"strategy rejected updates: {result.rejected}")
        self.state = result.state


def profile_receive(devices: dict[str, Identity], coordinator: Coordinator, messages: list, rounds: int,
                    of_rounds: int) -> str:
    """cProfile of a fresh channel's receive over the first ``rounds`` rounds' messages."""
    registry = {d: i.public for d, i in devices.items()}
    channel = CoordinatorChannel(federation=FEDERATION, identity=coordinator.identity, devices=registry,
                                 layout=coordinator.layout, max_chunk=MAX_CHUNK)
    channel.remember_masks(coordinator.state.mask_version, coordinator.state.masks)
    subset = messages[: rounds * len(messages) // of_rounds]
    profiler = cProfile.Profile()
    now = time.time()
    profiler.enable()
    for topic, payload in subset:
        channel.receive(topic, payload, now)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()


def raw_aes(messages: list, chunks_per_update: int) -> dict:
    by_topic: dict[str, list[bytes]] = {}
    for topic, payload in messages:
        by_topic.setdefault(topic, []).append(payload)
    blobs = [b"".join(chunks[i:i + chunks_per_update]) for chunks in by_topic.values()
             for i in range(0, len(chunks), chunks_per_update)]
    key = AESGCM.generate_key(bit_length=256)
    aead = AESGCM(key)
    sealed = [(n := os.urandom(12), aead.encrypt(n, blob, b"header")) for blob in blobs]
    started = time.perf_counter()
    for nonce, ct in sealed:
        aead.decrypt(nonce, ct, b"header")
    seconds = time.perf_counter() - started
    total = sum(len(b) for b in blobs)
    return {"updates": len(blobs), "bytes": total, "seconds": seconds, "updates_per_s": len(blobs) / seconds,
            "mb_per_s": total / MB / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--publisher", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publisher is not None:
        return publisher(args.publisher)
    from tests.integration.mosquitto import start_mosquitto

    n_updates = args.devices * args.rounds
    print(f"ingest: {n_updates} sealed updates ({args.rounds} rounds x {args.devices} devices), "
          f"{model_layout(SPEC).num_parameters:,} parameters, 90 % sparsity, real Mosquitto (TLS)")
    broker = start_mosquitto(FEDERATION, args.devices)
    job_path = broker.directory / "publisher-job.msgpack"
    devices = {c.username: Identity.generate() for c in broker.devices}
    pub = None
    try:
        coordinator = Coordinator(devices, args.rounds, link=None)
        link = MqttLink(broker.link_config(broker.coordinator, client_id=f"fedprune-coordinator-{FEDERATION}",
                                           clean_start=False, session_expiry_s=86_400, max_queued_messages=100_000),
                        subscriptions=[(f, 1) for f in coordinator.channel.subscriptions])
        link.wait_connected(30)
        coordinator.link = link
        masks = {k: v.astype(np.uint8) for k, v in coordinator.state.masks.items()}
        job_path.write_bytes(msgpack.packb({
            "url": broker.url, "ca_file": str(broker.ca_file), "rounds": args.rounds,
            "coordinator": coordinator.identity.public.to_bytes(), "mask_version": coordinator.state.mask_version,
            "masks": arrays_out(masks),
            "devices": [{"id": c.username, "password": c.password, "keys": list(devices[c.username].to_raw())}
                        for c in broker.devices],
        }, use_bin_type=True))
        pub = subprocess.Popen([sys.executable, __file__, "--publisher", str(job_path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        ready = json.loads(pub.stdout.readline())
        print(f"publisher: {n_updates} updates pre-generated in {ready['pregen_s']:.1f} s, "
              f"{ready['chunks']} chunks, {ready['wire_bytes'] / MB:.1f} MB")
        coordinator.open_round()
        pub.stdin.write(b"go\n")
        pub.stdin.flush()
        published = json.loads(pub.stdout.readline())
        deadline = time.monotonic() + 120
        while link.messages.qsize() < ready["chunks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        messages = []
        while True:
            try:
                messages.append(link.messages.get_nowait())
            except queue.Empty:
                break
        if len(messages) != ready["chunks"]:
            raise RuntimeError(f"coordinator received {len(messages)} of {ready['chunks']} chunks")
        pub.wait(30)
        wire = sum(len(p) for _, p in messages)
        started = time.perf_counter()
        for topic, payload in messages:
            coordinator.ingest(topic, payload)
        total_s = time.perf_counter() - started
        link.close()
    finally:
        if pub is not None and pub.poll() is None:
            pub.kill()
        broker.close()
    if coordinator.accepted != n_updates:
        raise RuntimeError(f"accepted {coordinator.accepted} of {n_updates} updates; rejected {coordinator.rejected}")
    aes = raw_aes(messages, ready["chunks_per_update"][0])
    profile = profile_receive(devices, coordinator, messages, 3, args.rounds)
    t = coordinator.timers
    ingest_s = t["receive"] + t["accept"]
    rows = [
        ("receive (open + decode)", t["receive"]),
        ("receive + on_update + tick", ingest_s),
        ("... + finish_round + next task", total_s),
        ("raw AES-256-GCM decrypt", aes["seconds"]),
    ]
    print(f"\n{'stage':<34}{'seconds':>9}{'updates/s':>11}{'MB/s':>9}")
    for label, seconds in rows:
        print(f"{label:<34}{seconds:>9.2f}{n_updates / seconds:>11.1f}{wire / MB / seconds:>9.1f}")
    per_round = statistics.median(coordinator.close_times)
    print(f"finish_round ({args.devices} updates): median {per_round * 1000:.0f} ms, max "
          f"{max(coordinator.close_times) * 1000:.0f} ms; next task {t['open'] / args.rounds * 1000:.0f} ms/round")
    print(f"broker delivery (publisher, TLS, round by round): {published['published_s']:.2f} s "
          f"= {wire / MB / published['published_s']:.0f} MB/s")
    print(f"receive vs raw AES-GCM: {t['receive'] / aes['seconds']:.1f}x the time\n")
    print(profile)
    doc = {
        "config": {"updates": n_updates, "devices": args.devices, "rounds": args.rounds,
                   "parameters": model_layout(SPEC).num_parameters, "model": "mlp 4096-256-128-10", "sparsity": 0.9,
                   "distribution": "erk", "method": "fedprune", "chunk_bytes": MAX_CHUNK,
                   "broker": "mosquitto 2.0 (TLS, passwords, ACL)"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()},
        "wire_bytes": wire, "chunks": len(messages), "bytes_per_update": wire / n_updates,
        "values_per_update": int(sum(int(coordinator.state.masks[s.name].sum()) if s.masked else s.size
                                     for s in coordinator.layout.trainable)),
        "seconds": {"receive": t["receive"], "receive_on_update_tick": ingest_s, "total_with_finish_round": total_s,
                    "finish_round_total": t["close"], "next_task_total": t["open"]},
        "updates_per_s": {"receive": n_updates / t["receive"], "ingest": n_updates / ingest_s,
                          "with_finish_round": n_updates / total_s},
        "mb_per_s": {"receive": wire / MB / t["receive"], "ingest": wire / MB / ingest_s,
                     "with_finish_round": wire / MB / total_s},
        "finish_round_s": {"median": per_round, "max": max(coordinator.close_times)},
        "raw_aes_gcm_decrypt": aes,
        "receive_over_raw_aes": t["receive"] / aes["seconds"],
        "broker_publish_s": published["published_s"], "pregen_s": ready["pregen_s"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
