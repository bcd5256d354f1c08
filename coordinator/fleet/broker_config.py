"""Render Mosquitto's configuration and topic ACL from the templates shipped in the package.

The templates (``coordinator/fleet/templates/*.template``) are package data, so a wheel install
renders exactly what the source tree does; they are the one source of truth for the broker's
configuration and ACL (``fedprune-coordinator provision`` writes the rendered files).

Templates use ``{{name}}`` placeholders. Rendering is strict: a placeholder without a value, a
value without a placeholder, or a value that could smuggle a second directive into the file
(newline, whitespace, NUL) is a ``ValueError`` naming it, because a config typo here silently
changes who may publish what.

``remove_password_user`` and ``reload_broker`` take a revoked device off the broker
(``fedprune-coordinator revoke``). The provisioned ACL has no per-device lines, only ``pattern``
lines every authenticated user matches, so what shuts a device out is its missing password entry:
on SIGHUP Mosquitto 2.0 re-reads password_file and acl_file, disconnects every connected client
whose user is no longer in the file, and refuses its reconnects (CONNACK 135), measured with
2.0.11 in tests/integration/test_revocation.py.
"""

from __future__ import annotations

import re
import shlex
import stat
import subprocess
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Mapping

from fedprune.common.fsutil import atomic_write
from fedprune.common.mqtt_config import MAX_MESSAGE_BYTES
from fedprune.protocol.topics import validate_id

CONF_TEMPLATE = "mosquitto.conf.template"
ACL_TEMPLATE = "acl.template"

_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")
_PACKET_HEADROOM = 1024  # fixed header, topic (<= 256 bytes) and v5 properties of one chunk
_EXPIRATION = re.compile(r"[1-9][0-9]*[hdwmy]")


@dataclass(frozen=True)
class MosquittoSettings:
    """Values for mosquitto.conf.template; the defaults are the production choices (see the template)."""

    port: int
    password_file: Path
    acl_file: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    persistence_dir: Path
    bind_address: str = "0.0.0.0"
    max_packet_size: int = 256 * 1024
    max_queued_messages: int = 20_000
    max_queued_bytes: int = 256 * 1024 * 1024
    max_inflight_messages: int = 20
    persistent_client_expiration: str = "7d"
    autosave_interval: int = 60

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port}: expected 1..65535")
        for name in ("password_file", "acl_file", "ca_file", "cert_file", "key_file", "persistence_dir"):
            path = Path(getattr(self, name))
            if not path.is_absolute():
                raise ValueError(f"{name} {str(path)!r}: expected an absolute path (mosquitto may chdir)")
        if self.max_packet_size < MAX_MESSAGE_BYTES + _PACKET_HEADROOM:
            raise ValueError(
                f"max_packet_size={self.max_packet_size}: expected >= {MAX_MESSAGE_BYTES + _PACKET_HEADROOM} "
                f"(fedprune's largest chunk, {MAX_MESSAGE_BYTES} bytes, plus topic and headers)"
            )
        if self.max_queued_messages < 1000 or self.max_queued_bytes < 1:
            raise ValueError("max_queued_messages >= 1000 and max_queued_bytes >= 1 expected: a 0 means unbounded")
        if self.max_inflight_messages < 1 or self.autosave_interval < 1:
            raise ValueError("max_inflight_messages and autosave_interval must be >= 1")
        if not _EXPIRATION.fullmatch(self.persistent_client_expiration):
            raise ValueError(
                f"persistent_client_expiration {self.persistent_client_expiration!r}: expected e.g. '7d' (h d w m y)"
            )


def render(template: str, values: Mapping[str, object]) -> str:
    """Fill every ``{{name}}`` in ``template``; each value must be a single token."""
    wanted = set(_PLACEHOLDER.findall(template))
    given = {name: str(value) for name, value in values.items()}
    if missing := wanted - given.keys():
        raise ValueError(f"template placeholders without a value: {sorted(missing)}")
    if unused := given.keys() - wanted:
        raise ValueError(f"values that match no placeholder (typo?): {sorted(unused)}")
    for name, value in given.items():
        if not value or any(c.isspace() or c == "\0" for c in value):
            raise ValueError(f"{name} {value!r}: expected a single token without whitespace or NUL")
    return _PLACEHOLDER.sub(lambda match: given[match.group(1)], template)


def template_text(name: str) -> str:
    """A packaged template by file name (works from a wheel, a zip or the source tree)."""
    return files("fedprune.coordinator.fleet").joinpath("templates", name).read_text(encoding="utf-8")


def render_mosquitto_conf(settings: MosquittoSettings) -> str:
    return render(template_text(CONF_TEMPLATE), asdict(settings))


def render_acl(federation: str, coordinator_user: str) -> str:
    """The ACL for one federation: devices use their own topics (``%u``), one coordinator user the rest."""
    validate_id(federation, "federation")
    validate_id(coordinator_user, "coordinator user")
    return render(template_text(ACL_TEMPLATE), {"federation": federation, "coordinator_user": coordinator_user})


def remove_password_user(path: Path, user: str) -> bool:
    """Drop ``user``'s line from a Mosquitto password file; False when it has none. The file is
    replaced atomically with its owner, group and mode kept: Mosquitto reads it after dropping
    privileges, and a file it cannot read locks every user out, the coordinator too, at the next
    reload (measured). Raises OSError (missing file, no permission) for the caller to name its key."""
    path = Path(path)
    before = path.stat()
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if line.split(b":", 1)[0] != user.encode()]
    if len(kept) == len(lines):
        return False
    atomic_write(path, b"".join(kept), mode=stat.S_IMODE(before.st_mode), owner=(before.st_uid, before.st_gid))
    return True


def reload_broker(command: str, timeout_s: float = 30.0) -> None:
    """Run the operator's reload command (no shell), e.g. ``systemctl reload mosquitto`` (whose
    ExecReload sends SIGHUP). Raises OSError, TimeoutExpired or CalledProcessError."""
    subprocess.run(shlex.split(command), stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True,
                   timeout=timeout_s)
