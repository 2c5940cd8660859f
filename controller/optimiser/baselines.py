"""Baselines: what a fleet does without the optimiser, as `Schedule`s the reports can compare.

- `unmanaged`: every car charges at full power from plug-in until its battery is full (or it
  leaves), as plain chargers do. It ignores the head-room, like real unmanaged charging; the
  schedule reports by how much it breaks it (`details["headroom_violation_kw"]`,
  `details["overload_kwh"]`).
- `earliest_deadline_first` (EDF) and `least_laxity_first` (LLF): the two rule-based schedulers
  real charge-point managers use. In every slot they serve forced power first, then hand out the
  head-room car by car in priority order (departure; laxity = time left minus the time full
  power needs for the remaining need), each car up to what it still needs, never a setpoint
  between 0 and the charger's minimum. They know nothing of prices.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from controller.optimiser.prepare import Prepared, prepare
from controller.planning.problem import FloatArray, PlanningProblem, Schedule, schedule_from_power

_TOL = 1e-9


def unmanaged(problem: PlanningProblem, *, stop_at_target: bool = False) -> Schedule:
    """Full power from plug-in until full (or until the target) or departure; ignores h_t."""
    started = time.perf_counter()
    prepared = prepare(problem)
    dt = problem.dt_h
    n, t_count = problem.n_vehicles, problem.n_slots
    charge = np.zeros((n, t_count))
    goal = problem.target_kwh if stop_at_target else problem.capacity_kwh
    missing = np.maximum(0.0, goal - problem.energy_kwh)  # battery side
    for t in range(t_count):
        rate = np.minimum(prepared.upper_kw[:, t], missing / (problem.eta_ch * dt[t]))
        charge[:, t] = rate
        missing = np.maximum(0.0, missing - problem.eta_ch * rate * dt[t])
    return _report(prepared, charge, "unmanaged", started)


def earliest_deadline_first(problem: PlanningProblem) -> Schedule:
    """EDF under the head-room: the car that leaves first is served first."""

    def priority(prepared: Prepared, t: int, missing: FloatArray) -> FloatArray:
        return prepared.problem.departure_slot.astype(float)

    return _rule_based(problem, "edf", priority)


def least_laxity_first(problem: PlanningProblem) -> Schedule:
    """LLF under the head-room: the car with the least slack time is served first."""

    def priority(prepared: Prepared, t: int, missing: FloatArray) -> FloatArray:
        p = prepared.problem
        elapsed = np.concatenate([[0.0], np.cumsum(p.dt_h)])
        left_h = elapsed[np.maximum(p.departure_slot, t)] - elapsed[t]
        full_rate = np.maximum(prepared.upper_kw[:, t:].max(axis=1, initial=0.0), _TOL)
        laxity: FloatArray = left_h - missing / (p.eta_ch * full_rate)
        return laxity

    return _rule_based(problem, "llf", priority)


def _rule_based(
    problem: PlanningProblem,
    strategy: str,
    priority: Callable[[Prepared, int, FloatArray], FloatArray],
) -> Schedule:
    started = time.perf_counter()
    prepared = prepare(problem)
    dt = problem.dt_h
    n, t_count = problem.n_vehicles, problem.n_slots
    eta = problem.eta_ch
    charge = np.zeros((n, t_count))
    missing = np.maximum(0.0, problem.target_kwh - problem.energy_kwh)  # toward the target
    room = prepared.room_kwh.copy()  # toward the capacity
    for t in range(t_count):
        upper = prepared.upper_kw[:, t]
        forced = np.minimum(prepared.lower_kw[:, t], room / (eta * dt[t]))
        slack = max(0.0, float(prepared.headroom_kw[t]) - float(forced.sum()))
        rate = forced.copy()
        wanted = np.minimum(
            np.minimum(upper, room / (eta * dt[t])) - forced,
            np.maximum(0.0, missing / (eta * dt[t]) - forced),
        )
        order = np.lexsort((np.arange(n), priority(prepared, t, missing)))
        for i in order:
            if slack <= _TOL:
                break
            if wanted[i] <= _TOL:
                continue
            give = min(wanted[i], slack)
            total = rate[i] + give
            minimum = problem.min_kw[i]
            if total < minimum - _TOL:
                # Below the charger's minimum: round up if head-room, bound and battery allow.
                cap = min(upper[i], room[i] / (eta[i] * dt[t]))
                if minimum - rate[i] <= slack + _TOL and minimum <= cap + _TOL:
                    give = minimum - rate[i]
                else:
                    continue
            rate[i] += give
            slack -= give
        charge[:, t] = rate
        added = eta * rate * dt[t]
        missing = np.maximum(0.0, missing - added)
        room = np.maximum(0.0, room - added)
    return _report(prepared, charge, strategy, started)


def _report(prepared: Prepared, charge: FloatArray, strategy: str, started: float) -> Schedule:
    problem = prepared.problem
    schedule = schedule_from_power(
        problem,
        charge,
        strategy=strategy,
        solver="rule",
        status="heuristic",
        solve_time_s=time.perf_counter() - started,
    )
    over = np.maximum(0.0, schedule.site_kw - prepared.headroom_kw)
    details = {
        "headroom_violation_kw": float(over.max(initial=0.0)),
        "violation_slots": float((over > 1e-6).sum()),
        "overload_kwh": float((over * problem.dt_h).sum()),
        "shortfall_kwh": float(schedule.shortfall_kwh.sum()),
        "peak_kw": schedule.peak_kw,
    }
    return dataclasses.replace(schedule, details=details)
