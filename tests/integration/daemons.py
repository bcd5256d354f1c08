"""The coordinator and agents as real daemons in the test's own process, over the real
Mosquitto, driven one loop pass at a time: for tests that need a message to wait in a queue,
a clock to jump, or a device to send exactly what the test says."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from fedprune.coordinator.config import load_config
from fedprune.coordinator.daemon import CoordinatorDaemon
from fedprune.coordinator.lab.localfed import LocalFederation
from fedprune.common.bundle import load_bundle
from fedprune.edge_agent.daemon import AgentDaemon
from fedprune.protocol.channel import AgentChannel, Publication
from fedprune.protocol.chunks import DEFAULT_MAX_CHUNK
from fedprune.protocol.messages import Update
from fedprune.protocol.sparse import SparseParams
from tests.integration.mosquitto import MosquittoBroker, wait_until


def federation(broker: MosquittoBroker, root: Path, **rounds: object) -> LocalFederation:
    access = broker.access()
    fed = LocalFederation(root=root, broker=access, devices=tuple(d.username for d in broker.devices),
                          federation=broker.federation, settings={
                              "broker": {"username": broker.coordinator.username}, "metrics": {"port": -1},
                              "rounds": {"total": 5, "min_devices": 1, "quorum": 1, "reannounce_s": 0.5,
                                         "on_missed_quorum": "close", **rounds}})
    fed.prepare()
    return fed


def connected_coordinator(fed: LocalFederation, clock: Callable[[], float] = time.time) -> CoordinatorDaemon:
    daemon = CoordinatorDaemon(load_config(fed.config_path, env={}), clock=clock)
    daemon.link = daemon.open_link()
    wait_until(lambda: daemon.link.connected, 10, "the coordinator to connect")
    return daemon


def step(coordinator: CoordinatorDaemon, agent: AgentDaemon) -> None:
    """One pass of each daemon's loop (their run() minus signals and sleeping)."""
    agent._maybe_register()
    while not agent.inbox.empty():
        agent._on_message(*agent.inbox.get_nowait())
    while not coordinator.link.messages.empty():
        coordinator.on_message(*coordinator.link.messages.get_nowait())
    coordinator.tick()
    time.sleep(0.02)


def zero_update(fed: LocalFederation, coordinator: CoordinatorDaemon, device: str, now: float,
                max_chunk: int = DEFAULT_MAX_CHUNK) -> list[Publication]:
    """A genuine sealed Update of ``device`` for the open round (a zero delta: content is not the point)."""
    bundle = load_bundle(fed.root / "devices" / device / "bundle.json")
    state = coordinator.state
    channel = AgentChannel(federation=fed.federation, device=device, identity=bundle.identity,
                           coordinator=bundle.coordinator, layout=coordinator.layout, max_chunk=max_chunk)
    channel.remember_masks(state.mask_version, state.masks)
    trainable = coordinator.layout.subset(spec.name for spec in coordinator.layout.trainable)
    delta = SparseParams.from_dense(trainable, {spec.name: np.zeros(spec.shape, np.float32) for spec in trainable},
                                    state.masks)
    update = Update(round=state.round, device=device, mask_version=state.mask_version, n_examples=50,
                    metrics={"train_loss": 0.5}, class_losses={}, delta=delta, mask_changed=False)
    return channel.send(update, now)


def connected_agent(fed: LocalFederation, device: str, clock: Callable[[], float] = time.time) -> AgentDaemon:
    from fedprune.edge_agent.config import load_config as load_agent_config

    agent = AgentDaemon(load_agent_config(fed.root / "devices" / device / "agent.toml", env={}), clock=clock)
    agent.link = agent.open_link()
    wait_until(lambda: agent.link.connected, 10, f"{device} to connect")
    return agent
