"""The agent's shell: one loop that feeds messages and clock ticks to AgentCore and carries out
its actions (train, charge the privacy ledger, seal and publish, report status, audit).

The same object runs on a device (``run``: MQTT, signals) and in the simulation (``start`` with
an in-memory link, then ``step``), so a simulated device is this code, not a model of it.

Everything that decides lives in ``fedprune.edge_agent.core.agent`` (what to do with a task),
``fedprune.edge_agent.core.guard`` (may this device train now), ``fedprune.edge_agent.core.privacy`` (clip, noise, budget)
and ``fedprune.protocol.channel`` (verify, decode, seal, chunk). When a task arrives the daemon samples
sysfs, asks its one ``Governor`` (which remembers the thermal latch) and the privacy ledger, and
hands the first reason to the core, which turns it into a DECLINED status. paho's callbacks
only enqueue; signal handlers only set a flag; the loop below is the only thread that touches
the core.

Why one file over 400 lines: the loop and one executor per action and per inbound kind, sharing
the loop's state (what was sent, what is missing, when to register again); the decisions are in
``core/``.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fedprune.edge_agent import sysfs, worker
from fedprune.edge_agent.core.agent import (
    AgentCore, Decline, Ignore, KeepResidual, Phase, PrivacyStep, ReportStatus, Resend, SendSecure, Tamper, Train,
    Upload,
)
from fedprune.edge_agent.audit import AuditLog, DeclineLog
from fedprune.edge_agent.core.secure import SUSPECT_REASONS
from fedprune.edge_agent.feedback_store import ResidualStore
from fedprune.common.bundle import Bundle, EnrollmentError, load_bundle
from fedprune.edge_agent.config import AgentConfig
from fedprune.common.configkit import ConfigError
from fedprune.common.data import DATA_MISMATCH, DataSummary, data_mismatch, load_local_data
from fedprune.common.model_rules import LAYOUT_MISMATCH, package_version
from fedprune.common.events import emit
from fedprune.common.fsutil import atomic_write, ensure_writable_dir
from fedprune.edge_agent.core.guard import Governor
from fedprune.edge_agent.core.held_weights import HeldWeights
from fedprune.edge_agent.ledger import PrivacyLedger, ledger_path
from fedprune.common.link import Link
from fedprune.common.mqtt import LastWill, LinkConfig, MqttError, MqttLink
from fedprune.edge_agent.core.privacy import PRIVACY_BUDGET_EXHAUSTED
from fedprune.protocol.channel import AgentChannel, Publication
from fedprune.protocol.errors import (
    BadSignature, LayoutMismatch, ProtocolError, Replayed, Stale, UnknownKey, UnknownMask,
)
from fedprune.protocol.layout import ModelLayout
from fedprune.edge_agent.release_store import ReleaseRejected, ReleaseStore
from fedprune.protocol.messages import (
    MISSING_BASE, KeyGrant, ModelRef, ModelRelease, Register, RoundTask, State, Status, Update,
)
from fedprune.protocol.secure_messages import SECURE_DOWNLINKS

log = logging.getLogger("fedprune.agent")

# A task whose mask this agent lacks (it restarted, the coordinator thinks it holds the mask) is
# answered by registering again, which tells the coordinator to resend with the mask; at most
# this often, since the coordinator re-announces to every selected device that has not answered.
# A broadcast under a federation key it lacks is answered the same way: a Register makes the
# coordinator send this device's key grant again (or rotate the key, if it is newly enrolled).
MASK_REQUEST_INTERVAL_S = 2.0
# Asking for a key that does not come (this device was revoked) backs off from there to this.
KEY_REQUEST_MAX_S = 300.0
# Before any task has verified: this many broadcasts failing the pinned coordinator key, or this
# long without a task (doubling after each warning), and the agent says its bundle may be foreign.
FOREIGN_BROADCASTS = 3
SILENCE_WARNING_S = 300.0

_PHASE_STATE = {Phase.IDLE: State.IDLE, Phase.TRAINING: State.TRAINING, Phase.UPLOADING: State.UPLOADING}

# What the protocol absorbs is not a warning: a redelivered or retained broadcast seen before
# (every reconnect), a task of a past round; a missing mask is asked for again by registering.
# Anything else that fails to verify or decode (a forged or foreign broadcast, another version)
# is one for a person to look at.
# LayoutMismatch: the ERROR that says what to do is layout_mismatch, once per model.
_REJECTION_LEVEL = {Replayed: logging.DEBUG, Stale: logging.INFO, UnknownMask: logging.INFO, LayoutMismatch: logging.DEBUG}


def _send_failure_level(exc: Exception) -> int:
    """A publish the link could not take (broker away) is tried again by the loop; a disk that
    refuses the audit log needs a person."""
    return logging.INFO if isinstance(exc, MqttError) else logging.WARNING


class AgentDaemon:
    def __init__(self, config: AgentConfig, clock: Callable[[], float] = time.time, *,
                 privacy_rng: np.random.Generator | None = None, tamper: Tamper | None = None) -> None:
        """``privacy_rng`` seeds the DP noise (default: the OS's entropy; the simulation passes a
        seeded one to be reproducible); ``tamper`` makes this a hostile device (the lab's attacks)."""
        self.config = config
        self.clock = clock
        self.stopping = False
        section = config.agent
        self.bundle: Bundle = load_bundle(section.bundle)
        self.state_dir = Path(section.state_dir)
        try:
            ensure_writable_dir(self.state_dir)
        except OSError as exc:
            raise ConfigError(f"[agent] state_dir {self.state_dir}: not writable ({exc.strerror or exc}); give "
                              "the agent's user ownership of it, or set [agent] state_dir to a writable "
                              "directory") from None
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        self.declines = DeclineLog(self.state_dir / "declines.json")
        self.data = DataSummary.of(*load_local_data(section.data, config.data))
        self.n_examples = self.data.n_examples
        self._mismatch: dict[ModelRef, str | None] = {}  # per model spec: why the data does not fit it
        self._last_model: ModelRef | None = None
        self.governor = Governor(config.governance.limits())
        self.ledger = self._privacy_ledger() if config.privacy.enabled else None
        privacy = None
        if self.ledger is not None:
            rng = np.random.default_rng() if privacy_rng is None else privacy_rng
            privacy = PrivacyStep(self.ledger.clip_norm, self.ledger.noise_multiplier, rng, config.privacy.mechanism)
        self.held = HeldWeights()
        self.residuals = ResidualStore(self.state_dir, self.bundle.federation)
        self.core = AgentCore(self.bundle.device_id, privacy=privacy,
                              report_class_losses=config.privacy.report_class_losses, tamper=tamper,
                              residual=self.residuals.load())
        self._layouts: dict[ModelRef, ModelLayout | ValueError] = {}  # a ValueError: cannot be built here
        self.channel = AgentChannel(
            federation=self.bundle.federation, device=self.bundle.device_id, identity=self.bundle.identity,
            coordinator=self.bundle.coordinator, layout=self._layout_for,
        )
        small = config.agent.train_in_subprocess
        self.releases = ReleaseStore(self.state_dir / "models", keep=config.inference.keep_releases,
                                     check_model=worker.model_problem_in_child if small else None)
        self.server = None
        self._sent: dict[int, list[Publication]] = {}
        self._round = 0
        self._connects_seen = 0
        self._tasks_seen = False
        self._next_heartbeat = 0.0
        self._mask_missing = False
        self._key_missing = False
        self._key_id: bytes | None = None  # the newest federation key granted to this device
        self._next_mask_request = 0.0
        self._key_request_s = MASK_REQUEST_INTERVAL_S
        self._next_key_request = 0.0
        self._unknown_key_said: str | None = None  # the last unknown-key rejection logged as a warning
        self._foreign_broadcasts = 0
        self._started_at = clock()
        self._silence_warning_s = SILENCE_WARNING_S
        self._next_silence_warning = self._started_at + SILENCE_WARNING_S
        self.link: MqttLink | None = None
        # (topic, payload, arrival time): a task that waited here while this agent trained is
        # not a fresh request for its update (AgentCore.on_task).
        self.inbox: queue.Queue[tuple[str, bytes, float]] = queue.Queue()

    def _privacy_ledger(self) -> PrivacyLedger:
        p = self.config.privacy
        return PrivacyLedger(ledger_path(self.state_dir, self.bundle.federation), self.bundle.federation,
                             epsilon_budget=p.epsilon_budget, delta=p.delta, clip_norm=p.clip_norm,
                             noise_multiplier=p.noise_multiplier)

    def _layout_for(self, model: ModelRef) -> ModelLayout:
        """Built once per model, in a child by default; a model that cannot be built here is
        remembered too (ValueError, as the codec expects): a re-announced task must not start
        another child that imports torch only to fail the same way."""
        if model not in self._layouts:
            resolve = worker.layout_in_child if self.config.agent.train_in_subprocess else worker.layout_for
            try:
                self._layouts[model] = resolve(model)
            except ValueError as exc:
                self._layouts[model] = exc
        found = self._layouts[model]
        if isinstance(found, ValueError):
            raise found
        return found

    def _link_config(self) -> LinkConfig:
        override = self.config.broker
        url = override.url or self.bundle.broker_url
        ca_file = override.ca_file
        if ca_file is None and self.bundle.ca_pem and url.startswith("mqtts://"):
            ca_file = self.state_dir / "broker-ca.pem"
            atomic_write(ca_file, self.bundle.ca_pem, mode=0o644)
        return LinkConfig(
            url=url, client_id=f"fedprune-agent-{self.bundle.device_id}",
            username=self.bundle.broker_username or None, password=self.bundle.broker_password or None,
            ca_file=ca_file, will=self.last_will(), renew_will=self.last_will,
        )

    def last_will(self) -> LastWill:
        """A freshly sealed offline Status (also called on the link's network thread: see ``AgentChannel.last_will``)."""
        will = self.channel.last_will(self.clock())
        return LastWill(will.topic, will.payload, qos=1)

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        return [(f, 1) for f in self.channel.subscriptions]

    def enqueue(self, topic: str, payload: bytes) -> None:
        """The link's callback (its own thread on MQTT): stamp and queue, nothing else."""
        self.inbox.put((topic, payload, self.clock()))

    def open_link(self) -> MqttLink:
        return MqttLink(self._link_config(), subscriptions=self.subscriptions, on_message=self.enqueue)

    def stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self._check_device()
        if not self.config.agent.train_in_subprocess:
            worker.warm_up()
        self.start(self.open_link())
        http = None
        if self.config.inference.http_port >= 0:
            from fedprune.edge_agent.inference import InferenceHTTP, ModelServer

            self.server = ModelServer()
            current = self.releases.current()
            if current is not None:
                self._serve(*current)
            http = InferenceHTTP(self.server, self.config.inference.http_host, self.config.inference.http_port).start()
            host, port = http.address
            emit(log, logging.INFO, "inference_listening", url=f"http://{host}:{port}/predict")
        try:
            while not self.stopping:
                self.step(wait_s=0.2)
        finally:
            self.finish()
            if http is not None:
                http.stop()
        return 0

    def _check_device(self) -> None:
        """``cuda`` without a GPU torch can see is final: every round would decline training_failed."""
        section = self.config.agent
        if section.device != "cuda":
            return
        check = worker.device_problem_in_child if section.train_in_subprocess else worker.device_problem
        problem = check(section.device)
        if problem:
            raise ConfigError(f"[agent] device = \"cuda\": {problem}; set it to \"auto\" (CUDA where present) or "
                              "\"cpu\", or install NVIDIA's torch wheel (firmware_notes/jetson.md)")

    def start(self, link: Link) -> None:
        self.link = link
        emit(log, logging.INFO, "start", device=self.bundle.device_id, federation=self.bundle.federation,
             examples=self.n_examples, broker=self.link_url)

    def step(self, wait_s: float = 0.0) -> None:
        """One pass of the loop: at most one message (waiting up to ``wait_s`` for it), then the timers."""
        self._check_bundle_accepted()
        self._maybe_register()
        try:
            topic, payload, received_at = self.inbox.get(timeout=wait_s) if wait_s else self.inbox.get_nowait()
        except queue.Empty:
            pass
        else:
            self._on_message(topic, payload, received_at)
        self._maybe_heartbeat()
        self.channel.reassembler.expire(self.clock())

    def finish(self) -> None:
        if self.link.connected:
            self._publish_status(State.OFFLINE, "stopped")
        self.link.close()
        emit(log, logging.INFO, "stopped", device=self.bundle.device_id)

    @property
    def link_url(self) -> str:
        return self.config.broker.url or self.bundle.broker_url

    def _check_bundle_accepted(self) -> None:
        """A login the broker refuses before this agent ever connected is final: the bundle is not
        for this broker, and retrying cannot help (exit 78 with the fix). Silence is not final (the
        coordinator may be down, or waiting for enough devices), so it is only said, less and less often."""
        refusal = self.link.refusal
        if refusal is not None and self.link.stats().connects == 0:
            raise EnrollmentError(
                f"{self.link_url} refused the login of device {self.bundle.device_id!r} ({refusal.reason}, CONNACK "
                f"code {refusal.reason_code}): the bundle {self.config.agent.bundle} (federation "
                f"{self.bundle.federation!r}) is not accepted by this broker; it may be from another federation, "
                "the device may be revoked or its password changed: install a fresh bundle from this federation's "
                "coordinator (`fedprune-coordinator provision` or `enroll`), or fix [broker] url")
        now = self.clock()
        if not self._tasks_seen and now >= self._next_silence_warning:
            emit(log, logging.WARNING, "no_task_yet", waited_s=round(now - self._started_at),
                 connected=self.link.connected, federation=self.bundle.federation, bundle=self.config.agent.bundle,
                 note="is the coordinator running, and is this bundle from its federation and broker?")
            self._silence_warning_s *= 2
            self._next_silence_warning = now + self._silence_warning_s

    def _foreign_broadcast(self) -> None:
        """Not final: on a broker without ACLs anyone can publish a badly signed task, and exiting
        on it would let them stop every device. Said once, as an error with the fix."""
        self._foreign_broadcasts += 1
        if not self._tasks_seen and self._foreign_broadcasts == FOREIGN_BROADCASTS:
            emit(log, logging.ERROR, "foreign_broadcasts", count=self._foreign_broadcasts,
                 federation=self.bundle.federation, coordinator_fingerprint=self.bundle.coordinator.fingerprint(),
                 bundle=self.config.agent.bundle,
                 note="broadcasts on this federation do not verify against the coordinator key the bundle pins: "
                      "the bundle is probably from another coordinator; install a fresh one from this "
                      "federation's coordinator")

    def _maybe_register(self) -> None:
        """Register on every (re)connect, with each heartbeat until the first task arrives (a
        Register sent before the coordinator's session exists is dropped by the broker), and
        when a task names a mask this agent does not hold (the Register says what it holds) or a
        broadcast is under a federation key it does not hold."""
        connects = self.link.stats().connects
        now = self.clock()
        reconnected = connects != self._connects_seen
        unanswered = not self._tasks_seen and now >= self._next_heartbeat
        needs_mask = self._mask_missing and now >= self._next_mask_request
        needs_key = self._key_missing and now >= self._next_key_request
        if self.link.connected and (reconnected or unanswered or needs_mask or needs_key):
            self._connects_seen = connects
            if needs_mask:
                self._mask_missing = False
                self._next_mask_request = now + MASK_REQUEST_INTERVAL_S
            if needs_key:
                self._key_missing = False
                self._next_key_request = now + self._key_request_s
                self._key_request_s = min(2 * self._key_request_s, KEY_REQUEST_MAX_S)
            register = Register(
                device=self.bundle.device_id, cpu_count=os.cpu_count() or 1, ram_mb=_ram_mb(),
                accelerator=_accelerator(self.config.agent.device), n_examples=self.n_examples,
                agent_version=_version(), cached_mask_version=self.channel.masks.latest,
            )
            try:
                self._publish(self.channel.send(register, self.clock()), "register", self._round)
            except (MqttError, OSError) as exc:  # the next connect, heartbeat or request registers again
                emit(log, _send_failure_level(exc), "register_not_sent", error=exc)
                return
            why = ("connect" if reconnected else "mask_missing" if needs_mask else "key_missing" if needs_key
                   else "unanswered")
            emit(log, logging.INFO, "registered", device=self.bundle.device_id, connects=connects, reason=why)

    def _maybe_heartbeat(self) -> None:
        now = self.clock()
        if self.link.connected and now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.agent.heartbeat_s
            self._publish_status(_PHASE_STATE[self.core.phase], "heartbeat")

    def _publish_status(self, state: State, reason: str, round_number: int | None = None) -> None:
        """``round_number`` names the round a DECLINED status is about; other states report the last round."""
        round_number = self._round if round_number is None else round_number
        current = self.releases.current()
        epsilon_left = (None if self.ledger is None
                        else max(0.0, self.ledger.budget.epsilon_budget - self.ledger.budget.spent))
        status = Status(self.bundle.device_id, state, round_number, reason, self.clock(),
                        release=None if current is None else int(current[0]), epsilon_left=epsilon_left)
        try:
            self._publish(self.channel.send(status, self.clock()), "status", round_number)
        except (MqttError, OSError) as exc:  # broker away, or the audit log's disk full
            emit(log, _send_failure_level(exc), "status_not_sent", state=state.value, error=exc)

    def _on_message(self, topic: str, payload: bytes, received_at: float | None = None) -> None:
        now = self.clock()
        try:
            message = self.channel.receive(topic, payload, now)
        except ProtocolError as exc:
            self._rejected(exc, topic)
            return
        self._dispatch(message, now if received_at is None else received_at, now)

    def _dispatch(self, message: object, received_at: float, now: float) -> None:
        if isinstance(message, RoundTask):
            self._on_task(message, received_at)
        elif isinstance(message, ModelRelease):
            self._on_release(message)
        elif isinstance(message, KeyGrant):
            self._on_key(message, now)
        elif isinstance(message, SECURE_DOWNLINKS):
            for action in self.core.on_secure(message):
                self._carry_out(action, None)

    def _rejected(self, exc: ProtocolError, topic: str) -> None:
        """Logged (an unknown key once per key: it is met by every task until a grant) and turned
        into what to ask the coordinator for: a mask, a key; or a sign of a foreign bundle."""
        repeated = isinstance(exc, UnknownKey) and str(exc) == self._unknown_key_said
        emit(log, logging.DEBUG if repeated else _REJECTION_LEVEL.get(type(exc), logging.WARNING),
             "message_rejected", topic=topic, reason=exc.reason, detail=exc)
        if isinstance(exc, UnknownKey):
            self._unknown_key_said = str(exc)
        self._mask_missing = self._mask_missing or (isinstance(exc, UnknownMask) and self._fits_last_model())
        self._key_missing = self._key_missing or isinstance(exc, UnknownKey)
        if isinstance(exc, BadSignature):
            self._foreign_broadcast()
        if isinstance(exc, LayoutMismatch) and exc.round is not None:
            self._layout_mismatch(exc)

    def _layout_mismatch(self, exc: LayoutMismatch) -> None:
        """A task for a model this device builds differently (another version of the factory's
        package, usually) or cannot build: declined, with where the layouts part and both
        versions, so the operator sees what to align; one ERROR line per model here."""
        model = exc.model
        if model not in self._mismatch:  # package metadata is read once per model, not per task
            here = package_version(model.name) or "no installed package"
            detail = exc.detail or "its layout differs from the coordinator's"
            self._mismatch[model] = f"{LAYOUT_MISMATCH}: {detail}; {here} here, {model.package or 'unknown'} on the coordinator"
            emit(log, logging.ERROR, "layout_mismatch", model=model.name, detail=detail, package_here=here,
                 package_coordinator=model.package or "unknown", action="decline_every_round",
                 fix="install the same version of the model's package here as on the coordinator, then restart "
                     "the agent")
        if self.bundle.device_id in exc.selected:
            self._publish_status(State.DECLINED, self._mismatch[model][:256], exc.round)

    def _on_key(self, grant: KeyGrant, now: float) -> None:
        """A federation key arrived: the task and release that waited for it decode now."""
        self._key_missing = False
        self._key_request_s = MASK_REQUEST_INTERVAL_S
        level = logging.DEBUG if grant.key_id == self._key_id else logging.INFO  # re-sent on every Register
        self._key_id = grant.key_id
        emit(log, level, "key_installed", key_id=grant.key_id.hex())
        for outcome in self.channel.unlocked(now):
            if isinstance(outcome, ProtocolError):
                self._rejected(outcome, "held_for_key")
            else:
                self._dispatch(outcome, now, now)

    def _on_release(self, release: ModelRelease) -> None:
        try:
            path = self.releases.accept(release)
        except ReleaseRejected as exc:
            level = logging.DEBUG if exc.reason == "duplicate" else logging.WARNING  # a retained release again
            emit(log, level, "release_rejected", version=release.version, reason=exc.reason, detail=exc)
            return
        if self.server is not None:
            self._serve(release.version, path)
        said = {key: release.metadata[key] for key in ("round", "val_accuracy", "val_f1", "val_r2")
                if key in release.metadata}
        emit(log, logging.INFO, "release_installed", version=release.version, bytes=len(release.onnx), **said)

    def _serve(self, version: int, path: Path) -> None:
        """Only with the HTTP endpoint on: ``fedprune-agent infer`` loads the model itself."""
        from fedprune.edge_agent.inference import Predictor, Served

        predictor = Predictor.from_file(path, accelerator=self.config.inference.accelerator)
        self.server.swap(Served(version, predictor))

    def _on_task(self, task: RoundTask, received_at: float) -> None:
        self._tasks_seen = True
        self._last_model = task.model
        mismatch = self._data_mismatch(task.model)
        resolved = self.held.resolve(task)
        reason = None
        if self.bundle.device_id in task.selected:
            reason = f"{DATA_MISMATCH}: {mismatch}"[:256] if mismatch else None
            if reason is None and resolved is None:
                emit(log, logging.INFO, "task_not_applicable", round=task.round, base_round=task.base_round,
                     reason=MISSING_BASE, action="declined; the coordinator sends the full weights next")
                reason = MISSING_BASE
            reason = reason or self._decline_reason()
        task = resolved or task
        for action in self.core.on_task(task, self.clock(), decline_reason=reason, received_at=received_at):
            self._carry_out(action, task)

    def _data_mismatch(self, model: ModelRef) -> str | None:
        """Checked once per model spec, on the first task naming it (whether or not it selects this
        device): a shape and label-range check on the loaded data, no torch, no training run that
        can only fail. The data is fixed while the agent runs, so a mismatch is final for that
        spec: every round is declined with it, and one error line says why."""
        if model not in self._mismatch:
            detail = self._mismatch[model] = data_mismatch(self.data, model.input_shape, model.num_classes, model.task)
            if detail:
                emit(log, logging.ERROR, "data_mismatch", model=model.name, input_shape=list(model.input_shape),
                     num_classes=model.num_classes, data=self.config.agent.data, detail=detail,
                     action="decline_every_round",
                     fix="give this device data that fits the model, or fix [federation] input_shape/num_classes "
                         "on the coordinator")
        return self._mismatch[model]

    def _fits_last_model(self) -> bool:
        """A device whose data does not fit the model has no use for its mask: asking for it would
        register again, and the coordinator selects a device again once it registers."""
        return self._last_model is None or not self._mismatch.get(self._last_model)

    def _decline_reason(self) -> str | None:
        """Governance first (transient: heat, power, windows, memory), then the privacy budget (final)."""
        local = time.localtime(self.clock())
        readings = sysfs.read_readings(local.tm_hour * 60 + local.tm_min, self.config.governance.sysfs_root)
        reason = self.governor.decide(readings)
        if reason is None and self.ledger is not None and self.ledger.exhausted:
            reason = PRIVACY_BUDGET_EXHAUSTED
        if reason is not None:
            emit(log, logging.INFO, "governance_decline", reason=reason, temperature_c=readings.temperature_c,
                 battery_percent=readings.battery_percent, on_ac=readings.on_ac,
                 available_memory_mb=readings.available_memory_mb)
        return reason

    def _carry_out(self, action: object, task: RoundTask | None) -> None:
        if isinstance(action, SendSecure):
            if action.cost is not None and not self._charge_secure(action):
                return
            stage = type(action.message).__name__
            emit(log, logging.INFO, "secure_stage", round=action.message.round, stage=stage)
            try:
                self._publish(self.channel.send(action.message, self.clock()), "secure", action.message.round)
            except (MqttError, OSError) as exc:  # this device drops out of the round; SecAgg+ recovers its masks
                emit(log, _send_failure_level(exc), "secure_stage_not_sent", round=action.message.round, stage=stage,
                     error=exc)
        elif isinstance(action, ReportStatus):
            self._round = action.round
            self._publish_status(_PHASE_STATE[action.phase], "round")
        elif isinstance(action, Train):
            self._train(action)
        elif isinstance(action, Upload):
            self._upload(task, action)
        elif isinstance(action, KeepResidual):
            try:
                self.residuals.save(action.residual)
            except OSError as exc:  # a restart would then feed back an older residual: rounding, not data
                emit(log, logging.WARNING, "residual_not_saved", round=task.round, file=self.residuals.path, error=exc)
        elif isinstance(action, Resend):
            emit(log, logging.INFO, "resend", round=action.round, reason="coordinator_still_waiting")
            try:
                self._publish(self._sent.get(action.round, []), "update", action.round)
            except (MqttError, OSError) as exc:  # the next re-announcement asks again
                emit(log, _send_failure_level(exc), "resend_failed", round=action.round, error=exc)
        elif isinstance(action, Ignore) and action.reason in SUSPECT_REASONS:  # the coordinator or a neighbour misbehaved
            emit(log, logging.WARNING, "secure_stage_refused", round=action.round, reason=action.reason,
                 detail=action.detail)
        elif isinstance(action, Ignore):
            emit(log, logging.DEBUG, "task_ignored", round=action.round, reason=action.reason)
        elif isinstance(action, Decline):
            emit(log, logging.INFO, "round_declined", round=action.round, reason=action.reason)
            self._record_decline(action.round, action.reason)
            self._publish_status(State.DECLINED, action.reason, action.round)

    def _record_decline(self, round_number: int, reason: str) -> None:
        """For the owner (``fedprune-agent status``): kept even when the DECLINED status cannot be sent."""
        try:
            self.declines.record(now=self.clock(), federation=self.bundle.federation, round=round_number, reason=reason)
        except OSError as exc:
            emit(log, logging.WARNING, "decline_not_recorded", round=round_number, file=self.declines.path, error=exc)

    def _train(self, action: Train) -> None:
        task, section = action.task, self.config.agent
        job = worker.TrainJob(
            model=task.model, params=task.params(), masks=task.masks, hyper=action.hyper,
            data_path=section.data, data_source=self.config.data, device=section.device,
            threads=self.config.training_threads(os.cpu_count() or 1), target_edges=task.target_edges,
        )
        try:
            run = worker.train_in_child if section.train_in_subprocess else worker.train
            trained = run(job)
        except (RuntimeError, ValueError, MemoryError, OSError) as exc:  # WorkerError; torch's own (CUDA OOM)
            emit(log, logging.ERROR, "training_failed", round=task.round, error=exc)
            for action_ in self.core.on_failed(task.round, "training_failed"):
                self._carry_out(action_, task)
            return
        emit(log, logging.INFO, "trained", round=task.round, examples=trained.n_examples, steps=trained.steps,
             loss=round(trained.train_loss, 4), seconds=round(trained.seconds, 2), mask_changed=trained.mask_changed)
        for next_action in self.core.on_trained(task, trained):
            self._carry_out(next_action, task)

    def _charge_secure(self, action: SendSecure) -> bool:
        """Distributed DP: the masked vector leaves only once its round is on disk in the ledger. A
        round that no longer fits (its exact cost is known only now) or cannot be recorded is
        declined instead: this device drops out of the round, which SecAgg+ absorbs."""
        round_number = action.message.round
        reason = None if self.ledger.fits(action.cost) else PRIVACY_BUDGET_EXHAUSTED
        if reason is not None:
            budget = self.ledger.budget
            emit(log, logging.INFO, "secure_round_left", round=round_number, reason=reason,
                 epsilon_spent=round(budget.spent, 3), epsilon_after=round(budget.epsilon_after(action.cost), 3),
                 epsilon_budget=budget.epsilon_budget)
        else:
            try:
                self.ledger.charge(action.cost)
            except OSError as exc:
                emit(log, logging.ERROR, "privacy_ledger_unwritable", round=round_number, file=self.ledger.path,
                     error=exc)
                reason = "privacy_ledger_unwritable"
        if reason is not None:
            self.core.leave_secure(round_number)
            self._carry_out(Decline(round_number, reason), None)
            return False
        budget = self.ledger.budget
        emit(log, logging.INFO, "privatized", round=round_number, mechanism="distributed",
             clip_norm=self.ledger.clip_norm, epsilon_spent=round(budget.spent, 3),
             epsilon_budget=budget.epsilon_budget, rounds=budget.rounds)
        return True

    def _upload(self, task: RoundTask, upload: Upload) -> None:
        """The privacy ledger is on disk before the update leaves (local DP: ``norm_before_clip``
        is set); then seal, publish, wait for the broker."""
        if upload.norm_before_clip is not None:
            try:
                self.ledger.charge()
            except OSError as exc:  # the spend cannot be recorded, so the update must not leave
                emit(log, logging.ERROR, "privacy_ledger_unwritable", round=task.round, file=self.ledger.path, error=exc)
                for action in self.core.on_failed(task.round, "privacy_ledger_unwritable", retry=True):
                    self._carry_out(action, task)
                return
            budget = self.ledger.budget
            emit(log, logging.INFO, "privatized", round=task.round, mechanism="local",
                 norm_before_clip=round(upload.norm_before_clip, 4), clip_norm=self.ledger.clip_norm,
                 epsilon_spent=round(budget.spent, 3), epsilon_budget=budget.epsilon_budget, rounds=budget.rounds)
            if isinstance(upload.update, Update) and upload.update.mask_changed:  # secure rounds keep the global mask
                emit(log, logging.WARNING, "privacy_not_covered", round=task.round, reason="client_readjust",
                     detail="the grown mask depends on local data and is sent without noise (docs/PRIVACY.md)")
        publications = self.channel.send(upload.update, self.clock(), value_dtype=task.update_values)
        self._sent = {task.round: publications}
        try:
            self._publish(publications, "update", task.round, wait=True)
        except (MqttError, OSError) as exc:  # broker away, or the audit log's disk full
            emit(log, logging.ERROR, "upload_failed", round=task.round, error=exc)
            for action in self.core.on_failed(task.round, "upload_failed", retry=True):
                self._carry_out(action, task)
            return
        for action in self.core.on_uploaded(task.round, task.mask_version, self.clock()):
            self._carry_out(action, task)

    def _publish(self, publications: list[Publication], kind: str, round_number: int, wait: bool = False) -> None:
        handles = []
        for publication in publications:
            handles.append(self.link.publish(publication.topic, publication.payload, qos=1, retain=publication.retain))
            self.audit.record(now=self.clock(), federation=self.bundle.federation, round=round_number,
                              message_type=kind, topic=publication.topic, payload=publication.payload)
        if wait:
            deadline = time.monotonic() + self.config.agent.upload_timeout_s
            for handle in handles:
                if not handle.wait(max(0.0, deadline - time.monotonic())):
                    raise MqttError(f"broker did not acknowledge the {kind} within "
                                    f"{self.config.agent.upload_timeout_s} s")


def _accelerator(choice: str) -> str:
    return "cuda" if choice == "cuda" else ("auto" if choice == "auto" else "none")


def _ram_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20))
    except (ValueError, OSError):
        return 0


def _version() -> str:
    from importlib.metadata import version

    return version("fedprune")

