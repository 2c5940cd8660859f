"""`voltpool fit` and `voltpool forecast`: fit the forecasting models, and use them for a day.

Plain typer-annotated functions; `adapters.cli` mounts them as commands.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from adapters.datasets.fitting import FitOptions, fit_all
from adapters.datasets.fleet import load_seed_fleet
from adapters.datasets.model_files import data_hash, load_models, save_models
from adapters.datasets.panel import PanelSpec
from adapters.datasets.plots import plot_fitted_week, plot_headroom, plot_needs, plot_prices
from controller.forecast.fleet import synthetic_fleet
from controller.forecast.models import (
    headroom_outlook,
    next_day_needs,
    price_series,
)

console = Console()
LEVELS = (0.5, 0.9, 0.95, 0.99)


def fit(
    data_dir: Annotated[
        Path, typer.Option(help="Data directory: prices/, households/, chargers/, fleet/.")
    ] = Path("data"),
    out_dir: Annotated[
        Path, typer.Option(help="Where versioned model directories and LATEST are written.")
    ] = Path("var/models"),
    panel_households: Annotated[
        int, typer.Option(help="Households in the built panel (when there is no real panel).")
    ] = 5000,
) -> None:
    """Fit the household GAMs, trip Gamma laws and price source; write versioned model files."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    outcome = fit_all(data_dir, FitOptions(panel=PanelSpec(households=panel_households)))
    digest, hashes = data_hash(outcome.data_files, data_dir)
    target = save_models(
        outcome.models,
        out_dir,
        data_sha256=digest,
        data_files=hashes,
        inputs=outcome.inputs,
        metrics=outcome.metrics,
    )
    for group, load in outcome.group_loads.items():
        plot_fitted_week(
            outcome.models.base_load.group(group),
            load,
            outcome.held_out,
            target / f"fitted_week_{group}.png",
            week=2,
        )
    table = Table(title=f"Held-out weeks ({target.name})")
    for column in ("group", "forecaster", "pinball (kW/household)", "MAE", "90 % coverage"):
        table.add_column(column)
    for group, entry in outcome.metrics["households"].items():
        if group not in outcome.group_loads:
            continue
        for name, score in entry["held_out"].items():
            table.add_row(
                group,
                name,
                f"{score['pinball_kw']:.4f}",
                f"{score['mae_kw']:.4f}",
                f"{100 * score['coverage_90']:.1f} %",
            )
    console.print(table)
    market = outcome.metrics["households"].get("market", {})
    if market.get("beta_kw_per_eur_per_kwh") is not None:
        console.print(
            f"market beta: {market['beta_kw_per_eur_per_kwh']:.3f} kW per EUR/kWh "
            f"(se {market['fit']['beta_se']:.3f}; built with "
            f"{market['beta_true_kw_per_eur_per_kwh']})"
        )
    trips = outcome.metrics["trips"]
    console.print(
        f"trips: {trips['cars']} cars, {trips['sessions']} sessions, {trips['driving_days']} "
        f"driving and {trips['zero_days']} zero days, {trips['cells_with_own_law']} "
        "model-weekday cells with their own law"
    )
    console.print(f"models written to {target} (data sha256 {digest[:12]}...)")


def forecast(
    date: Annotated[str, typer.Option("--date", help="Day to forecast, YYYY-MM-DD (local).")],
    model_dir: Annotated[
        Path, typer.Option(help="A model version directory, or the fit's out_dir (LATEST).")
    ] = Path("var/models"),
    out_dir: Annotated[Path, typer.Option(help="Where the PNG plots go.")] = Path("var/forecast"),
    capacity_kw: Annotated[
        float, typer.Option(help="Site connection capacity C (kW); h_t = C - base load.")
    ] = 1000.0,
    hours: Annotated[int, typer.Option(help="Horizon length from local midnight (hours).")] = 48,
    fleet_file: Annotated[Path, typer.Option(help="The seed's fleet table.")] = Path(
        "data/fleet/seed_fleet.csv"
    ),
) -> None:
    """Print h_t quantiles, prices and next-day needs for DATE and write plots (PNG)."""
    models = load_models(model_dir)
    tz = models.base_load.tz
    day = _parse_date(date)
    start = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz))
    slots = hours * 4
    now = start  # as known at local midnight: today's prices are published, tomorrow's not
    prices = price_series(models, now, start, slots) if models.prices is not None else None
    outlook = headroom_outlook(
        models,
        start,
        slots,
        capacity_kw,
        now=now,
        price_eur_per_kwh=None if prices is None else prices.price_eur_per_kwh,
    )
    vehicles = synthetic_fleet(load_seed_fleet(fleet_file))
    needs = next_day_needs(models, vehicles, day)

    table = Table(
        title=f"Head-room h_t (kW) assured with each probability, {capacity_kw:g} kW site "
        f"({models.version})"
    )
    table.add_column("local")
    table.add_column("base kW")
    for level in LEVELS:
        table.add_column(f"h {100 * level:g}%")
    table.add_column("EUR/kWh")
    table.add_column("price is")
    assured = {level: outlook.assured_kw(level) for level in LEVELS}
    for h in range(0, slots, 4):
        when = (start + timedelta(minutes=15 * h)).astimezone(ZoneInfo(tz))
        price = "" if prices is None else f"{prices.price_eur_per_kwh[h]:.4f}"
        kind = "" if prices is None else "published"
        if prices is not None and prices.forecast_from is not None and h >= prices.forecast_from:
            kind = "forecast"
        table.add_row(
            f"{when:%a %H:%M}",
            f"{outlook.base.mean_kw[h]:.0f}",
            *(f"{assured[level][h]:.0f}" for level in LEVELS),
            price,
            kind,
        )
    console.print(table)
    needs_table = Table(title=f"Next-day needs for {day:%a %Y-%m-%d} (kWh per car, driving day)")
    for column in ("model", "cars", "mean k*theta", "90 %", "95 %", "P(no driving)"):
        needs_table.add_column(column)
    for model in dict.fromkeys(v.model for v in vehicles):
        rows = [i for i, v in enumerate(vehicles) if v.model == model]
        needs_table.add_row(
            model,
            str(len(rows)),
            f"{needs.mean_kwh[rows].mean():.1f}",
            f"{needs.quantile_kwh[rows, 1].mean():.1f}",
            f"{needs.quantile_kwh[rows, 2].mean():.1f}",
            f"{needs.p_zero[rows].mean():.2f}",
        )
    console.print(needs_table)
    console.print(
        f"fleet: {needs.mean_kwh.sum():.0f} kWh expected on a driving day "
        f"({np.sum(needs.mean_kwh * (1 - needs.p_zero)):.0f} kWh counting days without driving)"
    )
    rng = np.random.default_rng(int(day.strftime("%Y%m%d")))
    out = out_dir / f"{day:%Y-%m-%d}"
    plot_headroom(outlook, tz, out / "headroom.png", rng)
    if prices is not None:
        plot_prices(prices, tz, out / "prices.png")
    plot_needs(needs, vehicles, out / "needs.png")
    console.print(f"plots written to {out}")


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not a date like 2024-03-05") from exc
