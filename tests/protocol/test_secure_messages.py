"""The secure-aggregation stages on the wire: each round-trips through the real channels (sealed
uplinks on the device's update topic, downlinks encrypted under the federation key on its inbox),
masked vectors pack at exactly ``bits`` bits, and what a peer or the broker could tamper with is
refused with a stable reason."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedprune.protocol import codec
from fedprune.protocol.envelope import COORDINATOR, Header, Suite, sign_envelope
from fedprune.protocol.chunks import split
from fedprune.protocol.errors import DecodeError, ProtocolError
from fedprune.protocol.secure_codec import pack_bits, unpack_bits
from fedprune.protocol.secure_messages import (
    SecureInbox, SecureKeys, SecureMasked, SecureNeighbours, SecureReveal, SecureShares, SecureUnmask,
)
from fedprune.protocol.secure_setup import SecureSetup
from tests.protocol.factories import FED, T0, agent_channel, coordinator_channel, deliver, task

SID = bytes(range(8))


def uplinks(rng):
    return [
        SecureKeys(round=5, device="dev-a", session=SID, share_public=bytes(32), mask_public=bytes(range(32)),
                   seed_commitment=bytes(range(1, 33)), noise_multiplier=0.7,
                   n_examples=40, class_losses={0: (0.5, 10), 2: (1.25, 30)}, max_abs=0.03,
                   metrics={"train_loss": 0.7}),
        SecureShares(round=5, device="dev-a", session=SID, ciphertexts={"dev-b": b"x" * 170, "dev-c": b"y" * 170}),
        SecureMasked(round=5, device="dev-a", session=SID, bits=13,
                     values=rng.integers(0, 2**13, size=1001, dtype=np.uint32)),
        SecureReveal(round=5, device="dev-a", session=SID, shares={"dev-b": b"s" * 68}),
    ]


def downlinks():
    return [
        SecureNeighbours(round=5, device="dev-a", session=SID, weight=0.125, max_weight=0.25, value_range=0.5,
                         scale=8192.0, keys={"dev-b": (bytes(32), bytes(range(32)))}),
        SecureInbox(round=5, device="dev-a", session=SID, ciphertexts={"dev-b": b"z" * 170}),
        SecureUnmask(round=5, device="dev-a", session=SID, survivors=("dev-a", "dev-b"), dropped=("dev-c",)),
    ]


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f.name), getattr(b, f.name)) if isinstance(getattr(a, f.name), np.ndarray)
               else getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(a))


def opened_round(rng):
    """A coordinator that opened round 5 under secure aggregation, and dev-a holding its task."""
    coord, agent = coordinator_channel(), agent_channel()
    t = dataclasses.replace(task(rng), secure=SecureSetup(SID, 16, 4, 3, 1.1))
    (got,) = deliver(agent, coord.send(t, T0), T0)
    assert got.secure == t.secure
    return coord, agent


def test_every_uplink_stage_reaches_the_coordinator_sealed_on_the_update_topic(rng):
    coord, agent = opened_round(rng)
    for i, msg in enumerate(uplinks(rng)):
        publications = agent.send(msg, T0 + 1 + i)
        assert {p.topic for p in publications} == {f"fedprune/v1/{FED}/update/dev-a"}
        (got,) = deliver(coord, publications, T0 + 1 + i)
        assert type(got) is type(msg) and same(got, msg)


def test_every_downlink_stage_reaches_its_device_encrypted_on_its_inbox(rng):
    coord, agent = opened_round(rng)
    for i, msg in enumerate(downlinks()):
        publications = coord.send(msg, T0 + 1 + i)
        assert {p.topic for p in publications} == {f"fedprune/v1/{FED}/inbox/dev-a"}
        assert b"dev-b" not in b"".join(p.payload for p in publications)  # the broker reads no neighbour id
        (got,) = deliver(agent, publications, T0 + 1 + i)
        assert same(got, msg)


def test_a_stage_for_another_device_or_signed_only_is_refused(rng):
    coord, agent = opened_round(rng)
    other = agent_channel("dev-b")
    with pytest.raises(DecodeError, match="inbox of 'dev-a' delivered to 'dev-b'"):
        deliver(other, coord.send(downlinks()[0], T0 + 1), T0 + 1)
    h = Header(downlinks()[0].KIND, Suite.SIGNED_ED25519, FED, COORDINATOR, 5, 2_000_000_000_000_000, T0 + 2)
    signed_only = sign_envelope(h, codec.encode_body(downlinks()[0]), coord.identity)
    with pytest.raises(ProtocolError, match="encrypted to the members"):
        agent.receive(f"fedprune/v1/{FED}/inbox/dev-a", split(signed_only, transfer_id=1)[0], T0 + 2)


def test_a_replayed_stage_is_dropped_as_a_duplicate_transfer(rng):
    coord, agent = opened_round(rng)
    publications = agent.send(uplinks(rng)[0], T0 + 1)
    assert len(deliver(coord, publications, T0 + 1)) == 1
    before = coord.reassembler.duplicates
    assert deliver(coord, publications, T0 + 2) == []
    assert coord.reassembler.duplicates > before


@pytest.mark.parametrize("bits", [8, 13, 16, 24, 31, 32])
def test_masked_values_pack_at_exactly_their_bits(bits, rng):
    values = rng.integers(0, 2**bits, size=999, dtype=np.uint64).astype(np.uint32)
    packed = pack_bits(values, bits)
    assert len(packed) == (999 * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, bits, 999), values)
    with pytest.raises(DecodeError, match="do not hold"):
        unpack_bits(packed[:-1], bits, 999)


def test_invalid_stages_are_refused_on_construction():
    with pytest.raises(ValueError, match="below 2\\*\\*8"):
        SecureMasked(round=1, device="d", session=SID, bits=8, values=np.array([256], dtype=np.uint32))
    with pytest.raises(ValueError, match="both survive and drop"):
        SecureUnmask(round=1, device="d", session=SID, survivors=("a",), dropped=("a",))
    with pytest.raises(ValueError, match="weight=1.5: weights of a round sum to 1"):
        SecureNeighbours(round=1, device="d", session=SID, weight=1.5, max_weight=1.0, value_range=1.0, scale=1.0,
                         keys={})
    with pytest.raises(ValueError, match="max_weight=2.0: weights of a round sum to 1"):
        SecureNeighbours(round=1, device="d", session=SID, weight=0.5, max_weight=2.0, value_range=1.0, scale=1.0,
                         keys={})
    with pytest.raises(ValueError, match="session must be 8 bytes"):
        SecureShares(round=1, device="d", session=b"short", ciphertexts={})
    with pytest.raises(ValueError, match="more than half the neighbours"):
        SecureSetup(SID, 16, 4, 2)
