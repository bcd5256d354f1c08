"""Broadcast benchmark: what encrypting tasks and releases to the members costs.

Per broadcast, on the MLP layout of bench_wire.py (784-1024-512-10) and on model releases of a
few sizes, it compares the signed-only envelope of schema 1.1 with the 1.2 envelope (AES-256-GCM
under the federation key, then signed), both built from the same body:
  - bytes of each envelope, and the bytes 1.2 adds (the key id and the AEAD tag)
  - coordinator: sign vs encrypt+sign; device: verify vs verify+decrypt (median of repeats), and
    the step 1.2 adds, timed on its own (AES-256-GCM with its HKDF): on a shared machine the
    difference of two medians is noisier than the step itself
Per member, once per key rotation: the bytes of one retained key grant (a whole MQTT payload)
and the time to make one (coordinator) and to open one (device), and the time of a whole rekey
for fleets of 10 to 10,000 devices. For comparison, the bytes that a key-wrap table inside
every broadcast would add instead (80 B wrapped key + an 8 B device tag per member).

Run: .venv/bin/python benchmarks/bench_broadcast.py   (writes benchmarks/results/broadcast.json)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_wire import mlp_layout  # noqa: E402
from fedprune.protocol import codec  # noqa: E402
from fedprune.protocol.channel import AgentChannel, CoordinatorChannel  # noqa: E402
from fedprune.protocol.crypto import GroupKey, Identity, group_decrypt, group_encrypt  # noqa: E402
from fedprune.protocol.envelope import (  # noqa: E402
    COORDINATOR, Header, Suite, decrypt_broadcast, encrypt_broadcast, sign_envelope, verify_envelope,
)
from fedprune.protocol.hyperparams import HyperParams  # noqa: E402
from fedprune.protocol.messages import Kind, ModelRef, ModelRelease, RoundTask  # noqa: E402
from fedprune.protocol.sparse import SparseParams  # noqa: E402
from timing import median_seconds  # noqa: E402

REPEATS = int(os.environ.get("BENCH_REPEATS", "15"))
DENSITIES = (1.0, 0.2, 0.1)
RELEASE_MB = (0.1, 1.0, 5.0)
FLEETS = (10, 100, 1000, 10_000)
TABLE_BYTES_PER_MEMBER = 80 + 8
T0 = 1_800_000_000.0
FED = "fed"
OUT = Path(__file__).resolve().parent / "results" / "broadcast.json"


def task_of(rng: np.random.Generator, density: float) -> RoundTask:
    layout = mlp_layout()
    masks = {s.name: rng.random(s.shape) < density for s in layout.masked}
    params = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in layout}
    params = {k: np.where(masks[k], v, np.float32(0)) if k in masks else v for k, v in params.items()}
    return RoundTask(FED, 3, 1, ModelRef("mlp", (784,), 10), SparseParams.from_dense(layout, params, masks),
                     HyperParams(), T0 + 60, tuple(f"dev-{i}" for i in range(20)))


def broadcast_row(name: str, kind: Kind, body: bytes, coord: Identity, key: GroupKey) -> dict:
    signed_h = Header(kind, Suite.SIGNED_ED25519, FED, COORDINATOR, 3, 1, T0, minor=1)
    group_h = Header(kind, Suite.GROUP_AES256_GCM, FED, COORDINATOR, 3, 1, T0)
    n = len(group_h.pack())
    signed = sign_envelope(signed_h, body, coord)
    group = encrypt_broadcast(group_h, body, key, coord)
    keys = {key.key_id: key}.get
    head = group_h.pack()
    ciphertext = group_encrypt(key, body, context=head, aad=head + key.key_id)
    t = {
        "encrypt": median_seconds(lambda: group_encrypt(key, body, context=head, aad=head + key.key_id), REPEATS),
        "decrypt": median_seconds(lambda: group_decrypt(key, ciphertext, context=head, aad=head + key.key_id), REPEATS),
        "sign": median_seconds(lambda: sign_envelope(signed_h, body, coord), REPEATS),
        "encrypt_sign": median_seconds(lambda: encrypt_broadcast(group_h, body, key, coord), REPEATS),
        "verify": median_seconds(lambda: verify_envelope(signed, n, coord.public), REPEATS),
        "verify_decrypt": median_seconds(lambda: decrypt_broadcast(group, n, coord.public, keys), REPEATS),
    }
    row = {"broadcast": name, "body_bytes": len(body), "signed_bytes": len(signed), "encrypted_bytes": len(group),
           "added_bytes": len(group) - len(signed)}
    row.update({f"{k}_ms": v * 1e3 for k, v in t.items()})
    return row


def grant_costs(coord: Identity) -> dict:
    devices = {f"dev-{i}": Identity.generate() for i in range(8)}
    channel = CoordinatorChannel(federation=FED, identity=coord, devices={d: i.public for d, i in devices.items()},
                                 layout=mlp_layout())
    grants = channel.rekey({d: i.public for d, i in devices.items()}, T0)
    agent = AgentChannel(federation=FED, device="dev-0", identity=devices["dev-0"], coordinator=coord.public,
                         layout=mlp_layout())
    clock = iter(range(1, 10**9))

    def open_grant() -> None:  # a fresh grant each time: the replay guard takes only newer ones
        grant = channel.grant("dev-0", T0 + next(clock))
        assert agent.receive(grant.topic, grant.payload, T0) is not None

    make = median_seconds(lambda: channel.grant("dev-0", T0), REPEATS * 4)
    make_and_open = median_seconds(open_grant, REPEATS * 4)
    return {"grant_bytes": len(grants[0].payload), "grant_make_ms": make * 1e3,
            "grant_open_ms": (make_and_open - make) * 1e3}


def rekey_row(coord: Identity, members: int) -> dict:
    publics = {f"dev-{i}": Identity.generate().public for i in range(members)}
    channel = CoordinatorChannel(federation=FED, identity=coord, devices=publics, layout=mlp_layout())
    channel.rekey(publics, T0)  # warm the static X25519 secrets, as a running coordinator has them
    start = time.perf_counter()
    grants = channel.rekey(publics, T0 + 1)
    seconds = time.perf_counter() - start
    return {"members": members, "rekey_s": seconds, "rekey_bytes": sum(len(g.payload) for g in grants),
            "table_bytes_per_broadcast": members * TABLE_BYTES_PER_MEMBER}


def run() -> dict:
    rng = np.random.default_rng(0)
    coord, key = Identity.generate(), GroupKey.generate()
    rows = []
    for density in DENSITIES:
        rows.append(broadcast_row(f"task d={density}", Kind.TASK, codec.encode_body(task_of(rng, density)), coord, key))
        print_row(rows[-1])
    for mb in RELEASE_MB:
        release = ModelRelease.of(1, rng.bytes(int(mb * 1e6)), {"round": 40})
        rows.append(broadcast_row(f"release {mb} MB", Kind.RELEASE, codec.encode_body(release), coord, key))
        print_row(rows[-1])
    grants = grant_costs(coord)
    print(f"key grant: {grants['grant_bytes']} B per member, make {grants['grant_make_ms']:.3f} ms, "
          f"open {grants['grant_open_ms']:.3f} ms")
    fleets = []
    for members in FLEETS:
        fleets.append(rekey_row(coord, members))
        f = fleets[-1]
        print(f"rekey {members:>6} members: {f['rekey_s']:8.3f} s, {f['rekey_bytes']:>10} B of grants once; "
              f"a key-wrap table would add {f['table_bytes_per_broadcast']:>9} B to every broadcast", flush=True)
    return {
        "layout": "mlp 784-1024-512-10", "repeats": REPEATS,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "broadcasts": rows, "grant": grants, "rekey": fleets,
    }


HEAD = (f"{'broadcast':>16} {'body B':>10} {'signed B':>10} {'encr. B':>10} {'added B':>7} {'sign ms':>8} "
        f"{'enc+sign':>8} {'encrypt':>8} {'verify':>8} {'ver+dec':>8} {'decrypt':>8}")


def print_row(r: dict) -> None:
    print(f"{r['broadcast']:>16} {r['body_bytes']:>10} {r['signed_bytes']:>10} {r['encrypted_bytes']:>10} "
          f"{r['added_bytes']:>7} {r['sign_ms']:>8.2f} {r['encrypt_sign_ms']:>8.2f} {r['encrypt_ms']:>8.2f} "
          f"{r['verify_ms']:>8.2f} {r['verify_decrypt_ms']:>8.2f} {r['decrypt_ms']:>8.2f}", flush=True)


def main() -> None:
    print(HEAD)
    result = run()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
