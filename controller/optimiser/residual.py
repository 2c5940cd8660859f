"""Min-rate residual: an exact MIP for the energy the cheap min-rate moves would lose.

The free moves of `controller.optimiser.rounding` and the greedy `controller.optimiser.repair`
look at one sliver (or one car) at a time. When the site is full in every slot a car can use
(a morning where the head-room, not the price, decides, and the LP already shares a shortfall),
no single move can lift a sliver to the charger's minimum, and the greedy repair drops it: the
car loses the energy. Found on the live depot day (`tests/live/test_day.py`): a car whose
remaining need is below one slot at the minimum rate (0.92 kWh, 4.14 kW x 0.25 h = 1.04 kWh)
was given nothing, and cars with a sliver in a saturated slot near their departure lost it.

What fixes both is a trade between cars: another car gives up a little power in the slot so
that this one can run at its minimum (charging a full minimum-rate slot, a little more than
needed, beats charging nothing), and takes it back elsewhere, possibly through a chain of
cars. `settle_residual` finds the best such trade exactly: a small MIP with HiGHS
semi-continuous columns (x = 0 or m_i dt <= x <= U_it dt) over the cars that lost energy and
the cars sharing their slots, everything else fixed. Two passes: the least total shortfall
against what the LP gave each car (capped at its need), then, among the plans that lose no
more, the least money (for at most `MONEY_S`). It runs within the solve's time budget; its
plan is checked (head-room, bounds, minimum rates, capacity) and kept only if it loses less
energy, or as little for less money. What is left is reported with its reason.
"""

from __future__ import annotations

import time
from typing import Any

import highspy as _highspy
import numpy as np
from scipy import sparse

from controller.optimiser.highs import column_lp
from controller.optimiser.prepare import Prepared
from controller.planning.problem import BoolArray, FloatArray, IntArray

highspy: Any = _highspy

# Largest MIP (semi-continuous columns) of the wider rounds (see `_cells`).
MAX_CELLS = 4000
# Largest first round. Above it HiGHS's MIP set-up alone overruns the step's 0.3 s (measured on
# over-subscribed benchmark days, every slot at its head-room: 11,000-15,000 cells at 278 cars
# took 0.42-0.53 s, 47,000 at 1,000 ~1 s, 238,000 at 5,000 3.4 s; none proven, none kept);
# the saturated nights the MIP is for have 300-700.
FIRST_MAX_CELLS = 2 * MAX_CELLS
# The money pass (among the plans that lose the least energy) gets at most this long.
MONEY_S = 0.2
_HIGHS_OPTIONS: dict[str, float | int | bool | str] = {
    "mip_abs_gap": 1e-9,  # kWh of shortfall, then EUR
    "mip_feasibility_tolerance": 1e-9,
    "primal_feasibility_tolerance": 1e-9,
}
# The dive (`_dive`) fixes at most this many cells one by one, and takes at most this share
# of the MIP's time, before it gives up.
DIVE_FIXES = 400
DIVE_SHARE = 0.5
_DIVE_TOL = 1e-9  # kWh
_TOL = 1e-7  # kW: below this a setpoint is 0, within it of the minimum it is at the minimum
_ENERGY_TOL = 1e-6  # kWh: a car that gets this much less than the LP gave it lost nothing


def lost_kwh(
    prepared: Prepared, lp_charge: FloatArray, charge: FloatArray, discharge: FloatArray
) -> FloatArray:
    """(N,) battery kWh each charge-only car gets less than its want (see `wanted_kwh`)."""
    gain = _gain(prepared, charge)
    lost: FloatArray = np.maximum(0.0, wanted_kwh(prepared, lp_charge) - gain)
    lost[prepared.v2g] = 0.0
    lost[discharge.any(axis=1)] = 0.0
    return lost


def wanted_kwh(prepared: Prepared, lp_charge: FloatArray) -> FloatArray:
    """(N,) what a min-rate plan must give each car: the LP's battery kWh, capped at the need."""
    need = np.maximum(prepared.need_kwh, 0.0)
    result: FloatArray = np.minimum(_gain(prepared, lp_charge), need)
    return result


def settle_residual(
    prepared: Prepared,
    lp_charge: FloatArray,
    charge: FloatArray,
    discharge: FloatArray,
    *,
    time_limit_s: float,
    dive: bool = True,
) -> tuple[FloatArray, dict[str, float]]:
    """(charge, figures): the min-rate plan `charge` with the least energy lost.

    `lp_charge` is the LP's plan (what each car should get, `wanted_kwh`); `charge` and
    `discharge` the min-rate plan of the cheap moves. Cars that may discharge are left as they
    are. The MIP runs on growing sets of cells (`_cells`), each started from the best plan so
    far, until no energy is lost, the widest set is solved to optimality, or `time_limit_s`
    is spent. Figures: `repair_mip` (1 when it ran), `repair_mip_rounds`, `repair_mip_cells`
    (of the last round), `repair_mip_proven` (1 when what is left is the least any min-rate
    plan of the charge-only cars can lose: nothing, or the widest MIP's proven optimum),
    `repair_mip_kept` (1 when a MIP plan replaced the cheap moves'), `repair_mip_s` (wall),
    `repair_mip_too_big` (1 when even the first round has more than `FIRST_MAX_CELLS` cells:
    no MIP then).
    """
    started = time.perf_counter()
    lost = lost_kwh(prepared, lp_charge, charge, discharge)
    info: dict[str, float] = {"repair_mip": 0.0}
    losers = np.nonzero(lost > _ENERGY_TOL)[0]
    if not len(losers) or time_limit_s <= 0.0:
        return charge, info
    grids = _cells(prepared, lp_charge, charge, discharge, losers)
    if not grids:
        info["repair_mip_too_big"] = 1.0  # no round it could set up in its time
        return charge, info
    info.update(repair_mip=1.0, repair_mip_rounds=0.0, repair_mip_proven=0.0, repair_mip_kept=0.0)
    best, best_key = charge, (float(lost.sum()), _money(prepared, charge))
    for k, cells in enumerate(grids):
        left = time_limit_s - (time.perf_counter() - started)
        if left <= 0.0:
            break
        info["repair_mip_rounds"] += 1.0
        info["repair_mip_cells"] = float(len(cells[0]))
        solved = _solve(prepared, lp_charge, best, discharge, cells, left, dive=dive)
        if solved is not None and _valid(prepared, solved[0], discharge, best):
            candidate = solved[0]
            key = (
                float(lost_kwh(prepared, lp_charge, candidate, discharge).sum()),
                _money(prepared, candidate),
            )
            if key[0] < best_key[0] - 1e-9 or (
                key[0] <= best_key[0] + 1e-9 and key[1] < best_key[1] - 1e-9
            ):
                best, best_key = candidate, key
                info["repair_mip_kept"] = 1.0
        if best_key[0] <= _ENERGY_TOL:
            info["repair_mip_proven"] = 1.0
            break
        if solved is not None and solved[1] and k == len(grids) - 1:
            info["repair_mip_proven"] = 1.0
    info["repair_mip_s"] = time.perf_counter() - started
    return best, info


def lost_reasons(
    prepared: Prepared, lp_charge: FloatArray, charge: FloatArray, discharge: FloatArray
) -> dict[str, float]:
    """What a min-rate plan still loses against the LP, and why.

    `min_rate_lost_kwh` / `min_rate_lost_cars`: battery kWh (and cars) below `wanted_kwh`;
    of those, `min_rate_lost_below_one_slot_kwh` is lost by cars that want less than one slot
    at their minimum rate gives (then one full minimum-rate slot, a little more than needed,
    did not fit in the site's head-room or the battery), the rest by cars whose slots the site
    is too full to run at the minimum in.
    """
    lost = lost_kwh(prepared, lp_charge, charge, discharge)
    problem = prepared.problem
    one_slot = problem.eta_ch * problem.min_kw * float(problem.dt_h.max(initial=0.0))
    below = wanted_kwh(prepared, lp_charge) < one_slot - _ENERGY_TOL
    losing = lost > _ENERGY_TOL
    return {
        "min_rate_lost_kwh": float(lost[losing].sum()),
        "min_rate_lost_cars": float(losing.sum()),
        "min_rate_lost_below_one_slot_kwh": float(lost[losing & below].sum()),
    }


# -- the MIP -----------------------------------------------------------------------------------


def _gain(prepared: Prepared, charge: FloatArray) -> FloatArray:
    """(N,) battery kWh a charge plan adds before each car's departure."""
    problem = prepared.problem
    kwh = np.where(prepared.available, charge, 0.0) * problem.dt_h[None, :]
    result: FloatArray = problem.eta_ch * kwh.sum(axis=1)
    return result


def _money(prepared: Prepared, charge: FloatArray) -> float:
    problem = prepared.problem
    return float((charge.sum(axis=0) * problem.dt_h) @ problem.price_eur_per_kwh)


def _cells(
    prepared: Prepared,
    lp_charge: FloatArray,
    charge: FloatArray,
    discharge: FloatArray,
    losers: IntArray,
) -> list[tuple[IntArray, IntArray]]:
    """(cars, slots) of the MIP's columns, for each round: growing sets of free cells.

    A free cell: a charge-only car is there, may charge (not forced) and its bound allows at
    least the minimum. The rounds: (1) a neighbourhood (as in RINS) of the losers and the cars
    that charge where a loser charged in the LP's plan: the losers' cells, those slots, and
    the cells where the LP's plan and the cheap moves' differ or either runs below its
    bound; (2) every charge-only car present before the losers' last departure, in every
    slot until then; (3) those cars in all their slots. A wider round above `MAX_CELLS`
    cells is left out, a first round above `FIRST_MAX_CELLS` too (then there is no round).
    """
    problem = prepared.problem
    t_count = problem.n_slots
    free: BoolArray = (
        prepared.available
        & (prepared.lower_kw <= 0.0)
        & (prepared.upper_kw >= problem.min_kw[:, None] - _TOL)
        & (prepared.upper_kw > _TOL)
        & (discharge <= _TOL)
    )
    free[prepared.v2g | discharge.any(axis=1)] = False
    end = int(problem.departure_slot[losers].max())
    in_window: BoolArray = (np.arange(t_count) < end)[None, :]
    present: BoolArray = np.any(free[:, :end], axis=1)
    # The slots where a loser had energy in the LP's plan: where a trade can give it back.
    loser_slots: BoolArray = np.any(lp_charge[losers] > _TOL, axis=0)
    upper = prepared.upper_kw
    partial = ((lp_charge > _TOL) & (lp_charge < upper - _TOL)) | (
        (charge > _TOL) & (charge < upper - _TOL)
    )
    moved = np.abs(lp_charge - charge) > _TOL
    near: BoolArray = partial | moved | loser_slots[None, :]
    near[losers] = True
    sharing: BoolArray = np.any((charge + lp_charge)[:, loser_slots] > _TOL, axis=1)
    sharing[losers] = True
    rounds: list[BoolArray] = [
        free & (present & sharing)[:, None] & in_window & near,
        free & present[:, None] & in_window,
        free & present[:, None],
    ]
    result: list[tuple[IntArray, IntArray]] = []
    last = -1
    for k, grid in enumerate(rounds):
        size = int(grid.sum())
        if size == last or size > (MAX_CELLS if k > 0 else FIRST_MAX_CELLS):
            continue
        last = size
        cars, slots = np.nonzero(grid)
        result.append((cars.astype(np.int64), slots.astype(np.int64)))
    return result


def _solve(
    prepared: Prepared,
    lp_charge: FloatArray,
    charge: FloatArray,
    discharge: FloatArray,
    cells: tuple[IntArray, IntArray],
    time_limit_s: float,
    *,
    dive: bool = True,
    mip: bool = True,
) -> tuple[FloatArray, bool] | None:
    """(charge plan, proven optimal) of the MIP over `cells`, or None (no solution in time).

    `dive`: start the MIP from `_dive`'s plan when it loses less than `charge`; `mip=False`
    returns the dive's plan alone (not time-boxed; None when it loses no less than `charge`).

    Columns: grid kWh x per cell (semi-continuous where the charger has a minimum), then one
    shortfall column per car. Rows: per slot, the site (the cells' kWh within head-room and
    export limit less the fixed rest); per car, its battery kWh plus shortfall >= want, and
    its battery kWh <= the room its battery has.
    """
    problem = prepared.problem
    dt = problem.dt_h
    car_of, slot_of = cells
    n_x = len(car_of)
    cars, car_row = np.unique(car_of, return_inverse=True)
    slots, slot_row = np.unique(slot_of, return_inverse=True)
    n_cars, n_slots = len(cars), len(slots)
    varied = np.zeros_like(charge, dtype=bool)
    varied[car_of, slot_of] = True
    fixed = np.where(varied, 0.0, charge)
    fixed_net = fixed.sum(axis=0) - discharge.sum(axis=0)
    export = problem.export_limit_kw if prepared.any_v2g else 0.0

    minimum = problem.min_kw[car_of] * dt[slot_of]
    upper = prepared.upper_kw[car_of, slot_of] * dt[slot_of]
    semi = (minimum > 1e-9) & (minimum < upper)
    lower = np.where(semi, minimum, 0.0)
    upper = np.maximum(upper, lower)
    eta = problem.eta_ch[car_of]

    want = wanted_kwh(prepared, lp_charge)[cars]
    fixed_gain = _gain(prepared, fixed)[cars]
    room = np.maximum(problem.capacity_kwh[cars], problem.energy_kwh[cars])
    room = np.maximum(room - problem.energy_kwh[cars] - fixed_gain, 0.0)
    short_needed = np.maximum(want - fixed_gain, 0.0)

    n_cols = n_x + n_cars
    price = problem.price_eur_per_kwh[slot_of]
    cost = np.concatenate([np.zeros(n_x), np.ones(n_cars)])  # first pass: the shortfall
    col_lower = np.concatenate([lower, np.zeros(n_cars)])
    col_upper = np.concatenate([upper, short_needed])
    # Rows: site slots, then each car's want (x + s >= want), then its room (x <= room).
    site_rows = slot_row
    want_rows = n_slots + car_row
    room_rows = n_slots + n_cars + car_row
    rows = np.concatenate([site_rows, want_rows, room_rows, n_slots + np.arange(n_cars)]).astype(
        np.int32
    )
    cols = np.concatenate(
        [np.arange(n_x), np.arange(n_x), np.arange(n_x), n_x + np.arange(n_cars)]
    ).astype(np.int32)
    vals = np.concatenate([np.ones(n_x), eta, eta, np.ones(n_cars)])
    cap = prepared.headroom_kw[slots] - fixed_net[slots]
    floor = -export - fixed_net[slots]
    row_lower = np.concatenate([floor * dt[slots], short_needed, np.full(n_cars, -np.inf)])
    row_upper = np.concatenate([np.maximum(cap, 0.0) * dt[slots], np.full(n_cars, np.inf), room])
    n_rows = n_slots + 2 * n_cars
    matrix = sparse.csc_matrix((vals, (rows, cols)), shape=(n_rows, n_cols))

    deadline = time.perf_counter() + time_limit_s
    lp = column_lp(matrix, cost, col_lower, col_upper, row_lower, row_upper)
    start = charge[car_of, slot_of] * dt[slot_of]
    gained = np.bincount(car_row, weights=eta * start, minlength=n_cars)
    incumbent = np.concatenate([start, np.maximum(short_needed - gained, 0.0)])
    # A dive on the relaxation first: a min-rate plan that often loses nothing, found in a few
    # warm LPs; the better of it and the plan so far starts the MIP (and is what is returned
    # when the MIP finds nothing better in its time).
    dive_end = time.perf_counter() + time_limit_s * DIVE_SHARE if mip else float("inf")
    dived = _dive(lp, semi, minimum, upper, n_x, dive_end) if dive or not mip else None
    if dived is not None and dived[n_x:].sum() < incumbent[n_x:].sum() - _ENERGY_TOL / 10:
        incumbent = dived
    if not mip:
        if incumbent is not dived:
            return None
        return _plan(fixed, dived[:n_x], cells, dt, semi, minimum, upper), False
    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("time_limit", max(deadline - time.perf_counter(), 1e-3))
    for key, value in _HIGHS_OPTIONS.items():
        highs.setOptionValue(key, value)
    kinds = highspy.HighsVarType
    lp.integrality_ = [kinds.kSemiContinuous if s else kinds.kContinuous for s in semi.tolist()] + [
        kinds.kContinuous
    ] * n_cars
    if highs.passModel(lp) == highspy.HighsStatus.kError:
        return None
    x_cols = np.arange(n_x, dtype=np.int32)
    s_cols = (n_x + np.arange(n_cars)).astype(np.int32)
    # Energy first: the shortfall alone (a plan that loses nothing ends the search at once).
    _start(highs, incumbent)
    if highs.run() == highspy.HighsStatus.kError:
        return None
    found = int(highs.getInfo().primal_solution_status) == 2
    energy_optimal = found and highs.getModelStatus() == highspy.HighsModelStatus.kOptimal
    values = np.asarray(highs.getSolution().col_value, dtype=float) if found else incumbent
    if found and values[n_x:].sum() > incumbent[n_x:].sum() + _ENERGY_TOL / 10:
        values = incumbent  # HiGHS ran out of time before it took the start
    if not found and incumbent is not dived:
        return None  # nothing better than the plan so far
    shortfall = float(values[n_x:].sum())
    if energy_optimal:
        # Then money, among the plans that lose no more, for what is left of the time.
        highs.changeColsCost(n_x, x_cols, price)
        highs.changeColsCost(n_cars, s_cols, np.zeros(n_cars))
        highs.addRow(-np.inf, shortfall + _ENERGY_TOL / 10, n_cars, s_cols, np.ones(n_cars))
        left = deadline - time.perf_counter()
        if left > 0.0:
            highs.setOptionValue("time_limit", highs.getRunTime() + min(left, MONEY_S))
            _start(highs, values)
            if highs.run() != highspy.HighsStatus.kError:
                if int(highs.getInfo().primal_solution_status) == 2:
                    values = np.asarray(highs.getSolution().col_value, dtype=float)
    return _plan(fixed, values[:n_x], cells, dt, semi, minimum, upper), bool(energy_optimal)


def _plan(
    fixed: FloatArray,
    x: FloatArray,
    cells: tuple[IntArray, IntArray],
    dt: FloatArray,
    semi: BoolArray,
    minimum: FloatArray,
    upper: FloatArray,
) -> FloatArray:
    """The charge plan (kW): `fixed` with the cells' kWh `x` put in, HiGHS's round-off snapped
    (0, or at least the minimum and at most the bound)."""
    car_of, slot_of = cells
    x = np.where(x <= 1e-9, 0.0, np.clip(x, np.where(semi, minimum, 0.0), upper))
    plan = fixed.copy()
    plan[car_of, slot_of] = x / dt[slot_of]
    return plan


def dive_residual(
    prepared: Prepared, lp_charge: FloatArray, charge: FloatArray, discharge: FloatArray
) -> FloatArray | None:
    """The dive alone (`_dive`, no MIP, not time-boxed) on the MIP's first set of cells: a
    min-rate charge plan that loses less energy than `charge`, or None (none found, or it is
    not valid). For tests and measurements of what the dive gives when the MIP has no time."""
    lost = lost_kwh(prepared, lp_charge, charge, discharge)
    losers = np.nonzero(lost > _ENERGY_TOL)[0]
    if not len(losers):
        return None
    grids = _cells(prepared, lp_charge, charge, discharge, losers)
    if not grids:
        return None
    solved = _solve(prepared, lp_charge, charge, discharge, grids[0], 0.0, mip=False)
    if solved is None or not _valid(prepared, solved[0], discharge, charge):
        return None
    return solved[0]


def _dive(
    lp: Any,
    semi: BoolArray,
    minimum: FloatArray,
    upper: FloatArray,
    n_x: int,
    deadline: float,
) -> FloatArray | None:
    """A min-rate solution of the MIP's first pass by diving on its relaxation, or None.

    The relaxation (every cell continuous in [0, U dt]) is solved, warm after each change,
    until no cell is left strictly between 0 and its minimum. Each time, every such cell is
    first rounded at once (on, i.e. at least its minimum, when it is at least half of it, else
    off); when that raises the relaxation's shortfall the rounding is undone and only the cell
    nearest its minimum is fixed, the way (on or off) that leaves the least shortfall. The
    shortfall columns absorb what the fixings cost, so the dive ends with a plan, unless
    `deadline` (perf_counter) passes or `DIVE_FIXES` single fixings were needed (then None).
    """
    relax = highspy.Highs()
    relax.setOptionValue("output_flag", False)
    relax.setOptionValue(
        "primal_feasibility_tolerance", _HIGHS_OPTIONS["primal_feasibility_tolerance"]
    )
    if relax.passModel(lp) == highspy.HighsStatus.kError:
        return None
    # The MIP's semi-continuous columns carry their minimum as lower bound: relax it to 0.
    free = semi.copy()
    cols = np.flatnonzero(free).astype(np.int32)
    relax.changeColsBounds(len(cols), cols, np.zeros(len(cols)), upper[cols].astype(float))
    optimal = highspy.HighsModelStatus.kOptimal
    shortfall = _relaxed_shortfall(relax, optimal)
    for _ in range(DIVE_FIXES + 1):
        if shortfall == float("inf") or time.perf_counter() > deadline:
            return None
        values = np.asarray(relax.getSolution().col_value, dtype=float)
        x = values[:n_x]
        between = free & (x > _DIVE_TOL) & (x < minimum - _DIVE_TOL)
        if not between.any():
            return values
        cols = np.flatnonzero(between).astype(np.int32)
        on = x[cols] >= minimum[cols] / 2
        relax.changeColsBounds(
            len(cols), cols, np.where(on, minimum[cols], 0.0), np.where(on, upper[cols], 0.0)
        )
        rounded = _relaxed_shortfall(relax, optimal)
        if rounded <= shortfall + _DIVE_TOL:
            free[cols] = False
            shortfall = rounded
            continue
        relax.changeColsBounds(len(cols), cols, np.zeros(len(cols)), upper[cols].astype(float))
        j = int(np.argmax(np.where(between, x / np.maximum(minimum, _DIVE_TOL), -1.0)))
        free[j] = False
        relax.changeColBounds(j, float(minimum[j]), float(upper[j]))
        lifted = _relaxed_shortfall(relax, optimal)
        relax.changeColBounds(j, 0.0, 0.0)
        shortfall = _relaxed_shortfall(relax, optimal)
        if lifted < shortfall - _DIVE_TOL or (
            lifted <= shortfall + _DIVE_TOL and x[j] >= minimum[j] / 2
        ):
            relax.changeColBounds(j, float(minimum[j]), float(upper[j]))
            shortfall = _relaxed_shortfall(relax, optimal)
    return None


def _relaxed_shortfall(relax: Any, optimal: Any) -> float:
    """The relaxation's least shortfall under its current bounds (inf: infeasible)."""
    if relax.run() == highspy.HighsStatus.kError or relax.getModelStatus() != optimal:
        return float("inf")
    return float(relax.getInfo().objective_function_value)


def _valid(
    prepared: Prepared, charge: FloatArray, discharge: FloatArray, before: FloatArray
) -> bool:
    """Whether a plan keeps head-room, bounds and battery capacity, and has no more setpoints
    below the minimum than the plan `before` it."""
    problem = prepared.problem
    net = charge.sum(axis=0) - discharge.sum(axis=0)
    if np.any(net > prepared.headroom_kw + 1e-6):
        return False
    if np.any(charge > prepared.upper_kw + _TOL) or np.any(charge < -_TOL):
        return False
    minimum = problem.min_kw[:, None]
    unforced = prepared.lower_kw <= 0.0
    if _below_minimum(charge, minimum, unforced) > _below_minimum(before, minimum, unforced):
        return False
    charge_only = ~prepared.v2g
    top = np.maximum(problem.capacity_kwh, problem.energy_kwh)
    gained = problem.energy_kwh + _gain(prepared, charge)
    return not np.any(charge_only & (gained > top + 1e-6))


def _below_minimum(charge: FloatArray, minimum: FloatArray, unforced: BoolArray) -> int:
    return int((unforced & (charge > _TOL) & (charge < minimum - _TOL)).sum())


def _start(highs: Any, values: FloatArray) -> None:
    """Give the MIP a starting solution (HiGHS checks it and ignores it if infeasible)."""
    solution = highspy.HighsSolution()
    solution.col_value = values
    solution.value_valid = True
    highs.setSolution(solution)
