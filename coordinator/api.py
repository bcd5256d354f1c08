"""fedprune from Python: a simulation or a fleet's coordinator built from Python objects.

What a notebook needs, on the same code the command line runs: ``simulate`` builds the
``SimulationConfig`` the ``simulate`` command reads from TOML (same keys, same checks, same
messages) and runs it through the deployed daemons (``fedprune.coordinator.lab.simulate``);
``coordinator_config`` writes the ``coordinator.toml`` and keys that ``fedprune-coordinator init``
writes, for ``run`` (or ``fedprune-coordinator run``). Arrays are written to ``.npz`` files
first, so that they reach the devices through the loader a fleet's agents use.

    from fedprune.coordinator import api
    run = api.simulate(model="mypkg.nets:make_model", model_args={"width": 32},
                       data=(X, y), test=(X_test, y_test), n_clients=8,
                       strategy={"rounds": 20, "sparsity": 0.8})
    run.history[-1]["score"], run.module(), run.export("model.onnx")
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from fedprune.common.configkit import ConfigError

Arrays = tuple[np.ndarray, np.ndarray]
DataArg = Union[str, Path, Arrays, Mapping[str, Arrays]]


@dataclass(frozen=True)
class SimulationRun:
    """A finished simulation: its round records, the final global model and how to export it."""

    history: list[dict[str, Any]]
    result: Any  # fedprune.coordinator.lab.simulate.SimulationResult: bytes, scores, noisy clients
    spec: Any  # fedprune.common.models.ModelSpec
    params: dict[str, np.ndarray] = field(repr=False)
    masks: dict[str, np.ndarray] = field(repr=False)

    def module(self):
        """The global model as a torch module (eval mode, CPU)."""
        from fedprune.common.models import module_from_params

        return module_from_params(self.spec, self.params).eval()

    def export(self, path: str | Path, *, variant: str = "compact", opset: int = 18) -> Path:
        """The global model as an ONNX file (``dense``, ``compact`` or ``int8``), as a release is."""
        from fedprune.common.fsutil import atomic_write
        from fedprune.coordinator.releases import export_variant

        rounds = len(self.history)
        blob = export_variant(self.spec, self.params, variant=variant, opset=opset,
                              metadata={"federation": "simulation", "round": rounds, "mask_version": 0})
        atomic_write(Path(path), blob, mode=0o644)
        return Path(path)


def simulate(
    *,
    model: str = "mlp",
    model_args: Mapping[str, Any] | None = None,
    task: str = "classification",
    data: DataArg | None = None,
    test: str | Path | Arrays | None = None,
    data_format: Mapping[str, Any] | None = None,
    strategy: Mapping[str, Any] | None = None,
    privacy: Mapping[str, Any] | None = None,
    workdir: str | Path | None = None,
    device: str = "cpu",
    **simulation: Any,
) -> SimulationRun:
    """Run a simulated federation and return its history and final model.

    ``data``: a path (file or directory, read as ``data_format`` says: the ``[data]`` table of
    docs/DATA.md), an ``(X, y)`` pair split over ``n_clients`` by ``partition``, or a mapping
    device -> ``(X, y)``; None: the built-in ``dataset`` (``digits`` or ``mnist1d``). ``test``: the
    held-out set (else ``test_fraction`` of the data). ``strategy`` and ``privacy`` are the
    ``[strategy]`` (with a nested ``local`` table) and ``[privacy]`` tables; any other keyword is a
    ``[simulation]`` key (``n_clients``, ``partition``, ``beta``, ``seed``, ``noisy_fraction``...).
    ``workdir`` keeps the federation's files (default: a temporary directory). Raises
    ``ConfigError`` naming the key for anything malformed.
    """
    from fedprune.coordinator.lab.simulate import SimulationConfig, run_simulation

    with tempfile.TemporaryDirectory(prefix="fedprune-api-") as scratch:
        files = Path(workdir) / "inputs" if workdir is not None else Path(scratch)
        table = {"model": model, "model_args": dict(model_args or {}), "task": task, **simulation}
        table.update(_data_keys(data, test, files))
        config = SimulationConfig.from_dict({"simulation": table, "strategy": dict(strategy or {}),
                                             "privacy": dict(privacy or {}), "data": dict(data_format or {})})
        federation = Path(workdir) / "federation" if workdir is not None else None
        result, final = run_simulation(config, device=device, workdir=federation, with_model=True)
    return SimulationRun(history=result.rounds, result=result, spec=final.spec, params=final.params,
                         masks=final.masks)


def _data_keys(data: DataArg | None, test: str | Path | Arrays | None, files: Path) -> dict[str, str]:
    """The [simulation] keys naming ``data`` and ``test``, arrays saved under ``files`` first."""
    keys: dict[str, str] = {}
    if data is None:
        if test is not None:
            raise ConfigError("test: a held-out set needs data beside it (the built-in datasets have their own)")
        return keys
    if isinstance(data, (str, Path)):
        keys["data"] = str(data)
    elif isinstance(data, Mapping):
        for device, pair in data.items():
            _save(files / "devices" / str(device) / "data.npz", pair, f"data[{device!r}]")
        keys["data_dir"] = str(files / "devices")
    else:
        keys["data"] = str(_save(files / "data.npz", data, "data"))
    if isinstance(test, (str, Path)):
        keys["test_data"] = str(test)
    elif test is not None:
        keys["test_data"] = str(_save(files / "test.npz", test, "test"))
    return keys


def _save(path: Path, pair: object, what: str) -> Path:
    if not (isinstance(pair, tuple) and len(pair) == 2):
        raise ConfigError(f"{what}: expected an (X, y) pair of arrays, a path, or a mapping device -> (X, y)")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, X=np.asarray(pair[0]), y=np.asarray(pair[1]))
    return path


def coordinator_config(
    *,
    config_path: str | Path,
    state_dir: str | Path,
    federation: str,
    model: str = "mlp",
    model_args: Mapping[str, Any] | None = None,
    task: str = "classification",
    input_shape: tuple[int, ...],
    num_classes: int,
    broker_url: str = "mqtt://127.0.0.1:1883",
    embedded_broker: bool = False,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
):
    """Write a fleet's ``coordinator.toml`` and keys (as ``fedprune-coordinator init`` does, with
    the model and any other section's ``settings``) and return the loaded config: enroll devices
    with ``fedprune-coordinator enroll``, then ``run(config)``."""
    from fedprune.coordinator.config import load_config
    from fedprune.coordinator.fleet import enrollment

    values: dict[str, dict[str, Any]] = {section: dict(table) for section, table in (settings or {}).items()}
    values.setdefault("federation", {}).update(model=model, model_args=dict(model_args or {}), task=task,
                                               input_shape=tuple(input_shape), num_classes=num_classes)
    enrollment.init(config_path=Path(config_path), state_dir=Path(state_dir), federation=federation,
                    broker_url=broker_url, embedded_broker=embedded_broker, settings=values, force=force)
    return load_config(Path(config_path), env={})


def run(config) -> int:
    """Run the coordinator until its rounds are done or it is stopped (SIGTERM, Ctrl-C): what
    ``fedprune-coordinator run`` does, the embedded broker included when the config asks."""
    from fedprune.coordinator.daemon import run_with_broker

    return run_with_broker(config)


def export(config, path: str | Path, *, variant: str | None = None) -> dict[str, Any]:
    """The newest checkpoint's global model as an ONNX file; returns its metadata."""
    from fedprune.coordinator.releases import export_checkpoint

    _, metadata = export_checkpoint(config, Path(path), variant=variant or config.export.variant)
    return metadata
