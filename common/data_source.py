"""How to read a data path: the ``[data]`` table of an agent.toml and of a simulation TOML.

One declaration serves the agent's config (checked at load, exit 78), the simulation's
``[data]`` table (the same keys, the same checks) and the training child, which gets it as a
plain dict (``to_dict``/``from_dict``) so that it reads exactly what the daemon summarised.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from fedprune.common.configkit import FreeTable, in_range, one_of, setting

FORMATS = ("auto", "npz", "csv", "image_folder", "sensor_csv", "factory")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[A-Za-z_]\w*$")


def _image_size(value: tuple[int, ...]) -> str | None:
    if value == () or (len(value) == 2 and all(1 <= v <= 4096 for v in value)):
        return None
    return "[height, width] with sides in [1, 4096], or [] to keep the images' own size"


def _max_gap(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "a number of timestamp units > 0 (leave it out for no gap check)"


def _factory(value: str) -> str | None:
    return None if value == "" or _FACTORY.match(value) else 'an import path "package.module:function"'


def _args(value: FreeTable) -> str | None:
    bad = [key for key in value if not _NAME.match(key)]
    return f"keys that are Python argument names, not {bad[0]!r}" if bad else None


@dataclass(frozen=True)
class DataSource:
    """How the local data is read (docs/DATA.md); the path itself is [agent] data."""

    format: str = setting("auto", "auto (.npz and CSV files by suffix), npz, csv, image_folder, sensor_csv or factory", check=one_of(*FORMATS))
    label_columns: int = setting(1, "csv, sensor_csv: the last N columns are the targets (N > 1: multi-label or multi-target)", check=in_range(1, 1 << 16))
    image_size: tuple[int, ...] = setting((), "image_folder: resize every image to [height, width]; []: keep their size (all must agree)", check=_image_size)
    grayscale: bool = setting(False, "image_folder: one channel instead of RGB")
    window: int = setting(0, "sensor_csv: rows per window (required)", check=in_range(0, 1 << 20))
    stride: int = setting(0, "sensor_csv: rows between window starts; 0: the window (no overlap)", check=in_range(0, 1 << 20))
    max_gap: float | None = setting(None, "sensor_csv: a larger step between timestamps ends a recording; empty: only files end one", check=_max_gap)
    timestamp_column: str = setting("", "sensor_csv: the timestamp column's header name; empty: the first column")
    factory: str = setting("", 'factory: "package.module:function", called as function(path, **args), returning (X, y) numpy arrays', check=_factory)
    args: FreeTable = setting(FreeTable(), "factory: the function's keyword arguments, e.g. [data.args] scale = 2", check=_args)

    def __post_init__(self) -> None:
        """Options the chosen format would ignore are refused: they are almost always a wrong format.
        Messages name the key alone: the config kit puts the table in front ([data], [evaluation.source])."""
        if self.format == "factory" and not self.factory:
            raise ValueError('factory: format = "factory" needs factory = "package.module:function"')
        if self.factory and self.format not in ("factory", "auto"):
            raise ValueError(f'factory {self.factory!r}: only read with format = "factory", not {self.format!r}')
        if self.kind == "sensor_csv" and self.window < 1:
            raise ValueError("window: sensor_csv needs window = rows per window (e.g. 50)")
        owners = {"image_size": ("image_folder", ()), "grayscale": ("image_folder", False),
                  "window": ("sensor_csv", 0), "stride": ("sensor_csv", 0), "max_gap": ("sensor_csv", None),
                  "timestamp_column": ("sensor_csv", ""), "args": ("factory", FreeTable()),
                  "label_columns": ("csv, sensor_csv", 1)}
        for key, (formats, unset) in owners.items():
            if getattr(self, key) != unset and self.kind not in formats.split(", ") + (["auto"] if key == "label_columns" else []):
                raise ValueError(f"{key}: only used with format = {formats}, not {self.format!r}; "
                                 "remove it or set format")

    @property
    def kind(self) -> str:
        """The format, with ``auto`` read as ``factory`` when a factory is named."""
        return "factory" if self.format == "auto" and self.factory else self.format

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for the msgpack job of the training child."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "image_size": list(self.image_size), "args": dict(self.args)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DataSource":
        return cls(**{**values, "image_size": tuple(values["image_size"]), "args": FreeTable(values["args"])})
