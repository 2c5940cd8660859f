"""Optimiser benchmark: fast path (HiGHS, flow-seeded, warm-started) against cvxpy/ECOS.

For each fleet size (the seed's fleet scaled, 96 slots, one realistic evening-to-morning day) it
prints: build + first solve, re-solve after one car's event (its SoC changes), re-solve after a
price change, p50/p99 of repeated car-event re-solves (wall clock and this process's CPU time),
the cvxpy/ECOS times measured in the same run and their ratio to the fast path, the objectives'
relative difference, and peak memory.

Three fast-path configurations are timed: "money" (total shortfall, fairness, money: the seed's
LP with soft targets), "full" (the service default: plus the second stage that flattens peak
and ramps, the min-rate repair and the earliest-departure tie-break) and "full, no tie-break"
(the default without `tiebreak.py`, its baseline in the same run). cvxpy/ECOS runs the "money"
configuration in two forms: "compact" (`reference_compact.py`, the transportation form: one
variable per free car-slot entry, one energy row per car) at every size up to `--compact-limit`,
and "textbook" (`reference.py`: an energy state per car and slot) up to `--textbook-limit` (it
takes minutes beyond 278 cars). Each cvxpy form runs in a child process with a time limit and an
address-space limit (`--cvxpy-timeout`, `--cvxpy-memory-gb`); its memory figure is the child's
max RSS.

    python benchmarks/optimiser.py                 # 278, 1000, 5000, 20000 cars
    python benchmarks/optimiser.py --quick         # 278 and 1000 cars, fewer repeats
    python benchmarks/optimiser.py --sizes 278,2000 --repeats 50 --compact-limit 0
    python benchmarks/optimiser.py --short-only    # only the over-subscribed rows

Over-subscribed rows: the same day with every slot's head-room cut to `--short-headroom`
(default 30 %), so the targets cannot all be met, at `--short-sizes` (278, 1000, 5000): the
fast path (shortfall and fairness stages by max flows, `flow_stages.py`) and, as the baseline in
the same run, the fast path with those stages as HiGHS runs (`flow_stages=False`, the path
before) up to `--short-lp-limit` cars, each solve given `--short-lp-timeout` seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from controller.optimiser import (
    FastSolver,
    OptimiserFailed,
    OptimiserOptions,
    solve_reference,
    solve_reference_compact,
)
from controller.optimiser.instances import DayShape, FleetModel, parse_fleet_table, seed_fleet_day
from controller.planning.problem import PlanningProblem, Schedule

ROOT = Path(__file__).resolve().parents[1]
FLEET_CSV = ROOT / "data" / "fleet" / "seed_fleet.csv"
MONEY = OptimiserOptions(
    peak_flattening=False,
    min_rate_repair=False,
    tiebreak=False,
    time_limit_s=600.0,
)
FULL = OptimiserOptions(time_limit_s=600.0)
# The default without the earliest-departure tie-break (`tiebreak.py`): its baseline, same run.
NO_TIEBREAK = OptimiserOptions(time_limit_s=600.0, tiebreak=False)
HEADER = ("first", "car evt", "price", "p50", "p99", "cpu p50", "cpu p99", "heap MB")
TARGETS_MS = {
    ("no V2G", 278): 20.0,
    ("no V2G", 20000): 1000.0,
    ("V2G", 278): 150.0,
    # Over-subscribed: the service's re-plan budget (`solve_deadline_s`, 2 s), with room to spare.
    ("short", 1000): 500.0,
}


@dataclass
class Timing:
    """The figures of one solver configuration on one fleet size."""

    label: str
    first_s: float = float("nan")
    car_event_s: float = float("nan")
    price_change_s: float = float("nan")
    cpu_s: list[float] = field(default_factory=list)  # CPU of first, car event, price change
    resolves_s: list[float] = field(default_factory=list)
    resolves_cpu_s: list[float] = field(default_factory=list)  # process CPU time of each
    cost_eur: list[float] = field(default_factory=list)  # first, car event, price change
    peak_heap_mb: float = float("nan")
    note: str = ""
    flow_share: str = ""  # over-subscribed rows: solves that took the flow stages, of all

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

    last: Schedule
    for attr, p in (
        ("first_s", problem),
        ("car_event_s", car_event(problem, 0)),
        ("price_change_s", price_change(problem, 0)),
    ):
        elapsed, cpu, last = _timed_cpu(solve, p)
        setattr(timing, attr, elapsed)
        timing.cpu_s.append(cpu)
        timing.cost_eur.append(last.details["stage_cost_eur"])
    flows = [last.details.get("flow_stages", 0.0)]
    kept: list[float] = []
    tiebreak_s: list[float] = []
    _timed(solve, problem)  # back to the day's prices, so the repeats are car events only
    for k in range(1, repeats + 1):
        elapsed, cpu, last = _timed_cpu(solve, car_event(problem, k))
        timing.resolves_cpu_s.append(cpu)
        timing.resolves_s.append(elapsed)
        flows.append(last.details.get("flow_stages", 0.0))
        if "tiebreak_kept" in last.details:
            kept.append(last.details["tiebreak_kept"])
            tiebreak_s.append(last.details["tiebreak_s"])
        if sum(timing.resolves_s) > budget_s:
            break
    if last.status == "optimal_shortfall":
        timing.flow_share = f"{int(sum(flows))}/{len(flows)}"
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
    if options.tiebreak:
        timing.note += (
            f"; tie-break kept {int(sum(kept))}/{len(kept)}, its p50"
            f" {np.percentile(tiebreak_s, 50) * 1e3:.1f} ms"
            if kept
            else ""
        )
    return timing


CVXPY_FORMS: dict[str, Callable[[PlanningProblem, OptimiserOptions], Schedule]] = {
    "compact": solve_reference_compact,
    "textbook": solve_reference,
}


def bench_reference(problem: PlanningProblem, form: str, repeats: int) -> Timing:
    """cvxpy/ECOS, money stages, in `form`: build + compile + first solve, then DPP re-solves."""
    timing = Timing(f"cvxpy/ECOS {form} money")
    reference = CVXPY_FORMS[form]

    def solve(p: PlanningProblem) -> Schedule:
        return reference(p, MONEY)

    schedules = []
    for attr, p in (
        ("first_s", problem),
        ("car_event_s", car_event(problem, 0)),
        ("price_change_s", price_change(problem, 0)),
    ):
        elapsed, cpu, schedule = _timed_cpu(solve, p)
        setattr(timing, attr, elapsed)
        timing.cpu_s.append(cpu)
        timing.cost_eur.append(schedule.details["stage_cost_eur"])
        schedules.append(schedule)
    for k in range(1, repeats + 1):
        elapsed, cpu, _ = _timed_cpu(solve, car_event(problem, k))
        timing.resolves_s.append(elapsed)
        timing.resolves_cpu_s.append(cpu)
    inaccurate = sum(s.details.get("inaccurate_stages", 0.0) for s in schedules)
    timing.note = f"ECOS inaccurate stages: {int(inaccurate)}"
    if form == "compact":
        from controller.optimiser.reference_compact import cached_structure

        structure = cached_structure(problem)
        stats = None if structure is None else structure.hard_stage.solver_stats
        if stats is not None and stats.num_iters is not None:
            timing.note += (
                f"; last hard stage: {stats.num_iters} ECOS iterations,"
                f" {stats.solve_time * 1e3:.0f} ms in ECOS"
            )
    return timing


def cvxpy_child(form: str, n: int, seed: int, repeats: int) -> int:
    """The child process's part: time one cvxpy form on one size, print the figures as JSON."""
    fleet = parse_fleet_table(FLEET_CSV.read_text())
    warm_up = seed_fleet_day(fleet, np.random.default_rng(0), DayShape(vehicles=20))
    CVXPY_FORMS[form](warm_up, MONEY)  # imports, cvxpy's and ECOS's first-call costs
    day = seed_fleet_day(fleet, np.random.default_rng(seed), DayShape(vehicles=n))
    timing = bench_reference(day, form, repeats)
    timing.peak_heap_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dataclasses.asdict(timing)))
    return 0


def bench_reference_child(form: str, n: int, args: argparse.Namespace) -> tuple[Timing | None, str]:
    """Run `cvxpy_child` in a fresh process under the time and memory limits: (figures, or
    None and what happened)."""
    limit = int(args.cvxpy_memory_gb * 2**30)

    def guard() -> None:  # runs in the child before it starts Python
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--cvxpy-child",
        form,
        "--sizes",
        str(n),
        "--seed",
        str(args.seed),
        "--cvxpy-repeats",
        str(args.cvxpy_repeats),
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=args.cvxpy_timeout,
            preexec_fn=guard,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            },
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, (
            f"stopped after {time.perf_counter() - started:.0f} s"
            f" (--cvxpy-timeout {args.cvxpy_timeout:.0f} s)"
        )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-2:])
        return None, (
            f"failed after {time.perf_counter() - started:.0f} s (exit {done.returncode},"
            f" address space limit {args.cvxpy_memory_gb:.1f} GB): {tail}"
        )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return Timing(**figures), ""


def compare(reference: Timing, fast: Timing) -> list[str]:
    """The ratio and objective lines of a cvxpy row against the fast money row."""
    walls = (
        (reference.first_s, fast.first_s),
        (reference.car_event_s, fast.car_event_s),
        (reference.price_change_s, fast.price_change_s),
    )
    cpus = zip(reference.cpu_s, fast.cpu_s, strict=True)
    diff = [
        abs(a - b) / max(1.0, abs(b))
        for a, b in zip(reference.cost_eur, fast.cost_eur, strict=True)
    ]
    form = reference.label.split()[1]
    return [
        f"  ratio {form}/fast, wall (first, car event, price change): "
        + ", ".join(f"{a / b:.0f}x" for a, b in walls)
        + "; CPU: "
        + ", ".join(f"{a / b:.0f}x" for a, b in cpus),
        f"  objectives' relative difference {form}/fast (first, car event, price change): "
        + ", ".join(f"{d:.1e}" for d in diff),
    ]


def short_day(fleet: list[FleetModel], n: int, seed: int, share: float) -> PlanningProblem:
    """The benchmark day with every slot's head-room cut to `share`: an over-subscribed site."""
    day = seed_fleet_day(fleet, np.random.default_rng(seed), DayShape(vehicles=n))
    return dataclasses.replace(day, headroom_kw=day.headroom_kw * share)


def bench_short(
    fleet: list[FleetModel],
    n: int,
    args: argparse.Namespace,
    repeats: int,
    p99: dict[tuple[str, int, str], tuple[float, float]],
) -> None:
    """The over-subscribed rows of one size: flow stages (money, full), and the LP stages."""
    day = short_day(fleet, n, args.seed, args.short_headroom)
    print(
        f"N = {n} cars x {day.n_slots} slots, no V2G, head-room x{args.short_headroom:g}"
        " (over-subscribed)"
    )
    print(f"  {'solver':<28}" + "".join(f"{h:>10}" for h in HEADER))
    money = bench_fast(day, MONEY, "flow stages money", repeats, args.budget)
    print(_row(money) + _short_note(money))
    full = bench_fast(day, FULL, "flow stages full (default)", repeats, args.budget)
    print(_row(full) + _short_note(full))
    plain = bench_fast(day, NO_TIEBREAK, "flow stages full, no tie-break", repeats, args.budget)
    print(_row(plain) + _short_note(plain))
    print(f"  full / full without the tie-break (p50 CPU, same run): {_ratio(full, plain):.2f}")
    p99[("short", n, "money")] = (money.percentile(99), money.percentile(99, cpu=True))
    p99[("short", n, "full")] = (full.percentile(99), full.percentile(99, cpu=True))
    if n > args.short_lp_limit:
        print(f"  LP stages skipped: {n} cars is above --short-lp-limit {args.short_lp_limit}")
        return
    lp_options = dataclasses.replace(MONEY, flow_stages=False, time_limit_s=args.short_lp_timeout)
    try:
        lp = bench_fast(day, lp_options, "LP stages money (before)", 2, args.short_lp_timeout)
    except OptimiserFailed as error:
        print(f"  LP stages money (before): no answer ({error}; {args.short_lp_timeout:.0f} s)")
        return
    print(_row(lp))
    print(
        "  ratio LP stages / flow stages, money, CPU (first, car event, price change, p50): "
        + ", ".join(f"{a / b:.0f}x" for a, b in zip(lp.cpu_s, money.cpu_s, strict=True))
        + f", {_ratio(lp, money):.0f}x"
    )
    diff = [abs(a - b) / max(1.0, abs(b)) for a, b in zip(lp.cost_eur, money.cost_eur, strict=True)]
    print(
        "  money optima's relative difference LP/flow stages (first, car event, price change): "
        + ", ".join(f"{d:.1e}" for d in diff)
    )


def _short_note(t: Timing) -> str:
    return f"; flow stages {t.flow_share}" if t.flow_share else ""


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
    parser.add_argument(
        "--compact-limit", type=int, default=20000, help="largest size for cvxpy's compact form"
    )
    parser.add_argument(
        "--textbook-limit",
        "--cvxpy-limit",
        type=int,
        default=278,
        help="largest size for cvxpy's textbook form (--cvxpy-limit: its old name)",
    )
    parser.add_argument(
        "--cvxpy-repeats", type=int, default=2, help="car-event re-solves per cvxpy form"
    )
    parser.add_argument(
        "--cvxpy-timeout", type=float, default=1200.0, help="seconds per cvxpy form and size"
    )
    parser.add_argument(
        "--cvxpy-memory-gb", type=float, default=8.0, help="address space of a cvxpy child"
    )
    parser.add_argument("--cvxpy-child", choices=sorted(CVXPY_FORMS), help=argparse.SUPPRESS)
    parser.add_argument("--v2g-limit", type=int, default=1000, help="largest size for the V2G day")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--short-sizes", default="278,1000,5000", help="sizes of the over-subscribed rows"
    )
    parser.add_argument(
        "--short-headroom", type=float, default=0.3, help="head-room share of those rows"
    )
    parser.add_argument(
        "--short-lp-limit", type=int, default=1000, help="largest size for the LP-stage baseline"
    )
    parser.add_argument(
        "--short-lp-timeout", type=float, default=300.0, help="seconds per LP-stage solve"
    )
    parser.add_argument("--short-only", action="store_true", help="only the over-subscribed rows")
    parser.add_argument(
        "--budget", type=float, default=120.0, help="seconds of re-solves per configuration"
    )
    args = parser.parse_args(argv)
    sizes = [278, 1000] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    if args.cvxpy_child:
        return cvxpy_child(args.cvxpy_child, sizes[0], args.seed, args.cvxpy_repeats)
    repeats = 5 if args.quick else args.repeats
    fleet = parse_fleet_table(FLEET_CSV.read_text())
    # Warm up imports and solver libraries so the first timed solve measures the solve.
    warm_up = seed_fleet_day(fleet, np.random.default_rng(0), DayShape(vehicles=20))
    FastSolver().solve(warm_up, FULL)

    print("voltpool optimiser benchmark: seed fleet scaled, 96 slots of 15 min, 11 kW chargers,")
    print("site 1 MW per 278 cars minus households; times in ms, memory = peak Python heap (MB);")
    print(
        "cvxpy/ECOS rows (money stages; compact = transportation form, textbook = energy state"
        " per car and slot) run in a child process: their MB is its max RSS"
    )
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}; repeats={repeats}")
    print(
        "cpu p50/p99: CPU time of this process per re-solve (less sensitive to other work on a"
        f" shared machine than wall clock); load average now {os.getloadavg()[0]:.1f}"
    )
    p99: dict[tuple[str, int, str], tuple[float, float]] = {}
    for n in [int(s) for s in args.short_sizes.split(",") if s]:
        print()
        bench_short(fleet, n, args, repeats, p99)
    for n in [] if args.short_only else sizes:
        day = seed_fleet_day(fleet, np.random.default_rng(args.seed), DayShape(vehicles=n))
        print()
        print(f"N = {n} cars x {day.n_slots} slots, no V2G")
        print(f"  {'solver':<28}" + "".join(f"{h:>10}" for h in HEADER))
        money = bench_fast(day, MONEY, "fast money", repeats, args.budget)
        print(_row(money))
        full = bench_fast(day, FULL, "fast full (default)", repeats, args.budget)
        print(_row(full))
        plain = bench_fast(day, NO_TIEBREAK, "fast full, no tie-break", repeats, args.budget)
        print(_row(plain))
        print(f"  full / full without the tie-break (p50 CPU, same run): {_ratio(full, plain):.2f}")
        p99[("no V2G", n, "money")] = (money.percentile(99), money.percentile(99, cpu=True))
        p99[("no V2G", n, "full")] = (full.percentile(99), full.percentile(99, cpu=True))
        print(f"  full / money (p50 CPU, same run): {_ratio(full, money):.2f}")
        for form, limit in (("compact", args.compact_limit), ("textbook", args.textbook_limit)):
            if n > limit:
                print(f"  cvxpy/ECOS {form} skipped: {n} cars is above --{form}-limit {limit}")
                continue
            reference, failure = bench_reference_child(form, n, args)
            if reference is None:
                print(f"  cvxpy/ECOS {form} money: {failure}")
                continue
            print(_row(reference) + " (MB: max RSS of its child process)")
            for line in compare(reference, money):
                print(line)
        if n <= args.v2g_limit:
            v2g = v2g_day(fleet, n, args.seed)
            print(f"N = {n} cars, half of them V2G (evening price spike)")
            v_money = bench_fast(v2g, MONEY, "fast money, V2G", repeats, args.budget)
            print(_row(v_money))
            v_full = bench_fast(v2g, FULL, "fast full (default), V2G", repeats, args.budget)
            print(_row(v_full))
            v_plain = bench_fast(
                v2g, NO_TIEBREAK, "fast full, no tie-break, V2G", repeats, args.budget
            )
            print(_row(v_plain))
            print(
                "  full / full without the tie-break, V2G (p50 CPU, same run):"
                f" {_ratio(v_full, v_plain):.2f}"
            )
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
