"""The coordinator's federation key follows the allow-list: every member gets a retained grant,
a revoked device's grant is cleared, and a change of members rotates the key before the next
broadcast, also when a device is enrolled while the coordinator runs. No broker here: the
daemon's publishes are recorded."""

from __future__ import annotations

import pytest

from fedprune.protocol.channel import AgentChannel
from fedprune.protocol.crypto import Identity
from fedprune.protocol.errors import UnknownKey
from fedprune.protocol.messages import KeyGrant, Register, RoundTask
from tests.fuzz.daemon_target import ENROLLED, REVOKED, DaemonWorld


def register(world: DaemonWorld, device: str) -> None:
    world.feed(world.agents[device].send(Register(device, 2, 1024, "none", 120, "0.1.0"), world.clock.now))


def deliver(world: DaemonWorld, sent: list[tuple[str, bytes, bool]]) -> dict[str, list]:
    """Every recorded publish to every device that may read it (broadcasts, its own inbox): what each decoded."""
    got: dict[str, list] = {d: [] for d in (*ENROLLED, REVOKED)}
    for topic, payload, _ in sent:
        for device in got:
            if "/inbox/" in topic and not topic.endswith(f"/inbox/{device}"):
                continue
            try:
                message = world.agents[device].receive(topic, payload, world.clock.now)
            except UnknownKey:
                got[device].append("unknown_key")
                continue
            if message is not None:
                got[device].append(message)
    sent.clear()
    return got


def test_the_key_follows_the_allow_list(world: DaemonWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    d = world.daemon
    sent: list[tuple[str, bytes, bool]] = []
    monkeypatch.setattr(d.link, "publish", lambda topic, payload, qos=1, retain=False: sent.append((topic, payload, retain)))
    register(world, "dev-0")  # the first Register finds no key yet: one is made for the whole allow-list
    grants = {t.rsplit("/", 1)[1]: p for t, p, retain in sent if "/inbox/" in t and retain}
    assert set(grants) == {*ENROLLED, REVOKED} and grants[REVOKED] == b"", "members granted, the revoked cleared"
    first = d.channel.group_key
    register(world, "dev-1")  # a member registering gets its grant again (it may have asked for it)
    assert [t for t, _, _ in sent[-1:]] == [f"fedprune/v1/{d.config.federation.id}/inbox/dev-1"]
    d.tick()  # round 1 opens: its task is encrypted under the key
    got = deliver(world, sent)
    for device in ENROLLED:
        assert any(isinstance(m, KeyGrant) for m in got[device]) and any(isinstance(m, RoundTask) for m in got[device])
    assert got[REVOKED] == ["unknown_key"], "a revoked device gets no key and reads no task"

    d.registry.revoke("dev-1")
    world.clock.now += 2.0
    d.tick()  # the allow-list changed: a new key for the remaining members before anything else goes out
    assert d.channel.group_key != first and set(d.channel.group_members) == {"dev-0", "dev-2"}
    cleared = {t.rsplit("/", 1)[1] for t, p, retain in sent if "/inbox/" in t and retain and p == b""}
    assert cleared == {"dev-1", REVOKED}
    world.clock.now = d.next_announce + 0.1
    d.tick()  # the open round is re-announced under the new key
    got = deliver(world, sent)
    assert any(isinstance(m, RoundTask) for m in got["dev-0"])
    assert "unknown_key" in got["dev-1"] and not any(isinstance(m, (RoundTask, KeyGrant)) for m in got["dev-1"])

    newcomer = Identity.generate()  # enrolled while the coordinator runs: granted within a second
    d.registry.enroll("dev-new", newcomer.public.signing, newcomer.public.agreement, world.clock.now)
    world.clock.now += 2.0
    d.tick()
    assert "dev-new" in d.channel.group_members
    channel = AgentChannel(federation=d.config.federation.id, device="dev-new", identity=newcomer,
                           coordinator=d.identity.public, layout=d.layout)
    (grant,) = [(t, p) for t, p, _ in sent if t.endswith("/inbox/dev-new")]
    assert isinstance(channel.receive(*grant, world.clock.now), KeyGrant)
    world.clock.now = d.next_announce + 0.1
    d.tick()
    tasks = [channel.receive(t, p, world.clock.now) for t, p, _ in sent if t.endswith("/task")]
    assert any(isinstance(m, RoundTask) for m in tasks)
