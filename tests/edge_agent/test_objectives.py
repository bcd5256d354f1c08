"""Task kinds (fedprune.common.objectives): losses, metrics and group losses against values computed
by hand on tiny tensors, and the target checks' messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedprune.common import objectives
from fedprune.common.objectives import Evaluation, check_targets, evaluate, group_losses


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# Outputs are fed as X through nn.Identity, so the "model" outputs exactly these values.
IDENTITY = nn.Identity()
CLS_OUT = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
CLS_Y = torch.tensor([0, 1, 1])
REG_OUT = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, -1.0]])
REG_Y = torch.tensor([[0.0, 2.0], [3.0, 0.0], [-2.0, 1.0]])
ML_OUT = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.2]])
ML_Y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])


def ce(row: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def bce(logit: float, target: float) -> float:
    return softplus(-logit) if target else softplus(logit)


def test_classification_loss_and_metrics_by_hand():
    per_sample = [ce(CLS_OUT[i].tolist(), int(CLS_Y[i])) for i in range(3)]
    result = evaluate("classification", IDENTITY, CLS_OUT, CLS_Y)
    assert result.loss == pytest.approx(sum(per_sample) / 3, rel=1e-6)
    assert result.metrics == {"accuracy": pytest.approx(2 / 3), "loss": pytest.approx(result.loss)}
    assert result.score == pytest.approx(2 / 3)
    assert float(objectives.loss("classification", CLS_OUT, CLS_Y)) == pytest.approx(result.loss, rel=1e-6)


def test_regression_loss_and_metrics_by_hand():
    # errors: (1, 0), (0, 4), (2, -2): squared 1, 0, 0, 16, 4, 4 over 6 entries
    result = evaluate("regression", IDENTITY, REG_OUT, REG_Y)
    assert result.loss == pytest.approx(25 / 6)
    assert result.metrics["mae"] == pytest.approx(9 / 6)
    assert result.metrics["rmse"] == pytest.approx(math.sqrt(25 / 6))
    y = REG_Y.double().numpy()
    spread = float(((y - y.mean(0)) ** 2).sum())
    assert result.metrics["r2"] == pytest.approx(1 - 25 / spread)
    assert result.score == result.metrics["r2"] and result.score_name == "r2"
    assert float(objectives.loss("regression", REG_OUT, REG_Y)) == pytest.approx(25 / 6)


def test_multilabel_loss_and_micro_f1_by_hand():
    # predicted (logit > 0): (1, 0, 1), (0, 1, 0); TP 2, FP 1 (row 0 label 2), FN 1 (row 1 label 2)
    expected = sum(bce(float(ML_OUT[i, j]), float(ML_Y[i, j])) for i in range(2) for j in range(3)) / 6
    result = evaluate("multilabel", IDENTITY, ML_OUT, ML_Y)
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert result.score == result.metrics["f1"]
    assert float(objectives.loss("multilabel", ML_OUT, ML_Y)) == pytest.approx(expected, rel=1e-6)


def test_f1_is_one_when_nothing_is_positive_or_predicted():
    result = evaluate("multilabel", IDENTITY, -torch.ones(2, 3), torch.zeros(2, 3))
    assert result.metrics["f1"] == 1.0


@pytest.mark.parametrize("task, out, y", [("classification", CLS_OUT, CLS_Y), ("regression", REG_OUT, REG_Y),
                                          ("multilabel", ML_OUT, ML_Y)])
def test_evaluation_does_not_depend_on_the_batch_size(task, out, y):
    whole, one_by_one = evaluate(task, IDENTITY, out, y), evaluate(task, IDENTITY, out, y, batch_size=1)
    assert whole.metrics == pytest.approx(one_by_one.metrics, rel=1e-12)


def test_evaluate_restores_the_module_mode_and_refuses_an_empty_set():
    module = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train()
    evaluate("classification", module, CLS_OUT, CLS_Y)
    assert module.training
    with pytest.raises(ValueError, match="empty"):
        evaluate("classification", module, CLS_OUT[:0], CLS_Y[:0])
    with pytest.raises(ValueError, match="task='ranking'"):
        evaluate("ranking", module, CLS_OUT, CLS_Y)


def test_score_is_the_headline_metric_higher_is_better():
    assert Evaluation("classification", 0.3, {"accuracy": 0.9, "loss": 0.3}).score == 0.9
    assert Evaluation("multilabel", 0.3, {"f1": 0.7, "loss": 0.3}).score == 0.7
    assert Evaluation("regression", 4.0, {"mae": 1.5, "rmse": 2.0, "r2": 0.25, "loss": 4.0}).score == 0.25


# ---- group losses: what the contribution signal compares across devices


def test_classification_groups_are_classes():
    groups = group_losses("classification", IDENTITY, CLS_OUT, CLS_Y, 3)
    assert groups.keys() == {0, 1}  # class 2 absent: no evidence, not a zero
    assert groups[0] == (pytest.approx(ce(CLS_OUT[0].tolist(), 0)), 1)
    assert groups[1] == (pytest.approx((ce(CLS_OUT[1].tolist(), 1) + ce(CLS_OUT[2].tolist(), 1)) / 2), 2)


def test_multilabel_groups_are_labels_over_their_positive_samples():
    groups = group_losses("multilabel", IDENTITY, ML_OUT, ML_Y, 3)
    assert groups == {0: (pytest.approx(softplus(-2.0)), 1), 1: (pytest.approx(softplus(-1.0)), 1),
                      2: (pytest.approx(softplus(0.2)), 1)}


def test_regression_groups_are_target_dimension_and_bin_of_the_target():
    # edges (-0.6745, 0, 0.6745): bins of target 0: 0 -> 2, 3 -> 3, -2 -> 0; of target 1: 2 -> 3, 0 -> 2, 1 -> 3
    groups = group_losses("regression", IDENTITY, REG_OUT, REG_Y, 2)
    assert groups == {2: (1.0, 1), 3: (0.0, 1), 0: (4.0, 1), 4 + 3: (pytest.approx(2.0), 2), 4 + 2: (16.0, 1)}
    assert sum(n for _, n in groups.values()) == REG_Y.numel()


def test_a_diverged_model_reports_no_group():
    for task, out, y, k in [("regression", REG_OUT, REG_Y, 2), ("multilabel", ML_OUT, ML_Y, 3)]:
        assert group_losses(task, IDENTITY, out * float("inf"), y, k) == {}


# ---- targets: checked and converted per kind, with the fix in the message


def test_check_targets_converts_each_kind():
    labels = check_targets("classification", 3, 3, np.array([0, 2, 1], dtype=np.int32))
    assert labels.dtype == np.int64 and labels.tolist() == [0, 2, 1]
    single = check_targets("regression", 1, 3, [0.5, 1.0, -2.0])
    assert single.dtype == np.float32 and single.shape == (3, 1)
    assert check_targets("regression", 2, 2, np.ones((2, 2), np.float64)).dtype == np.float32
    flags = check_targets("multilabel", 2, 2, np.array([[True, False], [False, False]]))
    assert flags.dtype == np.float32 and flags.tolist() == [[1.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("task, k, y, message", [
    ("classification", 3, np.array([0.5, 1.0]), "integer class labels"),
    ("classification", 3, np.array([0, 3]), r"labels must lie in \[0, 3\)"),
    ("classification", 3, np.array([[0], [1]]), "1-D with one label per sample"),
    ("regression", 2, np.zeros(2), r"must be \(N, 2\) with one row"),
    ("regression", 1, np.zeros((3, 1)), r"\(N, 1\) or \(N,\)"),
    ("regression", 1, np.array([1.0, np.nan]), "NaN or infinite"),
    ("regression", 1, np.array(["a", "b"]), "real numbers"),
    ("multilabel", 2, np.array([[0, 2], [1, 0]]), "only 0 and 1"),
    ("multilabel", 2, np.array([1, 0]), r"\(N, 2\), one 0/1 column per label"),
    ("survival", 2, np.array([1, 0]), "expected one of"),
])
def test_check_targets_refuses_with_the_fix(task, k, y, message):
    with pytest.raises(ValueError, match=message):
        check_targets(task, k, 2, y)


def test_regression_bins_follow_the_edges_the_task_carries():
    """Edges on the targets' own scale (the coordinator's held-out octiles): kWh, not N(0, 1)."""
    out = torch.tensor([[100.0], [250.0], [30.0], [400.0]])
    y = torch.tensor([[110.0], [240.0], [20.0], [420.0]])
    groups = group_losses("regression", IDENTITY, out, y, 1, target_edges=((50.0, 200.0, 300.0),))
    assert groups == {0: (100.0, 1), 1: (100.0, 1), 2: (100.0, 1), 3: (400.0, 1)}
    assert set(group_losses("regression", IDENTITY, out, y, 1)) == {3}  # N(0, 1) quartiles: one bin
    with pytest.raises(ValueError, match="target_edges"):
        group_losses("regression", IDENTITY, out, y, 1, target_edges=((1.0,), (2.0,)))

