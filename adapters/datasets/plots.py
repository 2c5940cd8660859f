"""PNG plots of forecasts: head-room with its quantiles, prices, next-day needs, a fitted week.

Every plot has labelled axes with units, a legend and local times on the x-axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy.stats import norm

from controller.domain import Vehicle
from controller.forecast.calendar import DAY_S, BoolArray, IntArray, calendar
from controller.forecast.headroom import HeadroomForecast
from controller.forecast.household import GroupLoad, HouseholdModel
from controller.forecast.prices import PriceOutlook
from controller.forecast.trips import NextDayNeeds


def _local(times_s: IntArray, tz: str) -> pd.DatetimeIndex:
    index = pd.DatetimeIndex(pd.to_datetime(times_s, unit="s", utc=True))
    return index.tz_convert(tz).tz_localize(None)


def _finish(fig: Figure, ax: Axes, path: Path) -> None:
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%a %d %b\n%H:%M"))  # type: ignore[no-untyped-call]
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_headroom(
    forecast: HeadroomForecast,
    tz: str,
    path: Path,
    rng: np.random.Generator,
    levels: Sequence[float] = (0.5, 0.9, 0.95, 0.99),
    paths: int = 12,
) -> None:
    """h_t: capacity, mean, the head-room assured at each level, and Monte-Carlo paths."""
    x = _local(forecast.base.times_s, tz)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    samples = forecast.sample_paths(rng, paths)
    for k in range(paths):
        ax.plot(x, samples[k], color="0.75", lw=0.6, label="sample paths" if k == 0 else None)
    ax.axhline(forecast.capacity_kw, color="black", ls=":", lw=1, label="site capacity")
    ax.plot(x, forecast.mean_kw, color="C0", lw=1.8, label="mean head-room")
    for j, level in enumerate(levels):
        if level == 0.5:
            continue
        ax.plot(
            x,
            forecast.assured_kw(level),
            color=f"C{j + 1}",
            lw=1.2,
            label=f"assured with {100 * level:g} % probability",
        )
    ax.set_ylabel("head-room h_t (kW)")
    ax.set_xlabel(f"local time ({tz})")
    ax.set_title("Head-room for EV charging = site capacity - household base load")
    _finish(fig, ax, path)


def plot_prices(outlook: PriceOutlook, tz: str, path: Path) -> None:
    """Prices per slot: published day-ahead prices solid, forecast ones dashed."""
    n = outlook.price_eur_per_kwh.shape[0]
    times = int(outlook.start.timestamp()) + 900 * np.arange(n, dtype=np.int64)
    x = _local(times, tz)
    cut = n if outlook.forecast_from is None else outlook.forecast_from
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.step(
        x[:cut],
        outlook.price_eur_per_kwh[:cut],
        where="post",
        color="C0",
        label="day-ahead price (published)",
    )
    if cut < n:
        ax.step(
            x[cut - 1 if cut else 0 :],
            outlook.price_eur_per_kwh[cut - 1 if cut else 0 :],
            where="post",
            color="C1",
            ls="--",
            label="forecast (same hour, recent weeks)",
        )
    ax.set_ylabel("price (EUR/kWh)")
    ax.set_xlabel(f"local time ({tz})")
    ax.set_title("Energy price over the horizon")
    _finish(fig, ax, path)


def plot_needs(needs: NextDayNeeds, vehicles: Sequence[Vehicle], path: Path) -> None:
    """Mean driving energy of a driving day per model, with the Gamma laws' upper quantiles."""
    models = list(dict.fromkeys(v.model for v in vehicles))
    index = {vid: i for i, vid in enumerate(needs.vehicle_ids)}
    by_model = {m: [index[v.vehicle_id] for v in vehicles if v.model == m] for m in models}
    mean = np.array([needs.mean_kwh[rows].mean() for rows in by_model.values()])
    fig, ax = plt.subplots(figsize=(10, 4))
    y = np.arange(len(models))
    ax.barh(y, mean, color="C0", label="k * theta (mean of a driving day)")
    for j, level in enumerate(needs.levels):
        if level <= 0.5:
            continue
        q = np.array([needs.quantile_kwh[rows, j].mean() for rows in by_model.values()])
        ax.plot(q, y, "|", ms=14, mew=2, color=f"C{j + 1}", label=f"{100 * level:g} % quantile")
    ax.set_yticks(y, [f"{m} ({len(r)} cars)" for m, r in by_model.items()], fontsize=8)
    ax.set_xlabel("driving energy per car (kWh)")
    ax.set_title(f"Energy each car is expected to drive on {needs.day:%a %d %b %Y}")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fitted_week(
    model: HouseholdModel, load: GroupLoad, held_out: BoolArray, path: Path, week: int = 0
) -> None:
    """One held-out week of a group: measured mean load, the GAM with its 90 % interval, naive."""
    lag = 7 * DAY_S // load.step_s
    starts = np.flatnonzero(held_out[1:] & ~held_out[:-1]) + 1
    first = int(starts[min(week, starts.shape[0] - 1)])
    sl = slice(first, first + lag)
    times = load.times_s[sl]
    hour = np.floor(calendar(times, model.tz).hour).astype(np.int64)
    price = None if load.price_eur_per_kwh is None else load.price_eur_per_kwh[sl]
    mu = model.mean_kw(times, price)
    sd = np.sqrt(model.sigma_common_kw[hour] ** 2 + model.sigma_ind_kw[hour] ** 2 / load.households)
    z = float(norm.ppf(0.95))
    x = _local(times, model.tz)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.fill_between(x, mu - z * sd, mu + z * sd, color="C0", alpha=0.25, label="GAM 90 % interval")
    ax.plot(
        x,
        load.mean_kw[first - lag : first],
        color="C2",
        lw=0.8,
        ls="--",
        label="seasonal naive (same slot last week)",
    )
    ax.plot(x, load.mean_kw[sl], color="black", lw=0.9, label="measured (held out)")
    ax.plot(x, mu, color="C0", lw=1.6, label="GAM mean mu_g(t)")
    ax.set_ylabel("mean load per household (kW)")
    ax.set_xlabel(f"local time ({model.tz})")
    ax.set_title(f"Held-out week, {model.group} tariff group ({load.households} households)")
    _finish(fig, ax, path)
