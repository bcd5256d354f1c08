"""The enrollment bundle: everything a device needs to join a federation, in one 0600 file.

Written by ``fedprune-coordinator enroll`` (or ``provision``), copied to the device, loaded by the
agent. It holds the device's private keys, the coordinator's public keys (pinned: broadcasts are
verified against them and nothing else), the federation id, the broker URL, the broker
credentials and the CA certificate that signed the broker's certificate. JSON with base64 for
the binary parts, so an operator can read everything but the secrets at a glance.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fedprune.common.events import emit
from fedprune.common.fsutil import atomic_write, private_file_is_exposed
from fedprune.protocol.crypto import Identity, PublicIdentity
from fedprune.protocol.topics import validate_id

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "fedprune-bundle/1"
MAX_BUNDLE_BYTES = 1 << 20


class EnrollmentError(Exception):
    """A bundle is missing, malformed or unsafe; the message names the file and the fix."""


@dataclass(frozen=True)
class Bundle:
    federation: str
    device_id: str
    identity: Identity
    coordinator: PublicIdentity
    broker_url: str
    broker_username: str
    broker_password: str
    ca_pem: bytes | None = None

    def to_json(self) -> bytes:
        signing, agreement = self.identity.to_raw()
        document = {
            "format": BUNDLE_FORMAT,
            "federation": self.federation,
            "device_id": self.device_id,
            "device_public_fingerprint": self.identity.public.fingerprint(),
            "device_signing_key": _b64(signing),
            "device_agreement_key": _b64(agreement),
            "coordinator_public": _b64(self.coordinator.to_bytes()),
            "coordinator_fingerprint": self.coordinator.fingerprint(),
            "broker": {"url": self.broker_url, "username": self.broker_username, "password": self.broker_password},
            "ca_pem": self.ca_pem.decode() if self.ca_pem else None,
        }
        return json.dumps(document, indent=2).encode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def save_bundle(path: Path, bundle: Bundle) -> None:
    atomic_write(Path(path), bundle.to_json(), mode=0o600)


def load_bundle(path: Path) -> Bundle:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BUNDLE_BYTES:
            raise EnrollmentError(f"{path}: larger than {MAX_BUNDLE_BYTES} bytes; not a fedprune bundle")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EnrollmentError(f"{path}: no such bundle; copy the file made by `fedprune-coordinator enroll`") from None
    if private_file_is_exposed(path):
        emit(log, logging.WARNING, "bundle_permissions", file=path, fix=f"chmod 600 {path}",
             detail="private keys readable by others")
    try:
        document = json.loads(raw)
        if document.get("format") != BUNDLE_FORMAT:
            raise EnrollmentError(f"{path}: format {document.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        broker = document["broker"]
        ca = document.get("ca_pem")
        return Bundle(
            federation=validate_id(document["federation"], "federation"),
            device_id=validate_id(document["device_id"], "device id"),
            identity=Identity.from_raw(base64.b64decode(document["device_signing_key"], validate=True),
                                       base64.b64decode(document["device_agreement_key"], validate=True)),
            coordinator=PublicIdentity.from_bytes(base64.b64decode(document["coordinator_public"], validate=True)),
            broker_url=str(broker["url"]),
            broker_username=str(broker["username"]),
            broker_password=str(broker["password"]),
            ca_pem=ca.encode() if isinstance(ca, str) else None,
        )
    except EnrollmentError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise EnrollmentError(f"{path}: not a valid enrollment bundle ({type(exc).__name__}: {exc}); "
                              "re-export it with `fedprune-coordinator enroll`") from None
