"""The compact cvxpy/ECOS form: the textbook's and the fast path's optimum, compiled once."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.optimiser import (
    FastSolver,
    OptimiserOptions,
    solve_reference,
    solve_reference_compact,
)
from controller.optimiser.reference_compact import (
    CompactFormUnsupported,
    cache_info,
    cached_structure,
    forget_compiled,
)
from controller.planning.problem import PlanningProblem
from tests.optimiser.checks import TOL, assert_valid, close, money_of, problem, violations
from tests.optimiser.test_properties import problems

PATIENT = OptimiserOptions(time_limit_s=60.0)
MONEY = OptimiserOptions(peak_flattening=False, min_rate_repair=False, time_limit_s=60.0)
FAST = FastSolver()  # one solver across examples, as in the other property tests
SEEN: Counter[str] = Counter()
EXAMPLES = 40


def _two_cars() -> PlanningProblem:
    """Two cars need one full slot each; the cheap slot has room for one."""
    return problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[11, 11], [11, 11]],
        energy_kwh=[10, 10],
        capacity_kwh=[50, 50],
        target_kwh=[12.75, 12.75],
        price=[0.10, 0.30],
        headroom_kw=[11, 22],
    )


def test_two_cars_one_slot_of_headroom() -> None:
    """One slot each, the hand-computed money and the head-room price of the cheap slot."""
    p = _two_cars()
    s = solve_reference_compact(p)
    assert_valid(p, s)
    assert s.status == "optimal"
    assert s.solver == "cvxpy-ecos-compact"
    assert s.charge_kw.sum(axis=0) == pytest.approx([11, 11], abs=1e-5)
    assert s.cost_eur == pytest.approx(11 * 0.25 * 0.10 + 11 * 0.25 * 0.30, abs=1e-6)
    assert money_of(p, s) == pytest.approx(s.cost_eur, abs=1e-9)
    # One more kW in the cheap slot saves (0.30 - 0.10) EUR/kWh for a quarter hour.
    assert s.headroom_price_eur_per_kw is not None
    assert s.headroom_price_eur_per_kw == pytest.approx([0.05, 0.0], abs=1e-5)


def test_efficiency_is_folded_into_the_demand() -> None:
    """eta 0.8: 2 kWh into the battery cost 2.5 kWh at the grid, in the cheaper slot."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[11, 11]],
        energy_kwh=[10],
        capacity_kwh=[50],
        target_kwh=[12],
        price=[0.20, 0.10],
        headroom_kw=[50, 50],
        eta_ch=[0.8],
    )
    s = solve_reference_compact(p)
    assert s.charge_kw == pytest.approx(np.array([[0.0, 10.0]]), abs=1e-5)
    assert s.cost_eur == pytest.approx(2.5 * 0.10, abs=1e-6)


def test_forced_power_is_a_constant_and_the_rest_goes_to_the_cheap_slot() -> None:
    """A force-charge in the dear slot covers 2.75 of 4 kWh; 1.25 kWh go to the cheap slot;
    the forced entry is no variable of the compact form and still in the plan and the money."""
    p = problem(
        dt_h=[0.25, 0.25, 0.25],
        upper_kw=[[11, 11, 11]],
        lower_kw=[[11, 0, 0]],
        energy_kwh=[10],
        capacity_kwh=[50],
        target_kwh=[14],
        price=[0.30, 0.20, 0.10],
        headroom_kw=[50, 50, 50],
    )
    s = solve_reference_compact(p)
    assert s.charge_kw == pytest.approx(np.array([[11.0, 0.0, 5.0]]), abs=1e-5)
    assert s.cost_eur == pytest.approx(2.75 * 0.30 + 1.25 * 0.10, abs=1e-6)
    structure = cached_structure(p)
    assert structure is not None
    assert structure.x.size == 2
    assert close(s.cost_eur, solve_reference(p).cost_eur, rel=1e-6)


def test_an_impossible_day_shares_the_shortfall_by_relative_size() -> None:
    """Head-room for 5.5 kWh, needs of 4 and 8 kWh: both miss the same share (6.5 / 12)."""
    p = problem(
        dt_h=[0.25, 0.25],
        upper_kw=[[11, 11], [22, 22]],
        energy_kwh=[10, 10],
        capacity_kwh=[50, 50],
        target_kwh=[14, 18],
        price=[0.10, 0.10],
        headroom_kw=[11, 11],
    )
    s = solve_reference_compact(p)
    assert s.status == "optimal_shortfall"
    assert s.details["stage_shortfall_kwh"] == pytest.approx(6.5, abs=1e-5)
    assert s.details["stage_max_relative_shortfall"] == pytest.approx(6.5 / 12, abs=1e-5)
    assert s.shortfall_kwh == pytest.approx([4 * 6.5 / 12, 8 * 6.5 / 12], abs=1e-4)
    assert_valid(p, s)


def test_a_fleet_that_may_discharge_is_refused_with_the_reason() -> None:
    """V2G needs the per-slot balance: the compact form says so instead of answering."""
    p = dataclasses.replace(
        _two_cars(),
        v2g=np.array([False, True]),
        max_discharge_kw=np.array([0.0, 11.0]),
        floor_kwh=np.array([0.0, 5.0]),
        export_limit_kw=20.0,
    )
    with pytest.raises(CompactFormUnsupported, match="1 car.*discharge"):
        solve_reference_compact(p)
    assert solve_reference(p).status == "optimal"  # the textbook reference covers it


def test_a_re_solve_reuses_the_compiled_structure_and_gives_the_new_optimum() -> None:
    """A car's SoC report and a price change load new parameters into the same compiled
    problems; the answers equal a fresh compile's and the fast path's."""
    forget_compiled()
    day = problem(
        dt_h=[0.25] * 6,
        upper_kw=[[11] * 6, [7.4] * 4 + [0, 0], [0, 11, 11, 11, 11, 11]],
        energy_kwh=[10, 20, 5],
        capacity_kwh=[40, 60, 40],
        target_kwh=[20, 24, 15],
        price=[0.30, 0.25, 0.12, 0.10, 0.18, 0.22],
        headroom_kw=[15, 15, 15, 20, 20, 20],
    )
    first = solve_reference_compact(day, PATIENT)
    structure = cached_structure(day)
    assert structure is not None
    assert all(stage.is_dpp() for stage in structure.stages)
    built = cache_info().builds
    energy = day.energy_kwh.copy()
    energy[1] += 2.0
    event = dataclasses.replace(day, energy_kwh=energy)
    repriced = dataclasses.replace(day, price_eur_per_kwh=day.price_eur_per_kwh[::-1].copy())
    answers = [solve_reference_compact(p, PATIENT) for p in (event, repriced)]
    assert cache_info().builds == built  # no new structure: only the parameters changed
    assert cached_structure(event) is structure
    assert cached_structure(repriced) is structure
    assert answers[1].details["stage_cost_eur"] != pytest.approx(first.details["stage_cost_eur"])
    forget_compiled()
    for p, reused in zip((event, repriced), answers, strict=True):
        fresh = solve_reference_compact(p, PATIENT)
        fast = FastSolver().solve(p, PATIENT)
        for stage in ("stage_cost_eur", "stage_peak_kw"):
            assert close(reused.details[stage], fresh.details[stage], rel=1e-6), stage
            assert close(reused.details[stage], fast.details[stage], rel=1e-6), stage
        assert_valid(p, reused)
    assert cache_info().builds == built + 1  # forgotten, then built once for both


def _without_discharge(p: PlanningProblem, squeeze: bool) -> PlanningProblem:
    """The fleet with V2G switched off, and (`squeeze`) a quarter of its head-room, so that
    about half the examples cannot meet every target."""
    headroom = p.headroom_kw * 0.25 if squeeze else p.headroom_kw
    return dataclasses.replace(p, v2g=np.zeros(p.n_vehicles, dtype=bool), headroom_kw=headroom)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(p=st.builds(_without_discharge, problems(), st.booleans()), full=st.booleans())
def test_random_fleets_have_the_textbook_and_the_fast_optimum(
    p: PlanningProblem, full: bool
) -> None:
    """Random fleets without discharge (windows, pauses, forced slots, negative prices, too
    little or negative head-room, demand charges): same verdict, same optimum of every stage,
    every constraint by numpy."""
    options = PATIENT if full else MONEY
    compact = solve_reference_compact(p, options)
    textbook = solve_reference(p, options)
    fast = FAST.solve(p, dataclasses.replace(options, min_rate_repair=False))
    SEEN["feasible" if compact.status == "optimal" else "shortfall"] += 1
    SEEN["full" if full else "money"] += 1
    SEEN["forced" if p.lower_kw.any() else "unforced"] += 1
    for other in (textbook, fast):
        assert compact.status == other.status, other.solver
        for stage in ("stage_shortfall_kwh", "stage_cost_eur"):
            assert close(compact.details[stage], other.details[stage]), (stage, other.solver)
        # Stages that sit on an earlier stage's slack (1e-7 of its optimum) agree to 1e-5.
        assert close(
            compact.details["stage_max_relative_shortfall"],
            other.details["stage_max_relative_shortfall"],
            rel=1e-5,
        ), other.solver
    if full:
        assert close(compact.details["stage_peak_kw"], textbook.details["stage_peak_kw"], 1e-5)
    assert_valid(p, compact, min_rate=False)
    if full:  # the min-rate repair ran: what it left is counted
        assert violations(p, compact)["charge_below_min"] == compact.details["min_rate_violations"]
    assert close(money_of(p, compact), compact.cost_eur, rel=1e-9)
    assert np.all(compact.shortfall_kwh <= np.maximum(0.0, p.target_kwh - p.energy_kwh) + TOL)


def test_zz_the_property_saw_feasible_and_impossible_fleets() -> None:
    """Print (and check) what the property's examples covered (run after it)."""
    if not SEEN:  # only meaningful when the property ran in this session
        return
    print("\ncompact cvxpy vs textbook vs fast:", dict(sorted(SEEN.items())))
    assert SEEN["feasible"] + SEEN["shortfall"] >= EXAMPLES // 2
    for kind in ("feasible", "shortfall", "full", "money"):
        assert SEEN[kind] >= 3, (kind, SEEN)


def test_an_empty_fleet_gets_an_empty_schedule() -> None:
    """No cars: nothing to compile, nothing to charge."""
    p = problem(
        dt_h=[0.25],
        upper_kw=[],
        energy_kwh=[],
        capacity_kwh=[],
        target_kwh=[],
        price=[0.1],
        headroom_kw=[10],
    )
    s = solve_reference_compact(p)
    assert s.charge_kw.shape == (0, 1)
    assert s.cost_eur == 0.0
