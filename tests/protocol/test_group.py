"""Broadcasts only members read: tasks and releases under the federation key, key grants per
member, held broadcasts, rotation on a member change, and tampering with stable reasons."""

from __future__ import annotations

import json

import pytest

from fedprune.protocol import codec, crypto
from fedprune.protocol.chunks import split
from fedprune.protocol.crypto import GroupKey
from fedprune.protocol.envelope import (
    COORDINATOR, MINOR, Header, Suite, decrypt_broadcast, encrypt_broadcast, parse_header, unwrap_group_key,
    wrap_group_key,
)
from fedprune.protocol.errors import BadSignature, DecodeError, OpenFailed, Replayed, UnknownKey, UnsupportedVersion
from fedprune.protocol.messages import KeyGrant, Kind, ModelRelease, RoundTask
from tests.protocol.factories import (
    COORD, DEVICES, FED, GROUP, LAYOUT, T0, agent_channel, coordinator_channel, deliver, reject, release, task,
)
from tests.protocol.test_vectors import VALID

MEMBERS = {d: i.public for d, i in DEVICES.items()}


def keyless(device: str = "dev-a"):
    """A member whose grant has not arrived yet."""
    channel = agent_channel(device)
    channel.group_keys = crypto.KeyRing()
    return channel


def test_a_grant_unlocks_the_task_and_release_that_arrived_before_it(rng):
    coord, agent = coordinator_channel(), keyless()
    grants = coord.rekey(MEMBERS, T0)
    assert [(g.topic, g.retain) for g in grants] == [(f"fedprune/v1/{FED}/inbox/{d}", True) for d in sorted(MEMBERS)]
    t = task(rng)
    for publications in (coord.send(t, T0 + 1), coord.send(release(), T0 + 2)):
        with pytest.raises(UnknownKey) as err:
            deliver(agent, publications, T0 + 2)
        assert err.value.reason == "unknown_key"
    (grant,) = deliver(agent, grants[:1], T0 + 3)
    assert isinstance(grant, KeyGrant) and grant.key_id == coord.group_key.key_id
    got_task, got_release = agent.unlocked(T0 + 3)
    assert isinstance(got_task, RoundTask) and got_task.round == t.round
    assert isinstance(got_release, ModelRelease) and got_release.onnx == release().onnx
    assert agent.unlocked(T0 + 4) == []


def test_only_the_newest_held_broadcast_of_a_kind_waits(rng):
    coord, agent = coordinator_channel(), keyless()
    grants = coord.rekey(MEMBERS, T0)
    for i in range(3):
        with pytest.raises(UnknownKey):
            deliver(agent, coord.send(task(rng, round_=5 + i), T0 + i), T0 + i)
    deliver(agent, grants[:1], T0 + 3)
    (latest,) = agent.unlocked(T0 + 3)
    assert latest.round == 7


def test_a_device_dropped_at_rekey_reads_nothing_sent_after_it(rng):
    coord, kept, dropped = coordinator_channel(), agent_channel("dev-a"), agent_channel("dev-b")
    before = coord.send(task(rng), T0)
    assert deliver(dropped, before, T0)  # a member until now
    publications = coord.rekey({"dev-a": MEMBERS["dev-a"]}, T0 + 1, dropped=["dev-b"])
    grant, clear = publications
    assert clear.topic.endswith("/inbox/dev-b") and clear.payload == b"" and clear.retain
    assert dropped.receive(clear.topic, clear.payload, T0 + 1) is None  # clearing a retained grant
    with pytest.raises(ValueError, match="not a member"):
        coord.grant("dev-b", T0 + 1)
    deliver(kept, [grant], T0 + 1)
    after = [coord.send(task(rng, round_=6), T0 + 2), coord.send(release(), T0 + 3)]
    for publications in after:
        assert deliver(kept, publications, T0 + 4)
        with pytest.raises(UnknownKey):
            deliver(dropped, publications, T0 + 4)


def test_a_broadcast_sent_just_before_a_rotation_still_opens(rng):
    coord, agent = coordinator_channel(), agent_channel()
    in_flight = coord.send(task(rng), T0)
    deliver(agent, coord.rekey(MEMBERS, T0 + 1)[:1], T0 + 1)
    assert deliver(agent, in_flight, T0 + 2)  # the agent keeps the last few keys


def test_a_coordinator_without_a_key_broadcasts_nothing(rng):
    from fedprune.protocol.channel import CoordinatorChannel

    coord = CoordinatorChannel(federation=FED, identity=COORD, devices=MEMBERS, layout=LAYOUT)
    with pytest.raises(ValueError, match="rekey"):
        coord.send(task(rng), T0)


def test_an_older_grant_cannot_replace_a_newer_one(rng):
    coord, agent = coordinator_channel(), keyless()
    old = coord.rekey(MEMBERS, T0)[:1]
    new = coord.rekey(MEMBERS, T0 + 1)[:1]
    deliver(agent, new, T0 + 2)
    with pytest.raises(Replayed):
        deliver(agent, old, T0 + 2)


def test_a_grant_for_another_device_or_sealed_to_another_device_is_refused(rng):
    coord = coordinator_channel()
    grant_b = coord.rekey(MEMBERS, T0)[1]
    with pytest.raises(DecodeError, match="inbox of 'dev-b' delivered to 'dev-a'"):
        deliver(keyless("dev-a"), [grant_b], T0)
    head = Header(Kind.KEY, Suite.SIGNED_ED25519, FED, COORDINATOR, 0, 1, T0).pack()
    wrapped = wrap_group_key(head, GROUP, COORD, DEVICES["dev-b"].public)
    with pytest.raises(OpenFailed) as err:  # wrong recipient
        unwrap_group_key(head, GROUP.key_id, wrapped, DEVICES["dev-a"], COORD.public)
    assert err.value.reason == "open_failed"
    assert unwrap_group_key(head, GROUP.key_id, wrapped, DEVICES["dev-b"], COORD.public) == GROUP
    with pytest.raises(OpenFailed):  # the wrap is bound to its key id and header
        unwrap_group_key(head, bytes(8), wrapped, DEVICES["dev-b"], COORD.public)


def _group_envelope(rng) -> tuple[Header, bytes, bytes]:
    h = Header(Kind.TASK, Suite.GROUP_AES256_GCM, FED, COORDINATOR, 5, 7, T0)
    body = codec.encode_body(task(rng))
    return h, body, encrypt_broadcast(h, body, GROUP, COORD)


def test_tampering_fails_with_a_stable_reason_at_every_layer(rng):
    h, body, env = _group_envelope(rng)
    n = len(h.pack())
    key_for = {GROUP.key_id: GROUP}.get
    assert decrypt_broadcast(env, n, COORD.public, key_for) == body
    other = GroupKey(bytes(8), GROUP.secret)
    swapped = env[:n] + other.key_id + env[n + 8 :]
    truncated = env[:-100]
    for forged, reason in ((swapped, "bad_signature"), (truncated, "bad_signature")):
        with pytest.raises(BadSignature) as err:  # the signature covers the key id and the ciphertext
            decrypt_broadcast(forged, n, COORD.public, key_for)
        assert err.value.reason == reason
    # Past the signature (as if re-signed with the coordinator key): the AEAD still refuses both.
    signed = env[:-crypto.SIGNATURE_LEN]
    for forged in (signed[:n] + other.key_id + signed[n + 8 :], signed[:-1]):
        forged += COORD.sign(forged)
        with pytest.raises(OpenFailed) as err:
            decrypt_broadcast(forged, n, COORD.public, {GROUP.key_id: GROUP, other.key_id: other}.get)
        assert err.value.reason == "open_failed"
    with pytest.raises(UnknownKey):
        decrypt_broadcast(env, n, COORD.public, {}.get)


def test_the_group_suite_is_refused_on_rejects_and_signed_only_tasks_need_an_older_minor():
    agent = agent_channel()
    h = Header(Kind.REJECT, Suite.GROUP_AES256_GCM, FED, COORDINATOR, 5, 9, T0)
    env = encrypt_broadcast(h, codec.encode_body(reject()), GROUP, COORD)
    with pytest.raises(DecodeError, match="refused"):
        agent.receive(f"fedprune/v1/{FED}/inbox/dev-a", split(env, transfer_id=1)[0], T0)
    legacy = bytes.fromhex(json.loads(VALID.read_text())["messages"]["task"]["envelope"])  # 1.1: signed only
    got = agent.receive(f"fedprune/v1/{FED}/task", split(legacy, transfer_id=2)[0], T0 + 1)
    assert isinstance(got, RoundTask) and parse_header(legacy)[0].minor == 1  # a coordinator not yet upgraded


def test_an_unknown_suite_from_a_newer_minor_asks_for_an_upgrade(rng):
    _, _, env = _group_envelope(rng)
    newer = bytearray(env)
    newer[3], newer[5] = MINOR + 1, 9  # a newer minor, suite 9
    with pytest.raises(UnsupportedVersion):
        parse_header(bytes(newer))
    newer[3] = MINOR
    with pytest.raises(DecodeError) as err:
        parse_header(bytes(newer))
    assert err.value.reason == "decode"
