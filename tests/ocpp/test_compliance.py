"""Chargers that accept a profile and do not follow it (RELIABILITY.md P-05, P-07).

The monitor on its own, then over real sockets: a simulated go-e-like charger answers Accepted
and applies nothing; it is flagged on its second sample over the limit, never on the first,
its measured draw is budgeted and the honest charger is reduced so that the site stays within
the plan's head-room.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta

import pytest
from redis.asyncio import Redis

from adapters.ocpp.compliance import ComplianceConfig, ComplianceMonitor
from controller.clock import SimClock
from simulators.chargepoints.car import SimCar
from simulators.chargepoints.chargepoint import Faults
from tests.conftest import T0
from tests.ocpp.conftest import charger, plan_for, simulated
from tests.ocpp.test_dispatcher import rig

KEY = ("CP-1", 1)


def test_a_connector_is_flagged_on_the_second_sample_over_the_tolerance_not_the_first() -> None:
    """10 kW limit: 11.35 kW (10 % + 0.35 kW) is tolerated; 11.4 kW twice is flagged."""
    monitor = ComplianceMonitor()
    assert monitor.observe(KEY, 11.35, 10.0, T0) is False
    assert monitor.observe(KEY, 11.35, 10.0, T0) is False
    assert monitor.non_compliant() == {}
    assert monitor.observe(KEY, 11.4, 10.0, T0) is False  # one sample: not yet
    assert monitor.observe(KEY, 11.4, 10.0, T0) is True
    assert monitor.non_compliant() == {KEY: 11.4}
    assert monitor.flags_raised == 1


def test_a_good_sample_between_bad_ones_restarts_the_count_and_two_clear_the_flag() -> None:
    """Over, under, over: not flagged. Flagged, then one good sample: still flagged; two: clear."""
    monitor = ComplianceMonitor()
    for kw in (15.0, 9.0, 15.0):
        assert monitor.observe(KEY, kw, 10.0, T0) is False
    assert monitor.observe(KEY, 15.0, 10.0, T0) is True
    assert monitor.observe(KEY, 9.0, 10.0, T0) is False
    assert monitor.is_flagged("CP-1")
    assert monitor.observe(KEY, 9.0, 10.0, T0) is True
    assert not monitor.is_flagged("CP-1")


def test_without_a_known_limit_nothing_is_judged() -> None:
    """A sample before any profile was accepted neither flags nor counts."""
    monitor = ComplianceMonitor(ComplianceConfig(samples=1))
    assert monitor.observe(KEY, 50.0, None, T0) is False
    assert monitor.non_compliant() == {}


def test_is_flagged_follows_the_flags_of_every_connector_of_a_charger() -> None:
    """`is_flagged` (kept per charger, not a scan) says whether any connector of that charger
    is among `non_compliant()`, through raised and cleared flags on several connectors of
    several chargers and a charger forgotten: 4,000 random samples."""
    rng = random.Random(8)
    monitor = ComplianceMonitor()
    chargers = ["CP-1", "CP-2", "CP-3"]
    for step in range(4000):
        charger_id = rng.choice(chargers)
        key = (charger_id, rng.randint(1, 3))
        monitor.observe(key, rng.choice((5.0, 15.0)), 10.0, T0)
        if step % 997 == 0:
            monitor.forget(rng.choice(chargers))
        flagged = {k[0] for k in monitor.non_compliant()}
        assert [monitor.is_flagged(c) for c in chargers] == [c in flagged for c in chargers]
    assert monitor.flags_raised > 100  # the sequence did raise (and clear) many flags


def test_the_configuration_is_validated() -> None:
    """Nonsense tolerances are refused with the reason."""
    with pytest.raises(ValueError, match="samples"):
        ComplianceConfig(samples=0)
    with pytest.raises(ValueError, match="tolerance_fraction"):
        ComplianceConfig(tolerance_fraction=1.5)


def a_car(max_kw: float) -> SimCar:
    """A 60 kWh car half full."""
    return SimCar(
        vehicle_id="ev",
        id_tag="TAG",
        capacity_kwh=60.0,
        energy_kwh=30.0,
        max_charge_kw=max_kw,
        max_discharge_kw=0.0,
    )


@pytest.mark.parametrize("fault", ["ignores", "honest"])
async def test_a_charger_ignoring_its_profile_is_budgeted_and_the_others_reduced(
    redis: Redis, clock: SimClock, fault: str
) -> None:
    """P-05/P-07: plan 6 + 10 kW under 16 kW of head-room; the rogue draws its car's 11 kW.
    After its second sample it is flagged and the honest charger drops to 16 - 11 = 5 kW.
    The honest control: the same samples from a charger that follows change nothing."""
    rogue_faults = Faults(ignore_profiles=fault == "ignores")
    async with (
        rig(redis, clock, charger("CP-R"), charger("CP-H")) as r,
        simulated(r.harness, "CP-R", max_power_kw=22.0, faults=rogue_faults) as rogue,
        simulated(r.harness, "CP-H", max_power_kw=22.0) as honest,
    ):
        await rogue.plug_in(1, a_car(11.0))
        await honest.plug_in(1, a_car(22.0))
        plan = replace(
            plan_for(clock.now(), {("CP-R", 1): [6.0], ("CP-H", 1): [10.0]}),
            headroom_kw=(16.0,) * 8,
        )
        await r.dispatcher.publish(plan, r.state)
        for sim in (rogue, honest):
            await sim.wait_for(lambda s=sim: [p.purpose for p in s.received][-1:] == ["TxProfile"])
            await r.dispatcher.settled(sim.spec.charger_id)
        received = len(honest.received)
        assert honest.powers_kw(clock.now())[1] == pytest.approx(10.0)
        expected_rogue_kw = 11.0 if fault == "ignores" else 6.0
        assert rogue.powers_kw(clock.now())[1] == pytest.approx(expected_rogue_kw)

        await rogue.send_meter_values()
        await honest.send_meter_values()
        assert r.dispatcher.counters["non_compliant_flags"] == 0  # one sample is not enough
        await clock.advance(timedelta(seconds=60))
        await rogue.send_meter_values()
        await honest.send_meter_values()
        if fault == "honest":
            assert r.dispatcher.compliance.non_compliant() == {}
            await r.dispatcher.settled("CP-H")
            assert len(honest.received) == received
            return
        assert r.dispatcher.compliance.non_compliant() == {("CP-R", 1): pytest.approx(11.0)}
        assert r.dispatcher.counters["non_compliant_flags"] == 1
        await honest.wait_for(lambda: len(honest.received) > received)
        await r.dispatcher.settled("CP-H")
        assert r.dispatcher.budget_factor == pytest.approx(0.5)
        site_kw = rogue.powers_kw(clock.now())[1] + honest.powers_kw(clock.now())[1]
        assert honest.powers_kw(clock.now())[1] == pytest.approx(5.0)
        assert site_kw <= 16.0 + 1e-6
