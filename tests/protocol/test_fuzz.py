"""Robustness: 10^4 random and mutated inputs per decoder; only ProtocolError may escape.

A seeded generator in a plain loop (not hypothesis) keeps 10^4 cases per decoder to seconds.
Inputs are valid encodings mutated (bit flips, truncation, extension, splices, random slices,
forged huge length prefixes) plus msgpack structures of the right shape with wrong leaves.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import msgpack
import numpy as np
import pytest

from fedprune.protocol import codec
from fedprune.protocol.chunks import Reassembler, parse_chunk, split
from fedprune.protocol.envelope import Header, Suite, open_envelope, parse_header, verify_envelope
from fedprune.protocol.errors import ProtocolError
from fedprune.protocol.messages import Kind
from fedprune.protocol.sparse import SparseParams, ValueDtype, decode_masks, decode_values, encode_masks, encode_values
from fedprune.protocol.wire import Limits
from tests.fuzz.engine import mutate
from tests.protocol.factories import (
    COORD, DEVICES, FED, LAYOUT, T0, TRAINABLE, agent_channel, coordinator_channel, masks, params, register,
    reject, release, status, task_world, update,
)

N = 10_000
LEAVES: list[Any] = [None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, float("nan"), float("inf"), "", "x" * 70,
                     "dev-a", b"", b"\x00" * 9, [], {}, [1, 2], {"k": 1}, [[[]]], 3]


def mutate_object(obj: Any, r: random.Random) -> Any:
    """Replace, drop or add one node somewhere in a decoded msgpack structure."""
    if isinstance(obj, dict) and obj:
        key = r.choice(list(obj))
        out = dict(obj)
        roll = r.random()
        if roll < 0.1:
            del out[key]
        elif roll < 0.15:
            out["zz"] = r.choice(LEAVES)
        else:
            out[key] = mutate_object(obj[key], r) if r.random() < 0.5 else r.choice(LEAVES)
        return out
    if isinstance(obj, list) and obj:
        out = list(obj)
        i = r.randrange(len(out))
        roll = r.random()
        if roll < 0.1:
            del out[i]
        elif roll < 0.2:
            out.append(r.choice(LEAVES))
        else:
            out[i] = mutate_object(obj[i], r) if r.random() < 0.5 else r.choice(LEAVES)
        return out
    if isinstance(obj, bytes) and obj and r.random() < 0.5:
        return obj[: r.randrange(len(obj))]
    return r.choice(LEAVES)


def split_body(data: bytes) -> tuple[Any, bytes]:
    """A framed body's meta object and its tensor tail, for structure-aware mutation."""
    n = int.from_bytes(data[:4], "big")
    return msgpack.unpackb(data[4 : 4 + n], raw=False), data[4 + n :]


def join_body(meta: Any, tail: bytes) -> bytes:
    head = msgpack.packb(meta, use_bin_type=True)
    return len(head).to_bytes(4, "big") + head + tail


def run(
    decoder: Callable[[bytes], Any], corpus: list[bytes], seed: int, structured: list[Any] | None = None, join=join_body
) -> int:
    r = random.Random(seed)
    accepted = 0
    for i in range(N):
        if structured and i % 3 == 0:
            meta, tail = r.choice(structured)
            data = join(mutate_object(meta, r), tail)
        else:
            data = mutate(r.choice(corpus), r, corpus)
        try:
            decoder(data)
            accepted += 1
        except ProtocolError:
            pass
    return accepted


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(7)
    t, store, new = task_world(rng)
    bodies = {
        Kind.TASK: codec.encode_body(t),
        Kind.UPDATE: codec.encode_body(update(rng, t), value_dtype=ValueDtype.INT8),
        Kind.REGISTER: codec.encode_body(register()),
        Kind.STATUS: codec.encode_body(status()),
        Kind.RELEASE: codec.encode_body(release()),
        Kind.REJECT: codec.encode_body(reject()),
    }
    changed = codec.encode_body(update(rng, t, new_masks=new), base_masks=t.masks)
    return dict(rng=rng, task=t, store=store, bodies=bodies, changed=changed)


@pytest.mark.timeout(120)
def test_message_decode_raises_only_protocol_errors(world):
    bodies = world["bodies"]
    corpus = list(bodies.values()) + [world["changed"]]
    structured = [split_body(b) for b in corpus]
    kinds = list(bodies)
    r = random.Random(1)

    def decode(data: bytes) -> None:
        kind = r.choice(kinds)
        sender = "dev-a" if kind in (Kind.UPDATE, Kind.REGISTER, Kind.STATUS) else ""
        h = Header(kind, Suite.SIGNED_ED25519, FED, sender, 5, 1, T0, 0, r.choice([0, 0, 1]))
        codec.decode_body(h, data, layout_for=lambda _m: LAYOUT, masks=world["store"], limits=Limits(max_depth=6))

    run(decode, corpus, seed=11, structured=structured)
    for kind, body in bodies.items():  # the unmutated corpus still decodes
        sender = "dev-a" if kind in (Kind.UPDATE, Kind.REGISTER, Kind.STATUS) else ""
        codec.decode_body(Header(kind, Suite.SIGNED_ED25519, FED, sender, 5, 1, T0), body,
                          layout_for=lambda _m: LAYOUT, masks=world["store"])


@pytest.mark.timeout(120)
def test_sparse_value_decode_raises_only_protocol_errors(world):
    rng, m = world["rng"], world["task"].masks
    corpus = [encode_values(SparseParams.from_dense(TRAINABLE, params(rng, m, TRAINABLE), m), d) for d in ValueDtype]
    structured = [split_body(b) for b in corpus]
    run(lambda data: decode_values(data, TRAINABLE, m), corpus, seed=12, structured=structured)


@pytest.mark.timeout(120)
def test_mask_decode_raises_only_protocol_errors(world):
    rng = world["rng"]
    corpus = [encode_masks(LAYOUT, masks(rng, d)) for d in (0.0, 0.02, 0.5, 1.0)]
    structured = [(msgpack.unpackb(b, raw=False), b"") for b in corpus]
    plain = lambda meta, _tail: msgpack.packb(meta, use_bin_type=True)  # noqa: E731 - masks are unframed msgpack
    run(lambda data: decode_masks(data, LAYOUT), corpus, seed=13, structured=structured, join=plain)


@pytest.mark.timeout(120)
def test_chunk_parse_raises_only_protocol_errors():
    corpus = split(bytes(range(256)) * 12, transfer_id=5, max_size=1024) + split(b"tiny", transfer_id=6)
    run(lambda data: parse_chunk(data, 1 << 20), corpus, seed=14)


@pytest.mark.timeout(120)
def test_reassembler_feed_raises_only_protocol_errors_and_stays_bounded():
    corpus = split(bytes(range(256)) * 40, transfer_id=5, max_size=1024) + split(b"tiny", transfer_id=6)
    r = Reassembler(max_transfers=8, max_buffered=64 * 1024, max_age=50.0, max_payload=1 << 20)
    clock = iter(range(N))

    def feed(data: bytes) -> None:
        r.feed(data, float(next(clock)), "src")
        assert len(r) <= 8 and r.buffered_bytes <= 64 * 1024

    run(feed, corpus, seed=15)


@pytest.mark.timeout(120)
def test_verify_and_open_raise_only_protocol_errors(world):
    signed = [p.payload[60:] for p in coordinator_channel().send(reject(), T0)]
    sealed = [p.payload[60:] for p in agent_channel().send(register(), T0)]

    def verify(data: bytes) -> None:
        h, n = parse_header(data)
        verify_envelope(data, n, COORD.public)

    def open_(data: bytes) -> None:
        h, n = parse_header(data)
        open_envelope(data, h, n, COORD, DEVICES["dev-a"].public)

    assert run(verify, signed, seed=16) < N // 100
    assert run(open_, sealed, seed=17) < N // 100


@pytest.mark.timeout(180)
def test_channel_receive_raises_only_protocol_errors(world):
    t = world["task"]
    agent, coord = agent_channel(), coordinator_channel()
    agent.remember_masks(t.mask_version, t.masks)
    uplink = agent.send(update(world["rng"], t), T0) + agent.send(status(), T0) + agent.send(register(), T0)
    downlink = coord.send(t, T0) + coord.send(release(), T0) + coord.send(reject(), T0)
    topics_up = sorted({p.topic for p in uplink}) + [p.topic.replace("dev-a", "dev-b") for p in uplink[:1]]
    topics_down = sorted({p.topic for p in downlink}) + ["fedprune/v1/fed-1/inbox/dev-b", "nonsense"]
    r = random.Random(18)
    receivers = [(coordinator_channel(), topics_up), (agent_channel(), topics_down)]
    receivers[0][0].remember_masks(t.mask_version, t.masks)

    def receive(data: bytes) -> None:
        channel, names = r.choice(receivers)
        channel.receive(r.choice(names), data, T0 + r.choice([0, 1, 1e6]))
        assert channel.reassembler.buffered_bytes <= channel.reassembler.max_buffered

    run(receive, [p.payload for p in uplink + downlink], seed=19)
