"""The simulated charger's profile rules (OCPP 1.6 §3.13) and its physics, without a network."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from controller.clock import SimClock
from simulators.chargepoints.car import SimCar
from simulators.chargepoints.chargepoint import ChargerSpec, SimChargePoint
from simulators.chargepoints.profiles import (
    Electrical,
    ProfileRejected,
    ProfileStore,
    parse_profile,
)
from tests.conftest import T0


def profile(
    profile_id: int,
    purpose: str,
    periods: list[tuple[int, float]],
    *,
    stack: int = 0,
    unit: str = "W",
    kind: str = "Absolute",
    start: str | None = "2024-03-04T16:00:00Z",
    **extra: Any,
) -> dict[str, Any]:
    """A csChargingProfiles object."""
    schedule: dict[str, Any] = {
        "chargingRateUnit": unit,
        "chargingSchedulePeriod": [{"startPeriod": s, "limit": lim} for s, lim in periods],
    }
    if start is not None:
        schedule["startSchedule"] = start
    if "duration" in extra:
        schedule["duration"] = extra.pop("duration")
    return {
        "chargingProfileId": profile_id,
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": kind,
        "chargingSchedule": schedule,
        **extra,
    }


def store(connectors: int = 1, **kw: Any) -> ProfileStore:
    """A profile store for a 3-phase 230 V charger."""
    return ProfileStore(connectors, Electrical(230.0, 3), **kw)


def put(
    s: ProfileStore, connector: int, raw: dict[str, Any], tx: dict[int, int] | None = None
) -> None:
    """Install a profile (raises ProfileRejected)."""
    s.install(parse_profile(connector, raw), tx or {})


def at(minutes: float) -> Any:
    """T0 plus some minutes."""
    return T0 + timedelta(minutes=minutes)


def test_the_highest_stack_level_in_force_wins_and_yields_when_it_ends() -> None:
    """Within a purpose the higher stack level rules while its duration lasts."""
    s = store()
    put(s, 0, profile(1, "TxDefaultProfile", [(0, 7000)], stack=0))
    put(s, 0, profile(2, "TxDefaultProfile", [(0, 4000)], stack=3, duration=600))
    assert s.connector_limit_w(1, at(5)) == 4000
    assert s.connector_limit_w(1, at(10)) == 7000


def test_validity_bounds_are_honoured() -> None:
    """Outside validFrom/validTo a profile is not in force."""
    s = store()
    put(
        s,
        0,
        profile(
            1,
            "TxDefaultProfile",
            [(0, 5000)],
            validFrom="2024-03-04T16:10:00Z",
            validTo="2024-03-04T16:20:00Z",
        ),
    )
    assert [s.connector_limit_w(1, at(m)) for m in (5, 10, 19, 20)] == [None, 5000, 5000, None]


def test_a_tx_profile_beats_tx_default_which_the_charge_point_max_caps() -> None:
    """TxProfile (of the running transaction) over TxDefault; ChargePointMax caps both."""
    s = store()
    put(s, 0, profile(1, "TxDefaultProfile", [(0, 5000)]))
    put(s, 0, profile(2, "ChargePointMaxProfile", [(0, 9000)]))
    put(s, 1, profile(3, "TxProfile", [(0, 11000), (600, 2000)], transactionId=7), {1: 7})
    assert s.connector_limit_w(1, at(1), transaction_id=7) == 9000
    assert s.connector_limit_w(1, at(11), transaction_id=7) == 2000
    assert s.connector_limit_w(1, at(1)) == 5000  # no transaction: the default
    s.end_transaction(1)
    assert s.connector_limit_w(1, at(11), transaction_id=7) == 5000


def test_a_connector_default_beats_the_charge_point_default() -> None:
    """A TxDefaultProfile set on a connector overrides the one on connector 0 for it."""
    s = store(connectors=2)
    put(s, 0, profile(1, "TxDefaultProfile", [(0, 5000)]))
    put(s, 2, profile(2, "TxDefaultProfile", [(0, 8000)]))
    assert (s.connector_limit_w(1, at(0)), s.connector_limit_w(2, at(0))) == (5000, 8000)


def test_amperes_are_converted_with_the_period_phases() -> None:
    """A = W / (V * phases): 16 A on 3 phases at 230 V is 11,040 W; on 1 phase 3,680 W."""
    s = store()
    put(s, 0, profile(1, "TxDefaultProfile", [(0, 16)], unit="A"))
    assert s.connector_limit_w(1, at(0)) == pytest.approx(11_040)
    raw = profile(2, "TxDefaultProfile", [(0, 16)], unit="A", stack=1)
    raw["chargingSchedule"]["chargingSchedulePeriod"][0]["numberPhases"] = 1
    put(s, 0, raw)
    assert s.connector_limit_w(1, at(0)) == pytest.approx(3_680)


def test_same_id_or_same_purpose_and_level_replaces() -> None:
    """A new profile replaces one with its id, and one with its connector/purpose/level."""
    s = store()
    put(s, 0, profile(1, "TxDefaultProfile", [(0, 5000)], stack=1))
    put(s, 0, profile(1, "TxDefaultProfile", [(0, 6000)], stack=2))
    put(s, 0, profile(9, "TxDefaultProfile", [(0, 7000)], stack=2))
    assert [(p.profile_id, p.stack_level) for p in s.profiles] == [(9, 2)]
    assert s.connector_limit_w(1, at(0)) == 7000


def test_recurring_daily_profiles_repeat_and_relative_ones_start_with_the_transaction() -> None:
    """Daily: the same offset the next day; Relative: offsets count from the transaction start."""
    s = store()
    put(
        s,
        0,
        profile(
            1,
            "TxDefaultProfile",
            [(0, 3000), (3600, 9000)],
            kind="Recurring",
            recurrencyKind="Daily",
        ),
    )
    assert s.connector_limit_w(1, at(30)) == 3000
    assert s.connector_limit_w(1, at(24 * 60 + 61)) == 9000
    put(
        s, 1, profile(2, "TxProfile", [(0, 4000), (300, 8000)], kind="Relative", start=None), {1: 5}
    )
    started = at(100)
    assert s.connector_limit_w(1, at(103), transaction_id=5, tx_start=started) == 4000
    assert s.connector_limit_w(1, at(106), transaction_id=5, tx_start=started) == 8000


@pytest.mark.parametrize(
    ("connector", "raw", "running"),
    [
        (1, profile(1, "TxProfile", [(0, 1000)]), {}),
        (1, profile(1, "TxProfile", [(0, 1000)], transactionId=8), {1: 7}),
        (0, profile(1, "TxProfile", [(0, 1000)]), {1: 7}),
        (1, profile(1, "ChargePointMaxProfile", [(0, 1000)]), {}),
        (0, profile(1, "TxDefaultProfile", [(0, 1000)], stack=9), {}),
        (0, profile(1, "TxDefaultProfile", [(0, -1000)]), {}),
        (0, profile(1, "TxDefaultProfile", [(60, 1000)]), {}),
        (0, profile(1, "TxDefaultProfile", [(0, 1000)], start=None), {}),
        (2, profile(1, "TxDefaultProfile", [(0, 1000)]), {}),
        (0, profile(1, "TxDefaultProfile", [(s, 1000) for s in range(0, 2500, 100)]), {}),
    ],
    ids=[
        "tx without transaction",
        "tx for another transaction",
        "tx on connector 0",
        "cp max on a connector",
        "stack level over the maximum",
        "negative limit without V2G",
        "first period not at 0",
        "absolute without start",
        "no such connector",
        "more periods than allowed",
    ],
)
def test_profiles_the_charger_does_not_take_are_rejected(
    connector: int, raw: dict[str, Any], running: dict[int, int]
) -> None:
    """Each rule of SetChargingProfile that leads to Rejected."""
    s = store()
    with pytest.raises(ProfileRejected):
        s.install(parse_profile(connector, raw), running)
    assert s.profiles == []


def test_clear_by_id_or_by_filters_says_whether_it_removed_anything() -> None:
    """ClearChargingProfile: Accepted when something matched, Unknown (False) otherwise."""
    s = store()
    put(s, 0, profile(1, "TxDefaultProfile", [(0, 5000)]))
    put(s, 0, profile(2, "ChargePointMaxProfile", [(0, 9000)]))
    assert s.clear(profile_id=5) is False
    assert s.clear(purpose="ChargePointMaxProfile") is True
    assert [p.profile_id for p in s.profiles] == [1]
    assert s.clear(profile_id=1) is True
    assert s.profiles == []


def charging_point(clock: SimClock, **spec: Any) -> SimChargePoint:
    """A simulated charger with a car on a running transaction (no network needed)."""
    cp = SimChargePoint(ChargerSpec(charger_id="CP-1", max_power_kw=22.0, **spec), clock)
    connector = cp.connector(1)
    connector.car = SimCar(
        vehicle_id="ev",
        id_tag="T",
        capacity_kwh=50.0,
        energy_kwh=10.0,
        max_charge_kw=11.0,
        max_discharge_kw=7.0,
    )
    connector.transaction_id = 1
    connector.tx_start = clock.now()
    return cp


async def test_power_is_the_smaller_of_the_limit_and_what_the_car_takes(clock: SimClock) -> None:
    """min(profile limit, acceptance); no profile: the car's own maximum."""
    cp = charging_point(clock)
    assert cp.powers_kw(clock.now())[1] == 11.0
    put(cp.store, 0, profile(1, "TxDefaultProfile", [(0, 7000)]))
    assert cp.powers_kw(clock.now())[1] == 7.0


async def test_below_the_minimum_current_the_car_gets_nothing(clock: SimClock) -> None:
    """A limit under 6 A x 230 V x 3 (4.14 kW) delivers 0."""
    cp = charging_point(clock)
    put(cp.store, 0, profile(1, "TxDefaultProfile", [(0, 4100)]))
    assert cp.powers_kw(clock.now())[1] == 0.0
    put(cp.store, 0, profile(1, "TxDefaultProfile", [(0, 4200)]))
    assert cp.powers_kw(clock.now())[1] == pytest.approx(4.2)


async def test_energy_integrates_piecewise_across_a_limit_change(clock: SimClock) -> None:
    """10 min at 11 kW then 5 min at 5 kW: the register and the battery move exactly so."""
    cp = charging_point(clock)
    put(cp.store, 0, profile(1, "TxDefaultProfile", [(0, 11000), (600, 5000)]))
    await clock.advance(timedelta(minutes=15))
    cp.advance(clock.now())
    expected_kwh = 11.0 * 10 / 60 + 5.0 * 5 / 60
    assert cp.connector(1).import_wh == pytest.approx(expected_kwh * 1000.0)
    car = cp.connector(1).car
    assert car is not None
    assert car.energy_kwh == pytest.approx(10.0 + 0.92 * expected_kwh)


async def test_a_charger_ignoring_profiles_draws_full_power(clock: SimClock) -> None:
    """Fault: accepted but not applied (the go-e case)."""
    cp = charging_point(clock)
    put(cp.store, 0, profile(1, "TxDefaultProfile", [(0, 5000)]))
    cp.faults.ignore_profiles = True
    assert cp.powers_kw(clock.now())[1] == 11.0


async def test_a_negative_limit_discharges_within_the_car_and_floor(clock: SimClock) -> None:
    """negative_limit V2G: -5 kW discharges 5 kW; below the SoC floor nothing."""
    cp = charging_point(clock, v2g_mode="negative_limit")
    put(cp.store, 0, profile(1, "TxDefaultProfile", [(0, -5000)]))
    car = cp.connector(1).car
    assert car is not None
    car.energy_kwh = 25.0
    assert cp.powers_kw(clock.now())[1] == -5.0
    car.energy_kwh = 9.0  # 18 %, under the 20 % floor
    assert cp.powers_kw(clock.now())[1] == 0.0


async def test_the_car_tapers_above_80_percent(clock: SimClock) -> None:
    """Acceptance falls linearly from 80 % to 0 at 100 %."""
    cp = charging_point(clock)
    car = cp.connector(1).car
    assert car is not None
    car.energy_kwh = 45.0  # 90 %
    assert cp.powers_kw(clock.now())[1] == pytest.approx(11.0 * 0.5)
