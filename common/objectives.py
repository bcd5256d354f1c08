"""Task kinds: what "classification", "regression" and "multilabel" mean for loss, targets and metrics.

One place owns it, so training (the loss and the readjust gradient), evaluation and the
contribution signal cannot disagree about a kind:

- classification: y int (N,) in [0, C); cross-entropy on the logits; metrics accuracy, loss.
- regression: y float (N, T), or (N,) when T = 1; mean squared error over samples and targets;
  metrics mae, rmse, r2 (1 - squared error / the targets' variance about their means), loss (= rmse²).
- multilabel: y (N, L) of 0/1; binary cross-entropy on the logits, mean over samples and labels;
  metrics f1 (micro, a label predicted where sigmoid(logit) > 0.5, i.e. logit > 0), loss.

The headline ``Evaluation.score`` is higher-is-better for every kind and 1 at best: accuracy, f1,
or R² (regression also reports mae and rmse).

Group losses feed the loss-quality signal (docs/ALGORITHM.md §4.6, coordinator/core/contribution.py):
each device reports {group: (mean loss of the received model, samples)} and the coordinator
compares each group with its median over the devices that hold it, so a group must be a stratum
whose loss means the same on every device:

- classification: the class (the loss of a sample's own class, as before).
- multilabel: label l, over the samples where l is positive, with the BCE of label l only. All
  samples would mix in the negatives, whose loss follows the device's base rate of l (a device
  without positives of l has easy negatives and a low loss), i.e. label skew read as quality.
  Counting positives keeps the classification meaning: the loss on what the sample holds.
- regression: target dimension t × the bin of the sample's value of t, at the edges every round
  task carries (``RoundTask.target_edges``: the octiles of the coordinator's held-out targets;
  group t·B + b with B = edges + 1 bins), with that target's squared error. Like a class, a bin compares a
  device's loss with other devices' on similar targets: a device holding only extreme targets is
  not read as a bad one. Measured against one group per device and one per target dimension on
  benchmarks/experiments/regression_signal.py (docs/ALGORITHM_NOTES.md §11): as good IID (every
  corrupted client flagged), better under target skew (shuffled targets: 24/30 corrupted clients
  flagged against 11/30 per target and 9/30 with one group), no clean client flagged by any.
  Without held-out data the edges are the quartiles of N(0, 1), which assume standardised
  targets: targets far from unit scale all fall into one outer bin, i.e. one group per target,
  which reads a site whose targets differ by design as a bad one (the tabular example, raw kWh:
  two of eight honest sites at q = 0 and R² 0.63 with N(0, 1) edges, q 0.32 and 0.72 and R² 0.82
  with the held-out quartiles; docs/RESULTS.md).

Pure functions of tensors: no I/O, the same on CPU and CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedprune.common.model_rules import HEADLINE, TASK_KINDS

EVAL_BATCH = 1024
REGRESSION_BIN_EDGES = (-0.6745, 0.0, 0.6745)  # quartiles of N(0, 1): group 4t + b of target t


@dataclass(frozen=True)
class Evaluation:
    """Mean loss and the kind's metrics ("loss" among them) of a model on a set."""

    task: str
    loss: float
    metrics: Mapping[str, float]

    @property
    def score_name(self) -> str:
        return HEADLINE[self.task]

    @property
    def score(self) -> float:
        """The headline metric, higher is better and 1 at best: accuracy, f1, or R² (the
        fraction of the targets' variance explained), so one chart and one release gate serve
        every kind."""
        return self.metrics[HEADLINE[self.task]]


def check_task(task: str) -> str:
    if task not in TASK_KINDS:
        raise ValueError(f"task={task!r}: expected one of {TASK_KINDS}")
    return task


def check_targets(task: str, num_outputs: int, n_samples: int, y: object) -> np.ndarray:
    """``y`` validated for ``task`` and a model of ``num_outputs`` outputs, as the array the loss
    takes: int64 (N,) labels, float32 (N, T) regression targets, or float32 (N, L) 0/1 labels."""
    y = np.asarray(y)
    if task == "classification":
        if y.ndim != 1 or len(y) != n_samples:
            raise ValueError(f"y must be 1-D with one label per sample: X has {n_samples}, y shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype} (for real-valued targets "
                             "use task = \"regression\")")
        if len(y) and (y.min() < 0 or y.max() >= num_outputs):
            raise ValueError(f"labels must lie in [0, {num_outputs}), got [{y.min()}, {y.max()}]")
        return y.astype(np.int64, copy=False)
    if task == "regression":
        if y.ndim == 1 and num_outputs == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape != (n_samples, num_outputs):
            raise ValueError(f"regression targets must be (N, {num_outputs})" + (" or (N,)" if num_outputs == 1 else "")
                             + f" with one row per sample: X has {n_samples}, y shape {y.shape}")
        if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
            raise ValueError(f"regression targets must be real numbers, got dtype {y.dtype}")
        y = y.astype(np.float32)
        if not np.all(np.isfinite(y)):
            raise ValueError("regression targets contain NaN or infinite values (or overflow float32): drop or "
                             "impute those rows")
        return y
    if task == "multilabel":
        if y.ndim == 1 and num_outputs == 1:  # one label: a column, as the fit check allows
            y = y[:, None]
        if y.ndim != 2 or y.shape != (n_samples, num_outputs):
            raise ValueError(f"multi-label targets must be (N, {num_outputs}), one 0/1 column per label: "
                             f"X has {n_samples}, y shape {y.shape}")
        if y.dtype != np.bool_ and not (np.issubdtype(y.dtype, np.number) and np.all((y == 0) | (y == 1))):
            raise ValueError("multi-label targets must hold only 0 and 1 (or booleans): threshold or one-hot "
                             "encode them first")
        return y.astype(np.float32)
    raise ValueError(f"task={task!r}: expected one of {TASK_KINDS}")


def loss(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss of ``task``, averaged over the batch (and targets or labels)."""
    if task == "classification":
        return F.cross_entropy(outputs, targets)
    if task == "regression":
        return F.mse_loss(outputs, targets)
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(outputs, targets)
    raise ValueError(f"task={task!r}: expected one of {TASK_KINDS}")


def _elementwise(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample losses (N,) for classification, per-sample-and-output losses (N, K) otherwise."""
    if task == "classification":
        return F.cross_entropy(outputs, targets, reduction="none")
    if task == "regression":
        return F.mse_loss(outputs, targets, reduction="none")
    return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")


def _batches(module: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int):
    """(outputs, targets) over ``X`` in eval mode and without gradients; the mode is restored."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(y), batch_size):
                yield module(X[start : start + batch_size]), y[start : start + batch_size]
    finally:
        module.train(was_training)


def evaluate(task: str, module: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH) -> Evaluation:
    """Loss and metrics of ``module`` on (X, y), in eval mode. ``y`` as ``check_targets`` returns it
    (as a tensor on X's device); sums are float64, so the batch size does not change the result."""
    check_task(task)
    if len(y) == 0:
        raise ValueError("cannot evaluate on an empty set")
    sums = torch.zeros(4, dtype=torch.float64, device=X.device)  # loss, then per kind (see below)
    moments = torch.zeros((2, *y.shape[1:]), dtype=torch.float64, device=X.device)  # regression: Σy, Σy² per target
    for out, yb in _batches(module, X, y, batch_size):
        sums[0] += _elementwise(task, out, yb).double().sum()
        if task == "classification":
            sums[1] += (out.argmax(1) == yb).sum()
        elif task == "regression":
            sums[1] += (out - yb).abs().double().sum()
            moments[0] += yb.double().sum(0)
            moments[1] += (yb.double() ** 2).sum(0)
        else:
            predicted, actual = out > 0, yb > 0.5
            sums[1] += (predicted & actual).sum()  # true positives
            sums[2] += (predicted & ~actual).sum()  # false positives
            sums[3] += (~predicted & actual).sum()  # false negatives
    s = sums.cpu().tolist()
    elements = y.numel()
    if task == "classification":
        mean = s[0] / len(y)
        metrics = {"accuracy": s[1] / len(y), "loss": mean}
    elif task == "regression":
        mean = s[0] / elements
        spread = float((moments[1] - moments[0] ** 2 / len(y)).sum())  # Σ over targets of Σ (y - mean)²
        r2 = 1.0 - s[0] / spread if spread > 0 else float(s[0] == 0)
        metrics = {"mae": s[1] / elements, "rmse": math.sqrt(mean), "r2": r2, "loss": mean}
    else:
        mean = s[0] / elements
        # Nothing positive and nothing predicted: nothing to get wrong, so 1 (scikit-learn says 0).
        denominator = 2 * s[1] + s[2] + s[3]
        metrics = {"f1": 2 * s[1] / denominator if denominator else 1.0, "loss": mean}
    return Evaluation(task=task, loss=mean, metrics=metrics)


def group_losses(
    task: str, module: nn.Module, X: torch.Tensor, y: torch.Tensor, num_outputs: int, batch_size: int = EVAL_BATCH,
    target_edges: Sequence[Sequence[float]] = (),
) -> dict[int, tuple[float, int]]:
    """{group: (mean loss, samples)} of ``module`` (eval mode) on the groups present in (X, y); the
    groups of each kind are in the module docstring. ``target_edges``: regression's bin edges per
    target, the same count for each (the round task's, from the coordinator's held-out targets);
    empty: ``REGRESSION_BIN_EDGES`` for every target. A group whose loss overflows (a diverged or
    poisoned global model) is left out: the protocol carries finite numbers only, and the
    coordinator reads a missing group as "no evidence"."""
    check_task(task)
    per_target = [list(e) for e in target_edges] or [list(REGRESSION_BIN_EDGES)] * num_outputs
    if len(per_target) != num_outputs or len({len(e) for e in per_target}) != 1:
        raise ValueError(f"target_edges: expected one equally long list of edges per target ({num_outputs})")
    bins = len(per_target[0]) + 1
    groups = num_outputs * bins if task == "regression" else num_outputs
    sums = torch.zeros(groups, dtype=torch.float64, device=X.device)
    counts = torch.zeros(groups, dtype=torch.float64, device=X.device)
    edges = torch.tensor(per_target, dtype=torch.float64, device=X.device)  # (T, bins - 1)
    first_bin = torch.arange(num_outputs, device=X.device) * bins  # group of target t's lowest bin
    for out, yb in _batches(module, X, y, batch_size):
        losses = _elementwise(task, out, yb).double()
        if task == "classification":
            sums.index_add_(0, yb, losses)
            counts.index_add_(0, yb, torch.ones_like(losses))
        elif task == "regression":
            above = (yb.double().unsqueeze(-1) >= edges).sum(-1)  # (N, T): edges at or below each value
            group = (first_bin + above).flatten()
            sums.index_add_(0, group, losses.flatten())
            counts.index_add_(0, group, torch.ones_like(losses.flatten()))
        else:
            positive = yb > 0.5
            sums += torch.where(positive, losses, torch.zeros_like(losses)).sum(0)
            counts += positive.sum(0)
    means = {
        int(g): (float(total / n), int(n))
        for g, (total, n) in enumerate(zip(sums.cpu().tolist(), counts.cpu().tolist()))
        if n > 0
    }
    return {g: pair for g, pair in means.items() if math.isfinite(pair[0])}
