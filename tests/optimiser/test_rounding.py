"""The min-rate rounding's free moves, by hand and on random LP plans; the solve's time budget."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from controller.optimiser import FastSolver, OptimiserFailed, OptimiserOptions
from controller.optimiser.prepare import prepare
from controller.optimiser.rounding import round_slivers
from controller.planning.problem import FloatArray, PlanningProblem, Schedule
from tests.optimiser.checks import TOL, assert_valid, money_of, problem, violations
from tests.optimiser.test_properties import problems


def _rounded(
    p: PlanningProblem,
    charge: list[list[float]],
    discharge: list[list[float]] | None = None,
    cap: list[float] | None = None,
) -> tuple[FloatArray, FloatArray, dict[str, float]]:
    prepared = prepare(p)
    charge_kw = np.array(charge, dtype=float)
    discharge_kw = np.zeros_like(charge_kw) if discharge is None else np.array(discharge)
    site_cap = prepared.headroom_kw if cap is None else np.array(cap, dtype=float)
    return round_slivers(prepared, charge_kw, discharge_kw, site_cap_kw=site_cap)


def _schedule(p: PlanningProblem, charge: FloatArray, discharge: FloatArray) -> Schedule:
    """A bare `Schedule` carrying a plan, for the plain-numpy checks."""
    from controller.planning.problem import schedule_from_power

    return schedule_from_power(
        p, charge, discharge, strategy="managed", solver="test", status="optimal", solve_time_s=0.0
    )


def test_a_sliver_is_lifted_by_a_swap_with_a_running_car() -> None:
    """Both slots are full: ev-0's 2 kW becomes 4 kW, ev-1 gives 2 kW there and takes it back."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[11, 11], [11, 11]],
        energy_kwh=[0, 0],
        capacity_kwh=[60, 60],
        target_kwh=[13 * 0.25, 16 * 0.25],
        price=[0.1, 0.3],
        headroom_kw=[13, 16],
        min_kw=[4, 4],
    )
    charge, discharge, info = _rounded(p, [[2, 11], [11, 5]])
    assert charge == pytest.approx(np.array([[4, 9], [9, 7]]), abs=1e-12)
    assert info == {"rounding_moves": 1.0, "rounding_left": 0.0}
    rounded = _schedule(p, charge, discharge)
    assert_valid(p, rounded)
    assert money_of(p, rounded) == pytest.approx(0.25 * (0.1 * 13 + 0.3 * 16), abs=1e-12)


def test_a_small_sliver_is_merged_into_a_partner_with_room() -> None:
    """No car can give 3 kW in slot 0 and take it back: ev-1 takes ev-0's 1 kW instead."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[11, 11], [11, 11]],
        energy_kwh=[0, 0],
        capacity_kwh=[60, 60],
        target_kwh=[7 * 0.25, 20 * 0.25],
        price=[0.1, 0.1],
        headroom_kw=[11, 16],
        min_kw=[4, 4],
    )
    charge, _, info = _rounded(p, [[1, 6], [10, 10]])
    assert charge == pytest.approx(np.array([[0, 7], [11, 9]]), abs=1e-12)
    assert info["rounding_left"] == 0.0


def test_a_car_alone_merges_its_sliver_into_its_own_slot_where_the_site_has_room() -> None:
    """One car, room on the site: the 2 kW join its 5 kW slot of the same price."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[11, 11]],
        energy_kwh=[0],
        capacity_kwh=[60],
        target_kwh=[7 * 0.25],
        price=[0.2, 0.2],
        headroom_kw=[20, 20],
        min_kw=[4],
    )
    charge, _, info = _rounded(p, [[2, 5]])
    assert charge == pytest.approx(np.array([[0, 7]]), abs=1e-12)
    assert info["rounding_left"] == 0.0


def test_the_site_cap_keeps_the_peak() -> None:
    """The same car, but the plan's peak (5 kW) caps the site: 7 kW would raise it; the
    sliver is lifted to the minimum from the other slot instead (4 + 3)."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[11, 11]],
        energy_kwh=[0],
        capacity_kwh=[60],
        target_kwh=[7 * 0.25],
        price=[0.2, 0.2],
        headroom_kw=[20, 20],
        min_kw=[3],
    )
    charge, _, info = _rounded(p, [[2, 5]], cap=[5, 5])
    assert charge == pytest.approx(np.array([[3, 4]]), abs=1e-12)
    assert charge.sum(axis=0).max() <= 5.0 + 1e-12
    assert info["rounding_left"] == 0.0


def test_a_thin_discharge_is_gathered_into_whole_slots() -> None:
    """1 kW of V2G over six slots of one price, minimum 4 kW: 1.5 kWh fill one slot (the last)
    at 6 kW."""
    p = problem(
        dt_h=[0.25] * 6,
        upper_kw=[[11] * 6],
        energy_kwh=[40],
        capacity_kwh=[60],
        target_kwh=[30],
        price=[0.5] * 6,
        headroom_kw=[20] * 6,
        min_kw=[4],
        v2g=[True],
        max_discharge_kw=[11],
        floor_kwh=[10],
        export_limit_kw=20,
    )
    charge, discharge, info = _rounded(p, [[0] * 6], [[1] * 6])
    assert discharge == pytest.approx(np.array([[0, 0, 0, 0, 0, 6]]), abs=1e-12)
    assert info["rounding_left"] == 0.0
    before = _schedule(p, np.zeros((1, 6)), np.ones((1, 6)))
    after = _schedule(p, charge, discharge)
    assert_valid(p, after)
    assert money_of(p, after) == pytest.approx(money_of(p, before), abs=1e-12)


def test_a_sliver_without_any_free_move_is_left_and_counted() -> None:
    """One car, one slot: nothing to swap with, nowhere to merge."""
    p = problem(
        dt_h=[0.25],
        upper_kw=[[11]],
        energy_kwh=[0],
        capacity_kwh=[60],
        target_kwh=[0.5],
        price=[0.2],
        headroom_kw=[20],
        min_kw=[4],
    )
    charge, _, info = _rounded(p, [[2]])
    assert charge == pytest.approx(np.array([[2.0]]))
    assert info == {"rounding_moves": 0.0, "rounding_left": 1.0}


LP_ONLY = OptimiserOptions(min_rate_repair=False, time_limit_s=60.0)  # answers, not latency


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(p=problems())
def test_rounding_random_lp_plans_costs_nothing_and_keeps_every_constraint(
    p: PlanningProblem,
) -> None:
    """On the LP's own plans: money and shortfall unchanged (or lower), peak not raised, every
    constraint by plain numpy, every changed setpoint 0 or at least the minimum."""
    lp = FastSolver().solve(p, LP_ONLY)
    prepared = prepare(p)
    cap = np.minimum(prepared.headroom_kw, lp.peak_kw)
    charge, discharge, info = round_slivers(
        prepared, lp.charge_kw, lp.discharge_kw, site_cap_kw=cap
    )
    rounded = _schedule(p, charge, discharge)
    assert_valid(p, rounded, min_rate=False)
    assert money_of(p, rounded) <= money_of(p, lp) + 1e-9 * max(1.0, abs(money_of(p, lp)))
    assert rounded.shortfall_kwh.sum() <= lp.shortfall_kwh.sum() + 1e-9
    assert rounded.peak_kw <= lp.peak_kw + 1e-6
    minimum = p.min_kw[:, None]
    for before, after in ((lp.charge_kw, charge), (lp.discharge_kw, discharge)):
        moved = np.abs(after - before) > 1e-12
        assert np.all(
            (after[moved] <= TOL)
            | (after[moved] >= np.broadcast_to(minimum, after.shape)[moved] - TOL)
        )
    found = violations(p, rounded)
    assert found["charge_below_min"] + found["discharge_below_min"] == info["rounding_left"]


# -- the time budget of a whole solve -----------------------------------------------------------


class SteppingClock:
    """A clock that moves one second each time it is read: the solve's own time is not used."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        value = self.now
        self.now += 1.0
        return value


def _day() -> PlanningProblem:
    return problem(
        dt_h=[0.25] * 4,
        upper_kw=[[11] * 4, [11] * 4],
        energy_kwh=[0, 0],
        capacity_kwh=[60, 60],
        target_kwh=[3, 3],
        price=[0.1, 0.1, 0.1, 0.1],
        headroom_kw=[40] * 4,
        min_kw=[4.14, 4.14],
    )


def _outcome(budget_s: float) -> Schedule | None:
    solver = FastSolver(clock=SteppingClock())
    try:
        return solver.solve(_day(), OptimiserOptions(time_limit_s=budget_s))
    except OptimiserFailed:
        return None


def _kind(schedule: Schedule | None) -> str:
    if schedule is None:
        return "failed"
    for stage in ("peak", "ramp"):
        if schedule.details.get(f"{stage}_stage_skipped"):
            return f"{stage} skipped"
    return "full"


KINDS = ["failed", "peak skipped", "ramp skipped", "full"]


def test_the_budget_covers_the_whole_solve_and_skips_the_second_stage_first() -> None:
    """Growing budgets: first no plan at all (the money stage does not fit), then the money
    plan with the second stage skipped and reported, then the peak stage's plan without the
    ramps, then the full plan; never the reverse."""
    full = FastSolver().solve(_day(), OptimiserOptions(time_limit_s=60.0))
    outcomes = [_outcome(budget + 0.5) for budget in range(12)]
    kinds = [_kind(s) for s in outcomes]
    assert kinds == sorted(kinds, key=KINDS.index), kinds
    assert set(KINDS) <= set(kinds), kinds
    for schedule, kind in zip(outcomes, kinds, strict=True):
        if schedule is None:
            continue
        assert_valid(_day(), schedule)
        assert schedule.details["stage_cost_eur"] == pytest.approx(
            full.details["stage_cost_eur"], abs=1e-9
        )
        assert (schedule.details.get("second_stage_skipped", 0.0) == 1.0) == (kind != "full")
        if kind == "peak skipped":  # the money stage's plan, reported as such
            assert schedule.details["stage_peak_kw"] == schedule.details["stage_cost_peak_kw"]
            assert schedule.details["stage_cost_peak_kw"] > 6.0 + 1e-6
        else:
            assert schedule.details["stage_peak_kw"] == pytest.approx(6.0, abs=1e-6)


def test_a_warm_start_slower_than_a_cold_one_is_abandoned() -> None:
    """The clock makes every warm start look endless: the solve starts afresh and says so."""
    solver = FastSolver(clock=SteppingClock())
    options = OptimiserOptions(time_limit_s=1e6, peak_flattening=False)
    day = _day()
    solver.solve(day, options)  # cold: its money stage took two clock readings
    solver._cold = (solver._cold or (0, 0.0))[0], 1e-9  # a cold start that took no time
    later = dataclasses.replace(day, energy_kwh=np.array([1.0, 0.0]))
    schedule = solver.solve(later, options)
    assert schedule.details["warm_start_abandoned"] == 1.0
    assert_valid(later, schedule)
