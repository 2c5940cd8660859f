"""Simulated charge points against the real central system: CS->CP calls, faults, reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from redis.asyncio import Redis

from adapters.ocpp.config import OcppConfig
from adapters.ocpp.errors import CallTimedOut
from controller.clock import SimClock
from simulators.chargepoints.car import SimCar
from simulators.chargepoints.chargepoint import Faults
from tests.ocpp.conftest import (
    Harness,
    absolute_profile,
    charger,
    fleet,
    running_central,
    simulated,
)


def car(energy_kwh: float = 10.0, max_kw: float = 11.0) -> SimCar:
    """A 40 kWh car with idTag TAG-1."""
    return SimCar(
        vehicle_id="ev-1",
        id_tag="TAG-1",
        capacity_kwh=40.0,
        energy_kwh=energy_kwh,
        max_charge_kw=max_kw,
    )


async def test_a_simulated_charger_boots_and_reports_its_connectors(harness: Harness) -> None:
    """BootNotification once, then StatusNotification for connector 0 and each connector."""
    async with simulated(harness, "CP-1", max_power_kw=22.0, connectors=1) as sim:
        await harness.recorder.wait_for(
            lambda: len(harness.recorder.of("connector_status_changed")) == 2
        )
        assert sim.boot_status == "Accepted"
    statuses = harness.recorder.of("connector_status_changed")
    assert [(e.connector_id, e.status.value) for e in statuses] == [
        (0, "Available"),
        (1, "Available"),
    ]


async def test_a_car_plugging_in_starts_a_transaction_and_meter_values_follow_the_clock(
    harness: Harness,
) -> None:
    """Plug-in -> Preparing, StartTransaction, Charging; a minute later one MeterValues."""
    async with simulated(harness, "CP-1", max_power_kw=22.0, meter_interval_s=60) as sim:
        transaction_id = await sim.plug_in(1, car())
        assert transaction_id is not None
        await harness.clock.advance(timedelta(seconds=60))
        await harness.recorder.wait_for(lambda: bool(harness.recorder.of("meter_sampled")))
    (sample,) = harness.recorder.of("meter_sampled")
    assert sample.power_kw == pytest.approx(11.0)
    assert sample.meter_wh == pytest.approx(11.0 / 60 * 1000, abs=0.1)
    assert sample.soc == pytest.approx((10.0 + 0.92 * 11.0 / 60) / 40.0, abs=1e-3)
    assert sample.transaction_id == transaction_id
    assert harness.recorder.state.vehicles["ev-1"].charger_id == "CP-1"


@pytest.mark.parametrize("phase", ["connection", "transaction"])
async def test_meter_values_are_sampled_from_the_connection_or_from_the_transactions_start(
    harness: Harness, phase: str
) -> None:
    """Plugged in 25 s after the connection, 60 s interval: with the connection's phase the
    first sample comes 60 s after the connection; with the transaction's (OCPP 1.6's
    MeterValueSampleInterval) 60 s after the start, at 85 s; later ones every 60 s from there."""
    async with simulated(
        harness, "CP-1", max_power_kw=22.0, meter_interval_s=60, meter_phase=phase
    ) as sim:
        connected = harness.clock.now()
        await harness.clock.advance(timedelta(seconds=25))
        assert await sim.plug_in(1, car()) is not None
        start = sim.connector(1).tx_start
        await harness.clock.advance(timedelta(seconds=35))
        await harness.clock.advance(timedelta(seconds=25))
        await harness.recorder.wait_for(lambda: bool(harness.recorder.of("meter_sampled")))
        (sample,) = harness.recorder.of("meter_sampled")
        assert (sample.at - connected).total_seconds() == (60.0 if phase == "connection" else 85.0)
        assert start is not None
        due = sim.samples_due(start + timedelta(seconds=60), 60)
        assert due == {1: start + timedelta(seconds=120)}  # strictly after: the next one
        assert sim.samples_due(start, 60) == {1: start + timedelta(seconds=60)}


async def test_get_composite_schedule_returns_what_the_central_system_set(
    harness: Harness,
) -> None:
    """TxDefault 7 kW, ChargePointMax 8 kW, a 20-min TxProfile (9 kW, then 6 kW): the composite
    is 8 (capped), 6, then the default 7 -- in W, and in A when asked."""
    central = harness.central
    async with simulated(harness, "CP-1", max_power_kw=22.0) as sim:
        tx = await sim.plug_in(1, car())
        assert tx is not None
        for connector, profile in (
            (0, absolute_profile(1, "TxDefaultProfile", [(0, 7000)])),
            (0, absolute_profile(2, "ChargePointMaxProfile", [(0, 8000)])),
            (
                1,
                absolute_profile(
                    3, "TxProfile", [(0, 9000), (600, 6000)], duration_s=1200, transaction_id=tx
                ),
            ),
        ):
            assert await central.set_charging_profile("CP-1", connector, profile) == "Accepted"
        watts = await central.get_composite_schedule("CP-1", 1, 3600)
        amps = await central.get_composite_schedule("CP-1", 1, 3600, "A")
    assert watts["status"] == "Accepted"
    assert watts["chargingSchedule"]["chargingRateUnit"] == "W"
    assert watts["chargingSchedule"]["chargingSchedulePeriod"] == [
        {"startPeriod": 0, "limit": 8000.0},
        {"startPeriod": 600, "limit": 6000.0},
        {"startPeriod": 1200, "limit": 7000.0},
    ]
    assert [p["limit"] for p in amps["chargingSchedule"]["chargingSchedulePeriod"]] == [
        round(8000 / 690, 1),
        round(6000 / 690, 1),
        round(7000 / 690, 1),
    ]


async def test_clear_charging_profile_removes_it_and_then_knows_nothing(harness: Harness) -> None:
    """Accepted when something was cleared, Unknown when nothing matched."""
    async with simulated(harness, "CP-1", max_power_kw=22.0):
        profile = absolute_profile(5, "TxDefaultProfile", [(0, 5000)])
        await harness.central.set_charging_profile("CP-1", 0, profile)
        first = await harness.central.clear_charging_profile("CP-1", profile_id=5)
        again = await harness.central.clear_charging_profile("CP-1", profile_id=5)
        composite = await harness.central.get_composite_schedule("CP-1", 1, 60)
    assert (first, again) == ("Accepted", "Unknown")
    assert composite["chargingSchedule"]["chargingSchedulePeriod"] == [
        {"startPeriod": 0, "limit": 22000.0}
    ]


async def test_remote_start_and_stop_run_a_transaction(harness: Harness) -> None:
    """RemoteStart on a connector with a car (and a TxProfile with it); RemoteStop ends it."""
    async with simulated(harness, "CP-1", max_power_kw=22.0) as sim:
        await sim.plug_in(1, car(), start=False)
        with_profile = absolute_profile(9, "TxProfile", [(0, 5000)])
        assert (
            await harness.central.remote_start_transaction("CP-1", "TAG-1", 1, with_profile)
            == "Accepted"
        )
        await harness.recorder.wait_for(
            lambda: any(
                e.status.value == "Charging"
                for e in harness.recorder.of("connector_status_changed")
            )
        )
        (started,) = harness.recorder.of("transaction_started")
        assert sim.powers_kw(harness.clock.now())[1] == pytest.approx(5.0)
        assert await harness.central.remote_stop_transaction("CP-1", 999) == "Rejected"
        assert (
            await harness.central.remote_stop_transaction("CP-1", started.transaction_id)
            == "Accepted"
        )
        await harness.recorder.wait_for(lambda: bool(harness.recorder.of("transaction_stopped")))
    (stopped,) = harness.recorder.of("transaction_stopped")
    assert (stopped.transaction_id, stopped.reason) == (started.transaction_id, "Remote")


async def test_trigger_message_makes_the_charger_send_meter_values(harness: Harness) -> None:
    """TriggerMessage(MeterValues) -> Accepted, then a MeterValues arrives."""
    async with simulated(harness, "CP-1", max_power_kw=22.0) as sim:
        await sim.plug_in(1, car())
        assert await harness.central.trigger_message("CP-1", "MeterValues") == "Accepted"
        await harness.recorder.wait_for(lambda: bool(harness.recorder.of("meter_sampled")))
        assert await harness.central.trigger_message("CP-1", "DiagnosticsStatusNotification") == (
            "NotImplemented"
        )


async def test_configuration_can_be_read_and_changed_where_writable(harness: Harness) -> None:
    """GetConfiguration lists keys (unknown ones apart); ChangeConfiguration per key rules."""
    async with simulated(harness, "CP-1", max_power_kw=22.0, rate_unit="A"):
        central = harness.central
        assert await central.change_configuration("CP-1", "MeterValueSampleInterval", "10") == (
            "Accepted"
        )
        assert await central.change_configuration("CP-1", "NumberOfConnectors", "2") == "Rejected"
        assert await central.change_configuration("CP-1", "Nope", "1") == "NotSupported"
        known, unknown = await central.get_configuration(
            "CP-1", ["MeterValueSampleInterval", "ChargingScheduleAllowedChargingRateUnit", "Nope"]
        )
    assert known == [
        {"key": "MeterValueSampleInterval", "readonly": False, "value": "10"},
        {"key": "ChargingScheduleAllowedChargingRateUnit", "readonly": True, "value": "Current"},
    ]
    assert unknown == ["Nope"]


async def test_a_charger_rejecting_profiles_answers_rejected(harness: Harness) -> None:
    """Fault injection: reject SetChargingProfile."""
    async with simulated(
        harness, "CP-1", max_power_kw=22.0, faults=Faults(reject_profiles=True)
    ) as sim:
        status = await harness.central.set_charging_profile(
            "CP-1", 0, absolute_profile(1, "TxDefaultProfile", [(0, 5000)])
        )
    assert status == "Rejected"
    assert [r.status for r in sim.received] == ["Rejected"]


async def test_a_charger_that_does_not_answer_in_time_times_out(
    redis: Redis, clock: SimClock
) -> None:
    """Fault injection: delayed replies (on the simulated clock, which does not move here)."""
    config = OcppConfig(bcrypt_rounds=4, call_timeout_s=0.2)
    async with (
        running_central(redis, clock, fleet([charger("CP-1")]), config=config) as h,
        simulated(h, "CP-1", max_power_kw=22.0, faults=Faults(reply_delay_s=60)),
    ):
        with pytest.raises(CallTimedOut):
            await h.central.get_configuration("CP-1")
        assert h.central.metrics["calls_timed_out"] == 1


async def test_a_dropped_charger_reconnects_without_rebooting(harness: Harness) -> None:
    """Fault injection: the link dies without a close frame; after the back-off the charger is
    back, with one BootNotification in all."""
    async with simulated(harness, "CP-1", max_power_kw=22.0) as sim:
        await sim.drop()
        await harness.recorder.wait_for(lambda: bool(harness.recorder.of("charger_disconnected")))
        await sim.wait_for(lambda: sim.backing_off)
        assert not sim.online.is_set()
        await harness.clock.advance(timedelta(seconds=2))
        await harness.recorder.wait_for(lambda: len(harness.recorder.of("charger_connected")) == 2)
        await sim.wait_online()
        assert sim.stats.sent["BootNotification"] == 1
        assert harness.central.is_online("CP-1")


async def test_garbage_from_a_simulated_charger_is_counted_and_it_carries_on(
    harness: Harness,
) -> None:
    """Fault injection: garbage frames are dropped and counted; the charger's calls still work."""
    async with simulated(harness, "CP-1", max_power_kw=22.0) as sim:
        await sim.send_raw("}{ definitely not OCPP")
        await sim.send_raw(b"\x00binary")
        await sim.send_status(1)
    assert harness.central.metrics["frames_drop"] == 2


async def test_a_waiter_is_woken_by_a_call_that_changes_the_charger_without_its_own_calls(
    harness: Harness,
) -> None:
    """`SimChargePoint.wait_for` looks again whenever the charger answers the central system:
    a ChangeConfiguration or a ClearChargingProfile changes what it holds without any CALL of
    its own (on the old simulator only its own CALLs and profiles installed or refused woke a
    waiter, and these waits timed out)."""
    async with simulated(harness, "CP-1", max_power_kw=22.0) as sim:
        central = harness.central

        async def woken_by(predicate: Callable[[], bool], change: Awaitable[object]) -> None:
            """Start waiting for `predicate` (false now), then make the change."""
            assert not predicate()
            waiter = asyncio.ensure_future(sim.wait_for(predicate))
            await asyncio.sleep(0)  # the waiter has looked and waits
            assert not waiter.done()
            await change
            await waiter

        await woken_by(
            lambda: sim.configuration["MeterValueSampleInterval"] == "10",
            central.change_configuration("CP-1", "MeterValueSampleInterval", "10"),
        )
        await woken_by(
            lambda: sim.authorization_key == "rotated-key-0123456789",
            central.change_configuration("CP-1", "AuthorizationKey", "rotated-key-0123456789"),
        )
        profile = absolute_profile(5, "TxDefaultProfile", [(0, 5000)])
        assert await central.set_charging_profile("CP-1", 0, profile) == "Accepted"
        now = harness.clock.now()
        assert sim.limit_kw(sim.connector(1), now) == pytest.approx(5.0)
        await woken_by(
            lambda: sim.limit_kw(sim.connector(1), now) == pytest.approx(22.0),
            central.clear_charging_profile("CP-1", profile_id=5),
        )
