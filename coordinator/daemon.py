"""The coordinator's shell: one loop that feeds messages and clock ticks to the round machine
and the strategy, and carries out what they decide (publish, checkpoint, count).

The same object runs a fleet (``run``: MQTT, signals, the metrics endpoint) and a simulation
(``start`` with an in-memory link, then ``on_message`` and ``tick``): one round engine, two
transports.

A round, top to bottom: ``_maybe_start_round`` plans it (strategy), signs and publishes the
RoundTask (channel), opens it (rounds); ``on_message`` authenticates each uplink (channel),
updates presence (registry) and hands updates to the round machine; ``tick`` closes the round
at quorum/deadline, aggregates (strategy), evaluates, checkpoints atomically (state) and only
then counts the round as done. A crash anywhere before the checkpoint replays the round from
the previous checkpoint; after it, the next run starts at the next round. Peer input never
raises past ``on_message``: a ProtocolError becomes a counted, logged rejection.

Why one file over 400 lines: it is the one loop and its reactions, each method one step of the
round or one kind of message, sharing the loop's state (open round, pending commit, outage,
key members). The decisions are elsewhere (``core/``, ``releases``,
``state``); splitting the reactions across files would split that state.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import signal
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import numpy as np

from fedprune.coordinator.config import CoordinatorConfig, model_spec
from fedprune.coordinator.core.config import VALUE_ENCODINGS
from fedprune.coordinator.core.downlink import Downlink
from fedprune.coordinator.core.federation_key import FederationKey
from fedprune.coordinator.fleet_view import EventFeed, FleetView, LiveRound, RoundTrail, ViewInputs, build_view
from fedprune.coordinator.metrics import Metrics
from fedprune.coordinator.operator_server import OperatorServer, read_token
from fedprune.coordinator.releases import (latest_release, make_release, release_due, release_metadata, release_row,
                                           releases_on_disk)
from fedprune.coordinator.fleet.registry_store import RegistryStore
from fedprune.coordinator.core.rounds import Accepted, CloseRound, RetryRound, RoundMachine, RoundPolicy
from fedprune.coordinator.core.secure_round import SecureCollection, SecureFailed
from fedprune.coordinator.state import Checkpoint, StateDir, StateError, load_identity
from fedprune.coordinator.core.strategy import ClientUpdate, RoundPlan, Strategy
from fedprune.common.configkit import ConfigError
from fedprune.common.data import DATA_MISMATCH
from fedprune.common.model_rules import HEADLINE, LAYOUT_MISMATCH
from fedprune.common.events import emit
from fedprune.common.link import Link
from fedprune.common.mqtt import LinkConfig, MqttError, MqttLink
from fedprune.protocol.channel import CoordinatorChannel, Publication
from fedprune.protocol.crypto import PublicIdentity
from fedprune.protocol.distributed_dp import rdp_round
from fedprune.protocol.errors import ProtocolError
from fedprune.protocol.layout import ModelLayout
from fedprune.protocol.rdp import DEFAULT_ORDERS, epsilon_from_rdp
from fedprune.protocol.messages import MISSING_BASE, ModelRef, ModelRelease, Register, RoundTask, State, Status, Update
from fedprune.protocol.secagg import SecAggError, SecureParams
from fedprune.protocol.secure_messages import SecureKeys, SecureMasked, SecureReveal, SecureShares
from fedprune.protocol.secure_setup import SecureSetup
from fedprune.protocol.sparse import SparseParams

log = logging.getLogger("fedprune.coordinator")

COMMIT_RETRY_S = 5
REGISTRY_SAVE_S = 5
MEMBERS_CHECK_S = 1.0  # how often the allow-list is compared with the federation key's members
VIEW_REFRESH_S = 1.0  # how often the operator's view (status page, /status.json) is rebuilt
# INFO events the status page lists beside every WARNING and ERROR.
UNFIT_REASONS = (DATA_MISMATCH, LAYOUT_MISMATCH)  # final for this model: out of selection until registered again
FEED_EVENTS = frozenset({"round_closed", "update_gated", "release_published", "device_enrolled", "device_readmitted",
                         "device_offline", "declined", "rounds_resumed", "resumed", "start", "secure_round_failed"})


TARGET_BINS = 8  # regression group losses: octiles of the held-out targets (docs/ALGORITHM_NOTES.md §11)


def target_edges(task: str, evaluation: tuple[np.ndarray, np.ndarray] | None) -> tuple[tuple[float, ...], ...]:
    """A regression task's bin edges for the devices' group losses: the octiles of each target
    over the held-out set, so that a bin means the same targets on every device whatever their
    units (``fedprune.common.objectives``); none without held-out data (devices then use N(0, 1)'s
    quartiles). Octiles, not quartiles: errors grow with the target, and a wide top bin reads a
    site of large targets as a bad one (the tabular example; docs/RESULTS.md)."""
    if task != "regression" or evaluation is None:
        return ()
    y = np.asarray(evaluation[1], dtype=np.float64).reshape(len(evaluation[1]), -1)
    levels = np.arange(1, TARGET_BINS) / TARGET_BINS
    return tuple(tuple(float(v) for v in np.quantile(y[:, t], levels)) for t in range(y.shape[1]))


class CoordinatorDaemon:
    def __init__(self, config: CoordinatorConfig, clock: Callable[[], float] = time.time) -> None:
        from fedprune.common.model_rules import package_version
        from fedprune.common.models import ModelFactoryError, init_params, model_layout, output_problem

        self.config = config
        self.clock = clock
        self.stopping = False
        self.state_dir = StateDir(config.state.dir, keep=config.state.keep_checkpoints)
        self.state_dir.ensure()
        self.identity = load_identity(self.state_dir)
        self.registry_store = RegistryStore(self.state_dir.root)
        self.registry = self.registry_store.load(config.rounds.heartbeat_timeout_s)
        self.spec = model_spec(config)
        try:
            self.layout: ModelLayout = model_layout(self.spec)
            problem = output_problem(self.spec)
        except ModelFactoryError as exc:
            raise ConfigError(f"[federation] {exc}") from None
        if problem:
            raise ConfigError(f"[federation] {problem}; fix model, model_args, input_shape or num_classes")
        self.model_ref = ModelRef(self.spec.name, tuple(self.spec.input_shape), self.spec.num_classes,
                                  args=self.spec.args, task=self.spec.task, package=package_version(self.spec.name),
                                  tensor_digests=self.layout.tensor_digests())
        self.strategy = Strategy(config.strategy)
        self.metrics = Metrics()
        self.metrics.set("round_deadline_seconds", config.rounds.deadline_s)
        self.feed = EventFeed()
        self.view: FleetView | None = None  # the newest operator's view; the HTTP thread reads it
        self.history_bytes = 0  # committed size of history.jsonl
        self._bytes_before = (0, 0)  # the history's byte totals up to this process (its counters start at 0)
        self.holders: dict[str, int] = {}
        # Updates for the round about to open that arrive before it opens: after a restart the
        # broker delivers the devices' queued uploads first, and their resends would be duplicates.
        self.early_updates: dict[str, Update] = {}
        self.release_version = 0
        checkpoint = self.state_dir.load_latest_checkpoint()
        if checkpoint is None:
            aside = self.state_dir.set_aside_history()
            if aside is not None:
                self._note(logging.WARNING, "history_set_aside", file=aside, reason="no_checkpoint")
            self.rng = np.random.default_rng(config.federation.seed)
            self.central_rdp = np.zeros(0)  # the RDP of every secure sum released so far (distributed DP)
            self.state = self.strategy.initial_state(self.layout, init_params(self.spec, config.federation.seed), self.rng)
            self._checkpoint(completed=0)
        else:
            self._restore(checkpoint)
        self.channel = CoordinatorChannel(
            federation=config.federation.id, identity=self.identity, devices=self._device_key, layout=self.layout,
            max_chunk=config.broker.max_message_kib * 1024,
        )
        self.downlink = Downlink(config.strategy.task_values)
        self.federation_key = FederationKey(self.channel, self.registry)
        # Updates queued at the broker while this process was down name the current mask version.
        self.channel.remember_masks(self.state.mask_version, self.state.masks)
        self.rounds: RoundMachine[Update] = RoundMachine(RoundPolicy(
            quorum=config.rounds.quorum, deadline_s=config.rounds.deadline_s,
            on_missed_quorum=config.rounds.on_missed_quorum, max_retries=config.rounds.max_retries,
        ))
        self.evaluation = self._load_evaluation()
        self.target_edges = target_edges(self.spec.task, self.evaluation)
        self.plan: RoundPlan | None = None
        self.last_entry: dict[str, Any] | None = None  # the history entry of the last committed round
        self.round_started = 0.0
        self.next_announce = 0.0
        self.link: Link | None = None
        self._pending_commit: tuple[int, dict[str, Any], ModelRelease | None] | None = None
        self._retry_commit_at = 0.0
        self._lost_since: float | None = None
        self._registry_dirty = False
        self._next_registry_save = 0.0
        self._drops_logged = 0
        self._next_drop_log = 0.0
        self._next_members_check = 0.0
        self.declines: dict[str, tuple[int, str]] = {}  # device -> (round, reason) last counted
        self.unfit: dict[str, str] = {}  # device -> why it is not selected: data_mismatch or layout_mismatch
        self.trail = RoundTrail(self.state_dir.read_history(), score_name=HEADLINE[self.spec.task])
        self.releases = list(releases_on_disk(self.state_dir.root))
        self._upload_bytes: dict[str, int] = {}  # device -> bytes of its update transfer so far
        self._round_update_bytes: dict[str, int] = {}  # device -> size of its accepted update, this round
        self._quorum_seen = False
        self._next_view = 0.0
        self._secure: tuple[SecureCollection, CloseRound[SecureKeys], Any] | None = None  # stages 2-4 of the round

    # ---- state ----------------------------------------------------------------------------------
    @property
    def completed(self) -> int:
        return self.state.round - 1

    def _checkpoint(self, completed: int, last_entry: dict[str, Any] | None = None) -> None:
        """The round's state and its history entry; the trail before it stays in history.jsonl,
        of which the checkpoint records the committed size (O(1) per round, not O(rounds))."""
        self.state_dir.save_checkpoint(completed, Checkpoint(
            self.state, self.rng.bit_generator.state, self.history_bytes, last_entry, self.holders,
            self.release_version).to_document())

    def _restore(self, doc: dict[str, Any]) -> None:
        checkpoint = Checkpoint.from_document(doc, self.layout, self.state_dir.resume_history(doc))
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = checkpoint.rng_state
        self.state, self.history_bytes = checkpoint.state, checkpoint.history_bytes
        self.holders, self.release_version = checkpoint.holders, checkpoint.release_version
        last = checkpoint.last_entry or {}
        self.central_rdp = np.asarray(last.get("central_rdp", []), dtype=np.float64)
        if self.central_rdp.size not in (0, len(DEFAULT_ORDERS)):
            raise StateError(f"checkpoint of round {self.completed}: central_rdp has {self.central_rdp.size} orders, "
                             f"this version accounts at {len(DEFAULT_ORDERS)}; restore with the version that wrote it")
        self._bytes_before = (int(last.get("cum_bytes_in", 0)), int(last.get("cum_bytes_out", 0)))
        emit(log, logging.INFO, "resumed", completed_rounds=self.completed, mask_version=self.state.mask_version)

    def _device_key(self, device_id: str) -> PublicIdentity | None:
        record = self.registry.get(device_id)
        return None if record is None else PublicIdentity(record.sign_public, record.kx_public)

    def _load_evaluation(self):
        """The held-out set, read and checked against the model at start: a set that cannot be
        read or does not fit stops ``run`` naming [evaluation] data, not the first round's close."""
        path = self.config.evaluation.data
        if path is None:
            return None
        from fedprune.common.data import DataSummary, LocalDataError, data_mismatch, load_local_data

        try:
            X, y = load_local_data(path, self.config.evaluation.source)
        except LocalDataError as exc:
            raise ConfigError(f"[evaluation] data: {exc}") from None
        detail = data_mismatch(DataSummary.of(X, y), self.spec.input_shape, self.spec.num_classes, self.spec.task)
        if detail:
            raise ConfigError(f"[evaluation] data {str(path)!r} does not fit the model: {detail}; fix the file, "
                              "[evaluation.source], or [federation] input_shape/num_classes/task")
        return X, y

    # ---- main loop ------------------------------------------------------------------------------
    def stop(self, *_: object) -> None:
        self.stopping = True

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        return [(f, 1) for f in self.channel.subscriptions]

    @property
    def finished(self) -> bool:
        return self.completed >= self.config.rounds.total and self._pending_commit is None

    def open_link(self) -> MqttLink:
        """The coordinator's MQTT session: persistent, so uploads wait at the broker while it restarts."""
        broker = self.config.broker
        return MqttLink(LinkConfig(
            url=broker.url, client_id=f"fedprune-coordinator-{self.config.federation.id}",
            username=broker.username or None, password=broker.password or None, ca_file=broker.ca_file,
            cert_file=broker.cert_file, key_file=broker.key_file, clean_start=False, session_expiry_s=86_400,
            max_message_bytes=broker.max_message_kib * 1024, max_queued_messages=100_000,
            reconnect_max_s=5.0,  # one client that every device waits on: retry soon (agents back off to 30 s)
        ), subscriptions=self.subscriptions)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        server = None
        section = self.config.metrics
        if section.port >= 0:
            token = read_token(section.token_file) if section.token_file is not None else None
            server = OperatorServer(self.metrics, lambda: self.view, section.host, section.port, token).start()
            emit(log, logging.INFO, "status_page_listening", url=f"http://{section.host}:{server.port}/",
                 metrics=f"http://{section.host}:{server.port}/metrics", token_required=token is not None)
        link = self.open_link()
        try:
            self.start(link)
            while not self.stopping and not self.finished:
                try:
                    topic, payload = link.messages.get(timeout=0.05)
                except queue.Empty:
                    pass
                else:
                    self.on_message(topic, payload)
                    while not link.messages.empty() and not self.stopping:
                        self.on_message(*link.messages.get_nowait())
                self.tick()
        finally:
            self.finish()
            if server is not None:
                server.stop()
        return 0

    def start(self, link: Link) -> None:
        self.link = link
        self._note(logging.INFO, "start", federation=self.config.federation.id, completed_rounds=self.completed,
                   total_rounds=self.config.rounds.total, broker=self.config.broker.url)
        unavailable = self.config.strategy.unavailable_defences
        if unavailable:
            self._note(logging.WARNING, "defences_off", reason="secure_aggregation", defences=list(unavailable),
                       detail="they need each device's update, which a secure round hides; devices clip their own "
                              "values to the round's range (docs/ROBUSTNESS.md)")
        self._follow_members(self.clock())  # a fresh key every start: the retained release goes out under it
        self._publish_view(self.clock())

    def finish(self) -> None:
        self.link.close()
        if self._registry_dirty:
            self._save_registry(self.clock())
        emit(log, logging.INFO, "stopped", completed_rounds=self.completed)

    def on_message(self, topic: str, payload: bytes) -> None:
        now = self.clock()
        if self._lost_since is not None:  # back from an outage: move the deadline before queued uploads are judged
            self._broker_lost(now)
        self.metrics.inc("bytes_in_total", len(payload))
        self._count_upload(topic, len(payload))
        duplicates = self.channel.reassembler.duplicates
        try:
            message = self.channel.receive(topic, payload, now)
        except ProtocolError as exc:
            self.metrics.inc("updates_rejected_total", reason=exc.reason)
            self._note(logging.WARNING, "message_rejected", topic=topic, reason=exc.reason, detail=str(exc))
            return
        if self.channel.reassembler.duplicates > duplicates:
            self.metrics.inc("updates_rejected_total", reason="duplicate_transfer")  # counted; no line each time
            emit(log, logging.DEBUG, "message_rejected", topic=topic, reason="duplicate_transfer",
                 detail="chunk of a transfer already received (broker redelivery or replay)")
        if message is None:
            return
        if isinstance(message, Register):
            self.registry.seen(message.device, now, capabilities={
                "cpu_count": message.cpu_count, "ram_mb": message.ram_mb, "accelerator": message.accelerator,
                "agent_version": message.agent_version}, n_examples=message.n_examples)
            if message.cached_mask_version is None:  # a restarted agent: its cache is empty
                self.holders.pop(message.device, None)
            else:
                self.holders[message.device] = message.cached_mask_version
            self.downlink.lost(message.device)  # it may have missed tasks while it was away
            self._registry_dirty = True
            emit(log, logging.INFO, "registered", device=message.device, examples=message.n_examples)
            self._grant_key(message.device, now)
            if self.unfit.pop(message.device, None) is not None:  # restarted, perhaps with other data or model
                self._count_excluded()
                self._note(logging.INFO, "device_readmitted", device=message.device, reason="registered")
            self._announce_to_late_joiner(message.device)
        elif isinstance(message, Status):
            self.registry.seen(message.device, now, online=message.state is not State.OFFLINE)
            if message.state is not State.OFFLINE and self.registry.reported(message.device, message.release,
                                                                             message.epsilon_left):
                self._registry_dirty = True
            if message.state is State.OFFLINE:
                self.downlink.lost(message.device)
                if self._secure is not None:
                    self._secure[0].forget(message.device)
                self._note(logging.INFO, "device_offline", device=message.device, reason=message.reason)
            if message.state is State.DECLINED:
                self._on_declined(message, now)
        elif isinstance(message, (SecureShares, SecureMasked, SecureReveal)):
            self.registry.seen(message.device, now)
            self._offer_secure_stage(message)
        elif isinstance(message, (Update, SecureKeys)):
            self.registry.seen(message.device, now)
            if self.rounds.open_round is None and self._secure is None and message.round == self.state.round:
                self.early_updates[message.device] = message
                self.metrics.inc("updates_held_total")
                emit(log, logging.INFO, "update_held", device=message.device, round=message.round,
                     reason="round_not_open_yet")
            else:
                self._offer_update(message, now)

    def _on_declined(self, status: Status, now: float) -> None:
        """Counted once per device and round: a device answers every re-announcement again. A
        ``data_mismatch: <detail>`` decline is final for this model: the device leaves the open
        round (it no longer holds up quorum) and is not selected until it registers again."""
        reason, _, detail = status.reason.partition(":")
        if self._secure is not None and status.round == self._secure[0].round:
            self._secure[0].forget(status.device)
        if reason == MISSING_BASE:  # the next re-announcement carries the full weights
            self.downlink.lost(status.device)
        if self.declines.get(status.device) != (status.round, reason):
            self.declines[status.device] = (status.round, reason)
            self.metrics.inc("rounds_declined_total", reason=reason)
            self.registry.declined(status.device, status.round, status.reason, now)
            self._registry_dirty = True
            self._note(logging.INFO, "declined", device=status.device, round=status.round, reason=reason,
                       **({"detail": detail.strip()} if detail else {}))
        if reason not in UNFIT_REASONS or status.device in self.unfit:
            return
        self.unfit[status.device] = reason
        self._count_excluded()
        self.rounds.withdraw(status.device, status.round)
        self._note(logging.ERROR, "device_excluded", device=status.device, reason=reason, detail=detail.strip(),
                   until="registered_again", **self._unfit_context(reason, detail))

    def _count_excluded(self) -> None:
        for reason in UNFIT_REASONS:
            self.metrics.set("devices_excluded", sum(1 for r in self.unfit.values() if r == reason), reason=reason)

    def _unfit_context(self, reason: str, detail: str) -> dict[str, str]:
        """What the operator needs beside the device's words: the fix and, for a layout that
        differs at tensor i, this side's tensor i."""
        if reason == DATA_MISMATCH:
            return {"fix": "give the device data that fits [federation] model/input_shape/num_classes, or fix those keys"}
        found = re.match(r"\s*tensor (\d+) differs", detail)
        here = {}
        if found and int(found.group(1)) < len(self.layout):
            tensor = self.layout.tensors[int(found.group(1))]
            here = {"coordinator_tensor": f"{tensor.name} {tensor.shape}"}
        return {**here, "fix": "install the same version of the model's package on the device as here "
                               f"({self.model_ref.package or 'not an installed package'})"}

    def _offer_secure_stage(self, message: SecureShares | SecureMasked | SecureReveal) -> None:
        size = self._upload_bytes.pop(message.device, 0)
        collection = self._secure[0] if self._secure is not None else None
        if collection is None or message.round != collection.round:
            reason = "no_secure_stage"
        else:
            reason = collection.on_message(message)
        if reason:
            self.metrics.inc("updates_rejected_total", reason=reason)
            if reason == "duplicate":  # a resend after an outage, queued twice: counted only
                emit(log, logging.DEBUG, "secure_stage_rejected", device=message.device, round=message.round,
                     stage=type(message).__name__, reason=reason)
                return
            self._note(logging.WARNING, "secure_stage_rejected", device=message.device, round=message.round,
                       stage=type(message).__name__, reason=reason)
            return
        self._round_update_bytes[message.device] = self._round_update_bytes.get(message.device, 0) + size
        emit(log, logging.DEBUG, "secure_stage_accepted", device=message.device, round=message.round,
             stage=type(message).__name__, bytes=size)

    def _offer_update(self, update: Update | SecureKeys, now: float) -> None:
        if isinstance(update, SecureKeys) != self.config.strategy.secure:
            self.metrics.inc("updates_rejected_total", reason="wrong_mode")
            self._note(logging.WARNING, "update_rejected", device=update.device, round=update.round, reason="wrong_mode",
                       detail="a secure federation takes SecureKeys (agents of protocol 1.7), a plain one Update")
            return
        if isinstance(update, SecureKeys) and self.rounds.open_round == update.round:  # else the round machine says why
            setup = self._task.secure
            if update.session != setup.session:  # keys made for an earlier opening of this round
                self.metrics.inc("updates_rejected_total", reason="wrong_session")
                emit(log, logging.INFO, "update_rejected", device=update.device, round=update.round,
                     reason="wrong_session")
                return
            if not math.isclose(update.noise_multiplier, setup.noise_multiplier):
                self.metrics.inc("updates_rejected_total", reason="noise_mismatch")
                self._note(logging.WARNING, "update_rejected", device=update.device, round=update.round,
                           reason="noise_mismatch", detail=f"declares σ={update.noise_multiplier:g}, the round's is "
                                                           f"{setup.noise_multiplier:g}")
                return
        verdict = self.rounds.on_update(update.device, update.round, update, now)
        size = self._upload_bytes.pop(update.device, 0)
        if isinstance(verdict, Accepted):
            self.metrics.inc("updates_accepted_total")
            self._round_update_bytes[update.device] = size
            self.metrics.observe("update_size_bytes", size)
            if "train_seconds" in update.metrics:
                self.metrics.observe("device_training_seconds", update.metrics["train_seconds"])
            if not self._quorum_seen and len(self.rounds.received) >= self._quorum():
                self._quorum_seen = True
                self.metrics.observe("time_to_quorum_seconds", now - self.round_started)
            emit(log, logging.INFO, "update_accepted", device=update.device, round=update.round, bytes=size)
            return
        self.metrics.inc("updates_rejected_total", reason=verdict.reason)
        if verdict.reason in ("duplicate", "wrong_round"):  # a resend, or a round already closed: counted only
            emit(log, logging.DEBUG, "update_rejected", device=update.device, round=update.round, reason=verdict.reason)
            return
        self.registry.rejected(update.device, update.round, verdict.reason, now)
        self._registry_dirty = True
        self._note(logging.INFO if verdict.reason == "late" else logging.WARNING, "update_rejected",
                   device=update.device, round=update.round, reason=verdict.reason)

    def tick(self) -> None:
        now = self.clock()
        self._watch_reassembly(now)
        self._follow_allow_list()
        self.metrics.set("devices_online", len(self.registry.online(now)))
        if now >= self._next_view:
            self._publish_view(now)
        if self._registry_dirty and now >= self._next_registry_save:
            self._save_registry(now)
        if self._pending_commit is not None:
            if now >= self._retry_commit_at:
                self._commit_round()
            return
        if self._broker_lost(now):
            return
        if now >= self._next_members_check:
            self._follow_members(now)
        if self._secure is not None:
            self._advance_secure(now)
            return
        if self.rounds.open_round is None:
            self._maybe_start_round(now)
            return
        action = self.rounds.tick(now)
        if isinstance(action, CloseRound):
            self._close_round(action, now)
        elif isinstance(action, RetryRound):
            self.metrics.inc("round_retries_total")
            self._note(logging.WARNING, "round_retry", round=action.round, attempt=action.attempt,
                       missing=action.missing)
            self._task = replace(self._task, deadline=action.deadline)
            self._publish_task(replace(self._task, selected=action.missing), now)
        elif now >= self.next_announce:
            self._publish_task(replace(self._task, selected=self.rounds.missing), now)

    def _watch_reassembly(self, now: float) -> None:
        """Expire stale partial transfers on every tick (not only when another chunk arrives),
        export what the reassembler dropped, and say so in the log at most every 10 s."""
        reassembler = self.channel.reassembler
        reassembler.expire(now)
        self.metrics.set("reassembly_buffered_bytes", reassembler.buffered_bytes)
        dropped = sum(reassembler.evictions.values())
        if dropped == self._drops_logged:
            return
        for reason, count in reassembler.evictions.items():
            counted = self.metrics.value("reassembly_dropped_total", reason=reason)
            if count > counted:
                self.metrics.inc("reassembly_dropped_total", count - counted, reason=reason)
        if now >= self._next_drop_log:
            self._note(logging.WARNING, "reassembly_dropped", new=dropped - self._drops_logged,
                       **dict(sorted(reassembler.evictions.items())))
            self._drops_logged, self._next_drop_log = dropped, now + 10.0

    def _broker_lost(self, now: float) -> bool:
        """True while the link that was up is down: no round opens, and the open round's deadline
        waits, so an outage does not close rounds that no device could hear or answer."""
        self.metrics.set("broker_connected", 1.0 if self.link.connected else 0.0)
        if self.link.connected or self.link.stats().connects == 0:
            if self._lost_since is not None:
                paused = now - self._lost_since
                self._lost_since = None
                if self.rounds.open_round is not None:
                    self._task = replace(self._task, deadline=self.rounds.postpone(paused))
                    self.next_announce = now
                if self._secure is not None:  # the stage's messages may have been lost with the link
                    self._secure[0].postpone(paused)
                    self._publish_secure(self._secure[0].outbox(), now)
                self._note(logging.INFO, "rounds_resumed", paused_s=round(paused, 1))
            return False
        if self._lost_since is None:
            self._lost_since = now
            self._note(logging.WARNING, "rounds_paused", reason="broker_unreachable", round=self.rounds.open_round)
        return True

    def _maybe_start_round(self, now: float) -> None:
        online = tuple(d for d in self.registry.online(now) if d not in self.unfit)
        if len(online) < self.config.rounds.min_devices:
            return
        self.plan = self.strategy.plan_round(self.state, online, self.rng)
        deadline = now + self.config.rounds.deadline_s
        include_masks = any(self.holders.get(d) != self.state.mask_version for d in self.plan.selected)
        masters = SparseParams.from_dense(self.layout, self.state.params, self.state.masks)
        self.downlink.open(self.plan.round, masters, self.state.params)
        secure, hyper = self._secure_setup(self.plan.selected), self.plan.hyper
        if secure is not None:  # devices train inside the global mask; the coordinator readjusts it
            hyper = replace(hyper, readjust=False, prune_fraction=0.0)
        self._task = RoundTask(  # its weights are the masters; each publication takes the downlink's
            federation=self.config.federation.id, round=self.plan.round, mask_version=self.state.mask_version,
            model=self.model_ref, weights=masters,
            hyper=hyper, deadline=deadline, selected=self.plan.selected, include_masks=include_masks,
            update_values=VALUE_ENCODINGS[self.config.strategy.update_values],
            error_feedback=self.config.strategy.error_feedback, target_edges=self.target_edges, secure=secure,
        )
        self.rounds.open(self.plan.round, self.plan.selected, now)
        self._round_update_bytes, self._quorum_seen = {}, False
        self.round_started = now
        held, self.early_updates = self.early_updates, {}
        for update in held.values():
            self._offer_update(update, now)
        self.metrics.set("current_round", self.plan.round)
        emit(log, logging.INFO, "round_open", round=self.plan.round, selected=len(self.plan.selected),
             readjust=self.plan.readjust, p_t=round(self.plan.p_t, 3), deadline_s=self.config.rounds.deadline_s)
        self._publish_task(self._task, now)

    def _secure_setup(self, selected: tuple[str, ...]) -> SecureSetup | None:
        """A fresh session per opening: a round opened again after a restart never reuses keys."""
        cfg = self.config.strategy
        if not cfg.secure:
            return None
        params = SecureParams.for_devices(max(len(selected), 3), cfg.secure_bits, cfg.secure_degree or None)
        return SecureSetup(os.urandom(8), params.bits, params.degree, params.threshold, cfg.secure_noise_multiplier)

    def _announce_to_late_joiner(self, device: str) -> None:
        if self.rounds.open_round is not None and device in self.rounds.missing:
            self._publish_task(replace(self._task, include_masks=True, selected=(device,)), self.clock())

    def _publish_task(self, task: RoundTask, now: float) -> None:
        """Re-announcements name only the devices still missing, so devices that already uploaded
        do not resend; the round machine keeps the full selection."""
        self.next_announce = now + self.config.rounds.reannounce_s
        self._follow_members(now)
        chosen = self.downlink.weights_for(task.selected, self.registry.online(now))
        task = replace(task, weights=chosen.weights, base_round=chosen.base_round)
        try:
            for publication in self.channel.send(task, now, value_dtype=chosen.values):
                self.link.publish(publication.topic, publication.payload, qos=1)
                self.metrics.inc("bytes_out_total", len(publication.payload))
        except MqttError as exc:
            self._note(logging.WARNING, "task_not_published", round=task.round, error=str(exc))

    def _close_round(self, closed: CloseRound[Update] | CloseRound[SecureKeys], now: float) -> None:
        if self.config.strategy.secure and closed.updates:
            self._start_secure(closed, now)
            return
        updates = [ClientUpdate.from_update(u) for u in closed.updates.values()]
        result = self.strategy.finish_round(self.state, self.plan, updates) if updates else None
        self._record_round(closed, result, now)

    def _start_secure(self, closed: CloseRound[SecureKeys], now: float) -> None:
        """Stage 1 closed: weigh the reporting devices, then relay their keys (stages 2-4 follow in ``tick``)."""
        reports = closed.updates
        weighting = self.strategy.secure_weights(self.state, {d: (r.n_examples, r.class_losses) for d, r in reports.items()})
        try:
            collection = SecureCollection(
                federation=self.config.federation.id, round_number=closed.round, setup=self._task.secure,
                layout=self.layout, masks=self.state.masks, reports=reports,
                weights=dict(zip(weighting.ids, weighting.weights.tolist())), stage_s=self.config.rounds.deadline_s, now=now)
        except SecAggError as exc:
            self._secure_failed(closed, exc.reason, str(exc), now)
            return
        self._secure = (collection, closed, weighting)
        emit(log, logging.INFO, "secure_stage", round=closed.round, stage="shares", devices=len(collection.expected),
             degree=self._task.secure.degree, threshold=self._task.secure.threshold)
        self._publish_secure(collection.outbox(), now)

    def _advance_secure(self, now: float) -> None:
        collection, closed, weighting = self._secure
        outcome = collection.tick(now)
        if outcome is None:
            return
        if isinstance(outcome, list):
            emit(log, logging.INFO, "secure_stage", round=closed.round, stage=collection.stage, devices=len(outcome))
            self._publish_secure(outcome, now)
            return
        self._secure = None
        if isinstance(outcome, SecureFailed):
            self._secure_failed(closed, outcome.reason, outcome.detail, now)
            return
        for owner, revealer in outcome.bad_shares:  # counted and logged; either of the two may have lied
            self.metrics.inc("updates_rejected_total", reason="bad_share")
            self._note(logging.WARNING, "secure_share_rejected", round=closed.round, owner=owner, revealer=revealer,
                       detail="a share of the owner's secret, revealed at a point the revealer does not hold or off "
                              "the owner's polynomial: the owner dealt it or the revealer forged it; left out")
        result = self.strategy.finish_secure_round(self.state, self.plan, weighting, outcome.mean_delta,
                                                   outcome.buffer_delta, outcome.survivors, self.rng)
        secure: dict[str, Any] = {"survivors": len(outcome.survivors), "dropped": list(outcome.dropped)}
        if collection.setup.noise_multiplier > 0:
            secure.update(self._central_epsilon(collection.noise(len(outcome.survivors))))
        self._record_round(closed, result, now, secure=secure)

    def _central_epsilon(self, noise: dict[str, float]) -> dict[str, Any]:
        """The central ε of the sums released so far, against this coordinator alone, at the noise
        the survivors' shares put into each sum (what every device's own ledger charges at its own
        weight is the device's business; this is the operator's view, at the round's largest weight)."""
        rdp = rdp_round(noise["mu"], noise["clip_norm"], noise["scale"], int(noise["dimension"]), noise["weight_max"])
        total = rdp + self.central_rdp if self.central_rdp.size else rdp
        self.central_rdp = total
        delta = self.config.strategy.secure_delta
        return {"noise": noise, "delta": delta, "epsilon_round": epsilon_from_rdp(rdp, delta, DEFAULT_ORDERS)[0],
                "epsilon_total": epsilon_from_rdp(total, delta, DEFAULT_ORDERS)[0]}

    def _secure_failed(self, closed: CloseRound[SecureKeys], reason: str, detail: str, now: float) -> None:
        """The round ends without a sum: the model stays, the round counts (devices move on)."""
        self._secure = None
        self.metrics.inc("secure_rounds_failed_total", reason=reason)
        self._note(logging.WARNING, "secure_round_failed", round=closed.round, reason=reason, detail=detail)
        self._record_round(closed, None, now, secure={"failed": reason})

    def _publish_secure(self, messages: list, now: float) -> None:
        try:
            for message in messages:
                for publication in self.channel.send(message, now):
                    self.link.publish(publication.topic, publication.payload, qos=1)
                    self.metrics.inc("bytes_out_total", len(publication.payload))
        except MqttError as exc:
            self._note(logging.WARNING, "secure_stage_not_published", error=str(exc))

    def _record_round(self, closed: CloseRound, result: Any, now: float, secure: dict[str, Any] | None = None) -> None:
        """Evaluate, checkpoint and count a closed round, plain or secure (``result`` None: no aggregate)."""
        plan = self.plan
        if result is not None:
            for device in closed.updates:
                self.holders[device] = self.state.mask_version
            self.state = result.state
        else:
            self.state = replace(self.state, round=self.state.round + 1)
        entry: dict[str, Any] = {
            "round": closed.round, "selected": len(plan.selected), "received": len(closed.updates),
            "reached_quorum": closed.reached_quorum, "readjust": plan.readjust, "p_t": plan.p_t,
            "mask_version": self.state.mask_version, "duration_s": now - self.round_started,
            "cum_bytes_in": self._bytes_before[0] + int(self.metrics.value("bytes_in_total")),
            "cum_bytes_out": self._bytes_before[1] + int(self.metrics.value("bytes_out_total")),
            "n_valid": 0, "rejected": {}, "scores": {}, "mask_churn": 0.0,  # a round nobody answered
        }
        if result is not None:
            for device, score in result.scores.items():
                if score.gated_by:
                    self.metrics.inc("updates_gated_total", device=device, reason=score.gated_by)
                    self.registry.rejected(device, closed.round, f"gated by {score.gated_by}", now)
                    self._registry_dirty = True
                    self._note(logging.INFO, "update_gated", device=device, round=closed.round, reason=score.gated_by)
            entry.update(n_valid=result.n_valid, rejected=result.rejected, mask_churn=result.mask_churn,
                         scores={d: asdict(s) for d, s in result.scores.items()})
        if secure is not None:
            entry["secure"] = secure
        if self.central_rdp.size:  # every entry, so that a restart after any round resumes the accountant
            entry["central_rdp"] = [float(v) for v in self.central_rdp]
        entry["local_macs"] = int(sum(u.metrics.get("macs", 0.0) for u in closed.updates.values()))
        entry["update_bytes"] = {d: self._round_update_bytes.get(d, 0) for d in sorted(closed.updates)}
        every = self.config.evaluation.every_rounds
        if self.evaluation is not None and (closed.round % every == 0 or closed.round == self.config.rounds.total):
            from fedprune.common.models import evaluate

            ev = evaluate(self.spec, self.state.params, *self.evaluation)
            entry.update(ev.metrics, score=ev.score, score_name=ev.score_name)  # loss and the task's metrics
            self.metrics.set("global_score", ev.score)
            if "accuracy" in ev.metrics:
                self.metrics.set("global_accuracy", ev.metrics["accuracy"])
            self.metrics.set("global_loss", ev.loss)
        entry["close_s"] = self.clock() - now
        score = (entry["score_name"], entry["score"]) if "score" in entry else None
        self._pending_commit = (closed.round, entry, self._maybe_release(closed.round, score))
        self._commit_round()

    def _follow_allow_list(self) -> None:
        """The operator commands own the allow-list file; the daemon adopts every change within
        one tick. A device no longer accepted is offline at once, its uplinks fail as
        ``unknown_sender``, and the open round drops its update and stops waiting for it: the
        round closes on the others (quorum counts the devices still expected), as it would had
        the device never been selected."""
        try:
            document = self.registry_store.allow_list_if_changed()
        except StateError as exc:
            self._note(logging.ERROR, "allow_list_unreadable", error=str(exc), action="keeping_the_previous_one")
            return
        if document is None:
            return
        change = self.registry.replace_allow_list(document)
        for device in change.withdrawn:
            self.early_updates.pop(device, None)
            self.downlink.lost(device)
            in_round = self.rounds.discard(device)
            if self._secure is not None:
                self._secure[0].forget(device, revoked=True)
            self.metrics.inc("revocations_applied_total")
            self._note(logging.WARNING, "device_revoked", device=device, open_round=self.rounds.open_round,
                       dropped_from_round=in_round)
        for device in change.admitted:
            self._note(logging.INFO, "device_enrolled", device=device)

    def _save_registry(self, now: float) -> None:
        """Presence only (the allow-list is the operator commands' file, never written back from
        here), batched: one write per REGISTRY_SAVE_S, not one per Register (O(devices) each); a
        failed write is logged, counted and retried, never fatal."""
        self._next_registry_save = now + REGISTRY_SAVE_S
        try:
            self.registry_store.save_presence(self.registry)
        except OSError as exc:
            self.metrics.inc("checkpoint_failures_total")
            self._note(logging.ERROR, "registry_save_failed", error=repr(exc), action=f"retry_in_{REGISTRY_SAVE_S}s")
            return
        self._registry_dirty = False

    def _commit_round(self) -> None:
        """Checkpoint the closed round; only then does it count. A failed write (disk full) keeps
        the previous checkpoint intact (atomic_write), is logged and counted, and is retried
        every few seconds; no new round starts meanwhile."""
        completed, entry, release = self._pending_commit
        try:
            self._checkpoint(completed=completed, last_entry=entry)
            self.history_bytes = self.state_dir.append_history(entry, self.history_bytes)
        except OSError as exc:
            self.metrics.inc("checkpoint_failures_total")
            self._retry_commit_at = self.clock() + COMMIT_RETRY_S
            self._note(logging.ERROR, "checkpoint_failed", round=completed, error=repr(exc),
                       action=f"retry_in_{COMMIT_RETRY_S}s")
            return
        self._pending_commit = None
        self.last_entry = entry
        self.metrics.inc("rounds_completed_total")  # before the registry write, to trail history.jsonl by little
        self.metrics.observe("round_duration_seconds", entry["duration_s"])
        self.metrics.set("last_round_completed_timestamp_seconds", self.clock())
        self.metrics.set("current_round", self.state.round)
        self.metrics.clear("device_importance")
        self.metrics.clear("device_quality")
        for device, score in entry.get("scores", {}).items():
            self.metrics.set("device_importance", score["r"], device=device)
            self.metrics.set("device_quality", score["q"], device=device)
        self.trail.add(entry)
        self._save_registry(self.clock())
        self._note(logging.INFO, "round_closed", round=completed, received=entry["received"],
                   selected=entry["selected"], **({entry["score_name"]: round(entry["score"], 4)} if "score" in entry else {}),
                   duration_s=round(entry["duration_s"], 2))
        if release is not None:
            self._publish_release(release)
        self._publish_view(self.clock())

    # ---- the operator's view ---------------------------------------------------------------------
    def _note(self, level: int, event: str, **fields: Any) -> None:
        """Log an event and, if an operator should see it on the status page, list it there."""
        emit(log, level, event, **fields)
        if level >= logging.WARNING or event in FEED_EVENTS:
            self.feed.record(logging.getLevelName(level), event, fields, self.clock())

    def _count_upload(self, topic: str, size: int) -> None:
        """Bytes on an enrolled device's update topic, until its update is complete (all chunks)."""
        head, _, device = topic.rpartition("/")
        if head.endswith("/update") and self.registry.get(device) is not None:
            self._upload_bytes[device] = self._upload_bytes.get(device, 0) + size

    def _phase(self) -> str:
        if self.finished:
            return "finished"
        if self._pending_commit is not None:
            return "committing"
        if self._lost_since is not None:
            return "paused"
        if self._secure is not None:
            return "secure_aggregation"
        return "waiting_for_devices" if self.rounds.open_round is None else "training"

    def _selected(self) -> int:
        return len(self.plan.selected) if self.rounds.open_round is not None and self.plan is not None else 0

    def _quorum(self) -> int:
        """Updates the open round waits for: [rounds] quorum, or every selected device if fewer."""
        selected = self._selected()
        return min(self.config.rounds.quorum, selected) if selected else self.config.rounds.quorum

    def _publish_view(self, now: float) -> None:
        """Rebuild the operator's view and swap it in whole (the HTTP thread only reads the reference)."""
        self._next_view = now + VIEW_REFRESH_S
        records = self.registry.devices()
        self.metrics.set("devices_enrolled", sum(1 for r in records if not r.revoked))
        open_round = self.rounds.open_round
        live = LiveRound(round=open_round if open_round is not None else self.state.round, phase=self._phase(),
                         deadline=self.rounds.deadline, quorum=self._quorum(), selected=self._selected(),
                         received=len(self.rounds.received) if open_round is not None else 0)
        self.view = build_view(ViewInputs(
            federation=self.config.federation.id, total_rounds=self.config.rounds.total,
            completed_rounds=self.completed, records=records, online=self.registry.online(now), trail=self.trail,
            importance=self.state.importance, quality=self.state.quality, releases=tuple(self.releases),
            excluded=tuple(self.unfit), live=live, events=self.feed.snapshot(),
        ), now, running=True)

    # ---- the federation key ----------------------------------------------------------------------
    def _follow_members(self, now: float) -> None:
        """Rotate the key if the members changed, and put the retained release under the new key
        (that waits for the broker's ack: the callers run only while the broker is reachable)."""
        self._next_members_check = now + MEMBERS_CHECK_S
        if self._rotate_key(now):
            self._republish_latest_release()

    def _rotate_key(self, now: float) -> bool:
        grants = self.federation_key.rotation(now)
        if grants is None:
            return False
        self._publish_grants(grants)
        emit(log, logging.INFO, "group_key_rotated", key_id=self.channel.group_key.key_id.hex(),
             members=len(self.channel.group_members))
        return True

    def _grant_key(self, device: str, now: float) -> None:
        """A registering device may lack the key (it says so by registering after an unknown key id):
        send its grant again, or rotate first if it joined the allow-list since the last key."""
        grant = self.federation_key.grant(device, now)
        if grant is None:
            self._follow_members(now)
        else:
            self._publish_grants([grant])

    def _publish_grants(self, publications: list[Publication]) -> None:
        """Retained on each member's inbox; one lost in an outage is sent again when its device registers."""
        try:
            for publication in publications:
                self.link.publish(publication.topic, publication.payload, qos=1, retain=publication.retain)
                self.metrics.inc("bytes_out_total", len(publication.payload))
        except MqttError as exc:
            self._note(logging.WARNING, "key_grant_not_published", error=str(exc))

    # ---- releases -------------------------------------------------------------------------------
    def _maybe_release(self, round_number: int, score: tuple[str, float] | None) -> ModelRelease | None:
        """Export before the checkpoint (so the version is persisted with the round), publish after."""
        if not release_due(self.config, round_number):
            return None
        version = self.release_version + 1
        try:
            release, path = make_release(self.spec, self.state.params, version=version, variant=self.config.export.variant,
                                         opset=self.config.export.opset, state_root=self.state_dir.root,
                                         metadata=release_metadata(self.config, round_number, self.state.mask_version,
                                                                   score))
        except OSError as exc:
            self._note(logging.ERROR, "release_failed", version=version, round=round_number, error=repr(exc))
            return None
        self.release_version = version
        self.releases.append(release_row(version, release_metadata(self.config, round_number, self.state.mask_version,
                                                                   score), len(release.onnx), self.clock()))
        emit(log, logging.INFO, "release_exported", version=version, round=round_number, bytes=len(release.onnx),
             file=path)
        return release

    def _republish_latest_release(self) -> None:
        """After a restart the broker may have lost the retained release; publishing it again is harmless."""
        latest = latest_release(self.state_dir.root)
        if latest is None or latest[0] != self.release_version:
            return
        from fedprune.coordinator.export import build_release

        self._publish_release(build_release(latest[0], latest[1].read_bytes()))

    def _publish_release(self, release: ModelRelease, timeout_s: float = 30.0) -> None:
        """Retained and acknowledged before returning: the final release must outlive this process."""
        self._rotate_key(self.clock())
        try:
            handles = []
            for publication in self.channel.send(release, self.clock()):
                handles.append(self.link.publish(publication.topic, publication.payload, qos=1,
                                                 retain=publication.retain))
                self.metrics.inc("bytes_out_total", len(publication.payload))
            deadline = time.monotonic() + timeout_s
            for handle in handles:
                if not handle.wait(max(0.0, deadline - time.monotonic())):
                    raise MqttError(f"broker did not acknowledge the release within {timeout_s} s")
        except MqttError as exc:
            self._note(logging.WARNING, "release_not_published", version=release.version, error=str(exc))
            return
        self._note(logging.INFO, "release_published", version=release.version, bytes=len(release.onnx))


def run_with_broker(config: CoordinatorConfig) -> int:
    """Run the daemon, first starting the embedded broker when the config asks for one."""
    if not config.broker.embedded:
        return CoordinatorDaemon(config).run()
    from urllib.parse import urlsplit

    from fedprune.coordinator.fleet.broker import EmbeddedBroker

    parts = urlsplit(config.broker.url)
    with EmbeddedBroker(host=parts.hostname or "127.0.0.1", port=parts.port or 1883):
        return CoordinatorDaemon(config).run()
