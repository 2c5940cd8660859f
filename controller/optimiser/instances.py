"""Synthetic planning days for tests, benchmarks and studies: the seed's fleet on a realistic day.

A day starts at 16:00 UTC with a 24 h horizon of 15-minute slots. Cars arrive in the evening
(around 18:00) with 20-60 % state of charge and leave the next morning (around 07:30) wanting
80 %. The site connection is shared with households: head-room is the connection minus a
household load shape (evening peak). Prices are hourly, day-ahead-like (evening peak, night
trough), optionally with a negative stretch. Everything is drawn from the `Generator` passed in.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from controller.errors import InvalidEvent
from controller.planning.problem import FloatArray, PlanningProblem

DAY_START = datetime(2024, 3, 4, 16, 0, tzinfo=UTC)  # a Monday afternoon
SEED_FLEET_SIZE = 278


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetModel:
    """One row of the seed's fleet table."""

    model: str
    capacity_kwh: float
    consumption_kwh_per_km: float
    vehicles: int

    def __post_init__(self) -> None:
        if self.capacity_kwh <= 0 or self.vehicles < 0:
            raise InvalidEvent(f"fleet model {self.model!r}: capacity and count must be positive")


def parse_fleet_table(text: str) -> list[FleetModel]:
    """The rows of `data/fleet/seed_fleet.csv` (given as text)."""
    rows = csv.DictReader(io.StringIO(text))
    return [
        FleetModel(
            model=row["model"],
            capacity_kwh=float(row["battery_kwh"]),
            consumption_kwh_per_km=float(row["consumption_kwh_per_km"]),
            vehicles=int(row["vehicles"]),
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class DayShape:
    """The knobs of a synthetic day."""

    vehicles: int = SEED_FLEET_SIZE
    slots: int = 96
    charger_kw: float = 11.0
    min_charge_kw: float = 6 * 230 * 3 / 1000  # 6 A on three phases
    site_kw_per_278: float = 1000.0  # the site connection, scaled with the fleet
    household_peak_share: float = 0.4  # the evening household peak, share of the connection
    v2g_share: float = 0.0  # share of cars that allow V2G
    export_share: float = 0.5  # export limit, share of the connection
    degradation_eur_per_kwh: float = 0.05
    negative_prices: bool = False  # a negative-price stretch in the night
    soc_range: tuple[float, float] = (0.2, 0.6)
    target_soc: float = 0.8


def seed_fleet_day(
    fleet: list[FleetModel], rng: np.random.Generator, shape: DayShape | None = None
) -> PlanningProblem:
    """A planning day for `shape.vehicles` cars drawn in the proportions of `fleet`."""
    shape = shape or DayShape()
    n, t_count = shape.vehicles, shape.slots
    counts = np.array([m.vehicles for m in fleet], dtype=float)
    share = counts / counts.sum()
    per_model = np.floor(share * n).astype(int)
    per_model[np.argsort(-(share * n - per_model))[: n - per_model.sum()]] += 1
    capacity = np.repeat([m.capacity_kwh for m in fleet], per_model).astype(float)

    dt = np.full(t_count, 0.25)
    hours: FloatArray = (16.0 + 0.25 * np.arange(t_count, dtype=float)) % 24.0  # slot start
    arrive_h = np.clip(rng.normal(18.0, 1.2, n), 16.0, 22.5)
    leave_h = np.clip(rng.normal(7.5, 0.8, n), 5.5, 9.5) + 24.0
    arrive = np.ceil((arrive_h - 16.0) * 4).astype(np.int64)
    departure = np.minimum(np.floor((leave_h - 16.0) * 4).astype(np.int64), t_count)
    arrive = np.minimum(arrive, departure)
    slots = np.arange(t_count)
    present = (slots[None, :] >= arrive[:, None]) & (slots[None, :] < departure[:, None])
    upper = np.where(present, shape.charger_kw, 0.0)

    soc = rng.uniform(*shape.soc_range, n)
    energy = soc * capacity
    target = np.maximum(shape.target_soc * capacity, energy)
    v2g = rng.random(n) < shape.v2g_share

    site_kw = shape.site_kw_per_278 * n / SEED_FLEET_SIZE
    headroom = site_kw * (1.0 - household_share(hours, shape.household_peak_share))
    prices = day_ahead_prices(hours, rng, negative=shape.negative_prices)
    return PlanningProblem(
        start=DAY_START,
        dt_h=dt,
        vehicle_ids=tuple(f"ev-{k:05d}" for k in range(n)),
        charger_ids=tuple(f"cp-{k:05d}" for k in range(n)),
        energy_kwh=energy,
        capacity_kwh=capacity,
        target_kwh=target,
        departure_slot=departure,
        upper_kw=upper,
        lower_kw=np.zeros((n, t_count)),
        min_kw=np.full(n, min(shape.min_charge_kw, shape.charger_kw)),
        eta_ch=np.full(n, 0.92),
        eta_dis=np.full(n, 0.92),
        v2g=v2g,
        max_discharge_kw=np.where(v2g, shape.charger_kw, 0.0),
        floor_kwh=0.2 * capacity,
        price_eur_per_kwh=prices,
        export_price_eur_per_kwh=prices.copy(),
        headroom_kw=headroom,
        export_limit_kw=shape.export_share * site_kw if shape.v2g_share > 0 else 0.0,
        degradation_eur_per_kwh=shape.degradation_eur_per_kwh,
        demand_charge_eur_per_kw=0.0,
    )


def household_share(hours: FloatArray, peak_share: float) -> FloatArray:
    """Household load as a share of the connection: night base, morning bump, evening peak."""
    evening = np.exp(-0.5 * ((hours - 19.0) / 1.8) ** 2)
    morning = 0.45 * np.exp(-0.5 * ((hours - 8.0) / 1.2) ** 2)
    result: FloatArray = peak_share * (0.35 + 0.65 * np.maximum(evening, morning))
    return result


def day_ahead_prices(
    hours: FloatArray, rng: np.random.Generator, *, negative: bool = False
) -> FloatArray:
    """EUR/kWh per slot, constant within each hour: evening peak, night trough, some noise."""
    hour_of_slot = np.floor(hours).astype(int)
    levels = (
        0.11
        + 0.09 * np.exp(-0.5 * ((np.arange(24) - 19.0) / 1.6) ** 2)
        + 0.05 * np.exp(-0.5 * ((np.arange(24) - 8.0) / 1.2) ** 2)
        - 0.05 * np.exp(-0.5 * ((np.arange(24) - 3.5) / 1.8) ** 2)
        + rng.normal(0.0, 0.008, 24)
    )
    if negative:
        levels[1:5] -= 0.12
    result: FloatArray = np.round(levels[hour_of_slot], 5)
    return result
