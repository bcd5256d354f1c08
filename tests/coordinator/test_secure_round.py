"""A secure round without I/O: real agent cores (``AgentCore``, the secure participant and its
SecAgg+ session) answer a real ``SecureCollection``. The coordinator's sum equals the plain
weighted mean to the quantisation error; a third of the devices dropping at any stage still
completes the round or fails it with a reason; what it receives does not give one update away;
and gone, revoked and hostile devices, broker outages and the distributed-DP σ are handled as
docs/PRIVACY.md says. Over 400 lines because every case drives the same ``Round`` of real agent
cores through the collection; split, each part would need its own copy of that driver."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fedprune.coordinator.core.secure_round import (NOISE_HEADROOM, RANGE_OVER_MEDIAN, SecureCollection, SecureFailed,
                                                    SecureSum, field_scale, value_range)
from fedprune.edge_agent.core.agent import AgentCore, Decline, PrivacyStep, SendSecure, Trained, Upload
from fedprune.protocol.distributed_dp import (DISTRIBUTED, DISTRIBUTED_DP_NEEDS_SECURE, LOCAL, NOISE_MISMATCH,
                                              SkellamCost, central_epsilon, device_mu, rdp_skellam, sensitivities)
from fedprune.edge_agent.core.privacy import DEFAULT_ORDERS
from fedprune.edge_agent.ledger import PrivacyLedger, read_budget
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.layout import ModelLayout, TensorSpec
from fedprune.protocol.messages import ModelRef, RoundTask
from fedprune.protocol.secagg import SecureParams, Share, decode_share, encode_share
from fedprune.protocol.secure_messages import SecureInbox, SecureKeys, SecureMasked, SecureShares
from fedprune.protocol.secure_setup import SecureSetup
from fedprune.protocol.secure_vector import flatten, unflatten, vector_length
from fedprune.protocol.sparse import SparseParams

LAYOUT = ModelLayout((TensorSpec("fc.weight", (8, 12), True), TensorSpec("fc.bias", (8,), False),
                      TensorSpec("bn.running_mean", (8,), False, trainable=False),
                      TensorSpec("bn.num_batches_tracked", (), False, trainable=False)))
FED = "fed"


def make_task(n: int, rng: np.random.Generator, bits: int = 16, degree: int | None = None,
              noise_multiplier: float = 0.0) -> RoundTask:
    masks = {"fc.weight": rng.random((8, 12)) < 0.3}
    params = {"fc.weight": np.where(masks["fc.weight"], 1.0, 0.0).astype(np.float32), "fc.bias": np.zeros(8, np.float32),
              "bn.running_mean": np.zeros(8, np.float32), "bn.num_batches_tracked": np.zeros((), np.float32)}
    params_ = SecureParams.for_devices(n, bits, degree)
    return RoundTask(federation=FED, round=3, mask_version=0, model=ModelRef("mlp", (12,), 8),
                     weights=SparseParams.from_dense(LAYOUT, params, masks), hyper=HyperParams(), deadline=1e9,
                     selected=tuple(f"d{i:02d}" for i in range(n)),
                     secure=SecureSetup(bytes(range(8)), params_.bits, params_.degree, params_.threshold,
                                        noise_multiplier))


def trained(task: RoundTask, rng: np.random.Generator, noisy: bool = False) -> Trained:
    masks = task.masks
    delta = {"fc.weight": np.where(masks["fc.weight"], rng.normal(0, 0.05, (8, 12)), 0).astype(np.float32),
             "fc.bias": rng.normal(0, 0.05, 8).astype(np.float32)}
    losses = {c: (3.0 if noisy else 0.5, 10) for c in range(4)}
    return Trained(delta=delta, buffers={"bn.running_mean": rng.normal(0, 0.1, 8).astype(np.float32),
                                         "bn.num_batches_tracked": np.full((), 5.0, np.float32)},
                   masks=masks, mask_changed=False, n_examples=int(rng.integers(20, 60)), steps=3, train_loss=0.5,
                   class_losses=losses, seconds=0.1, macs=1)


class Round:
    """n devices through stage 1; ``run`` drives stages 2-4, leaving ``drop[stage]`` silent there.
    ``privacy`` (clip_norm, noise_multiplier, mechanism) gives every device that privacy step."""

    def __init__(self, n: int, seed: int = 0, bits: int = 16, degree: int | None = None,
                 privacy: tuple[float, float, str] | None = None):
        rng = np.random.default_rng(seed)
        sigma = privacy[1] if privacy is not None and privacy[2] == DISTRIBUTED else 0.0
        self.task = make_task(n, rng, bits, degree, sigma)
        self.cores, self.trained, self.reports = {}, {}, {}
        self.uploads: dict[str, Upload] = {}
        self.costs: dict[str, SkellamCost | None] = {}  # what each masked vector's SendSecure asked to charge
        for i, device in enumerate(self.task.selected):
            step = None if privacy is None else PrivacyStep(*privacy[:2], np.random.default_rng([seed, 200 + i]),
                                                            privacy[2])
            core = AgentCore(device, rng=np.random.default_rng(100 + i), privacy=step)
            core.on_task(self.task, 0.0)
            self.trained[device] = trained(self.task, rng)
            (upload,) = core.on_trained(self.task, self.trained[device])
            assert isinstance(upload, Upload) and isinstance(upload.update, SecureKeys)
            self.uploads[device] = upload
            core.on_uploaded(self.task.round, 0, 1.0)
            self.cores[device], self.reports[device] = core, upload.update
        self.received: list = []

    def weights(self, ids):
        raw = {d: float(self.trained[d].n_examples) for d in ids}
        return {d: v / sum(raw.values()) for d, v in raw.items()}

    def collection(self, devices=None) -> SecureCollection:
        reports = {d: self.reports[d] for d in (devices or self.reports)}
        return SecureCollection(federation=FED, round_number=3, setup=self.task.secure, layout=LAYOUT,
                                masks=self.task.masks, reports=reports, weights=self.weights(reports), stage_s=10.0,
                                now=0.0)

    def run(self, collection: SecureCollection, drop: dict[str, set[str]] | None = None):
        drop = drop or {}
        outgoing = collection.outbox()
        stage, now = "shares", 0.0
        while True:
            for msg in outgoing:
                if msg.device in drop.get(stage, ()):
                    continue
                (action,) = self.cores[msg.device].on_secure(msg)
                assert isinstance(action, SendSecure), action
                if isinstance(action.message, SecureMasked):
                    self.costs[msg.device] = action.cost
                self.received.append(action.message)
                assert collection.on_message(action.message) == ""
            now += 11.0  # past the stage deadline: who did not answer has dropped
            outcome = collection.tick(now)
            if not isinstance(outcome, list):
                return outcome
            outgoing, stage = outcome, collection.stage

    def plain_mean(self, survivors, clip_norm: float | None = None) -> np.ndarray:
        """The weighted mean of the survivors' vectors (each first clipped to L2 norm ``clip_norm``)."""
        w = self.weights(self.reports)
        total = sum(w[d] * self.vector(d, clip_norm) for d in survivors)
        return total / sum(w[d] for d in survivors)

    def vector(self, device: str, clip_norm: float | None = None) -> np.ndarray:
        base = self.task.params()
        v = flatten(LAYOUT, self.task.masks, self.trained[device].delta,
                    {k: v - base[k] for k, v in self.trained[device].buffers.items()})
        return v if clip_norm is None else v * min(1.0, clip_norm / np.linalg.norm(v))


def secure_mean(outcome: SecureSum, masks) -> np.ndarray:
    return flatten(LAYOUT, masks, outcome.mean_delta, outcome.buffer_delta)


@pytest.mark.parametrize("n", [5, 12, 30])
def test_the_unmasked_sum_is_the_weighted_mean_to_the_quantisation_error(n):
    r = Round(n)
    collection = r.collection()
    outcome = r.run(collection)
    assert isinstance(outcome, SecureSum) and outcome.survivors == tuple(sorted(r.reports)) and outcome.dropped == ()
    error = np.abs(secure_mean(outcome, r.task.masks) - r.plain_mean(r.reports))
    # stochastic rounding: at most one field unit per device, divided by the scale
    assert error.max() <= n / collection.scale + 1e-12
    assert error.max() < 1e-3 * collection.value_range
    assert "bn.num_batches_tracked" not in outcome.buffer_delta  # a counter, not an average: it stays with the coordinator


@pytest.mark.parametrize("stage", ["shares", "masked", "reveal"])
def test_a_third_dropping_at_any_stage_completes_a_round_whose_graph_can_take_it(stage):
    """Each survivor needs t = k/2 + 1 of its k neighbours to answer: with a third gone that needs
    k near n (here the complete graph, secure_degree = 14 of 15 devices)."""
    r = Round(15, seed=1, degree=14)
    gone = set(sorted(r.reports)[::3])  # 5 of 15
    outcome = r.run(r.collection(), drop={stage: gone})
    assert isinstance(outcome, SecureSum), outcome
    # dropped before masking: not in the sum; dropping at reveal: in the sum, others' shares suffice
    expected = set(r.reports) - gone if stage != "reveal" else set(r.reports)
    assert set(outcome.survivors) == expected
    error = np.abs(secure_mean(outcome, r.task.masks) - r.plain_mean(expected))
    assert error.max() < 1e-3 * value_range(r.reports)


@pytest.mark.parametrize("stage", ["shares", "masked", "reveal"])
def test_a_third_dropping_in_a_sparse_graph_completes_or_fails_naming_the_device(stage):
    """The default degree 2·ceil(log2 n) (8 of 15) tolerates k/2 - 1 = 3 neighbours gone; a
    survivor with more gone around it fails the round, and the reason says whose shares ran out."""
    r = Round(15, seed=1)
    gone = set(sorted(r.reports)[::3])
    outcome = r.run(r.collection(), drop={stage: gone})
    if isinstance(outcome, SecureFailed):
        assert outcome.reason in ("too_few_shares", "too_few_devices") and " d" in outcome.detail, outcome
    else:
        assert isinstance(outcome, SecureSum)


def test_a_device_missing_stage_one_is_not_in_the_round_at_all():
    r = Round(9, seed=2)
    present = sorted(r.reports)[3:]
    outcome = r.run(r.collection(present))
    assert isinstance(outcome, SecureSum) and outcome.survivors == tuple(present)


def test_too_many_dropping_fails_the_round_with_a_reason_not_a_wrong_sum():
    r = Round(9, seed=3)
    gone = set(sorted(r.reports)[:7])
    outcome = r.run(r.collection(), drop={"reveal": gone})
    assert isinstance(outcome, SecureFailed) and outcome.reason in ("too_few_shares", "too_few_devices")
    assert "d0" in outcome.detail


def test_nothing_the_coordinator_receives_gives_one_update_away():
    r = Round(10, seed=4)
    outcome = r.run(r.collection())
    assert isinstance(outcome, SecureSum)
    masked = {m.device: m.values for m in r.received if isinstance(m, SecureMasked)}
    shares = [m for m in r.received if isinstance(m, SecureShares)]
    collection_scale = field_scale(r.task.secure.bits, 10, value_range(r.reports))
    for device, values in masked.items():
        weighted = r.weights(r.reports)[device] * flatten(LAYOUT, r.task.masks, r.trained[device].delta,
                                                          {k: v - r.task.params()[k] for k, v in r.trained[device].buffers.items()})
        true_field = np.round(weighted * collection_scale).astype(np.int64) % (1 << r.task.secure.bits)
        # the masked vector is as far from the update as uniform noise is
        agree = np.mean(np.abs(values.astype(np.int64) - true_field) <= 1)
        assert agree < 0.05, device
    for msg in shares:  # shares leave only encrypted: no ciphertext is a plain share the coordinator could pool
        assert all(len(c) > 2 * 68 for c in msg.ciphertexts.values())


def test_a_stage_of_another_session_or_out_of_order_is_refused():
    r = Round(5, seed=5)
    collection = r.collection()
    first = collection.outbox()[0]
    other = dataclasses.replace(first, session=bytes(8))
    (action,) = r.cores[first.device].on_secure(other)
    assert action.reason == "wrong_session"
    (answer,) = r.cores[first.device].on_secure(first)
    (again,) = r.cores[first.device].on_secure(first)  # re-sent after an outage: the same answer, once more
    assert isinstance(again, SendSecure) and again.message == answer.message
    (changed,) = r.cores[first.device].on_secure(dataclasses.replace(first, weight=first.weight / 2))
    assert changed.reason == "wrong_stage"  # another stage-2 message is not a resend
    bad = SecureShares(round=3, device="d00", session=bytes(8), ciphertexts={})
    assert collection.on_message(bad) == "wrong_session"


def test_one_device_cannot_coarsen_the_range_for_all():
    r = Round(9, seed=6)
    liar = dataclasses.replace(r.reports["d00"], max_abs=1e6)
    honest = value_range({d: v for d, v in r.reports.items() if d != "d00"})
    got = value_range({**r.reports, "d00": liar})
    assert got <= RANGE_OVER_MEDIAN * np.median([v.max_abs for v in {**r.reports, "d00": liar}.values()]) + 1e-12
    assert got < 10 * honest


def test_a_reopened_round_gets_fresh_keys_and_trains_again():
    r = Round(5, seed=7)
    device = "d00"
    core = r.cores[device]
    reopened = dataclasses.replace(r.task, secure=dataclasses.replace(r.task.secure, session=bytes(range(1, 9))))
    actions = core.on_task(reopened, 2.0)
    assert any(type(a).__name__ == "Train" for a in actions)


def test_the_vector_order_round_trips():
    rng = np.random.default_rng(8)
    task = make_task(5, rng)
    t = trained(task, rng)
    vector = flatten(LAYOUT, task.masks, t.delta, {"bn.running_mean": t.buffers["bn.running_mean"]})
    assert vector.size == vector_length(LAYOUT, task.masks)
    delta, buffers = unflatten(LAYOUT, task.masks, vector)
    np.testing.assert_allclose(delta["fc.weight"], t.delta["fc.weight"], atol=1e-7)
    np.testing.assert_allclose(buffers["bn.running_mean"], t.buffers["bn.running_mean"], atol=1e-7)


# --- distributed differential privacy ---------------------------------------------------------------

C, SIGMA = 0.2, 0.5  # the vectors' norms are about 0.4: every device clips


def dp_round(n: int, seed: int, sigma: float = SIGMA, bits: int = 24, **kw) -> tuple[Round, SecureCollection]:
    r = Round(n, seed=seed, bits=bits, privacy=(C, sigma, DISTRIBUTED), **kw)
    return r, r.collection()


def test_under_distributed_dp_the_unmasked_mean_carries_noise_of_std_sigma_wmax_C_sqrt_n_over_t():
    """Each of n devices adds Sk((σ·S·w_max·C)²/(2t)): the sum's noise has std σ·w_max·C·sqrt(n/t)
    in value units (the weights sum to 1), centred on the weighted mean of the clipped vectors."""
    errors, expected = [], []
    for seed in range(3):
        r, collection = dp_round(20, seed)
        outcome = r.run(collection)
        assert isinstance(outcome, SecureSum) and len(outcome.survivors) == 20
        error = secure_mean(outcome, r.task.masks) - r.plain_mean(r.reports, clip_norm=C)
        errors.append(error)
        expected.append(SIGMA * collection.max_weight * C * np.sqrt(20 / r.task.secure.threshold))
        without = r.plain_mean(r.reports)  # unclipped: farther from what the devices sent
        assert np.linalg.norm(secure_mean(outcome, r.task.masks) - without) > np.linalg.norm(error)
    pooled = np.concatenate([e / x for e, x in zip(errors, expected)])  # in units of the expected std
    assert 0.75 < pooled.std() < 1.3, pooled.std()
    assert abs(pooled.mean()) < 4 / np.sqrt(pooled.size)


def test_devices_report_C_so_the_range_is_data_free_and_the_scale_leaves_room_for_the_noise():
    r, collection = dp_round(12, seed=1, bits=16)
    assert {k.max_abs for k in r.reports.values()} == {C} and collection.value_range == C
    t = r.task.secure.threshold
    noise_std = SIGMA * collection.max_weight * C * np.sqrt(12 / t)
    assert collection.scale == pytest.approx(field_scale(16, 12, C, noise_std))
    assert collection.scale * (C + NOISE_HEADROOM * noise_std) < 2**15 - 12
    assert collection.max_weight == pytest.approx(max(r.weights(r.reports).values()))
    assert all(m.max_weight == collection.max_weight for m in collection.outbox())
    outcome = r.run(collection)
    assert isinstance(outcome, SecureSum)
    noise = collection.noise(len(outcome.survivors))
    share = device_mu(SIGMA, collection.scale, collection.max_weight, C, t)
    assert noise == {"sigma": SIGMA, "mu": pytest.approx(12 * share), "scale": collection.scale,
                     "weight_max": collection.max_weight, "clip_norm": C, "dimension": collection.dimension}


def test_each_masked_vector_names_its_skellam_cost_and_the_ledger_charges_it(tmp_path):
    """The cost is the device's own: its weight's sensitivities (rounding included) against the
    t·μ_dev every unmasked sum holds at least; on disk it is per-order RDP, the local format."""
    r, collection = dp_round(9, seed=2, bits=16)
    r.run(collection)
    t, d, w = r.task.secure.threshold, collection.dimension, r.weights(r.reports)
    mu = device_mu(SIGMA, collection.scale, collection.max_weight, C, t)
    for device, cost in r.costs.items():
        assert cost == SkellamCost(*sensitivities(C, collection.scale, d, w[device]), t * mu)
    device = max(w, key=w.get)  # the largest weight: its noise is calibrated to it
    ledger = PrivacyLedger(tmp_path / "privacy-fed.json", FED, epsilon_budget=50.0, delta=1e-5, clip_norm=C,
                           noise_multiplier=SIGMA)
    ledger.charge(r.costs[device])
    stored = read_budget(tmp_path / "privacy-fed.json")
    l1, l2 = sensitivities(C, collection.scale, d, w[device])
    np.testing.assert_allclose(stored.rdp, rdp_skellam(l1, l2, t * mu, DEFAULT_ORDERS))
    assert stored.rounds == 1 and stored.spent == pytest.approx(
        central_epsilon(mu, t, 1, 1e-5, C, collection.scale, d, w[device]))
    ledger.charge()  # a local round after it adds to the same per-order RDP
    both = read_budget(tmp_path / "privacy-fed.json")
    np.testing.assert_allclose(both.rdp, np.asarray(stored.rdp) + ledger.cost.rdp(DEFAULT_ORDERS))
    local = tmp_path / "privacy-local.json"
    PrivacyLedger(local, FED, epsilon_budget=50.0, delta=1e-5, clip_norm=C, noise_multiplier=SIGMA).charge()
    assert json.loads(local.read_text()).keys() == json.loads((tmp_path / "privacy-fed.json").read_text()).keys()


def test_a_round_that_does_not_fit_the_budget_is_known_before_the_masked_vector_leaves(tmp_path):
    """The ledger's ``fits`` judges the exact cost the masked vector names: at 8 bits rounding
    makes it dearer than the Gaussian screen ``exhausted`` applies before training."""
    r, collection = dp_round(9, seed=2, bits=8)
    r.run(collection)
    cost = r.costs[max(r.costs, key=lambda d: r.weights(r.reports)[d])]
    ledger = PrivacyLedger(tmp_path / "privacy-fed.json", FED, epsilon_budget=1.0, delta=1e-5, clip_norm=C,
                           noise_multiplier=SIGMA)
    gaussian = ledger.budget.epsilon_after(ledger.cost)
    exact = ledger.budget.epsilon_after(cost)
    assert exact > 1.2 * gaussian
    tight = PrivacyLedger(tmp_path / "privacy-tight.json", FED, epsilon_budget=(gaussian + exact) / 2, delta=1e-5,
                          clip_norm=C, noise_multiplier=SIGMA)
    assert not tight.exhausted and not tight.fits(cost)
    with pytest.raises(RuntimeError, match="budget exhausted"):
        tight.charge(cost)
    assert not (tmp_path / "privacy-tight.json").exists()


def test_a_weight_above_the_announced_largest_is_refused():
    r, collection = dp_round(5, seed=3)
    first = collection.outbox()[0]
    (action,) = r.cores[first.device].on_secure(dataclasses.replace(first, max_weight=first.weight / 2))
    assert action.reason == "weight_above_max"
    (action,) = r.cores[first.device].on_secure(first)  # the stage is still open for the real message
    assert isinstance(action, SendSecure)


def test_a_plain_task_is_declined_under_distributed_dp_and_local_dp_still_runs_under_secure():
    rng = np.random.default_rng(4)
    plain = dataclasses.replace(make_task(5, rng), secure=None)
    core = AgentCore("d00", privacy=PrivacyStep(C, SIGMA, rng, DISTRIBUTED))
    assert core.on_task(plain, 0.0) == [Decline(3, DISTRIBUTED_DP_NEEDS_SECURE)]
    assert core.on_task(plain, 0.0, decline_reason="too_hot") == [Decline(3, DISTRIBUTED_DP_NEEDS_SECURE)]
    r = Round(6, seed=4, privacy=(C, SIGMA, LOCAL))  # clip and Gaussian noise on the update, then masking
    assert all(u.norm_before_clip is not None for u in r.uploads.values())
    assert all(k.max_abs != C for k in r.reports.values())
    outcome = r.run(r.collection())
    assert isinstance(outcome, SecureSum) and set(r.costs.values()) == {None}  # charged at stage 1, as a plain round


def test_a_scale_that_leaves_the_noise_shares_no_room_is_refused_not_crashed_on():
    r, collection = dp_round(5, seed=5, bits=32)
    first = collection.outbox()[0]
    core = r.cores[first.device]
    core.on_secure(dataclasses.replace(first, scale=1e12))  # a share of mu above what a Poisson sampler draws
    (action,) = core.on_secure(SecureInbox(round=3, device=first.device, session=first.session, ciphertexts={}))
    assert action.reason == "noise_out_of_range"


def test_a_device_known_to_be_gone_is_not_waited_for():
    r = Round(9, seed=9)
    collection = r.collection()
    outgoing = collection.outbox()
    gone = outgoing[0].device
    for msg in outgoing[1:]:
        (action,) = r.cores[msg.device].on_secure(msg)
        assert collection.on_message(action.message) == ""
    assert collection.tick(1.0) is None  # still waiting for the silent one, well before the deadline
    collection.forget(gone)  # its last will arrived
    nxt = collection.tick(1.0)
    assert isinstance(nxt, list) and gone not in {m.device for m in nxt}


def answer_all(r: Round, collection: SecureCollection, outgoing, skip=()) -> None:
    for msg in outgoing:
        if msg.device not in skip:
            (action,) = r.cores[msg.device].on_secure(msg)
            assert collection.on_message(action.message) == ""


def test_a_device_gone_after_sharing_is_not_waited_for_at_any_later_stage():
    r = Round(9, seed=10)
    collection = r.collection()
    outgoing = collection.outbox()
    gone = outgoing[0].device
    answer_all(r, collection, outgoing)
    collection.forget(gone)  # it shared, then its last will arrived
    inbox = collection.tick(1.0)
    assert isinstance(inbox, list)
    answer_all(r, collection, inbox, skip={gone})
    unmask = collection.tick(2.0)  # not the deadline: the gone device is not expected to mask
    assert isinstance(unmask, list) and gone not in {m.device for m in unmask}
    answer_all(r, collection, unmask)
    outcome = collection.tick(3.0)
    assert isinstance(outcome, SecureSum) and gone in outcome.dropped


def test_a_device_revoked_after_masking_is_left_out_of_the_sum():
    r = Round(9, seed=11)
    collection = r.collection()
    answer_all(r, collection, collection.outbox())
    inbox = collection.tick(1.0)
    answer_all(r, collection, inbox)
    revoked, offline = inbox[0].device, inbox[1].device
    collection.forget(revoked, revoked=True)  # its vector is in, the mask stage has not closed: it is withdrawn
    collection.forget(offline)  # its last will: its vector, already in, stays
    unmask = collection.tick(2.0)
    answer_all(r, collection, unmask)
    outcome = collection.tick(3.0)
    assert isinstance(outcome, SecureSum) and revoked in outcome.dropped and revoked not in outcome.survivors
    assert offline in outcome.survivors
    np.testing.assert_allclose(secure_mean(outcome, r.task.masks), r.plain_mean(outcome.survivors), atol=2e-3)


def at_the_mask_stage(seed: int) -> tuple[Round, SecureCollection, list]:
    """A distributed-DP round whose shares are all in: its SecureInbox messages, not yet answered."""
    r = Round(6, seed=seed, privacy=(1.0, 0.5, DISTRIBUTED))
    collection = r.collection()
    answer_all(r, collection, collection.outbox())
    return r, collection, collection.tick(1.0)


def test_after_an_outage_only_the_unanswered_get_the_stage_again_and_a_resend_is_not_charged_twice():
    r, collection, inbox = at_the_mask_stage(seed=12)
    late = inbox[0].device
    answer_all(r, collection, inbox[1:])
    deadline = collection.deadline
    collection.postpone(30.0)
    assert collection.deadline == deadline + 30.0
    assert [m.device for m in collection.outbox()] == [late]
    (first,) = r.cores[late].on_secure(inbox[0])
    (resent,) = r.cores[late].on_secure(inbox[0])  # its answer was lost too: the stage comes again
    assert first.cost is not None and resent.cost is None
    assert np.array_equal(first.message.values, resent.message.values)


def test_a_device_whose_sigma_differs_from_the_rounds_declines():
    rng = np.random.default_rng(14)
    task = make_task(5, rng, noise_multiplier=0.5)
    core = AgentCore("d00", rng=np.random.default_rng(1),
                     privacy=PrivacyStep(1.0, 0.8, np.random.default_rng(2), DISTRIBUTED))
    (decline,) = core.on_task(task, 0.0)
    assert isinstance(decline, Decline) and decline.reason.startswith(NOISE_MISMATCH + ":")
    assert "σ=0.5" in decline.reason and "σ=0.8" in decline.reason
    for privacy in (None, PrivacyStep(1.0, 0.5, np.random.default_rng(2), LOCAL)):  # no shares: the ε would be a lie
        (decline,) = AgentCore("d00", rng=np.random.default_rng(1), privacy=privacy).on_task(task, 0.0)
        assert isinstance(decline, Decline) and "adds σ=0" in decline.reason
    matching = AgentCore("d00", rng=np.random.default_rng(1),
                         privacy=PrivacyStep(1.0, 0.5, np.random.default_rng(2), DISTRIBUTED))
    assert not isinstance(matching.on_task(task, 0.0)[0], Decline)


def test_a_device_forging_its_reveal_is_named_and_the_round_still_sums():
    r = Round(9, seed=15)
    collection = r.collection()
    answer_all(r, collection, collection.outbox())
    answer_all(r, collection, collection.tick(1.0))
    unmask = collection.tick(2.0)
    liar = unmask[0].device
    for msg in unmask:
        (action,) = r.cores[msg.device].on_secure(msg)
        reveal = action.message
        if msg.device == liar:
            forged = {p: encode_share(Share(decode_share(s).x, decode_share(s).y ^ 1)) for p, s in reveal.shares.items()}
            reveal = dataclasses.replace(reveal, shares=forged)
        assert collection.on_message(reveal) == ""
    outcome = collection.tick(3.0)
    assert isinstance(outcome, SecureSum)
    assert {revealer for _, revealer in outcome.bad_shares} == {liar} and len(outcome.bad_shares) >= 1
    np.testing.assert_allclose(secure_mean(outcome, r.task.masks), r.plain_mean(outcome.survivors), atol=2e-3)


def test_a_masked_vector_whose_cost_was_refused_never_leaves_on_a_resent_stage():
    r, _, inbox = at_the_mask_stage(seed=16)
    device = inbox[0].device
    (first,) = r.cores[device].on_secure(inbox[0])
    assert first.cost is not None
    r.cores[device].leave_secure(3)  # the daemon's ledger refused the cost: the device declined
    (again,) = r.cores[device].on_secure(inbox[0])
    assert not isinstance(again, SendSecure) and again.reason == "no_secure_round"
