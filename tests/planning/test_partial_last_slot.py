"""A car that leaves inside a slot: the part of the slot before it leaves is planned.

`build_problem` gives the slot a car leaves in its power bound times the share of the slot it is
still there for (the energy full power until the departure delivers), and `make_plan` runs the
car faster there so that the slot's planned energy is in the battery by the departure, within
the head-room. The solves are checked against the cvxpy reference and against an independent
scipy `linprog` written here from the departure minutes alone.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from controller.events import DepartureSet, PriceUpdated
from controller.optimiser import FastSolver, OptimiserOptions, solve_reference
from controller.planning.build import build_problem, make_plan, until_departure_kw
from controller.planning.problem import schedule_from_power
from controller.settings import PlanningSettings
from controller.state import FleetState, apply_event
from tests.conftest import T0
from tests.factories import flat_headroom, flat_prices, small_site
from tests.optimiser.checks import assert_valid, close

LIMIT_KW = 11.0  # the factories' chargers and cars
ETA = 0.92  # the cars' charge efficiency (domain default)
PATIENT = OptimiserOptions(time_limit_s=60.0, warm_start=False)
SHORT = PlanningSettings(horizon_slots=16, target_margin_kwh=0.0, partial_last_slot=True)


def _fold(events: list[object]) -> FleetState:
    state = FleetState()
    for event in events:
        state = apply_event(state, event).state  # type: ignore[arg-type]
    return state


def _leaving(vehicle_id: str, departure: datetime, target_kwh: float) -> DepartureSet:
    return DepartureSet(
        event_id=f"dep-{vehicle_id}",
        at=T0,
        vehicle_id=vehicle_id,
        departure=departure,
        target_kwh=target_kwh,
    )


@pytest.mark.parametrize(("minutes", "share"), [(2 * 60 + 44, 14 / 15), (2 * 60 + 40, 10 / 15)])
def test_a_car_leaving_inside_a_slot_gets_energy_there_up_to_its_power_times_the_share(
    minutes: int, share: float
) -> None:
    """ev-1 (18 kWh now) wants 45.5 kWh by 18:44 (or 18:40): ten whole slots at 11 kW give it
    25.3 kWh (43.3 kWh), so it needs the slot it leaves in, for which 11 kW over the 14 (10)
    minutes it is still there is the bound. With 14 minutes the target is met; with 10 the car
    gets all those minutes can give, where whole slots alone would leave it 1.7 kWh shorter.
    Its setpoint there, held until it leaves, delivers the slot's planned energy; the plan
    keeps 11 kW x the rest of the slot out of its head-room for that and gives it back."""
    departure = T0 + timedelta(minutes=minutes)
    state = _fold(
        [
            *small_site(T0, cars=1),
            flat_headroom(T0, T0, 30.0),
            flat_prices(T0, T0),
            _leaving("ev-1", departure, 45.5),
        ]
    )
    problem, starts = build_problem(state, T0, SHORT)
    last = minutes // 15  # the slot it leaves in
    assert problem.departure_slot[0] == last + 1
    assert problem.upper_kw[0, last] == pytest.approx(LIMIT_KW * share)
    assert problem.upper_kw[0, last - 1] == pytest.approx(LIMIT_KW)
    assert np.all(problem.upper_kw[0, last + 1 :] == 0.0)

    schedule = FastSolver().solve(problem, PATIENT)
    bound_kwh = LIMIT_KW * share * 0.25
    planned_kwh = float(schedule.charge_kw[0, last]) * 0.25
    reach = 18.0 + ETA * (LIMIT_KW * 0.25 * last + bound_kwh)
    assert 0.0 < planned_kwh <= bound_kwh + 1e-9
    assert schedule.energy_kwh[0, last + 1] == pytest.approx(min(45.5, reach), abs=1e-6)
    assert schedule.shortfall_kwh[0] == pytest.approx(max(0.0, 45.5 - reach), abs=1e-6)
    # Whole slots only (the old planning) could not give it this much.
    assert schedule.energy_kwh[0, last + 1] > 18.0 + ETA * LIMIT_KW * 0.25 * last + 1e-3

    plan = make_plan(state, problem, starts, schedule)
    setpoint = plan.setpoints[0].kw[last]
    assert setpoint <= LIMIT_KW + 1e-9
    # Held until the departure, the setpoint delivers the slot's planned energy.
    assert setpoint * share * 0.25 == pytest.approx(planned_kwh, abs=1e-9)


@pytest.mark.parametrize(("headroom_kw", "expected_kw"), [(30.0, 11.0), (20.0, 22.0 / 3 + 5 / 3)])
def test_the_raise_until_departure_has_its_head_room_kept(
    headroom_kw: float, expected_kw: float
) -> None:
    """ev-1 leaves at 16:10, 2/3 into the first slot: planned at most 22/3 kW on average
    there, 11 kW until it leaves, so the problem keeps 11/3 kW of the slot's head-room out;
    the plan's head-room is the real one. At 30 kW, ev-1 at 22/3 and ev-2 at 11 kW: ev-1 runs
    11 kW until it leaves. A plan over the kept head-room (20 kW: 18.33 kW against 16.33) has
    the raise cut to what the real limit leaves: ev-1 at 9 kW."""
    state = _fold(
        [
            *small_site(T0, cars=2),
            flat_headroom(T0, T0, headroom_kw),
            flat_prices(T0, T0),
            _leaving("ev-1", T0 + timedelta(minutes=10), 40.0),
            _leaving("ev-2", T0 + timedelta(hours=2), 40.0),
        ]
    )
    problem, starts = build_problem(state, T0, SHORT)
    assert problem.departure_slot[0] == 1
    assert problem.upper_kw[0, 0] == pytest.approx(LIMIT_KW * 2 / 3)
    assert problem.headroom_kw[0] == pytest.approx(headroom_kw - LIMIT_KW / 3)
    assert problem.headroom_kw[1] == pytest.approx(headroom_kw)
    power = np.zeros((2, problem.n_slots))
    power[0, 0] = LIMIT_KW * 2 / 3
    power[1, :8] = LIMIT_KW
    schedule = schedule_from_power(problem, power, strategy="hand")
    net, limit = until_departure_kw(state, problem, starts, schedule)
    assert limit.tolist() == pytest.approx([headroom_kw] * problem.n_slots)
    assert net[0, 0] == pytest.approx(expected_kw)
    assert net[1, 0] == pytest.approx(LIMIT_KW)
    assert net[:, 0].sum() <= headroom_kw + 1e-9
    assert np.array_equal(net[:, 1:], power[:, 1:])  # only the departure slot is raised
    plan = make_plan(state, problem, starts, schedule)
    assert plan.headroom_kw[0] == pytest.approx(headroom_kw)


def test_a_slot_that_cannot_hold_the_reserve_plans_no_partial_slot() -> None:
    """At 3 kW of head-room, the 11/3 kW ev-1's raise would need do not fit: it is planned on
    its whole slots (none: it leaves inside the first), and the head-room is not touched."""
    state = _fold(
        [
            *small_site(T0, cars=1),
            flat_headroom(T0, T0, 3.0),
            _leaving("ev-1", T0 + timedelta(minutes=10), 40.0),
        ]
    )
    problem, _ = build_problem(state, T0, SHORT)
    assert problem.departure_slot[0] == 0
    assert problem.upper_kw[0].max() == 0.0
    assert problem.headroom_kw[0] == pytest.approx(3.0)


def test_a_car_that_may_discharge_keeps_whole_slots() -> None:
    """The discharge bound is per car, so a V2G car's partial last slot is not planned."""

    state = _fold(
        [
            *small_site(T0, cars=1),
            flat_headroom(T0, T0, 30.0),
            _leaving("ev-1", T0 + timedelta(minutes=44), 40.0),
        ]
    )
    vehicle = replace(state.vehicles["ev-1"], v2g_allowed=True, max_discharge_kw=7.0)
    charger = replace(state.chargers["cp-1"], v2g_mode="negative_limit")
    state = replace(
        state,
        vehicles={**state.vehicles, "ev-1": vehicle},
        chargers={**state.chargers, "cp-1": charger},
    )
    problem, _ = build_problem(state, T0, SHORT)
    assert bool(problem.v2g[0])
    assert problem.departure_slot[0] == 2
    assert problem.upper_kw[0, 2] == 0.0


def _independent_optima(
    departures_min: list[int],
    now_min: int,
    energy_kwh: list[float],
    target_kwh: list[float],
    prices: list[float],
    headroom_kw: float,
    slots: int,
) -> tuple[float, float]:
    """(least shortfall for head-room, least money with it) by scipy, from departure minutes.

    Slot t covers minutes [a_t, b_t) after T0 (the first starts at `now_min`); a car gets at most
    11 kW times the minutes it is there in the slot, the site at most the head-room times the
    slot's length. Variables: grid kWh per car and slot, then a shortfall per car.
    """
    n = len(departures_min)
    bounds_a = [now_min] + [15 * k for k in range(1, slots)]
    bounds_b = [15 * k for k in range(1, slots + 1)]
    cells = n * slots
    there = np.zeros((n, slots))  # minutes each car is there in each slot
    for i in range(n):
        for t in range(slots):
            there[i, t] = max(0, min(bounds_b[t], departures_min[i]) - bounds_a[t])
    lengths = np.array(bounds_b) - np.array(bounds_a)
    share = there / lengths[None, :]
    partial = (share > 0.0) & (share < 1.0)
    # Below half a slot the car is not planned there (its reserve would cost the others more
    # than it gets); above, its raise to 11 kW until it leaves needs 11 (1 - share) kW of the
    # slot's head-room, and where the slot cannot hold that, no partial slot is planned there.
    position = (np.array(departures_min) % 15) / 15  # where it leaves in its 15-minute slot
    usable = partial & (position[:, None] >= 0.5)
    reserve = (LIMIT_KW * (1.0 - share) * usable).sum(axis=0)
    fits = reserve <= headroom_kw
    usable &= fits[None, :]
    reserve = np.where(fits, reserve, 0.0)
    there = np.where(partial & ~usable, 0.0, there)
    upper = (LIMIT_KW * there / 60.0).ravel().tolist()
    lengths_h = lengths / 60.0
    rows, rhs = [], []
    for t in range(slots):  # the site
        row = np.zeros(cells + n)
        row[[i * slots + t for i in range(n)]] = 1.0
        rows.append(row)
        rhs.append((headroom_kw - reserve[t]) * lengths_h[t])
    for i in range(n):  # the battery: -(eta sum_t x) - s <= -(need), sum x <= room / eta
        # What the stage counts: the shortfall the head-room causes (not the one time makes).
        reach = ETA * sum(upper[i * slots : (i + 1) * slots])
        need = max(0.0, min(target_kwh[i] - energy_kwh[i], reach))
        row = np.zeros(cells + n)
        row[i * slots : (i + 1) * slots] = -ETA
        row[cells + i] = -1.0
        rows.append(row)
        rhs.append(-need)
        row = np.zeros(cells + n)
        row[i * slots : (i + 1) * slots] = ETA
        rows.append(row)
        rhs.append(60.0 - energy_kwh[i])
    a_ub, b_ub = np.array(rows), np.array(rhs)
    var_bounds = [(0.0, u) for u in upper] + [(0.0, None)] * n
    first = np.concatenate([np.zeros(cells), np.ones(n)])
    one = linprog(first, A_ub=a_ub, b_ub=b_ub, bounds=var_bounds, method="highs")
    assert one.status == 0
    money = np.concatenate([np.tile(prices[:slots], n), np.zeros(n)])
    a_two = np.vstack([a_ub, first])
    b_two = np.append(b_ub, one.fun + 1e-7 * max(1.0, one.fun))
    two = linprog(money, A_ub=a_two, b_ub=b_two, bounds=var_bounds, method="highs")
    assert two.status == 0
    return float(one.fun), float(two.fun)


@st.composite
def fleets(draw: st.DrawFn) -> dict[str, object]:
    """2-4 cars leaving at any minute of the next 3.5 h, a re-plan at any minute of a slot,
    targets that may be out of reach, a head-room that may bind, prices per slot."""
    n = draw(st.integers(2, 4))
    return {
        "now_min": draw(st.integers(0, 14)),
        "departures_min": [draw(st.integers(16, 210)) for _ in range(n)],
        "soc": [draw(st.integers(1, 6)) / 10 for _ in range(n)],
        "target_kwh": [float(draw(st.integers(10, 58))) for _ in range(n)],
        "headroom_kw": float(draw(st.sampled_from([8, 15, 25, 60]))),
        "prices": [draw(st.integers(5, 40)) / 100 for _ in range(SHORT.horizon_slots)],
    }


FAST = FastSolver()


@settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(fleet=fleets())
def test_fleets_with_partial_last_slots_match_the_reference_and_an_independent_solve(
    fleet: dict[str, object],
) -> None:
    """The fast path's shortfall and money optima equal the cvxpy reference's and scipy's from
    the departure minutes; the plan keeps every constraint, no car gets more in its last slot
    than full power until it leaves, and its setpoints deliver that by the departure within
    the head-room."""
    departures = list(fleet["departures_min"])  # type: ignore[call-overload]
    now_min = int(fleet["now_min"])  # type: ignore[call-overload]
    soc = list(fleet["soc"])  # type: ignore[call-overload]
    target = list(fleet["target_kwh"])  # type: ignore[call-overload]
    prices = list(fleet["prices"])  # type: ignore[call-overload]
    headroom = float(fleet["headroom_kw"])  # type: ignore[arg-type]
    n = len(departures)
    events: list[object] = [
        *small_site(T0, cars=n),
        flat_headroom(T0, T0, headroom),
        PriceUpdated(event_id="p", at=T0, start=T0, price_eur_per_kwh=tuple(prices)),
    ]
    state = _fold(events)

    vehicles = {
        f"ev-{k + 1}": replace(state.vehicles[f"ev-{k + 1}"], energy_kwh=60.0 * soc[k])
        for k in range(n)
    }
    state = replace(state, vehicles=vehicles)
    for k in range(n):
        state = apply_event(
            state, _leaving(f"ev-{k + 1}", T0 + timedelta(minutes=departures[k]), target[k])
        ).state
    now = T0 + timedelta(minutes=now_min)
    problem, starts = build_problem(state, now, SHORT)
    # The problem's cars are in vehicle-id order: ev-1..ev-4.
    assert problem.vehicle_ids == tuple(f"ev-{k + 1}" for k in range(n))

    fast = FAST.solve(problem, PATIENT)
    reference = solve_reference(problem)
    shortfall, money = _independent_optima(
        departures, now_min, [60.0 * s for s in soc], target, prices, headroom, SHORT.horizon_slots
    )
    for stage, independent in (("stage_shortfall_kwh", shortfall), ("stage_cost_eur", money)):
        assert close(fast.details[stage], reference.details[stage]), stage
        assert close(fast.details[stage], independent, rel=1e-5), (stage, independent)
    assert_valid(problem, fast)

    plan = make_plan(state, problem, starts, fast)
    net = np.array([s.kw for s in plan.setpoints])
    assert plan.headroom_kw == pytest.approx([headroom] * problem.n_slots)
    assert np.all(net.sum(axis=0) <= headroom + 1e-6)
    for i in range(n):
        last = int(problem.departure_slot[i]) - 1
        if last < 0:
            continue
        a = now_min if last == 0 else 15 * last
        there_h = (min(15 * (last + 1), departures[i]) - a) / 60.0
        assert fast.charge_kw[i, last] * problem.dt_h[last] <= LIMIT_KW * there_h + 1e-9
        # The setpoint held while the car is there gives the planned energy (the head-room
        # for it was kept).
        delivered = net[i, last] * there_h
        assert delivered == pytest.approx(fast.charge_kw[i, last] * problem.dt_h[last], abs=1e-9)
        assert net[i, last] <= LIMIT_KW + 1e-9


def test_a_share_too_short_for_the_minimum_rate_is_not_planned() -> None:
    """Leaving 1 minute into a slot (below half of it; 11 kW over it would also average
    0.73 kW, below the charger's 4.14 kW minimum): the car keeps its whole slots only."""
    state = _fold(
        [
            *small_site(T0, cars=1),
            flat_headroom(T0, T0, 30.0),
            _leaving("ev-1", T0 + timedelta(minutes=46), 40.0),
        ]
    )
    problem, _ = build_problem(state, T0, SHORT)
    assert problem.departure_slot[0] == 3
    assert problem.upper_kw[0, :3].tolist() == pytest.approx([LIMIT_KW] * 3)
    assert problem.upper_kw[0, 3] == 0.0


@pytest.mark.parametrize("now_min", [31, 38])
def test_the_slot_a_plan_counted_on_stays_planned_when_it_begins(now_min: int) -> None:
    """ev-1 leaves at 16:40, two thirds into its slot: planned there from 16:00, and still at
    16:31 and 16:38, when the slot is the current one and only 9 (2) of its 14 (7) minutes are
    left: the bound is 11 kW times that share, and so is its only slot's minimum rate (4.14 kW
    while it runs, on average over what is left)."""
    state = _fold(
        [
            *small_site(T0, cars=1),
            flat_headroom(T0, T0, 30.0),
            _leaving("ev-1", T0 + timedelta(minutes=40), 40.0),
        ]
    )
    early, _ = build_problem(state, T0, SHORT)
    assert early.departure_slot[0] == 3
    assert early.upper_kw[0, 2] == pytest.approx(LIMIT_KW * 2 / 3)
    problem, _ = build_problem(state, T0 + timedelta(minutes=now_min), SHORT)
    share = (40 - now_min) / (45 - now_min)
    assert problem.departure_slot[0] == 1
    assert problem.upper_kw[0, 0] == pytest.approx(LIMIT_KW * share)
    assert problem.min_kw[0] == pytest.approx(4.14 * share)
    schedule = FastSolver().solve(problem, PATIENT)
    assert schedule.charge_kw[0, 0] == pytest.approx(LIMIT_KW * share)  # it wants more


def test_by_default_a_car_is_planned_on_whole_slots() -> None:
    """`PlanningSettings.partial_last_slot` is off by default: leaving at 16:44 gives the car
    the slots to 16:30 only, and the plan's head-room is the problem's."""
    state = _fold(
        [
            *small_site(T0, cars=1),
            flat_headroom(T0, T0, 30.0),
            _leaving("ev-1", T0 + timedelta(minutes=44), 40.0),
        ]
    )
    problem, starts = build_problem(state, T0, PlanningSettings(horizon_slots=16))
    assert problem.departure_slot[0] == 2
    assert problem.upper_kw[0, 2] == 0.0
    assert problem.headroom_kw.tolist() == pytest.approx([30.0] * 16)
    plan = make_plan(state, problem, starts, FastSolver().solve(problem, PATIENT))
    assert plan.headroom_kw == pytest.approx([30.0] * 16)
