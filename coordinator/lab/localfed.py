"""A whole federation on one machine, as real processes: the demo, the integration tests and
the benchmarks all run this, so they exercise exactly what an operator deploys.

``LocalFederation.prepare`` splits a built-in dataset across devices (Dirichlet label skew,
optional label noise), writes the coordinator config and keys, enrolls every device and writes
its bundle, data and agent config. Then it starts ``fedprune-coordinator run`` and one
``fedprune-agent run`` per device, and offers what a test needs: the round history, the
metrics endpoint, and kill/restart of any process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.config import CoordinatorConfig, load_config
from fedprune.coordinator.state import StateDir
from fedprune.coordinator.lab.datasets import add_label_noise, load_dataset, partition_dirichlet, partition_iid

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class BrokerAccess:
    """How the coordinator and each device reach the broker."""

    url: str
    embedded: bool = False
    ca_file: Path | None = None
    coordinator_password: str = ""
    device_passwords: Mapping[str, str] = field(default_factory=dict)


@dataclass
class LocalFederation:
    root: Path
    broker: BrokerAccess
    devices: tuple[str, ...]
    rounds: int = 10
    federation: str = "demo"
    dataset: str = "digits"
    model: str = "mlp"
    beta: float = 0.5
    partition: str = "dirichlet"
    noisy: tuple[str, ...] = ()
    noise_rate: float = 0.8
    seed: int = 0
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    agent_sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    device_sections: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    # A device's own command in place of the fedprune-agent script (an emulated arm64 Python).
    agent_commands: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Own data and model instead of `dataset`: each device's files, the coordinator's held-out set,
    # how both are read (a [data] table), the model's arguments, task and sizes; `env` reaches
    # every process (e.g. PYTHONPATH for the model's package).
    device_data: Mapping[str, Path] = field(default_factory=dict)
    holdout: Path | None = None
    data_section: Mapping[str, Any] = field(default_factory=dict)
    model_args: Mapping[str, Any] = field(default_factory=dict)
    task: str = "classification"
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)

    @property
    def config_path(self) -> Path:
        return self.root / "coordinator.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def prepare(self) -> CoordinatorConfig:
        data_paths, holdout, model = self._own_data() if self.device_data else self._split_dataset()
        settings: dict[str, dict[str, Any]] = {
            "federation": {"model": self.model, "seed": self.seed, **model},
            "rounds": {"total": self.rounds, "min_devices": len(self.devices), "quorum": len(self.devices)},
            "metrics": {"port": 0},
            "evaluation": {"data": str(holdout), **({"source": dict(self.data_section)} if self.data_section else {})},
            "broker": {"password": self.broker.coordinator_password,
                       **({"ca_file": str(self.broker.ca_file)} if self.broker.ca_file else {})},
        }
        for section, table in self.settings.items():
            settings.setdefault(section, {}).update(table)
        enrollment.init(config_path=self.config_path, state_dir=self.state_dir, federation=self.federation,
                        broker_url=self.broker.url, embedded_broker=self.broker.embedded, settings=settings,
                        force=True)
        config = load_config(self.config_path, env={})
        for name in self.devices:
            device_dir = self.root / "devices" / name
            bundle = device_dir / "bundle.json"
            enrollment.enroll(config, name, bundle, broker_password=self.broker.device_passwords.get(name, ""))
            sections: dict[str, dict[str, Any]] = {
                "agent": {"bundle": str(bundle), "data": str(data_paths[name]),
                          "state_dir": str(device_dir / "state"), "train_in_subprocess": False, "heartbeat_s": 5.0},
                "governance": {"max_threads": 1},
                **({"data": dict(self.data_section)} if self.data_section else {}),
            }
            for extra in (self.agent_sections, self.device_sections.get(name, {})):
                for section, table in extra.items():
                    sections.setdefault(section, {}).update(table)
            (device_dir / "agent.toml").write_text("".join(
                f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
                for section, table in sections.items()))
        (self.root / "logs").mkdir(exist_ok=True)
        return config

    def _own_data(self) -> tuple[Mapping[str, Path], Path, dict[str, Any]]:
        if self.holdout is None or not self.input_shape or not self.num_classes:
            raise ValueError("own data needs holdout, input_shape and num_classes beside device_data")
        return self.device_data, self.holdout, {"model_args": dict(self.model_args), "task": self.task,
                                                "input_shape": tuple(self.input_shape), "num_classes": self.num_classes}

    def _split_dataset(self) -> tuple[dict[str, Path], Path, dict[str, Any]]:
        """The built-in dataset split over the devices (Dirichlet or IID), noisy devices' labels noised."""
        dataset = load_dataset(self.dataset, self.seed)
        rng = np.random.default_rng(self.seed)
        if self.partition == "iid":
            parts = partition_iid(dataset.y_train, len(self.devices), rng)
        else:
            parts = partition_dirichlet(dataset.y_train, len(self.devices), self.beta, rng, min_size=40)
        data_dir = self.root / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, idx in zip(self.devices, parts):
            y = dataset.y_train[idx]
            if name in self.noisy:
                y = add_label_noise(y, self.noise_rate, dataset.num_classes, rng, kind="symmetric")
            np.savez(data_dir / f"{name}.npz", X=dataset.X_train[idx], y=y)
        np.savez(data_dir / "holdout.npz", X=dataset.X_test, y=dataset.y_test)
        model = {"model_args": dict(self.model_args), "task": self.task, "input_shape": tuple(dataset.input_shape),
                 "num_classes": dataset.num_classes}
        return {name: data_dir / f"{name}.npz" for name in self.devices}, data_dir / "holdout.npz", model

    # ---- processes ------------------------------------------------------------------------------
    def start_coordinator(self) -> subprocess.Popen:
        return self._spawn("coordinator", [BIN / "fedprune-coordinator", "run", "--config", self.config_path])

    def start_agent(self, name: str) -> subprocess.Popen:
        command = self.agent_commands.get(name, (BIN / "fedprune-agent",))
        return self._spawn(name, [*command, "run", "--config", self.root / "devices" / name / "agent.toml"])

    def start(self, timeout: float = 120.0) -> None:
        """The coordinator first, agents once its MQTT session exists (so none registers into the void)."""
        self.start_coordinator()
        try:
            self.wait_for_coordinator(timeout)
        except BaseException:
            self.stop_all()
            raise
        for name in self.devices:
            self.start_agent(name)

    def wait_for_coordinator(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while "event=mqtt_connected" not in self.log("coordinator"):
            coordinator = self.processes["coordinator"]
            if coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not connect to the broker:\n{self.log('coordinator')[-3000:]}")
            time.sleep(0.05)

    def _spawn(self, name: str, argv: list[Any]) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        process = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.processes[name] = process
        return process

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self, timeout: float = 15.0) -> dict[str, int | None]:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = None
        return codes

    # ---- observation ----------------------------------------------------------------------------
    def history(self) -> list[dict[str, Any]]:
        return StateDir(self.state_dir).read_history()

    def wait_for_round(self, round_number: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.history()
            if history and history[-1]["round"] >= round_number:
                return history
            coordinator = self.processes.get("coordinator")
            if coordinator is not None and coordinator.poll() is not None and coordinator.returncode != 0:
                raise RuntimeError(f"coordinator exited {coordinator.returncode}:\n{self.log('coordinator')[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"round {round_number} not completed within {timeout} s; history has "
                           f"{len(self.history())} rounds\n{self.log('coordinator')[-3000:]}")

    def wait_for_release(self, version: int, timeout: float) -> None:
        """Until every agent logs that it installed release ``version``."""
        needle = f"event=release_installed version={version} "
        deadline = time.monotonic() + timeout
        while not all(needle in self.log(name) for name in self.devices):
            if time.monotonic() > deadline:
                missing = [name for name in self.devices if needle not in self.log(name)]
                raise TimeoutError(f"release {version} not installed on {missing} within {timeout} s")
            time.sleep(0.1)

    def infer(self, name: str, input_path: Path, labels: bool = False) -> subprocess.CompletedProcess:
        command = self.agent_commands.get(name, (BIN / "fedprune-agent",))
        return subprocess.run([*map(str, command), "infer", "--config",
                               str(self.root / "devices" / name / "agent.toml"), "--input", str(input_path),
                               "--output", str(self.root / "devices" / name / "predictions.csv"),
                               *(["--labels"] if labels else [])],
                              capture_output=True, text=True, check=False, env={**os.environ, **self.env})

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status_url(self) -> str:
        """The coordinator's status page (``/metrics`` and ``/status.json`` lie beside it)."""
        match = re.findall(r"event=status_page_listening url=(\S+)", self.log("coordinator"))
        if not match:
            raise RuntimeError("the coordinator has not logged its status page yet")
        return match[-1]

    def metrics_text(self) -> str:
        return urllib.request.urlopen(self.status_url() + "metrics", timeout=5).read().decode()
