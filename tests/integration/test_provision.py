"""``fedprune-coordinator provision``: idempotent and additive on disk, and a real Mosquitto runs a
federation on exactly the files it writes, with its ACL enforced.

``provisioned_broker`` is shared with test_privacy_egress.py: provision into a fresh directory,
start Mosquitto on the rendered mosquitto.conf, stop it afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.fleet.broker import free_port
from fedprune.coordinator.cli import main as coordinator_main
from fedprune.coordinator.config import CoordinatorConfig, load_config
from fedprune.coordinator.lab.localfed import BrokerAccess, LocalFederation
from fedprune.coordinator.fleet.provision import ProvisionReport, provision
from fedprune.coordinator.fleet.registry_store import RegistryStore
from fedprune.common.bundle import load_bundle
from fedprune.common.configkit import ConfigError
from fedprune.common.mqtt import LinkConfig, MqttLink, PublishFailed
from fedprune.protocol.topics import update_topic
from tests.integration.mosquitto import wait_until

FED = "fed1"
WAIT_S = 10.0
NOT_AUTHORIZED = 135
BROKER_FILES = ("passwd", "acl", "mosquitto.conf", "ca.crt", "server.crt", "server.key")

needs_passwd = pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")


def init_config(directory: Path, federation: str = FED) -> Path:
    path = directory / "coordinator.toml"
    enrollment.init(config_path=path, state_dir=directory / "state", federation=federation,
                    broker_url="mqtt://127.0.0.1:1883", embedded_broker=True)
    return path


@dataclass
class ProvisionedBroker:
    """A running Mosquitto whose every file came from ``provision``."""

    report: ProvisionReport
    config: CoordinatorConfig
    pid: int  # Mosquitto's, for SIGHUP

    @property
    def ca_file(self) -> Path:
        return self.report.out / "ca.crt"

    def device_password(self, device: str) -> str:
        return load_bundle(self.report.bundle(device)).broker_password

    def access(self, devices: Sequence[str]) -> BrokerAccess:
        return BrokerAccess(url=self.report.broker_url, ca_file=self.ca_file,
                            coordinator_password=self.config.broker.password,
                            device_passwords={d: self.device_password(d) for d in devices})

    def link(self, username: str, password: str, subscriptions: Sequence[str] = ()) -> MqttLink:
        config = LinkConfig(url=self.report.broker_url, client_id=f"test-{username}", username=username,
                            password=password, ca_file=self.ca_file, protocol="5",
                            reconnect_min_s=0.05, reconnect_max_s=0.5)
        link = MqttLink(config, [(s, 1) for s in subscriptions])
        link.wait_connected(WAIT_S)
        return link


@contextmanager
def provisioned_broker(federation: str, devices: Sequence[str],
                       extra_acl: str = "", extra_users: dict[str, str] | None = None) -> Iterator[ProvisionedBroker]:
    """Provision (init + provision) into a temp dir and run Mosquitto on it, on a free loopback port.

    ``extra_acl``/``extra_users`` let a test add a broker user (e.g. an eavesdropper with read
    access to everything: the broker operator's view). The directory is a fresh mkdtemp, not
    pytest's tmp_path, because Mosquitto started as root drops to the ``mosquitto`` user, which
    cannot traverse /tmp/pytest-of-root.
    """
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (scripts/bootstrap.sh --test-tools)")
    root = Path(tempfile.mkdtemp(prefix="fedprune-provision-"))
    process = None
    try:
        config_path = init_config(root / "admin", federation)
        (root / "db").mkdir()
        report = provision(config_path, devices, root / "broker", broker_hosts=["127.0.0.1"],
                           broker_port=free_port(), persistence_dir=root / "db", bind_address="127.0.0.1")
        if extra_acl:
            with open(report.out / "acl", "a") as acl:
                acl.write(extra_acl)
        if extra_users:
            from fedprune.coordinator.fleet.pki import write_password_file

            write_password_file(report.out / "passwd", extra_users, add=True)
        if os.geteuid() == 0:
            broker_user = pwd.getpwnam("mosquitto")
            for path in (root, report.out, root / "db", *(report.out / name for name in BROKER_FILES)):
                os.chown(path, broker_user.pw_uid, broker_user.pw_gid)
        with open(root / "mosquitto.log", "ab") as log:
            process = subprocess.Popen(["mosquitto", "-c", str(report.out / "mosquitto.conf")],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        port = int(report.broker_url.rsplit(":", 1)[1])
        wait_until(lambda: _serving(port, report.out / "ca.crt", process), 10.0, "mosquitto to serve TLS")
        yield ProvisionedBroker(report, load_config(config_path, env={}), process.pid)
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def _serving(port: int, ca_file: Path, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"mosquitto exited with {process.returncode}")
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return True
    except OSError:
        return False


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as done:
        coordinator_main(list(argv))
    return int(done.value.code)


# ---- on disk ------------------------------------------------------------------------------------


@needs_passwd
def test_provision_is_idempotent_and_adds_devices_without_rekeying(tmp_path: Path, capsys) -> None:
    config_path, out = init_config(tmp_path), tmp_path / "broker"
    common = ["--config", str(config_path), "--out", str(out), "--broker-host", "broker.example", "--broker-port",
              "18883", "--persistence-dir", str(tmp_path / "db")]
    assert run_cli("provision", "--devices", "dev-1,dev-2", *common) == 0
    first = snapshot(out)
    password = load_config(config_path, env={}).broker.password

    assert run_cli("provision", "--devices", "dev-1,dev-2,dev-3", *common) == 0
    second = snapshot(out)
    printed = capsys.readouterr().out
    assert password not in printed

    unchanged = ("ca.crt", "ca.key", "server.crt", "server.key", "bundles/dev-1.json", "bundles/dev-2.json")
    assert all(first[name] == second[name] for name in unchanged)
    old_hashes = {line for line in first["passwd"].decode().splitlines()}
    assert old_hashes < set(second["passwd"].decode().splitlines())
    assert [line.split(":")[0] for line in second["passwd"].decode().splitlines()] == [
        "coordinator", "dev-1", "dev-2", "dev-3"]
    assert "device dev-3: enrolled" in printed and "device dev-1: already provisioned, kept" in printed

    config = load_config(config_path, env={})
    assert (config.broker.url, config.broker.password, config.broker.embedded) == (
        "mqtts://broker.example:18883", password, False)
    assert config.broker.ca_file == out / "ca.crt"
    bundle = load_bundle(out / "bundles" / "dev-3.json")
    assert (bundle.broker_url, bundle.broker_username, bundle.ca_pem) == (
        "mqtts://broker.example:18883", "dev-3", second["ca.crt"])
    assert bundle.broker_password not in second["passwd"].decode()
    registry = RegistryStore(config.state.dir).read(config.rounds.heartbeat_timeout_s)
    assert {r.device_id for r in registry.devices()} == {"dev-1", "dev-2", "dev-3"}
    assert all(mode(out / name) == 0o600 for name in ("ca.key", "server.key", "passwd", "bundles/dev-3.json"))
    assert mode(config_path) == 0o600
    conf = second["mosquitto.conf"].decode()
    assert f"password_file {out / 'passwd'}" in conf and "listener 18883 0.0.0.0" in conf
    assert "pattern write fedprune/v1/fed1/update/%u" in second["acl"].decode()


@needs_passwd
def test_a_new_broker_host_reissues_only_the_server_certificate(tmp_path: Path) -> None:
    config_path, out = init_config(tmp_path), tmp_path / "broker"
    provision(config_path, ["dev-1"], out, broker_hosts=["a.example"], persistence_dir=tmp_path / "db")
    before = snapshot(out)
    report = provision(config_path, ["dev-1"], out, broker_hosts=["a.example", "10.0.0.7"],
                       persistence_dir=tmp_path / "db")
    after = snapshot(out)
    assert report.server_certificate_issued and not report.ca_created
    assert after["server.crt"] != before["server.crt"]
    assert all(after[n] == before[n] for n in ("ca.crt", "ca.key", "passwd", "bundles/dev-1.json"))
    assert not provision(config_path, ["dev-1"], out, broker_hosts=["10.0.0.7"],
                         persistence_dir=tmp_path / "db").server_certificate_issued


@needs_passwd
def test_an_enrolled_device_without_its_bundle_is_never_silently_rekeyed(tmp_path: Path) -> None:
    config_path, out = init_config(tmp_path), tmp_path / "broker"
    provision(config_path, ["dev-1"], out, persistence_dir=tmp_path / "db")
    (out / "bundles" / "dev-1.json").unlink()
    with pytest.raises(ConfigError, match="revoke dev-1"):
        provision(config_path, ["dev-1"], out, persistence_dir=tmp_path / "db")
    enrollment.revoke(load_config(config_path, env={}), "dev-1")
    assert provision(config_path, ["dev-1"], out, persistence_dir=tmp_path / "db").added == ("dev-1",)


@pytest.mark.parametrize("devices,complaint", [(["dev/1"], "1-64 characters"), (["coordinator"], "must differ")])
def test_bad_device_ids_are_config_errors(tmp_path: Path, devices: list[str], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        provision(init_config(tmp_path), devices, tmp_path / "broker")


# ---- on a real Mosquitto ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_federation_runs_on_a_provisioned_mosquitto_whose_acl_confines_each_device(tmp_path: Path) -> None:
    devices = ("dev-1", "dev-2", "dev-3")
    with provisioned_broker(FED, devices) as broker:
        fed = LocalFederation(root=tmp_path, broker=broker.access(devices), devices=devices, rounds=2,
                              federation=FED, settings={"broker": {"username": broker.config.broker.username},
                                                        "rounds": {"deadline_s": 20.0}})
        fed.prepare()
        fed.start()
        try:
            history = fed.wait_for_round(2, timeout=90)
        finally:
            codes = fed.stop_all()
        assert [h["round"] for h in history] == [1, 2]
        assert all(h["received"] == len(devices) for h in history)
        assert set(codes.values()) == {0}, codes

        link = broker.link("dev-1", broker.device_password("dev-1"))
        try:
            with pytest.raises(PublishFailed) as refused:
                link.publish(update_topic(FED, "dev-2"), b"forged").wait(WAIT_S)
            assert refused.value.reason_code == NOT_AUTHORIZED
            assert link.publish(update_topic(FED, "dev-1"), b"own").wait(WAIT_S)
        finally:
            link.close()
