"""Operator commands over the state directory: init, enroll, revoke, status.

``init`` writes the commented config and the coordinator's keys; ``enroll`` adds a device's
fresh public keys to the allow-list and writes the bundle the device loads; ``revoke`` takes a
device off the list (a running daemon follows the file within one tick and rejects its updates
as ``unknown_sender``) and, when ``[broker] password_file`` is set, off the broker; ``status``
reads the state without touching the broker. Each changes state through atomic writes only, and
the allow-list under its lock (``fedprune.coordinator.fleet.registry_store``).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedprune.coordinator.fleet.broker_config import reload_broker, remove_password_user
from fedprune.coordinator.config import BrokerSection, CoordinatorConfig, example_config
from fedprune.coordinator.fleet.registry_store import RegistryStore
from fedprune.coordinator.state import IDENTITY_FILE, StateDir, load_identity
from fedprune.common.bundle import Bundle, EnrollmentError, save_bundle
from fedprune.common.configkit import ConfigError
from fedprune.common.fsutil import atomic_write
from fedprune.protocol.crypto import Identity


def init(*, config_path: Path, state_dir: Path, federation: str, broker_url: str, embedded_broker: bool,
         force: bool = False, settings: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Write the config (defaults, the given values, then ``settings`` per section) and the keys."""
    if Path(config_path).exists() and not force:
        raise ConfigError(f"{config_path} exists; pass --force to overwrite it")
    values: dict[str, dict[str, Any]] = {
        "federation": {"id": federation},
        "broker": {"url": broker_url, "embedded": embedded_broker},
        "state": {"dir": str(Path(state_dir).resolve())},
    }
    for section, table in (settings or {}).items():
        values.setdefault(section, {}).update(table)
    text = example_config(values)
    from fedprune.coordinator.config import load_config

    probe = Path(config_path).with_suffix(".check.toml")
    atomic_write(probe, text.encode(), mode=0o600)
    try:
        load_config(probe, env={})
    finally:
        probe.unlink(missing_ok=True)
    state = StateDir(state_dir)
    state.ensure()
    key_path = state.keys / IDENTITY_FILE
    if not key_path.exists():
        atomic_write(key_path, Identity.generate().to_pem(), mode=0o600)
    atomic_write(Path(config_path), text.encode(), mode=0o600)


def enroll(config: CoordinatorConfig, device_id: str, out: Path, *, broker_password: str = "",
           broker_url: str | None = None) -> Bundle:
    state = StateDir(config.state.dir)
    state.ensure()
    coordinator = load_identity(state)
    device = Identity.generate()
    with RegistryStore(state.root).edit(config.rounds.heartbeat_timeout_s) as registry:
        try:
            registry.enroll(device_id, device.public.signing, device.public.agreement, now=time.time())
        except ValueError as exc:
            raise EnrollmentError(str(exc)) from None
        ca = config.broker.ca_file.read_bytes() if config.broker.ca_file else None
        bundle = Bundle(
            federation=config.federation.id, device_id=device_id, identity=device, coordinator=coordinator.public,
            broker_url=broker_url or config.broker.url, broker_username=device_id, broker_password=broker_password,
            ca_pem=ca,
        )
        save_bundle(out, bundle)
    return bundle


@dataclass(frozen=True)
class Revocation:
    """What ``revoke`` did, for the operator: the allow-list always, the broker when configured."""

    device: str
    password_file: Path | None
    user_removed: bool
    reload_command: str

    def lines(self) -> list[str]:
        out = [f"revoked {self.device}: a running coordinator rejects its updates within one tick"]
        if self.password_file is None:
            return out + [f"broker: [broker] password_file is not set: remove user {self.device} from the broker's "
                          "password file and reload the broker yourself (deploy/README.md)"]
        out.append(f"broker: user {self.device} {'removed from' if self.user_removed else 'was not in'} "
                   f"{self.password_file}")
        out.append(f"broker: reloaded ({self.reload_command}): the device can no longer connect or read"
                   if self.reload_command else
                   "broker: reload it now (SIGHUP, or set [broker] reload_command): until then the device can "
                   "still connect and read tasks")
        return out


def revoke(config: CoordinatorConfig, device_id: str) -> Revocation:
    """Revoke on the coordinator first (that alone stops its updates counting), then on the broker.
    Running it again for a revoked device retries the broker step."""
    store = RegistryStore(config.state.dir)
    if device_id not in {r.device_id for r in store.read(config.rounds.heartbeat_timeout_s).devices()}:
        raise ConfigError(f"device {device_id!r} is not enrolled in {config.state.dir}: nothing to revoke "
                          "(`fedprune-coordinator status` lists the devices)")
    with store.edit(config.rounds.heartbeat_timeout_s) as registry:
        registry.revoke(device_id)
    return _revoke_on_broker(config.broker, device_id)


def _revoke_on_broker(broker: BrokerSection, device_id: str) -> Revocation:
    if broker.password_file is None:
        return Revocation(device_id, None, False, "")
    failed = f"{device_id} is revoked on the coordinator, but the broker still lets it in: "
    again = f"; fix it, then run `fedprune-coordinator revoke {device_id}` again"
    try:
        removed = remove_password_user(broker.password_file, device_id)
    except FileNotFoundError:
        raise ConfigError(f"{failed}[broker] password_file {broker.password_file} does not exist{again}") from None
    except OSError as exc:
        raise ConfigError(f"{failed}[broker] password_file {broker.password_file} cannot be rewritten "
                          f"({exc.strerror or exc}){again}") from None
    if broker.reload_command:
        try:
            reload_broker(broker.reload_command)
        except subprocess.CalledProcessError as exc:
            why = f"exited with {exc.returncode}: {exc.stderr.strip()[:300]}"
        except subprocess.TimeoutExpired:
            why = "did not finish within 30 s"
        except OSError as exc:
            why = f"could not run ({exc.strerror or exc})"
        else:
            why = ""
        if why:
            raise ConfigError(f"{failed}[broker] reload_command {broker.reload_command!r} {why}{again}")
    return Revocation(device_id, broker.password_file, removed, broker.reload_command)
