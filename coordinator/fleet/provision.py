"""``fedprune-coordinator provision``: everything a Mosquitto broker and a fleet need, in one directory.

Theory of operation. Provisioning is idempotent and additive: each artefact is made only when it
is missing, so re-running with more devices enrolls the new ones and leaves every existing key,
password and bundle alone.

- The CA (``ca.crt``/``ca.key``) is made once. The broker's ``server.crt`` is re-issued only when
  it is missing, was not issued by this CA, or does not cover the requested host names; devices
  pin the CA, not the certificate, so that never touches a device.
- Broker passwords: ``passwd`` (Mosquitto's PBKDF2 file) keeps the hashes it has. A device's
  plain password lives only in its bundle, the coordinator's only in its config, so nothing
  here stores a second copy of any secret.
- A device is new when the registry does not list it: it gets fresh keys and a password
  (``fedprune.coordinator.fleet.enrollment.enroll``, CA embedded). A device the registry lists must have its
  bundle in ``out/bundles``; re-keying it silently would lock the deployed device out, so that
  case is an error that says to revoke it first.
- ``acl`` and ``mosquitto.conf`` are re-rendered every time from the packaged templates
  (``fedprune.coordinator.fleet.broker_config``), with absolute paths under ``install_dir``.
- The coordinator config's ``[broker]`` keys (url, ca_file, password, embedded, and
  password_file, so that ``revoke`` takes a device off the broker too) are rewritten in place,
  line by line, so the operator's comments and other settings survive; the result is loaded and
  validated before it replaces the file.

Secrets (keys, ``passwd``, bundles, the config holding the coordinator's password) are 0600.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.fleet.broker_config import MosquittoSettings, render_acl, render_mosquitto_conf
from fedprune.coordinator.config import CoordinatorConfig, load_config
from fedprune.coordinator.fleet.pki import (
    DEFAULT_SERVER_NAMES, KeyPair, PkiError, create_ca, issue_server_certificate, load_key_pair,
    password_file_users, write_password_file,
)
from fedprune.coordinator.core.registry import Registry
from fedprune.coordinator.fleet.registry_store import RegistryStore
from fedprune.coordinator.state import IDENTITY_FILE, StateDir
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from fedprune.common.bundle import load_bundle
from fedprune.common.configkit import ConfigError
from fedprune.common.fsutil import atomic_write
from fedprune.protocol.crypto import Identity
from fedprune.protocol.topics import is_valid_id

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
PASSWORD_FILE, ACL_FILE, CONF_FILE = "passwd", "acl", "mosquitto.conf"
BUNDLES = "bundles"
DEFAULT_PORT = 8883
DEFAULT_PERSISTENCE_DIR = Path("/var/lib/mosquitto")
_PASSWORD_BYTES = 24


@dataclass(frozen=True)
class ProvisionReport:
    """What one run made, kept and changed (no secrets)."""

    out: Path
    broker_url: str
    added: tuple[str, ...]
    kept: tuple[str, ...]
    ca_created: bool
    server_certificate_issued: bool
    coordinator_password_set: bool
    config_keys: tuple[str, ...]

    def bundle(self, device: str) -> Path:
        return self.out / BUNDLES / f"{device}.json"

    def lines(self) -> list[str]:
        made = [
            ("CA", "created" if self.ca_created else "kept"),
            ("server certificate", "issued" if self.server_certificate_issued else "kept"),
            ("coordinator broker password", "set" if self.coordinator_password_set else "kept"),
        ]
        out = [f"{what}: {how}" for what, how in made]
        out += [f"device {d}: enrolled, bundle {self.bundle(d)}" for d in self.added]
        out += [f"device {d}: already provisioned, kept" for d in self.kept]
        out.append(f"coordinator config [broker] updated: {', '.join(self.config_keys)} (url {self.broker_url})")
        out.append(f"broker: mosquitto -c {self.out / CONF_FILE}  (SIGHUP a running one to reload passwd and acl)")
        return out


def provision(
    config_path: Path,
    devices: Sequence[str],
    out: Path,
    *,
    broker_hosts: Sequence[str] = (),
    broker_port: int = DEFAULT_PORT,
    install_dir: Path | None = None,
    persistence_dir: Path = DEFAULT_PERSISTENCE_DIR,
    bind_address: str = "0.0.0.0",
) -> ProvisionReport:
    """Make or reuse the broker PKI, passwords, ACL, mosquitto.conf and device bundles in ``out``.

    ``install_dir`` is where the broker host will read these files (default: ``out`` itself);
    the first of ``broker_hosts`` (default localhost) is the host in every URL written.
    """
    config_path = Path(config_path)
    config = load_config(config_path, env={})
    user = config.broker.username
    wanted = _device_ids(devices, user)
    if not 1 <= broker_port <= 65535:
        raise ConfigError(f"--broker-port {broker_port}: expected 1..65535")
    out = Path(out).resolve()
    install = Path(install_dir).resolve() if install_dir is not None else out
    (out / BUNDLES).mkdir(parents=True, exist_ok=True, mode=0o700)
    host = broker_hosts[0] if broker_hosts else DEFAULT_SERVER_NAMES[0]
    url = f"mqtts://{f'[{host}]' if ':' in host else host}:{broker_port}"

    ca, ca_created = _ca(out, config.federation.id)
    server_issued = _server_certificate(out, ca, broker_hosts)
    _coordinator_identity(StateDir(config.state.dir))

    users = password_file_users(out / PASSWORD_FILE)
    new_passwords: dict[str, str] = {}
    coordinator_password = config.broker.password or secrets.token_urlsafe(_PASSWORD_BYTES)
    if user not in users:
        new_passwords[user] = coordinator_password
    with_ca = dataclasses.replace(config, broker=dataclasses.replace(config.broker, ca_file=out / CA_CERT))
    added, kept = [], []
    for device in wanted:
        bundle_path = out / BUNDLES / f"{device}.json"
        record = _registry(config).get(device)
        if record is not None and not record.revoked:
            if not bundle_path.exists():
                raise ConfigError(
                    f"device {device!r} is already enrolled but {bundle_path} is missing; re-keying it would lock "
                    f"the deployed device out: run `fedprune-coordinator revoke {device}` first to replace it"
                )
            if device not in users:
                new_passwords[device] = load_bundle(bundle_path).broker_password
            kept.append(device)
            continue
        password = secrets.token_urlsafe(_PASSWORD_BYTES)
        enrollment.enroll(with_ca, device, bundle_path, broker_password=password, broker_url=url)
        new_passwords[device] = password
        added.append(device)
    if new_passwords:
        write_password_file(out / PASSWORD_FILE, new_passwords, add=True)

    atomic_write(out / ACL_FILE, render_acl(config.federation.id, user).encode(), mode=0o644)
    settings = MosquittoSettings(
        port=broker_port, bind_address=bind_address, password_file=install / PASSWORD_FILE,
        acl_file=install / ACL_FILE, ca_file=install / CA_CERT, cert_file=install / SERVER_CERT,
        key_file=install / SERVER_KEY, persistence_dir=Path(persistence_dir).resolve(),
    )
    atomic_write(out / CONF_FILE, render_mosquitto_conf(settings).encode(), mode=0o644)
    keys = update_broker_section(config_path, {
        "url": url, "ca_file": str(out / CA_CERT), "password": coordinator_password, "embedded": False,
        "password_file": str(out / PASSWORD_FILE),
    })
    return ProvisionReport(out, url, tuple(added), tuple(kept), ca_created, server_issued,
                           user in new_passwords, keys)


def update_broker_section(config_path: Path, values: dict[str, str | bool]) -> tuple[str, ...]:
    """Set ``[broker]`` keys in a coordinator TOML file in place; validated before it replaces the file.

    A key's line (``key = ...`` or the commented ``# key =`` that ``init`` writes for an unset
    value) is replaced; a key without a line is added at the end of the table. The file keeps
    its mode without group/other write, and loses other-read, since it now holds a password.
    """
    lines = config_path.read_text().splitlines()
    pending = dict(values)
    table, end_of_broker = None, None
    for i, line in enumerate(lines):
        header = re.match(r"\s*\[([^\]]+)\]", line)
        if header:
            table = header.group(1).strip()
            continue
        if table != "broker":
            continue
        end_of_broker = i + 1
        match = re.match(r"\s*#?\s*([A-Za-z_]+)\s*=", line)
        if match and match.group(1) in pending:
            key = match.group(1)
            lines[i] = f"{key} = {json.dumps(pending.pop(key))}"
    if pending:
        if end_of_broker is None:
            lines += ["", "[broker]"]
            end_of_broker = len(lines)
        lines[end_of_broker:end_of_broker] = [f"{k} = {json.dumps(v)}" for k, v in pending.items()]
    text = "\n".join(lines) + "\n"
    mode = stat.S_IMODE(config_path.stat().st_mode) & 0o640 | 0o600
    probe = config_path.with_name(f".{config_path.name}.provision.toml")
    atomic_write(probe, text.encode(), mode=0o600)
    try:
        load_config(probe, env={})
    finally:
        probe.unlink(missing_ok=True)
    atomic_write(config_path, text.encode(), mode=mode)
    return tuple(values)


def _device_ids(devices: Sequence[str], coordinator_user: str) -> list[str]:
    wanted = list(dict.fromkeys(d.strip() for d in devices if d.strip()))
    for device in wanted:
        if not is_valid_id(device):
            raise ConfigError(f"--devices {device!r}: expected 1-64 characters from A-Z a-z 0-9 . _ -")
        if device == coordinator_user:
            raise ConfigError(f"--devices {device!r}: equals [broker] username; device ids and the coordinator's "
                              "broker user must differ (the ACL grants devices their own topics by user name)")
    return wanted


def _registry(config: CoordinatorConfig) -> Registry:
    return RegistryStore(config.state.dir).read(config.rounds.heartbeat_timeout_s)


def _ca(out: Path, federation: str) -> tuple[KeyPair, bool]:
    cert, key = out / CA_CERT, out / CA_KEY
    if cert.exists() or key.exists():
        return load_key_pair(cert, key), False
    ca = create_ca(f"fedprune {federation} broker CA")
    ca.write(cert, key)
    return ca, True


def _server_certificate(out: Path, ca: KeyPair, hosts: Sequence[str]) -> bool:
    """Re-issue server.crt unless the current one is from this CA and names every host; True if issued."""
    cert, key = out / SERVER_CERT, out / SERVER_KEY
    if cert.exists() and key.exists():
        current = load_key_pair(cert, key).certificate
        try:
            current.verify_directly_issued_by(ca.certificate)
            names = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            covered = {str(v) for v in names.get_values_for_type(x509.DNSName)}
            covered |= {str(v) for v in names.get_values_for_type(x509.IPAddress)}
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            covered = set()
        if {*DEFAULT_SERVER_NAMES, *hosts} <= covered:
            return False
    try:
        issue_server_certificate(ca, hosts).write(cert, key)
    except ValueError as exc:
        raise PkiError(f"--broker-host: {exc}") from None
    return True


def _coordinator_identity(state: StateDir) -> None:
    """The coordinator's signing and sealing keys, made only if missing (``init`` normally made them)."""
    state.ensure()
    path = state.keys / IDENTITY_FILE
    if not path.exists():
        atomic_write(path, Identity.generate().to_pem(), mode=0o600)

