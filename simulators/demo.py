"""`voltpool demo`: the seed's fleet for a day through the real protocols, then a report.

The managed run goes through everything voltpool runs in production: the embedded Redis and MQTT
broker, the OCPP central system, one simulated charge point per car (`simulators.scenario`), the
head-room and price feeds over MQTT. What the chargers *metered* is the managed result; the
controller's own setpoints are recorded beside it and the report shows both and their difference.

The baselines (unmanaged, earliest-deadline-first) and V2G are *computed*: their schedules on the
same day's `PlanningProblem` (`simulators.dayinputs.build_problem`), over the same span.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from controller.forecast.models import ForecastModels
from controller.optimiser.baselines import earliest_deadline_first, unmanaged
from controller.planning.problem import PlanningProblem, Schedule
from controller.settings import PlanningSettings
from simulators import report as rp
from simulators.dayinputs import (
    SLOTS,
    DayFactory,
    FleetDay,
    ProblemOptions,
    SiteSpec,
    build_problem,
    day_inputs,
    load_models,
    seed_fleet,
)
from simulators.scenario import ScenarioResult, run_day
from simulators.study import VIOLATION_TOL_KW, CostBasis, solve

# The report needs metered energy per 15-minute slot (the plan's resolution): one MeterValues
# per slot is enough, since the energy register integrates between samples.
DEFAULT_METER_INTERVAL_S = 900.0
# The cars' MQTT SoC telemetry besides the arrival message. Every 2 h instead of 30 min cut the
# events by a fifth but not the CPU (100 cars, 900 s steps: 56.5 s against 58.3 s, 2026-11-26).
DEFAULT_SOC_INTERVAL_S = 1800.0


@dataclass(slots=True)
class Row:
    """One line of the demo's comparison table."""

    name: str
    source: str  # "metered" or "computed"
    cost_spot_eur: float
    cost_allin_eur: float
    energy_kwh: float  # imported
    export_kwh: float
    peak_kw: float
    shortfall_kwh: float
    short_cars: int
    violations: int  # steps/slots above the real head-room (+ 1 kW)
    delivered_kwh: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class DemoDay:
    """One simulated day: the metered run, the computed rows, and the per-car figures."""

    day: date
    result: ScenarioResult
    rows: list[Row]
    needed_kwh: dict[str, float]
    files: list[Path] = field(default_factory=list)


def _computed(
    name: str,
    problem: PlanningProblem,
    schedule: Schedule,
    day: FleetDay,
    span: int,
    basis: CostBasis,
    cars: set[str],
) -> Row:
    """A computed schedule over the first `span` slots, for the cars present in the span."""
    dt = problem.dt_h[:span]
    imp = schedule.charge_kw[:, :span].sum(axis=0) * dt
    exp = schedule.discharge_kw[:, :span].sum(axis=0) * dt
    price = day.price_eur_per_kwh[:span]
    wear = basis.degradation_eur_per_kwh * float(exp.sum())
    site = schedule.site_kw[:span]
    rows = np.arange(problem.n_vehicles)
    end = np.minimum(problem.departure_slot, span)
    delivered = schedule.energy_kwh[rows, end] - schedule.energy_kwh[:, 0]
    gone = problem.departure_slot <= span
    short = np.where(gone, np.maximum(0.0, day.target_kwh - schedule.energy_kwh[rows, end]), 0.0)
    short = np.where(short > 0.05, short, 0.0)
    keep = np.array([v in cars for v in problem.vehicle_ids])
    return Row(
        name=name,
        source="computed",
        cost_spot_eur=float(price @ imp - price @ exp) + wear,
        cost_allin_eur=float((price + basis.fee_eur_per_kwh) @ imp - price @ exp) + wear,
        energy_kwh=float(imp.sum()),
        export_kwh=float(exp.sum()),
        peak_kw=float(site.max(initial=0.0)),
        shortfall_kwh=float(short[keep].sum()),
        short_cars=int((short[keep] > 0).sum()),
        violations=int((site - day.headroom_real_kw[:span] > VIOLATION_TOL_KW).sum()),
        delivered_kwh={
            v: float(delivered[i]) for i, v in enumerate(problem.vehicle_ids) if v in cars
        },
    )


def metered_rows(
    result: ScenarioResult, basis: CostBasis, left: set[str] | None = None
) -> list[Row]:
    """The managed run as metered by the chargers, and the controller's own setpoints.

    Shortfalls count only the cars in `left` (those whose departure fell inside the span);
    a car still plugged in when a shortened run ends has not missed anything yet.
    """
    step_h = result.step_s / 3600.0
    metered = np.asarray(result.metered_kw)
    planned = np.asarray(result.planned_kw)
    price = np.asarray(result.price_eur_per_kwh)
    room = np.asarray(result.headroom_kw)
    short = [c.shortfall_kwh for c in result.cars if left is None or c.vehicle_id in left]
    imp_m = np.maximum(metered, 0.0) * step_h
    exp_m = np.maximum(-metered, 0.0) * step_h
    rows = [
        Row(
            name="managed",
            source="metered",
            cost_spot_eur=float(price @ (imp_m - exp_m)),
            cost_allin_eur=float((price + basis.fee_eur_per_kwh) @ imp_m - price @ exp_m),
            energy_kwh=float(imp_m.sum()),
            export_kwh=float(exp_m.sum()),
            peak_kw=result.peak_kw,
            shortfall_kwh=float(sum(short)),
            short_cars=sum(1 for s in short if s > 0),
            violations=result.violations(VIOLATION_TOL_KW),
            delivered_kwh={c.vehicle_id: c.delivered_kwh for c in result.cars},
        ),
        Row(
            name="managed: the plan's setpoints",
            source="plan",
            cost_spot_eur=float(price @ planned) * step_h,
            cost_allin_eur=float((price + basis.fee_eur_per_kwh) @ planned) * step_h,
            energy_kwh=float(planned.sum() * step_h),
            export_kwh=0.0,
            peak_kw=float(planned.max(initial=0.0)),
            shortfall_kwh=float("nan"),
            short_cars=0,
            violations=int((planned - room > VIOLATION_TOL_KW).sum()),
        ),
    ]
    return rows


def compare(
    day: FleetDay, result: ScenarioResult, hours: float, basis: CostBasis
) -> tuple[list[Row], dict[str, float]]:
    """The metered rows beside the computed managed, unmanaged, EDF and V2G rows."""
    span = min(SLOTS, int(np.ceil(hours * 4)))
    cars = {c.vehicle_id for c in result.cars}
    # The controller asks each car for `target_margin_kwh` more than its target: so do these.
    margin = PlanningSettings().target_margin_kwh
    problem = build_problem(day, ProblemOptions(target_margin_kwh=margin))
    v2g = build_problem(
        day,
        ProblemOptions(
            v2g_share=1.0,
            degradation_eur_per_kwh=basis.degradation_eur_per_kwh,
            target_margin_kwh=margin,
        ),
    )
    left = {v.vehicle_id for i, v in enumerate(day.vehicles) if int(day.departure_slot[i]) <= span}
    rows = metered_rows(result, basis, left)
    rows += [
        _computed(
            "managed (planner on the day's problem)",
            problem,
            solve(problem),
            day,
            span,
            basis,
            cars,
        ),
        _computed(
            "unmanaged", problem, unmanaged(problem, stop_at_target=True), day, span, basis, cars
        ),
        _computed(
            "earliest-deadline-first",
            problem,
            earliest_deadline_first(problem),
            day,
            span,
            basis,
            cars,
        ),
        _computed("managed + V2G", v2g, solve(v2g), day, span, basis, cars),
    ]
    needed = {c.vehicle_id: c.needed_kwh for c in result.cars}
    return rows, needed


async def run_demo_day(
    day: FleetDay,
    *,
    hours: float,
    step_s: float,
    meter_interval_s: float = DEFAULT_METER_INTERVAL_S,
    soc_interval_s: float = DEFAULT_SOC_INTERVAL_S,
    progress: Callable[[datetime, ScenarioResult], None] | None = None,
) -> ScenarioResult:
    """The managed day through the protocols."""
    return await run_day(
        day_inputs(day, hours=hours),
        strategy="managed",
        step_s=step_s,
        meter_interval_s=meter_interval_s,
        soc_interval_s=soc_interval_s,
        progress=progress,
    )


def profile_latency_summary(result: ScenarioResult) -> dict[str, Any]:
    """p50/p95/max of the plug-in -> first profile latency, on the wall and simulated clocks."""
    done = [x for x in result.profile_latency if x.wall_s is not None and x.sim_s is not None]
    wall = np.array([x.wall_s for x in done], dtype=float)
    sim = np.array([x.sim_s for x in done], dtype=float)

    def q(values: np.ndarray, p: float) -> float | None:
        return float(np.percentile(values, p)) if values.size else None

    return {
        "events": len(result.profile_latency),
        "answered": len(done),
        "wall_p50_s": q(wall, 50),
        "wall_p95_s": q(wall, 95),
        "wall_max_s": q(wall, 100),
        "sim_p50_s": q(sim, 50),
        "sim_p95_s": q(sim, 95),
        "sim_max_s": q(sim, 100),
    }


def describe_profile_latency(summary: dict[str, Any]) -> str:
    """The latency summary as a sentence."""
    if not summary["answered"]:
        return f"no profile followed any of {summary['events']} plug-ins."
    return (
        f"wall p50 {1000 * summary['wall_p50_s']:.0f} ms, p95 "
        f"{1000 * summary['wall_p95_s']:.0f} ms, max {1000 * summary['wall_max_s']:.0f} ms; "
        f"simulated clock p50 {summary['sim_p50_s']:.1f} s, p95 {summary['sim_p95_s']:.1f} s "
        f"(the controller's 0.2 s coalescing window and the steps), over "
        f"{summary['answered']} of {summary['events']} plug-ins"
        + (
            " (the others' cars left, or the run ended, before any profile)."
            if summary["answered"] < summary["events"]
            else "."
        )
    )


def write_day(
    out: Path,
    demo: DemoDay,
    day: FleetDay,
    basis: CostBasis,
    *,
    wall_s: float,
    cars: int,
    run_times: dict[str, float] | None = None,
) -> Path:
    """report.md, steps.csv, cars.csv, demo.json and the two plots for one day."""
    out.mkdir(parents=True, exist_ok=True)
    result = demo.result
    tag = demo.day.isoformat()
    with (out / f"steps-{tag}.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "time_utc",
                "metered_kw",
                "planned_kw",
                "headroom_kw",
                "headroom_forecast_kw",
                "price_eur_per_kwh",
            ]
        )
        for k, t in enumerate(result.times):
            w.writerow(
                [
                    t.isoformat(),
                    f"{result.metered_kw[k]:.4f}",
                    f"{result.planned_kw[k]:.4f}",
                    f"{result.headroom_kw[k]:.3f}",
                    f"{result.headroom_forecast_kw[k]:.3f}",
                    f"{result.price_eur_per_kwh[k]:.5f}",
                ]
            )
    computed = [r for r in demo.rows if r.source == "computed"]
    with (out / f"cars-{tag}.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "vehicle_id",
                "needed_kwh",
                "metered_delivered_kwh",
                "metered_shortfall_kwh",
                "departure_soc",
                "target_soc",
            ]
            + [f"{r.name} delivered_kwh" for r in computed]
        )
        for c in result.cars:
            w.writerow(
                [
                    c.vehicle_id,
                    f"{c.needed_kwh:.4f}",
                    f"{c.delivered_kwh:.4f}",
                    f"{c.shortfall_kwh:.4f}",
                    f"{c.departure_soc:.4f}",
                    f"{c.target_soc:.4f}",
                ]
                + [f"{r.delivered_kwh.get(c.vehicle_id, float('nan')):.4f}" for r in computed]
            )
    span = len(result.times)
    slot_of = [min(SLOTS - 1, k * int(result.step_s) // 900) for k in range(span)]
    problem = build_problem(
        day, ProblemOptions(target_margin_kwh=PlanningSettings().target_margin_kwh)
    )
    plain = unmanaged(problem, stop_at_target=True).site_kw
    series: dict[str, list[float]] = {
        "unmanaged (computed)": [float(plain[s]) for s in slot_of],
        "managed, plan setpoint": list(result.planned_kw),
        "managed, metered": list(result.metered_kw),  # drawn last, on top
    }
    power_png = out / f"power-{tag}.png"
    rp.plot_day(
        power_png,
        result.times,
        series,
        result.headroom_kw,
        result.headroom_forecast_kw,
        result.price_eur_per_kwh,
        f"{cars} cars, {tag} (local noon onwards): charging power vs head-room and price",
    )
    chosen = [c.vehicle_id for c in sorted(result.cars, key=lambda c: -c.needed_kwh)[:6]]
    soc_png = out / f"soc-{tag}.png"
    rp.plot_soc(
        soc_png,
        result.times,
        {v: result.soc[v] for v in chosen},
        f"State of charge of the six cars that needed most ({tag}, metered by the simulator)",
    )
    managed = demo.rows[0]
    plan = demo.rows[1]
    lat = np.asarray(result.latency_s, dtype=float)
    prof = profile_latency_summary(result)
    lines = [
        f"# voltpool demo: {cars} cars, {tag}",
        "",
        f"Simulated {span * result.step_s / 3600:.1f} h from local noon through OCPP 1.6-J "
        f"(WebSockets), MQTT and Redis on a simulated clock, {result.step_s:.0f} s steps; the "
        f"day took {wall_s:.0f} s wall"
        + (
            f" and {run_times['day_cpu_s']:.0f} s CPU in this process"
            if run_times and "day_cpu_s" in run_times
            else ""
        )
        + " (start-up of the chargers included). Site: "
        f"{day.capacity_kw:,.0f} kW connection shared with the "
        f"households; {day.charger_kw:.2f} kW charger per car. Prices: NL day-ahead of the date. "
        "Head-room: the GAM's 95 %-assured value told to the controller; violations counted "
        "against the realised household load (a GAM sample path) with 1 kW tolerance.",
        "",
        f"**Cost basis**: spot = day-ahead price only; all-in = spot + "
        f"{basis.fee_eur_per_kwh:.3f} EUR/kWh grid fee and taxes (excl. VAT) on import, export "
        f"earns spot; V2G wear {basis.degradation_eur_per_kwh:.3f} EUR/kWh discharged.",
        "",
        "**Sources**: *metered* = what the simulated chargers measured; *plan* = the "
        "controller's own setpoint for each step; *computed* = a schedule on the day's planning "
        "problem (no protocols).",
        "",
        rp.markdown_table(
            [
                "strategy",
                "source",
                "cost spot EUR",
                "cost all-in EUR",
                "imported kWh",
                "exported kWh",
                "peak kW",
                "shortfall kWh (cars)",
                "head-room violations",
            ],
            [
                [
                    r.name,
                    r.source,
                    r.cost_spot_eur,
                    r.cost_allin_eur,
                    r.energy_kwh,
                    r.export_kwh,
                    r.peak_kw,
                    "–" if r.source == "plan" else f"{r.shortfall_kwh:.2f} ({r.short_cars})",
                    r.violations,
                ]
                for r in demo.rows
            ],
        ),
        "",
        f"**Metered vs the plan**: energy {managed.energy_kwh - plan.energy_kwh:+.2f} kWh, cost "
        f"{managed.cost_spot_eur - plan.cost_spot_eur:+.2f} EUR (spot), peak "
        f"{managed.peak_kw - plan.peak_kw:+.1f} kW (metered minus plan).",
        "",
        f"**Per car (metered)**: {len(result.cars)} cars left or were counted at the end; needed "
        f"{sum(demo.needed_kwh.values()):.1f} kWh, got "
        f"{sum(c.delivered_kwh for c in result.cars):.1f} kWh; "
        f"{managed.short_cars} short by {managed.shortfall_kwh:.2f} kWh in all "
        f"(see cars-{tag}.csv).",
        "",
        f"**Protocol counters**: events received {result.counters.get('events_received', 0)}, "
        f"plans {result.counters.get('plans', 0)}, profiles sent "
        f"{result.dispatch.get('profiles_sent', 0)} (accepted "
        f"{result.dispatch.get('profiles_accepted', 0)}, rejected "
        f"{result.dispatch.get('profiles_rejected', 0)}, timed out "
        f"{result.dispatch.get('profiles_timed_out', 0)}); the simulated chargers received "
        f"{result.profiles_received} SetChargingProfile requests.",
        "",
        "**Event-to-profile latency** (measured outside the controller: a car plugs in, i.e. "
        "its MQTT departure and SoC and its charger's StatusNotification and StartTransaction, "
        "until that charger receives its first SetChargingProfile): "
        + describe_profile_latency(prof)
        + " Event-to-plan latency (the service's own record, wall): "
        + (
            f"median {1000 * np.median(lat):.0f} ms, p95 {1000 * np.percentile(lat, 95):.0f} ms, "
            f"max {1000 * lat.max():.0f} ms over {lat.size} events."
            if lat.size
            else "no samples."
        ),
        "",
        f"![power](power-{tag}.png)",
        "",
        f"![soc](soc-{tag}.png)",
        "",
    ]
    path = out / f"report-{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    payload = {
        "day": tag,
        "cars": cars,
        "step_s": result.step_s,
        "wall_s": wall_s,
        "metered_energy_kwh": result.energy_kwh,
        "metered_cost_spot_eur": managed.cost_spot_eur,
        "metered_peak_kw": result.peak_kw,
        "sum_car_delivered_kwh": sum(c.delivered_kwh for c in result.cars),
        "sum_car_shortfall_kwh": managed.shortfall_kwh,
        "rows": [
            {
                k: getattr(r, k)
                for k in (
                    "name",
                    "source",
                    "cost_spot_eur",
                    "cost_allin_eur",
                    "energy_kwh",
                    "export_kwh",
                    "peak_kw",
                    "shortfall_kwh",
                    "short_cars",
                    "violations",
                )
            }
            for r in demo.rows
        ],
        "counters": result.counters,
        "dispatch": result.dispatch,
        "latency_s": {
            "median": float(np.median(lat)) if lat.size else None,
            "p95": float(np.percentile(lat, 95)) if lat.size else None,
        },
        "profile_latency": prof,
        "profiles_received": result.profiles_received,
        "run": run_times or {},
    }
    (out / f"demo-{tag}.json").write_text(json.dumps(payload, indent=1, default=str))
    demo.files = [path, power_png, soc_png, out / f"steps-{tag}.csv", out / f"cars-{tag}.csv"]
    return path


def run_demo(
    *,
    data_dir: Path,
    out: Path,
    cars: int | None,
    days: int,
    first: date,
    hours: float,
    step_s: float,
    meter_interval_s: float = DEFAULT_METER_INTERVAL_S,
    soc_interval_s: float = DEFAULT_SOC_INTERVAL_S,
    basis: CostBasis | None = None,
    models_cache: Path | None = Path("var") / "forecast-models",
    progress: Callable[[date, datetime, ScenarioResult], None] | None = None,
    models: ForecastModels | None = None,
) -> list[DemoDay]:
    """Run `days` demo days from `first` and write their reports under `out`.

    `models` default: the fitted models in `models_cache`, fitted from `data_dir` if absent.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    if not 0 < hours <= 24:
        raise ValueError("hours must lie in (0, 24]")
    basis = basis or CostBasis()
    models = models or load_models(data_dir, models_cache)
    site = SiteSpec()
    vehicles = seed_fleet(data_dir, cars, site.aggregate_charger_kw)
    factory = DayFactory(models, vehicles, site, first_day=first, days=days + 1)
    outcome: list[DemoDay] = []
    for k in range(days):
        d = first + timedelta(days=k)
        fleet_day = factory.day(d)
        started = time.perf_counter()
        cpu = time.process_time()

        def tick(now: datetime, result: ScenarioResult, d: date = d) -> None:
            if progress is not None:
                progress(d, now, result)

        result = asyncio.run(
            run_demo_day(
                fleet_day,
                hours=hours,
                step_s=step_s,
                meter_interval_s=meter_interval_s,
                soc_interval_s=soc_interval_s,
                progress=tick,
            )
        )
        wall = time.perf_counter() - started
        times = {"day_wall_s": wall, "day_cpu_s": time.process_time() - cpu}
        rows, needed = compare(fleet_day, result, hours, basis)
        demo = DemoDay(day=d, result=result, rows=rows, needed_kwh=needed)
        write_day(out, demo, fleet_day, basis, wall_s=wall, cars=len(vehicles), run_times=times)
        outcome.append(demo)
    index = ["# voltpool demo runs", ""] + [
        f"- [{d.day.isoformat()}](report-{d.day.isoformat()}.md)" for d in outcome
    ]
    (out / "report.md").write_text(
        "\n".join(index) + "\n\n" + (out / f"report-{outcome[0].day.isoformat()}.md").read_text()
    )
    return outcome


def run_demo_cli(
    *,
    cars: int,
    days: int,
    first: str,
    hours: float,
    step_s: float,
    out: str | None,
    console: Any,
    data_dir: Path = Path("data"),
) -> list[DemoDay]:
    """What `voltpool demo` runs: a progress bar, the days, a rich table, the report path."""
    import logging

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # One INFO line per charger boot would bury the progress bar.
        for name in ("adapters", "controller", "simulators"):
            logging.getLogger(name).setLevel(logging.WARNING)
    started, cpu = time.perf_counter(), os.times()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(out or f"runs/{stamp}")
    start = date.fromisoformat(first)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(
            "starting (fit or load models, connect chargers)", total=days * hours, info=""
        )

        def progress(d: date, now: datetime, result: ScenarioResult) -> None:
            done = (d - start).days * hours + len(result.times) * result.step_s / 3600.0
            local = now.astimezone(rp.LOCAL)
            bar.update(
                task,
                completed=done,
                description=f"simulated {local:%Y-%m-%d %H:%M}",
                info=(
                    f"events {result.counters.get('events_received', 0):,}  plans "
                    f"{result.counters.get('plans', 0):,}  profiles sent "
                    f"{result.dispatch.get('profiles_sent', 0):,}"
                ),
            )

        demos = run_demo(
            data_dir=data_dir,
            out=run_dir,
            cars=cars,
            days=days,
            first=start,
            hours=hours,
            step_s=step_s,
            progress=progress,
        )
    for demo in demos:
        table = Table(title=f"{demo.day} — {cars} cars (spot and all-in cost, EUR)")
        for col in (
            "strategy",
            "source",
            "spot EUR",
            "all-in EUR",
            "kWh in",
            "peak kW",
            "shortfall kWh (cars)",
            "violations",
        ):
            table.add_column(col)
        for r in demo.rows:
            table.add_row(
                r.name,
                r.source,
                f"{r.cost_spot_eur:,.2f}",
                f"{r.cost_allin_eur:,.2f}",
                f"{r.energy_kwh:,.1f}",
                f"{r.peak_kw:,.1f}",
                "–" if r.source == "plan" else f"{r.shortfall_kwh:.2f} ({r.short_cars})",
                str(r.violations),
            )
        console.print(table)
        res = demo.result
        prof = profile_latency_summary(res)
        console.print(
            f"profiles sent {res.dispatch.get('profiles_sent', 0):,}, events "
            f"{res.counters.get('events_received', 0):,}, wall {res.wall_s:.0f} s; "
            f"event-to-profile latency: {describe_profile_latency(prof)}"
        )
    ended = os.times()
    times = {
        "wall_s": time.perf_counter() - started,
        "cpu_user_s": ended.user - cpu.user + ended.children_user - cpu.children_user,
        "cpu_system_s": ended.system - cpu.system + ended.children_system - cpu.children_system,
    }
    (run_dir / "run.json").write_text(json.dumps(times, indent=1))
    console.print(
        f"whole run: {times['wall_s']:.0f} s wall, {times['cpu_user_s']:.0f} s user + "
        f"{times['cpu_system_s']:.0f} s system CPU (this process and the Redis server it ran)"
    )
    console.print(f"report: {run_dir / 'report.md'}")
    return demos
