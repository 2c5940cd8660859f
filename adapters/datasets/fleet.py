"""Loader for the seed's fleet table (data/fleet/seed_fleet.csv).

Columns: `place, model, share_of_evs, battery_kwh, consumption_kwh_per_km, share_in_model,
vehicles`; shares are fractions (0.092, not 9.2 %). Values are kept exactly as the seed gives
them, including the two Nissan Leaf rows that look swapped (see data/fleet/SOURCE.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adapters.datasets._csv import line_of, parse_numbers, read_table
from adapters.datasets.errors import DataFileError
from controller.errors import InvalidEvent
from controller.forecast.fleet import FleetRow

COLUMNS = (
    "place",
    "model",
    "share_of_evs",
    "battery_kwh",
    "consumption_kwh_per_km",
    "share_in_model",
    "vehicles",
)


def load_seed_fleet(path: Path) -> list[FleetRow]:
    """The table's rows, typed and checked.

    Raises:
        DataFileError: naming the line and column of a missing, non-numeric or impossible value.
    """
    frame = read_table(path, COLUMNS)
    numbers = {
        name: parse_numbers(path, frame, name, low=0.0, what=name)
        for name in COLUMNS
        if name != "model"
    }
    for name in ("place", "vehicles"):
        values = numbers[name]
        bad = np.flatnonzero(values != np.round(values))
        if bad.size:
            raise DataFileError(
                path,
                f"{name} {values[bad[0]]:g} is not a whole number",
                line=line_of(int(bad[0])),
                column=name,
            )
    rows: list[FleetRow] = []
    for i in range(len(frame)):
        model = str(frame["model"].iloc[i]).strip()
        if not model:
            raise DataFileError(path, "model name is empty", line=line_of(i), column="model")
        try:
            rows.append(
                FleetRow(
                    place=int(numbers["place"][i]),
                    model=model,
                    share_of_evs=float(numbers["share_of_evs"][i]),
                    battery_kwh=float(numbers["battery_kwh"][i]),
                    consumption_kwh_per_km=float(numbers["consumption_kwh_per_km"][i]),
                    share_in_model=float(numbers["share_in_model"][i]),
                    vehicles=int(numbers["vehicles"][i]),
                )
            )
        except InvalidEvent as exc:
            raise DataFileError(path, str(exc), line=line_of(i)) from exc
    models = [r.model for r in rows]
    if len(set(models)) != len(models):
        raise DataFileError(path, "a model appears twice; each model needs one row")
    return rows
