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
from collections.abc import Callable

import numpy as np
from ortools.graph.python import min_cost_flow

from controller.optimiser.prepare import Prepared
from controller.planning.problem import BoolArray, FloatArray, IntArray

# A re-assigned plan must keep every slot's kW and every car's kWh to this, relative to
# max(1, total); else the plan is left as it was.
_TOTAL_TOL = 1e-7
_TINY = 1e-9  # kWh: cells and totals below this are nothing
_UNITS_PER_KWH = 1e9  # the flow's energy unit (finest)
_MAX_COST_TIMES_FLOW = 1e17  # stays well inside int64 (9.2e18) for the flow's total cost
# Rounds of the min-rate dive (`earliest_departures_first` with `settle`): each fixes the cells
# the free moves could not settle (on at the minimum or off) and runs the flow again.
DIVE_ROUNDS = 3

Settle = Callable[[FloatArray], tuple[FloatArray, BoolArray]]
"""A min-rate step for a re-assigned charge plan: (its plan with the slivers the free moves
remove removed, (N, T) mask of the slivers left)."""


def earliest_departures_first(
    prepared: Prepared,
    charge_kw: FloatArray,
    discharge_kw: FloatArray,
    *,
    settle: Settle | None = None,
    order: str = "departure",
    rounds: int = DIVE_ROUNDS,
) -> tuple[FloatArray, dict[str, float]]:
    """(charge kW, figures): `charge_kw` with the energy of the cars that never discharge
    re-assigned among them, earliest departure first, inside the same slot and car totals.

    `discharge_kw` is not changed (cars that may discharge keep their plan). With `settle`
    (the min-rate step's free moves) the answer is its settled plan, and a dive follows while
    slivers are left, for at most `rounds` flows in all: first each left sliver's cell is
    fixed in the flow, on at the charger's minimum (when it was at least half of it and the
    bound allows) or off; then the cars with slivers left keep their rows of `charge_kw` and
    only the others are ordered (inside the totals that leaves). A flow without an answer ends
    the dive.

    Figures: `tiebreak_cars`, `tiebreak_cells` (the flow's arcs), `tiebreak_moved_kwh` (grid
    kWh that changed slot or car: half the absolute change), `tiebreak_rounds` (flows run),
    `tiebreak_left` (slivers `settle` left in the answer), `tiebreak_kept` (1: the re-assigned
    plan is returned; 0: the original, because fewer than two cars could move, the flow was
    not optimal, or its answer missed a total or bound), `tiebreak_s`.
    """
    started = time.perf_counter()
    info = {
        "tiebreak_cars": 0.0,
        "tiebreak_cells": 0.0,
        "tiebreak_moved_kwh": 0.0,
        "tiebreak_rounds": 0.0,
        "tiebreak_left": 0.0,
        "tiebreak_kept": 0.0,
        "tiebreak_s": 0.0,
    }
    transport = _Transport.of(prepared, charge_kw, discharge_kw, order)
    if transport is None:
        return charge_kw, _done(info, started)
    info["tiebreak_cars"] = float(transport.cars.size)
    info["tiebreak_cells"] = float(transport.rows.size)
    flow = transport.solve()
    info["tiebreak_rounds"] = 1.0
    result = None if flow is None else transport.plan(charge_kw, flow)
    if result is None:
        return charge_kw, _done(info, started)
    if settle is not None:
        result, left = settle(result)
        kept = np.zeros(charge_kw.shape[0], dtype=bool)
        for round_ in range(1, rounds):
            if not left.any():
                break
            if round_ == 1:  # fix the left slivers' cells on or off
                transport.fix(left, result)
            else:  # leave the cars with slivers as the plan had them, order the others
                kept |= left.any(axis=1)
                again_transport = _Transport.of(prepared, charge_kw, discharge_kw, order, kept)
                if again_transport is None:
                    break
                transport = again_transport
            flow = transport.solve()
            info["tiebreak_rounds"] += 1.0
            again = None if flow is None else transport.plan(charge_kw, flow)
            if again is None:
                break
            result, left = settle(again)
        info["tiebreak_left"] = float(left.sum())
    info["tiebreak_moved_kwh"] = 0.5 * float(
        (np.abs(result - charge_kw) * prepared.problem.dt_h[None, :]).sum()
    )
    info["tiebreak_kept"] = 1.0
    return result, _done(info, started)


class _Transport:
    """The flow network of a plan: car nodes supply their grid kWh, slot nodes take theirs,
    one arc per (car, slot) cell the car may use, in integer energy units.

    The margins come from the plan's cells rounded to units (so the plan is a feasible flow);
    `fix` turns cells on (a lower bound of the charger's minimum) or off (no capacity).
    """

    def __init__(
        self,
        prepared: Prepared,
        cars: IntArray,
        car_of: IntArray,
        slot_of: IntArray,
        base_kwh: FloatArray,
        planned: IntArray,
        capacity: IntArray,
        units: float,
        weight: IntArray,
    ) -> None:
        problem = prepared.problem
        self.prepared = prepared
        self.cars = cars
        self.car_of = car_of
        self.slot_of = slot_of
        self.rows = cars[car_of]
        self.base_kwh = base_kwh
        self.capacity = capacity
        self.lower = np.zeros_like(capacity)
        self.units = units
        t_count = problem.n_slots
        self.supplies = np.concatenate(
            [
                np.bincount(car_of, weights=planned, minlength=cars.size),
                -np.bincount(slot_of, weights=planned, minlength=t_count),
            ]
        ).astype(np.int64)
        self.cost = ((slot_of + 1) * weight[car_of]).astype(np.int64)

    @classmethod
    def of(
        cls,
        prepared: Prepared,
        charge_kw: FloatArray,
        discharge_kw: FloatArray,
        order: str,
        kept: BoolArray | None = None,
    ) -> _Transport | None:
        """The network of `charge_kw`'s cars that never discharge, have energy above their
        forced part and are not `kept` (N,) as they are, or None when fewer than two such
        cars (or two slots) exist."""
        del discharge_kw  # part of the plan; the cars that may discharge are left out by bound
        problem = prepared.problem
        n, t_count = charge_kw.shape
        if n < 2 or t_count < 2:
            return None
        dt = problem.dt_h
        lower_kwh = prepared.lower_kw * dt[None, :]
        upper_kwh = np.maximum(prepared.upper_kw, prepared.lower_kw) * dt[None, :]
        energy = np.clip(charge_kw * dt[None, :], lower_kwh, upper_kwh)
        movable = ~prepared.discharge_available.any(axis=1)
        movable &= (energy - lower_kwh).sum(axis=1) > _TINY
        if kept is not None:
            movable &= ~kept
        cells = movable[:, None] & prepared.available & (upper_kwh - lower_kwh > _TINY)
        cars = np.flatnonzero(cells.any(axis=1))
        if cars.size < 2:
            return None
        car_of, slot_of = np.nonzero(cells[cars])  # local car index, absolute slot
        rows = cars[car_of]
        base = lower_kwh[rows, slot_of]
        free = energy[rows, slot_of] - base  # what the flow re-assigns, >= 0
        room = upper_kwh[rows, slot_of] - base
        weight = _weights(prepared, cars, car_of, free, room, order)
        top = float(t_count + 1) * float(weight.max()) * max(float(free.sum()), 1.0)
        units = _UNITS_PER_KWH
        if top * units > _MAX_COST_TIMES_FLOW:
            units = float(10.0 ** np.floor(np.log10(_MAX_COST_TIMES_FLOW / top)))
        planned = np.round(free * units).astype(np.int64)
        capacity = np.maximum(np.round(room * units).astype(np.int64), planned)
        # The margins are summed in float64: exact while a node's total stays below 2**53.
        if float(planned.sum()) >= 2.0**53:
            return None
        return cls(prepared, cars, car_of, slot_of, base, planned, capacity, units, weight)

    def fix(self, left: BoolArray, plan_kw: FloatArray) -> None:
        """Fix the cells of the slivers `left` in `plan_kw`: on at the charger's minimum when
        the sliver is at least half of it and the cell's bound allows, else off."""
        problem = self.prepared.problem
        hit = left[self.rows, self.slot_of]
        if not hit.any():
            return
        minimum = problem.min_kw[self.rows] * problem.dt_h[self.slot_of]
        need = np.ceil(np.maximum(minimum - self.base_kwh, 0.0) * self.units).astype(np.int64)
        value = plan_kw[self.rows, self.slot_of] * problem.dt_h[self.slot_of]
        on = hit & (value >= 0.5 * minimum) & (need <= self.capacity)
        off = hit & ~on
        self.lower = np.where(on, np.maximum(self.lower, need), self.lower)
        self.capacity = np.where(off, 0, self.capacity)
        self.lower = np.where(off, 0, self.lower)

    def solve(self) -> IntArray | None:
        """Each arc's flow (units) of the least-cost flow within the bounds, or None when it
        is not optimal (infeasible after a `fix`)."""
        lower = self.lower
        supplies = self.supplies.copy()
        n_cars = self.cars.size
        supplies[:n_cars] -= np.bincount(self.car_of, weights=lower, minlength=n_cars).astype(
            np.int64
        )
        supplies[n_cars:] += np.bincount(
            self.slot_of, weights=lower, minlength=supplies.size - n_cars
        ).astype(np.int64)
        solver = min_cost_flow.SimpleMinCostFlow()
        arcs = solver.add_arcs_with_capacity_and_unit_cost(
            self.car_of.astype(np.int32),
            (n_cars + self.slot_of).astype(np.int32),
            self.capacity - lower,
            self.cost,
        )
        solver.set_nodes_supplies(np.arange(supplies.size, dtype=np.int32), supplies)
        if solver.solve() != min_cost_flow.SimpleMinCostFlow.OPTIMAL:
            return None
        result: IntArray = np.asarray(solver.flows(arcs), dtype=np.int64) + lower
        return result

    def plan(self, charge_kw: FloatArray, flow: IntArray) -> FloatArray | None:
        """`charge_kw` with its network's cells set by `flow`, or None when that misses a
        slot's or car's total or a bound (see `_TOTAL_TOL`)."""
        prepared = self.prepared
        dt = prepared.problem.dt_h
        upper = np.maximum(prepared.upper_kw, prepared.lower_kw)
        cars = self.cars
        result = charge_kw.copy()
        kwh = self.base_kwh + flow / self.units
        result[self.rows, self.slot_of] = np.minimum(
            kwh / dt[self.slot_of], upper[self.rows, self.slot_of]
        )
        old, new = charge_kw[cars], result[cars]
        if not (
            _close(new.sum(axis=0), old.sum(axis=0))
            and _close(new @ dt, old @ dt)
            and bool(np.all(new >= -_TINY))
        ):
            return None
        return result


def _weights(
    prepared: Prepared,
    cars: IntArray,
    car_of: IntArray,
    free: FloatArray,
    room: FloatArray,
    order: str,
) -> IntArray:
    """(cars,) each car's priority, an integer >= 1 (higher: served in earlier slots).

    "departure": T + 1 - d_i, earliest departure first. "laxity": least laxity first, by the
    latest slot the car could start at full power and still get what it needs (the larger of
    this plan's energy and its goal, grid kWh beyond forced power): lst_i = d_i - e_i / (its
    largest cell), in quarter slots: 4 (T + 1 - clip(lst_i, 0, T)) + 1.
    """
    problem = prepared.problem
    t_count = problem.n_slots
    departure = problem.departure_slot[cars].astype(np.float64)
    if order == "departure":
        result: IntArray = (t_count + 1 - departure).astype(np.int64)
        return result
    energy = np.bincount(car_of, weights=free, minlength=cars.size)
    # What the car still needs (grid kWh beyond its forced energy), when the plan gives it
    # less: a car the plan leaves short has no slack, however little the plan gives it.
    dt = problem.dt_h
    forced = (prepared.lower_kw[cars] * dt[None, :]).sum(axis=1)
    need = np.maximum(prepared.goal_kwh[cars], 0.0) / problem.eta_ch[cars] - forced
    energy = np.maximum(energy, need)
    full = np.zeros(cars.size)
    np.maximum.at(full, car_of, room)
    slots_needed = energy / np.maximum(full, _TINY)
    latest_start = np.clip(departure - slots_needed, 0.0, float(t_count))
    result = (np.round(4.0 * (t_count + 1 - latest_start)) + 1).astype(np.int64)
    return result


def _close(values: FloatArray, wanted: FloatArray) -> bool:
    """Whether every total is kept to `_TOTAL_TOL` (relative to max(1, total))."""
    return bool(np.all(np.abs(values - wanted) <= _TOTAL_TOL * np.maximum(1.0, np.abs(wanted))))


def _done(info: dict[str, float], started: float) -> dict[str, float]:
    info["tiebreak_s"] = time.perf_counter() - started
    return info
