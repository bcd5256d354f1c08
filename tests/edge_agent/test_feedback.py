"""Error feedback: quantised updates that add up to the true ones over rounds, a residual that
leaves the device only inside the next update and survives a restart, and none for float32."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedprune.edge_agent.core.agent import AgentCore, KeepResidual, Phase, ReportStatus, Upload
from fedprune.edge_agent.core.feedback import quantise_update
from fedprune.edge_agent.feedback_store import ResidualStore
from fedprune.protocol.quantise import ValueDtype, quantise
from tests.edge_agent.test_agent_core import task, trained

MASK = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], bool)


def deltas(rounds: int, seed: int = 0):
    """Small steady drifts beside one large coordinate: int8 alone rounds the drifts to zero."""
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        w = np.where(MASK, rng.normal(0.003, 0.001, MASK.shape), 0).astype(np.float32)
        w[0, 0] = 1.0
        yield {"w": w, "b": np.array([0.002, -1.0], np.float32)}


def run(rounds: int, dtype: ValueDtype, feedback: bool):
    residual, sent_sum, true_sum = None, None, None
    for delta in deltas(rounds):
        out = quantise_update(delta, {"w": MASK}, dtype, residual, feedback)
        residual = out.residual
        sent_sum = out.delta if sent_sum is None else {k: sent_sum[k] + out.delta[k] for k in out.delta}
        true_sum = delta if true_sum is None else {k: true_sum[k] + delta[k] for k in delta}
    return sent_sum, true_sum, residual


def test_int8_with_feedback_sends_the_true_sum_up_to_one_residual_and_without_it_loses_the_drift() -> None:
    sent, true, residual = run(200, ValueDtype.INT8, feedback=True)
    for name in sent:
        np.testing.assert_allclose(sent[name] + residual[name], true[name], atol=1e-4)
        assert np.abs(residual[name]).max() <= 1.0 / 127  # at most one int8 step of the round's scale
    lost, true, none = run(200, ValueDtype.INT8, feedback=False)
    assert none is None
    kept_error = max(np.abs(sent[k] - true[k]).max() for k in sent)
    lost_error = max(np.abs(lost[k] - true[k]).max() for k in lost)
    assert kept_error <= 1.0 / 127 and lost_error > 50 * kept_error  # rounding bias piles up round after round


def test_sent_values_are_what_the_wire_decodes() -> None:
    delta = next(deltas(1))
    out = quantise_update(delta, {"w": MASK}, ValueDtype.INT8, None, True)
    np.testing.assert_array_equal(out.delta["w"][MASK], quantise(delta["w"][MASK], ValueDtype.INT8))
    assert (out.delta["w"][~MASK] == 0).all() and (out.residual["w"][~MASK] == 0).all()


def test_a_position_the_mask_drops_loses_its_residual() -> None:
    residual = {"w": np.full(MASK.shape, 0.004, np.float32), "b": np.zeros(2, np.float32)}
    pruned = MASK.copy()
    pruned[0, 2] = False
    zero = {"w": np.zeros(MASK.shape, np.float32), "b": np.zeros(2, np.float32)}
    out = quantise_update(zero, {"w": pruned}, ValueDtype.INT8, residual, True)
    assert out.delta["w"][0, 2] == 0 and out.residual["w"][0, 2] == 0
    assert out.delta["w"][0, 0] == pytest.approx(0.004, rel=1e-6)  # the kept positions send theirs


def test_float32_rounds_nothing_and_flushes_a_residual_left_from_int8() -> None:
    delta = next(deltas(1))
    plain = quantise_update(delta, {"w": MASK}, ValueDtype.FLOAT32, None, True)
    assert plain.delta is delta and plain.residual is None
    residual = {"w": np.where(MASK, 0.001, 0).astype(np.float32), "b": np.zeros(2, np.float32)}
    flushed = quantise_update(delta, {"w": MASK}, ValueDtype.FLOAT32, residual, True)
    np.testing.assert_array_equal(flushed.delta["w"], delta["w"] + residual["w"])
    assert flushed.residual is None


def test_a_residual_of_another_model_is_ignored() -> None:
    delta = next(deltas(1))
    alien = {"w": np.ones((3, 3), np.float32), "b": np.ones(2, np.float32)}
    out = quantise_update(delta, {"w": MASK}, ValueDtype.INT8, alien, True)
    np.testing.assert_array_equal(out.delta["w"], quantise_update(delta, {"w": MASK}, ValueDtype.INT8, None, True).delta["w"])


def test_the_core_keeps_the_residual_only_once_the_broker_has_the_update() -> None:
    t = replace(task(), update_values=ValueDtype.INT8)
    agent = AgentCore("pi-1")
    agent.on_task(t, now=1.0)
    (upload,) = agent.on_trained(t, trained(scale=0.3))
    assert isinstance(upload, Upload) and agent.residual is None
    sent = upload.update.delta_params()["fc.bias"]
    np.testing.assert_array_equal(sent, quantise(np.full(2, 0.3, np.float32), ValueDtype.INT8))
    actions = agent.on_uploaded(1, mask_version=0, now=2.0)
    assert isinstance(actions[0], KeepResidual) and actions[0].residual is agent.residual
    assert actions[1:] == [ReportStatus(Phase.IDLE, 1)]
    # a failed upload of the next round keeps the residual as it was
    before = agent.residual
    t2 = replace(task(round_number=2), update_values=ValueDtype.INT8)
    agent.on_task(t2, now=3.0)
    agent.on_trained(t2, trained(scale=0.7))
    agent.on_failed(2, "upload_failed", retry=True)
    assert agent.residual is before


def test_without_feedback_no_residual_is_kept_and_a_float32_federation_writes_nothing() -> None:
    agent = AgentCore("pi-1")
    t = replace(task(), update_values=ValueDtype.INT8, error_feedback=False)
    agent.on_task(t, now=1.0)
    agent.on_trained(t, trained())
    assert agent.on_uploaded(1, mask_version=0, now=2.0) == [ReportStatus(Phase.IDLE, 1)]
    plain = AgentCore("pi-2", residual=None)
    plain.on_task(task(selected=("pi-2",)), now=1.0)
    plain.on_trained(task(selected=("pi-2",)), trained())
    assert plain.on_uploaded(1, mask_version=0, now=2.0) == [ReportStatus(Phase.IDLE, 1)]


def test_the_residual_survives_a_restart_and_a_damaged_file_is_set_aside(tmp_path: Path, caplog) -> None:
    store = ResidualStore(tmp_path, "fed")
    residual = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 100, "fc.bias": np.zeros(2, np.float32)}
    store.save(residual)
    loaded = ResidualStore(tmp_path, "fed").load()
    assert loaded.keys() == residual.keys() and all(np.array_equal(loaded[k], residual[k]) for k in residual)
    store.save(None)
    assert not store.path.exists() and store.load() is None
    store.path.write_bytes(b"PK\x03\x04 not a zip")
    with caplog.at_level(logging.WARNING, logger="fedprune.agent"):
        assert store.load() is None
    assert "event=residual_unreadable" in caplog.text and store.path.with_suffix(".npz.unreadable").exists()
    assert not store.path.exists()


def test_the_privacy_step_runs_before_rounding() -> None:
    """Clip and noise first (the ledger charges that mechanism), then round what was noised."""
    from fedprune.edge_agent.core.agent import PrivacyStep

    t = replace(task(), update_values=ValueDtype.INT8)
    agent = AgentCore("pi-1", privacy=PrivacyStep(clip_norm=0.1, noise_multiplier=1e-9, rng=np.random.default_rng(0)))
    agent.on_task(t, now=1.0)
    (upload,) = agent.on_trained(t, trained(scale=0.5))
    sent = upload.update.delta_params()
    assert upload.norm_before_clip > 0.1
    clipped_norm = np.sqrt(sum(float(np.sum(v ** 2)) for v in sent.values()))
    assert clipped_norm == pytest.approx(0.1, rel=0.02)  # rounded after clipping, not clipped after rounding
    for name, values in sent.items():
        carried = values[t.masks[name]] if name in t.masks else values
        np.testing.assert_array_equal(carried, quantise(carried, ValueDtype.INT8))  # on the int8 grid
