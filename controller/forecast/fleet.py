"""The seed's fleet table and the synthetic fleet made from it.

The table (data/fleet/seed_fleet.csv) lists ten models with their battery size, consumption and
number of cars: 278 in all. `synthetic_fleet` turns it into 278 `Vehicle`s, `ev-001` to
`ev-278` in table order. Every car gets the same charger power, the aggregate divided by the
number of cars, so the fleet's chargers add up to exactly the seed's 1 MW: 1000 kW / 278 =
3.597 kW, which is what a 16 A single-phase wallbox (3.68 kW at 230 V) delivers, rounded down.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from controller.domain import EPOCH, Vehicle, require_range
from controller.errors import InvalidEvent

SEED_AGGREGATE_CHARGER_KW = 1000.0


@dataclass(frozen=True, slots=True)
class FleetRow:
    """One row of the seed's fleet table, values as the seed gives them."""

    place: int
    model: str
    share_of_evs: float  # share of Latvia's EVs in 2024
    battery_kwh: float
    consumption_kwh_per_km: float
    share_in_model: float  # share within the ten models
    vehicles: int

    def __post_init__(self) -> None:
        ctx = f"fleet row {self.place} ({self.model!r})"
        if self.place < 1:
            raise InvalidEvent(f"{ctx}: place must be at least 1")
        if not self.model.strip():
            raise InvalidEvent(f"{ctx}: model name is empty")
        require_range("share_of_evs", self.share_of_evs, ctx, low=0.0, high=1.0)
        require_range("battery_kwh", self.battery_kwh, ctx, low=1.0, high=500.0)
        require_range(
            "consumption_kwh_per_km", self.consumption_kwh_per_km, ctx, low=0.05, high=1.0
        )
        require_range("share_in_model", self.share_in_model, ctx, low=0.0, high=1.0)
        if self.vehicles < 0:
            raise InvalidEvent(f"{ctx}: vehicles {self.vehicles} is negative")


@dataclass(frozen=True, slots=True)
class FleetCar:
    """What the trip model needs to know about one car."""

    vehicle_id: str
    model: str
    consumption_kwh_per_km: float


def synthetic_fleet(
    rows: list[FleetRow],
    *,
    aggregate_charger_kw: float = SEED_AGGREGATE_CHARGER_KW,
    initial_soc: float = 0.5,
    energy_at: datetime = EPOCH,
) -> list[Vehicle]:
    """One `Vehicle` per car of the table (ids `ev-001`...), chargers summing to the aggregate.

    Raises:
        InvalidEvent: for an empty fleet, repeated places or a bad aggregate or SoC.
    """
    total = sum(r.vehicles for r in rows)
    if total == 0:
        raise InvalidEvent("the fleet table has no vehicles")
    places = [r.place for r in rows]
    if len(set(places)) != len(places):
        raise InvalidEvent(f"the fleet table repeats a place: {places}")
    require_range("aggregate_charger_kw", aggregate_charger_kw, "fleet", low=0.0)
    require_range("initial_soc", initial_soc, "fleet", low=0.0, high=1.0)
    per_car_kw = aggregate_charger_kw / total
    width = max(3, len(str(total)))
    vehicles: list[Vehicle] = []
    for row in sorted(rows, key=lambda r: r.place):
        for _ in range(row.vehicles):
            vehicles.append(
                Vehicle(
                    vehicle_id=f"ev-{len(vehicles) + 1:0{width}d}",
                    model=row.model,
                    capacity_kwh=row.battery_kwh,
                    energy_kwh=initial_soc * row.battery_kwh,
                    energy_at=energy_at,
                    max_charge_kw=per_car_kw,
                    consumption_kwh_per_km=row.consumption_kwh_per_km,
                )
            )
    return vehicles


def fleet_cars(vehicles: list[Vehicle]) -> list[FleetCar]:
    """The trip model's view of the vehicles."""
    return [FleetCar(v.vehicle_id, v.model, v.consumption_kwh_per_km) for v in vehicles]
