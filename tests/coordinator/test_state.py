from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedprune.coordinator.fleet.registry_store import RegistryStore
from fedprune.coordinator.state import StateDir, StateError, dumps, loads


def document(round_number: int) -> dict:
    return {
        "params": {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3) * round_number},
        "masks": {"fc.weight": np.array([[True, False, True], [False, True, True]])},
        "quality": {"pi-1": 0.5, "pi-2": 1.0},
        "mask_version": round_number // 5,
    }


def test_checkpoint_round_trips_arrays_exactly(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    state.save_checkpoint(4, document(4))
    loaded = state.load_latest_checkpoint()
    assert loaded["round"] == 4
    np.testing.assert_array_equal(loaded["params"]["fc.weight"], document(4)["params"]["fc.weight"])
    assert loaded["masks"]["fc.weight"].dtype == np.bool_
    assert loaded["quality"] == {"pi-1": 0.5, "pi-2": 1.0}


def test_only_the_newest_checkpoints_are_kept_and_the_newest_wins(tmp_path: Path) -> None:
    state = StateDir(tmp_path, keep=2)
    state.ensure()
    for r in range(1, 6):
        state.save_checkpoint(r, document(r))
    assert sorted(p.name for p in state.checkpoints.iterdir()) == ["round-000004.ckpt", "round-000005.ckpt"]
    assert state.load_latest_checkpoint()["round"] == 5


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    state.save_checkpoint(1, document(1))
    newest = state.save_checkpoint(2, document(2))
    blob = bytearray(newest.read_bytes())
    blob[10] ^= 0xFF
    newest.write_bytes(bytes(blob))
    assert state.load_latest_checkpoint()["round"] == 1


def test_empty_state_has_no_checkpoint(tmp_path: Path) -> None:
    assert StateDir(tmp_path / "new").load_latest_checkpoint() is None


def test_truncated_blob_is_rejected() -> None:
    blob = dumps({"a": 1})
    with pytest.raises(ValueError):
        loads(blob[:-1])
    with pytest.raises(ValueError):
        loads(b"")


@pytest.mark.parametrize("name", ["registry.msgpack", "allowlist.msgpack"])
def test_unreadable_registry_is_a_state_error_naming_the_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"garbage" * 10)
    with pytest.raises(StateError, match=name):
        RegistryStore(tmp_path).load(90.0)


def test_history_file_is_rewritten_from_an_older_checkpoint_that_carries_it(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    history = [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.6}]
    state.append_history(history[0], 0)
    with state.history_path.open("a") as handle:
        handle.write('{"round": 2, "acc')  # killed mid-append
    state.sync_history(history)
    assert [json.loads(line) for line in state.history_path.read_text().splitlines()] == history
    before = state.history_path.stat().st_mtime_ns
    state.sync_history(history)
    assert state.history_path.stat().st_mtime_ns == before, "an agreeing file is left alone"


def test_history_appends_cut_what_was_never_committed(tmp_path: Path) -> None:
    """A retried commit (checkpoint written, append failed or torn) must not leave the round in
    the trail twice or after half a line."""
    state = StateDir(tmp_path)
    state.ensure()
    first = state.append_history({"round": 1}, 0)
    with state.history_path.open("a") as handle:
        handle.write('{"round": 2, "acc')  # killed mid-append
    second = state.append_history({"round": 2}, first)
    assert state.append_history({"round": 2}, first) == second, "a retry rewrites, not repeats"
    assert state.read_history() == [{"round": 1}, {"round": 2}]
    assert second == state.history_path.stat().st_size


def test_history_is_restored_to_the_checkpoint(tmp_path: Path, caplog) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    base = state.append_history({"round": 1}, 0)
    assert state.restore_history(base, {"round": 2}) == state.history_path.stat().st_size
    assert state.read_history() == [{"round": 1}, {"round": 2}], "the round the kill cut off is back"
    agreed = state.history_path.stat()
    assert state.restore_history(base, {"round": 2}) == agreed.st_size
    assert state.history_path.stat().st_mtime_ns == agreed.st_mtime_ns, "a file that agrees is not rewritten"
    state.append_history({"round": 3}, agreed.st_size)
    assert state.restore_history(base, {"round": 2}) == agreed.st_size
    assert state.read_history() == [{"round": 1}, {"round": 2}], "a round after the checkpoint (an older one resumed) is dropped"
    assert state.restore_history(0, None) == 0 and state.read_history() == []
    assert "event=history_short" not in caplog.text
    state.history_path.unlink()
    assert state.restore_history(0, None) == 0 and not state.history_path.exists()
    state.restore_history(base, {"round": 2})
    assert state.read_history() == [{"round": 2}]
    assert "event=history_short" in caplog.text


def test_a_history_shorter_than_the_checkpoint_keeps_its_whole_lines(tmp_path: Path) -> None:
    """A history.jsonl older than the checkpoint (restored from a backup taken file by file) ends
    anywhere; the checkpoint's round must follow its last whole line, not the torn one."""
    state = StateDir(tmp_path)
    state.ensure()
    one = state.append_history({"round": 1}, 0)
    two = state.append_history({"round": 2}, one)
    os.truncate(state.history_path, one + 5)
    state.restore_history(two, {"round": 3})
    assert state.read_history() == [{"round": 1}, {"round": 3}]


def test_a_line_being_written_is_not_read(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    state.append_history({"round": 1}, 0)
    with state.history_path.open("a") as handle:
        handle.write('{"round": 2, "acc')
    assert state.read_history() == [{"round": 1}]


def test_a_history_without_a_checkpoint_is_set_aside_not_cut(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    assert state.set_aside_history() is None
    state.append_history({"round": 7}, 0)
    aside = state.set_aside_history()
    assert aside is not None and aside.name == "history-orphaned-1.jsonl"
    assert json.loads(aside.read_text()) == {"round": 7} and not state.history_path.exists()
    state.append_history({"round": 8}, 0)
    assert state.set_aside_history().name == "history-orphaned-2.jsonl"
