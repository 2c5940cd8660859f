"""Sifting: HiGHS holds only a working set of the charge columns; the rest is priced exactly.

At 20,000 cars the compact LP has 1.25M columns, nearly all of them charge columns `x[i,t]`, and a
warm HiGHS re-solve costs time in proportion to the columns even when it pivots a handful of
times (measured: 0.17 s of CPU with no pivot at all, 0.35-0.5 s for the 5-16 pivots of a car
event). Yet an optimal basis has at most one basic column per row (40k rows): all other columns
sit at a bound. `SiftedHighs` therefore loads into HiGHS every column that is not *siftable*
plus a working set W of the siftable ones (the charge columns of cars without V2G); every other
siftable column is held at one of its bounds (lower or upper, its nonbasic status) and its
contribution is taken off the row bounds.

**Why the answer is the full LP's optimum.** After HiGHS solves the restricted LP to optimality
with row duals y, the reduced cost of each held column j is d_j = c_j - a_j^T y. A held column at
its lower bound with d_j >= -tol, or at its upper bound with d_j <= tol, is dual feasible, so
the restricted basis plus the held columns (nonbasic at their bounds) is a basis of the full LP
that is primal feasible (held columns sit exactly at a bound, the rows hold) and dual feasible to
the same tolerance HiGHS uses (1e-7): the full LP's optimum, with the same certificate HiGHS gives
for the full model. Held columns that fail the test join W (HiGHS keeps its basis and
factorisation when columns are added) and HiGHS runs again, until none fails. W only grows
within a run; when it has grown well beyond what the basis needs, the model is rebuilt from the
basic columns only (between runs). A restricted LP that is infeasible proves nothing about the
full one: then every held column joins W and HiGHS runs on the full LP.

The class speaks the part of highspy's `Highs` interface the fast path uses (bounds, costs,
coefficients, basis, solution, info, options, run), with column indices of the *full* LP, so the
stages in `controller.optimiser.fast` run on it unchanged. Its bases and solutions are numpy
arrays over the full LP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import highspy as _highspy
import numpy as np
from scipy import sparse

from controller.optimiser.highs import column_lp, floats
from controller.planning.problem import BoolArray, FloatArray, IntArray

highspy: Any = _highspy

_LOWER = int(highspy.HighsBasisStatus.kLower)
_BASIC = int(highspy.HighsBasisStatus.kBasic)
_UPPER = int(highspy.HighsBasisStatus.kUpper)
_ZERO = int(highspy.HighsBasisStatus.kZero)
_BY_CODE = {
    int(s): s
    for s in (
        highspy.HighsBasisStatus.kLower,
        highspy.HighsBasisStatus.kBasic,
        highspy.HighsBasisStatus.kUpper,
        highspy.HighsBasisStatus.kZero,
    )
}
_ENUMS = np.array(  # code -> highspy enum
    [_BY_CODE[c] for c in range(4)] + [highspy.HighsBasisStatus.kNonbasic], dtype=object
)
_OPTIMAL = highspy.HighsModelStatus.kOptimal
_INFEASIBLE = (
    highspy.HighsModelStatus.kInfeasible,
    highspy.HighsModelStatus.kUnboundedOrInfeasible,
)
# HiGHS's dual feasibility tolerance: a held column whose reduced cost is this far on the wrong
# side of 0 joins the working set.
_DUAL_TOL = 1e-7
# The working set is rebuilt from the basic columns when it holds more than this many columns
# per row (and more than `_REBUILD_FLOOR`): a basis needs at most one per row.
_REBUILD_PER_ROW = 2.0
_REBUILD_FLOOR = 5_000


class SiftBasis:
    """A basis of the full LP: highspy status codes per column and per row.

    Taken from a model (`SiftedHighs.getBasis`) it keeps HiGHS's own basis and the held
    columns' bounds and converts them to codes only when they are read (at 20,000 cars the
    conversion costs ~0.1 s, and the usual reader is the same model, which takes HiGHS's
    basis back as it is).
    """

    __slots__ = ("_col_status", "_held", "_row_status", "owner", "raw", "valid")

    def __init__(
        self,
        col_status: IntArray | None,
        row_status: IntArray | None,
        *,
        valid: bool = True,
        owner: SiftedHighs | None = None,
        raw: Any = None,
        held: tuple[IntArray, IntArray, BoolArray] | None = None,
    ) -> None:
        """Codes, or (from a model) HiGHS's basis `raw` of the model's columns at the time
        and `held` = (those columns, the held columns, which of them sit at the upper bound)."""
        self._col_status = col_status
        self._row_status = row_status
        self.valid = valid
        self.owner = owner
        self.raw = raw
        self._held = held

    @property
    def col_status(self) -> IntArray:
        """Status code of every column of the full LP."""
        if self._col_status is None:
            assert self.owner is not None
            assert self._held is not None
            cols, held, upper = self._held
            status = np.full(self.owner.n_cols, _LOWER, dtype=np.int64)
            status[cols] = _codes(self.raw.col_status)
            status[held] = np.where(upper, _UPPER, _LOWER)
            self._col_status = status
        return self._col_status

    @property
    def row_status(self) -> IntArray:
        """Status code of every row."""
        if self._row_status is None:
            self._row_status = _codes(self.raw.row_status)
        return self._row_status


@dataclass(frozen=True, slots=True)
class SiftSolution:
    """Values and duals of the full LP (HiGHS's sign convention: col_dual = c - A^T row_dual)."""

    col_value: FloatArray
    col_dual: FloatArray
    row_value: FloatArray
    row_dual: FloatArray


@dataclass(frozen=True, slots=True)
class SiftInfo:
    """What the fast path reads from `getInfo`: the objective and the pivots of the last run."""

    objective_function_value: float
    simplex_iteration_count: int


class SiftedHighs:
    """A HiGHS model of the full LP in which only a working set of the siftable columns is loaded.

    `matrix` is the full constraint matrix (CSC, explicit zeros allowed); `siftable` the
    columns that may be held at a bound outside HiGHS (each must have finite bounds). Bounds,
    costs and indices are always those of the full LP. The HiGHS model is built at the first
    run (or basis), from the basis given then: its basic columns form the working set, or all
    siftable columns when there is none (a cold start).
    """

    def __init__(
        self,
        matrix: sparse.csc_matrix,
        col_lower: FloatArray,
        col_upper: FloatArray,
        row_lower: FloatArray,
        row_upper: FloatArray,
        siftable: IntArray,
    ) -> None:
        """Hold the full LP (zero costs); nothing is loaded into HiGHS yet."""
        self._matrix = matrix.tocsc(copy=True)
        n_rows, n_cols = self._matrix.shape
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        self._cost = np.zeros(self.n_cols)
        self._sift_cost = False  # whether a siftable column has a cost (x columns have none)
        self._col_lower = np.array(col_lower, dtype=float)
        self._col_upper = np.array(col_upper, dtype=float)
        self._row_lower = np.array(row_lower, dtype=float)
        self._row_upper = np.array(row_upper, dtype=float)
        self._sift = np.asarray(siftable, dtype=np.int64)
        if not (
            np.isfinite(self._col_lower[self._sift]).all()
            and np.isfinite(self._col_upper[self._sift]).all()
        ):
            raise ValueError("sifting: every siftable column needs finite bounds")
        sub = self._matrix[:, self._sift]
        sub.eliminate_zeros()
        self._sub: sparse.csc_matrix = sub.tocsc()
        self._sub_t: sparse.csr_matrix = self._sub.T.tocsr()  # pricing: sub_t @ y
        self._is_sift = np.zeros(self.n_cols, dtype=bool)
        self._is_sift[self._sift] = True
        self._k_of = np.full(self.n_cols, -1, dtype=np.int64)  # full column -> siftable index
        self._k_of[self._sift] = np.arange(len(self._sift))
        self._inside = np.zeros(len(self._sift), dtype=bool)  # in the working set
        self._at_upper = np.zeros(len(self._sift), dtype=bool)  # held at the upper bound
        self._shift = np.zeros(self.n_rows)  # rows' activity of the held columns
        self._dirty_rows = np.zeros(self.n_rows, dtype=bool)
        self._touched = np.zeros(self.n_rows, dtype=bool)  # rows changed since the last optimum
        self._highs: Any = None
        self._pos = np.full(self.n_cols, -1, dtype=np.int64)  # full column -> HiGHS column
        self._cols = np.zeros(0, dtype=np.int64)  # HiGHS column -> full column
        self._options: dict[str, Any] = {}
        self._pending: SiftBasis | None = None  # basis to load at the next build
        self._reduced = np.zeros(len(self._sift))  # reduced costs of the siftable columns
        self._solution: SiftSolution | None = None
        self._iterations = 0
        self._status: Any = highspy.HighsModelStatus.kNotset
        self._objective = float("nan")
        self.rounds = 0  # HiGHS runs of the last `run` (1 + columns added rounds)
        self.added = 0  # columns that joined the working set in the last `run`

    # -- the part of highspy's interface the fast path uses ----------------------------------

    def setOptionValue(self, name: str, value: Any) -> Any:  # noqa: N802 (highspy's name)
        """Set a HiGHS option (kept, and set again on a rebuilt model)."""
        self._options[name] = value
        if self._highs is not None:
            return self._highs.setOptionValue(name, value)
        return highspy.HighsStatus.kOk

    def getRunTime(self) -> float:  # noqa: N802
        """HiGHS's run time of the model loaded now (0 before the first build)."""
        return float(self._highs.getRunTime()) if self._highs is not None else 0.0

    def changeColsBounds(  # noqa: N802
        self, num: int, cols: IntArray, lower: FloatArray, upper: FloatArray
    ) -> Any:
        """Change column bounds; a held column's value follows its bound."""
        cols = np.asarray(cols, dtype=np.int64)[:num]
        lower = np.asarray(lower, dtype=float)[:num]
        upper = np.asarray(upper, dtype=float)[:num]
        self._solution = None
        held_before = self._held_values(cols)
        self._col_lower[cols] = lower
        self._col_upper[cols] = upper
        if self._highs is None:
            return highspy.HighsStatus.kOk
        inside = self._pos[cols] >= 0
        if inside.any():
            self._highs.changeColsBounds(
                int(inside.sum()),
                self._pos[cols[inside]].astype(np.int32),
                lower[inside],
                upper[inside],
            )
        self._move_held(cols, held_before)
        return highspy.HighsStatus.kOk

    def changeRowsBounds(  # noqa: N802
        self, num: int, rows: IntArray, lower: FloatArray, upper: FloatArray
    ) -> Any:
        """Change row bounds (HiGHS gets them less the held columns' activity)."""
        rows = np.asarray(rows, dtype=np.int64)[:num]
        self._solution = None
        self._row_lower[rows] = np.asarray(lower, dtype=float)[:num]
        self._row_upper[rows] = np.asarray(upper, dtype=float)[:num]
        self._dirty_rows[rows] = True
        self._touched[rows] = True
        return highspy.HighsStatus.kOk

    def changeColsCost(self, num: int, cols: IntArray, costs: FloatArray) -> Any:  # noqa: N802
        """Change column costs."""
        cols = np.asarray(cols, dtype=np.int64)[:num]
        costs = np.asarray(costs, dtype=float)[:num]
        self._solution = None
        self._cost[cols] = costs
        if self._is_sift[cols].any():
            self._sift_cost = bool(self._cost[self._sift].any())
        if self._highs is not None:
            inside = self._pos[cols] >= 0
            if inside.any():
                self._highs.changeColsCost(
                    int(inside.sum()), self._pos[cols[inside]].astype(np.int32), costs[inside]
                )
        return highspy.HighsStatus.kOk

    def changeCoeff(self, row: int, col: int, value: float) -> Any:  # noqa: N802
        """Change one matrix entry (of a column that is not siftable)."""
        if self._is_sift[col]:
            raise ValueError(f"sifting: coefficient ({row}, {col}) of a siftable column")
        self._solution = None
        matrix = self._matrix
        start, end = matrix.indptr[col], matrix.indptr[col + 1]
        found = np.nonzero(matrix.indices[start:end] == row)[0]
        if not len(found):
            raise ValueError(f"sifting: ({row}, {col}) is not an entry of the matrix")
        matrix.data[start + int(found[0])] = value
        if self._highs is not None:
            self._highs.changeCoeff(int(row), int(self._pos[col]), float(value))
        return highspy.HighsStatus.kOk

    def setBasis(self, basis: Any) -> Any:  # noqa: N802
        """Start the next run from `basis` (a `SiftBasis` of the full LP)."""
        if not isinstance(basis, SiftBasis):
            raise TypeError("sifting: setBasis wants a SiftBasis of the full LP")
        if basis.owner is self and basis.raw is not None and basis._held is not None:
            cols, held, upper = basis._held
            if self._highs is not None and cols is self._cols:
                # Our own basis, with the same columns loaded: HiGHS takes it back as it is.
                self._solution = None
                now = ~self._inside
                before = self._held_values(self._sift[now])
                self._at_upper[now] = False
                self._at_upper[self._k_of[held]] = upper
                self._move_held(self._sift[now], before)
                self._push_rows()
                return self._highs.setBasis(basis.raw)
        return self.set_basis_codes(basis.col_status, basis.row_status)

    def set_basis_codes(self, col_status: IntArray, row_status: IntArray) -> Any:
        """Start the next run from these status codes (full LP); held columns take theirs."""
        col_status = np.asarray(col_status, dtype=np.int64)
        row_status = np.asarray(row_status, dtype=np.int64)
        self._solution = None
        if self._highs is None:
            self._pending = SiftBasis(col_status.copy(), row_status.copy())
            return highspy.HighsStatus.kOk
        status = col_status[self._sift]
        self._add(np.nonzero(~self._inside & (status == _BASIC))[0])
        held = np.nonzero(~self._inside)[0]
        before = self._held_values(self._sift[held])
        self._at_upper[held] = status[held] == _UPPER
        self._move_held(self._sift[held], before)
        restricted = col_status[self._cols]
        self._push_rows()
        return self._highs.setBasis(_highs_basis(restricted, row_status))

    def getBasis(self) -> SiftBasis:  # noqa: N802
        """The basis of the full LP (held columns nonbasic at their bound)."""
        if self._highs is None:
            if self._pending is not None:
                return self._pending
            return SiftBasis(np.zeros(0, np.int64), np.zeros(0, np.int64), valid=False)
        raw = self._highs.getBasis()
        now = ~self._inside
        held = (self._cols, self._sift[now], self._at_upper[now])
        return SiftBasis(None, None, valid=bool(raw.valid), owner=self, raw=raw, held=held)

    def run(self) -> Any:
        """Solve the full LP: HiGHS on the working set, then price the held columns, repeat."""
        self._solution = None
        if self._highs is None:
            self._build(self._pending)
            self._pending = None
        self._iterations, self.rounds, self.added = 0, 0, 0
        strategy = self._options.get("simplex_strategy")
        try:
            self._sift_rounds()
        finally:
            if self.rounds > 1:
                self._highs.setOptionValue("simplex_strategy", 1 if strategy is None else strategy)
        if self._status != _OPTIMAL:
            return highspy.HighsStatus.kWarning
        self._objective = float(self._highs.getInfo().objective_function_value)
        if self._sift_cost:
            held = ~self._inside
            self._objective += float(
                self._cost[self._sift[held]] @ self._held_values(self._sift[held])
            )
        return highspy.HighsStatus.kOk

    def _sift_rounds(self) -> None:
        """HiGHS on the working set, pricing, and again with the columns that failed.

        Columns join at the bound they were held at, so the point HiGHS stopped at stays
        primal feasible and only the new columns are dual infeasible: the rounds after the
        first run the primal simplex, which starts from there (the dual simplex would first
        flip them to their other bound and then repair the rows: measured 300-450 pivots
        against a handful).
        """
        while True:
            if self.rounds == 1:
                self._highs.setOptionValue("simplex_strategy", 4)
            self._push_rows()
            self._highs.run()
            self.rounds += 1
            self._iterations += max(0, int(self._highs.getInfo().simplex_iteration_count))
            self._status = self._highs.getModelStatus()
            if self._status in _INFEASIBLE and not self._inside.all():
                # Proves nothing about the full LP: first the held columns that the proof (the
                # dual ray) does not cover, else those of the rows that changed since the last
                # optimum, else (still infeasible) all of them.
                found = self._ray_columns()
                if not len(found) and self._touched.any():
                    found = self._near_touched()
                self._touched[:] = False
                self._add(found if len(found) else np.nonzero(~self._inside)[0])
                continue
            if self._status != _OPTIMAL:
                return
            row_dual = floats(self._highs.getSolution().row_dual)
            self._reduced = self._cost[self._sift] - self._sub_t @ row_dual
            held = ~self._inside
            movable = self._col_lower[self._sift] < self._col_upper[self._sift]
            wrong = (
                held
                & movable
                & np.where(self._at_upper, self._reduced > _DUAL_TOL, self._reduced < -_DUAL_TOL)
            )
            if not wrong.any():
                break
            self._add(np.nonzero(wrong)[0])
        self._touched[:] = False

    def getModelStatus(self) -> Any:  # noqa: N802
        """HiGHS's status of the last run (optimal only once every held column priced out)."""
        return self._status

    def modelStatusToString(self, status: Any) -> str:  # noqa: N802
        """HiGHS's name of a model status."""
        return str(highspy.Highs().modelStatusToString(status))

    def getInfo(self) -> SiftInfo:  # noqa: N802
        """The full LP's objective and the simplex iterations of every HiGHS run of `run`."""
        return SiftInfo(self._objective, self._iterations)

    def getSolution(self) -> SiftSolution:  # noqa: N802
        """Values and duals of the full LP (held columns at their bound, reduced costs priced)."""
        if self._solution is not None:
            return self._solution
        solution = self._highs.getSolution()
        col_value = np.zeros(self.n_cols)
        col_dual = np.zeros(self.n_cols)
        col_value[self._cols] = floats(solution.col_value)
        col_dual[self._cols] = floats(solution.col_dual)
        held = ~self._inside
        col_value[self._sift[held]] = self._held_values(self._sift[held])
        col_dual[self._sift[held]] = self._reduced[held]
        self._solution = SiftSolution(
            col_value=col_value,
            col_dual=col_dual,
            row_value=floats(solution.row_value) + self._shift,
            row_dual=floats(solution.row_dual),
        )
        return self._solution

    def compact(self) -> bool:
        """Rebuild the model from the current basis's basic columns when the working set has
        grown well beyond what a basis needs (a cold start loads every column). Called between
        solves, not between the stages of one (each stage needs the columns of the one before).
        Returns whether it rebuilt."""
        if self._highs is None:
            return False
        if self.working_columns <= max(_REBUILD_FLOOR, _REBUILD_PER_ROW * self.n_rows):
            return False
        self._push_rows()
        self._build(self.getBasis())
        return True

    def seat(self, col_value: FloatArray) -> None:
        """Hold each held column at the bound that equals its value in `col_value` (a feasible
        point of this LP, such as the money stage's plan for the second stage); a held column
        whose value lies strictly inside its bounds joins the working set. Then that point is
        feasible for the restricted LP too, which is only a question of where to start: the
        answer is the full LP's optimum either way."""
        if self._highs is None:
            return
        held = np.nonzero(~self._inside)[0]
        cols = self._sift[held]
        value = np.asarray(col_value, dtype=float)[cols]
        lower, upper = self._col_lower[cols], self._col_upper[cols]
        at_lower = np.abs(value - lower) <= 1e-12 * (1.0 + np.abs(lower))
        at_upper = ~at_lower & (np.abs(value - upper) <= 1e-12 * (1.0 + np.abs(upper)))
        self._add(held[~at_lower & ~at_upper])
        keep = at_lower | at_upper
        before = self._held_values(cols[keep])
        self._at_upper[held[keep]] = at_upper[keep]
        self._move_held(cols[keep], before)

    def _ray_columns(self) -> IntArray:
        """Held movable columns with an entry in a row of HiGHS's infeasibility proof (its dual
        ray), if they are few: only they can break the proof."""
        _, has_ray, ray = self._highs.getDualRay()
        if not has_ray:
            return np.zeros(0, dtype=np.int64)
        hits = np.abs(self._sub_t @ np.asarray(ray, dtype=float)) > 1e-12
        movable = self._col_lower[self._sift] < self._col_upper[self._sift]
        found = np.nonzero(hits & movable & ~self._inside)[0]
        if len(found) > 0.25 * max(1, int((~self._inside).sum())):
            return np.zeros(0, dtype=np.int64)
        return found

    def _near_touched(self) -> IntArray:
        """Held movable columns with an entry in a touched row, if they are few."""
        touched = self._touched.astype(float)
        hits = (self._sub_t @ touched) != 0.0
        movable = self._col_lower[self._sift] < self._col_upper[self._sift]
        found = np.nonzero(hits & movable & ~self._inside)[0]
        if len(found) > 0.25 * max(1, int((~self._inside).sum())):
            return np.zeros(0, dtype=np.int64)
        return found

    @property
    def working_columns(self) -> int:
        """Siftable columns loaded into HiGHS now."""
        return int(self._inside.sum())

    # -- the working set ----------------------------------------------------------------------

    def _held_values(self, cols: IntArray) -> FloatArray:
        """Values the columns would have if held: their lower or upper bound by status."""
        k = self._k_of[cols]
        upper = (k >= 0) & self._at_upper[np.maximum(k, 0)]
        values: FloatArray = np.where(upper, self._col_upper[cols], self._col_lower[cols])
        return values

    def _move_held(self, cols: IntArray, before: FloatArray) -> None:
        """Account for held columns among `cols` whose value moved from `before`."""
        if not len(self._sift) or not len(cols):
            return
        k = self._k_of[cols]
        held = k >= 0
        held[held] = ~self._inside[k[held]]
        delta = np.where(held, self._held_values(cols) - before, 0.0)
        moved = np.nonzero(delta != 0.0)[0]
        if not len(moved):
            return
        change = self._sub[:, k[moved]] @ delta[moved]
        rows = np.nonzero(change)[0]
        self._shift[rows] += change[rows]
        self._dirty_rows[rows] = True
        self._touched[rows] = True

    def _add(self, k: IntArray) -> None:
        """Load siftable columns `k` (indices into the siftable list) into HiGHS, at lower."""
        k = np.asarray(k, dtype=np.int64)
        if not len(k):
            return
        cols = self._sift[k]
        values = self._held_values(cols)
        upper = self._at_upper[k].copy()
        block = self._sub[:, k]
        change = block @ values
        rows = np.nonzero(change)[0]
        self._shift[rows] -= change[rows]
        self._dirty_rows[rows] = True
        self._inside[k] = True
        self._at_upper[k] = False
        block = block.tocsc()
        self._highs.addCols(
            len(k),
            self._cost[cols],
            self._col_lower[cols],
            self._col_upper[cols],
            int(block.nnz),
            block.indptr[:-1].astype(np.int32),
            block.indices.astype(np.int32),
            block.data.astype(float),
        )
        self._pos[cols] = len(self._cols) + np.arange(len(k))
        self._cols = np.concatenate([self._cols, cols])
        self.added += len(k)
        if upper.any():
            # HiGHS adds columns at their lower bound: those held at the upper one stay there,
            # so that the point HiGHS continues from is the one it stopped at.
            basis = self._highs.getBasis()
            status = basis.col_status
            for position in self._pos[cols[upper]].tolist():
                status[position] = highspy.HighsBasisStatus.kUpper
            basis.col_status = status
            self._highs.setBasis(basis)

    def _push_rows(self) -> None:
        """Send HiGHS the row bounds that changed, less the held columns' activity."""
        rows = np.nonzero(self._dirty_rows)[0]
        if len(rows):
            self._highs.changeRowsBounds(
                len(rows),
                rows.astype(np.int32),
                self._row_lower[rows] - self._shift[rows],
                self._row_upper[rows] - self._shift[rows],
            )
            self._dirty_rows[:] = False

    def _build(self, basis: SiftBasis | None) -> None:
        """A new HiGHS model: the columns that are not siftable plus the working set (the
        basic siftable columns of `basis`, or all of them without one)."""
        left = None
        if self._highs is not None and "time_limit" in self._options:
            left = float(self._options["time_limit"]) - float(self._highs.getRunTime())
        if basis is None or not basis.valid:
            self._inside[:] = True
            self._at_upper[:] = False
        else:
            status = basis.col_status[self._sift]
            self._inside = status == _BASIC
            self._at_upper = ~self._inside & (status == _UPPER)
        keep = ~self._is_sift
        keep[self._sift[self._inside]] = True
        self._cols = np.nonzero(keep)[0].astype(np.int64)
        self._pos[:] = -1
        self._pos[self._cols] = np.arange(len(self._cols))
        held = ~self._inside
        self._shift = self._sub[:, np.nonzero(held)[0]] @ self._held_values(self._sift[held])
        part = self._matrix[:, self._cols]
        part.eliminate_zeros()
        part = part.tocsc()
        highs = highspy.Highs()
        for name, value in self._options.items():
            highs.setOptionValue(name, value)
        if left is not None:
            highs.setOptionValue("time_limit", max(left, 1e-3))
        lp = column_lp(
            part,
            self._cost[self._cols],
            self._col_lower[self._cols],
            self._col_upper[self._cols],
            self._row_lower - self._shift,
            self._row_upper - self._shift,
        )
        if highs.passModel(lp) == highspy.HighsStatus.kError:
            raise ValueError("sifting: HiGHS refused the restricted model")
        self._highs = highs
        self._dirty_rows[:] = False
        if basis is not None and basis.valid:
            highs.setBasis(_highs_basis(basis.col_status[self._cols], basis.row_status))


def _highs_basis(col_status: IntArray, row_status: IntArray) -> Any:
    """A highspy basis from status codes."""
    basis = highspy.HighsBasis()
    basis.col_status = _ENUMS[col_status].tolist()
    basis.row_status = _ENUMS[row_status].tolist()
    basis.valid = True
    return basis


def _codes(statuses: list[Any]) -> IntArray:
    """highspy status enums as int64 codes."""
    return np.fromiter((int(s) for s in statuses), dtype=np.int64, count=len(statuses))
