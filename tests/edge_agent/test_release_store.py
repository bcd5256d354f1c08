"""Release store: verification order, atomic pointer, retention, and the whole signed path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedprune.coordinator.export import build_release, export_onnx
from fedprune.edge_agent.inference import ModelServer, Predictor, Served
from fedprune.common.models import ModelSpec, init_params, model_layout
from fedprune.edge_agent.release_store import POINTER, ReleaseRejected, ReleaseStore, ReleaseStoreError
from fedprune.protocol.channel import AgentChannel, CoordinatorChannel
from fedprune.protocol.crypto import Identity
from fedprune.protocol.errors import BadSignature, ProtocolError
from fedprune.protocol.messages import ModelRelease
from tests.protocol.factories import GROUP

SPEC = ModelSpec("mlp", (1, 8, 8), 10, args={"hidden": (16,)})
FED = "fed-1"
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def onnx_models() -> list[bytes]:
    return [
        export_onnx(SPEC, init_params(SPEC, seed=i), metadata={"federation": FED, "round": i, "mask_version": 0})
        for i in range(5)
    ]


def release(onnx_models, version: int) -> ModelRelease:
    return build_release(version, onnx_models[version % len(onnx_models)])


def test_accept_stores_atomically_and_survives_a_restart(tmp_path, onnx_models):
    store = ReleaseStore(tmp_path, keep=2)
    assert store.current() is None
    for version in (1, 2, 5):
        path = store.accept(release(onnx_models, version))
        assert path.read_bytes() == onnx_models[version % 5] and store.current() == (version, path)
    assert store.versions() == [2, 5]  # keep=2
    assert json.loads((tmp_path / POINTER).read_text())["version"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    reopened = ReleaseStore(tmp_path, keep=2)
    assert reopened.current() == store.current()
    with pytest.raises(ReleaseRejected) as exc:
        reopened.accept(release(onnx_models, 4))
    assert exc.value.reason == "stale"


def test_same_release_again_is_a_duplicate_and_same_version_other_bytes_is_stale(tmp_path, onnx_models):
    store = ReleaseStore(tmp_path)
    store.accept(release(onnx_models, 3))
    with pytest.raises(ReleaseRejected) as dup:
        store.accept(release(onnx_models, 3))
    assert dup.value.reason == "duplicate"
    with pytest.raises(ReleaseRejected) as other:
        store.accept(build_release(3, onnx_models[0]))
    assert other.value.reason == "stale"


def test_digest_size_and_broken_models_are_rejected_before_anything_changes(tmp_path, onnx_models):
    store = ReleaseStore(tmp_path, max_model_bytes=len(onnx_models[0]) + 1024)
    store.accept(release(onnx_models, 1))
    before = sorted(p.name for p in tmp_path.iterdir())
    tampered = release(onnx_models, 2)
    flipped = bytearray(tampered.onnx)
    flipped[len(flipped) // 2] ^= 1
    object.__setattr__(tampered, "onnx", bytes(flipped))  # bypass the dataclass check, as memory corruption would
    broken = ModelRelease.of(3, onnx_models[1][: len(onnx_models[1]) // 2])
    big = ModelRelease.of(4, onnx_models[1] + bytes(2048))
    for bad, reason in ((tampered, "digest"), (broken, "invalid_model"), (big, "too_large")):
        with pytest.raises(ReleaseRejected) as exc:
            store.accept(bad)
        assert exc.value.reason == reason
    assert sorted(p.name for p in tmp_path.iterdir()) == before and store.current()[0] == 1


def test_a_corrupt_pointer_or_model_file_is_reported_with_the_fix(tmp_path, onnx_models):
    store = ReleaseStore(tmp_path)
    path = store.accept(release(onnx_models, 1))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ReleaseStoreError, match="does not match"):
        ReleaseStore(tmp_path)
    (tmp_path / POINTER).write_text("{")
    with pytest.raises(ReleaseStoreError, match="remove"):
        ReleaseStore(tmp_path)


class Device:
    """The agent's release path: channel -> store -> server (what the daemon wires together)."""

    def __init__(self, directory, coordinator: Identity) -> None:
        self.channel = AgentChannel(
            federation=FED, device="dev-a", identity=Identity.generate(),
            coordinator=coordinator.public, layout=model_layout(SPEC),
        )
        self.channel.group_keys.put(GROUP)  # as if its key grant had arrived
        self.store = ReleaseStore(directory)
        self.server = ModelServer()

    def deliver(self, publications, now: float) -> int:
        for topic, payload in publications:
            msg = self.channel.receive(topic, payload, now)
            if msg is not None:
                path = self.store.accept(msg)
                self.server.swap(Served(msg.version, Predictor.from_file(path)))
        return self.server.current().version


def coordinator_channel(identity: Identity) -> CoordinatorChannel:
    channel = CoordinatorChannel(federation=FED, identity=identity, devices={}, layout=model_layout(SPEC), max_chunk=4096)
    channel.rekey({}, T0, key=GROUP)
    return channel


def test_signed_release_path_rejects_tampering_other_keys_and_replays(tmp_path, onnx_models, rng):
    key = Identity.generate()
    coordinator = coordinator_channel(key)
    device = Device(tmp_path, key)
    X = rng.random((5, 64), dtype=np.float32)
    v1 = coordinator.send(release(onnx_models, 1), T0)
    assert len(v1) > 1  # chunked
    assert device.deliver(v1, T0 + 1) == 1
    v2 = coordinator.send(release(onnx_models, 2), T0 + 10)
    assert device.deliver(v2, T0 + 11) == 2
    serving = device.server.predict(X)[1]

    flipped = list(coordinator.send(release(onnx_models, 3), T0 + 20))
    topic, payload = flipped[-1]
    flipped[-1] = (topic, payload[:-40] + bytes([payload[-40] ^ 1]) + payload[-39:])
    with pytest.raises(ProtocolError):
        device.deliver(flipped, T0 + 21)
    with pytest.raises(BadSignature):
        device.deliver(coordinator_channel(Identity.generate()).send(release(onnx_models, 4), T0 + 30), T0 + 31)
    assert device.deliver(v1, T0 + 40) == 2  # the channel drops chunks of a transfer it completed

    restarted = Device(tmp_path, key)  # fresh in-memory replay guard: only the store remembers
    with pytest.raises(ReleaseRejected) as exc:
        restarted.deliver(v1, T0 + 50)
    assert exc.value.reason == "stale"
    with pytest.raises(ReleaseRejected) as exc:
        restarted.deliver(v2, T0 + 51)  # a retained release re-delivered after a restart
    assert exc.value.reason == "duplicate"

    assert device.server.current().version == 2 and device.store.current()[0] == 2
    version, logits = device.server.predict(X)
    assert version == 2 and np.array_equal(logits, serving)
    assert device.deliver(coordinator.send(release(onnx_models, 3), T0 + 60), T0 + 61) == 3


def test_the_model_check_can_run_in_a_child_so_onnxruntime_never_stays_loaded(tmp_path, onnx_models):
    from fedprune.edge_agent.worker import model_problem_in_child

    store = ReleaseStore(tmp_path, check_model=model_problem_in_child)
    assert store.accept(release(onnx_models, 1)).exists()
    with pytest.raises(ReleaseRejected) as bad:
        store.accept(ModelRelease.of(2, b"\x08\x07not an onnx model"))
    assert bad.value.reason == "invalid_model" and "onnxruntime" in str(bad.value)
    assert store.current()[0] == 1
