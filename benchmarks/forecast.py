"""Forecasting benchmark: time to fit all models, and to produce one forecast.

Run: `.venv/bin/python benchmarks/forecast.py [--households 5000] [--repeats 200]`

Prints the fit's phases (panel build, each tariff group's GAM, trips, price scores) and, for a
forecast of one 96-slot horizon: head-room (with prices for the market group), the price
outlook and the 278 cars' next-day needs, each as median and 95th percentile over `repeats`
calls. Forecasts are computed on demand, not cached: the ratio to the 20 ms re-plan budget and
to a baseline measured in the same run (the seasonal-naive forecast: one array lookup) is
printed beside them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np

from adapters.datasets.fitting import FitOptions, fit_all
from adapters.datasets.fleet import load_seed_fleet
from adapters.datasets.model_files import data_hash, load_models, save_models
from adapters.datasets.panel import PanelSpec
from controller.forecast.fleet import synthetic_fleet
from controller.forecast.models import (
    headroom_forecast,
    headroom_outlook,
    next_day_needs,
    price_series,
)

DATA = Path(__file__).resolve().parents[1] / "data"
REPLAN_BUDGET_MS = 20.0


def timed(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and 95th percentile wall time of `call`, in milliseconds (after one warm-up)."""
    call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000.0)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def main() -> None:
    """Fit, save, load and forecast; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--households", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    started = time.perf_counter()
    outcome = fit_all(DATA, FitOptions(panel=PanelSpec(households=args.households)))
    fit_s = time.perf_counter() - started
    metrics = outcome.metrics
    print(f"fit all models ({args.households} households, 10 cars): {fit_s:.1f} s")
    for group in ("fixed", "market"):
        entry = metrics["households"][group]
        print(
            f"  GAM {group:6s}: {entry['fit_seconds']:.1f} s, "
            f"{entry['fit']['penalty_evaluations']} GCV evaluations"
        )
    print(f"  trips: {metrics['trips']['fit_seconds']:.2f} s")
    gams = sum(metrics["households"][g]["fit_seconds"] for g in ("fixed", "market"))
    rest = fit_s - gams - metrics["trips"]["fit_seconds"]
    print(f"  the rest (reading data, building the panel, scoring): {rest:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        digest, hashes = data_hash(outcome.data_files, DATA)
        t0 = time.perf_counter()
        save_models(
            outcome.models,
            Path(tmp),
            data_sha256=digest,
            data_files=hashes,
            inputs=outcome.inputs,
            metrics=metrics,
        )
        t1 = time.perf_counter()
        models = load_models(Path(tmp))
        t2 = time.perf_counter()
    print(f"save model files: {1000 * (t1 - t0):.0f} ms, load: {1000 * (t2 - t1):.0f} ms")

    vehicles = synthetic_fleet(load_seed_fleet(DATA / "fleet" / "seed_fleet.csv"))
    # 10:07 in Amsterdam: today's prices are published, tomorrow's are forecast.
    now = datetime(2024, 3, 5, 9, 7, tzinfo=UTC)
    history = outcome.group_loads["fixed"].mean_kw
    slot = 500

    def naive() -> object:
        return history[slot : slot + 96].copy()

    rows = [
        ("seasonal-naive lookup (baseline)", naive),
        ("head-room, 96 slots, 2 groups", lambda: headroom_forecast(models, now, 96, 1000.0, 0.95)),
        ("price outlook, 96 slots", lambda: price_series(models, now, now, 96)),
        (
            "next-day needs, 278 cars",
            lambda: next_day_needs(models, vehicles, date(2024, 3, 6)),
        ),
    ]
    results = {name: timed(call, args.repeats) for name, call in rows}
    base = results[rows[0][0]][0]
    print(f"one forecast (median / p95 over {args.repeats} calls, not cached):")
    for name, (median, p95) in results.items():
        print(
            f"  {name:34s} {median:7.3f} ms  p95 {p95:7.3f} ms  "
            f"{median / REPLAN_BUDGET_MS:6.1%} of the 20 ms re-plan  x{median / base:,.0f} baseline"
        )
    total = sum(results[name][0] for name, _ in rows[1:])
    print(f"  all three together: {total:.2f} ms = {total / REPLAN_BUDGET_MS:.1%} of 20 ms")
    rng = np.random.default_rng(1)
    outlook = headroom_outlook(models, now, 96, 1000.0)
    median, p95 = timed(lambda: outlook.sample_paths(rng, 1000), max(10, args.repeats // 10))
    print(f"  1,000 Monte-Carlo head-room paths: {median:.1f} ms (p95 {p95:.1f} ms)")


if __name__ == "__main__":
    main()
