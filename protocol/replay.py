"""Replay and staleness: which authenticated messages are new enough to act on.

Theory of operation. Every envelope carries (sender, round, seq, sent_at); seq is unique per
sender. Round-scoped messages (tasks, updates, rejects) are remembered per round as
(sender, seq) pairs: a pair seen before is ``Replayed``; a round older than
``current_round - round_window`` is ``Stale`` and its memory is dropped when the current round
advances, so memory follows the live rounds only (and a hard ``max_entries`` cap refuses rather
than forgets). Session-scoped messages (register, status, releases) only matter in their latest
form, so each (sender, stream) keeps a high-water seq: anything not newer is ``Replayed``.
``sent_at`` must lie within ``time_window`` seconds in the past and ``max_clock_skew`` in the
future, except where the caller says the message may legitimately be old (a retained release,
a last will sealed at connect time).

Pure: the caller passes ``now``; the current round advances only on the owner's say-so (the
coordinator when it opens a round, the agent on a verified task), never on a peer's claim.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from fedprune.protocol.errors import Replayed, Stale


class ReplayGuard:
    def __init__(
        self,
        *,
        round_window: int = 1,
        time_window: float = 600.0,
        max_clock_skew: float = 120.0,
        max_entries: int = 200_000,
        max_streams: int = 100_000,
    ) -> None:
        if round_window < 0 or time_window <= 0 or max_clock_skew < 0 or max_entries < 1 or max_streams < 1:
            raise ValueError("ReplayGuard windows must be non-negative and capacities positive")
        self.round_window = round_window
        self.time_window = float(time_window)
        self.max_clock_skew = float(max_clock_skew)
        self.max_entries = max_entries
        self.max_streams = max_streams
        self._current = 0
        self._seen: dict[int, set[tuple[str, int]]] = {}
        self._entries = 0
        self._latest: OrderedDict[tuple[str, str], int] = OrderedDict()

    @property
    def current_round(self) -> int:
        return self._current

    @property
    def floor(self) -> int:
        """The oldest round still accepted."""
        return max(0, self._current - self.round_window)

    def __len__(self) -> int:
        return self._entries + len(self._latest)

    def advance(self, round_: int) -> None:
        """Move the current round forward (never back) and forget rounds below the floor."""
        if round_ <= self._current:
            return
        self._current = round_
        for old in [r for r in self._seen if r < self.floor]:
            self._entries -= len(self._seen.pop(old))

    def check_time(self, sent_at: float, now: float) -> None:
        if not math.isfinite(sent_at) or sent_at < now - self.time_window:
            raise Stale(f"message sent at {sent_at!r} is older than {self.time_window:g} s (now {now:.0f})")
        if sent_at > now + self.max_clock_skew:
            raise Stale(
                f"message sent at {sent_at:.0f} is {sent_at - now:.0f} s in the future: "
                f"check the sender's clock (allowed skew {self.max_clock_skew:g} s)"
            )

    def check(self, sender: str, round_: int, seq: int, sent_at: float, now: float) -> None:
        """Accept a round-scoped message once; Replayed or Stale otherwise. Records it."""
        self.check_time(sent_at, now)
        if round_ < self.floor:
            raise Stale(f"round {round_} is older than the acceptance floor {self.floor} (current {self._current})")
        seen = self._seen.get(round_)
        key = (sender, seq)
        if seen is not None and key in seen:
            raise Replayed(f"message {seq} from {sender or 'coordinator'!r} for round {round_} was already accepted")
        if self._entries >= self.max_entries:
            raise Stale(
                f"replay memory full ({self.max_entries} messages in rounds >= {self.floor}); "
                "refusing rather than forgetting"
            )
        self._seen.setdefault(round_, set()).add(key)
        self._entries += 1

    def check_latest(
        self, sender: str, stream: str, seq: int, sent_at: float, now: float, *, check_time: bool = True
    ) -> None:
        """Accept a session-scoped message only if newer than the last one on (sender, stream)."""
        if check_time:
            self.check_time(sent_at, now)
        key = (sender, stream)
        last = self._latest.get(key)
        if last is not None and seq <= last:
            raise Replayed(f"{stream} message {seq} from {sender or 'coordinator'!r} is not newer than {last}")
        self._latest[key] = seq
        self._latest.move_to_end(key)
        while len(self._latest) > self.max_streams:
            self._latest.popitem(last=False)
