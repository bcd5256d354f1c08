"""The device owner's record of everything the agent sent: time, federation, round, message
type, topic, bytes and a digest -- never the payload. Append-only JSON lines, one fsync per
record, so the log survives power loss on an SD card and can be shown by ``fedprune-agent audit``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator


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
        """Read back; a torn last line (power cut mid-write) is skipped, not fatal."""
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            for raw in handle:
                try:
                    yield AuditRecord(**json.loads(raw))
                except (ValueError, TypeError):
                    continue
