"""From the global model to a signed ModelRelease on disk: the coordinator's release pipeline.

``make_release`` exports the masked global weights to ONNX (checked by onnx.checker), turns it
into the configured variant, and writes ``<state>/releases/model-v<N>.onnx`` atomically before
anything is published, so the newest file is always a release that devices may hold. The
version is monotonic and persisted in the checkpoint by the daemon.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fedprune.common.fsutil import atomic_write
from fedprune.protocol.messages import ModelRelease

_RELEASE_FILE = re.compile(r"^model-v(\d+)\.onnx$")
VAL_KEYS = ("val_accuracy", "val_f1", "val_r2")  # release_metadata's headline metric, one per task kind


def release_dir(state_root: Path) -> Path:
    return Path(state_root) / "releases"


def export_variant(spec: Any, params: dict, *, variant: str, opset: int,
                   metadata: dict[str, str | int | float]) -> bytes:
    from fedprune.coordinator.export import compact_onnx, export_onnx, quantize_int8

    dense = export_onnx(spec, params, opset=opset, metadata=metadata)
    return {"dense": lambda: dense, "compact": lambda: compact_onnx(dense), "int8": lambda: quantize_int8(dense)}[variant]()


def make_release(spec: Any, params: dict, *, version: int, variant: str, opset: int,
                 metadata: dict[str, str | int | float], state_root: Path) -> tuple[ModelRelease, Path]:
    from fedprune.coordinator.export import build_release

    blob = export_variant(spec, params, variant=variant, opset=opset, metadata=metadata)
    release = build_release(version, blob)
    path = release_dir(state_root) / f"model-v{version}.onnx"
    atomic_write(path, blob, mode=0o644)
    return release, path


def release_due(config: Any, round_number: int) -> bool:
    """After the last round, and every ``[export] every_rounds`` rounds when set."""
    every = config.export.every_rounds
    return round_number == config.rounds.total or bool(every and round_number % every == 0)


def release_metadata(config: Any, round_number: int, mask_version: int,
                     score: tuple[str, float] | None) -> dict[str, str | int | float]:
    """What a release says about itself (ONNX metadata): federation, round, masks and the held-out
    headline metric ``(name, value)`` as ``val_<name>``: val_accuracy, val_f1 or val_r2."""
    metadata: dict[str, str | int | float] = {"federation": config.federation.id, "round": round_number,
                                              "mask_version": mask_version}
    if score is not None:
        metadata[f"val_{score[0]}"] = float(score[1])
    return metadata


def latest_release(state_root: Path) -> tuple[int, Path] | None:
    directory = release_dir(state_root)
    if not directory.exists():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _RELEASE_FILE.match(p.name))]
    return max(found) if found else None


def export_checkpoint(config: Any, out: Path, *, variant: str) -> tuple[int, dict[str, str | int | float]]:
    """``fedprune-coordinator export``: the newest checkpoint's global model to an ONNX file."""
    from fedprune.coordinator.config import model_spec
    from fedprune.coordinator.export import read_metadata
    from fedprune.coordinator.state import StateDir, StateError, latest_score

    checkpoint = StateDir(config.state.dir).load_latest_checkpoint()
    if checkpoint is None:
        raise StateError(f"{config.state.dir} has no checkpoint yet: run the coordinator first")
    metadata = release_metadata(config, int(checkpoint["round"]), int(checkpoint["mask_version"]),
                                latest_score(checkpoint))
    blob = export_variant(model_spec(config), checkpoint["params"], variant=variant, opset=config.export.opset,
                          metadata=metadata)
    atomic_write(Path(out), blob, mode=0o644)
    return len(blob), read_metadata(blob)


def releases_on_disk(state_root: Path) -> tuple[dict[str, Any], ...]:
    """One row per release file, oldest first: version, round and accuracy (from its ONNX
    metadata), size and export time; for the operator's view."""
    import onnx
    from google.protobuf.message import DecodeError

    directory = release_dir(state_root)
    if not directory.exists():
        return ()
    rows = []
    for path in directory.iterdir():
        match = _RELEASE_FILE.match(path.name)
        if match is None:
            continue
        try:
            metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            stat = path.stat()
        except (OSError, DecodeError, ValueError):  # removed or torn: skip it
            continue
        rows.append(release_row(int(match.group(1)), metadata, stat.st_size, stat.st_mtime))
    return tuple(sorted(rows, key=lambda row: row["version"]))


def release_row(version: int, metadata: dict[str, Any], size: int, exported_at: float) -> dict[str, Any]:
    score = next((float(v) for k, v in metadata.items() if k in VAL_KEYS), None)
    return {"version": version, "round": int(metadata["round"]) if "round" in metadata else None,
            "score": score, "bytes": size, "time": exported_at}
