"""fedprune.edge_agent.sysfs on fake sysfs/procfs trees shaped like a Raspberry Pi, a Jetson and a laptop."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedprune.edge_agent.core.guard import GovernanceConfig, Governor
from fedprune.edge_agent.sysfs import read_available_memory_mb, read_power, read_readings, read_temperature_c

MEMINFO = "MemTotal:        3884360 kB\nMemFree:          211140 kB\nMemAvailable:    1048576 kB\nBuffers: 1 kB\n"


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def zone(root: Path, index: int, kind: str, millidegrees: str) -> None:
    write(root, f"sys/class/thermal/thermal_zone{index}/type", kind + "\n")
    write(root, f"sys/class/thermal/thermal_zone{index}/temp", millidegrees + "\n")


@pytest.fixture
def raspberry_pi(tmp_path: Path) -> Path:
    zone(tmp_path, 0, "cpu-thermal", "51121")
    write(tmp_path, "proc/meminfo", MEMINFO)
    return tmp_path


@pytest.fixture
def jetson(tmp_path: Path) -> Path:
    for i, (kind, value) in enumerate([("AO-therm", "40500"), ("CPU-therm", "47500"), ("GPU-therm", "58000"),
                                       ("PLL-therm", "45000"), ("PMIC-Die", "100000"), ("thermal-fan-est", "46400")]):
        zone(tmp_path, i, kind, value)
    write(tmp_path, "sys/class/power_supply/usb/type", "USB\n")
    write(tmp_path, "sys/class/power_supply/usb/online", "1\n")
    return tmp_path


@pytest.fixture
def laptop(tmp_path: Path) -> Path:
    zone(tmp_path, 0, "acpitz", "45000")
    zone(tmp_path, 1, "x86_pkg_temp", "63000")
    write(tmp_path, "sys/class/power_supply/AC/type", "Mains\n")
    write(tmp_path, "sys/class/power_supply/AC/online", "0\n")
    write(tmp_path, "sys/class/power_supply/BAT0/type", "Battery\n")
    write(tmp_path, "sys/class/power_supply/BAT0/capacity", "23\n")
    write(tmp_path, "sys/class/power_supply/BAT0/status", "Discharging\n")
    write(tmp_path, "sys/class/power_supply/BAT0/scope", "System\n")
    write(tmp_path, "sys/class/power_supply/hid-mouse-battery/type", "Battery\n")
    write(tmp_path, "sys/class/power_supply/hid-mouse-battery/scope", "Device\n")
    write(tmp_path, "sys/class/power_supply/hid-mouse-battery/capacity", "5\n")
    write(tmp_path, "proc/meminfo", MEMINFO)
    return tmp_path


def test_raspberry_pi(raspberry_pi: Path) -> None:
    readings = read_readings(600, root=raspberry_pi)
    assert readings.temperature_c == pytest.approx(51.121)
    assert (readings.battery_percent, readings.on_ac) == (None, None)
    assert readings.available_memory_mb == 1024.0
    assert Governor(GovernanceConfig()).decide(readings) is None


def test_jetson_takes_the_hottest_cpu_gpu_zone_and_ignores_pmic_placeholders(jetson: Path) -> None:
    assert read_temperature_c(jetson) == pytest.approx(58.0)
    assert read_power(jetson) == (None, True)
    assert read_available_memory_mb(jetson) is None


def test_laptop_on_battery_ignores_peripheral_batteries(laptop: Path) -> None:
    assert read_temperature_c(laptop) == pytest.approx(63.0)
    assert read_power(laptop) == (23.0, False)
    assert Governor(GovernanceConfig(min_battery_percent=30)).decide(read_readings(0, root=laptop)) == "battery_low"


def test_battery_without_a_mains_supply_uses_its_status(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/power_supply/battery/type", "Battery\n")
    write(tmp_path, "sys/class/power_supply/battery/capacity", "80\n")
    write(tmp_path, "sys/class/power_supply/battery/status", "Charging\n")
    assert read_power(tmp_path) == (80.0, True)
    write(tmp_path, "sys/class/power_supply/battery/status", "Discharging\n")
    assert read_power(tmp_path) == (80.0, False)


def test_unmatched_zone_types_count_when_nothing_else_exists(tmp_path: Path) -> None:
    zone(tmp_path, 0, "acpitz", "41000")
    zone(tmp_path, 1, "iwlwifi_1", "39000")
    assert read_temperature_c(tmp_path) == pytest.approx(41.0)


def test_broken_files_are_not_measured(tmp_path: Path) -> None:
    zone(tmp_path, 0, "cpu-thermal", "garbage")
    zone(tmp_path, 1, "gpu-thermal", "-273000")
    (tmp_path / "sys/class/thermal/thermal_zone2").mkdir()  # a zone whose driver failed: no files
    write(tmp_path, "sys/class/power_supply/ac/type", "Mains\n")
    write(tmp_path, "proc/meminfo", "MemTotal: 1 kB\n")
    readings = read_readings(0, root=tmp_path)
    assert (readings.temperature_c, readings.battery_percent, readings.on_ac, readings.available_memory_mb) == (
        None, None, None, None
    )


def test_empty_root_measures_nothing(tmp_path: Path) -> None:
    readings = read_readings(0, root=tmp_path)
    assert readings.temperature_c is None and readings.on_ac is None and readings.available_memory_mb is None


def test_the_real_host_reads_without_error() -> None:
    readings = read_readings(0)
    assert readings.available_memory_mb is None or readings.available_memory_mb > 0
