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
import queue
import signal
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import numpy as np

from fedprune.coordinator.config import CoordinatorConfig, model_spec
from fedprune.coordinator.core.federation_key import FederationKey
from fedprune.coordinator.releases import latest_release, make_release, release_due, release_metadata
from fedprune.coordinator.metrics import Metrics, MetricsServer, declare_metrics
from fedprune.coordinator.fleet.registry_store import RegistryStore
from fedprune.coordinator.core.rounds import Accepted, CloseRound, RetryRound, RoundMachine, RoundPolicy
from fedprune.coordinator.state import Checkpoint, StateDir, StateError, load_identity
from fedprune.coordinator.core.strategy import ClientUpdate, RoundPlan, Strategy
from fedprune.common.data import DATA_MISMATCH
from fedprune.common.link import Link
from fedprune.common.mqtt import LinkConfig, MqttError, MqttLink
from fedprune.protocol.channel import CoordinatorChannel, Publication
from fedprune.protocol.crypto import PublicIdentity
from fedprune.protocol.errors import ProtocolError
from fedprune.protocol.layout import ModelLayout
from fedprune.protocol.messages import ModelRef, ModelRelease, Register, RoundTask, State, Status, Update
from fedprune.protocol.sparse import SparseParams

log = logging.getLogger("fedprune.coordinator")

COMMIT_RETRY_S = 5
REGISTRY_SAVE_S = 5
MEMBERS_CHECK_S = 1.0  # how often the allow-list is compared with the federation key's members


class CoordinatorDaemon:
    def __init__(self, config: CoordinatorConfig, clock: Callable[[], float] = time.time) -> None:
        from fedprune.common.models import init_params, model_layout

        self.config = config
        self.clock = clock
        self.stopping = False
        self.state_dir = StateDir(config.state.dir, keep=config.state.keep_checkpoints)
        self.state_dir.ensure()
        self.identity = load_identity(self.state_dir)
        self.registry_store = RegistryStore(self.state_dir.root)
        self.registry = self.registry_store.load(config.rounds.heartbeat_timeout_s)
        self.spec = model_spec(config)
        self.layout: ModelLayout = model_layout(self.spec)
        self.model_ref = ModelRef(self.spec.name, tuple(self.spec.input_shape), self.spec.num_classes)
        self.strategy = Strategy(config.strategy)
        self.metrics = Metrics()
        declare_metrics(self.metrics)
        self.history_bytes = 0  # committed size of history.jsonl
        self.holders: dict[str, int] = {}
        # Updates for the round about to open that arrive before it opens: after a restart the
        # broker delivers the devices' queued uploads first, and their resends would be duplicates.
        self.early_updates: dict[str, Update] = {}
        self.release_version = 0
        checkpoint = self.state_dir.load_latest_checkpoint()
        if checkpoint is None:
            aside = self.state_dir.set_aside_history()
            if aside is not None:
                log.warning("event=history_set_aside file=%s reason=no_checkpoint", aside)
            self.rng = np.random.default_rng(config.federation.seed)
            self.state = self.strategy.initial_state(self.layout, init_params(self.spec, config.federation.seed), self.rng)
            self._checkpoint(completed=0)
        else:
            self._restore(checkpoint)
        self.channel = CoordinatorChannel(
            federation=config.federation.id, identity=self.identity, devices=self._device_key, layout=self.layout,
            max_chunk=config.broker.max_message_kib * 1024,
        )
        self.federation_key = FederationKey(self.channel, self.registry)
        # Updates queued at the broker while this process was down name the current mask version.
        self.channel.remember_masks(self.state.mask_version, self.state.masks)
        self.rounds: RoundMachine[Update] = RoundMachine(RoundPolicy(
            quorum=config.rounds.quorum, deadline_s=config.rounds.deadline_s,
            on_missed_quorum=config.rounds.on_missed_quorum, max_retries=config.rounds.max_retries,
        ))
        self.evaluation = self._load_evaluation()
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
        self.unfit: dict[str, str] = {}  # device -> why its data does not fit the model (not selected)

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
        log.info("event=resumed completed_rounds=%d mask_version=%d", self.completed, self.state.mask_version)

    def _device_key(self, device_id: str) -> PublicIdentity | None:
        record = self.registry.get(device_id)
        return None if record is None else PublicIdentity(record.sign_public, record.kx_public)

    def _load_evaluation(self):
        path = self.config.evaluation.data
        if path is None:
            return None
        from fedprune.common.data import load_local_data

        return load_local_data(path)

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
        if self.config.metrics.port >= 0:
            server = MetricsServer(self.metrics, self.config.metrics.host, self.config.metrics.port).start()
            log.info("event=metrics_listening url=http://%s:%d/metrics", self.config.metrics.host, server.port)
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
        log.info("event=start federation=%s completed_rounds=%d total_rounds=%d broker=%s",
                 self.config.federation.id, self.completed, self.config.rounds.total, self.config.broker.url)
        self._follow_members(self.clock())  # a fresh key every start: the retained release goes out under it

    def finish(self) -> None:
        self.link.close()
        if self._registry_dirty:
            self._save_registry(self.clock())
        log.info("event=stopped completed_rounds=%d", self.completed)

    def on_message(self, topic: str, payload: bytes) -> None:
        now = self.clock()
        if self._lost_since is not None:  # back from an outage: move the deadline before queued uploads are judged
            self._broker_lost(now)
        self.metrics.inc("bytes_in_total", len(payload))
        duplicates = self.channel.reassembler.duplicates
        try:
            message = self.channel.receive(topic, payload, now)
        except ProtocolError as exc:
            self.metrics.inc("updates_rejected_total", reason=exc.reason)
            log.warning("event=rejected topic=%s reason=%s detail=%s", topic, exc.reason, exc)
            return
        if self.channel.reassembler.duplicates > duplicates:
            self.metrics.inc("updates_rejected_total", reason="duplicate_transfer")  # counted; no line each time
            log.debug("event=rejected topic=%s reason=duplicate_transfer detail=chunk of a transfer already "
                      "received (broker redelivery or replay)", topic)
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
            self._registry_dirty = True
            log.info("event=registered device=%s examples=%d", message.device, message.n_examples)
            self._grant_key(message.device, now)
            if self.unfit.pop(message.device, None) is not None:  # restarted, perhaps with other data
                self.metrics.set("devices_excluded", len(self.unfit), reason=DATA_MISMATCH)
                log.info("event=device_readmitted device=%s reason=registered", message.device)
            self._announce_to_late_joiner(message.device)
        elif isinstance(message, Status):
            self.registry.seen(message.device, now, online=message.state is not State.OFFLINE)
            if message.state is State.OFFLINE:
                log.info("event=device_offline device=%s reason=%s", message.device, message.reason)
            if message.state is State.DECLINED:
                self._on_declined(message, now)
        elif isinstance(message, Update):
            self.registry.seen(message.device, now)
            if self.rounds.open_round is None and message.round == self.state.round:
                self.early_updates[message.device] = message
                self.metrics.inc("updates_held_total")
                log.info("event=update_held device=%s round=%d reason=round_not_open_yet", message.device,
                         message.round)
            else:
                self._offer_update(message, now)

    def _on_declined(self, status: Status, now: float) -> None:
        """Counted once per device and round: a device answers every re-announcement again. A
        ``data_mismatch: <detail>`` decline is final for this model: the device leaves the open
        round (it no longer holds up quorum) and is not selected until it registers again."""
        reason, _, detail = status.reason.partition(":")
        if self.declines.get(status.device) != (status.round, reason):
            self.declines[status.device] = (status.round, reason)
            self.metrics.inc("rounds_declined_total", reason=reason)
            self.registry.declined(status.device, status.round, status.reason, now)
            self._registry_dirty = True
            log.info("event=declined device=%s round=%d reason=%s%s", status.device, status.round, reason,
                     f" detail={detail.strip()}" if detail else "")
        if reason != DATA_MISMATCH or status.device in self.unfit:
            return
        self.unfit[status.device] = detail.strip()
        self.metrics.set("devices_excluded", len(self.unfit), reason=DATA_MISMATCH)
        self.rounds.withdraw(status.device, status.round)
        log.error("event=device_excluded device=%s reason=%s detail=%s until=registered_again fix='give the device "
                  "data that fits [federation] model/input_shape/num_classes, or fix those keys'",
                  status.device, DATA_MISMATCH, detail.strip())

    def _offer_update(self, update: Update, now: float) -> None:
        verdict = self.rounds.on_update(update.device, update.round, update, now)
        if isinstance(verdict, Accepted):
            self.metrics.inc("updates_accepted_total")
            log.info("event=update_accepted device=%s round=%d", update.device, update.round)
        else:
            self.metrics.inc("updates_rejected_total", reason=verdict.reason)
            level = logging.DEBUG if verdict.reason == "duplicate" else logging.WARNING  # a resend: counted only
            log.log(level, "event=update_rejected device=%s round=%d reason=%s", update.device, update.round,
                    verdict.reason)

    def tick(self) -> None:
        now = self.clock()
        self._watch_reassembly(now)
        self._follow_allow_list()
        self.metrics.set("devices_online", len(self.registry.online(now)))
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
        if self.rounds.open_round is None:
            self._maybe_start_round(now)
            return
        action = self.rounds.tick(now)
        if isinstance(action, CloseRound):
            self._close_round(action, now)
        elif isinstance(action, RetryRound):
            log.warning("event=round_retry round=%d attempt=%d missing=%s", action.round, action.attempt,
                        ",".join(action.missing))
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
            self.metrics.set("reassembly_dropped_total", count, reason=reason)
        if now >= self._next_drop_log:
            log.warning("event=reassembly_dropped new=%d %s", dropped - self._drops_logged,
                        " ".join(f"{reason}={count}" for reason, count in sorted(reassembler.evictions.items())))
            self._drops_logged, self._next_drop_log = dropped, now + 10.0

    def _broker_lost(self, now: float) -> bool:
        """True while the link that was up is down: no round opens, and the open round's deadline
        waits, so an outage does not close rounds that no device could hear or answer."""
        if self.link.connected or self.link.stats().connects == 0:
            if self._lost_since is not None:
                paused = now - self._lost_since
                self._lost_since = None
                if self.rounds.open_round is not None:
                    self._task = replace(self._task, deadline=self.rounds.postpone(paused))
                    self.next_announce = now
                log.info("event=rounds_resumed paused_s=%.1f", paused)
            return False
        if self._lost_since is None:
            self._lost_since = now
            log.warning("event=rounds_paused reason=broker_unreachable round=%s", self.rounds.open_round)
        return True

    def _maybe_start_round(self, now: float) -> None:
        online = tuple(d for d in self.registry.online(now) if d not in self.unfit)
        if len(online) < self.config.rounds.min_devices:
            return
        self.plan = self.strategy.plan_round(self.state, online, self.rng)
        deadline = now + self.config.rounds.deadline_s
        include_masks = any(self.holders.get(d) != self.state.mask_version for d in self.plan.selected)
        self._task = RoundTask(
            federation=self.config.federation.id, round=self.plan.round, mask_version=self.state.mask_version,
            model=self.model_ref, weights=SparseParams.from_dense(self.layout, self.state.params, self.state.masks),
            hyper=self.plan.hyper, deadline=deadline, selected=self.plan.selected, include_masks=include_masks,
        )
        self.rounds.open(self.plan.round, self.plan.selected, now)
        held, self.early_updates = self.early_updates, {}
        for update in held.values():
            self._offer_update(update, now)
        self.round_started = now
        self.metrics.set("current_round", self.plan.round)
        log.info("event=round_open round=%d selected=%d readjust=%s p_t=%.3f deadline_s=%.1f",
                 self.plan.round, len(self.plan.selected), self.plan.readjust, self.plan.p_t,
                 self.config.rounds.deadline_s)
        self._publish_task(self._task, now)

    def _announce_to_late_joiner(self, device: str) -> None:
        if self.rounds.open_round is not None and device in self.rounds.missing:
            self._publish_task(replace(self._task, include_masks=True, selected=(device,)), self.clock())

    def _publish_task(self, task: RoundTask, now: float) -> None:
        """Re-announcements name only the devices still missing, so devices that already uploaded
        do not resend; the round machine keeps the full selection."""
        self.next_announce = now + self.config.rounds.reannounce_s
        self._follow_members(now)
        try:
            for publication in self.channel.send(task, now):
                self.link.publish(publication.topic, publication.payload, qos=1)
                self.metrics.inc("bytes_out_total", len(publication.payload))
        except MqttError as exc:
            log.warning("event=task_not_published round=%d error=%s", task.round, exc)

    def _close_round(self, closed: CloseRound[Update], now: float) -> None:
        plan = self.plan
        updates = [ClientUpdate.from_update(u) for u in closed.updates.values()]
        result = self.strategy.finish_round(self.state, plan, updates) if updates else None
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
            "cum_bytes_in": int(self.metrics.value("bytes_in_total")),
            "cum_bytes_out": int(self.metrics.value("bytes_out_total")),
            "n_valid": 0, "rejected": {}, "scores": {}, "mask_churn": 0.0,  # a round nobody answered
        }
        if result is not None:
            for device, score in result.scores.items():
                if score.gated_by:
                    self.metrics.inc("updates_gated_total", device=device, reason=score.gated_by)
                    log.warning("event=update_gated device=%s round=%d reason=%s", device, closed.round, score.gated_by)
            entry.update(n_valid=result.n_valid, rejected=result.rejected, mask_churn=result.mask_churn,
                         scores={d: asdict(s) for d, s in result.scores.items()})
        entry["local_macs"] = int(sum(u.metrics.get("macs", 0.0) for u in closed.updates.values()))
        every = self.config.evaluation.every_rounds
        if self.evaluation is not None and (closed.round % every == 0 or closed.round == self.config.rounds.total):
            from fedprune.common.models import evaluate

            ev = evaluate(self.spec, self.state.params, *self.evaluation)
            entry.update(accuracy=ev.accuracy, loss=ev.loss)
            self.metrics.set("global_accuracy", ev.accuracy)
        entry["close_s"] = self.clock() - now
        self._pending_commit = (closed.round, entry, self._maybe_release(closed.round, entry.get("accuracy")))
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
            log.error("event=allow_list_unreadable error=%s action=keeping_the_previous_one", exc)
            return
        if document is None:
            return
        change = self.registry.replace_allow_list(document)
        for device in change.withdrawn:
            self.early_updates.pop(device, None)
            in_round = self.rounds.discard(device)
            self.metrics.inc("revocations_applied_total")
            log.warning("event=device_revoked device=%s open_round=%s dropped_from_round=%s", device,
                        self.rounds.open_round, in_round)
        for device in change.admitted:
            log.info("event=device_enrolled device=%s", device)

    def _save_registry(self, now: float) -> None:
        """Presence only (the allow-list is the operator commands' file, never written back from
        here), batched: one write per REGISTRY_SAVE_S, not one per Register (O(devices) each); a
        failed write is logged, counted and retried, never fatal."""
        self._next_registry_save = now + REGISTRY_SAVE_S
        try:
            self.registry_store.save_presence(self.registry)
        except OSError as exc:
            self.metrics.inc("checkpoint_failures_total")
            log.error("event=registry_save_failed error=%r action=retry_in_%ds", exc, REGISTRY_SAVE_S)
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
            log.error("event=checkpoint_failed round=%d error=%r action=retry_in_%ds", completed, exc, COMMIT_RETRY_S)
            return
        self._pending_commit = None
        self.last_entry = entry
        self.metrics.inc("rounds_completed_total")  # before the registry write, to trail history.jsonl by little
        self.metrics.set("round_duration_seconds", entry["duration_s"])
        self.metrics.set("current_round", self.state.round)
        self.metrics.clear("device_importance")
        for device, score in entry.get("scores", {}).items():
            self.metrics.set("device_importance", score["r"], device=device)
        self._save_registry(self.clock())
        log.info("event=round_closed round=%d received=%d/%d accuracy=%s duration_s=%.2f",
                 completed, entry["received"], entry["selected"],
                 f"{entry['accuracy']:.4f}" if "accuracy" in entry else "n/a", entry["duration_s"])
        if release is not None:
            self._publish_release(release)

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
        log.info("event=group_key_rotated key_id=%s members=%d", self.channel.group_key.key_id.hex(),
                 len(self.channel.group_members))
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
            log.warning("event=key_grant_not_published error=%s", exc)

    # ---- releases -------------------------------------------------------------------------------
    def _maybe_release(self, round_number: int, accuracy: float | None) -> ModelRelease | None:
        """Export before the checkpoint (so the version is persisted with the round), publish after."""
        if not release_due(self.config, round_number):
            return None
        version = self.release_version + 1
        try:
            release, path = make_release(self.spec, self.state.params, version=version, variant=self.config.export.variant,
                                         opset=self.config.export.opset, state_root=self.state_dir.root,
                                         metadata=release_metadata(self.config, round_number, self.state.mask_version,
                                                                   accuracy))
        except OSError as exc:
            log.error("event=release_failed version=%d round=%d error=%r", version, round_number, exc)
            return None
        self.release_version = version
        log.info("event=release_exported version=%d round=%d bytes=%d file=%s", version, round_number,
                 len(release.onnx), path)
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
            log.warning("event=release_not_published version=%d error=%s", release.version, exc)
            return
        log.info("event=release_published version=%d bytes=%d", release.version, len(release.onnx))


def run_with_broker(config: CoordinatorConfig) -> int:
    """Run the daemon, first starting the embedded broker when the config asks for one."""
    if not config.broker.embedded:
        return CoordinatorDaemon(config).run()
    from urllib.parse import urlsplit

    from fedprune.coordinator.fleet.broker import EmbeddedBroker

    parts = urlsplit(config.broker.url)
    with EmbeddedBroker(host=parts.hostname or "127.0.0.1", port=parts.port or 1883):
        return CoordinatorDaemon(config).run()
