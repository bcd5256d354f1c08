"""`fedprune-coordinator report`: the plots `simulate` writes, and a summary, from the state
directory a real (simulated) federation's coordinator daemon left, finished or mid-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedprune.coordinator.cli import main as coordinator_main
from fedprune.coordinator.lab import simulate
from fedprune.coordinator.plots import PLOT_FILES
from fedprune.coordinator.report import SUMMARY_FILE, cumulative_bytes, flag_devices

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Six rounds: the noisy client's quality (x 0.6 a round) is below report's 0.1 by the last one.
TINY = """
[simulation]
name = "tiny-report"
dataset = "digits"
model = "mlp"
n_clients = 4
partition = "iid"
noisy_fraction = 0.25
seed = 1
eval_every = 2

[strategy]
method = "fedprune"
rounds = 6
sparsity = 0.8
delta_t = 2
"""


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished simulated federation, kept: its coordinator.toml and state directory."""
    root = tmp_path_factory.mktemp("report")
    (root / "tiny.toml").write_text(TINY)
    assert simulate.main(root / "tiny.toml", root / "sim", progress=False, keep_federation=True) == 0
    return root / "sim"


def report(*argv: object) -> int:
    with pytest.raises(SystemExit) as done:
        coordinator_main(["report", *map(str, argv)])
    return int(done.value.code)


def history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_png(path: Path) -> None:
    blob = path.read_bytes()
    assert blob[:8] == PNG_MAGIC and len(blob) > 5000, path


def state_copy(federation: Path, tmp_path: Path, keep_lines: int | None = None, tail: bytes = b"") -> Path:
    """A state directory holding (the first ``keep_lines`` of) the federation's history, then ``tail``."""
    state = tmp_path / "state"
    state.mkdir()
    lines = (federation / "federation" / "state" / "history.jsonl").read_bytes().splitlines(keepends=True)
    (state / "history.jsonl").write_bytes(b"".join(lines[:keep_lines]) + tail)
    return state


def test_report_writes_what_simulate_writes_and_a_summary_of_history(federation: Path, capsys) -> None:
    config = federation / "federation" / "coordinator.toml"
    assert report("--config", config) == 0
    out = federation / "federation" / "state" / "report"  # the default --out
    written = capsys.readouterr().out.split()
    assert written == [str(out / name) for name in (*PLOT_FILES, SUMMARY_FILE)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in federation.glob("*.png"))
    for name in PLOT_FILES:
        assert_png(out / name)

    entries = history(federation / "federation" / "state" / "history.jsonl")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rounds"] == len(entries) == 6 and summary["last_round"] == 6
    assert summary["final_score"] == entries[-1]["accuracy"] and summary["final_score_round"] == 6
    assert summary["best_score"] == max(e["accuracy"] for e in entries if "accuracy" in e)
    assert summary["cum_uplink_bytes"] == entries[-1]["cum_bytes_in"] > 0
    assert summary["cum_downlink_bytes"] == entries[-1]["cum_bytes_out"] > 0
    assert summary["devices"] == {d: {"r": s["r"], "q": s["q"], "round": 6, "gated_rounds": 0}
                                  for d, s in entries[-1]["scores"].items()}
    assert summary["skipped_lines"] == 0
    # The coordinator does not know which client the simulation made noisy; its scores find it.
    results = json.loads((federation / "results.json").read_text())
    assert list(summary["flagged"]) == results["noisy_clients"] == ["client000"]
    assert summary["flagged"]["client000"][0].startswith("quality q=")
    # simulate's own totals: what the devices sent is what the coordinator received
    assert results["uplink_bytes"] == summary["cum_uplink_bytes"]


def test_a_torn_last_line_is_skipped_while_the_daemon_appends(federation: Path, tmp_path: Path, capsys) -> None:
    lines = (federation / "federation" / "state" / "history.jsonl").read_bytes().splitlines(keepends=True)
    state = state_copy(federation, tmp_path, keep_lines=3, tail=lines[3][: len(lines[3]) // 2])
    out = tmp_path / "out"
    assert report("--config", federation / "federation" / "coordinator.toml", "--set", f"state.dir={state}",
                  "--out", out) == 0
    assert "skipped 1 incomplete line" in capsys.readouterr().err
    summary = json.loads((out / SUMMARY_FILE).read_text())
    entries = history(federation / "federation" / "state" / "history.jsonl")[:3]
    assert (summary["rounds"], summary["last_round"], summary["skipped_lines"]) == (3, 3, 1)
    assert summary["final_score"] == entries[1]["accuracy"] and summary["final_score_round"] == 2
    assert summary["cum_uplink_bytes"] == entries[-1]["cum_bytes_in"]
    for name in PLOT_FILES:
        assert_png(out / name)
    assert not (state / "report").exists()  # --out, not the default


def test_a_federation_with_no_evaluated_round_yet_still_gets_every_plot(federation: Path, tmp_path: Path) -> None:
    state = state_copy(federation, tmp_path, keep_lines=1)  # eval_every = 2: round 1 has no accuracy
    config = federation / "federation" / "coordinator.toml"
    assert report("--config", config, "--set", f"state.dir={state}") == 0
    summary = json.loads((state / "report" / SUMMARY_FILE).read_text())
    assert summary["rounds"] == 1 and summary["final_score"] is None and summary["flagged"] == {}
    for name in PLOT_FILES:
        assert_png(state / "report" / name)


@pytest.mark.parametrize("layout", ["empty", "missing", "torn_only"])
def test_a_state_directory_without_history_exits_78_naming_the_path(federation: Path, tmp_path: Path, capsys,
                                                                    layout: str) -> None:
    state = tmp_path / "state"
    if layout != "missing":
        state.mkdir()
    if layout == "torn_only":
        (state / "history.jsonl").write_bytes(b'{"round": 1, "sel')
    assert report("--config", federation / "federation" / "coordinator.toml", "--set", f"state.dir={state}") == 78
    err = capsys.readouterr().err
    assert "Traceback" not in err and "StateError" in err
    assert (str(state) if layout == "missing" else str(state / "history.jsonl")) in err
    assert "fedprune-coordinator run" in err
    assert not (state / "report").exists()


def test_an_unwritable_out_exits_78_naming_it(federation: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert report("--config", federation / "federation" / "coordinator.toml", "--out", blocker / "report") == 78
    err = capsys.readouterr().err
    assert f"--out {blocker / 'report'}" in err and "Traceback" not in err


def test_flagged_devices_are_low_quality_or_gated(federation: Path) -> None:
    entries = history(federation / "federation" / "state" / "history.jsonl")
    assert list(flag_devices(entries)) == ["client000"]
    entries[1]["scores"]["client002"]["gated_by"] = "sybil"  # as the defences would record it
    entries[3]["scores"]["client002"]["gated_by"] = "sybil"
    flagged = flag_devices(entries)
    assert list(flagged) == ["client000", "client002"]
    assert flagged["client002"] == ["gated in 2 rounds (sybil x2)"]


def test_byte_counters_that_restart_with_the_daemon_keep_adding_up() -> None:
    entries = [{"round": r, "cum_bytes_in": b} for r, b in ((1, 10), (2, 25), (3, 4), (4, 9), (5, 3))]
    assert cumulative_bytes(entries, "cum_bytes_in") == [10, 25, 29, 34, 37]
    assert cumulative_bytes(entries, "cum_bytes_out") == [0] * 5
