"""The three PNGs that ``simulate`` and ``report`` write, from history entries.

An entry is one round as the coordinator daemon records it (a line of ``history.jsonl``):
``round``, ``accuracy`` when the round was evaluated, cumulative byte counters and ``scores``
(``{device: {"r": ..., "q": ..., "gated_by": ...}}``, only for the devices whose update the
round scored). The simulation's records are the same entries plus the bytes its devices' links
carried, so both commands draw through :func:`write_plots`:

- ``accuracy_vs_round.png``: accuracy of every evaluated round;
- ``accuracy_vs_uplink.png``: the same against the cumulative uplink (``uplink_key``);
- ``importance_vs_round.png``: each device's importance r_n over the rounds that scored it,
  the *flagged* devices in red, the others in blue.

What "flagged" means is the caller's: in a simulation, the devices it made noisy or hostile
(it knows); in a real federation, the devices the coordinator's own scores single out
(``fedprune.coordinator.report.flag_devices``). Matplotlib draws on the Agg canvas only (no
display, no pyplot state), and each file is written atomically, so a viewer that reloads it
while a report runs never reads half a PNG.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedprune.common.fsutil import atomic_write
from fedprune.coordinator.state import entry_score, score_name

PLOT_FILES = ("accuracy_vs_round.png", "accuracy_vs_uplink.png", "importance_vs_round.png")
FIGSIZE = (5, 3.5)
DPI = 110


def write_plots(entries: Iterable[Mapping[str, Any]], out: str | Path, flagged: Collection[str] = (),
                title: str = "", uplink_key: str = "cum_bytes_in",
                uplink_label: str = "cumulative uplink (MB received by the coordinator)",
                flagged_label: str = "flagged", others_label: str = "others") -> list[Path]:
    """Write :data:`PLOT_FILES` into ``out`` (created if missing); returns their paths in that
    order. ``uplink_key``: the entry's cumulative uplink byte counter. A plot with nothing to
    show yet (no evaluated round, no scored device) is still written, saying so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    entries = list(entries)
    out = Path(out)
    flagged = set(flagged)
    evaluated = [e for e in entries if entry_score(e) is not None]
    name = score_name(entries)
    percent = name == "accuracy"  # accuracy in %; F1 and R² as they are
    acc = [(100 if percent else 1) * float(entry_score(e)) for e in evaluated]
    metric_label = "test accuracy (%)" if percent else {"r2": "test R²", "f1": "test F1"}.get(name, f"test {name}")

    def save(name: str, draw) -> Path:
        fig = Figure(figsize=FIGSIZE)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        draw(ax)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
        path = out / name
        atomic_write(path, buffer.getvalue(), mode=0o644)
        return path

    def nothing_yet(ax, what: str) -> None:
        ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")

    def accuracy_vs_round(ax) -> None:
        ax.plot([e["round"] for e in evaluated], acc)
        ax.set(xlabel="round", ylabel=metric_label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not evaluated:
            nothing_yet(ax, "no evaluated round yet")

    def accuracy_vs_uplink(ax) -> None:
        ax.plot([e.get(uplink_key, 0) / 1e6 for e in evaluated], acc)
        ax.set(xlabel=uplink_label, ylabel=metric_label)
        if not evaluated:
            nothing_yet(ax, "no evaluated round yet")

    def importance(ax) -> None:
        traces: dict[str, list[tuple[int, float]]] = {}
        for entry in entries:
            for device, score in (entry.get("scores") or {}).items():
                traces.setdefault(device, []).append((entry["round"], score["r"]))
        for device, points in sorted(traces.items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, color="tab:red" if device in flagged else "tab:blue", alpha=0.6, lw=1)
        ax.plot([], [], color="tab:blue", label=others_label)
        ax.plot([], [], color="tab:red", label=flagged_label)
        ax.set(xlabel="round", ylabel="importance r_n")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        if not traces:
            nothing_yet(ax, "no scored device yet")

    out.mkdir(parents=True, exist_ok=True)
    return [save(name, draw) for name, draw in zip(PLOT_FILES, (accuracy_vs_round, accuracy_vs_uplink, importance))]
