"""Loaders for wide time-series tables and day-ahead prices.

Wide table (SimBench extracts, the UCI home): a `timestamp` column (ISO 8601 with UTC offset),
then one numeric column per series, every 15 minutes or every hour, no gaps, no repeats, no
empty cells, no negative values.

Day-ahead prices: `timestamp` plus `price_eur_per_mwh` or `price_eur_per_kwh`, hourly or every
15 minutes, no gaps (negative prices are real and accepted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters.datasets._csv import (
    FloatArray,
    IntArray,
    check_series,
    parse_numbers,
    parse_times,
    read_table,
)
from adapters.datasets.errors import DataFileError
from controller.forecast.prices import PriceHistory

TIME = "timestamp"


@dataclass(frozen=True, slots=True)
class ProfileTable:
    """Regular series side by side: `values[k]` is the series called `names[k]`."""

    times_s: IntArray  # (T,) interval starts, epoch seconds
    step_s: int
    names: tuple[str, ...]
    values: FloatArray  # (K, T)

    def column(self, name: str) -> FloatArray:
        """The series called `name`."""
        try:
            return np.asarray(self.values[self.names.index(name)], dtype=float)
        except ValueError:
            raise KeyError(f"no series {name!r}; the table has {', '.join(self.names)}") from None


def load_profile_table(
    path: Path,
    columns: Sequence[str] | None = None,
    *,
    local_tz: str | None = None,
    allow_negative: bool = False,
) -> ProfileTable:
    """A wide table of regular series (all columns but `timestamp`, or just `columns`).

    Raises:
        DataFileError: naming line and column of the first bad cell, gap, repeat or
            daylight-saving problem.
    """
    frame = read_table(path, [TIME, *(columns or [])])
    names = tuple(columns) if columns else tuple(c for c in frame.columns if c != TIME)
    if not names:
        raise DataFileError(path, "no value columns beside 'timestamp'", line=1)
    times = parse_times(path, frame, TIME, local_tz)
    rows = np.arange(times.shape[0], dtype=np.int64)
    step = check_series(path, times, rows, TIME)
    low = None if allow_negative else 0.0
    values = np.vstack([parse_numbers(path, frame, name, low=low, what=name) for name in names])
    return ProfileTable(times_s=times, step_s=step, names=names, values=values)


def load_day_ahead_prices(path: Path, *, local_tz: str | None = None) -> PriceHistory:
    """Day-ahead prices as a `PriceHistory` in EUR/kWh.

    Raises:
        DataFileError: for a missing price column, a bad cell, a gap or a repeated hour.
    """
    frame = read_table(path, [TIME])
    if "price_eur_per_mwh" in frame.columns:
        column, scale = "price_eur_per_mwh", 1e-3
    elif "price_eur_per_kwh" in frame.columns:
        column, scale = "price_eur_per_kwh", 1.0
    else:
        raise DataFileError(
            path, "needs a 'price_eur_per_mwh' or 'price_eur_per_kwh' column", line=1
        )
    times = parse_times(path, frame, TIME, local_tz)
    rows = np.arange(times.shape[0], dtype=np.int64)
    step = check_series(path, times, rows, TIME)
    if times[0] % step != 0:
        raise DataFileError(path, "first time is not on the hour/quarter-hour", line=2, column=TIME)
    values = parse_numbers(path, frame, column, what="price") * scale
    return PriceHistory(start_s=int(times[0]), step_s=step, price_eur_per_kwh=values)
