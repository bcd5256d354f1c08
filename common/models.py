"""Models by factory: the only way a model enters fedprune (no code ever comes over the wire).

A ``ModelSpec`` names a factory (an import path, or a built-in alias, ``fedprune.common.zoo``),
its keyword arguments, the sample shape, the number of outputs and the task kind; the
coordinator and every device call the same factory with the same arguments (they travel in the
signed round task) and derive the same ``ModelLayout``. The layout order is the contract for
masks, sparse values and updates: ``named_parameters()`` in module order, then ``named_buffers()``.

Which tensors are masked (prunable): the weights of Linear, Conv1d/2d/3d (grouped and depthwise
included), ConvTranspose and Embedding layers and the weight matrices of LSTM/GRU/RNN layers;
biases, normalisation parameters and buffers (BatchNorm running statistics, travelling as
non-trainable values) stay dense. A factory overrides this by setting ``fedprune_masked`` on the
module it returns: the complete collection of parameter names to mask.

Inputs are float32 arrays of shape ``(N, *input_shape)``; ``as_model_input`` also accepts flat
rows (N, prod(input_shape)), the shape a CSV file yields, and reshapes them.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedprune.common import objectives
from fedprune.common.model_rules import ModelArgs, factory_path, normalise_args, task_problem
from fedprune.common.objectives import Evaluation
from fedprune.common.references import UnresolvedReference, resolve_callable
from fedprune.protocol.layout import ModelLayout, TensorSpec

Params = dict[str, np.ndarray]
Masks = dict[str, np.ndarray]

TRAINING_DEVICES = ("cpu", "cuda", "auto")  # resolved by fedprune.edge_agent.training.resolve_device
_MAX_UNITS = 1 << 16
MASKED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag)
RECURRENT_MODULES = (nn.LSTM, nn.GRU, nn.RNN)


class ModelFactoryError(ValueError):
    """The factory cannot be imported or called, or returned no usable module; the message names
    the factory and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """A model: factory reference, its sizes and arguments, and what it learns.

    ``name``: a built-in alias ("mlp", "cnn2d", "cnn1d") or ``"package.module:factory"``.
    ``num_classes``: the number of outputs (classes, labels, or regression targets).
    ``args``: the factory's keyword arguments (a mapping, stored as a sorted tuple so that specs
    hash); the factory also gets ``input_shape`` and ``num_outputs`` when its signature names them.
    ``task``: "classification", "regression" or "multilabel" (``fedprune.common.objectives``).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    args: ModelArgs = ()
    task: str = "classification"

    def __post_init__(self) -> None:
        factory_path(self.name)
        shape = tuple(self.input_shape)
        if not shape or any(not isinstance(d, int) or not 1 <= d <= _MAX_UNITS for d in shape):
            raise ValueError(f"input_shape={self.input_shape!r}: expected positive ints")
        object.__setattr__(self, "input_shape", shape)
        if not (isinstance(self.num_classes, int) and 1 <= self.num_classes <= _MAX_UNITS):
            raise ValueError(f"num_classes={self.num_classes!r}: expected an int >= 1")
        problem = task_problem(self.task, self.num_classes)
        if problem:
            raise ValueError(problem)
        object.__setattr__(self, "args", normalise_args(self.args))

    @property
    def factory(self) -> str:
        return factory_path(self.name)

    @property
    def kwargs(self) -> dict[str, object]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.args}


def _load_factory(path: str):
    try:
        return resolve_callable(path)
    except UnresolvedReference as exc:
        raise ModelFactoryError(f"model {path!r}: {exc}; install the package that provides it here (pip install "
                                "...), or fix the model reference; it must name a function or class that returns "
                                "a torch.nn.Module") from None


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised module from the spec's factory (drawing on torch's global RNG)."""
    factory = _load_factory(spec.factory)
    kwargs = spec.kwargs
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in (("input_shape", list(spec.input_shape)), ("num_outputs", spec.num_classes)):
        if takes_any or key in parameters:
            kwargs[key] = value
    try:
        module = factory(**kwargs)
    except Exception as exc:  # the user's code: whatever it raises is a model that cannot be built
        raise ModelFactoryError(f"model {spec.name!r} with arguments {spec.kwargs}: {type(exc).__name__}: {exc}; fix "
                                "the model arguments (model_args) or input_shape/num_classes") from None
    if not isinstance(module, nn.Module):
        raise ModelFactoryError(f"model {spec.name!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def output_problem(spec: ModelSpec) -> str | None:
    """Why the model cannot take the spec's samples or does not give one output per class, label
    or target (a factory that ignores input_shape or num_outputs); None when it can. One forward
    pass of two zero samples: where this fails, every evaluation and training would."""
    module = _new_module(spec, seed=0).eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros((2, *spec.input_shape)))
    except Exception as exc:  # the user's forward
        return f"model {spec.name!r} fails on samples of shape {spec.input_shape}: {type(exc).__name__}: {exc}"
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return (f"model {spec.name!r} gives {shape} for 2 samples; num_classes = {spec.num_classes} needs "
                f"(2, {spec.num_classes}): one output per class, label or target")
    return None


def _new_module(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """Build without touching torch's global RNG (its values are overwritten or seeded)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(spec)


@functools.lru_cache(maxsize=64)
def model_layout(spec: ModelSpec) -> ModelLayout:
    module = _new_module(spec, seed=0)
    masked = masked_names(module)
    tensors = [TensorSpec(name, tuple(p.shape), masked=name in masked) for name, p in module.named_parameters()]
    tensors += [
        TensorSpec(name, tuple(b.shape), masked=False, trainable=False)
        for name, b in module.named_buffers()
    ]
    return ModelLayout(tuple(tensors))


def masked_names(module: nn.Module) -> frozenset[str]:
    """The parameters sparse training masks: the module's own ``fedprune_masked`` if it sets one,
    else the weight matrices of the layers in MASKED_MODULES and RECURRENT_MODULES (see above)."""
    params = dict(module.named_parameters())
    override = getattr(module, "fedprune_masked", None)
    if override is not None:
        chosen = frozenset(override)
        unknown = sorted(chosen - set(params))
        if unknown or isinstance(override, str):
            raise ModelFactoryError(f"fedprune_masked names {unknown or override!r}, which are not parameters of the "
                                    f"model; expected names from {sorted(params)[:8]}...")
        return chosen
    out = set()
    for name in params:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if (isinstance(owner, MASKED_MODULES) and leaf == "weight") or (
                isinstance(owner, RECURRENT_MODULES) and leaf.startswith(("weight_ih_l", "weight_hh_l"))):
            out.add(name)
    return frozenset(out)


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
    """``y`` checked against the spec's task and outputs (``fedprune.common.objectives``)."""
    return objectives.check_targets(spec.task, spec.num_classes, len(X), y)


def evaluate(spec: ModelSpec, params: Params, X: np.ndarray, y: np.ndarray, batch_size: int = 512) -> Evaluation:
    """Loss and the task's metrics (``.score``: accuracy, f1 or R²) of the model on (X, y), in
    eval mode on the CPU."""
    X = as_model_input(spec, X)
    y = check_labels(spec, X, y)
    module = module_from_params(spec, params).eval()
    return objectives.evaluate(spec.task, module, torch.from_numpy(X), torch.from_numpy(y), batch_size)


@functools.lru_cache(maxsize=64)
def _positions_per_weight(spec: ModelSpec) -> dict[str, int]:
    """For each masked weight, how many times per example each of its entries multiplies: once
    per output position of a Linear or conv, per input position of a transposed conv, per time
    step of a recurrent layer; an embedding looks up, it does not multiply (0)."""
    module = _new_module(spec, seed=0).eval()
    positions: dict[str, int] = {}
    hooks = []
    for name in (t.name for t in model_layout(spec).masked):
        owner = module.get_submodule(name.rpartition(".")[0])

        def record(mod, inputs, output, name=name):
            positions[name] = _applications(mod, inputs[0] if inputs else None, output)

        hooks.append(owner.register_forward_hook(record))
    try:
        with torch.no_grad():
            module(torch.zeros((1, *spec.input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    return positions


def _applications(module: nn.Module, given: object, output: object) -> int:
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return 0
    if isinstance(module, RECURRENT_MODULES) and isinstance(given, torch.Tensor):
        if given.dim() < 3:
            return given.shape[0]
        return given.shape[1] if module.batch_first else given.shape[0]
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and isinstance(given, torch.Tensor):
        return math.prod(given.shape[2:])
    if isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
        return output.numel() // max(1, output.shape[-1])
    if isinstance(output, torch.Tensor) and output.dim() > 2:
        return math.prod(output.shape[2:])
    return 1


def count_macs(spec: ModelSpec, masks: Masks | None = None) -> int:
    """Forward multiply-accumulates per example in the masked layers, counting only active
    weights when ``masks`` is given (norms, pooling, activations and biases are not counted)."""
    total = 0
    for name, positions in _positions_per_weight(spec).items():
        active = int(np.count_nonzero(masks[name])) if masks is not None else model_layout(spec)[name].size
        total += active * positions
    return total
