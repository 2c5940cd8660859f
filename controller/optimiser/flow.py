"""A starting basis for HiGHS from a min-cost flow: the seed's LP as a transportation problem.

Without V2G, the money stage is a transportation problem. Measured at the grid side, car i must
receive between `a_i = max(goal_i / eta_i - forced_i, 0)` and `b_i = room_i / eta_i - forced_i`
kWh; arc (i, t) carries at most `(upper - lower) * dt` kWh at price `p_t`; slot t takes at most
`h_t * dt - forced_t` kWh. OR-tools' `SimpleMinCostFlow` solves it on integers (energy in units
of 0.1 Wh, prices scaled to about 10^6 units), which is fast but rounded. The flow is therefore
not the answer: its arcs strictly inside their bounds, its free cars and its unsaturated slots
are turned into a simplex basis of the compact LP (a spanning forest with one slack per tree,
the structure of every basis of a network LP), and HiGHS finishes from there on the exact data.
HiGHS checks primal and dual feasibility itself, so the rounding can cost iterations, never
exactness.
"""

from __future__ import annotations

import numpy as np
from ortools.graph.python import min_cost_flow

from controller.optimiser.flow_stages import FlowStages
from controller.optimiser.model import Layout, Values
from controller.optimiser.prepare import TINY, Prepared
from controller.planning.problem import IntArray

_LOWER, _BASIC, _UPPER = 0, 1, 2  # highspy.HighsBasisStatus codes
_UNITS_PER_KWH = 1e4
_COST_UNITS = 1e6


def flow_basis(
    layout: Layout, values: Values, prepared: Prepared
) -> tuple[IntArray, IntArray] | None:
    """(column status, row status) for `layout`, or None when the rounded flow is infeasible.

    Only without V2G: the same fleet's flow without discharging is a feasible plan of a V2G LP,
    but a poor start (measured: 4,870 pivots from it against ~500 from scratch at 278 cars).
    """
    if layout.any_v2g or layout.nx == 0:
        return None
    p = prepared.problem
    dt = p.dt_h
    n, t_count = layout.n, layout.t_count
    cars = np.nonzero(layout.car_row >= 0)[0]
    node_of_car = np.full(n, -1, dtype=np.int64)
    node_of_car[cars] = np.arange(len(cars))
    x_car, x_slot = layout.x_car, layout.x_slot
    lower = values.col_lower[: layout.nx]
    upper = values.col_upper[: layout.nx]
    q = _UNITS_PER_KWH
    arc_cap = np.floor((upper - lower) * q).astype(np.int64)
    forced_car = np.bincount(x_car, weights=lower, minlength=n)
    forced_slot = np.bincount(x_slot, weights=lower, minlength=t_count)
    eta = p.eta_ch
    want = prepared.goal_kwh / eta - forced_car
    need_int = np.ceil(np.maximum(want, 0.0)[cars] * q).astype(np.int64)
    most_int = np.floor(np.maximum(prepared.room_kwh / eta - forced_car, 0.0)[cars] * q).astype(
        np.int64
    )
    need_int = np.minimum(need_int, most_int)
    slot_cap = np.floor(np.maximum(prepared.headroom_kw * dt - forced_slot, 0.0) * q).astype(
        np.int64
    )
    top = max(float(np.abs(p.price_eur_per_kwh).max(initial=0.0)), 1e-9)
    slot_cost = np.round(p.price_eur_per_kwh * (_COST_UNITS / top)).astype(np.int64)

    # Nodes: source 0, sink 1, cars 2.., slots after the cars.
    n_cars = len(cars)
    source, sink = 0, 1
    car_node = 2 + node_of_car[x_car]
    slot_node = 2 + n_cars + np.arange(t_count)
    optional = most_int - need_int
    spare = int(optional.sum())
    tails = np.concatenate([[source], np.full(n_cars, source), car_node, slot_node])
    heads = np.concatenate(
        [[sink], 2 + np.arange(n_cars), slot_node[x_slot], np.full(t_count, sink)]
    )
    caps = np.concatenate([[spare], optional, arc_cap, slot_cap])
    costs = np.concatenate(
        [
            [0],
            np.zeros(n_cars, dtype=np.int64),
            slot_cost[x_slot],
            np.zeros(t_count, dtype=np.int64),
        ]
    )
    supplies = np.zeros(2 + n_cars + t_count, dtype=np.int64)
    supplies[source] = spare
    supplies[2 : 2 + n_cars] = need_int
    supplies[sink] = -(spare + int(need_int.sum()))
    solver = min_cost_flow.SimpleMinCostFlow()
    solver.add_arcs_with_capacity_and_unit_cost(
        tails.astype(np.int32), heads.astype(np.int32), caps, costs
    )
    solver.set_nodes_supplies(np.arange(len(supplies), dtype=np.int32), supplies)
    if solver.solve() != min_cost_flow.SimpleMinCostFlow.OPTIMAL:
        return None
    first_x = 1 + n_cars
    flow = np.asarray(solver.flows(np.arange(first_x, first_x + layout.nx, dtype=np.int32)))
    return _basis(layout, values, prepared, flow, arc_cap, need_int, most_int, slot_cap, want)


def _basis(
    layout: Layout,
    values: Values,
    prepared: Prepared,
    flow: IntArray,
    arc_cap: IntArray,
    need_int: IntArray,
    most_int: IntArray,
    slot_cap: IntArray,
    want: np.ndarray,
) -> tuple[IntArray, IntArray]:
    """The spanning-forest basis of the flow (see the module's docstring)."""
    n, t_count = layout.n, layout.t_count
    cars = np.nonzero(layout.car_row >= 0)[0]
    n_cars = len(cars)
    node_of_car = np.full(n, -1, dtype=np.int64)
    node_of_car[cars] = np.arange(n_cars)
    x_car, x_slot = layout.x_car, layout.x_slot

    free = (flow > 0) & (flow < arc_cap)
    delivered = np.bincount(node_of_car[x_car], weights=flow, minlength=n_cars).astype(np.int64)
    lower_active = (want[cars] > 0.0) & (delivered <= need_int)
    upper_active = delivered >= most_int
    slot_load = np.bincount(x_slot, weights=flow, minlength=t_count).astype(np.int64)
    saturated = slot_load >= slot_cap
    # Roots: nodes whose slack is basic (cars strictly inside their bounds, unsaturated slots).
    root = np.concatenate([~lower_active & ~upper_active, ~saturated])
    basic_x = _forest(root, node_of_car[x_car[free]], n_cars + x_slot[free], free)

    car_status = np.where(
        root[:n_cars], _BASIC, np.where(lower_active & ~upper_active, _LOWER, _UPPER)
    )
    return _network_statuses(layout, values, prepared, flow, arc_cap, basic_x, root, car_status)


def _network_statuses(
    layout: Layout,
    values: Values,
    prepared: Prepared,
    flow: IntArray,
    arc_cap: IntArray,
    basic_x: np.ndarray,
    root: np.ndarray,
    car_status: IntArray,
) -> tuple[IntArray, IntArray]:
    """(column status, row status) of a flow's forest: x arcs, slots, cars' rows, aggregates.

    `root` covers the car nodes (those with a car row) then the slots; the site columns and the
    peak and ramp rows follow from the flow's site profile. Everything not set here is at
    its lower bound (columns) or basic (rows).
    """
    dt = prepared.problem.dt_h
    t_count = layout.t_count
    n_cars = len(car_status)
    free = (flow > 0) & (flow < arc_cap)
    at_upper = (flow >= arc_cap) & (arc_cap > 0)
    col = np.full(layout.n_cols, _LOWER, dtype=np.int64)
    row = np.full(layout.n_rows, _BASIC, dtype=np.int64)
    x_status = np.where(at_upper | (free & (2 * flow > arc_cap)), _UPPER, _LOWER)
    col[: layout.nx] = np.where(basic_x, _BASIC, x_status)
    t_idx = np.arange(t_count)
    col[layout.y0 + t_idx] = _BASIC
    col[layout.g0 + t_idx] = np.where(root[n_cars : n_cars + t_count], _BASIC, _UPPER)
    col[layout.k_col] = _BASIC
    col[layout.r0 : layout.r0 + t_count - 1] = _BASIC
    row[layout.car_row[layout.car_row >= 0]] = car_status
    row[layout.ydef0 + t_idx] = _LOWER
    row[layout.gdef0 + t_idx] = _LOWER
    energy = values.col_lower[: layout.nx] + flow / _UNITS_PER_KWH
    net = np.bincount(layout.x_slot, weights=energy, minlength=t_count) / dt
    row[layout.peak0 + int(np.argmax(net))] = _UPPER
    if t_count > 1:
        rising = np.diff(net) >= 0.0
        up = layout.ramp0 + np.arange(t_count - 1)
        row[up] = np.where(rising, _LOWER, _BASIC)
        row[up + t_count - 1] = np.where(rising, _BASIC, _LOWER)
    return col, row


def _forest(root: np.ndarray, tails: IntArray, heads: IntArray, edges: np.ndarray) -> np.ndarray:
    """Which edges (the True entries of `edges`, joining `tails` to `heads`) are basic.

    Kruskal-style: an edge joins two trees unless that closes a cycle or joins two trees that
    each have a root (a basic slack); a tree left without a root gets one at one of its nodes
    (`root` is updated in place). Every tree then has exactly one root: the spanning-forest
    shape of a network LP's basis.
    """
    parent = np.arange(len(root))
    has_root = root.copy()

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = int(parent[a])
        return a

    chosen = np.zeros(len(edges), dtype=bool)
    for k, tail, head in zip(
        np.nonzero(edges)[0].tolist(), tails.tolist(), heads.tolist(), strict=True
    ):
        a, b = find(int(tail)), find(int(head))
        if a == b or (has_root[a] and has_root[b]):
            continue
        parent[a] = b
        has_root[b] = has_root[a] or has_root[b]
        chosen[k] = True
    for node in range(len(root)):
        top = find(node)
        if not has_root[top]:
            root[node] = True  # a degenerate basic slack for a tree that had none
            has_root[top] = True
    return chosen


def floors_basis(
    layout: Layout, values: Values, prepared: Prepared, flows: FlowStages, worst: float
) -> tuple[IntArray, IntArray] | None:
    """A starting basis for the cost stage of an over-subscribed day, or None.

    The cost stage keeps the flow stages' optima: every car's relative shortfall at most
    `worst`, and the total shortfall at its least. Without V2G that is a min-cost flow again:
    car i gets its floor `L_i` as a supply of its own, efficiency group k the delivery `r_k -
    r_{k-1}` the shortfall stage found for it (less one unit per car, for the rounding) through
    arcs of capacity `need_i - L_i`, and an optional node offers any car more, up to its battery
    space, where that pays. Its solution becomes a spanning-forest basis as in `flow_basis`,
    with one more node, the shortfall row, joined to the cars whose relative shortfall lies
    strictly between 0 and `worst` by their `u` columns; a car held at its floor has `u` basic
    against its fairness row. HiGHS then finishes on the exact data.
    """
    if layout.any_v2g or layout.nx == 0:
        return None
    p = prepared.problem
    dt = p.dt_h
    n, t_count = layout.n, layout.t_count
    q = _UNITS_PER_KWH
    cars = np.nonzero(layout.car_row >= 0)[0]
    n_cars = len(cars)
    node_of_car = np.full(n, -1, dtype=np.int64)
    node_of_car[cars] = np.arange(n_cars)
    x_car, x_slot = layout.x_car, layout.x_slot
    lower = values.col_lower[: layout.nx]
    # Capacities rounded up, floors and shares down: any real plan keeping the stages' optima
    # has a rounded counterpart, so the flow is feasible whenever the stages are.
    arc_cap = np.ceil((values.col_upper[: layout.nx] - lower) * q).astype(np.int64)
    forced = np.bincount(x_car, weights=lower, minlength=n)[cars]
    eta = p.eta_ch[cars]
    soft = prepared.scale_kwh[cars] > TINY
    goal = np.where(soft, prepared.scale_kwh[cars] / eta, 0.0)
    need = np.floor(np.maximum(goal - forced, 0.0) * q).astype(np.int64)
    room = np.ceil(np.maximum(prepared.room_kwh[cars] / eta - forced, 0.0) * q).astype(np.int64)
    need = np.minimum(need, room)
    floor = np.where(need > 0, np.floor(np.maximum((1.0 - worst) * goal - forced, 0.0) * q), 0)
    floor = np.minimum(floor.astype(np.int64), need)
    levels = np.asarray(flows.levels)
    counted = need > 0
    group = np.searchsorted(-levels, -eta)
    if (
        len(levels) == 0
        or (
            counted & ((group >= len(levels)) | (levels[np.minimum(group, len(levels) - 1)] != eta))
        ).any()
    ):
        return None  # not the fleet the flows saw
    k_count = len(levels)
    reached = np.concatenate([[0.0], flows.group_reached_kwh])
    supply_group = np.zeros(k_count, dtype=np.int64)
    for k in range(k_count):
        members = counted & (group == k)
        share = int(np.floor((reached[k + 1] - reached[k]) * q))
        supply_group[k] = max(0, share - int(floor[members].sum()) - int(members.sum()))
    group_cap = np.where(counted, need - floor, 0)
    extra_cap = room - np.maximum(need, floor)
    slot_cap = np.ceil(
        np.maximum(
            prepared.headroom_kw * dt - np.bincount(x_slot, weights=lower, minlength=t_count), 0.0
        )
        * q
    ).astype(np.int64)
    top = max(float(np.abs(p.price_eur_per_kwh).max(initial=0.0)), 1e-9)
    slot_cost = np.round(p.price_eur_per_kwh * (_COST_UNITS / top)).astype(np.int64)

    # Nodes: sink 0, optional 1, groups 2.., cars, slots. Arcs: group, extra, bypass, x, slot.
    car0 = 2 + k_count
    slot0 = car0 + n_cars
    in_group = np.nonzero(counted)[0]
    spare = int(extra_cap.sum())
    tails = np.concatenate(
        [
            2 + group[in_group],
            np.ones(n_cars, dtype=np.int64),
            [1],
            car0 + node_of_car[x_car],
            slot0 + np.arange(t_count),
        ]
    )
    heads = np.concatenate(
        [
            car0 + in_group,
            car0 + np.arange(n_cars),
            [0],
            slot0 + x_slot,
            np.zeros(t_count, dtype=np.int64),
        ]
    )
    caps = np.concatenate([group_cap[in_group], extra_cap, [spare], arc_cap, slot_cap])
    costs = np.concatenate(
        [
            np.zeros(len(in_group) + n_cars + 1, dtype=np.int64),
            slot_cost[x_slot],
            np.zeros(t_count, dtype=np.int64),
        ]
    )
    supplies = np.zeros(slot0 + t_count, dtype=np.int64)
    supplies[1] = spare
    supplies[2:car0] = supply_group
    supplies[car0:slot0] = floor
    supplies[0] = -int(supplies.sum())
    solver = min_cost_flow.SimpleMinCostFlow()
    solver.add_arcs_with_capacity_and_unit_cost(
        tails.astype(np.int32), heads.astype(np.int32), caps.astype(np.int64), costs
    )
    solver.set_nodes_supplies(np.arange(len(supplies), dtype=np.int32), supplies)
    status = solver.solve()
    if status != min_cost_flow.SimpleMinCostFlow.OPTIMAL:
        return None
    first_x = len(in_group) + n_cars + 1
    flow = np.asarray(solver.flows(np.arange(first_x, first_x + layout.nx, dtype=np.int32)))
    group_flow = np.zeros(n_cars, dtype=np.int64)
    group_flow[in_group] = np.asarray(solver.flows(np.arange(len(in_group), dtype=np.int32)))
    extra_flow = np.asarray(
        solver.flows(np.arange(len(in_group), len(in_group) + n_cars, dtype=np.int32))
    )
    got = floor + group_flow + extra_flow
    served = got >= need  # u = 0
    held = ~served & (floor > 0) & (got <= floor)  # u = worst: the fairness row binds
    between = ~served & ~held  # 0 < u < worst: u basic, joined to the shortfall row
    at_room = got >= room
    slot_load = np.bincount(x_slot, weights=flow, minlength=t_count).astype(np.int64)
    # Nodes of the forest: cars, slots, the shortfall row (bound: the seed is short of it).
    car_root = ~at_room & (~counted | (served & (got > need)))
    root = np.concatenate([car_root, slot_load < slot_cap, [False]])
    short_node = n_cars + t_count
    free = (flow > 0) & (flow < arc_cap)
    u_edges = np.nonzero(between)[0]
    tails_all = np.concatenate([u_edges, node_of_car[x_car[free]]])
    heads_all = np.concatenate([np.full(len(u_edges), short_node), n_cars + x_slot[free]])
    chosen = _forest(root, tails_all, heads_all, np.ones(len(tails_all), dtype=bool))
    u_basic = np.zeros(n_cars, dtype=bool)
    u_basic[u_edges] = chosen[: len(u_edges)]
    basic_x = np.zeros(layout.nx, dtype=bool)
    basic_x[np.nonzero(free)[0]] = chosen[len(u_edges) :]
    car_status = np.where(root[:n_cars], _BASIC, np.where(at_room & served, _UPPER, _LOWER))
    col, row = _network_statuses(
        layout, values, prepared, flow, arc_cap, basic_x, root[: n_cars + t_count], car_status
    )
    col[layout.u0 + cars] = np.where(u_basic | held, _BASIC, _LOWER)
    row[layout.fair0 + np.arange(len(layout.fair_car))] = _BASIC
    fair_of_car = np.full(n, -1, dtype=np.int64)
    fair_of_car[layout.fair_car] = layout.fair0 + np.arange(len(layout.fair_car))
    row[fair_of_car[cars[held]]] = _UPPER
    col[layout.z_col] = _UPPER
    row[layout.short_row] = _BASIC if root[short_node] else _UPPER
    return col, row
