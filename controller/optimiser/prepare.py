"""What every solver of a `PlanningProblem` agrees on before it optimises anything.

The problem's arrays are turned into the bounds both the fast path and the cvxpy reference use:
availability (a car is there until its departure slot), forced power clipped to what the battery
and the site can take, the energy each car can reach at all, and the head-room no lower than 0.
Keeping this in one pure function means the two solvers optimise the very same model, so their
objectives can be compared number for number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller.planning.problem import BoolArray, FloatArray, PlanningProblem

# Amounts below this (kWh or kW) are treated as nothing: they are far below a meter's resolution
# and would only make the LP badly scaled.
TINY = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A `PlanningProblem` with its bounds made consistent; arrays are (N,), (T,) or (N, T)."""

    problem: PlanningProblem
    available: BoolArray  # (N, T) the car is plugged in: slot before its departure
    upper_kw: FloatArray  # (N, T) charge bound, 0 outside `available`
    lower_kw: FloatArray  # (N, T) forced charge that fits battery and head-room
    forced_clipped_kwh: float  # grid-side forced energy that did not fit
    v2g: BoolArray  # (N,) the car may discharge at all
    discharge_available: BoolArray  # (N, T) may discharge: V2G, plugged, not paused, not forced
    discharge_upper_kw: FloatArray  # (N, T)
    # The time-sharing row of a V2G slot: x / unit_kw + v / discharge_unit_kw <= dt (both >= 1 kW
    # so that a paused car does not put a huge coefficient into the LP).
    unit_kw: FloatArray  # (N,) the car's largest charge bound
    discharge_unit_kw: FloatArray  # (N,) the car's discharge bound
    headroom_kw: FloatArray  # (T,) h_t, never below 0
    headroom_deficit_kw: float  # how far the problem's h_t went below 0 (chargers can only stop)
    room_kwh: FloatArray  # (N,) battery space now
    need_kwh: FloatArray  # (N,) target minus content now (negative: above target)
    reach_kwh: FloatArray  # (N,) what full power in every available slot would add
    goal_kwh: FloatArray  # (N,) the part of the need the LP asks for: min(need, reach)
    scale_kwh: FloatArray  # (N,) max(goal, 0): the unit of relative shortfall (0: none possible)
    floor_kwh: FloatArray  # (N,) lowest content V2G may leave: min(floor, content now)

    @property
    def n_vehicles(self) -> int:
        """N."""
        return self.problem.n_vehicles

    @property
    def n_slots(self) -> int:
        """T."""
        return self.problem.n_slots

    @property
    def any_v2g(self) -> bool:
        """Whether any car may discharge in any slot."""
        return bool(self.discharge_available.any())

    @property
    def time_shortfall_kwh(self) -> FloatArray:
        """(N,) the shortfall no schedule can avoid: the target is out of reach in time."""
        result: FloatArray = np.maximum(0.0, self.need_kwh - self.reach_kwh)
        return result


def prepare(problem: PlanningProblem) -> Prepared:
    """Consistent bounds for `problem` (pure, vectorised, no solver)."""
    n, t_count = problem.n_vehicles, problem.n_slots
    dt = problem.dt_h
    slots = np.arange(t_count)
    available = slots[None, :] < problem.departure_slot[:, None]
    upper = np.where(available, problem.upper_kw, 0.0)
    headroom = np.maximum(problem.headroom_kw, 0.0)
    room = np.maximum(problem.capacity_kwh - problem.energy_kwh, 0.0)

    if problem.lower_kw.any():
        lower, clipped = _forced(problem, available, upper, headroom, room)
    else:  # nothing forced (the usual case): skip the (N, T) arithmetic
        lower, clipped = np.zeros_like(upper), 0.0

    v2g = problem.v2g & (problem.max_discharge_kw > TINY) & (n > 0)
    discharge_available = v2g[:, None] & available & (upper > TINY) & (problem.lower_kw <= 0.0)
    discharge_upper = np.where(discharge_available, problem.max_discharge_kw[:, None], 0.0)

    reach = problem.eta_ch * (upper * dt[None, :]).sum(axis=1)
    need = problem.target_kwh - problem.energy_kwh
    goal = np.minimum(need, reach)
    scale_kwh = np.where(goal > TINY, goal, 0.0)
    floor = np.where(v2g, np.minimum(problem.floor_kwh, problem.energy_kwh), 0.0)
    unit = np.maximum(upper.max(axis=1, initial=0.0), 1.0)
    return Prepared(
        problem=problem,
        available=available,
        upper_kw=upper,
        lower_kw=lower,
        forced_clipped_kwh=max(clipped, 0.0),
        v2g=v2g,
        discharge_available=discharge_available,
        discharge_upper_kw=discharge_upper,
        unit_kw=unit,
        discharge_unit_kw=np.maximum(problem.max_discharge_kw, 1.0),
        headroom_kw=headroom,
        headroom_deficit_kw=float(max(0.0, -problem.headroom_kw.min(initial=0.0))),
        room_kwh=room,
        need_kwh=need,
        reach_kwh=reach,
        goal_kwh=goal,
        scale_kwh=scale_kwh,
        floor_kwh=floor,
    )


def _forced(
    problem: PlanningProblem,
    available: BoolArray,
    upper: FloatArray,
    headroom: FloatArray,
    room: FloatArray,
) -> tuple[FloatArray, float]:
    """(forced kW that fits, grid kWh of forced power that did not fit)."""
    dt = problem.dt_h
    # Forced power, first as far as the battery takes it (in time order, without discharging)...
    wanted = np.minimum(np.where(available, problem.lower_kw, 0.0), upper)
    battery_side = problem.eta_ch[:, None] * wanted * dt[None, :]
    kept = np.diff(np.minimum(np.cumsum(battery_side, axis=1), room[:, None]), axis=1, prepend=0.0)
    kept_share = np.divide(kept, battery_side, out=np.zeros_like(kept), where=battery_side > 0.0)
    lower = wanted * kept_share
    # ...then as far as the site takes it: forced cars share a too-small head-room in proportion.
    forced_total = lower.sum(axis=0)
    scale = np.where(forced_total > headroom, headroom / np.maximum(forced_total, TINY), 1.0)
    lower = np.minimum(lower * scale[None, :], upper)
    lower[lower < TINY] = 0.0
    clipped = float(((wanted - lower) * dt[None, :]).sum())
    return lower, clipped
