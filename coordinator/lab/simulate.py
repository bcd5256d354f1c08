"""Run a whole federation in one process through the deployed code: the coordinator daemon and
one agent daemon per client, over an in-memory broker, on a virtual clock.

Every round is planned, encrypted, sent, trained, privatised (when [privacy] asks for it),
sealed, reassembled, authenticated, scored, aggregated and checkpointed by the same objects
that run a fleet (``fedprune.coordinator.daemon.CoordinatorDaemon`` and
``fedprune.edge_agent.daemon.AgentDaemon``); only the link differs
(``fedprune.coordinator.lab.memory_broker``). So an option that works here works on a fleet,
and one a fleet refuses is refused here with the same message. What this module adds is the
lab: it partitions a dataset, injects label noise, makes some clients hostile
(``fedprune.coordinator.lab.attacks``) or intermittently offline, and writes results.

Byte accounting: the bytes each agent's link carried, by topic (tasks and key grants down;
updates, status and registrations up), i.e. what a broker would deliver, framing, encryption
and signatures included. Releases are counted apart (``release_bytes``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.coordinator.lab import datasets
from fedprune.common.configkit import ConfigError, load_section, tomllib
from fedprune.common.model_rules import TASK_KINDS, normalise_args, reference_problem
from fedprune.coordinator.config import ADAPTIVE_DENSITY_REFUSED
from fedprune.common.data_source import DataSource
from fedprune.coordinator.core.strategy import StrategyConfig
from fedprune.coordinator.state import entry_score, score_name
from fedprune.coordinator.lab import attacks
from fedprune.coordinator.lab.federation import SimulatedFederation
from fedprune.edge_agent.config import PrivacySection
from fedprune.edge_agent.training import resolve_device

PARTITIONS = ("dirichlet", "iid", "quantity")  # and "column:<name>" for own data: the CSV column says whose row it is
EVAL_SPLITS = ("test", "validation")


@dataclass(frozen=True)
class SimulationConfig:
    """One simulated federation. ``strategy`` holds the coordinator's knobs (incl. rounds)."""

    name: str = "simulation"
    dataset: str = "digits"
    model: str = "mlp"  # as [federation] model: a built-in or "package.module:factory"
    model_args: Mapping[str, Any] = field(default_factory=dict)  # as [federation.model_args]
    task: str = "classification"  # as [federation] task
    n_clients: int = 20
    partition: str = "dirichlet"
    beta: float = 0.5
    min_size: int = 10
    noisy_fraction: float = 0.0
    noise_rate: float = 0.8
    noise_kind: str = "symmetric"
    availability: float = 1.0  # probability that a client is online in a round
    attack: str = "none"  # fedprune.coordinator.lab.attacks.ATTACKS
    attack_fraction: float = 0.0  # of clients, chosen apart from the noisy ones
    attack_scale: float = 10.0
    seed: int = 0
    eval_split: str = "test"
    validation_fraction: float = 0.2
    eval_every: int = 1
    # Own data instead of `dataset` (docs/DATA.md): data_dir = one subdirectory per device, or data = one data
    # set split by `partition`; read with the agent's loader as the [data] table (`source`) says.
    data_dir: str = ""
    data: str = ""
    test_data: str = ""  # the held-out test set; empty: a stratified test_fraction of the data
    test_fraction: float = 0.2
    source: DataSource = field(default_factory=DataSource)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacySection = field(default_factory=PrivacySection)

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"[simulation] {key} = {getattr(self, key)!r}: expected {expected}")

        if self.dataset not in datasets.DATASET_NAMES:
            raise bad("dataset", f"one of {datasets.DATASET_NAMES}")
        if self.partition not in PARTITIONS and not (self.partition.startswith("column:") and self.partition[7:]):
            raise bad("partition", f"one of {PARTITIONS} or 'column:<name>' (with data = a CSV file)")
        if self.noise_kind not in datasets.NOISE_KINDS:
            raise bad("noise_kind", f"one of {datasets.NOISE_KINDS}")
        if self.attack not in attacks.ATTACKS:
            raise bad("attack", f"one of {attacks.ATTACKS}")
        if self.eval_split not in EVAL_SPLITS:
            raise bad("eval_split", f"one of {EVAL_SPLITS}")
        for key in ("n_clients", "eval_every"):
            v = getattr(self, key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise bad(key, "an int >= 1")
        if not (isinstance(self.min_size, int) and self.min_size >= 1):
            raise bad("min_size", "an int >= 1")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**31):
            raise bad("seed", "an int in [0, 2**31), as [federation] seed")
        for key, lo, hi in (("noisy_fraction", 0.0, 1.0), ("noise_rate", 0.0, 1.0), ("availability", 1e-9, 1.0),
                            ("validation_fraction", 1e-9, 0.99), ("attack_fraction", 0.0, 1.0), ("attack_scale", 0.0, 1e6)):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi):
                raise bad(key, f"a number in [{lo:g}, {hi:g}]")
        if self.attack != "none" and (round(self.noisy_fraction * self.n_clients)
                                      + round(self.attack_fraction * self.n_clients)) > self.n_clients:
            raise bad("attack_fraction", "room for the attackers beside the noisy clients (rounded counts)")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise bad("beta", "a number > 0")
        problem = reference_problem(self.model) or (None if self.task in TASK_KINDS else f"task={self.task!r}: "
                                                     f"expected one of {TASK_KINDS}")
        if problem:
            raise ConfigError(f"[simulation] {problem}")
        try:
            object.__setattr__(self, "model_args", dict(normalise_args(self.model_args)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[simulation] model_args: {exc}") from None
        self._check_own_data(bad)

    def _check_own_data(self, bad: Any) -> None:
        if self.task != "classification":
            if not (self.data or self.data_dir):
                raise bad("task", "'classification' with the built-in datasets, or your own data (data or data_dir) "
                          "with regression or multi-label targets")
            if self.partition == "dirichlet" and not self.data_dir:
                raise bad("partition", "'iid', 'quantity' or 'column:<name>' for a regression or multi-label task "
                          "(dirichlet skews class labels)")
            if self.attack == "label_flip":
                raise bad("attack", "an attack other than label_flip for a regression or multi-label task")
        if self.data and self.data_dir:
            raise bad("data_dir", "either data_dir (one subdirectory per device) or data (one data set), not both")
        if self.partition.startswith("column:") and not self.data:
            raise bad("partition", "data = a CSV file with that column (partition by column splits one data set)")
        if self.test_data and not (self.data or self.data_dir):
            raise bad("test_data", "data or data_dir beside it (it is the held-out part of your own data)")
        if not (isinstance(self.test_fraction, (int, float)) and 0 < self.test_fraction < 1):
            raise bad("test_fraction", "a number in (0, 1)")
        if self.eval_split == "validation" and (self.data_dir or self.partition.startswith("column:")):
            raise bad("eval_split", "'test' when the files decide the devices (data_dir, partition by column); "
                      "hold out a test set with test_data or test_fraction")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SimulationConfig":
        """From a parsed TOML document with tables [simulation], [strategy] (+ [strategy.local]) and
        [privacy] (every device's, as in its agent.toml)."""
        unknown_tables = sorted(set(data) - {"simulation", "strategy", "privacy", "data"})
        if unknown_tables:
            raise ConfigError(f"unknown tables {unknown_tables}: expected [simulation], [strategy], [privacy] and [data]")
        sim = dict(data.get("simulation", {}))
        known = {f.name for f in fields(cls)} - {"strategy", "privacy", "source"}
        unknown = sorted(set(sim) - known)
        retired = sorted(set(unknown) & {"hidden", "channels", "norm"})
        if retired:
            raise ConfigError(f"[simulation] {', '.join(retired)}: a model argument; set it in [simulation.model_args] "
                              "(as a fleet does in [federation.model_args])")
        if unknown:
            raise ConfigError(f"[simulation] unknown keys {unknown}; expected some of {sorted(known)}")
        strategy = load_section(StrategyConfig, data.get("strategy", {}), "strategy")  # as `run` reads it
        if strategy.adaptive_density:
            raise ConfigError(ADAPTIVE_DENSITY_REFUSED)
        privacy = load_section(PrivacySection, data.get("privacy", {}), "privacy")
        source = load_section(DataSource, data.get("data", {}), "data")  # as an agent.toml's [data]
        try:
            return cls(**sim, strategy=strategy, privacy=privacy, source=source)
        except TypeError as exc:
            raise ConfigError(f"[simulation] {exc}") from exc

    @classmethod
    def from_toml(cls, path: str | Path) -> "SimulationConfig":
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read simulation config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        return cls.from_dict(doc)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "source": self.source.to_dict()}


@dataclass(frozen=True)
class SimulationResult:
    config: dict[str, Any]
    rounds: list[dict[str, Any]]  # one record per round: score (and the task's metrics), loss, bytes, flops, scores
    noisy_clients: list[str]
    attackers: list[str]
    client_sizes: dict[str, int]
    score_name: str  # the headline metric: accuracy, f1 (multilabel) or r2 (regression)
    final_score: float
    best_score: float
    uplink_bytes: int  # cumulative, all clients: updates, status, registrations as sent
    downlink_bytes: int  # cumulative, all clients: tasks and key grants as received
    release_bytes: int  # the signed ONNX releases as received, all clients
    density: float  # of the prunable weights at the end
    model_parameters: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _clients(cfg: SimulationConfig, dataset: datasets.Dataset, rng: np.random.Generator,
             parts: list[np.ndarray] | None = None):
    """``parts``: each client's indices when the files decide them (data_dir, partition by column)."""
    y = dataset.y_train
    if parts is not None:
        cfg = dataclasses.replace(cfg, n_clients=len(parts))
    elif cfg.partition == "dirichlet":
        parts = datasets.partition_dirichlet(y, cfg.n_clients, cfg.beta, rng, min_size=cfg.min_size)
    elif cfg.partition == "iid":
        parts = datasets.partition_iid(y, cfg.n_clients, rng)
    else:
        parts = datasets.partition_quantity(y, cfg.n_clients, rng, beta=cfg.beta, min_size=cfg.min_size)
    ids = [f"client{i:03d}" for i in range(cfg.n_clients)]
    n_noisy = int(round(cfg.noisy_fraction * cfg.n_clients))
    noisy = set(ids[i] for i in rng.choice(cfg.n_clients, size=n_noisy, replace=False)) if n_noisy else set()
    honest_pool = [c for c in ids if c not in noisy]
    n_attackers = int(round(cfg.attack_fraction * cfg.n_clients)) if cfg.attack != "none" else 0
    attackers = set(rng.choice(honest_pool, size=n_attackers, replace=False)) if n_attackers else set()
    shards = {}
    for cid, idx in zip(ids, parts):
        labels = y[idx]
        if cid in noisy and cfg.task != "classification":
            labels = datasets.corrupt_targets(labels, cfg.noise_rate, cfg.task, rng)
        elif cid in noisy:
            labels = datasets.add_label_noise(labels, cfg.noise_rate, dataset.num_classes, rng, cfg.noise_kind)
        if cid in attackers and cfg.attack == "label_flip":
            labels = attacks.flip_labels(labels, dataset.num_classes)
        shards[cid] = (dataset.X_train[idx], labels)
    return ids, shards, sorted(noisy), sorted(attackers)


@dataclass(frozen=True)
class FinalModel:
    """The global model a simulation ended with (``run_simulation(..., with_model=True)``)."""

    spec: Any  # fedprune.common.models.ModelSpec
    params: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]


def run_simulation(config: SimulationConfig, progress: bool = False, device: str = "cpu",
                   workdir: str | Path | None = None, with_model: bool = False):
    """Run the federation; deterministic for a given config (seed included) and device (cpu,
    cuda or auto); the devices' privacy noise is seeded from it too. Where training runs is not
    part of the config: it changes rounding only. ``workdir`` keeps the federation's files (the
    coordinator's state and history, each device's audit log and installed release); by default
    they live in a temporary directory. Returns the SimulationResult, with ``with_model`` a pair
    (result, FinalModel)."""
    try:
        resolve_device(device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    seed = config.seed
    parts = None
    if config.data or config.data_dir:
        column = config.partition[len("column:"):] if config.partition.startswith("column:") else None
        dataset, parts = datasets.own_dataset(
            Path(config.data_dir or config.data), config.source, per_device=bool(config.data_dir),
            test_data=Path(config.test_data) if config.test_data else None, test_fraction=config.test_fraction,
            column=column, rng=np.random.default_rng([seed, 2]), task=config.task)
    else:
        dataset = datasets.load_dataset(config.dataset, seed)
    if config.eval_split == "validation":
        dataset = datasets.split_validation(dataset, config.validation_fraction, np.random.default_rng(seed + 1))
    ids, shards, noisy, attackers = _clients(config, dataset, np.random.default_rng([seed, 1]), parts)
    with tempfile.TemporaryDirectory(prefix="fedprune-sim-") as scratch:
        root = Path(workdir) if workdir is not None else Path(scratch)
        world = SimulatedFederation.build(root, config, dataset, shards, attackers, device)
        bar = _progress(config.strategy.rounds, progress, config.name)
        try:
            rounds = world.run(on_round=(lambda record: _advance(bar, record)) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        layout = world.coordinator.layout
        masks = world.coordinator.state.masks
        final = FinalModel(world.coordinator.spec, dict(world.coordinator.state.params), dict(masks))
    scores = [entry_score(r) for r in rounds if entry_score(r) is not None]
    result = SimulationResult(
        config=config.to_dict(), rounds=rounds, noisy_clients=noisy, attackers=attackers,
        client_sizes={c: int(len(shards[c][1])) for c in ids},
        score_name=score_name(rounds), final_score=scores[-1], best_score=max(scores),
        uplink_bytes=rounds[-1]["cum_uplink_bytes"], downlink_bytes=rounds[-1]["cum_downlink_bytes"],
        release_bytes=world.release_bytes(),
        density=sum(int(m.sum()) for m in masks.values()) / max(1, sum(s.size for s in layout.masked)),
        model_parameters=layout.num_parameters,
    )
    return (result, final) if with_model else result


def _advance(bar, record: dict[str, Any]) -> None:
    if entry_score(record) is not None:
        bar.set_postfix({record.get("score_name", "accuracy"): f"{entry_score(record):.3f}"})
    bar.update(1)


def _progress(total: int, enabled: bool, name: str):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="round", file=sys.stderr, leave=False)


def final_scores(result: SimulationResult) -> dict[str, dict[str, float]]:
    """Last known psi, q, r, w of every client (clients keep their score while absent)."""
    last: dict[str, dict[str, float]] = {}
    for rec in result.rounds:
        for cid, score in rec["scores"].items():
            last[cid] = score
    return last


def noise_summary(result: SimulationResult) -> dict[str, float | None]:
    """Final r (= s·q, so data size included) and q (quality alone) of noisy vs clean clients:
    means, ratios, the smallest clean r relative to the clean mean and the smallest clean q."""
    last = final_scores(result)
    noisy = set(result.noisy_clients)
    r_noisy = [s["r"] for c, s in last.items() if c in noisy]
    r_clean = [s["r"] for c, s in last.items() if c not in noisy]
    q_noisy = [s["q"] for c, s in last.items() if c in noisy]
    q_clean = [s["q"] for c, s in last.items() if c not in noisy]
    mean_clean = float(np.mean(r_clean)) if r_clean else None
    mean_noisy = float(np.mean(r_noisy)) if r_noisy else None
    return {
        "r_noisy": mean_noisy, "r_clean": mean_clean,
        "r_ratio": (mean_noisy / mean_clean) if (mean_noisy is not None and mean_clean) else None,
        "min_clean_r_rel": (min(r_clean) / mean_clean) if mean_clean else None,
        "q_ratio": (float(np.mean(q_noisy)) / float(np.mean(q_clean))) if (q_noisy and q_clean) else None,
        "min_clean_q": min(q_clean) if q_clean else None,
    }


def write_outputs(result: SimulationResult, out_dir: str | Path) -> list[Path]:
    """results.json plus three PNG plots; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json"]
    doc = result.to_json()
    doc["noise_summary"] = noise_summary(result)
    paths[0].write_text(json.dumps(doc, indent=1))
    paths += plot_result(result, out)
    return paths


def plot_result(result: SimulationResult, out: Path) -> list[Path]:
    """The three PNGs of ``fedprune.coordinator.plots``, the noisy and hostile clients flagged
    (the simulation made them so)."""
    from fedprune.coordinator.plots import write_plots

    return write_plots(result.rounds, out, flagged=set(result.noisy_clients) | set(result.attackers),
                       title=result.config["name"], uplink_key="cum_uplink_bytes",
                       uplink_label="cumulative uplink (MB, all clients)",
                       flagged_label="noisy or hostile" if result.attackers else "noisy", others_label="clean")


def main(config_path: str | Path, out_dir: str | Path | None = None, progress: bool = True,
         device: str = "cpu", keep_federation: bool = False) -> int:
    """CLI entry: load the TOML config, run, write results; returns an exit code (0 = ok)."""
    config = SimulationConfig.from_toml(config_path)
    out = Path(out_dir) if out_dir is not None else Path("runs") / config.name
    logging.getLogger("fedprune").setLevel(logging.WARNING)  # the daemons' per-event lines, times every client
    result = run_simulation(config, progress=progress, device=device,
                            workdir=out / "federation" if keep_federation else None)
    paths = write_outputs(result, out)
    print(f"{config.name}: final {result.score_name} {result.final_score:.4f} (best {result.best_score:.4f}), "
          f"uplink {result.uplink_bytes / 1e6:.2f} MB, downlink {result.downlink_bytes / 1e6:.2f} MB; wrote {paths[0]}")
    return 0
