"""``fedprune-coordinator report``: the plots ``simulate`` writes, and a short summary, from a
coordinator's state directory, while its daemon runs or after it finished.

It reads only ``<state>/history.jsonl`` (one line per completed round, appended by the daemon),
so it takes no lock and changes nothing in the state directory but its own ``report/`` folder
(the default ``--out``). A line the daemon is still writing (no newline yet), or one cut short by
a crash, is skipped and counted, never a traceback.

Flagged devices. A real federation does not know which devices are noisy or hostile; the report
flags those the coordinator's own scores single out (:func:`flag_devices`):

- *low quality*: the device's last known quality q (the moving average that weights its updates,
  in [q_min, 1]; clean devices sit near 1) is below :data:`LOW_QUALITY`;
- *gated*: the Byzantine defences left at least one of its updates out (``gated_by``: sybil,
  chance or direction).

In the importance plot they are drawn in red; the summary says why each one was flagged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedprune.common.fsutil import atomic_write
from fedprune.coordinator.plots import write_plots
from fedprune.coordinator.state import StateDir, StateError, entry_score, score_name

if TYPE_CHECKING:
    from fedprune.coordinator.config import CoordinatorConfig

LOW_QUALITY = 0.1
SUMMARY_FILE = "summary.json"
FLAG_RULE = f"last known quality q < {LOW_QUALITY:g}, or an update gated by the defences in any round"


@dataclass(frozen=True)
class History:
    entries: list[dict[str, Any]]  # in file order, one per completed round
    skipped: int  # lines that are not a whole entry: torn (still being written, or cut by a crash)


def read_history(path: Path) -> History:
    """The whole entries of ``path``; a missing file has none. Safe while the daemon appends: the
    text after the last newline is a line still being written, and a line that is not a JSON
    object with a round number is skipped (and counted) rather than stopping the report."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return History([], 0)
    except OSError as exc:
        raise StateError(f"{path}: cannot read it ({exc.strerror or exc}); run `report` as a user who can read "
                         "the coordinator's state directory") from None
    *lines, tail = blob.split(b"\n")
    skipped = 1 if tail.strip() else 0
    entries = []
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("round"), int):
            entries.append(entry)
        else:
            skipped += 1
    return History(entries, skipped)


def last_scores(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each device's score in the last round that scored it, with that round as ``round``."""
    last: dict[str, dict[str, Any]] = {}
    for entry in entries:
        for device, score in (entry.get("scores") or {}).items():
            last[device] = {**score, "round": entry["round"]}
    return last


def gated_rounds(entries: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per device, how many rounds the defences left its update out, by reason."""
    gated: dict[str, dict[str, int]] = {}
    for entry in entries:
        for device, score in (entry.get("scores") or {}).items():
            reason = score.get("gated_by")
            if reason:
                by_reason = gated.setdefault(device, {})
                by_reason[reason] = by_reason.get(reason, 0) + 1
    return gated


def flag_devices(entries: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The devices the coordinator's scores single out (module docstring), each with its reasons."""
    flagged: dict[str, list[str]] = {}
    for device, score in last_scores(entries).items():
        if score.get("q") is not None and score["q"] < LOW_QUALITY:
            flagged.setdefault(device, []).append(f"quality q={score['q']:.3g} < {LOW_QUALITY:g} "
                                                  f"(round {score['round']})")
    for device, by_reason in gated_rounds(entries).items():
        reasons = ", ".join(f"{reason} x{n}" for reason, n in sorted(by_reason.items()))
        flagged.setdefault(device, []).append(f"gated in {sum(by_reason.values())} rounds ({reasons})")
    return dict(sorted(flagged.items()))


def cumulative_bytes(entries: list[dict[str, Any]], key: str) -> list[int]:
    """``key``'s running total per entry. The daemon's counters restart at 0 when it does, so a
    value below the one before it continues from there (the bytes between the last commit and
    the restart are not in the file: the total can only be short)."""
    totals, offset, previous = [], 0, 0
    for entry in entries:
        value = int(entry.get(key) or 0)
        if value < previous:
            offset += previous
        previous = value
        totals.append(offset + value)
    return totals


def summarize(entries: list[dict[str, Any]], state_dir: Path, skipped: int) -> dict[str, Any]:
    evaluated = [e for e in entries if entry_score(e) is not None]
    gated = gated_rounds(entries)
    uplink, downlink = cumulative_bytes(entries, "cum_bytes_in"), cumulative_bytes(entries, "cum_bytes_out")
    return {
        "state_dir": str(state_dir),
        "rounds": len(entries),
        "last_round": entries[-1]["round"] if entries else None,
        "score_name": score_name(entries),  # accuracy, f1 or r2
        "final_score": entry_score(evaluated[-1]) if evaluated else None,
        "final_score_round": evaluated[-1]["round"] if evaluated else None,
        "best_score": max(entry_score(e) for e in evaluated) if evaluated else None,
        "cum_uplink_bytes": uplink[-1] if entries else 0,  # received by the coordinator
        "cum_downlink_bytes": downlink[-1] if entries else 0,  # published by the coordinator
        "devices": {device: {"r": s.get("r"), "q": s.get("q"), "round": s["round"],
                             "gated_rounds": sum(gated.get(device, {}).values())}
                    for device, s in sorted(last_scores(entries).items())},
        "flagged": flag_devices(entries),
        "flag_rule": FLAG_RULE,
        "skipped_lines": skipped,
    }


def write_report(config: "CoordinatorConfig", out: str | Path | None = None) -> tuple[list[Path], dict[str, Any]]:
    """The three PNGs and ``summary.json`` for ``config``'s state directory, into ``out``
    (default ``<state dir>/report``); returns the paths written and the summary."""
    state = StateDir(Path(config.state.dir))
    if not state.root.is_dir():
        raise StateError(f"[state] dir {state.root}: no such directory; point --config (or --set state.dir=...) at "
                         "the coordinator whose rounds to report, or run `fedprune-coordinator run` first")
    history = read_history(state.history_path)
    if not history.entries:
        found = "is missing" if not state.history_path.exists() else "holds no completed round"
        raise StateError(f"{state.history_path} {found}: nothing to report yet; run `fedprune-coordinator run "
                         f"--config ...` until a round completes, or set [state] dir to the directory that holds "
                         "the federation's history.jsonl")
    out = Path(out) if out is not None else state.root / "report"
    entries = history.entries
    uplink = cumulative_bytes(entries, "cum_bytes_in")
    plotted = [{**e, "cum_bytes_in": total} for e, total in zip(entries, uplink)]
    summary = summarize(entries, state.root, history.skipped)
    try:
        paths = write_plots(plotted, out, flagged=set(summary["flagged"]), title=config.federation.id,
                            uplink_key="cum_bytes_in",
                            uplink_label="cumulative uplink (MB received by the coordinator)")
        atomic_write(out / SUMMARY_FILE, (json.dumps(summary, indent=1) + "\n").encode(), mode=0o644)
    except OSError as exc:
        raise StateError(f"--out {out}: cannot write the report there ({exc.strerror or exc}); choose a "
                         "directory you can write with --out DIR") from None
    return paths + [out / SUMMARY_FILE], summary
