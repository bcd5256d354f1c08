"""Fuzz targets: one function of ``bytes`` per piece of code that peer input reaches.

Every target takes one input and either returns or raises ``ProtocolError`` (the only error a
peer may cause); anything else, or a broken invariant (``AssertionError``), is a finding. The
same targets run under the seeded mutator of ``tests/fuzz/engine.py`` (CI: 10^4 inputs each)
and under atheris (``scripts/fuzz.sh``: coverage-guided, 10^5+ each).

Decoder targets read the input as the bytes a peer sent; those whose input holds a msgpack
object also say how to split it off (``Structure``) for the engine's structure-aware mutations.
Stateful targets (Reassembler, ReplayGuard, the coordinator's message handler) read it as a
*program*: a byte stream that ``Program`` turns into operations, so every input is a valid
program and mutations explore sequences, not just encodings.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import msgpack
import numpy as np

from fedprune.protocol import codec
from fedprune.protocol.chunks import HEADER_SIZE, Reassembler, parse_chunk, split
from fedprune.protocol.envelope import MINOR, Header, Suite, open_envelope, parse_header, verify_envelope
from fedprune.protocol.errors import ProtocolError, Replayed, Stale
from fedprune.protocol.messages import Kind
from fedprune.protocol.replay import ReplayGuard
from fedprune.protocol.sparse import SparseParams, ValueDtype, decode_masks, decode_values, encode_masks, encode_values
from fedprune.protocol.wire import Limits
from tests.protocol.factories import (
    COORD, DEVICES, FED, LAYOUT, T0, TRAINABLE, agent_channel, coordinator_channel, join_body, masks, params, register,
    reject, release, rewrite_meta, split_body, status, task_body_at_minor_2, task_world, update,
)


class Program:
    """Reads typed values from fuzz bytes; past the end every read returns zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def f64(self) -> float:
        return struct.unpack(">d", self.take(8))[0]

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.u8() % len(options)]

    def blob(self, limit: int = 512) -> bytes:
        return self.take(self.u16() % (limit + 1))


@dataclass(frozen=True)
class Structure:
    """Where an input holds a msgpack object: ``split`` takes it out (parsed) with the rest of
    the input, ``join`` packs a mutated object back in."""

    split: Callable[[bytes], tuple[Any, Any]]
    join: Callable[[Any, Any], bytes]


def framed(prefix: int = 0) -> Structure:
    """``prefix`` bytes of the target's own, then a framed body: u32 meta length, msgpack meta, tail."""

    def split(data: bytes) -> tuple[Any, Any]:
        meta, tail = split_body(data[prefix:])
        return meta, (data[:prefix], tail)

    return Structure(split, lambda meta, rest: rest[0] + join_body(meta, rest[1]))


MSGPACK = Structure(lambda data: (msgpack.unpackb(data, raw=False), None),
                    lambda obj, _rest: msgpack.packb(obj, use_bin_type=True))


@dataclass
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: list[bytes]
    max_peak_mib: float = 64.0
    notes: dict[str, int] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    structure: Structure | None = None


# ---- decoders --------------------------------------------------------------------------------
def _world() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    t, store, changed = task_world(rng)
    bodies = {
        Kind.TASK: [codec.encode_body(t)],
        Kind.UPDATE: [codec.encode_body(update(rng, t), value_dtype=d) for d in ValueDtype]
        + [codec.encode_body(update(rng, t, new_masks=changed), base_masks=t.masks)],
        Kind.REGISTER: [codec.encode_body(register())],
        Kind.STATUS: [codec.encode_body(status()),
                      codec.encode_body(replace(status(), release=3, epsilon_left=0.75))],
        Kind.RELEASE: [codec.encode_body(release())],
        Kind.REJECT: [codec.encode_body(reject())],
    }
    return dict(rng=rng, task=t, store=store, bodies=bodies)


def codec_target() -> Target:
    """decode_body: byte 0 picks the kind, byte 1 the schema minor (0 up to one newer than this
    build's); the rest is the body. Seeds: every kind at this minor, tasks of 1.2 and 1.0, and a
    status of 1.3 (without the release and epsilon left that 1.4 added)."""
    w = _world()
    kinds = list(Kind)
    notes: dict[str, int] = {}

    def run(data: bytes) -> None:
        if len(data) < 2:
            return
        kind = kinds[data[0] % len(kinds)]
        sender = "dev-a" if kind in (Kind.UPDATE, Kind.REGISTER, Kind.STATUS) else ""
        header = Header(kind, Suite.SIGNED_ED25519, FED, sender, 5, 1, T0, 0, data[1] % (MINOR + 2))
        try:
            codec.decode_body(header, data[2:], layout_for=lambda _m: LAYOUT, masks=w["store"],
                              limits=Limits(max_depth=6))
        except ProtocolError as exc:
            _note_translation(notes, exc)
            raise

    seeds = [bytes([kinds.index(k), MINOR]) + b for k, bs in w["bodies"].items() for b in bs]
    task_1_2 = task_body_at_minor_2(w["task"])  # with the class-loss medians 1.3 removed
    task_1_0 = rewrite_meta(task_1_2, lambda meta: meta["hp"].pop("max_sparse_lr_factor"))
    seeds += [bytes([kinds.index(Kind.TASK), 2]) + task_1_2, bytes([kinds.index(Kind.TASK), 0]) + task_1_0]
    status_1_3 = rewrite_meta(w["bodies"][Kind.STATUS][1], lambda meta: [meta.pop("rel"), meta.pop("eps")])
    seeds.append(bytes([kinds.index(Kind.STATUS), 3]) + status_1_3)
    return Target("codec", run, seeds, notes=notes, structure=framed(prefix=2))


def _note_translation(notes: dict[str, int], exc: ProtocolError) -> None:
    """Count errors the catch-all translated (an unexpected exception type inside a decoder)."""
    text = str(exc)
    for name in ("KeyError", "IndexError", "AttributeError", "OverflowError", "ZeroDivisionError",
                 "RecursionError", "struct.error", "error:"):
        if f": {name}" in text:
            notes[name] = notes.get(name, 0) + 1


def sparse_values_target() -> Target:
    w = _world()
    m = w["task"].masks
    seeds = [encode_values(SparseParams.from_dense(TRAINABLE, params(w["rng"], m, TRAINABLE), m), d)
             for d in ValueDtype]

    def run(data: bytes) -> None:
        decoded = decode_values(data, TRAINABLE, m)
        for name, values in decoded.values.items():
            assert values.size == (int(m[name].sum()) if name in m else TRAINABLE[name].size), name

    return Target("sparse_values", run, seeds, structure=framed())


def masks_target() -> Target:
    rng = np.random.default_rng(3)
    seeds = [encode_masks(LAYOUT, masks(rng, d)) for d in (0.0, 0.02, 0.5, 1.0)]

    def run(data: bytes) -> None:
        decoded = decode_masks(data, LAYOUT)
        for spec in LAYOUT.masked:
            assert decoded[spec.name].shape == spec.shape and decoded[spec.name].dtype == bool

    return Target("masks", run, seeds, structure=MSGPACK)


def envelope_target() -> Target:
    """parse_header, then verify (signed) or open (sealed): a forgery must never authenticate."""
    signed = [p.payload[HEADER_SIZE:] for p in coordinator_channel().send(reject(), T0)]
    sealed = [p.payload[HEADER_SIZE:] for p in agent_channel().send(register(), T0)]
    originals = set(signed + sealed)

    def run(data: bytes) -> None:
        header, n = parse_header(data)
        if header.suite is Suite.SIGNED_ED25519:
            verify_envelope(data, n, COORD.public)
        else:
            open_envelope(data, header, n, COORD, DEVICES["dev-a"].public)
        assert data in originals, "a mutated envelope authenticated"

    return Target("envelope", run, signed + sealed)


def chunk_target() -> Target:
    seeds = split(bytes(range(256)) * 12, transfer_id=5, max_size=1024) + split(b"tiny", transfer_id=6)

    def run(data: bytes) -> None:
        head, piece = parse_chunk(data, 1 << 20)
        assert 0 <= head.index < head.count and len(piece) <= head.total

    return Target("chunk", run, seeds)


# ---- stateful: Reassembler -------------------------------------------------------------------
REASSEMBLER_BOUNDS = dict(max_transfers=8, max_buffered=48 * 1024, max_age=50.0, max_payload=1 << 20,
                          remember_completed=64)


def reassembler_target() -> Target:
    """A program of feeds (genuine, mutated or raw chunks, from a few sources), clock steps and
    checks: bounded transfers and bytes, and every payload returned matches its digest."""
    payloads = [bytes([i]) * (3000 + 1500 * i) for i in range(4)] + [b"tiny"]
    pool = [c for i, p in enumerate(payloads) for c in split(p, transfer_id=i, max_size=1024)]
    digests = {hashlib.sha256(p).digest() for p in payloads}

    def run(data: bytes) -> None:
        prog = Program(data)
        r = Reassembler(**REASSEMBLER_BOUNDS)
        now = 0.0
        for _ in range(256):
            if prog.done:
                break
            op = prog.u8() % 5
            if op == 0:
                now += prog.u8()
                continue
            if op == 1:
                chunk = prog.choice(pool)
            elif op == 2:
                chunk = bytearray(prog.choice(pool))
                i = prog.u16() % len(chunk)
                chunk[i] ^= prog.u8() | 1
                chunk = bytes(chunk)
            elif op == 3:
                chunk = prog.choice(pool)[:HEADER_SIZE] + prog.blob(1200)
            else:
                chunk = prog.blob(1200)
            try:
                out = r.feed(chunk, now, prog.choice(("a", "b", "")))
            except ProtocolError:
                out = None
            if out is not None:
                assert hashlib.sha256(out).digest() == chunk[28:60], "payload does not match its digest"
                assert op != 1 or hashlib.sha256(out).digest() in digests
            assert len(r) <= REASSEMBLER_BOUNDS["max_transfers"]
            assert 0 <= r.buffered_bytes <= REASSEMBLER_BOUNDS["max_buffered"]

    seeds = [bytes(b for i in range(len(pool)) for b in (1, i)), bytes([1, 0, 1, 1, 0, 200, 1, 2])]
    return Target("reassembler", run, seeds)


# ---- stateful: ReplayGuard -------------------------------------------------------------------
def replay_target() -> Target:
    """A program of advance / check / check_latest against a reference model of what must hold:
    a (sender, round, seq) is accepted at most once while its round is in the window; a stream's
    accepted seqs strictly increase; accepted messages lie in the time window; memory is capped."""
    senders = ("a", "b", "c", "")
    bounds = dict(round_window=1, time_window=100.0, max_clock_skew=10.0, max_entries=64, max_streams=6)

    def run(data: bytes) -> None:
        prog = Program(data)
        g = ReplayGuard(**bounds)
        accepted: set[tuple[str, int, int]] = set()
        latest: OrderedDict[tuple[str, str], int] = OrderedDict()  # the guard's LRU of streams
        now = T0
        for _ in range(256):
            if prog.done:
                break
            op = prog.u8() % 4
            if op == 0:
                before = g.current_round
                g.advance(prog.u8() % 16)
                assert g.current_round >= before
                continue
            if op == 1:
                now += prog.u8()
                continue
            sender = prog.choice(senders)
            seq = prog.u8() % 32
            sent_at = now + prog.choice((0.0, -50.0, -101.0, 5.0, 11.0, float("nan"), float("inf"), -1e9))
            if op == 2:
                rnd = prog.u8() % 16
                try:
                    g.check(sender, rnd, seq, sent_at, now)
                except (Replayed, Stale):
                    continue
                assert rnd >= g.floor and (sender, rnd, seq) not in accepted, "accepted twice"
                assert math.isfinite(sent_at) and now - 100.0 <= sent_at <= now + 10.0
                accepted.add((sender, rnd, seq))
                accepted = {k for k in accepted if k[1] >= g.floor}
            else:
                stream = prog.choice(("register", "status", "will"))
                try:
                    g.check_latest(sender, stream, seq, sent_at, now, check_time=stream != "will")
                except (Replayed, Stale):
                    continue
                key = (sender, stream)
                assert key not in latest or seq > latest[key], "a session message not newer than the last"
                latest[key] = seq
                latest.move_to_end(key)
                while len(latest) > bounds["max_streams"]:
                    latest.popitem(last=False)
            assert len(g) <= bounds["max_entries"] + bounds["max_streams"]

    seeds = [bytes([2, 0, 1, 5, 0, 2, 0, 1, 5, 0]), bytes([0, 3, 2, 1, 2, 3, 0, 0, 9, 3, 1, 1, 3, 0])]
    return Target("replay", run, seeds)


# ---- channels --------------------------------------------------------------------------------
def channel_target() -> Target:
    """CoordinatorChannel/AgentChannel.receive: byte 0 picks receiver and topic, byte 1 the clock."""
    w = _world()
    t = w["task"]
    agent, coord = agent_channel(), coordinator_channel()
    agent.remember_masks(t.mask_version, t.masks)
    uplink = agent.send(update(w["rng"], t), T0) + agent.send(status(), T0) + agent.send(register(), T0)
    downlink = coord.send(t, T0) + coord.send(release(), T0) + coord.send(reject(), T0)
    up_topics = sorted({p.topic for p in uplink}) + [uplink[0].topic.replace("dev-a", "dev-b"), "nonsense"]
    down_topics = sorted({p.topic for p in downlink}) + [f"fedprune/v1/{FED}/inbox/dev-b", "fedprune/v1/x/task"]
    coordinator_rx = coordinator_channel()
    coordinator_rx.remember_masks(t.mask_version, t.masks)
    coordinator_rx.replay.advance(t.round)
    agent_rx = agent_channel()
    receivers = [(coordinator_rx, up_topics), (agent_rx, down_topics)]

    def run(data: bytes) -> None:
        if len(data) < 2:
            return
        channel, names = receivers[data[0] & 1]
        topic = names[(data[0] >> 1) % len(names)]
        channel.receive(topic, data[2:], T0 + (0, 1, 700, -700, 1e6)[data[1] % 5])
        assert channel.reassembler.buffered_bytes <= channel.reassembler.max_buffered
        assert len(channel.replay) <= channel.replay.max_entries + channel.replay.max_streams

    seeds = []
    for p in uplink:
        seeds.append(bytes([up_topics.index(p.topic) << 1, 0]) + p.payload)
    for p in downlink:
        seeds.append(bytes([down_topics.index(p.topic) << 1 | 1, 0]) + p.payload)
    return Target("channel", run, seeds)


def all_targets() -> dict[str, Callable[[], Target]]:
    from tests.fuzz.daemon_target import daemon_target

    return {
        "codec": codec_target, "sparse_values": sparse_values_target, "masks": masks_target,
        "envelope": envelope_target, "chunk": chunk_target, "reassembler": reassembler_target,
        "replay": replay_target, "channel": channel_target, "daemon": daemon_target,
    }
