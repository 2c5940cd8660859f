"""Reading CSV data files strictly: every refusal names the file, the line and the column.

Line numbers are those an editor shows: the header is line 1, the first record line 2. Files may
be gzip-compressed (`.gz`). Times must carry their UTC offset (`2016-01-01T00:00:00Z`,
`...+01:00`); a file written in local clock time is accepted only when the caller names its zone,
and then a time that does not exist or happens twice on a daylight-saving day is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from adapters.datasets.errors import DataFileError
from controller.forecast.calendar import HOUR_S, SLOT_S

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

_OFFSET = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$")
STEPS_S = (SLOT_S, HOUR_S)


def line_of(row: int) -> int:
    """The file line of the record at 0-based position `row`."""
    return row + 2


def read_table(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """The file's records as strings, refusing a missing file or missing columns."""
    if not path.is_file():
        raise DataFileError(path, "no such file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise DataFileError(path, f"not a readable CSV file: {exc}") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataFileError(
            path,
            f"missing column(s) {', '.join(missing)}; the header has {', '.join(frame.columns)}",
            line=1,
        )
    if frame.empty:
        raise DataFileError(path, "has a header but no records", line=2)
    return frame


def _dst_problem(naive: datetime, zone: ZoneInfo) -> str | None:
    """'ambiguous' or 'nonexistent' when `naive` is not one instant in `zone`, else None."""
    first = naive.replace(tzinfo=zone, fold=0)
    second = naive.replace(tzinfo=zone, fold=1)
    if first.utcoffset() == second.utcoffset():
        return None
    # Round-tripping a time that does not exist lands on another wall-clock time.
    back = first.astimezone(ZoneInfo("UTC")).astimezone(zone).replace(tzinfo=None)
    return "nonexistent" if back != naive else "ambiguous"


def parse_times(
    path: Path, frame: pd.DataFrame, column: str, local_tz: str | None = None
) -> IntArray:
    """(rows,) epoch seconds of a timestamp column.

    Raises:
        DataFileError: for an empty or unparsable time, a time without offset (unless
            `local_tz` is given), or a local time that a daylight-saving change makes
            nonexistent or ambiguous.
    """
    text = frame[column].astype(str).str.strip()
    has_offset = text.str.contains(_OFFSET)
    empty = text == ""
    if bool(empty.any()):
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataFileError(path, "empty time", line=line_of(row), column=column)
    result = np.zeros(len(text), dtype=np.int64)
    aware = has_offset.to_numpy()
    if aware.any():
        parsed = pd.to_datetime(text[aware], format="ISO8601", utc=True, errors="coerce")
        bad = np.flatnonzero(parsed.isna().to_numpy())
        if bad.size:
            row = int(np.flatnonzero(aware)[bad[0]])
            raise DataFileError(
                path,
                f"{text.iloc[row]!r} is not an ISO 8601 time",
                line=line_of(row),
                column=column,
            )
        result[aware] = (pd.DatetimeIndex(parsed) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(
            seconds=1
        )
    if (~aware).any():
        rows = np.flatnonzero(~aware)
        if local_tz is None:
            row = int(rows[0])
            raise DataFileError(
                path,
                f"{text.iloc[row]!r} has no UTC offset; write times like 2016-01-01T00:00:00Z "
                "or 2016-01-01T01:00:00+01:00 (or name the file's local time zone)",
                line=line_of(row),
                column=column,
            )
        zone = ZoneInfo(local_tz)
        naive = pd.to_datetime(text.iloc[rows], format="ISO8601", errors="coerce")
        bad = np.flatnonzero(naive.isna().to_numpy())
        if bad.size:
            row = int(rows[bad[0]])
            raise DataFileError(
                path,
                f"{text.iloc[row]!r} is not an ISO 8601 time",
                line=line_of(row),
                column=column,
            )
        local = pd.DatetimeIndex(naive).tz_localize(local_tz, ambiguous="NaT", nonexistent="NaT")
        bad = np.flatnonzero(local.isna())
        if bad.size:
            row = int(rows[bad[0]])
            when = pd.Timestamp(naive.iloc[bad[0]]).to_pydatetime()
            kind = _dst_problem(when, zone)
            what = (
                "does not exist (clocks go forward that night)"
                if kind == "nonexistent"
                else "happens twice (clocks go back that night)"
            )
            raise DataFileError(
                path,
                f"{text.iloc[row]!r} {what} in {local_tz}: a daylight-saving day; "
                "write this file's times with their UTC offset",
                line=line_of(row),
                column=column,
            )
        result[rows] = (local.tz_convert("UTC") - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(
            seconds=1
        )
    return result


def parse_numbers(
    path: Path,
    frame: pd.DataFrame,
    column: str,
    *,
    low: float | None = None,
    what: str = "value",
    unit: str = "",
) -> FloatArray:
    """(rows,) floats of a numeric column; refuses empty, non-numeric and out-of-range cells."""
    text = frame[column].astype(str).str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        cell = text.iloc[row]
        reason = (
            "is empty: a missing value (voltpool does not fill gaps silently)"
            if cell == "" or cell.lower() in ("nan", "na", "null", "none")
            else f"{cell!r} is not a number"
        )
        raise DataFileError(path, f"{what} {reason}", line=line_of(row), column=column)
    if low is not None:
        below = np.flatnonzero(values < low)
        if below.size:
            row = int(below[0])
            raise DataFileError(
                path,
                f"{what} {values[row]:g}{unit} is below {low:g}{unit}"
                + (" (negative energy)" if low == 0 and "energy" in what else ""),
                line=line_of(row),
                column=column,
            )
    return np.asarray(values, dtype=float)


def _iso(seconds: int) -> str:
    return (datetime(1970, 1, 1) + timedelta(seconds=int(seconds))).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_series(
    path: Path,
    times_s: IntArray,
    rows: IntArray,
    column: str,
    *,
    step_s: int | None = None,
    label: str = "",
    allow_gaps: bool = False,
) -> int:
    """Check one series (its records at file positions `rows`, in file order) and return its step.

    The step is `step_s` or, when None, the most common spacing, which must be 15 or 60 min.
    `allow_gaps` accepts missing intervals (the caller handles them explicitly).

    Raises:
        DataFileError: naming the first record out of order, repeated or after a gap.
    """
    who = f"{label}: " if label else ""
    t = times_s[rows]
    if t.shape[0] < 2:
        raise DataFileError(path, f"{who}only one record", line=line_of(int(rows[0])))
    diff = np.diff(t)
    if step_s is None:
        positive = diff[diff > 0]
        if positive.size == 0:
            raise DataFileError(path, f"{who}all records have the same time", line=line_of(rows[1]))
        values, counts = np.unique(positive, return_counts=True)
        step_s = int(values[np.argmax(counts)])
        if step_s not in STEPS_S:
            raise DataFileError(
                path,
                f"{who}records are {step_s} s apart; voltpool reads 15-minute or hourly data",
                line=line_of(int(rows[1])),
                column=column,
            )
    repeat = np.flatnonzero(diff == 0)
    if repeat.size:
        k = int(repeat[0])
        raise DataFileError(
            path,
            f"{who}duplicate time {_iso(int(t[k + 1]))}, already on line {line_of(int(rows[k]))}",
            line=line_of(int(rows[k + 1])),
            column=column,
        )
    back = np.flatnonzero(diff < 0)
    if back.size:
        k = int(back[0])
        raise DataFileError(
            path,
            f"{who}time {_iso(int(t[k + 1]))} goes back from {_iso(int(t[k]))} "
            f"on line {line_of(int(rows[k]))} (records must be in time order)",
            line=line_of(int(rows[k + 1])),
            column=column,
        )
    off_grid = np.flatnonzero((t - t[0]) % step_s != 0)
    if off_grid.size:
        k = int(off_grid[0])
        raise DataFileError(
            path,
            f"{who}time {_iso(int(t[k]))} is off the {step_s // 60}-minute grid",
            line=line_of(int(rows[k])),
            column=column,
        )
    gap = np.flatnonzero(diff > step_s)
    if gap.size and not allow_gaps:
        k = int(gap[0])
        missing = int(diff[k] // step_s) - 1
        raise DataFileError(
            path,
            f"{who}{missing} interval(s) missing between {_iso(int(t[k]))} (line "
            f"{line_of(int(rows[k]))}) and {_iso(int(t[k + 1]))}; the file is every "
            f"{step_s // 60} min and voltpool does not fill gaps",
            line=line_of(int(rows[k + 1])),
            column=column,
        )
    return int(step_s)
