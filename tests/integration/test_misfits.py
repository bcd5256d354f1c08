"""Devices that cannot take part say why, and nobody waits for them: data that does not fit the
model (real coordinator and agent processes over the embedded broker), and a bundle whose login
the broker refuses (real Mosquitto)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fedprune.coordinator.fleet.broker import free_port
from fedprune.coordinator.lab.localfed import BIN, BrokerAccess, LocalFederation
from tests.edge_agent.test_clear_errors import agent, assert_user_error, write_agent

pytestmark = pytest.mark.slow

DEADLINE_S = 60.0


def metric(text: str, name: str, **labels: str) -> float:
    rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^fedprune_{name}{{{re.escape(rendered)}}} (\S+)$" if labels else rf"^fedprune_{name} (\S+)$",
                      text, re.MULTILINE)
    assert match, f"{name} {labels} not in /metrics"
    return float(match.group(1))


def test_devices_whose_data_does_not_fit_decline_once_per_round_and_do_not_hold_up_the_round(tmp_path: Path) -> None:
    """Before: 13-feature data against the default input_shape 64 failed training 29 times in two
    minutes, rounds waited for the deadline, and the counter grew with every re-announcement."""
    fed = LocalFederation(
        root=tmp_path, broker=BrokerAccess(url=f"mqtt://127.0.0.1:{free_port()}", embedded=True),
        devices=("pi-ok", "pi-wide", "pi-labels"), rounds=3, federation="fed1", partition="iid",
        settings={"rounds": {"min_devices": 3, "quorum": 1, "deadline_s": DEADLINE_S, "reannounce_s": 1.0,
                             "on_missed_quorum": "close"}},
    )
    fed.prepare()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data" / "pi-wide.npz", X=rng.random((116, 13), dtype=np.float32), y=np.arange(116) % 3)
    np.savez(tmp_path / "data" / "pi-labels.npz", X=rng.random((50, 1, 8, 8), dtype=np.float32),
             y=np.array([0, 3, 10, 99, 9] * 10))
    fed.start()
    try:
        history = fed.wait_for_round(1, timeout=DEADLINE_S)
        time.sleep(4.0)  # re-announcements every second would each be counted before
        metrics = fed.metrics_text()
    finally:
        codes = fed.stop_all()

    assert history[0]["selected"] == 3 and history[0]["received"] == 1
    assert history[0]["duration_s"] < DEADLINE_S / 2  # closed when pi-ok reported, not at the deadline
    assert metric(metrics, "rounds_declined_total", reason="data_mismatch") == 2
    assert metric(metrics, "devices_excluded", reason="data_mismatch") == 2
    assert metric(metrics, "devices_online") == 3
    coordinator_log = fed.log("coordinator")
    assert "event=round_open round=2" not in coordinator_log  # min_devices 3 counts only devices that fit
    assert 'event=device_excluded device=pi-wide reason=data_mismatch detail="13 features, model expects 64"' \
        in coordinator_log
    assert 'event=device_excluded device=pi-labels reason=data_mismatch detail="labels 10, 99 outside 0..9"' \
        in coordinator_log
    for name, detail in (("pi-wide", "13 features, model expects 64"), ("pi-labels", "labels 10, 99 outside 0..9")):
        log = fed.log(name)
        assert log.count("event=data_mismatch ") == 1 and f'detail="{detail}" ' in log  # logfmt quotes spaces
        assert f'event=round_declined round=1 reason="data_mismatch: {detail}"' in log
        assert "event=training_failed" not in log and "Traceback" not in log
    assert codes == {"coordinator": 0, "pi-ok": 0, "pi-wide": 0, "pi-labels": 0}

    status = subprocess.run([str(BIN / "fedprune-coordinator"), "status", "--config", str(fed.config_path)],
                            capture_output=True, text=True, check=True).stdout
    assert re.search(r"pi-wide .* round 1 declined: data_mismatch: 13 features, model expects 64", status), status
    assert re.search(r"pi-labels .* round 1 declined: data_mismatch: labels 10, 99 outside 0\.\.9", status), status


def test_a_login_the_broker_refuses_on_first_connect_is_final(tmp_path: Path, mosquitto) -> None:
    """Before: a bundle from another federation (its password unknown to this Mosquitto) retried forever."""
    config = write_agent(tmp_path, broker_url=mosquitto.url, broker_password="from-another-federation",
                         ca_file=mosquitto.ca_file)
    result = agent("run", "--config", config, timeout=120)
    assert_user_error(result, f"the bundle {tmp_path / 'bundle.json'}", "refused the login of device 'dev-0'",
                      "install a fresh bundle")


def test_a_bundle_pinning_another_coordinator_says_so_and_keeps_running(tmp_path: Path) -> None:
    """Over the embedded broker (no logins) a bundle of another coordinator for the same federation
    id sees every task fail its signature. Not final: on a broker without ACLs anyone can publish
    a forged task, and exiting on one would let them stop every device; so it is one error line."""
    fed = LocalFederation(
        root=tmp_path / "a", broker=BrokerAccess(url=f"mqtt://127.0.0.1:{free_port()}", embedded=True),
        devices=("pi-a",), rounds=1000, federation="fed1",
        settings={"rounds": {"min_devices": 1, "quorum": 1, "reannounce_s": 0.5}},
    )
    fed.prepare()
    other = tmp_path / "b"
    config = write_agent(other, broker_url=fed.broker.url)  # coordinator "b" of another fed1
    fed.start()
    try:
        fed.processes["pi-x"] = subprocess.Popen([str(BIN / "fedprune-agent"), "run", "--config", str(config)],
                                                 stdout=(tmp_path / "pi-x.log").open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "event=foreign_broadcasts" not in (tmp_path / "pi-x.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "pi-x.log").read_text()[-3000:]
            assert fed.processes["pi-x"].poll() is None
            time.sleep(0.2)
        time.sleep(1.0)
        assert fed.processes["pi-x"].poll() is None
    finally:
        codes = fed.stop_all()
    log = (tmp_path / "pi-x.log").read_text()
    assert log.count("event=foreign_broadcasts") == 1 and f"bundle={other / 'bundle.json'}" in log
    assert "reason=bad_signature" in log and codes["pi-x"] == 0
