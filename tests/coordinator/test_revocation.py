"""Revocation on disk and in the daemon's cores: the allow-list has one writer (the operator
commands, under a lock), presence another (the daemon), an older registry.msgpack is migrated,
the running registry follows allow-list changes, a revoked device leaves the open round, and
``revoke`` takes the device off the broker's password file or exits 78 naming the key."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.cli import main as coordinator_main
from fedprune.coordinator.core.registry import Registry
from fedprune.coordinator.fleet.registry_store import RegistryStore
from fedprune.coordinator.core.rounds import CloseRound, RoundMachine, RoundPolicy
from fedprune.coordinator.state import dumps

KEY_A, KEY_B, KEY_C = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
HASH = "$7$101$c2FsdA==$aGFzaA=="  # the shape of a Mosquitto PBKDF2 line; never checked here


def run_cli(*argv: object) -> int:
    with pytest.raises(SystemExit) as done:
        coordinator_main([str(a) for a in argv])
    return int(done.value.code)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "coordinator.toml"
    enrollment.init(config_path=path, state_dir=tmp_path / "state", federation="fed1",
                    broker_url="mqtt://127.0.0.1:1883", embedded_broker=False)
    for device in ("dev-1", "dev-2"):
        assert run_cli("enroll", device, "--config", path, "--out", tmp_path / f"{device}.json") == 0
    return path


# ---- the registry core ------------------------------------------------------------------------


def test_a_new_allow_list_keeps_presence_takes_revoked_devices_offline_and_reports_what_changed() -> None:
    running = Registry(heartbeat_timeout_s=30)
    running.enroll("pi-1", KEY_A, KEY_B, now=0.0)
    running.enroll("pi-2", KEY_B, KEY_A, now=0.0)
    running.enroll("pi-3", KEY_C, KEY_A, now=0.0)
    for device in ("pi-1", "pi-2", "pi-3"):
        running.seen(device, now=1.0, n_examples=10)
    operator = Registry()
    operator.replace_allow_list(running.allow_list())
    operator.revoke("pi-2")
    operator.revoke("pi-3")
    operator.enroll("pi-3", KEY_A, KEY_C, now=2.0)  # re-keyed
    operator.enroll("pi-4", KEY_A, KEY_A, now=2.0)

    change = running.replace_allow_list(operator.allow_list())
    assert change.withdrawn == ("pi-2", "pi-3") and change.admitted == ("pi-3", "pi-4")
    assert running.online(now=2.0) == ("pi-1",)
    assert running.get("pi-1").n_examples == 10, "an unchanged device keeps its presence"
    assert running.get("pi-2") is None and running.is_revoked("pi-2")
    assert running.get("pi-3").sign_public == KEY_A and running.get("pi-3").last_seen is None
    assert running.replace_allow_list(operator.allow_list()) == type(change)((), ())


def test_a_revoked_device_leaves_the_open_round_with_its_update_and_the_round_closes_on_the_rest() -> None:
    rounds: RoundMachine[str] = RoundMachine(RoundPolicy(quorum=3, deadline_s=60.0, on_missed_quorum="retry"))
    rounds.open(1, ("a", "b", "c"), now=0.0)
    rounds.on_update("a", 1, "u-a", now=1.0)
    rounds.on_update("b", 1, "u-b", now=1.0)
    assert rounds.tick(now=2.0) is None
    assert rounds.discard("b") and rounds.discard("c") and not rounds.discard("z")
    closed = rounds.tick(now=2.0)
    assert isinstance(closed, CloseRound) and closed.updates == {"a": "u-a"} and closed.reached_quorum


# ---- the files ----------------------------------------------------------------------------------


def legacy_registry(root: Path) -> None:
    """registry.msgpack as the coordinator wrote it before the split: whole records in one list."""
    root.mkdir(parents=True, exist_ok=True)
    records = [
        {"device_id": "pi-1", "sign_public": KEY_A, "kx_public": KEY_B, "enrolled_at": 1.0, "revoked": False,
         "capabilities": {"cpu_count": 4}, "n_examples": 120, "last_seen": 5.0, "online": True},
        {"device_id": "pi-2", "sign_public": KEY_B, "kx_public": KEY_A, "enrolled_at": 2.0, "revoked": True,
         "capabilities": {}, "n_examples": 0, "last_seen": None, "online": False},
    ]
    (root / "registry.msgpack").write_bytes(dumps({"heartbeat_timeout_s": 90.0, "devices": records}))


def test_an_older_registry_file_is_read_as_is_and_migrated_by_a_writer(tmp_path: Path) -> None:
    legacy_registry(tmp_path)
    store = RegistryStore(tmp_path)
    read = store.read(90.0)
    assert sorted(os.listdir(tmp_path)) == ["registry.msgpack"], "status must not write"
    loaded = store.load(90.0)
    assert loaded.devices() == read.devices()
    assert sorted(os.listdir(tmp_path)) == ["allowlist.lock", "allowlist.msgpack", "presence.msgpack"]
    assert loaded.get("pi-1").capabilities == {"cpu_count": 4} and loaded.get("pi-1").n_examples == 120
    assert loaded.is_revoked("pi-2") and RegistryStore(tmp_path).read(90.0).devices() == read.devices()


def test_the_daemons_presence_save_never_writes_back_a_stale_allow_list(tmp_path: Path) -> None:
    with RegistryStore(tmp_path).edit(90.0) as registry:
        registry.enroll("pi-1", KEY_A, KEY_B, now=0.0)
    daemon = RegistryStore(tmp_path)
    running = daemon.load(90.0)
    assert daemon.allow_list_if_changed() is None
    with RegistryStore(tmp_path).edit(90.0) as registry:  # `revoke pi-1` while the daemon runs
        registry.revoke("pi-1")
    running.seen("pi-1", now=1.0, n_examples=7)
    daemon.save_presence(running)  # a save before the daemon's next tick
    assert RegistryStore(tmp_path).read(90.0).is_revoked("pi-1")
    change = running.replace_allow_list(daemon.allow_list_if_changed())
    assert change.withdrawn == ("pi-1",) and daemon.allow_list_if_changed() is None


def test_concurrent_operator_commands_wait_for_each_other_and_lose_no_change(tmp_path: Path) -> None:
    first_inside, second_inside, release = threading.Event(), threading.Event(), threading.Event()

    def enroll(device: str, key: bytes, inside: threading.Event) -> None:
        with RegistryStore(tmp_path).edit(90.0) as registry:
            inside.set()
            registry.enroll(device, key, key, now=0.0)
            if device == "pi-1":
                release.wait(10)

    first = threading.Thread(target=enroll, args=("pi-1", KEY_A, first_inside))
    first.start()
    assert first_inside.wait(10)
    second = threading.Thread(target=enroll, args=("pi-2", KEY_B, second_inside))
    second.start()
    time.sleep(0.3)
    assert not second_inside.is_set(), "a second command read the allow-list while the first was changing it"
    release.set()
    first.join(10)
    second.join(10)
    assert [r.device_id for r in RegistryStore(tmp_path).read(90.0).devices()] == ["pi-1", "pi-2"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as an operator running `sudo fedprune-coordinator revoke`")
def test_a_command_run_as_root_leaves_files_the_daemons_user_can_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    legacy_registry(state)
    os.chown(state, 65534, 65534)  # the service user's directory (systemd StateDirectory=)
    with RegistryStore(state).edit(90.0) as registry:
        registry.revoke("pi-1")
    assert {(p.name, p.stat().st_uid) for p in state.iterdir()} == {
        ("allowlist.msgpack", 65534), ("presence.msgpack", 65534), ("allowlist.lock", 0)}


# ---- the command ----------------------------------------------------------------------------------


def test_revoking_an_unknown_device_exits_78_and_changes_nothing(config_path: Path, capsys) -> None:
    allow_list = config_path.parent / "state" / "allowlist.msgpack"
    before = allow_list.read_bytes()
    assert run_cli("revoke", "dev-9", "--config", config_path) == 78
    assert "device 'dev-9' is not enrolled" in capsys.readouterr().err
    assert allow_list.read_bytes() == before


def test_revoke_takes_the_device_out_of_the_broker_password_file_and_runs_the_reload_command(
        config_path: Path, tmp_path: Path, capsys) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text(f"coordinator:{HASH}\ndev-1:{HASH}\ndev-2:{HASH}\n")
    passwd.chmod(0o640)
    marker = tmp_path / "reloaded"
    assert run_cli("revoke", "dev-1", "--config", config_path, "--set", f"broker.password_file={passwd}",
                   "--set", f"broker.reload_command=touch {marker}") == 0
    assert passwd.read_text() == f"coordinator:{HASH}\ndev-2:{HASH}\n"
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o640 and marker.exists()
    out = capsys.readouterr().out
    assert "revoked dev-1" in out and f"user dev-1 removed from {passwd}" in out and "reloaded (touch" in out
    assert run_cli("status", "--config", config_path, "--json") == 0
    assert '"state": "revoked"' in capsys.readouterr().out


def test_a_broker_step_that_fails_exits_78_naming_the_key_and_the_device_stays_revoked(
        config_path: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-passwd"
    assert run_cli("revoke", "dev-1", "--config", config_path, "--set", f"broker.password_file={missing}") == 78
    err = capsys.readouterr().err
    assert f"[broker] password_file {missing} does not exist" in err and "revoke dev-1` again" in err
    assert RegistryStore(config_path.parent / "state").read(90.0).is_revoked("dev-1")

    passwd = tmp_path / "passwd"
    passwd.write_text(f"dev-1:{HASH}\n")
    assert run_cli("revoke", "dev-1", "--config", config_path, "--set", f"broker.password_file={passwd}",
                   "--set", "broker.reload_command=/bin/false") == 78
    assert "[broker] reload_command '/bin/false' exited with 1" in capsys.readouterr().err
    assert run_cli("revoke", "dev-1", "--config", config_path, "--set", f"broker.password_file={passwd}") == 0
    assert "was not in" in capsys.readouterr().out, "running it again retries the broker step"
