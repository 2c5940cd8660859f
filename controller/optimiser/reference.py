"""The reference formulation: the seed's LP as written, in cvxpy, solved by ECOS.

It is deliberately the textbook form, independent of the fast path's compact one: power per car
and slot as (N, T) matrices, the battery content as a cumulative sum at every slot boundary with
its capacity (and SoC floor) bound at every slot, the site constraint on the slot sums. Each
lexicographic stage is a `cvxpy.Problem` over the same variables; all data enter as
`cvxpy.Parameter`s (DPP), so the problems of one structure (N, T, departures, V2G cars) are
compiled once and a re-solve with new numbers only re-runs ECOS. A small LRU cache keeps the
compiled structures.
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
from controller.optimiser.stages import OptimiserFailed, StageResult, clean, finish, site_profile
from controller.planning.problem import FloatArray, PlanningProblem, Schedule

# cvxpy's annotations are partial (atoms are not exported as typed names): use it untyped.
cp: Any = _cvxpy
_CACHE_SIZE = 8
_ECOS = {"abstol": 1e-8, "reltol": 1e-8, "feastol": 1e-8, "max_iters": 200}
# The shortfall stage's optimum is usually 0, where only the absolute gap can close: 1e-6 kWh
# (the feasibility tolerance) is what the verdict needs, and ECOS stalls well below it.
_ECOS_SHORTFALL = {**_ECOS, "abstol": 1e-6}


@dataclass(slots=True)
class _Structure:
    """The compiled stage problems of one structure and the parameters that feed them."""

    params: dict[str, Any]
    charge: Any
    discharge: Any
    short: Any
    site: Any
    site_limit: Any
    shortfall_stage: Any
    fair_stage: Any
    cost_stage: Any
    peak_stage: Any
    ramp_stage: Any
    money: Any


_lock = threading.Lock()
_cache: OrderedDict[tuple[object, ...], _Structure] = OrderedDict()


def _structure_key(prepared: Prepared) -> tuple[object, ...]:
    p = prepared.problem
    free, discharge_free, scaled = _masks(prepared)
    return (
        p.n_vehicles,
        p.n_slots,
        p.departure_slot.tobytes(),
        prepared.v2g.tobytes(),
        np.packbits(free).tobytes(),
        np.packbits(discharge_free).tobytes(),
        np.packbits(scaled).tobytes(),
    )


def _masks(prepared: Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the LP has a choice: charge and discharge entries with room, cars with a shortfall.

    Entries without room are constants: an interior-point method has no interior to walk
    through in a bound with lower == upper.
    """
    free = prepared.upper_kw - prepared.lower_kw > 1e-9
    discharge_free = prepared.discharge_upper_kw > 1e-9
    return free, discharge_free, prepared.scale_kwh > 0.0


def _scatter(mask: np.ndarray, variable: Any) -> Any:
    """An (N, T) expression with `variable` at the True cells of `mask` and 0 elsewhere."""
    rows = np.flatnonzero(mask)
    select = sparse.csr_matrix(
        (np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(mask.size, len(rows))
    )
    return cp.reshape(select @ variable, mask.shape, order="C")


@dataclass(frozen=True, slots=True)
class StageProblems:
    """The lexicographic stages over one form's constraints, as `cvxpy.Problem`s."""

    shortfall: Any
    fair: Any
    cost: Any
    peak: Any
    ramp: Any


def stage_problems(
    constraints: list[Any],
    short: Any,
    money: Any,
    site: Any,
    peak: Any,
    par: dict[str, Any],
    t_count: int,
) -> StageProblems:
    """Shortfall, fairness, money, peak and ramp stages over `constraints` (both cvxpy forms).

    `short` is the shortfall vector, `money` the money objective, `site` the site power per
    slot, `peak` the variable bounding it; the caps between stages are the parameters
    `short_cap`, `fair_cap` (scale x the largest relative shortfall), `scale`, `money_cap` and
    `peak_cap` of `par`.
    """
    worst = cp.Variable(nonneg=True)
    short_total = cp.sum(short)
    capped_short = [*constraints, short_total <= par["short_cap"]]
    fair = [*capped_short, short <= par["fair_cap"]]
    ramp = cp.Variable(max(t_count - 1, 1), nonneg=True)
    ramps = [ramp >= cp.diff(site), ramp >= -cp.diff(site)] if t_count > 1 else []
    return StageProblems(
        shortfall=cp.Problem(cp.Minimize(short_total), constraints),
        fair=cp.Problem(
            cp.Minimize(worst), [*capped_short, short <= cp.multiply(par["scale"], worst)]
        ),
        cost=cp.Problem(cp.Minimize(money), fair),
        peak=cp.Problem(cp.Minimize(peak), [*fair, money <= par["money_cap"]]),
        ramp=cp.Problem(
            cp.Minimize(cp.sum(ramp)),
            [*fair, money <= par["money_cap"], peak <= par["peak_cap"], *ramps],
        ),
    )


def _build(prepared: Prepared) -> _Structure:
    p = prepared.problem
    n, t_count = p.n_vehicles, p.n_slots
    free, discharge_free, scaled = _masks(prepared)
    par = {
        "width": cp.Parameter(int(free.sum()), nonneg=True),  # upper - lower of free entries
        "lower": cp.Parameter((n, t_count), nonneg=True),
        "charge_eff": cp.Parameter((n, t_count), nonneg=True),  # eta_ch * dt
        "forced_delta": cp.Parameter((n, t_count), nonneg=True),  # eta_ch * dt * lower
        "forced_money": cp.Parameter(),  # what the forced charge costs
        "start": cp.Parameter((n, 1)),
        "capacity": cp.Parameter((n, 1)),
        "goal": cp.Parameter(n),  # content asked at departure: start + min(need, reach)
        "scale": cp.Parameter(n, nonneg=True),  # unit of relative shortfall
        "headroom": cp.Parameter(t_count, nonneg=True),
        "price_dt": cp.Parameter(t_count),  # EUR per kW of charge in the slot
        "demand": cp.Parameter(nonneg=True),
        "short_cap": cp.Parameter(nonneg=True),
        "fair_cap": cp.Parameter(n, nonneg=True),  # scale * largest relative shortfall
        "money_cap": cp.Parameter(),
        "peak_cap": cp.Parameter(nonneg=True),
    }
    room = cp.Variable(int(free.sum()), nonneg=True)
    chosen = _scatter(free, room)
    charge = par["lower"] + chosen
    short_free = cp.Variable(int(scaled.sum()), nonneg=True)
    short = _scatter(scaled[:, None], short_free)[:, 0]
    peak = cp.Variable(nonneg=True)
    delta = par["forced_delta"] + cp.multiply(par["charge_eff"], chosen)
    discharge: Any = None
    constraints: list[Any] = [
        room <= par["width"],
        short_free <= par["scale"][np.flatnonzero(scaled)],
    ]
    site: Any = cp.sum(par["lower"], axis=0) + cp.sum(chosen, axis=0)
    money: Any = par["price_dt"] @ cp.sum(chosen, axis=0) + par["forced_money"]
    if prepared.v2g.any():
        v2g_rows = np.nonzero(prepared.v2g)[0]
        par |= {
            "discharge_upper": cp.Parameter(int(discharge_free.sum()), nonneg=True),
            "discharge_eff": cp.Parameter((n, t_count), nonneg=True),  # dt / eta_dis
            "floor": cp.Parameter((n, 1)),
            "export": cp.Parameter(nonneg=True),
            "discharge_money_dt": cp.Parameter(t_count),  # (degradation - export price) * dt
            "charge_share": cp.Parameter((n, 1), nonneg=True),  # 1 / largest charge bound
            "discharge_share": cp.Parameter((n, 1), nonneg=True),  # 1 / discharge bound
        }
        discharge_free_var = cp.Variable(int(discharge_free.sum()), nonneg=True)
        discharge = _scatter(discharge_free, discharge_free_var)
        delta = delta - cp.multiply(par["discharge_eff"], discharge)
        site = site - cp.sum(discharge, axis=0)
        money = money + par["discharge_money_dt"] @ cp.sum(discharge, axis=0)
        constraints += [
            discharge_free_var <= par["discharge_upper"],
            cp.multiply(par["charge_share"], charge)
            + cp.multiply(par["discharge_share"], discharge)
            <= 1.0,
            site >= -par["export"],
        ]
    # The battery content at the end of each slot, by the balance equation slot after slot.
    energy = cp.Variable((n, t_count))
    constraints += [
        energy[:, :1] == par["start"] + delta[:, :1],
        energy[:, 1:] == energy[:, :-1] + delta[:, 1:],
        energy <= par["capacity"],
    ]
    if prepared.v2g.any():
        constraints.append(energy[v2g_rows, :] >= par["floor"][v2g_rows, :])
    leaving = np.nonzero(p.departure_slot > 0)[0]
    if len(leaving):
        at_departure = energy[leaving, p.departure_slot[leaving] - 1]
        constraints.append(at_departure + short[leaving] >= par["goal"][leaving])
    site_limit = site <= par["headroom"]
    constraints += [site_limit, peak >= site]
    money = money + par["demand"] * peak
    stages = stage_problems(constraints, short, money, site, peak, par, t_count)
    return _Structure(
        params=par,
        charge=charge,
        discharge=discharge,
        short=short,
        site=site,
        site_limit=site_limit,
        shortfall_stage=stages.shortfall,
        fair_stage=stages.fair,
        cost_stage=stages.cost,
        peak_stage=stages.peak,
        ramp_stage=stages.ramp,
        money=money,
    )


def _load(structure: _Structure, prepared: Prepared) -> None:
    p = prepared.problem
    dt = p.dt_h
    par = structure.params
    free, discharge_free, _ = _masks(prepared)
    par["width"].value = (prepared.upper_kw - prepared.lower_kw)[free]
    par["lower"].value = prepared.lower_kw
    par["charge_eff"].value = p.eta_ch[:, None] * dt[None, :]
    par["forced_delta"].value = par["charge_eff"].value * prepared.lower_kw
    par["forced_money"].value = float(p.price_eur_per_kwh @ (prepared.lower_kw.sum(axis=0) * dt))
    par["start"].value = p.energy_kwh[:, None]
    par["capacity"].value = np.maximum(p.capacity_kwh, p.energy_kwh)[:, None]
    par["goal"].value = p.energy_kwh + prepared.goal_kwh
    par["scale"].value = prepared.scale_kwh
    par["headroom"].value = prepared.headroom_kw
    par["price_dt"].value = p.price_eur_per_kwh * dt
    par["demand"].value = p.demand_charge_eur_per_kw
    if "discharge_upper" in par:
        par["discharge_upper"].value = prepared.discharge_upper_kw[discharge_free]
        par["discharge_eff"].value = dt[None, :] / p.eta_dis[:, None] * np.ones((p.n_vehicles, 1))
        par["floor"].value = prepared.floor_kwh[:, None]
        par["export"].value = p.export_limit_kw
        par["discharge_money_dt"].value = (
            p.degradation_eur_per_kwh - p.export_price_eur_per_kwh
        ) * dt
        par["charge_share"].value = (1.0 / prepared.unit_kw)[:, None]
        par["discharge_share"].value = (1.0 / prepared.discharge_unit_kw)[:, None]
    for name in ("short_cap", "money_cap", "peak_cap"):
        par[name].value = 0.0
    par["fair_cap"].value = np.zeros(p.n_vehicles)


def _solve(stage: Any, name: str, inaccurate: list[str]) -> float:
    """Solve one stage. ECOS may end "optimal_inaccurate" when a stage's optimum is 0 (its
    relative gap is then undefined); that is accepted and counted in `details`."""
    with warnings.catch_warnings():
        # ECOS's "may be inaccurate" warning: the status says the same, and is checked here.
        warnings.simplefilter("ignore", UserWarning)
        try:
            stage.solve(solver=cp.ECOS, **(_ECOS_SHORTFALL if name == "shortfall" else _ECOS))
        except cp.error.SolverError as exc:
            raise OptimiserFailed(f"ECOS: {name} stage failed: {exc}") from exc
    if stage.status == cp.OPTIMAL_INACCURATE:
        inaccurate.append(name)
    elif stage.status != cp.OPTIMAL:
        raise OptimiserFailed(f"ECOS: {name} stage ended {stage.status}")
    return float(stage.value)


def solve_reference(problem: PlanningProblem, options: OptimiserOptions | None = None) -> Schedule:
    """The lexicographically optimal schedule of `problem`, by cvxpy and ECOS."""
    options = options or DEFAULT_OPTIONS
    started = time.perf_counter()
    prepared = prepare(problem)
    if problem.n_vehicles == 0:
        from controller.optimiser.fast import _empty

        return finish(prepared, _empty(prepared, "cvxpy-ecos"), options, elapsed_s=0.0)
    key = _structure_key(prepared)
    with _lock:
        structure = _cache.pop(key, None) or _build(prepared)
        _cache[key] = structure
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        result = _stages(structure, prepared, options)
    return finish(prepared, result, options, elapsed_s=time.perf_counter() - started)


def _stages(structure: _Structure, prepared: Prepared, options: OptimiserOptions) -> StageResult:
    par = structure.params
    _load(structure, prepared)
    solves = 1
    inaccurate: list[str] = []
    shortfall = max(0.0, _solve(structure.shortfall_stage, "shortfall", inaccurate))
    worst = 0.0
    par["short_cap"].value = shortfall + options.slack(shortfall)
    par["fair_cap"].value = prepared.scale_kwh
    if options.fairness and shortfall > options.feasibility_tolerance_kwh:
        worst = max(0.0, _solve(structure.fair_stage, "fairness", inaccurate))
        solves += 1
        par["fair_cap"].value = prepared.scale_kwh * min(1.0, worst + options.slack(worst))
    cost = _solve(structure.cost_stage, "cost", inaccurate)
    solves += 1
    price = np.maximum(0.0, np.asarray(structure.site_limit.dual_value, dtype=float))
    charge, discharge = _powers(structure, prepared)
    cost_peak, cost_ramp = site_profile(charge, discharge)
    peak, ramp = cost_peak, cost_ramp
    if options.peak_flattening:
        par["money_cap"].value = cost + options.slack(cost)
        peak = _solve(structure.peak_stage, "peak", inaccurate)
        solves += 1
        if options.ramp_smoothing and prepared.n_slots > 1:
            par["peak_cap"].value = peak + options.slack(peak)
            ramp = _solve(structure.ramp_stage, "ramp", inaccurate)
            solves += 1
            charge, discharge = _powers(structure, prepared)
        else:
            charge, discharge = _powers(structure, prepared)
    return StageResult(
        charge_kw=charge,
        discharge_kw=discharge,
        shortfall_kwh=shortfall if shortfall > options.feasibility_tolerance_kwh else 0.0,
        max_relative_shortfall=worst,
        cost_eur=cost,
        cost_stage_peak_kw=cost_peak,
        cost_stage_ramp_kw=cost_ramp,
        peak_kw=peak,
        ramp_kw=ramp,
        headroom_price_eur_per_kw=price,
        status="optimal" if shortfall <= options.feasibility_tolerance_kwh else "optimal_shortfall",
        solver="cvxpy-ecos",
        solves=solves,
        extra={"inaccurate_stages": float(len(inaccurate))},
    )


def _powers(structure: _Structure, prepared: Prepared) -> tuple[FloatArray, FloatArray]:
    charge = clean(np.asarray(structure.charge.value, dtype=float), prepared.upper_kw)
    if structure.discharge is None:
        return charge, np.zeros_like(charge)
    discharge = np.asarray(structure.discharge.value, dtype=float)
    return charge, clean(discharge, prepared.discharge_upper_kw)
