"""Where torch and onnxruntime live on the device: model layouts, local training and release
checks, in-process or in a child.

An idle agent should stay small (importing torch alone costs ~200 MB RSS), so by default the
daemon runs each training job in a short-lived child process (``python -m fedprune.edge_agent.worker``)
that reads one msgpack job from stdin and writes one msgpack result to stdout. With
``[agent] train_in_subprocess = false`` (many agents on one box, as in the demo and the
simulation) ``train`` runs in the daemon and torch is imported once, lazily.
Jobs carry only arrays and plain values; no pickle crosses the pipe.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedprune.common.data_source import DataSource
from fedprune.edge_agent.core.agent import Trained
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.layout import ModelLayout, TensorSpec
from fedprune.protocol.messages import ModelRef

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainJob:
    model: ModelRef
    params: Params
    masks: Params
    hyper: HyperParams
    data_path: Path
    device: str  # cpu, cuda or auto: resolved where training runs, so the daemon never imports torch
    threads: int
    data_source: DataSource = DataSource()  # how data_path is read: the daemon's [data], so both read the same
    target_edges: tuple[tuple[float, ...], ...] = ()  # a regression task's bin edges (RoundTask.target_edges)


class WorkerError(RuntimeError):
    """Training failed in the worker; the message is the worker's own last words."""


def _last_words(stderr: bytes, limit: int = 300) -> str:
    """The child's last stderr line: for a traceback, the exception and its message; the whole
    traceback, cut anywhere, would bury that in a log line."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return (lines[-1] if lines else "the worker died without a message")[:limit]


def _in_child(request: dict[str, Any], python: str, *, timeout_s: float | None = None, what: str = "the worker") -> bytes:
    """One request to a fresh ``python -m fedprune.edge_agent.worker``: its stdout, or WorkerError
    with the child's last words (or the time it ran out of)."""
    try:
        done = subprocess.run([python, "-m", "fedprune.edge_agent.worker"], input=msgpack.packb(request, use_bin_type=True),
                              capture_output=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"{what} did not finish within {timeout_s} s") from None
    if done.returncode != 0:
        raise WorkerError(_last_words(done.stderr))
    return done.stdout


def _arrays_out(arrays: Params) -> dict[str, Any]:
    return {k: [v.dtype.str, list(v.shape), np.ascontiguousarray(v).tobytes()] for k, v in arrays.items()}


def _arrays_in(packed: dict[str, Any]) -> Params:
    return {k: np.frombuffer(raw, dtype=np.dtype(dt)).reshape(shape).copy() for k, (dt, shape, raw) in packed.items()}


def _model_spec(model: ModelRef):
    from fedprune.common.models import ModelSpec

    return ModelSpec(model.name, tuple(model.input_shape), model.num_classes, args=model.args, task=model.task)


def _model_out(model: ModelRef) -> list[Any]:
    return [model.name, list(model.input_shape), model.num_classes, dict(model.args), model.task]


def _model_in(packed: list[Any]) -> ModelRef:
    name, shape, classes, args, task = packed
    return ModelRef(name, tuple(shape), classes, args=args, task=task)


def layout_for(model: ModelRef) -> ModelLayout:
    """The layout of the model the reference names; imports torch and the factory's package
    (cached per model by the caller). ValueError (ModelFactoryError) when it cannot be built."""
    from fedprune.common.models import model_layout

    return model_layout(_model_spec(model))


def layout_in_child(model: ModelRef, python: str = sys.executable) -> ModelLayout:
    """Same as :func:`layout_for` without loading torch into this process."""
    try:
        specs = msgpack.unpackb(_in_child({"op": "layout", "model": _model_out(model)}, python))
    except WorkerError as exc:  # the factory's own words, e.g. "cannot import mypkg.nets"
        raise ValueError(str(exc)) from None
    return ModelLayout(tuple(TensorSpec(n, tuple(s), m, t) for n, s, m, t in specs))


def device_problem(choice: str) -> str | None:
    """Why training cannot run on ``choice`` here (``cuda`` without a GPU torch can see); imports torch."""
    from fedprune.edge_agent.training import resolve_device

    try:
        resolve_device(choice)
    except ValueError as exc:
        return str(exc)
    return None


def device_problem_in_child(choice: str, python: str = sys.executable, timeout_s: float = 300.0) -> str | None:
    """Same as :func:`device_problem` without loading torch into this process."""
    try:
        return msgpack.unpackb(_in_child({"op": "device", "device": choice}, python, timeout_s=timeout_s,
                                         what="the device check (a CUDA initialisation that hangs?)"))
    except WorkerError as exc:
        return f"device check failed: {exc}"


def warm_up() -> None:
    """Import torch and the trainer now, so the first round does not pay for it mid-deadline.

    The first ``torch.optim.SGD`` imports ``torch._dynamo`` (about 2 s of CPU on a small board),
    so one throwaway optimiser is built here too.
    """
    import torch

    import fedprune.edge_agent.training  # noqa: F401

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)


def train(job: TrainJob) -> Trained:
    import time

    import torch

    from fedprune.common.data import load_local_data
    from fedprune.edge_agent.training import resolve_device, train_local

    if job.threads > 0:
        torch.set_num_threads(job.threads)
    X, y = load_local_data(job.data_path, job.data_source)
    started = time.perf_counter()
    result = train_local(_model_spec(job.model), job.params, job.masks, X, y, job.hyper,
                         device=resolve_device(job.device), target_edges=job.target_edges)
    return Trained(
        delta=result.delta, buffers=result.buffers, masks=result.masks, mask_changed=result.mask_changed,
        n_examples=result.n_examples, steps=result.steps, train_loss=result.train_loss,
        class_losses=dict(result.class_losses), seconds=time.perf_counter() - started, macs=result.flops,
    )


def train_in_child(job: TrainJob, python: str = sys.executable, timeout_s: float | None = None) -> Trained:
    out = msgpack.unpackb(_in_child({
        "op": "train", "model": _model_out(job.model),
        "params": _arrays_out(job.params), "masks": _arrays_out(job.masks), "hyper": job.hyper.to_dict(),
        "data": str(job.data_path), "data_source": job.data_source.to_dict(), "device": job.device,
        "threads": job.threads, "edges": [list(row) for row in job.target_edges],
    }, python, timeout_s=timeout_s, what="training"), raw=False, strict_map_key=False)
    return Trained(
        delta=_arrays_in(out["delta"]), buffers=_arrays_in(out["buffers"]),
        masks={k: v.astype(bool) for k, v in _arrays_in(out["masks"]).items()},
        mask_changed=out["mask_changed"], n_examples=out["n_examples"], steps=out["steps"],
        train_loss=out["train_loss"], class_losses={int(c): (float(m), int(n)) for c, (m, n) in out["class_losses"].items()},
        seconds=out["seconds"], macs=out["macs"],
    )


def model_problem_in_child(onnx: bytes, python: str = sys.executable) -> str | None:
    """``release_store.model_problem`` in a child, so onnxruntime never stays in the daemon."""
    try:
        return msgpack.unpackb(_in_child({"op": "check_model", "onnx": onnx}, python))
    except WorkerError as exc:
        return f"model check failed: {exc}"


def _main() -> int:
    request = msgpack.unpackb(sys.stdin.buffer.read(), raw=False, strict_map_key=False)
    if request["op"] == "device":
        sys.stdout.buffer.write(msgpack.packb(device_problem(request["device"])))
        return 0
    if request["op"] == "check_model":
        from fedprune.edge_agent.release_store import model_problem

        sys.stdout.buffer.write(msgpack.packb(model_problem(request["onnx"])))
        return 0
    model = _model_in(request["model"])
    if request["op"] == "layout":
        try:
            layout = layout_for(model)
        except ValueError as exc:  # the message names the factory and the fix: it is the last word
            sys.stderr.write(f"{exc}\n")
            return 1
        sys.stdout.buffer.write(msgpack.packb([[s.name, list(s.shape), s.masked, s.trainable] for s in layout]))
        return 0
    job = TrainJob(
        model=model, params=_arrays_in(request["params"]),
        masks={k: v.astype(bool) for k, v in _arrays_in(request["masks"]).items()},
        hyper=HyperParams.from_dict(request["hyper"]), data_path=Path(request["data"]),
        data_source=DataSource.from_dict(request["data_source"]), device=request["device"], threads=request["threads"],
        target_edges=tuple(tuple(row) for row in request["edges"]),
    )
    outcome = train(job)
    sys.stdout.buffer.write(msgpack.packb({
        "delta": _arrays_out(outcome.delta), "buffers": _arrays_out(outcome.buffers),
        "masks": _arrays_out(outcome.masks), "mask_changed": outcome.mask_changed,
        "n_examples": outcome.n_examples, "steps": outcome.steps, "train_loss": outcome.train_loss,
        "class_losses": {c: [m, n] for c, (m, n) in outcome.class_losses.items()}, "seconds": outcome.seconds,
        "macs": outcome.macs,
    }, use_bin_type=True))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
