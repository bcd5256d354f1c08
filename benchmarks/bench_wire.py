"""Wire benchmark: update size and seal/open throughput of the protocol on a 1.3M-parameter layout.

For an MLP layout 784-1024-512-10 (built directly as a ModelLayout, uniform random masks,
biases dense) at several densities and value dtypes it reports:
  - sealed: bytes of one encoded + sealed Update envelope (unchanged mask: values only)
  - wire: the same after chunking to 128 KiB MQTT payloads (chunk headers included)
  - bound: the physical bound nnz x value bytes; target sealed <= 1.01 x bound + 256
  - flower: the dense float32 payload Flower would send (np.save bytes of each array)
  - seal+encode / open+decode throughput (payload MB/s) next to raw AES-256-GCM encrypt /
    decrypt of the same body bytes in the same run; target open+decode >= 0.5 x raw decrypt
  - channel receive: the full CoordinatorChannel path (reassembly + SHA-256 + open + replay + decode)

Run: .venv/bin/python benchmarks/bench_wire.py   (writes benchmarks/results/wire.json)
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedprune.protocol import codec  # noqa: E402
from fedprune.protocol.channel import AgentChannel, CoordinatorChannel  # noqa: E402
from fedprune.protocol.crypto import Identity  # noqa: E402
from fedprune.protocol.envelope import Header, Suite, open_envelope, parse_header, seal_envelope  # noqa: E402
from fedprune.protocol.layout import ModelLayout, TensorSpec  # noqa: E402
from fedprune.protocol.messages import Kind, Update  # noqa: E402
from fedprune.protocol.replay import ReplayGuard  # noqa: E402
from fedprune.protocol.sparse import MaskStore, SparseParams, ValueDtype  # noqa: E402
from timing import median_seconds  # noqa: E402

DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05)
DTYPES = {"float32": (ValueDtype.FLOAT32, 4), "float16": (ValueDtype.FLOAT16, 2)}
REPEATS = int(os.environ.get("BENCH_REPEATS", "15"))
T0 = 1_800_000_000.0
OUT = Path(__file__).resolve().parent / "results" / "wire.json"


def mlp_layout(sizes=(784, 1024, 512, 10)) -> ModelLayout:
    specs = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:]), 1):
        specs += [TensorSpec(f"fc{i}.weight", (fan_out, fan_in), masked=True), TensorSpec(f"fc{i}.bias", (fan_out,), masked=False)]
    return ModelLayout(tuple(specs))


def flower_bytes(params: dict[str, np.ndarray]) -> int:
    total = 0
    for arr in params.values():
        buf = io.BytesIO()
        np.save(buf, arr.astype(np.float32), allow_pickle=False)
        total += buf.getbuffer().nbytes
    return total


def run() -> dict:
    rng = np.random.default_rng(0)
    layout = mlp_layout()
    coord, device = Identity.generate(), Identity.generate()
    rows = []
    for density in DENSITIES:
        masks = {s.name: rng.random(s.shape) < density for s in layout.masked}
        delta = {}
        for s in layout:
            v = rng.standard_normal(s.shape).astype(np.float32) * np.float32(0.01)
            delta[s.name] = np.where(masks[s.name], v, np.float32(0)) if s.masked else v
        sparse = SparseParams.from_dense(layout, delta, masks)
        update = Update(7, "dev-a", 3, 600, {"train_loss": 0.4}, {c: (1.0, 60) for c in range(10)}, sparse)
        store = MaskStore()
        store.put(3, masks)
        for dtype_name, (dtype, width) in DTYPES.items():
            header = Header(Kind.UPDATE, Suite.SEALED_AES256_GCM, "fed", "dev-a", 7, 1, T0)

            def encode_seal() -> bytes:
                return seal_envelope(header, codec.encode_body(update, value_dtype=dtype), device, coord.public)

            envelope = encode_seal()
            head, n = parse_header(envelope)

            def open_decode():
                body = open_envelope(envelope, head, n, coord, device.public)
                return codec.decode_body(head, body, layout_for=lambda _m: layout, masks=store)

            decoded = open_decode()
            if dtype == ValueDtype.FLOAT32:
                assert all(decoded.delta.values[k].tobytes() == sparse.values[k].tobytes() for k in sparse.values)
            body = codec.encode_body(update, value_dtype=dtype)
            aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
            ciphertext = aead.encrypt(nonce, body, header.pack())

            agent = AgentChannel(federation="fed", device="dev-a", identity=device, coordinator=coord.public, layout=layout, value_dtype=dtype)
            agent.remember_masks(3, masks)
            pubs = agent.send(update, T0)

            def channel_receive():
                ch = CoordinatorChannel(federation="fed", identity=coord, devices={"dev-a": device.public}, layout=layout,
                                        replay=ReplayGuard())
                ch.remember_masks(3, masks)
                out = [ch.receive(p.topic, p.payload, T0) for p in pubs]
                assert out[-1] is not None

            t_seal = median_seconds(encode_seal, REPEATS)
            t_open = median_seconds(open_decode, REPEATS)
            t_enc = median_seconds(lambda: aead.encrypt(nonce, body, None), REPEATS)
            t_dec = median_seconds(lambda: aead.decrypt(nonce, ciphertext, header.pack()), REPEATS)
            t_chan = median_seconds(channel_receive, max(3, REPEATS // 3))
            mb = len(body) / 1e6
            nnz = sparse.nnz
            bound = nnz * width
            row = {
                "density": density, "dtype": dtype_name, "nnz": nnz, "sealed_bytes": len(envelope),
                "wire_bytes": sum(len(p.payload) for p in pubs), "chunks": len(pubs), "bound_bytes": bound,
                "flower_bytes": flower_bytes(delta), "sealed_over_bound": len(envelope) / bound,
                "size_target_met": len(envelope) <= 1.01 * bound + 256,
                "seal_encode_MBps": mb / t_seal, "open_decode_MBps": mb / t_open,
                "aead_encrypt_MBps": mb / t_enc, "aead_decrypt_MBps": mb / t_dec,
                "channel_receive_MBps": mb / t_chan,
            }
            row["open_over_aead"] = row["open_decode_MBps"] / row["aead_decrypt_MBps"]
            row["speed_target_met"] = row["open_over_aead"] >= 0.5
            rows.append(row)
            print_row(row)
    return {
        "layout": "mlp 784-1024-512-10", "parameters": layout.num_parameters, "repeats": REPEATS,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "rows": rows,
    }


HEAD = (f"{'density':>7} {'dtype':>7} {'sealed B':>10} {'wire B':>10} {'bound B':>10} {'x bound':>8} {'flower B':>10} "
        f"{'smaller':>7} {'seal MB/s':>9} {'aes enc':>8} {'open MB/s':>9} {'aes dec':>8} {'open/aes':>8} {'chan MB/s':>9} targets")


def print_row(r: dict) -> None:
    ok = ("size ok" if r["size_target_met"] else "SIZE MISS") + ", " + ("speed ok" if r["speed_target_met"] else "SPEED MISS")
    print(f"{r['density']:>7} {r['dtype']:>7} {r['sealed_bytes']:>10} {r['wire_bytes']:>10} {r['bound_bytes']:>10} "
          f"{r['sealed_over_bound']:>8.4f} {r['flower_bytes']:>10} {r['flower_bytes'] / r['sealed_bytes']:>6.1f}x "
          f"{r['seal_encode_MBps']:>9.0f} {r['aead_encrypt_MBps']:>8.0f} {r['open_decode_MBps']:>9.0f} "
          f"{r['aead_decrypt_MBps']:>8.0f} {r['open_over_aead']:>8.2f} {r['channel_receive_MBps']:>9.0f} {ok}", flush=True)


def main() -> None:
    print(HEAD)
    result = run()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    rows = result["rows"]
    print(f"size target met in {sum(r['size_target_met'] for r in rows)}/{len(rows)} rows; "
          f"speed target met in {sum(r['speed_target_met'] for r in rows)}/{len(rows)} rows; wrote {OUT}")


if __name__ == "__main__":
    main()
