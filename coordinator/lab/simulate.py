"""Run a whole federation in one process with the deployed code: Strategy + train_local.

The coordinator's ``Strategy`` plans and finishes every round; each selected client runs
``fedprune.edge_agent.training.train_local`` on its own shard, exactly as a device does. Nothing here
re-implements algorithm math: this module only partitions data, injects label noise, counts
bytes and compute, evaluates the global model and writes results (JSON and PNG plots).

Byte accounting (docs/ALGORITHM.md §9.11): real encoded message bodies. Every client's update is
encoded as the ``fedprune.protocol.messages.Update`` a device would send (``fedprune.protocol.codec.encode_body``:
float32 values in mask order, the mask only when it changed, XOR-coded against the mask it
trained from) and every download as the ``RoundTask`` it would receive (the mask included only
when the client's cached mask version is stale). Dense runs carry all-True masks, which encode
in 0 bytes. The envelope header, seal/signature and chunk framing are excluded: a constant few
dozen bytes per message, the same for every method.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.coordinator.lab import attacks
from fedprune.coordinator.core.strategy import ClientUpdate, GlobalState, Masks, Params, RoundPlan, Strategy, StrategyConfig
from fedprune.common import data as data_mod
from fedprune.common.configkit import ConfigError, tomllib
from fedprune.common.models import DEFAULT_CHANNELS, ModelSpec, count_macs, evaluate, init_params, model_layout
from fedprune.edge_agent.training import resolve_device, train_local
from fedprune.protocol.codec import encode_body
from fedprune.protocol.layout import ModelLayout
from fedprune.protocol.messages import ModelRef, RoundTask, Update
from fedprune.protocol.sparse import SparseParams

PARTITIONS = ("dirichlet", "iid", "quantity")
EVAL_SPLITS = ("test", "validation")


@dataclass(frozen=True)
class SimulationConfig:
    """One simulated federation. ``strategy`` holds the coordinator's knobs (incl. rounds)."""

    name: str = "simulation"
    dataset: str = "digits"
    model: str = "mlp"
    hidden: tuple[int, ...] | None = None
    channels: tuple[int, int] = DEFAULT_CHANNELS
    norm: str = "none"
    n_clients: int = 20
    partition: str = "dirichlet"
    beta: float = 0.5
    min_size: int = 10
    noisy_fraction: float = 0.0
    noise_rate: float = 0.8
    noise_kind: str = "symmetric"
    availability: float = 1.0  # probability that a client is online in a round
    attack: str = "none"  # coordinator.attacks.ATTACKS
    attack_fraction: float = 0.0  # of clients, chosen apart from the noisy ones
    attack_scale: float = 10.0
    seed: int = 0
    eval_split: str = "test"
    validation_fraction: float = 0.2
    eval_every: int = 1
    strategy: StrategyConfig = field(default_factory=StrategyConfig)

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"[simulation] {key} = {getattr(self, key)!r}: expected {expected}")

        if self.dataset not in data_mod.DATASET_NAMES:
            raise bad("dataset", f"one of {data_mod.DATASET_NAMES}")
        if self.partition not in PARTITIONS:
            raise bad("partition", f"one of {PARTITIONS}")
        if self.noise_kind not in data_mod.NOISE_KINDS:
            raise bad("noise_kind", f"one of {data_mod.NOISE_KINDS}")
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
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise bad("seed", "an int in [0, 2**32)")
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
        try:
            self.model_spec(self.input_shape_guess())
        except ValueError as exc:
            raise ConfigError(f"[simulation] model: {exc}") from exc

    def input_shape_guess(self) -> tuple[int, ...]:
        return (1, 8, 8) if self.dataset == "digits" else (1, 40)

    def model_spec(self, input_shape: tuple[int, ...], num_classes: int = 10) -> ModelSpec:
        return ModelSpec(self.model, tuple(input_shape), num_classes, hidden=self.hidden,
                         channels=tuple(self.channels), norm=self.norm)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SimulationConfig":
        """From a parsed TOML document with tables [simulation], [strategy], [strategy.local]."""
        unknown_tables = sorted(set(data) - {"simulation", "strategy"})
        if unknown_tables:
            raise ConfigError(f"unknown tables {unknown_tables}: expected [simulation] and [strategy]")
        sim = dict(data.get("simulation", {}))
        known = {f.name for f in fields(cls)} - {"strategy"}
        unknown = sorted(set(sim) - known)
        if unknown:
            raise ConfigError(f"[simulation] unknown keys {unknown}; expected some of {sorted(known)}")
        for key in ("hidden", "channels"):
            if isinstance(sim.get(key), list):
                sim[key] = tuple(sim[key])
        try:
            strategy = StrategyConfig.from_dict(data.get("strategy", {}))
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from exc
        try:
            return cls(**sim, strategy=strategy)
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
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SimulationResult:
    config: dict[str, Any]
    rounds: list[dict[str, Any]]  # one record per round: accuracy, loss, bytes, flops, scores
    noisy_clients: list[str]
    attackers: list[str]
    client_sizes: dict[str, int]
    final_accuracy: float
    best_accuracy: float
    uplink_bytes: int  # cumulative, all clients
    downlink_bytes: int
    density: float  # of the prunable weights at the end
    model_parameters: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def task_bytes(layout: ModelLayout, spec: ModelSpec, plan: RoundPlan, params: Params, masks: Masks,
               mask_version: int, with_masks: bool) -> int:
    """Encoded body of the RoundTask a selected client receives."""
    task = RoundTask(
        federation="simulation", round=plan.round, mask_version=mask_version,
        model=ModelRef(spec.name, tuple(spec.input_shape), spec.num_classes),
        weights=SparseParams.from_dense(layout, params, masks), hyper=plan.hyper, deadline=0.0,
        selected=plan.selected, include_masks=with_masks,
    )
    return len(encode_body(task))


def update_bytes(layout: ModelLayout, round_: int, client_id: str, mask_version: int, result: Any,
                 base_masks: Masks) -> int:
    """Encoded body of the Update a device sends for ``result`` (a LocalResult).

    A diverged client (non-finite delta, e.g. under a poisoning attack) still sends its update,
    which the strategy then rejects; NaN counts as non-zero, so the outside-mask check is off."""
    trainable = layout.subset(s.name for s in layout if s.trainable)
    finite = all(np.all(np.isfinite(v)) for v in result.delta.values())
    update = Update(
        round=round_, device=client_id, mask_version=mask_version, n_examples=int(result.n_examples),
        metrics={"train_loss": float(result.train_loss)},
        class_losses={c: (float(m), int(n)) for c, (m, n) in result.class_losses.items() if n > 0},
        delta=SparseParams.from_dense(trainable, result.delta, result.masks, check=finite),
        mask_changed=bool(result.mask_changed), buffers=dict(result.buffers),
    )
    return len(encode_body(update, base_masks=base_masks))


def _clients(cfg: SimulationConfig, dataset: data_mod.Dataset, rng: np.random.Generator):
    y = dataset.y_train
    if cfg.partition == "dirichlet":
        parts = data_mod.partition_dirichlet(y, cfg.n_clients, cfg.beta, rng, min_size=cfg.min_size)
    elif cfg.partition == "iid":
        parts = data_mod.partition_iid(y, cfg.n_clients, rng)
    else:
        parts = data_mod.partition_quantity(y, cfg.n_clients, rng, beta=cfg.beta, min_size=cfg.min_size)
    ids = [f"client{i:03d}" for i in range(cfg.n_clients)]
    n_noisy = int(round(cfg.noisy_fraction * cfg.n_clients))
    noisy = set(ids[i] for i in rng.choice(cfg.n_clients, size=n_noisy, replace=False)) if n_noisy else set()
    honest_pool = [c for c in ids if c not in noisy]
    n_attackers = int(round(cfg.attack_fraction * cfg.n_clients)) if cfg.attack != "none" else 0
    attackers = set(rng.choice(honest_pool, size=n_attackers, replace=False)) if n_attackers else set()
    shards = {}
    for cid, idx in zip(ids, parts):
        labels = y[idx]
        if cid in noisy:
            labels = data_mod.add_label_noise(labels, cfg.noise_rate, dataset.num_classes, rng, cfg.noise_kind)
        if cid in attackers and cfg.attack == "label_flip":
            labels = attacks.flip_labels(labels, dataset.num_classes)
        shards[cid] = (dataset.X_train[idx], labels)
    return ids, shards, sorted(noisy), sorted(attackers)


def _poison_updates(cfg: SimulationConfig, updates: list[ClientUpdate], attackers: set[str],
                    previous_step: Params | None, rng: np.random.Generator) -> list[ClientUpdate]:
    """Swap each attacker's honest delta for its attack's (coordinator/lab/attacks.py)."""
    bad = [i for i, u in enumerate(updates) if u.client_id in attackers]
    if not bad:
        return updates
    out = list(updates)
    if cfg.attack == "collude":
        shared = attacks.collude([updates[i].delta for i in bad], [updates[i].masks for i in bad])
        for i, delta in zip(bad, shared):
            out[i] = dataclasses.replace(updates[i], delta=delta)
        return out
    for i in bad:
        delta = attacks.poison(cfg.attack, updates[i].delta, updates[i].masks, rng, cfg.attack_scale, previous_step)
        out[i] = dataclasses.replace(updates[i], delta=delta)
    return out


def run_simulation(config: SimulationConfig, progress: bool = False, device: str = "cpu") -> SimulationResult:
    """Run the federation; deterministic for a given config (seed included) and device (cpu,
    cuda or auto). Where training runs is not part of the config: it changes rounding only."""
    try:
        device = resolve_device(device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    seed = config.seed
    dataset = data_mod.load_dataset(config.dataset, seed)
    if config.eval_split == "validation":
        dataset = data_mod.split_validation(dataset, config.validation_fraction, np.random.default_rng(seed + 1))
    spec = config.model_spec(dataset.input_shape, dataset.num_classes)
    layout = model_layout(spec)
    ids, shards, noisy, attackers = _clients(config, dataset, np.random.default_rng([seed, 1]))
    attack_rng = np.random.default_rng([seed, 3])
    previous_step: Params | None = None
    strategy = Strategy(config.strategy)
    rng = np.random.default_rng([seed, 2])
    state: GlobalState = strategy.initial_state(layout, init_params(spec, seed), rng)
    cached_version: dict[str, int] = {}
    records: list[dict[str, Any]] = []
    up_total = down_total = 0
    T = config.strategy.rounds
    bar = _progress(T, progress, config.name)
    for _ in range(T):
        online = [c for c in ids if config.availability >= 1.0 or rng.random() < config.availability]
        if config.attack == "absent":
            online = [c for c in online if c not in attackers]
        plan = strategy.plan_round(state, online, rng)
        updates, up_bytes, down_bytes, flops = [], 0, 0, 0
        for cid in plan.selected:
            masks = plan.masks_for(cid, state)
            params = state.params if masks is state.masks else {
                k: (np.where(masks[k], v, 0).astype(v.dtype) if k in masks else v) for k, v in state.params.items()}
            own_mask = cid in plan.client_masks  # a §6 sub-mask follows θ^t, so it travels every round
            stale = own_mask or cached_version.get(cid) != state.mask_version
            down_bytes += task_bytes(layout, spec, plan, params, masks, state.mask_version, stale)
            cached_version[cid] = -1 if own_mask else state.mask_version
            X, y = shards[cid]
            result = train_local(spec, params, masks, X, y, plan.hyper_for(cid), device=device)
            up_bytes += update_bytes(layout, plan.round, cid, state.mask_version, result, masks)
            flops += result.flops
            updates.append(ClientUpdate.from_local(cid, result))
        updates = _poison_updates(config, updates, set(attackers), previous_step, attack_rng)
        outcome = strategy.finish_round(state, plan, updates)
        previous_step = {k: outcome.state.params[k] - state.params[k] for k in state.trainable}
        state = outcome.state
        up_total += up_bytes
        down_total += down_bytes
        record: dict[str, Any] = {
            "round": plan.round, "p_t": plan.p_t, "readjust": plan.readjust, "mask_churn": outcome.mask_churn,
            "n_valid": outcome.n_valid, "rejected": outcome.rejected, "uplink_bytes": up_bytes,
            "downlink_bytes": down_bytes, "cum_uplink_bytes": up_total, "cum_downlink_bytes": down_total,
            "local_macs": flops, "keep_fraction": dict(plan.keep_fraction),
            "scores": {c: dataclasses.asdict(s) for c, s in outcome.scores.items()},
        }
        if plan.round % config.eval_every == 0 or plan.round == T:
            ev = evaluate(spec, state.params, dataset.X_test, dataset.y_test)
            record.update(accuracy=ev.accuracy, loss=ev.loss)
            if bar is not None:
                bar.set_postfix(acc=f"{ev.accuracy:.3f}")
        records.append(record)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    accs = [r["accuracy"] for r in records if "accuracy" in r]
    density = (sum(int(m.sum()) for m in state.masks.values()) / max(1, sum(s.size for s in layout.masked)))
    return SimulationResult(
        config=config.to_dict(), rounds=records, noisy_clients=noisy, attackers=attackers,
        client_sizes={c: int(len(shards[c][1])) for c in ids},
        final_accuracy=accs[-1], best_accuracy=max(accs), uplink_bytes=up_total, downlink_bytes=down_total,
        density=density, model_parameters=layout.num_parameters,
    )


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
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    name = result.config["name"]
    evald = [r for r in result.rounds if "accuracy" in r]
    rounds = [r["round"] for r in evald]
    acc = [100 * r["accuracy"] for r in evald]
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rounds, acc)
    ax.set(xlabel="round", ylabel="test accuracy (%)", title=name)
    ax.grid(alpha=0.3)
    paths.append(out / "accuracy_vs_round.png")
    fig.tight_layout(); fig.savefig(paths[-1], dpi=110); plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["cum_uplink_bytes"] / 1e6 for r in evald], acc)
    ax.set(xlabel="cumulative uplink (MB, all clients)", ylabel="test accuracy (%)", title=name)
    ax.grid(alpha=0.3)
    paths.append(out / "accuracy_vs_uplink.png")
    fig.tight_layout(); fig.savefig(paths[-1], dpi=110); plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    noisy = set(result.noisy_clients)
    traces: dict[str, list[tuple[int, float]]] = {}
    for rec in result.rounds:
        for cid, s in rec["scores"].items():
            traces.setdefault(cid, []).append((rec["round"], s["r"]))
    for cid, pts in sorted(traces.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color="tab:red" if cid in noisy else "tab:blue", alpha=0.6, lw=1)
    ax.plot([], [], color="tab:blue", label="clean")
    ax.plot([], [], color="tab:red", label="noisy")
    ax.set(xlabel="round", ylabel="importance r_n", title=name)
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out / "importance_vs_round.png")
    fig.tight_layout(); fig.savefig(paths[-1], dpi=110); plt.close(fig)
    return paths


def main(config_path: str | Path, out_dir: str | Path | None = None, progress: bool = True,
         device: str = "cpu") -> int:
    """CLI entry: load the TOML config, run, write results; returns an exit code (0 = ok)."""
    config = SimulationConfig.from_toml(config_path)
    out = Path(out_dir) if out_dir is not None else Path("runs") / config.name
    result = run_simulation(config, progress=progress, device=device)
    paths = write_outputs(result, out)
    print(f"{config.name}: final accuracy {100 * result.final_accuracy:.2f}% (best {100 * result.best_accuracy:.2f}%), "
          f"uplink {result.uplink_bytes / 1e6:.2f} MB, downlink {result.downlink_bytes / 1e6:.2f} MB; wrote {paths[0]}")
    return 0
