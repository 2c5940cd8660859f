"""A test day for the live controller: 20 cars at a depot behind a household feeder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from simulators.scenario import CarDay, DayInputs

START = datetime(2024, 3, 4, 12, 0, tzinfo=UTC)  # a Monday noon


def depot_day(cars: int = 20, hours: float = 24.0, seed: int = 4) -> DayInputs:
    """Evening arrivals, morning departures, an evening price peak and household peak.

    The households' real load never exceeds the forecast the controller is given, so the real
    head-room is at least the planned one: any excess over it is the controller's doing.
    """
    rng = np.random.default_rng(seed)
    slots = int(hours * 4) + 96
    hour = (START.hour + np.arange(slots) / 4.0) % 24
    evening = np.exp(-((hour - 19.0) ** 2) / 6.0)
    price = 0.12 + 0.18 * evening - 0.07 * ((hour >= 0) & (hour < 6))
    forecast_load = 40.0 + 60.0 * evening + 10.0 * ((hour >= 7) & (hour < 9))
    actual_load = forecast_load - rng.uniform(0.0, 8.0, slots)
    capacity = 160.0
    fleet = []
    for k in range(cars):
        arrival = START + timedelta(hours=4.0 + 3.0 * k / cars, minutes=int(rng.integers(0, 10)))
        departure = START + timedelta(hours=18.5 + 1.5 * k / cars)
        capacity_kwh = float(rng.choice([39.0, 57.5, 77.0]))
        fleet.append(
            CarDay(
                vehicle_id=f"ev-{k + 1:02d}",
                model="test",
                capacity_kwh=capacity_kwh,
                arrival=arrival,
                departure=departure,
                arrival_soc=float(rng.uniform(0.2, 0.4)),
                target_soc=0.8,
            )
        )
    return DayInputs(
        start=START,
        hours=hours,
        site_capacity_kw=capacity,
        charger_kw=11.0,
        price_eur_per_kwh=price,
        headroom_forecast_kw=capacity - forecast_load,
        base_load_kw=actual_load,
        cars=tuple(fleet),
    )
