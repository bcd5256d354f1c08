"""A simulated federation: the deployed daemons, enrolled and configured as an operator would,
talking through an in-memory broker and driven on a virtual clock.

``build`` writes what a fleet has on disk (the coordinator's config, keys and allow-list, each
device's bundle, data shard and agent.toml) and starts one ``CoordinatorDaemon`` and one
``AgentDaemon`` per client on ``MemoryLink``s. ``run`` delivers every message until the
federation is quiet, ticks the coordinator, and moves the clock on only when nothing is left to
do: devices answer in no virtual time, and deadlines, re-announcements and heartbeats behave as
on a fleet that answers at once. Clients that are offline for a round drop their link (the
broker publishes their last will) and come back by reconnecting, which makes them register
again. What the in-memory link cannot show (a lost broker, QoS redelivery, TLS) is tested
against Mosquitto.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedprune.common.configkit import ConfigError
from fedprune.coordinator.lab.datasets import Dataset
from fedprune.coordinator.config import SECURE_MIN_DEVICES, CoordinatorConfig, load_config
from fedprune.coordinator.daemon import CoordinatorDaemon
from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.lab.hostile import Coalition, Hostile
from fedprune.coordinator.lab.memory_broker import MemoryBroker, MemoryLink
from fedprune.edge_agent.config import load_config as load_agent_config
from fedprune.edge_agent.daemon import AgentDaemon
from fedprune.protocol.topics import TopicKind

FEDERATION = "simulation"
START_TIME = 1_767_225_600.0  # 2026-01-01 UTC: the virtual clock's origin (messages carry their send time)
IDLE_STEP_S = 1.0  # how far the clock moves when nobody has anything to do
MAX_IDLE_S = 7 * 86_400.0  # a federation idle this long is stuck: say so
MAX_DRAWS = 10_000  # availability draws until someone is online, before the configured availability is called too low
UPLINK = frozenset({TopicKind.UPDATE.value, TopicKind.STATUS.value, TopicKind.REGISTER.value})
RELEASE = TopicKind.RELEASE.value


class VirtualClock:
    def __init__(self, start: float = START_TIME) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class _Device:
    daemon: AgentDaemon
    link: MemoryLink


class SimulatedFederation:
    def __init__(self, coordinator: CoordinatorDaemon, devices: dict[str, _Device], clock: VirtualClock,
                 availability: float, rng: np.random.Generator) -> None:
        self.coordinator = coordinator
        self.devices = devices
        self.clock = clock
        self.availability = availability
        self.rng = rng

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, root: Path, sim: Any, dataset: Dataset, shards: dict[str, tuple[np.ndarray, np.ndarray]],
              attackers: list[str], device: str) -> SimulatedFederation:
        """``sim`` is the ``SimulationConfig``; ``shards`` each client's (X, y) as it holds them."""
        if root.exists() and any(root.iterdir()):
            raise ConfigError(f"{root} is not empty (a previous federation's state would be resumed): "
                              "remove it or choose another output directory")
        root.mkdir(parents=True, exist_ok=True)
        data_dir = root / "data"
        data_dir.mkdir(exist_ok=True)
        for cid, (X, y) in shards.items():
            np.savez(data_dir / f"{cid}.npz", X=X, y=y)
        np.savez(data_dir / "evaluation.npz", X=dataset.X_test, y=dataset.y_test)
        config = _coordinator_config(root, sim, dataset)
        agent_tomls = {cid: _enroll(root, config, cid, data_dir / f"{cid}.npz", device, sim.privacy) for cid in shards}
        clock = VirtualClock()
        broker = MemoryBroker()
        coordinator = CoordinatorDaemon(config, clock=clock)
        coordinator.start(broker.connect("coordinator", coordinator.subscriptions))
        coalition = Coalition(sim.attack, sim.attack_scale, device=device,
                              members={c: data_dir / f"{c}.npz" for c in attackers})
        devices: dict[str, _Device] = {}
        for index, cid in enumerate(shards):
            if sim.attack == "absent" and cid in attackers:
                continue  # enrolled, never online: the honest clients' yardstick
            tamper = Hostile(coalition, cid, np.random.default_rng([sim.seed, 3, index])) if cid in attackers else None
            agent = AgentDaemon(load_agent_config(agent_tomls[cid], env={}), clock=clock,
                                privacy_rng=np.random.default_rng([sim.seed, 4, index]), tamper=tamper)
            link = broker.connect(f"agent-{cid}", agent.subscriptions, on_message=agent.enqueue, will=agent.last_will)
            agent.start(link)
            devices[cid] = _Device(agent, link)
        return cls(coordinator, devices, clock, sim.availability, np.random.default_rng([sim.seed, 5]))

    # ---- running ----------------------------------------------------------------------------------
    def run(self, on_round: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Every round's history entry, with the bytes the devices' links carried during it."""
        records: list[dict[str, Any]] = []
        seen = self.coordinator.last_entry
        idle_since = self.clock.now
        before = (0, 0)  # round 1 also carries the connect-time traffic: registrations, key grants
        self._deliver()
        self._churn()
        while not self.coordinator.finished:
            moved = self._deliver()
            self.coordinator.tick()
            if self.coordinator.last_entry is not seen:  # a round committed (a failed write is retried first)
                seen = self.coordinator.last_entry
                after = self._bytes()
                records.append(self._record(before, after))
                before = after
                if on_round is not None:
                    on_round(records[-1])
                self._churn()
                idle_since = self.clock.now
            elif not moved and not self._pending():
                self.clock.now += IDLE_STEP_S
                if self.clock.now - idle_since > MAX_IDLE_S:
                    raise RuntimeError(f"the simulated federation made no progress for {MAX_IDLE_S:.0f} virtual "
                                       f"seconds after round {self.coordinator.completed}: no client online?")
        self._deliver()
        for device in self.devices.values():
            device.daemon.finish()
        self.coordinator.finish()
        return records

    def _pending(self) -> bool:
        return not self.coordinator.link.messages.empty() or any(
            not d.daemon.inbox.empty() for d in self.devices.values())

    def _deliver(self) -> bool:
        """Let every daemon take one loop pass, until no message is left anywhere; True if any moved."""
        moved = False
        while True:
            for device in self.devices.values():
                device.daemon.step()
                while not device.daemon.inbox.empty():
                    device.daemon.step()
            queue = self.coordinator.link.messages
            if queue.empty():
                return moved
            moved = True
            while not queue.empty():
                self.coordinator.on_message(*queue.get_nowait())

    def _churn(self) -> None:
        """Who is online for the next round: each client with probability ``availability``, drawn
        again while nobody is (a round needs someone; the fleet would wait for them)."""
        if self.availability >= 1.0:
            return
        for _ in range(MAX_DRAWS):
            online = [self.rng.random() < self.availability for _ in self.devices]
            if any(online):
                break
        else:
            raise RuntimeError(f"availability {self.availability:g}: nobody came online in {MAX_DRAWS} draws")
        for device, up in zip(self.devices.values(), online):
            if up and not device.link.connected:
                device.link.reconnect()
            elif not up:
                device.link.drop()
        self._deliver()

    def _bytes(self) -> tuple[int, int]:
        up = down = 0
        for device in self.devices.values():
            up += sum(n for kind, n in device.link.bytes_out_by_kind.items() if kind in UPLINK)
            down += sum(n for kind, n in device.link.bytes_in_by_kind.items() if kind != RELEASE)
        return up, down

    def release_bytes(self) -> int:
        return sum(d.link.bytes_in_by_kind.get(RELEASE, 0) for d in self.devices.values())

    def _record(self, before: tuple[int, int], after: tuple[int, int]) -> dict[str, Any]:
        entry = dict(self.coordinator.last_entry)
        entry.update(uplink_bytes=after[0] - before[0], downlink_bytes=after[1] - before[1],
                     cum_uplink_bytes=after[0], cum_downlink_bytes=after[1])
        return entry


def _coordinator_config(root: Path, sim: Any, dataset: Dataset) -> CoordinatorConfig:
    """What an operator would write for this federation; the clock is virtual, so waits are long."""
    rounds = sim.strategy.rounds
    least = SECURE_MIN_DEVICES if sim.strategy.secure else 1  # a secure sum of fewer would give updates away
    settings: dict[str, dict[str, Any]] = {
        "federation": {"model": sim.model, "model_args": dict(sim.model_args), "task": sim.task,
                       "input_shape": tuple(dataset.input_shape), "num_classes": dataset.num_classes, "seed": sim.seed},
        "rounds": {"total": rounds, "min_devices": least, "quorum": least, "deadline_s": 3600.0, "reannounce_s": 600.0,
                   "on_missed_quorum": "close", "heartbeat_timeout_s": 86_400.0},
        "metrics": {"port": -1},
        "evaluation": {"data": str(root / "data" / "evaluation.npz"), "every_rounds": sim.eval_every},
    }
    enrollment.init(config_path=root / "coordinator.toml", state_dir=root / "state", federation=FEDERATION,
                    broker_url="mqtt://127.0.0.1:1883", embedded_broker=False, settings=settings, force=True)
    config = load_config(root / "coordinator.toml", env={})
    return replace(config, strategy=replace(sim.strategy, rounds=rounds))


def _enroll(root: Path, config: CoordinatorConfig, cid: str, data: Path, device: str, privacy: Any) -> Path:
    device_dir = root / "devices" / cid
    bundle = device_dir / "bundle.json"
    enrollment.enroll(config, cid, bundle)
    (device_dir / "sysfs").mkdir(parents=True, exist_ok=True)  # no readings: the lab's host is not the device
    sections: dict[str, dict[str, Any]] = {
        "agent": {"bundle": str(bundle), "data": str(data), "state_dir": str(device_dir / "state"),
                  "train_in_subprocess": False, "heartbeat_s": 3600.0, "device": device},
        "governance": {"max_threads": 1, "memory_ceiling_mb": 0.0, "sysfs_root": str(device_dir / "sysfs")},
        "inference": {"http_port": -1},
        "privacy": {k: v for k, v in privacy.__dict__.items()},
    }
    path = device_dir / "agent.toml"
    path.write_text("".join(f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
                            for section, table in sections.items()))
    return path
