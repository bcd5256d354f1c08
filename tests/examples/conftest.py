"""The example packages (examples/<name>/src) on sys.path, as `pip install -e examples/<name>`
would put them, without installing anything into the environment under test."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

for name in ("images", "sensors", "tabular"):
    source = str(EXAMPLES / name / "src")
    if source not in sys.path:
        sys.path.insert(0, source)
