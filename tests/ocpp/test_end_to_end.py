"""End to end on loopback: a central system, its lease dispatcher and 50 simulated chargers.

Each charger boots, a car plugs in and a transaction starts, the dispatcher sends the plan as
a TxProfile, and a minute of simulated time later every charger's metered power is its
profile's limit (in W or, for half of them, in A converted back).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from redis.asyncio import Redis

from adapters.ocpp.aio import stop_task
from adapters.ocpp.config import LeaseConfig
from adapters.ocpp.dispatcher import LeaseDispatcher
from adapters.ocpp.profiles import from_limit, to_limit
from controller.clock import SimClock
from controller.domain import RateUnit, Vehicle
from simulators.chargepoints.car import SimCar
from simulators.chargepoints.chargepoint import ChargerSpec, SimChargePoint
from tests.ocpp.conftest import charger, fleet, plan_for, running_central

COUNT = 50


async def test_fifty_chargers_boot_start_and_follow_their_tx_profiles(
    redis: Redis, clock: SimClock
) -> None:
    """50 chargers, W and A: TxDefault + ChargePointMax at boot, a TxProfile per transaction,
    metered power = the profile's limit, energy = power x time."""
    ids = [f"CP-{i:02d}" for i in range(COUNT)]
    units: dict[str, RateUnit] = {cid: ("A" if i % 2 else "W") for i, cid in enumerate(ids)}
    records = [charger(cid, max_power_kw=22.0, rate_unit=units[cid]) for cid in ids]
    vehicles = [
        Vehicle(vehicle_id=f"ev-{i:02d}", model="m", capacity_kwh=80.0, energy_kwh=16.0)
        for i in range(COUNT)
    ]
    tags = {f"TAG-{i:02d}": f"ev-{i:02d}" for i in range(COUNT)}
    state = fleet(records, safe_limit_kw=COUNT * 4.6, vehicles=vehicles)
    async with running_central(redis, clock, state, tags=tags) as h:
        dispatcher = LeaseDispatcher(
            h.central, clock, LeaseConfig(), state=lambda: h.recorder.state
        )
        sims = [
            SimChargePoint(
                ChargerSpec(
                    charger_id=cid, max_power_kw=22.0, rate_unit=units[cid], meter_interval_s=60
                ),
                clock,
            )
            for cid in ids
        ]
        tasks = [asyncio.ensure_future(s.run(h.central.url(), h.password)) for s in sims]
        try:
            await asyncio.wait_for(asyncio.gather(*(s.wait_online() for s in sims)), 30)
            await dispatcher.publish(plan_for(clock.now(), {}), h.recorder.state)
            await dispatcher.wait_for(
                lambda: dispatcher.counters["profiles_accepted"] == 2 * COUNT, 30
            )
            assert all(
                [r.purpose for r in s.received] == ["TxDefaultProfile", "ChargePointMaxProfile"]
                for s in sims
            )

            cars = [
                SimCar(
                    vehicle_id=f"ev-{i:02d}",
                    id_tag=f"TAG-{i:02d}",
                    capacity_kwh=80.0,
                    energy_kwh=16.0,
                    max_charge_kw=22.0,
                )
                for i in range(COUNT)
            ]
            started = await asyncio.wait_for(
                asyncio.gather(*(s.plug_in(1, car) for s, car in zip(sims, cars, strict=True))), 30
            )
            assert len(set(started)) == COUNT
            await h.recorder.wait_for(lambda: len(h.recorder.state.transactions) == COUNT)

            setpoints = {(cid, 1): [5.0 + (i % 10) * 1.3] for i, cid in enumerate(ids)}
            await dispatcher.publish(plan_for(clock.now(), setpoints), h.recorder.state)
            await dispatcher.wait_for(
                lambda: dispatcher.counters["profiles_accepted"] == 3 * COUNT, 30
            )
            assert all([r.purpose for r in s.received][-1] == "TxProfile" for s in sims)

            await clock.advance(timedelta(seconds=60))
            await h.recorder.wait_for(lambda: len(h.recorder.of("meter_sampled")) == COUNT, 30)
        finally:
            await dispatcher.close()
            for task in tasks:
                await stop_task(task)
    samples = {e.charger_id: e for e in h.recorder.of("meter_sampled")}
    for record in records:
        limit = to_limit(setpoints[(record.charger_id, 1)][0], record)
        expected_kw = from_limit(limit, record)
        sample = samples[record.charger_id]
        assert sample.power_kw == pytest.approx(expected_kw, abs=0.001), record.charger_id
        assert sample.meter_wh == pytest.approx(expected_kw * 1000 / 60, abs=0.1)
        assert (
            h.recorder.state.vehicles[sample.charger_id.replace("CP", "ev")].charger_id
            == record.charger_id
        )
