"""Fuzz target: the coordinator's message handler (``CoordinatorDaemon._on_message``) and its
round loop (``_tick``: open, close, aggregate, checkpoint), driven by programs of peer input.

The daemon is the real one (real state directory, real registry of enrolled devices with real
keys, real MqttLink aimed at a loopback port nobody listens on, so publishes queue offline and
overflow into the counted ``QueueFull``). Each input is a program of operations:

  genuine    a fresh sealed Register / Status / Update of an enrolled device (or of an intruder
             whose key is not enrolled, or of a revoked device)
  mutated    a genuine publication with bytes flipped, cut or appended
  replayed   a publication delivered earlier, again
  retargeted a genuine publication on another device's or another kind's topic
  byzantine  a correctly sealed Update from an enrolled device with hostile contents: wrong or
             huge round, n_examples up to 2^63-1, non-finite metrics, class ids far outside the
             model, values scaled to 1e38 / 0 / -inf, random or empty masks, any value dtype
  raw        random bytes on an uplink topic
  clock      time moves on (up to minutes), then ``_tick``: rounds open, close at the deadline,
             aggregate whatever was accepted and checkpoint

Invariants, after every operation: nothing escapes ``_on_message``/``_tick``; ``bytes_in_total``
counts every byte fed; every input with a complete transfer has exactly one visible outcome
(one counted rejection with its reason, one accepted update, one update held for the round about
to open, or a registry/presence change); every rejection log line has its counter; the global
state stays consistent (finite weights, masks with the layout's shapes and nnz equal to the ERK
counts, scores only for enrolled devices, history contiguous and equal to the checkpoint's).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.config import load_config
from fedprune.coordinator.daemon import CoordinatorDaemon
from fedprune.coordinator.core.rounds import REJECT_REASONS
from fedprune.common.mqtt import LinkConfig, MqttLink
from fedprune.protocol.channel import AgentChannel, Publication
from fedprune.protocol.chunks import parse_chunk
from fedprune.protocol.crypto import Identity
from fedprune.protocol import errors
from fedprune.protocol.errors import ProtocolError
from fedprune.protocol.messages import Register, State, Status, Update
from fedprune.protocol.sparse import SparseParams, ValueDtype
from fedprune.protocol.topics import TopicKind
from tests.fuzz.targets import Program, Target

FEDERATION = "fuzz"
ENROLLED = ("dev-0", "dev-1", "dev-2")
REVOKED = "dev-9"
INTRUDER = "dev-x"
T0 = 1_800_000_000.0
DEADLINE_S = 30.0
REBUILD_EVERY = 500  # inputs: bounds the run's history and disk use, and re-tests startup/resume
# Counted only (DEBUG): a resent update or chunk, and an update for a round that already closed.
QUIET_REASONS = ("duplicate", "duplicate_transfer", "wrong_round")
REASONS = {*REJECT_REASONS, "duplicate_transfer"} | {
    c.reason for c in vars(errors).values() if isinstance(c, type) and issubclass(c, ProtocolError) and c.reason}
MAX_OPS = 8
_REJECTION_EVENTS = ("message_rejected", "update_rejected")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class _Capture(logging.Handler):
    """The reasons of the rejections logged at INFO or above (what an operator's log shows)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) in _REJECTION_EVENTS:
            self.reasons.append(record.fields["reason"])


def _scratch_root() -> Path:
    """tmpfs where there is one: every Register and every round fsyncs the state directory."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="fedprune-fuzz-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))


def offline_link() -> MqttLink:
    """A real link to a loopback port nobody listens on: publishes queue, then overflow as QueueFull."""
    return MqttLink(LinkConfig(url=f"mqtt://127.0.0.1:{_dead_port()}", client_id="fuzz-coordinator", protocol="5",
                               reconnect_min_s=5.0, reconnect_max_s=30.0, max_queued_messages=64))


def _dead_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class DaemonWorld:
    """A coordinator daemon with enrolled devices, and the devices' own channels."""

    def __init__(self, link: MqttLink | None = None) -> None:
        self.root = _scratch_root()
        self.clock = Clock()
        config_path = self.root / "coordinator.toml"
        enrollment.init(config_path=config_path, state_dir=self.root / "state", federation=FEDERATION,
                        broker_url=f"mqtt://127.0.0.1:{_dead_port()}", embedded_broker=False, settings={
                            "rounds": {"total": 1_000_000, "min_devices": 2, "quorum": 2, "deadline_s": DEADLINE_S,
                                       "on_missed_quorum": "close", "reannounce_s": 5.0},
                            "metrics": {"port": -1}})
        self.config = load_config(config_path, env={})
        bundles = {d: enrollment.enroll(self.config, d, self.root / f"{d}.json") for d in (*ENROLLED, REVOKED)}
        enrollment.revoke(self.config, REVOKED)
        self.daemon = CoordinatorDaemon(self.config, clock=self.clock)
        self.daemon.link = link or offline_link()
        coordinator = bundles[ENROLLED[0]].coordinator
        identities = {d: b.identity for d, b in bundles.items()} | {INTRUDER: Identity.generate()}
        self.agents = {d: AgentChannel(federation=FEDERATION, device=d, identity=i, coordinator=coordinator,
                                       layout=self.daemon.layout) for d, i in identities.items()}
        self.trainable = self.daemon.layout.subset(s.name for s in self.daemon.layout.trainable)
        self.delivered: list[Publication] = []
        self.capture = _Capture()
        logger = logging.getLogger("fedprune.coordinator")
        self._level = logger.level
        logger.setLevel(logging.INFO)  # as the command line runs it
        logger.addHandler(self.capture)
        self.inputs = 0
        self.closes = 0
        self._deltas: dict[tuple, SparseParams] = {}

    def close(self) -> None:
        logger = logging.getLogger("fedprune.coordinator")
        logger.removeHandler(self.capture)
        logger.setLevel(self._level)
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- building publications -----------------------------------------------------------------
    def _remember_current_masks(self) -> None:
        s = self.daemon.state
        for agent in self.agents.values():
            if agent.masks.get(s.mask_version) is None:
                agent.remember_masks(s.mask_version, s.masks)

    def genuine(self, prog: Program) -> list[Publication]:
        device = prog.choice((*ENROLLED, *ENROLLED, REVOKED, INTRUDER))
        kind = prog.u8() % 3
        now = self.clock.now
        agent = self.agents[device]
        if kind == 0:
            return agent.send(Register(device, 1 + prog.u8() % 8, 256 + prog.u16(), "none", 40 + prog.u16(), "0.1.0",
                                       cached_mask_version=prog.choice((None, self.daemon.state.mask_version, 7))), now)
        if kind == 1:
            state = prog.choice(list(State))
            return agent.send(Status(device, state, self.daemon.state.round, "busy" if state is State.DECLINED else "",
                                     now), now)
        return self._update(prog, device, hostile=False)

    def _update(self, prog: Program, device: str, hostile: bool) -> list[Publication]:
        self._remember_current_masks()
        s = self.daemon.state
        masks = s.masks
        changed = False
        values = np.float32(0.01)
        n_examples = 40 + prog.u8()
        round_ = s.round
        metrics: dict[str, float] = {"train_loss": 0.5}
        class_losses = {c: (0.5 + 0.1 * c, 5) for c in range(3)}
        dtype = ValueDtype.FLOAT32
        mode_seed = (0, 0)
        if hostile:
            round_ = prog.choice((s.round, s.round, s.round - 1, s.round + 1, 0, 2**32 - 1))
            n_examples = prog.choice((0, 1, n_examples, 2**31, 2**63 - 1))
            metrics = {"train_loss": prog.choice((0.5, float("nan"), float("inf"), -1e308, 0.0))}
            class_losses = {prog.choice((0, 9, 10, 999_999)): (prog.choice((0.0, 1e-300, 3.0, 1e308)),
                                                               prog.choice((1, 2**63 - 1)))}
            values = np.float32(prog.choice((0.0, 1.0, -1.0, 1e38, -1e38, 1e-45, float("inf"), float("nan"))))
            dtype = prog.choice(list(ValueDtype))
            mode_seed = (prog.u8() % 4, prog.u8() % 4)
            mode = mode_seed[0]
            rng = np.random.default_rng(mode_seed[1])
            if mode == 1:
                masks = {k: rng.random(v.shape) < 0.1 for k, v in s.masks.items()}
                changed = True
            elif mode == 2:
                masks = {k: np.zeros(v.shape, bool) for k, v in s.masks.items()}
                changed = True
            elif mode == 3:
                masks = {k: np.ones(v.shape, bool) for k, v in s.masks.items()}
                changed = True
        try:
            key = (s.mask_version, float(values), mode_seed)
            if key not in self._deltas:  # from_dense is the costliest step here: build each kind once
                with np.errstate(invalid="ignore"):  # nan * 0 outside the mask: the agent refuses to build it
                    delta = {spec.name: np.full(spec.shape, values, np.float32) * (masks[spec.name] if spec.masked else 1)
                             for spec in self.trainable}
                self._deltas = {k: v for k, v in self._deltas.items() if k[0] == s.mask_version}
                self._deltas[key] = SparseParams.from_dense(self.trainable, delta, masks)
            update = Update(round=round_, device=device, mask_version=s.mask_version, n_examples=n_examples,
                            metrics=metrics, class_losses=class_losses,
                            delta=self._deltas[key], mask_changed=changed)
            self.agents[device].value_dtype = dtype
            return self.agents[device].send(update, self.clock.now)
        except (ValueError, TypeError):  # our own generator asked for something the agent refuses to build
            return []

    def mutated(self, prog: Program) -> list[Publication]:
        source = self.genuine(prog) or self.delivered[-1:]
        out = []
        for p in source:
            b = bytearray(p.payload)
            op = prog.u8() % 4
            i = prog.u16() % len(b)
            if op == 0:
                b[i] ^= 1 << prog.u8() % 8
            elif op == 1:
                del b[i:]
            elif op == 2:
                b += prog.blob(64)
            else:
                b[i:i + 4] = prog.take(4)
            out.append(Publication(p.topic, bytes(b)))
        return out

    def retargeted(self, prog: Program) -> list[Publication]:
        source = self.genuine(prog)
        kind = prog.choice((TopicKind.REGISTER, TopicKind.STATUS, TopicKind.UPDATE))
        device = prog.choice((*ENROLLED, INTRUDER))
        return [Publication(f"fedprune/v1/{FEDERATION}/{kind.value}/{device}", p.payload) for p in source]

    # ---- the program ---------------------------------------------------------------------------
    def run(self, data: bytes) -> None:
        self.inputs += 1
        prog = Program(data)
        for _ in range(MAX_OPS):
            if prog.done:
                break
            op = prog.u8() % 8
            self.clock.now += 0.001
            if op == 0:
                self.feed(self.genuine(prog))
            elif op == 1:
                self.feed(self.mutated(prog))
            elif op == 2 and self.delivered:
                self.feed([prog.choice(self.delivered)])
            elif op == 3:
                self.feed(self.retargeted(prog))
            elif op == 4:
                self.feed(self._update(prog, prog.choice(ENROLLED), hostile=True))
            elif op == 5:
                kind = prog.choice((TopicKind.REGISTER, TopicKind.STATUS, TopicKind.UPDATE))
                topic = f"fedprune/v1/{FEDERATION}/{kind.value}/{prog.choice((*ENROLLED, INTRUDER))}"
                self.feed([Publication(topic, prog.blob(600))])
            else:
                self.clock.now += prog.u8() * (0.5 if op == 6 else 0.05)
                self.tick()

    def tick(self) -> None:
        d = self.daemon
        before = d.completed
        d.tick()
        if d.completed != before:
            self.closes += 1
        check_state(d, full=d.completed != before, reload=self.closes % 8 == 1)

    def feed(self, publications: list[Publication]) -> None:
        d = self.daemon
        for topic, payload in publications:
            logged = len(self.capture.reasons)
            snapshot = _observe(d)
            d.on_message(topic, payload)
            after = _observe(d)
            assert after["bytes_in"] - snapshot["bytes_in"] == len(payload)
            rejected = after["rejected"] - snapshot["rejected"]
            accepted = after["accepted"] - snapshot["accepted"]
            held = after["held"] - snapshot["held"]
            presence = after["presence"] != snapshot["presence"]
            # Resent copies are counted, not logged: the field saw 535 of 672 lines be duplicates.
            quiet = [r for r in QUIET_REASONS for _ in range(int(after[r] - snapshot[r]))]
            reasons = self.capture.reasons[logged:] + quiet
            assert rejected == len(reasons), ("a rejection without its counter or log line", reasons)
            for reason in reasons:
                assert reason in REASONS, f"rejection reason {reason!r} unknown to the harness: add it to REASONS"
            assert rejected + accepted + held <= 1 + ("duplicate_transfer" in reasons), (rejected, accepted, held)
            if _complete_transfer(payload):
                assert rejected + accepted + held + presence >= 1, f"an input on {topic} vanished without a trace"
            if accepted:
                assert d.rounds.open_round == d.state.round
            if held:
                assert d.rounds.open_round is None and set(d.early_updates) <= set(ENROLLED)
            self.delivered = (self.delivered + [Publication(topic, payload)])[-32:]
        check_state(d, full=False)


def _observe(d: CoordinatorDaemon) -> dict[str, Any]:
    return {**{r: d.metrics.value("updates_rejected_total", reason=r) for r in QUIET_REASONS},
            "bytes_in": d.metrics.value("bytes_in_total"), "rejected": rejections(d),
            "accepted": d.metrics.value("updates_accepted_total"), "held": d.metrics.value("updates_held_total"),
            "presence": ([(r.device_id, r.last_seen, r.online, r.capabilities) for r in d.registry.devices()],
                         dict(d.holders), d.metrics.value("rounds_declined_total"))}


def rejections(d: CoordinatorDaemon) -> float:
    """updates_rejected_total summed over every reason a rejection can carry."""
    return sum(d.metrics.value("updates_rejected_total", reason=r) for r in REASONS)


def _complete_transfer(payload: bytes) -> bool:
    """A payload that is a whole one-chunk transfer: it must be consumed visibly."""
    try:
        head, _ = parse_chunk(payload, 1 << 30)
    except ProtocolError:
        return True
    return head.count == 1


def check_state(d: CoordinatorDaemon, full: bool, reload: bool = True) -> None:
    s = d.state
    history = d.state_dir.read_history()
    assert [h["round"] for h in history] == list(range(1, d.completed + 1))
    assert d.rounds.open_round in (None, s.round)
    if d.rounds.open_round is not None:
        assert set(d.rounds.received) <= set(d.plan.selected)
    enrolled = {r.device_id for r in d.registry.devices()}
    assert set(s.quality) <= enrolled and set(s.importance) <= enrolled and set(s.data_sizes) <= enrolled
    if not full:
        return
    for spec in d.layout:
        assert s.params[spec.name].shape == spec.shape and np.all(np.isfinite(s.params[spec.name])), spec.name
        if spec.masked:
            mask = s.masks[spec.name]
            assert mask.shape == spec.shape and mask.dtype == bool
            assert int(mask.sum()) == int(s.counts[spec.name]), (spec.name, int(mask.sum()), s.counts[spec.name])
            assert not np.any(s.params[spec.name][~mask]), f"{spec.name}: weights outside the mask"
    assert all(math.isfinite(v) for v in s.importance.values())
    if not reload:
        return
    checkpoint = d.state_dir.load_latest_checkpoint()
    assert checkpoint["round"] == d.completed and checkpoint["last_entry"] == (history[-1] if history else None)
    assert d.history_bytes == (d.state_dir.history_path.stat().st_size if history else 0)


def daemon_target() -> Target:
    link = offline_link()
    worlds = [DaemonWorld(link)]  # built before any tracemalloc run: importing torch under it takes minutes

    def run(data: bytes) -> None:
        if worlds[0].inputs >= REBUILD_EVERY:
            worlds.pop().close()
            worlds.append(DaemonWorld(link))
        worlds[0].run(data)

    def close() -> None:
        for world in worlds:
            world.close()
        link.close(timeout=0.5)

    seeds = [bytes([0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 2, 0, 0, 6, 1, 6, 0]),  # registers, then a round opens
             bytes([0, 0, 0, 0, 0, 1, 0, 0, 0, 6, 1] + [0, 0, 2, 0, 0, 1, 2] * 3 + [6, 80]),  # updates, deadline
             bytes([4, 0, 0, 3, 4, 1, 2, 5, 0, 1, 2, 3, 4, 0, 7, 200]), bytes([5, 1, 0, 0, 2, 1, 3, 0, 0, 0])]
    return Target("daemon", run, seeds, max_peak_mib=96.0, close=close)
