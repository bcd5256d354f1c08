"""The coordinator's state directory: keys, checkpoints and their schema, history, written atomically.

Layout::

    <state>/keys/                 coordinator identity (written by init, 0600)
    <state>/allowlist.msgpack     enrolled devices and revocations (operator commands only)
    <state>/presence.msgpack      what devices said and when (the daemon only);
                                  both in coordinator/fleet/registry_store.py
    <state>/checkpoints/round-000012.ckpt   one file per completed round, newest K kept
    <state>/history.jsonl         one line per completed round, append-only; the checkpoint
                                  holds its committed size and newest line (back it up too)

A checkpoint is msgpack of plain values with numpy arrays as ``{"__nd__": [dtype, shape, bytes]}``
and a SHA-256 trailer, so a torn or corrupted file is detected and the previous one is used.
Writes go through :func:`fedprune.common.fsutil.atomic_write`: after ``kill -9`` at any instant the
directory holds the last completed round, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedprune.coordinator.core.records import GlobalState
from fedprune.common.events import emit
from fedprune.common.fsutil import atomic_write, ensure_writable_dir
from fedprune.protocol.crypto import Identity
from fedprune.protocol.layout import ModelLayout

log = logging.getLogger(__name__)

IDENTITY_FILE = "coordinator.pem"  # in <state>/keys/
_CHECKPOINT = re.compile(r"^round-(\d{6,})\.ckpt$")
_ALLOWED_DTYPES = {"float32", "float16", "float64", "int8", "int32", "int64", "uint8", "bool"}


class StateError(Exception):
    """The state directory is unusable; the message names the file and the fix."""


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.name not in _ALLOWED_DTYPES:
            raise TypeError(f"cannot checkpoint arrays of dtype {value.dtype}")
        return {"__nd__": [value.dtype.name, list(value.shape), np.ascontiguousarray(value).tobytes()]}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__nd__"}:
            dtype, shape, raw = value["__nd__"]
            if dtype not in _ALLOWED_DTYPES:
                raise ValueError(f"unexpected dtype {dtype!r} in checkpoint")
            return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def dumps(document: dict[str, Any]) -> bytes:
    body = msgpack.packb(_encode(document), use_bin_type=True)
    return body + hashlib.sha256(body).digest()


def loads(blob: bytes) -> dict[str, Any]:
    body, digest = blob[:-32], blob[-32:]
    if len(blob) < 33 or hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch (torn or corrupted file)")
    return _decode(msgpack.unpackb(body, raw=False, strict_map_key=False))


def _history_line(entry: dict[str, Any]) -> bytes:
    return (json.dumps(entry, sort_keys=True) + "\n").encode()


def entry_score(entry: dict[str, Any]) -> float | None:
    """A history entry's headline metric (``score``; entries before 1.6 had ``accuracy``)."""
    return entry.get("score", entry.get("accuracy"))


def score_name(entries: Iterable[dict[str, Any]]) -> str:
    """What the entries' scores are: accuracy, f1 or r2 (entries before 1.6: accuracy)."""
    return next((e["score_name"] for e in reversed(list(entries)) if "score_name" in e), "accuracy")


def latest_score(checkpoint: dict[str, Any] | None) -> tuple[str, float] | None:
    """The newest evaluated headline metric a checkpoint records, (name, value) (its round's
    entry; older checkpoints carried the whole trail, and only accuracy)."""
    if checkpoint is None:
        return None
    entries = checkpoint.get("history") or [checkpoint.get("last_entry") or {}]
    for entry in reversed(entries):
        if "score" in entry:
            return entry.get("score_name", "accuracy"), entry["score"]
        if "accuracy" in entry:
            return "accuracy", entry["accuracy"]
    return None


@dataclass(frozen=True)
class Checkpoint:
    """What a completed round leaves beside history.jsonl, enough to resume it exactly: the
    global state, the random generator, the trail's committed size and newest line, which mask
    version each device holds, and the last release's version."""

    state: GlobalState
    rng_state: dict[str, Any]
    history_bytes: int
    last_entry: dict[str, Any] | None
    holders: dict[str, int]
    release_version: int

    def to_document(self) -> dict[str, Any]:
        s = self.state
        return {
            "state_round": s.round, "params": s.params, "masks": s.masks, "mask_version": s.mask_version,
            "densities": s.densities, "counts": s.counts, "quality": s.quality, "data_sizes": s.data_sizes,
            "importance": s.importance, "trust": s.trust, "rng": json.dumps(self.rng_state),
            "history_bytes": self.history_bytes, "last_entry": self.last_entry,
            "holders": self.holders, "release_version": self.release_version,
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any], layout: ModelLayout, history_bytes: int) -> "Checkpoint":
        """``history_bytes``: the trail's size once ``StateDir.resume_history`` has matched it to ``doc``."""
        state = GlobalState(
            layout=layout, round=int(doc["state_round"]), params=doc["params"], masks=doc["masks"],
            mask_version=int(doc["mask_version"]), densities=doc["densities"], counts=doc["counts"],
            quality=doc["quality"], data_sizes=doc["data_sizes"], importance=doc["importance"],
            trust=doc.get("trust", {}),
        )
        return cls(state, json.loads(doc["rng"]), history_bytes, doc.get("last_entry"), dict(doc["holders"]),
                   int(doc.get("release_version", 0)))


class StateDir:
    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep
        self.checkpoints = self.root / "checkpoints"
        self.keys = self.root / "keys"
        self.history_path = self.root / "history.jsonl"

    def ensure(self) -> None:
        """Create the directories, proven writable: a coordinator that cannot write its state
        must stop at start with the fix (exit 78), not at its first checkpoint with a traceback."""
        for directory in (self.root, self.checkpoints, self.keys):
            try:
                ensure_writable_dir(directory)
            except OSError as exc:
                raise StateError(f"[state] dir {self.root}: cannot write {directory} ({exc.strerror or exc}); give "
                                 "the coordinator's user ownership of it, or set [state] dir to a writable "
                                 "directory") from None

    def save_checkpoint(self, round_number: int, document: dict[str, Any]) -> Path:
        path = self.checkpoints / f"round-{round_number:06d}.ckpt"
        atomic_write(path, dumps({"round": round_number, **document}))
        for old in self._checkpoint_files()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load_latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint that verifies; a corrupted newest one is logged and skipped."""
        for path in reversed(self._checkpoint_files()):
            try:
                return loads(path.read_bytes())
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                emit(log, logging.ERROR, "checkpoint_unreadable", file=path, error=exc, action="trying_previous")
        return None

    def _checkpoint_files(self) -> list[Path]:
        if not self.checkpoints.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := _CHECKPOINT.match(p.name))]
        return [p for _, p in sorted(found)]

    def append_history(self, entry: dict[str, Any], committed_bytes: int) -> int:
        """Append ``entry`` after the first ``committed_bytes`` of history.jsonl; returns its new
        size. Whatever lies beyond that point (a torn line, or the entry of a round whose commit
        failed and is being retried) is cut first, so each round is in the file once. O(entry),
        where rewriting the whole trail every round was O(rounds)."""
        line = _history_line(entry)
        fd = os.open(self.history_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size != committed_bytes:
                os.ftruncate(fd, min(size, committed_bytes))
            end = os.lseek(fd, 0, os.SEEK_END)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            return end + len(line)
        finally:
            os.close(fd)

    def restore_history(self, committed_bytes: int, last_entry: dict[str, Any] | None) -> int:
        """Bring history.jsonl back to what the checkpoint committed: its first ``committed_bytes``
        plus the checkpoint's own round (a kill between checkpoint and append, or mid-append,
        left it short or torn). Returns the file's size; a file that already agrees is not
        written. A file shorter than the checkpoint says (restored from an older backup, cut by
        hand) cannot be repaired: the entry follows its last whole line."""
        size = self.history_path.stat().st_size if self.history_path.exists() else 0
        if size < committed_bytes:
            emit(log, logging.WARNING, "history_short", file=self.history_path, bytes=size,
                 expected_at_least=committed_bytes, action="appending_latest_round")
            committed_bytes = self.history_path.read_bytes().rfind(b"\n") + 1 if size else 0
        line = b"" if last_entry is None else _history_line(last_entry)
        if size - committed_bytes == len(line):
            if not line:
                return size
            with self.history_path.open("rb") as handle:
                handle.seek(committed_bytes)
                if handle.read() == line:
                    return size
        if last_entry is None:
            os.truncate(self.history_path, committed_bytes)
            return committed_bytes
        return self.append_history(last_entry, committed_bytes)

    def resume_history(self, doc: dict[str, Any]) -> int:
        """Match history.jsonl to checkpoint ``doc``; its size. An older checkpoint carried the
        whole trail; a newer one its committed size and newest line."""
        if "history" in doc:
            self.sync_history(doc["history"])
            return self.history_path.stat().st_size
        return self.restore_history(int(doc["history_bytes"]), doc["last_entry"])

    def set_aside_history(self) -> Path | None:
        """A fresh federation over a non-empty history.jsonl (no checkpoint left, or a state
        directory reused) moves it to history-orphaned-N.jsonl instead of cutting it."""
        if not self.history_path.exists() or self.history_path.stat().st_size == 0:
            return None
        n = 1
        while (aside := self.root / f"history-orphaned-{n}.jsonl").exists():
            n += 1
        os.replace(self.history_path, aside)
        return aside

    def sync_history(self, history: list[dict[str, Any]]) -> None:
        """Make history.jsonl say what an older checkpoint, which carried the whole trail, says."""
        blob = b"".join(_history_line(entry) for entry in history)
        if not self.history_path.exists() or self.history_path.read_bytes() != blob:
            atomic_write(self.history_path, blob, mode=0o644)

    def read_history(self) -> list[dict[str, Any]]:
        """The entries of history.jsonl; a line still being written (no newline yet) is left out."""
        if not self.history_path.exists():
            return []
        text = self.history_path.read_text(errors="replace")
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def load_identity(state: StateDir) -> Identity:
    """The coordinator's keys, written by ``init``."""
    path = state.keys / IDENTITY_FILE
    try:
        return Identity.from_pem(path.read_bytes())
    except FileNotFoundError:
        raise StateError(f"{path} is missing: run `fedprune-coordinator init` first") from None
