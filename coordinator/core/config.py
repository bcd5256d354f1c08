"""StrategyConfig: the [strategy] knobs of docs/ALGORITHM.md §7, declared once.

Every field carries the metadata ``fedprune.common.configkit.setting`` gives the other sections
(help, check), so the coordinator's loader checks and coerces [strategy] like every section and
``init`` writes each key with its help. The core may not import common (tests/test_layers.py),
hence the local ``_setting``. Construction checks too, because the simulator and tests build
StrategyConfig directly; a wrong value raises ValueError naming ``[strategy] key`` and what is
expected, which both programs turn into their ConfigError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import fedprune.coordinator.core.contribution as contribution
import fedprune.coordinator.core.masks as masks_mod
from fedprune.coordinator.core.downlink import TASK_VALUES
from fedprune.coordinator.core.methods import METHODS, QUALITY_SIGNALS, STEPS
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.sparse import ValueDtype

VALUE_ENCODINGS = {"float32": ValueDtype.FLOAT32, "float16": ValueDtype.FLOAT16, "int8": ValueDtype.INT8}

Check = Callable[[Any], "str | None"]

# Help for the [strategy.local] keys: HyperParams is protocol data, declared without settings.
LOCAL_HELP: dict[str, str] = {
    "epochs": "local epochs per round (E)",
    "batch_size": "local minibatch size",
    "lr": "local learning rate (0.05 suits sgd; adamw wants about 1e-3)",
    "momentum": "local SGD momentum (adamw uses betas 0.9, 0.999)",
    "weight_decay": "local weight decay (coupled for sgd, decoupled for adamw)",
    "readjust": "decided by the coordinator every round (the ΔT schedule); a value here is replaced",
    "prune_fraction": "decided by the coordinator every round (p^t); a value here is replaced",
    "growth": "how a device regrows weights on readjust rounds: gradient (largest dense gradient) or random",
    "prox_mu": "FedProx proximal term μ; 0: off",
    "seed": "decided by the coordinator every round (the round's seed); a value here is replaced",
    "max_sparse_lr_factor": "a sparse layer of density d trains at lr × min(1/d, this); 1: the plain rule",
    "optimizer": "local optimiser: sgd or adamw (the mask holds on its moments too)",
}


def _setting(default: Any, help: str, check: Check, key_help: Mapping[str, str] | None = None) -> Any:
    metadata: dict[str, Any] = {"help": help, "check": check}
    if key_help is not None:
        metadata["key_help"] = key_help
    return field(default=default, metadata=metadata)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rule(expected: str, test: Callable[[Any], bool]) -> Check:
    return lambda v: None if test(v) else expected


def _choice(options: Iterable[str]) -> Check:
    allowed = tuple(options)
    return _rule("one of " + ", ".join(repr(o) for o in allowed), lambda v: v in allowed)


def _span(low: float, high: float, brackets: str = "[]") -> Check:
    """A finite number between ``low`` and ``high``; ``brackets`` "[)" etc. say which ends are in."""
    def inside(v: Any) -> bool:
        above = v >= low if brackets[0] == "[" else v > low
        below = v <= high if brackets[1] == "]" else v < high
        return _number(v) and above and below
    return _rule(f"a number in {brackets[0]}{low:g}, {high:g}{brackets[1]}", inside)


def _int_from(low: int, omittable: bool = False) -> Check:
    def ok(v: Any) -> bool:
        return (omittable and v is None) or (isinstance(v, int) and not isinstance(v, bool) and v >= low)
    return _rule(f"an int >= {low}" + (" or omitted" if omittable else ""), ok)


FLAG = _rule("true or false", lambda v: isinstance(v, bool))
POSITIVE = _rule("a number > 0", lambda v: _number(v) and v > 0)
OFF_OR_POSITIVE = _rule("a number >= 0 (0 = off)", lambda v: _number(v) and v >= 0)
NUMBER = _rule("a number", _number)
MEMORY = _span(0, 1, "[)")


@dataclass(frozen=True)
class StrategyConfig:
    """How rounds aggregate: method, sparse masks, contribution weights, Byzantine defences."""

    method: str = _setting("fedprune", "fedprune (contribution-weighted), or a baseline: fedavg, feddst, median, trimmed_mean, krum", _choice(METHODS))
    rounds: int = _setting(60, "rounds T of the mask schedule; the coordinator takes [rounds] total instead", _int_from(1))
    sparsity: float = _setting(0.8, "fraction of the prunable weights kept at 0; 0: dense", _span(0, 1, "[)"))
    distribution: str = _setting("erk", "how the sparsity budget spreads over the layers", _choice(masks_mod.DISTRIBUTIONS))
    dense_layers: tuple[str, ...] = _setting((), "tensor names kept dense", _rule("a list of tensor names", lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v)))
    scaled_init: bool = _setting(True, "scale the sparse initial weights by 1/sqrt(density)", FLAG)
    p0: float = _setting(0.5, "fraction of active weights pruned and regrown at the first readjust (p^0; cosine to 0 at t_end)", _span(0, 1))
    delta_t: int | None = _setting(None, "rounds between mask readjustments; omitted: 5 if rounds <= 60, else 10", _int_from(1, omittable=True))
    t_end: int | None = _setting(None, "last round that readjusts the mask; omitted: rounds / 2", _int_from(1, omittable=True))
    min_votes: int = _setting(0, "votes a position needs to stay in the merged mask", _int_from(0))
    clients_per_round: int = _setting(0, "devices selected per round; 0: every online device", _int_from(0))
    # contribution (§4)
    quality: str = _setting("loss_rel", "quality signal of fedprune: loss_rel (loss ratio against the round's others), loss (absolute band) or none", _choice(QUALITY_SIGNALS))
    reference: str = _setting("s", "reference weights of the logged cosine ψ: s (data shares) or r (importance, as CGSV)", _choice(("s", "r")))
    leave_one_out: bool = _setting(True, "ψ_n leaves client n out of the aggregate it is compared with", FLAG)
    gamma: float = _setting(0.6, "memory of the quality q (≈ 1/(1-gamma) participations)", MEMORY)
    q_min: float = _setting(1e-3, "floor of q, so a down-weighted client can recover", _span(0, 1, "(]"))
    warmup_rounds: int = _setting(0, "rounds before quality observations update q", _int_from(0))
    loss_full: float = _setting(2.0, "quality \"loss\": full weight up to this loss ratio", POSITIVE)
    loss_zero: float = _setting(4.0, "quality \"loss\": no weight from this loss ratio", POSITIVE)
    loss_weighted: bool = _setting(True, "weigh a client's classes by its sample counts in its loss ratio", FLAG)
    loss_offset: float = _setting(0.5, "nats added to both losses of a ratio, so tiny losses do not explode it", POSITIVE)
    loss_reduce: str = _setting("mean", "a client's loss ratio over its classes: mean, or median", _choice(contribution.LOSS_REDUCE))
    loss_max_share: float = _setting(0.5, "leave out of a client's loss ratio the classes it holds more than this share of; 1: off", _span(0, 1, "(]"))
    rel_full: float = _setting(3.0, "quality \"loss_rel\": full weight up to this robust z of the loss ratio", NUMBER)
    rel_zero: float = _setting(6.0, "quality \"loss_rel\": no weight from this robust z", NUMBER)
    rel_spread_floor: float = _setting(0.1, "quality \"loss_rel\": least spread of the ratios, as a fraction of their median", POSITIVE)
    step: str = _setting("plain", "plain (θ += Σ w Δθ) or normalized (every update at the weighted mean norm)", _choice(STEPS))
    server_lr: float = _setting(1.0, "server learning rate η_g", POSITIVE)
    trim_fraction: float = _setting(0.2, "fraction trimmed from each end by trimmed_mean (and the defences' centre)", _span(0, 0.5))
    krum_byzantine: int = _setting(0, "krum: number of Byzantine clients f tolerated", _int_from(0))
    krum_select: int = _setting(1, "krum: updates picked and averaged (1: Krum, more: Multi-Krum)", _int_from(1))
    # Byzantine defences of fedprune (docs/ROBUSTNESS.md). Centered clipping and the direction gate
    # cost clean mnist1d ≈ 7 points, so they are opt-in (the "hardened" profile).
    norm_clip: float = _setting(2.0, "scale updates down to this × the round's median norm; 0: off", OFF_OR_POSITIVE)
    direction_gate: str = _setting("off", "leave out updates pointing away from the trimmed mean: off, round, or memory (trust over rounds)", _choice(("off", "round", "memory")))
    trust_threshold: float = _setting(0.5, "direction_gate \"memory\": gate while the trust is below this", _span(0, 1))
    trust_gamma: float = _setting(0.8, "memory of the direction trust (≈ 5 rounds; apart from gamma)", MEMORY)
    sybil_cos: float = _setting(0.99, "leave out updates with a twin at cosine >= this; 0: off", _span(0, 1))
    centered_clip: float = _setting(0.0, "clip deviations from the trimmed mean at this × their median; 0: off", OFF_OR_POSITIVE)
    chance_gate: float = _setting(4.0, "leave out updates no other one correlates with beyond this / sqrt(nnz); 0: off", OFF_OR_POSITIVE)
    # The links (docs/PROTOCOL.md, "Sparse encodings"): int8 both ways costs a quarter of float32
    # at the same accuracy (docs/RESULTS.md, "Quantised links"). update_values is carried in every signed task.
    update_values: str = _setting("int8", "how devices send update values: float32, float16, or int8 (one scale per tensor)", _choice(VALUE_ENCODINGS))
    error_feedback: bool = _setting(True, "devices keep what rounding their update values left off and add it to their next update", FLAG)
    task_values: str = _setting("int8_delta", "how tasks carry the global values: float32, float16, or int8_delta (the change since the last task, to devices that hold it); the coordinator keeps float32", _choice(TASK_VALUES))
    # secure aggregation (docs/PRIVACY.md): the coordinator learns only the weighted sum
    secure: bool = _setting(False, "secure aggregation (SecAgg+): devices mask their weighted updates and the coordinator learns only the sum", FLAG)
    secure_bits: int = _setting(12, "secure: bits of the fixed-point sums (modulus 2**bits), 8..32; 12 keeps 50 devices under 2x the plain uplink (docs/RESULTS.md)", _span(8, 32))
    secure_degree: int = _setting(0, "secure: neighbours per device in the masking graph, even; 0: 2·ceil(log2 n)", _int_from(0))
    secure_noise_multiplier: float = _setting(0.0, "secure: σ of the devices' distributed-DP noise ([privacy] mechanism = \"distributed\"), announced in the task; the fixed-point scale leaves room for it, and a device that does not add noise at exactly this σ declines (distributed_dp_noise_mismatch); 0: no distributed DP. Give it secure_bits of 16-20: rounding adds sqrt(vector length) field units to each device's sensitivity, which at 12 bits can outweigh its update", OFF_OR_POSITIVE)
    secure_delta: float = _setting(1e-5, "secure: δ of the central ε the coordinator reports for distributed DP", _span(0, 1, "()"))
    # contribution-adaptive density (§6)
    adaptive_density: bool = _setting(False, "give low-quality devices nested sub-masks (kept fraction rho); refused by run and simulate until tasks per device exist (docs/DESIGN.md)", FLAG)
    adaptive_beta: float = _setting(1.0, "adaptive_density: slope β of rho = tanh(β z)", POSITIVE)
    rho_min: float = _setting(0.5, "adaptive_density: least kept fraction rho", _span(0, 1, "(]"))
    # Batch 16, not HyperParams' 32: with ≈ 60-200 samples per client, batch 32 gives only 4-10
    # local steps per round, and sparse layers (whose function moves ∝ density per step) stay
    # far behind dense within T = 60 (docs/ALGORITHM_NOTES.md §4). For the same reason sparse
    # layers train at up to 5× the learning rate (lr / density, capped; §5 there).
    local: HyperParams = _setting(
        HyperParams(batch_size=16, max_sparse_lr_factor=5.0), "what every device trains with (keys not given keep these defaults)",
        _rule("a table of hyper-parameters", lambda v: isinstance(v, HyperParams)), key_help=LOCAL_HELP)

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = f.metadata["check"](getattr(self, f.name))
            if problem:
                raise self._bad(f.name, problem)
        if METHODS[self.method].needs_sparsity and not self.sparse:
            raise self._bad("sparsity", f"a sparsity > 0 for method {self.method!r} (dense FedDST is FedAvg)")
        if self.loss_full >= self.loss_zero:
            raise self._bad("loss_full", f"a number below loss_zero ({self.loss_zero!r})")
        if self.rel_full >= self.rel_zero:
            raise self._bad("rel_full", f"a number below rel_zero ({self.rel_zero!r})")
        if self.centered_clip > 0 and self.step != "plain":
            raise self._bad("centered_clip", "0 unless step = 'plain' (the centre is built from the plain updates)")
        if self.secure:
            self._check_secure()
        elif self.secure_noise_multiplier > 0:
            raise ValueError(f"[strategy] secure_noise_multiplier {self.secure_noise_multiplier!r} needs secure = true: "
                             "distributed-DP noise hides only inside a secure round's sum; set secure = true, or "
                             "secure_noise_multiplier = 0 (devices then use [privacy] mechanism = \"local\")")

    def _check_secure(self) -> None:
        """What needs each device's update cannot run when the coordinator sees only the sum."""
        if type(self.secure_bits) is not int:
            raise self._bad("secure_bits", "an int in 8..32")
        if self.secure_degree % 2:
            raise self._bad("secure_degree", "an even number (each device links to degree/2 on either side), or 0")
        needs_updates = {"method": self.method in ("median", "trimmed_mean", "krum"), "step": self.step != "plain",
                         "centered_clip": self.centered_clip > 0, "direction_gate": self.direction_gate != "off"}
        for key, refused in needs_updates.items():
            if refused:
                raise ValueError(f"[strategy] {key} {getattr(self, key)!r} needs each device's update, which "
                                 "secure = true hides from the coordinator; use method fedprune, fedavg or feddst with "
                                 "step 'plain', centered_clip 0 and direction_gate 'off', or set secure = false")

    @property
    def unavailable_defences(self) -> tuple[str, ...]:
        """The defences a secure round cannot run, of those this configuration turns on."""
        if not (self.secure and METHODS[self.method].defended):
            return ()
        return tuple(k for k in ("norm_clip", "sybil_cos", "chance_gate") if getattr(self, k) > 0)

    def _bad(self, key: str, expected: str) -> ValueError:
        return ValueError(f"[strategy] {key} {getattr(self, key)!r}: expected {expected}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StrategyConfig:
        """Build from a TOML table; ``local`` is a sub-table of HyperParams fields that overrides
        only the keys it names: the others keep this class's defaults (batch 16, the sparse lr
        factor), not HyperParams' plain ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"[strategy] unknown keys {unknown}; expected some of {sorted(known)}")
        kwargs = dict(data)
        if "local" in kwargs:
            local = kwargs["local"]
            if not isinstance(local, Mapping):
                raise ValueError(f"[strategy] local {local!r}: expected a table of hyper-parameters")
            try:
                kwargs["local"] = HyperParams.from_dict({**cls().local.to_dict(), **local})
            except (ValueError, TypeError) as exc:
                raise ValueError(f"[strategy.local] {exc}") from exc
        if isinstance(kwargs.get("dense_layers"), list):
            kwargs["dense_layers"] = tuple(kwargs["dense_layers"])
        return cls(**kwargs)

    @property
    def sparse(self) -> bool:
        return self.sparsity > 0.0

    @property
    def readjusts(self) -> bool:
        return self.sparse and self.p0 > 0.0 and METHODS[self.method].readjusts

    @property
    def effective_delta_t(self) -> int:
        return self.delta_t if self.delta_t is not None else (5 if self.rounds <= 60 else 10)

    @property
    def effective_t_end(self) -> int:
        return self.t_end if self.t_end is not None else max(1, self.rounds // 2)
