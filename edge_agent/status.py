"""``fedprune-agent status``: what this device holds and has done, read from its state directory.

Reads only: the last round it took part in and what it sent, the bytes it sent today (UTC) and
in all (the audit log: sizes and digests, never payloads), the privacy budget left per
federation, the model release in service, and the last rounds it declined and why. It needs
neither the broker nor the bundle's secrets, and every file it reads is replaced atomically or
appended to, so an owner can run it while the agent is running; a new state directory gives
"nothing yet", never a traceback. Times are ISO 8601 in UTC.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.edge_agent.audit import DeclineLog, iso_time, read_records, utc_day
from fedprune.edge_agent.core.privacy import PrivacyBudget, RoundCost, epsilon_from_rdp
from fedprune.edge_agent.ledger import LEDGER_GLOB, LedgerError, read_budget
from fedprune.edge_agent.release_store import POINTER, ReleaseStore, ReleaseStoreError

# Plain words for the reasons a device declines a round (edge_agent/core/guard.py, privacy.py,
# agent.py, daemon.py); an unknown reason is shown as it is.
DECLINE_REASONS = {
    "too_hot": "the device was too hot",
    "on_battery": "the device ran on battery",
    "battery_low": "the battery was low",
    "memory_low": "too little free memory",
    "outside_training_window": "outside the hours training is allowed",
    "privacy_budget_exhausted": "the privacy budget is used up",
    "training_failed": "training failed (see the agent's log)",
    "training_diverged": "training diverged",
    "upload_failed": "the update could not be sent",
    "privacy_ledger_unwritable": "the privacy ledger could not be written",
    "data_mismatch": "this device's data does not fit the model",
    "layout_mismatch": "this device builds the model differently from the coordinator (another package version?)",
    "missing_base": "it lacked the previous task's weights (the coordinator then sent them whole)",
}
MAX_ROUNDS_LEFT = 100_000


def device_status(state_dir: Path, keep_releases: int = 3, last_rounds: int = 5, *, last_declines: int = 5,
                  privacy: Any = None, now: float | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict. ``privacy``: the config's ``[privacy]`` section (its ε
    budget and δ apply to what was spent, as the agent applies them when it starts; its σ gives
    the rounds left); None reads the budgets the ledgers last recorded."""
    state_dir = Path(state_dir)
    now = time.time() if now is None else now
    today = utc_day(now)
    rounds: dict[tuple[str, int], dict[str, Any]] = {}
    sent_today = sent_total = 0
    for record in read_records(state_dir / "audit.jsonl"):
        sent_total += record.bytes
        if utc_day(record.time) == today:
            sent_today += record.bytes
        entry = rounds.setdefault((record.federation, record.round), {
            "federation": record.federation, "round": record.round, "messages": {}, "bytes": 0, "last_sent": 0.0})
        entry["messages"][record.message_type] = entry["messages"].get(record.message_type, 0) + 1
        entry["bytes"] += record.bytes
        entry["last_sent"] = max(entry["last_sent"], record.time)
    by_time = sorted(rounds.values(), key=lambda r: r["last_sent"])
    took_part = [r for r in by_time if "update" in r["messages"]]
    declines = DeclineLog(state_dir / "declines.json").records()[-last_declines:] if last_declines > 0 else []
    return {
        "state_dir": str(state_dir),
        "time": _iso(now),
        "last_round": _with_iso(took_part[-1]) if took_part else None,
        "bytes_sent": {"day": today, "today": sent_today, "total": sent_total},
        "privacy_enabled": bool(privacy is not None and privacy.enabled),
        "privacy": _privacy(state_dir, privacy),
        "model_release": _release(state_dir / "models", keep_releases),
        "declines": [{"time": _iso(d.time), "federation": d.federation, "round": d.round, "reason": d.reason}
                     for d in reversed(declines)],
        "recent_rounds": [_with_iso(r) for r in by_time[-last_rounds:]] if last_rounds > 0 else [],
    }


def _iso(seconds: float) -> str:
    """JSON times: ISO 8601 UTC with milliseconds, as in ``fedprune-agent audit --json``; the text
    drops the milliseconds (``_short``)."""
    return iso_time(seconds, milliseconds=True)


def _short(iso: str) -> str:
    return iso[:19] + "Z"


def _with_iso(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "last_sent": _iso(entry["last_sent"])}


def _privacy(state_dir: Path, config: Any) -> list[dict[str, Any]]:
    out = []
    for path in sorted(state_dir.glob(LEDGER_GLOB)):
        federation = path.name[len("privacy-"):-len(".json")]
        try:
            budget = read_budget(path)
        except LedgerError as exc:
            out.append({"federation": federation, "error": str(exc)})
            continue
        if budget is None:
            continue
        cost = None
        if config is not None and config.enabled:
            budget = dataclasses.replace(budget, epsilon_budget=config.epsilon_budget, delta=config.delta)
            cost = RoundCost(config.noise_multiplier)
        spent = budget.spent
        out.append({"federation": budget.federation, "rounds": budget.rounds, "epsilon_spent": spent,
                    "epsilon_budget": budget.epsilon_budget, "epsilon_left": max(0.0, budget.epsilon_budget - spent),
                    "delta": budget.delta, "rounds_left": None if cost is None else rounds_left(budget, cost)})
    return out


def rounds_left(budget: PrivacyBudget, cost: RoundCost) -> int:
    """How many more rounds fit in the budget at this cost (at most ``MAX_ROUNDS_LEFT``)."""
    step = cost.rdp(budget.orders)
    base = np.asarray(budget.rdp)

    def fits(k: int) -> bool:
        return epsilon_from_rdp(base + k * step, budget.delta, budget.orders)[0] <= budget.epsilon_budget

    low, high = 0, MAX_ROUNDS_LEFT
    if fits(high):
        return high
    while high - low > 1:  # fits(low), not fits(high); ε grows with every round
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low if fits(low) else 0


def _release(models: Path, keep: int) -> dict[str, Any] | None:
    if not (models / POINTER).exists():
        return None
    try:
        store = ReleaseStore(models, keep=keep)
    except ReleaseStoreError as exc:
        return {"version": None, "error": str(exc)}
    current = store.current()
    if current is None:
        return None
    metadata = store.metadata()
    validation = {key: metadata[key] for key in ("val_accuracy", "val_f1", "val_r2") if key in metadata}
    return {"version": current[0], "path": str(current[1]), "round": metadata.get("round"),
            "federation": metadata.get("federation"), **validation}


def render(status: dict[str, Any], as_json: bool = False) -> str:
    if as_json:
        return json.dumps(status, indent=2)
    lines = [f"state directory: {status['state_dir']} (at {_short(status['time'])})"]

    last = status["last_round"]
    if last is None:
        lines.append("last round:      nothing yet (this device has not sent an update)")
    else:
        lines.append(f"last round:      round {last['round']} of federation {last['federation']}, "
                     f"{_short(last['last_sent'])}: sent {_messages(last['messages'])}, {last['bytes']:,} bytes")

    sent = status["bytes_sent"]
    lines.append(f"bytes sent:      {sent['today']:,} today ({sent['day']}, UTC), {sent['total']:,} in total")

    if not status["privacy"]:
        lines.append("privacy budget:  " + ("on, nothing spent yet" if status["privacy_enabled"]
                                           else "not used (no privacy ledger)"))
    for p in status["privacy"]:
        if "error" in p:
            lines.append(f"privacy budget [{p['federation']}]: ledger unreadable: {p['error']}")
            continue
        more = "" if p["rounds_left"] is None else f" (about {_count(p['rounds_left'], 'more round')})"
        lines.append(f"privacy budget [{p['federation']}]: epsilon {p['epsilon_left']:.3f} left of {p['epsilon_budget']:g}"
                     f"{more}; {p['epsilon_spent']:.3f} spent over {_count(p['rounds'], 'round')} (delta {p['delta']:g})")

    release = status["model_release"]
    if release is None:
        lines.append("model release:   none yet")
    elif release.get("error"):
        lines.append(f"model release:   unreadable: {release['error']}")
    else:
        about = []
        if release.get("round") is not None:
            about.append(f"from round {release['round']}")
        if isinstance(release.get("val_accuracy"), (int, float)):
            about.append(f"accuracy {100 * release['val_accuracy']:.1f} %")
        for key, name in (("val_f1", "F1"), ("val_r2", "R²")):
            if isinstance(release.get(key), (int, float)):
                about.append(f"{name} {release[key]:.3f}")
        lines.append(f"model release:   version {release['version']}" + (f" ({', '.join(about)})" if about else "")
                     + f", {release['path']}")

    if not status["declines"]:
        lines.append("declined rounds: none")
    else:
        lines.append("declined rounds (newest first):")
        for d in status["declines"]:
            lines.append(f"  {_short(d['time'])}  {d['federation']} round {d['round']}: {_reason(d['reason'])}")

    lines.append("recent rounds:" if status["recent_rounds"] else "recent rounds:   nothing sent yet")
    if status["recent_rounds"]:
        lines.append(f"  {'last sent':<20}  {'federation':<16} {'round':>5} {'bytes':>10}  sent")
        for r in status["recent_rounds"]:
            lines.append(f"  {_short(r['last_sent']):<20}  {r['federation']:<16} {r['round']:>5} {r['bytes']:>10}  "
                         f"{_messages(r['messages'])}")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _messages(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))


def _reason(reason: str) -> str:
    code, _, detail = reason.partition(": ")
    plain = DECLINE_REASONS.get(code)
    if plain is None:
        return reason
    return f"{plain} ({reason})" if not detail else f"{plain}: {detail}"
