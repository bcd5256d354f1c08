"""The device side of model releases: verify, store atomically, remember the current version.

A ``ModelRelease`` reaches the store only after ``AgentChannel.receive`` has verified the
coordinator's signature over it. ``accept`` then checks, in this order, before anything on disk
changes: the version is newer than the current one (no downgrade, no replay of an old signed
release after a restart, when the channel's in-memory replay guard is fresh); the SHA-256 of the
ONNX bytes matches ``release.sha256``; the size is within bounds; the model loads in
onnxruntime and runs on a zero input, giving finite logits. Only then is the model written
(atomic write) and the pointer file ``current.json`` replaced (atomic write), so a crash leaves
the old or the new current model, never a torn one. The pointer also keeps what the release says
about itself (round, held-out accuracy: ``metadata``) for ``fedprune-agent status``. The newest
``keep`` versions stay on disk.

Not thread-safe: one caller (the agent daemon's event loop) accepts releases.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from fedprune.common.fsutil import atomic_write
from fedprune.protocol.messages import ModelRelease

POINTER = "current.json"
MAX_MODEL_BYTES = 256 << 20
_MODEL_FILE = re.compile(r"model-(\d{10,20})\.onnx")


class ReleaseRejected(Exception):
    """A release the device refuses; ``reason`` is a stable metric label.

    Reasons: ``duplicate`` (the current version again, same bytes: harmless, e.g. a retained
    release re-delivered after a reconnect), ``stale`` (older, or the same version with other
    bytes), ``digest``, ``too_large``, ``invalid_model``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReleaseStoreError(Exception):
    """The store's files on disk are unusable; the message names the file and the fix."""


class ReleaseStore:
    def __init__(self, directory: Path, keep: int = 3, *, max_model_bytes: int = MAX_MODEL_BYTES,
                 check_model: Callable[[bytes], str | None] | None = None) -> None:
        """``check_model(onnx) -> problem | None`` proves a model runs; the default loads it here,
        the agent passes one that loads it in a child so onnxruntime never stays resident."""
        self.check_model = check_model or model_problem
        if not (type(keep) is int and keep >= 1):
            raise ValueError(f"keep={keep!r}: expected a positive int")
        self.directory = Path(directory)
        self.keep = keep
        self.max_model_bytes = max_model_bytes
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._metadata: dict[str, str | int | float] = {}
        self._current = self._read_pointer()

    def current(self) -> tuple[int, Path] | None:
        """(version, path) of the model in service, or None before the first release."""
        if self._current is None:
            return None
        version, _ = self._current
        return version, self._path(version)

    def metadata(self) -> dict[str, str | int | float]:
        """What the current release says about itself (``federation``, ``round``, ``val_accuracy``,
        ...); empty before the first release, or for one stored before the pointer kept it."""
        return dict(self._metadata)

    def accept(self, release: ModelRelease) -> Path:
        """Verify ``release`` and make it current; raises ReleaseRejected (nothing changes) if not."""
        if not isinstance(release, ModelRelease):
            raise TypeError("accept takes a ModelRelease")
        digest = hashlib.sha256(release.onnx).hexdigest()
        if self._current is not None:
            version, current_digest = self._current
            if release.version == version and digest == current_digest == release.sha256:
                raise ReleaseRejected("duplicate", f"release {version} is already current")
            if release.version <= version:
                raise ReleaseRejected(
                    "stale", f"release {release.version} is not newer than the current release {version}"
                )
        if digest != release.sha256:
            raise ReleaseRejected("digest", f"release {release.version}: SHA-256 of the model does not match")
        if len(release.onnx) > self.max_model_bytes:
            raise ReleaseRejected(
                "too_large", f"release {release.version}: {len(release.onnx)} bytes exceeds {self.max_model_bytes}"
            )
        problem = self.check_model(release.onnx)
        if problem is not None:
            raise ReleaseRejected("invalid_model", f"release {release.version}: {problem}")
        path = self._path(release.version)
        atomic_write(path, release.onnx)
        pointer = {"version": release.version, "file": path.name, "sha256": digest, "metadata": release.metadata}
        atomic_write(self.directory / POINTER, json.dumps(pointer).encode())
        self._current = (release.version, digest)
        self._metadata = dict(release.metadata)
        self._prune()
        return path

    def versions(self) -> list[int]:
        """Versions stored on disk, oldest first."""
        found = (_MODEL_FILE.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _path(self, version: int) -> Path:
        return self.directory / f"model-{version:010d}.onnx"

    def _prune(self) -> None:
        for version in self.versions()[: -self.keep]:
            self._path(version).unlink(missing_ok=True)

    def _read_pointer(self) -> tuple[int, str] | None:
        pointer = self.directory / POINTER
        if not pointer.exists():
            return None
        fix = f"remove {pointer} to wait for the next release"
        try:
            data = json.loads(pointer.read_bytes())
            version, name, digest = data["version"], data["file"], data["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReleaseStoreError(f"{pointer} is unreadable ({exc}): {fix}") from None
        if type(version) is not int or version < 0 or name != self._path(version).name:
            raise ReleaseStoreError(f"{pointer} names {name!r} for version {version!r}: {fix}")
        model = self.directory / name
        try:
            stored = hashlib.sha256(model.read_bytes()).hexdigest()
        except OSError as exc:
            raise ReleaseStoreError(f"{model} is unreadable ({exc}): {fix}") from None
        if stored != digest:
            raise ReleaseStoreError(f"{model} does not match the SHA-256 in {pointer}: {fix}")
        metadata = data.get("metadata")
        if isinstance(metadata, dict):
            self._metadata = {str(k): v for k, v in metadata.items() if isinstance(v, (str, int, float))}
        return version, digest


def model_problem(onnx: bytes) -> str | None:
    """Why ``onnx`` is not a servable model (does not load, or non-finite logits on a zero input)."""
    from fedprune.edge_agent.inference import Predictor

    try:
        predictor = Predictor(onnx)
        logits = predictor.predict(np.zeros((1, *predictor.input_shape), dtype=np.float32))
    except Exception as exc:  # onnxruntime raises several private types for a bad model
        return f"does not load in onnxruntime: {type(exc).__name__}: {str(exc)[:200]}"
    if not np.isfinite(logits).all():
        return "gives non-finite outputs on a zero input"
    return None
