"""Read the device's temperature, power and free memory from Linux's sysfs and procfs.

The shell beside ``fedprune.edge_agent.core.guard``: it only reads files and returns numbers; every decision is
in the guard. ``root`` lets tests point it at a fake tree. Any file that is missing, unreadable
or malformed counts as "not measured" (None), because sensors differ per board and some drivers
fail reads (Jetson zones can return EINVAL); the guard never blocks on a missing reading.

- Temperature: the maximum over ``/sys/class/thermal/thermal_zone*/temp`` (millidegrees Celsius)
  of the zones whose ``type`` names the CPU, GPU or SoC (Raspberry Pi: one "cpu-thermal"; Jetson:
  "CPU-therm", "GPU-therm", "SOC0-therm", "tj-therm" among others; x86: "x86_pkg_temp"). Other
  zones are ignored when any such zone exists, because some report placeholders: "PMIC-Die" on a
  Jetson Nano reads a constant 100 °C. Without a matching zone, every zone counts.
- Power: ``/sys/class/power_supply/*/type``. A system battery (type Battery, ``scope`` not
  "Device", which marks a mouse or headset battery) gives ``capacity`` (%) and ``status``;
  Mains/USB supplies give ``online``. On AC when any Mains/USB supply is online, else when no
  such supply exists, when the battery is not "Discharging". No supply at all (a Pi): None.
- Memory: ``MemAvailable`` in ``/proc/meminfo`` (kB), the kernel's estimate of what can be
  allocated without swapping.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedprune.edge_agent.core.guard import Readings

_PREFERRED_ZONE = re.compile(r"cpu|gpu|soc|x86_pkg|tj", re.IGNORECASE)
_MAX_READ = 4096


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            return handle.read(_MAX_READ).decode("ascii", "replace").strip()
    except OSError:
        return None


def _number(path: Path) -> float | None:
    text = _read(path)
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value == value and abs(value) != float("inf") else None


def read_temperature_c(root: Path = Path("/")) -> float | None:
    """The hottest CPU/GPU/SoC thermal zone in °C, or None without a readable zone."""
    preferred: list[float] = []
    others: list[float] = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        millidegrees = _number(zone / "temp")
        if millidegrees is None or not -40_000 <= millidegrees <= 200_000:
            continue
        zone_type = _read(zone / "type") or ""
        (preferred if _PREFERRED_ZONE.search(zone_type) else others).append(millidegrees / 1000.0)
    zones = preferred or others
    return max(zones) if zones else None


def read_power(root: Path = Path("/")) -> tuple[float | None, bool | None]:
    """(battery percent, on AC power); each None when the device does not report it."""
    capacities: list[float] = []
    statuses: list[str] = []
    external: list[bool] = []
    for supply in sorted((root / "sys/class/power_supply").glob("*")):
        kind = _read(supply / "type")
        if kind == "Battery" and _read(supply / "scope") != "Device":
            capacity = _number(supply / "capacity")
            if capacity is not None and 0 <= capacity <= 100:
                capacities.append(capacity)
            statuses.append(_read(supply / "status") or "Unknown")
        elif kind in ("Mains", "USB", "USB_C", "USB_PD"):
            online = _number(supply / "online")
            if online is not None:
                external.append(online > 0)
    if external:
        on_ac: bool | None = any(external)
    elif statuses:
        on_ac = "Discharging" not in statuses
    else:
        on_ac = None
    return (min(capacities) if capacities else None), on_ac


def read_available_memory_mb(root: Path = Path("/")) -> float | None:
    """MemAvailable in MiB, or None when /proc/meminfo lacks it."""
    text = _read(root / "proc/meminfo")
    match = re.search(r"^MemAvailable:\s+([0-9]+)\s+kB", text or "", re.MULTILINE)
    return int(match.group(1)) / 1024.0 if match else None


def read_readings(minute_of_day: int, root: Path = Path("/")) -> Readings:
    """Everything the guard needs, sampled now; the caller supplies the local minute of the day."""
    battery_percent, on_ac = read_power(root)
    return Readings(
        minute_of_day=minute_of_day,
        temperature_c=read_temperature_c(root),
        battery_percent=battery_percent,
        on_ac=on_ac,
        available_memory_mb=read_available_memory_mb(root),
    )
