"""The agent's [governance] and [privacy] sections, the privacy ledger on disk, `fedprune-agent status`,
and a federation in which a hot device and a device out of privacy budget decline with reasons the
coordinator counts."""

from __future__ import annotations

import json
import math
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from fedprune.edge_agent.audit import AuditLog
from fedprune.edge_agent.cli import main as agent_main
from fedprune.edge_agent.config import load_config
from fedprune.common.configkit import ConfigError
from fedprune.edge_agent.core.guard import GovernanceConfig
from fedprune.edge_agent.ledger import LedgerError, PrivacyLedger, ledger_path
from fedprune.edge_agent.core.privacy import compute_epsilon, privatize, update_norm
from fedprune.edge_agent.status import device_status

FED = "fed1"


def write_toml(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    path.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
                            for name, table in sections.items()))
    return path


def fake_sysfs(root: Path, temperature_c: float, available_mb: int = 4096) -> Path:
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text(f"{int(temperature_c * 1000)}\n")
    (root / "proc").mkdir()
    (root / "proc/meminfo").write_text(f"MemTotal: 8000000 kB\nMemAvailable: {available_mb * 1024} kB\n")
    return root


def make_ledger(path: Path, epsilon_budget: float = 100.0, sigma: float = 1.0) -> PrivacyLedger:
    return PrivacyLedger(path, FED, epsilon_budget=epsilon_budget, delta=1e-5, clip_norm=0.5, noise_multiplier=sigma)


# ---- configuration ------------------------------------------------------------------------------


def test_governance_section_maps_onto_the_guard(tmp_path: Path) -> None:
    config = load_config(write_toml(tmp_path / "agent.toml", {"governance": {
        "max_threads": 2, "memory_ceiling_mb": 300, "training_windows": ["22:00-06:00"], "thermal_limit_c": 70,
        "thermal_resume_c": 60, "min_battery_percent": 50, "require_ac_power": True, "sysfs_root": str(tmp_path),
    }}), env={})
    assert config.governance.limits() == GovernanceConfig(
        max_threads=2, memory_ceiling_mb=300.0, training_windows=("22:00-06:00",), thermal_limit_c=70.0,
        thermal_resume_c=60.0, min_battery_percent=50.0, require_ac_power=True)
    assert config.governance.sysfs_root == tmp_path
    assert config.training_threads(cpu_count=8) == 2


@pytest.mark.parametrize("key,value,complaint", [
    ("thermal_resume_c", "80", "must be below thermal_limit_c"),
    ("training_windows", '["25:00-01:00"]', "hours 00-23"),
    ("min_battery_percent", "120", r"\[0, 100\]"),
])
def test_inconsistent_governance_is_a_config_error_naming_the_key(key: str, value: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        load_config(None, overrides={f"governance.{key}": value}, env={})


def test_training_threads_default_to_all_cores_but_one() -> None:
    assert load_config(None, env={}).training_threads(cpu_count=4) == 3
    assert load_config(None, overrides={"governance.max_threads": "1"}, env={}).training_threads(cpu_count=4) == 1


@pytest.mark.parametrize("key,value", [("delta", "0.0"), ("delta", "1.0"), ("clip_norm", "0"), ("noise_multiplier", "-1")])
def test_privacy_settings_out_of_range_are_config_errors(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"privacy.{key}"):
        load_config(None, overrides={f"privacy.{key}": value}, env={})


# ---- the privacy ledger -------------------------------------------------------------------------


def test_the_mechanism_clips_and_noises_only_held_positions_and_the_charge_is_on_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    raw = {"w": rng.normal(0, 1, (20, 10)).astype(np.float32), "b": rng.normal(0, 1, 10).astype(np.float32)}
    masks = {"w": rng.random((20, 10)) < 0.3}
    ledger = make_ledger(tmp_path / "privacy-fed1.json", sigma=0.1)
    released, norm = privatize(raw, masks, ledger.clip_norm, ledger.noise_multiplier, rng)
    ledger.charge()

    assert norm == pytest.approx(update_norm(raw, masks)) and norm > 10 * ledger.clip_norm
    assert not np.allclose(released["w"][masks["w"]], raw["w"][masks["w"]])
    assert np.all(released["w"][~masks["w"]] == 0)
    held = int(masks["w"].sum()) + raw["b"].size
    # clipped norm <= C, plus noise of norm about sigma*C*sqrt(held); 2x that is far in the tail
    bound = ledger.clip_norm * (1 + 2 * ledger.noise_multiplier * math.sqrt(held))
    assert update_norm(released, masks) <= bound
    assert released["w"].dtype == np.float32

    stored = json.loads((tmp_path / "privacy-fed1.json").read_text())
    assert stored["rounds"] == 1 and stored["federation"] == FED
    assert stat.S_IMODE((tmp_path / "privacy-fed1.json").stat().st_mode) == 0o600
    assert make_ledger(tmp_path / "privacy-fed1.json").budget.rounds == 1


def test_budget_is_exhausted_after_exactly_the_rounds_it_allows_and_survives_restarts(tmp_path: Path) -> None:
    sigma, allowed = 2.0, 3
    budget = (compute_epsilon(sigma, allowed, 1e-5) + compute_epsilon(sigma, allowed + 1, 1e-5)) / 2
    path = tmp_path / "privacy-fed1.json"
    released = 0
    while not make_ledger(path, budget, sigma).exhausted:
        make_ledger(path, budget, sigma).charge()
        released += 1
    assert released == allowed
    with pytest.raises(RuntimeError, match="exhausted"):
        make_ledger(path, budget, sigma).charge()
    assert not make_ledger(path, budget * 2, sigma).exhausted  # the owner raised the budget


def test_a_charge_that_cannot_be_written_spends_nothing(tmp_path: Path) -> None:
    """The daemon then declines the round and retries it later: nothing left, nothing may count."""
    ledger = make_ledger(tmp_path / "ledgers" / "privacy-fed1.json")
    ledger.charge()
    (tmp_path / "ledgers" / "privacy-fed1.json").unlink()
    (tmp_path / "ledgers").rmdir()
    (tmp_path / "ledgers").write_text("")  # the ledger's directory is now a file: every write fails
    with pytest.raises(OSError):
        ledger.charge()
    assert ledger.budget.rounds == 1


def test_a_damaged_or_foreign_ledger_is_an_error_never_a_reset(tmp_path: Path) -> None:
    path = tmp_path / "privacy-fed1.json"
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="never reset"):
        make_ledger(path)
    make_ledger(tmp_path / "other.json").charge()
    with pytest.raises(LedgerError, match="'fed1', not 'fed2'"):
        PrivacyLedger(tmp_path / "other.json", "fed2", epsilon_budget=1.0, delta=1e-5, clip_norm=1.0,
                      noise_multiplier=1.0)


# ---- fedprune-agent status ----------------------------------------------------------------------


def test_status_shows_release_budget_and_recent_rounds(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    state.mkdir()
    make_ledger(ledger_path(state, FED)).charge()
    audit = AuditLog(state / "audit.jsonl")
    for round_number, kind, size in [(1, "status", 40), (1, "update", 900), (2, "status", 40), (2, "update", 800)]:
        audit.record(now=float(round_number), federation=FED, round=round_number, message_type=kind,
                     topic=f"fedprune/v1/{FED}/{kind}/d", payload=b"x" * size)
    report = device_status(state, last_rounds=1)
    assert report["model_release"] is None
    assert [(p["federation"], p["rounds"]) for p in report["privacy"]] == [(FED, 1)]
    assert report["privacy"][0]["epsilon_spent"] > 0
    assert report["recent_rounds"] == [{"federation": FED, "round": 2, "messages": {"status": 1, "update": 1},
                                        "bytes": 840, "last_sent": "1970-01-01T00:00:02.000Z"}]

    config = write_toml(tmp_path / "agent.toml", {"agent": {"state_dir": str(state)}})
    with pytest.raises(SystemExit) as done:
        agent_main(["status", "--config", str(config)])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "model release:   none yet" in printed
    assert re.search(r"privacy budget \[fed1\]: epsilon \d+\.\d{3} left of 100; \d+\.\d{3} spent over 1 round ",
                     printed), printed


# ---- a federation ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_hot_and_out_of_budget_devices_decline_and_the_coordinator_counts_why(tmp_path: Path) -> None:
    from fedprune.coordinator.fleet.broker import free_port
    from fedprune.coordinator.lab.localfed import BrokerAccess, LocalFederation

    sigma = 1.0
    one_round = (compute_epsilon(sigma, 1, 1e-5) + compute_epsilon(sigma, 2, 1e-5)) / 2
    sections = {
        "pi-hot": {"governance": {"sysfs_root": str(fake_sysfs(tmp_path / "hot", 90.0))}},
        "pi-dp": {"governance": {"sysfs_root": str(fake_sysfs(tmp_path / "dp", 40.0))},
                  "privacy": {"enabled": True, "noise_multiplier": sigma, "epsilon_budget": one_round,
                              "report_class_losses": False}},
        "pi-ok": {"governance": {"sysfs_root": str(fake_sysfs(tmp_path / "ok", 40.0))}},
    }
    fed = LocalFederation(
        root=tmp_path, broker=BrokerAccess(url=f"mqtt://127.0.0.1:{free_port()}", embedded=True),
        devices=("pi-hot", "pi-dp", "pi-ok"), rounds=4, federation=FED,
        settings={"rounds": {"quorum": 1, "deadline_s": 3.0, "on_missed_quorum": "close"}},
        device_sections=sections,
    )
    fed.prepare()
    fed.start()
    try:
        history = fed.wait_for_round(3, timeout=90)  # round 4 keeps the coordinator (and /metrics) up
        metrics = fed.metrics_text()
    finally:
        fed.stop_all()

    assert [h["received"] for h in history[:3]] == [2, 1, 1]
    # a device re-evaluates a re-announced task (it may have cooled down) and declines again; the
    # coordinator counts one decline per device, round and reason; the log names the round of each
    assert declined(metrics, "too_hot") >= 3 and declined(metrics, "privacy_budget_exhausted") >= 2
    coordinator_log = fed.log("coordinator")
    assert {1, 2, 3} <= rounds_declined(coordinator_log, "pi-hot", "too_hot")
    assert {2, 3} <= rounds_declined(coordinator_log, "pi-dp", "privacy_budget_exhausted")
    assert 1 not in rounds_declined(coordinator_log, "pi-dp", "privacy_budget_exhausted")
    assert "event=privatized round=1" in fed.log("pi-dp")
    ledger = json.loads(ledger_path(tmp_path / "devices" / "pi-dp" / "state", FED).read_text())
    assert ledger["rounds"] == 1
    assert "event=governance_decline reason=too_hot temperature_c=90 " in fed.log("pi-hot")
    declines = device_status(tmp_path / "devices" / "pi-hot" / "state")["declines"]  # what its owner sees
    assert {d["reason"] for d in declines} == {"too_hot"} and {1, 2, 3} <= {d["round"] for d in declines}


def declined(metrics: str, reason: str) -> int:
    match = re.search(r'fedprune_rounds_declined_total\{reason="%s"\} ([0-9.]+)' % reason, metrics)
    assert match, metrics
    return int(float(match.group(1)))


def rounds_declined(log: str, device: str, reason: str) -> set[int]:
    return {int(r) for r in re.findall(rf"event=declined device={device} round=(\d+) reason={reason}", log)}
