"""The shortfall and fairness stages of a fleet without V2G from max flows, not LP runs.

Without discharge the soft-target stages are questions about one network. Measured at the grid
side, car i still needs `need_i = max(goal_i / eta_i - forced_i, 0)` kWh beyond its forced
charge; arc (i, t) carries at most `(upper_it - lower_it) * dt_t` kWh, slot t at most
`h_t * dt_t - forced_t`. A plan delivers `Y_i <= need_i` of the need (energy beyond the need
never helps a stage), car i's shortfall is `eta_i * (need_i - Y_i)` kWh at the battery and its
relative shortfall `u_i = 1 - (forced_i + Y_i) * eta_i / goal_i`.

- Shortfall stage (least total shortfall = most `sum_i eta_i Y_i`). The deliverable vectors Y
  form a polymatroid (the flows of a bipartite network with source capacities need_i), so the
  greedy by efficiency is optimal: with the distinct efficiencies eta_1 > ... > eta_K and
  `r_k` the max flow when only the cars of the first k groups may draw, the optimum is
  `sum_k eta_k (r_k - r_{k-1})`. One max flow per group (one for a fleet of one efficiency).
- Fairness stage (least largest relative shortfall lambda). `u_i <= lambda` is the floor
  `Y_i >= L_i(lambda) = max(0, (1 - lambda) goal_i / eta_i - forced_i)`; floors are feasible
  iff the max flow with source capacities `L_i` saturates them (condition 0). An augmenting
  path never lowers a source arc, so from any flow that meets the floors the max flow (and the
  greedy of the shortfall stage, group by group) is reached without breaking them: with one
  efficiency the least shortfall stays reachable at every feasible lambda, and the fairness
  optimum is the least lambda meeting condition 0. With several, the greedy must also still
  reach each `r_k` (condition k: the max flow with the first k groups at need_i and the others
  at their floors is at least `r_k + L_others`); this module finds the threshold of condition
  0 and checks the others there; when one of them fails, the caller runs the LP stage instead.
  The threshold comes from a min cut, not a bisection: a violated cut (the set A of cars on the
  source side) says `sum_{i in A} L_i(lambda) <= g(A) = sum_t min(H_t, sum_{i in A} c_it)`,
  which gives the least lambda it allows, `lambda_A`, exactly in floating point; Newton's
  method for parametric flows moves lambda to lambda_A and checks again, a few max flows in all.

OR-tools' `SimpleMaxFlow` works on integers (energy in units of 1e-8 kWh), so its flows are
rounded; the values returned are computed in floating point from the min cuts (exact when the
integer cut is a real min cut) together with what the integer flow itself proves (a plan that
reaches it): the caller sets them as bounds with the stage slack and HiGHS ends on the exact
data, so a rounding can cost a fallback to the LP stages, never a wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.graph.python import max_flow

from controller.optimiser.prepare import TINY, Prepared
from controller.planning.problem import BoolArray, FloatArray, IntArray

_UNITS_PER_KWH = 1e8
# A min cut may exceed the integer flow by the rounding of the arcs it cuts (1e-8 kWh each):
# beyond this (kWh, plus a relative part) the cut is not taken as a proof.
_CUT_GAP_KWH = 1e-5
_NEWTON_ROUNDS = 60


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowStages:
    """The shortfall and fairness optima of a fleet without V2G, found with max flows."""

    shortfall_kwh: float  # least total shortfall (battery side) by the min cuts
    shortfall_reached_kwh: float  # the total shortfall of a plan the integer flows build (>=)
    worst: float | None  # least largest relative shortfall; None: the LP stage must decide
    max_flows: int  # max-flow runs it took
    newton_rounds: int  # Newton steps of the fairness threshold
    levels: tuple[float, ...] = ()  # the fleet's efficiencies, best first
    group_reached_kwh: tuple[float, ...] = ()  # r_k the integer flows reached, by level

    def __post_init__(self) -> None:
        if self.shortfall_reached_kwh < self.shortfall_kwh - 1e-6 * max(1.0, self.shortfall_kwh):
            raise ValueError("flow stages: the reached shortfall is below the proven least one")
        if self.worst is not None and not 0.0 <= self.worst <= 1.0:
            raise ValueError(f"flow stages: relative shortfall {self.worst} not in 0..1")


@dataclass(slots=True)
class _Network:
    """The bipartite network of cars and slots, with the source arcs' capacities to be set."""

    cars: IntArray  # problem index of each car node
    arc_car: IntArray  # (arcs,) car node and slot of each car -> slot arc
    arc_slot: IntArray
    arc_kwh: FloatArray  # real capacity of each car -> slot arc
    slot_kwh: FloatArray  # (T,) real capacity of each slot -> sink arc
    solver: max_flow.SimpleMaxFlow
    source_arcs: np.ndarray  # (cars,) int32 arc index of each source -> car arc
    runs: int = 0

    def run(self, caps_kwh: FloatArray) -> tuple[float, BoolArray, BoolArray]:
        """(max flow kWh of the integer network, cars on the source side, slots there)."""
        self.solver.set_arcs_capacity(self.source_arcs, _units(caps_kwh))
        status = self.solver.solve(0, 1)
        self.runs += 1
        if status != max_flow.SimpleMaxFlow.OPTIMAL:
            raise _NoAnswer(f"max flow ended {status}")
        side = np.asarray(self.solver.get_source_side_min_cut(), dtype=np.int64)
        in_cut = np.zeros(2 + len(self.cars) + len(self.slot_kwh), dtype=bool)
        in_cut[side] = True
        n_cars = len(self.cars)
        flow = float(self.solver.optimal_flow()) / _UNITS_PER_KWH
        return flow, in_cut[2 : 2 + n_cars], in_cut[2 + n_cars :]

    def served(self, cars_in: BoolArray) -> float:
        """g(A): the most the cars in A can draw together (kWh), each without limit."""
        chosen = cars_in[self.arc_car]
        load = np.bincount(
            self.arc_slot[chosen], weights=self.arc_kwh[chosen], minlength=len(self.slot_kwh)
        )
        return float(np.minimum(load, self.slot_kwh).sum())


class _NoAnswer(Exception):
    """The flows cannot settle the stage (rounding, solver status): use the LP stages."""


def flow_stages(prepared: Prepared) -> FlowStages | None:
    """The shortfall and fairness optima by max flows, or None when they cannot be proven.

    Only for problems without V2G (the caller checks). `worst` is None when the fleet has
    several efficiencies and the fairness level is not set by the floors alone.
    """
    if prepared.any_v2g:
        return None
    try:
        return _stages(prepared)
    except _NoAnswer:
        return None


def surely_short(prepared: Prepared) -> bool:
    """Whether the targets need more energy than all slots' head-room together (no flow).

    A cheap sufficient sign of an over-subscribed day (microseconds against a max flow's
    milliseconds): the cars' total remaining need at the grid side, beyond forced charge,
    exceeds the head-room left after forced charge. A day short only by its time windows
    passes it and is found by the hard-target run instead.
    """
    if prepared.any_v2g:
        return False
    p = prepared.problem
    dt = p.dt_h
    soft = (p.departure_slot > 0) & (prepared.scale_kwh > TINY)
    goal_grid = np.where(soft, prepared.scale_kwh / p.eta_ch, 0.0)
    if prepared.lower_kw.any():
        forced = prepared.lower_kw @ dt
        need = np.maximum(goal_grid - forced, 0.0).sum()
        room = np.maximum(prepared.headroom_kw @ dt - forced.sum(), 0.0)
    else:
        need = goal_grid.sum()
        room = prepared.headroom_kw @ dt
    return bool(need > room * (1.0 + 1e-9) + 1e-6)


def _units(kwh: FloatArray) -> np.ndarray:
    result: np.ndarray = np.floor(np.maximum(kwh, 0.0) * _UNITS_PER_KWH).astype(np.int64)
    return result


def _stages(prepared: Prepared) -> FlowStages:
    p = prepared.problem
    dt = p.dt_h
    n, t_count = p.n_vehicles, p.n_slots
    forced_kwh = (prepared.lower_kw * dt[None, :]).sum(axis=1)
    rowed = p.departure_slot > 0
    soft = rowed & (prepared.scale_kwh > TINY)
    goal_grid = np.where(soft, prepared.scale_kwh / p.eta_ch, 0.0)
    need = np.maximum(goal_grid - forced_kwh, 0.0)
    cars = np.nonzero(need > 0.0)[0].astype(np.int64)
    if len(cars) == 0:
        return FlowStages(
            shortfall_kwh=0.0, shortfall_reached_kwh=0.0, worst=0.0, max_flows=0, newton_rounds=0
        )
    node_of = np.full(n, -1, dtype=np.int64)
    node_of[cars] = np.arange(len(cars))
    width = (prepared.upper_kw - prepared.lower_kw) * dt[None, :]
    arc_mask = prepared.available[cars] & (width[cars] > 0.0)
    arc_node, arc_slot = (a.astype(np.int64) for a in np.nonzero(arc_mask))
    arc_kwh = width[cars][arc_node, arc_slot]
    slot_kwh = np.maximum(prepared.headroom_kw * dt - (prepared.lower_kw * dt[None, :]).sum(0), 0.0)
    n_cars = len(cars)
    solver = max_flow.SimpleMaxFlow()
    car_nodes = 2 + np.arange(n_cars)
    slot_nodes = 2 + n_cars + np.arange(t_count)
    tails = np.concatenate([np.zeros(n_cars, dtype=np.int64), car_nodes[arc_node], slot_nodes])
    heads = np.concatenate([car_nodes, slot_nodes[arc_slot], np.ones(t_count, dtype=np.int64)])
    caps = np.concatenate([np.zeros(n_cars, dtype=np.int64), _units(arc_kwh), _units(slot_kwh)])
    solver.add_arcs_with_capacity(tails.astype(np.int32), heads.astype(np.int32), caps)
    net = _Network(
        cars=cars,
        arc_car=arc_node,
        arc_slot=arc_slot,
        arc_kwh=arc_kwh,
        slot_kwh=slot_kwh,
        solver=solver,
        source_arcs=np.arange(n_cars, dtype=np.int32),
    )
    need_c = need[cars]
    eta_c = p.eta_ch[cars]
    levels = np.unique(eta_c)[::-1]  # distinct efficiencies, best first

    # Shortfall stage: r_k by group prefix (cut value, and what the integer flow reaches).
    proven, reached = [], []
    for level in levels:
        head = eta_c >= level
        flow, a_side, _ = net.run(np.where(head, need_c, 0.0))
        cut = float(need_c[head & ~a_side].sum()) + net.served(a_side & head)
        if cut - flow > _CUT_GAP_KWH + 1e-9 * cut:
            raise _NoAnswer(f"min cut {cut} kWh is not proven by the flow {flow} kWh")
        proven.append(min(cut, float(need_c[head].sum())))
        reached.append(flow)
    weights = np.append(levels[:-1] - levels[1:], levels[-1])  # Abel summation, all >= 0
    total = float((eta_c * need_c).sum())
    shortfall = max(0.0, total - float(weights @ np.array(proven)))
    shortfall_reached = max(shortfall, total - float(weights @ np.array(reached)))
    if shortfall <= 0.0:
        return FlowStages(
            shortfall_kwh=0.0,
            shortfall_reached_kwh=shortfall_reached,
            worst=0.0,
            max_flows=net.runs,
            newton_rounds=0,
        )

    # Fairness stage: the threshold of condition 0 by Newton's method on min cuts.
    goal_c, forced_c = goal_grid[cars], forced_kwh[cars]

    def floors(level: float) -> FloatArray:
        result: FloatArray = np.maximum((1.0 - level) * goal_c - forced_c, 0.0)
        return result

    level, rounds = 0.0, 0
    while rounds < _NEWTON_ROUNDS:
        rounds += 1
        want = floors(level)
        flow, a_side, _ = net.run(want)
        if flow >= float(_units(want).sum()) / _UNITS_PER_KWH:
            break  # the floors are met: level is the threshold
        allowed = net.served(a_side)
        step = _least_level(goal_c[a_side], forced_c[a_side], allowed, level)
        if step <= level + 1e-13:
            break  # only the rounding is short: level is the threshold
        level = step
    else:
        raise _NoAnswer("the fairness threshold did not settle")
    worst: float | None = level
    # Several efficiencies: the greedy must still reach each r_k above the floors.
    want = floors(level)
    for k, best in enumerate(levels[:-1]):
        head = eta_c >= best
        flow, _, _ = net.run(np.where(head, need_c, want))
        required = proven[k] + float(want[~head].sum())
        if flow < required - _CUT_GAP_KWH - 1e-9 * required:  # the integer flow must show it
            worst = None
            break
    return FlowStages(
        shortfall_kwh=shortfall,
        shortfall_reached_kwh=shortfall_reached,
        worst=worst,
        max_flows=net.runs,
        newton_rounds=rounds,
        levels=tuple(float(v) for v in levels),
        group_reached_kwh=tuple(reached),
    )


def _least_level(goal: FloatArray, forced: FloatArray, allowed: float, start: float) -> float:
    """The least lambda >= start with `sum max(0, (1 - lambda) goal - forced) <= allowed`.

    The left side falls piecewise linearly to 0 at lambda = 1; bisection in floating point
    (it ends on adjacent floats).
    """

    def excess(level: float) -> float:
        return float(np.maximum((1.0 - level) * goal - forced, 0.0).sum()) - allowed

    low, high = start, 1.0
    if excess(low) <= 0.0:
        return low
    while True:
        middle = 0.5 * (low + high)
        if middle <= low or middle >= high:
            return high
        if excess(middle) > 0.0:
            low = middle
        else:
            high = middle
