"""Hostile devices for the simulation: an enrolled agent whose own update is replaced after its own
privacy step and before it is sealed (``AgentCore``'s ``tamper``), as a device with a valid key could do.

Each attacker knows what its device knows: its task (the global model of this round) and its
honest update; the "previous step" of ``free_rider_stale`` is the change of the global model
since the attacker's previous task (the previous round's step when it takes part every round).
Colluders also share their honest updates out of band: a ``Coalition`` trains the shards of the
round's other selected members on the round's task (the training each runs on its own device)
and gives each the shared poisoned update (``fedprune.coordinator.lab.attacks.collude``), on its
own mask, whatever order their tasks arrive in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedprune.coordinator.lab import attacks
from fedprune.edge_agent import worker
from fedprune.protocol.messages import RoundTask

Params = dict[str, np.ndarray]


class Coalition:
    def __init__(self, kind: str, scale: float, *, device: str, members: dict[str, Path]) -> None:
        self.kind, self.scale, self.device = kind, scale, device
        self.members = members
        self._round: int | None = None
        self._honest_updates: list[Params] = []  # the round's selected colluders' honest deltas

    def shared_update(self, task: RoundTask, member: str, masks: Params) -> Params:
        """``member``'s part of the colluders' one poisoned update for ``task``'s round, on its own
        ``masks``. The honest updates are trained here once per round, all alike (the caller's own
        may already carry its privacy noise; the others' would not)."""
        if self._round != task.round:
            selected = sorted({member} | {m for m in self.members if m in task.selected})
            self._round = task.round
            self._honest_updates = [self._honest(task, name) for name in selected]
        return attacks.collude(self._honest_updates, [masks] * len(self._honest_updates))[0]

    def _honest(self, task: RoundTask, member: str) -> Params:
        trained = worker.train(worker.TrainJob(
            model=task.model, params=task.params(), masks=task.masks, hyper=task.hyper.for_device(member),
            data_path=self.members[member], device=self.device, threads=1,
        ))
        trainable = {s.name for s in task.layout.trainable}
        return {k: v for k, v in trained.delta.items() if k in trainable}


class Hostile:
    """The ``tamper`` of one attacker: (task, honest delta, masks) -> what it sends instead."""

    def __init__(self, coalition: Coalition, device_id: str, rng: np.random.Generator) -> None:
        self.coalition = coalition
        self.device_id = device_id
        self.rng = rng
        self._last_global: Params | None = None
        self._previous_step: Params | None = None

    def __call__(self, task: RoundTask, delta: Params, masks: Params) -> Params:
        kind = self.coalition.kind
        if kind == "collude":
            return self.coalition.shared_update(task, self.device_id, masks)
        if kind == "free_rider_stale":  # the only attack that looks back: keep the global model it saw
            current = task.params()
            if self._last_global is not None:
                self._previous_step = {k: current[k] - self._last_global[k] for k in delta}
            self._last_global = current
        return attacks.poison(kind, delta, masks, self.rng, self.coalition.scale, self._previous_step)
