from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedprune.coordinator.core.rounds import (
    REJECT_REASONS, Accepted, CloseRound, Rejected, RetryRound, RoundMachine, RoundPolicy,
)


def machine(**policy) -> RoundMachine[str]:
    return RoundMachine(RoundPolicy(**{"quorum": 2, "deadline_s": 10.0, **policy}))


def test_round_closes_as_soon_as_every_selected_device_reported() -> None:
    m = machine()
    m.open(1, ("a", "b", "c"), now=0.0)
    for device in "abc":
        assert m.on_update(device, 1, f"u-{device}", now=1.0) == Accepted(device)
    closed = m.tick(now=1.0)
    assert isinstance(closed, CloseRound)
    assert closed.round == 1 and closed.reached_quorum
    assert closed.updates == {"a": "u-a", "b": "u-b", "c": "u-c"}
    assert m.open_round is None


def test_waits_for_the_deadline_while_devices_are_missing_then_closes_with_quorum() -> None:
    m = machine()
    m.open(3, ("a", "b", "c"), now=0.0)
    m.on_update("a", 3, "x", now=1.0)
    m.on_update("b", 3, "y", now=2.0)
    assert m.tick(now=9.9) is None
    closed = m.tick(now=10.1)
    assert isinstance(closed, CloseRound) and set(closed.updates) == {"a", "b"}


def test_rejections_carry_stable_reasons() -> None:
    m = machine()
    assert m.on_update("a", 1, "x", now=0.0) == Rejected("a", "no_open_round")
    m.open(5, ("a", "b"), now=0.0)
    assert m.on_update("a", 4, "x", now=1.0) == Rejected("a", "wrong_round")
    assert m.on_update("z", 5, "x", now=1.0) == Rejected("z", "not_selected")
    assert m.on_update("a", 5, "x", now=1.0) == Accepted("a")
    assert m.on_update("a", 5, "x2", now=1.0) == Rejected("a", "duplicate")
    assert m.on_update("b", 5, "y", now=10.5) == Rejected("b", "late")


def test_missed_quorum_is_retried_then_closed_and_keeps_accepted_updates() -> None:
    m = machine(quorum=3, on_missed_quorum="retry", max_retries=1)
    m.open(2, ("a", "b", "c"), now=0.0)
    m.on_update("a", 2, "x", now=1.0)
    retry = m.tick(now=11.0)
    assert retry == RetryRound(2, 1, 21.0, ("b", "c"))
    m.on_update("b", 2, "y", now=12.0)
    closed = m.tick(now=21.5)
    assert isinstance(closed, CloseRound)
    assert not closed.reached_quorum and set(closed.updates) == {"a", "b"}


def test_missed_quorum_with_close_policy_closes_at_the_deadline_even_with_nothing() -> None:
    m = machine(quorum=2, on_missed_quorum="close")
    m.open(7, ("a", "b"), now=0.0)
    closed = m.tick(now=10.5)
    assert closed == CloseRound(7, {}, False)


def test_quorum_larger_than_the_selection_is_capped_by_the_selection() -> None:
    m = machine(quorum=5)
    m.open(1, ("a",), now=0.0)
    m.on_update("a", 1, "x", now=0.5)
    assert isinstance(m.tick(now=0.5), CloseRound)


def test_a_postponed_deadline_accepts_and_waits_for_the_time_it_was_moved() -> None:
    m = machine()
    m.open(1, ("a", "b", "c"), now=0.0)
    m.on_update("a", 1, "x", now=1.0)
    assert m.postpone(30.0) == 40.0 == m.deadline
    assert m.tick(now=20.0) is None
    assert m.on_update("b", 1, "y", now=39.0) == Accepted("b")
    closed = m.tick(now=40.5)
    assert isinstance(closed, CloseRound) and set(closed.updates) == {"a", "b"}
    with pytest.raises(RuntimeError):
        m.postpone(1.0)
    m.open(2, ("a",), now=50.0)
    with pytest.raises(ValueError):
        m.postpone(-1.0)


def test_opening_twice_is_a_bug() -> None:
    m = machine()
    m.open(1, ("a",), now=0.0)
    with pytest.raises(RuntimeError):
        m.open(2, ("a",), now=0.0)


@pytest.mark.parametrize("bad", [dict(quorum=0), dict(deadline_s=0), dict(on_missed_quorum="wait"), dict(max_retries=-1)])
def test_policy_validates(bad) -> None:
    with pytest.raises(ValueError):
        RoundPolicy(**bad)


events = st.lists(
    st.tuples(st.sampled_from("abcdz"), st.integers(0, 3), st.floats(0, 40)), max_size=30
)


@given(events, st.integers(1, 4), st.sampled_from(["close", "retry"]))
def test_any_event_sequence_ends_in_exactly_one_close_with_only_selected_accepted_updates(evts, quorum, policy) -> None:
    m = machine(quorum=quorum, on_missed_quorum=policy, max_retries=2)
    m.open(1, ("a", "b", "c", "d"), now=0.0)
    closes = []
    now = 0.0
    for device, rnd, dt in evts:
        now += dt
        result = m.on_update(device, rnd, (device, rnd), now)
        assert isinstance(result, Accepted) or result.reason in REJECT_REASONS
        action = m.tick(now)
        if isinstance(action, CloseRound):
            closes.append(action)
            break
    while not closes:
        now += 100.0
        action = m.tick(now)
        if isinstance(action, CloseRound):
            closes.append(action)
    (closed,) = closes
    assert set(closed.updates) <= {"a", "b", "c", "d"}
    assert all(update == (device, 1) for device, update in closed.updates.items())


def test_a_withdrawn_device_is_not_waited_for_and_does_not_count_towards_quorum() -> None:
    m = machine(quorum=3, on_missed_quorum="retry")
    m.open(1, ("a", "b", "c"), now=0.0)
    assert m.withdraw("c", 1) and not m.withdraw("c", 1) and not m.withdraw("c", 2) and not m.withdraw("z", 1)
    assert m.missing == ("a", "b")
    m.on_update("a", 1, "x", now=1.0)
    assert not m.withdraw("a", 1)  # already reported
    assert m.tick(now=1.0) is None
    m.on_update("b", 1, "y", now=2.0)
    closed = m.tick(now=2.0)  # everyone still expected reported: no wait for the deadline
    assert isinstance(closed, CloseRound) and closed.reached_quorum and set(closed.updates) == {"a", "b"}


def test_a_round_everyone_withdrew_from_closes_at_once_without_quorum_or_retry() -> None:
    m = machine(on_missed_quorum="retry")
    m.open(1, ("a", "b"), now=0.0)
    m.withdraw("a", 1)
    m.withdraw("b", 1)
    closed = m.tick(now=0.5)
    assert isinstance(closed, CloseRound) and closed.updates == {} and not closed.reached_quorum


def test_a_retry_names_only_the_devices_still_expected() -> None:
    m = machine(quorum=2, on_missed_quorum="retry")
    m.open(1, ("a", "b", "c"), now=0.0)
    m.on_update("a", 1, "x", now=1.0)
    m.withdraw("b", 1)
    retry = m.tick(now=10.5)
    assert isinstance(retry, RetryRound) and retry.missing == ("c",)
