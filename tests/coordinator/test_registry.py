from __future__ import annotations

import pytest

from fedprune.coordinator.core.registry import Registry

KEY_A, KEY_B = b"\x01" * 32, b"\x02" * 32


def test_enrolled_devices_are_online_only_while_heard_from() -> None:
    registry = Registry(heartbeat_timeout_s=30)
    registry.enroll("pi-1", KEY_A, KEY_B, now=0.0)
    registry.enroll("pi-2", KEY_A, KEY_B, now=0.0)
    assert registry.online(now=1.0) == ()
    registry.seen("pi-2", now=1.0, capabilities={"cpu_count": 4}, n_examples=120)
    registry.seen("pi-1", now=2.0)
    assert registry.online(now=20.0) == ("pi-1", "pi-2")
    assert registry.online(now=31.5) == ("pi-1",)
    registry.seen("pi-1", now=32.0, online=False)
    assert registry.online(now=32.0) == ()
    assert registry.get("pi-2").n_examples == 120


def test_unknown_and_revoked_devices_look_alike_and_revoked_never_come_online() -> None:
    registry = Registry()
    registry.enroll("pi-1", KEY_A, KEY_B, now=0.0)
    registry.revoke("pi-1")
    assert registry.get("pi-1") is None and registry.get("ghost") is None
    assert registry.is_revoked("pi-1") and not registry.is_revoked("ghost")
    registry.seen("pi-1", now=1.0)
    assert registry.online(now=1.0) == ()


def test_re_enrolling_needs_a_revocation_first() -> None:
    registry = Registry()
    registry.enroll("pi-1", KEY_A, KEY_B, now=0.0)
    with pytest.raises(ValueError, match="already enrolled"):
        registry.enroll("pi-1", KEY_A, KEY_B, now=1.0)
    registry.revoke("pi-1")
    registry.enroll("pi-1", KEY_B, KEY_A, now=2.0)
    assert registry.get("pi-1").sign_public == KEY_B


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 65])
def test_ids_that_could_widen_a_subscription_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Registry().enroll(bad, KEY_A, KEY_B, now=0.0)


def test_round_trips_through_its_allow_list_and_presence_documents() -> None:
    registry = Registry(heartbeat_timeout_s=12)
    registry.enroll("pi-1", KEY_A, KEY_B, now=0.0)
    registry.seen("pi-1", now=3.0, capabilities={"ram_mb": 4096}, n_examples=50)
    registry.enroll("pi-2", KEY_B, KEY_A, now=1.0)
    registry.revoke("pi-2")
    restored = Registry(heartbeat_timeout_s=12)
    restored.replace_allow_list(registry.allow_list())
    restored.restore_presence(registry.presence())
    assert restored.devices() == registry.devices()
