"""Broker PKI and Mosquitto config rendering: what provisioning writes, checked without a broker."""

from __future__ import annotations

import ssl
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedprune.coordinator.fleet.broker_config import MosquittoSettings, render, render_acl, render_mosquitto_conf
from fedprune.coordinator.fleet.pki import (
    KeyPair, PkiError, create_ca, issue_client_certificate, issue_server_certificate, load_key_pair, write_password_file,
)

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def ca() -> KeyPair:
    return create_ca(now=NOW)


def handshake(server_files: tuple[Path, Path], ca_file: Path, hostname: str) -> None:
    """A complete TLS handshake in memory (no sockets) with hostname verification on."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*map(str, server_files))
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_server_certificate_verifies_for_localhost_loopback_and_extra_names(ca: KeyPair, tmp_path: Path) -> None:
    server = issue_server_certificate(ca, ["broker.lan", "10.0.0.7"], now=NOW)
    ca.write(tmp_path / "ca.crt", tmp_path / "ca.key")
    server.write(tmp_path / "server.crt", tmp_path / "server.key")

    for name in ("localhost", "127.0.0.1", "broker.lan", "10.0.0.7"):
        handshake((tmp_path / "server.crt", tmp_path / "server.key"), tmp_path / "ca.crt", name)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake((tmp_path / "server.crt", tmp_path / "server.key"), tmp_path / "ca.crt", "evil.example")


def test_certificates_chain_to_the_ca_with_the_right_usages(ca: KeyPair) -> None:
    server = issue_server_certificate(ca, now=NOW).certificate
    client = issue_client_certificate(ca, "dev-0", now=NOW).certificate
    for leaf, usage in ((server, ExtendedKeyUsageOID.SERVER_AUTH), (client, ExtendedKeyUsageOID.CLIENT_AUTH)):
        leaf.verify_directly_issued_by(ca.certificate)
        assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([usage])
        assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert client.subject.rfc4514_string() == "CN=dev-0"
    assert server.not_valid_before_utc < NOW < server.not_valid_after_utc


def test_private_keys_are_written_0600_and_load_back(ca: KeyPair, tmp_path: Path) -> None:
    ca.write(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.crt").stat().st_mode) == 0o644
    loaded = load_key_pair(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert loaded.certificate == ca.certificate


def test_a_key_that_does_not_match_its_certificate_is_refused(ca: KeyPair, tmp_path: Path) -> None:
    ca.write(tmp_path / "ca.crt", tmp_path / "ca.key")
    issue_server_certificate(ca, now=NOW).write(tmp_path / "server.crt", tmp_path / "server.key")
    with pytest.raises(PkiError, match="is not the EC private key"):
        load_key_pair(tmp_path / "ca.crt", tmp_path / "server.key")
    with pytest.raises(PkiError, match="re-run provisioning"):
        load_key_pair(tmp_path / "missing.crt", tmp_path / "ca.key")


def test_bad_server_names_are_rejected(ca: KeyPair) -> None:
    with pytest.raises(ValueError, match="DNS name or an IP"):
        issue_server_certificate(ca, ["bad name"])


@pytest.mark.skipif(not Path("/usr/bin/mosquitto_passwd").exists(), reason="mosquitto-clients/mosquitto not installed")
def test_password_file_holds_pbkdf2_hashes_never_the_passwords(tmp_path: Path) -> None:
    path = tmp_path / "passwords"
    write_password_file(path, {"coordinator": "pw-one", "dev-0": "pw-two"})
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["coordinator", "dev-0"]
    assert all(line.split(":", 1)[1].startswith("$7$") for line in lines)
    assert "pw-one" not in path.read_text() and "pw-two" not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("credentials", [{}, {"a:b": "pw"}, {"a b": "pw"}, {"dev": ""}, {"dev": "two\nlines"}])
def test_password_file_input_is_validated(credentials: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_password_file(tmp_path / "passwords", credentials)


def test_render_is_strict_about_placeholders_and_values() -> None:
    assert render("a {{x}} b {{y}}", {"x": 1, "y": "two"}) == "a 1 b two"
    with pytest.raises(ValueError, match="without a value: \\['y'\\]"):
        render("{{x}} {{y}}", {"x": 1})
    with pytest.raises(ValueError, match="match no placeholder"):
        render("{{x}}", {"x": 1, "typo": 2})
    with pytest.raises(ValueError, match="single token"):
        render("acl_file {{x}}", {"x": "/etc/acl\nallow_anonymous true"})


def settings(tmp_path: Path, **overrides: object) -> MosquittoSettings:
    values: dict[str, object] = {name: tmp_path / name for name in ("password_file", "acl_file", "ca_file", "cert_file", "key_file")}
    values.update({"port": 8883, "persistence_dir": tmp_path / "db", **overrides})
    return MosquittoSettings(**values)  # type: ignore[arg-type]


def test_mosquitto_conf_renders_every_deliberate_limit(tmp_path: Path) -> None:
    conf = render_mosquitto_conf(settings(tmp_path))
    directives = dict(line.split(" ", 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert "{{" not in conf
    assert directives["allow_anonymous"] == "false"
    assert directives["listener"] == "8883 0.0.0.0"
    assert directives["max_packet_size"] == str(256 * 1024)
    assert int(directives["max_queued_messages"]) > 1000
    assert directives["persistence"] == "true"
    assert directives["persistence_location"] == f"{tmp_path / 'db'}/"


@pytest.mark.parametrize(
    "overrides,complaint",
    [
        ({"port": 0}, "port"),
        ({"max_packet_size": 128 * 1024}, "largest chunk"),
        ({"max_queued_messages": 0}, "unbounded"),
        ({"persistent_client_expiration": "forever"}, "persistent_client_expiration"),
        ({"acl_file": Path("relative/acl")}, "absolute"),
    ],
)
def test_mosquitto_settings_reject_unsafe_values(tmp_path: Path, overrides: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        settings(tmp_path, **overrides)


def test_acl_is_rendered_per_federation_and_validates_ids() -> None:
    acl = render_acl("fed1", "coordinator")
    assert "pattern write fedprune/v1/fed1/update/%u" in acl
    assert "user coordinator" in acl and "{{" not in acl
    with pytest.raises(ValueError, match="federation"):
        render_acl("fed/#", "coordinator")
    with pytest.raises(ValueError, match="coordinator user"):
        render_acl("fed1", "coord inator")
