"""Model zoo: layouts are the parameter contract, init is deterministic, MACs are sparse-aware."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedprune.common.models import (
    ModelFactoryError,
    ModelSpec,
    as_model_input,
    build_model,
    count_macs,
    evaluate,
    init_params,
    load_params,
    masked_names,
    model_layout,
    output_problem,
    module_from_params,
    params_from_module,
)

SPECS = [
    ModelSpec("mlp", (1, 8, 8), 10),
    ModelSpec("mlp", (1, 40), 10, args={"hidden": (32,)}),
    ModelSpec("cnn2d", (1, 8, 8), 10),
    ModelSpec("cnn2d", (1, 8, 8), 10, args={"norm": "group"}),
    ModelSpec("cnn2d", (1, 8, 8), 10, args={"norm": "batch"}),
    ModelSpec("cnn1d", (1, 40), 10),
    ModelSpec("cnn1d", (1, 40), 10, args={"norm": "group"}),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{dict(s.args).get('norm', 'none')}")
def test_layout_lists_parameters_then_buffers_in_module_order(spec):
    module = build_model(spec)
    layout = model_layout(spec)
    expected = [(n, tuple(p.shape), True) for n, p in module.named_parameters()]
    expected += [(n, tuple(b.shape), False) for n, b in module.named_buffers()]
    assert [(t.name, t.shape, t.trainable) for t in layout] == expected
    for t in layout:
        assert t.masked == (t.trainable and t.name.endswith(".weight") and len(t.shape) >= 2)


def test_mlp_defaults_match_the_prototype_widths():
    layout = model_layout(ModelSpec("mlp", (1, 8, 8), 10))
    assert [t.shape for t in layout.masked] == [(256, 64), (128, 256), (10, 128)]
    layout = model_layout(ModelSpec("mlp", (1, 40), 10))
    assert [t.shape for t in layout.masked] == [(256, 40), (128, 256), (10, 128)]


def test_batchnorm_statistics_are_dense_untrainable_buffers():
    layout = model_layout(ModelSpec("cnn2d", (1, 8, 8), 10, args={"norm": "batch"}))
    buffers = [t for t in layout if not t.trainable]
    assert {t.name.rpartition(".")[2] for t in buffers} == {"running_mean", "running_var", "num_batches_tracked"}
    assert not any(t.masked for t in buffers)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="resnet", input_shape=(1, 8, 8), num_classes=10),
        dict(name="cnn2d", input_shape=(1, 40), num_classes=10),
        dict(name="cnn1d", input_shape=(1, 8, 8), num_classes=10),
        dict(name="mlp", input_shape=(0, 8), num_classes=10),
        dict(name="mlp", input_shape=(64,), num_classes=1),
        dict(name="mlp", input_shape=(64,), num_classes=10, args={"norm": "group"}),
        dict(name="cnn2d", input_shape=(1, 8, 8), num_classes=10, args={"norm": "layer"}),
        dict(name="cnn2d", input_shape=(1, 2, 2), num_classes=10),
        dict(name="cnn2d", input_shape=(1, 8, 8), num_classes=10, args={"channels": (8,)}),
    ],
)
def test_invalid_specs_are_rejected(kwargs):
    """At construction or, for what only the factory knows, when the model is built."""
    with pytest.raises(ValueError):
        model_layout(ModelSpec(**kwargs))


@pytest.mark.parametrize("spec", SPECS[:1] + SPECS[2:3] + SPECS[5:6], ids=lambda s: s.name)
def test_init_is_deterministic_per_seed_and_leaves_global_rng_alone(spec):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = init_params(spec, 7), init_params(spec, 7), init_params(spec, 8)
    assert torch.equal(torch.rand(1), expected_next)
    assert list(a) == list(model_layout(spec).names)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    assert all(v.dtype == np.float32 for v in a.values())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{dict(s.args).get('norm', 'none')}")
def test_params_round_trip_through_a_module(spec):
    params = init_params(spec, 3)
    module = build_model(spec)
    load_params(module, params)
    back = params_from_module(module)
    assert list(back) == list(params)
    assert all(np.array_equal(back[k], params[k]) for k in params)


def test_load_params_rejects_mismatched_names_and_shapes():
    spec = SPECS[0]
    params = init_params(spec, 0)
    module = build_model(spec)
    with pytest.raises(ValueError, match="missing"):
        load_params(module, {k: v for k, v in params.items() if k != "out.bias"})
    with pytest.raises(ValueError, match="shape"):
        load_params(module, params | {"out.bias": np.zeros(3, np.float32)})


def test_count_macs_counts_only_active_weights():
    mlp = ModelSpec("mlp", (1, 8, 8), 10)
    assert count_macs(mlp) == 64 * 256 + 256 * 128 + 128 * 10
    masks = {t.name: np.zeros(t.shape, bool) for t in model_layout(mlp).masked}
    masks["fc0.weight"][:3, :5] = True
    assert count_macs(mlp, masks) == 15
    cnn = ModelSpec("cnn2d", (1, 8, 8), 10)
    # conv0 at 8x8 positions, conv1 at 4x4 (after one 2x pooling), fc on 64*2*2 features.
    assert count_macs(cnn) == 32 * 9 * 64 + 64 * 32 * 9 * 16 + 10 * 256
    cnn1 = ModelSpec("cnn1d", (1, 40), 10)
    assert count_macs(cnn1) == 32 * 5 * 40 + 64 * 32 * 5 * 20 + 10 * 640


def test_inputs_accept_canonical_and_flat_shapes():
    spec = ModelSpec("cnn2d", (1, 8, 8), 10)
    flat = np.arange(2 * 64, dtype=np.float64).reshape(2, 64)
    shaped = as_model_input(spec, flat)
    assert shaped.shape == (2, 1, 8, 8) and shaped.dtype == np.float32
    assert as_model_input(spec, shaped).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="expects"):
        as_model_input(spec, np.zeros((2, 63)))


def test_evaluate_matches_a_direct_forward_pass(rng):
    spec = ModelSpec("cnn1d", (1, 40), 10, args={"norm": "group"})
    params = init_params(spec, 1)
    X = rng.normal(size=(37, 1, 40)).astype(np.float32)
    y = rng.integers(0, 10, size=37)
    result = evaluate(spec, params, X, y, batch_size=8)
    with torch.no_grad():
        logits = module_from_params(spec, params).eval()(torch.from_numpy(X))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).item()
    assert result.metrics["accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == y).mean()))
    assert result.loss == pytest.approx(loss, rel=1e-5)
    with pytest.raises(ValueError, match="labels"):
        evaluate(spec, params, X, np.full(37, 10))


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3], SPECS[4], SPECS[6]], ids=lambda s: f"{s.name}-{dict(s.args).get('norm', 'none')}")
def test_models_export_without_data_dependent_control_flow(spec):
    module = module_from_params(spec, init_params(spec, 0)).eval()
    x = torch.zeros((2, *spec.input_shape))
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    probe = torch.randn((5, *spec.input_shape))
    assert torch.allclose(exported.module()(probe), module(probe), atol=1e-6)


def test_a_changed_cnn_width_changes_the_layout_fingerprint():
    """Models travel by name, so the fingerprint is what makes a device on the old width reject
    a task instead of misreading it (docs/PROTOCOL.md, Versioning)."""
    for name, shape in (("cnn1d", (1, 40)), ("cnn2d", (1, 8, 8))):
        current = model_layout(ModelSpec(name, shape, 10))
        before = model_layout(ModelSpec(name, shape, 10, args={"channels": (16, 32)}))
        assert current.fingerprint() != before.fingerprint()


# ---- models by import path: every masked kind


def test_every_masked_layer_kind_is_masked_and_everything_else_stays_dense():
    gru = model_layout(ModelSpec("tests.nets:recurrent", (3, 12), 4, args={"cell": "gru"}))
    assert {t.name for t in gru.masked} == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"}
    lstm = model_layout(ModelSpec("tests.nets:recurrent", (3, 12), 4, args={"cell": "lstm"}))
    assert {t.name for t in lstm.masked} == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"}
    assert lstm["rnn.weight_hh_l0"].shape == (64, 16)
    dw = model_layout(ModelSpec("tests.nets:depthwise", (3, 8, 8), 5))
    assert {t.name for t in dw.masked} == {"0.weight", "3.weight", "6.weight", "11.weight"}
    assert dw["3.weight"].shape == (16, 1, 3, 3)  # depthwise: groups == channels
    assert not any(t.masked for t in dw if t.name.endswith("bias") or t.name.startswith(("1.", "4.", "7.")))
    tok = model_layout(ModelSpec("tests.nets:tokens", (6,), 3))
    assert {t.name for t in tok.masked} == {"embed.weight", "up.weight", "out.weight"}
    assert [t.name for t in model_layout(ModelSpec("tests.nets:head_only", (5,), 2)).masked] == ["3.weight"]


def test_erk_keeps_a_depthwise_kernel_dense_and_spends_the_budget_elsewhere():
    from fedprune.coordinator.core.masks import MIN_FAN_IN, active_counts, erk_densities

    layout = model_layout(ModelSpec("tests.nets:depthwise", (3, 8, 8), 5, args={"width": 32}))
    densities = erk_densities(layout, 0.9)
    assert densities["3.weight"] == 1.0 and math.prod(layout["3.weight"].shape[1:]) < MIN_FAN_IN
    counts = active_counts(layout, densities)
    total = sum(t.size for t in layout.masked)
    assert abs(sum(counts.values()) - 0.1 * total) <= len(counts)  # the budget holds
    assert densities["6.weight"] < 0.2


def test_macs_count_recurrent_steps_and_skip_embedding_lookups():
    gru = ModelSpec("tests.nets:recurrent", (3, 12), 4, args={"hidden": 8})
    assert count_macs(gru) == 12 * (24 * 3 + 24 * 8) + 8 * 4
    tok = ModelSpec("tests.nets:tokens", (6,), 3, args={"dim": 4})
    assert count_macs(tok) == 6 * (4 * 8 * 2) + 96 * 3  # transposed conv at each input position


@pytest.mark.parametrize("reference,args,match", [
    ("tests.nets:missing", {}, "has no attribute 'missing'"),
    ("tests.no_such_module:make", {}, "cannot import 'tests.no_such_module'"),
    ("tests.nets:not_a_module", {}, "returned str, not a torch.nn.Module"),
    ("tests.nets:explodes", {}, "RuntimeError: the factory's own bug"),
    ("tests.nets:depthwise", {"depth": 3}, "unexpected keyword argument 'depth'.*fix the model arguments"),
])
def test_a_factory_that_cannot_build_says_what_to_fix(reference, args, match):
    with pytest.raises(ModelFactoryError, match=match):
        model_layout(ModelSpec(reference, (3, 8, 8), 5, args=args))


def test_masked_names_refuses_an_override_naming_no_parameter():
    module = torch.nn.Sequential(torch.nn.Linear(4, 2))
    module.fedprune_masked = ("0.weight", "1.weight")
    with pytest.raises(ModelFactoryError, match="1.weight"):
        masked_names(module)


def test_a_model_that_ignores_the_federations_sizes_is_named_before_any_round():
    assert output_problem(ModelSpec("tests.nets:ignores_its_sizes", (10,), 3)) is None
    wrong_outputs = output_problem(ModelSpec("tests.nets:ignores_its_sizes", (10,), 5))
    assert "gives (2, 3) for 2 samples; num_classes = 5 needs (2, 5)" in wrong_outputs
    wrong_inputs = output_problem(ModelSpec("tests.nets:ignores_its_sizes", (12,), 3))
    assert "fails on samples of shape (12,): RuntimeError" in wrong_inputs
