"""The year study: the planner without the protocols, day by day, against the baselines.

For each sampled day (`simulators.dayinputs`: Gamma-law trips, GAM household load and head-room,
real NL day-ahead prices) every strategy plans the same `PlanningProblem`:

- `unmanaged`: full power from plug-in until the car holds its target (same energy as the
  others; `unmanaged_full`, charging until the battery is full, is reported beside it),
- `edf`, `llf`: the rule-based schedulers under the head-room,
- `managed`: the optimiser (`controller.optimiser.solve`),
- `managed_v2g`: the optimiser with a share of the cars allowed to discharge.

Money is counted on two bases, stated in every table: **spot** (day-ahead price only) and
**all-in** (spot + a grid fee and taxes per imported kWh; export earns spot plus a configurable
refund, 0 by default: no net metering). V2G is planned separately for each basis (the fee changes
what cycling is worth); the other plans do not depend on a flat fee. Battery wear of V2G
(EUR/kWh discharged) is counted on both bases.

Head-room violations are counted against the *realised* head-room (capacity minus one sampled
path of the household load), the planner having planned on the forecast quantile. A second pass
compares the managed plan made on forecasts (expected next-day trips, head-room quantile) and
lived against the realised trips and load, with the same day planned in hindsight.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from controller.forecast.models import ForecastModels
from controller.optimiser import FastSolver, OptimiserFailed, OptimiserOptions
from controller.optimiser.baselines import (
    earliest_deadline_first,
    least_laxity_first,
    unmanaged,
)
from controller.planning.problem import PlanningProblem, Schedule
from simulators.dayinputs import (
    SLOTS,
    DayFactory,
    FleetDay,
    ProblemOptions,
    SiteSpec,
    build_problem,
)

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
STRATEGIES = ("unmanaged", "edf", "llf", "managed", "managed_v2g")
BASES = ("spot", "allin")
VIOLATION_TOL_KW = 1.0
# A generous time budget (the machine is shared); ramp smoothing changes neither cost nor peak.
SOLVE_OPTIONS = OptimiserOptions(time_limit_s=120.0, ramp_smoothing=False)
# V2G problems solve cold: with the flow-seeded or warm-started basis some days took 40-100 s on
# this machine instead of ~4 s (measured 2026-11-26; reported to the optimiser's owner).
SOLVE_OPTIONS_V2G = OptimiserOptions(
    time_limit_s=120.0, ramp_smoothing=False, warm_start=False, flow_start=False
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SolvePolicy:
    """How the study's optimiser runs: its time budget per LP and whether the peak stage runs.

    The study is offline, so the budget is generous. `peak_flattening=False` stops after the
    money stage (the cost is the same; among cost-optimal plans the peak is then not the
    lowest): the big-fleet sensitivity rows use it, and their table says so.
    """

    time_limit_s: float = 120.0
    peak_flattening: bool = True
    # Carry each solve's basis to the next day's problem. Off: every day starts from a fresh
    # min-cost-flow basis (the big fleets: a basis from another day's cars did not help them).
    warm_start: bool = True
    # Share an unavoidable shortfall fairly (the optimiser's second lexicographic stage). Off:
    # the total shortfall is still the least possible, but which cars carry it is left to the
    # money stage. The 5,000-car row needs it off: on its over-subscribed days the fairness LP
    # did not finish in 30 minutes.
    fairness: bool = True

    def __post_init__(self) -> None:
        if self.time_limit_s <= 0.0:
            raise ValueError(f"time_limit_s {self.time_limit_s} must be positive")

    def options(self, v2g: bool) -> OptimiserOptions:
        """The optimiser's options for a problem with (or without) V2G cars."""
        base = SOLVE_OPTIONS_V2G if v2g else SOLVE_OPTIONS
        return dataclasses.replace(
            base,
            time_limit_s=self.time_limit_s,
            peak_flattening=self.peak_flattening,
            fairness=base.fairness and self.fairness,
            warm_start=base.warm_start and self.warm_start,
        )


DEFAULT_POLICY = SolvePolicy()

# One solver per kind of problem: each warm-starts from the previous problem of its kind (a V2G
# problem warm-started from a charge-only basis can take a hundred times longer).
_SOLVERS: dict[bool, FastSolver] = {}


def solve(problem: PlanningProblem, policy: SolvePolicy = DEFAULT_POLICY) -> Schedule:
    """The managed plan: the service's optimiser (fast exact path) with the study's options."""
    kind = bool(problem.v2g.any())
    solver = _SOLVERS.setdefault(kind, FastSolver())
    return solver.solve(problem, policy.options(kind))


def cycling_pays(problem: PlanningProblem) -> bool:
    """Whether any discharge-then-recharge could earn money on this problem's prices.

    Discharging 1 kWh from the battery earns at most max(export price) - wear per kWh and
    needs 1 / (eta_ch * eta_dis) kWh bought back at least min(import price). When that never
    pays, the V2G plan is the charge-only plan and no V2G solve is needed.
    """
    eta = float(np.max(problem.eta_ch * problem.eta_dis))
    best = float(np.max(problem.export_price_eur_per_kwh)) - problem.degradation_eur_per_kwh
    return best - float(np.min(problem.price_eur_per_kwh)) / eta > 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CostBasis:
    """How a kWh is priced. Defaults: NL 2024 energy tax (0.1088) + a variable grid fee (~0.04),
    excluding VAT, rounded to 0.15 EUR/kWh; no refund on export; V2G wear 0.03 EUR/kWh."""

    fee_eur_per_kwh: float = 0.15
    export_refund_eur_per_kwh: float = 0.0
    degradation_eur_per_kwh: float = 0.03

    def describe(self) -> str:
        """One line saying what the figures include."""
        return (
            f"spot = day-ahead price only; all-in = spot + {self.fee_eur_per_kwh:.3f} EUR/kWh "
            f"grid fee and taxes on import (excl. VAT), export paid spot + "
            f"{self.export_refund_eur_per_kwh:.3f} EUR/kWh; V2G battery wear "
            f"{self.degradation_eur_per_kwh:.3f} EUR/kWh discharged on both bases"
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """One strategy on one day: money on both bases, energy, peak, shortfall, violations."""

    strategy: str
    cost_eur: dict[str, float]  # basis -> EUR
    import_kwh: float
    export_kwh: float
    peak_kw: float
    shortfall_kwh: float
    violations: int  # slots above the realised head-room (+ tolerance)
    max_excess_kw: float
    delivered_kwh: FloatArray  # (N,) battery energy gained per car by departure
    shortfall_per_car_kwh: FloatArray  # (N,)


@dataclass(slots=True)
class DayResult:
    """Every strategy on one day, plus the day's drivers and the forecast comparison."""

    day: date
    outcomes: dict[str, Outcome]
    price_spread_eur_per_kwh: float
    tightness: float  # unmanaged peak / smallest assured head-room of the window
    need_kwh: float
    forecast: dict[str, float] = field(default_factory=dict)
    solve_s: float = 0.0

    def saving(self, strategy: str, basis: str) -> float:
        """Saving of `strategy` vs unmanaged, a fraction of unmanaged's cost (nan if that <= 0)."""
        ref = self.outcomes["unmanaged"].cost_eur[basis]
        if ref <= 1e-9:
            return float("nan")
        return (ref - self.outcome(strategy, basis).cost_eur[basis]) / ref

    def outcome(self, strategy: str, basis: str) -> Outcome:
        """The strategy's outcome as read on `basis` (V2G has one plan per basis)."""
        return self.outcomes.get(f"{strategy}@{basis}") or self.outcomes[strategy]


def _money(problem: PlanningProblem, s: Schedule, basis: CostBasis) -> dict[str, float]:
    dt = problem.dt_h
    spot = problem.price_eur_per_kwh
    imp = s.charge_kw.sum(axis=0) * dt
    exp = s.discharge_kw.sum(axis=0) * dt
    wear = basis.degradation_eur_per_kwh * float(exp.sum())
    spot_cost = float(spot @ imp - spot @ exp) + wear
    allin = float(
        (spot + basis.fee_eur_per_kwh) @ imp - (spot + basis.export_refund_eur_per_kwh) @ exp
    )
    return {"spot": spot_cost, "allin": allin + wear}


def outcome(
    strategy: str, problem: PlanningProblem, s: Schedule, day: FleetDay, basis: CostBasis
) -> Outcome:
    """Measure a schedule: money on both bases, peak, shortfall and realised violations."""
    n = problem.n_vehicles
    dep = problem.departure_slot
    rows = np.arange(n)
    delivered = s.energy_kwh[rows, dep] - s.energy_kwh[:, 0]
    # Shortfall against the realised targets (not the plan's), so forecast plans are judged fairly.
    short = np.maximum(0.0, day.target_kwh - s.energy_kwh[rows, dep])
    short = np.where(short > 1e-6, short, 0.0)
    over = s.site_kw - day.headroom_real_kw[: s.site_kw.shape[0]]
    dt = problem.dt_h
    return Outcome(
        strategy=strategy,
        cost_eur=_money(problem, s, basis),
        import_kwh=float(s.charge_kw.sum(axis=0) @ dt),
        export_kwh=float(s.discharge_kw.sum(axis=0) @ dt),
        peak_kw=s.peak_kw,
        shortfall_kwh=float(short.sum()),
        violations=int((over > VIOLATION_TOL_KW).sum()),
        max_excess_kw=float(max(0.0, over.max(initial=0.0))),
        delivered_kwh=delivered,
        shortfall_per_car_kwh=short,
    )


def plan_day(
    day: FleetDay,
    basis: CostBasis,
    *,
    v2g_share: float = 1.0,
    forecast_pass: bool = True,
    keep_schedules: bool = False,
    policy: SolvePolicy = DEFAULT_POLICY,
) -> tuple[DayResult, dict[str, tuple[PlanningProblem, Schedule]]]:
    """Every strategy on `day`; returns the result and (when asked) the problems and schedules."""
    started = time.perf_counter()
    kept: dict[str, tuple[PlanningProblem, Schedule]] = {}
    base = build_problem(day)
    full = build_problem(day, ProblemOptions(cap_at_target=False))
    plans: dict[str, tuple[PlanningProblem, Schedule]] = {
        "unmanaged": (base, unmanaged(base, stop_at_target=True)),
        "unmanaged_full": (full, unmanaged(full)),
        "edf": (base, earliest_deadline_first(base)),
        "llf": (base, least_laxity_first(base)),
        "managed": (base, solve(base, policy)),
    }
    outcomes = {k: outcome(k, p, s, day, basis) for k, (p, s) in plans.items()}
    if v2g_share > 0:
        spot_problem = build_problem(
            day,
            ProblemOptions(
                v2g_share=v2g_share, degradation_eur_per_kwh=basis.degradation_eur_per_kwh
            ),
        )
        allin_problem = build_problem(
            day,
            ProblemOptions(
                v2g_share=v2g_share,
                degradation_eur_per_kwh=basis.degradation_eur_per_kwh,
                import_adder_eur_per_kwh=basis.fee_eur_per_kwh,
                export_adder_eur_per_kwh=basis.export_refund_eur_per_kwh,
            ),
        )
        managed_plan = plans["managed"][1]
        s_spot = solve(spot_problem, policy) if cycling_pays(spot_problem) else managed_plan
        s_allin = solve(allin_problem, policy) if cycling_pays(allin_problem) else managed_plan
        o_spot = outcome("managed_v2g", spot_problem, s_spot, day, basis)
        o_allin = outcome("managed_v2g", base, s_allin, day, basis)
        # Each basis reads the plan made for it (the fee changes what cycling is worth).
        outcomes["managed_v2g"] = o_spot
        outcomes["managed_v2g@allin"] = o_allin
        plans["managed_v2g"] = (spot_problem, s_spot)
    else:
        outcomes["managed_v2g"] = dataclasses.replace(outcomes["managed"], strategy="managed_v2g")
        plans["managed_v2g"] = plans["managed"]
    if keep_schedules:
        kept = plans
    window_min = float(np.min(day.headroom_forecast_kw[:SLOTS]))
    result = DayResult(
        day=day.day,
        outcomes=outcomes,
        price_spread_eur_per_kwh=day.price_spread_eur_per_kwh,
        tightness=outcomes["unmanaged"].peak_kw / max(window_min, 1.0),
        need_kwh=float(day.need_kwh.sum()),
    )
    if forecast_pass:
        result.forecast = forecast_comparison(day, basis, policy)
    result.solve_s = time.perf_counter() - started
    return result, kept


def forecast_comparison(
    day: FleetDay, basis: CostBasis, policy: SolvePolicy = DEFAULT_POLICY
) -> dict[str, float]:
    """Managed on forecasts, lived against what happened, vs the same day in hindsight.

    The forecast plan knows the expected next-day trips (Gamma mean x P(driving)) and the
    assured head-room; it is executed as planned (no re-planning), and judged against the
    realised trips (shortfall) and realised head-room (violations). Hindsight knows both.
    """
    fc_problem = build_problem(day, ProblemOptions(forecast_targets=True))
    hs_problem = build_problem(day, ProblemOptions(real_headroom=True))
    fc = outcome("forecast", fc_problem, solve(fc_problem, policy), day, basis)
    hs = outcome("hindsight", hs_problem, solve(hs_problem, policy), day, basis)
    return {
        "forecast_cost_spot": fc.cost_eur["spot"],
        "hindsight_cost_spot": hs.cost_eur["spot"],
        "forecast_cost_allin": fc.cost_eur["allin"],
        "hindsight_cost_allin": hs.cost_eur["allin"],
        "forecast_import_kwh": fc.import_kwh,
        "hindsight_import_kwh": hs.import_kwh,
        "forecast_shortfall_kwh": fc.shortfall_kwh,
        "forecast_short_cars": float((fc.shortfall_per_car_kwh > 0).sum()),
        "hindsight_shortfall_kwh": hs.shortfall_kwh,
        "forecast_violations": float(fc.violations),
        "hindsight_violations": float(hs.violations),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyOptions:
    """What to study: the fleet, the year, how many days, the site and the cost basis."""

    cars: int | None = None  # None: the seed's 278
    year: int = 2024
    days: int = 365  # days sampled, evenly spread over the year
    seed: int = 7
    site: SiteSpec = field(default_factory=SiteSpec)
    basis: CostBasis = field(default_factory=CostBasis)
    v2g_share: float = 1.0
    forecast_pass: bool = True
    households_scale: float = 1.0
    dates: tuple[date, ...] = ()  # explicit dates of `year` instead of `days` sampled ones
    policy: SolvePolicy = DEFAULT_POLICY
    # Processes planning days in parallel (1: in this process). Each builds the same
    # `DayFactory` (same seed), so a day's inputs do not depend on which process plans it.
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers {self.workers} must be at least 1")
        if self.days < 1 and not self.dates:
            raise ValueError("a study needs at least one day")


def sample_days(year: int, days: int) -> list[date]:
    """`days` dates spread evenly over `year` (all of them when `days` >= its length)."""
    first, last = date(year, 1, 1), date(year, 12, 31)
    span = (last - first).days + 1
    if days >= span:
        return [first + timedelta(days=k) for k in range(span)]
    picks = np.linspace(0, span - 1, days).round().astype(int)
    return [first + timedelta(days=int(k)) for k in dict.fromkeys(picks.tolist())]


def _factory(models: ForecastModels, vehicles: Sequence[Any], options: StudyOptions) -> DayFactory:
    """The study's day factory: the whole year's trips, drawn once from `options.seed`."""
    return DayFactory(
        models,
        vehicles,
        options.site,
        first_day=date(options.year, 1, 1),
        days=366 if options.year % 4 == 0 else 365,
        seed=options.seed,
        households_scale=options.households_scale,
    )


def _plan(factory: DayFactory, options: StudyOptions, d: date) -> DayResult:
    """One day of the study, every strategy, without keeping the schedules."""
    result, _ = plan_day(
        factory.day(d),
        options.basis,
        v2g_share=options.v2g_share,
        forecast_pass=options.forecast_pass,
        policy=options.policy,
    )
    return result


# A worker process's factory and options (set once by `_start_worker`).
_WORKER: list[tuple[DayFactory, StudyOptions]] = []


def _start_worker(models: ForecastModels, vehicles: Sequence[Any], options: StudyOptions) -> None:
    """Initialise a worker: quiet logs, the same day factory as the parent would build."""
    logging.getLogger().setLevel(logging.WARNING)
    _WORKER[:] = [(_factory(models, vehicles, options), options)]


def _plan_in_worker(d: date) -> DayResult:
    """Plan one day in a worker process."""
    factory, options = _WORKER[0]
    return _plan(factory, options, d)


def run_study(
    models: ForecastModels,
    vehicles: Sequence[Any],
    options: StudyOptions,
    *,
    progress: Callable[[int, int, DayResult], None] | None = None,
    check: Callable[[FleetDay, dict[str, tuple[PlanningProblem, Schedule]]], None] | None = None,
) -> list[DayResult]:
    """Plan every sampled day with every strategy; `check` sees each day's problems and plans.

    With `options.workers` > 1 (and no `check`, which needs the schedules here) the days are
    planned in that many processes; the results come back in date order either way.
    """
    dates = list(options.dates) or sample_days(options.year, options.days)
    results: list[DayResult] = []
    if options.workers > 1 and check is None and len(dates) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(
            max_workers=min(options.workers, len(dates)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(models, tuple(vehicles), options),
        ) as pool:
            for k, result in enumerate(pool.map(_plan_in_worker, dates)):
                results.append(result)
                if progress is not None:
                    progress(k + 1, len(dates), result)
        return results
    factory = _factory(models, vehicles, options)
    for k, d in enumerate(dates):
        day = factory.day(d)
        result, kept = plan_day(
            day,
            options.basis,
            v2g_share=options.v2g_share,
            forecast_pass=options.forecast_pass,
            keep_schedules=check is not None,
            policy=options.policy,
        )
        if check is not None:
            check(day, kept)
        results.append(result)
        if progress is not None:
            progress(k + 1, len(dates), result)
    return results


# -- summaries --------------------------------------------------------------------------------


def _pct(values: Iterable[float], q: float) -> float:
    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


def strategy_table(results: Sequence[DayResult], basis: str) -> list[dict[str, Any]]:
    """Per strategy over the days: total cost, saving vs unmanaged (total and daily spread)."""
    rows = []
    ref_total = sum(r.outcomes["unmanaged"].cost_eur[basis] for r in results)
    for name in ("unmanaged", "unmanaged_full", *STRATEGIES[1:]):
        outs = [r.outcome(name, basis) for r in results]
        total = sum(o.cost_eur[basis] for o in outs)
        daily = [r.saving(name, basis) for r in results] if name != "unmanaged_full" else []
        imported = sum(o.import_kwh for o in outs)
        rows.append(
            {
                "strategy": name,
                "cost_eur": total,
                "eur_per_kwh": (total / imported) if imported > 0 else float("nan"),
                "import_kwh": imported,
                "export_kwh": sum(o.export_kwh for o in outs),
                "saving_total": (ref_total - total) / ref_total
                if ref_total > 0 and name != "unmanaged_full"
                else float("nan"),
                "saving_p10": _pct(daily, 10),
                "saving_median": _pct(daily, 50),
                "saving_p90": _pct(daily, 90),
                "peak_kw_max": max(o.peak_kw for o in outs),
                "peak_kw_mean": float(np.mean([o.peak_kw for o in outs])),
                "shortfall_kwh": sum(o.shortfall_kwh for o in outs),
                "short_days": sum(1 for o in outs if o.shortfall_kwh > 0),
                "violation_slots": sum(o.violations for o in outs),
                "violation_days": sum(1 for o in outs if o.violations > 0),
                "max_excess_kw": max(o.max_excess_kw for o in outs),
            }
        )
    return rows


def drivers(results: Sequence[DayResult], basis: str, strategy: str = "managed") -> dict[str, Any]:
    """What drives the saving: Spearman correlation with price spread and tightness, by quartile."""
    from scipy.stats import spearmanr

    saving = np.array([r.saving(strategy, basis) for r in results])
    spread = np.array([r.price_spread_eur_per_kwh for r in results])
    tight = np.array([r.tightness for r in results])
    eur = np.array(
        [
            r.outcomes["unmanaged"].cost_eur[basis] - r.outcome(strategy, basis).cost_eur[basis]
            for r in results
        ]
    )
    ok = np.isfinite(saving)
    out: dict[str, Any] = {"days": int(ok.sum())}
    if ok.sum() >= 3:
        out["rho_spread"] = float(spearmanr(saving[ok], spread[ok]).statistic)
        out["rho_tightness"] = float(spearmanr(saving[ok], tight[ok]).statistic)
        out["rho_spread_eur"] = float(spearmanr(eur, spread).statistic)
    quart = []
    if len(results) >= 4:
        edges = np.percentile(spread, [0, 25, 50, 75, 100])
        for q in range(4):
            lo, hi = edges[q], edges[q + 1]
            sel = (spread >= lo) & ((spread <= hi) if q == 3 else (spread < hi)) & ok
            quart.append(
                {
                    "spread_from": float(lo),
                    "spread_to": float(hi),
                    "days": int(sel.sum()),
                    "saving_median": float(np.median(saving[sel])) if sel.any() else float("nan"),
                    "saving_eur_mean": float(np.mean(eur[sel])) if sel.any() else float("nan"),
                }
            )
    out["by_spread_quartile"] = quart
    return out


def forecast_table(results: Sequence[DayResult]) -> dict[str, float]:
    """Totals of the forecast-vs-hindsight pass over the days."""
    keys = results[0].forecast.keys() if results and results[0].forecast else []
    return {k: float(sum(r.forecast[k] for r in results)) for k in keys}


# -- sensitivity and the written report --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SensitivityRow:
    """One variant of the study on a sample of days."""

    factor: str
    value: str
    days: int
    cars: int
    saving_spot: float
    saving_allin: float
    saving_v2g_spot: float
    saving_v2g_allin: float
    managed_peak_kw: float
    unmanaged_peak_kw: float
    shortfall_kwh: float
    violation_slots: int
    unmanaged_violation_slots: int
    v2g_solved: bool = True  # False: V2G not planned for this variant (its columns are empty)
    note: str = ""  # how this variant was solved, when not as the others
    wall_s: float = 0.0


def _summary_row(
    factor: str,
    value: str,
    cars: int,
    results: Sequence[DayResult],
    *,
    v2g_solved: bool = True,
    note: str = "",
    wall_s: float = 0.0,
) -> SensitivityRow:
    spot = {r["strategy"]: r for r in strategy_table(results, "spot")}
    allin = {r["strategy"]: r for r in strategy_table(results, "allin")}
    return SensitivityRow(
        factor=factor,
        value=value,
        days=len(results),
        cars=cars,
        saving_spot=spot["managed"]["saving_total"],
        saving_allin=allin["managed"]["saving_total"],
        saving_v2g_spot=spot["managed_v2g"]["saving_total"],
        saving_v2g_allin=allin["managed_v2g"]["saving_total"],
        managed_peak_kw=spot["managed"]["peak_kw_max"],
        unmanaged_peak_kw=spot["unmanaged"]["peak_kw_max"],
        shortfall_kwh=spot["managed"]["shortfall_kwh"],
        violation_slots=spot["managed"]["violation_slots"],
        unmanaged_violation_slots=spot["unmanaged"]["violation_slots"],
        v2g_solved=v2g_solved,
        note=note,
        wall_s=wall_s,
    )


# The big-fleet rows are about fleet size: they plan without V2G (a cold V2G LP of thousands of
# cars takes many minutes) and give each LP half an hour. Their table row says so.
BIG_FLEET_POLICY = SolvePolicy(time_limit_s=1800.0, warm_start=False)


def sensitivity(
    models: ForecastModels,
    fleet: Callable[[int], Sequence[Any]],
    base: StudyOptions,
    *,
    days: int,
    fleet_sizes: Sequence[int] = (100, 278, 1000, 5000),
    quantiles: Sequence[float] = (0.5, 0.9, 0.95, 0.99),
    years: Sequence[int] = (2019, 2021, 2022, 2023, 2024),
    v2g_shares: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    scaled_fleet_sizes: Sequence[int] = (5000,),
    big_fleet_days: int = 4,
    big_fleet_from: int = 1000,
    big_fleet_policy: SolvePolicy = BIG_FLEET_POLICY,
    fair_share_until: int = 1000,
    rows: list[SensitivityRow] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[SensitivityRow]:
    """One factor at a time around `base`, each on `days` sampled days (fewer for big fleets).

    `fleet_sizes` keep the base site (its connection and households); `scaled_fleet_sizes`
    scale the connection and the households with the fleet (`scaled_site`), so only the size
    changes, not how full the connection is. Fleets of `big_fleet_from` cars or more are
    planned without V2G and with `big_fleet_policy`; above that size on at most
    `big_fleet_days` days. Above `fair_share_until` cars the fairness stage is off (the total
    shortfall is still the least possible; on an over-subscribed site of 5,000 cars the fairness
    LP did not finish in 30 minutes). Rows are appended to `rows` (when given) as each variant
    finishes, then `progress` is told.
    """
    rows = [] if rows is None else rows
    quick = dataclasses.replace(base, days=days, forecast_pass=False)
    seed_cars = base.cars or 278

    def run(factor: str, value: str, options: StudyOptions, cars: int, note: str = "") -> None:
        started = time.perf_counter()
        try:
            results = run_study(models, fleet(cars), options)
        except OptimiserFailed as exc:  # e.g. a time limit on a big fleet: say so, go on
            if progress is not None:
                progress(
                    f"{factor}={value}: failed after {time.perf_counter() - started:.0f} s: {exc}"
                )
            return
        wall = time.perf_counter() - started
        rows.append(
            _summary_row(
                factor,
                value,
                cars,
                results,
                v2g_solved=options.v2g_share > 0 or factor == "V2G share",
                note=note,
                wall_s=wall,
            )
        )
        if progress is not None:
            progress(f"{factor}={value}: {len(results)} days in {wall:.0f} s")

    for q in quantiles:
        site = dataclasses.replace(base.site, headroom_quantile=q)
        run("head-room quantile", f"{q:.2f}", dataclasses.replace(quick, site=site), seed_cars)
    for y in years:
        run("price year", str(y), dataclasses.replace(quick, year=y), seed_cars)
    for share in v2g_shares:
        run("V2G share", f"{share:.2f}", dataclasses.replace(quick, v2g_share=share), seed_cars)
    sizes = [("fleet size (cars)", n, base.site) for n in fleet_sizes]
    sizes += [
        ("fleet size, site scaled (cars)", n, scaled_site(base.site, n / seed_cars))
        for n in scaled_fleet_sizes
    ]
    for factor, n, site in sizes:  # last: the big fleets take longest
        if n < big_fleet_from:
            run(factor, str(n), dataclasses.replace(quick, cars=n, site=site), n)
            continue
        d = days if n <= big_fleet_from else min(days, big_fleet_days)
        policy = big_fleet_policy
        if n > fair_share_until:
            policy = dataclasses.replace(policy, fairness=False)
        big = dataclasses.replace(quick, cars=n, days=d, v2g_share=0.0, policy=policy, site=site)
        note = f"no V2G; LP time limit {policy.time_limit_s:.0f} s" + (
            "; each day solved cold" if not policy.warm_start else ""
        )
        if not policy.fairness:
            note += "; shortfall least in total, not shared fairly"
        if site is not base.site:
            note += f"; connection {site.capacity_kw:,.0f} kW"
        run(factor, str(n), big, n, note)
    return rows


def scaled_site(site: SiteSpec, factor: float) -> SiteSpec:
    """`site` with its connection and household counts scaled by `factor`.

    The head-room left for the chargers then scales with it (the households' mean load scales
    with their count, its noise less), so a fleet `factor` times the seed's meets a connection
    as full as the seed's. The per-car charger stays as it is.
    """
    if factor <= 0:
        raise ValueError(f"scale factor {factor} must be positive")
    return dataclasses.replace(
        site,
        capacity_kw=site.capacity_kw * factor,
        households=tuple(
            (group, max(1, round(count * factor))) for group, count in site.households
        ),
    )


LABELS = {
    "unmanaged": "unmanaged (full power until target)",
    "unmanaged_full": "unmanaged (full power until battery full)",
    "edf": "earliest-deadline-first",
    "llf": "least-laxity-first",
    "managed": "managed (optimiser)",
    "managed_v2g": "managed + V2G",
}


def write_report(
    out: Path,
    results: Sequence[DayResult],
    options: StudyOptions,
    sens: Sequence[SensitivityRow],
    *,
    wall_s: float,
    sens_days: int,
) -> Path:
    """Write report.md, study.json and the PNG plots to `out`; return the report's path."""
    import json

    from simulators import report as rp

    out.mkdir(parents=True, exist_ok=True)
    cars = options.cars or 278
    basis = options.basis
    lines = [
        f"# voltpool year study: {cars} cars, {len(results)} days of {options.year}",
        "",
        "All figures are **computed**: each strategy's schedule on the day's planning problem "
        "(no protocols). Trips: Gamma laws; household load and head-room: the GAM "
        f"(planner told the {options.site.headroom_quantile:.0%}-assured head-room, violations "
        "counted against one sampled realised load path); prices: real NL day-ahead. "
        f"Site: {options.site.capacity_kw:,.0f} kW connection shared with "
        f"{sum(n for _, n in options.site.households):,} households; chargers "
        f"{options.site.aggregate_charger_kw / 278:.2f} kW per car. V2G share "
        f"{options.v2g_share:.0%}. Wall time {wall_s:,.0f} s.",
        "",
        f"**Cost basis.** {basis.describe()}.",
        "",
    ]
    for b in BASES:
        name = "spot energy only" if b == "spot" else "all-in tariff"
        lines += [f"## Strategies, cost basis: {name}", ""]
        table = strategy_table(results, b)
        lines.append(
            rp.markdown_table(
                [
                    "strategy",
                    f"cost ({b}) EUR",
                    "EUR/kWh imported",
                    "imported kWh",
                    "exported kWh",
                    "saving vs unmanaged (total)",
                    "daily saving p10",
                    "median",
                    "p90",
                    "peak kW (max)",
                    "peak kW (mean)",
                    "shortfall kWh",
                    "head-room violation slots (days)",
                ],
                [
                    [
                        LABELS[r["strategy"]],
                        r["cost_eur"],
                        f"{r['eur_per_kwh']:.4f}",
                        r["import_kwh"],
                        r["export_kwh"],
                        rp.pct(r["saving_total"]),
                        rp.pct(r["saving_p10"]),
                        rp.pct(r["saving_median"]),
                        rp.pct(r["saving_p90"]),
                        r["peak_kw_max"],
                        r["peak_kw_mean"],
                        r["shortfall_kwh"],
                        f"{r['violation_slots']} ({r['violation_days']})",
                    ]
                    for r in table
                ],
            )
        )
        lines.append("")
    lines += ["## What drives the saving (managed, spot basis)", ""]
    drv = drivers(results, "spot")
    lines.append(
        f"Spearman correlation over {drv['days']} days: saving % vs price spread "
        f"{drv.get('rho_spread', float('nan')):+.2f}, saving EUR vs price spread "
        f"{drv.get('rho_spread_eur', float('nan')):+.2f}, saving % vs head-room tightness "
        "(unmanaged peak / smallest assured head-room) "
        f"{drv.get('rho_tightness', float('nan')):+.2f}."
    )
    lines.append("")
    if drv["by_spread_quartile"]:
        lines.append(
            rp.markdown_table(
                ["price spread (EUR/MWh)", "days", "median saving (spot)", "mean saving EUR/day"],
                [
                    [
                        f"{1000 * q['spread_from']:.0f}-{1000 * q['spread_to']:.0f}",
                        q["days"],
                        rp.pct(q["saving_median"]),
                        q["saving_eur_mean"],
                    ]
                    for q in drv["by_spread_quartile"]
                ],
            )
        )
        lines.append("")
    fc = forecast_table(results)
    if fc:
        lines += [
            "## Forecasts vs perfect information (managed, computed)",
            "",
            "Plan on forecasts: next-day trips = Gamma mean x P(driving), head-room = the assured "
            "quantile; executed as planned and judged against the realised trips and load. "
            "Hindsight: the same day planned knowing the realised trips and load.",
            "",
            rp.markdown_table(
                [
                    "plan",
                    "cost spot EUR",
                    "cost all-in EUR",
                    "imported kWh",
                    "shortfall kWh",
                    "violation slots",
                ],
                [
                    [
                        "on forecasts, lived",
                        fc["forecast_cost_spot"],
                        fc["forecast_cost_allin"],
                        fc["forecast_import_kwh"],
                        fc["forecast_shortfall_kwh"],
                        int(fc["forecast_violations"]),
                    ],
                    [
                        "hindsight",
                        fc["hindsight_cost_spot"],
                        fc["hindsight_cost_allin"],
                        fc["hindsight_import_kwh"],
                        fc["hindsight_shortfall_kwh"],
                        int(fc["hindsight_violations"]),
                    ],
                ],
            ),
            "",
        ]
    if sens:
        lines += [
            f"## Sensitivity (one factor at a time, {sens_days} sampled days each; fleets above "
            "1,000 cars on fewer days)",
            "",
            f"Cost basis: managed saving vs unmanaged on spot and on all-in ({basis.describe()}).",
            "",
            rp.markdown_table(
                [
                    "factor",
                    "value",
                    "days",
                    "cars",
                    "managed saving spot",
                    "managed saving all-in",
                    "V2G saving spot",
                    "V2G saving all-in",
                    "peak kW managed / unmanaged",
                    "shortfall kWh",
                    "violation slots managed / unmanaged",
                    "solved as",
                ],
                [
                    [
                        s.factor,
                        s.value,
                        s.days,
                        s.cars,
                        rp.pct(s.saving_spot),
                        rp.pct(s.saving_allin),
                        rp.pct(s.saving_v2g_spot) if s.v2g_solved else "–",
                        rp.pct(s.saving_v2g_allin) if s.v2g_solved else "–",
                        f"{s.managed_peak_kw:,.0f} / {s.unmanaged_peak_kw:,.0f}",
                        s.shortfall_kwh,
                        f"{s.violation_slots} / {s.unmanaged_violation_slots}",
                        s.note or "–",
                    ]
                    for s in sens
                ],
            ),
            "",
        ]
    days = [r.day for r in results]
    rp.plot_year(
        out / "study_daily_cost.png",
        days,
        {LABELS[s]: [r.outcomes[s].cost_eur["spot"] for r in results] for s in STRATEGIES},
        f"Daily charging cost, spot basis ({cars} cars, {len(results)} days of {options.year})",
        smooth_days=7 if len(results) > 60 else 1,
    )
    rp.plot_savings(
        out / "study_saving_vs_spread.png",
        [r.price_spread_eur_per_kwh for r in results],
        {
            "managed, spot": [r.saving("managed", "spot") for r in results],
            "managed, all-in": [r.saving("managed", "allin") for r in results],
        },
        f"Daily saving vs unmanaged against price spread ({cars} cars, {options.year})",
    )
    lines += [
        "![daily cost](study_daily_cost.png)",
        "",
        "![saving vs spread](study_saving_vs_spread.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    payload = {
        "options": {
            "cars": cars,
            "year": options.year,
            "days": len(results),
            "v2g_share": options.v2g_share,
            "basis": dataclasses.asdict(basis),
            "site": dataclasses.asdict(options.site),
        },
        "tables": {b: strategy_table(results, b) for b in BASES},
        "drivers": drivers(results, "spot"),
        "forecast": fc,
        "sensitivity": [dataclasses.asdict(s) for s in sens],
        "daily": [
            {
                "day": r.day.isoformat(),
                "spread": r.price_spread_eur_per_kwh,
                "tightness": r.tightness,
                "cost": {s: o.cost_eur for s, o in r.outcomes.items()},
                "import_kwh": {s: o.import_kwh for s, o in r.outcomes.items()},
                "peak_kw": {s: o.peak_kw for s, o in r.outcomes.items()},
            }
            for r in results
        ],
        "wall_s": wall_s,
    }
    (out / "study.json").write_text(json.dumps(payload, indent=1, default=str, allow_nan=True))
    return path


def run_cli(
    *,
    data_dir: Path,
    out: Path,
    cars: int | None,
    year: int,
    days: int,
    sens_days: int,
    fee_eur_per_kwh: float,
    export_refund_eur_per_kwh: float,
    degradation_eur_per_kwh: float,
    v2g_share: float,
    headroom_quantile: float,
    console: Any,
    workers: int = 1,
) -> Path:
    """What `voltpool study` runs: the year, the sensitivity table, the written report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from simulators.dayinputs import load_models, seed_fleet

    started = time.perf_counter()
    models = load_models(data_dir, Path("var") / "forecast-models")
    site = SiteSpec(headroom_quantile=headroom_quantile)
    options = StudyOptions(
        cars=cars,
        year=year,
        days=days,
        site=site,
        v2g_share=v2g_share,
        workers=workers,
        basis=CostBasis(
            fee_eur_per_kwh=fee_eur_per_kwh,
            export_refund_eur_per_kwh=export_refund_eur_per_kwh,
            degradation_eur_per_kwh=degradation_eur_per_kwh,
        ),
    )

    def fleet(n: int) -> Sequence[Any]:
        return seed_fleet(data_dir, n, site.aggregate_charger_kw)

    total = len(sample_days(year, days))

    def tick(k: int, n: int, r: DayResult) -> None:
        bar.update(task, completed=k, description=f"day {r.day}")
        if not console.is_terminal and (k % 25 == 0 or k == n):
            console.print(f"{k}/{n} days ({time.perf_counter() - started:.0f} s)")

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("year study", total=total)
        results = run_study(models, fleet(cars or 278), options, progress=tick)
    # The year's report first; the sensitivity table is added variant by variant.
    path = write_report(
        out, results, options, [], wall_s=time.perf_counter() - started, sens_days=sens_days
    )
    console.print(f"year report: {path}")
    rows: list[SensitivityRow] = []

    def variant(message: str) -> None:
        console.print(message)
        write_report(
            out,
            results,
            options,
            rows,
            wall_s=time.perf_counter() - started,
            sens_days=sens_days,
        )

    if sens_days > 0:
        sensitivity(models, fleet, options, days=sens_days, rows=rows, progress=variant)
    for b in BASES:
        for r in strategy_table(results, b):
            console.print(
                f"{b:5s} {LABELS[r['strategy']]:45s} {r['cost_eur']:12,.2f} EUR  "
                f"saving {100 * r['saving_total']:6.1f} %  peak {r['peak_kw_max']:8.1f} kW"
            )
    console.print(f"report: {path}")
    return path
