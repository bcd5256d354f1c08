"""The global model as an ONNX release: export, compact storage, int8, release metadata.

This is where torch and onnx enter the coordinator. Three artefacts come from one export:

- ``export_onnx``: the masked global model, opset 13-20, dynamic batch axis, one self-contained
  blob (weights inside, never a side file), checked with ``onnx.checker`` (full check), with
  ``metadata_props`` describing where it came from (see ``read_metadata``).
- ``compact_onnx``: the same graph, its mostly-zero float tensors stored small so the download
  shrinks with sparsity: the non-zero values plus a packed bitmap (4 B per non-zero + 1 bit per
  entry), expanded by a decode subgraph (BitShift, Mod, CumSum, Gather) whose inputs are all
  initializers, so onnxruntime constant-folds it once at session creation. Outputs are
  bit-identical to the dense file; run-time memory and speed are those of the dense model: this
  saves bytes on the wire and on disk only. Not ``graph.sparse_initializer``: with int64 indices
  it costs 12 B per non-zero (0.3x of dense at best at 90 % sparsity, before biases), and
  ``onnx.checker``'s full check rejects a sparse tensor feeding Gemm.
- ``quantize_int8``: dynamic int8 quantization of MatMul/Gemm only (quantizing Conv made CPU
  latency 2-7x worse, docs/INFRA.md); Conv layers stay float32.

Exporter: TorchScript (``dynamo=False``). It is ~100x faster than the dynamo exporter on our
small models (10 ms vs 1-3 s), needs no onnxscript optimizer pass, gives the plain graph
Flatten/Gemm/Conv/MaxPool (dynamo adds a Reshape with a shape constant), and supports opsets
below 18, which older onnxruntime builds on Jetsons need. Its DeprecationWarning is silenced
here; torch is pinned (2.13), and the parity tests would catch a changed exporter.
"""

from __future__ import annotations

import hashlib
import io
import math
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fedprune.common.models import Masks, ModelSpec, Params, model_layout, module_from_params
from fedprune.protocol.messages import ModelRelease

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET, MAX_OPSET = 13, 20
REQUIRED_KEYS = ("federation", "round", "mask_version")
DERIVED_KEYS = ("model", "task", "input_shape", "num_classes", "sparsity", "weights_sha256", "opset", "variant")
VARIANTS = ("dense", "compact", "int8")
_INT_KEYS = {"round", "mask_version", "num_classes", "opset"}
_FLOAT_KEYS = {"sparsity", "val_accuracy", "val_f1", "val_r2"}
# Storing a tensor compactly costs a few nodes and shape constants; below this saving, keep it dense.
_MIN_SAVING = 256
# Decoder tensors are named "~/<constant>" (shared) and "~<k>/<step>" (k-th decoded tensor), and
# their nodes are unnamed: on a 25 KB model, descriptive names cost more than a layer's weights.
_DECODE_PREFIX = "~"


def weights_sha256(spec: ModelSpec, params: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of every tensor of ``model_layout(spec)`` in layout order (parameters, then
    buffers), each as little-endian float32 in C order, concatenated with no separators."""
    digest = hashlib.sha256()
    for tensor in model_layout(spec):
        digest.update(np.ascontiguousarray(params[tensor.name], dtype="<f4").tobytes())
    return digest.hexdigest()


def masked_sparsity(spec: ModelSpec, params: Mapping[str, np.ndarray]) -> float:
    """Fraction of zero entries over the prunable (masked) weights of the layout."""
    masked = model_layout(spec).masked
    total = sum(t.size for t in masked)
    zeros = sum(t.size - int(np.count_nonzero(params[t.name])) for t in masked)
    return zeros / total if total else 0.0


def export_onnx(
    spec: ModelSpec,
    params: Params,
    *,
    opset: int = 18,
    metadata: Mapping[str, str | int | float],
    masks: Masks | None = None,
) -> bytes:
    """The global model (weights zeroed outside ``masks`` when given) as self-contained ONNX bytes.

    ``metadata`` must hold ``federation``, ``round`` and ``mask_version`` and may add others
    (e.g. ``val_accuracy``); the keys in ``DERIVED_KEYS`` are computed here and may not be given.
    """
    if not (isinstance(opset, int) and MIN_OPSET <= opset <= MAX_OPSET):
        raise ValueError(f"opset={opset!r}: expected an int in {MIN_OPSET}..{MAX_OPSET}")
    if masks is not None:
        params = {k: (np.where(masks[k], v, 0).astype(np.float32) if k in masks else v) for k, v in params.items()}
    props = _check_metadata(metadata)
    module = module_from_params(spec, params).eval()
    props.update(
        model=spec.name,
        task=spec.task,
        input_shape=",".join(map(str, spec.input_shape)),
        num_classes=str(spec.num_classes),
        sparsity=f"{masked_sparsity(spec, params):.6f}",
        weights_sha256=weights_sha256(spec, params),
        opset=str(opset),
        variant="dense",
    )
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The exporter's deprecation notice, and its tracer's notes on recurrent layers (their
        # shape checks become constants; the batch axis stays dynamic, as the parity tests show).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        torch.onnx.export(
            module,
            (torch.zeros((1, *spec.input_shape)),),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    _set_metadata(model, props)
    return _finish(model)


def _check_metadata(metadata: Mapping[str, str | int | float]) -> dict[str, str]:
    if not isinstance(metadata, Mapping):
        raise TypeError("metadata must be a mapping of str -> str | int | float")
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing}: a release must say where it came from")
    derived = sorted(set(metadata) & set(DERIVED_KEYS))
    if derived:
        raise ValueError(f"metadata keys {derived} are computed by the export; do not pass them")
    props = {}
    for key, value in metadata.items():
        if type(value) not in (str, int, float):
            raise TypeError(f"metadata[{key!r}]={value!r:.60}: expected str, int or float")
        props[str(key)] = repr(value) if type(value) is float else str(value)
    return props


def _set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    merged = {p.key: p.value for p in model.metadata_props} | dict(props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, merged)


def _finish(model: onnx.ModelProto) -> bytes:
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def read_metadata(model_bytes: bytes) -> dict[str, str | int | float]:
    """The ``metadata_props`` of an exported model, with numeric keys parsed back to int/float."""
    model = onnx.load_from_string(model_bytes)
    out: dict[str, str | int | float] = {}
    for prop in model.metadata_props:
        value: str | int | float = prop.value
        if prop.key in _INT_KEYS:
            value = int(prop.value)
        elif prop.key in _FLOAT_KEYS:
            value = float(prop.value)
        out[prop.key] = value
    return out


def compact_onnx(model_bytes: bytes) -> bytes:
    """``model_bytes`` with every float32 initializer that is mostly zeros stored as a bitmap plus
    its non-zero values (see the module docstring); other tensors stay dense."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset}: compact storage needs opset >= {MIN_OPSET}")
    if _is_compact(graph):
        raise ValueError("model is already compact")
    graph_inputs = {i.name for i in graph.input}
    kept, decoders = [], []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or init.name in graph_inputs:
            kept.append(init)
            continue
        array = numpy_helper.to_array(init)
        bitmap_bytes = 4 * (int(np.count_nonzero(array)) + 1) + math.ceil(array.size / 8)
        if 4 * array.size - bitmap_bytes < _MIN_SAVING:
            kept.append(init)
            continue
        inits, nodes = _bitmap_decoder(init.name, array, len(decoders))
        kept.extend(inits)
        decoders.append(nodes)
    if decoders:
        kept.extend(_shared_constants())
    del graph.initializer[:]
    graph.initializer.extend(kept)
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend([node for nodes in decoders for node in nodes] + original)  # nodes must stay topologically sorted
    _set_metadata(model, {"variant": "compact"})
    return _finish(model)


def _shared_constants() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.arange(8, dtype=np.uint8), f"{_DECODE_PREFIX}/shifts"),
        numpy_helper.from_array(np.array([2], dtype=np.uint8), f"{_DECODE_PREFIX}/two"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{_DECODE_PREFIX}/flat"),
        numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), f"{_DECODE_PREFIX}/column"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), f"{_DECODE_PREFIX}/axis"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), f"{_DECODE_PREFIX}/start"),
    ]


def _is_compact(graph: onnx.GraphProto) -> bool:
    return any(init.name.startswith(_DECODE_PREFIX) for init in graph.initializer)


def _bitmap_decoder(name: str, array: np.ndarray, k: int) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Initializers and nodes rebuilding ``name`` from its non-zero values and a packed bitmap.

    bits (uint8, little bit order) -> per-byte shifts -> mod 2 -> the first N bits b. With the
    values prefixed by one 0, entry i is values[cumsum(b)[i] * b[i]]: the k-th set bit picks the
    k-th value, a clear bit picks the 0. Every op here is constant-folded by onnxruntime.
    """
    flat = array.reshape(-1)
    present = flat != 0
    p, s = f"{_DECODE_PREFIX}{k}/", f"{_DECODE_PREFIX}/"
    inits = [
        numpy_helper.from_array(np.packbits(present, bitorder="little"), f"{p}bits"),
        numpy_helper.from_array(np.concatenate([[0], flat[present]]).astype(np.float32), f"{p}values"),
        numpy_helper.from_array(np.array([flat.size], dtype=np.int64), f"{p}size"),
        numpy_helper.from_array(np.array(array.shape, dtype=np.int64), f"{p}shape"),
    ]
    node = helper.make_node
    nodes = [
        node("Reshape", [f"{p}bits", f"{s}column"], [f"{p}1"]),
        node("BitShift", [f"{p}1", f"{s}shifts"], [f"{p}2"], direction="RIGHT"),
        node("Mod", [f"{p}2", f"{s}two"], [f"{p}3"]),
        node("Reshape", [f"{p}3", f"{s}flat"], [f"{p}4"]),
        node("Slice", [f"{p}4", f"{s}start", f"{p}size"], [f"{p}5"]),
        node("Cast", [f"{p}5"], [f"{p}b"], to=TensorProto.INT64),
        node("CumSum", [f"{p}b", f"{s}axis"], [f"{p}6"]),
        node("Mul", [f"{p}6", f"{p}b"], [f"{p}index"]),
        node("Gather", [f"{p}values", f"{p}index"], [f"{p}dense"], axis=0),
        node("Reshape", [f"{p}dense", f"{p}shape"], [name]),
    ]
    return inits, nodes


def quantize_int8(model_bytes: bytes, *, per_channel: bool = False) -> bytes:
    """Dynamic int8 quantization of the MatMul/Gemm weights (activations quantized per batch at
    run time); Conv stays float32. Works on a dense export (not on a compact one)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load_from_string(model_bytes)
    if _is_compact(model.graph):
        raise ValueError("quantize the dense export, not a compact one")
    props = {p.key: p.value for p in model.metadata_props}
    with tempfile.TemporaryDirectory(prefix="fedprune-int8-") as tmp:
        source, target = Path(tmp, "model.onnx"), Path(tmp, "model.int8.onnx")
        source.write_bytes(model_bytes)
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
        )
        quantized = onnx.load_from_string(target.read_bytes())
    _set_metadata(quantized, props | {"variant": "int8"})
    return _finish(quantized)


def build_release(
    version: int, onnx_bytes: bytes, metadata: Mapping[str, str | int | float] | None = None
) -> ModelRelease:
    """A ``ModelRelease`` of ``onnx_bytes`` (sha256 over exactly these bytes). ``metadata``
    defaults to the model's own ``metadata_props`` (``read_metadata``)."""
    meta = read_metadata(onnx_bytes) if metadata is None else dict(metadata)
    return ModelRelease.of(version, onnx_bytes, meta)
