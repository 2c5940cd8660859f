"""The fallback ladder (RELIABILITY P-06): a refused profile is tried in the next form the
charger may take (stack level, unit, purpose); when none is taken the charger is
uncontrollable: alarmed, counted, its circuit limit budgeted. Simulated chargers with the field
faults of evcc #15493, lbbrhzn #221 and friends, over real sockets."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from controller.clock import SimClock
from simulators.chargepoints.chargepoint import Faults, SimChargePoint
from tests.ocpp.conftest import charger, plan_for, simulated
from tests.ocpp.test_dispatcher import Rig, a_car, rig


def accepted(sim: SimChargePoint, purpose: str) -> list[dict[str, Any]]:
    """The profiles of a purpose the charger accepted, in order."""
    return [r.profile for r in sim.received if r.purpose == purpose and r.status == "Accepted"]


def refused(sim: SimChargePoint) -> int:
    """SetChargingProfiles the charger did not accept."""
    return sum(r.status != "Accepted" for r in sim.received)


async def charging_at(r: Rig, sim: SimChargePoint, kw: float) -> None:
    """Plug a car in, plan `kw` for it and wait until the worker has nothing left to send."""
    await sim.plug_in(1, a_car())
    await r.publish({(sim.spec.charger_id, 1): [kw]})
    await r.dispatcher.wait_for(lambda: bool(accepted(sim, "TxProfile")) or False, 5.0)
    await r.dispatcher.settled(sim.spec.charger_id)


async def test_a_refused_stack_level_is_replaced_by_another(redis: Redis, clock: SimClock) -> None:
    """The charger refuses stackLevel 0 (as the ABB Terra AC refused 1): GetConfiguration is read
    once, every profile goes at level 1, and the car draws the plan."""
    faults = Faults(refused_stack_levels=frozenset({0}))
    async with (
        rig(redis, clock, charger("CP-1")) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0, faults=faults) as sim,
    ):
        await r.dispatcher.wait_for(lambda: len(accepted(sim, "ChargePointMaxProfile")) == 1)
        await charging_at(r, sim, 9.0)
        levels = {
            p["stack_level"]
            for r_ in ("TxDefaultProfile", "TxProfile", "ChargePointMaxProfile")
            for p in accepted(sim, r_)
        }
        assert levels == {1}
        assert refused(sim) == 3  # each slot's first try, at level 0
        assert r.dispatcher.counters["capabilities_read"] == 1
        assert r.dispatcher.counters["ladder_steps"] == 3
        assert sim.powers_kw(clock.now())[1] == pytest.approx(9.0)
        assert r.dispatcher.uncontrollable == set()


async def test_a_refused_unit_is_replaced_by_the_one_the_charger_allows(
    redis: Redis, clock: SimClock
) -> None:
    """Registered as a W charger, it takes only A (ChargingScheduleAllowedChargingRateUnit =
    Current): after the stack levels 1 and 8 are refused too, the limits go in A (9 kW on
    3 x 230 V = 13.0 A) and the car draws 13.0 A."""
    faults = Faults(units=frozenset({"A"}))
    async with (
        rig(redis, clock, charger("CP-1")) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0, faults=faults) as sim,
    ):
        await r.dispatcher.wait_for(lambda: len(accepted(sim, "ChargePointMaxProfile")) == 1)
        await charging_at(r, sim, 9.0)
        tx = accepted(sim, "TxProfile")[-1]["charging_schedule"]
        assert tx["charging_rate_unit"] == "A"
        assert float(tx["charging_schedule_period"][0]["limit"]) == 13.0
        assert sim.powers_kw(clock.now())[1] == pytest.approx(13.0 * 230 * 3 / 1000)
        assert refused(sim) == 9  # three slots x (level 0, 1, 8 in W)
        assert r.dispatcher.uncontrollable == set()


async def test_a_refused_tx_profile_goes_as_a_connector_default_and_is_cleared_after(
    redis: Redis, clock: SimClock
) -> None:
    """TxProfile refused in every level and unit: the lease goes as a TxDefaultProfile on
    connector 1 (no transaction id) and the car draws the plan; when the car leaves, that
    profile is cleared (a TxProfile would have gone with the transaction)."""
    faults = Faults(unsupported_purposes=frozenset({"TxProfile"}))
    async with (
        rig(redis, clock, charger("CP-1")) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0, faults=faults) as sim,
    ):
        await r.dispatcher.wait_for(lambda: len(accepted(sim, "ChargePointMaxProfile")) == 1)
        await sim.plug_in(1, a_car())
        await r.publish({("CP-1", 1): [7.0]})
        await r.dispatcher.wait_for(
            lambda: any(r_.connector_id == 1 for r_ in sim.received if r_.status == "Accepted")
        )
        await r.dispatcher.settled("CP-1")
        on_connector = [x for x in sim.received if x.connector_id == 1 and x.status == "Accepted"][
            -1
        ]
        assert on_connector.purpose == "TxDefaultProfile"
        assert "transaction_id" not in on_connector.profile
        assert sim.powers_kw(clock.now())[1] == pytest.approx(7.0)
        assert r.dispatcher.uncontrollable == set()
        await sim.unplug(1)
        await r.publish({})
        await r.dispatcher.wait_for(lambda: r.dispatcher.counters["profiles_cleared"] == 1)
        assert all(p.connector_id == 0 for p in sim.store.profiles)


async def test_an_unsupported_charge_point_max_profile_is_given_up_not_the_charger(
    redis: Redis, clock: SimClock
) -> None:
    """ChargePointMaxProfile refused in every form (lbbrhzn #221): given up and counted, the
    charger stays controllable and its TxProfile steers it."""
    faults = Faults(unsupported_purposes=frozenset({"ChargePointMaxProfile"}))
    async with (
        rig(redis, clock, charger("CP-1")) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0, faults=faults) as sim,
    ):
        await r.dispatcher.wait_for(lambda: r.dispatcher.counters["max_profiles_given_up"] == 1)
        await charging_at(r, sim, 6.0)
        assert r.dispatcher.uncontrollable == set()
        assert accepted(sim, "ChargePointMaxProfile") == []
        assert sim.powers_kw(clock.now())[1] == pytest.approx(6.0)
        await clock.advance(timedelta(minutes=10))
        await r.dispatcher.settled("CP-1")
        assert r.dispatcher.counters["max_profiles_given_up"] == 1  # not tried again


@pytest.mark.parametrize(
    "faults",
    [Faults(reject_profiles=True), Faults(profile_callerror="NotSupported")],
    ids=["rejected", "callerror"],
)
async def test_a_charger_that_takes_no_form_is_uncontrollable_and_budgeted_at_its_circuit(
    redis: Redis, clock: SimClock, caplog: pytest.LogCaptureFixture, faults: Faults
) -> None:
    """Every form refused (Rejected, or CALLERROR NotSupported): CP-BAD is uncontrollable,
    alarmed and counted; head-room 30 kW, so CP-OK's 11 kW plan is scaled to what is left once
    CP-BAD's 22 kW circuit is budgeted: 8 kW. When CP-BAD takes profiles again (after the
    back-off) it is controllable and CP-OK gets its 11 kW."""
    caplog.set_level(logging.ERROR, logger="adapters.ocpp.dispatcher")
    async with (
        rig(redis, clock, charger("CP-BAD"), charger("CP-OK")) as r,
        simulated(r.harness, "CP-BAD", max_power_kw=22.0, faults=faults) as bad,
        simulated(r.harness, "CP-OK", max_power_kw=22.0) as ok,
    ):
        d = r.dispatcher
        await d.wait_for(lambda: d.uncontrollable == {"CP-BAD"})
        assert d.counters["chargers_uncontrollable"] == 1
        assert any("CP-BAD is uncontrollable" in m for m in caplog.messages)
        await ok.plug_in(1, a_car())
        plan = plan_for(clock.now(), {("CP-OK", 1): [11.0], ("CP-BAD", 1): [11.0]})
        await d.publish(replace(plan, headroom_kw=(30.0,) * len(plan.slot_starts)), r.state)
        await ok.wait_for(lambda: ok.powers_kw(clock.now())[1] == pytest.approx(8.0))
        assert d.budget_factor == pytest.approx(8.0 / 11.0)
        bad.faults.reject_profiles = False
        bad.faults.profile_callerror = None
        await clock.advance(timedelta(seconds=5))  # the back-off of the first round
        await d.wait_for(lambda: d.uncontrollable == set())
        assert d.counters["chargers_controllable_again"] == 1
        await ok.wait_for(lambda: ok.powers_kw(clock.now())[1] == pytest.approx(11.0))
