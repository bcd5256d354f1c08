from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedprune.edge_agent.core.agent import (
    AgentCore, Decline, Ignore, Phase, PrivacyStep, ReportStatus, Resend, Train, Trained, Upload,
)
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.layout import ModelLayout, TensorSpec
from fedprune.protocol.messages import ModelRef, RoundTask
from fedprune.protocol.sparse import SparseParams

LAYOUT = ModelLayout((TensorSpec("fc.weight", (2, 3), True), TensorSpec("fc.bias", (2,), False)))


def task(round_number: int = 1, selected=("pi-1", "pi-2"), deadline: float = 100.0, mask_version: int = 0) -> RoundTask:
    masks = {"fc.weight": np.array([[1, 0, 1], [0, 1, 1]], bool)}
    params = {"fc.weight": masks["fc.weight"].astype(np.float32), "fc.bias": np.zeros(2, np.float32)}
    return RoundTask(
        federation="fed", round=round_number, mask_version=mask_version,
        model=ModelRef("mlp", (3,), 2), weights=SparseParams.from_dense(LAYOUT, params, masks),
        hyper=HyperParams(), deadline=deadline, selected=tuple(selected),
    )


def trained(scale: float = 0.5, class_losses=None) -> Trained:
    masks = {"fc.weight": np.array([[1, 0, 1], [0, 1, 1]], bool)}
    delta = {"fc.weight": scale * masks["fc.weight"].astype(np.float32), "fc.bias": np.full(2, scale, np.float32)}
    return Trained(delta=delta, buffers={}, masks=masks, mask_changed=False, n_examples=40, steps=3, train_loss=0.7,
                   class_losses=class_losses or {0: (0.5, 20), 1: (0.9, 20)}, seconds=0.1, macs=1234)


def upload_of(agent: AgentCore, round_number: int = 1) -> Upload:
    (action,) = agent.on_trained(task(round_number), trained())
    assert isinstance(action, Upload) and action.update.round == round_number
    return action


def test_a_selected_task_is_trained_uploaded_and_reported() -> None:
    agent = AgentCore("pi-1")
    t = task()
    assert agent.on_task(t, now=1.0) == [ReportStatus(Phase.TRAINING, 1), Train(t, t.hyper.for_device("pi-1"))]
    upload = upload_of(agent)
    assert upload.update.device == "pi-1" and upload.update.n_examples == 40 and upload.norm_before_clip is None
    assert upload.update.metrics == {"train_loss": 0.7, "steps": 3.0, "train_seconds": 0.1, "macs": 1234.0}
    assert agent.on_uploaded(1, mask_version=0, now=2.0) == [ReportStatus(Phase.IDLE, 1)]
    assert agent.phase is Phase.IDLE


def test_the_core_builds_the_update_from_the_trainable_deltas_on_the_mask() -> None:
    agent = AgentCore("pi-1", report_class_losses=False)
    agent.on_task(task(), now=1.0)
    update = upload_of(agent).update
    assert set(update.delta_params()) == {"fc.weight", "fc.bias"}
    np.testing.assert_array_equal(update.delta_params()["fc.weight"], trained().delta["fc.weight"])
    assert update.class_losses == {}  # the owner withholds them


def test_each_device_trains_with_its_own_reproducible_seed() -> None:
    t = task()
    seeds = {d: AgentCore(d).on_task(task(selected=(d,)), now=1.0)[-1].hyper.seed for d in ("pi-1", "pi-2")}
    assert seeds["pi-1"] != seeds["pi-2"] and seeds["pi-1"] == t.hyper.for_device("pi-1").seed


def test_a_diverged_training_is_declined_not_sent() -> None:
    agent = AgentCore("pi-1")
    agent.on_task(task(), now=1.0)
    assert agent.on_trained(task(), trained(scale=float("nan"))) == [Decline(1, "training_diverged"),
                                                                    ReportStatus(Phase.IDLE, 1)]
    assert agent.on_task(task(), now=2.0) == [Ignore(1, "failed_this_round")]


def test_the_privacy_step_clips_and_noises_before_the_update_is_built() -> None:
    agent = AgentCore("pi-1", privacy=PrivacyStep(clip_norm=0.1, noise_multiplier=1e-9, rng=np.random.default_rng(0)))
    agent.on_task(task(), now=1.0)
    upload = upload_of(agent)
    sent = upload.update.delta_params()["fc.weight"]
    bias = upload.update.delta_params()["fc.bias"]
    assert upload.norm_before_clip == pytest.approx(0.5 * np.sqrt(6))  # four held weights and two biases of 0.5
    assert np.linalg.norm(np.concatenate([sent.ravel(), bias])) == pytest.approx(0.1, rel=1e-4)


def test_a_hostile_device_replaces_its_update_after_the_privacy_step() -> None:
    seen = {}

    def flip(t, delta, masks):
        seen["honest"] = delta["fc.weight"].copy()
        return {k: -v for k, v in delta.items()}

    agent = AgentCore("pi-1", tamper=flip,
                      privacy=PrivacyStep(clip_norm=0.1, noise_multiplier=1e-9, rng=np.random.default_rng(0)))
    agent.on_task(task(), now=1.0)
    np.testing.assert_array_equal(upload_of(agent).update.delta_params()["fc.weight"], -seen["honest"])
    assert np.linalg.norm(seen["honest"]) <= 0.1 + 1e-6  # it saw the privatised update, and sent its own


def test_the_same_task_twice_trains_once_and_resends_only_when_the_coordinator_still_waits() -> None:
    agent = AgentCore("pi-1", resend_holdoff_s=5.0)
    agent.on_task(task(), now=1.0)
    assert agent.on_task(task(), now=1.5) == [Ignore(1, "in_progress")]
    upload_of(agent, 1)
    agent.on_uploaded(1, mask_version=0, now=2.0)
    assert agent.on_task(task(deadline=200.0), now=3.0) == [Ignore(1, "answered_recently")]
    assert agent.on_task(task(deadline=200.0), now=7.5) == [Resend(1)]
    assert agent.on_task(task(mask_version=1), now=30.0) == [Ignore(1, "already_uploaded")]


def test_re_announcements_queued_while_training_send_nothing() -> None:
    """The field defect: every re-announcement that waited in the queue while the device
    trained was answered with another copy of the update (up to 6.8x the uplink)."""
    agent = AgentCore("pi-1", resend_holdoff_s=5.0)
    agent.on_task(task(deadline=500.0), now=0.0)
    upload_of(agent, 1)
    agent.on_uploaded(1, mask_version=0, now=40.0)
    queued = [agent.on_task(task(deadline=500.0), now=40.1, received_at=t) for t in (10.0, 20.0, 30.0, 39.9)]
    assert queued == [[Ignore(1, "answered_recently")]] * 4


def test_each_resend_doubles_the_hold_off() -> None:
    agent = AgentCore("pi-1", resend_holdoff_s=5.0)
    agent.on_task(task(deadline=500.0), now=0.0)
    upload_of(agent, 1)
    agent.on_uploaded(1, mask_version=0, now=10.0)
    answers = {t: agent.on_task(task(deadline=500.0), now=t) for t in (15.0, 20.0, 24.0, 25.0, 44.0, 45.0)}
    assert [t for t, a in answers.items() if a == [Resend(1)]] == [15.0, 25.0, 45.0]


@pytest.mark.parametrize(
    "kwargs,now,reason",
    [(dict(selected=("pi-2",)), 1.0, "not_selected"), (dict(deadline=5.0), 6.0, "past_deadline")],
)
def test_tasks_that_do_not_concern_this_device_are_ignored_with_a_reason(kwargs, now, reason) -> None:
    agent = AgentCore("pi-1")
    (action,) = agent.on_task(task(**kwargs), now=now)
    assert action == Ignore(1, reason)
    assert agent.phase is Phase.IDLE


def test_an_older_round_after_an_upload_is_stale() -> None:
    agent = AgentCore("pi-1")
    agent.on_task(task(3), now=1.0)
    upload_of(agent, 3)
    agent.on_uploaded(3, 0, now=1.0)
    assert agent.on_task(task(2), now=1.0) == [Ignore(2, "stale_round")]


def test_a_governance_decision_becomes_a_decline_not_a_silent_timeout() -> None:
    agent = AgentCore("pi-1")
    assert agent.on_task(task(), now=1.0, decline_reason="thermal") == [Decline(1, "thermal")]
    assert agent.phase is Phase.IDLE


def test_a_failed_training_reports_returns_to_idle_and_is_not_repeated_for_that_round() -> None:
    agent = AgentCore("pi-1")
    agent.on_task(task(), now=1.0)
    assert agent.on_failed(1, "out_of_memory") == [Decline(1, "out_of_memory"), ReportStatus(Phase.IDLE, 1)]
    assert agent.phase is Phase.IDLE
    assert agent.on_task(task(), now=2.0) == [Ignore(1, "failed_this_round")]
    assert isinstance(agent.on_task(task(2), now=3.0)[-1], Train)


def test_a_failed_upload_is_tried_again_at_the_next_announcement() -> None:
    agent = AgentCore("pi-1")
    agent.on_task(task(), now=1.0)
    upload_of(agent, 1)
    agent.on_failed(1, "upload_failed", retry=True)
    assert isinstance(agent.on_task(task(), now=2.0)[-1], Train)


def test_out_of_order_outcomes_are_bugs() -> None:
    agent = AgentCore("pi-1")
    with pytest.raises(RuntimeError):
        agent.on_trained(task(), trained())
    agent.on_task(task(), now=1.0)
    with pytest.raises(RuntimeError):
        agent.on_uploaded(1, 0, now=1.0)


@given(st.lists(st.tuples(st.integers(1, 4), st.booleans(), st.sampled_from(["task", "trained", "uploaded", "failed"])), max_size=40))
def test_no_round_is_trained_twice_once_its_update_was_uploaded(events) -> None:
    agent = AgentCore("pi-1")
    uploaded: set[int] = set()
    for round_number, selected, kind in events:
        if kind == "task":
            actions = agent.on_task(task(round_number, ("pi-1",) if selected else ("x",)), now=0.0)
            for action in actions:
                if isinstance(action, Train):
                    assert action.task.round not in uploaded
                    assert agent.uploaded is None or action.task.round > agent.uploaded.round
        elif agent.active_round is not None:
            r = agent.active_round
            if kind == "trained" and agent.phase is Phase.TRAINING:
                upload_of(agent, r)
            elif kind == "uploaded" and agent.phase is Phase.UPLOADING:
                agent.on_uploaded(r, 0, now=0.0)
                uploaded.add(r)
            elif kind == "failed":
                agent.on_failed(r, "error")
                assert agent.phase is Phase.IDLE
        assert (agent.phase is Phase.IDLE) == (agent.active_round is None)
