"""Enrolled devices: the allow-list of public keys, revocation, capabilities and presence.

Presence comes from the devices themselves (Register, Status heartbeats, the broker-delivered
last will "offline"); a device is online while its last sign of life is younger than
``heartbeat_timeout_s``. Pure: times arrive as ``now``. The two halves persist apart because
they have different writers: the operator commands own the allow-list (``allow_list``), the
daemon owns presence (``presence``) and follows allow-list changes with ``replace_allow_list``
(``fedprune.coordinator.fleet.registry_store``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from fedprune.protocol.topics import validate_id

ALLOW_LIST_FIELDS = ("device_id", "sign_public", "kx_public", "enrolled_at", "revoked")
_PRESENCE_DEFAULTS: dict[str, Any] = {"capabilities": {}, "n_examples": 0, "last_seen": None, "online": False,
                                      "last_decline": None, "last_rejection": None, "release": None,
                                      "epsilon_left": None}


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
    last_decline: dict[str, Any] | None = None  # {"round", "reason", "time"}: for the operator's status
    last_rejection: dict[str, Any] | None = None  # {"round", "reason", "time"}: its last update refused or gated
    release: int | None = None  # release version it serves, as its heartbeat reports
    epsilon_left: float | None = None  # privacy budget left, where its heartbeat reports one

    @property
    def keys(self) -> tuple[bytes, bytes]:
        return self.sign_public, self.kx_public


@dataclass(frozen=True)
class AllowListChange:
    """What a new allow-list changed: devices no longer accepted (revoked, removed or re-keyed)
    and devices newly accepted (enrolled, or re-keyed)."""

    withdrawn: tuple[str, ...]
    admitted: tuple[str, ...]


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

    def declined(self, device_id: str, round_number: int, reason: str, now: float) -> None:
        """Remember the device's last declined round and its reason (with any detail after ':')."""
        record = self._require(device_id)
        self._devices[device_id] = replace(record, last_decline={"round": round_number, "reason": reason, "time": now})

    def rejected(self, device_id: str, round_number: int, reason: str, now: float) -> None:
        """Remember why the device's last update was refused or left out of its round (a device
        removed from the allow-list meanwhile has nothing to remember it by)."""
        record = self._devices.get(device_id)
        if record is None:
            return
        self._devices[device_id] = replace(record, last_rejection={"round": round_number, "reason": reason, "time": now})

    def reported(self, device_id: str, release: int | None, epsilon_left: float | None) -> bool:
        """What the device's heartbeat says it serves and has left; True if that changed."""
        record = self._require(device_id)
        if (record.release, record.epsilon_left) == (release, epsilon_left):
            return False
        self._devices[device_id] = replace(record, release=release, epsilon_left=epsilon_left)
        return True

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

    def allow_list(self) -> dict[str, Any]:
        """The half the operator commands own: keys, enrollment time, revocation."""
        return {"devices": [{name: getattr(r, name) for name in ALLOW_LIST_FIELDS} for r in self.devices()]}

    def presence(self) -> dict[str, Any]:
        """The half the daemon owns: what the devices said about themselves, and when."""
        return {"devices": {r.device_id: {name: getattr(r, name) for name in _PRESENCE_DEFAULTS}
                            for r in self.devices()}}

    def replace_allow_list(self, document: dict[str, Any]) -> AllowListChange:
        """Adopt ``document`` (from ``allow_list``) as the allow-list. A device keeps its presence
        while its keys stay the same; a revoked one goes offline at once."""
        accepted = {r.device_id: r.keys for r in self._devices.values() if not r.revoked}
        devices: dict[str, DeviceRecord] = {}
        for raw in document["devices"]:
            record = DeviceRecord(raw["device_id"], bytes(raw["sign_public"]), bytes(raw["kx_public"]),
                                  float(raw["enrolled_at"]), bool(raw["revoked"]))
            previous = self._devices.get(record.device_id)
            if previous is not None and previous.keys == record.keys:
                record = replace(previous, enrolled_at=record.enrolled_at, revoked=record.revoked,
                                 online=previous.online and not record.revoked)
            devices[record.device_id] = record
        self._devices = devices
        now_accepted = {r.device_id: r.keys for r in devices.values() if not r.revoked}
        return AllowListChange(
            withdrawn=tuple(sorted(d for d, keys in accepted.items() if now_accepted.get(d) != keys)),
            admitted=tuple(sorted(d for d, keys in now_accepted.items() if accepted.get(d) != keys)),
        )

    def restore_presence(self, document: dict[str, Any]) -> None:
        """Apply ``document`` (from ``presence``) to the devices on the allow-list; others are
        ignored, and a field an older file lacks keeps its default."""
        for device_id, raw in document["devices"].items():
            if device_id in self._devices:
                self._devices[device_id] = replace(self._devices[device_id], **{
                    name: raw.get(name, default) for name, default in _PRESENCE_DEFAULTS.items()})


def split_legacy(document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The allow-list and presence documents of a registry.msgpack written before the two halves
    were split (one list of whole records)."""
    records = document["devices"]
    allow_list = [{name: raw[name] for name in ALLOW_LIST_FIELDS} for raw in records]
    presence = {raw["device_id"]: {name: raw.get(name, default) for name, default in _PRESENCE_DEFAULTS.items()}
                for raw in records}
    return {"devices": allow_list}, {"devices": presence}
