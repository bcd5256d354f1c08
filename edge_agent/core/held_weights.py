"""The weights of the last tasks a device decoded, so that a task carrying only the change since
an earlier task (``RoundTask.base_round``, ``[strategy] task_values = "int8_delta"``) can be
applied: zero the held weights where the new mask is off, add the change. The coordinator does
the same float32 additions on the same decoded values (``coordinator/core/downlink.py``), so
both hold the same weights bit for bit.

Every task is decoded, selected or not, so a device that hears every broadcast can always apply
the next change. One that cannot (it was away, or restarted: nothing is kept on disk) declines
with ``missing_base`` and is sent the full weights. Pure; two tasks' weights in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np

from fedprune.protocol.messages import RoundTask
from fedprune.protocol.sparse import Params, SparseParams

KEPT_ROUNDS = 2  # the newest task's (a re-announcement of it) and the one before (its base)


class HeldWeights:
    def __init__(self) -> None:
        self._by_round: OrderedDict[int, Params] = OrderedDict()

    def resolve(self, task: RoundTask) -> RoundTask | None:
        """``task`` with full weights, or None when it carries a change against weights this
        device does not hold."""
        if task.base_round is None:
            self._keep(task.round, task.params())
            return task
        weights = self._by_round.get(task.round)  # a re-announcement of a change already applied
        if weights is None:
            base = self._by_round.get(task.base_round)
            if base is None:
                return None
            change = task.params()
            weights = {name: np.where(task.masks.get(name, True), base[name], np.float32(0)).astype(np.float32)
                       + change[name] for name in change}
            self._keep(task.round, weights)
        return replace(task, weights=SparseParams.from_dense(task.layout, weights, task.masks, check=False),
                       base_round=None)

    def of_round(self, round_number: int) -> Params | None:
        """The weights this device holds of round ``round_number``'s task, if it still keeps them."""
        return self._by_round.get(round_number)

    def _keep(self, round_number: int, weights: Params) -> None:
        self._by_round[round_number] = weights
        self._by_round.move_to_end(round_number)
        while len(self._by_round) > KEPT_ROUNDS:
            self._by_round.popitem(last=False)
