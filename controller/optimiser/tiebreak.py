"""Earliest departures first: an exact tie-break among the plans every stage finds optimal.

The LP is indifferent to *when* a car charges among slots of one price, and to *which* car
charges in a slot when the slot is full. On a saturated night of one price a re-plan may then
keep putting a car's energy in its latest slots (its slots move on with the clock), and the
car misses the extra head-room the site really has when it comes (the live depot day,
`tests/live/test_day.py`: ev-18 was planned at 0 kW from 05:00 to 06:00 in every re-plan and
left 1.8 kWh short in one run).

Money, peak, ramps and every shortfall depend only on two sets of totals: the site's power in
each slot (Σ_i P_it) and, for a car that never discharges, the energy it gets (Σ_t P_it Δt_t;
its battery only rises, so its content stays within [content now, capacity] at every slot
exactly when its content at departure does). Re-assigning energy among those cars inside the
same totals therefore changes no stage optimum. `earliest_departures_first` does it exactly, as
a transportation problem with fixed margins, solved as a min-cost flow (OR-tools' network
simplex, `SimpleMinCostFlow`):

    min Σ_it c_it x_it   s.t.  Σ_t x_it = e_i (car i's grid kWh),
                               Σ_i x_it = s_t (slot t's grid kWh of those cars),
                               L_it Δt_t <= x_it <= U_it Δt_t,  x_it = 0 where i is away,

with c_it = (t + 1)(T + 1 − d_i). For cars i, j with d_i < d_j and slots t1 < t2, moving e kWh of
i from t2 to t1 and e kWh of j from t1 to t2 keeps every total and changes the cost by
−e (t2 − t1)(d_j − d_i) < 0: at the optimum no earlier-departing car charges in a later slot
than a later-departing one where the two could trade (both have room under their bounds), and
within each car energy sits as early as the others allow.

The flow runs on integers: energy in units of 1e-9 kWh (coarser when the fleet's energy times
the largest cost would overflow 64 bits), each cell's plan rounded to units and the margins
taken from those rounded cells, so the plan itself is a feasible flow. The answer keeps every
total to the rounding (~1e-9 kWh a cell); it is checked (every slot's kW and every car's kWh
within `stage_tolerance`-sized 1e-7 of the plan's, relative to max(1, total), every cell within
its bounds) and the plan is left as it was otherwise. HiGHS's dual simplex on the same LP gave
the same objective to 1e-13 relative but took 0.16 s at 278 cars and 1.4 s at 1,000 (the flow:
8 and 26 ms).

Cars that may discharge in some slot keep their plan (their content matters at every slot:
floor, capacity, time sharing; the exact form does not hold for them); their power stays in
the slot totals. Forced power is a lower bound of the cell, so it is kept. The charger's
minimum rate is not a constraint of the flow: `stages.ordered_plan` runs it on the final
(min-rate) plan, removes the slivers the flow makes with the min-rate step's free moves (which
keep the totals), and keeps the result only if it is no worse in anything a stage or the
min-rate step ranks.
"""

from __future__ import annotations

import time

import numpy as np
from ortools.graph.python import min_cost_flow

from controller.optimiser.prepare import Prepared
from controller.planning.problem import FloatArray, IntArray

# A re-assigned plan must keep every slot's kW and every car's kWh to this, relative to
# max(1, total); else the plan is left as it was.
_TOTAL_TOL = 1e-7
_TINY = 1e-9  # kWh: cells and totals below this are nothing
_UNITS_PER_KWH = 1e9  # the flow's energy unit (finest)
_MAX_COST_TIMES_FLOW = 1e17  # stays well inside int64 (9.2e18) for the flow's total cost


def earliest_departures_first(
    prepared: Prepared,
    charge_kw: FloatArray,
    discharge_kw: FloatArray,
) -> tuple[FloatArray, dict[str, float]]:
    """(charge kW, figures): `charge_kw` with the energy of the cars that never discharge
    re-assigned among them, earliest departure first, inside the same slot and car totals.

    `discharge_kw` is not changed (cars that may discharge keep their plan). Figures:
    `tiebreak_cars`, `tiebreak_cells` (the flow's arcs), `tiebreak_moved_kwh` (grid kWh that
    changed slot or car: half the absolute change), `tiebreak_kept` (1: the re-assigned plan is
    returned; 0: the original, because fewer than two cars could move, the flow was not
    optimal, or its answer missed a total or bound), `tiebreak_s`.
    """
    del discharge_kw  # part of the plan; the cars that may discharge are left out by bound
    started = time.perf_counter()
    problem = prepared.problem
    n, t_count = charge_kw.shape
    info = {
        "tiebreak_cars": 0.0,
        "tiebreak_cells": 0.0,
        "tiebreak_moved_kwh": 0.0,
        "tiebreak_kept": 0.0,
        "tiebreak_s": 0.0,
    }
    if n < 2 or t_count < 2:
        return charge_kw, _done(info, started)
    dt = problem.dt_h
    lower_kwh = prepared.lower_kw * dt[None, :]
    upper_kwh = np.maximum(prepared.upper_kw, prepared.lower_kw) * dt[None, :]
    energy = np.clip(charge_kw * dt[None, :], lower_kwh, upper_kwh)
    # Cars that may move: never discharge, and some energy above their forced part.
    movable = ~prepared.discharge_available.any(axis=1)
    movable &= (energy - lower_kwh).sum(axis=1) > _TINY
    cells = movable[:, None] & prepared.available & (upper_kwh - lower_kwh > _TINY)
    cars = np.flatnonzero(cells.any(axis=1))
    if cars.size < 2:
        return charge_kw, _done(info, started)
    car_of, slot_of = np.nonzero(cells[cars])  # local car index, absolute slot
    info["tiebreak_cars"] = float(cars.size)
    info["tiebreak_cells"] = float(car_of.size)
    rows = cars[car_of]
    base = lower_kwh[rows, slot_of]
    free = energy[rows, slot_of] - base  # what the flow re-assigns, >= 0
    room = upper_kwh[rows, slot_of] - base
    cost = ((slot_of + 1) * (t_count + 1 - problem.departure_slot[rows])).astype(np.int64)
    total = float(free.sum())
    units = _UNITS_PER_KWH
    top = float(max(int(cost.max(initial=1)), 1)) * max(total, 1.0)
    if top * units > _MAX_COST_TIMES_FLOW:
        units = 10.0 ** np.floor(np.log10(_MAX_COST_TIMES_FLOW / top))
    flow = _flow(cars.size, t_count, car_of, slot_of, free, room, cost, units)
    if flow is None:
        return charge_kw, _done(info, started)
    placed = np.minimum(flow / units, room)
    new_energy = energy.copy()
    new_energy[rows, slot_of] = base + placed
    old_slot = (energy[cars].sum(axis=0)) / dt
    new_slot = (new_energy[cars].sum(axis=0)) / dt
    if not (_close(new_slot, old_slot) and _close(new_energy.sum(axis=1), energy.sum(axis=1))):
        return charge_kw, _done(info, started)
    result = charge_kw.copy()
    result[cars] = new_energy[cars] / dt[None, :]
    info["tiebreak_moved_kwh"] = 0.5 * float(np.abs(placed - free).sum())
    info["tiebreak_kept"] = 1.0
    return result, _done(info, started)


def _flow(
    n_cars: int,
    t_count: int,
    car_of: IntArray,
    slot_of: IntArray,
    free: FloatArray,
    room: FloatArray,
    cost: IntArray,
    units: float,
) -> IntArray | None:
    """Each arc's flow (energy units) of the min-cost transportation flow whose margins are
    those of the plan `free` rounded to units, or None when it is not optimal."""
    planned = np.round(free * units).astype(np.int64)
    capacity = np.maximum(np.round(room * units).astype(np.int64), planned)
    supplies = np.concatenate(
        [
            np.bincount(car_of, weights=planned, minlength=n_cars),
            -np.bincount(slot_of, weights=planned, minlength=t_count),
        ]
    ).astype(np.int64)
    # bincount sums in float64: exact while a node's total stays below 2**53 units.
    if np.abs(supplies).max(initial=0) >= 2**53 or supplies.sum() != 0:
        return None
    solver = min_cost_flow.SimpleMinCostFlow()
    arcs = solver.add_arcs_with_capacity_and_unit_cost(
        car_of.astype(np.int32), (n_cars + slot_of).astype(np.int32), capacity, cost
    )
    solver.set_nodes_supplies(np.arange(n_cars + t_count, dtype=np.int32), supplies)
    if solver.solve() != min_cost_flow.SimpleMinCostFlow.OPTIMAL:
        return None
    result: IntArray = np.asarray(solver.flows(arcs), dtype=np.int64)
    return result


def _close(values: FloatArray, wanted: FloatArray) -> bool:
    """Whether every total is kept to `_TOTAL_TOL` (relative to max(1, total))."""
    return bool(np.all(np.abs(values - wanted) <= _TOTAL_TOL * np.maximum(1.0, np.abs(wanted))))


def _done(info: dict[str, float], started: float) -> dict[str, float]:
    info["tiebreak_s"] = time.perf_counter() - started
    return info
