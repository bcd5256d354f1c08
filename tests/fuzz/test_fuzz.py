"""Bounded CI fuzzing: 10^4 inputs per target through the seeded mutator, a tracemalloc peak
bound per target, every seed accepted, and every corpus input replayed. The long run is
scripts/fuzz.sh."""

from __future__ import annotations

import pytest

from fedprune.protocol.errors import ProtocolError
from tests.fuzz.engine import corpus_inputs, drive
from tests.fuzz.targets import all_targets

N = 10_000
DECODERS = ["codec", "sparse_values", "masks", "envelope", "chunk", "reassembler", "replay", "channel"]


@pytest.mark.parametrize("name", DECODERS)
def test_every_seed_is_accepted(name: str) -> None:
    """The unmutated seeds are valid inputs (every message kind decodes at this build's minor, a
    1.2 and a 1.0 task and a 1.3 status at theirs), so the mutations start from the paths that accept."""
    target = all_targets()[name]()
    try:
        for seed in target.seeds:
            target.run(seed)
    finally:
        target.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", DECODERS)
def test_target_survives_ten_thousand_mutated_inputs_in_bounded_memory(name: str) -> None:
    report = drive(name, N, seed=20261126)
    assert report.inputs == N
    assert not report.findings, report.findings[:3]
    assert report.peak_mib < all_targets()[name]().max_peak_mib, report.peak_mib


@pytest.mark.timeout(240)
def test_coordinator_message_handler_survives_ten_thousand_programs() -> None:
    report = drive("daemon", N, seed=20261126, memory=False)
    assert report.inputs == N
    assert not report.findings, report.findings[:3]


@pytest.mark.timeout(120)
def test_coordinator_message_handler_memory_stays_bounded() -> None:
    report = drive("daemon", 600, seed=7, memory=True)
    assert report.inputs == 600
    assert report.peak_mib < 96.0, report.peak_mib


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", DECODERS + ["daemon"])
def test_corpus_inputs_replay_without_findings(name: str) -> None:
    inputs = corpus_inputs(name)
    assert inputs, f"tests/fuzz/corpus/{name}/ is empty"
    target = all_targets()[name]()
    try:
        for data in inputs:
            try:
                target.run(data)
            except ProtocolError:
                pass
    finally:
        target.close()
