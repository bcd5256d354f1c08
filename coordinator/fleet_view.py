"""What an operator sees of a federation: the round in progress, the trail of rounds, the devices,
the releases and the recent events, as one plain document.

Pure: the daemon feeds it (``RoundTrail.add`` per committed round, ``EventFeed.record`` per
notable event) and builds a ``FleetView`` about once a second; the status page, ``/status.json``
and ``fedprune-coordinator status`` all render a ``FleetView``, so their numbers are the same
numbers. Everything a view says about past rounds comes from the history entries, so a view
built from the state directory (``status``) and one built by the running daemon agree.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from fedprune.coordinator.core.registry import DeviceRecord

EVENT_FEED_SIZE = 100
ROUND_POINTS_SHOWN = 500  # the charts show at most this many rounds (evenly thinned), the table all


@dataclass(frozen=True)
class RoundPoint:
    round: int
    received: int
    selected: int
    score: float | None  # the headline metric: accuracy, f1 or r2 (FleetView.score_name)
    loss: float | None
    bytes_in: int  # uplink of this round (all devices, all messages)
    bytes_out: int
    cum_bytes_in: int
    cum_bytes_out: int
    duration_s: float


@dataclass(frozen=True)
class DeviceRow:
    device: str
    state: str  # online, offline, revoked, excluded
    last_seen: float | None
    rounds: int  # rounds whose aggregate its update went into
    importance: float | None  # r after the last round it took part in
    quality: float | None  # q, the loss-quality signal
    last_problem: str | None  # the newer of its last decline and its last refused or gated update
    bytes_sent: int  # size of its accepted updates, summed
    release: int | None
    epsilon_left: float | None
    examples: int


@dataclass(frozen=True)
class LiveRound:
    round: int
    phase: str  # waiting_for_devices, training, secure_aggregation, committing, paused, finished
    deadline: float | None
    quorum: int
    selected: int
    received: int


@dataclass(frozen=True)
class Event:
    time: float
    level: str
    event: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class FleetView:
    federation: str
    generated_at: float
    running: bool  # built by the daemon (live) or read from the state directory
    completed_rounds: int
    total_rounds: int
    live: LiveRound | None
    rounds: tuple[RoundPoint, ...]
    devices: tuple[DeviceRow, ...]
    releases: tuple[dict[str, Any], ...]
    events: tuple[Event, ...]
    score_name: str  # what RoundPoint.score is: accuracy (classification), f1 (multilabel), r2 (regression)

    @property
    def last_score(self) -> float | None:
        return next((p.score for p in reversed(self.rounds) if p.score is not None), None)

    @property
    def online(self) -> int:
        return sum(1 for d in self.devices if d.state == "online")

    @property
    def enrolled(self) -> int:
        return sum(1 for d in self.devices if d.state != "revoked")

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document.update(last_score=self.last_score, online=self.online, enrolled=self.enrolled)
        return document


class RoundTrail:
    """Per-round points and per-device totals, folded from history entries one at a time."""

    def __init__(self, entries: Iterable[Mapping[str, Any]] = (), score_name: str = "accuracy") -> None:
        """``score_name``: the federation's headline metric (``HEADLINE[task]``), named before any
        round is evaluated; each entry's own name wins (history before 1.6 had accuracy only)."""
        self.points: list[RoundPoint] = []
        self.score_name = score_name
        self.rounds_taken: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: Mapping[str, Any]) -> None:
        previous = self.points[-1] if self.points else None
        self.score_name = entry.get("score_name", self.score_name)
        cum_in, cum_out = int(entry.get("cum_bytes_in", 0)), int(entry.get("cum_bytes_out", 0))
        before_in, before_out = (previous.cum_bytes_in, previous.cum_bytes_out) if previous else (0, 0)
        self.points.append(RoundPoint(
            round=int(entry["round"]), received=int(entry.get("received", 0)), selected=int(entry.get("selected", 0)),
            score=entry.get("score", entry.get("accuracy")), loss=entry.get("loss"),  # history before 1.6: accuracy
            # a restart starts the byte counters again: a drop means "since the restart"
            bytes_in=cum_in - before_in if cum_in >= before_in else cum_in,
            bytes_out=cum_out - before_out if cum_out >= before_out else cum_out,
            cum_bytes_in=cum_in, cum_bytes_out=cum_out, duration_s=float(entry.get("duration_s", 0.0)),
        ))
        for device in entry.get("scores", {}):
            if not entry["scores"][device].get("gated_by"):
                self.rounds_taken[device] = self.rounds_taken.get(device, 0) + 1
        for device, size in entry.get("update_bytes", {}).items():
            self.bytes_sent[device] = self.bytes_sent.get(device, 0) + int(size)


class EventFeed:
    """The last EVENT_FEED_SIZE notable events, newest last."""

    def __init__(self, size: int = EVENT_FEED_SIZE) -> None:
        self._events: deque[Event] = deque(maxlen=size)

    def record(self, level: str, event: str, fields: Mapping[str, Any], now: float | None = None) -> None:
        self._events.append(Event(time.time() if now is None else now, level, event,
                                  {k: _plain(v) for k, v in fields.items()}))

    def snapshot(self) -> tuple[Event, ...]:
        return tuple(self._events)


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def device_rows(records: Iterable[DeviceRecord], online: Iterable[str], excluded: Iterable[str],
                trail: RoundTrail, importance: Mapping[str, float], quality: Mapping[str, float]) -> tuple[DeviceRow, ...]:
    online, excluded = set(online), set(excluded)
    rows = []
    for record in records:
        device = record.device_id
        state = ("revoked" if record.revoked else "excluded" if device in excluded
                 else "online" if device in online else "offline")
        rows.append(DeviceRow(
            device=device, state=state, last_seen=record.last_seen, rounds=trail.rounds_taken.get(device, 0),
            importance=_number(importance.get(device)), quality=_number(quality.get(device)),
            last_problem=_last_problem(record), bytes_sent=trail.bytes_sent.get(device, 0), release=record.release,
            epsilon_left=record.epsilon_left, examples=record.n_examples,
        ))
    return tuple(rows)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _last_problem(record: DeviceRecord) -> str | None:
    problems = [p for p in (record.last_decline, record.last_rejection) if p]
    if not problems:
        return None
    newest = max(problems, key=lambda p: p.get("time") or 0.0)
    kind = "declined" if newest is record.last_decline else "refused"
    return f"round {newest['round']} {kind}: {newest['reason']}"


def thin(points: tuple[RoundPoint, ...], limit: int = ROUND_POINTS_SHOWN) -> tuple[RoundPoint, ...]:
    """At most ``limit`` points, evenly spaced, always keeping the last."""
    if len(points) <= limit:
        return points
    step = len(points) / limit
    picked = [points[int(i * step)] for i in range(limit - 1)]
    return (*picked, points[-1])


@dataclass(frozen=True)
class ViewInputs:
    """Everything a FleetView is made of, gathered by its caller (the daemon or ``status``)."""

    federation: str
    total_rounds: int
    completed_rounds: int
    records: tuple[DeviceRecord, ...]
    online: tuple[str, ...]
    trail: RoundTrail
    importance: Mapping[str, float]
    quality: Mapping[str, float]
    releases: tuple[dict[str, Any], ...] = ()
    excluded: tuple[str, ...] = ()
    live: LiveRound | None = None
    events: tuple[Event, ...] = field(default_factory=tuple)


def build_view(inputs: ViewInputs, now: float, running: bool) -> FleetView:
    return FleetView(
        federation=inputs.federation, generated_at=now, running=running, completed_rounds=inputs.completed_rounds,
        total_rounds=inputs.total_rounds, live=inputs.live, rounds=tuple(inputs.trail.points),
        devices=device_rows(inputs.records, inputs.online, inputs.excluded, inputs.trail, inputs.importance,
                            inputs.quality),
        releases=inputs.releases, events=inputs.events, score_name=inputs.trail.score_name,
    )
