"""Operator commands over the state directory: init, enroll, revoke, status.

``init`` writes the commented config and the coordinator's keys; ``enroll`` adds a device's
fresh public keys to the allow-list and writes the bundle the device loads; ``revoke`` takes a
device off the list (its updates are then rejected as ``unknown_sender``); ``status`` reads the
state without touching the broker. Each changes state through atomic writes only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from coordinator.config import CoordinatorConfig, example_config
from coordinator.daemon import IDENTITY_FILE, load_identity
from coordinator.registry import Registry
from coordinator.state import StateDir, latest_accuracy
from edge_agent.bundle import Bundle, EnrollmentError, save_bundle
from edge_agent.configkit import ConfigError
from edge_agent.fsutil import atomic_write
from protocol.crypto import Identity


def init(*, config_path: Path, state_dir: Path, federation: str, broker_url: str, embedded_broker: bool,
         force: bool = False, settings: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Write the config (defaults, the given values, then ``settings`` per section) and the keys."""
    if Path(config_path).exists() and not force:
        raise ConfigError(f"{config_path} exists; pass --force to overwrite it")
    values: dict[str, dict[str, Any]] = {
        "federation": {"id": federation},
        "broker": {"url": broker_url, "embedded": embedded_broker},
        "state": {"dir": str(Path(state_dir).resolve())},
    }
    for section, table in (settings or {}).items():
        values.setdefault(section, {}).update(table)
    text = example_config(values)
    from coordinator.config import load_config

    probe = Path(config_path).with_suffix(".check.toml")
    atomic_write(probe, text.encode(), mode=0o600)
    try:
        load_config(probe, env={})
    finally:
        probe.unlink(missing_ok=True)
    state = StateDir(state_dir)
    state.ensure()
    key_path = state.keys / IDENTITY_FILE
    if not key_path.exists():
        atomic_write(key_path, Identity.generate().to_pem(), mode=0o600)
    atomic_write(Path(config_path), text.encode(), mode=0o600)


def _registry(config: CoordinatorConfig, state: StateDir) -> Registry:
    doc = state.load_registry()
    return Registry.from_dict(doc) if doc else Registry(config.rounds.heartbeat_timeout_s)


def enroll(config: CoordinatorConfig, device_id: str, out: Path, *, broker_password: str = "",
           broker_url: str | None = None) -> Bundle:
    state = StateDir(config.state.dir)
    state.ensure()
    coordinator = load_identity(state)
    registry = _registry(config, state)
    device = Identity.generate()
    try:
        registry.enroll(device_id, device.public.signing, device.public.agreement, now=time.time())
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from None
    ca = config.broker.ca_file.read_bytes() if config.broker.ca_file else None
    bundle = Bundle(
        federation=config.federation.id, device_id=device_id, identity=device, coordinator=coordinator.public,
        broker_url=broker_url or config.broker.url, broker_username=device_id, broker_password=broker_password,
        ca_pem=ca,
    )
    save_bundle(out, bundle)
    state.save_registry(registry.to_dict())
    return bundle


def revoke(config: CoordinatorConfig, device_id: str) -> None:
    state = StateDir(config.state.dir)
    registry = _registry(config, state)
    try:
        registry.revoke(device_id)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    state.save_registry(registry.to_dict())


def status_report(config: CoordinatorConfig, as_json: bool = False) -> str:
    state = StateDir(config.state.dir)
    checkpoint = state.load_latest_checkpoint()
    registry = _registry(config, state)
    report = {
        "federation": config.federation.id,
        "completed_rounds": checkpoint["round"] if checkpoint else 0,
        "total_rounds": config.rounds.total,
        "mask_version": checkpoint["mask_version"] if checkpoint else None,
        "last_accuracy": latest_accuracy(checkpoint),
        "devices": [
            {"id": r.device_id, "revoked": r.revoked, "examples": r.n_examples, "last_seen": r.last_seen,
             "quality": (checkpoint or {}).get("quality", {}).get(r.device_id)}
            for r in registry.devices()
        ],
    }
    if as_json:
        return json.dumps(report, indent=2)
    lines = [
        f"federation {report['federation']}: {report['completed_rounds']}/{report['total_rounds']} rounds, "
        f"mask version {report['mask_version']}, last accuracy "
        + (f"{report['last_accuracy']:.4f}" if report["last_accuracy"] is not None else "n/a"),
        f"{'device':<20} {'examples':>8} {'quality':>8}  state",
    ]
    for d in report["devices"]:
        quality = f"{d['quality']:.3f}" if d["quality"] is not None else "-"
        lines.append(f"{d['id']:<20} {d['examples']:>8} {quality:>8}  {'revoked' if d['revoked'] else 'enrolled'}")
    return "\n".join(lines)
