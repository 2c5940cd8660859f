"""Charger logs: the CSV format voltpool reads, and the logs it builds when there are none.

Format (long, one record per car and interval):

- `timestamp`: interval start, ISO 8601 with UTC offset;
- `car_id`, `model` (the model must be the same on every record of a car);
- `energy_kwh` (energy charged in the interval) or `power_kw` (its mean power);
- `plugged_in` (optional): 1 while the car is connected, 0 otherwise;
- `consumption_kwh_per_km` (optional): the car's consumption; without it the model's row of
  the fleet table gives it.

Strict reading (the default) refuses gaps and repeated times like every other loader. With
`strict=False` the logs go to segmentation as they are: a repeated sample that agrees with the
first is dropped, one that disagrees is still refused, and gaps are left for the segmentation
to bridge or mark unknown (never filled with made-up values).

**Built logs.** No package ships per-car 15-minute logs, so `build_charger_logs` makes ten
"measured" cars from SimBench's six home-charger profiles (HLS) and ElaadNL's private
connection times; docs/data.md describes every step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from adapters.datasets._csv import (
    FloatArray,
    check_series,
    line_of,
    parse_numbers,
    parse_times,
    read_table,
)
from adapters.datasets.errors import DataFileError
from adapters.datasets.tables import ProfileTable
from controller.errors import InvalidEvent
from controller.forecast.calendar import SLOT_S, calendar
from controller.forecast.fleet import FleetCar, FleetRow
from controller.forecast.trips import CarLog, TripYear, local_midnights

TIME, CAR, MODEL, PLUGGED, CONSUMPTION = (
    "timestamp",
    "car_id",
    "model",
    "plugged_in",
    "consumption_kwh_per_km",
)


def load_charger_logs(
    path: Path,
    fleet: Sequence[FleetRow] = (),
    *,
    strict: bool = True,
    local_tz: str | None = None,
) -> list[CarLog]:
    """One `CarLog` per car in the file (see the module's format).

    Raises:
        DataFileError: naming the line and column of the first problem.
    """
    frame = read_table(path, [TIME, CAR, MODEL])
    if "energy_kwh" in frame.columns:
        column, scale = "energy_kwh", 1.0
    elif "power_kw" in frame.columns:
        column, scale = "power_kw", None
    else:
        raise DataFileError(path, "needs an 'energy_kwh' or a 'power_kw' column", line=1)
    times = parse_times(path, frame, TIME, local_tz)
    values = parse_numbers(path, frame, column, low=0.0, what="energy" if scale else "power")
    plugged = None
    if PLUGGED in frame.columns:
        plugged = parse_numbers(path, frame, PLUGGED, low=0.0, what="plugged_in")
        bad = np.flatnonzero(~np.isin(plugged, (0.0, 1.0)))
        if bad.size:
            raise DataFileError(
                path, "plugged_in must be 0 or 1", line=line_of(int(bad[0])), column=PLUGGED
            )
    consumption = None
    if CONSUMPTION in frame.columns:
        consumption = parse_numbers(path, frame, CONSUMPTION, low=0.05, what="consumption")
    by_model = {row.model: row.consumption_kwh_per_km for row in fleet}
    ids = frame[CAR].astype(str).str.strip().to_numpy()
    models = frame[MODEL].astype(str).str.strip().to_numpy()
    codes, order = pd.factorize(ids)
    by_car = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1])
    logs: list[CarLog] = []
    for name, rows in zip(order, by_car, strict=True):
        label = f"car {name!r}"
        if not str(name):
            raise DataFileError(path, "empty car id", line=line_of(int(rows[0])), column=CAR)
        changed = np.flatnonzero(models[rows] != models[rows[0]])
        if changed.size:
            raise DataFileError(
                path,
                f"{label} changes model from {models[rows[0]]!r} to {models[rows[changed[0]]]!r}",
                line=line_of(int(rows[changed[0]])),
                column=MODEL,
            )
        model = str(models[rows[0]])
        if strict:
            step = check_series(path, times, rows, TIME, label=label)
        else:
            rows = _drop_agreeing_repeats(path, times, values, plugged, rows, label)
            step = check_series(path, times, rows, TIME, label=label, allow_gaps=True)
        if consumption is not None:
            eta = float(consumption[rows[0]])
        elif model in by_model:
            eta = by_model[model]
        else:
            raise DataFileError(
                path,
                f"{label}: model {model!r} is not in the fleet table and the file has no "
                f"'{CONSUMPTION}' column",
                line=line_of(int(rows[0])),
                column=MODEL,
            )
        energy = values[rows] if scale else values[rows] * step / 3600.0
        try:
            logs.append(
                CarLog(
                    car_id=str(name),
                    model=model,
                    consumption_kwh_per_km=eta,
                    times_s=times[rows],
                    energy_kwh=np.asarray(energy, dtype=float),
                    plugged=None if plugged is None else plugged[rows] > 0.5,
                    step_s=step,
                )
            )
        except InvalidEvent as exc:
            raise DataFileError(path, f"{label}: {exc}", line=line_of(int(rows[0]))) from exc
    return logs


def _drop_agreeing_repeats(
    path: Path,
    times: np.ndarray,
    values: FloatArray,
    plugged: FloatArray | None,
    rows: np.ndarray,
    label: str,
) -> np.ndarray:
    """`rows` sorted by time with repeats that agree with the first sample removed."""
    rows = rows[np.argsort(times[rows], kind="stable")]
    keep = np.ones(rows.shape[0], dtype=bool)
    same = np.flatnonzero(np.diff(times[rows]) == 0) + 1
    for j in same:
        first = j - 1
        while not keep[first]:
            first -= 1
        a, b = rows[first], rows[j]
        agrees = values[a] == values[b] and (plugged is None or plugged[a] == plugged[b])
        if not agrees:
            raise DataFileError(
                path,
                f"{label}: repeated time with a different value than line {line_of(int(a))}",
                line=line_of(int(b)),
                column=TIME,
            )
        keep[j] = False
    return rows[keep]


def write_charger_logs(path: Path, logs: Sequence[CarLog], *, decimals: int = 4) -> None:
    """Write logs in the long format, with `plugged_in` when the logs have it."""
    frames = []
    for log in logs:
        stamps = pd.to_datetime(log.times_s, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ")
        frame = pd.DataFrame(
            {
                TIME: np.asarray(stamps),
                CAR: log.car_id,
                MODEL: log.model,
                "energy_kwh": np.round(log.energy_kwh, decimals),
            }
        )
        if log.plugged is not None:
            frame[PLUGGED] = log.plugged.astype(int)
        frame[CONSUMPTION] = log.consumption_kwh_per_km
        frames.append(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)


def logs_from_trips(
    trips: TripYear, cars: Sequence[FleetCar], charger_kw: float, tz: str
) -> list[CarLog]:
    """15-minute charger logs of cars living the given trips.

    Each car starts plugged in. On a driving day it unplugs at the departure slot and plugs in
    at the arrival slot (local time), then charges the day's energy at `charger_kw` from
    arrival; it stays plugged in until its next departure. A car still charging at its next
    departure leaves when the charge is done; if that is after that day's arrival, the car does
    not drive that day (both are rare with home charging at 3.7 kW and more).
    """
    if charger_kw <= 0:
        raise InvalidEvent(f"charger power {charger_kw} kW must be positive")
    first_local = (trips.first_day - date(1970, 1, 1)).days
    midnights = local_midnights(first_local, first_local + trips.days - 1, tz)
    start, end = int(midnights[0]), int(midnights[-1])
    times = np.arange(start, end, SLOT_S, dtype=np.int64)
    per_slot = charger_kw * SLOT_S / 3600.0
    logs = []
    for i, car in enumerate(cars):
        plugged = np.ones(times.shape[0], dtype=bool)
        energy = np.zeros(times.shape[0])
        free_from = 0  # first slot the car may leave (charging done)
        for d in range(trips.days):
            e = float(trips.energy_kwh[i, d])
            if trips.departure_slot[i, d] < 0 or e <= 0:
                continue
            day_end = (int(midnights[d + 1]) - start) // SLOT_S
            dep = (int(midnights[d]) - start) // SLOT_S + int(trips.departure_slot[i, d])
            arr = (int(midnights[d]) - start) // SLOT_S + int(trips.arrival_slot[i, d])
            dep, arr = min(dep, day_end - 1), min(arr, day_end - 1)
            dep = max(dep, free_from)
            if dep >= arr:
                continue
            plugged[dep:arr] = False
            full = int(e // per_slot)
            stop = min(arr + full, times.shape[0])
            energy[arr:stop] = per_slot
            rest = e - per_slot * (stop - arr)
            if stop < times.shape[0] and rest > 1e-12:
                energy[stop] = rest
                stop += 1
            free_from = stop
        logs.append(
            CarLog(
                car_id=car.vehicle_id,
                model=car.model,
                consumption_kwh_per_km=car.consumption_kwh_per_km,
                times_s=times,
                energy_kwh=energy,
                plugged=plugged,
            )
        )
    return logs


@dataclass(frozen=True, slots=True)
class MeasuredCar:
    """How one built "measured" car is made: which HLS profile, shifted by how many weeks."""

    car_id: str
    model: str
    profile: str
    shift_weeks: int = 0


# Ten cars over seven of the seed's models; ID.3, e-tron and ID.4 have no measured car and use
# the pooled laws. Cars 7-10 reuse profiles 13 weeks later in the year (same weekdays).
MEASURED_CARS = (
    MeasuredCar("car-01", "TESLA MODEL 3", "HLS_A_3.7"),
    MeasuredCar("car-02", "TESLA MODEL 3", "HLS_B_3.7"),
    MeasuredCar("car-03", "TESLA MODEL Y", "HLS_C_3.7"),
    MeasuredCar("car-04", "NISSAN LEAF 40KWH", "HLS_A_11.0"),
    MeasuredCar("car-05", "BMW I13", "HLS_B_11.0"),
    MeasuredCar("car-06", "TESLA MODEL S", "HLS_A_22.0"),
    MeasuredCar("car-07", "HYUNDAI KONA", "HLS_A_3.7", 13),
    MeasuredCar("car-08", "NISSAN LEAF 62KWH", "HLS_B_3.7", 13),
    MeasuredCar("car-09", "TESLA MODEL Y", "HLS_A_11.0", 13),
    MeasuredCar("car-10", "HYUNDAI KONA", "HLS_B_11.0", 13),
)
REFERENCE_CONSUMPTION = 0.165  # kWh/km: the seed table's median, taken for SimBench's cars


@dataclass(frozen=True, slots=True)
class ConnectionTimes:
    """ElaadNL's private-charger connection times: hours exceeded by p % of sessions."""

    percent: FloatArray  # (P,) increasing, 0..100
    hours: FloatArray  # (P,) decreasing

    def sample_at_least(self, minimum_h: float, u: float) -> float:
        """A connection time of at least `minimum_h` hours for uniform `u` in [0, 1)."""
        p_max = float(np.interp(minimum_h, self.hours[::-1], self.percent[::-1]))
        return max(float(np.interp(u * p_max, self.percent, self.hours)), minimum_h)


def load_connection_times(path: Path) -> ConnectionTimes:
    """`distribution-of-connection-time.csv`, private column (UTF-8 with byte-order mark)."""
    column = "Percentage of charging events"
    frame = read_table(path, [column, "private"])
    percent = parse_numbers(path, frame, column, low=0.0, what="percentage")
    hours = parse_numbers(path, frame, "private", low=0.0, what="hours")
    if np.any(np.diff(percent) <= 0) or np.any(np.diff(hours) > 0):
        raise DataFileError(path, "percentages must rise and hours must not", line=2)
    return ConnectionTimes(percent=percent, hours=hours)


def build_charger_logs(
    chargers: ProfileTable,
    connection: ConnectionTimes,
    fleet: Sequence[FleetRow],
    *,
    cars: Sequence[MeasuredCar] = MEASURED_CARS,
    seed: int = 2016,
    max_pause_slots: int = 2,
) -> list[CarLog]:
    """The ten built "measured" cars' 15-minute logs (energy and plug state).

    Each car takes an HLS home-charger profile (power as a share of the rating in its name),
    shifted by whole weeks, and its energies scaled by its model's consumption over
    `REFERENCE_CONSUMPTION` (the same trips driven by another car). A charging run (pauses up to
    `max_pause_slots` merged) is a session; it is plugged in when charging starts and stays for an
    ElaadNL private connection time at least as long as the charging, ending before the next
    session.
    """
    if chargers.step_s != SLOT_S:
        raise InvalidEvent("charger profiles must be every 15 minutes")
    by_model = {row.model: row.consumption_kwh_per_km for row in fleet}
    rng = np.random.default_rng(seed)
    n = chargers.times_s.shape[0]
    logs = []
    for car in cars:
        if car.model not in by_model:
            raise InvalidEvent(f"{car.car_id}: model {car.model!r} is not in the fleet table")
        rating_kw = float(car.profile.split("_")[-1])
        share = np.roll(chargers.column(car.profile), car.shift_weeks * 7 * 96)
        eta = by_model[car.model]
        energy = share * rating_kw * SLOT_S / 3600.0 * eta / REFERENCE_CONSUMPTION
        charging = energy > 1e-9
        merged = charging.copy()
        idx = np.flatnonzero(charging)
        for a, b in itertools.pairwise(idx):
            if 1 < b - a <= max_pause_slots + 1:
                merged[a:b] = True
        padded = np.concatenate([[False], merged, [False]])
        edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
        runs = list(zip(edges[::2], edges[1::2], strict=True))
        plugged = np.zeros(n, dtype=bool)
        for j, (a, b) in enumerate(runs):
            next_start = runs[j + 1][0] if j + 1 < len(runs) else n
            stay_h = connection.sample_at_least((b - a) * SLOT_S / 3600.0, float(rng.random()))
            out = a + math.ceil(stay_h * 4)
            out = max(b, min(out, next_start - 1))
            plugged[a:out] = True
        logs.append(
            CarLog(
                car_id=car.car_id,
                model=car.model,
                consumption_kwh_per_km=eta,
                times_s=chargers.times_s.copy(),
                energy_kwh=energy,
                plugged=plugged,
            )
        )
    return logs


def local_date(seconds: int, tz: str) -> date:
    """The local date of an epoch second."""
    day = int(calendar(np.array([seconds], dtype=np.int64), tz).local_day[0])
    return date(1970, 1, 1) + timedelta(days=day)
