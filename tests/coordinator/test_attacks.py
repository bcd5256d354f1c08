"""The simulator's Byzantine clients: each attack sends what coordinator/lab/attacks.py promises."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedprune.coordinator.lab import attacks
from fedprune.coordinator.lab.simulate import SimulationConfig, run_simulation
from fedprune.coordinator.core.strategy import StrategyConfig
from fedprune.common.configkit import ConfigError


@pytest.fixture
def honest():
    rng = np.random.default_rng(0)
    mask = rng.random((8, 4)) < 0.5
    delta = {"w": np.where(mask, rng.normal(size=(8, 4)), 0.0).astype(np.float32),
             "b": rng.normal(size=4).astype(np.float32)}
    return delta, {"w": mask}


@pytest.mark.parametrize("kind", [k for k in attacks.ATTACKS])
def test_every_attack_keeps_shapes_dtypes_and_the_mask(kind, honest):
    delta, masks = honest
    step = {"w": np.ones((8, 4), np.float32), "b": np.ones(4, np.float32)}
    out = attacks.poison(kind, delta, masks, np.random.default_rng(1), 10.0, step) if kind != "collude" else \
        attacks.collude([delta, delta], [masks, masks])[0]
    for k, v in delta.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
    assert not np.any(out["w"][~masks["w"]])


def test_attack_values(honest):
    delta, masks = honest
    rng = np.random.default_rng(2)
    flipped = attacks.poison("sign_flip", delta, masks, rng, 10.0, None)
    assert all(np.array_equal(flipped[k], -delta[k]) for k in delta)
    scaled = attacks.poison("scaled", delta, masks, rng, 10.0, None)
    assert all(np.allclose(scaled[k], 10 * delta[k]) for k in delta)
    zero = attacks.poison("free_rider_zero", delta, masks, rng, 10.0, None)
    assert all(not np.any(v) for v in zero.values())
    step = {"w": np.full((8, 4), 0.5, np.float32), "b": np.full(4, 0.5, np.float32)}
    stale = attacks.poison("free_rider_stale", delta, masks, rng, 10.0, step)
    assert np.array_equal(stale["w"], np.where(masks["w"], 0.5, 0.0)) and np.all(stale["b"] == 0.5)
    assert all(not np.any(v) for v in attacks.poison("free_rider_stale", delta, masks, rng, 10.0, None).values())
    big = {"w": np.where(masks["w"], 1.0, 0.0).astype(np.float32), "b": np.ones(4, np.float32)}
    noise = attacks.poison("gaussian", big, masks, np.random.default_rng(3), 10.0, None)
    held = np.concatenate([noise["w"][masks["w"]], noise["b"]])
    assert 7.0 < held.std() < 13.0  # σ = 10 × RMS(honest) = 10 on held positions


def test_colluders_send_one_identical_reversal(honest):
    delta, masks = honest
    other = {k: 2 * v for k, v in delta.items()}
    a, b = attacks.collude([delta, other], [masks, masks])
    assert all(np.array_equal(a[k], b[k]) for k in delta)
    assert np.allclose(a["b"], -1.5 * delta["b"])


def test_label_flip_maps_every_class_away():
    y = np.arange(10).repeat(3)
    flipped = attacks.flip_labels(y, 10)
    assert np.all(flipped == 9 - y) and flipped.dtype == y.dtype


def test_unknown_attack_is_refused(honest):
    with pytest.raises(ValueError, match="attack 'ddos'"):
        attacks.poison("ddos", *honest, np.random.default_rng(0), 10.0, None)
    with pytest.raises(ConfigError, match="attack"):
        SimulationConfig(attack="ddos")
    with pytest.raises(ConfigError, match="attack_fraction"):
        SimulationConfig(noisy_fraction=0.6, attack_fraction=0.6, attack="sign_flip")


def test_attackers_are_chosen_apart_from_noisy_clients_and_recorded():
    cfg = SimulationConfig(n_clients=10, partition="iid", noisy_fraction=0.2, attack="sign_flip", attack_fraction=0.3,
                           strategy=StrategyConfig(rounds=2, sparsity=0.5))
    result = run_simulation(cfg)
    assert len(result.attackers) == 3 and len(result.noisy_clients) == 2
    assert not set(result.attackers) & set(result.noisy_clients)


@pytest.mark.slow
def test_defences_hold_a_small_federation_under_sign_flip():
    """A few rounds on digits with 30 % sign-flippers: the weighted mean without defences
    collapses, the direction gate keeps it learning (full comparison: benchmarks/robustness).
    One learning rate for all layers, as the gate was designed: with the sparse lr factor
    training converges sooner, honest updates decorrelate sooner, and in this run the gate
    let the flippers back in from round 10 (docs/ROBUSTNESS.md)."""
    local = replace(StrategyConfig().local, max_sparse_lr_factor=1.0)

    def run(**knobs):
        cfg = SimulationConfig(n_clients=10, beta=0.5, attack="sign_flip", attack_fraction=0.3, seed=1,
                               strategy=StrategyConfig(rounds=12, sparsity=0.5, local=local, **knobs))
        return run_simulation(cfg)

    undefended = run(norm_clip=0.0, direction_gate="off", sybil_cos=0.0)
    defended = run(direction_gate="memory")
    print(f"undefended {undefended.final_score:.3f} defended {defended.final_score:.3f}")
    assert defended.final_score > 0.6 and defended.final_score > undefended.final_score + 0.1
    late = [(c in defended.attackers, bool(s["gated_by"])) for r in defended.rounds[6:] for c, s in r["scores"].items()]
    gated_bad = np.mean([g for bad, g in late if bad])
    gated_good = np.mean([g for bad, g in late if not bad])
    print(f"gated in rounds 7-12: attackers {gated_bad:.2f}, honest {gated_good:.2f}")
    assert gated_bad >= 0.5 and gated_good <= 0.25


def test_absent_attackers_never_take_part():
    cfg = SimulationConfig(n_clients=10, partition="iid", attack="absent", attack_fraction=0.3,
                           strategy=StrategyConfig(rounds=2, sparsity=0.5))
    result = run_simulation(cfg)
    assert len(result.attackers) == 3
    assert all(set(r["scores"]).isdisjoint(result.attackers) and r["n_valid"] == 7 for r in result.rounds)
