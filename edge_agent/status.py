"""``fedprune-agent status``: what this device holds and has done, read from its state directory.

Reads only: the model release being served, the privacy budget spent per federation, and the
last rounds from the audit log (what was sent and how much, never payloads). It needs neither
the broker nor the bundle's secrets, so an owner can run it while the agent is running.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedprune.edge_agent.audit import AuditLog
from fedprune.edge_agent.ledger import LEDGER_GLOB, read_budget
from fedprune.edge_agent.release_store import ReleaseStore


def device_status(state_dir: Path, keep_releases: int = 3, last_rounds: int = 5) -> dict[str, Any]:
    state_dir = Path(state_dir)
    models = state_dir / "models"
    current = ReleaseStore(models, keep=keep_releases).current() if models.is_dir() else None
    privacy = []
    for path in sorted(state_dir.glob(LEDGER_GLOB)):
        budget = read_budget(path)
        if budget is not None:
            privacy.append({"federation": budget.federation, "rounds": budget.rounds, "epsilon_spent": budget.spent,
                            "epsilon_budget": budget.epsilon_budget, "delta": budget.delta})
    rounds: dict[tuple[str, int], dict[str, Any]] = {}
    for record in AuditLog(state_dir / "audit.jsonl").records():
        entry = rounds.setdefault((record.federation, record.round), {
            "federation": record.federation, "round": record.round, "messages": {}, "bytes": 0, "last_sent": 0.0})
        entry["messages"][record.message_type] = entry["messages"].get(record.message_type, 0) + 1
        entry["bytes"] += record.bytes
        entry["last_sent"] = max(entry["last_sent"], record.time)
    recent = sorted(rounds.values(), key=lambda r: r["last_sent"])[-last_rounds:]
    return {
        "state_dir": str(state_dir),
        "model_release": {"version": current[0], "path": str(current[1])} if current else None,
        "privacy": privacy,
        "recent_rounds": recent,
    }


def render(status: dict[str, Any], as_json: bool = False) -> str:
    if as_json:
        return json.dumps(status, indent=2)
    release = status["model_release"]
    lines = [f"state: {status['state_dir']}",
             f"model release: {release['version']} ({release['path']})" if release else "model release: none yet"]
    if not status["privacy"]:
        lines.append("privacy: differential privacy not used (no ledger)")
    for p in status["privacy"]:
        lines.append(f"privacy [{p['federation']}]: epsilon {p['epsilon_spent']:.3f} of {p['epsilon_budget']:g} "
                     f"spent over {p['rounds']} rounds (delta {p['delta']:g})")
    lines.append(f"{'federation':<16} {'round':>5} {'bytes':>10}  sent")
    for r in status["recent_rounds"]:
        sent = ", ".join(f"{kind} x{count}" for kind, count in sorted(r["messages"].items()))
        lines.append(f"{r['federation']:<16} {r['round']:>5} {r['bytes']:>10}  {sent}")
    return "\n".join(lines)
