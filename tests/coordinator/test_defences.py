"""fedprune's Byzantine defences (norm clip, direction gate, sybil check) on synthetic updates."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.coordinator.core.strategy import ClientUpdate, Strategy, StrategyConfig
from fedprune.protocol.layout import ModelLayout, TensorSpec

LAYOUT = ModelLayout((TensorSpec("fc.weight", (16, 8), True), TensorSpec("fc.bias", (16,), False)))
IDS = [f"c{i}" for i in range(10)]
HONEST_LOSSES = {0: (1.0, 50), 1: (1.0, 50)}


def _strategy(**knobs) -> tuple[Strategy, object]:
    rng = np.random.default_rng(0)
    strat = Strategy(StrategyConfig(method="fedprune", sparsity=0.0, **knobs))
    params = {s.name: np.zeros(s.shape, np.float32) for s in LAYOUT}
    return strat, strat.initial_state(LAYOUT, params, rng)


def _round(strat, state, deltas: dict[str, dict[str, np.ndarray]]):
    plan = strat.plan_round(state, list(deltas), np.random.default_rng(1))
    ups = [ClientUpdate(c, 100, d, state.masks, {}, 0.5, HONEST_LOSSES) for c, d in deltas.items()]
    return strat.finish_round(state, plan, ups)


def _honest(rng, direction, spread=0.5):
    return {k: (v + spread * rng.normal(size=v.shape)).astype(np.float32) for k, v in direction.items()}


@pytest.fixture
def direction():
    rng = np.random.default_rng(7)
    return {s.name: rng.normal(size=s.shape) for s in LAYOUT}


def test_norm_clip_bounds_a_boosted_update(direction):
    rng = np.random.default_rng(3)
    deltas = {c: _honest(rng, direction) for c in IDS}
    deltas["c9"] = {k: 100.0 * v for k, v in deltas["c9"].items()}
    unclipped = _round(*_strategy(norm_clip=0.0), deltas)
    clipped = _round(*_strategy(norm_clip=2.0), deltas)
    step = lambda res: float(np.linalg.norm(res.state.params["fc.weight"]))  # noqa: E731
    assert step(unclipped) > 5 * step(clipped)
    score = clipped.scores["c9"]
    assert score.clip_factor < 0.05 and score.update_norm * score.clip_factor == pytest.approx(
        2.0 * np.median([s.update_norm for s in clipped.scores.values()]), rel=1e-6)
    assert all(clipped.scores[c].clip_factor == 1.0 for c in IDS[:9])


def test_sybil_twins_are_left_out_but_distinct_clients_are_not(direction):
    rng = np.random.default_rng(4)
    deltas = {c: _honest(rng, direction) for c in IDS}
    poison = {k: -v for k, v in direction.items()}
    deltas["c8"] = deltas["c9"] = poison
    res = _round(*_strategy(sybil_cos=0.99), deltas)
    assert res.scores["c8"].gated_by == res.scores["c9"].gated_by == "sybil"
    assert res.scores["c8"].w == 0.0 and res.scores["c9"].w == 0.0
    assert not any(res.scores[c].gated_by for c in IDS[:8])
    assert sum(s.w for s in res.scores.values()) == pytest.approx(1.0)


def test_memory_gate_drops_a_persistent_reverser_and_keeps_an_occasional_one(direction):
    strat, state = _strategy(direction_gate="memory", trust_threshold=0.5)
    rng = np.random.default_rng(5)
    for t in range(12):
        deltas = {c: _honest(rng, direction) for c in IDS}
        deltas["c9"] = {k: -v for k, v in deltas["c9"].items()}  # every round
        if t % 4 == 0:
            deltas["c8"] = {k: -v for k, v in deltas["c8"].items()}  # one round in four
        res = _round(strat, state, deltas)
        state = res.state
    assert res.scores["c9"].gated_by == "direction" and res.scores["c9"].w == 0.0
    assert state.trust["c9"] < 0.1
    assert not res.scores["c8"].gated_by and state.trust["c8"] >= 0.5


@pytest.mark.parametrize("gamma", [0.0, 0.6, 0.9])
def test_trust_memory_is_trust_gamma_whatever_the_loss_signal_gamma(direction, gamma):
    """One reversal costs trust (1 - trust_gamma), so an honest device is not gated for it."""
    strat, state = _strategy(direction_gate="memory", gamma=gamma, trust_gamma=0.8)
    rng = np.random.default_rng(6)
    deltas = {c: _honest(rng, direction) for c in IDS}
    deltas["c8"] = {k: -v for k, v in deltas["c8"].items()}
    res = _round(strat, state, deltas)
    assert res.state.trust["c8"] == pytest.approx(0.8)
    assert not res.scores["c8"].gated_by


def test_stored_distrust_still_applies_in_a_round_too_small_to_compare(direction):
    strat, state = _strategy(direction_gate="memory")
    rng = np.random.default_rng(11)
    for _ in range(8):
        deltas = {c: _honest(rng, direction) for c in IDS}
        deltas["c9"] = {k: -v for k, v in deltas["c9"].items()}
        state = _round(strat, state, deltas).state
    assert state.trust["c9"] < 0.5
    small = _round(strat, state, {"c0": _honest(rng, direction), "c9": {k: -v for k, v in direction.items()}})
    assert small.scores["c9"].gated_by == "direction" and not small.scores["c0"].gated_by
    assert np.dot(small.state.params["fc.weight"].ravel() - state.params["fc.weight"].ravel(),
                  direction["fc.weight"].ravel()) > 0


def test_round_gate_drops_this_rounds_reversers_only(direction):
    rng = np.random.default_rng(6)
    deltas = {c: _honest(rng, direction) for c in IDS}
    deltas["c7"] = {k: -v for k, v in deltas["c7"].items()}
    res = _round(*_strategy(direction_gate="round"), deltas)
    assert [(c, s.gated_by) for c, s in res.scores.items() if s.gated_by] == [("c7", "direction")]


def test_a_gate_that_would_drop_everyone_drops_no_one(direction):
    deltas = {c: {k: v.astype(np.float32) for k, v in direction.items()} for c in IDS[:4]}
    res = _round(*_strategy(sybil_cos=0.99), deltas)
    assert res.aggregated and not any(s.gated_by for s in res.scores.values())
    assert np.allclose(res.state.params["fc.weight"], direction["fc.weight"], atol=1e-5)


def test_baselines_ignore_the_defence_knobs(direction):
    rng = np.random.default_rng(8)
    deltas = {c: _honest(rng, direction) for c in IDS}
    deltas["c9"] = {k: 100.0 * v for k, v in deltas["c9"].items()}
    strat = Strategy(StrategyConfig(method="fedavg", sparsity=0.0, norm_clip=1.0, sybil_cos=0.5))
    state = strat.initial_state(LAYOUT, {s.name: np.zeros(s.shape, np.float32) for s in LAYOUT},
                                np.random.default_rng(0))
    res = _round(strat, state, deltas)
    want = np.mean([d["fc.weight"] for d in deltas.values()], axis=0)
    assert np.allclose(res.state.params["fc.weight"], want, atol=1e-4)


def test_defence_knobs_are_validated():
    with pytest.raises(ValueError, match=r"\[strategy\] direction_gate 'always': expected one of"):
        StrategyConfig(direction_gate="always")
    with pytest.raises(ValueError, match=r"\[strategy\] norm_clip -1.0: expected a number >= 0"):
        StrategyConfig(norm_clip=-1.0)
    with pytest.raises(ValueError, match=r"\[strategy\] sybil_cos 1.5: expected a number in \[0, 1\]"):
        StrategyConfig(sybil_cos=1.5)
    with pytest.raises(ValueError, match=r"\[strategy\] centered_clip 1.0: expected 0 unless step = 'plain'"):
        StrategyConfig(centered_clip=1.0, step="normalized")


def test_centered_clip_bounds_any_one_update_and_passes_the_honest_cluster(direction):
    rng = np.random.default_rng(9)
    honest = {c: _honest(rng, direction, spread=0.05) for c in IDS}
    plain = _round(*_strategy(norm_clip=0.0, sybil_cos=0.0), honest)
    centred = _round(*_strategy(norm_clip=0.0, sybil_cos=0.0, centered_clip=2.0), honest)
    for name in ("fc.weight", "fc.bias"):  # both tensors: the flat offsets line up
        assert np.allclose(plain.state.params[name], centred.state.params[name], atol=1e-6)

    attacked = dict(honest, c9={k: -1000.0 * v for k, v in direction.items()})
    res = _round(*_strategy(norm_clip=0.0, sybil_cos=0.0, centered_clip=2.0), attacked)
    for name in ("fc.weight", "fc.bias"):
        moved = res.state.params[name] - plain.state.params[name]
        spread = max(np.linalg.norm(h[name] - direction[name]) for h in honest.values())
        assert np.linalg.norm(moved) < 3 * spread  # vs ≈ 100 × ‖direction‖ for the plain mean


def test_chance_gate_drops_pure_noise_and_keeps_skewed_but_related_clients(direction):
    rng = np.random.default_rng(10)
    other = {k: rng.normal(size=v.shape) for k, v in direction.items()}
    deltas = {c: _honest(rng, direction if i < 5 else other, spread=1.0) for i, c in enumerate(IDS)}
    deltas["c9"] = {k: rng.normal(0, 10, v.shape).astype(np.float32) for k, v in direction.items()}
    res = _round(*_strategy(chance_gate=4.0), deltas)
    assert [(c, s.gated_by) for c, s in res.scores.items() if s.gated_by] == [("c9", "chance")]
