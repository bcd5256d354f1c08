"""int8_delta tasks: a device that applies every change holds the coordinator's reconstruction
bit for bit, the reconstruction follows the float32 masters within one int8 step (error feedback
on the coordinator), masks that move zero what they drop, and a device that cannot apply a
change is sent the full weights."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.coordinator.core.downlink import Downlink
from fedprune.edge_agent.core.held_weights import HeldWeights
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.layout import ModelLayout, TensorSpec
from fedprune.protocol.messages import ModelRef, RoundTask
from fedprune.protocol.sparse import SparseParams, ValueDtype

LAYOUT = ModelLayout((TensorSpec("fc.weight", (8, 16), True), TensorSpec("fc.bias", (8,), False)))
DEVICES = ("pi-1", "pi-2", "pi-3")


def task_for(downlink: Downlink, round_number: int, masks, selected=DEVICES, online=DEVICES) -> RoundTask:
    chosen = downlink.weights_for(selected, online)
    return RoundTask(federation="fed", round=round_number, mask_version=0, model=ModelRef("mlp", (16,), 8),
                     weights=chosen.weights, hyper=HyperParams(),
                     deadline=1e9, selected=tuple(selected), base_round=chosen.base_round)


def federation(rounds: int, seed: int = 0):
    """Global weights that drift and a mask that moves every 4th round, as a sparse run's do."""
    rng = np.random.default_rng(seed)
    mask = rng.random((8, 16)) < 0.3
    weights = {"fc.weight": rng.normal(0, 0.5, (8, 16)).astype(np.float32), "fc.bias": np.zeros(8, np.float32)}
    for r in range(1, rounds + 1):
        if r % 4 == 0:
            mask = mask.copy()
            drop = rng.choice(np.flatnonzero(mask), 3, replace=False)
            grow = rng.choice(np.flatnonzero(~mask), 3, replace=False)
            mask.flat[drop], mask.flat[grow] = False, True
        weights = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in weights.items()}
        params = {"fc.weight": np.where(mask, weights["fc.weight"], 0).astype(np.float32), "fc.bias": weights["fc.bias"]}
        yield r, params, {"fc.weight": mask}


def open_round(downlink: Downlink, r: int, params, masks) -> SparseParams:
    masters = SparseParams.from_dense(LAYOUT, params, masks)
    downlink.open(r, masters, params)
    return masters


def test_a_device_that_applies_every_change_holds_the_coordinators_weights_bit_for_bit() -> None:
    downlink, device = Downlink("int8_delta"), HeldWeights()
    kinds = []
    for r, params, masks in federation(30):
        open_round(downlink, r, params, masks)
        task = task_for(downlink, r, masks)
        kinds.append(task.base_round)
        held = device.resolve(task).params()
        expected = downlink.held
        for name in held:
            assert held[name].tobytes() == expected[name].tobytes(), (r, name)
            step = np.abs(params[name]).max() / 127
            assert np.abs(held[name] - params[name]).max() <= 2 * step + 1e-6  # follows the masters
        assert (held["fc.weight"][~masks["fc.weight"]] == 0).all()
    assert kinds[0] is None and kinds[1:] == list(range(1, 30))  # full once, then each change since the last


def test_a_device_that_missed_a_task_declines_and_the_re_announcement_is_full() -> None:
    downlink, device = Downlink("int8_delta"), HeldWeights()
    rounds = federation(5)
    for r, params, masks in rounds:
        open_round(downlink, r, params, masks)
        if r == 3:  # pi-3 heard nothing of round 3's task
            task_for(downlink, r, masks)
            continue
        task = task_for(downlink, r, masks)
        if r == 4:
            assert task.base_round == 3 and device.resolve(task) is None  # -> missing_base
            downlink.lost("pi-3")
            again = task_for(downlink, r, masks, selected=("pi-3",))
            assert again.base_round is None
            assert device.resolve(again).params()["fc.weight"].tobytes() == downlink.held["fc.weight"].tobytes()
            assert device.resolve(task) is not None  # the change of round 4 re-announced: already held
        else:
            assert device.resolve(task) is not None
    assert downlink.holders == set(DEVICES)


def test_a_task_for_a_device_that_is_not_a_holder_goes_out_full() -> None:
    downlink = Downlink("int8_delta")
    (r1, p1, m1), (r2, p2, m2) = list(federation(2))
    open_round(downlink, r1, p1, m1)
    assert downlink.weights_for(DEVICES, online=("pi-1", "pi-2")).base_round is None
    open_round(downlink, r2, p2, m2)
    assert downlink.weights_for(DEVICES, online=DEVICES).base_round is None  # pi-3 was not online for round 1
    open_round(downlink, 3, p2, m2)
    assert downlink.weights_for(("pi-1",), online=DEVICES).base_round == 2


@pytest.mark.parametrize("mode, values", [("float32", ValueDtype.FLOAT32), ("float16", ValueDtype.FLOAT16)])
def test_other_modes_always_send_the_masters(mode: str, values: ValueDtype) -> None:
    downlink = Downlink(mode)
    for r, params, masks in federation(3):
        masters = open_round(downlink, r, params, masks)
        chosen = downlink.weights_for(DEVICES, DEVICES)
        assert chosen.base_round is None and chosen.values is values and chosen.weights is masters


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="int8_delta"):
        Downlink("int4")
