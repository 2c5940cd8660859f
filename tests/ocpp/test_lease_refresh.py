"""Lease churn without a weaker fail-safe (RELIABILITY P-02 lease shape, dispatch hot path).

A lease whose fallback (min(plan, safe share)) is the plan anyway lapses instead of being re-sent;
a plan wakes only the chargers it changed. What must still hold, checked against the simulated
charger's own profile store: from any moment on, the charger falls back to at most its safe
share by the end of one lease window, and it follows the plan within the deadband meanwhile.
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from redis.asyncio import Redis

from adapters.ocpp.config import LeaseConfig
from adapters.ocpp.profiles import to_limit
from controller.clock import SimClock
from controller.domain import SLOT
from simulators.chargepoints.chargepoint import SimChargePoint
from tests.ocpp.conftest import charger, plan_for, simulated
from tests.ocpp.test_dispatcher import a_car, brought_up, purposes, rig

LEASE = timedelta(minutes=15)


def tx_count(sim: SimChargePoint) -> int:
    """TxProfiles the charger accepted so far."""
    return purposes(sim).count("TxProfile")


def limit_kw(sim: SimChargePoint, minutes: float) -> float:
    """What connector 1 may draw `minutes` from now, by the profiles it holds (kW)."""
    return sim.limit_kw(sim.connector(1), sim.clock.now() + timedelta(minutes=minutes))


async def test_a_lease_whose_fallback_is_the_plan_lapses_and_a_later_rise_goes_out_ahead(
    redis: Redis, clock: SimClock
) -> None:
    """Safe share 5 kW; plan 4.5 kW for an hour, then 9 kW from 17:00. The lease made at 16:00
    is not re-sent at 16:13 (its fallback is 4.5 kW, the plan) and the charger keeps drawing
    4.5 kW past its end; the rise to 9 kW is sent at 16:52, at least the refresh margin (2 min)
    before 17:00, and applies at 17:00. Control: with a plan of 8 kW throughout, above the safe
    share, the lease is re-sent at 16:13."""
    async with (
        rig(redis, clock, charger("CP-1"), safe_limit_kw=5.0) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as sim,
    ):
        await brought_up(r, sim)
        await sim.plug_in(1, a_car(energy_kwh=5.0))
        await r.dispatcher.publish(
            plan_for(clock.now(), {("CP-1", 1): [4.5] * 4 + [9.0]}, slots=8), r.state
        )
        await sim.wait_for(lambda: tx_count(sim) == 1)
        await r.dispatcher.settled("CP-1")
        await clock.advance(timedelta(minutes=20))
        await r.dispatcher.settled("CP-1")
        assert tx_count(sim) == 1  # not refreshed at 16:13
        assert r.dispatcher.counters["leases_lapsed"] == 1
        assert sim.powers_kw(clock.now())[1] == pytest.approx(4.5)  # past the lease end
        await clock.advance(timedelta(minutes=31))  # 16:51
        await r.dispatcher.settled("CP-1")
        assert tx_count(sim) == 1
        await clock.advance(timedelta(minutes=1))  # 16:52: the look that sees 17:00
        await sim.wait_for(lambda: tx_count(sim) == 2)
        sent_at = sim.received[-1].at
        assert sent_at <= clock.now().replace(minute=58)
        await clock.advance(timedelta(minutes=8))  # 17:00
        assert sim.powers_kw(clock.now())[1] == pytest.approx(9.0)
        # Control: above the safe share the lease is refreshed before it ends.
        await r.dispatcher.publish(plan_for(clock.now(), {("CP-1", 1): [8.0]}), r.state)
        await sim.wait_for(lambda: tx_count(sim) == 3)
        await r.dispatcher.settled("CP-1")
        await clock.advance(timedelta(minutes=13))
        await sim.wait_for(lambda: tx_count(sim) == 4)


async def test_a_fallback_within_the_deadband_of_the_plan_is_still_refreshed(
    redis: Redis, clock: SimClock
) -> None:
    """Plan 5.8 kW, safe share 5.5 kW: the fallback is only 0.3 kW under the plan (inside the
    0.5 kW deadband), but letting the lease lapse would hold the car 0.3 kW low for hours, so
    the lease is renewed at 16:13 and the car still draws 5.8 kW at 16:16."""
    async with (
        rig(redis, clock, charger("CP-1"), safe_limit_kw=5.5) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as sim,
    ):
        await brought_up(r, sim)
        await sim.plug_in(1, a_car())
        await r.dispatcher.publish(plan_for(clock.now(), {("CP-1", 1): [5.8]}), r.state)
        await sim.wait_for(lambda: tx_count(sim) == 1)
        await r.dispatcher.settled("CP-1")
        await clock.advance(timedelta(minutes=13))
        await sim.wait_for(lambda: tx_count(sim) == 2)
        await r.dispatcher.settled("CP-1")
        await clock.advance(timedelta(minutes=3))
        assert sim.powers_kw(clock.now())[1] == pytest.approx(5.8)
        assert r.dispatcher.counters["leases_lapsed"] == 0


async def test_a_plan_wakes_only_the_chargers_it_changed(redis: Redis, clock: SimClock) -> None:
    """Three chargers charging; a plan that moves only CP-1 builds and sends only CP-1's
    profiles. Control: a plan that moves all three wakes all three."""
    ids = ("CP-1", "CP-2", "CP-3")
    async with (
        rig(redis, clock, *(charger(c) for c in ids), safe_limit_kw=60.0) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as s1,
        simulated(r.harness, "CP-2", max_power_kw=22.0) as s2,
        simulated(r.harness, "CP-3", max_power_kw=22.0) as s3,
    ):
        sims = (s1, s2, s3)
        for sim in sims:
            await brought_up(r, sim)
            await sim.plug_in(1, a_car())
        await r.dispatcher.publish(plan_for(clock.now(), {(c, 1): [7.0] for c in ids}), r.state)
        for sim in sims:
            await sim.wait_for(lambda sim=sim: tx_count(sim) == 1)
        for c in ids:
            await r.dispatcher.settled(c)
        built = r.dispatcher.counters["wanted_built"]
        moved = {(c, 1): [7.0] for c in ids} | {("CP-1", 1): [11.0]}
        await r.dispatcher.publish(plan_for(clock.now(), moved), r.state)
        await s1.wait_for(lambda: tx_count(s1) == 2)
        for c in ids:
            await r.dispatcher.settled(c)
        assert r.dispatcher.counters["wanted_built"] == built + 1  # CP-1 only, once
        assert r.dispatcher.counters["plan_chargers_unchanged"] == 2
        assert [tx_count(s) for s in sims] == [2, 1, 1]
        await r.dispatcher.publish(plan_for(clock.now(), {(c, 1): [4.5] for c in ids}), r.state)
        for sim in sims:
            await sim.wait_for(lambda sim=sim: tx_count(sim) >= 2)
        assert [tx_count(s) for s in sims] == [3, 2, 2]


@pytest.mark.parametrize(("seed", "guard_s"), [(1, 0.0), (2, 0.0), (3, 300.0), (4, 300.0)])
async def test_under_random_plans_the_charger_follows_the_plan_and_is_always_leased(
    redis: Redis, clock: SimClock, seed: int, guard_s: float
) -> None:
    """Six simulated hours, a plan every 1-30 min (values around a 6 kW safe share, a quarter
    of them 0; half of the plans new, half the same course made again). After every minute,
    on the charger's own
    profile store: (1) its limit now is the plan's value now within the 0.5 kW deadband, or 0
    when the plan is 0, or (with a guard time) 0 while the guard holds a switch on back: a
    switch on comes at least the guard time after the switch off before it; (2) from one
    lease window on, its limit is <= the safe share at every plan slot boundary and beyond the
    plan: were voltpool to stop now, the charger falls back."""
    rng = random.Random(seed)
    safe_kw = 6.0
    cp = charger("CP-1")
    guard_min = guard_s / 60.0
    async with (
        rig(redis, clock, cp, safe_limit_kw=safe_kw, lease=LeaseConfig(guard_time_s=guard_s)) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as sim,
    ):
        await brought_up(r, sim)
        await sim.plug_in(1, a_car(max_kw=22.0, energy_kwh=0.0))
        choices = [0.0, 0.0, 0.0, 4.5, 5.0, 5.8, 6.0, 6.3, 8.0, 11.0, 22.0]
        plan = plan_for(clock.now(), {("CP-1", 1): [rng.choice(choices) for _ in range(12)]})
        next_plan = clock.now()
        end = clock.now() + timedelta(hours=6)
        sent_before = 0
        minute, last_on, switches_on, held = 0, 0, 0, 0
        was_on = True
        while clock.now() < end:
            if clock.now() >= next_plan:
                if rng.random() < 0.5:
                    kw = [rng.choice(choices) for _ in range(12)]
                    plan = plan_for(clock.now(), {("CP-1", 1): kw}, slots=12)
                else:  # the same course, made again (a re-plan that changed nothing here)
                    t = max(0, sum(1 for s in plan.slot_starts if s <= clock.now()) - 1)
                    kw = list(plan.setpoints[0].kw[t:]) or [0.0]
                    plan = plan_for(clock.now(), {("CP-1", 1): kw}, slots=12)
                await r.dispatcher.publish(plan, r.state)
                next_plan = clock.now() + timedelta(minutes=rng.randint(1, 30))
            await sim.wait_for(lambda: True)
            await r.dispatcher.settled("CP-1")
            now = clock.now()
            t = max(0, sum(1 for s in plan.slot_starts if s <= now) - 1)
            planned_kw = to_limit(plan.setpoints[0].kw[t], cp) / 1000.0
            limit = limit_kw(sim, 0)
            is_on = limit != 0.0
            if is_on and not was_on:
                switches_on += 1
                # off since some time after the minute `last_on`: at least the guard time
                assert minute - last_on >= guard_min, (now, minute, last_on)
            if limit == 0.0 and planned_kw != 0.0:
                held += 1
                assert minute - last_on <= guard_min + 1, (now, plan.setpoints[0])
            else:
                assert abs(limit - planned_kw) <= 0.5 + 1e-6, (now, plan.setpoints[0])
                assert (limit == 0.0) == (planned_kw == 0.0)
            if is_on:
                last_on = minute
            was_on = is_on
            horizon_end = plan.slot_starts[-1] + SLOT
            checks = [LEASE + timedelta(seconds=1)]
            checks += [s - now for s in plan.slot_starts if s - now > LEASE]
            checks += [horizon_end - now + timedelta(hours=1)]
            for ahead in checks:
                assert limit_kw(sim, ahead.total_seconds() / 60) <= safe_kw + 1e-6, (now, ahead)
            await clock.advance(timedelta(minutes=1))
            minute += 1
            sent_before = tx_count(sim)
        assert sent_before >= 5  # the plans were sent, not frozen out
        assert switches_on >= 3  # the plans did switch the car on and off
        assert (held > 0) == (guard_s > 0)  # the guard did hold switches back, and only then
        assert r.dispatcher.counters["profiles_rejected"] == 0
        print(f"seed {seed} guard {guard_s}: {switches_on} switches on, {held} minutes held")
