"""Device governance: may this device train right now? Pure: readings and the local time are passed in.

Theory of operation. The device owner sets limits once (``GovernanceConfig``); whenever a
RoundTask arrives the daemon samples the hardware (``fedprune.edge_agent.sysfs.read_readings``) and asks
``Governor.decide(readings)``. The answer is a stable reason label, which the agent core turns
into a ``Decline`` the coordinator can count (``AgentCore.on_task(..., decline_reason=...)``), or
None to train. Checks run in a fixed order, so one situation always yields the same label:
training window, temperature, mains power, battery level, free memory.

Temperature uses hysteresis: a device that reached ``thermal_limit_c`` stays "too_hot" until it
has cooled below ``thermal_resume_c``, so a board hovering at its limit does not alternate
between training (heating up) and declining (cooling down) every round. That one bit of memory
lives in ``Governor``; ``decide`` is the stateless form that takes it as an argument.

A missing reading (None) never blocks training: a Raspberry Pi has no battery and reports no
power supply, a VM may have no thermal zone. Only what is measured is enforced.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

OUTSIDE_TRAINING_WINDOW = "outside_training_window"
TOO_HOT = "too_hot"
ON_BATTERY = "on_battery"
BATTERY_LOW = "battery_low"
MEMORY_LOW = "memory_low"
DECLINE_REASONS = (OUTSIDE_TRAINING_WINDOW, TOO_HOT, ON_BATTERY, BATTERY_LOW, MEMORY_LOW)

MINUTES_PER_DAY = 24 * 60
_WINDOW = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")


def parse_window(text: str) -> tuple[int, int]:
    """'HH:MM-HH:MM' in local time -> (start, end) minutes of the day; end may be 24:00.

    A window whose end is before its start wraps midnight ('22:00-06:00'). Equal ends are
    rejected: they could mean "never" or "always"; write '00:00-24:00' for the whole day.
    """
    match = _WINDOW.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"training window {text!r}: expected 'HH:MM-HH:MM', e.g. '22:00-06:00'")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        raise ValueError(f"training window {text!r}: hours 00-23 (or an end of 24:00), minutes 00-59")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % MINUTES_PER_DAY and end != MINUTES_PER_DAY:
        raise ValueError(f"training window {text!r}: start equals end; write '00:00-24:00' for the whole day")
    return start, end


def in_window(window: tuple[int, int], minute_of_day: int) -> bool:
    start, end = window
    if start < end:
        return start <= minute_of_day < end
    return minute_of_day >= start or minute_of_day < end


@dataclass(frozen=True)
class GovernanceConfig:
    """The device owner's limits. Every field has a safe default for a Raspberry Pi 4.

    max_threads: torch intra-op threads for training; None = all cores but one, so the device's
        own work keeps a core (the systemd unit's CPUQuota is the hard cap).
    memory_ceiling_mb: the most memory (MiB) one training run may take; training starts only
        when at least this much is available (MemAvailable), so it never pushes the device into
        swap or the OOM killer (the unit's MemoryMax is the hard cap). The measured peak RSS of
        a training run on the benchmark models is about 390 MiB, most of it torch itself.
    training_windows: 'HH:MM-HH:MM' local-time ranges when training is allowed (may wrap
        midnight); empty = any time.
    thermal_limit_c / thermal_resume_c: decline at or above the limit, resume only below the
        resume temperature (hysteresis). The Pi 4 firmware throttles at 80 °C.
    min_battery_percent: decline when running on battery below this level.
    require_ac_power: decline whenever the device runs on battery.
    """

    max_threads: int | None = None
    memory_ceiling_mb: float = 512.0
    training_windows: tuple[str, ...] = ()
    thermal_limit_c: float = 75.0
    thermal_resume_c: float = 65.0
    min_battery_percent: float = 30.0
    require_ac_power: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.training_windows, str):
            raise ValueError("training_windows: expected a list of 'HH:MM-HH:MM' strings, not one string")
        object.__setattr__(self, "training_windows", tuple(self.training_windows))
        if self.max_threads is not None and (type(self.max_threads) is not int or self.max_threads < 1):
            raise ValueError(
                f"max_threads {self.max_threads!r}: expected a positive integer or None (all cores but one)"
            )
        if not _finite_number(self.memory_ceiling_mb) or self.memory_ceiling_mb < 0:
            raise ValueError(f"memory_ceiling_mb {self.memory_ceiling_mb!r}: expected a number of MiB >= 0")
        for name in ("thermal_limit_c", "thermal_resume_c"):
            value = getattr(self, name)
            if not _finite_number(value) or not -40 <= value <= 150:
                raise ValueError(f"{name} {value!r}: expected degrees Celsius between -40 and 150")
        if self.thermal_resume_c >= self.thermal_limit_c:
            raise ValueError(
                f"thermal_resume_c {self.thermal_resume_c} must be below thermal_limit_c {self.thermal_limit_c} "
                "(the gap is the hysteresis that stops a device flapping at its limit)"
            )
        if not _finite_number(self.min_battery_percent) or not 0 <= self.min_battery_percent <= 100:
            raise ValueError(f"min_battery_percent {self.min_battery_percent!r}: expected 0..100")
        if not isinstance(self.require_ac_power, bool):
            raise ValueError(f"require_ac_power {self.require_ac_power!r}: expected true or false")
        for window in self.training_windows:
            parse_window(window)

    @property
    def windows(self) -> tuple[tuple[int, int], ...]:
        return tuple(parse_window(w) for w in self.training_windows)

    def training_threads(self, cpu_count: int) -> int:
        """Threads for ``torch.set_num_threads``: the configured count, never more than the cores."""
        cores = max(1, cpu_count)
        return min(self.max_threads, cores) if self.max_threads is not None else max(1, cores - 1)


@dataclass(frozen=True)
class Readings:
    """One sample of the device's state. None = not measured on this device (never blocks)."""

    minute_of_day: int
    temperature_c: float | None = None
    battery_percent: float | None = None
    on_ac: bool | None = None
    available_memory_mb: float | None = None

    def __post_init__(self) -> None:
        if type(self.minute_of_day) is not int or not 0 <= self.minute_of_day < MINUTES_PER_DAY:
            raise ValueError(f"minute_of_day {self.minute_of_day!r}: expected 0..1439 (hour * 60 + minute)")

    @classmethod
    def at(cls, hour: int, minute: int, **readings: float | bool | None) -> Readings:
        return cls(minute_of_day=hour * 60 + minute, **readings)  # type: ignore[arg-type]


def is_hot(config: GovernanceConfig, temperature_c: float | None, was_hot: bool) -> bool:
    """The thermal latch: set at the limit, cleared only below the resume temperature."""
    if temperature_c is None:
        return False
    if was_hot:
        return temperature_c >= config.thermal_resume_c
    return temperature_c >= config.thermal_limit_c


def decide(config: GovernanceConfig, readings: Readings, was_hot: bool = False) -> str | None:
    """The decline reason for these readings (first failing check in a fixed order), or None to train."""
    windows = config.windows
    if windows and not any(in_window(w, readings.minute_of_day) for w in windows):
        return OUTSIDE_TRAINING_WINDOW
    if is_hot(config, readings.temperature_c, was_hot):
        return TOO_HOT
    on_battery = readings.on_ac is False
    if config.require_ac_power and on_battery:
        return ON_BATTERY
    if on_battery and readings.battery_percent is not None and readings.battery_percent < config.min_battery_percent:
        return BATTERY_LOW
    if readings.available_memory_mb is not None and readings.available_memory_mb < config.memory_ceiling_mb:
        return MEMORY_LOW
    return None


class Governor:
    """``decide`` with the thermal latch remembered between calls (one per daemon)."""

    def __init__(self, config: GovernanceConfig) -> None:
        self.config = config
        self.hot = False

    def decide(self, readings: Readings) -> str | None:
        reason = decide(self.config, readings, was_hot=self.hot)
        self.hot = is_hot(self.config, readings.temperature_c, self.hot)
        return reason


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
