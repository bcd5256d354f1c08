"""The task's weights on the downlink: full values, or only what changed since the last task.

``[strategy] task_values``: ``float32`` (exact), ``float16`` (the global values rounded; the
coordinator keeps float32 masters, so the rounding never accumulates), or ``int8_delta``: the
devices, which hold the previous task's weights, receive only the change, int8 with one scale
per tensor, and add it (``RoundTask.base_round``).

In ``int8_delta`` the coordinator keeps the weights the devices hold, bit for bit: both sides
add the same decoded int8 values to the same float32 base, zeroed where the new mask is off. The
change it sends is the new global weights minus those, so what rounding dropped in one round is
part of the next round's change: error feedback on the coordinator, with no state beyond the
held weights. A round whose task must go out full (the first, or one naming a device that
cannot apply the change) sends the global weights in float16 to everybody, and everybody holds
those; a re-announcement of a change to a device that lacks its base sends the held weights in
float32, so that device and the ones that applied the change hold the same.

Who can apply a change: ``holders``, the devices that held the last task's weights when it
went out. A full task makes every online member a holder; a device that registers (restarted,
reconnected), goes offline, or declines with ``missing_base`` is one no longer. After a
coordinator restart nobody is a holder until the first full task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from fedprune.protocol.quantise import Params, ValueDtype, quantise_params
from fedprune.protocol.sparse import SparseParams

TASK_VALUES = ("float32", "float16", "int8_delta")


@dataclass(frozen=True)
class TaskWeights:
    weights: SparseParams
    base_round: int | None  # None: full values; else the change since that round's task
    values: ValueDtype  # how they travel


class Downlink:
    def __init__(self, task_values: str) -> None:
        if task_values not in TASK_VALUES:
            raise ValueError(f"task_values {task_values!r}: expected one of {TASK_VALUES}")
        self.task_values = task_values
        self.holders: set[str] = set()
        self._held: Params | None = None  # what the devices hold after the last task that went out
        self._held_round: int | None = None
        self._round: _OpenRound | None = None

    @property
    def held(self) -> Params | None:
        """What a device that applied the open round's task holds (int8_delta; else None)."""
        return self._held

    def open(self, round_number: int, masters: SparseParams, params: Params) -> None:
        """Round ``round_number``'s task is about to go out: ``masters`` are the global weights
        on the round's masks, ``params`` the same as dense arrays."""
        change = None
        if self.task_values == "int8_delta" and self._held is not None:
            masks = masters.masks
            base = {name: np.where(masks.get(name, True), self._held[name], np.float32(0)).astype(np.float32)
                    for name in params}
            sent = quantise_params({name: params[name] - base[name] for name in params}, masks, ValueDtype.INT8)
            change = (TaskWeights(_sparse(masters, sent), self._held_round, ValueDtype.INT8),
                      {name: base[name] + sent[name] for name in params})
        self._round = _OpenRound(round_number, masters, params, change)

    def weights_for(self, selected: Iterable[str], online: Iterable[str]) -> TaskWeights:
        """The weights of the open round's task for a publication naming ``selected``."""
        opened = self._round
        if opened is None:
            raise RuntimeError("no round is open")
        if self.task_values != "int8_delta":
            values = ValueDtype.FLOAT16 if self.task_values == "float16" else ValueDtype.FLOAT32
            return TaskWeights(opened.masters, None, values)
        can_apply = opened.change is not None and set(selected) <= self.holders
        if opened.first is None:  # the round's first publication decides what the devices hold
            if can_apply:
                opened.first, self._held = opened.change
            else:
                # Everybody re-syncs to the float16 masters: half the bytes of float32, and the
                # next change corrects what float16 rounded off.
                self._held = quantise_params(opened.params, opened.masters.masks, ValueDtype.FLOAT16)
                opened.first = TaskWeights(_sparse(opened.masters, self._held), None, ValueDtype.FLOAT16)
                self.holders = set(online)
            self._held_round = opened.round
            return opened.first
        if opened.first.base_round is not None and can_apply:
            return opened.first
        # A re-announcement to a device that cannot apply this round's change (or of a full
        # task): the held weights themselves, in a precision that keeps them bit for bit.
        self.holders |= set(online)
        if opened.first.base_round is None:
            return opened.first
        if opened.exact is None:
            opened.exact = TaskWeights(_sparse(opened.masters, self._held), None, ValueDtype.FLOAT32)
        return opened.exact

    def lost(self, device: str) -> None:
        """``device`` may not hold the last task's weights (registered again, offline, declined)."""
        self.holders.discard(device)


@dataclass
class _OpenRound:
    round: int
    masters: SparseParams
    params: Params
    change: tuple[TaskWeights, Params] | None  # the change since the held weights, and what it leads to
    first: TaskWeights | None = None  # what its first publication carried
    exact: TaskWeights | None = None  # the held weights in float32, for devices that lack the change's base


def _sparse(masters: SparseParams, dense: Params) -> SparseParams:
    return SparseParams.from_dense(masters.layout, dense, masters.masks, check=False)
