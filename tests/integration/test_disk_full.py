"""Disk full: the coordinator's state directory on a small tmpfs that fills up mid-federation.

A checkpoint write that fails must leave the previous checkpoint intact and loadable, be logged
(``event=checkpoint_failed``) and counted (``fedprune_checkpoint_failures_total``), and the
daemon must keep running and retrying; once space is freed the federation completes. Needs
root to mount the tmpfs; skipped with the reason where mounting is not permitted.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from fedprune.coordinator.lab.localfed import LocalFederation
from fedprune.coordinator.state import StateDir
from tests.integration.mosquitto import start_mosquitto, wait_until

DEVICES = 3
ROUNDS = 8
FILL_AFTER = 3
TMPFS_SIZE = "6m"  # three checkpoints of the digits MLP (~0.3 MB each), the registry, keys and one ONNX release


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "state"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Write until the filesystem says ENOSPC; the file holds every free block."""
    path = directory / "filler.bin"
    block = b"\0" * 4096
    with path.open("wb", buffering=0) as handle:
        while True:
            try:
                handle.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return path


def checkpoint_failures(fed: LocalFederation) -> float:
    match = re.search(r"^fedprune_checkpoint_failures_total (\S+)$", fed.metrics_text(), re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_disk_keeps_the_last_checkpoint_counts_retries_and_recovers(small_disk: Path) -> None:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: run scripts/bootstrap.sh --test-tools")
    broker = start_mosquitto(federation="fed1", devices=DEVICES)
    access = broker.access()
    fed = LocalFederation(root=small_disk.parent, broker=access, devices=tuple(d.username for d in broker.devices),
                          rounds=ROUNDS, federation=broker.federation,
                          settings={"broker": {"username": broker.coordinator.username},
                                    "rounds": {"deadline_s": 20.0}})
    assert fed.state_dir == small_disk
    fed.prepare()
    fed.start()
    try:
        fed.wait_for_round(FILL_AFTER, timeout=120)
        filler = fill(small_disk)
        wait_until(lambda: "event=checkpoint_failed" in fed.log("coordinator"), 60, "a failed checkpoint")
        stuck_at = len(fed.history())
        checkpoint = StateDir(small_disk).load_latest_checkpoint()
        assert checkpoint is not None and checkpoint["round"] == stuck_at, "the previous checkpoint is not intact"
        assert checkpoint["last_entry"]["round"] == stuck_at
        assert [h["round"] for h in StateDir(small_disk).read_history()] == list(range(1, stuck_at + 1))
        wait_until(lambda: checkpoint_failures(fed) >= 2, 30, "the daemon to retry the checkpoint")
        assert fed.processes["coordinator"].poll() is None, "the coordinator exited on a full disk"
        assert len(fed.history()) == stuck_at, "a round counted without its checkpoint"
        filler.unlink()
        history = fed.wait_for_round(ROUNDS, timeout=180)
        codes = fed.stop_all()
    finally:
        fed.stop_all()
        broker.close()
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
    assert codes["coordinator"] == 0
    assert StateDir(small_disk).load_latest_checkpoint()["round"] == ROUNDS
    log = fed.log("coordinator")
    assert re.search(r"event=checkpoint_failed round=\d+ error=\"OSError\(28, 'No space left on device'\)\"", log), log[-2000:]


def test_a_device_registering_while_the_disk_is_full_does_not_stop_the_coordinator(small_disk: Path) -> None:
    from tests.fuzz.daemon_target import DaemonWorld
    from tests.fuzz.targets import Program

    world = DaemonWorld()
    try:
        world.daemon.registry_store.presence_path = small_disk / "presence.msgpack"
        fill(small_disk)
        register = world.genuine(Program(bytes([0, 0, 1, 0, 0, 0, 0, 0])))  # dev-0's Register
        for topic, payload in register:
            world.daemon.on_message(topic, payload)
        assert world.daemon.registry.get("dev-0").last_seen == world.clock.now
        world.daemon.tick()  # the batched registry save fails on the full disk: counted, not raised
        assert world.daemon.metrics.value("checkpoint_failures_total") >= 1
        assert world.daemon._registry_dirty
    finally:
        world.daemon.link.close(timeout=0.5)
        world.close()
