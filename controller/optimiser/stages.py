"""What every solver reports about the lexicographic stages, and the shared finishing step.

Both solvers (the fast path and the cvxpy reference) produce a `StageResult`: the LP's power plan
and the optimum of each stage. `finish` turns it into a `Schedule`: min-rate repair, money,
shortfalls with reasons, and the figures in `Schedule.details`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from controller.errors import VoltpoolError
from controller.optimiser.options import OptimiserOptions
from controller.optimiser.prepare import Prepared
from controller.optimiser.repair import repair_min_rate
from controller.optimiser.residual import lost_reasons, settle_residual
from controller.optimiser.rounding import Hints, round_slivers, slivers
from controller.optimiser.tiebreak import DIVE_ROUNDS, earliest_departures_first
from controller.planning.problem import (
    BoolArray,
    FloatArray,
    Schedule,
    money,
    schedule_from_power,
)


class OptimiserFailed(VoltpoolError):
    """A solver gave no usable answer (status, time limit); the caller falls back."""


@dataclass(slots=True, kw_only=True)
class StageResult:
    """The LP's answer and the optimum of each lexicographic stage."""

    charge_kw: FloatArray  # (N, T)
    discharge_kw: FloatArray  # (N, T)
    shortfall_kwh: float  # stage 1: least total shortfall (kWh) beyond what time rules out
    max_relative_shortfall: float  # stage 2: least largest relative shortfall (0..1)
    cost_eur: float  # stage 3: least money
    cost_stage_peak_kw: float  # peak import of the stage-3 plan
    cost_stage_ramp_kw: float  # sum of |g[t] - g[t-1]| of the stage-3 plan
    peak_kw: float  # stage 4: least peak among the cost-optimal plans (= stage 3's without it)
    ramp_kw: float  # stage 5: least ramping among those
    headroom_price_eur_per_kw: FloatArray  # (T,) dual of the site constraint in stage 3
    status: str  # "optimal" or "optimal_shortfall"
    solver: str
    solves: int = 0
    iterations: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        """Whether every car reaches the part of its target that time allows."""
        return self.status == "optimal"


def site_profile(charge_kw: FloatArray, discharge_kw: FloatArray) -> tuple[float, float]:
    """(peak import kW, sum of |slot-to-slot change| kW) of a plan."""
    net = charge_kw.sum(axis=0) - discharge_kw.sum(axis=0)
    return float(max(0.0, net.max(initial=0.0))), float(np.abs(np.diff(net)).sum())


def clean(values: FloatArray, upper: FloatArray) -> FloatArray:
    """Clip an LP's values into [0, upper] and zero the solver's round-off."""
    result: FloatArray = np.clip(values, 0.0, upper)
    result[result < 1e-9] = 0.0
    return result


def ordered_plan(
    prepared: Prepared,
    plan: tuple[FloatArray, FloatArray, dict[str, float]],
    options: OptimiserOptions,
    hints: Hints | None = None,
) -> tuple[FloatArray, FloatArray, dict[str, float]]:
    """The final `plan` re-assigned earliest departure first (`earliest_departures_first`)
    inside its slot and car totals, when `options.tiebreak`.

    With `options.min_rate_repair` the re-assigned plan's slivers are removed by the free moves
    of `round_slivers` (with the flow's dive for those they leave; what is still left goes to
    the greedy `repair_min_rate`), and the result is kept only if it is no worse than `plan` in
    anything a stage or the min-rate step ranks: no more slivers, no car with less battery
    energy, no more money, peak or ramping (each to `options.stage_tolerance`), the site within
    the head-room. Otherwise `plan` is returned (`tiebreak_kept` = 0,
    `tiebreak_min_rate_refused` = 1, `tiebreak_refused` the first check that failed, a
    `REFUSED_*` code). A plan whose min-rate step already lost energy gets one flow, no dive.
    Its figures (`tiebreak_*`) are added to the plan's.
    `hints`: the free moves' swaps of the last solve's tie-break (see `round_slivers`), tried
    first; they are the tie-break's own, apart from the min-rate step's.
    """
    charge, discharge, info = plan
    if not options.tiebreak or prepared.n_vehicles < 2:
        return plan
    started = time.perf_counter()
    settle = None
    if options.min_rate_repair:
        peak = site_profile(charge, discharge)[0]
        cap = np.minimum(prepared.headroom_kw, max(peak, 0.0))

        def settle(ordered: FloatArray) -> tuple[FloatArray, BoolArray]:
            rounded, _, _ = round_slivers(
                prepared, ordered, discharge, site_cap_kw=cap, hints=hints
            )
            return rounded, slivers(prepared, rounded, discharge)[0]

    # Where the min-rate step already lost energy (every slot a car could use is full), an
    # order whose slivers the free moves leave loses energy too and is refused; the dive's
    # flows would cost more than they win (the benchmark's over-subscribed day at 1,000 cars:
    # 0 of 20 kept after three flows, 170 ms each). Then one flow only.
    lossy = info.get("repair_dropped_kwh", 0.0) > 1e-9
    ordered, figures = earliest_departures_first(
        prepared,
        charge,
        discharge,
        settle=settle,
        order=options.tiebreak_order,
        rounds=1 if lossy else DIVE_ROUNDS,
    )
    if figures["tiebreak_kept"] and options.min_rate_repair:
        rounded = _no_worse(prepared, charge, discharge, ordered, options)
        refused = isinstance(rounded, int)
        figures["tiebreak_min_rate_refused"] = 1.0 if refused else 0.0
        figures["tiebreak_refused"] = float(rounded) if isinstance(rounded, int) else 0.0
        if refused:
            figures["tiebreak_kept"] = 0.0
        ordered = rounded if not isinstance(rounded, int) else charge
    if figures["tiebreak_kept"] and "min_rate_violations" in info:
        small_charge, small_discharge = slivers(prepared, ordered, discharge)
        figures["min_rate_violations"] = float(small_charge.sum() + small_discharge.sum())
    figures["tiebreak_s"] = time.perf_counter() - started
    return ordered, discharge, {**info, **figures}


# kW a re-ordered plan's site may pass the head-room (or the old plan's site) by: the free
# moves' own tolerance (1e-7 kW beyond their cap) plus round-off of the slot sums.
_SITE_TOL_KW = 1e-6
# Why `_no_worse` refused an order (`details["tiebreak_refused"]`).
REFUSED_SLIVERS, REFUSED_ENERGY, REFUSED_SITE, REFUSED_MONEY, REFUSED_PEAK, REFUSED_RAMP = range(
    1, 7
)


def _no_worse(
    prepared: Prepared,
    charge: FloatArray,
    discharge: FloatArray,
    ordered: FloatArray,
    options: OptimiserOptions,
) -> FloatArray | int:
    """`ordered` (slivers already settled by free moves where they could be) after the greedy
    repair of what is left, or why that is worse than `charge` (a `REFUSED_*` code; see
    `ordered_plan`)."""
    problem = prepared.problem
    peak, ramp = site_profile(charge, discharge)
    new = ordered
    if slivers(prepared, new, discharge)[0].any():
        new, new_discharge, _ = repair_min_rate(prepared, new, discharge)
        if not np.array_equal(new_discharge, discharge):
            return REFUSED_SLIVERS
    if slivers(prepared, new, discharge)[0].sum() > slivers(prepared, charge, discharge)[0].sum():
        return REFUSED_SLIVERS
    if np.any(_gain_kwh(prepared, new) < _gain_kwh(prepared, charge) - 1e-6):
        return REFUSED_ENERGY
    new_peak, new_ramp = site_profile(new, discharge)
    site = new.sum(axis=0) - discharge.sum(axis=0)
    old_site = charge.sum(axis=0) - discharge.sum(axis=0)
    if np.any(site > np.maximum(prepared.headroom_kw, old_site) + _SITE_TOL_KW):
        return REFUSED_SITE
    old_money = sum(money(problem, charge, discharge))
    if sum(money(problem, new, discharge)) > old_money + options.slack(old_money):
        return REFUSED_MONEY
    if new_peak > peak + options.slack(peak):
        return REFUSED_PEAK
    if new_ramp > ramp + options.slack(ramp):
        return REFUSED_RAMP
    return new


def _gain_kwh(prepared: Prepared, charge: FloatArray) -> FloatArray:
    """(N,) battery kWh each car gains from `charge` before it leaves."""
    problem = prepared.problem
    delta = problem.eta_ch[:, None] * charge * problem.dt_h[None, :]
    result: FloatArray = np.where(prepared.available, delta, 0.0).sum(axis=1)
    return result


def min_rate_plan(
    prepared: Prepared,
    charge_kw: FloatArray,
    discharge_kw: FloatArray,
    options: OptimiserOptions,
    hints: Hints | None = None,
    *,
    mip: bool = True,
    time_limit_s: float | None = None,
) -> tuple[FloatArray, FloatArray, dict[str, float]]:
    """(charge, discharge, figures): the free moves of `round_slivers`, then the greedy
    `repair_min_rate` for what they leave, then (with `mip`) `settle_plan`.

    `repair_dropped_kwh` is the battery energy the plan gives the cars less than the LP did
    (capped at their need; `min_rate_lost_*` says why), `repair_greedy_dropped_kwh` what the
    greedy repair alone dropped.
    """
    problem = prepared.problem
    cap = prepared.headroom_kw
    if options.peak_flattening or problem.demand_charge_eur_per_kw > 0.0:
        peak = site_profile(charge_kw, discharge_kw)[0]
        cap = np.minimum(cap, peak)  # keep the second stage's peak (and the demand charge)
    charge, discharge, rounding_info = round_slivers(
        prepared, charge_kw, discharge_kw, site_cap_kw=cap, hints=hints
    )
    if rounding_info["rounding_left"] > 0.0:
        charge, discharge, repair_info = repair_min_rate(prepared, charge, discharge)
    else:
        repair_info = dict.fromkeys(
            ("repair_cars", "repair_moves", "repair_dropped_kwh", "min_rate_violations"), 0.0
        )
    repair_info.update(rounding_info)
    repair_info["repair_greedy_dropped_kwh"] = repair_info["repair_dropped_kwh"]
    if rounding_info["rounding_left"] > 0.0:
        reasons = lost_reasons(prepared, charge_kw, charge, discharge)
    else:  # the free moves keep every car's energy
        reasons = dict.fromkeys(
            ("min_rate_lost_kwh", "min_rate_lost_cars", "min_rate_lost_below_one_slot_kwh"), 0.0
        )
    repair_info.update(reasons)
    repair_info["repair_dropped_kwh"] = reasons["min_rate_lost_kwh"]
    plan = (charge, discharge, repair_info)
    if mip:
        plan = settle_plan(prepared, charge_kw, plan, options, time_limit_s=time_limit_s)
    return plan


def settle_plan(
    prepared: Prepared,
    lp_charge_kw: FloatArray,
    plan: tuple[FloatArray, FloatArray, dict[str, float]],
    options: OptimiserOptions,
    *,
    time_limit_s: float | None = None,
) -> tuple[FloatArray, FloatArray, dict[str, float]]:
    """The min-rate `plan` after the exact `settle_residual` MIP, if it loses energy a car
    needs (within `options.min_rate_mip_s` and `time_limit_s`, default the options' budget)."""
    charge, discharge, info = plan
    if "repair_lp_round" in info:  # its figures are against the round's LP: against ours
        info = {**info, **lost_reasons(prepared, lp_charge_kw, charge, discharge)}
        info["repair_dropped_kwh"] = info["min_rate_lost_kwh"]
        plan = (charge, discharge, info)
    if info["min_rate_lost_kwh"] <= 0.0:
        return plan
    limit = options.time_limit_s if time_limit_s is None else time_limit_s
    limit = min(limit, options.min_rate_mip_s)
    charge, mip_info = settle_residual(
        prepared, lp_charge_kw, charge, discharge, time_limit_s=limit, dive=options.min_rate_dive
    )
    info = {**info, **mip_info}
    if mip_info.get("repair_mip_kept"):
        small_charge, small_discharge = slivers(prepared, charge, discharge)
        info["min_rate_violations"] = float(small_charge.sum() + small_discharge.sum())
        reasons = lost_reasons(prepared, lp_charge_kw, charge, discharge)
        info.update(reasons)
        info["repair_dropped_kwh"] = reasons["min_rate_lost_kwh"]
    return charge, discharge, info


def _shortfalls(prepared: Prepared, charge: FloatArray, discharge: FloatArray) -> FloatArray:
    """(N,) kWh each car misses at departure: `shortfalls` of the plan's trajectory, from one
    masked sum (no (N, T+1) trajectory)."""
    problem = prepared.problem
    delta = problem.eta_ch[:, None] * charge
    if prepared.any_v2g:
        delta = delta - discharge / problem.eta_dis[:, None]
    gained = np.where(prepared.available, delta, 0.0) @ problem.dt_h
    result: FloatArray = np.maximum(0.0, problem.target_kwh - problem.energy_kwh - gained)
    return result


def finish(
    prepared: Prepared,
    result: StageResult,
    options: OptimiserOptions,
    *,
    elapsed_s: float,
    hints: Hints | None = None,
    repaired: tuple[FloatArray, FloatArray, dict[str, float]] | None = None,
    tiebreak_hints: Hints | None = None,
) -> Schedule:
    """The `Schedule` of an LP answer, with every figure in `details`.

    With `options.min_rate_repair` the LP's plan is made one a charger can follow: first by
    the free moves of `round_slivers` (same money, same site profile or, within a car, a site
    no higher than the plan's peak), then what is left by the greedy `repair_min_rate`.
    `hints` carry the swaps that worked from one solve to the next (see `round_slivers`);
    `tiebreak_hints` those of the earliest-departure tie-break (`ordered_plan`), which runs last.
    """
    problem = prepared.problem
    lp_charge, lp_discharge = result.charge_kw, result.discharge_kw
    bought, sold, worn, demand = money(problem, lp_charge, lp_discharge)
    lp_money = bought - sold + worn + demand
    charge, discharge = lp_charge, lp_discharge
    repair_info: dict[str, float] = {}
    if repaired is not None:
        charge, discharge, repair_info = repaired
    elif options.min_rate_repair:
        charge, discharge, repair_info = min_rate_plan(
            prepared, lp_charge, lp_discharge, options, hints
        )
    ordering = time.perf_counter()
    charge, discharge, repair_info = ordered_plan(
        prepared, (charge, discharge, repair_info), options, tiebreak_hints
    )
    elapsed_s += time.perf_counter() - ordering  # the order is part of the solve
    lp_short = _shortfalls(prepared, lp_charge, lp_discharge)
    schedule = schedule_from_power(
        problem,
        charge,
        discharge,
        strategy="managed",
        solver=result.solver,
        status=result.status,
        solve_time_s=elapsed_s,
    )
    peak, ramp = site_profile(charge, discharge)
    simultaneous = float((np.minimum(charge, discharge) * problem.dt_h[None, :]).sum())
    details = {
        "stage_shortfall_kwh": result.shortfall_kwh,
        "stage_max_relative_shortfall": result.max_relative_shortfall,
        "stage_cost_eur": result.cost_eur,
        "stage_cost_peak_kw": result.cost_stage_peak_kw,
        "stage_cost_ramp_kw": result.cost_stage_ramp_kw,
        "stage_peak_kw": result.peak_kw,
        "stage_ramp_kw": result.ramp_kw,
        "lp_cost_eur": lp_money,
        "repair_cost_eur": schedule.cost_eur - lp_money,
        "repair_shortfall_kwh": float(schedule.shortfall_kwh.sum() - lp_short.sum()),
        "peak_kw": peak,
        "ramp_kw": ramp,
        "shortfall_kwh": float(schedule.shortfall_kwh.sum()),
        "time_shortfall_kwh": float(prepared.time_shortfall_kwh.sum()),
        "penalty_eur": options.shortfall_penalty_eur_per_kwh * float(schedule.shortfall_kwh.sum()),
        "forced_clipped_kwh": prepared.forced_clipped_kwh,
        "headroom_deficit_kw": prepared.headroom_deficit_kw,
        "simultaneous_kwh": simultaneous,
        "feasible": 1.0 if result.feasible else 0.0,
        "lp_solves": float(result.solves),
        "simplex_iterations": float(result.iterations),
        **repair_info,
        **result.extra,
    }
    return dataclasses.replace(
        schedule, headroom_price_eur_per_kw=result.headroom_price_eur_per_kw, details=details
    )
