"""Masked local training and the client readjust step (docs/ALGORITHM.md §3.4, §3.6, §4.6).

Theory of operation. The client receives theta^t (exact zeros outside the global mask m^t) and
trains it for K = E * ceil(|D_n| / B) SGD steps. The mask is not part of the autograd graph
(§9.2): pruned entries are zeros in ``W.data``, so ``W.grad`` is the dense gradient that growth
needs. Sparsity is kept by the optimiser, not the forward pass: g <- g * m before each step (so
weight decay and momentum see zeros there: momentum buffers stay exactly 0 at pruned positions)
and W <- W * m after it. On readjust rounds, after ceil(K/2) steps, every masked layer drops the
c = min(floor(p_t * k), #inactive) active weights of smallest |w| and grows c positions that
were inactive before this step, by largest |dense gradient| on the next local minibatch (or
uniformly at random, seeded, for growth="random"); ties go to the lower flat index (stable sort,
never torch.topk, §9.6), so nnz per layer is preserved exactly and server and client agree bit for
bit. Grown and dropped positions restart at weight 0 and momentum 0. The remaining steps then
train with the new mask, so grown weights reach the server with a trained value (§2 [OURS]).

Before any step the received model is evaluated on the local data, per class (§4.6 loss quality).
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
from torch.nn import functional as F

from fedprune.common.models import TRAINING_DEVICES
from fedprune.common.models import (
    Masks,
    ModelSpec,
    Params,
    as_model_input,
    check_labels,
    count_macs,
    model_layout,
    module_from_params,
)
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.layout import ModelLayout

_EVAL_BATCH = 1024


@dataclass(frozen=True)
class LocalResult:
    delta: Params
    buffers: Params
    masks: Masks
    mask_changed: bool
    n_examples: int
    steps: int
    train_loss: float
    class_losses: dict[int, tuple[float, int]]
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


def class_losses(model: nn.Module, X: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[int, tuple[float, int]]:
    """Mean cross-entropy of ``model`` (eval mode) on the samples of each class present in y.

    A class whose loss overflows (a diverged or poisoned global model) is left out: the protocol
    carries finite numbers only, and the coordinator reads a missing class as "no evidence"."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(num_classes, dtype=torch.float64, device=X.device)
    with torch.no_grad():
        for start in range(0, len(y), _EVAL_BATCH):
            yb = y[start : start + _EVAL_BATCH]
            losses = F.cross_entropy(model(X[start : start + _EVAL_BATCH]), yb, reduction="none")
            sums.index_add_(0, yb, losses.double())
    model.train(was_training)
    counts = torch.bincount(y, minlength=num_classes).cpu().numpy()
    sums_np = sums.cpu().numpy()
    means = {int(c): (float(sums_np[c] / counts[c]), int(counts[c])) for c in np.flatnonzero(counts)}
    return {c: pair for c, pair in means.items() if np.isfinite(pair[0])}


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


class MaskedSGD:
    """SGD with momentum and coupled weight decay (torch.optim.SGD) whose mask holds on the
    weights, the gradients and the momentum buffers of the masked tensors (§3.4).

    ``masks`` maps each masked parameter name of ``model`` to a bool tensor on the model's device;
    the weights must already be zero outside it. An optional FedProx term pulls every trainable
    tensor towards its value at construction (theta^t). A masked tensor of density d trains at
    lr * min(1/d, hp.max_sparse_lr_factor); readjusting keeps d, so the rate holds all round.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], hp: HyperParams) -> None:
        named = dict(model.named_parameters())
        self.model = model
        self.hp = hp
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
        self.optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """One masked SGD step on a minibatch; returns its (detached) cross-entropy."""
        loss = F.cross_entropy(self.model(xb), yb)
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

    def momentum(self, name: str) -> torch.Tensor | None:
        return self.optimizer.state.get(dict(self.model.named_parameters())[name], {}).get("momentum_buffer")

    def readjust(
        self, xb: torch.Tensor, yb: torch.Tensor, fraction: float, growth: str, generator: torch.Generator
    ) -> None:
        """Drop/grow every masked layer (§3.6); weights and momentum restart at 0 where the mask
        changed. Growth scores: |dense gradient| on (xb, yb), or uniform noise from ``generator``."""
        named = dict(self.model.named_parameters())
        if growth == "gradient":
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(xb), yb).backward()
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
                buf = self.momentum(name)
                if buf is not None:
                    buf.masked_fill_(changed, 0.0)
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
) -> LocalResult:
    """Train the received global model on local data with masked SGD (see the module docstring).

    ``params`` must be zero outside ``masks``; ``masks`` must hold a bool array for every masked
    tensor (all True for dense training). X is (N, *input_shape) or flat rows; y int labels.
    """
    layout = model_layout(spec)
    _check_state(layout, params, masks)
    X = as_model_input(spec, X)
    y = check_labels(spec, X, y)
    n = len(y)
    if n == 0:
        raise ValueError("no local training data")
    dev = torch.device(device)
    model = module_from_params(spec, params, dev)
    Xt, yt = torch.from_numpy(X).to(dev), torch.from_numpy(y).to(dev)
    losses_before = class_losses(model, Xt, yt, spec.num_classes)

    model.train()
    masked_names = [t.name for t in layout.masked]
    trainer = MaskedSGD(
        model, {name: torch.as_tensor(np.array(masks[name], dtype=bool)).to(dev) for name in masked_names}, hp
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
