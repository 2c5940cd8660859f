"""Earliest departures first (`controller/optimiser/tiebreak.py`): the tie-break among the
plans every stage finds optimal changes no optimum and serves earlier departures earlier."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import optimize, sparse

from controller.optimiser import FastSolver, OptimiserOptions, solve_reference
from controller.optimiser.prepare import prepare
from controller.optimiser.tiebreak import earliest_departures_first
from controller.planning.problem import FloatArray, PlanningProblem, Schedule
from tests.optimiser.checks import assert_valid, close, energy, money_of, problem

ON = OptimiserOptions(time_limit_s=60.0, warm_start=False)  # least laxity first (default)
EDF = OptimiserOptions(time_limit_s=60.0, warm_start=False, tiebreak_order="departure")
OFF = OptimiserOptions(time_limit_s=60.0, warm_start=False, tiebreak=False)
LP_ON = OptimiserOptions(time_limit_s=60.0, warm_start=False, min_rate_repair=False)
LP_EDF = OptimiserOptions(
    time_limit_s=60.0, warm_start=False, min_rate_repair=False, tiebreak_order="departure"
)
LP_OFF = OptimiserOptions(
    time_limit_s=60.0,
    warm_start=False,
    min_rate_repair=False,
    tiebreak=False,
)
STAGES = (
    "stage_shortfall_kwh",
    "stage_max_relative_shortfall",
    "stage_cost_eur",
    "stage_peak_kw",
    "stage_ramp_kw",
)


def departure_priority(p: PlanningProblem, charge: FloatArray) -> FloatArray:
    """(N,) earliest departure first: the earlier a car leaves, the higher."""
    del charge
    result: FloatArray = -p.departure_slot.astype(float)
    return result


def laxity_priority(p: PlanningProblem, charge: FloatArray) -> FloatArray:
    """(N,) least laxity first, as docs/optimiser.md states it: the latest slot a car could
    start at full power (its largest slot's grid kWh) and still get the larger of the plan's
    grid kWh and its need (target minus content, at most what full power reaches, over its
    efficiency), lst = d - e / full, clipped to 0..T, in quarter slots; the lower, the
    higher. (No forced cells.)"""
    present = np.arange(p.n_slots)[None, :] < p.departure_slot[:, None]
    cell = np.where(present, p.upper_kw, 0.0) * p.dt_h[None, :]
    reach = p.eta_ch * cell.sum(axis=1)
    need = np.maximum(np.minimum(p.target_kwh - p.energy_kwh, reach), 0.0) / p.eta_ch
    e = np.maximum((charge * p.dt_h[None, :]).sum(axis=1), need)
    full = np.maximum(cell.max(axis=1), 1e-9)
    latest = np.clip(p.departure_slot - e / full, 0.0, p.n_slots)
    result: FloatArray = -np.round(4.0 * latest)
    return result


def late_swaps(
    p: PlanningProblem, charge: FloatArray, priority: FloatArray | None = None
) -> list[tuple[int, int, int, int]]:
    """(i, j, t1, t2) where car i comes before car j (`priority`, default: it leaves
    earlier), i charges in t2 and j in t1 < t2, and both could trade (i has room in t1, j in
    t2, neither cell forced, i still there in t2): what a plan ordered by that priority never
    has. Plain numpy over the problem's arrays."""
    if priority is None:
        priority = departure_priority(p, charge)
    present = np.arange(p.n_slots)[None, :] < p.departure_slot[:, None]
    upper = np.where(present, p.upper_kw, 0.0)
    lower = np.where(present, np.minimum(p.lower_kw, p.upper_kw), 0.0)
    gives = charge > lower + 1e-6  # energy that could leave the cell
    takes = charge < upper - 1e-6  # room in the cell
    found = []
    n, t_count = charge.shape
    for i in range(n):
        for j in range(n):
            if priority[i] <= priority[j]:
                continue
            for t2 in range(t_count):
                if not (gives[i, t2] and takes[j, t2]):
                    continue
                for t1 in range(t2):
                    if gives[j, t1] and takes[i, t1]:
                        found.append((i, j, t1, t2))
    return found


def gained(p: PlanningProblem, s: Schedule) -> FloatArray:
    """(N,) battery kWh each car has at its departure (numpy, from the schedule's powers)."""
    e = energy(p, s)
    result: FloatArray = e[np.arange(p.n_vehicles), p.departure_slot]
    return result


def night(min_kw: float = 0.0) -> PlanningProblem:
    """Four slots of one price, room for one car at a time and all of it needed; car 1 leaves
    after slot 2 and needs one slot, car 0 stays and needs three: car 1 may take any of slots
    0-2 at the same money, peak and ramps; only slot 0 serves the earlier departure first.
    (Without the tie-break HiGHS gives car 1 slot 2, its last: the live day's deferral.)"""
    return problem(
        dt_h=[0.25] * 4,
        upper_kw=[[11.0] * 4, [11.0] * 4],
        departure_slot=[4, 3],
        energy_kwh=[10.0, 10.0],
        capacity_kwh=[60.0, 60.0],
        target_kwh=[18.25, 12.75],
        price=[0.2] * 4,
        headroom_kw=[11.0] * 4,
        min_kw=[min_kw, min_kw],
    )


@pytest.mark.parametrize("min_kw", [0.0, 4.14])
def test_the_earlier_departure_charges_first_on_a_flat_full_night(min_kw: float) -> None:
    """Car 1 (leaves first) charges in slot 0, car 0 in slots 1-3; same money as without."""
    p = night(min_kw)
    on = FastSolver().solve(p, EDF)
    off = FastSolver().solve(p, OFF)
    assert on.charge_kw[1] == pytest.approx([11.0, 0.0, 0.0, 0.0])
    assert on.charge_kw[0] == pytest.approx([0.0, 11.0, 11.0, 11.0])
    assert late_swaps(p, on.charge_kw) == []
    assert on.cost_eur == pytest.approx(off.cost_eur, abs=1e-9)
    assert gained(p, on) == pytest.approx(gained(p, off), abs=1e-9)
    assert_valid(p, on)


def test_three_cars_sharing_a_slot_are_served_by_departure() -> None:
    """Room for 16.5 kW, three 11 kW cars leaving at slots 2, 3, 4 that need 1, 1.5 and 1
    slot's energy: the plan is ordered by departure, each car as early as the others allow."""
    p = problem(
        dt_h=[0.25] * 4,
        upper_kw=[[11.0] * 4] * 3,
        departure_slot=[2, 3, 4],
        energy_kwh=[5.0] * 3,
        capacity_kwh=[60.0] * 3,
        target_kwh=[5.0 + 2.75, 5.0 + 4.125, 5.0 + 2.75],
        price=[0.3] * 4,
        headroom_kw=[16.5] * 4,
    )
    on = FastSolver().solve(p, LP_EDF)
    assert late_swaps(p, on.charge_kw) == []
    # The second stage spreads the 9.625 kWh evenly (9.625 kW a slot): slot 0 is car 0's alone.
    assert on.charge_kw[:, 0] == pytest.approx([9.625, 0.0, 0.0])
    assert gained(p, on) == pytest.approx(gained(p, FastSolver().solve(p, LP_OFF)), abs=1e-9)


def test_the_car_with_least_slack_charges_first() -> None:
    """Three cars leaving together after four slots, room for 16.5 kW: car 0 needs three
    full slots (its latest start: slot 1), car 1 two half slots' worth in each slot, car 2 one
    slot (latest start: slot 3). Least laxity first starts car 0 now and leaves car 2 for the
    last slot; money, peak and energies as without the tie-break. (Without it HiGHS starts car
    2 now and car 0 one slot late, with no slack left.)"""
    p = problem(
        dt_h=[0.25] * 4,
        upper_kw=[[11.0] * 4] * 3,
        departure_slot=[4, 4, 4],
        energy_kwh=[10.0] * 3,
        capacity_kwh=[60.0] * 3,
        target_kwh=[18.25, 15.5, 12.75],
        price=[0.2] * 4,
        headroom_kw=[16.5] * 4,
    )
    on = FastSolver().solve(p, ON)
    off = FastSolver().solve(p, OFF)
    assert on.charge_kw[0] == pytest.approx([11.0, 11.0, 11.0, 0.0])
    assert on.charge_kw[2] == pytest.approx([0.0, 0.0, 0.0, 11.0])
    assert late_swaps(p, on.charge_kw, laxity_priority(p, on.charge_kw)) == []
    assert on.cost_eur == pytest.approx(off.cost_eur, abs=1e-9)
    assert on.details["peak_kw"] == pytest.approx(off.details["peak_kw"], abs=1e-9)
    assert gained(p, on) == pytest.approx(gained(p, off), abs=1e-9)
    assert_valid(p, on)


@pytest.mark.parametrize("name", ["live_morning_0600", "live_night_0250"])
def test_the_live_days_recorded_plans_keep_every_optimum(name: str) -> None:
    """Two recorded re-plans of the live day (saturated, a shared shortfall): with the
    tie-break every stage optimum, the money, the peak and each car's energy are those of the
    plan without it and of the cvxpy reference; where it is kept, no late swap is left."""
    from tests.optimiser.test_min_rate_energy import _recorded

    p, _ = _recorded(name)
    on = FastSolver().solve(p, ON)
    off = FastSolver().solve(p, OFF)
    reference = solve_reference(p, OptimiserOptions(min_rate_repair=False))
    for stage in ("stage_shortfall_kwh", "stage_cost_eur"):
        assert close(on.details[stage], reference.details[stage], rel=1e-6)
    for stage in STAGES:
        assert on.details[stage] == off.details[stage]
    assert close(money_of(p, on), money_of(p, off), rel=1e-9)
    assert on.details["peak_kw"] <= off.details["peak_kw"] + 1e-7
    assert np.all(gained(p, on) >= gained(p, off) - 1e-6)
    assert_valid(p, on)
    lp = FastSolver().solve(p, LP_EDF)
    assert lp.details["tiebreak_kept"] == 1.0
    assert late_swaps(p, lp.charge_kw) == []
    lp = FastSolver().solve(p, LP_ON)
    assert lp.details["tiebreak_kept"] == 1.0
    assert late_swaps(p, lp.charge_kw, laxity_priority(p, lp.charge_kw)) == []


def _weights(p: PlanningProblem, charge: FloatArray, order: str) -> FloatArray:
    """(N,) the tie-break's priority weights as docs/optimiser.md states them (no forced
    cells): T + 1 - d_i, or 4 (T + 1 - lst_i) + 1 with lst_i in quarter slots."""
    if order == "departure":
        result: FloatArray = (p.n_slots + 1.0 - p.departure_slot).astype(np.float64)
        return result
    return 4.0 * (p.n_slots + 1) + 1.0 + laxity_priority(p, charge)


def _linprog_cost(p: PlanningProblem, charge: FloatArray, weight: FloatArray) -> float:
    """The least tie-break cost Σ (t+1) w_i x_it over plans with the totals of `charge`
    (every car movable, no forced cells), by scipy's linprog: an independent solve."""
    prepared = prepare(p)
    dt = p.dt_h
    cells = prepared.available & (prepared.upper_kw > 1e-9)
    cars, slots = np.nonzero(cells)
    e = charge * dt[None, :]
    n, t_count = charge.shape
    k = cars.size
    a_eq = sparse.vstack(
        [
            sparse.csr_matrix((np.ones(k), (cars, np.arange(k))), shape=(n, k)),
            sparse.csr_matrix((np.ones(k), (slots, np.arange(k))), shape=(t_count, k)),
        ]
    )
    b_eq = np.concatenate([e.sum(axis=1), e.sum(axis=0)])
    cost = (slots + 1.0) * weight[cars]
    bounds = np.stack([np.zeros(k), prepared.upper_kw[cars, slots] * dt[slots]], axis=1)
    result = optimize.linprog(cost, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    assert result.status == 0, result.message
    return float(result.fun)


@st.composite
def fleets(draw: st.DrawFn) -> PlanningProblem:
    """Small fleets without V2G: windows, pauses, a few force-charges, flat or stepped
    prices, head-rooms that bind, min rates."""
    n = draw(st.integers(2, 5))
    t = draw(st.integers(2, 8))
    upper = np.zeros((n, t))
    lower = np.zeros((n, t))
    departure = []
    for i in range(n):
        leave = draw(st.integers(1, t))
        departure.append(leave)
        upper[i, :leave] = draw(st.sampled_from([3.7, 7.4, 11.0]))
        if t > 2 and draw(st.integers(0, 3)) == 0:
            upper[i, draw(st.integers(0, t - 1))] = 0.0  # a pause
        if draw(st.integers(0, 6)) == 0:
            slot = draw(st.integers(0, t - 1))
            lower[i, slot] = upper[i, slot]  # a force-charge
    capacity = [float(draw(st.sampled_from([20, 40, 60]))) for _ in range(n)]
    content = [c * draw(st.integers(0, 6)) / 10 for c in capacity]
    target = [c * draw(st.integers(3, 10)) / 10 for c in capacity]
    flat = draw(st.booleans())
    price = [0.2] * t if flat else [draw(st.sampled_from([0.1, 0.2, 0.3])) for _ in range(t)]
    return problem(
        dt_h=[draw(st.sampled_from([0.25, 0.1]))] + [0.25] * (t - 1),
        upper_kw=upper.tolist(),
        lower_kw=lower.tolist(),
        departure_slot=departure,
        energy_kwh=content,
        capacity_kwh=capacity,
        target_kwh=target,
        price=price,
        headroom_kw=[float(draw(st.sampled_from([7.4, 11.0, 16.5, 30.0]))) for _ in range(t)],
        min_kw=[draw(st.sampled_from([0.0, 4.14])) for _ in range(n)],
        eta_ch=[draw(st.sampled_from([0.92, 1.0])) for _ in range(n)],
    )


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(p=fleets())
def test_random_fleets_keep_every_optimum_and_serve_by_priority(
    p: PlanningProblem,
) -> None:
    """On random small fleets: the stage optima with and without the tie-break are the same
    (and the reference's), the final plans have the same money, no higher peak or ramping, no
    car with less energy; the LP plan (no min-rate step) ordered either way has no late swap
    by its priority, and its tie-break cost is the least one scipy's linprog finds for the
    same totals."""
    on = FastSolver().solve(p, ON)
    off = FastSolver().solve(p, OFF)
    reference = solve_reference(p, OptimiserOptions(min_rate_repair=False))
    assert on.status == off.status == reference.status
    for stage in STAGES:
        assert on.details[stage] == off.details[stage], stage
    for stage in ("stage_shortfall_kwh", "stage_cost_eur"):
        assert close(on.details[stage], reference.details[stage], rel=1e-6), stage
    assert close(money_of(p, on), money_of(p, off), rel=1e-7)
    assert on.details["peak_kw"] <= off.details["peak_kw"] + 1e-6
    assert on.details["ramp_kw"] <= off.details["ramp_kw"] + 1e-6
    assert np.all(gained(p, on) >= gained(p, off) - 1e-6)
    assert_valid(p, on)

    lp_off = FastSolver().solve(p, LP_OFF)
    for options in (LP_ON, LP_EDF):
        lp_on = FastSolver().solve(p, options)
        assert np.allclose(lp_on.charge_kw.sum(axis=0), lp_off.charge_kw.sum(axis=0), atol=1e-6)
        assert np.allclose(gained(p, lp_on), gained(p, lp_off), atol=1e-6)
        assert close(money_of(p, lp_on), money_of(p, lp_off), rel=1e-7)
        assert_valid(p, lp_on, min_rate=False)
        if options.tiebreak_order == "departure":
            assert late_swaps(p, lp_on.charge_kw) == []
        if p.lower_kw.any() or not lp_on.details.get("tiebreak_kept"):
            continue
        if options.tiebreak_order == "laxity":
            priority = laxity_priority(p, lp_off.charge_kw)
            assert late_swaps(p, lp_on.charge_kw, priority) == []
        weight = _weights(p, lp_off.charge_kw, options.tiebreak_order)
        slots = np.arange(p.n_slots)[None, :]
        ours = float(((slots + 1.0) * weight[:, None] * lp_on.charge_kw * p.dt_h[None, :]).sum())
        best = _linprog_cost(p, lp_off.charge_kw, weight)
        assert ours == pytest.approx(best, rel=1e-7, abs=1e-6)


def test_cars_that_may_discharge_keep_their_plan() -> None:
    """A V2G car's plan is left as it is (its content matters in every slot); the others are
    re-assigned around it inside the same slot totals."""
    p = problem(
        dt_h=[0.25] * 4,
        upper_kw=[[11.0] * 4] * 3,
        departure_slot=[3, 4, 4],
        energy_kwh=[10.0, 10.0, 30.0],
        capacity_kwh=[60.0] * 3,
        target_kwh=[12.75, 15.5, 32.0],
        price=[0.2] * 4,
        headroom_kw=[22.0] * 4,
        v2g=[False, False, True],
        max_discharge_kw=[0.0, 0.0, 11.0],
        floor_kwh=[0.0, 0.0, 10.0],
    )
    s = FastSolver().solve(p, LP_OFF)
    prepared = prepare(p)
    ordered, info = earliest_departures_first(prepared, s.charge_kw, s.discharge_kw)
    assert ordered[2] == pytest.approx(s.charge_kw[2], abs=0.0)
    assert ordered.sum(axis=0) == pytest.approx(s.charge_kw.sum(axis=0), abs=1e-9)
    assert info["tiebreak_cars"] == 2.0
