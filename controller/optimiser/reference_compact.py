"""The compact cvxpy/ECOS formulation: the seed's LP as a transportation problem, in cvxpy.

The textbook reference (`reference.py`) keeps an energy state per car and slot; that makes it
slow (tens of seconds at 278 cars) and is why it only checks small fleets. This module states
the same LP for fleets without discharge in the transportation form the issue quotes its cvxpy
figures for (cars -> slots):

- one variable per *free* (car, slot) entry (upper > lower: entries without room are the
  constant forced power), the grid-side energy x_it = (P_it - L_it) dt_t in kWh, 0 <= x <= width;
- the slot energies y_t = sum_i x_it (kWh) carry the price and the site row
  y_t <= h_t dt_t - forced energy of the slot;
- one energy row per car, with eta folded into the car's demand: a car that cannot discharge
  never loses energy, so its content is highest at departure and the two rows
  goal_i / eta_i - F_i <= sum_t x_it + s_i / eta_i and sum_t x_it <= room_i / eta_i - F_i
  (F_i its forced grid energy, s_i its shortfall in battery kWh) stand for every balance
  equation and every capacity row of the textbook form.

The lexicographic stages (total shortfall, fairness, money, and when the options ask for them
the peak and the ramps) are `cvxpy.Problem`s over the same variables. The first one solved is
the money stage with every target hard: when ECOS finds it feasible the total shortfall is 0,
so it is the money stage (one ECOS run on a feasible day); only when it is infeasible do the
shortfall, fairness and money stages run. All data are `cvxpy.Parameter`s (DPP), and every
coefficient matrix that is not a parameter depends only on which entries are free: a structure
compiles once and a re-solve after a car's event or a price change only loads new parameter
values and re-runs ECOS. Fleets in which a car may discharge (V2G) are refused with
`CompactFormUnsupported`: their content is not monotone, and the textbook reference covers them.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import cvxpy as _cvxpy
import numpy as np
from scipy import sparse

from controller.optimiser.options import DEFAULT_OPTIONS, OptimiserOptions
from controller.optimiser.prepare import Prepared, prepare
from controller.optimiser.reference import _ECOS, _ECOS_SHORTFALL, stage_problems
from controller.optimiser.stages import OptimiserFailed, StageResult, clean, finish, site_profile
from controller.planning.problem import FloatArray, PlanningProblem, Schedule

# cvxpy's annotations are partial (atoms are not exported as typed names): use it untyped.
cp: Any = _cvxpy
SOLVER_NAME = "cvxpy-ecos-compact"
_CACHE_SIZE = 8
# ECOS's complementarity gap stops closing at about 3-5e-10 per inequality row (measured: 6e-5
# with ~220k rows, 3e-4 with ~550k), so each stage asks for an absolute gap of at least this
# per row and a relative gap of 1e-7 (the textbook reference's 1e-8 is below that floor from
# ~5,000 cars on: ECOS then runs its 200 iterations and ends "optimal_inaccurate").
_GAP_PER_ROW = 1e-9
_RELTOL = 1e-7


class CompactFormUnsupported(OptimiserFailed):
    """The compact form cannot state this problem (a car may discharge): use the textbook one."""


@dataclass(slots=True)
class CompactStructure:
    """The compiled stage problems of one structure (which entries are free, which cars may fall
    short) and the parameters that feed them."""

    key: tuple[object, ...]
    params: dict[str, Any]
    cells: np.ndarray  # (nfree,) flat (car * T + slot) index of each free entry
    slot_of_cell: np.ndarray  # (nfree,) its slot
    x: Any  # (nfree,) grid-side kWh of the free entries
    site_limit: Any  # the slot rows y_t <= h_t dt_t - forced kWh (dual: EUR per kWh)
    rows: int  # inequality rows ECOS sees (bounds, site, energy), for the shortfall tolerance
    hard_stage: Any
    shortfall_stage: Any
    fair_stage: Any
    cost_stage: Any
    peak_stage: Any
    ramp_stage: Any

    @property
    def stages(self) -> tuple[Any, ...]:
        """Every stage's `cvxpy.Problem` (compiled on its first solve, then reused)."""
        return (
            self.hard_stage,
            self.shortfall_stage,
            self.fair_stage,
            self.cost_stage,
            self.peak_stage,
            self.ramp_stage,
        )


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """How many structures the cache holds, and how many were built since the process began."""

    structures: int
    builds: int


_lock = threading.Lock()
_cache: OrderedDict[tuple[object, ...], CompactStructure] = OrderedDict()
_builds = [0]  # structures built (a miss of the cache), for `cache_info`


def _masks(prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """(free entries (N, T), cars that may fall short (N,)): what the structure depends on.

    Entries without room are constants (an interior-point method has no interior to walk
    through in a bound with lower == upper), as in the textbook reference.
    """
    return prepared.upper_kw - prepared.lower_kw > 1e-9, prepared.scale_kwh > 0.0


def structure_key(problem: PlanningProblem) -> tuple[object, ...]:
    """What decides the compiled structure of `problem`: N, T, free entries, shortfall cars."""
    return _key(prepare(problem))


def _key(prepared: Prepared) -> tuple[object, ...]:
    free, scaled = _masks(prepared)
    return (
        prepared.n_vehicles,
        prepared.n_slots,
        np.packbits(free).tobytes(),
        np.packbits(scaled).tobytes(),
    )


def _incidence(rows: np.ndarray, n_rows: int, n_cols: int) -> sparse.csr_matrix:
    """A 0/1 matrix with a 1 at (rows[j], j) for every column j."""
    return sparse.csr_matrix(
        (np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(n_rows, n_cols)
    )


def _build(prepared: Prepared, key: tuple[object, ...]) -> CompactStructure:
    n, t_count = prepared.n_vehicles, prepared.n_slots
    free, scaled = _masks(prepared)
    cells = np.flatnonzero(free)
    car_of_cell, slot_of_cell = np.divmod(cells, t_count)
    short_cars = np.flatnonzero(scaled)
    # One energy row per car that has a choice or may fall short; the others are constants
    # that `prepare` already made consistent (forced power fits the battery).
    rowed = np.flatnonzero(free.any(axis=1) | scaled)
    row_of_car = np.full(n, -1, dtype=np.int64)
    row_of_car[rowed] = np.arange(len(rowed))
    nfree, k = len(cells), len(short_cars)
    par = {
        "width": cp.Parameter(nfree, nonneg=True),  # kWh room of each free entry
        "slot_room": cp.Parameter(t_count),  # h_t dt_t - forced kWh of slot t
        "price": cp.Parameter(t_count),  # EUR per kWh
        "forced_money": cp.Parameter(),  # EUR of the forced power
        "forced_kw": cp.Parameter(t_count),  # forced site power
        "inv_dt": cp.Parameter(t_count, nonneg=True),  # 1 / dt_t
        "demand_kwh": cp.Parameter(len(rowed)),  # grid kWh asked: goal / eta - forced
        "room_kwh": cp.Parameter(len(rowed), nonneg=True),  # grid kWh the battery takes
        "short_grid": cp.Parameter(k, nonneg=True),  # 1 / eta: grid kWh per kWh of shortfall
        "scale": cp.Parameter(k, nonneg=True),  # unit of relative shortfall (battery kWh)
        "demand": cp.Parameter(nonneg=True),  # demand charge EUR per kW of peak
        "short_cap": cp.Parameter(nonneg=True),
        "fair_cap": cp.Parameter(k, nonneg=True),  # scale * largest relative shortfall
        "money_cap": cp.Parameter(),
        "peak_cap": cp.Parameter(nonneg=True),
    }
    x = cp.Variable(nfree, nonneg=True)
    y = cp.Variable(t_count)
    short = cp.Variable(k, nonneg=True)
    peak = cp.Variable(nonneg=True)
    site_limit = y <= par["slot_room"]
    site = par["forced_kw"] + cp.multiply(par["inv_dt"], y)  # kW
    # What every stage keeps; the hard stage (every target met) has no shortfall columns.
    common: list[Any] = [
        x <= par["width"],
        y == _incidence(slot_of_cell, t_count, nfree) @ x,
        site_limit,
        peak >= site,
    ]
    hard = list(common)
    constraints = [*common, short <= par["scale"]]
    if len(rowed):
        energy = _incidence(row_of_car[car_of_cell], len(rowed), nfree) @ x
        full = energy <= par["room_kwh"]
        hard += [full, energy >= par["demand_kwh"]]
        if k:
            covered = _incidence(row_of_car[short_cars], len(rowed), k) @ cp.multiply(
                par["short_grid"], short
            )
            constraints += [full, energy + covered >= par["demand_kwh"]]
        else:
            constraints += [full, energy >= par["demand_kwh"]]
    money = par["price"] @ y + par["forced_money"] + par["demand"] * peak
    stages = stage_problems(constraints, short, money, site, peak, par, t_count)
    return CompactStructure(
        key=key,
        params=par,
        cells=cells,
        slot_of_cell=slot_of_cell,
        x=x,
        site_limit=site_limit,
        rows=2 * nfree + 2 * k + 2 * t_count + 2 * len(rowed),
        hard_stage=cp.Problem(cp.Minimize(money), hard),
        shortfall_stage=stages.shortfall,
        fair_stage=stages.fair,
        cost_stage=stages.cost,
        peak_stage=stages.peak,
        ramp_stage=stages.ramp,
    )


def _load(structure: CompactStructure, prepared: Prepared) -> None:
    """Set every parameter from `prepared` (the structure's masks are those of `prepared`)."""
    p = prepared.problem
    dt = p.dt_h
    par = structure.params
    free, scaled = _masks(prepared)
    rowed = np.flatnonzero(free.any(axis=1) | scaled)
    forced_kwh = prepared.lower_kw * dt[None, :]  # (N, T) grid-side forced energy
    forced_car = forced_kwh.sum(axis=1)
    slot_forced = forced_kwh.sum(axis=0)
    par["width"].value = ((prepared.upper_kw - prepared.lower_kw) * dt[None, :]).ravel()[
        structure.cells
    ]
    par["slot_room"].value = prepared.headroom_kw * dt - slot_forced
    par["price"].value = p.price_eur_per_kwh
    par["forced_money"].value = float(p.price_eur_per_kwh @ slot_forced)
    par["forced_kw"].value = prepared.lower_kw.sum(axis=0)
    par["inv_dt"].value = 1.0 / dt
    eta = p.eta_ch[rowed]
    par["demand_kwh"].value = prepared.goal_kwh[rowed] / eta - forced_car[rowed]
    par["room_kwh"].value = np.maximum(0.0, prepared.room_kwh[rowed] / eta - forced_car[rowed])
    par["short_grid"].value = 1.0 / p.eta_ch[scaled]
    par["scale"].value = prepared.scale_kwh[scaled]
    par["demand"].value = p.demand_charge_eur_per_kw
    for name in ("short_cap", "money_cap", "peak_cap"):
        par[name].value = 0.0
    par["fair_cap"].value = np.zeros(int(scaled.sum()))


def _structure(prepared: Prepared) -> CompactStructure:
    """The cached structure of `prepared`, built (not yet compiled) on a miss. Hold `_lock`."""
    key = _key(prepared)
    structure = _cache.pop(key, None)
    if structure is None:
        structure = _build(prepared, key)
        _builds[0] += 1
    _cache[key] = structure
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return structure


def cached_structure(problem: PlanningProblem) -> CompactStructure | None:
    """The compiled structure a solve of `problem` would reuse, if it is cached."""
    with _lock:
        return _cache.get(structure_key(problem))


def cache_info() -> CacheInfo:
    """How many compiled structures the cache holds and how many were ever built."""
    with _lock:
        return CacheInfo(structures=len(_cache), builds=_builds[0])


def forget_compiled() -> None:
    """Drop every cached structure (their compiled matrices can be large)."""
    with _lock:
        _cache.clear()


def solve_reference_compact(
    problem: PlanningProblem, options: OptimiserOptions | None = None
) -> Schedule:
    """The lexicographically optimal schedule of a fleet without discharge, by cvxpy and ECOS on
    the compact (transportation) form; `CompactFormUnsupported` if a car may discharge."""
    options = options or DEFAULT_OPTIONS
    started = time.perf_counter()
    prepared = prepare(problem)
    if prepared.any_v2g:
        cars = int(prepared.discharge_available.any(axis=1).sum())
        raise CompactFormUnsupported(
            f"compact cvxpy form: {cars} car(s) may discharge (V2G); their battery content is"
            " not monotone, so it needs the per-slot balance of `solve_reference`"
        )
    if problem.n_vehicles == 0:
        from controller.optimiser.fast import _empty

        return finish(prepared, _empty(prepared, SOLVER_NAME), options, elapsed_s=0.0)
    with _lock:
        structure = _structure(prepared)
        result = _stages(structure, prepared, options)
    return finish(prepared, result, options, elapsed_s=time.perf_counter() - started)


def _stages(
    structure: CompactStructure, prepared: Prepared, options: OptimiserOptions
) -> StageResult:
    par = structure.params
    _load(structure, prepared)
    solves = 1
    inaccurate: list[str] = []
    _, scaled = _masks(prepared)
    scale = prepared.scale_kwh[scaled]
    hard = _hard(structure, inaccurate)
    if hard is not None:  # every target met: stages 1-2 are 0, the hard stage is the money stage
        shortfall, worst, cost = 0.0, 0.0, hard
        par["short_cap"].value = options.slack(0.0)
        par["fair_cap"].value = scale
    else:
        solves += 1
        shortfall = max(0.0, _run(structure, "shortfall", inaccurate))
        worst = 0.0
        par["short_cap"].value = shortfall + options.slack(shortfall)
        par["fair_cap"].value = scale
        if options.fairness and shortfall > options.feasibility_tolerance_kwh:
            worst = max(0.0, _run(structure, "fairness", inaccurate))
            solves += 1
            par["fair_cap"].value = scale * min(1.0, worst + options.slack(worst))
        cost = _run(structure, "cost", inaccurate)
        solves += 1
    # The site rows are in kWh: their dual (EUR per kWh of the slot) times dt_t is EUR per kW.
    dual = np.asarray(structure.site_limit.dual_value, dtype=float)
    price = np.maximum(0.0, dual * prepared.problem.dt_h)
    charge = _powers(structure, prepared)
    cost_peak, cost_ramp = site_profile(charge, np.zeros_like(charge))
    peak, ramp = cost_peak, cost_ramp
    if options.peak_flattening:
        par["money_cap"].value = cost + options.slack(cost)
        peak = _run(structure, "peak", inaccurate)
        solves += 1
        if options.ramp_smoothing and prepared.n_slots > 1:
            par["peak_cap"].value = peak + options.slack(peak)
            ramp = _run(structure, "ramp", inaccurate)
            solves += 1
        charge = _powers(structure, prepared)
    feasible = shortfall <= options.feasibility_tolerance_kwh
    return StageResult(
        charge_kw=charge,
        discharge_kw=np.zeros_like(charge),
        shortfall_kwh=0.0 if feasible else shortfall,
        max_relative_shortfall=worst,
        cost_eur=cost,
        cost_stage_peak_kw=cost_peak,
        cost_stage_ramp_kw=cost_ramp,
        peak_kw=peak,
        ramp_kw=ramp,
        headroom_price_eur_per_kw=price,
        status="optimal" if feasible else "optimal_shortfall",
        solver=SOLVER_NAME,
        solves=solves,
        extra={"inaccurate_stages": float(len(inaccurate))},
    )


def _powers(structure: CompactStructure, prepared: Prepared) -> FloatArray:
    """(N, T) charge kW of the last solve: forced power plus the free entries' energy / dt."""
    dt = prepared.problem.dt_h
    charge = prepared.lower_kw.copy()
    chosen = np.asarray(structure.x.value, dtype=float).reshape(-1)
    charge.ravel()[structure.cells] += chosen / dt[structure.slot_of_cell]
    return clean(charge, prepared.upper_kw)


def _settings(name: str, rows: int) -> dict[str, float]:
    """ECOS settings of a stage: the textbook reference's, with the gaps ECOS can reach."""
    base = _ECOS_SHORTFALL if name == "shortfall" else _ECOS
    return {**base, "abstol": max(base["abstol"], _GAP_PER_ROW * rows), "reltol": _RELTOL}


def _run(structure: CompactStructure, name: str, inaccurate: list[str]) -> float:
    """Solve the stage `name`. ECOS may end "optimal_inaccurate" (close to its tolerances, or
    a stage whose optimum is 0); that is accepted and counted in `details`."""
    stage = getattr(structure, f"{'fair' if name == 'fairness' else name}_stage")
    status = _ecos(stage, name, _settings(name, structure.rows))
    if status == cp.OPTIMAL_INACCURATE:
        inaccurate.append(name)
    elif status != cp.OPTIMAL:
        raise OptimiserFailed(f"ECOS: {name} stage ended {status}")
    return float(stage.value)


def _hard(structure: CompactStructure, inaccurate: list[str]) -> float | None:
    """The money optimum with every target hard, or None when ECOS finds that infeasible."""
    stage = structure.hard_stage
    status = _ecos(stage, "hard", _settings("hard", structure.rows))
    if status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        return None
    if status == cp.OPTIMAL_INACCURATE:
        inaccurate.append("hard")
    elif status != cp.OPTIMAL:
        raise OptimiserFailed(f"ECOS: hard stage ended {status}")
    return float(stage.value)


def _ecos(stage: Any, name: str, settings: dict[str, float]) -> str:
    """Run ECOS on a compiled stage; its status."""
    with warnings.catch_warnings():
        # ECOS's "may be inaccurate" warning: the status says the same, and is checked.
        warnings.simplefilter("ignore", UserWarning)
        try:
            stage.solve(solver=cp.ECOS, **settings)
        except cp.error.SolverError as exc:
            raise OptimiserFailed(f"ECOS: {name} stage failed: {exc}") from exc
    status: str = stage.status
    return status
