"""Synthetic camera crops for the example: ``python -m fedprune_images.make_data --out data --devices 8``.

Writes ``<out>/devices/device-NN/<class>/*.png`` (one image folder per device, as each device
would hold it) and ``<out>/test/<class>/*.png`` (a balanced held-out set). Every image is a shape
(bar, circle, cross, ring, triangle) of random size, place, rotation and colour on a cluttered
background (a colour gradient, stray lines and blobs) with sensor noise, drawn 4x larger and
downsampled so that edges are anti-aliased as a camera's are. Devices get a few hundred images
each with label skew (class shares drawn from a Dirichlet) and their own colour cast and noise
level, as cameras in different places would. Every device keeps every class folder, empty ones
included: the class index is the folder's place in name order, so all devices must agree.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("bar", "circle", "cross", "ring", "triangle")
SIZE = 16
_SCALE = 4  # drawn at SIZE * _SCALE, then downsampled: anti-aliased edges


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """A two-colour gradient in a random direction with a few stray lines and blobs (clutter)."""
    a = np.array(_colour(rng), float)
    b = np.clip(a + rng.normal(0, 40, 3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:side, 0:side] / side
    t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)[..., None]
    image = Image.fromarray(((1 - t) * a + t * b).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 3))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, side, 4))
        draw.line((x0, y0, x1, y1), fill=_colour(rng), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 3))):
        x, y, r = int(rng.integers(0, side)), int(rng.integers(0, side)), int(rng.integers(2, 5))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_colour(rng))
    return image


def _polygon(cx: float, cy: float, r: float, angle: float, corners: int) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * k / corners), cy + r * math.sin(angle + 2 * math.pi * k / corners))
            for k in range(corners)]


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float,
           fill: tuple[int, int, int]) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r / 3)))
    elif kind == "bar":
        dx, dy = math.cos(angle) * r, math.sin(angle) * r
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fill, width=max(3, int(r / 1.5)))
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, angle, 3), fill=fill)
    else:  # a cross: two bars through the centre
        for bar in (angle, angle + math.pi / 2):
            dx, dy = math.cos(bar) * r, math.sin(bar) * r
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fill, width=max(2, int(r / 2.5)))


def draw_image(kind: str, rng: np.random.Generator, cast: np.ndarray, noise: float) -> Image.Image:
    """One SIZE x SIZE RGB image of ``kind``; ``cast`` (RGB gains) and ``noise`` are the camera's."""
    side = SIZE * _SCALE
    image = _background(rng, side)
    r = rng.uniform(0.3, 0.45) * side
    cx, cy = rng.uniform(r, side - r, 2)
    fill = _colour(rng)
    background = np.asarray(image, float)[int(cy), int(cx)]
    while np.abs(np.array(fill) - background).sum() < 200:  # a shape the camera could see at all
        fill = _colour(rng)
    _shape(ImageDraw.Draw(image), kind, cx, cy, r, rng.uniform(0, 2 * math.pi), fill)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6))).resize((SIZE, SIZE), Image.Resampling.BOX)
    pixels = np.asarray(image, float) * cast + rng.normal(0, noise, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_folder(root: Path, counts: np.ndarray, rng: np.random.Generator, cast: np.ndarray, noise: float) -> None:
    """``counts[k]`` images of class k under ``root/<class>/``; every class folder is made."""
    for kind, count in zip(CLASSES, counts):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(int(count)):
            draw_image(kind, rng, cast, noise).save(folder / f"{kind}-{i:04d}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write devices/ and test/ into")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-device", type=int, default=240, help="mean images per device")
    parser.add_argument("--test", type=int, default=400, help="held-out test images (balanced)")
    parser.add_argument("--skew", type=float, default=1.0, help="Dirichlet concentration of the label skew (lower: more skew)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for d in range(args.devices):
        size = int(rng.integers(args.per_device // 2, args.per_device * 3 // 2 + 1))
        counts = rng.multinomial(size, rng.dirichlet([args.skew] * len(CLASSES)))
        cast, noise = rng.uniform(0.85, 1.15, 3), rng.uniform(3, 12)
        write_folder(args.out / "devices" / f"device-{d:02d}", counts, rng, cast, noise)
    per_class = np.full(len(CLASSES), args.test // len(CLASSES))
    write_folder(args.out / "test", per_class, rng, np.ones(3), 8.0)
    print(f"wrote {args.devices} devices and {per_class.sum()} test images under {args.out}")


if __name__ == "__main__":
    main()
