"""The proportional-share planner: head-room shared among plugged-in cars by what they still need.

It is the service's planner until the optimiser is wired in, and stays as the fail-safe
fallback: its schedule keeps every slot within head-room by construction and needs no solver.
"""

from __future__ import annotations

import time

import numpy as np

from controller.planning.problem import FloatArray, PlanningProblem, Schedule, schedule_from_power


def share_by_need(problem: PlanningProblem) -> Schedule:
    """Charge every car toward its target as early as head-room allows, sharing it by need.

    In each slot a car asks for the power that would finish its remaining need in that slot
    (capped by its bound); forced power (force-charge, pins) is served first; when the asks
    exceed the head-room they are scaled down in proportion. Never discharges.
    """
    started = time.perf_counter()
    n, t_count = problem.n_vehicles, problem.n_slots
    charge = np.zeros((n, t_count))
    energy = problem.energy_kwh.astype(float).copy()
    room_for = problem.capacity_kwh - energy
    for t in range(t_count):
        dt = problem.dt_h[t]
        present = t < problem.departure_slot
        remaining = np.where(present, np.maximum(0.0, problem.target_kwh - energy), 0.0)
        room_for = np.maximum(0.0, problem.capacity_kwh - energy)
        cap_kw = np.minimum(problem.upper_kw[:, t], room_for / (problem.eta_ch * dt))
        forced = np.minimum(problem.lower_kw[:, t], cap_kw)
        asked = np.maximum(forced, np.minimum(cap_kw, remaining / (problem.eta_ch * dt)))
        room = max(0.0, float(problem.headroom_kw[t]))
        charge[:, t] = _fit(forced, asked, room)
        energy = energy + problem.eta_ch * charge[:, t] * dt
    return schedule_from_power(
        problem,
        charge,
        strategy="share",
        solver="share_by_need",
        solve_time_s=time.perf_counter() - started,
    )


def _fit(forced: FloatArray, asked: FloatArray, room: float) -> FloatArray:
    """Serve forced power first, then the rest in proportion, never above `room` in total."""
    forced_total = float(forced.sum())
    if forced_total >= room:
        scaled: FloatArray = forced * (room / forced_total) if forced_total > 0 else forced * 0.0
        return scaled
    extra = asked - forced
    extra_total = float(extra.sum())
    if extra_total <= room - forced_total:
        return asked
    result: FloatArray = forced + extra * ((room - forced_total) / extra_total)
    return result
