"""The status page stays one screen's worth however long the federation runs: charts thin the
rounds, the release and event tables show the newest rows and say where the rest are."""

from __future__ import annotations

from fedprune.coordinator.fleet_view import EventFeed, RoundTrail, ViewInputs, build_view, thin
from fedprune.coordinator.status_page import EVENTS_SHOWN, RELEASES_SHOWN, render_page


def long_view(rounds: int = 2000):
    trail = RoundTrail({"round": n, "received": 2, "selected": 2, "accuracy": n / rounds, "loss": 1.0,
                        "cum_bytes_in": 1000 * n, "cum_bytes_out": 2000 * n} for n in range(1, rounds + 1))
    feed = EventFeed()
    for n in range(1, rounds + 1):
        feed.record("INFO", "round_closed", {"round": n}, float(n))
    releases = tuple({"version": v, "round": 2 * v, "accuracy": 0.5, "bytes": 50_000, "time": float(v)}
                     for v in range(1, rounds // 2 + 1))
    return build_view(ViewInputs(federation="long", total_rounds=rounds, completed_rounds=rounds, records=(),
                                 online=(), trail=trail, importance={}, quality={}, releases=releases,
                                 events=feed.snapshot()), float(rounds), running=True)


def test_a_long_federation_renders_the_newest_rows_and_a_pointer_to_the_rest() -> None:
    view = long_view()
    html = render_page(view, now=2000.0)
    releases = html.split('<table id="releases">')[1].split("</table>")[0]
    assert releases.count("<tr>") == RELEASES_SHOWN + 1  # the header row and the newest releases
    assert '<td class="num">1000</td>' in releases and '<td class="num">1</td><td class="num">2</td>' not in releases
    assert f"The newest {RELEASES_SHOWN} of 1000 releases" in html
    events = html.split('<table id="events">')[1].split("</table>")[0]
    assert events.count('<tr class="level-INFO">') == EVENTS_SHOWN
    assert "round=2000" in events and f"The newest {EVENTS_SHOWN} of {len(view.events)} events" in html


def test_charts_thin_the_rounds_evenly_and_keep_the_last() -> None:
    points = long_view().rounds
    shown = thin(points, limit=100)
    assert len(shown) == 100 and shown[0].round == 1 and shown[-1].round == 2000
    assert thin(points[:50], limit=100) == points[:50]


def test_a_short_federation_shows_everything_without_a_pointer() -> None:
    html = render_page(long_view(rounds=6), now=6.0)
    assert "The newest" not in html
