"""Atomic, durable file writes: the only way fedprune replaces state on disk.

write to a temp file in the same directory -> fsync it -> rename over the target -> fsync the
directory. A crash or ``kill -9`` at any point leaves either the old file or the new one, never a
torn one. A failed write (disk full) removes its temp file and leaves the old file intact.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """``owner`` (uid, gid): give the file to them before it appears, e.g. when root rewrites a
    file another user (the broker, the daemon) must go on reading."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                os.fchown(handle.fileno(), *owner)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_file_is_exposed(path: Path) -> bool:
    """True when a private key file can be read or written by group or others."""
    return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def ensure_writable_dir(directory: Path, mode: int = 0o700) -> None:
    """Create ``directory`` and prove it writable by creating and removing a file in it (an
    access() check says yes to root on a read-only mount); raises OSError. A daemon calls this
    at start so an unusable state directory is a clear error then, not a traceback at its first write."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=mode)
    fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=directory)
    os.close(fd)
    os.unlink(probe)
