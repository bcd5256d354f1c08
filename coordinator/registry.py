"""Enrolled devices: the allow-list of public keys, revocation, capabilities and presence.

Presence comes from the devices themselves (Register, Status heartbeats, the broker-delivered
last will "offline"); a device is online while its last sign of life is younger than
``heartbeat_timeout_s``. Pure: times arrive as ``now``; ``to_dict``/``from_dict`` let the state
shell persist it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from protocol.topics import validate_id


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    sign_public: bytes
    kx_public: bytes
    enrolled_at: float
    revoked: bool = False
    capabilities: dict[str, Any] = field(default_factory=dict)
    n_examples: int = 0
    last_seen: float | None = None
    online: bool = False


class Registry:
    def __init__(self, heartbeat_timeout_s: float = 90.0) -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError("heartbeat_timeout_s must be positive")
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._devices: dict[str, DeviceRecord] = {}

    def enroll(self, device_id: str, sign_public: bytes, kx_public: bytes, now: float) -> DeviceRecord:
        validate_id(device_id, "device id")
        if len(sign_public) != 32 or len(kx_public) != 32:
            raise ValueError("public keys must be 32 raw bytes (Ed25519, X25519)")
        existing = self._devices.get(device_id)
        if existing is not None and not existing.revoked:
            raise ValueError(f"device {device_id!r} is already enrolled; revoke it first to re-key")
        record = DeviceRecord(device_id, bytes(sign_public), bytes(kx_public), now)
        self._devices[device_id] = record
        return record

    def revoke(self, device_id: str) -> None:
        record = self._require(device_id)
        self._devices[device_id] = replace(record, revoked=True, online=False)

    def get(self, device_id: str) -> DeviceRecord | None:
        """The record of an enrolled, non-revoked device, else None (unknown and revoked look alike)."""
        record = self._devices.get(device_id)
        return record if record is not None and not record.revoked else None

    def is_revoked(self, device_id: str) -> bool:
        record = self._devices.get(device_id)
        return record is not None and record.revoked

    def seen(self, device_id: str, now: float, *, online: bool = True,
             capabilities: dict[str, Any] | None = None, n_examples: int | None = None) -> None:
        record = self._require(device_id)
        changes: dict[str, Any] = {"last_seen": now, "online": online}
        if capabilities is not None:
            changes["capabilities"] = dict(capabilities)
        if n_examples is not None:
            changes["n_examples"] = int(n_examples)
        self._devices[device_id] = replace(record, **changes)

    def online(self, now: float) -> tuple[str, ...]:
        """Enrolled, not revoked, not gone offline, heard from within the heartbeat timeout; sorted."""
        return tuple(sorted(
            r.device_id for r in self._devices.values()
            if not r.revoked and r.online and r.last_seen is not None
            and now - r.last_seen <= self.heartbeat_timeout_s
        ))

    def devices(self) -> tuple[DeviceRecord, ...]:
        return tuple(self._devices[d] for d in sorted(self._devices))

    def _require(self, device_id: str) -> DeviceRecord:
        if device_id not in self._devices:
            raise KeyError(f"device {device_id!r} is not enrolled")
        return self._devices[device_id]

    def to_dict(self) -> dict[str, Any]:
        return {"heartbeat_timeout_s": self.heartbeat_timeout_s,
                "devices": [asdict(r) for r in self.devices()]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Registry":
        registry = cls(float(data["heartbeat_timeout_s"]))
        for raw in data["devices"]:
            record = DeviceRecord(**{**raw, "sign_public": bytes(raw["sign_public"]),
                                     "kx_public": bytes(raw["kx_public"])})
            registry._devices[record.device_id] = record
        return registry
