"""Reports of the demo day and the year study: Markdown tables and PNG plots (matplotlib, Agg).

Every table says its cost basis and whether its figures were *metered* (what the simulated
chargers measured through the protocols) or *computed* (a planner's schedule on the day's
`PlanningProblem`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

LOCAL = ZoneInfo("Europe/Amsterdam")


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats rounded, nan as a dash, everything else as text."""
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.{digits}f}"
    return str(value)


def pct(value: float) -> str:
    """A fraction as a percentage cell."""
    return "–" if not math.isfinite(value) else f"{100 * value:.1f} %"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += [
        "| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows
    ]
    return "\n".join(lines)


def plot_day(
    path: Path,
    times: Sequence[datetime],
    series_kw: Mapping[str, Sequence[float]],
    headroom_kw: Sequence[float],
    headroom_forecast_kw: Sequence[float],
    price_eur_per_kwh: Sequence[float],
    title: str,
) -> None:
    """Aggregate charging power of each strategy against head-room, with the price on a 2nd axis."""
    local: Any = [t.astimezone(LOCAL) for t in times]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    ax.fill_between(local, 0, headroom_kw, step="post", color="0.9", label="real head-room (kW)")
    ax.step(
        local,
        headroom_forecast_kw,
        where="post",
        color="0.5",
        ls="--",
        lw=1,
        label="head-room told to the planner (kW)",
    )
    for name, values in series_kw.items():
        dashed = "plan" in name
        ax.step(
            local,
            values,
            where="post",
            lw=2.2 if dashed else 1.4,
            ls=":" if dashed else "-",
            label=f"{name} (kW)",
        )
    ax.set_xlabel("local time (Europe/Amsterdam)")
    ax.set_ylabel("site charging power (kW)")
    ax2 = ax.twinx()
    ax2.step(
        local,
        np.asarray(price_eur_per_kwh) * 1000,
        where="post",
        color="tab:red",
        lw=1,
        alpha=0.7,
        label="day-ahead price (EUR/MWh)",
    )
    ax2.set_ylabel("day-ahead price (EUR/MWh)", color="tab:red")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_soc(
    path: Path, times: Sequence[datetime], soc: Mapping[str, Sequence[float | None]], title: str
) -> None:
    """State of charge of a few cars over the day (gaps while unplugged)."""
    local: Any = [t.astimezone(LOCAL) for t in times]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for name, values in soc.items():
        ys = [np.nan if v is None else 100 * v for v in values]
        ax.plot(local, ys, lw=1.4, label=name)
    ax.set_xlabel("local time (Europe/Amsterdam)")
    ax.set_ylabel("state of charge (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    ax.set_title(title)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_savings(
    path: Path,
    spread: Sequence[float],
    saving: Mapping[str, Sequence[float]],
    title: str,
) -> None:
    """Daily saving vs unmanaged against the day's price spread, one marker set per series."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, values in saving.items():
        ax.scatter(np.asarray(spread) * 1000, 100 * np.asarray(values), s=10, label=name)
    ax.axhspan(20, 30, color="tab:green", alpha=0.12, label="seed's claim: 20-30 %")
    # Days whose unmanaged cost is near zero (negative prices) give huge percentages: clip.
    ax.set_ylim(-100, 200)
    ax.set_xlabel("price spread within the window (max - min, EUR/MWh)")
    ax.set_ylabel("saving vs unmanaged (%)")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_year(
    path: Path,
    days: Sequence[Any],
    cost: Mapping[str, Sequence[float]],
    title: str,
    *,
    smooth_days: int = 1,
) -> None:
    """Daily cost per strategy over the sampled days (a centred `smooth_days` mean when > 1).

    Each series gets its own line style and a width that shrinks down the list, so series that
    coincide (e.g. the rule-based baselines when the head-room never binds) stay visible.
    """
    fig, ax = plt.subplots(figsize=(11, 4.8))
    styles = ["-", "--", ":", "-", "-.", "-"]
    x = np.asarray(list(days))
    for k, (name, values) in enumerate(cost.items()):
        y = np.asarray(values, dtype=float)
        if smooth_days > 1 and y.size >= smooth_days:
            kernel = np.ones(smooth_days) / smooth_days
            pad = smooth_days // 2
            padded = np.pad(y, (pad, smooth_days - 1 - pad), mode="edge")
            y = np.convolve(padded, kernel, mode="valid")
        ax.plot(
            x,
            y,
            lw=max(1.0, 3.2 - 0.5 * k),
            ls=styles[k % len(styles)],
            marker="." if smooth_days <= 1 else None,
            ms=3,
            label=name,
        )
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("date")
    note = f", {smooth_days}-day centred mean" if smooth_days > 1 else ""
    ax.set_ylabel(f"charging cost (EUR/day{note})")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
