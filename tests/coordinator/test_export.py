"""ONNX export: parity with torch (dense, pruned, compact), metadata, compaction, int8 accuracy."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fedprune.coordinator.export import (
    build_release,
    compact_onnx,
    export_onnx,
    masked_sparsity,
    quantize_int8,
    read_metadata,
    weights_sha256,
)
from fedprune.coordinator.core.masks import apply_masks, erk_densities, random_masks
from fedprune.coordinator.lab.datasets import load_dataset
from fedprune.common.models import ModelSpec, evaluate, init_params, model_layout, module_from_params
from fedprune.edge_agent.training import train_local
from fedprune.protocol.hyperparams import HyperParams

SPECS = {
    "mlp": ModelSpec("mlp", (1, 8, 8), 10, args={"hidden": (64, 32)}),
    "cnn2d": ModelSpec("cnn2d", (1, 8, 8), 10, args={"channels": (8, 16)}),
    "cnn1d": ModelSpec("cnn1d", (1, 40), 10, args={"channels": (8, 16)}),
    "cnn2d-batchnorm": ModelSpec("cnn2d", (1, 8, 8), 10, args={"channels": (8, 16), "norm": "batch"}),
    "depthwise": ModelSpec("tests.nets:depthwise", (3, 8, 8), 5, args={"width": 32}),
    "gru": ModelSpec("tests.nets:recurrent", (3, 12), 4, args={"cell": "gru", "hidden": 32}),
    "lstm": ModelSpec("tests.nets:recurrent", (3, 12), 4, args={"cell": "lstm", "hidden": 32}),
    "embedding": ModelSpec("tests.nets:tokens", (6,), 3, args={"vocabulary": 64, "dim": 32}),
}
META = {"federation": "fed-1", "round": 7, "mask_version": 3}


def pruned_params(spec: ModelSpec, sparsity: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    params = init_params(spec, seed=1)
    if sparsity == 0:
        return params
    layout = model_layout(spec)
    return apply_masks(params, random_masks(layout, erk_densities(layout, sparsity), rng))


def run_onnx(model: bytes, X: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": X})[0]


@pytest.mark.parametrize("sparsity", [0.0, 0.9])
@pytest.mark.parametrize("name", list(SPECS))
def test_onnx_and_compact_match_torch_on_1000_inputs(name, sparsity, rng):
    spec = SPECS[name]
    params = pruned_params(spec, sparsity, rng)
    X = rng.standard_normal((1000, *spec.input_shape)).astype(np.float32)
    if name == "embedding":  # token ids, as floats
        X = rng.integers(0, 64, size=(1000, *spec.input_shape)).astype(np.float32)
    with torch.no_grad():
        expected = module_from_params(spec, params).eval()(torch.from_numpy(X)).numpy()
    dense = export_onnx(spec, params, metadata=META)
    compact = compact_onnx(dense)
    got_dense, got_compact = run_onnx(dense, X), run_onnx(compact, X)
    assert got_dense.shape == (1000, spec.num_classes)
    np.testing.assert_allclose(got_dense, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_compact, got_dense, rtol=0, atol=1e-5)
    if sparsity:
        assert len(compact) < len(dense)


def test_masks_given_to_export_zero_the_weights_outside_them(rng):
    spec = SPECS["mlp"]
    layout = model_layout(spec)
    params = init_params(spec, seed=1)
    masks = random_masks(layout, erk_densities(layout, 0.8), rng)
    from_masks = export_onnx(spec, params, metadata=META, masks=masks)
    assert from_masks == export_onnx(spec, apply_masks(params, masks), metadata=META)
    assert read_metadata(from_masks)["sparsity"] == pytest.approx(masked_sparsity(spec, apply_masks(params, masks)))


def test_metadata_describes_the_model_and_its_weights(rng):
    spec = SPECS["cnn1d"]
    params = pruned_params(spec, 0.8, rng)
    model = export_onnx(spec, params, opset=17, metadata=META | {"val_accuracy": 0.875, "note": "nightly"})
    meta = read_metadata(model)
    assert meta == META | {
        "val_accuracy": 0.875,
        "note": "nightly",
        "model": "cnn1d",
        "task": "classification",
        "input_shape": "1,40",
        "num_classes": 10,
        "sparsity": pytest.approx(0.8, abs=0.01),
        "weights_sha256": weights_sha256(spec, params),
        "opset": 17,
        "variant": "dense",
    }
    proto = onnx.load_from_string(model)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [17]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert read_metadata(compact_onnx(model))["variant"] == "compact"
    assert read_metadata(compact_onnx(model))["weights_sha256"] == meta["weights_sha256"]


def test_weights_sha256_is_over_float32_tensors_in_layout_order(rng):
    spec = SPECS["mlp"]
    params = init_params(spec, seed=2)
    by_hand = hashlib.sha256(b"".join(params[t.name].astype("<f4").tobytes() for t in model_layout(spec)))
    assert weights_sha256(spec, params) == by_hand.hexdigest()
    params["out.bias"][0] += 1e-6
    assert weights_sha256(spec, params) != by_hand.hexdigest()


@pytest.mark.parametrize(
    "metadata,error",
    [
        ({"federation": "f", "round": 1}, "lacks"),
        (META | {"sparsity": 0.5}, "computed by the export"),
        (META | {"tags": ["a"]}, "expected str, int or float"),
    ],
)
def test_bad_metadata_is_refused(metadata, error):
    with pytest.raises((ValueError, TypeError), match=error):
        export_onnx(SPECS["mlp"], init_params(SPECS["mlp"], 0), metadata=metadata)


def test_opset_out_of_range_is_refused():
    with pytest.raises(ValueError, match="opset"):
        export_onnx(SPECS["mlp"], init_params(SPECS["mlp"], 0), opset=11, metadata=META)


def test_compact_shrinks_with_sparsity_and_keeps_dense_models_dense(rng):
    spec = ModelSpec("mlp", (1, 8, 8), 10)
    sizes = {}
    for sparsity in (0.0, 0.8, 0.9):
        dense = export_onnx(spec, pruned_params(spec, sparsity, rng), metadata=META)
        sizes[sparsity] = (len(dense), len(compact_onnx(dense)), len(gzip.compress(dense)))
    assert abs(sizes[0.0][1] - sizes[0.0][0]) < 64  # nothing to gain: stored as it was
    assert sizes[0.9][1] < sizes[0.8][1] < 0.3 * sizes[0.0][0]
    with pytest.raises(ValueError, match="already compact"):
        compact_onnx(compact_onnx(export_onnx(spec, pruned_params(spec, 0.9, rng), metadata=META)))


def test_int8_keeps_digits_accuracy_within_one_point():
    data = load_dataset("digits", seed=0)
    spec = ModelSpec("mlp", data.input_shape, data.num_classes, args={"hidden": (128, 64)})
    params = init_params(spec, seed=0)
    layout = model_layout(spec)
    masks = {t.name: np.ones(t.shape, dtype=bool) for t in layout.masked}
    result = train_local(spec, params, masks, data.X_train, data.y_train, HyperParams(epochs=8, lr=0.05, seed=0))
    trained = {k: v + result.delta[k] if k in result.delta else v for k, v in params.items()}
    float_acc = evaluate(spec, trained, data.X_test, data.y_test).metrics["accuracy"]
    assert float_acc > 0.9
    dense = export_onnx(spec, trained, metadata=META)
    int8 = quantize_int8(dense)
    assert len(int8) < 0.4 * len(dense)
    assert read_metadata(int8)["variant"] == "int8"
    ops = {n.op_type for n in onnx.load_from_string(int8).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    onnx_acc = (run_onnx(dense, data.X_test).argmax(1) == data.y_test).mean()
    int8_acc = (run_onnx(int8, data.X_test).argmax(1) == data.y_test).mean()
    assert onnx_acc == pytest.approx(float_acc, abs=1e-9)
    assert abs(int8_acc - float_acc) <= 0.01


def test_int8_leaves_conv_in_float():
    spec = SPECS["cnn2d"]
    ops = {n.op_type for n in onnx.load_from_string(quantize_int8(export_onnx(spec, init_params(spec, 0), metadata=META))).graph.node}
    assert "Conv" in ops and "ConvInteger" not in ops


def test_release_hashes_the_onnx_bytes_and_carries_the_metadata():
    spec = SPECS["mlp"]
    model = export_onnx(spec, init_params(spec, 0), metadata=META)
    release = build_release(1, model)
    assert release.version == 1 and release.onnx == model
    assert release.metadata == read_metadata(model)
    assert build_release(2, model, {"custom": "x"}).metadata == {"custom": "x"}
