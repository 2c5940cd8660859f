"""Small cases whose optimum can be worked out by hand, on both solvers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from controller.errors import InvalidEvent
from controller.optimiser import FastSolver, OptimiserOptions, solve_reference
from controller.planning.problem import PlanningProblem, Schedule
from tests.optimiser.checks import assert_valid, money_of, problem

Solver = Callable[[PlanningProblem, OptimiserOptions | None], Schedule]


def _fast(p: PlanningProblem, options: OptimiserOptions | None = None) -> Schedule:
    # These cases check answers, not latency: a whole-solve budget a busy machine cannot spend.
    return FastSolver().solve(
        p, dataclasses.replace(options or OptimiserOptions(), time_limit_s=60.0)
    )


def _reference(p: PlanningProblem, options: OptimiserOptions | None = None) -> Schedule:
    return solve_reference(p, options)


SOLVERS = [pytest.param(_fast, id="fast"), pytest.param(_reference, id="reference")]


@pytest.mark.parametrize("solve", SOLVERS)
def test_two_cars_one_slot_of_headroom(solve: Solver) -> None:
    """Two cars need one full slot each; the cheap slot has room for one: one slot each."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[11, 11], [11, 11]],
        energy_kwh=[10, 10],
        capacity_kwh=[50, 50],
        target_kwh=[12.75, 12.75],
        price=[0.10, 0.30],
        headroom_kw=[11, 22],
    )
    s = solve(p, None)
    assert_valid(p, s)
    assert s.status == "optimal"
    assert s.charge_kw.sum(axis=0) == pytest.approx([11, 11], abs=1e-5)
    assert s.cost_eur == pytest.approx(11 * 0.25 * 0.10 + 11 * 0.25 * 0.30, abs=1e-6)
    assert money_of(p, s) == pytest.approx(s.cost_eur, abs=1e-9)
    assert s.shortfall_kwh == pytest.approx([0, 0], abs=1e-5)
    # One more kW in the cheap slot saves (0.30 - 0.10) EUR/kWh for a quarter hour.
    assert s.headroom_price_eur_per_kw is not None
    assert s.headroom_price_eur_per_kw == pytest.approx([0.05, 0.0], abs=1e-5)


@pytest.mark.parametrize("solve", SOLVERS)
def test_negative_price_charges_beyond_the_need_up_to_capacity(solve: Solver) -> None:
    """Paid to take power, the car fills its battery in that slot, past its target."""
    p = problem(
        dt_h=[0.25] * 4,
        upper_kw=[[10, 10, 10, 10]],
        energy_kwh=[20],
        capacity_kwh=[22],
        target_kwh=[21],
        price=[0.2, -0.1, 0.2, 0.2],
        headroom_kw=[100] * 4,
        eta_ch=[0.92],
    )
    s = solve(p, None)
    assert_valid(p, s)
    assert s.charge_kw[0] == pytest.approx([0, 2 / 0.92 / 0.25, 0, 0], abs=1e-5)
    assert s.energy_kwh[0, -1] == pytest.approx(22, abs=1e-5)
    assert s.cost_eur == pytest.approx(-0.1 * 2 / 0.92, abs=1e-6)


@pytest.mark.parametrize("solve", SOLVERS)
def test_an_impossible_day_shares_the_shortfall_in_proportion(solve: Solver) -> None:
    """15 kWh of head-room for needs of 10 and 20 kWh: each car misses half of its need."""
    p = problem(
        dt_h=[0.25] * 4,
        upper_kw=[[22] * 4, [22] * 4],
        energy_kwh=[0, 0],
        capacity_kwh=[60, 60],
        target_kwh=[10, 20],
        price=[0.1, 0.2, 0.3, 0.4],
        headroom_kw=[15] * 4,
    )
    s = solve(p, None)
    assert_valid(p, s)
    assert s.status == "optimal_shortfall"
    assert s.details["stage_shortfall_kwh"] == pytest.approx(15, abs=1e-5)
    assert s.details["stage_max_relative_shortfall"] == pytest.approx(0.5, abs=1e-5)
    assert s.shortfall_kwh == pytest.approx([5, 10], abs=1e-5)
    assert s.shortfall_reason == ("headroom", "headroom")


@pytest.mark.parametrize("solve", SOLVERS)
def test_a_target_out_of_reach_in_time_is_a_time_shortfall(solve: Solver) -> None:
    """Full power for the whole stay gives 5.5 kWh; the rest is missing for lack of time."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[11, 11]],
        energy_kwh=[0],
        capacity_kwh=[60],
        target_kwh=[10],
        price=[0.2, 0.1],
        headroom_kw=[100, 100],
    )
    s = solve(p, None)
    assert_valid(p, s)
    assert s.status == "optimal"  # everything time allows is delivered
    assert s.shortfall_kwh == pytest.approx([4.5], abs=1e-5)
    assert s.shortfall_reason == ("time",)
    assert s.details["time_shortfall_kwh"] == pytest.approx(4.5, abs=1e-5)


@pytest.mark.parametrize("solve", SOLVERS)
@pytest.mark.parametrize(("export_kw", "expected"), [(50.0, -0.8164), (5.0, -0.4082)])
def test_v2g_sells_in_the_expensive_slot_and_buys_back(
    solve: Solver, export_kw: float, expected: float
) -> None:
    """Discharge at 0.5 EUR/kWh, recharge the loss at 0.1: worth it after degradation."""
    p = problem(
        dt_h=[0.25] * 3,
        upper_kw=[[10, 10, 10]],
        energy_kwh=[40],
        capacity_kwh=[60],
        target_kwh=[40],
        price=[0.5, 0.1, 0.1],
        headroom_kw=[100] * 3,
        eta_ch=[0.9],
        eta_dis=[0.9],
        v2g=[True],
        max_discharge_kw=[10],
        floor_kwh=[10],
        export_limit_kw=export_kw,
        degradation_eur_per_kwh=0.05,
    )
    s = solve(p, None)
    assert_valid(p, s)
    sold = min(10.0, export_kw) * 0.25
    bought = sold / 0.81
    assert s.cost_eur == pytest.approx(-0.5 * sold + 0.05 * sold + 0.1 * bought, abs=1e-5)
    assert s.cost_eur == pytest.approx(expected, abs=1e-4)
    assert s.discharge_kw[0, 0] == pytest.approx(min(10.0, export_kw), abs=1e-5)
    assert s.energy_kwh[0, -1] == pytest.approx(40, abs=1e-5)
    no_v2g = solve(dataclasses.replace(p, v2g=np.zeros(1, dtype=bool)), None)
    assert s.cost_eur <= no_v2g.cost_eur + 1e-6
    assert no_v2g.cost_eur == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("solve", SOLVERS)
def test_demand_charge_flattens_the_import(solve: Solver) -> None:
    """At a flat price, a charge per kW of peak spreads 5 kWh evenly over the hour."""
    p = problem(
        dt_h=[0.25] * 4,
        upper_kw=[[11] * 4],
        energy_kwh=[0],
        capacity_kwh=[60],
        target_kwh=[5],
        price=[0.2] * 4,
        headroom_kw=[50] * 4,
        demand_charge_eur_per_kw=1.0,
    )
    s = solve(p, OptimiserOptions(peak_flattening=False))
    assert_valid(p, s)
    assert s.charge_kw[0] == pytest.approx([5, 5, 5, 5], abs=1e-5)
    assert s.demand_charge_eur == pytest.approx(5.0, abs=1e-5)
    assert s.cost_eur == pytest.approx(1.0 + 5.0, abs=1e-5)


@pytest.mark.parametrize("solve", SOLVERS)
def test_second_stage_lowers_the_peak_at_the_same_cost(solve: Solver) -> None:
    """Cheap night slots tie: the cost stage may fill one; the second stage spreads the load."""
    p = problem(
        dt_h=[0.25] * 4,
        upper_kw=[[11] * 4, [11] * 4],
        energy_kwh=[0, 0],
        capacity_kwh=[60, 60],
        target_kwh=[3, 3],
        price=[0.1, 0.1, 0.1, 0.1],
        headroom_kw=[40] * 4,
    )
    flat = solve(p, None)
    assert_valid(p, flat)
    assert flat.details["stage_peak_kw"] == pytest.approx(6.0, abs=1e-5)
    assert flat.details["stage_ramp_kw"] == pytest.approx(0.0, abs=1e-5)
    assert flat.peak_kw == pytest.approx(6.0, abs=1e-5)
    assert flat.details["stage_cost_peak_kw"] >= flat.details["stage_peak_kw"] - 1e-6
    assert flat.cost_eur == pytest.approx(0.6, abs=1e-5)


@pytest.mark.parametrize("solve", SOLVERS)
def test_force_charge_is_honoured_until_the_battery_is_full(solve: Solver) -> None:
    """Forced full power in an expensive slot; the battery only takes part of it."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[10, 10]],
        lower_kw=[[10, 0]],
        energy_kwh=[49],
        capacity_kwh=[50],
        target_kwh=[40],
        price=[0.9, 0.1],
        headroom_kw=[100, 100],
    )
    s = solve(p, None)
    assert_valid(p, s)
    assert s.charge_kw[0] == pytest.approx([4.0, 0.0], abs=1e-5)  # 1 kWh fills the battery
    assert s.details["forced_clipped_kwh"] == pytest.approx(1.5, abs=1e-5)


@pytest.mark.parametrize("solve", SOLVERS)
def test_min_rate_repair_leaves_no_setpoint_below_the_minimum(solve: Solver) -> None:
    """The LP wants 2 kW in the cheap slot (head-room); a charger can do 0 or >= 4.14 kW."""
    p = problem(
        dt_h=[0.25] * 3,
        upper_kw=[[11] * 3, [11] * 3],
        energy_kwh=[0, 0],
        capacity_kwh=[60, 60],
        target_kwh=[2.0, 2.5],
        price=[0.1, 0.2, 0.3],
        headroom_kw=[13, 40, 40],
        min_kw=[4.14, 4.14],
    )
    lp = solve(p, OptimiserOptions(min_rate_repair=False, peak_flattening=False))
    assert_valid(p, lp, min_rate=False)
    repaired = solve(p, None)
    assert_valid(p, repaired)
    assert repaired.details["min_rate_violations"] == 0
    assert repaired.cost_eur >= lp.cost_eur - 1e-9  # the LP is a bound no repair can beat
    assert repaired.details["repair_cost_eur"] == pytest.approx(
        repaired.cost_eur - repaired.details["lp_cost_eur"], abs=1e-9
    )
    assert repaired.shortfall_kwh == pytest.approx([0, 0], abs=1e-5)


@pytest.mark.parametrize("solve", SOLVERS)
def test_negative_headroom_stops_the_chargers_and_is_reported(solve: Solver) -> None:
    """Households alone exceed the connection: the chargers stop; the deficit is reported."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[11, 11]],
        energy_kwh=[10],
        capacity_kwh=[60],
        target_kwh=[12],
        price=[0.1, 0.2],
        headroom_kw=[-5, 20],
    )
    s = solve(p, None)
    assert_valid(p, s)
    assert s.charge_kw[0, 0] == 0.0
    assert s.details["headroom_deficit_kw"] == pytest.approx(5.0)
    assert s.shortfall_kwh == pytest.approx([0.0], abs=1e-5)


@pytest.mark.parametrize("solve", SOLVERS)
def test_a_car_leaving_now_gets_nothing(solve: Solver) -> None:
    """Departure slot 0: no power at all; its whole need is a time shortfall."""
    p = problem(
        dt_h=[0.1, 0.25],
        upper_kw=[[11, 11], [11, 11]],
        departure_slot=[0, 2],
        energy_kwh=[10, 10],
        capacity_kwh=[60, 60],
        target_kwh=[20, 11],
        price=[0.1, 0.2],
        headroom_kw=[50, 50],
    )
    s = solve(p, None)
    assert_valid(p, s)
    assert np.all(s.charge_kw[0] == 0.0)
    assert s.shortfall_kwh[0] == pytest.approx(10.0)
    assert s.shortfall_reason[0] == "time"
    assert s.shortfall_kwh[1] == pytest.approx(0.0, abs=1e-5)


def test_the_partial_first_slot_counts_its_own_length() -> None:
    """A first slot of 6 minutes holds 1.1 kWh at 11 kW, not 2.75."""
    p = problem(
        dt_h=[0.1, 0.25],
        upper_kw=[[11, 11]],
        energy_kwh=[10],
        capacity_kwh=[60],
        target_kwh=[11.1],
        price=[0.1, 0.5],
        headroom_kw=[50, 50],
    )
    s = _fast(p)
    assert_valid(p, s)
    assert s.charge_kw[0] == pytest.approx([11.0, 0.0], abs=1e-5)
    assert s.cost_eur == pytest.approx(0.11, abs=1e-9)


def test_an_empty_fleet_gives_an_empty_schedule() -> None:
    """No car plugged in: nothing to plan, and nothing fails."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[],
        energy_kwh=[],
        capacity_kwh=[],
        target_kwh=[],
        price=[0.1, 0.2],
        headroom_kw=[10, 10],
    )
    for s in (_fast(p), solve_reference(p)):
        assert s.charge_kw.shape == (0, 2)
        assert s.cost_eur == 0.0


def test_a_target_above_the_battery_is_refused_with_its_reason() -> None:
    """No schedule can put more into a battery than it holds: the problem is refused up front
    (naming the car), not left for a solver stage to fail on."""
    with pytest.raises(InvalidEvent, match="ev-1 target 61.000 kWh above its capacity 60.000"):
        problem(
            dt_h=[0.25],
            upper_kw=[[11], [11]],
            energy_kwh=[10, 10],
            capacity_kwh=[60, 60],
            target_kwh=[20, 61],
            price=[0.1],
            headroom_kw=[50],
        )
