"""What does Flower's SecAgg+ cost?  One FedAvg round, secure vs plain, at n clients.

Runs a *real* Flower simulation (``flwr.simulation.run_simulation``, Ray backend) of a
``ServerApp`` whose fit workflow is Flower's ``SecAggPlusWorkflow`` (or Flower's plain
``default_fit_workflow``) and a ``ClientApp`` with Flower's ``secaggplus_mod``.  Nothing
of SecAgg+ is re-implemented here: key agreement, Shamir sharing, encryption,
quantisation, masking and unmasking are all Flower's code paths.

What this file adds is metering only:

* ``MeteredGrid`` wraps the ``Grid`` handed to the ServerApp (one ``send_and_receive``
  call = one stage), times each stage, and in the metered round serialises every
  message the server sends and every reply it receives with Flower's own
  ``message_to_proto(...).ByteSize()`` (and the inflatable-object form).
* two client mods (outermost / innermost) log the ClientApp's thread CPU per stage and
  the CPU of the local "training" (generating the random update), to a file per actor.

Must be run with the Flower venv's interpreter (``benchmarks/flower_secagg/setup.sh``
creates ``build/flower-venv``).  Usage::

    build/flower-venv/bin/python benchmarks/flower_secagg/run.py            # everything
    build/flower-venv/bin/python benchmarks/flower_secagg/run.py --sizes 10 --modes secagg

One file (over 400 lines) because it runs in the Flower venv, which has none of fedprune's modules.

Each (n, mode) runs in its own subprocess (own Ray instance).  Three FedAvg rounds are
run: round 1 warms up Ray actors / imports, round 2 is timed (no serialisation in the
server thread), round 3 is metered for bytes.  Rounds 2 and 3 move identical messages
(same float32 global-model shapes, same per-client updates).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# The "digits MLP" of fedprune: 64 -> 256 -> 128 -> 10, weights + biases.
LAYERS = (64, 256, 128, 10)
NUM_EXAMPLES = 100  # every client reports the same weight (<= max_weight)
ROUNDS = 3  # round 1 = warm-up, round 2 = timed (no metering), round 3 = bytes metered
TIMED_ROUND, METERED_ROUND = 2, 3
SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def model_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for fan_in, fan_out in zip(LAYERS[:-1], LAYERS[1:]):
        shapes.append((fan_out, fan_in))
        shapes.append((fan_out,))
    return shapes


def num_params() -> int:
    return sum(math.prod(s) for s in model_shapes())


def secagg_params(n: int) -> dict:
    """SecAgg+ parameters for n clients.

    ``SecAggPlusWorkflow`` has no default for ``num_shares`` / ``reconstruction_threshold``;
    Flower's secure-aggregation example uses 3 / 2 (for 5 SuperNodes).  SecAgg+ wants
    the neighbourhood to grow like log n, so we keep the example's 2/3 ratio and scale:
    num_shares = smallest odd >= 2*ceil(log2 n)+1 (capped at n), threshold = ceil(2/3 *
    num_shares).  -> n=10: 9/6, n=50: 13/9, n=200: 17/12.
    The quantisation parameters are the constructor defaults.
    """
    k = 2 * math.ceil(math.log2(n)) + 1
    if k % 2 == 0:
        k += 1
    k = min(k, n)
    t = max(2, math.ceil(2 * k / 3))
    return {
        "num_shares": k,
        "reconstruction_threshold": t,
        "max_weight": 1000.0,  # default
        "clipping_range": 8.0,  # default
        "quantization_range": 4194304,  # default, 2**22
        "modulus_range": 4294967296,  # default, 2**32
    }


def client_update(node_id: int):
    """The update a client sends: float32 uniform in [-1, 1), deterministic per node."""
    import numpy as np

    rng = np.random.default_rng(node_id % (2**63))
    return [rng.uniform(-1.0, 1.0, size=s).astype(np.float32) for s in model_shapes()]


# ----------------------------------------------------------------------------- one run


def run_one(n: int, mode: str, row_out: Path, cpus: int) -> None:  # noqa: C901
    import numpy as np

    import flwr
    from flwr.app import Context, Message
    from flwr.app import RecordDict
    from flwr.app.message.message import make_message
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.serde import message_to_proto
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WKey
    from flwr.server.workflow.default_workflows import default_fit_workflow
    from flwr.serverapp import Grid
    from flwr.simulation import run_simulation
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    secure = mode == "secagg"
    sa = secagg_params(n)
    client_log_dir = Path(tempfile.mkdtemp(prefix=f"flwr-secagg-{mode}-{n}-"))

    # ------------------------------------------------------------------ ClientApp
    class RandomUpdateClient(NumPyClient):
        def __init__(self, node_id: int) -> None:
            self.node_id = node_id

        def fit(self, parameters, config):
            return client_update(self.node_id), NUM_EXAMPLES, {}

    def client_fn(context: Context):
        return RandomUpdateClient(context.node_id).to_client()

    log_dir = str(client_log_dir)  # captured by the mods, shipped to the Ray actors

    def _log(kind: str, msg: Message, cpu: float) -> None:
        path = os.path.join(log_dir, f"{os.getpid()}-{threading.get_ident()}.log")
        with open(path, "a") as fh:
            fh.write(f"{kind} {msg.metadata.group_id} {msg.metadata.dst_node_id} {cpu!r}\n")

    def outer_cpu_mod(msg: Message, ctx: Context, call_next):
        """Thread CPU of the whole ClientApp (SecAgg+ mod + fit) for this message."""
        t0 = time.thread_time()
        out = call_next(msg, ctx)
        _log("client", msg, time.thread_time() - t0)
        return out

    def inner_cpu_mod(msg: Message, ctx: Context, call_next):
        """Thread CPU of the local 'training' only (here: generating the update)."""
        t0 = time.thread_time()
        out = call_next(msg, ctx)
        _log("train", msg, time.thread_time() - t0)
        return out

    mods = [outer_cpu_mod, secaggplus_mod, inner_cpu_mod] if secure else [outer_cpu_mod, inner_cpu_mod]
    client_app = ClientApp(client_fn=client_fn, mods=mods)

    # ------------------------------------------------------------------ sizes (Flower's own serialisation)
    def proto_bytes(msg) -> int:
        return message_to_proto(msg).ByteSize()

    def object_bytes(msg) -> int:
        # What flwr's Fleet API moves: the message header (content removed) + the
        # deflated bytes of every distinct object of the content tree (PushObject /
        # PullObject).  NB: build the header from a *copy* of the metadata --
        # flwr's remove_content_from_message() resets metadata.delivered_at on the
        # live message, which makes the simulation engine deliver it a second time.
        header = message_to_proto(
            make_message(metadata=copy.deepcopy(msg.metadata), content=RecordDict())
        ).ByteSize()
        return header + sum(len(o.deflate()) for o in get_all_nested_objects(msg).values()
                            if o is not msg)

    # ------------------------------------------------------------------ metering Grid
    class MeteredGrid(Grid):
        """Delegates to the simulation's Grid; times each stage and (when `metering`)
        serialises every message the server sends and every reply it receives."""

        def __init__(self, inner: Grid) -> None:
            self.inner = inner
            self.metering = False
            self.stages: list[dict] = []
            self.meter_wall = 0.0
            self.meter_cpu = 0.0

        def set_run(self, run):  # pragma: no cover - not used by the workflows
            self.inner.set_run(run)

        @property
        def run(self):
            return self.inner.run

        def create_message(self, *a, **kw):  # pragma: no cover
            return self.inner.create_message(*a, **kw)

        def get_node_ids(self):
            return self.inner.get_node_ids()

        def get_nodes(self):
            return self.inner.get_nodes()

        def push_messages(self, messages):  # pragma: no cover
            return self.inner.push_messages(messages)

        def pull_messages(self, message_ids):  # pragma: no cover
            return self.inner.pull_messages(message_ids)

        def _meter(self, msgs, sink: list) -> None:
            """Serialise now (before the workflow consumes/mutates the content)."""
            w0, c0 = time.perf_counter(), time.thread_time()
            for m in msgs:
                sink.append((m.metadata.dst_node_id, m.metadata.src_node_id,
                             proto_bytes(m), object_bytes(m), m.has_error()))
            self.meter_wall += time.perf_counter() - w0
            self.meter_cpu += time.thread_time() - c0

        def send_and_receive(self, messages, *, timeout=None):
            # Same logic as InMemoryGrid.send_and_receive (push, then poll-pull every
            # pull_interval), with the stage timer and the metering hooked in.
            stage: dict = {"down": [], "up": []}
            self.stages.append(stage)
            w0 = time.perf_counter()
            out = list(messages)
            msg_ids = set(self.inner.push_messages(out))
            if self.metering:
                self._meter(out, stage["down"])
            del out, messages
            end_time = time.time() + (timeout if timeout is not None else 0.0)
            ret = []
            while timeout is None or time.time() < end_time:
                res = list(self.inner.pull_messages(msg_ids))
                if self.metering:
                    self._meter(res, stage["up"])
                ret.extend(res)
                msg_ids.difference_update({m.metadata.reply_to_message_id for m in res})
                if len(msg_ids) == 0:
                    break
                time.sleep(self.inner.pull_interval)
            stage["wall"] = time.perf_counter() - w0
            return ret

    # ------------------------------------------------------------------ ServerApp
    class Float32FedAvg(FedAvg):
        """FedAvg that keeps the global model float32.

        SecAgg+'s `dequantize` returns float64, so with plain FedAvg the global model
        (and hence every later downlink) silently doubles in size after the first
        secure round.  A real app whose model is float32 stores it back as float32;
        we do the same so that every round broadcasts a float32 model (no-op for plain).
        """

        def aggregate_fit(self, server_round, results, failures):
            params, metrics = super().aggregate_fit(server_round, results, failures)
            if params is not None:
                params = ndarrays_to_parameters(
                    [a.astype(np.float32) for a in parameters_to_ndarrays(params)]
                )
            return params, metrics

    result: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        # wait until all virtual SuperNodes are registered (not part of the round)
        t_wait = time.time() + 120
        while len(list(grid.get_node_ids())) < n and time.time() < t_wait:
            time.sleep(0.05)
        init = [np.zeros(s, dtype=np.float32) for s in model_shapes()]
        strategy = Float32FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters(init),
        )
        lctx = LegacyContext(
            context=context, config=ServerConfig(num_rounds=ROUNDS), strategy=strategy
        )
        mgrid = MeteredGrid(grid)
        if secure:
            fit = SecAggPlusWorkflow(
                num_shares=sa["num_shares"],
                reconstruction_threshold=sa["reconstruction_threshold"],
                max_weight=sa["max_weight"],
                clipping_range=sa["clipping_range"],
                quantization_range=sa["quantization_range"],
                modulus_range=sa["modulus_range"],
            )
        else:
            fit = default_fit_workflow
        rounds: list[dict] = []

        def timed_fit(g: Grid, c: Context) -> None:
            current = c.state.config_records[MAIN_CONFIGS_RECORD][WKey.CURRENT_ROUND]
            mgrid.metering = current == METERED_ROUND
            mgrid.stages = []
            mgrid.meter_wall = mgrid.meter_cpu = 0.0
            p0 = time.process_time()
            c0 = time.thread_time()
            w0 = time.perf_counter()
            fit(g, c)
            w1 = time.perf_counter()
            c1 = time.thread_time()
            p1 = time.process_time()
            mgrid.metering = False
            rounds.append(
                {"wall": w1 - w0, "server_thread_cpu": c1 - c0, "process_cpu": p1 - p0,
                 "meter_wall": mgrid.meter_wall, "meter_cpu": mgrid.meter_cpu,
                 "stages": mgrid.stages}
            )

        DefaultWorkflow(fit_workflow=timed_fit)(mgrid, lctx)
        agg = parameters_to_ndarrays(
            compat.arrayrecord_to_parameters(
                lctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
            )
        )
        result["rounds"] = rounds
        result["aggregate"] = agg

    # ------------------------------------------------------------------ run it
    backend_config = {
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config=backend_config,
    )
    total_wall = time.perf_counter() - t0
    if "rounds" not in result or len(result["rounds"]) != ROUNDS:
        raise SystemExit(f"run failed for n={n} mode={mode}: no round results")

    rnd = result["rounds"][TIMED_ROUND - 1]
    met = result["rounds"][METERED_ROUND - 1]
    stages = met["stages"]
    names = list(SECAGG_STAGES) if secure else ["fit"]
    if len(stages) != len(names):
        raise SystemExit(f"expected {len(names)} stages, got {len(stages)}")
    per_stage = []
    up_total: dict[int, int] = {}
    down_total: dict[int, int] = {}
    up_obj: dict[int, int] = {}
    down_obj: dict[int, int] = {}
    n_down = n_up = 0
    for name, st, st_t in zip(names, stages, rnd["stages"]):
        # entries: (dst_node_id, src_node_id, proto_bytes, object_bytes, has_error)
        for dst, _src, pb_, ob_, _e in st["down"]:
            down_total[dst] = down_total.get(dst, 0) + pb_
            down_obj[dst] = down_obj.get(dst, 0) + ob_
        for _dst, src, pb_, ob_, _e in st["up"]:
            up_total[src] = up_total.get(src, 0) + pb_
            up_obj[src] = up_obj.get(src, 0) + ob_
        d_sizes = [e[2] for e in st["down"]]
        u_sizes = [e[2] for e in st["up"]]
        n_down += len(d_sizes)
        n_up += len(u_sizes)
        per_stage.append({
            "stage": name,
            "messages_down": len(d_sizes),
            "messages_up": len(u_sizes),
            "downlink_bytes_per_client_mean": sum(d_sizes) / max(1, len(d_sizes)),
            "uplink_bytes_per_client_mean": sum(u_sizes) / max(1, len(u_sizes)),
            "wall_seconds": round(st_t["wall"], 4),
        })
        if any(e[4] for e in st["up"]):
            raise SystemExit(f"stage {name}: client error replies")

    # client CPU from the mods' logs (only round 2 = group_id "2")
    client_cpu: dict[int, float] = {}
    train_cpu: dict[int, float] = {}
    for f in client_log_dir.glob("*.log"):
        for line in f.read_text().splitlines():
            kind, group, nid, cpu = line.split()
            if group != str(TIMED_ROUND):
                continue
            tgt = client_cpu if kind == "client" else train_cpu
            tgt[int(nid)] = tgt.get(int(nid), 0.0) + float(cpu)
    for f in client_log_dir.glob("*.log"):
        f.unlink()
    client_log_dir.rmdir()

    # correctness: the aggregate must be the plain mean of the client updates
    node_ids = sorted(up_total)
    expected = [np.mean([client_update(nid)[i] for nid in node_ids], axis=0)
                for i in range(len(model_shapes()))]
    max_err = max(float(np.max(np.abs(a - e))) for a, e in zip(result["aggregate"], expected))

    def mean(d: dict) -> float:
        return sum(d.values()) / max(1, len(d))

    row = {
        "n": n,
        "mode": mode,
        "uplink_bytes_per_client": round(mean(up_total)),
        "downlink_bytes_per_client": round(mean(down_total)),
        "round_seconds": round(rnd["wall"], 4),
        "server_cpu_seconds": round(rnd["server_thread_cpu"], 4),
        "flwr_version": flwr.__version__,
        "params": {
            "model": "digits MLP 64-256-128-10",
            "num_parameters": num_params(),
            "num_examples_per_client": NUM_EXAMPLES,
            **(sa if secure else {}),
        },
        "stages": len(names),
        "messages_per_client": {"down": n_down // n, "up": n_up // n},
        "messages_total": {"down": n_down, "up": n_up},
        "uplink_object_bytes_per_client": round(mean(up_obj)),
        "downlink_object_bytes_per_client": round(mean(down_obj)),
        "uplink_bytes_per_client_max": max(up_total.values()),
        "downlink_bytes_per_client_max": max(down_total.values()),
        "per_stage": per_stage,
        "sim_process_cpu_seconds": round(rnd["process_cpu"], 4),
        "metered_round": {"round_seconds": round(met["wall"], 4),
                          "serialisation_wall_seconds": round(met["meter_wall"], 4)},
        "client_cpu_seconds_per_client": round(mean(client_cpu), 5),
        "client_train_cpu_seconds_per_client": round(mean(train_cpu), 5),
        "client_cpu_seconds_total": round(sum(client_cpu.values()), 4),
        "clients_reporting_cpu": len(client_cpu),
        "aggregate_max_abs_error": max_err,
        "warmup_round_seconds": round(result["rounds"][0]["wall"], 4),
        "simulation_total_seconds": round(total_wall, 2),
        "ray_cpus": cpus,
    }
    row_out.write_text(json.dumps(row, indent=1))


# ----------------------------------------------------------------------------- driver


def fmt_bytes(b: float) -> str:
    return f"{b / 1024:,.1f} KiB"


def write_md(rows: list[dict], path: Path, command: str) -> None:
    r0 = rows[0]
    lines = [
        "# Flower SecAgg+ cost (one FedAvg round)",
        "",
        f"flwr {r0['flwr_version']} (`SecAggPlusWorkflow` + `secaggplus_mod`), real "
        f"`flwr.simulation.run_simulation` run (Ray backend, {r0['ray_cpus']} CPUs, "
        f"1 CPU per ClientApp). Model: {r0['params']['model']} = "
        f"{r0['params']['num_parameters']:,} float32 parameters; every client sends a "
        "random float32 update. Times from round 2 of 3 (round 1 = warm-up), bytes from round 3 "
        "(same messages, serialised as they pass the server).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        "| n | mode | shares / threshold | uplink / client | downlink / client | msgs / client (down+up) | round wall s | server CPU s | client CPU s / client | max abs err |",
        "|---:|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["params"]
        st = f"{p['num_shares']} / {p['reconstruction_threshold']}" if r["mode"] == "secagg" else "-"
        m = r["messages_per_client"]
        lines.append(
            f"| {r['n']} | {r['mode']} | {st} | {fmt_bytes(r['uplink_bytes_per_client'])} "
            f"| {fmt_bytes(r['downlink_bytes_per_client'])} | {m['down']}+{m['up']} "
            f"| {r['round_seconds']:.3f} | {r['server_cpu_seconds']:.3f} "
            f"| {r['client_cpu_seconds_per_client']:.4f} | {r['aggregate_max_abs_error']:.2e} |"
        )
    lines += [
        "",
        "Per stage (SecAgg+; mean bytes per client, stage wall time):",
        "",
        "| n | stage | downlink / client | uplink / client | wall s |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["mode"] != "secagg":
            continue
        for s in r["per_stage"]:
            lines.append(
                f"| {r['n']} | {s['stage']} | {s['downlink_bytes_per_client_mean']:,.0f} B "
                f"| {s['uplink_bytes_per_client_mean']:,.0f} B | {s['wall_seconds']:.3f} |"
            )
    lines += [
        "",
        "Columns:",
        "",
        "- **uplink / downlink per client**: sum over all stages of "
        "`flwr.common.serde.message_to_proto(msg).ByteSize()` of every Message the client "
        "sends to / receives from the server in the round (metadata + RecordDict content; "
        "no gRPC/HTTP2 framing, no TLS). The JSON also has `*_object_bytes_per_client`, "
        "the header + deflated objects that flwr's Fleet API actually pushes/pulls.",
        "- **round wall s**: wall time of the fit workflow of the round (server's view, "
        "includes the simulation's 0.1 s reply polling per stage and all ClientApps "
        f"running on {r0['ray_cpus']} shared cores, i.e. client compute is serialised "
        "onto this machine, unlike a real deployment).",
        "- **server CPU s**: `time.thread_time()` of the ServerApp thread over the round "
        "(SecAgg+ workflow + FedAvg + pushing into the in-memory SuperLink state). The "
        "simulation engine's own threads and the Ray actors are not in it; the JSON has "
        "`sim_process_cpu_seconds` (whole driver process).",
        "- **client CPU s / client**: thread CPU of one ClientApp over its messages of the "
        "round (all mods incl. `secaggplus_mod`, plus generating the random update).",
        "- **max abs err**: max |aggregate - exact mean of the client updates| (float64 "
        "reference): SecAgg+ quantisation error; ~1e-7 for plain is float32 rounding.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,50,200")
    ap.add_argument("--modes", default="plain,secagg")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                    help="CPUs given to Ray (one ClientApp actor per CPU)")
    ap.add_argument("--out-json", default=str(RESULTS / "secagg_flower.json"))
    ap.add_argument("--out-md", default=str(RESULTS / "secagg_flower.md"))
    ap.add_argument("--one", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--row-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        run_one(int(args.one[0]), args.one[1], Path(args.row_out), args.cpus)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    for m in modes:
        if m not in ("plain", "secagg"):
            raise SystemExit(f"unknown mode {m}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for mode in modes:
                out = Path(tmp) / f"{n}-{mode}.json"
                t0 = time.perf_counter()
                print(f"== n={n} mode={mode}", flush=True)
                env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONWARNINGS="ignore")
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", str(n), mode, "--row-out", str(out),
                     "--cpus", str(args.cpus)],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )
                if proc.returncode != 0 or not out.exists():
                    print(proc.stdout[-6000:])
                    raise SystemExit(f"n={n} mode={mode} failed (rc={proc.returncode})")
                row = json.loads(out.read_text())
                rows.append(row)
                print(f"   round {row['round_seconds']:.3f}s  server cpu {row['server_cpu_seconds']:.3f}s  "
                      f"up {row['uplink_bytes_per_client']}B  down {row['downlink_bytes_per_client']}B  "
                      f"err {row['aggregate_max_abs_error']:.2e}  (subprocess {time.perf_counter() - t0:.1f}s)",
                      flush=True)
    command = "bash benchmarks/flower_secagg/setup.sh && build/flower-venv/bin/python benchmarks/flower_secagg/run.py"
    extra = []
    if args.sizes != "10,50,200":
        extra.append(f"--sizes {args.sizes}")
    if args.modes != "plain,secagg":
        extra.append(f"--modes {args.modes}")
    if extra:
        command += " " + " ".join(extra)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(rows, indent=1) + "\n")
    write_md(rows, Path(args.out_md), command)
    print(f"wrote {args.out_json} and {args.out_md}")


if __name__ == "__main__":
    main()
