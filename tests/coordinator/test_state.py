from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.state import StateDir, StateError, dumps, loads


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


def test_unreadable_registry_is_a_state_error_naming_the_file(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    state.registry_path.write_bytes(b"garbage" * 10)
    with pytest.raises(StateError, match="registry.msgpack"):
        state.load_registry()


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
    state.append_history({"round": 3}, state.history_path.stat().st_size)
    assert state.restore_history(base, {"round": 2}) and state.read_history() == [{"round": 1}, {"round": 2}], \
        "a round after the checkpoint (an older checkpoint resumed) is dropped"
    assert state.restore_history(0, None) == 0 and state.read_history() == []
    state.history_path.unlink()
    state.restore_history(base, {"round": 2})
    assert state.read_history() == [{"round": 2}]
    assert "event=history_short" in caplog.text


def test_a_line_being_written_is_not_read(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    state.append_history({"round": 1}, 0)
    with state.history_path.open("a") as handle:
        handle.write('{"round": 2, "acc')
    assert state.read_history() == [{"round": 1}]
