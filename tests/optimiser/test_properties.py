"""Random fleets: the fast path and the cvxpy reference agree, and every constraint holds."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.optimiser import FastSolver, OptimiserOptions, solve_reference
from controller.planning.problem import PlanningProblem
from tests.optimiser.checks import TOL, assert_valid, close, money_of, problem, violations

RATES = [0.0, 3.7, 7.4, 11.0]


@st.composite
def problems(draw: st.DrawFn) -> PlanningProblem:
    """Small fleets with windows, pauses, forced slots, prices (also negative), head-rooms
    (also too small or negative), V2G cars, export limits, demand charges and min rates."""
    n = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6))
    dt0 = draw(st.sampled_from([0.25, 0.2, 0.1, 0.05]))
    upper = np.zeros((n, t))
    lower = np.zeros((n, t))
    departure = []
    for i in range(n):
        arrive = draw(st.integers(0, t))
        leave = draw(st.integers(arrive, t))
        departure.append(draw(st.sampled_from([leave, t])))
        rate = draw(st.sampled_from(RATES[1:]))
        upper[i, arrive:leave] = rate
        if t > 1 and draw(st.booleans()):
            upper[i, draw(st.integers(0, t - 1))] = 0.0  # a pause
        if draw(st.integers(0, 4)) == 0:
            slot = draw(st.integers(0, t - 1))
            lower[i, slot] = upper[i, slot]  # a force-charge
    capacity = [float(draw(st.sampled_from([20, 40, 60]))) for _ in range(n)]
    energy = [c * draw(st.integers(0, 10)) / 10 for c in capacity]
    target = [c * draw(st.integers(0, 10)) / 10 for c in capacity]
    price = [draw(st.integers(-20, 50)) / 100 for _ in range(t)]
    v2g = [draw(st.booleans()) for _ in range(n)]
    return problem(
        dt_h=[dt0] + [0.25] * (t - 1),
        upper_kw=upper.tolist(),
        lower_kw=lower.tolist(),
        departure_slot=departure,
        energy_kwh=energy,
        capacity_kwh=capacity,
        target_kwh=target,
        price=price,
        export_price=[p - draw(st.sampled_from([0.0, 0.02])) for p in price],
        headroom_kw=[float(draw(st.integers(-5, 40))) for _ in range(t)],
        min_kw=[draw(st.sampled_from([0.0, 4.14])) for _ in range(n)],
        eta_ch=[draw(st.sampled_from([0.85, 0.92, 1.0])) for _ in range(n)],
        eta_dis=[draw(st.sampled_from([0.85, 0.92, 1.0])) for _ in range(n)],
        v2g=v2g,
        max_discharge_kw=[draw(st.sampled_from(RATES[1:])) if v else 0.0 for v in v2g],
        floor_kwh=[0.2 * c for c in capacity],
        export_limit_kw=float(draw(st.sampled_from([0, 5, 20]))),
        degradation_eur_per_kwh=draw(st.sampled_from([0.0, 0.05])),
        demand_charge_eur_per_kw=draw(st.sampled_from([0.0, 0.0, 0.3])),
    )


FAST = FastSolver()  # one solver across examples: warm starts and re-mapped bases get exercised
# A whole solve's budget (time_limit_s) that a busy shared machine cannot run out of: this test
# is about answers, not latency.
PATIENT = OptimiserOptions(time_limit_s=60.0)


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(p=problems())
def test_fast_path_matches_the_reference_and_keeps_every_constraint(p: PlanningProblem) -> None:
    """Same verdict, same optimum of every stage (1e-6 relative), all constraints by numpy."""
    fast = FAST.solve(p, PATIENT)
    reference = solve_reference(p)
    # With the min-rate repair on, the fast path flattens the repaired plan; the pure LP's
    # second stage is what the reference computes.
    fast_lp = FAST.solve(p, OptimiserOptions(min_rate_repair=False, time_limit_s=60.0))
    assert fast.status == reference.status
    for stage in ("stage_shortfall_kwh", "stage_cost_eur"):
        assert close(fast.details[stage], reference.details[stage]), (
            stage,
            fast.details[stage],
            reference.details[stage],
        )
    # Stages that sit on an earlier stage's slack (1e-7 of its optimum) agree to 1e-5.
    assert close(
        fast.details["stage_max_relative_shortfall"],
        reference.details["stage_max_relative_shortfall"],
        rel=1e-5,
    )
    # When the money duals prove the peak, the fast path reports the exact face's peak; the
    # reference may spend its money slack to lower it by at most `peak_margin_kw`.
    peak_gap = fast_lp.details["stage_peak_kw"] - reference.details["stage_peak_kw"]
    assert close(
        fast_lp.details["stage_peak_kw"], reference.details["stage_peak_kw"], rel=1e-5
    ) or (0.0 <= peak_gap <= fast_lp.details.get("peak_margin_kw", 0.0) + 1e-6)
    assert close(fast_lp.details["stage_cost_eur"], reference.details["stage_cost_eur"])
    for schedule in (fast, reference):
        assert_valid(p, schedule, min_rate=False)
        found = violations(p, schedule)
        slivers = found["charge_below_min"] + found["discharge_below_min"]
        assert slivers == schedule.details["min_rate_violations"]
        # A charge sliver stays only where dropping it would take a V2G car below its floor.
        assert found["charge_below_min"] == 0 or p.v2g.any()
        assert money_of(p, schedule) == np.float64(schedule.cost_eur) or close(
            money_of(p, schedule), schedule.cost_eur, rel=1e-9
        )
        # Never worse than doing nothing: no car leaves short of min(arrival, target).
        assert np.all(schedule.shortfall_kwh <= np.maximum(0.0, p.target_kwh - p.energy_kwh) + TOL)
