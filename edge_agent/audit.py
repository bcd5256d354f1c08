"""The device owner's record of everything the agent sent: time, federation, round, message
type, topic, bytes and a digest -- never the payload. Append-only JSON lines, one fsync per
record, so the log survives power loss on an SD card and can be shown by ``fedprune-agent audit``.

Beside it, ``declines.json`` keeps the last rounds this device declined and why (too hot, out of
privacy budget, data that does not fit), for ``fedprune-agent status``: the DECLINED status the
coordinator gets says the same, but the audit log holds no reasons.

Times are stored as Unix seconds; the commands print them as ISO 8601 in UTC (``iso_time``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from fedprune.common.fsutil import atomic_write

# Declines kept on disk; one entry per federation, round and reason (a re-announced task that is
# declined again for the same reason writes nothing).
KEEP_DECLINES = 20


def iso_time(seconds: float, *, milliseconds: bool = False) -> str:
    """``2026-12-07T07:03:00Z`` (UTC); with ``milliseconds``, ``2026-12-07T07:03:00.250Z``."""
    whole, millis = divmod(round(seconds * 1000), 1000)
    if not milliseconds:
        whole, millis = int(seconds // 1), 0
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return text + (f".{millis:03d}Z" if milliseconds else "Z")


def utc_day(seconds: float) -> str:
    """The UTC calendar day of ``seconds``: ``2026-12-07``."""
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


@dataclass(frozen=True)
class AuditRecord:
    time: float
    federation: str
    round: int
    message_type: str
    topic: str
    bytes: int
    sha256: str


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, *, now: float, federation: str, round: int, message_type: str, topic: str,
               payload: bytes) -> AuditRecord:
        entry = AuditRecord(
            time=now, federation=federation, round=round, message_type=message_type, topic=topic,
            bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
        )
        line = (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def records(self) -> Iterator[AuditRecord]:
        return read_records(self.path)


def read_records(path: Path) -> Iterator[AuditRecord]:
    """Read an audit log back (creating nothing); a torn last line (power cut mid-write) is
    skipped, not fatal; a missing file has no records."""
    try:
        handle = Path(path).open("rb")
    except FileNotFoundError:
        return
    with handle:
        for raw in handle:
            try:
                yield AuditRecord(**json.loads(raw))
            except (ValueError, TypeError):
                continue


@dataclass(frozen=True)
class DeclineRecord:
    time: float
    federation: str
    round: int
    reason: str


class DeclineLog:
    """The last ``keep`` declines, oldest first, in one small JSON file replaced atomically (a
    reader such as ``fedprune-agent status`` sees the old list or the new one, never half)."""

    def __init__(self, path: Path, keep: int = KEEP_DECLINES) -> None:
        self.path = Path(path)
        self.keep = keep

    def record(self, *, now: float, federation: str, round: int, reason: str) -> DeclineRecord:
        entries = self.records()
        for entry in entries:
            if (entry.federation, entry.round, entry.reason) == (federation, round, reason):
                return entry
        entry = DeclineRecord(time=now, federation=federation, round=round, reason=reason)
        entries = [*entries, entry][-self.keep:]
        document = {"declines": [asdict(e) for e in entries]}
        atomic_write(self.path, (json.dumps(document, indent=1) + "\n").encode(), mode=0o600)
        return entry

    def records(self) -> list[DeclineRecord]:
        """Oldest first; a missing or unreadable file is an empty list (it only informs the owner)."""
        try:
            document: Any = json.loads(self.path.read_bytes())
            return [DeclineRecord(time=float(e["time"]), federation=str(e["federation"]), round=int(e["round"]),
                                  reason=str(e["reason"])) for e in document["declines"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []
