"""The policy seam: one Strategy runs FedAvg, FedDST-style, fedprune and robust baselines.

Theory of operation (docs/ALGORITHM.md §2). ``initial_state`` fixes the ERK budgets k_l, draws m^0 and
scales the sparse initial weights. ``plan_round`` picks S^t and the hyper-parameters of round t
(readjust^t, p^t). ``finish_round`` takes the clients' updates and, in order: keeps the valid set V
(finite, non-zero updates of selected clients), scores every client with the leave-one-out cosine
psi_n^t (always: the thesis's contribution score, logged but not weighted by), turns the configured
quality signal into q_n and weights w_n ∝ s_n q_n, screens the updates (defences.py), combines them
over their sparse supports (§5), merges and re-prunes the masks on readjust rounds (§3.7) and
returns the new GlobalState. A method is a row of ``methods.METHODS`` (the step, `plain` by
default, is a separate knob), so every baseline runs through this same code path:

| method        | weights | combiner          | defences | mask readjust |
| fedavg        | s       | mean              | -        | never (static m^0 if sparse) |
| feddst        | s       | mean              | -        | yes           |
| fedprune      | s·q     | mean              | yes      | yes           |
| median        | -       | coordinate median | -        | yes if sparse |
| trimmed_mean  | -       | trimmed mean      | -        | yes if sparse |
| krum          | -       | mean of Krum pick | -        | yes if sparse |

The knobs are in config.py and the records in records.py; callers import all of them from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

import fedprune.coordinator.core.aggregation as aggregation
import fedprune.coordinator.core.contribution as contribution
import fedprune.coordinator.core.defences as defences
import fedprune.coordinator.core.masks as masks_mod
from fedprune.coordinator.core.config import StrategyConfig
from fedprune.coordinator.core.methods import METHODS, QUALITY_SIGNALS, STEPS
from fedprune.coordinator.core.records import (ClientScore, ClientUpdate, GlobalState, Masks, Params, RoundPlan,
                                               RoundResult, SecureWeighting)
from fedprune.protocol.layout import ModelLayout

__all__ = ["ClientScore", "ClientUpdate", "GlobalState", "Masks", "Params", "RoundPlan", "RoundResult", "Strategy",
           "StrategyConfig"]


class Strategy:
    def __init__(self, config: StrategyConfig) -> None:
        self.config = config
        self.method = METHODS[config.method]

    # ---- setup -------------------------------------------------------------------------------
    def initial_state(self, layout: ModelLayout, params: Mapping[str, np.ndarray], rng: np.random.Generator) -> GlobalState:
        cfg = self.config
        missing = [s.name for s in layout if s.name not in params]
        if missing:
            raise ValueError(f"initial params lack tensors {missing}")
        if cfg.sparse:
            densities = masks_mod.erk_densities(layout, cfg.sparsity, cfg.distribution, cfg.dense_layers)
        else:
            densities = {s.name: 1.0 for s in layout.masked}
        counts = masks_mod.active_counts(layout, densities)
        m0 = masks_mod.random_masks(layout, densities, rng)
        theta = {k: np.asarray(v, dtype=np.float32).copy() for k, v in params.items()}
        if cfg.sparse and cfg.scaled_init:
            theta = masks_mod.scale_sparse_init(theta, densities)
        theta = masks_mod.apply_masks(theta, m0)
        return GlobalState(layout=layout, round=1, params=theta, masks=m0, mask_version=0,
                           densities=densities, counts=counts)

    # ---- plan --------------------------------------------------------------------------------
    def plan_round(self, state: GlobalState, online_clients: Sequence[str], rng: np.random.Generator) -> RoundPlan:
        cfg = self.config
        t = state.round
        pool = sorted(set(online_clients))
        if cfg.clients_per_round and len(pool) > cfg.clients_per_round:
            pick = rng.choice(len(pool), size=cfg.clients_per_round, replace=False)
            selected = tuple(pool[i] for i in sorted(pick))
        else:
            selected = tuple(pool)
        readjust = cfg.readjusts and masks_mod.is_readjust_round(t, cfg.effective_delta_t, cfg.effective_t_end)
        p_t = masks_mod.prune_fraction(t, cfg.p0, cfg.effective_t_end) if readjust else 0.0
        hyper = replace(cfg.local, readjust=readjust, prune_fraction=p_t, seed=int(rng.integers(0, 2**62)))
        client_masks: dict[str, Masks] = {}
        keep: dict[str, float] = {}
        if cfg.adaptive_density and cfg.sparse and t > cfg.effective_delta_t and selected:
            keep = self._keep_fractions(state, selected)
            client_masks = {
                cid: masks_mod.nested_submask(state.params, state.masks, rho)
                for cid, rho in keep.items() if rho < 1.0
            }
        return RoundPlan(round=t, selected=selected, hyper=hyper, readjust=readjust, p_t=p_t,
                         client_masks=client_masks, keep_fraction=keep)

    def _keep_fractions(self, state: GlobalState, selected: Sequence[str]) -> dict[str, float]:
        """rho_n = max(rho_min, tanh(β z_n) / max_{S^t} tanh(β z_m)), z_n = q_n / mean_known(q) (§6)."""
        cfg = self.config
        mean_q = contribution.neutral_quality(state.quality)
        z = {c: state.quality.get(c, mean_q) / mean_q for c in selected}
        tz = {c: math.tanh(cfg.adaptive_beta * v) for c, v in z.items()}
        top = max(tz.values())
        return {c: (max(cfg.rho_min, v / top) if top > 0 else 1.0) for c, v in tz.items()}

    # ---- finish ------------------------------------------------------------------------------
    def finish_round(self, state: GlobalState, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> RoundResult:
        cfg = self.config
        valid, rejected = self._admissible(state, plan, updates)
        if valid:
            flat = np.stack([contribution.flatten(u.delta, state.trainable) for u in valid])
            g = contribution.gram(flat)
            nrm = contribution.norms(g)
            for u, n in zip(valid, nrm):
                if not n > contribution.EPS:
                    rejected[u.client_id] = "zero_update"
            keep_idx = [i for i, n in enumerate(nrm) if n > contribution.EPS]
            valid = [valid[i] for i in keep_idx]
            g = g[np.ix_(keep_idx, keep_idx)]
            nrm = nrm[keep_idx]
            flat = flat[keep_idx]
        if not valid:  # the round happened; the model stays as it was
            return RoundResult(state=replace(state, round=state.round + 1), scores={}, mask_churn=0.0, n_valid=0,
                               rejected=rejected, aggregated=False)

        ids = [u.client_id for u in valid]
        sizes = dict(state.data_sizes)
        quality = dict(state.quality)
        for u in valid:
            if u.client_id not in quality:
                quality[u.client_id] = contribution.neutral_quality(state.quality)
            sizes[u.client_id] = int(u.n_examples)
        s_v = np.array([sizes[c] for c in ids], dtype=np.float64)
        s_v = s_v / s_v.sum()

        psi, x_obs, ratios = self._scores(state, valid, g, s_v)
        if x_obs is not None and state.round > cfg.warmup_rounds:  # no observation from a lone update
            for c, x in zip(ids, x_obs):
                quality[c] = contribution.update_quality(quality[c], float(x), cfg.gamma, cfg.q_min)

        w = self._weights(ids, s_v, quality)
        screening, center = defences.Screening.admit_all(len(ids), state.trust), None
        if self.method.defended:
            screening = defences.screen(cfg, flat, nrm, g, ids, state.trust)
            center = defences.centered_clip(cfg, state.layout, valid, flat * screening.clip[:, None],
                                            screening.admitted)
        clip, gate = screening.clip, screening.admitted
        if not gate.all():
            kept = float(np.sum(w * gate))
            w = w * gate / kept if kept > contribution.EPS else gate / float(gate.sum())
        chosen = np.flatnonzero(gate)  # gated updates neither vote on masks nor hold positions
        if self.method.krum:
            chosen = aggregation.krum_select(g, cfg.krum_byzantine, cfg.krum_select)
        new_params, new_masks, churn, version = self._combine(state, plan, valid, nrm * clip, w, chosen, clip, center)
        if not all(np.all(np.isfinite(v)) for v in new_params.values()):
            rejected_all = dict(rejected, **{c: "non_finite_aggregate" for c in ids})
            return RoundResult(state=replace(state, round=state.round + 1), scores={}, mask_churn=0.0, n_valid=0,
                               rejected=rejected_all, aggregated=False)

        r = contribution.importance(quality, sizes)
        scores = {
            c: ClientScore(
                psi=float(psi[i]) if psi is not None else None,
                q=quality[c], r=r.get(c, 0.0), w=float(w[i]),
                quality_x=float(x_obs[i]) if x_obs is not None else None,
                loss_ratio=ratios[i], update_norm=float(nrm[i]), clip_factor=float(clip[i]),
                gated_by=screening.gated_by[i],
            )
            for i, c in enumerate(ids)
        }
        new_state = replace(state, round=state.round + 1, params=new_params, masks=new_masks, mask_version=version,
                            quality=quality, data_sizes=sizes, importance=r, trust=screening.trust)
        return RoundResult(state=new_state, scores=scores, mask_churn=churn, n_valid=len(valid),
                           rejected=rejected, aggregated=True)

    def _admissible(self, state: GlobalState, plan: RoundPlan,
                    updates: Sequence[ClientUpdate]) -> tuple[list[ClientUpdate], dict[str, str]]:
        """The well-formed updates of selected clients, and why each other one was rejected."""
        rejected: dict[str, str] = {}
        valid: list[ClientUpdate] = []
        seen: set[str] = set()
        for up in updates:
            reason = self._reject_reason(state, plan, up, seen)
            seen.add(up.client_id)
            if reason:
                rejected[up.client_id] = reason
            else:
                valid.append(up)
        return valid, rejected

    def _reject_reason(self, state: GlobalState, plan: RoundPlan, up: ClientUpdate, seen: set[str]) -> str:
        if up.client_id in seen:
            return "duplicate"
        if up.client_id not in plan.selected:
            return "not_selected"
        if up.n_examples <= 0:
            return "no_data"
        for spec in state.layout:
            if spec.trainable:
                v = up.delta.get(spec.name)
            else:
                v = up.buffers.get(spec.name, np.zeros(spec.shape))
            if v is None or np.shape(v) != spec.shape or not np.all(np.isfinite(v)):
                return "bad_tensor"
            if spec.masked:
                m = up.masks.get(spec.name)
                if m is None or np.shape(m) != spec.shape:
                    return "bad_mask"
        return ""

    def _scores(self, state: GlobalState, valid: Sequence[ClientUpdate], g: np.ndarray,
                s_v: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, list[float | None]]:
        """psi (always; None for a lone update), the round's quality observation x (None: no
        signal) and the loss ratios (None where a client reported no usable class)."""
        cfg = self.config
        ratios: list[float | None] = [None] * len(valid)
        if len(valid) == 1:
            return None, None, ratios
        sigma = s_v
        if cfg.reference == "r" and state.importance:
            ref = np.array([state.importance.get(u.client_id, 0.0) for u in valid])
            sigma = s_v if ref.sum() <= contribution.EPS else ref / ref.sum()
        psi = contribution.loo_cosine(g, sigma) if cfg.leave_one_out else contribution.self_cosine(g, sigma)
        x_obs, ratios = self._quality_observation([u.class_losses for u in valid])
        return psi, x_obs, ratios

    def _quality_observation(self, reports: Sequence[Mapping[int, tuple[float, int]]]
                             ) -> tuple[np.ndarray | None, list[float | None]]:
        """The round's quality observation x (None: no signal) and the clients' loss ratios."""
        cfg = self.config
        signal = QUALITY_SIGNALS[cfg.quality] if self.method.quality_weights else None
        if signal is None:
            return None, [None] * len(reports)
        medians = contribution.class_medians(reports)
        totals = contribution.class_totals(reports) if cfg.loss_max_share < 1.0 else None
        ratios = [contribution.loss_ratio(r, medians, cfg.loss_weighted, cfg.loss_offset,
                                          cfg.loss_reduce, totals, cfg.loss_max_share) for r in reports]
        return signal(ratios, cfg), ratios

    def _weights(self, ids: Sequence[str], s_v: np.ndarray, quality: Mapping[str, float]) -> np.ndarray:
        """w ∝ s·q for a quality-weighted method (data shares s if Σ s·q ≈ 0), else w = s."""
        if not self.method.quality_weights:
            return s_v
        w, fell_back = contribution.weights(s_v * np.array([quality[c] for c in ids]))
        return s_v if fell_back else w

    def _combine(self, state: GlobalState, plan: RoundPlan, valid: Sequence[ClientUpdate], nrm: np.ndarray,
                 w: np.ndarray, chosen: np.ndarray, clip: np.ndarray,
                 center: tuple[np.ndarray, np.ndarray] | None) -> tuple[Params, Masks, float, int]:
        """Combine over sparse supports (§5), step θ, merge/re-prune masks on readjust rounds.

        ``nrm`` are the norms after clipping and ``clip`` the factors that produced them;
        ``center`` is (flat centre, per-update factors) of centered clipping, or None."""
        cfg = self.config
        scale = STEPS[cfg.step](w, nrm, clip)
        sel = [valid[i] for i in chosen]
        w_sel = np.full(len(chosen), 1.0 / len(chosen)) if self.method.krum else w[chosen]
        scale_sel = scale[chosen]
        sizes = {spec.name: int(np.prod(spec.shape)) for spec in state.layout}
        offsets = dict(zip(state.trainable, np.cumsum([0] + [sizes[n] for n in state.trainable])[:-1].tolist()))
        new_params: Params = {}
        for spec in state.layout:
            if not spec.trainable:
                continue
            x = np.stack([np.asarray(u.delta[spec.name], dtype=np.float64) * s for u, s in zip(sel, scale_sel)])
            if center is not None:
                start = offsets[spec.name]
                v = center[0][start:start + x[0].size].reshape(x.shape[1:])
                x = v + center[1][chosen].reshape((-1,) + (1,) * v.ndim) * (x - v)
            holds = np.stack([np.asarray(u.masks[spec.name], dtype=bool) for u in sel]) if spec.masked else None
            agg, empty = self.method.combine(x, holds, w_sel, cfg.trim_fraction)
            theta = state.params[spec.name].astype(np.float64) + cfg.server_lr * agg
            if spec.masked and plan.readjust:
                theta = np.where(empty, 0.0, theta)
            new_params[spec.name] = theta.astype(np.float32)
        for spec in state.layout:
            if spec.trainable:
                continue
            vals = [np.asarray(u.buffers.get(spec.name, state.params[spec.name])) for u in valid]
            if spec.name.endswith("num_batches_tracked"):
                new_params[spec.name] = np.max(np.stack(vals), axis=0).astype(state.params[spec.name].dtype)
            else:
                avg = np.tensordot(w, np.stack(vals).astype(np.float64), axes=1)
                new_params[spec.name] = avg.astype(state.params[spec.name].dtype)
        new_masks, churn, version = state.masks, 0.0, state.mask_version
        if plan.readjust and state.masks:
            votes = masks_mod.votes_from([u.masks for u in sel], state.masks.keys())
            new_masks, churn = masks_mod.merge_and_reprune(new_params, votes, state.masks, state.counts, cfg.min_votes)
            version += 1
        new_params = masks_mod.apply_masks(new_params, new_masks)
        return new_params, new_masks, churn, version

    # ---- secure rounds (docs/PRIVACY.md) ------------------------------------------------------
    def secure_weights(self, state: GlobalState, reports: Mapping[str, tuple[int, Mapping[int, tuple[float, int]]]]
                       ) -> SecureWeighting:
        """w ∝ s·q from what the devices report before they mask (examples, per-class losses of
        the received model): the same quality signal as a plain round, without ψ (it needs the
        updates). Every device that reported is weighted; its weight goes out in its stage-2 message."""
        cfg = self.config
        ids = sorted(reports)
        sizes, quality = dict(state.data_sizes), dict(state.quality)
        for c in ids:
            quality.setdefault(c, contribution.neutral_quality(state.quality))
            sizes[c] = int(reports[c][0])
        s_v = np.array([max(sizes[c], 0) for c in ids], dtype=np.float64)
        s_v = s_v / s_v.sum() if s_v.sum() > 0 else np.full(len(ids), 1.0 / len(ids))
        x_obs, ratios = self._quality_observation([reports[c][1] for c in ids]) if len(ids) > 1 else (None, [None] * len(ids))
        if x_obs is not None and state.round > cfg.warmup_rounds:
            for c, x in zip(ids, x_obs):
                quality[c] = contribution.update_quality(quality[c], float(x), cfg.gamma, cfg.q_min)
        w = self._weights(ids, s_v, quality)
        return SecureWeighting(ids=tuple(ids), weights=w, quality=quality, sizes=sizes,
                               quality_x=None if x_obs is None else tuple(float(x) for x in x_obs), ratios=tuple(ratios))

    def finish_secure_round(self, state: GlobalState, plan: RoundPlan, weighting: SecureWeighting,
                            mean_delta: Params, buffer_delta: Params, survivors: Sequence[str],
                            rng: np.random.Generator) -> RoundResult:
        """θ += η_g · (the weighted mean of the survivors' updates, all the coordinator learns);
        on a readjust round the coordinator re-prunes from that aggregate and regrows at random
        (SET, Mocanu et al. 2018): no device's own regrowth votes leave it (docs/ALGORITHM_NOTES.md §12)."""
        cfg = self.config
        new_params: Params = {}
        for spec in state.layout:
            base = state.params[spec.name]
            if spec.trainable:
                new_params[spec.name] = (base.astype(np.float64) + cfg.server_lr * mean_delta[spec.name]).astype(np.float32)
            elif spec.name in buffer_delta:
                new_params[spec.name] = (base.astype(np.float64) + buffer_delta[spec.name]).astype(base.dtype)
            else:
                new_params[spec.name] = base.copy()
        new_masks, churn, version = state.masks, 0.0, state.mask_version
        if plan.readjust and state.masks:
            new_masks, churn = masks_mod.prune_and_regrow(new_params, state.masks, plan.p_t, rng)
            version += 1
        new_params = masks_mod.apply_masks(new_params, new_masks)
        ids = list(weighting.ids)
        if not all(np.all(np.isfinite(v)) for v in new_params.values()):
            return RoundResult(state=replace(state, round=state.round + 1), scores={}, mask_churn=0.0, n_valid=0,
                               rejected={c: "non_finite_aggregate" for c in survivors}, aggregated=False)
        r = contribution.importance(weighting.quality, weighting.sizes)
        summed = set(survivors)
        scores = {
            c: ClientScore(psi=None, q=weighting.quality[c], r=r.get(c, 0.0), w=float(weighting.weights[i]),
                           quality_x=None if weighting.quality_x is None else weighting.quality_x[i],
                           loss_ratio=weighting.ratios[i], update_norm=None,
                           gated_by="" if c in summed else "dropped")
            for i, c in enumerate(ids)
        }
        new_state = replace(state, round=state.round + 1, params=new_params, masks=new_masks, mask_version=version,
                            quality=weighting.quality, data_sizes=weighting.sizes, importance=r)
        return RoundResult(state=new_state, scores=scores, mask_churn=churn, n_valid=len(summed),
                           rejected={}, aggregated=True)
