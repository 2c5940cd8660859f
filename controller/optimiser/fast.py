"""The fast exact path: the compact LP on HiGHS, loaded once per layout and warm-started.

One `FastSolver` keeps the HiGHS model of the last problem. A problem with the same layout (same
cars, departures, V2G flags, horizon) only changes bounds, prices and a few coefficients of the
loaded model, and the dual simplex restarts from the last optimal basis. A problem with another
layout gets a new model whose starting basis is the last one matched column by column (by
vehicle and slot time); on a cold start without V2G it is the basis of a min-cost-flow solution
of the transportation problem (`controller.optimiser.flow`). Either way the answer is HiGHS's
simplex optimum on the exact floating-point data, never the flow's rounded one.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import highspy as _highspy
import numpy as np

from controller.domain import SLOT_S, slot_floor
from controller.optimiser.flow import flow_basis
from controller.optimiser.model import (
    INF,
    Layout,
    Values,
    build_layout,
    build_values,
    layout_key,
    shortfall_scaled,
)
from controller.optimiser.options import DEFAULT_OPTIONS, OptimiserOptions
from controller.optimiser.prepare import Prepared, prepare
from controller.optimiser.repair import repair_min_rate
from controller.optimiser.stages import OptimiserFailed, StageResult, clean, finish, site_profile
from controller.planning.problem import FloatArray, IntArray, PlanningProblem, Schedule

# highspy's bundled stubs lack several methods used here (changeRowsBounds, ...): use it untyped.
highspy: Any = _highspy

_STATUS = highspy.HighsBasisStatus
_LOWER, _BASIC, _UPPER, _ZERO = (
    int(_STATUS.kLower),
    int(_STATUS.kBasic),
    int(_STATUS.kUpper),
    int(_STATUS.kZero),
)
_BY_CODE = {int(s): s for s in (_STATUS.kLower, _STATUS.kBasic, _STATUS.kUpper, _STATUS.kZero)}


@dataclass(slots=True)
class _Loaded:
    """A HiGHS model in memory with the layout and values it holds now."""

    highs: Any  # highspy.Highs
    layout: Layout
    values: Values
    objective: FloatArray  # the column costs loaded now
    cost_basis: Any = None  # highspy.HighsBasis: optimal basis of the last money stage
    prices: FloatArray | None = None  # the import prices of the problem it holds
    first_slot: int = 0  # absolute index of that problem's first slot
    # The bounds HiGHS holds now (every change goes through `_cols`/`_rows`), so that a new
    # problem only sends what differs: at 20,000 cars, a million columns.
    col_lower: FloatArray = field(default_factory=lambda: np.zeros(0))
    col_upper: FloatArray = field(default_factory=lambda: np.zeros(0))
    row_lower: FloatArray = field(default_factory=lambda: np.zeros(0))
    row_upper: FloatArray = field(default_factory=lambda: np.zeros(0))
    at_cost_basis: bool = False  # HiGHS's basis is the money stage's (nothing ran after it)


class FastSolver:
    """Solves `PlanningProblem`s with HiGHS, keeping the last model and basis for the next one.

    Thread-safe: calls are serialised (one HiGHS model, one basis).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._codes: dict[str, int] = {}
        self._loaded: _Loaded | None = None
        self.last_start = ""  # how the last solve started: "warm", "remapped", "flow", "cold"

    def solve(self, problem: PlanningProblem, options: OptimiserOptions | None = None) -> Schedule:
        """The lexicographically optimal schedule of `problem` (see `controller.optimiser`)."""
        options = options or DEFAULT_OPTIONS
        started = time.perf_counter()
        prepared = prepare(problem)
        with self._lock:
            result, repaired = self._solve(prepared, options)
        return finish(
            prepared, result, options, elapsed_s=time.perf_counter() - started, repaired=repaired
        )

    def forget(self) -> None:
        """Drop the loaded model (the next solve starts cold)."""
        with self._lock:
            self._loaded = None

    # -- loading ----------------------------------------------------------------------------

    def _solve(
        self, prepared: Prepared, options: OptimiserOptions
    ) -> tuple[StageResult, tuple[FloatArray, FloatArray, dict[str, float]] | None]:
        problem = prepared.problem
        if problem.n_vehicles == 0:
            return _empty(prepared, "highs"), None
        try:
            return self._attempt(prepared, options, warm=options.warm_start)
        except OptimiserFailed:
            self._loaded = None
            if not options.warm_start:
                raise
            # A warm start that runs into the time limit is retried once from scratch.
            return self._attempt(prepared, options, warm=False)

    def _attempt(
        self, prepared: Prepared, options: OptimiserOptions, *, warm: bool
    ) -> tuple[StageResult, tuple[FloatArray, FloatArray, dict[str, float]] | None]:
        problem = prepared.problem
        first_slot = int(slot_floor(problem.start).timestamp() // SLOT_S)
        key = layout_key(prepared, first_slot)
        loaded = self._loaded if warm else None
        if loaded is not None and loaded.layout.key == key:
            values = build_values(loaded.layout, prepared)
            repriced = _repriced(loaded, problem.price_eur_per_kwh, first_slot)
            _update(loaded, values)
            self.last_start = "warm"
            basis = None
            # (With V2G the flow's plan, which never discharges, is a worse start than the old
            # basis: measured 4,870 pivots against 500 at 278 cars.)
            if repriced and options.flow_start and not loaded.layout.any_v2g:
                # New prices reorder the cheap slots: a fresh flow beats thousands of pivots.
                basis = flow_basis(loaded.layout, values, prepared)
            if basis is not None and _set_basis(loaded.highs, *basis):
                self.last_start = "flow"
            elif loaded.cost_basis is not None and not loaded.at_cost_basis:
                loaded.highs.setBasis(loaded.cost_basis)
        else:
            layout = build_layout(prepared, self._vehicle_codes(problem.vehicle_ids), first_slot)
            values = build_values(layout, prepared)
            highs = _new_highs(layout, values, options)
            basis = None
            self.last_start = "cold"
            repriced = loaded is None or _repriced(loaded, problem.price_eur_per_kwh, first_slot)
            if options.flow_start and repriced and not layout.any_v2g:
                basis = flow_basis(layout, values, prepared)
                self.last_start = "flow"
            if basis is None and loaded is not None:
                basis = _remap(loaded, layout, values)
                self.last_start = "remapped"
            if basis is not None and not _set_basis(highs, *basis):
                self.last_start = "cold"
            if basis is None:
                self.last_start = "cold"
            loaded = _Loaded(
                highs,
                layout,
                values,
                np.zeros(layout.n_cols),
                col_lower=values.col_lower.copy(),
                col_upper=values.col_upper.copy(),
                row_lower=values.row_lower.copy(),
                row_upper=values.row_upper.copy(),
            )
        loaded.prices = problem.price_eur_per_kwh.copy()
        loaded.first_slot = first_slot
        self._loaded = loaded if options.warm_start else None
        result = _stages(loaded, prepared, options, flatten=not options.min_rate_repair)
        repaired = None
        if options.min_rate_repair:
            repaired = _repair_rounds(loaded, prepared, options, result)
        return result, repaired

    def _vehicle_codes(self, vehicle_ids: tuple[str, ...]) -> IntArray:
        codes = self._codes
        if len(codes) > 1_000_000:  # a long-lived process seeing ever new ids: start afresh
            codes.clear()
            self._loaded = None
        for vid in vehicle_ids:
            if vid not in codes:
                codes[vid] = len(codes) + 1
        return np.fromiter((codes[v] for v in vehicle_ids), dtype=np.int64, count=len(vehicle_ids))


def _repriced(loaded: _Loaded, prices: FloatArray, first_slot: int) -> bool:
    """Whether the import prices differ from the loaded problem's on the slots both cover."""
    if loaded.prices is None:
        return True
    shift = first_slot - loaded.first_slot
    if shift < 0 or shift >= len(loaded.prices):
        return True
    overlap = min(len(loaded.prices) - shift, len(prices))
    return not np.array_equal(loaded.prices[shift : shift + overlap], prices[:overlap])


def _new_highs(layout: Layout, values: Values, options: OptimiserOptions) -> Any:
    """A HiGHS instance holding the layout's matrix with `values`."""
    from scipy import sparse

    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("time_limit", float(options.time_limit_s))
    rows = np.concatenate([layout.fixed_rows, layout.var_rows])
    cols = np.concatenate([layout.fixed_cols, layout.var_cols])
    vals = np.concatenate([layout.fixed_vals, values.coeffs])
    keep = vals != 0.0
    matrix = sparse.csc_matrix(
        (vals[keep], (rows[keep], cols[keep])), shape=(layout.n_rows, layout.n_cols)
    )
    matrix.sum_duplicates()
    lp = highspy.HighsLp()
    lp.num_col_ = layout.n_cols
    lp.num_row_ = layout.n_rows
    lp.col_cost_ = np.zeros(layout.n_cols)
    lp.col_lower_ = values.col_lower
    lp.col_upper_ = values.col_upper
    lp.row_lower_ = values.row_lower
    lp.row_upper_ = values.row_upper
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = matrix.indptr.astype(np.int32)
    lp.a_matrix_.index_ = matrix.indices.astype(np.int32)
    lp.a_matrix_.value_ = matrix.data
    status = highs.passModel(lp)
    if status == highspy.HighsStatus.kError:
        raise OptimiserFailed("HiGHS refused the model")
    return highs


def _update(loaded: _Loaded, values: Values) -> None:
    """Load `values` into the model in place (the bounds and coefficients that changed)."""
    highs, layout = loaded.highs, loaded.layout
    _apply(loaded, values)
    changed = np.nonzero(values.coeffs != loaded.values.coeffs)[0]
    for k in changed:
        highs.changeCoeff(int(layout.var_rows[k]), int(layout.var_cols[k]), float(values.coeffs[k]))
    loaded.values = values


def _apply(loaded: _Loaded, values: Values) -> None:
    """Make HiGHS's bounds those of `values`, sending only the ones that differ."""
    cols = np.nonzero(
        (values.col_lower != loaded.col_lower) | (values.col_upper != loaded.col_upper)
    )[0]
    _cols(loaded, cols, values.col_lower[cols], values.col_upper[cols])
    rows = np.nonzero(
        (values.row_lower != loaded.row_lower) | (values.row_upper != loaded.row_upper)
    )[0]
    _rows(loaded, rows, values.row_lower[rows], values.row_upper[rows])


def _cols(loaded: _Loaded, cols: IntArray, lower: FloatArray, upper: FloatArray) -> None:
    """Change column bounds (and remember them)."""
    if len(cols):
        loaded.highs.changeColsBounds(
            len(cols),
            np.asarray(cols, dtype=np.int32),
            np.asarray(lower, dtype=float),
            np.asarray(upper, dtype=float),
        )
        loaded.col_lower[cols] = lower
        loaded.col_upper[cols] = upper


def _rows(loaded: _Loaded, rows: IntArray, lower: FloatArray, upper: FloatArray) -> None:
    """Change row bounds (and remember them)."""
    if len(rows):
        loaded.highs.changeRowsBounds(
            len(rows),
            np.asarray(rows, dtype=np.int32),
            np.asarray(lower, dtype=float),
            np.asarray(upper, dtype=float),
        )
        loaded.row_lower[rows] = lower
        loaded.row_upper[rows] = upper


def _one(value: float) -> FloatArray:
    return np.array([value], dtype=float)


def _index(i: int) -> IntArray:
    return np.array([i], dtype=np.int64)


def _set_basis(highs: Any, col_status: IntArray, row_status: IntArray) -> bool:
    """Give HiGHS a starting basis; False if it refused it."""
    basis = highspy.HighsBasis()
    basis.col_status = [_BY_CODE[int(c)] for c in col_status.tolist()]
    basis.row_status = [_BY_CODE[int(c)] for c in row_status.tolist()]
    basis.valid = True
    return bool(highs.setBasis(basis) != highspy.HighsStatus.kError)


def _status_codes(statuses: list[Any]) -> IntArray:
    return np.fromiter((int(s) for s in statuses), dtype=np.int8, count=len(statuses)).astype(
        np.int64
    )


def _remap(loaded: _Loaded, layout: Layout, values: Values) -> tuple[IntArray, IntArray] | None:
    """The loaded model's basis carried over to `layout` by column and row identity."""
    basis = loaded.cost_basis or loaded.highs.getBasis()
    if not basis.valid:
        return None
    old_cols = _status_codes(basis.col_status)
    old_rows = _status_codes(basis.row_status)
    col_status = _carry(loaded.layout.col_keys, old_cols, layout.col_keys, _LOWER)
    row_status = _carry(loaded.layout.row_keys, old_rows, layout.row_keys, _BASIC)
    return _consistent(col_status, row_status, values, layout.n_rows)


def _carry(old_keys: IntArray, old_status: IntArray, new_keys: IntArray, default: int) -> IntArray:
    status = np.full(len(new_keys), default, dtype=np.int64)
    _, new_at, old_at = np.intersect1d(new_keys, old_keys, assume_unique=True, return_indices=True)
    status[new_at] = old_status[old_at]
    return status


def _consistent(
    col_status: IntArray, row_status: IntArray, values: Values, n_rows: int
) -> tuple[IntArray, IntArray]:
    """Fix a carried-over basis: nonbasic at a finite bound, exactly `n_rows` basic."""
    for status, lower, upper in (
        (col_status, values.col_lower, values.col_upper),
        (row_status, values.row_lower, values.row_upper),
    ):
        nonbasic = status != _BASIC
        has_lower, has_upper = np.isfinite(lower), np.isfinite(upper)
        want_lower = nonbasic & (
            ((status == _LOWER) & has_lower) | ((status != _LOWER) & ~has_upper & has_lower)
        )
        want_upper = nonbasic & ~want_lower & has_upper
        status[nonbasic] = _ZERO
        status[want_lower] = _LOWER
        status[want_upper] = _UPPER
    excess = int((col_status == _BASIC).sum() + (row_status == _BASIC).sum()) - n_rows
    if excess > 0:
        # Too many basic: demote basic columns (latest first) to a bound.
        demote = np.nonzero(col_status == _BASIC)[0][::-1][:excess]
        col_status[demote] = np.where(
            np.isfinite(values.col_lower[demote]),
            _LOWER,
            np.where(np.isfinite(values.col_upper[demote]), _UPPER, _ZERO),
        )
    elif excess < 0:
        # Too few: make nonbasic rows basic (their slacks take up the difference).
        promote = np.nonzero(row_status != _BASIC)[0][:-excess]
        row_status[promote] = _BASIC
    return col_status, row_status


# -- the stages -------------------------------------------------------------------------------


def _stages(
    loaded: _Loaded,
    prepared: Prepared,
    options: OptimiserOptions,
    *,
    save_basis: bool = True,
    values: Values | None = None,
    flatten: bool = True,
    soften: bool = True,
) -> StageResult:
    """Run the lexicographic stages on the loaded model (targets hard first).

    `flatten=False` stops after the money stage (the min-rate repair flattens once, at its end);
    `soften=False` fails at once if the targets cannot all be met (a repair pattern that costs
    energy is not worth the soft stages).
    """
    highs, layout = loaded.highs, loaded.layout
    values = values or loaded.values
    counter = _Counter(options.time_limit_s)
    _objective(loaded, values.cost_vector)
    status = _run(highs, counter)
    shortfall, worst = 0.0, 0.0
    if status not in ("optimal", "infeasible"):
        _expect(status, "cost stage")
    if status == "infeasible" and not soften:
        raise OptimiserFailed("targets not reachable with these bounds")
    if status == "infeasible":
        # Some target cannot be met inside h_t: free the shortfall columns and rank.
        scaled = shortfall_scaled(layout, prepared)
        _cols(loaded, scaled, np.zeros(len(scaled)), np.ones(len(scaled)))
        _objective(loaded, values.short_vector)
        _expect(_run(highs, counter), "shortfall stage")
        shortfall = _objective_value(highs)
        _rows(
            loaded, _index(layout.short_row), _one(-INF), _one(shortfall + options.slack(shortfall))
        )
        if options.fairness and shortfall > options.feasibility_tolerance_kwh:
            objective = np.zeros(layout.n_cols)
            objective[layout.z_col] = 1.0
            _objective(loaded, objective)
            _expect(_run(highs, counter), "fairness stage")
            worst = _objective_value(highs)
            _cols(
                loaded,
                _index(layout.z_col),
                _one(0.0),
                _one(min(1.0, worst + options.slack(worst))),
            )
        _objective(loaded, values.cost_vector)
        _expect(_run(highs, counter), "cost stage")
    cost = _objective_value(highs)
    if save_basis:
        loaded.cost_basis = highs.getBasis()
    loaded.at_cost_basis = save_basis
    solution = highs.getSolution()
    g_slice = slice(layout.g0, layout.g0 + layout.t_count)
    net = np.asarray(solution.col_value[g_slice])
    price = np.maximum(0.0, -np.asarray(solution.col_dual[g_slice]))
    charge, discharge = _powers(layout, prepared, np.asarray(solution.col_value))
    peak, ramp = site_profile(charge, discharge)
    result = StageResult(
        charge_kw=charge,
        discharge_kw=discharge,
        shortfall_kwh=shortfall,
        max_relative_shortfall=worst,
        cost_eur=cost,
        cost_stage_peak_kw=float(max(0.0, net.max(initial=0.0))),
        cost_stage_ramp_kw=float(np.abs(np.diff(net)).sum()),
        peak_kw=peak,
        ramp_kw=ramp,
        headroom_price_eur_per_kw=price,
        status="optimal" if shortfall <= options.feasibility_tolerance_kwh else "optimal_shortfall",
        solver="highs",
        solves=counter.solves,
        iterations=counter.iterations,
    )
    if flatten and options.peak_flattening:
        _flatten(loaded, prepared, options, result, values, None, solution)
    return result


def _flatten(
    loaded: _Loaded,
    prepared: Prepared,
    options: OptimiserOptions,
    result: StageResult,
    values: Values,
    idle: IntArray | None,
    solution: Any,
) -> None:
    """The second stage, from the money stage's optimum loaded now: least peak, least ramps.

    Among the cost-optimal plans means on the money stage's optimal face (every column and row
    with a non-zero dual stays where it is) and, as a guard, money <= optimum + slack. `idle`
    columns that the money stage left at 0 stay at 0 (the min-rate repair's undecided slots).
    Updates `result` in place.
    """
    highs, layout = loaded.highs, loaded.layout
    counter = _Counter(options.time_limit_s)
    loaded.at_cost_basis = False
    highs.setOptionValue("simplex_strategy", 4)  # primal: the basis stays feasible
    try:
        _fix_face(loaded, solution, values)
        if idle is not None and len(idle):
            unused = idle[np.asarray(solution.col_value)[idle] <= 1e-12]
            zeros = np.zeros(len(unused))
            _cols(loaded, unused, zeros, zeros)
        cost = result.cost_eur
        _rows(loaded, _index(layout.cost_row), _one(-INF), _one(cost + options.slack(cost)))
        objective = np.zeros(layout.n_cols)
        objective[layout.k_col] = 1.0
        _objective(loaded, objective)
        _expect(_run(highs, counter), "peak stage")
        result.peak_kw = _objective_value(highs)
        solution = highs.getSolution()
        if options.ramp_smoothing and layout.t_count > 1:
            _fix_face(loaded, solution, values)
            peak = result.peak_kw + options.slack(result.peak_kw)
            _cols(loaded, _index(layout.k_col), _one(0.0), _one(peak))
            objective = np.zeros(layout.n_cols)
            objective[layout.r0 : layout.r0 + layout.t_count - 1] = 1.0
            _objective(loaded, objective)
            _expect(_run(highs, counter), "ramp stage")
            result.ramp_kw = _objective_value(highs)
            solution = highs.getSolution()
    finally:
        highs.setOptionValue("simplex_strategy", 1)
    result.charge_kw, result.discharge_kw = _powers(
        layout, prepared, np.asarray(solution.col_value)
    )
    result.solves += counter.solves
    result.iterations += counter.iterations


def _repair_rounds(
    loaded: _Loaded, prepared: Prepared, options: OptimiserOptions, result: StageResult
) -> tuple[FloatArray, FloatArray, dict[str, float]]:
    """Min-rate repair by re-solving.

    Each sliver (0 < power < min, charge or discharge) is decided on (>= min) or off (0),
    every running slot keeps >= min, and the whole lexicographic solve runs again with these
    bounds, so the LP itself moves a sliver's energy where it costs least. Slots not yet
    decided cost a hair more in the money stage and those left idle by it are frozen before
    the flattening stages (which would otherwise spread load into new slivers). Up to three
    rounds, then the greedy repair of `repair_min_rate` for whatever is left."""
    layout, values = loaded.layout, loaded.values
    p = prepared.problem
    nx, nv = layout.nx, layout.nv
    cols = np.concatenate([np.arange(nx), layout.v0 + np.arange(nv)]).astype(np.int64)
    car = np.concatenate([layout.x_car, layout.v_car])
    slot = np.concatenate([layout.x_slot, layout.v_slot])
    is_charge = np.arange(len(cols)) < nx
    dt = p.dt_h[slot]
    minimum = p.min_kw[car]
    base_lower, base_upper = values.col_lower[cols], values.col_upper[cols]
    usable = base_upper >= minimum * dt - 1e-12
    forced = base_lower > 0.0
    lower, upper = base_lower.copy(), base_upper.copy()
    charge, discharge = result.charge_kw, result.discharge_kw
    rounds = 0
    good, good_cost = values, result.cost_eur
    good_basis = loaded.cost_basis
    current_is_good = True  # the model holds the money-stage optimum of `good` now
    tie_break = 1e-5 * (1.0 + float(np.abs(values.cost_vector).max(initial=0.0)))
    for _ in range(3):
        power = np.concatenate(
            [charge[layout.x_car, layout.x_slot], discharge[layout.v_car, layout.v_slot]]
        )
        sliver = (power > 1e-7) & (power < minimum - 1e-7) & ~forced
        if not sliver.any():
            break
        running = (power >= minimum - 1e-7) & ~forced & usable
        # On: the sliver is at least half the minimum, or (charge) the other cars running in
        # its slot can give up the difference, which the LP then takes at the same slot price.
        spare = np.bincount(
            slot[is_charge],
            weights=np.where(running, power - minimum, 0.0)[is_charge],
            minlength=layout.t_count,
        )
        helped = is_charge & (spare[slot] >= minimum - power)
        on = sliver & usable & ((power >= 0.5 * minimum) | helped)
        lower = np.where(running | on, np.maximum(lower, minimum * dt), lower)
        upper = np.where(sliver & ~on, lower, upper)
        # Charge forced on must fit the head-room and the battery; where not, it goes off.
        load = np.bincount(slot[is_charge], weights=lower[is_charge], minlength=layout.t_count)
        crowded = is_charge & (load[slot] > prepared.headroom_kw[slot] * dt + 1e-9)
        energy = np.bincount(
            car[is_charge], weights=(lower * p.eta_ch[car])[is_charge], minlength=layout.n
        )
        full = is_charge & (energy[car] > prepared.room_kwh[car] + 1e-9)
        undo = on & (crowded | full)
        lower = np.where(undo, base_lower, lower)
        upper = np.where(undo, base_lower, upper)
        undecided = ~forced & (upper > lower) & (lower <= 0.0)
        cost_vector = values.cost_vector.copy()
        cost_vector[cols[undecided]] += tie_break
        col_lower, col_upper = values.col_lower.copy(), values.col_upper.copy()
        col_lower[cols], col_upper[cols] = lower, upper
        bounded = Values(
            col_lower=col_lower,
            col_upper=col_upper,
            row_lower=values.row_lower,
            row_upper=values.row_upper,
            coeffs=values.coeffs,
            cost_vector=cost_vector,
            short_vector=values.short_vector,
        )
        _apply(loaded, bounded)
        current_is_good = False
        loaded.at_cost_basis = False
        if loaded.cost_basis is not None:
            # The money stage's basis stays dual feasible under new bounds: a few dual pivots.
            loaded.highs.setBasis(loaded.cost_basis)
        try:
            again = _stages(
                loaded,
                prepared,
                options,
                save_basis=False,
                values=bounded,
                flatten=False,
                soften=not result.feasible,
            )
        except OptimiserFailed:
            break
        if again.shortfall_kwh > result.shortfall_kwh + options.slack(result.shortfall_kwh):
            break  # the pattern costs energy the LP plan delivered: keep the previous round
        rounds += 1
        charge, discharge = again.charge_kw, again.discharge_kw
        good, good_cost = bounded, again.cost_eur
        good_basis = loaded.highs.getBasis()
        current_is_good = True
    if options.peak_flattening:
        # Flatten once, over the last good pattern (or the plain LP when nothing was repaired).
        flat = dataclasses.replace(result, cost_eur=good_cost)
        try:
            if not current_is_good:
                loaded.at_cost_basis = False
                _apply(loaded, good)
                loaded.highs.setBasis(good_basis)
                _objective(loaded, good.cost_vector)
                _expect(_run(loaded.highs, _Counter(options.time_limit_s)), "cost stage")
            solution = loaded.highs.getSolution()
            # Whatever runs now keeps >= min and whatever is idle stays idle: flattening then
            # only reshapes power among running slots and cannot make new slivers.
            value = np.asarray(solution.col_value)[cols]
            pattern_lower = good.col_lower[cols]
            limited = (minimum > 1e-9) & ~forced  # chargers with a minimum rate
            running = limited & (value >= minimum * dt - 1e-9) & usable
            pattern_lower = np.where(
                running, np.maximum(pattern_lower, minimum * dt), pattern_lower
            )
            idle = cols[limited & (value <= 1e-12) & (good.col_upper[cols] > 0.0)]
            col_lower = good.col_lower.copy()
            col_lower[cols] = np.minimum(pattern_lower, value)
            _cols(loaded, cols, col_lower[cols], good.col_upper[cols])
            _flatten(loaded, prepared, options, flat, good, idle, solution)
            charge, discharge = flat.charge_kw, flat.discharge_kw
            result.peak_kw, result.ramp_kw = flat.peak_kw, flat.ramp_kw
            result.solves, result.iterations = flat.solves, flat.iterations
        except OptimiserFailed:
            result.extra["flattening_skipped"] = 1.0
    _apply(loaded, values)
    left, left_discharge, info = repair_min_rate(prepared, charge, discharge)
    info["repair_lp_rounds"] = float(rounds)
    return left, left_discharge, info


def _fix_face(loaded: _Loaded, solution: Any, values: Values) -> None:
    """Hold every column and row whose dual is not zero at its value (complementary slackness:
    every optimal solution of the stage just solved keeps them there)."""
    col_dual = np.asarray(solution.col_dual)
    row_dual = np.asarray(solution.row_dual)
    scale = 1.0 + float(np.abs(values.cost_vector).max(initial=0.0))
    tol = 1e-7 * scale
    cols = np.nonzero(np.abs(col_dual) > tol)[0]
    if len(cols):
        at = np.asarray(solution.col_value)[cols]
        _cols(loaded, cols, at, at)
    rows = np.nonzero(np.abs(row_dual) > tol)[0]
    if len(rows):
        at = np.asarray(solution.row_value)[rows]
        _rows(loaded, rows, at, at)


@dataclass(slots=True)
class _Counter:
    time_limit_s: float
    solves: int = 0
    iterations: int = 0


def _objective(loaded: _Loaded, objective: FloatArray) -> None:
    changed = np.nonzero(objective != loaded.objective)[0]
    if len(changed):
        loaded.highs.changeColsCost(
            len(changed), changed.astype(np.int32), objective[changed].astype(float)
        )
        loaded.objective = objective.copy()


def _run(highs: Any, counter: _Counter) -> str:
    # HiGHS's time limit counts the instance's total run time, so it moves with every run.
    highs.setOptionValue("time_limit", highs.getRunTime() + counter.time_limit_s)
    highs.run()
    counter.solves += 1
    counter.iterations += int(highs.getInfo().simplex_iteration_count)
    status = highs.getModelStatus()
    if status == highspy.HighsModelStatus.kOptimal:
        return "optimal"
    if status in (
        highspy.HighsModelStatus.kInfeasible,
        highspy.HighsModelStatus.kUnboundedOrInfeasible,
    ):
        return "infeasible"
    return str(highs.modelStatusToString(status))


def _expect(status: str, stage: str) -> None:
    if status != "optimal":
        raise OptimiserFailed(f"HiGHS: {stage} ended {status}")


def _objective_value(highs: Any) -> float:
    return float(highs.getInfo().objective_function_value)


def _powers(
    layout: Layout, prepared: Prepared, col_value: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """(charge kW, discharge kW) per car and slot from the column values."""
    p = prepared.problem
    dt = p.dt_h
    charge = np.zeros((p.n_vehicles, p.n_slots))
    charge[layout.x_car, layout.x_slot] = col_value[: layout.nx] / dt[layout.x_slot]
    discharge = np.zeros((p.n_vehicles, p.n_slots))
    if layout.nv:
        v = col_value[layout.v0 : layout.v0 + layout.nv]
        discharge[layout.v_car, layout.v_slot] = v / dt[layout.v_slot]
    return clean(charge, prepared.upper_kw), clean(discharge, prepared.discharge_upper_kw)


def _empty(prepared: Prepared, solver: str) -> StageResult:
    t_count = prepared.n_slots
    return StageResult(
        charge_kw=np.zeros((0, t_count)),
        discharge_kw=np.zeros((0, t_count)),
        shortfall_kwh=0.0,
        max_relative_shortfall=0.0,
        cost_eur=0.0,
        cost_stage_peak_kw=0.0,
        cost_stage_ramp_kw=0.0,
        peak_kw=0.0,
        ramp_kw=0.0,
        headroom_price_eur_per_kw=np.zeros(t_count),
        status="optimal",
        solver=solver,
    )
