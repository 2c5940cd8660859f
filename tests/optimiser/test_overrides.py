"""Operator overrides reach the optimiser through `build_problem`, act, and expire."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest

from controller import optimiser
from controller.domain import Site, Vehicle, slot_floor
from controller.events import (
    CapSite,
    ChangeDeparture,
    Event,
    ForceCharge,
    PauseCharger,
    PauseVehicle,
    PinCharger,
    PriceUpdated,
    SetV2g,
    SiteConfigured,
    VehicleRegistered,
)
from controller.planning.build import build_problem
from controller.planning.planner import StatePlanner
from controller.planning.problem import PlanningProblem, Schedule
from controller.settings import PlanningSettings
from controller.state import FleetState, apply_event
from tests.conftest import T0
from tests.factories import flat_headroom, next_id, small_site
from tests.optimiser.checks import assert_valid

SETTINGS = PlanningSettings()
NOW = T0 + timedelta(minutes=5)  # 16:05, a partial first slot


def _prices() -> PriceUpdated:
    """Expensive evening (0.60), cheap night 22:00-06:00 (0.10), then 0.30."""
    hours = [(16 + k / 4) % 24 for k in range(96)]
    values = tuple(0.60 if 16 <= h < 22 else 0.10 if (h >= 22 or h < 6) else 0.30 for h in hours)
    return PriceUpdated(event_id=next_id("price"), at=T0, start=T0, price_eur_per_kwh=values)


def _state(*extra: object) -> FleetState:
    """Three cars (60 kWh, 30 %) on 11 kW chargers, 30 kW of head-room, night prices."""
    state = FleetState()
    v2g_car = Vehicle(
        vehicle_id="ev-1",
        model="TESLA MODEL 3",
        capacity_kwh=60.0,
        energy_kwh=18.0,
        energy_at=T0,
        max_discharge_kw=11.0,
    )
    events = [
        *small_site(T0, cars=3),
        VehicleRegistered(event_id=next_id("veh"), at=T0, vehicle=v2g_car),
        _prices(),
        flat_headroom(T0, T0, 30.0),
        *extra,
    ]
    for event in events:
        state = apply_event(state, event).state  # type: ignore[arg-type]
    return state


def _plan(state: FleetState, now: datetime = NOW) -> tuple[PlanningProblem, Schedule]:
    problem, _ = build_problem(state, now, SETTINGS)
    schedule = optimiser.solve(problem)
    assert_valid(problem, schedule)
    return problem, schedule


def _row(problem: PlanningProblem, vehicle_id: str) -> int:
    return problem.vehicle_ids.index(vehicle_id)


def _slots_before(problem: PlanningProblem, when: datetime) -> int:
    """How many slots of the problem start before `when`."""
    starts = [problem.start] + [
        problem.start.replace(minute=0) + timedelta(minutes=15 * k) for k in range(1, 96)
    ]
    return sum(1 for s in starts if s < when)


def test_baseline_charges_in_the_cheap_night_only() -> None:
    """Without overrides every car meets its target, all of it at night prices."""
    problem, schedule = _plan(_state())
    assert schedule.status == "optimal"
    assert schedule.shortfall_kwh == pytest.approx(0.0, abs=1e-6)
    evening = _slots_before(problem, T0.replace(hour=22))
    assert schedule.charge_kw[:, :evening].sum() == pytest.approx(0.0, abs=1e-6)


def test_force_charge_runs_full_power_now_and_expires() -> None:
    """Forced: 11 kW from now until the expiry, at evening prices; afterwards, back to night."""
    until = NOW + timedelta(hours=1)
    force = ForceCharge(event_id=next_id("cmd"), at=NOW, expires_at=until, vehicle_id="ev-2")
    state = _state(force)
    problem, schedule = _plan(state)
    row = _row(problem, "ev-2")
    window = _slots_before(problem, until)
    assert schedule.charge_kw[row, :window] == pytest.approx([11.0] * window, abs=1e-6)
    later, after = _plan(state, until + timedelta(minutes=1))
    evening = _slots_before(later, T0.replace(hour=22))
    assert after.charge_kw[_row(later, "ev-2"), :evening].sum() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["vehicle", "charger"])
def test_pause_keeps_the_car_at_zero_until_it_expires(kind: str) -> None:
    """Paused until midnight: nothing before, the target still met after; then lifted."""
    until = T0.replace(hour=0) + timedelta(days=1)
    pause: Event = (
        PauseVehicle(event_id=next_id("cmd"), at=NOW, expires_at=until, vehicle_id="ev-2")
        if kind == "vehicle"
        else PauseCharger(event_id=next_id("cmd"), at=NOW, expires_at=until, charger_id="cp-2")
    )
    state = _state(pause)
    problem, schedule = _plan(state)
    row = _row(problem, "ev-2")
    paused = _slots_before(problem, until)
    assert schedule.charge_kw[row, :paused].sum() == 0.0
    assert schedule.shortfall_kwh[row] == pytest.approx(0.0, abs=1e-6)
    free, _ = build_problem(state, until + timedelta(minutes=1), SETTINGS)
    row = _row(free, "ev-2")
    assert np.all(free.upper_kw[row, : free.departure_slot[row]] > 0.0)


def test_cap_site_holds_the_site_under_the_cap_until_expiry() -> None:
    """Capped at 10 kW until 02:00: the night load stays under 10 kW until then."""
    until = T0.replace(hour=2) + timedelta(days=1)
    cap = CapSite(event_id=next_id("cmd"), at=NOW, expires_at=until, limit_kw=10.0)
    state = _state(cap)
    problem, schedule = _plan(state)
    capped = _slots_before(problem, until)
    assert schedule.site_kw[:capped].max() <= 10.0 + 1e-6
    assert schedule.site_kw.max() > 10.0  # after the cap, the cheap hours fill up
    assert schedule.shortfall_kwh == pytest.approx(0.0, abs=1e-6)
    fresh = apply_event(state, flat_headroom(until, slot_floor(until), 30.0)).state
    lifted, _ = build_problem(fresh, until, SETTINGS)
    assert lifted.headroom_kw.min() == pytest.approx(30.0)


def test_pin_holds_the_charger_at_its_limit_until_expiry() -> None:
    """Pinned at 5 kW for an hour: exactly 5 kW then, at evening prices."""
    until = NOW + timedelta(hours=1)
    pin = PinCharger(
        event_id=next_id("cmd"), at=NOW, expires_at=until, charger_id="cp-3", limit_kw=5.0
    )
    state = _state(pin)
    problem, schedule = _plan(state)
    row = _row(problem, "ev-3")
    window = _slots_before(problem, until)
    assert schedule.charge_kw[row, :window] == pytest.approx([5.0] * window, abs=1e-6)
    after, _ = build_problem(state, until, SETTINGS)
    assert after.lower_kw.sum() == 0.0


def test_set_v2g_lets_a_car_sell_in_the_evening_until_expiry() -> None:
    """Allowed to discharge: ev-1 sells at 0.60 and buys back at 0.10; cheaper than without."""
    until = T0.replace(hour=23)
    allow = SetV2g(
        event_id=next_id("cmd"), at=NOW, expires_at=until, vehicle_id="ev-1", enabled=True
    )
    exporting = SiteConfigured(
        event_id=next_id("site"),
        at=T0,
        site=Site(site_id="depot", capacity_kw=100.0, safe_limit_kw=20.0, export_limit_kw=20.0),
    )
    state = _state(exporting, allow)
    problem, schedule = _plan(state)
    row = _row(problem, "ev-1")
    assert problem.v2g[row]
    assert schedule.discharge_kw[row].sum() > 0.0
    _, without = _plan(_state(exporting))
    assert schedule.cost_eur < without.cost_eur
    after, _ = build_problem(state, until, SETTINGS)
    assert not after.v2g.any()


def test_change_departure_moves_the_need_into_the_evening() -> None:
    """Leaving at 22:00 with 40 kWh: ev-3 must charge at evening prices, and does."""
    leave = T0.replace(hour=22)
    change = ChangeDeparture(
        event_id=next_id("cmd"), at=NOW, vehicle_id="ev-3", departure=leave, target_kwh=40.0
    )
    problem, schedule = _plan(_state(change))
    row = _row(problem, "ev-3")
    departs = int(problem.departure_slot[row])
    assert departs == _slots_before(problem, leave)
    assert schedule.energy_kwh[row, departs] >= 40.0 - 1e-6
    assert schedule.charge_kw[row, departs:].sum() == 0.0


def test_state_planner_with_the_optimiser_makes_a_valid_plan() -> None:
    """The service's planner with `controller.optimiser.solve`: no fallback, one setpoint a car."""
    planner = StatePlanner(settings=SETTINGS, solve=optimiser.solve)
    plan = planner(_state(), NOW)
    assert not plan.fallback
    assert plan.schedule.strategy == "managed"
    assert {s.vehicle_id for s in plan.setpoints} == {"ev-1", "ev-2", "ev-3"}
    totals = np.array([sum(s.kw[t] for s in plan.setpoints) for t in range(96)])
    assert np.all(totals <= np.array(plan.headroom_kw) + 1e-6)
    assert plan.schedule.details["feasible"] == 1.0
