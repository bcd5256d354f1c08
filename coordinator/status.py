"""``fedprune-coordinator status``: the operator's view read from the state directory.

Builds the same ``FleetView`` the running daemon serves at ``/status.json`` (from the registry,
the newest checkpoint and history.jsonl), so the command, the page and ``/metrics`` agree. It
takes no lock and writes nothing: safe while the daemon runs. What only the live daemon knows
(the open round's phase and deadline, recent events) is on the status page.
"""

from __future__ import annotations

import json
import time

from fedprune.common.model_rules import HEADLINE
from fedprune.coordinator.config import CoordinatorConfig
from fedprune.coordinator.fleet.registry_store import RegistryStore
from fedprune.coordinator.fleet_view import FleetView, RoundTrail, ViewInputs, build_view
from fedprune.coordinator.releases import releases_on_disk
from fedprune.coordinator.state import StateDir


def view_from_state(config: CoordinatorConfig, now: float | None = None) -> FleetView:
    now = time.time() if now is None else now
    state = StateDir(config.state.dir)
    checkpoint = state.load_latest_checkpoint() or {}
    registry = RegistryStore(state.root).read(config.rounds.heartbeat_timeout_s)
    return build_view(ViewInputs(
        federation=config.federation.id, total_rounds=config.rounds.total,
        completed_rounds=int(checkpoint.get("round", 0)), records=registry.devices(), online=registry.online(now),
        trail=RoundTrail(state.read_history(), score_name=HEADLINE[config.federation.task]),
        importance=checkpoint.get("importance", {}),
        quality=checkpoint.get("quality", {}), releases=releases_on_disk(state.root),
    ), now, running=False)


def render_text(view: FleetView) -> str:
    score = view.last_score
    last = view.rounds[-1] if view.rounds else None
    lines = [
        f"federation {view.federation}: {view.completed_rounds}/{view.total_rounds} rounds, last {view.score_name} "
        + (f"{score:.4f}" if score is not None else "n/a")
        + f", {view.online} of {view.enrolled} devices online",
        f"uplink {last.cum_bytes_in:,} bytes, downlink {last.cum_bytes_out:,} bytes since the coordinator started"
        if last else "no round completed yet",
    ]
    if view.releases:
        newest = view.releases[-1]
        lines.append(f"release v{newest['version']} (round {newest['round']}, {newest['bytes']:,} bytes)")
    lines.append(f"{'device':<20} {'state':<9} {'rounds':>6} {'r':>6} {'q':>6} {'sent':>10} {'release':>7} "
                 f"{'eps left':>8}  last decline or refusal")
    for d in view.devices:
        lines.append(
            f"{d.device:<20} {d.state:<9} {d.rounds:>6} {_num(d.importance, '.3f'):>6} {_num(d.quality, '.3f'):>6} "
            f"{d.bytes_sent:>10,} {_num(d.release, 'd'):>7} {_num(d.epsilon_left, '.2f'):>8}  {d.last_problem or '-'}")
    return "\n".join(lines)


def status_report(config: CoordinatorConfig, as_json: bool = False) -> str:
    view = view_from_state(config)
    return json.dumps(view.to_dict(), indent=2) if as_json else render_text(view)


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
