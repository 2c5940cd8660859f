"""Household smart-meter panels: the long CSV format voltpool reads and writes.

Columns:

- `timestamp`: interval start, ISO 8601 with UTC offset (`2016-01-04T07:15:00Z`);
- `household_id`: any text without commas;
- `tariff`: `fixed` or `market`, the same on every record of a household;
- `energy_kwh` (energy used in the interval) or `power_kw` (its mean power); one of the two.

Every household has one record per interval (15 minutes or one hour, the same for all) over the
same period; records of different households may interleave. A gap, a repeated time, an empty or
negative value, a time without offset or a changed tariff is refused with its line and column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from adapters.datasets._csv import check_series, line_of, parse_numbers, parse_times, read_table
from adapters.datasets.errors import DataFileError
from controller.forecast.household import GROUPS, HouseholdPanel, TariffGroup

TIME, HOUSEHOLD, TARIFF = "timestamp", "household_id", "tariff"


def load_household_panel(path: Path, *, local_tz: str | None = None) -> HouseholdPanel:
    """The panel in `path` (see the module's format).

    Raises:
        DataFileError: naming the line and column of the first problem.
    """
    frame = read_table(path, [TIME, HOUSEHOLD, TARIFF])
    if "energy_kwh" in frame.columns:
        column, what = "energy_kwh", "energy"
    elif "power_kw" in frame.columns:
        column, what = "power_kw", "power"
    else:
        raise DataFileError(path, "needs an 'energy_kwh' or a 'power_kw' column", line=1)
    times = parse_times(path, frame, TIME, local_tz)
    values = parse_numbers(path, frame, column, low=0.0, what=what)
    ids = frame[HOUSEHOLD].astype(str).str.strip().to_numpy()
    tariffs = frame[TARIFF].astype(str).str.strip().str.lower().to_numpy()
    empty = np.flatnonzero(ids == "")
    if empty.size:
        raise DataFileError(
            path, "empty household id", line=line_of(int(empty[0])), column=HOUSEHOLD
        )
    bad = np.flatnonzero(~np.isin(tariffs, GROUPS))
    if bad.size:
        row = int(bad[0])
        raise DataFileError(
            path,
            f"tariff {frame[TARIFF].iloc[row]!r} is neither 'fixed' nor 'market'",
            line=line_of(row),
            column=TARIFF,
        )
    codes, order = pd.factorize(ids)
    by_household = np.argsort(codes, kind="stable")
    rows_of = np.split(by_household, np.cumsum(np.bincount(codes))[:-1])
    step: int | None = None
    span: tuple[int, int, int] | None = None
    household_tariffs: list[TariffGroup] = []
    for name, rows in zip(order, rows_of, strict=True):
        step = check_series(path, times, rows, TIME, step_s=step, label=f"household {name!r}")
        changed = np.flatnonzero(tariffs[rows] != tariffs[rows[0]])
        if changed.size:
            row = int(rows[changed[0]])
            raise DataFileError(
                path,
                f"household {name!r} changes tariff from {tariffs[rows[0]]!r} (line "
                f"{line_of(int(rows[0]))}) to {tariffs[row]!r}",
                line=line_of(row),
                column=TARIFF,
            )
        this = (int(times[rows[0]]), int(times[rows[-1]]), int(rows.size))
        if span is None:
            span = this
        elif this != span:
            raise DataFileError(
                path,
                f"household {name!r} covers a different period than the first household "
                "(every household needs the same intervals)",
                line=line_of(int(rows[0])),
                column=TIME,
            )
        household_tariffs.append("fixed" if tariffs[rows[0]] == "fixed" else "market")
    assert step is not None
    assert span is not None
    grid = span[0] + step * np.arange(span[2], dtype=np.int64)
    load = np.empty((len(order), span[2]))
    scale = 3600.0 / step if column == "energy_kwh" else 1.0
    for k, rows in enumerate(rows_of):
        load[k] = values[rows] * scale
    return HouseholdPanel(
        household_ids=tuple(str(x) for x in order),
        tariffs=tuple(household_tariffs),
        times_s=grid,
        step_s=step,
        load_kw=load,
    )


def write_household_panel(path: Path, panel: HouseholdPanel, *, decimals: int = 4) -> None:
    """Write `panel` in the long format (`energy_kwh` per interval), sorted by time then id."""
    h, n = panel.load_kw.shape
    stamps = pd.to_datetime(panel.times_s, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ")
    frame = pd.DataFrame(
        {
            TIME: np.repeat(np.asarray(stamps), h),
            HOUSEHOLD: np.tile(np.array(panel.household_ids), n),
            TARIFF: np.tile(np.array(panel.tariffs), n),
            "energy_kwh": np.round(panel.load_kw.T.reshape(-1) * panel.step_s / 3600.0, decimals),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
