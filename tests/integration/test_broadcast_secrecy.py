"""Broadcasts only members read, seen from a provisioned Mosquitto with an extra broker user that
reads every fedprune topic (the broker operator's view, or anyone who compromises it).

Phase 1: dev-1 and dev-2 run a round and receive release 1. Then dev-2 is revoked on the
coordinator only (its broker login stays, as it does until an operator removes it) and the
coordinator runs again: it rotates the federation key. dev-3, enrolled but never started, joins
now and must install the retained release 1; round 2 and release 2 follow with dev-1 and dev-3.

(a) With the coordinator's public key only, no task or release on the wire decodes, and no
    grant opens. (b) The revoked dev-2, holding everything it was ever granted, reads no task or
    release made after its revocation. (c) The late joiner installed the retained release.
"""

from __future__ import annotations

import queue
import secrets
import time
from pathlib import Path

import msgpack
import pytest

from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.config import load_config
from fedprune.coordinator.lab.localfed import LocalFederation
from fedprune.common.bundle import load_bundle
from fedprune.edge_agent.worker import layout_for
from fedprune.protocol.channel import AgentChannel
from fedprune.protocol.chunks import Reassembler
from fedprune.protocol.crypto import KEY_ID_LEN, Identity, KeyRing
from fedprune.protocol.envelope import Suite, decrypt_broadcast, parse_header
from fedprune.protocol.errors import OpenFailed, ProtocolError, Replayed, UnknownKey
from fedprune.protocol.messages import Kind, ModelRef
from fedprune.protocol.topics import TopicKind, inbox_topic, parse_topic
from tests.integration.mosquitto import wait_until
from tests.integration.test_provision import FED, provisioned_broker

pytestmark = pytest.mark.slow

DEVICES = ("dev-1", "dev-2", "dev-3")
SPY = "auditor"


def test_only_current_members_read_tasks_and_releases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy_password = secrets.token_urlsafe(16)
    with provisioned_broker(FED, DEVICES, extra_acl=f"\nuser {SPY}\ntopic read fedprune/#\n",
                            extra_users={SPY: spy_password}) as broker:
        spy = broker.link(SPY, spy_password, subscriptions=["fedprune/#"])
        fed = LocalFederation(
            root=tmp_path, broker=broker.access(DEVICES), devices=DEVICES, rounds=1, federation=FED,
            settings={"broker": {"username": broker.config.broker.username},
                      "rounds": {"deadline_s": 20.0, "min_devices": 2, "quorum": 2},
                      "export": {"every_rounds": 1}},
        )
        config = fed.prepare()
        try:
            fed.start_coordinator()
            fed.wait_for_coordinator()
            for device in ("dev-1", "dev-2"):
                fed.start_agent(device)
            assert fed.processes["coordinator"].wait(timeout=120) == 0, fed.log("coordinator")[-3000:]
            wait_until(lambda: all("event=release_installed version=1 " in fed.log(d) for d in ("dev-1", "dev-2")),
                       60.0, "release 1 on dev-1 and dev-2")

            enrollment.revoke(load_config(fed.config_path, env={}), "dev-2")
            revoked_at = time.time()
            monkeypatch.setenv("FEDPRUNE_COORDINATOR_ROUNDS_TOTAL", "2")
            fed.start_coordinator()
            fed.wait_for_coordinator()
            fed.start_agent("dev-3")
            assert fed.processes["coordinator"].wait(timeout=120) == 0, fed.log("coordinator")[-3000:]
            wait_until(lambda: all("event=release_installed version=2 " in fed.log(d) for d in ("dev-1", "dev-3")),
                       60.0, "release 2 on dev-1 and dev-3")
            wait_until(lambda: "reason=unknown_key" in fed.log("dev-2"), 30.0, "dev-2 to meet a key it lacks")
        finally:
            codes = fed.stop_all()
        assert set(codes.values()) <= {0}, codes
        captured = drain(spy)
        spy.close()

    # (c) the late joiner got the retained release under the current key, then the next one
    assert "event=release_installed version=1 " in fed.log("dev-3")
    assert "event=release_installed version=2 " not in fed.log("dev-2")
    assert "event=group_key_rotated" in fed.log("coordinator")

    envelopes = complete_envelopes(captured)
    phases = {(parse_header(e)[0].kind, parse_header(e)[0].sent_at >= revoked_at) for e in envelopes}
    assert {(Kind.TASK, False), (Kind.RELEASE, False), (Kind.TASK, True), (Kind.RELEASE, True)} <= phases
    layout = layout_for(ModelRef(config.federation.model, tuple(config.federation.input_shape),
                                 config.federation.num_classes))
    bundles = {d: load_bundle(tmp_path / "devices" / d / "bundle.json") for d in DEVICES}
    coordinator = bundles["dev-1"].coordinator

    def keys_granted(device: str, identity: Identity) -> KeyRing:
        """Every federation key that ``identity`` can open from the grants on ``device``'s inbox."""
        channel = AgentChannel(federation=FED, device=device, identity=identity, coordinator=coordinator,
                               layout=layout, key_capacity=64)
        for topic, payload in captured:
            if topic == inbox_topic(FED, device):
                try:
                    channel.receive(topic, payload, time.time())
                except (OpenFailed, Replayed):
                    pass  # sealed to someone else; a grant redelivered
        return channel.group_keys

    def opens(envelope: bytes, keys: KeyRing) -> bool:
        try:
            decrypt_broadcast(envelope, parse_header(envelope)[1], coordinator, keys.get)
        except UnknownKey:
            return False
        return True

    # (a) an observer with the coordinator's public key opens no grant, hence no broadcast
    for device in DEVICES:
        observer = keys_granted(device, Identity.generate())
        assert not any(opens(e, observer) for e in envelopes), f"the observer of {device}'s inbox read a broadcast"
    for envelope in envelopes:
        header, n = parse_header(envelope)
        assert header.suite is Suite.GROUP_AES256_GCM, header
        with pytest.raises(Exception):
            msgpack.unpackb(envelope[n + KEY_ID_LEN:])
    released = [p.read_bytes() for p in fed.state_dir.rglob("*.onnx")]
    assert released, "no ONNX release on the coordinator's disk to look for"
    for blob in released:
        window = blob[len(blob) // 2: len(blob) // 2 + 64]
        assert not any(window in p for _, p in captured), "ONNX bytes in the clear on the wire"

    # (b) a member reads every broadcast; the revoked dev-2 none made after its revocation
    member = keys_granted("dev-1", bundles["dev-1"].identity)
    assert all(opens(e, member) for e in envelopes)
    revoked = keys_granted("dev-2", bundles["dev-2"].identity)
    before = [e for e in envelopes if parse_header(e)[0].sent_at < revoked_at]
    after = [e for e in envelopes if parse_header(e)[0].sent_at >= revoked_at]
    assert all(opens(e, revoked) for e in before), "dev-2 was a member in phase 1"
    assert not any(opens(e, revoked) for e in after), "the revoked device read a broadcast made after its revocation"


def drain(link) -> list[tuple[str, bytes]]:
    out = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            out.append(link.messages.get(timeout=0.2))
        except queue.Empty:
            if out:
                break
    return out


def complete_envelopes(captured: list[tuple[str, bytes]]) -> list[bytes]:
    """Every task and release transfer the broker carried, reassembled (no key needed for that)."""
    reassembler = Reassembler(max_payload=1 << 26)
    out = []
    for topic, payload in captured:
        if payload and parse_topic(topic).kind in (TopicKind.TASK, TopicKind.RELEASE):
            try:
                envelope = reassembler.feed(payload, time.time(), parse_topic(topic).kind.value)
            except ProtocolError:
                continue
            if envelope is not None:
                out.append(bytes(envelope))
    return out
