"""MQTT topic names: one scheme, ``fedprune/v1/<federation>/<kind>[/<device>]``.

The device id is always the last level of a per-device topic because the broker ACL keys on
it (``pattern write fedprune/v1/+/update/%u``: the MQTT username is the device id). Ids are
restricted to ``[A-Za-z0-9._-]{1,64}`` so no id can carry a wildcard, a level separator or a
NUL and widen a subscription or an ACL pattern.

Retained model releases are split across ``release/<chunk index>`` so that every chunk of a
release stays retained (a broker keeps only the last message per topic).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from fedprune.protocol.errors import DecodeError

PREFIX = "fedprune/v1"
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_TOPIC_LEN = 256
MAX_RELEASE_CHUNKS = 1 << 16


class TopicKind(str, enum.Enum):
    TASK = "task"  # coordinator -> all, signed
    RELEASE = "release"  # coordinator -> all, signed, retained, one topic per chunk index
    INBOX = "inbox"  # coordinator -> one device, signed (rejects)
    REGISTER = "register"  # device -> coordinator, sealed
    UPDATE = "update"  # device -> coordinator, sealed
    STATUS = "status"  # device -> coordinator, sealed (also the MQTT last will)

    @property
    def per_device(self) -> bool:
        return self in _PER_DEVICE

    @property
    def uplink(self) -> bool:
        return self in _UPLINK


_PER_DEVICE = frozenset({TopicKind.INBOX, TopicKind.REGISTER, TopicKind.UPDATE, TopicKind.STATUS})
_UPLINK = frozenset({TopicKind.REGISTER, TopicKind.UPDATE, TopicKind.STATUS})


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a safe federation/device id; ValueError naming the rule otherwise."""
    if not is_valid_id(value):
        raise ValueError(
            f"{what} {value!r} is invalid: expected 1-64 characters from [A-Za-z0-9._-] "
            "(no MQTT wildcards, '/', NUL or spaces)"
        )
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Topic:
    """A parsed topic. ``device`` is set for per-device kinds, ``index`` for release chunks."""

    federation: str
    kind: TopicKind
    device: str | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        validate_id(self.federation, "federation")
        if self.kind.per_device:
            validate_id(self.device, "device")
        elif self.device is not None:
            raise ValueError(f"{self.kind.value} topics are broadcasts and name no device")
        if self.kind is TopicKind.RELEASE:
            if not (type(self.index) is int and 0 <= self.index < MAX_RELEASE_CHUNKS):
                raise ValueError(f"release chunk index {self.index!r}: expected an int in 0..{MAX_RELEASE_CHUNKS - 1}")
        elif self.index is not None:
            raise ValueError(f"{self.kind.value} topics carry no chunk index")

    def __str__(self) -> str:
        base = f"{PREFIX}/{self.federation}/{self.kind.value}"
        if self.device is not None:
            return f"{base}/{self.device}"
        if self.index is not None:
            return f"{base}/{self.index}"
        return base

    @property
    def retain(self) -> bool:
        """Whether a publisher should set the MQTT retain flag (model releases only)."""
        return self.kind is TopicKind.RELEASE


def task_topic(federation: str) -> str:
    return str(Topic(federation, TopicKind.TASK))


def release_topic(federation: str, index: int = 0) -> str:
    return str(Topic(federation, TopicKind.RELEASE, index=index))


def inbox_topic(federation: str, device: str) -> str:
    return str(Topic(federation, TopicKind.INBOX, device))


def register_topic(federation: str, device: str) -> str:
    return str(Topic(federation, TopicKind.REGISTER, device))


def update_topic(federation: str, device: str) -> str:
    return str(Topic(federation, TopicKind.UPDATE, device))


def status_topic(federation: str, device: str) -> str:
    return str(Topic(federation, TopicKind.STATUS, device))


def parse_topic(topic: object) -> Topic:
    """Parse a received topic; DecodeError for anything outside the scheme."""
    if not isinstance(topic, str) or len(topic) > MAX_TOPIC_LEN:
        raise DecodeError(f"topic must be a string of at most {MAX_TOPIC_LEN} characters")
    parts = topic.split("/")
    if len(parts) not in (4, 5) or "/".join(parts[:2]) != PREFIX:
        raise DecodeError(f"topic {topic[:80]!r}: expected {PREFIX}/<federation>/<kind>[/<device>]")
    try:
        kind = TopicKind(parts[3])
    except ValueError:
        raise DecodeError(f"topic {topic[:80]!r}: unknown kind {parts[3][:20]!r}") from None
    last = parts[4] if len(parts) == 5 else None
    try:
        if kind is TopicKind.RELEASE:
            if last is None or not last.isascii() or not last.isdigit() or len(last) > 5:
                raise ValueError("release topics end in a chunk index")
            return Topic(parts[2], kind, index=int(last))
        return Topic(parts[2], kind, device=last)
    except ValueError as exc:
        raise DecodeError(f"topic {topic[:80]!r}: {exc}") from None


def coordinator_filters(federation: str) -> tuple[str, ...]:
    """Subscriptions of the coordinator: every device's uplink topics of one federation."""
    validate_id(federation, "federation")
    return tuple(f"{PREFIX}/{federation}/{k.value}/+" for k in (TopicKind.REGISTER, TopicKind.UPDATE, TopicKind.STATUS))


def agent_filters(federation: str, device: str) -> tuple[str, ...]:
    """Subscriptions of one agent: broadcasts, every release chunk, and its own inbox."""
    return (
        task_topic(federation),
        f"{PREFIX}/{validate_id(federation, 'federation')}/{TopicKind.RELEASE.value}/+",
        inbox_topic(federation, device),
    )

