import pytest
from hypothesis import given, strategies as st

from fedprune.protocol.errors import ProtocolError, Replayed, Stale
from fedprune.protocol.replay import ReplayGuard

NOW = 1_800_000_000.0


def test_duplicate_is_replayed_and_a_new_seq_is_fine():
    g = ReplayGuard()
    g.check("a", 0, 1, NOW, NOW)
    with pytest.raises(Replayed):
        g.check("a", 0, 1, NOW, NOW)
    g.check("a", 0, 2, NOW, NOW)
    g.check("b", 0, 1, NOW, NOW)


def test_round_5_update_replayed_in_round_6_and_later_is_rejected():
    g = ReplayGuard(round_window=1)
    g.advance(5)
    g.check("a", 5, 10, NOW, NOW)
    g.advance(6)
    with pytest.raises(Replayed):
        g.check("a", 5, 10, NOW, NOW)
    g.advance(7)
    with pytest.raises(Stale, match="older than the acceptance floor 6"):
        g.check("a", 5, 10, NOW, NOW)
    assert len(g) == 0  # round 5 forgotten once below the floor


@pytest.mark.parametrize("sent_at", [NOW - 601, NOW + 121, float("nan"), float("inf")])
def test_timestamps_outside_the_window_are_stale(sent_at):
    with pytest.raises(Stale):
        ReplayGuard().check("a", 0, 1, sent_at, NOW)


def test_memory_is_capped_by_refusing_not_forgetting():
    g = ReplayGuard(max_entries=3)
    for seq in range(3):
        g.check("a", 0, seq, NOW, NOW)
    with pytest.raises(Stale, match="refusing rather than forgetting"):
        g.check("a", 0, 99, NOW, NOW)
    with pytest.raises(Replayed):
        g.check("a", 0, 1, NOW, NOW)


def test_latest_streams_keep_a_high_water_mark_and_may_skip_the_clock():
    g = ReplayGuard(max_streams=2)
    g.check_latest("a", "status", 5, NOW, NOW)
    with pytest.raises(Replayed):
        g.check_latest("a", "status", 5, NOW, NOW)
    with pytest.raises(Replayed):
        g.check_latest("a", "status", 4, NOW, NOW)
    g.check_latest("a", "will", 1, NOW - 86400, NOW, check_time=False)
    with pytest.raises(Stale):
        g.check_latest("a", "status", 9, NOW - 86400, NOW)


def test_current_round_never_moves_back():
    g = ReplayGuard()
    g.advance(9)
    g.advance(3)
    assert g.current_round == 9 and g.floor == 8


events = st.lists(
    st.tuples(st.sampled_from(["check", "latest", "advance"]), st.sampled_from(["a", "b"]),
              st.integers(0, 12), st.integers(0, 5), st.floats(-1000, 1000)),
    max_size=60,
)


@given(events)
def test_any_event_sequence_gives_a_typed_outcome_and_bounded_memory(evs):
    g = ReplayGuard(round_window=2, max_entries=20, max_streams=3)
    accepted = set()
    for op, sender, rnd, seq, dt in evs:
        try:
            if op == "advance":
                g.advance(rnd)
            elif op == "check":
                g.check(sender, rnd, seq, NOW + dt, NOW)
                assert (sender, rnd, seq) not in accepted
                accepted.add((sender, rnd, seq))
            else:
                g.check_latest(sender, "s", seq, NOW + dt, NOW)
        except ProtocolError:
            pass
        assert len(g) <= 23 and g.floor == max(0, g.current_round - 2)
