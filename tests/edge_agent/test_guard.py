"""Governance decisions (edge_agent.guard): windows across midnight, thermal hysteresis, power, memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedprune.edge_agent.core.guard import (
    BATTERY_LOW,
    DECLINE_REASONS,
    MEMORY_LOW,
    ON_BATTERY,
    OUTSIDE_TRAINING_WINDOW,
    TOO_HOT,
    GovernanceConfig,
    Governor,
    Readings,
    decide,
    in_window,
    parse_window,
)

NIGHT = GovernanceConfig(training_windows=("22:00-06:00",))


def test_defaults_train_when_nothing_is_measured() -> None:
    assert decide(GovernanceConfig(), Readings(minute_of_day=0)) is None


@pytest.mark.parametrize("hour,minute,allowed", [
    (22, 0, True), (23, 59, True), (0, 0, True), (5, 59, True), (6, 0, False), (12, 0, False), (21, 59, False),
])
def test_window_wrapping_midnight(hour: int, minute: int, allowed: bool) -> None:
    reason = decide(NIGHT, Readings.at(hour, minute))
    assert reason == (None if allowed else OUTSIDE_TRAINING_WINDOW)


def test_several_windows_and_the_whole_day() -> None:
    config = GovernanceConfig(training_windows=("01:00-02:00", "12:30-13:00"))
    assert decide(config, Readings.at(1, 30)) is None
    assert decide(config, Readings.at(12, 45)) is None
    assert decide(config, Readings.at(13, 0)) == OUTSIDE_TRAINING_WINDOW
    whole_day = GovernanceConfig(training_windows=("00:00-24:00",))
    assert all(decide(whole_day, Readings(minute_of_day=m)) is None for m in range(0, 1440, 7))


@given(st.integers(0, 1439), st.integers(0, 1439), st.integers(0, 1439))
def test_a_wrapping_window_is_the_complement_of_its_reverse(start: int, end: int, minute: int) -> None:
    if start == end:
        return
    assert in_window((start, end), minute) != in_window((end, start), minute)


@pytest.mark.parametrize("text", ["22-06", "25:00-01:00", "10:60-11:00", "10:00-10:00", "24:30-01:00", "", "1:00-2:00"])
def test_malformed_windows_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="training window"):
        GovernanceConfig(training_windows=(text,))


def test_window_ending_at_midnight() -> None:
    assert parse_window("18:00-24:00") == (18 * 60, 1440)
    assert parse_window("18:00-00:00") == (18 * 60, 0)


def test_thermal_hysteresis_holds_until_the_resume_temperature() -> None:
    governor = Governor(GovernanceConfig(thermal_limit_c=80, thermal_resume_c=70))
    temperatures = [60, 79.9, 80, 75, 70.5, 70, 69.9, 75, 79]
    reasons = [governor.decide(Readings(minute_of_day=0, temperature_c=t)) for t in temperatures]
    assert reasons == [None, None, TOO_HOT, TOO_HOT, TOO_HOT, TOO_HOT, None, None, None]


def test_thermal_latch_survives_a_decline_for_another_reason() -> None:
    governor = Governor(GovernanceConfig(thermal_limit_c=80, thermal_resume_c=70, training_windows=("00:00-01:00",)))
    assert governor.decide(Readings.at(0, 10, temperature_c=85)) == TOO_HOT
    assert governor.decide(Readings.at(5, 0, temperature_c=75)) == OUTSIDE_TRAINING_WINDOW
    assert governor.decide(Readings.at(0, 20, temperature_c=75)) == TOO_HOT


def test_stateless_decide_takes_the_latch_as_an_argument() -> None:
    config = GovernanceConfig(thermal_limit_c=80, thermal_resume_c=70)
    assert decide(config, Readings(minute_of_day=0, temperature_c=75)) is None
    assert decide(config, Readings(minute_of_day=0, temperature_c=75), was_hot=True) == TOO_HOT


def test_battery_rules_apply_only_on_battery() -> None:
    config = GovernanceConfig(min_battery_percent=30)
    assert decide(config, Readings(minute_of_day=0, battery_percent=10, on_ac=False)) == BATTERY_LOW
    assert decide(config, Readings(minute_of_day=0, battery_percent=10, on_ac=True)) is None
    assert decide(config, Readings(minute_of_day=0, battery_percent=50, on_ac=False)) is None
    strict = GovernanceConfig(require_ac_power=True)
    assert decide(strict, Readings(minute_of_day=0, battery_percent=100, on_ac=False)) == ON_BATTERY
    assert decide(strict, Readings(minute_of_day=0, on_ac=None)) is None  # a Pi reports no supply


def test_memory_below_the_training_ceiling_declines() -> None:
    config = GovernanceConfig(memory_ceiling_mb=512)
    assert decide(config, Readings(minute_of_day=0, available_memory_mb=511.9)) == MEMORY_LOW
    assert decide(config, Readings(minute_of_day=0, available_memory_mb=512)) is None


def test_checks_run_in_a_fixed_order() -> None:
    everything_wrong = Readings.at(12, 0, temperature_c=99, battery_percent=1, on_ac=False, available_memory_mb=1)
    config = GovernanceConfig(training_windows=("22:00-06:00",), require_ac_power=True)
    assert decide(config, everything_wrong) == OUTSIDE_TRAINING_WINDOW
    assert decide(GovernanceConfig(require_ac_power=True), everything_wrong) == TOO_HOT
    cool = Readings.at(12, 0, temperature_c=40, battery_percent=1, on_ac=False, available_memory_mb=1)
    assert decide(GovernanceConfig(require_ac_power=True), cool) == ON_BATTERY
    assert decide(GovernanceConfig(), cool) == BATTERY_LOW


@given(
    st.integers(0, 1439),
    st.none() | st.floats(-40, 150),
    st.none() | st.floats(0, 100),
    st.none() | st.booleans(),
    st.none() | st.floats(0, 1e6),
    st.booleans(),
)
def test_decide_returns_a_known_reason_or_none(minute, temperature, battery, on_ac, memory, was_hot) -> None:
    readings = Readings(minute, temperature, battery, on_ac, memory)
    assert decide(NIGHT, readings, was_hot) in (*DECLINE_REASONS, None)


@pytest.mark.parametrize("kwargs,match", [
    ({"thermal_limit_c": 70, "thermal_resume_c": 70}, "hysteresis"),
    ({"max_threads": 0}, "max_threads"),
    ({"max_threads": 2.5}, "max_threads"),
    ({"memory_ceiling_mb": -1}, "memory_ceiling_mb"),
    ({"min_battery_percent": 101}, "min_battery_percent"),
    ({"thermal_limit_c": float("nan")}, "thermal_limit_c"),
    ({"require_ac_power": "yes"}, "require_ac_power"),
    ({"training_windows": "22:00-06:00"}, "list"),
])
def test_invalid_config_names_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GovernanceConfig(**kwargs)


def test_readings_reject_an_impossible_minute() -> None:
    with pytest.raises(ValueError, match="minute_of_day"):
        Readings(minute_of_day=1440)


def test_training_threads_leave_a_core_by_default() -> None:
    assert GovernanceConfig().training_threads(4) == 3
    assert GovernanceConfig().training_threads(1) == 1
    assert GovernanceConfig(max_threads=8).training_threads(4) == 4
    assert GovernanceConfig(max_threads=2).training_threads(4) == 2
