"""The error-feedback residual on disk (``residual-<federation>.npz`` in the state directory).

Written atomically after the broker acknowledged the update it belongs to, so a restarted agent
adds what its last updates rounded off to its next one (``core/feedback.py``). Losing it costs
one residual's worth of rounding, never a wrong update: a file that cannot be read is set aside
with a warning and the device goes on without it, unlike the privacy ledger, whose loss would
let a device spend its budget twice.
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import numpy as np

from fedprune.common.events import emit
from fedprune.common.fsutil import atomic_write

log = logging.getLogger("fedprune.agent")

Params = dict[str, np.ndarray]


class ResidualStore:
    def __init__(self, state_dir: Path, federation: str) -> None:
        self.path = Path(state_dir) / f"residual-{federation}.npz"

    def load(self) -> Params | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
                residual = {name: archive[name].astype(np.float32) for name in archive.files}
            if not all(np.isfinite(v).all() for v in residual.values()):
                raise ValueError("non-finite values")
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            aside = self.path.with_suffix(".npz.unreadable")
            self.path.replace(aside)
            emit(log, logging.WARNING, "residual_unreadable", file=self.path, error=exc, set_aside=aside,
                 action="start_without_error_feedback_residual")
            return None
        return residual

    def save(self, residual: Params | None) -> None:
        """None removes the file: nothing is left to feed back."""
        if residual is None:
            self.path.unlink(missing_ok=True)
            return
        buffer = io.BytesIO()
        np.savez(buffer, **residual)
        atomic_write(self.path, buffer.getvalue())
