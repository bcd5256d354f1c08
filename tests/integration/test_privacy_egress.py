"""What leaves a device, seen from the broker: a federation on a provisioned Mosquitto with an extra
broker user allowed to read every fedprune topic (the view of the broker's operator, or of anyone
who compromises it).

(a) Each agent sent only register, status and sealed updates, only on its own topics, and its
    audit log accounts for every one of them.
(b) No update opens without the coordinator's key, no ciphertext decodes as msgpack, and no
    payload on any topic contains a device's raw training samples.
"""

from __future__ import annotations

import hashlib
import queue
import secrets
import time
from collections import defaultdict
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedprune.coordinator.lab.localfed import LocalFederation
from fedprune.edge_agent.audit import AuditLog
from fedprune.common.bundle import load_bundle
from fedprune.edge_agent.worker import layout_for
from fedprune.protocol.channel import AgentChannel, CoordinatorChannel
from fedprune.protocol.chunks import Reassembler
from fedprune.protocol.crypto import Identity
from fedprune.protocol.envelope import parse_header
from fedprune.protocol.errors import OpenFailed, ProtocolError
from fedprune.protocol.messages import KeyGrant, ModelRef, RoundTask, Update
from fedprune.protocol.topics import TopicKind, inbox_topic, parse_topic
from tests.integration.mosquitto import wait_until
from tests.integration.test_provision import FED, provisioned_broker

pytestmark = pytest.mark.slow

DEVICES = ("dev-1", "dev-2")
UPLINKS = {TopicKind.REGISTER: "register", TopicKind.STATUS: "status", TopicKind.UPDATE: "update"}
SPY = "auditor"


def test_agents_send_only_sealed_updates_and_statuses_on_their_own_topics(tmp_path: Path) -> None:
    spy_password = secrets.token_urlsafe(16)
    with provisioned_broker(FED, DEVICES, extra_acl=f"\nuser {SPY}\ntopic read fedprune/#\n",
                            extra_users={SPY: spy_password}) as broker:
        spy = broker.link(SPY, spy_password, subscriptions=["fedprune/#"])
        fed = LocalFederation(
            root=tmp_path, broker=broker.access(DEVICES), devices=DEVICES, rounds=2, federation=FED,
            settings={"broker": {"username": broker.config.broker.username}, "rounds": {"deadline_s": 20.0}},
            device_sections={"dev-2": {"privacy": {"enabled": True, "epsilon_budget": 1000.0, "clip_norm": 0.5,
                                                   "report_class_losses": False}}},
        )
        fed.prepare()
        fed.start()
        try:
            fed.wait_for_round(2, timeout=90)
        finally:
            codes = fed.stop_all()
        assert set(codes.values()) == {0}, codes

        audits = {d: list(AuditLog(tmp_path / "devices" / d / "state" / "audit.jsonl").records()) for d in DEVICES}
        sent = {(r.topic, r.sha256) for records in audits.values() for r in records}
        captured: list[tuple[str, bytes]] = []

        def everything_sent_was_seen() -> bool:
            while True:
                try:
                    captured.append(spy.messages.get_nowait())
                except queue.Empty:
                    break
            return sent <= {(t, hashlib.sha256(p).hexdigest()) for t, p in captured}

        wait_until(everything_sent_was_seen, 10.0, "the spy to see every audited publish")
        spy.close()

    # (a) the audit log and the broker agree, and each device used only its own uplink topics
    for device, records in audits.items():
        assert {r.message_type for r in records} == {"register", "status", "update"}
        for record in records:
            where = parse_topic(record.topic)
            assert (where.federation, where.device, UPLINKS.get(where.kind)) == (FED, device, record.message_type)
    device_digests = {r.sha256 for records in audits.values() for r in records}
    for topic, payload in captured:
        where = parse_topic(topic)
        if where.kind in UPLINKS:
            assert hashlib.sha256(payload).hexdigest() in device_digests, f"unaudited publish on {topic}"

    # (b) updates are sealed to the coordinator: a wrong key fails, the right one opens them
    updates = defaultdict(list)
    for topic, payload in captured:
        if parse_topic(topic).kind is TopicKind.UPDATE:
            updates[parse_topic(topic).device].append((topic, payload))
    assert set(updates) == set(DEVICES)
    devices = {d: load_bundle(tmp_path / "devices" / d / "bundle.json").identity.public for d in DEVICES}
    layout = layout_for(ModelRef("mlp", (64,), 10))
    coordinator = Identity.from_pem((fed.state_dir / "keys" / "coordinator.pem").read_bytes())
    masks = task_masks(captured, tmp_path / "devices" / DEVICES[0] / "bundle.json", layout)
    for device, chunks in updates.items():
        stranger = CoordinatorChannel(federation=FED, identity=Identity.generate(), devices=devices, layout=layout)
        owner = CoordinatorChannel(federation=FED, identity=coordinator, devices=devices, layout=layout)
        for version, mask in masks.items():
            owner.remember_masks(version, mask)
        reassembler = Reassembler(max_payload=1 << 24)
        opened = []
        refused = 0
        for topic, payload in chunks:
            try:
                assert stranger.receive(topic, payload, time.time()) is None, "opened without the coordinator's key"
            except OpenFailed:
                refused += 1
            except ProtocolError:
                pass  # a broker redelivery of a transfer already seen is refused before opening
        assert refused >= 1
        for topic, payload in chunks:
            try:
                message = owner.receive(topic, payload, time.time())
            except OpenFailed:
                raise AssertionError(f"the coordinator's key did not open {device}'s update") from None
            except ProtocolError:
                message = None  # a broker redelivery (replay) is refused after opening
            opened += [message] if isinstance(message, Update) else []
            envelope = reassembler.feed(payload, time.time(), topic)
            if envelope is not None:
                _, header_len = parse_header(envelope)
                with pytest.raises(Exception):
                    msgpack.unpackb(bytes(envelope[header_len:]))
        assert opened, f"no update of {device} opened with the coordinator's key"
        if device == "dev-2":  # [privacy] enabled: C = 0.5, sigma = 1, no per-class losses
            for update in opened:
                assert update.class_losses == {}
                held = sum(v.size for v in update.delta.values.values())
                norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in update.delta.values.values())))
                # clipped to C, then noise of norm about sigma*C*sqrt(held): far above C, far below 2x that
                assert 0.5 * 0.5 * np.sqrt(held) < norm < 0.5 * (1 + 2 * np.sqrt(held))

    # (b) no payload on any topic carries a training sample
    for device in DEVICES:
        with np.load(tmp_path / "data" / f"{device}.npz") as data:
            rows = [np.ascontiguousarray(data["X"][i], dtype=np.float32).tobytes() for i in range(3)]
        for topic, payload in captured:
            assert not any(row in payload for row in rows), f"a training sample of {device} appeared on {topic}"


def task_masks(captured: list[tuple[str, bytes]], bundle_path: Path, layout) -> dict:
    """The masks of every task broadcast, as a device verifies them: updates carry values in their order."""
    bundle = load_bundle(bundle_path)
    device = AgentChannel(federation=FED, device=bundle.device_id, identity=bundle.identity,
                          coordinator=bundle.coordinator, layout=layout)
    masks = {}
    for topic, payload in captured:
        if parse_topic(topic).kind is TopicKind.TASK or topic == inbox_topic(FED, bundle.device_id):
            try:  # tasks are encrypted to the members: the device's key grant on its inbox opens them
                received = [device.receive(topic, payload, time.time())]
            except ProtocolError:
                continue  # a re-announced task is a replay to this channel; one ahead of its key waits
            received += device.unlocked(time.time()) if isinstance(received[0], KeyGrant) else []
            for task in received:
                if isinstance(task, RoundTask):
                    masks[task.mask_version] = task.masks
    assert masks, "no task captured"
    return masks
