"""Fit every forecasting model from a data directory (what `voltpool fit` runs).

Expected layout under `data_dir` (the repository's `data/` is one):

- `prices/nl_dayahead_2015_2024.csv.gz`, or any `prices/*.csv[.gz]` in the price format;
- `fleet/seed_fleet.csv`;
- households: `households/panel.csv[.gz]` when you have a real tariff-labelled panel
  (adapters.datasets.households), else the shipped extracts it builds one from;
- charger logs: `chargers/logs.csv[.gz]` when you have real logs (adapters.datasets.chargers,
  read leniently: repeats that agree dropped, gaps left to the segmentation), else the shipped
  SimBench and ElaadNL extracts it builds ten cars from.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from adapters.datasets.chargers import (
    build_charger_logs,
    load_charger_logs,
    load_connection_times,
)
from adapters.datasets.errors import DataFileError
from adapters.datasets.fleet import load_seed_fleet
from adapters.datasets.households import load_household_panel
from adapters.datasets.panel import (
    PanelSpec,
    build_panel,
    describe,
    load_household_sources,
)
from adapters.datasets.tables import load_day_ahead_prices, load_profile_table
from controller.forecast.evaluation import evaluate_holdout, holdout_weeks
from controller.forecast.household import (
    GROUPS,
    BaseLoadModel,
    GroupLoad,
    correlate_groups,
    fit_household_model,
)
from controller.forecast.models import DEFAULT_HOUSEHOLDS, ForecastModels
from controller.forecast.prices import (
    DEFAULT_PRICE_ZONE,
    DayAheadPriceSource,
    PriceHistory,
    prices_on_slots,
)
from controller.forecast.trips import daily_energy, fit_trip_model, sessions_from_log

log = logging.getLogger(__name__)

HOUSEHOLD_ZONE = "Europe/Berlin"  # the built panel's clock (SimBench's)


@dataclass(frozen=True, slots=True)
class FitOptions:
    """What `fit_all` does beyond what the data directory says."""

    tz: str = HOUSEHOLD_ZONE
    price_tz: str = DEFAULT_PRICE_ZONE
    panel: PanelSpec = field(default_factory=PanelSpec)
    holdout_every: int = 5
    holdout_offset: int = 4
    min_days: int = 20
    households: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_HOUSEHOLDS))


@dataclass(frozen=True, slots=True)
class FitOutcome:
    """The fitted models, the files they came from, and how the fit went."""

    models: ForecastModels
    data_files: tuple[Path, ...]
    inputs: dict[str, Any]
    metrics: dict[str, Any]
    group_loads: dict[str, GroupLoad]
    held_out: np.ndarray


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _price_file(data_dir: Path) -> Path:
    shipped = data_dir / "prices" / "nl_dayahead_2015_2024.csv.gz"
    if shipped.is_file():
        return shipped
    found = sorted((data_dir / "prices").glob("*.csv*"))
    if not found:
        raise DataFileError(data_dir / "prices", "no day-ahead price file")
    return found[0]


def price_forecast_scores(history: PriceHistory, tz: str, weeks: int = 52) -> dict[str, float]:
    """MAE of the next-day price forecast over the history's last `weeks` weeks (EUR/kWh).

    Each Monday 00:00 local, Tuesday's prices are unknown; the forecast (same hour, same day
    type, last 4 weeks) is compared with the published prices, and so is the naive forecast
    "Monday's price at the same hour".
    """
    from controller.forecast.prices import price_series

    zone = ZoneInfo(tz)
    end = datetime.fromtimestamp(history.end_s, tz=UTC).astimezone(zone)
    monday = (end - timedelta(days=end.weekday() + 7)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    errors, naive = [], []
    for k in range(weeks):
        now = monday - timedelta(weeks=k)
        outlook = price_series(history, now, now, 192, tz=tz)
        if outlook.forecast_from is None:
            continue
        start_s = int(now.timestamp())
        times = start_s + 900 * np.arange(192, dtype=np.int64)
        actual, covered = history.values_at(times)
        # Skip daylight-saving weeks (a 23- or 25-hour Monday) and the history's edges.
        if outlook.forecast_from != 96 or not covered.all():
            continue
        errors.append(np.abs(outlook.price_eur_per_kwh[96:] - actual[96:]))
        naive.append(np.abs(actual[:96] - actual[96:]))
    return {
        "weeks": float(len(errors)),
        "mae_forecast_eur_per_kwh": float(np.mean(np.concatenate(errors)))
        if errors
        else float("nan"),
        "mae_previous_day_eur_per_kwh": float(np.mean(np.concatenate(naive)))
        if naive
        else float("nan"),
    }


def fit_all(data_dir: Path, options: FitOptions | None = None) -> FitOutcome:
    """Fit the household GAMs, the trip laws and the price source from `data_dir`.

    Raises:
        DataFileError: for a missing or bad input file.
    """
    options = options or FitOptions()
    started = time.perf_counter()
    files: list[Path] = []
    price_path = _price_file(data_dir)
    history = load_day_ahead_prices(price_path)
    files.append(price_path)
    fleet_path = data_dir / "fleet" / "seed_fleet.csv"
    fleet = load_seed_fleet(fleet_path)
    files.append(fleet_path)
    inputs: dict[str, Any] = {}

    # Households: a real panel when there is one, else the panel built from real profiles.
    panel_path = _first(
        data_dir / "households" / "panel.csv", data_dir / "households" / "panel.csv.gz"
    )
    if panel_path is not None:
        panel = load_household_panel(panel_path)
        files.append(panel_path)
        loads = panel.group_loads(prices_on_slots(history, panel.times_s))
        inputs["households"] = {
            "kind": "real panel",
            "file": panel_path.name,
            "households": len(panel.household_ids),
        }
        beta_truth = None
    else:
        sources = load_household_sources(data_dir)
        files.extend(p for p in sources.files if p != price_path)
        built = build_panel(sources, options.panel)
        loads = dict(built.loads)
        inputs["households"] = {
            "kind": "built panel",
            "spec": {k: getattr(options.panel, k) for k in options.panel.__dataclass_fields__},
            "summary": describe(built),
            "floored_share": built.floored_share,
        }
        beta_truth = built.beta_kw_per_eur_per_kwh
    groups = [g for g in GROUPS if g in loads]
    first = loads[groups[0]]
    held = holdout_weeks(first.times_s, options.holdout_every, options.holdout_offset)
    fitted = []
    metrics: dict[str, Any] = {"households": {}}
    for g in groups:
        t0 = time.perf_counter()
        model = fit_household_model(loads[g], options.tz, ~held)
        gam, naive = evaluate_holdout(model, loads[g], held)
        metrics["households"][g] = {
            "fit": model.report.to_dict(),
            "fit_seconds": time.perf_counter() - t0,
            "beta_kw_per_eur_per_kwh": model.beta_kw_per_eur_per_kwh,
            "beta_true_kw_per_eur_per_kwh": beta_truth if g == "market" else None,
            "held_out": {"gam": gam.to_dict(), "seasonal_naive": naive.to_dict()},
        }
        fitted.append(model)
        log.info(
            "fitted %s households: pinball %.4f (naive %.4f)", g, gam.pinball_kw, naive.pinball_kw
        )
    ordered = tuple(fitted)
    corr = correlate_groups(ordered, tuple(loads[g] for g in groups), ~held)
    base = BaseLoadModel(groups=ordered, common_correlation=corr)
    metrics["households"]["common_correlation"] = corr.tolist()

    # Trips: real logs when there are, else the ten cars built from SimBench and ElaadNL.
    logs_path = _first(data_dir / "chargers" / "logs.csv", data_dir / "chargers" / "logs.csv.gz")
    if logs_path is not None:
        logs = load_charger_logs(logs_path, fleet, strict=False)
        files.append(logs_path)
        inputs["charger_logs"] = {"kind": "real logs", "file": logs_path.name, "cars": len(logs)}
    else:
        profile_path = data_dir / "chargers" / "simbench_chargers_2016.csv.gz"
        stay_path = data_dir / "elaad" / "distribution-of-connection-time.csv"
        logs = build_charger_logs(
            load_profile_table(profile_path), load_connection_times(stay_path), fleet
        )
        files.extend([profile_path, stay_path])
        inputs["charger_logs"] = {"kind": "built from SimBench HLS and ElaadNL", "cars": len(logs)}
    t0 = time.perf_counter()
    sessions = [sessions_from_log(car) for car in logs]
    days = [
        daily_energy(s, car.model, car.consumption_kwh_per_km, options.tz)
        for s, car in zip(sessions, logs, strict=True)
    ]
    trips = fit_trip_model(days, sessions, options.tz, options.min_days)
    metrics["trips"] = {
        "fit_seconds": time.perf_counter() - t0,
        "cars": len(logs),
        "sessions": sum(len(s.sessions) for s in sessions),
        "known_days": int(sum(d.known.sum() for d in days)),
        "driving_days": int(sum(d.driving.sum() for d in days)),
        "zero_days": int(sum(d.zero.sum() for d in days)),
        "cells_with_own_law": sum(1 for (m, _), law in trips.laws.items() if law.source == "model"),
        "pooled": trips.pooled.to_dict(),
    }
    prices = DayAheadPriceSource(history=history, tz=options.price_tz)
    metrics["prices"] = price_forecast_scores(history, options.price_tz)
    metrics["fit_seconds_total"] = time.perf_counter() - started
    models = ForecastModels(
        base_load=base, trips=trips, prices=prices, households=dict(options.households)
    )
    return FitOutcome(
        models=models,
        data_files=tuple(dict.fromkeys(files)),
        inputs=inputs,
        metrics=metrics,
        group_loads={g: loads[g] for g in groups},
        held_out=held,
    )
