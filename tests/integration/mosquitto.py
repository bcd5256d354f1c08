"""The real Mosquitto, run from a temp directory on a free loopback port, for integration tests.

Everything it runs on comes from the production code paths: the CA and server certificate from
coordinator.pki, the password file from ``write_password_file``, mosquitto.conf and the ACL
rendered from deploy/mosquitto/ by coordinator.broker_config. Only the loopback address, the port
and the paths are test choices.

Started as root, Mosquitto switches to the ``mosquitto`` user after opening its listener, so the
whole directory is handed to that user; as any other user it simply runs as that user.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from fedprune.coordinator.fleet.broker_config import MosquittoSettings, render_acl, render_mosquitto_conf
from fedprune.coordinator.fleet.pki import create_ca, issue_server_certificate, write_password_file
from fedprune.coordinator.lab.localfed import BrokerAccess
from fedprune.common.fsutil import atomic_write
from fedprune.common.mqtt import LinkConfig

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


class MosquittoBroker:
    """One Mosquitto process and its files; ``stop``/``kill``/``start``/``restart`` for fault tests."""

    def __init__(self, directory: Path, federation: str = "fed1", devices: int = 3) -> None:
        self.directory = directory
        self.federation = federation
        self.coordinator = Credentials("coordinator", secrets.token_urlsafe(16))
        self.devices = tuple(Credentials(f"dev-{i}", secrets.token_urlsafe(16)) for i in range(devices))
        self.port = _free_port()
        self.log_path = directory / "mosquitto.log"
        self.ca_file = directory / "ca.crt"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_files()

    def access(self) -> BrokerAccess:
        """How a LocalFederation's coordinator and devices log in to this broker."""
        return BrokerAccess(url=self.url, ca_file=self.ca_file, coordinator_password=self.coordinator.password,
                            device_passwords={d.username: d.password for d in self.devices})

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def link_config(self, user: Credentials, client_id: str | None = None, **overrides: Any) -> LinkConfig:
        """A LinkConfig for ``user`` over TLS, MQTT v5, with a fast reconnect backoff for tests."""
        config = LinkConfig(
            url=self.url,
            client_id=client_id or user.username,
            username=user.username,
            password=user.password,
            ca_file=self.ca_file,
            protocol="5",
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
        )
        return replace(config, **overrides)

    def start(self) -> None:
        if self.running:
            raise RuntimeError("mosquitto is already running")
        log = open(self.log_path, "ab")
        try:
            self._process = subprocess.Popen(
                ["mosquitto", "-c", str(self.directory / "mosquitto.conf")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self._wait_until_serving()

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence DB and exits."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no DB save; the broker comes back at its last autosave."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, line: str, timeout: float) -> None:
        """Wait for ``line`` in the broker's log (how Mosquitto reports e.g. a clean DISCONNECT)."""
        wait_until(lambda: line in self.log_text(), timeout, f"{line!r} in mosquitto's log")

    def close(self) -> None:
        if self.running:
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _signal(self, signum: int) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._process = None

    def _write_files(self) -> None:
        d = self.directory
        ca = create_ca("fedprune test CA")
        ca.write(self.ca_file, d / "ca.key")
        issue_server_certificate(ca).write(d / "server.crt", d / "server.key")
        users = {c.username: c.password for c in (self.coordinator, *self.devices)}
        write_password_file(d / "passwords", users)
        atomic_write(d / "acl", render_acl(self.federation, self.coordinator.username).encode(), mode=0o600)
        (d / "db").mkdir(mode=0o700)
        settings = MosquittoSettings(
            port=self.port,
            bind_address="127.0.0.1",
            password_file=d / "passwords",
            acl_file=d / "acl",
            ca_file=self.ca_file,
            cert_file=d / "server.crt",
            key_file=d / "server.key",
            persistence_dir=d / "db",
        )
        atomic_write(d / "mosquitto.conf", render_mosquitto_conf(settings).encode(), mode=0o600)
        if os.geteuid() == 0:
            broker_user = pwd.getpwnam("mosquitto")
            for path in (d, *d.rglob("*")):
                os.chown(path, broker_user.pw_uid, broker_user.pw_gid)

    def _wait_until_serving(self) -> None:
        """Poll until a TLS handshake with our CA succeeds (Mosquitto has no readiness signal)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._process.returncode}:\n{self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto not serving TLS on port {self.port} after {START_TIMEOUT_S} s:\n{self.log_text()}")


def start_mosquitto(federation: str = "fed1", devices: int = 3) -> MosquittoBroker:
    if shutil.which("mosquitto") is None:
        raise FileNotFoundError("mosquitto is not installed: run scripts/bootstrap.sh --test-tools")
    directory = Path(tempfile.mkdtemp(prefix="fedprune-mosquitto-"))
    try:
        broker = MosquittoBroker(directory, federation, devices)
        broker.start()
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return broker


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` for events that have no notification (another process, a counter)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def mosquitto_for_test(devices: int = 3) -> Iterator[MosquittoBroker]:
    """A fixture's body: a fresh Mosquitto for federation 'fed1' with a coordinator user and
    devices dev-0.. while the test runs. Without mosquitto the test fails under CI (the broker
    tests must run there) and is skipped elsewhere."""
    if shutil.which("mosquitto") is None:
        message = "mosquitto is not installed (scripts/bootstrap.sh --test-tools)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must run the broker tests, not skip them")
        pytest.skip(message)
    broker = start_mosquitto(devices=devices)
    try:
        yield broker
    finally:
        broker.close()
