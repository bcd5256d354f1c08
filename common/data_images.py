"""Image folders: one subfolder per class of PNG/JPEG images, read as float32 (N, C, H, W) in [0, 1].

The class index is the subfolder's place in name order, so every device must hold the same class
folders (an empty one keeps its class's index) for their indices to agree. Pillow is imported
only here: a device that reads arrays never loads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedprune.common.data import LocalDataError, check_size
from fedprune.common.data_source import DataSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image_folder(path: Path, source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    """X float32 (N, 1 or 3, H, W) scaled to [0, 1], y int64 class indices; LocalDataError names the file."""
    from PIL import Image

    if not path.is_dir():
        raise LocalDataError(f"{path}: not a directory; format image_folder reads a folder with one subfolder per class")
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    if not classes:
        raise LocalDataError(f"{path}: no class subfolders; put each class's images in a subfolder named after it")
    images, labels = [], []
    for index, folder in enumerate(classes):
        for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()):
            check_size(file)
            try:
                with Image.open(file) as image:
                    image = image.convert("L" if source.grayscale else "RGB")
                    if source.image_size:
                        height, width = source.image_size
                        image = image.resize((width, height), Image.Resampling.BILINEAR)
                    pixels = np.asarray(image, dtype=np.float32) / 255.0
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise LocalDataError(f"{file}: unreadable image ({exc}); replace or remove it") from exc
            if images and pixels.shape != images[0].shape:
                raise LocalDataError(f"{file}: {pixels.shape[1]}x{pixels.shape[0]} pixels, the first image has "
                                     f"{images[0].shape[1]}x{images[0].shape[0]}; set [data] image_size = [height, width]")
            images.append(pixels)
            labels.append(index)
    if not images:
        raise LocalDataError(f"{path}: no .png or .jpg images in the class subfolders "
                             f"({', '.join(c.name for c in classes[:5])})")
    X = np.stack(images)
    X = X[:, None] if X.ndim == 3 else X.transpose(0, 3, 1, 2)
    return X, np.asarray(labels, dtype=np.int64)
