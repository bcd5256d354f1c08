"""The training child's failures reach the agent's log as one line, not a cut-off traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedprune.edge_agent.worker import TrainJob, WorkerError, train_in_child
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.messages import ModelRef


def test_a_failing_training_child_reports_its_exception_in_one_line(tmp_path: Path) -> None:
    job = TrainJob(model=ModelRef("mlp", (64,), 10), params={}, masks={}, hyper=HyperParams(),
                   data_path=tmp_path / "missing", device="cpu", threads=1)
    with pytest.raises(WorkerError) as info:
        train_in_child(job)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message == f"fedprune.common.data.LocalDataError: {tmp_path / 'missing'}: no such file or directory"
