"""Strategy end to end on synthetic updates: baselines through one code path, scores, masks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedprune.coordinator.core.strategy import ClientUpdate, Strategy, StrategyConfig
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.layout import ModelLayout, TensorSpec

LAYOUT = ModelLayout((
    TensorSpec("fc.weight", (32, 16), True),
    TensorSpec("fc.bias", (32,), False),
    TensorSpec("out.weight", (4, 32), True),
    TensorSpec("out.bias", (4,), False),
    TensorSpec("bn.running_mean", (4,), False, trainable=False),
))
IDS = [f"c{i}" for i in range(6)]


def _params(rng):
    return {s.name: rng.normal(0, 0.1, s.shape).astype(np.float32) for s in LAYOUT}


def _update(cid, masks, delta, n=100, losses=None, buf=0.0):
    return ClientUpdate(cid, n, delta, masks, {"bn.running_mean": np.full(4, buf, np.float32)}, 0.5,
                        losses if losses is not None else {0: (1.0, 50), 1: (1.0, 50)})


def _delta(masks, direction, scale=1.0):
    return {s.name: (direction[s.name] * scale * (masks[s.name] if s.masked else 1)).astype(np.float32)
            for s in LAYOUT if s.trainable}


def _run(cfg, rng, rounds, make):
    strat = Strategy(cfg)
    state = strat.initial_state(LAYOUT, _params(rng), rng)
    res = None
    for _ in range(rounds):
        plan = strat.plan_round(state, IDS, rng)
        res = strat.finish_round(state, plan, [make(c, plan.masks_for(c, state), plan) for c in plan.selected])
        state = res.state
    return state, res


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"\[strategy\] method 'fedsgd': expected one of 'fedavg'"):
        StrategyConfig(method="fedsgd")
    with pytest.raises(ValueError, match=r"\[strategy\] gamma"):
        StrategyConfig(gamma=1.0)
    with pytest.raises(ValueError, match=r"\[strategy\] trust_gamma -0.1: expected a number in \[0, 1\)"):
        StrategyConfig(trust_gamma=-0.1)
    with pytest.raises(ValueError, match=r"\[strategy\] unknown keys \['gama'\]"):
        StrategyConfig.from_dict({"gama": 0.5})
    with pytest.raises(ValueError, match=r"\[strategy.local\] epochs"):
        StrategyConfig.from_dict({"local": {"epochs": 0}})
    with pytest.raises(ValueError, match=r"\[strategy\] sparsity 0.0: expected a sparsity > 0 for method 'feddst'"):
        StrategyConfig(method="feddst", sparsity=0.0)
    with pytest.raises(ValueError, match=r"\[strategy\] loss_reduce 'max'"):
        StrategyConfig(loss_reduce="max")
    with pytest.raises(ValueError, match=r"\[strategy\] loss_max_share 0.0: expected a number in \(0, 1\]"):
        StrategyConfig(loss_max_share=0.0)
    with pytest.raises(ValueError, match=r"\[strategy\] loss_full 5.0: expected a number below loss_zero"):
        StrategyConfig(loss_full=5.0)
    with pytest.raises(ValueError, match=r"\[strategy\] rounds '5': expected an int >= 1"):
        StrategyConfig(rounds="5")
    assert StrategyConfig.from_dict({"local": {"lr": 0.1}, "dense_layers": ["fc.weight"]}).local.lr == 0.1


@pytest.mark.parametrize("table", [{"quality": "cosine"}, {"quality": "z"}, {"quality": "loss_z"}, {"step": "cgsv"},
                                   {"contribution": "cgsv"}, {"cgsv_step": 0.5}])
def test_the_removed_cosine_and_cgsv_variants_are_refused(table):
    with pytest.raises(ValueError, match=r"expected one of|unknown keys"):
        StrategyConfig.from_dict(table)


def test_a_local_table_overrides_only_the_keys_it_names():
    local = StrategyConfig.from_dict({"local": {"epochs": 3}}).local
    assert local == replace(StrategyConfig().local, epochs=3)
    assert (local.batch_size, local.max_sparse_lr_factor) == (16, 5.0)


@pytest.mark.parametrize("method", ["fedavg", "feddst", "fedprune", "median", "trimmed_mean", "krum"])
def test_identical_updates_reduce_to_plain_averaging(method, rng):
    direction = {s.name: rng.normal(size=s.shape) for s in LAYOUT if s.trainable}
    strat = Strategy(StrategyConfig(method=method, sparsity=0.5, p0=0.0 if method != "feddst" else 0.5))
    state = strat.initial_state(LAYOUT, _params(rng), rng)
    plan = strat.plan_round(state, IDS, rng)
    res = strat.finish_round(state, plan, [_update(c, state.masks, _delta(state.masks, direction), buf=1.0)
                                           for c in plan.selected])
    assert res.aggregated and res.n_valid == 6
    for s in LAYOUT:
        if s.trainable:
            want = state.params[s.name] + _delta(state.masks, direction)[s.name]
            assert np.allclose(res.state.params[s.name], want, atol=1e-5)
    assert np.allclose(res.state.params["bn.running_mean"], 1.0)
    assert sum(sc.r for sc in res.scores.values()) == pytest.approx(1.0)


def test_the_cosine_psi_is_logged_but_not_weighted_by(rng):
    """The thesis's cosine rule is measured and logged, not the default: a sign-flipped client with
    honest-looking losses gets a negative psi and keeps its data share as weight."""
    base = {s.name: rng.normal(size=s.shape) for s in LAYOUT if s.trainable}

    def make(cid, masks, plan):
        noise = {k: v + 0.3 * rng.normal(size=v.shape) for k, v in base.items()}
        return _update(cid, masks, _delta(masks, noise, -1.0 if cid == "c5" else 1.0))

    _, res = _run(StrategyConfig(method="fedprune", sparsity=0.5, p0=0.0, gamma=0.5), rng, 3, make)
    assert res.scores["c5"].psi < -0.5 and min(res.scores[c].psi for c in IDS[:5]) > 0.5
    assert all(s.w == pytest.approx(1 / 6) and s.q == 1.0 for s in res.scores.values())
    assert sum(s.r for s in res.scores.values()) == pytest.approx(1.0)


def test_loss_signal_down_weights_clients_with_bad_labels(rng):
    base = {s.name: rng.normal(size=s.shape) for s in LAYOUT if s.trainable}

    def make(cid, masks, plan):
        losses = {0: (6.0, 50), 1: (6.0, 50)} if cid == "c0" else {0: (1.0, 50), 1: (1.2, 50)}
        return _update(cid, masks, _delta(masks, base), losses=losses)

    _, res = _run(StrategyConfig(method="fedprune", quality="loss", gamma=0.5), rng, 10, make)
    assert res.scores["c0"].q < 0.01 and min(res.scores[c].q for c in IDS[1:]) == 1.0


@pytest.mark.parametrize("max_share, kept", [(StrategyConfig().loss_max_share, True), (1.0, False)])
def test_a_clean_client_holding_most_of_a_class_keeps_its_weight_by_default(rng, max_share, kept):
    """c0 holds 60 of the 70 class-3 samples and the model fits them worse than the others' few
    (ALGORITHM_NOTES §6): by default that class is no evidence against it; counted, it excludes c0."""
    base = {s.name: rng.normal(size=s.shape) for s in LAYOUT if s.trainable}

    def make(cid, masks, plan):
        losses = {0: (1.0, 50), 3: (3.0, 60)} if cid == "c0" else {0: (1.0, 50), 3: (0.3, 2)}
        return _update(cid, masks, _delta(masks, base), losses=losses)

    _, res = _run(StrategyConfig(method="fedprune", gamma=0.5, loss_max_share=max_share), rng, 10, make)
    assert res.scores["c0"].q == 1.0 if kept else res.scores["c0"].q < 0.1
    assert min(res.scores[c].q for c in IDS[1:]) == 1.0


def test_zero_and_invalid_updates_are_rejected_without_nan(rng):
    strat = Strategy(StrategyConfig(method="fedprune", quality="none"))
    state = strat.initial_state(LAYOUT, _params(rng), rng)
    plan = strat.plan_round(state, IDS[:3], rng)
    zero = {s.name: np.zeros(s.shape, np.float32) for s in LAYOUT if s.trainable}
    bad = dict(zero, **{"fc.bias": np.full(32, np.nan, np.float32)})
    good = _delta(state.masks, {s.name: rng.normal(size=s.shape) for s in LAYOUT if s.trainable})
    ups = [_update("c0", state.masks, zero), _update("c1", state.masks, bad), _update("c2", state.masks, good),
           _update("c2", state.masks, good), _update("zz", state.masks, good)]
    res = strat.finish_round(state, plan, ups)
    assert res.rejected == {"c0": "zero_update", "c1": "bad_tensor", "zz": "not_selected"} or \
        res.rejected == {"c0": "zero_update", "c1": "bad_tensor", "c2": "duplicate", "zz": "not_selected"}
    assert res.n_valid == 1 and res.scores["c2"].w == 1.0 and res.scores["c2"].psi is None
    assert all(np.all(np.isfinite(v)) for v in res.state.params.values())
    none = strat.finish_round(state, plan, [_update("c0", state.masks, zero)])
    assert not none.aggregated and none.state.round == state.round + 1
    assert none.state.params is state.params and none.state.masks is state.masks


def test_new_clients_start_neutral(rng):
    strat = Strategy(StrategyConfig(method="fedprune", quality="loss", gamma=0.5))
    state = strat.initial_state(LAYOUT, _params(rng), rng)
    direction = {s.name: rng.normal(size=s.shape) for s in LAYOUT if s.trainable}
    for ids in (IDS[:3], IDS[:4]):
        plan = strat.plan_round(state, ids, rng)
        losses = lambda c: {0: (8.0, 10)} if c == "c0" else {0: (1.0, 10)}
        res = strat.finish_round(state, plan, [_update(c, state.masks, _delta(state.masks, direction), losses=losses(c))
                                               for c in plan.selected])
        if ids == IDS[:3]:
            prev_q = dict(res.state.quality)
        state = res.state
    assert prev_q["c0"] == pytest.approx(0.5)
    # c3 joined with the mean q of the known clients, then observed x = 1.
    expected_start = np.mean(list(prev_q.values()))
    assert state.quality["c3"] == pytest.approx(0.5 * expected_start + 0.5)


def test_sparse_aggregation_on_readjust_round_keeps_k_and_abstains(rng):
    cfg = StrategyConfig(method="feddst", sparsity=0.75, p0=0.5, delta_t=1, t_end=10)
    strat = Strategy(cfg)
    state = strat.initial_state(LAYOUT, _params(rng), rng)
    plan = strat.plan_round(state, IDS[:2], rng)
    assert plan.readjust and plan.p_t > 0
    m0 = state.masks["fc.weight"].ravel()
    active = np.flatnonzero(m0)
    inactive = np.flatnonzero(~m0)
    ups = []
    for i, cid in enumerate(plan.selected):
        m = m0.copy()
        m[active[i]] = False  # each client drops a different weight and grows a different one
        m[inactive[i]] = True
        masks = dict(state.masks, **{"fc.weight": m.reshape(32, 16)})
        delta = _delta(masks, {s.name: np.ones(s.shape) for s in LAYOUT if s.trainable}, 0.01)
        delta["fc.weight"] = np.where(masks["fc.weight"], 0.01, 0).astype(np.float32)
        delta["fc.weight"].ravel()[inactive[i]] = 10.0  # a grown weight that trained to a large value
        ups.append(_update(cid, masks, delta))
    res = strat.finish_round(state, plan, ups)
    new = res.state.masks["fc.weight"].ravel()
    assert new.sum() == state.counts["fc.weight"]
    theta = res.state.params["fc.weight"].ravel()
    # The dropped weight of client 0 keeps client 1's update (abstention, not a pull to 0).
    old = state.params["fc.weight"].ravel()
    assert theta[active[0]] == pytest.approx(old[active[0]] + 0.01, abs=1e-6) or not new[active[0]]
    assert new[inactive[0]] and new[inactive[1]] and theta[inactive[0]] == pytest.approx(10.0)
    assert np.all(theta[~new] == 0.0) and res.state.mask_version == 1 and res.mask_churn > 0


def test_dense_fedavg_plain_step_equals_weighted_model_average(rng):
    strat = Strategy(StrategyConfig(method="fedavg", sparsity=0.0))
    state = strat.initial_state(LAYOUT, _params(rng), rng)
    plan = strat.plan_round(state, IDS[:3], rng)
    deltas = [{s.name: rng.normal(size=s.shape).astype(np.float32) for s in LAYOUT if s.trainable} for _ in range(3)]
    sizes = [10, 30, 60]
    res = strat.finish_round(state, plan, [_update(c, state.masks, d, n=n) for c, d, n in zip(IDS, deltas, sizes)])
    for name in ("fc.weight", "out.bias"):
        want = sum(n / 100 * (state.params[name] + d[name]) for d, n in zip(deltas, sizes))
        assert np.allclose(res.state.params[name], want, atol=1e-5)


def test_adaptive_density_gives_low_quality_clients_nested_submasks(rng):
    cfg = StrategyConfig(method="fedprune", adaptive_density=True, delta_t=1, rho_min=0.5)
    strat = Strategy(cfg)
    state = strat.initial_state(LAYOUT, _params(rng), rng)
    from dataclasses import replace
    state = replace(state, round=5, quality={"c0": 0.01, "c1": 1.0, "c2": 1.0})
    plan = strat.plan_round(state, IDS[:3], rng)
    assert plan.keep_fraction["c0"] == 0.5 and plan.keep_fraction["c1"] == 1.0
    sub = plan.masks_for("c0", state)
    for name, m in state.masks.items():
        assert np.all(sub[name] <= m) and sub[name].sum() == int(np.ceil(0.5 * m.sum()))


@settings(max_examples=25)
@given(st.lists(st.floats(0.0, 5.0), min_size=2, max_size=6), st.integers(0, 2**31))
def test_weights_and_importance_stay_normalised(losses, seed):
    rng = np.random.default_rng(seed)
    strat = Strategy(StrategyConfig(method="fedprune", quality="loss", gamma=0.3))
    state = strat.initial_state(LAYOUT, _params(rng), rng)
    ids = IDS[: len(losses)]
    plan = strat.plan_round(state, ids, rng)
    ups = [_update(c, state.masks, _delta(state.masks, {s.name: rng.normal(size=s.shape) for s in LAYOUT}),
                   n=int(rng.integers(1, 500)), losses={0: (l, 5)}) for c, l in zip(plan.selected, losses)]
    res = strat.finish_round(state, plan, ups)
    assert sum(s.w for s in res.scores.values()) == pytest.approx(1.0)
    assert sum(s.r for s in res.scores.values()) == pytest.approx(1.0)
    assert all(np.all(np.isfinite(v)) for v in res.state.params.values())


def test_per_client_seeds_differ_and_are_stable(rng):
    strat = Strategy(StrategyConfig(local=HyperParams(seed=0)))
    state = strat.initial_state(LAYOUT, _params(rng), rng)
    plan = strat.plan_round(state, IDS, rng)
    assert plan.hyper.for_device("c0").seed != plan.hyper.for_device("c1").seed  # each device mixes in its id
    assert plan.hyper.for_device("c0") == plan.hyper.for_device("c0")
