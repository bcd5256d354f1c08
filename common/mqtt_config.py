"""Where and how MqttLink connects: the broker URL and LinkConfig, validated once at construction.

Every error is a ``ValueError`` naming the setting, the value and what is expected, so the
programs' config loaders can turn it into their ConfigError unchanged.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# fedprune chunks every payload to this size; the broker's limits are set above it (deploy/mosquitto).
MAX_MESSAGE_BYTES = 128 * 1024
Protocol = Literal["auto", "5", "3.1.1"]


@dataclass(frozen=True)
class BrokerAddress:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host:port`` (plain TCP) or ``mqtts://host:port`` (TLS); the port defaults to 1883/8883."""
    expected = "expected mqtt://host:port or mqtts://host:port"
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"broker url {url!r}: missing '://'; {expected}")
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker url {url!r}: scheme {parts.scheme!r} is not mqtt or mqtts; {expected}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"broker url {url!r}: put credentials in username/password, not in the url")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker url {url!r}: unexpected path, query or fragment; {expected}")
    if not parts.hostname:
        raise ValueError(f"broker url {url!r}: missing host; {expected}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker url {url!r}: port must be an integer in 1..65535; {expected}") from None
    if port == 0:
        raise ValueError(f"broker url {url!r}: port must be an integer in 1..65535; {expected}")
    return BrokerAddress(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme])


@dataclass(frozen=True)
class LastWill:
    """Published by the broker when the client vanishes without a DISCONNECT (crash, power loss)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class LinkConfig:
    """One MQTT connection.

    ``ca_file`` None with mqtts:// trusts the system store; ``cert_file``/``key_file`` add a TLS
    client certificate. ``protocol``: "auto" (v5, or 3.1.1 where the broker refuses v5), "5" or
    "3.1.1". A persistent session is ``clean_start=False`` plus, under v5, ``session_expiry_s``
    (under 3.1.1 the broker's ``persistent_client_expiration`` decides). ``max_message_bytes``
    bounds every publish; ``max_queued_messages`` bounds what waits while the broker is away.
    """

    url: str
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    protocol: Protocol = "auto"
    keepalive_s: int = 30
    clean_start: bool = True
    session_expiry_s: int = 0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_inflight: int = 20
    max_queued_messages: int = 256
    will: LastWill | None = None
    # Called on the network thread after each connect: the will for the next CONNECT. A sealed will
    # is replay-checked, so one registered again after a reconnect would be refused as a replay.
    renew_will: Callable[[], LastWill] | None = None

    def __post_init__(self) -> None:
        address = parse_broker_url(self.url)
        if not self.client_id or len(self.client_id.encode()) > 128:
            raise ValueError(f"client_id {self.client_id!r}: expected 1..128 bytes")
        if self.password is not None and self.username is None:
            raise ValueError("password given without username")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if not address.tls and (self.ca_file or self.cert_file):
            raise ValueError(f"broker url {self.url!r} is plain mqtt:// but TLS files were given; use mqtts://")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"protocol {self.protocol!r}: expected 'auto', '5' or '3.1.1'")
        if not 5 <= self.keepalive_s <= 65535:
            raise ValueError(f"keepalive_s={self.keepalive_s}: expected 5..65535")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ValueError(f"session_expiry_s={self.session_expiry_s}: expected 0..4294967295")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("reconnect backoff: expected 0 < reconnect_min_s <= reconnect_max_s")
        if not 1 <= self.max_message_bytes <= 268_435_455:
            raise ValueError(f"max_message_bytes={self.max_message_bytes}: expected 1..268435455")
        if self.max_inflight < 1 or self.max_queued_messages < 1:
            raise ValueError("max_inflight and max_queued_messages must be >= 1")
        if self.will is not None:
            check_topic(self.will.topic)
            check_qos(self.will.qos)

    @property
    def address(self) -> BrokerAddress:
        return parse_broker_url(self.url)


def tls_context(config: LinkConfig) -> ssl.SSLContext:
    """Verify the broker against ``ca_file`` (or the system store) and its hostname; TLS >= 1.2."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.ca_file) if config.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.cert_file is not None and config.key_file is not None:
        context.load_cert_chain(str(config.cert_file), str(config.key_file))
    return context


def check_qos(qos: int) -> None:
    if qos not in (0, 1):
        raise ValueError(f"qos {qos!r}: expected 0 or 1 (QoS 2 buys nothing: duplicates are harmless by design)")


def check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic.encode()) > 65535:
        raise ValueError(f"topic {topic!r}: expected a non-empty topic name without wildcards")


def check_filter(topic_filter: str) -> None:
    levels = topic_filter.split("/") if topic_filter else []
    bad = (
        not levels
        or "\0" in topic_filter
        or any(("+" in level or "#" in level) and len(level) > 1 for level in levels)
        or "#" in levels[:-1]
    )
    if bad:
        raise ValueError(f"topic filter {topic_filter!r}: '+' and '#' must fill a whole level, '#' only last")
