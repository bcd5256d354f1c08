"""``fedprune-agent status`` and ``audit``: what the device owner sees, from real state files
(audit log, privacy ledger, release store, declines written by the agent daemon), through the
real command line."""

from __future__ import annotations

import calendar
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedprune.coordinator.export import build_release, export_onnx
from fedprune.common.models import ModelSpec, init_params
from fedprune.edge_agent.audit import AuditLog, DeclineLog, iso_time
from fedprune.edge_agent.cli import main as agent_main
from fedprune.edge_agent.config import load_config
from fedprune.edge_agent.ledger import PrivacyLedger, ledger_path
from fedprune.edge_agent.release_store import ReleaseStore
from fedprune.edge_agent.status import device_status, render
from tests.edge_agent.test_clear_errors import write_agent

BIN = Path(sys.executable).parent
FED = "fed1"
DAY1 = calendar.timegm((2026, 12, 6, 23, 59, 0))  # 2026-12-06T23:59:00Z
DAY2 = calendar.timegm((2026, 12, 7, 7, 3, 0))  # 2026-12-07T07:03:00Z
SPEC = ModelSpec("mlp", (1, 8, 8), 10, args={"hidden": (16,)})


def write_config(tmp_path: Path, state: Path, **privacy: object) -> Path:
    path = tmp_path / "agent.toml"
    text = f'[agent]\nstate_dir = "{state}"\n'
    if privacy:
        text += "[privacy]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in privacy.items())
    path.write_text(text)
    return path


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        agent_main(list(argv))
    out = capsys.readouterr()
    return int(done.value.code), out.out, out.err


def fill_audit(state: Path) -> None:
    """Round 1 on the first day, round 2 on the next (both UTC)."""
    audit = AuditLog(state / "audit.jsonl")
    for when, round_number, kind, size in [(DAY1 - 60, 1, "register", 100), (DAY1, 1, "update", 900),
                                           (DAY2 - 5, 2, "status", 40), (DAY2, 2, "update", 800),
                                           (DAY2 + 30, 2, "status", 40)]:
        audit.record(now=float(when), federation=FED, round=round_number, message_type=kind,
                     topic=f"fedprune/v1/{FED}/{kind}/d", payload=b"x" * size)


def test_a_new_state_dir_says_nothing_yet_in_text_and_json(tmp_path: Path, capsys) -> None:
    state = tmp_path / "never-started"
    config = write_config(tmp_path, state)
    code, out, err = cli(capsys, "status", "--config", str(config))
    assert code == 0 and "Traceback" not in err
    assert "last round:      nothing yet" in out
    assert "0 today" in out and "0 in total" in out
    assert "not used (no privacy ledger)" in out and "model release:   none yet" in out
    assert "declined rounds: none" in out
    assert not state.exists()  # status only reads

    code, out, _ = cli(capsys, "status", "--config", str(config), "--json")
    report = json.loads(out)
    assert code == 0
    assert report["last_round"] is None and report["model_release"] is None and report["declines"] == []
    assert report["bytes_sent"]["today"] == report["bytes_sent"]["total"] == 0
    assert report["privacy"] == [] and report["privacy_enabled"] is False
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", report["time"])


def test_bytes_today_and_in_total_follow_the_utc_day(tmp_path: Path) -> None:
    state = tmp_path / "state"
    fill_audit(state)
    report = device_status(state, now=DAY2 + 3600)
    assert report["bytes_sent"] == {"day": "2026-12-07", "today": 40 + 800 + 40, "total": 100 + 900 + 40 + 800 + 40}
    assert report["last_round"] == {"federation": FED, "round": 2, "messages": {"status": 2, "update": 1},
                                    "bytes": 880, "last_sent": "2026-12-07T07:03:30.000Z"}
    # one minute before midnight, the first day's bytes are today's
    assert device_status(state, now=DAY1 + 30)["bytes_sent"]["today"] == 1000
    text = render(device_status(state, now=DAY2 + 3600))
    assert "last round:      round 2 of federation fed1, 2026-12-07T07:03:30Z: sent 2 status, 1 update, 880 bytes" in text
    assert "bytes sent:      880 today (2026-12-07, UTC), 1,880 in total" in text


def test_the_last_round_is_the_last_one_with_an_update(tmp_path: Path) -> None:
    """Heartbeats name the last round too; a round counts as taken part in once an update left."""
    state = tmp_path / "state"
    fill_audit(state)
    AuditLog(state / "audit.jsonl").record(now=float(DAY2 + 90), federation=FED, round=3, message_type="status",
                                           topic=f"fedprune/v1/{FED}/status/d", payload=b"x" * 40)
    report = device_status(state, now=DAY2 + 100)
    assert report["last_round"]["round"] == 2
    assert [r["round"] for r in report["recent_rounds"]] == [1, 2, 3]


def test_budget_left_uses_the_ledger_and_the_owner_s_current_budget(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ledger = PrivacyLedger(ledger_path(state, FED), FED, epsilon_budget=10.0, delta=1e-5, clip_norm=1.0,
                           noise_multiplier=1.0)
    ledger.charge()
    spent = ledger.budget.spent
    config = write_config(tmp_path, state, enabled=True, epsilon_budget=20.0, noise_multiplier=1.0)
    code, out, _ = cli(capsys, "status", "--config", str(config), "--json")
    [privacy] = json.loads(out)["privacy"]
    assert code == 0
    assert privacy["federation"] == FED and privacy["rounds"] == 1
    assert privacy["epsilon_budget"] == 20.0 and privacy["epsilon_left"] == pytest.approx(20.0 - spent)
    # the daemon declines when the next round would pass the budget; rounds_left is where that starts
    more = privacy["rounds_left"]
    assert more >= 1
    for _ in range(more):
        ledger = PrivacyLedger(ledger.path, FED, epsilon_budget=20.0, delta=1e-5, clip_norm=1.0, noise_multiplier=1.0)
        assert not ledger.exhausted
        ledger.charge()
    assert ledger.exhausted
    code, out, _ = cli(capsys, "status", "--config", str(config))
    assert re.search(r"privacy budget \[fed1\]: epsilon \d+\.\d{3} left of 20 \(about 0 more rounds\); \d+\.\d{3} "
                     rf"spent over {more + 1} rounds", out), out

    no_dp = write_config(tmp_path, state)  # a ledger from before, privacy now off: its own budget
    [privacy] = device_status(state, privacy=load_config(no_dp, env={}).privacy)["privacy"]
    assert privacy["epsilon_budget"] == 20.0 and privacy["rounds_left"] is None


def test_an_unreadable_ledger_is_shown_not_raised(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ledger_path(state, FED).write_text("{not json")
    code, out, err = cli(capsys, "status", "--config", str(write_config(tmp_path, state)))
    assert code == 0 and "Traceback" not in err
    assert "privacy budget [fed1]: ledger unreadable" in out and "never reset automatically" in out


def test_the_current_release_shows_its_round_and_accuracy(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    onnx = export_onnx(SPEC, init_params(SPEC, seed=0),
                       metadata={"federation": FED, "round": 7, "mask_version": 1, "val_accuracy": 0.9375})
    ReleaseStore(state / "models").accept(build_release(3, onnx))
    code, out, _ = cli(capsys, "status", "--config", str(write_config(tmp_path, state)))
    assert code == 0
    assert "model release:   version 3 (from round 7, accuracy 93.8 %)" in out
    release = device_status(state)["model_release"]
    assert (release["version"], release["round"], release["val_accuracy"], release["federation"]) == (3, 7, 0.9375, FED)
    assert ReleaseStore(state / "models").metadata()["round"] == 7  # kept across a restart


def test_the_agent_records_its_declines_and_status_shows_the_last_ones(tmp_path: Path, capsys) -> None:
    """The daemon itself, on an in-memory broker: a Decline is published as a DECLINED status and
    kept in declines.json (once per round and reason), which status shows newest first."""
    from fedprune.coordinator.lab.memory_broker import MemoryBroker
    from fedprune.edge_agent.core.agent import Decline
    from fedprune.edge_agent.daemon import AgentDaemon

    config_path = write_agent(tmp_path)
    now = [float(DAY2)]
    daemon = AgentDaemon(load_config(config_path, env={}), clock=lambda: now[0])
    daemon.start(MemoryBroker().connect("a", daemon.subscriptions, on_message=daemon.enqueue, will=daemon.last_will))
    for round_number, reason in [(4, "too_hot"), (4, "too_hot"), (5, "data_mismatch: 13 features, model expects 64"),
                                 (6, "privacy_budget_exhausted")]:
        now[0] += 60
        daemon._carry_out(Decline(round_number, reason), task=None)
    daemon.finish()
    state = tmp_path / "agent-state"
    assert [(d.round, d.reason) for d in DeclineLog(state / "declines.json").records()] == [
        (4, "too_hot"), (5, "data_mismatch: 13 features, model expects 64"), (6, "privacy_budget_exhausted")]
    statuses = [r for r in AuditLog(state / "audit.jsonl").records() if r.message_type == "status"]
    assert {4, 5, 6} <= {r.round for r in statuses}  # the coordinator was told too

    code, out, _ = cli(capsys, "status", "--config", str(config_path), "--declines", "2")
    assert code == 0
    assert "declined rounds (newest first):\n" \
           "  2026-12-07T07:07:00Z  fed1 round 6: the privacy budget is used up (privacy_budget_exhausted)\n" \
           "  2026-12-07T07:06:00Z  fed1 round 5: this device's data does not fit the model: " \
           "13 features, model expects 64\n" in out
    code, out, _ = cli(capsys, "status", "--config", str(config_path), "--json")
    assert json.loads(out)["declines"][-1] == {"time": "2026-12-07T07:04:00.000Z", "federation": FED, "round": 4,
                                               "reason": "too_hot"}


def test_declines_keep_the_last_few(tmp_path: Path) -> None:
    declines = DeclineLog(tmp_path / "declines.json", keep=3)
    for round_number in range(1, 6):
        declines.record(now=float(DAY2 + round_number), federation=FED, round=round_number, reason="too_hot")
    assert [d.round for d in declines.records()] == [3, 4, 5]
    (tmp_path / "declines.json").write_text("[1, 2")  # damaged by hand: status shows none, the agent rewrites it
    assert declines.records() == []


def test_audit_prints_iso_times_through_the_installed_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    fill_audit(state)
    log = state / "audit.jsonl"
    text = subprocess.run([str(BIN / "fedprune-agent"), "audit", "--log", str(log)], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    assert text[0].split()[:3] == ["time", "(UTC)", "federation"]
    assert text[1].startswith("2026-12-06T23:58:00Z  fed1") and " register " in text[1]
    assert text[4].startswith("2026-12-07T07:03:00Z  fed1") and " update " in text[4] and " 800 " in text[4]
    lines = subprocess.run([str(BIN / "fedprune-agent"), "audit", "--log", str(log), "--json"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["time"] for r in records] == ["2026-12-06T23:58:00.000Z", "2026-12-06T23:59:00.000Z",
                                            "2026-12-07T07:02:55.000Z", "2026-12-07T07:03:00.000Z",
                                            "2026-12-07T07:03:30.000Z"]
    assert records[3]["bytes"] == 800 and len(records[3]["sha256"]) == 64 and records[3]["round"] == 2


def test_audit_of_a_log_not_written_yet_says_so(tmp_path: Path, capsys) -> None:
    code, out, err = cli(capsys, "audit", "--log", str(tmp_path / "audit.jsonl"))
    assert code == 0 and out == "" and "nothing yet" in err


def test_iso_time() -> None:
    assert iso_time(DAY2) == "2026-12-07T07:03:00Z"
    assert iso_time(DAY2 + 0.9996, milliseconds=True) == "2026-12-07T07:03:01.000Z"
    assert iso_time(DAY2 + 0.25, milliseconds=True) == "2026-12-07T07:03:00.250Z"
    assert iso_time(DAY2 + 0.9996) == "2026-12-07T07:03:00Z"
