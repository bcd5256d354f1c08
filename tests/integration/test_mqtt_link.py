"""MqttLink against the real Mosquitto (TLS, passwords, ACL) and the embedded amqtt broker.

Negative delivery checks ("X never arrives") use a barrier instead of a sleep: after the event
that must not deliver X, the same publisher sends a message the subscriber may read. One broker
thread queues per subscriber in order, so if X had been queued it would arrive first.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedprune.coordinator.fleet.broker import EmbeddedBroker
from fedprune.common.mqtt import (
    MAX_MESSAGE_BYTES, BrokerRefused, ConnectTimeout, LastWill, LinkConfig, MqttError, MqttLink, PayloadTooLarge,
    PublishFailed,
)
from fedprune.protocol.topics import PREFIX, status_topic, task_topic, update_topic
from fedprune.coordinator.fleet.pki import create_ca
from tests.integration.mosquitto import MosquittoBroker, wait_until

pytestmark = pytest.mark.slow

WAIT_S = 10.0
FED = "fed1"
ALL_UPDATES = f"{PREFIX}/{FED}/update/+"
ALL_STATUS = f"{PREFIX}/{FED}/status/+"
REPO = Path(__file__).resolve().parents[2]


def next_message(link: MqttLink) -> tuple[str, bytes]:
    return link.messages.get(timeout=WAIT_S)


def test_qos1_round_trip_over_tls_with_passwords(mosquitto: MosquittoBroker) -> None:
    device = mosquitto.devices[0]
    with MqttLink(mosquitto.link_config(mosquitto.coordinator), [(ALL_UPDATES, 1)]) as coordinator, \
            MqttLink(mosquitto.link_config(device)) as agent:
        coordinator.wait_connected(WAIT_S)
        agent.wait_connected(WAIT_S)
        payloads = [b"first", bytes(range(256)) * 4, b"\x00" * MAX_MESSAGE_BYTES]
        handles = [agent.publish(update_topic(FED, device.username), p) for p in payloads]
        assert all(h.wait(WAIT_S) for h in handles)
        received = [next_message(coordinator) for _ in payloads]

        assert received == [(update_topic(FED, device.username), p) for p in payloads]
        sent, got = agent.stats(), coordinator.stats()
        assert (sent.messages_out, sent.publishes_acked, sent.publish_failures) == (3, 3, 0)
        assert sent.bytes_out == got.bytes_in == sum(map(len, payloads))
        assert got.messages_in == 3
        assert agent.protocol == "5"


def test_wrong_password_is_refused_with_a_clear_error(mosquitto: MosquittoBroker) -> None:
    device = mosquitto.devices[0]
    with MqttLink(mosquitto.link_config(device, password="not-the-password")) as agent:
        with pytest.raises(BrokerRefused) as refused:
            agent.wait_connected(WAIT_S)
    message = str(refused.value)
    assert refused.value.reason_code == 135
    assert "Not authorized" in message and mosquitto.url in message and device.username in message
    assert "not-the-password" not in message


def test_a_broker_certificate_from_another_ca_is_never_trusted(mosquitto: MosquittoBroker) -> None:
    other_ca = mosquitto.directory / "other-ca.crt"
    create_ca("someone else's CA").write(other_ca, mosquitto.directory / "other-ca.key")
    with MqttLink(mosquitto.link_config(mosquitto.devices[0], ca_file=other_ca)) as agent:
        wait_until(lambda: agent.stats().connect_failures >= 2, WAIT_S, "failed TLS handshakes")
        with pytest.raises(ConnectTimeout, match="failed TCP/TLS attempts") as timeout:
            agent.wait_connected(0)
    assert agent.stats().connects == 0
    assert "ca_file" in str(timeout.value)


def test_auto_protocol_speaks_v5_to_mosquitto(mosquitto: MosquittoBroker) -> None:
    with MqttLink(mosquitto.link_config(mosquitto.devices[0], protocol="auto")) as agent:
        handle = agent.publish(status_topic(FED, "dev-0"), b"queued before the protocol is known")
        agent.wait_connected(WAIT_S)
        assert agent.protocol == "5"
        assert handle.wait(WAIT_S)


def test_a_link_started_before_its_broker_connects_when_it_comes_up(mosquitto: MosquittoBroker) -> None:
    device = mosquitto.devices[0]
    persistent = mosquitto.link_config(mosquitto.coordinator, clean_start=False, session_expiry_s=3600)
    with MqttLink(persistent, [(ALL_UPDATES, 1)]) as coordinator:
        coordinator.wait_connected(WAIT_S)
        mosquitto.stop()
        with MqttLink(mosquitto.link_config(device, protocol="auto")) as agent:
            early = agent.publish(update_topic(FED, device.username), b"made before the broker was up")
            with pytest.raises(ConnectTimeout, match="no connection to mqtts://127.0.0.1"):
                agent.wait_connected(0)
            mosquitto.start()
            agent.wait_connected(WAIT_S)

            assert agent.protocol == "5"
            assert early.wait(WAIT_S)
            assert next_message(coordinator) == (update_topic(FED, device.username), b"made before the broker was up")


@pytest.mark.parametrize("protocol", ["5", "auto"])
def test_closing_a_link_fails_what_was_never_acknowledged(mosquitto: MosquittoBroker, protocol: str) -> None:
    mosquitto.stop()
    agent = MqttLink(mosquitto.link_config(mosquitto.devices[0], protocol=protocol))
    handle = agent.publish(status_topic(FED, "dev-0"), b"never sent")
    agent.close()
    agent.close()

    with pytest.raises(PublishFailed, match="link closed"):
        handle.wait(WAIT_S)
    with pytest.raises(MqttError, match="closed"):
        agent.publish(status_topic(FED, "dev-0"), b"too late")
    with pytest.raises(MqttError, match="closed"):
        agent.wait_connected(WAIT_S)


def test_link_resubscribes_after_a_broker_restart(mosquitto: MosquittoBroker) -> None:
    with MqttLink(mosquitto.link_config(mosquitto.coordinator)) as coordinator, \
            MqttLink(mosquitto.link_config(mosquitto.devices[0]), [(task_topic(FED), 1)]) as agent:
        coordinator.wait_connected(WAIT_S)
        agent.wait_connected(WAIT_S)
        mosquitto.restart()
        # a clean session: only the link's own resubscription can bring the task back
        agent.wait_connected(WAIT_S, min_connects=2)
        coordinator.wait_connected(WAIT_S, min_connects=2)
        assert coordinator.publish(task_topic(FED), b"round 2").wait(WAIT_S)

        assert next_message(agent) == (task_topic(FED), b"round 2")
        assert agent.stats().reconnects == 1


def test_qos1_publishes_made_while_the_broker_is_down_arrive_after_it_returns(mosquitto: MosquittoBroker) -> None:
    device = mosquitto.devices[0]
    persistent = mosquitto.link_config(mosquitto.coordinator, clean_start=False, session_expiry_s=3600)
    with MqttLink(persistent, [(ALL_UPDATES, 1)]) as coordinator, \
            MqttLink(mosquitto.link_config(device)) as agent:
        coordinator.wait_connected(WAIT_S)
        agent.wait_connected(WAIT_S)
        mosquitto.stop()
        handles = [agent.publish(update_topic(FED, device.username), f"chunk {i}".encode()) for i in range(3)]
        assert not any(h.done for h in handles)
        mosquitto.start()

        assert all(h.wait(WAIT_S) for h in handles)
        received = {next_message(coordinator) for _ in handles}
        assert received == {(update_topic(FED, device.username), f"chunk {i}".encode()) for i in range(3)}


def test_oversized_publish_is_refused_locally_and_the_link_stays_up(mosquitto: MosquittoBroker) -> None:
    device = mosquitto.devices[0]
    topic = update_topic(FED, device.username)
    with MqttLink(mosquitto.link_config(mosquitto.coordinator), [(ALL_UPDATES, 1)]) as coordinator, \
            MqttLink(mosquitto.link_config(device)) as agent:
        coordinator.wait_connected(WAIT_S)
        agent.wait_connected(WAIT_S)
        with pytest.raises(PayloadTooLarge) as refused:
            agent.publish(topic, b"x" * (MAX_MESSAGE_BYTES + 1))
        assert (refused.value.size, refused.value.limit) == (MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES)

        assert agent.publish(topic, b"fits").wait(WAIT_S)
        assert next_message(coordinator) == (topic, b"fits")
        stats = agent.stats()
        assert (stats.oversize_refused, stats.connects, stats.disconnects) == (1, 1, 0)
        assert agent.connected


AGENT_THAT_WAITS_TO_BE_KILLED = """
import json, sys
from pathlib import Path
from fedprune.common.mqtt import LastWill, LinkConfig, MqttLink
spec = json.loads(sys.argv[1])
will = LastWill(spec["will_topic"], b"offline", qos=1)
config = LinkConfig(spec["url"], spec["user"], spec["user"], spec["password"], Path(spec["ca"]), protocol="5", will=will)
link = MqttLink(config)
link.wait_connected(10)
print("ready", flush=True)
sys.stdin.read()
"""


def test_last_will_is_delivered_when_the_client_process_is_killed(mosquitto: MosquittoBroker) -> None:
    device = mosquitto.devices[1]
    will_topic = status_topic(FED, device.username)
    spec = {"url": mosquitto.url, "user": device.username, "password": device.password,
            "ca": str(mosquitto.ca_file), "will_topic": will_topic}
    with MqttLink(mosquitto.link_config(mosquitto.coordinator), [(ALL_STATUS, 1)]) as coordinator:
        coordinator.wait_connected(WAIT_S)
        child = subprocess.Popen(
            [sys.executable, "-c", AGENT_THAT_WAITS_TO_BE_KILLED, json.dumps(spec)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            child.send_signal(signal.SIGKILL)
            assert child.wait(WAIT_S) == -signal.SIGKILL
        finally:
            child.kill()
            child.wait()

        assert next_message(coordinator) == (will_topic, b"offline")


def test_clean_close_sends_no_last_will(mosquitto: MosquittoBroker) -> None:
    device = mosquitto.devices[1]
    topic = status_topic(FED, device.username)
    with MqttLink(mosquitto.link_config(mosquitto.coordinator), [(ALL_STATUS, 1)]) as coordinator:
        coordinator.wait_connected(WAIT_S)
        agent = MqttLink(mosquitto.link_config(device, will=LastWill(topic, b"offline")))
        agent.wait_connected(WAIT_S)
        agent.close()
        mosquitto.wait_for_log(f"Client {device.username} disconnected.", WAIT_S)  # will discarded by now
        with MqttLink(mosquitto.link_config(device, client_id="dev-1-barrier")) as barrier:
            assert barrier.publish(topic, b"barrier").wait(WAIT_S)

        assert next_message(coordinator) == (topic, b"barrier")


def test_embedded_broker_carries_128_kib_messages_over_the_311_fallback(embedded_broker: EmbeddedBroker) -> None:
    url = embedded_broker.url
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    subscriber = MqttLink(
        LinkConfig(url, "coordinator", reconnect_min_s=0.05), [(ALL_UPDATES, 1)],
        on_message=lambda topic, payload: inbox.put((topic, payload)),
    )
    with subscriber, MqttLink(LinkConfig(url, "dev-0", reconnect_min_s=0.05)) as agent:
        subscriber.wait_connected(WAIT_S)
        agent.wait_connected(WAIT_S)
        payloads = [b"small", bytes(range(256)) * (MAX_MESSAGE_BYTES // 256)]
        handles = [agent.publish(update_topic(FED, "dev-0"), p) for p in payloads]
        assert all(h.wait(WAIT_S) for h in handles)

        assert [inbox.get(timeout=WAIT_S) for _ in payloads] == [(update_topic(FED, "dev-0"), p) for p in payloads]
        assert (agent.protocol, subscriber.protocol) == ("3.1.1", "3.1.1")
