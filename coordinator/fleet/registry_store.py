"""The device registry on disk: two files with one writer each, so no writer loses another's change.

Layout (in the state directory)::

    allowlist.msgpack   enrolled keys and revocations; written only by the operator commands
                        (enroll, revoke, provision), each a read-modify-write under an exclusive
                        flock on allowlist.lock, so concurrent commands never lose a change
    presence.msgpack    last seen, online, capabilities, examples, last decline; written only by
                        the daemon (batched)
    registry.msgpack    both halves in one file, as written before the split: migrated on load
                        (under the lock) into the two files above, then removed

The daemon never writes the allow-list: it re-reads it whenever its stat stamp changes (one
``stat`` per tick), so a ``revoke`` or ``enroll`` takes effect within one tick and a daemon
save can never put back a revoked device. Every file is replaced atomically, so a reader
without the lock sees either the old or the new file, never half of one.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import msgpack

from fedprune.coordinator.core.registry import Registry, split_legacy
from fedprune.coordinator.state import StateError, dumps, loads
from fedprune.common.events import emit
from fedprune.common.fsutil import atomic_write

log = logging.getLogger("fedprune.coordinator")

ALLOW_LIST_FILE = "allowlist.msgpack"
PRESENCE_FILE = "presence.msgpack"
LEGACY_FILE = "registry.msgpack"
LOCK_FILE = "allowlist.lock"

Stamp = tuple[int, int, int, int]


class RegistryStore:
    def __init__(self, root: Path) -> None:
        root = Path(root)
        self.allow_list_path = root / ALLOW_LIST_FILE
        self.presence_path = root / PRESENCE_FILE
        self.legacy_path = root / LEGACY_FILE
        self.lock_path = root / LOCK_FILE
        self._stamp: Stamp | None = None

    def read(self, heartbeat_timeout_s: float) -> Registry:
        """Both halves, for a reader (``status``): a legacy file is read, not migrated."""
        allow_list, presence = self._read_allow_list(), self._read(self.presence_path)
        if (allow_list is None or presence is None) and self.legacy_path.exists():
            legacy_allow_list, legacy_presence = split_legacy(self._read(self.legacy_path))
            allow_list = legacy_allow_list if allow_list is None else allow_list
            presence = legacy_presence if presence is None else presence
        registry = Registry(heartbeat_timeout_s)
        registry.replace_allow_list(allow_list or {"devices": []})
        registry.restore_presence(presence or {"devices": {}})
        return registry

    def load(self, heartbeat_timeout_s: float) -> Registry:
        """Both halves, for a writer (the daemon at start): a legacy file is migrated first."""
        if self.legacy_path.exists():
            with self._locked():
                self._migrate()
        return self.read(heartbeat_timeout_s)

    @contextmanager
    def edit(self, heartbeat_timeout_s: float) -> Iterator[Registry]:
        """The registry as it is on disk now, for an operator command to change; its allow-list is
        written back atomically when the block ends without an exception. Holds the lock
        throughout, so a concurrent command waits instead of overwriting this one's change."""
        with self._locked():
            self._migrate()
            registry = self.read(heartbeat_timeout_s)
            yield registry
            self._replace(self.allow_list_path, registry.allow_list())

    def allow_list_if_changed(self) -> dict[str, Any] | None:
        """The allow-list when its file changed since the last read (a missing file is an empty
        list), else None: one ``stat`` while nothing changed. Raises StateError (unreadable file)."""
        if self._current_stamp() == self._stamp:
            return None
        return self._read_allow_list() or {"devices": []}

    def save_presence(self, registry: Registry) -> None:
        atomic_write(self.presence_path, dumps(registry.presence()))

    def _read_allow_list(self) -> dict[str, Any] | None:
        self._stamp = self._current_stamp()  # before reading: a change during the read is seen next time
        return self._read(self.allow_list_path)

    def _current_stamp(self) -> Stamp | None:
        """Inode, size and times: every atomic replace makes a new inode, so a change shows."""
        try:
            st = os.stat(self.allow_list_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            return loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, msgpack.UnpackException) as exc:
            raise StateError(f"{path} is unreadable ({exc}); restore it from backup or re-enroll the devices") from None

    def _replace(self, path: Path, document: dict[str, Any]) -> None:
        """Atomically, and owned like the state directory: an operator command run as root must not
        leave a 0600 file the daemon's user cannot read (it would keep following the old list)."""
        directory = os.stat(path.parent)
        owner = (directory.st_uid, directory.st_gid) if os.geteuid() == 0 and directory.st_uid != 0 else None
        atomic_write(path, dumps(document), owner=owner)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT, 0o644)  # any user of the directory may lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _migrate(self) -> None:
        """registry.msgpack -> allowlist.msgpack + presence.msgpack, under the lock; each written
        only if missing, and the old file removed only after both are on disk."""
        if not self.legacy_path.exists():
            return
        allow_list, presence = split_legacy(self._read(self.legacy_path))
        if not self.allow_list_path.exists():
            self._replace(self.allow_list_path, allow_list)
        if not self.presence_path.exists():
            self._replace(self.presence_path, presence)
        self.legacy_path.unlink()
        emit(log, logging.INFO, "registry_migrated", source=self.legacy_path.name,
             to=[self.allow_list_path.name, self.presence_path.name], devices=len(allow_list["devices"]))
