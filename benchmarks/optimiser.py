"""Optimiser benchmark: fast path (HiGHS, flow-seeded, warm-started) against cvxpy/ECOS.

For each fleet size (the seed's fleet scaled, 96 slots, one realistic evening-to-morning day) it
prints: build + first solve, re-solve after one car's event (its SoC changes), re-solve after a
price change, p50/p99 of repeated car-event re-solves (wall clock and this process's CPU time),
the cvxpy/ECOS times measured in the same
run and their ratio to the fast path, the objectives' relative difference, and peak memory.

Two fast-path configurations are timed: "money" (total shortfall, fairness, money: the seed's LP
with soft targets) and "full" (the service default: plus the second stage that flattens peak
and ramps, plus the min-rate repair). cvxpy/ECOS runs the "money" configuration only, and only
up to `--cvxpy-limit` cars (it takes minutes beyond).

    python benchmarks/optimiser.py                 # 278, 1000, 5000, 20000 cars
    python benchmarks/optimiser.py --quick         # 278 and 1000 cars, fewer repeats
    python benchmarks/optimiser.py --sizes 278,2000 --repeats 50 --cvxpy-limit 0
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from controller.optimiser import FastSolver, OptimiserOptions, solve_reference
from controller.optimiser.instances import DayShape, FleetModel, parse_fleet_table, seed_fleet_day
from controller.planning.problem import PlanningProblem, Schedule

FLEET_CSV = Path(__file__).resolve().parents[1] / "data" / "fleet" / "seed_fleet.csv"
MONEY = OptimiserOptions(peak_flattening=False, min_rate_repair=False, time_limit_s=600.0)
FULL = OptimiserOptions(time_limit_s=600.0)
HEADER = ("first", "car evt", "price", "p50", "p99", "cpu p50", "cpu p99", "heap MB")
TARGETS_MS = {("no V2G", 278): 20.0, ("no V2G", 20000): 1000.0, ("V2G", 278): 150.0}


@dataclass
class Timing:
    """The figures of one solver configuration on one fleet size."""

    label: str
    first_s: float = float("nan")
    car_event_s: float = float("nan")
    price_change_s: float = float("nan")
    resolves_s: list[float] = field(default_factory=list)
    resolves_cpu_s: list[float] = field(default_factory=list)  # process CPU time of each
    cost_eur: list[float] = field(default_factory=list)  # first, car event, price change
    peak_heap_mb: float = float("nan")
    note: str = ""

    def percentile(self, q: float, *, cpu: bool = False) -> float:
        """The q-th percentile of the repeated re-solves, seconds (wall clock, or CPU)."""
        values = self.resolves_cpu_s if cpu else self.resolves_s
        if not values:
            return float("nan")
        return float(np.percentile(values, q))


def car_event(problem: PlanningProblem, k: int) -> PlanningProblem:
    """Car k % N reports a new SoC (2 kWh more, within its battery)."""
    i = k % problem.n_vehicles
    energy = problem.energy_kwh.copy()
    energy[i] = min(energy[i] + 2.0, problem.capacity_kwh[i])
    return dataclasses.replace(problem, energy_kwh=energy)


def price_change(problem: PlanningProblem, k: int) -> PlanningProblem:
    """An intraday price update: every slot moves by up to 3 %."""
    noise = 1.0 + 0.03 * np.sin(np.arange(problem.n_slots) * 0.7 + k)
    prices = np.round(problem.price_eur_per_kwh * noise, 5)
    return dataclasses.replace(
        problem, price_eur_per_kwh=prices, export_price_eur_per_kwh=prices.copy()
    )


def _timed(
    solve: Callable[[PlanningProblem], Schedule], problem: PlanningProblem
) -> tuple[float, Schedule]:
    seconds, _, schedule = _timed_cpu(solve, problem)
    return seconds, schedule


def _timed_cpu(
    solve: Callable[[PlanningProblem], Schedule], problem: PlanningProblem
) -> tuple[float, float, Schedule]:
    """(wall seconds, CPU seconds of this process, schedule) of one solve."""
    gc.collect()
    started, cpu = time.perf_counter(), time.process_time()
    schedule = solve(problem)
    return time.perf_counter() - started, time.process_time() - cpu, schedule


def bench_fast(
    problem: PlanningProblem,
    options: OptimiserOptions,
    label: str,
    repeats: int,
    budget_s: float,
) -> Timing:
    """Cold first solve, then warm re-solves on one `FastSolver`."""
    timing = Timing(label)
    solver = FastSolver()

    def solve(p: PlanningProblem) -> Schedule:
        return solver.solve(p, options)

    timing.first_s, first = _timed(solve, problem)
    timing.cost_eur.append(first.details["stage_cost_eur"])
    timing.car_event_s, after_event = _timed(solve, car_event(problem, 0))
    timing.cost_eur.append(after_event.details["stage_cost_eur"])
    timing.price_change_s, after_price = _timed(solve, price_change(problem, 0))
    timing.cost_eur.append(after_price.details["stage_cost_eur"])
    _timed(solve, problem)  # back to the day's prices, so the repeats are car events only
    last = after_price
    for k in range(1, repeats + 1):
        elapsed, cpu, last = _timed_cpu(solve, car_event(problem, k))
        timing.resolves_cpu_s.append(cpu)
        timing.resolves_s.append(elapsed)
        if sum(timing.resolves_s) > budget_s:
            break
    tracemalloc.start()
    FastSolver().solve(problem, options)
    timing.peak_heap_mb = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    timing.note = f"{len(timing.resolves_s)} re-solves, last start: {solver.last_start}"
    if "sifting_working_columns" in last.details:
        timing.note += f", sifting: {int(last.details['sifting_working_columns'])} columns loaded"
    if options.min_rate_repair:
        d = last.details
        timing.note += (
            f"; last: {int(d['rounding_moves'])} swaps, {int(d['rounding_left'])} left,"
            f" repair {d['repair_cost_eur']:.2f} EUR, peak proven {int(d.get('peak_certified', 0))}"
        )
    return timing


def bench_reference(problem: PlanningProblem, repeats: int) -> Timing:
    """cvxpy/ECOS, money stages: build + compile + first solve, then DPP re-solves."""
    timing = Timing("cvxpy/ECOS money")

    def solve(p: PlanningProblem) -> Schedule:
        return solve_reference(p, MONEY)

    timing.first_s, first = _timed(solve, problem)
    timing.cost_eur.append(first.details["stage_cost_eur"])
    timing.car_event_s, after_event = _timed(solve, car_event(problem, 0))
    timing.cost_eur.append(after_event.details["stage_cost_eur"])
    timing.price_change_s, after_price = _timed(solve, price_change(problem, 0))
    timing.cost_eur.append(after_price.details["stage_cost_eur"])
    for k in range(1, repeats + 1):
        elapsed, _ = _timed(solve, car_event(problem, k))
        timing.resolves_s.append(elapsed)
    inaccurate = first.details.get("inaccurate_stages", 0.0)
    timing.note = f"ECOS inaccurate stages: {int(inaccurate)}"
    return timing


def v2g_day(fleet: list[FleetModel], n: int, seed: int) -> PlanningProblem:
    """Half the cars allow V2G; an evening price spike makes selling worth it."""
    problem = seed_fleet_day(
        fleet, np.random.default_rng(seed), DayShape(vehicles=n, v2g_share=0.5)
    )
    hours = (16 + 0.25 * np.arange(problem.n_slots)) % 24
    spike = np.where((hours >= 17) & (hours < 20), 0.25, 0.0)
    return dataclasses.replace(
        problem,
        price_eur_per_kwh=problem.price_eur_per_kwh + spike,
        export_price_eur_per_kwh=problem.export_price_eur_per_kwh + spike,
    )


def _ratio(a: Timing, b: Timing) -> float:
    """p50 CPU time of `a`'s re-solves over `b`'s."""
    return a.percentile(50, cpu=True) / b.percentile(50, cpu=True)


def _ms(seconds: float) -> str:
    return f"{'-':>10}" if np.isnan(seconds) else f"{seconds * 1e3:10.1f}"


def _row(t: Timing) -> str:
    return (
        f"  {t.label:<28}{_ms(t.first_s)}{_ms(t.car_event_s)}{_ms(t.price_change_s)}"
        f"{_ms(t.percentile(50))}{_ms(t.percentile(99))}"
        f"{_ms(t.percentile(50, cpu=True))}{_ms(t.percentile(99, cpu=True))}"
        f"{t.peak_heap_mb:10.0f}  {t.note}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="278,1000,5000,20000", help="fleet sizes, comma separated"
    )
    parser.add_argument("--quick", action="store_true", help="278 and 1000 cars, 5 repeats")
    parser.add_argument("--repeats", type=int, default=20, help="car-event re-solves per size")
    parser.add_argument("--cvxpy-limit", type=int, default=278, help="largest size for cvxpy/ECOS")
    parser.add_argument("--cvxpy-repeats", type=int, default=2)
    parser.add_argument("--v2g-limit", type=int, default=1000, help="largest size for the V2G day")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--budget", type=float, default=120.0, help="seconds of re-solves per configuration"
    )
    args = parser.parse_args(argv)
    sizes = [278, 1000] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    repeats = 5 if args.quick else args.repeats
    fleet = parse_fleet_table(FLEET_CSV.read_text())
    # Warm up imports and solver libraries so the first timed solve measures the solve.
    warm_up = seed_fleet_day(fleet, np.random.default_rng(0), DayShape(vehicles=20))
    FastSolver().solve(warm_up, FULL)
    solve_reference(warm_up, MONEY)

    print("voltpool optimiser benchmark: seed fleet scaled, 96 slots of 15 min, 11 kW chargers,")
    print("site 1 MW per 278 cars minus households; times in ms, memory = peak Python heap (MB)")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}; repeats={repeats}")
    print(
        "cpu p50/p99: CPU time of this process per re-solve (less sensitive to other work on a"
        f" shared machine than wall clock); load average now {os.getloadavg()[0]:.1f}"
    )
    p99: dict[tuple[str, int, str], tuple[float, float]] = {}
    for n in sizes:
        day = seed_fleet_day(fleet, np.random.default_rng(args.seed), DayShape(vehicles=n))
        print()
        print(f"N = {n} cars x {day.n_slots} slots, no V2G")
        print(f"  {'solver':<28}" + "".join(f"{h:>10}" for h in HEADER))
        money = bench_fast(day, MONEY, "fast money", repeats, args.budget)
        print(_row(money))
        full = bench_fast(day, FULL, "fast full (default)", repeats, args.budget)
        print(_row(full))
        p99[("no V2G", n, "money")] = (money.percentile(99), money.percentile(99, cpu=True))
        p99[("no V2G", n, "full")] = (full.percentile(99), full.percentile(99, cpu=True))
        print(f"  full / money (p50 CPU, same run): {_ratio(full, money):.2f}")
        if n <= args.cvxpy_limit:
            reference = bench_reference(day, args.cvxpy_repeats)
            print(_row(reference))
            ratio = [
                reference.first_s / money.first_s,
                reference.car_event_s / money.car_event_s,
                reference.price_change_s / money.price_change_s,
            ]
            diff = [
                abs(a - b) / max(1.0, abs(b))
                for a, b in zip(money.cost_eur, reference.cost_eur, strict=True)
            ]
            print(
                "  ratio cvxpy/fast (first, car event, price change): "
                + ", ".join(f"{r:.0f}x" for r in ratio)
            )
            print(
                "  objectives' relative difference (first, car event, price change): "
                + ", ".join(f"{d:.1e}" for d in diff)
            )
        else:
            print(f"  cvxpy/ECOS skipped: {n} cars is above --cvxpy-limit {args.cvxpy_limit}")
        if n <= args.v2g_limit:
            v2g = v2g_day(fleet, n, args.seed)
            print(f"N = {n} cars, half of them V2G (evening price spike)")
            v_money = bench_fast(v2g, MONEY, "fast money, V2G", repeats, args.budget)
            print(_row(v_money))
            v_full = bench_fast(v2g, FULL, "fast full (default), V2G", repeats, args.budget)
            print(_row(v_full))
            p99[("V2G", n, "money")] = (v_money.percentile(99), v_money.percentile(99, cpu=True))
            p99[("V2G", n, "full")] = (v_full.percentile(99), v_full.percentile(99, cpu=True))
            print(f"  full / money (p50 CPU, same run): {_ratio(v_full, v_money):.2f}")
    print()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"max RSS of the process: {rss_mb:.0f} MB; load average now {os.getloadavg()[0]:.1f}")
    print("targets (p99 of car-event re-solves; wall clock, and CPU time of this process):")
    for (kind, n), target in TARGETS_MS.items():
        for config in ("money", "full"):
            value = p99.get((kind, n, config))
            if value is None:
                continue
            wall, cpu = value[0] * 1e3, value[1] * 1e3
            print(
                f"  {kind:<7}{n:>6} cars, {config:<6}: p99 {wall:9.1f} ms"
                f" {'met' if wall <= target else 'MISSED':<6} (CPU {cpu:9.1f} ms"
                f" {'met' if cpu <= target else 'MISSED'}) target {target:6.0f} ms"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
