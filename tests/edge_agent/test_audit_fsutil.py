from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedprune.edge_agent.audit import AuditLog
from fedprune.common.fsutil import atomic_write, private_file_is_exposed


def test_atomic_write_replaces_whole_file_with_private_mode(tmp_path: Path) -> None:
    target = tmp_path / "state" / "checkpoint.bin"
    atomic_write(target, b"first")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["checkpoint.bin"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoint.bin"
    atomic_write(target, b"good")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.bin"]


def test_exposed_private_file_is_detected(tmp_path: Path) -> None:
    key = tmp_path / "key"
    atomic_write(key, b"k", mode=0o600)
    assert not private_file_is_exposed(key)
    os.chmod(key, 0o644)
    assert private_file_is_exposed(key)


def test_audit_log_records_metadata_never_payload(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    payload = b"SECRET-SAMPLE-BYTES" * 10
    entry = log.record(now=1.5, federation="fed", round=3, message_type="update", topic="t/u", payload=payload)
    assert entry.bytes == len(payload) and len(entry.sha256) == 64
    text = (tmp_path / "audit.jsonl").read_text()
    assert "SECRET" not in text
    with (tmp_path / "audit.jsonl").open("a") as handle:
        handle.write('{"torn": ')
    assert list(log.records()) == [entry]
