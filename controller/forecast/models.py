"""The fitted forecasting models as one bundle, and the pure functions the service calls.

`adapters.datasets.model_files.load_models(dir)` gives a `ForecastModels`; the service and the
demo then ask it for

- `headroom_forecast(models, start, slots, capacity_kw, quantile)`: h_t per 15-minute slot, the
  value that is there with probability `quantile` (for `PlanningSettings.headroom_quantile`);
- `price_series(models, now, start, slots)`: prices with `forecast_from`, ready for a
  `PriceUpdated` event;
- `next_day_needs(models, vehicles, day)`: each car's expected driving energy for `day`.

All three are pure: they read the models and their arguments, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np

from controller.domain import Vehicle, slot_floor
from controller.errors import InvalidEvent
from controller.forecast.calendar import FloatArray
from controller.forecast.fleet import FleetCar
from controller.forecast.headroom import HeadroomForecast, forecast_headroom
from controller.forecast.household import BaseLoadModel
from controller.forecast.prices import DayAheadPriceSource, PriceOutlook
from controller.forecast.trips import NextDayNeeds, TripModel
from controller.forecast.trips import next_day_needs as trip_needs

DEFAULT_HOUSEHOLDS: dict[str, int] = {"fixed": 500, "market": 500}


@dataclass(frozen=True, slots=True)
class ForecastModels:
    """Everything the forecasts need: household GAMs, trip laws, the price source."""

    base_load: BaseLoadModel
    trips: TripModel
    prices: DayAheadPriceSource | None = None
    # Households of each tariff group behind the site's connection (N_g), unless a call says.
    households: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_HOUSEHOLDS))
    version: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of everything but the price history (saved separately)."""
        return {
            "base_load": self.base_load.to_dict(),
            "trips": self.trips.to_dict(),
            "prices": None if self.prices is None else self.prices.to_dict(),
            "households": dict(self.households),
            "version": self.version,
        }


def price_series(
    models: ForecastModels, now: datetime, start: datetime, slots: int
) -> PriceOutlook:
    """Known day-ahead prices where published at `now`, forecast after (`forecast_from`).

    Raises:
        InvalidEvent: when the models carry no price history.
    """
    if models.prices is None:
        raise InvalidEvent("these forecast models have no price history")
    return models.prices.outlook(now, start, slots)


def headroom_outlook(
    models: ForecastModels,
    start: datetime,
    slots: int,
    capacity_kw: float,
    *,
    now: datetime | None = None,
    households: Mapping[str, int] | None = None,
    price_eur_per_kwh: FloatArray | None = None,
) -> HeadroomForecast:
    """The full head-room forecast (mean, quantiles, sample paths) for the slots from `start`.

    The market group's load depends on the price: given prices are used, else the models'
    price source as known at `now` (default: `start`), else each group's mean price p_bar.
    """
    start = slot_floor(start)
    counts = dict(models.households if households is None else households)
    prices = price_eur_per_kwh
    if prices is None and counts.get("market", 0) > 0:
        if models.prices is not None:
            prices = price_series(models, now or start, start, slots).price_eur_per_kwh
        else:
            market = models.base_load.group("market")
            prices = np.full(slots, market.price_mean_eur_per_kwh)
    return forecast_headroom(models.base_load, start, slots, capacity_kw, counts, prices)


def headroom_forecast(
    models: ForecastModels,
    start: datetime,
    slots: int,
    capacity_kw: float,
    quantile: float,
    *,
    now: datetime | None = None,
    households: Mapping[str, int] | None = None,
    price_eur_per_kwh: FloatArray | None = None,
) -> FloatArray:
    """(slots,) head-room available with probability `quantile` in each slot, floored at 0.

    `quantile` = 0.95 gives capacity minus the 95 % quantile of the base load: in about one
    slot in twenty the real head-room is smaller.
    """
    outlook = headroom_outlook(
        models,
        start,
        slots,
        capacity_kw,
        now=now,
        households=households,
        price_eur_per_kwh=price_eur_per_kwh,
    )
    return np.maximum(outlook.assured_kw(quantile), 0.0)


def next_day_needs(
    models: ForecastModels,
    vehicles: Sequence[Vehicle],
    day: date,
    levels: Sequence[float] = (0.5, 0.9, 0.95),
) -> NextDayNeeds:
    """Each vehicle's expected driving energy on `day` (k * theta) and its Gamma quantiles."""
    cars = [FleetCar(v.vehicle_id, v.model, v.consumption_kwh_per_km) for v in vehicles]
    return trip_needs(models.trips, cars, day, levels)
