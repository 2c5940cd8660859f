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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import highspy as _highspy
import numpy as np
from scipy import sparse  # imported here, not in the solve: its import would eat the budget

from controller.domain import SLOT_S, slot_floor
from controller.optimiser.flow import floors_basis, flow_basis
from controller.optimiser.flow_stages import FlowStages, flow_stages, surely_short
from controller.optimiser.highs import column_lp, floats
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
from controller.optimiser.rounding import Hints
from controller.optimiser.sifting import SiftedHighs
from controller.optimiser.stages import (
    OptimiserFailed,
    StageResult,
    clean,
    finish,
    min_rate_plan,
    settle_plan,
    site_profile,
)
from controller.planning.problem import FloatArray, IntArray, PlanningProblem, Schedule, money

# highspy's bundled stubs lack several methods used here (changeRowsBounds, ...): use it untyped.
highspy: Any = _highspy

_STATUS = highspy.HighsBasisStatus
_LOWER, _BASIC, _UPPER, _ZERO = (
    int(_STATUS.kLower),
    int(_STATUS.kBasic),
    int(_STATUS.kUpper),
    int(_STATUS.kZero),
)
# A warm start may take this long (times the last cold start, at least the floor) before it is
# abandoned for a cold one: a warm V2G start has been seen to take 10-25 times a cold one.
_WARM_FACTOR = 3.0
# A dual this small (times 1 + the largest cost coefficient) counts as zero: HiGHS's dual
# feasibility tolerance.
_DUAL_ZERO = 1e-7
_WARM_FLOOR_S = 0.5
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
    # Second model only: the objective its basis is optimal for ("ramp", "peak" or "").
    warm_objective: str = ""

    @classmethod
    def fresh(cls, highs: Any, layout: Layout, values: Values) -> _Loaded:
        """A model just loaded with `values`: HiGHS holds exactly their bounds."""
        return cls(
            highs,
            layout,
            values,
            np.zeros(layout.n_cols),
            col_lower=values.col_lower.copy(),
            col_upper=values.col_upper.copy(),
            row_lower=values.row_lower.copy(),
            row_upper=values.row_upper.copy(),
        )


# LP repair rounds at most per solve, each only while the plan still loses energy (rare: a
# site full in every slot the sliver's car could use) and within the solve's budget.
_REPAIR_ROUNDS = 3
_ROUNDS_FACTOR = 2.0
_ROUNDS_FLOOR_S = 0.1
# A total shortfall (kWh) the flows must prove before the hard-target run is skipped; below it
# (rounding's reach) the day goes the LP way.
_FLOW_SHORT_KWH = 1e-4


class FastSolver:
    """Solves `PlanningProblem`s with HiGHS, keeping the last model and basis for the next one.

    Thread-safe: calls are serialised (one HiGHS model, one basis).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        """`clock` (seconds, monotonic) measures the time budget; tests may pass their own."""
        self._clock = clock
        self._lock = threading.Lock()
        self._codes: dict[str, int] = {}
        self._loaded: _Loaded | None = None
        self._second: _Loaded | None = None  # the same LP for the second stage (peak, ramps)
        # (columns, seconds) of the last money stage started without an old basis: what a
        # warm start may take before it is abandoned for a cold one.
        self._cold: tuple[int, float] | None = None
        self.last_start = ""  # how the last solve started: "warm", "remapped", "flow", "cold"
        self._short = False  # the last solve was over-subscribed: try the flow stages first
        self._hints = Hints()  # the min-rate rounding's swaps of the last solve
        self._tiebreak_hints = Hints()  # the same for the earliest-departure tie-break

    def solve(self, problem: PlanningProblem, options: OptimiserOptions | None = None) -> Schedule:
        """The lexicographically optimal schedule of `problem` (see `controller.optimiser`).

        `options.time_limit_s` is the budget of the whole solve: the money stages must end in
        it (else `OptimiserFailed`), the second stage gets what is left and is skipped, and
        reported in `details`, when nothing is.
        """
        options = options or DEFAULT_OPTIONS
        started = self._clock()
        prepared = prepare(problem)
        with self._lock:
            deadline = started + options.time_limit_s
            result = self._solve(prepared, options, deadline)
            repaired = None
            if options.min_rate_repair and problem.n_vehicles:
                hints = self._hints if options.warm_start else None
                repaired = min_rate_plan(
                    prepared, result.charge_kw, result.discharge_kw, options, hints, mip=False
                )
                # The rounds together may take what the stages took, twice (at least 0.1 s):
                # on an over-subscribed day at 5,000 cars one round took 6.3 s after 0.46 s of
                # stages, and was not kept.
                stages_s = self._clock() - started
                rounds_deadline = min(
                    deadline, self._clock() + max(_ROUNDS_FLOOR_S, _ROUNDS_FACTOR * stages_s)
                )
                for _ in range(_REPAIR_ROUNDS):
                    if repaired[2]["repair_dropped_kwh"] <= 1e-9 or self._loaded is None:
                        break
                    again = self._repair_round(prepared, options, repaired, rounds_deadline)
                    if again[0] is repaired[0]:
                        repaired = again
                        break  # the round found nothing better: more rounds would not either
                    repaired = again
                # What the cheap moves and the LP rounds still lose: the exact MIP.
                repaired = settle_plan(
                    prepared,
                    result.charge_kw,
                    repaired,
                    options,
                    time_limit_s=deadline - self._clock(),
                )
            return finish(
                prepared,
                result,
                options,
                elapsed_s=self._clock() - started,
                repaired=repaired,
                tiebreak_hints=self._tiebreak_hints if options.warm_start else None,
            )

    def _repair_round(
        self,
        prepared: Prepared,
        options: OptimiserOptions,
        plan: tuple[FloatArray, FloatArray, dict[str, float]],
        deadline: float,
    ) -> tuple[FloatArray, FloatArray, dict[str, float]]:
        """A warm LP round when the free moves and the greedy repair would lose energy.

        The money model is re-solved with the plan's pattern as bounds: what runs keeps at
        least the minimum, a sliver left over goes on (>= minimum) when it is at least half of
        it, else off. The LP moves energy across all cars at once, which pairwise swaps cannot;
        its plan is then rounded and repaired as before, and kept if it loses less energy (then
        costs less). Time-boxed by the solve's budget; the money model's bounds are restored.
        """
        loaded = self._loaded
        assert loaded is not None
        layout = loaded.layout
        p = prepared.problem
        charge, discharge = plan[0], plan[1]
        nx, nv = layout.nx, layout.nv
        cols = np.concatenate([np.arange(nx), layout.v0 + np.arange(nv)]).astype(np.int64)
        car = np.concatenate([layout.x_car, layout.v_car])
        slot = np.concatenate([layout.x_slot, layout.v_slot])
        dt, minimum = p.dt_h[slot], p.min_kw[car]
        power = np.concatenate(
            [charge[layout.x_car, layout.x_slot], discharge[layout.v_car, layout.v_slot]]
        )
        base_lower, base_upper = loaded.col_lower[cols].copy(), loaded.col_upper[cols].copy()
        limited = (minimum > 1e-9) & (base_lower <= 0.0)
        fits = base_upper >= minimum * dt - 1e-12
        running = limited & fits & (power >= minimum - 1e-7)
        sliver = limited & (power > 1e-7) & (power < minimum - 1e-7)
        on = sliver & fits & (power >= 0.5 * minimum)
        lower = np.where(running | on, np.maximum(base_lower, minimum * dt), base_lower)
        upper = np.where(sliver & ~on, base_lower, base_upper)
        _cols(loaded, cols, lower, upper)
        loaded.at_cost_basis = False
        info = dict(plan[2])
        info["repair_lp_round"] = 1.0
        try:
            status = _run(loaded.highs, _Counter(deadline, self._clock))
            if status != "optimal":
                return plan[0], plan[1], info
            values = _Solution.read(loaded.highs, layout, duals=False).col_value
            again = _powers(layout, prepared, values)
        finally:
            _cols(loaded, cols, base_lower, base_upper)
        second = min_rate_plan(prepared, again[0], again[1], options, mip=False)
        keep = (second[2]["repair_dropped_kwh"], money_eur(p, second[0], second[1])) < (
            plan[2]["repair_dropped_kwh"],
            money_eur(p, plan[0], plan[1]),
        )
        if not keep:
            return plan[0], plan[1], info
        second[2]["repair_lp_round"] = 1.0
        second[2]["repair_lp_round_kept"] = 1.0
        return second

    def forget(self) -> None:
        """Drop the loaded models (the next solve starts cold)."""
        with self._lock:
            self._loaded = None
            self._second = None
            self._hints = Hints()
            self._tiebreak_hints = Hints()

    # -- loading ----------------------------------------------------------------------------

    def _solve(self, prepared: Prepared, options: OptimiserOptions, deadline: float) -> StageResult:
        problem = prepared.problem
        if problem.n_vehicles == 0:
            return _empty(prepared, "highs")
        try:
            return self._attempt(prepared, options, warm=options.warm_start, deadline=deadline)
        except OptimiserFailed:
            started = self.last_start
            self._loaded = None
            self._second = None
            if started not in ("warm", "remapped") or self._clock() >= deadline:
                raise
            # A warm start that ran over what a cold start takes is retried once from scratch.
            result = self._attempt(prepared, options, warm=False, deadline=deadline)
            result.extra["warm_start_abandoned"] = 1.0
            return result

    def _attempt(
        self, prepared: Prepared, options: OptimiserOptions, *, warm: bool, deadline: float
    ) -> StageResult:
        problem = prepared.problem
        first_slot = int(slot_floor(problem.start).timestamp() // SLOT_S)
        key = layout_key(prepared, first_slot)
        loaded = self._loaded if warm else None
        if loaded is not None and loaded.layout.key == key:
            if isinstance(loaded.highs, SiftedHighs):
                loaded.highs.compact()
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
            loaded = _Loaded.fresh(highs, layout, values)
        loaded.prices = problem.price_eur_per_kwh.copy()
        loaded.first_slot = first_slot
        self._loaded = loaded if options.warm_start else None
        money_deadline = deadline
        cold = self._cold
        size = loaded.layout.n_cols
        if self.last_start in ("warm", "remapped") and cold is not None:
            if size <= 2 * cold[0] and cold[0] <= 2 * size:
                # A warm start is worth it only while it is faster than starting afresh.
                money_deadline = min(
                    deadline, self._clock() + max(_WARM_FLOOR_S, _WARM_FACTOR * cold[1])
                )
        # A warm start after a small change (same prices) needs a few pivots: no cost
        # perturbation then (see `_perturb`).
        _perturb(loaded.highs, on=not (self.last_start == "warm" and not repriced))
        began = self._clock()
        # A warm over-subscribed day starts its cost stage from the old basis: measured 2-4
        # times faster than a fresh floors flow after a car event or a price change.
        counter = _Counter(money_deadline, self._clock)
        result, solution = _stages(
            loaded,
            prepared,
            options,
            counter,
            seed=self.last_start != "warm",
            expect_short=self._short,
        )
        self._short = not result.feasible
        if self.last_start in ("cold", "flow"):
            self._cold = (size, self._clock() - began)
        if options.peak_flattening:
            second = self._second_model(loaded, options, warm=warm)
            counter = _Counter(deadline, self._clock)
            _second_stage(loaded, second, prepared, options, result, solution, counter)
        return result

    def _second_model(self, money: _Loaded, options: OptimiserOptions, *, warm: bool) -> _Loaded:
        """The second-stage model for `money`'s layout, carried over from the last one if any."""
        old = self._second if warm else None
        if old is not None and old.layout.key == money.layout.key:
            if isinstance(old.highs, SiftedHighs):
                old.highs.compact()
            return old
        layout, values = money.layout, money.values
        second = _Loaded.fresh(_new_highs(layout, values, options), layout, values)
        if old is not None and old.warm_objective == "ramp":
            # The last ramp-optimal basis, matched by vehicle and slot: a dual simplex start.
            basis = _remap(old, layout, values)
            if basis is not None and _set_basis(second.highs, *basis):
                second.warm_objective = "ramp"
        self._second = second if options.warm_start else None
        return second

    def _vehicle_codes(self, vehicle_ids: tuple[str, ...]) -> IntArray:
        codes = self._codes
        if len(codes) > 1_000_000:  # a long-lived process seeing ever new ids: start afresh
            codes.clear()
            self._loaded = None
        for vid in vehicle_ids:
            if vid not in codes:
                codes[vid] = len(codes) + 1
        return np.fromiter((codes[v] for v in vehicle_ids), dtype=np.int64, count=len(vehicle_ids))


def money_eur(problem: PlanningProblem, charge: FloatArray, discharge: FloatArray) -> float:
    """EUR of a plan (energy - export + degradation + demand charge)."""
    bought, sold, worn, demand = money(problem, charge, discharge)
    return float(bought - sold + worn + demand)


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
    """A HiGHS instance holding the layout's matrix with `values`.

    With many charge columns of cars without V2G (`options.sifting_min_columns`), a
    `SiftedHighs` that loads only a working set of them into HiGHS (same interface).
    """
    rows = np.concatenate([layout.fixed_rows, layout.var_rows])
    cols = np.concatenate([layout.fixed_cols, layout.var_cols])
    vals = np.concatenate([layout.fixed_vals, values.coeffs])
    plain = np.zeros(layout.n, dtype=bool)
    plain[layout.plain_cars] = True
    siftable = np.nonzero(plain[layout.x_car])[0].astype(np.int64)
    if len(siftable) and len(siftable) >= options.sifting_min_columns:
        # Variable coefficients keep their (maybe zero) entry: they may change in place.
        keep = (vals != 0.0) | (np.arange(len(vals)) >= len(layout.fixed_vals))
        matrix = sparse.csc_matrix(
            (vals[keep], (rows[keep], cols[keep])), shape=(layout.n_rows, layout.n_cols)
        )
        matrix.sum_duplicates()
        sifted = SiftedHighs(
            matrix,
            values.col_lower,
            values.col_upper,
            values.row_lower,
            values.row_upper,
            siftable,
        )
        sifted.setOptionValue("output_flag", False)
        sifted.setOptionValue("time_limit", float(options.time_limit_s))
        return sifted
    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("time_limit", float(options.time_limit_s))
    keep = vals != 0.0
    matrix = sparse.csc_matrix(
        (vals[keep], (rows[keep], cols[keep])), shape=(layout.n_rows, layout.n_cols)
    )
    matrix.sum_duplicates()
    lp = column_lp(
        matrix,
        np.zeros(layout.n_cols),
        values.col_lower,
        values.col_upper,
        values.row_lower,
        values.row_upper,
    )
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
    if isinstance(highs, SiftedHighs):
        return bool(highs.set_basis_codes(col_status, row_status) != highspy.HighsStatus.kError)
    basis = highspy.HighsBasis()
    basis.col_status = [_BY_CODE[int(c)] for c in col_status.tolist()]
    basis.row_status = [_BY_CODE[int(c)] for c in row_status.tolist()]
    basis.valid = True
    return bool(highs.setBasis(basis) != highspy.HighsStatus.kError)


def _status_codes(statuses: list[Any] | IntArray) -> IntArray:
    if isinstance(statuses, np.ndarray):
        return statuses.astype(np.int64)
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
    counter: _Counter,
    *,
    seed: bool = True,
    expect_short: bool = False,
) -> tuple[StageResult, _Solution]:
    """Run the lexicographic stages up to money on the loaded model (targets hard first).

    An over-subscribed day without V2G takes the flow stages instead; `seed` gives their cost
    stage a min-cost-flow basis (else it starts from the basis HiGHS holds). The flows run
    first when the day is short by the totals alone (`surely_short`) or `expect_short` (the
    last solve was short); otherwise after a hard-target run that finds the day infeasible.
    A max flow costs ~2.4 ms at 278 cars and ~230 ms at 20,000: feasible days must not pay it.
    Returns the result and HiGHS's solution of the money stage (values and duals).
    """
    highs, layout = loaded.highs, loaded.layout
    values = loaded.values
    extra: dict[str, float] = {}
    use_flows = options.flow_stages and not layout.any_v2g
    flows = None
    if use_flows and (expect_short or surely_short(prepared)):
        flows = flow_stages(prepared)
        extra["flow_stages_max_flows"] = float(flows.max_flows) if flows else 0.0
    if flows is not None and flows.shortfall_kwh > _FLOW_SHORT_KWH:
        # Over-subscribed, as the flows prove: no hard-target run.
        shortfall, worst = _flow_stages(loaded, prepared, options, counter, flows, extra, seed=seed)
    else:
        _objective(loaded, values.cost_vector)
        status = _run(highs, counter)
        shortfall, worst = 0.0, 0.0
        if status not in ("optimal", "infeasible"):
            _expect(status, "cost stage")
        if status == "infeasible" and use_flows and flows is None:
            # Short in a way the totals did not show (time windows): the flows now.
            flows = flow_stages(prepared)
            extra["flow_stages_max_flows"] = float(flows.max_flows) if flows else 0.0
        if status == "infeasible" and flows is not None and flows.shortfall_kwh > _FLOW_SHORT_KWH:
            # The hard run left no useful basis: seed the cost stage.
            extra["flow_stages_after_hard_run"] = 1.0
            shortfall, worst = _flow_stages(
                loaded, prepared, options, counter, flows, extra, seed=True
            )
        elif status == "infeasible":
            # Some target cannot be met inside h_t: free the shortfall columns and rank.
            shortfall, worst = _lp_stages(loaded, prepared, options, counter)
            _objective(loaded, values.cost_vector)
            _expect(_run(highs, counter), "cost stage")
    cost = _objective_value(highs)
    loaded.cost_basis = highs.getBasis()
    sifting = {}
    if isinstance(highs, SiftedHighs):
        sifting = {"sifting_working_columns": float(highs.working_columns)}
    loaded.at_cost_basis = True
    solution = _Solution.read(highs, layout, duals=options.peak_flattening)
    g_slice = slice(layout.g0, layout.g0 + layout.t_count)
    net = solution.col_value[g_slice]
    price = np.maximum(0.0, -solution.g_dual)
    if options.peak_flattening:
        # The second stage's plan replaces this one: the powers are read from the money
        # solution only if it does not come (`_second_stage`).
        charge = discharge = np.zeros((0, layout.t_count))
        peak, ramp = float(max(0.0, net.max(initial=0.0))), float(np.abs(np.diff(net)).sum())
    else:
        charge, discharge = _powers(layout, prepared, solution.col_value)
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
        extra={**extra, **sifting},
    )
    return result, solution


def _soften(loaded: _Loaded, prepared: Prepared) -> None:
    """Free the shortfall columns (targets turn soft)."""
    scaled = shortfall_scaled(loaded.layout, prepared)
    _cols(loaded, scaled, np.zeros(len(scaled)), np.ones(len(scaled)))


def _lp_stages(
    loaded: _Loaded, prepared: Prepared, options: OptimiserOptions, counter: _Counter
) -> tuple[float, float]:
    """(least total shortfall, least largest relative shortfall) by HiGHS runs, each kept as a
    bound (with the stage slack) for the stages after it."""
    highs, layout = loaded.highs, loaded.layout
    _soften(loaded, prepared)
    _objective(loaded, loaded.values.short_vector)
    _expect(_run(highs, counter), "shortfall stage")
    shortfall = _objective_value(highs)
    _rows(loaded, _index(layout.short_row), _one(-INF), _one(shortfall + options.slack(shortfall)))
    worst = 0.0
    if options.fairness and shortfall > options.feasibility_tolerance_kwh:
        worst = _fairness_lp(loaded, counter)
        _cols(loaded, _index(layout.z_col), _one(0.0), _one(min(1.0, worst + options.slack(worst))))
    return shortfall, worst


def _fairness_lp(loaded: _Loaded, counter: _Counter) -> float:
    """The least largest relative shortfall by a HiGHS run (the shortfall bound set)."""
    objective = np.zeros(loaded.layout.n_cols)
    objective[loaded.layout.z_col] = 1.0
    _objective(loaded, objective)
    _expect(_run(loaded.highs, counter), "fairness stage")
    return _objective_value(loaded.highs)


def _flow_stages(
    loaded: _Loaded,
    prepared: Prepared,
    options: OptimiserOptions,
    counter: _Counter,
    flows: FlowStages,
    extra: dict[str, float],
    *,
    seed: bool,
) -> tuple[float, float]:
    """The shortfall and fairness stages from `flow_stages`, then the cost stage's run.

    The flows' optima become the stage bounds (each with the stage slack; the shortfall bound
    no lower than what the integer flow reached) and HiGHS runs the cost stage on the exact
    data. When the flows cannot settle fairness (several efficiencies), that stage is a HiGHS
    run; when the cost stage finds the bounds infeasible (a rounding the flows' checks let
    through), the LP stages run instead. `extra` says which happened.
    """
    highs, layout = loaded.highs, loaded.layout
    _soften(loaded, prepared)
    shortfall = flows.shortfall_kwh
    bound = max(shortfall + options.slack(shortfall), flows.shortfall_reached_kwh)
    _rows(loaded, _index(layout.short_row), _one(-INF), _one(bound))
    extra["flow_stages"] = 1.0
    worst = 0.0
    if options.fairness:
        if flows.worst is None:
            extra["flow_fairness"] = 0.0
            worst = _fairness_lp(loaded, counter)
        else:
            extra["flow_fairness"] = 1.0
            worst = flows.worst
        _cols(loaded, _index(layout.z_col), _one(0.0), _one(min(1.0, worst + options.slack(worst))))
    _objective(loaded, loaded.values.cost_vector)
    if options.flow_start and seed:
        level = min(1.0, worst + options.slack(worst)) if options.fairness else 1.0
        basis = floors_basis(layout, loaded.values, prepared, flows, level)
        seeded = basis is not None and _set_basis(highs, *basis)
        extra["flow_stages_seeded"] = 1.0 if seeded else 0.0
    status = _run(highs, counter)
    if status == "infeasible":
        extra["flow_stages"] = 0.0
        extra["flow_stages_refused"] = 1.0
        _rows(loaded, _index(layout.short_row), _one(-INF), _one(INF))
        _cols(loaded, _index(layout.z_col), _one(0.0), _one(1.0))
        shortfall, worst = _lp_stages(loaded, prepared, options, counter)
        _objective(loaded, loaded.values.cost_vector)
        status = _run(highs, counter)
    _expect(status, "cost stage")
    return shortfall, worst


@dataclass(frozen=True, slots=True)
class _Solution:
    """HiGHS's solution as numpy arrays, read once (each read copies a Python list)."""

    col_value: FloatArray
    g_dual: FloatArray  # reduced costs of the site columns g
    col_dual: FloatArray  # empty unless read with duals
    row_value: FloatArray
    row_dual: FloatArray

    @classmethod
    def read(cls, highs: Any, layout: Layout, *, duals: bool, g_dual: bool = True) -> _Solution:
        """Values (and, with `duals`, the row values and all duals; with `g_dual`, the site
        columns' reduced costs) of the last run. Each list HiGHS hands over is a copy of the
        whole vector (about 0.3 ms per 17k columns), so only what is asked is read."""
        solution = highs.getSolution()
        col_value = floats(solution.col_value)
        empty = np.zeros(0)
        if not duals and not g_dual:
            return cls(col_value, empty, empty, empty, empty)
        g_slice = slice(layout.g0, layout.g0 + layout.t_count)
        if not duals:
            return cls(col_value, floats(solution.col_dual[g_slice]), empty, empty, empty)
        col_dual = floats(solution.col_dual)
        return cls(
            col_value,
            col_dual[g_slice].copy(),
            col_dual,
            floats(solution.row_value),
            floats(solution.row_dual),
        )


def _peak_certificate(
    layout: Layout,
    prepared: Prepared,
    values: Values,
    solution: _Solution,
) -> tuple[float, float] | None:
    """(least peak among the money-optimal plans, margin kW), when the money duals prove it.

    If a peak slot t sits at its head-room h_t with a reduced cost d_t != 0, every
    money-optimal plan keeps g_t = h_t (complementary slackness), so none has a lower peak:
    the current peak is the second stage's optimum, with no LP. The stages keep each optimum
    up to a slack eps; a plan that spends eps more money could lower g_t by eps / |d_t| at most
    (the reduced-cost bound), which is returned as the margin (for eps = 1: scale it). None
    when no peak slot is pinned so: then the peak LP decides.
    """
    g_slice = slice(layout.g0, layout.g0 + layout.t_count)
    net, dual = solution.col_value[g_slice], np.abs(solution.g_dual)
    peak = float(max(0.0, net.max(initial=0.0)))
    if peak <= 1e-9:
        return 0.0, 0.0  # K >= 0 is a bound of its own
    scale = 1.0 + float(np.abs(values.cost_vector).max(initial=0.0))
    pinned = (
        (net >= peak - 1e-9)
        & (np.abs(net - prepared.headroom_kw) <= 1e-9)
        & (dual > _DUAL_ZERO * scale)
    )
    if not pinned.any():
        return None
    return peak, 1.0 / float(dual[pinned].max())


def _second_stage(
    money: _Loaded,
    second: _Loaded,
    prepared: Prepared,
    options: OptimiserOptions,
    result: StageResult,
    solution: _Solution,
    counter: _Counter,
) -> None:
    """Least peak, then least ramps, among the money-optimal plans, on the second model.

    `second` holds the same LP as `money`; it gets the money stage's bounds (shortfall and
    fairness included) plus the guard money <= optimum + slack, which *is* the set of
    money-optimal plans (up to the slack, as in the reference). The peak comes from the money
    stage's duals when they prove it (`_peak_certificate`), else from a peak LP started at the
    money basis (primal feasible there). The ramp LP restarts from the second model's own last
    ramp-optimal basis when it has one (same objective, so the dual simplex needs only the
    pivots the event calls for), else from the money basis. Updates `result` in place; a stage
    that fails (time budget) leaves the plan of the stage before and is reported.
    """
    layout = money.layout
    cost = result.cost_eur
    certificate = _peak_certificate(layout, prepared, money.values, solution)
    peak = None
    if certificate is not None:
        peak = certificate[0]
        result.extra["peak_margin_kw"] = options.slack(cost) * certificate[1]
    ramps = options.ramp_smoothing and layout.t_count > 1
    result.extra["peak_certified"] = 1.0 if peak is not None else 0.0
    if peak is not None and not ramps:
        result.peak_kw = peak
        result.charge_kw, result.discharge_kw = _powers(layout, prepared, solution.col_value)
        return
    _sync(second, money, solution)
    highs = second.highs
    if isinstance(highs, SiftedHighs):
        highs.seat(solution.col_value)  # the money plan is a feasible start of the working set
    _rows(second, _index(layout.cost_row), _one(-INF), _one(cost + options.slack(cost)))
    plan: _Solution | None = None
    stage = "peak stage"
    try:
        if peak is None:
            _cols(second, _index(layout.k_col), _one(0.0), _one(INF))
            objective = np.zeros(layout.n_cols)
            objective[layout.k_col] = 1.0
            _objective(second, objective)
            second.warm_objective = ""
            highs.setBasis(money.cost_basis)
            highs.setOptionValue("simplex_strategy", 4)  # primal: the basis is feasible
            _expect(_run(highs, counter), stage)
            peak = _objective_value(highs)
            second.warm_objective = "peak"
            plan = _Solution.read(highs, layout, duals=False, g_dual=False)
        result.peak_kw = peak
        _cols(second, _index(layout.k_col), _one(0.0), _one(peak + options.slack(peak)))
        if ramps:
            stage = "ramp stage"
            objective = np.zeros(layout.n_cols)
            objective[layout.r0 : layout.r0 + layout.t_count - 1] = 1.0
            _objective(second, objective)
            if second.warm_objective == "ramp":
                highs.setOptionValue("simplex_strategy", 1)  # dual: the basis is dual feasible
                _perturb(highs, on=False)
            else:
                _perturb(highs, on=True)
                if plan is None:
                    highs.setBasis(money.cost_basis)
                highs.setOptionValue("simplex_strategy", 4)
            second.warm_objective = ""
            _expect(_run(highs, counter), stage)
            result.ramp_kw = _objective_value(highs)
            second.warm_objective = "ramp"
            plan = _Solution.read(highs, layout, duals=False, g_dual=False)
    except OptimiserFailed:
        second.warm_objective = ""
        result.extra["second_stage_skipped"] = 1.0
        result.extra["ramp_stage_skipped" if stage == "ramp stage" else "peak_stage_skipped"] = 1.0
    finally:
        highs.setOptionValue("simplex_strategy", 1)
    result.solves += counter.solves
    result.iterations += counter.iterations
    result.charge_kw, result.discharge_kw = _powers(layout, prepared, (plan or solution).col_value)
    if "peak_stage_skipped" in result.extra:
        result.peak_kw = result.cost_stage_peak_kw
    if "second_stage_skipped" in result.extra or not ramps:
        result.ramp_kw = site_profile(result.charge_kw, result.discharge_kw)[1]


def _sync(second: _Loaded, money: _Loaded, solution: _Solution) -> None:
    """Give the second model the money model's coefficients and bounds, on the optimal face.

    Every column and row whose dual in the money stage is not zero keeps its value in every
    money-optimal plan (complementary slackness), so it is fixed there; what remains free is
    exactly the money stage's optimal face. Only the bounds that differ from what the second
    model holds are sent: from one event to the next the face changes little.
    """
    layout = money.layout
    changed = np.nonzero(money.values.coeffs != second.values.coeffs)[0]
    for k in changed:
        second.highs.changeCoeff(
            int(layout.var_rows[k]), int(layout.var_cols[k]), float(money.values.coeffs[k])
        )
    second.values = money.values
    scale = 1.0 + float(np.abs(money.values.cost_vector).max(initial=0.0))
    zero = _DUAL_ZERO * scale
    col_lower, col_upper = money.col_lower.copy(), money.col_upper.copy()
    fixed = np.abs(solution.col_dual) > zero
    col_lower[fixed] = col_upper[fixed] = solution.col_value[fixed]
    row_lower, row_upper = money.row_lower.copy(), money.row_upper.copy()
    fixed = np.abs(solution.row_dual) > zero
    row_lower[fixed] = row_upper[fixed] = solution.row_value[fixed]
    cols = np.nonzero((col_lower != second.col_lower) | (col_upper != second.col_upper))[0]
    _cols(second, cols, col_lower[cols], col_upper[cols])
    rows = np.nonzero((row_lower != second.row_lower) | (row_upper != second.row_upper))[0]
    _rows(second, rows, row_lower[rows], row_upper[rows])


@dataclass(slots=True)
class _Counter:
    """LP runs and simplex iterations of a solve, and the deadline they share."""

    deadline: float  # clock reading by which the runs must end
    clock: Callable[[], float]
    solves: int = 0
    iterations: int = 0

    def remaining(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - self.clock()


def _objective(loaded: _Loaded, objective: FloatArray) -> None:
    changed = np.nonzero(objective != loaded.objective)[0]
    if len(changed):
        loaded.highs.changeColsCost(
            len(changed), changed.astype(np.int32), objective[changed].astype(float)
        )
        loaded.objective = objective.copy()


def _run(highs: Any, counter: _Counter) -> str:
    left = counter.remaining()
    if left <= 0.0:
        return "skipped: time budget spent"
    # HiGHS's time limit counts the instance's total run time, so it moves with every run.
    highs.setOptionValue("time_limit", highs.getRunTime() + left)
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


def _perturb(highs: Any, *, on: bool) -> None:
    """Switch HiGHS's dual cost perturbation on (its default) or off.

    Off for warm re-solves that need a few pivots: removing the perturbation afterwards (its
    "cleanup") cost more than it saved, about 0.5 ms a run at 278 cars. On for cold starts,
    new prices and V2G: without it the cold V2G day at 278 cars took 15 s instead of 1-3 s
    (degenerate pivots). The optimum is the same either way: HiGHS removes any perturbation
    before it declares optimality.
    """
    highs.setOptionValue("dual_simplex_cost_perturbation_multiplier", 1.0 if on else 0.0)


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
