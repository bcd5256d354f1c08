"""MqttLink: the one paho-mqtt adapter both programs use (the agent and the coordinator).

Theory of operation. paho runs its network loop in its own thread (``loop_start``) and calls our
callbacks there. Those callbacks never do work: an inbound message goes straight to the caller's
``on_message`` (which must only enqueue) or to ``link.messages``; acknowledgements resolve
``PublishHandle`` objects; connection events update a condition variable that ``wait_connected``
waits on. Everything else (decoding, round logic) happens in the caller's own thread.

paho leaves four traps that this module closes (measured, see docs/INFRA.md):
- it does not resubscribe after a reconnect, so the declared subscriptions are sent again in every
  ``on_connect`` and the link only counts as *ready* once the broker has acknowledged them;
- it ignores the broker's maximum packet size and resends an oversized QoS 1 publish forever, so
  ``publish`` refuses payloads above ``max_message_bytes`` with ``PayloadTooLarge``;
- ``MQTTMessageInfo.is_published`` raises for a publish queued while offline even after it is
  delivered, and never reports a v5 PUBACK failure; handles are resolved from ``on_publish``
  instead, where reason codes >= 0x80 (135 Not authorized) become ``PublishFailed``;
- a first ``connect`` to a dead broker raises, so the link uses ``connect_async`` and lets the
  loop retry with doubling backoff.

``protocol="auto"`` speaks MQTT v5 (Mosquitto then tells us about forbidden publishes) and 3.1.1
where the broker answers CONNACK 132 "Unsupported protocol version" (amqtt). paho fixes the
protocol per client, so ``auto`` first sends a bare probe CONNECT, then builds the real client;
publishes made meanwhile wait in the link and go out once it exists.

Why one file over 400 lines: one adapter class whose callbacks share its lock, counters and
pending acknowledgements; the traps above are each a few lines inside it.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import asdict
from typing import Any, Callable, Sequence

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedprune.common.events import emit
from fedprune.common.link import LinkStats
from fedprune.common.mqtt_config import (
    MAX_MESSAGE_BYTES, BrokerAddress, LastWill, LinkConfig, check_filter, check_qos, check_topic, parse_broker_url,
    tls_context,
)

__all__ = [
    "MAX_MESSAGE_BYTES", "BrokerAddress", "BrokerRefused", "ConnectTimeout", "LastWill", "LinkConfig", "LinkStats",
    "MqttError", "MqttLink", "PayloadTooLarge", "PublishFailed", "PublishHandle", "QueueFull", "parse_broker_url",
]

log = logging.getLogger("fedprune.mqtt")

UNSUPPORTED_PROTOCOL_VERSION = 132


class MqttError(Exception):
    """Root of the link's errors."""


class PayloadTooLarge(MqttError, ValueError):
    """Refused locally: the broker would drop the connection and paho would resend forever."""

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(
            f"publish on {topic!r}: payload of {size} bytes exceeds max_message_bytes={limit}; "
            "split it into chunks first"
        )
        self.topic, self.size, self.limit = topic, size, limit


class QueueFull(MqttError):
    """paho's outgoing queue is at ``max_queued_messages``: the broker has been away too long."""


class PublishFailed(MqttError):
    """The broker refused a publish (v5 PUBACK reason >= 0x80), or the link closed before the ack."""

    def __init__(self, topic: str, reason: str, reason_code: int | None = None) -> None:
        code = f" (reason code {reason_code})" if reason_code is not None else ""
        super().__init__(f"publish on {topic!r} failed: {reason}{code}")
        self.topic, self.reason, self.reason_code = topic, reason, reason_code


class BrokerRefused(MqttError):
    """The broker answered CONNECT with a failure (bad credentials, not authorized, ...)."""

    def __init__(self, url: str, client_id: str, reason: str, reason_code: int) -> None:
        super().__init__(
            f"broker {url} refused client_id={client_id!r}: {reason} (CONNACK reason {reason_code}); "
            "check username, password and the broker's ACL"
        )
        self.url, self.client_id, self.reason, self.reason_code = url, client_id, reason, reason_code


class ConnectTimeout(MqttError, TimeoutError):
    """No ready connection within the caller's timeout (broker down, unreachable, TLS failure)."""


class PublishHandle:
    """One publish; ``wait`` blocks until the broker acknowledged it (QoS 1) or it was written (QoS 0)."""

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.topic, self.qos, self.retain, self.size = topic, qos, retain, len(payload)
        self._payload: bytes | None = payload
        self._done = threading.Event()
        self._error: PublishFailed | None = None
        self.reason_code: int | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None) -> bool:
        """True once acknowledged, False if still pending after ``timeout``; raises ``PublishFailed``."""
        if not self._done.wait(timeout):
            return False
        if self._error is not None:
            raise self._error
        return True

    def _resolve(self, reason_code: int | None, error: PublishFailed | None) -> None:
        self.reason_code, self._error, self._payload = reason_code, error, None
        self._done.set()


Subscription = tuple[str, int]


class MqttLink:
    """A self-healing MQTT connection: declared subscriptions, bounded publishes, counted events."""

    def __init__(
        self,
        config: LinkConfig,
        subscriptions: Sequence[Subscription] = (),
        on_message: Callable[[str, bytes], None] | None = None,
    ) -> None:
        for topic_filter, qos in subscriptions:
            check_filter(topic_filter)
            check_qos(qos)
        self.config = config
        self.subscriptions = tuple(subscriptions)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._deliver = on_message or (lambda topic, payload: self.messages.put((topic, payload)))
        self._url = config.url
        self._lock = threading.Lock()
        self._state = threading.Condition(self._lock)
        self._stats: dict[str, int] = asdict(LinkStats())
        self._pending: dict[int, PublishHandle] = {}
        self._early_acks: dict[int, ReasonCode] = {}
        self._deferred: list[PublishHandle] = []
        self._connected = False
        self._ready = False
        self._suback_mid: int | None = None
        self._refusal: BrokerRefused | None = None
        self._closed = False
        self._failing = False  # warn once per outage, not at every retry
        self._protocol = paho.MQTTv311 if config.protocol == "3.1.1" else paho.MQTTv5
        self._resolved = config.protocol != "auto"
        with self._lock:  # the network thread must not see a half-built link
            self._client = self._start_client() if self._resolved else self._start_probe()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    @property
    def protocol(self) -> str | None:
        """'5' or '3.1.1'; None while ``auto`` has not yet heard from the broker."""
        if not self._resolved:
            return None
        return "5" if self._protocol == paho.MQTTv5 else "3.1.1"

    def stats(self) -> LinkStats:
        with self._lock:
            return LinkStats(**self._stats)

    @property
    def refusal(self) -> BrokerRefused | None:
        """The broker's last CONNACK refusal (bad credentials, not authorized), until a connect succeeds."""
        with self._lock:
            return self._refusal

    def wait_connected(self, timeout: float, min_connects: int = 1) -> None:
        """Block until connected with subscriptions acknowledged, after at least ``min_connects`` CONNACKs.

        Raises ``BrokerRefused`` as soon as the broker rejects the credentials (the link keeps
        retrying in the background), ``ConnectTimeout`` when ``timeout`` passes, ``MqttError`` if closed.
        """

        def settled() -> bool:
            return self._closed or self._refusal is not None or (
                self._ready and self._stats["connects"] >= min_connects
            )

        with self._state:
            if not self._state.wait_for(settled, timeout):
                raise ConnectTimeout(
                    f"no connection to {self._url} as {self.config.client_id!r} within {timeout:g} s "
                    f"(connects so far: {self._stats['connects']}, failed TCP/TLS attempts: "
                    f"{self._stats['connect_failures']}); is the broker up, the url right and ca_file its CA?"
                )
            if self._closed:
                raise MqttError(f"link to {self._url} is closed")
            if self._refusal is not None:
                raise self._refusal

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishHandle:
        """Queue a publish; it is sent now or after the next reconnect (QoS 1), never silently resized."""
        check_topic(topic)
        check_qos(qos)
        payload = bytes(payload)
        limit = self.config.max_message_bytes
        if len(payload) > limit:
            with self._lock:
                self._stats["oversize_refused"] += 1
            emit(log, logging.WARNING, "mqtt_publish_refused", reason="too_large", topic=topic, bytes=len(payload),
                 limit=limit)
            raise PayloadTooLarge(topic, len(payload), limit)
        handle = PublishHandle(topic, payload, qos, retain)
        self._submit(handle, payload)
        with self._lock:
            self._stats["messages_out"] += 1
            self._stats["bytes_out"] += len(payload)
        return handle

    def close(self, timeout: float = 2.0) -> None:
        """Send DISCONNECT (so the broker discards the last will) and stop the network thread. Idempotent.

        Waits up to ``timeout`` for the DISCONNECT to be written: stopping paho's loop first could
        leave the socket open, and the broker would publish the will at the keepalive timeout.
        """
        with self._state:
            if self._closed:
                return
            self._closed = True
            client = self._client
            unsent = [*self._pending.values(), *self._deferred]
            self._pending.clear()
            self._deferred.clear()
            self._state.notify_all()
        client.disconnect()
        with self._state:
            self._state.wait_for(lambda: not self._connected, timeout)
        client.loop_stop()
        for handle in unsent:
            handle._resolve(None, PublishFailed(handle.topic, "link closed before the broker acknowledged"))
        emit(log, logging.INFO, "mqtt_closed", broker=self._url, client_id=self.config.client_id)

    def __enter__(self) -> MqttLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- clients (built in the caller's thread, or in the thread that ends the probe) --

    def _new_client(self, client_id: str, protocol: int) -> paho.Client:
        v5 = protocol == paho.MQTTv5
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=None if v5 else self.config.clean_start,
        )
        if self.config.address.tls:
            client.tls_set_context(tls_context(self.config))
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)  # type: ignore[arg-type]
        client.on_connect_fail = self._on_connect_fail
        return client

    def _start_probe(self) -> paho.Client:
        """A bare v5 CONNECT (no will, no properties, own client id) that only learns the broker's protocol.

        amqtt 0.12 answers a bare v5 CONNECT with CONNACK 132 but stalls, without answering, on one
        that carries a will or properties; and a probe under the real client id would end its session.
        """
        probe = self._new_client(f"{self.config.client_id}.probe", paho.MQTTv5)
        probe.on_connect = self._on_probe_answer
        address = self.config.address
        probe.connect_async(address.host, address.port, keepalive=self.config.keepalive_s, clean_start=True)
        probe.loop_start()
        return probe

    def _start_client(self) -> paho.Client:
        config, address = self.config, self.config.address
        v5 = self._protocol == paho.MQTTv5
        client = self._new_client(config.client_id, self._protocol)
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.will is not None:
            will = config.will
            client.will_set(will.topic, will.payload, will.qos, will.retain)
        client.max_inflight_messages_set(config.max_inflight)
        client.max_queued_messages_set(config.max_queued_messages)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        properties = None
        if v5 and config.session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = config.session_expiry_s
        client.connect_async(
            address.host,
            address.port,
            keepalive=config.keepalive_s,
            clean_start=config.clean_start if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        client.loop_start()
        emit(log, logging.INFO, "mqtt_starting", broker=self._url, client_id=config.client_id, protocol=self.protocol,
             clean_start=config.clean_start, session_expiry_s=config.session_expiry_s)
        return client

    def _end_probe(self, probe: paho.Client, protocol: int) -> None:
        probe.disconnect()
        probe.loop_stop()
        with self._lock:
            if self._closed:
                return
            self._protocol, self._resolved = protocol, True
            self._client = self._start_client()
            deferred, self._deferred = self._deferred, []
        for handle in deferred:
            payload = handle._payload
            if payload is None:
                continue
            try:
                self._submit(handle, payload)
            except MqttError as error:
                handle._resolve(None, PublishFailed(handle.topic, str(error)))

    def _submit(self, handle: PublishHandle, payload: bytes) -> None:
        """Hand one publish to paho, then register its handle.

        Never call paho with our lock held: paho's network thread holds its own message lock
        while it runs ``_on_publish``, which takes ours.
        """
        with self._lock:
            if self._closed:
                raise MqttError(f"link to {self._url} is closed")
            if not self._resolved:
                self._deferred.append(handle)
                return
            client = self._client
        info = client.publish(handle.topic, payload, handle.qos, handle.retain)
        with self._lock:
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                self._stats["publish_failures"] += 1
                raise QueueFull(
                    f"publish on {handle.topic!r}: {self.config.max_queued_messages} messages already "
                    f"waiting for {self._url}; the broker has been unreachable too long"
                )
            if handle.qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._fail(handle, f"not sent: {paho.error_string(info.rc)}", None)
                return
            early = self._early_acks.pop(info.mid, None)
            if early is not None:
                self._settle(handle, early)
            else:
                self._pending[info.mid] = handle

    # -- paho callbacks (network thread): record and enqueue only --

    def _on_probe_answer(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        client.on_connect = None
        protocol = paho.MQTTv311 if reason.value == UNSUPPORTED_PROTOCOL_VERSION else paho.MQTTv5
        emit(log, logging.INFO, "mqtt_protocol_probed", broker=self._url, client_id=self.config.client_id,
             protocol="5" if protocol == paho.MQTTv5 else "3.1.1")
        threading.Thread(target=self._end_probe, args=(client, protocol), name="fedprune-mqtt-probe", daemon=True).start()

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        """TCP or TLS failed before any CONNACK (paho keeps the exception to itself)."""
        with self._lock:
            self._stats["connect_failures"] += 1
            first, self._failing = not self._failing, True
            never_connected = self._stats["connects"] == 0
        if first:  # once per outage; a broker that went away after a session is churn the link heals
            emit(log, logging.WARNING if never_connected else logging.INFO, "mqtt_connect_failed", broker=self._url,
                 client_id=self.config.client_id, note="broker down, unreachable or TLS rejected; retrying")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        with self._state:
            if self._closed:
                return
            if reason.is_failure:
                self._refusal = BrokerRefused(self._url, self.config.client_id, str(reason), reason.value)
                self._state.notify_all()
                emit(log, logging.ERROR, "mqtt_refused", broker=self._url, client_id=self.config.client_id,
                     reason=str(reason), code=reason.value)
                return
            self._connected, self._refusal, self._failing = True, None, False
            self._stats["connects"] += 1
            if self._stats["connects"] > 1:
                self._stats["reconnects"] += 1
            self._ready = not self.subscriptions
            self._state.notify_all()
        if self.config.renew_will is not None:  # takes effect at the next CONNECT
            try:
                will = self.config.renew_will()
                client.will_set(will.topic, will.payload, will.qos, will.retain)
            except Exception as exc:  # noqa: BLE001 - never on paho's thread: keep the previous will
                emit(log, logging.ERROR, "mqtt_will_not_renewed", client_id=self.config.client_id, error=repr(exc))
        if self.subscriptions:
            # SUBACK is handled on this same thread after we return, so recording the mid here is race-free.
            result, mid = client.subscribe(list(self.subscriptions))
            with self._lock:
                self._suback_mid = mid if result == MQTTErrorCode.MQTT_ERR_SUCCESS else None
        emit(log, logging.INFO, "mqtt_connected", broker=self._url, client_id=self.config.client_id,
             protocol=self.protocol, session_present=bool(getattr(flags, "session_present", False)),
             subscriptions=len(self.subscriptions))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any) -> None:
        with self._state:
            if mid != self._suback_mid:
                return
            for (topic_filter, _), reason in zip(self.subscriptions, reasons):
                if reason.is_failure:
                    self._stats["subscribe_refusals"] += 1
                    emit(log, logging.ERROR, "mqtt_subscribe_refused", broker=self._url,
                         client_id=self.config.client_id, filter=topic_filter, reason=str(reason))
            self._ready = True
            self._state.notify_all()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        with self._state:
            was_connected = self._connected
            self._connected = self._ready = False
            self._suback_mid = None
            if was_connected:
                self._stats["disconnects"] += 1
            lost = [mid for mid, handle in self._pending.items() if handle.qos == 0]
            for mid in lost:
                self._fail(self._pending.pop(mid), "connection lost before sending", None)
            self._state.notify_all()
            closing = self._closed
        if was_connected and not closing:  # the link reconnects by itself: churn, not a warning
            emit(log, logging.INFO, "mqtt_disconnected", broker=self._url, client_id=self.config.client_id,
                 reason=str(reason))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        with self._lock:
            handle = self._pending.pop(mid, None)
            if handle is None:
                # paho can deliver the ack before publish() has returned the mid to us.
                self._early_acks[mid] = reason
                return
            self._settle(handle, reason)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        payload = message.payload
        with self._lock:
            self._stats["messages_in"] += 1
            self._stats["bytes_in"] += len(payload)
        try:
            self._deliver(message.topic, payload)
        except Exception as error:  # an exception here would end paho's network thread for good
            with self._lock:
                self._stats["messages_dropped"] += 1
            emit(log, logging.ERROR, "mqtt_message_dropped", broker=self._url, client_id=self.config.client_id,
                 topic=message.topic, bytes=len(payload), error=type(error).__name__)

    # -- handle resolution; call with the lock held --

    def _settle(self, handle: PublishHandle, reason: ReasonCode) -> None:
        if reason.is_failure:
            self._fail(handle, str(reason), reason.value)
        else:
            self._stats["publishes_acked"] += 1
            handle._resolve(reason.value, None)

    def _fail(self, handle: PublishHandle, why: str, code: int | None) -> None:
        self._stats["publish_failures"] += 1
        # a broker's refusal (a reason code: not authorized, quota) needs a person; a QoS 0 publish
        # lost with the connection is churn
        emit(log, logging.WARNING if code is not None else logging.INFO, "mqtt_publish_failed", broker=self._url,
             client_id=self.config.client_id, topic=handle.topic, reason=why, code=code)
        handle._resolve(code, PublishFailed(handle.topic, why, code))
