"""A device whose data does not fit the model declines with ``data_mismatch: <detail>``: the real
coordinator daemon counts it once per device and round, stops waiting for it, leaves it out of
selection until it registers again, and shows the reason in ``status`` and ``/metrics``."""

from __future__ import annotations

from fedprune.coordinator.status import status_report
from fedprune.protocol.messages import Register, State, Status
from tests.fuzz.daemon_target import DEADLINE_S, DaemonWorld

MISMATCH = "data_mismatch: 13 features, model expects 64"


def register(world: DaemonWorld, device: str) -> None:
    world.clock.now += 0.01
    world.feed(world.agents[device].send(Register(device, 2, 1024, "none", 120, "0.1.0"), world.clock.now))


def decline(world: DaemonWorld, device: str, reason: str) -> None:
    world.clock.now += 0.01
    status = Status(device, State.DECLINED, world.daemon.state.round, reason, world.clock.now)
    world.feed(world.agents[device].send(status, world.clock.now))


def declined_total(world: DaemonWorld, reason: str) -> float:
    return world.daemon.metrics.value("rounds_declined_total", reason=reason)


def test_a_data_mismatch_is_counted_once_per_round_and_keeps_the_device_out_until_it_registers(
        world: DaemonWorld) -> None:
    d = world.daemon
    for device in ("dev-0", "dev-1", "dev-2"):
        register(world, device)
    world.tick()
    assert d.rounds.open_round == 1 and d.plan.selected == ("dev-0", "dev-1", "dev-2")

    for _ in range(3):  # the device answers every re-announcement again
        decline(world, "dev-0", MISMATCH)
    assert declined_total(world, "data_mismatch") == 1
    assert d.metrics.value("devices_excluded", reason="data_mismatch") == 1
    assert d.rounds.missing == ("dev-1", "dev-2")  # no longer waited for, nor re-announced to

    world.clock.now += DEADLINE_S + 1
    world.tick()  # closes round 1 (nothing uploaded)
    world.tick()
    assert d.rounds.open_round == 2 and d.plan.selected == ("dev-1", "dev-2")
    decline(world, "dev-0", MISMATCH)  # a stray re-announcement answered late: a new round, counted
    assert declined_total(world, "data_mismatch") == 2

    d._save_registry(world.clock.now)
    report = status_report(d.config)
    assert "dev-0" in report and f"round 2 declined: {MISMATCH}" in report

    register(world, "dev-0")  # restarted, perhaps with other data
    assert d.unfit == {} and d.metrics.value("devices_excluded", reason="data_mismatch") == 0
    world.clock.now += DEADLINE_S + 1
    world.tick()
    world.tick()
    assert d.rounds.open_round == 3 and "dev-0" in d.plan.selected


def test_governance_declines_are_counted_once_per_round_and_do_not_exclude(world: DaemonWorld) -> None:
    d = world.daemon
    for device in ("dev-0", "dev-1"):
        register(world, device)
    world.tick()
    decline(world, "dev-0", "too_hot")
    decline(world, "dev-0", "too_hot")
    decline(world, "dev-0", "battery_low")  # another reason in the same round is news
    assert declined_total(world, "too_hot") == 1 and declined_total(world, "battery_low") == 1
    assert d.rounds.missing == ("dev-0", "dev-1") and d.unfit == {}
