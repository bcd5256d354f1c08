"""Masked local training: the mask holds on weights, gradients and the optimiser's moments (SGD and
AdamW); readjust invariants; regression and multi-label tasks train."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.coordinator.lab.datasets import load_dataset
from fedprune.common.models import ModelSpec, evaluate, init_params, model_layout, module_from_params
from fedprune.edge_agent.training import (
    MaskedOptimizer, first_smallest, readjust_layer, readjust_masks, resolve_device, train_local,
)
from fedprune.protocol.hyperparams import HyperParams

MLP = ModelSpec("mlp", (1, 8, 8), 10, args={"hidden": (32, 16)})


def sparse_state(spec, density, seed):
    """Init params and uniform random masks of the given density, params zeroed outside them."""
    rng = np.random.default_rng(seed)
    params = init_params(spec, seed)
    masks = {t.name: rng.random(t.shape) < density for t in model_layout(spec).masked}
    return {k: v * masks[k] if k in masks else v for k, v in params.items()}, masks


# ---- readjust_layer: the generic drop/grow step


@st.composite
def layer_states(draw):
    shape = draw(st.sampled_from([(7,), (4, 5), (3, 2, 3)]))
    mask = draw(hnp.arrays(np.bool_, shape))
    values = st.floats(-4, 4, allow_nan=False, width=32)
    weights = draw(hnp.arrays(np.float32, shape, elements=values)) * mask
    scores = np.abs(draw(hnp.arrays(np.float32, shape, elements=values)))
    fraction = draw(st.floats(0, 1))
    return torch.from_numpy(mask), torch.from_numpy(weights), torch.from_numpy(scores), fraction


@given(
    score=hnp.arrays(np.float32, st.integers(0, 40), elements=st.integers(-3, 3).map(float)),
    c=st.integers(0, 45),
)
def test_first_smallest_selects_the_first_c_of_a_stable_argsort(score, c):
    picked = first_smallest(torch.from_numpy(score), c).numpy()
    expected = np.argsort(score, kind="stable")[: max(c, 0)]
    assert sorted(picked.tolist()) == sorted(expected.tolist())


@given(layer_states())
def test_readjust_layer_preserves_nnz_and_swaps_exactly_c_positions(state):
    mask, weights, scores, fraction = state
    new = readjust_layer(mask, weights, scores, fraction)
    k, inactive = int(mask.sum()), int((~mask).sum())
    c = min(math.floor(fraction * k), inactive)
    dropped, grown = mask & ~new, new & ~mask
    assert new.dtype == torch.bool and new.shape == mask.shape
    assert int(new.sum()) == k
    assert int(dropped.sum()) == int(grown.sum()) == c
    if c:
        kept = mask & new
        assert weights[dropped].abs().max() <= weights[kept].abs().min() if kept.any() else True
        not_grown = ~mask & ~new
        if not_grown.any():
            assert scores[grown].min() >= scores[not_grown].max()


@given(layer_states())
def test_readjust_layer_breaks_ties_towards_the_lower_index(state):
    mask, _, _, fraction = state
    flat = mask.flatten()
    new = readjust_layer(mask, torch.ones(mask.shape), torch.zeros(mask.shape), fraction).flatten()
    c = int((flat & ~new).sum())
    assert torch.equal(torch.nonzero(flat & ~new).squeeze(1), torch.nonzero(flat).squeeze(1)[:c])
    assert torch.equal(torch.nonzero(new & ~flat).squeeze(1), torch.nonzero(~flat).squeeze(1)[:c])


def test_readjust_layer_drops_smallest_and_grows_largest_score():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    weights = torch.tensor([0.5, -0.1, 2.0, 0.3, 0.0, 0.0, 0.0, 0.0])
    scores = torch.tensor([9.0, 9.0, 9.0, 9.0, 0.2, 0.7, 0.1, 0.7])
    new = readjust_layer(mask, weights, scores, 0.5)
    assert new.tolist() == [True, False, True, False, False, True, False, True]


def test_readjust_masks_handles_every_layer_and_validates_fraction():
    masks = {"a": torch.tensor([True, False]), "b": torch.tensor([[True, True], [False, False]])}
    weights = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[1.0, 2.0], [0.0, 0.0]])}
    scores = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[0.0, 0.0], [1.0, 3.0]])}
    new = readjust_masks(weights, masks, scores, 1.0)
    assert new["a"].tolist() == [False, True]
    assert new["b"].tolist() == [[False, False], [True, True]]
    with pytest.raises(ValueError):
        readjust_layer(masks["a"], weights["a"], scores["a"], 1.5)


# ---- MaskedOptimizer: the mask holds on weights, gradients and the moments


def _trainer(spec, density, hp, seed=0):
    params, masks = sparse_state(spec, density, seed)
    model = module_from_params(spec, params).train()
    return MaskedOptimizer(model, {k: torch.from_numpy(v) for k, v in masks.items()}, hp, spec.task), masks


MOMENT_KEYS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}
OPTIMIZER_HP = {"sgd": dict(lr=0.1, momentum=0.9), "adamw": dict(lr=0.01, optimizer="adamw")}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_pruned_weight_and_its_moments_stay_exactly_zero(digits, optimizer):
    X, y = torch.from_numpy(digits[0]), torch.from_numpy(digits[1])
    hp = HyperParams(**OPTIMIZER_HP[optimizer], weight_decay=0.01, prox_mu=0.1)
    trainer, masks = _trainer(MLP, 0.3, hp)
    named = dict(trainer.model.named_parameters())
    bias_before = named["fc0.bias"].detach().clone()
    for step in range(30):
        trainer.step(X[step * 6 : step * 6 + 16], y[step * 6 : step * 6 + 16])
    for name, mask in masks.items():
        inside = torch.from_numpy(mask)
        assert torch.all(named[name].detach()[~inside] == 0)
        assert torch.any(named[name].detach()[inside] != 0)
        moments = trainer.moments(name)
        assert set(moments) == set(MOMENT_KEYS[optimizer])
        for moment in moments.values():
            assert torch.all(moment[~inside] == 0) and torch.any(moment[inside] != 0)
    assert not torch.equal(named["fc0.bias"].detach(), bias_before)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_sparse_layer_steps_by_min_of_inverse_density_and_the_cap(digits, optimizer):
    """One plain step: masked tensors move min(1/d, cap) times as far, the rest as before (AdamW's
    step per weight is scale-free, but its output still moves ∝ d: the same rule)."""
    X, y = torch.from_numpy(digits[0][:16]), torch.from_numpy(digits[1][:16])
    moves = {}
    for cap in (1.0, 3.0, 1000.0):
        trainer, masks = _trainer(MLP, 0.3, HyperParams(lr=0.01, momentum=0.0, weight_decay=0.0,
                                                        max_sparse_lr_factor=cap, optimizer=optimizer))
        named = dict(trainer.model.named_parameters())
        before = {k: p.detach().clone() for k, p in named.items()}
        trainer.step(X, y)
        moves[cap] = {k: named[k].detach() - before[k] for k in named}
    for name, p in moves[1.0].items():
        density = masks[name].mean() if name in masks else 1.0
        for cap in (3.0, 1000.0):
            expected = min(1.0 / density, cap) if name in masks else 1.0
            assert torch.allclose(moves[cap][name], expected * p, rtol=1e-4, atol=1e-7), (name, cap)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_readjust_zeroes_weights_and_moments_where_the_mask_changed(digits, optimizer):
    X, y = torch.from_numpy(digits[0]), torch.from_numpy(digits[1])
    trainer, masks = _trainer(MLP, 0.3, HyperParams(**OPTIMIZER_HP[optimizer]))
    for step in range(5):
        trainer.step(X[step * 16 : step * 16 + 16], y[step * 16 : step * 16 + 16])
    named = dict(trainer.model.named_parameters())
    before = {name: named[name].detach().clone() for name in masks}
    trainer.readjust(X[:32], y[:32], 0.4, "gradient", torch.Generator().manual_seed(0))
    for name, old in masks.items():
        old, new = torch.from_numpy(old), trainer.masks[name]
        changed = old ^ new
        grown, kept = new & ~old, new & old
        assert int(new.sum()) == int(old.sum()) and changed.any()
        assert torch.all(named[name].detach()[changed] == 0)
        for moment in trainer.moments(name).values():
            assert torch.all(moment[changed] == 0) and torch.all(moment[~new] == 0)
        assert torch.equal(named[name].detach()[kept], before[name][kept])
        assert torch.all(before[name][grown] == 0)
        assert all(torch.any(m[kept] != 0) for m in trainer.moments(name).values())
    for step in range(5):  # the new mask holds on the moments from here on; grown positions train
        trainer.step(X[step * 16 : step * 16 + 16], y[step * 16 : step * 16 + 16])
    for name, old in masks.items():
        new, grown = trainer.masks[name], trainer.masks[name] & ~torch.from_numpy(old)
        assert torch.all(named[name].detach()[~new] == 0) and torch.any(named[name].detach()[grown] != 0)
        for moment in trainer.moments(name).values():
            assert torch.all(moment[~new] == 0) and torch.any(moment[grown] != 0)


def test_gradient_growth_picks_the_largest_dense_gradient(digits):
    X, y = torch.from_numpy(digits[0][:32]), torch.from_numpy(digits[1][:32])
    trainer, masks = _trainer(MLP, 0.3, HyperParams(lr=0.1))
    model = trainer.model
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(X), y).backward()
    grad = {name: p.grad.abs().clone() for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if name in masks}
    expected = readjust_masks(weights, {k: torch.from_numpy(v) for k, v in masks.items()}, grad, 0.25)
    trainer.readjust(X, y, 0.25, "gradient", torch.Generator().manual_seed(0))
    assert all(torch.equal(trainer.masks[k], expected[k]) for k in masks)
    # the gradient was dense: growth did not fall back to the lowest inactive indices
    lowest = readjust_masks(weights, {k: torch.from_numpy(v) for k, v in masks.items()},
                            {k: torch.zeros_like(g) for k, g in grad.items()}, 0.25)
    assert any(not torch.equal(trainer.masks[k], lowest[k]) for k in masks)


# ---- train_local


@pytest.mark.parametrize("hp,plain", [
    (HyperParams(epochs=3, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4),
     lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)),
    (HyperParams(epochs=3, batch_size=64, lr=0.003, weight_decay=0.01, optimizer="adamw"),
     lambda params: torch.optim.AdamW(params, lr=0.003, betas=(0.9, 0.999), weight_decay=0.01)),
], ids=["sgd", "adamw"])
def test_train_local_matches_the_plain_torch_optimiser_when_the_mask_is_full(digits, hp, plain):
    X, y = digits[0][:64], digits[1][:64]
    params = init_params(MLP, 0)
    masks = {t.name: np.ones(t.shape, bool) for t in model_layout(MLP).masked}
    result = train_local(MLP, params, masks, X, y, hp)
    model = module_from_params(MLP, params).train()
    opt = plain(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y)).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert np.allclose(params[name] + result.delta[name], p.detach().numpy(), atol=1e-5)
    assert result.steps == 3 and not result.mask_changed
    assert any(np.any(d != 0) for d in result.delta.values())


def test_delta_is_zero_outside_the_mask_and_dense_tensors_train(digits):
    params, masks = sparse_state(MLP, 0.2, 1)
    result = train_local(MLP, params, masks, *digits, HyperParams(epochs=2, batch_size=16))
    assert list(result.delta) == list(params)
    assert result.buffers == {} and result.steps == 2 * math.ceil(200 / 16) and result.n_examples == 200
    for name, mask in masks.items():
        assert np.all(result.delta[name][~mask] == 0) and np.any(result.delta[name][mask] != 0)
        assert np.array_equal(result.masks[name], mask)
    assert np.any(result.delta["fc0.bias"] != 0) and np.any(result.delta["out.bias"] != 0)
    assert result.delta["fc0.weight"].dtype == np.float32
    assert math.isfinite(result.train_loss) and result.flops > 0


@pytest.mark.parametrize("growth, optimizer", [("gradient", "sgd"), ("random", "sgd"), ("gradient", "adamw")])
def test_readjust_round_keeps_nnz_and_is_deterministic_per_seed(digits, growth, optimizer):
    params, masks = sparse_state(MLP, 0.2, 2)
    lr = 0.01 if optimizer == "adamw" else 0.05
    hp = HyperParams(epochs=2, batch_size=32, readjust=True, prune_fraction=0.3, growth=growth, seed=5, lr=lr,
                     optimizer=optimizer)
    a = train_local(MLP, params, masks, *digits, hp)
    b = train_local(MLP, params, masks, *digits, hp)
    assert a.mask_changed
    for name, mask in masks.items():
        assert a.masks[name].sum() == mask.sum()
        assert (a.masks[name] & ~mask).sum() == math.floor(0.3 * mask.sum())
        assert np.array_equal(a.masks[name], b.masks[name])
        assert np.array_equal(a.delta[name], b.delta[name])
        assert np.all(a.delta[name][~a.masks[name]] == 0)
        # grown positions were pruned in theta^t (value 0), so their delta is their trained value
        grown = a.masks[name] & ~mask
        assert np.all(params[name][grown] == 0) and np.any(a.delta[name][grown] != 0)
    c = train_local(MLP, params, masks, *digits, HyperParams(**{**hp.to_dict(), "seed": 6}))
    assert any(not np.array_equal(a.masks[k], c.masks[k]) for k in masks)


def test_growth_at_the_last_step_uploads_grown_weights_as_zero(digits):
    # K = 1: the readjust point ceil(K/2) falls after the only step, on the next local batch.
    params, masks = sparse_state(MLP, 0.2, 3)
    hp = HyperParams(epochs=1, batch_size=200, readjust=True, prune_fraction=0.5)
    result = train_local(MLP, params, masks, *digits, hp)
    assert result.steps == 1 and result.mask_changed
    for name, mask in masks.items():
        grown = result.masks[name] & ~mask
        assert grown.sum() == math.floor(0.5 * mask.sum())
        assert np.all(result.delta[name][grown] == 0)


def test_random_growth_differs_from_gradient_growth(digits):
    params, masks = sparse_state(MLP, 0.2, 4)
    hp = dict(epochs=1, batch_size=50, readjust=True, prune_fraction=0.3)
    grad = train_local(MLP, params, masks, *digits, HyperParams(**hp, growth="gradient"))
    rand = train_local(MLP, params, masks, *digits, HyperParams(**hp, growth="random"))
    assert any(not np.array_equal(grad.masks[k], rand.masks[k]) for k in masks)


def test_class_losses_are_the_received_models_per_class_cross_entropy(digits):
    X, y = digits
    params, masks = sparse_state(MLP, 0.5, 5)
    result = train_local(MLP, params, masks, X, y, HyperParams(epochs=1))
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(
            module_from_params(MLP, params).eval()(torch.from_numpy(X)), torch.from_numpy(y), reduction="none"
        ).numpy()
    assert set(result.class_losses) == set(np.unique(y).tolist())
    for c, (mean, count) in result.class_losses.items():
        assert count == int((y == c).sum())
        assert mean == pytest.approx(float(losses[y == c].mean()), rel=1e-5)


def test_fedprox_pulls_the_update_towards_theta_t(digits):
    params, masks = sparse_state(MLP, 0.5, 6)
    plain = train_local(MLP, params, masks, *digits, HyperParams(epochs=2))
    prox = train_local(MLP, params, masks, *digits, HyperParams(epochs=2, prox_mu=5.0))
    norm = lambda r: math.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in r.delta.values()))  # noqa: E731
    assert norm(prox) < 0.8 * norm(plain)


def test_batchnorm_statistics_come_back_as_buffers_not_deltas(digits):
    spec = ModelSpec("cnn2d", (1, 8, 8), 10, args={"norm": "batch"})
    params, masks = sparse_state(spec, 0.5, 7)
    result = train_local(spec, params, masks, *digits, HyperParams(epochs=1))
    buffer_names = [t.name for t in model_layout(spec) if not t.trainable]
    assert list(result.buffers) == buffer_names and not set(buffer_names) & set(result.delta)
    assert result.buffers["norm0.num_batches_tracked"] == result.steps
    assert not np.array_equal(result.buffers["norm0.running_mean"], params["norm0.running_mean"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, m, y: (p | {"fc0.weight": np.ones_like(p["fc0.weight"])}, m, y), "outside the mask"),
        (lambda p, m, y: (p, {k: v for k, v in m.items() if k != "out.weight"}, y), "masks must cover"),
        (lambda p, m, y: (p, m | {"out.weight": m["out.weight"].astype(np.uint8)}, y), "expected bool"),
        (lambda p, m, y: ({k: v for k, v in p.items() if k != "out.bias"}, m, y), "missing"),
        (lambda p, m, y: (p, m, np.full_like(y, 10)), "labels"),
        (lambda p, m, y: (p, m, y[:0]), "y must be 1-D"),
    ],
)
def test_bad_inputs_raise_value_errors(digits, change, message):
    params, masks = sparse_state(MLP, 0.5, 8)
    params, masks, y = change(params, masks, digits[1])
    with pytest.raises(ValueError, match=message):
        train_local(MLP, params, masks, digits[0], y, HyperParams())


@pytest.mark.parametrize(
    "dataset, spec, n, epochs, floor",
    [
        ("digits", ModelSpec("mlp", (1, 8, 8), 10), 400, 5, 0.75),
        ("digits", ModelSpec("cnn2d", (1, 8, 8), 10, args={"norm": "group"}), 400, 5, 0.75),
        ("mnist1d", ModelSpec("mlp", (1, 40), 10), 1000, 5, 0.25),
        ("mnist1d", ModelSpec("cnn1d", (1, 40), 10, args={"norm": "group"}), 1000, 5, 0.35),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_builtin_models_learn_well_above_chance(dataset, spec, n, epochs, floor):
    ds = load_dataset(dataset, 0)
    params, masks = sparse_state(spec, 1.0, 0)
    hp = HyperParams(epochs=epochs, batch_size=32, readjust=True, prune_fraction=0.2)
    result = train_local(spec, params, masks, ds.X_train[:n], ds.y_train[:n], hp)
    trained = {k: v + result.delta.get(k, 0) for k, v in params.items()}
    assert evaluate(spec, trained, ds.X_test, ds.y_test).metrics["accuracy"] > floor


def _synthetic(task, n=400, k=3, seed=0):
    """Learnable targets from 8 Gaussian features: a standardised non-linear regression, or labels
    that a random linear map's sign decides."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 8)).astype(np.float32)
    W = rng.standard_normal((8, k))
    if task == "regression":
        y = np.tanh(X @ W) + 0.3 * X[:, :k] ** 2
        return X, ((y - y.mean(0)) / y.std(0)).astype(np.float32)
    return X, (X @ W > 0.3).astype(np.int64)


@pytest.mark.parametrize("task, optimizer", [("regression", "sgd"), ("regression", "adamw"),
                                             ("multilabel", "sgd"), ("multilabel", "adamw")])
def test_regression_and_multilabel_training_reduce_the_loss(task, optimizer):
    from fedprune.common.objectives import evaluate as evaluate_task

    spec = ModelSpec("mlp", (8,), 3, args={"hidden": (32,)}, task=task)
    X, y = _synthetic(task)
    params, masks = sparse_state(spec, 0.5, 0)
    lr = 0.01 if optimizer == "adamw" else 0.05
    hp = HyperParams(epochs=10, batch_size=16, lr=lr, optimizer=optimizer, readjust=True, prune_fraction=0.2)
    result = train_local(spec, params, masks, X, y, hp)
    trained = {k: v + result.delta.get(k, 0) for k, v in params.items()}
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.float32))
    before = evaluate_task(task, module_from_params(spec, params), Xt, yt)
    after = evaluate_task(task, module_from_params(spec, trained), Xt, yt)
    assert after.loss < 0.5 * before.loss and after.score > before.score
    assert math.isfinite(result.train_loss) and result.mask_changed
    for name, mask in result.masks.items():
        assert mask.sum() == masks[name].sum() and np.all(result.delta[name][~mask] == 0)
    groups = range(4 * 3) if task == "regression" else range(3)
    assert result.class_losses and set(result.class_losses) <= set(groups)


def test_the_optimizer_is_validated_where_an_operator_sets_it():
    from fedprune.coordinator.core.config import StrategyConfig

    with pytest.raises(ValueError, match="optimizer='adam': expected one of"):
        HyperParams(optimizer="adam")
    with pytest.raises(ValueError, match=r"\[strategy.local\] optimizer='adam'"):
        StrategyConfig.from_dict({"local": {"optimizer": "adam"}})
    local = StrategyConfig.from_dict({"local": {"optimizer": "adamw", "lr": 0.001}}).local
    assert local.optimizer == "adamw" and local.batch_size == 16  # the other keys keep [strategy]'s defaults


def test_class_losses_leave_out_classes_whose_loss_overflowed():
    """A diverged global model must not make an honest device send NaN (the protocol refuses it)."""
    from torch import nn

    from fedprune.common.objectives import group_losses

    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(float("inf"))
    X = torch.ones(6, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert group_losses("classification", model, X, y, 3) == {}
    with torch.no_grad():
        model.weight.fill_(0.1)
    assert set(group_losses("classification", model, X, y, 3)) == {0, 1, 2}


def test_auto_device_is_the_cpu_without_a_gpu_and_cuda_without_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == "cuda"



@pytest.mark.parametrize("spec,X_shape", [
    (ModelSpec("tests.nets:recurrent", (3, 12), 4, args={"cell": "gru"}), (3, 12)),
    (ModelSpec("tests.nets:recurrent", (3, 12), 4, args={"cell": "lstm"}), (3, 12)),
    (ModelSpec("tests.nets:depthwise", (3, 8, 8), 4), (3, 8, 8)),
    (ModelSpec("tests.nets:tokens", (6,), 4), (6,)),
], ids=["gru", "lstm", "depthwise", "embedding"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_masked_layer_kind_trains_and_readjusts_inside_its_mask(spec, X_shape, optimizer):
    rng = np.random.default_rng(3)
    X = rng.integers(0, 32, size=(96, *X_shape)).astype(np.float32) if spec.name.endswith("tokens") else \
        rng.standard_normal((96, *X_shape)).astype(np.float32)
    y = rng.integers(0, 4, size=96)
    params, masks = sparse_state(spec, 0.3, 5)
    hp = HyperParams(epochs=2, batch_size=16, lr=0.01 if optimizer == "adamw" else 0.05, readjust=True,
                     prune_fraction=0.3, optimizer=optimizer)
    result = train_local(spec, params, masks, X, y, hp)
    assert result.mask_changed
    for name, mask in masks.items():
        assert result.masks[name].sum() == mask.sum(), name  # readjust keeps each layer's count
        assert not np.any(result.delta[name][~result.masks[name]]), name
    trained = {k: v + result.delta.get(k, 0) for k, v in params.items()}
    assert all(np.isfinite(v).all() for v in trained.values())
    assert any(np.any(result.delta[n]) for n in masks)
