"""Masked local training and the client readjust step (docs/ALGORITHM.md §3.4, §3.6, §4.6).

Theory of operation. The client receives theta^t (exact zeros outside the global mask m^t) and
trains it for K = E * ceil(|D_n| / B) steps of SGD or AdamW (``hp.optimizer``) on the loss of the
spec's task kind (``fedprune.common.objectives``). The mask is not part of the autograd graph
(§9.2): pruned entries are zeros in ``W.data``, so ``W.grad`` is the dense gradient that growth
needs. Sparsity is kept by the optimiser, not the forward pass: g <- g * m before each step (so
weight decay and the optimiser's moments see zeros there: SGD's momentum and AdamW's first and
second moments stay exactly 0 at pruned positions) and W <- W * m after it. On readjust rounds, after ceil(K/2) steps, every masked layer drops the
c = min(floor(p_t * k), #inactive) active weights of smallest |w| and grows c positions that
were inactive before this step, by largest |dense gradient| on the next local minibatch (or
uniformly at random, seeded, for growth="random"); ties go to the lower flat index (stable sort,
never torch.topk, §9.6), so nnz per layer is preserved exactly and server and client agree bit for
bit. Grown and dropped positions restart at weight 0 and moments 0. The remaining steps then
train with the new mask, so grown weights reach the server with a trained value (§2 [OURS]).

Before any step the received model is evaluated on the local data, per group (per class for
classification; ``objectives.group_losses``), for the loss quality of §4.6.
Everything is deterministic from ``hp.seed`` (a private torch.Generator drives shuffling and
random growth), and the same code runs on CPU or CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedprune.common import objectives
from fedprune.common.models import TRAINING_DEVICES
from fedprune.common.models import (
    Masks,
    ModelSpec,
    Params,
    as_model_input,
    count_macs,
    model_layout,
    module_from_params,
)
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.layout import ModelLayout


@dataclass(frozen=True)
class LocalResult:
    delta: Params
    buffers: Params
    masks: Masks
    mask_changed: bool
    n_examples: int
    steps: int
    train_loss: float
    class_losses: dict[int, tuple[float, int]]  # per group of the task kind (objectives.group_losses)
    flops: int


def first_smallest(score: torch.Tensor, c: int) -> torch.Tensor:
    """Positions of the ``c`` smallest entries of a 1-D ``score``, ties to the lower position.

    The same set as the first c of a stable ascending argsort (§9.6), found with one selection
    (kthvalue) instead of a full sort: everything below the c-th value, then the lowest-indexed
    entries equal to it.
    """
    if c <= 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    if c >= score.numel():
        return torch.arange(score.numel(), device=score.device)
    threshold = torch.kthvalue(score, c).values
    below = torch.nonzero(score < threshold).squeeze(1)
    tied = torch.nonzero(score == threshold).squeeze(1)[: c - below.numel()]
    return torch.cat([below, tied])


def readjust_layer(
    mask: torch.Tensor, magnitude: torch.Tensor, grow_score: torch.Tensor, fraction: float
) -> torch.Tensor:
    """One layer's drop/grow (§3.6): a new bool mask with the same number of active entries.

    Drops the c = min(floor(fraction * k), #inactive) active entries of smallest ``magnitude`` and
    grows the c entries, inactive in ``mask``, of largest ``grow_score``; ties go to the lower flat
    index. Just-dropped entries are not growth candidates, so exactly c positions change each way.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r}: expected a number in [0, 1]")
    if mask.dtype != torch.bool or mask.shape != magnitude.shape or mask.shape != grow_score.shape:
        raise ValueError("mask must be bool and have the shape of magnitude and grow_score")
    flat = mask.flatten()
    active = torch.nonzero(flat).squeeze(1)
    inactive = torch.nonzero(~flat).squeeze(1)
    c = min(math.floor(fraction * active.numel()), inactive.numel())
    new = flat.clone()
    if c == 0:
        return new.view_as(mask)
    drop = active[first_smallest(magnitude.flatten()[active].abs(), c)]
    grow = inactive[first_smallest(-grow_score.flatten()[inactive], c)]
    new[drop] = False
    new[grow] = True
    return new.view_as(mask)


def readjust_masks(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    grow_scores: dict[str, torch.Tensor],
    fraction: float,
) -> dict[str, torch.Tensor]:
    """``readjust_layer`` on every masked layer independently."""
    return {name: readjust_layer(masks[name], weights[name], grow_scores[name], fraction) for name in masks}


def _check_state(layout: ModelLayout, params: Params, masks: Masks) -> None:
    if set(params) != set(layout.names):
        missing, extra = sorted(set(layout.names) - set(params)), sorted(set(params) - set(layout.names))
        raise ValueError(f"params do not match the layout: missing {missing}, unexpected {extra}")
    masked = {t.name for t in layout.masked}
    if set(masks) != masked:
        raise ValueError(f"masks must cover exactly the masked tensors {sorted(masked)}, got {sorted(masks)}")
    for spec in layout:
        value = np.asarray(params[spec.name])
        if value.shape != spec.shape:
            raise ValueError(f"{spec.name}: shape {value.shape}, layout expects {spec.shape}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{spec.name}: contains NaN or infinite values")
        if spec.masked:
            mask = np.asarray(masks[spec.name])
            if mask.dtype != np.bool_ or mask.shape != spec.shape:
                raise ValueError(f"mask {spec.name}: expected bool {spec.shape}, got {mask.dtype} {mask.shape}")
            if np.any(value[~mask]):
                raise ValueError(f"{spec.name}: nonzero values outside the mask")


def _batch_stream(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Minibatch indices over successive shuffled epochs, drawn lazily (one permutation at a time)."""
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


# The optimiser's per-position state: what the mask must hold on and readjust restarts at 0.
_MOMENTS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}
ADAMW_BETAS = (0.9, 0.999)


class MaskedOptimizer:
    """SGD (momentum, coupled weight decay) or AdamW (decoupled weight decay) from torch.optim,
    whose mask holds on the weights, the gradients and the optimiser's moments of the masked
    tensors (§3.4): ``hp.optimizer`` picks one, on the loss of ``task``.

    ``masks`` maps each masked parameter name of ``model`` to a bool tensor on the model's device;
    the weights must already be zero outside it. An optional FedProx term pulls every trainable
    tensor towards its value at construction (theta^t).

    A masked tensor of density d trains at lr * min(1/d, hp.max_sparse_lr_factor), for both
    optimisers; readjusting keeps d, so the rate holds all round. The rule compensates that a step
    moves a sparse layer's output ∝ d (its active inputs, docs/ALGORITHM_NOTES.md §5). AdamW's
    step per weight is scale-free (≈ lr whatever the gradient's size), but the output still moves
    by the sum over the active inputs, ∝ d, so the same correction applies; set the factor to 1
    for the plain rule. AdamW takes betas ADAMW_BETAS (``hp.momentum`` is SGD's only) and its bias
    correction counts the tensor's steps: a position grown at readjust starts from moments 0 under
    an already-advanced count, so its first steps are up to (1 - b1)/sqrt(1 - b2) ≈ 3.2 lr, as in
    RigL with Adam.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], hp: HyperParams,
                 task: str = "classification") -> None:
        named = dict(model.named_parameters())
        self.model = model
        self.hp = hp
        self.task = objectives.check_task(task)
        self.names = list(masks)
        self.masks = dict(masks)
        self._masked = [named[name] for name in self.names]
        self._mask_float = [self.masks[name].to(torch.float32) for name in self.names]
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._theta_t = [p.detach().clone() for p in self._trainable] if hp.prox_mu > 0 else []
        masked = {id(p) for p in self._masked}
        groups = [{"params": [p for p in self._trainable if id(p) not in masked]}]
        for param, mask in zip(self._masked, self._mask_float):
            density = max(float(mask.mean()), 1.0 / mask.numel())
            groups.append({"params": [param], "lr": hp.lr * min(1.0 / density, hp.max_sparse_lr_factor)})
        if hp.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                groups, lr=hp.lr, betas=ADAMW_BETAS, weight_decay=hp.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """One masked step on a minibatch; returns its (detached) loss."""
        loss = objectives.loss(self.task, self.model(xb), yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self._theta_t:
            diffs = torch._foreach_sub([p.detach() for p in self._trainable], self._theta_t)
            torch._foreach_add_([p.grad for p in self._trainable], diffs, alpha=self.hp.prox_mu)
        torch._foreach_mul_([p.grad for p in self._masked], self._mask_float)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_mul_(self._masked, self._mask_float)
        return loss.detach()

    def moments(self, name: str) -> dict[str, torch.Tensor]:
        """The optimiser's per-position state of parameter ``name`` (empty before its first step,
        and for SGD without momentum)."""
        state = self.optimizer.state.get(dict(self.model.named_parameters())[name], {})
        return {key: state[key] for key in _MOMENTS[self.hp.optimizer] if state.get(key) is not None}

    def readjust(
        self, xb: torch.Tensor, yb: torch.Tensor, fraction: float, growth: str, generator: torch.Generator
    ) -> None:
        """Drop/grow every masked layer (§3.6); weights and moments restart at 0 where the mask
        changed. Growth scores: |dense gradient| of the task's loss on (xb, yb), or uniform noise
        from ``generator``."""
        named = dict(self.model.named_parameters())
        if growth == "gradient":
            self.optimizer.zero_grad(set_to_none=True)
            objectives.loss(self.task, self.model(xb), yb).backward()
            scores = {name: named[name].grad.abs() for name in self.names}
            self.optimizer.zero_grad(set_to_none=True)
        elif growth == "random":
            device = self._masked[0].device if self._masked else xb.device
            scores = {name: torch.rand(named[name].shape, generator=generator).to(device) for name in self.names}
        else:
            raise ValueError(f"growth={growth!r}: expected 'gradient' or 'random'")
        weights = {name: named[name].detach() for name in self.names}
        new = readjust_masks(weights, self.masks, scores, fraction)
        with torch.no_grad():
            for name in self.names:
                changed = new[name] ^ self.masks[name]
                named[name].masked_fill_(changed, 0.0)
                for moment in self.moments(name).values():
                    moment.masked_fill_(changed, 0.0)
        self.masks = new
        self._mask_float = [new[name].to(torch.float32) for name in self.names]


def resolve_device(choice: str) -> str:
    """The torch device for a configured choice: "auto" is CUDA where torch sees a GPU (a Jetson
    with NVIDIA's wheel) and the CPU elsewhere; "cuda" without one is an error, not a fallback."""
    if choice not in TRAINING_DEVICES:
        raise ValueError(f"device {choice!r}: expected one of {TRAINING_DEVICES}")
    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        raise ValueError("device 'cuda' but torch sees no CUDA device (a CPU build of torch, or no GPU)")
    return "cpu"


def train_local(
    spec: ModelSpec,
    params: Params,
    masks: Masks,
    X: np.ndarray,
    y: np.ndarray,
    hp: HyperParams,
    device: str = "cpu",
    target_edges: tuple[tuple[float, ...], ...] = (),
) -> LocalResult:
    """Train the received global model on local data with a masked optimiser (see the module docstring).

    ``params`` must be zero outside ``masks``; ``masks`` must hold a bool array for every masked
    tensor (all True for dense training). X is (N, *input_shape) or flat rows; y as
    ``objectives.check_targets`` takes it for ``spec.task``; ``target_edges``: the regression
    group losses' bin edges per target (``objectives.group_losses``).
    """
    layout = model_layout(spec)
    _check_state(layout, params, masks)
    X = as_model_input(spec, X)
    y = objectives.check_targets(spec.task, spec.num_classes, len(X), y)
    n = len(y)
    if n == 0:
        raise ValueError("no local training data")
    dev = torch.device(device)
    model = module_from_params(spec, params, dev)
    Xt, yt = torch.from_numpy(X).to(dev), torch.from_numpy(y).to(dev)
    losses_before = objectives.group_losses(spec.task, model, Xt, yt, spec.num_classes, target_edges=target_edges)

    model.train()
    masked_names = [t.name for t in layout.masked]
    trainer = MaskedOptimizer(
        model, {name: torch.as_tensor(np.array(masks[name], dtype=bool)).to(dev) for name in masked_names}, hp,
        spec.task,
    )
    named = dict(model.named_parameters())
    trainable_specs = [t for t in layout if t.trainable]
    theta_t = [named[t.name].detach().clone() for t in trainable_specs]

    generator = torch.Generator().manual_seed(hp.seed)
    batches = _batch_stream(n, hp.batch_size, generator, dev)
    steps = hp.epochs * math.ceil(n / hp.batch_size)
    readjust_at = math.ceil(steps / 2) if hp.readjust and hp.prune_fraction > 0 else -1
    macs_before = macs_after = count_macs(spec, masks)
    samples_before = samples_after = readjust_macs = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    # At the readjust point `idx` is the next local minibatch (§3.6): the one the next step trains
    # on, or the first of a fresh epoch when the point falls after the last step (K = 1).
    idx = next(batches)
    for step in range(steps + 1):
        if step == readjust_at:
            trainer.readjust(Xt[idx], yt[idx], hp.prune_fraction, hp.growth, generator)
            macs_after = count_macs(spec, {k: v.cpu().numpy() for k, v in trainer.masks.items()})
            if hp.growth == "gradient":
                readjust_macs = len(idx) * (2 * macs_before + count_macs(spec))
        if step == steps:
            break
        loss_sum += trainer.step(Xt[idx], yt[idx])
        if readjust_at < 0 or step < readjust_at:
            samples_before += len(idx)
        else:
            samples_after += len(idx)
        idx = next(batches)

    final_masks = {name: trainer.masks[name].cpu().numpy().copy() for name in masked_names}
    delta: Params = {}
    with torch.no_grad():
        for t, p0 in zip(trainable_specs, theta_t):
            d = (named[t.name].detach() - p0).cpu().numpy().astype(np.float32)
            delta[t.name] = d * final_masks[t.name] if t.masked else d
    buffers = {name: b.detach().to("cpu", torch.float32).numpy().copy() for name, b in model.named_buffers()}
    changed = any(not np.array_equal(final_masks[name], masks[name]) for name in masked_names)
    flops = n * macs_before + 3 * (samples_before * macs_before + samples_after * macs_after) + readjust_macs
    return LocalResult(
        delta=delta,
        buffers=buffers,
        masks=final_masks,
        mask_changed=changed,
        n_examples=n,
        steps=steps,
        train_loss=float(loss_sum) / steps,
        class_losses=losses_before,
        flops=int(flops),
    )
