"""From fleet state to planning problem: availability, overrides, offline chargers, margins."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from controller.events import (
    ChargerConnected,
    ChargerDisconnected,
    DepartureSet,
    SiteLoadReported,
)
from controller.planning.build import build_problem, inputs_expire_at
from controller.settings import PlanningSettings
from controller.state import FleetState, apply_event
from tests.conftest import T0
from tests.factories import flat_headroom, small_site


def _fold(events: list[object]) -> FleetState:
    state = FleetState()
    for event in events:
        state = apply_event(state, event).state  # type: ignore[arg-type]
    return state


def test_a_charger_that_dropped_off_is_budgeted_at_its_safe_share() -> None:
    """cp-2 was online and went away at 16:01: until its lease ends (16:16) its car is budgeted
    at the full 11 kW it may still be running, then at the safe share of the site limit (20 kW
    split over three 11 kW circuits: 6.67 kW); the others stay free."""
    state = _fold(
        [
            *small_site(T0, cars=3, capacity_kw=100.0),
            flat_headroom(T0, T0, 30.0),
            ChargerConnected(event_id="c", at=T0, charger_id="cp-2"),
            ChargerDisconnected(event_id="d", at=T0 + timedelta(minutes=1), charger_id="cp-2"),
        ]
    )
    problem, starts = build_problem(state, T0 + timedelta(minutes=2), PlanningSettings())
    row = problem.vehicle_ids.index("ev-2")
    assert starts[1] == T0 + timedelta(minutes=15)
    assert problem.lower_kw[row, :2].tolist() == pytest.approx([11.0, 11.0])
    assert problem.upper_kw[row, 2] == pytest.approx(20.0 / 3)
    assert problem.lower_kw[row, 2] == pytest.approx(20.0 / 3)
    free = problem.vehicle_ids.index("ev-1")
    assert problem.upper_kw[free, 0] == pytest.approx(11.0)
    assert problem.lower_kw[free, 0] == 0.0


def test_a_charger_never_seen_online_is_planned_normally() -> None:
    """Configured but not yet connected: nothing runs there, the plan is what it will get."""
    state = _fold([*small_site(T0, cars=1), flat_headroom(T0, T0, 30.0)])
    problem, _ = build_problem(state, T0, PlanningSettings())
    assert problem.lower_kw.max() == 0.0
    assert problem.upper_kw[0, 0] == pytest.approx(11.0)


def test_targets_carry_the_margin_and_departures_become_whole_slots() -> None:
    """A 40 kWh target plans for 41 kWh; a departure at 18:10 leaves the car 8 whole slots."""
    state = _fold(
        [
            *small_site(T0, cars=1),
            DepartureSet(
                event_id="dep",
                at=T0,
                vehicle_id="ev-1",
                departure=T0 + timedelta(hours=2, minutes=10),
                target_kwh=40.0,
            ),
        ]
    )
    problem, _ = build_problem(state, T0, PlanningSettings(target_margin_kwh=1.0))
    assert problem.target_kwh[0] == pytest.approx(41.0)
    assert problem.departure_slot[0] == 8
    assert np.all(problem.upper_kw[0, 8:] == 0.0)
    assert problem.upper_kw[0, 7] > 0.0


def test_a_silent_site_meter_plans_the_lease_window_on_the_safe_limit() -> None:
    """P-03. Households draw 40 kW of a 100 kW connection (safe limit 20 kW), the head-room
    forecast says 50 kW. While the meter is fresh the current slot gets 100 - 40 = 60 kW; once
    it is older than `site_load_fresh_s` every slot that starts before the next lease end (15
    min) is planned on the safe 20 kW, and the slots after it keep the forecast."""
    meter = SiteLoadReported(event_id="load", at=T0, load_kw=40.0)
    state = _fold([*small_site(T0, cars=3, capacity_kw=100.0), flat_headroom(T0, T0, 50.0), meter])
    settings = PlanningSettings()
    fresh, _ = build_problem(state, T0 + timedelta(seconds=30), settings)
    assert fresh.headroom_kw[0] == pytest.approx(60.0)
    assert fresh.headroom_kw[1] == pytest.approx(50.0)
    now = T0 + timedelta(seconds=settings.site_load_fresh_s + 1)
    stale, starts = build_problem(state, now, settings)
    lease_end = now + timedelta(seconds=settings.offline_lease_s)
    for t, start in enumerate(starts):
        assert stale.headroom_kw[t] == pytest.approx(20.0 if start < lease_end else 50.0)
    assert inputs_expire_at(state, T0, settings) == T0 + timedelta(
        seconds=settings.site_load_fresh_s, milliseconds=1
    )
    assert inputs_expire_at(state, now, settings) == T0 + timedelta(
        seconds=settings.headroom_stale_s, milliseconds=1
    )
