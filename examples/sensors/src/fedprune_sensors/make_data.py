"""Synthetic wearable recordings for the example: ``python -m fedprune_sensors.make_data --out data --devices 8``.

Writes ``<out>/devices/device-NN/session-K.csv`` (a few recordings per device, as a wearable's
logger leaves them) and ``<out>/test/wearer-W-session-K.csv`` (two other wearers, held out). Each
file has a header ``timestamp,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z,activity``: Unix seconds
at 25 Hz with clock jitter, acceleration in g, angular rate in rad/s, and the activity code
(ACTIVITIES, in order) that the wearer was doing. A session is a run of activity segments; the
motion of each activity has its own rhythm (step or pedalling frequency), amplitude and
harmonics, drawn afresh per segment. Every recording has its own mounting (a rotation of the
sensor on the body), and every device its own calibration error (a per-channel gain and offset)
and noise, and a wearer who favours some activities (label skew). Some sessions have a gap where
the logger dropped samples: ``[data] max_gap`` keeps windows from spanning it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

ACTIVITIES = ("still", "walking", "running", "cycling", "stairs")
RATE_HZ = 25
HEADER = "timestamp,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z,activity"


def _rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    """A random rotation of up to ``degrees`` about a random axis (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(0, degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _motion(activity: str, t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Body-frame acceleration (g, gravity included) and angular rate (rad/s), each (3, len(t));
    axes x forward, y left, z up."""
    amp, phase = rng.uniform(0.6, 1.4), rng.uniform(0, 2 * math.pi, 4)
    acc, gyro = np.zeros((3, len(t))), np.zeros((3, len(t)))
    acc[2] = 1.0
    if activity == "still":  # standing or sitting: postural sway only
        acc[0] += 0.02 * np.sin(2 * math.pi * 0.3 * t + phase[0])
        gyro[1] += 0.02 * np.sin(2 * math.pi * 0.3 * t + phase[1])
        return acc, gyro
    w = 2 * math.pi * t
    if activity == "walking":
        f = rng.uniform(1.5, 2.1)
        acc[2] += amp * (0.35 * np.sin(w * f) + 0.12 * np.sin(2 * w * f + phase[0]))
        acc[0] += amp * 0.15 * np.sin(w * f + phase[1])
        acc[1] += amp * 0.10 * np.sin(w * f / 2 + phase[2])
        gyro[1] += amp * 0.6 * np.sin(w * f + phase[3])
        gyro[2] += amp * 0.3 * np.sin(w * f / 2)
    elif activity == "running":  # sharp heel strikes: a peaked, rectified waveform
        f = rng.uniform(2.3, 3.0)
        strike = np.abs(np.sin(w * f / 2)) ** 4
        acc[2] += amp * 1.6 * (strike - strike.mean())
        acc[0] += amp * 0.4 * np.sin(w * f + phase[1])
        acc[1] += amp * 0.25 * np.sin(w * f / 2 + phase[2])
        gyro[1] += amp * 1.5 * np.sin(w * f + phase[3])
        gyro[2] += amp * 0.6 * np.sin(w * f / 2)
    elif activity == "cycling":  # leaning forward, smooth pedalling, road vibration
        f = rng.uniform(1.0, 1.4)
        lean = math.radians(rng.uniform(20, 40))
        acc[0], acc[2] = math.sin(lean), math.cos(lean)
        acc[1] += amp * 0.2 * np.sin(w * f + phase[0])
        acc[2] += amp * 0.08 * np.sin(2 * w * f + phase[1]) + 0.05 * rng.normal(size=len(t))
        gyro[0] += amp * 0.8 * np.sin(w * f + phase[2])
    else:  # stairs: slower, asymmetric steps (a sawtooth lift) and a stronger pitch swing
        f = rng.uniform(1.3, 1.9)
        lift = 2 * ((t * f + phase[0] / (2 * math.pi)) % 1.0) - 1
        acc[2] += amp * (0.15 * lift + 0.3 * np.sin(w * f + phase[1]))
        acc[0] += amp * 0.1 * np.sin(w * f + phase[2])
        gyro[1] += amp * 0.9 * np.sin(w * f + phase[3])
        gyro[2] += amp * 0.2 * np.sin(w * f / 2)
    return acc, gyro


def session(rng: np.random.Generator, preference: np.ndarray, calibration: np.ndarray, noise: float,
            start: float, seconds: float) -> np.ndarray:
    """One recording as rows of (timestamp, 6 channels, activity)."""
    mounting = _rotation(rng, 60)
    blocks, elapsed = [], 0.0
    while elapsed < seconds:
        activity = int(rng.choice(len(ACTIVITIES), p=preference))
        n = int(rng.uniform(15, 40) * RATE_HZ)
        t = elapsed + np.arange(n) / RATE_HZ
        acc, gyro = _motion(ACTIVITIES[activity], t, rng)
        signal = np.vstack([mounting @ acc, mounting @ gyro]) + rng.normal(0, noise, (6, n))
        blocks.append(np.vstack([t, signal, np.full(n, activity)]))
        elapsed += n / RATE_HZ
    rows = np.hstack(blocks).T
    rows[:, 1:7] = rows[:, 1:7] * calibration[0] + calibration[1]
    rows[:, 0] = start + rows[:, 0] + rng.uniform(-0.004, 0.004, len(rows))  # the logger's clock jitter
    if rng.random() < 0.5:  # the logger dropped 1-3 s of samples
        cut = int(rng.integers(len(rows) // 4, 3 * len(rows) // 4))
        rows = np.delete(rows, np.s_[cut : cut + int(rng.uniform(1, 3) * RATE_HZ)], axis=0)
    return rows


def write_sessions(folder: Path, rng: np.random.Generator, preference: np.ndarray, count: int, seconds: float,
                   prefix: str = "") -> None:
    """``count`` sessions of one wearer with one device (its calibration and noise) into
    ``folder/<prefix>session-K.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    calibration = np.stack([rng.uniform(0.9, 1.1, 6), np.r_[rng.uniform(-0.05, 0.05, 3), rng.uniform(-0.03, 0.03, 3)]])
    noise, start = rng.uniform(0.03, 0.1), 1.7e9 + rng.uniform(0, 3e7)
    for k in range(count):
        rows = session(rng, preference, calibration, noise, start, seconds * rng.uniform(0.8, 1.2))
        start = rows[-1, 0] + rng.uniform(3600, 86_400)
        np.savetxt(folder / f"{prefix}session-{k}.csv", rows, fmt=["%.3f"] + ["%.4f"] * 6 + ["%d"], delimiter=",",
                   header=HEADER, comments="")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write devices/ and test/ into")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sessions", type=int, default=3, help="recordings per device")
    parser.add_argument("--seconds", type=float, default=120.0, help="mean length of a recording")
    parser.add_argument("--skew", type=float, default=1.0, help="Dirichlet concentration of the label skew (lower: more skew)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for d in range(args.devices):
        preference = rng.dirichlet([args.skew] * len(ACTIVITIES))
        write_sessions(args.out / "devices" / f"device-{d:02d}", rng, preference, args.sessions, args.seconds)
    uniform = np.full(len(ACTIVITIES), 1 / len(ACTIVITIES))
    for wearer in range(2):
        write_sessions(args.out / "test", rng, uniform, 2, args.seconds, prefix=f"wearer-{wearer}-")
    print(f"wrote {args.devices} devices' and 2 held-out wearers' recordings under {args.out}")


if __name__ == "__main__":
    main()
