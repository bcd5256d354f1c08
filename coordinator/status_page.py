"""The status page: one server-rendered HTML document with inline SVG charts.

No build chain and nothing fetched from elsewhere: the page is its own stylesheet, charts and a
few lines of script that fetch the page again every few seconds and swap its ``<main>`` (so the
server stays the only renderer), plus a countdown to the round's deadline. Every value that
comes from a device (ids, reasons, event fields) is escaped. Elements carry ``data-field``
attributes so tests and scrapers can read the numbers without parsing prose.
"""

from __future__ import annotations

import base64
import hashlib
import time
from html import escape
from typing import Any, Callable, Sequence

from fedprune.coordinator.fleet_view import FleetView, thin

REFRESH_S = 5
RELEASES_SHOWN = 8  # newest first; status.json has them all
EVENTS_SHOWN = 30  # newest first; status.json has the whole feed

SCRIPT = """
const REFRESH_MS = %d;
function tick() {
  const el = document.querySelector('[data-deadline]');
  if (!el) return;
  const left = Math.max(0, Number(el.dataset.deadline) - Date.now() / 1000);
  el.textContent = left.toFixed(0) + ' s';
}
async function refresh() {
  if (document.getElementById('pause').checked) return;
  try {
    const response = await fetch(location.pathname, {credentials: 'same-origin', cache: 'no-store'});
    if (!response.ok) throw new Error('HTTP ' + response.status);
    const page = new DOMParser().parseFromString(await response.text(), 'text/html');
    document.querySelector('main').replaceWith(page.querySelector('main'));
    document.getElementById('stale').hidden = true;
    tick();
  } catch (err) {
    document.getElementById('stale').hidden = false;
  }
}
setInterval(refresh, REFRESH_MS);
setInterval(tick, 1000);
tick();
""" % (REFRESH_S * 1000)

SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src '{SCRIPT_HASH}'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")

STYLE = """
:root { color-scheme: light dark; --fg: #1d2430; --muted: #667085; --line: #d0d5dd; --bg: #fff;
        --card: #f8f9fb; --up: #2e6fdb; --down: #d9822b; --acc: #1f9d55; --loss: #9b51e0; --bad: #c62828; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e9ef; --muted: #98a2b3; --line: #344054; --bg: #111418; --card: #1a1f26; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
header, main { max-width: 1100px; margin: 0 auto; padding: 0.75rem 1rem; }
header { display: flex; flex-wrap: wrap; gap: 0.5rem 1rem; align-items: baseline; justify-content: space-between; }
h1 { font-size: 1.25rem; margin: 0; } h2 { font-size: 1.05rem; margin: 1.25rem 0 0.5rem; }
.muted { color: var(--muted); } .bad { color: var(--bad); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 0.5rem; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 0.5rem 0.75rem; }
.card b { display: block; font-size: 1.3rem; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 0.75rem; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 0.5rem; }
figcaption { font-weight: 600; margin-bottom: 0.25rem; }
svg { width: 100%; height: auto; display: block; }
svg text { fill: var(--muted); font-size: 11px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 0.3rem 0.5rem; border-bottom: 1px solid var(--line); white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { border-radius: 999px; padding: 0 0.5rem; font-size: 12px; border: 1px solid var(--line); }
.state-online { background: #e3f6ea; color: #14532d; } .state-offline { background: #f2f4f7; color: #475467; }
.state-revoked, .state-excluded { background: #fdecea; color: #7f1d1d; }
.level-WARNING, .level-ERROR { color: var(--bad); }
label { font-size: 13px; }
"""


def render_page(view: FleetView, now: float | None = None) -> str:
    now = time.time() if now is None else now
    return "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fedprune · {escape(view.federation)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<header>",
        f'<h1>fedprune · <span data-field="federation">{escape(view.federation)}</span></h1>',
        '<span><span id="stale" class="bad" hidden>not refreshed: the coordinator did not answer · </span>'
        '<label><input type="checkbox" id="pause"> pause refresh</label></span>',
        "</header>",
        "<main>",
        _summary(view, now),
        _charts(view),
        _devices(view, now),
        _releases(view),
        _events(view, now),
        f'<p class="muted">Page built {_iso(view.generated_at)}; '
        f'{"live from the coordinator" if view.running else "read from the state directory"}. '
        'Also: <a href="status.json">status.json</a> · <a href="metrics">metrics</a></p>',
        "</main>",
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ])


def _summary(view: FleetView, now: float) -> str:
    live = view.live
    phase = live.phase.replace("_", " ") if live else ("finished" if view.completed_rounds >= view.total_rounds
                                                         else "not running")
    cards = [
        ("Round", f'<span data-field="completed_rounds">{view.completed_rounds}</span> of '
                  f'<span data-field="total_rounds">{view.total_rounds}</span> done'),
        ("Phase", f'<span data-field="phase">{escape(phase)}</span>'
                  + (f' · round <span data-field="current_round">{live.round}</span>' if live else "")),
    ]
    if live and live.deadline is not None and live.phase == "training":
        cards.append(("Deadline", f'<span data-deadline="{live.deadline:.3f}">{max(0.0, live.deadline - now):.0f} s</span>'))
    if live:
        cards.append(("Updates", f'<span data-field="received">{live.received}</span> of {live.selected} selected '
                                 f'· quorum <span data-field="quorum">{live.quorum}</span>'))
    cards += [
        (_title(view.score_name), f'<span data-field="last_score">{_fmt(view.last_score, "{:.4f}")}</span>'),
        ("Devices", f'<span data-field="online">{view.online}</span> online of '
                    f'<span data-field="enrolled">{view.enrolled}</span>'),
        ("Uplink", f'<span data-field="uplink_bytes">{_bytes(view.rounds[-1].cum_bytes_in if view.rounds else 0)}</span>'),
    ]
    return '<section class="cards">' + "".join(
        f'<div class="card"><span class="muted">{title}</span><b>{body}</b></div>' for title, body in cards) + "</section>"


def _title(score_name: str) -> str:
    """accuracy -> Accuracy, f1 -> F1, r2 -> R²: the headline metric's card and chart title."""
    return {"r2": "R²", "f1": "F1"}.get(score_name, score_name.capitalize())


def _charts(view: FleetView) -> str:
    points = thin(view.rounds)
    if not points:
        return '<h2>Rounds</h2><p class="muted">No round completed yet.</p>'
    rounds = [p.round for p in points]
    evaluated = [p for p in points if p.score is not None]
    quality = (_line_chart(_title(view.score_name), [p.round for p in evaluated],
                           [(view.score_name, "var(--acc)", [p.score for p in evaluated])], "{:.3f}")
               if evaluated else "")
    losses = [p for p in points if p.loss is not None]
    loss = (_line_chart("Loss", [p.round for p in losses], [("loss", "var(--loss)", [p.loss for p in losses])],
                        "{:.3f}") if losses else "")
    traffic = _line_chart("Bytes per round", rounds, [
        ("uplink", "var(--up)", [p.bytes_in for p in points]),
        ("downlink", "var(--down)", [p.bytes_out for p in points])], None, fmt_fn=_bytes)
    return f'<h2>Rounds</h2><div class="charts">{quality}{loss}{traffic}</div>'


def _line_chart(title: str, xs: Sequence[int], series: list[tuple[str, str, Sequence[float]]], fmt: str | None,
                fmt_fn: Callable[[float], str] | None = None) -> str:
    width, height, left, right, top, bottom = 360, 170, 48, 8, 10, 22
    show = fmt_fn or (lambda v: fmt.format(v))
    values = [v for _, _, ys in series for v in ys]
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - (abs(lo) * 0.05 or 1.0), hi + (abs(hi) * 0.05 or 1.0)
    x0, x1 = min(xs), max(xs)
    span_x = (x1 - x0) or 1

    def x(v: float) -> float:
        return left + (v - x0) / span_x * (width - left - right)

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * (height - top - bottom)

    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="var(--line)"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="var(--line)"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{show(hi)}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{show(lo)}</text>',
             f'<text x="{left}" y="{height - 6}">round {x0}</text>',
             f'<text x="{width - right}" y="{height - 6}" text-anchor="end">{x1}</text>']
    legend = []
    for name, color, ys in series:
        coords = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(xs, ys))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        parts.append(f'<circle cx="{x(xs[-1]):.1f}" cy="{y(ys[-1]):.1f}" r="3" fill="{color}">'
                     f"<title>{escape(name)} at round {xs[-1]}: {show(ys[-1])}</title></circle>")
        legend.append(f'<span style="color:{color}">■</span> {escape(name)} {show(ys[-1])}')
    parts.append("</svg>")
    return (f'<figure><figcaption>{escape(title)}</figcaption>{"".join(parts)}'
            f'<div class="muted">{" · ".join(legend)}</div></figure>')


def _devices(view: FleetView, now: float) -> str:
    if not view.devices:
        return '<h2>Devices</h2><p class="muted">No device enrolled yet: <code>fedprune-coordinator enroll</code>.</p>'
    rows = []
    for d in view.devices:
        rows.append(
            f'<tr data-device="{escape(d.device)}"><td>{escape(d.device)}</td>'
            f'<td><span class="state state-{d.state}" data-field="state">{d.state}</span></td>'
            f'<td title="{_iso(d.last_seen)}">{_ago(d.last_seen, now)}</td>'
            f'<td class="num" data-field="rounds">{d.rounds}</td>'
            f'<td class="num" data-field="importance">{_fmt(d.importance, "{:.3f}")}</td>'
            f'<td class="num" data-field="quality">{_fmt(d.quality, "{:.3f}")}</td>'
            f'<td class="num" data-field="bytes_sent" title="{d.bytes_sent} bytes">{_bytes(d.bytes_sent)}</td>'
            f'<td class="num" data-field="release">{_fmt(d.release, "{}")}</td>'
            f'<td class="num" data-field="epsilon_left">{_fmt(d.epsilon_left, "{:.2f}")}</td>'
            f'<td data-field="last_problem">{escape(d.last_problem or "–")}</td></tr>')
    head = ("<tr><th>device</th><th>state</th><th>last seen</th><th class=num>rounds</th><th class=num>r</th>"
            "<th class=num>q</th><th class=num>sent</th><th class=num>release</th><th class=num>ε left</th>"
            "<th>last decline or refusal</th></tr>")
    return (f'<h2>Devices</h2><div class="scroll"><table id="devices"><thead>{head}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>'
            '<p class="muted">r: importance after the last round (what its updates weigh); q: loss quality '
            '(near 0: its updates do not help, e.g. noisy labels).</p>')


def _releases(view: FleetView) -> str:
    if not view.releases:
        return '<h2>Releases</h2><p class="muted">No release yet.</p>'
    rows = "".join(
        f'<tr><td class="num">{r["version"]}</td><td class="num">{_fmt(r.get("round"), "{}")}</td>'
        f'<td class="num">{_fmt(r.get("score"), "{:.4f}")}</td><td class="num">{_bytes(r["bytes"])}</td>'
        f'<td>{_iso(r.get("time"))}</td></tr>' for r in view.releases[::-1][:RELEASES_SHOWN])
    return (f'<h2>Releases</h2>{_more(len(view.releases), RELEASES_SHOWN, "releases")}'
            '<div class="scroll"><table id="releases"><thead><tr><th class=num>version</th>'
            f'<th class=num>round</th><th class=num>{escape(view.score_name)}</th><th class=num>size</th>'
            '<th>exported</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></div>")


def _events(view: FleetView, now: float) -> str:
    if not view.events:
        return '<h2>Recent events</h2><p class="muted">Nothing notable since the coordinator started.</p>'
    rows = "".join(
        f'<tr class="level-{e.level}"><td title="{_iso(e.time)}">{_ago(e.time, now)}</td><td>{escape(e.level)}</td>'
        f'<td>{escape(e.event)}</td><td>{escape(" ".join(f"{k}={v}" for k, v in e.fields.items()))}</td></tr>'
        for e in view.events[::-1][:EVENTS_SHOWN])
    return (f'<h2>Recent events</h2>{_more(len(view.events), EVENTS_SHOWN, "events")}'
            '<div class="scroll"><table id="events"><thead><tr><th>when</th><th>level</th>'
            f"<th>event</th><th>details</th></tr></thead><tbody>{rows}</tbody></table></div>")


def _more(total: int, shown: int, what: str) -> str:
    if total <= shown:
        return ""
    return f'<p class="muted">The newest {shown} of {total} {what}; <a href="status.json">status.json</a> has them all.</p>'


def _fmt(value: Any, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _iso(moment: float | None) -> str:
    return "" if moment is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def _ago(moment: float | None, now: float) -> str:
    if moment is None:
        return "never"
    seconds = max(0.0, now - moment)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"
