"""The broker's PKI: a CA, the broker's server certificate, optional client certificates, passwords.

Used by ``fedprune-coordinator provision`` and by the integration tests, which run the real
Mosquitto on exactly what this module writes. Keys are EC P-256; every file is written atomically
(temp file, fsync, rename), private keys and password files with mode 0600.

These certificates only authenticate the *transport* (device -> broker). fedprune's messages are
signed and sealed end to end by ``fedprune.protocol.crypto`` with separate keys, so a broker compromise
exposes metadata, never updates or lets anyone forge a model release.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedprune.common.configkit import ConfigError
from fedprune.common.fsutil import atomic_write

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")
_CLOCK_SKEW = timedelta(minutes=5)


class PkiError(ConfigError):
    """A PKI file could not be read or produced; the message names the file and the fix (exit 78)."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, in memory."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Certificate 0644 (public), key 0600 PKCS#8 PEM without passphrase (the broker must read it unattended)."""
        atomic_write(Path(key_path), self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
        ), mode=0o600)
        atomic_write(Path(cert_path), self.certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)


def create_ca(common_name: str = "fedprune CA", *, valid_days: int = 3650, now: datetime | None = None) -> KeyPair:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _base(name, name, key.public_key(), valid_days, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return KeyPair(builder.sign(key, hashes.SHA256()), key)


def issue_server_certificate(
    ca: KeyPair,
    hostnames: Sequence[str] = (),
    *,
    common_name: str = "fedprune broker",
    valid_days: int = 825,
    now: datetime | None = None,
) -> KeyPair:
    """A TLS server certificate whose SAN covers localhost, 127.0.0.1 and ``hostnames`` (names or IPs)."""
    names = list(dict.fromkeys([*DEFAULT_SERVER_NAMES, *hostnames]))
    return _issue(ca, common_name, ExtendedKeyUsageOID.SERVER_AUTH, [_general_name(n) for n in names], valid_days, now)


def issue_client_certificate(
    ca: KeyPair, common_name: str, *, valid_days: int = 825, now: datetime | None = None
) -> KeyPair:
    """A TLS client certificate; ``common_name`` is the MQTT username (Mosquitto's use_identity_as_username)."""
    return _issue(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [], valid_days, now)


def load_key_pair(cert_path: Path, key_path: Path) -> KeyPair:
    try:
        certificate = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise PkiError(f"cannot load {cert_path} / {key_path}: {error}; re-run provisioning to recreate them") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
        raise PkiError(f"{key_path} is not the EC private key of {cert_path}")
    return KeyPair(certificate, key)


def password_file_users(path: Path) -> set[str]:
    """The user names in a Mosquitto password file; empty when the file does not exist."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return set()
    return {line.split(":", 1)[0] for line in lines if ":" in line and not line.startswith("#")}


def write_password_file(
    path: Path, credentials: Mapping[str, str], tool: str = "mosquitto_passwd", *, add: bool = False
) -> None:
    """Write a Mosquitto password file (PBKDF2-SHA512 hashes) for ``credentials`` {username: password}.

    With ``add``, the users already in ``path`` keep their hashes and ``credentials`` are added
    (or replace those users' hashes); otherwise the file holds exactly ``credentials``.
    Passwords go to ``mosquitto_passwd`` on stdin, never on its command line (``-b`` would show
    them in ``ps``). The file is built beside ``path`` and renamed into place with mode 0600.
    """
    if not credentials and not add:
        raise ValueError("credentials: at least one user is needed (allow_anonymous is false)")
    for user, password in credentials.items():
        if not user or ":" in user or any(c in user for c in "\n\r\0 "):
            raise ValueError(f"username {user!r}: expected no ':', whitespace or NUL")
        if not password or any(c in password for c in "\n\r\0"):
            raise ValueError(f"password for {user!r}: expected a non-empty single line")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.building")
    tmp.unlink(missing_ok=True)
    try:
        if add and path.exists():
            atomic_write(tmp, path.read_bytes(), mode=0o600)
        for user, password in credentials.items():
            args = [tool, *([] if tmp.exists() else ["-c"]), str(tmp), user]
            try:
                subprocess.run(
                    args, input=f"{password}\n{password}\n", text=True, capture_output=True, check=True, timeout=30
                )
            except FileNotFoundError:
                raise PkiError(f"{tool} not found: install Mosquitto (apt-get install mosquitto)") from None
            except subprocess.CalledProcessError as error:
                raise PkiError(f"{tool} failed for user {user!r} writing {path}: {error.stderr.strip()}") from None
        if tmp.exists():
            atomic_write(path, tmp.read_bytes(), mode=0o600)
    finally:
        tmp.unlink(missing_ok=True)


def _issue(
    ca: KeyPair,
    common_name: str,
    usage: x509.ObjectIdentifier,
    alt_names: list[x509.GeneralName],
    valid_days: int,
    now: datetime | None,
) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _base(subject, ca.certificate.subject, key.public_key(), valid_days, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()), critical=False
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return KeyPair(builder.sign(ca.private_key, hashes.SHA256()), key)


def _base(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, valid_days: int, now: datetime | None
) -> x509.CertificateBuilder:
    if valid_days < 1:
        raise ValueError(f"valid_days={valid_days}: expected >= 1")
    start = (now or datetime.now(timezone.utc)) - _CLOCK_SKEW
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _CLOCK_SKEW + timedelta(days=valid_days))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=not cert_sign, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        if not name or any(c.isspace() for c in name) or "/" in name:
            raise ValueError(f"server name {name!r}: expected a DNS name or an IP address") from None
        return x509.DNSName(name)
