"""Synthetic building meter tables for the example: ``python -m fedprune_tabular.make_data --out data --devices 8``.

Writes ``<out>/devices/site-NN/readings.csv`` (the hourly readings one site's gateway logged over
its first weeks) and ``<out>/test.csv`` (the following week at every site, held out). Columns:
``hour,weekday,temp_c,humidity_pct,occupancy_pct,floor_area_m2,energy_kwh``. Sites differ as
real ones do: climate (cold to hot, so heating or cooling dominates), size, kind (office, shop,
school: when people are in), and efficiency. Energy is a base load, lighting and equipment that
follow occupancy, and heating below 15 °C or cooling above 22 °C (worse when humid), with noise.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

FEATURES = ("hour", "weekday", "temp_c", "humidity_pct", "occupancy_pct", "floor_area_m2")
HEADER = ",".join(FEATURES + ("energy_kwh",))
KINDS = ("office", "shop", "school")


def _occupancy(kind: str, hour: np.ndarray, weekday: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per cent of the building's capacity present, by the kind's opening hours."""
    if kind == "office":
        open_ = (weekday < 5) & (hour >= 8) & (hour < 18)
        level = np.where(open_, rng.uniform(60, 95, hour.shape), rng.uniform(0, 8, hour.shape))
    elif kind == "shop":
        open_ = (hour >= 9) & (hour < 21)
        peak = np.where(weekday >= 5, 1.4, 1.0) * (1 + 0.4 * np.sin(math.pi * (hour - 9) / 12))
        level = np.where(open_, rng.uniform(25, 45, hour.shape) * peak, rng.uniform(0, 3, hour.shape))
    else:
        open_ = (weekday < 5) & (hour >= 8) & (hour < 15)
        level = np.where(open_, rng.uniform(80, 100, hour.shape), rng.uniform(0, 5, hour.shape))
    return np.clip(level, 0, 100)


def site(rng: np.random.Generator, days: int) -> np.ndarray:
    """``days`` of hourly rows (FEATURES + energy) of one site with its own climate and building."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    area = float(np.round(rng.uniform(2000, 18000), -1))
    climate, swing, efficiency = rng.uniform(2, 28), rng.uniform(3, 8), rng.uniform(0.7, 1.3)
    hours = np.arange(days * 24)
    hour, day = hours % 24, hours // 24
    weekday = (day + int(rng.integers(7))) % 7
    weather = np.repeat(rng.normal(0, 2.5, days).cumsum() * 0.5, 24)  # fronts passing over days
    temp = climate + weather + swing * np.sin(2 * math.pi * (hour - 9) / 24) + rng.normal(0, 0.5, len(hours))
    humidity = np.clip(70 - 1.2 * (temp - climate) + rng.normal(0, 8, len(hours)), 15, 100)
    occupancy = _occupancy(kind, hour, weekday, rng)
    base = 0.004 * area
    people = 0.009 * area * occupancy / 100
    heating = 0.0012 * area * np.maximum(0, 15 - temp)
    cooling = 0.0009 * area * np.maximum(0, temp - 22) ** 1.3 * (1 + 0.012 * (humidity - 50))
    # HVAC runs harder while people are in (ventilation, set points)
    hvac = (heating + cooling) * (0.6 + 0.4 * occupancy / 100)
    energy = efficiency * (base + people + hvac) * rng.lognormal(0, 0.06, len(hours)) + rng.normal(0, 2, len(hours))
    return np.column_stack([hour, weekday, np.round(temp, 1), np.round(humidity), np.round(occupancy, 1),
                            np.full(len(hours), area), np.round(np.maximum(energy, 0), 2)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write devices/ and test.csv into")
    parser.add_argument("--devices", type=int, default=8, help="sites")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=int, default=21, help="days of readings each site trains on")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    held_out = []
    fmt = ["%d", "%d", "%.1f", "%d", "%.1f", "%d", "%.2f"]
    for d in range(args.devices):
        rows = site(rng, args.days + 7)
        folder = args.out / "devices" / f"site-{d:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        np.savetxt(folder / "readings.csv", rows[: args.days * 24], fmt=fmt, delimiter=",", header=HEADER, comments="")
        held_out.append(rows[args.days * 24 :])
    np.savetxt(args.out / "test.csv", np.concatenate(held_out), fmt=fmt, delimiter=",", header=HEADER, comments="")
    print(f"wrote {args.devices} sites' readings and the following week of each (test.csv) under {args.out}")


if __name__ == "__main__":
    main()
