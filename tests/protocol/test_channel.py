import numpy as np
import pytest

from fedprune.protocol import topics
from fedprune.protocol.channel import AgentChannel, CoordinatorChannel, Publication
from fedprune.protocol.chunks import split
from fedprune.protocol.crypto import Aead
from fedprune.protocol.envelope import parse_header
from fedprune.protocol.errors import (
    BadSignature, DecodeError, LayoutMismatch, OpenFailed, ProtocolError, Replayed, Stale, UnknownMask, UnknownSender,
)
from fedprune.protocol.messages import ModelRelease, State
from fedprune.protocol.sparse import ValueDtype
from fedprune.protocol.topics import update_topic
from tests.protocol.factories import (
    COORD, DEVICES, FED, GROUP, LAYOUT, T0, agent_channel, assert_sparse_equal, coordinator_channel, deliver,
    identity, register, reject, release, status, task, update,
)


@pytest.fixture
def wired(rng):
    coord, agent = coordinator_channel(), agent_channel()
    t = task(rng)
    (got,) = deliver(agent, coord.send(t, T0), T0 + 1)
    return coord, agent, got


def reenvelope(pubs, transfer_id=999):
    """The same envelope, chunked afresh: what an attacker replaying captured traffic would send."""
    envelope = b"".join(p.payload[60:] for p in pubs)
    return [Publication(pubs[0].topic, c) for c in split(envelope, transfer_id=transfer_id)]


def test_one_round_trip_task_then_update(wired, rng):
    coord, agent, t = wired
    assert agent.replay.current_round == 5 and 2 in agent.masks
    u = update(rng, t)
    pubs = agent.send(u, T0 + 2)
    assert all(p.topic == update_topic(FED, "dev-a") and not p.retain for p in pubs)
    (got,) = deliver(coord, pubs, T0 + 3)
    assert_sparse_equal(got.delta, u.delta)
    dense = got.delta_params()
    assert set(dense) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_large_messages_are_chunked_and_reassembled(rng):
    coord, agent = coordinator_channel(max_chunk=1024), agent_channel(max_chunk=1024)
    t = task(rng, m={s.name: np.ones(s.shape, bool) for s in LAYOUT.masked})
    pubs = coord.send(t, T0)
    assert len(pubs) > 1 and all(len(p.payload) <= 1024 for p in pubs)
    out = [agent.receive(p.topic, p.payload, T0) for p in reversed(pubs)]
    assert out[:-1] == [None] * (len(pubs) - 1)
    assert_sparse_equal(out[-1].weights, t.weights)


def test_changed_mask_travels_relative_or_absolute_and_decodes(wired, rng):
    coord, agent, t = wired
    new = {k: v.copy() for k, v in t.masks.items()}
    new["fc1.weight"][:, 0] = True
    u = update(rng, t, new_masks=new)
    (got,) = deliver(coord, agent.send(u, T0 + 2), T0 + 2)
    assert got.mask_changed
    assert_sparse_equal(got.delta, u.delta)


def test_update_with_wrong_mask_claim_is_refused_at_send(wired, rng):
    coord, agent, t = wired
    other = {k: ~v for k, v in t.masks.items()}
    u = update(rng, t, new_masks=other)
    lying = type(u)(**{**u.__dict__, "mask_changed": False})
    with pytest.raises(ValueError, match="mask_changed=False"):
        agent.send(lying, T0)


def test_task_without_masks_uses_the_agents_cache_or_says_unknown_mask(wired, rng):
    coord, agent, t = wired
    lean = task(rng, round_=6, include_masks=False, m=t.masks)
    (got,) = deliver(agent, coord.send(lean, T0 + 5), T0 + 5)
    assert not got.include_masks and got.masks["fc1.weight"] is agent.masks.get(2)["fc1.weight"]
    fresh = agent_channel()
    with pytest.raises(UnknownMask, match="must include the mask"):
        deliver(fresh, coord.send(task(rng, round_=7, include_masks=False, m=t.masks), T0 + 6), T0 + 6)


def test_update_sealed_by_device_a_does_not_open_as_device_b(wired, rng):
    coord, agent, t = wired
    impostor = AgentChannel(
        federation=FED, device="dev-b", identity=DEVICES["dev-a"], coordinator=COORD.public, layout=LAYOUT
    )
    impostor.remember_masks(2, t.masks)
    with pytest.raises(OpenFailed):
        deliver(coord, impostor.send(update(rng, t, device="dev-b"), T0), T0)


def test_update_republished_on_another_devices_topic_is_refused(wired, rng):
    coord, agent, t = wired
    pubs = agent.send(update(rng, t), T0)
    moved = [Publication(update_topic(FED, "dev-b"), p.payload) for p in pubs]
    with pytest.raises(DecodeError, match="re-targeted"):
        deliver(coord, moved, T0)
    as_status = [Publication(topics.status_topic(FED, "dev-a"), p.payload) for p in pubs]
    with pytest.raises(DecodeError, match="re-targeted"):
        deliver(coord, as_status, T0)


def test_round_5_update_replayed_in_round_6_is_rejected(wired, rng):
    coord, agent, t = wired
    pubs = agent.send(update(rng, t), T0 + 2)
    assert len(deliver(coord, pubs, T0 + 2)) == 1
    assert deliver(coord, pubs, T0 + 3) == []  # a QoS 1 duplicate is dropped quietly
    coord.send(task(rng, round_=6, m=t.masks), T0 + 60)
    with pytest.raises(Replayed):
        deliver(coord, reenvelope(pubs), T0 + 61)
    coord.send(task(rng, round_=7, m=t.masks), T0 + 120)
    with pytest.raises(Stale):
        deliver(coord, reenvelope(pubs, 1000), T0 + 121)


def test_unknown_or_revoked_devices_are_unknown_senders(rng):
    coord = coordinator_channel()
    stranger = AgentChannel(federation=FED, device="dev-z", identity=identity(9), coordinator=COORD.public, layout=LAYOUT)
    with pytest.raises(UnknownSender) as err:
        deliver(coord, stranger.send(register("dev-z"), T0), T0)
    assert err.value.reason == "unknown_sender"
    registry = {"dev-a": DEVICES["dev-a"].public}
    revocable = CoordinatorChannel(
        federation=FED, identity=COORD, devices=lambda d: registry.get(d), layout=LAYOUT
    )
    agent = agent_channel()
    assert deliver(revocable, agent.send(register(), T0), T0)
    registry.clear()
    with pytest.raises(UnknownSender):
        deliver(revocable, agent.send(register(), T0 + 1), T0 + 1)


def test_broadcast_from_a_rogue_coordinator_is_a_bad_signature(rng):
    rogue = coordinator_channel()
    rogue.identity = identity(66)
    with pytest.raises(BadSignature):
        deliver(agent_channel(), rogue.send(task(rng), T0), T0)


def test_status_last_will_and_register_streams(rng):
    coord, agent = coordinator_channel(), agent_channel()
    will = agent.last_will(T0)
    assert deliver(coord, agent.send(register(), T0), T0)
    (online,) = deliver(coord, agent.send(status(state=State.ONLINE), T0 + 1), T0 + 1)
    (gone,) = deliver(coord, [will], T0 + 86400)  # delivered a day later by the broker
    assert gone.state is State.OFFLINE and online.state is State.ONLINE
    old = agent.send(status(state=State.IDLE, now=T0), T0 + 2)
    deliver(coord, agent.send(status(state=State.TRAINING, now=T0), T0 + 3), T0 + 3)
    with pytest.raises(Replayed):
        deliver(coord, old, T0 + 4)  # an older status arriving after a newer one is dropped
    with pytest.raises(Stale):
        deliver(coord_fresh := coordinator_channel(), agent.send(status(), T0 + 5), T0 + 5000)
    assert coord_fresh.replay.current_round == 0


def test_release_goes_to_retained_per_chunk_topics_and_clears_leftovers(rng):
    coord, agent = coordinator_channel(max_chunk=1024), agent_channel()
    big = ModelRelease.of(1, bytes(5000))
    pubs = coord.send(big, T0)
    assert all(p.retain for p in pubs) and [p.topic.rsplit("/", 1)[1] for p in pubs] == [str(i) for i in range(len(pubs))]
    (got,) = deliver(agent, pubs, T0 + 30 * 86400)  # retained: the age of a release does not matter
    assert got == big
    small = coord.send(release(), T0 + 1)
    assert [p.payload for p in small if not p.payload] == [b""] * (len(pubs) - 1)
    assert deliver(agent, small, T0 + 2) == [release()]
    with pytest.raises(Replayed):
        deliver(agent_channel(), reenvelope(small) + reenvelope(pubs), T0)  # an older release after a newer one


def test_rejects_reach_only_their_device(rng):
    coord, a, b = coordinator_channel(), agent_channel(), agent_channel("dev-b")
    pubs = coord.send(reject("dev-a"), T0)
    assert pubs[0].topic == topics.inbox_topic(FED, "dev-a")
    assert deliver(a, pubs, T0) == [reject("dev-a")]
    with pytest.raises(DecodeError, match="inbox"):
        deliver(b, pubs, T0)


def test_wrong_federation_kind_and_direction_are_refused(rng):
    coord, agent = coordinator_channel(), agent_channel()
    pubs = agent.send(register(), T0)
    with pytest.raises(DecodeError, match="federation"):
        coord.receive(pubs[0].topic.replace(FED, "fed-2"), pubs[0].payload, T0)
    with pytest.raises(DecodeError, match="agents do not receive"):
        agent.receive(pubs[0].topic, pubs[0].payload, T0)
    with pytest.raises(DecodeError, match="does not receive"):
        coord.receive(topics.task_topic(FED), b"x", T0)
    with pytest.raises(TypeError):
        agent.send(reject(), T0)
    with pytest.raises(ValueError, match="this channel is"):
        agent.send(register("dev-b"), T0)


def test_chacha_and_lossy_value_dtypes_work_end_to_end(wired, rng):
    coord, _, t = wired
    agent = agent_channel(aead=Aead.CHACHA20_POLY1305, value_dtype=ValueDtype.FLOAT16)
    agent.remember_masks(2, t.masks)
    u = update(rng, t)
    pubs = agent.send(u, T0)
    assert parse_header(pubs[0].payload[60:])[0].suite == 3
    (got,) = deliver(coord, pubs, T0)
    for name, v in u.delta.values.items():
        np.testing.assert_allclose(got.delta.values[name], v, rtol=2**-10, atol=1e-6)


def test_layout_resolver_errors_become_decode_errors(rng):
    def zoo(model):
        raise KeyError(model.name)

    agent = AgentChannel(federation=FED, device="dev-a", identity=DEVICES["dev-a"], coordinator=COORD.public, layout=zoo)
    agent.group_keys.put(GROUP)
    with pytest.raises(LayoutMismatch, match="cannot be built here"):
        deliver(agent, coordinator_channel().send(task(rng), T0), T0)


def test_sequence_numbers_are_unique_and_monotonic_across_restarts():
    a1 = agent_channel()
    seqs = [parse_header(a1.send(register(), T0)[0].payload[60:])[0].seq for _ in range(3)]
    a2 = agent_channel()  # restarted a second later, no state
    seqs.append(parse_header(a2.send(register(), T0 + 1)[0].payload[60:])[0].seq)
    assert seqs == sorted(set(seqs))


def test_every_receive_failure_is_a_protocol_error(wired):
    coord, agent, _ = wired
    for payload in (b"", b"\0" * 100, bytes(split(b"junk", transfer_id=1)[0])):
        with pytest.raises(ProtocolError):
            coord.receive(update_topic(FED, "dev-a"), payload, T0)
    with pytest.raises(ProtocolError):
        coord.receive(update_topic(FED, "dev-a"), "text", T0)
