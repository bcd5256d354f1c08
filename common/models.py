"""Model zoo by name: the only way a model enters fedprune (no code ever comes over the wire).

A ``ModelSpec`` names a built-in architecture and its input/output sizes; both the coordinator and
every device derive the same ``ModelLayout`` from it. The layout order is the contract for masks,
sparse values and updates: ``named_parameters()`` in module order, then ``named_buffers()``.
Weights of Linear/Conv layers (dim >= 2) are masked (prunable); biases and normalisation
parameters are dense; BatchNorm running statistics are non-trainable buffers (docs/ALGORITHM.md §3.1).

Inputs are float32 arrays of shape ``(N, *input_shape)``. Datasets give a canonical shape with a
channel axis (digits: (1, 8, 8); mnist1d: (1, 40)); the MLP flattens whatever it gets, the CNNs
need (C, H, W) or (C, L). ``as_model_input`` also accepts flat rows (N, prod(input_shape)), the
shape a CSV file yields, and reshapes them.

Every model is a plain ``nn.Sequential`` of standard layers without data-dependent control flow,
so ``torch.onnx.export`` can trace it.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedprune.common.model_rules import MODEL_NAMES, input_shape_problem
from fedprune.protocol.layout import ModelLayout, TensorSpec

Params = dict[str, np.ndarray]
Masks = dict[str, np.ndarray]

NORMS = ("none", "group", "batch")
TRAINING_DEVICES = ("cpu", "cuda", "auto")  # resolved by fedprune.edge_agent.training.resolve_device
_DEFAULT_HIDDEN = {"mlp": (256, 128), "cnn2d": (), "cnn1d": ()}
DEFAULT_CHANNELS = (32, 64)
_MAX_UNITS = 1 << 16


@dataclass(frozen=True)
class ModelSpec:
    """A built-in architecture and its sizes.

    ``hidden``: widths of the fully connected hidden layers (None = the model's default: 256-128
    for the MLP, none for the CNNs). ``channels``: output channels of the CNNs' two conv blocks;
    32-64 by default because pruning needs width: at (16, 32) ERK left the 1-D CNN's middle conv
    6 % dense at 80 % sparsity and sparse trailed dense by 11 points, at (32, 64) by 1 on the
    validation split (while sending fewer bytes than the dense (16, 32) model;
    docs/ALGORITHM_NOTES.md §7).
    ``norm``: normalisation after each conv ("none", "group" or "batch"; the MLP has none).
    GroupNorm is preferred over BatchNorm for small, label-skewed local batches (docs/ALGORITHM.md §9.4).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    hidden: tuple[int, ...] | None = None
    channels: tuple[int, int] = DEFAULT_CHANNELS
    norm: str = "none"

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.name!r}: expected one of {MODEL_NAMES}")
        shape = tuple(self.input_shape)
        if not shape or any(not isinstance(d, int) or not 1 <= d <= _MAX_UNITS for d in shape):
            raise ValueError(f"input_shape={self.input_shape!r}: expected positive ints")
        object.__setattr__(self, "input_shape", shape)
        if not (isinstance(self.num_classes, int) and 2 <= self.num_classes <= _MAX_UNITS):
            raise ValueError(f"num_classes={self.num_classes!r}: expected an int >= 2")
        for field, widths in (("hidden", self.hidden or ()), ("channels", self.channels)):
            if any(not isinstance(w, int) or not 1 <= w <= _MAX_UNITS for w in widths):
                raise ValueError(f"{field}={widths!r}: expected positive ints")
        if self.hidden is not None:
            object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "channels", tuple(self.channels))
        if len(self.channels) != 2:
            raise ValueError(f"channels={self.channels!r}: expected two conv widths")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: expected one of {NORMS}")
        if self.name == "mlp" and self.norm != "none":
            raise ValueError("the mlp has no normalisation layers: use norm='none'")
        problem = input_shape_problem(self.name, shape)
        if problem:
            raise ValueError(problem)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return _DEFAULT_HIDDEN[self.name] if self.hidden is None else self.hidden


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)


def _head(layers: OrderedDict, n_in: int, spec: ModelSpec) -> None:
    for i, width in enumerate(spec.hidden_sizes):
        layers[f"fc{i}"] = nn.Linear(n_in, width)
        layers[f"relu_fc{i}"] = nn.ReLU()
        n_in = width
    layers["out"] = nn.Linear(n_in, spec.num_classes)


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised module (torch's standard init, drawn from torch's global RNG)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if spec.name == "mlp":
        layers["flatten"] = nn.Flatten()
        _head(layers, math.prod(spec.input_shape), spec)
        return nn.Sequential(layers)
    dims = 2 if spec.name == "cnn2d" else 1
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if dims == 2 else (nn.Conv1d, nn.MaxPool1d)
    kernel, pad = (3, 1) if dims == 2 else (5, 2)
    c_in, spatial = spec.input_shape[0], list(spec.input_shape[1:])
    for i, c_out in enumerate(spec.channels):
        layers[f"conv{i}"] = conv(c_in, c_out, kernel, padding=pad)
        if spec.norm != "none":
            layers[f"norm{i}"] = _norm(spec.norm, c_out, dims)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = pool(2)
        spatial = [s // 2 for s in spatial]
        c_in = c_out
    layers["flatten"] = nn.Flatten()
    _head(layers, c_in * math.prod(spatial), spec)
    return nn.Sequential(layers)


def _new_module(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """Build without touching torch's global RNG (its values are overwritten or seeded)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(spec)


@functools.lru_cache(maxsize=64)
def model_layout(spec: ModelSpec) -> ModelLayout:
    module = _new_module(spec, seed=0)
    tensors = [
        TensorSpec(name, tuple(p.shape), masked=p.dim() >= 2 and _is_prunable(module, name))
        for name, p in module.named_parameters()
    ]
    tensors += [
        TensorSpec(name, tuple(b.shape), masked=False, trainable=False)
        for name, b in module.named_buffers()
    ]
    return ModelLayout(tuple(tensors))


def _is_prunable(module: nn.Module, param_name: str) -> bool:
    owner_name, _, leaf = param_name.rpartition(".")
    owner = module.get_submodule(owner_name)
    return leaf == "weight" and isinstance(owner, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def init_params(spec: ModelSpec, seed: int) -> Params:
    """Standard torch initialisation, deterministic from ``seed`` (global RNG left untouched)."""
    return params_from_module(_new_module(spec, seed))


def params_from_module(module: nn.Module) -> Params:
    """Layout-ordered float32 copies of every parameter and buffer."""
    out: Params = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        out[name] = tensor.detach().to("cpu", torch.float32).numpy().copy()
    return out


def load_params(module: nn.Module, params: Params) -> None:
    """Copy ``params`` into ``module`` in place; names and shapes must match exactly."""
    targets = dict(module.named_parameters()) | dict(module.named_buffers())
    if set(targets) != set(params):
        missing, extra = sorted(set(targets) - set(params)), sorted(set(params) - set(targets))
        raise ValueError(f"params do not match the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, target in targets.items():
            value = np.asarray(params[name])
            if value.shape != tuple(target.shape):
                raise ValueError(f"{name}: shape {value.shape}, model expects {tuple(target.shape)}")
            target.copy_(torch.as_tensor(value).to(target.dtype))


def module_from_params(spec: ModelSpec, params: Params, device: str | torch.device = "cpu") -> nn.Module:
    module = _new_module(spec)
    load_params(module, params)
    return module.to(device)


def as_model_input(spec: ModelSpec, X: np.ndarray) -> np.ndarray:
    """``X`` as float32 (N, *input_shape); flat rows (N, prod(input_shape)) are reshaped."""
    X = np.asarray(X)
    if X.ndim < 1 or not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"X must be a real numeric array, got dtype {X.dtype} shape {X.shape}")
    if X.shape[1:] != spec.input_shape:
        if X.ndim == 2 and X.shape[1] == math.prod(spec.input_shape):
            X = X.reshape((X.shape[0], *spec.input_shape))
        else:
            raise ValueError(
                f"X has shape {X.shape}; model {spec.name} expects (N, *{spec.input_shape}) "
                f"or (N, {math.prod(spec.input_shape)})"
            )
    return np.ascontiguousarray(X, dtype=np.float32)


def check_labels(spec: ModelSpec, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"y must be 1-D with one label per sample: X has {len(X)}, y shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
        raise ValueError(f"labels must lie in [0, {spec.num_classes}), got [{y.min()}, {y.max()}]")
    return y.astype(np.int64, copy=False)


def evaluate(spec: ModelSpec, params: Params, X: np.ndarray, y: np.ndarray, batch_size: int = 512) -> EvalResult:
    """Accuracy and mean cross-entropy of the model on (X, y), in eval mode on the CPU."""
    X = as_model_input(spec, X)
    y = check_labels(spec, X, y)
    if len(y) == 0:
        raise ValueError("cannot evaluate on an empty set")
    module = module_from_params(spec, params).eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            xb = torch.from_numpy(X[start : start + batch_size])
            yb = torch.from_numpy(y[start : start + batch_size])
            logits = module(xb)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum").double())
            correct += int((logits.argmax(1) == yb).sum())
    return EvalResult(accuracy=correct / len(y), loss=loss_sum / len(y))


@functools.lru_cache(maxsize=64)
def _positions_per_weight(spec: ModelSpec) -> dict[str, int]:
    """For each prunable weight, how many output positions each weight entry is applied at."""
    module = _new_module(spec, seed=0).eval()
    layout = model_layout(spec)
    positions: dict[str, int] = {}
    hooks = []
    for name in (t.name for t in layout.masked):
        owner = module.get_submodule(name.rpartition(".")[0])

        def record(mod, inputs, output, name=name):
            positions[name] = math.prod(output.shape[2:]) if output.dim() > 2 else 1

        hooks.append(owner.register_forward_hook(record))
    with torch.no_grad():
        module(torch.zeros((1, *spec.input_shape)))
    for hook in hooks:
        hook.remove()
    return positions


def count_macs(spec: ModelSpec, masks: Masks | None = None) -> int:
    """Forward multiply-accumulates per example in the Linear/Conv layers, counting only active
    weights when ``masks`` is given (norms, pooling, activations and biases are not counted)."""
    total = 0
    for name, positions in _positions_per_weight(spec).items():
        active = int(np.count_nonzero(masks[name])) if masks is not None else model_layout(spec)[name].size
        total += active * positions
    return total
