"""Days of the seed's fleet built from the real data and the fitted models.

A *day* is the overnight charging window of a residential site: 24 hours from local noon of
date d to local noon of d + 1 (Europe/Amsterdam), 96 slots of 15 minutes. For every car:

- **Trips.** A year of trips is drawn from the Gamma laws (`simulate_trip_year`): per car and
  date, the energy driven and the slots it left and came back. A car that drove on d is plugged
  in when it comes back (at the window's start if that was before noon); one that stayed home
  is plugged in from the start. It unplugs when it leaves on d + 1 (after the window when that
  is after noon, or when it does not drive: the target is then asked at the window's end).
- **Energy.** Every car keeps a reserve of `reserve_soc` of its battery. It starts the window
  with what the previous night left (reserve + what it drove on d + a random surplus of up to
  `surplus_soc`) minus what it drove on d, never below 5 %. Its target at departure is the
  reserve plus what it will drive on d + 1 (the realised trip, or the forecast when a planner
  plans on forecasts), at most the battery.
- **Site.** Head-room h_t = site capacity - the households' base load. The planner is told the
  head-room the GAM assures with probability `headroom_quantile`; the realised base load is one
  sample path of the GAM's noise model (the shipped household data covers 2016 only, so a
  realised load for any other date can only be drawn from the fitted model).
- **Prices.** Real NL day-ahead prices of the date (EUR/kWh, `data/prices`).

`build_problem` turns a `FleetDay` into the planner's `PlanningProblem`; `day_inputs` into the
protocol scenario's `DayInputs`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
from numpy.typing import NDArray

from controller.domain import Vehicle
from controller.forecast.fleet import FleetCar, fleet_cars, synthetic_fleet
from controller.forecast.models import ForecastModels, headroom_outlook
from controller.forecast.prices import prices_on_slots
from controller.forecast.trips import TripYear, simulate_trip_year
from controller.forecast.trips import next_day_needs as trip_needs
from controller.planning.problem import PlanningProblem
from simulators.scenario import CarDay, DayInputs

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
ZONE = "Europe/Amsterdam"
SLOTS = 96  # one day of 15-minute slots
DT_H = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteSpec:
    """The residential site behind one connection: households, chargers, the planner's caution.

    The defaults are the seed's: 278 cars on 1 MW of chargers (3.6 kW each) behind a connection
    shared with 2,000 households (1,000 on a fixed tariff, 1,000 on market prices).
    """

    capacity_kw: float = 1400.0
    households: tuple[tuple[str, int], ...] = (("fixed", 1000), ("market", 1000))
    aggregate_charger_kw: float = 1000.0
    headroom_quantile: float = 0.95
    reserve_soc: float = 0.2
    surplus_soc: float = 0.0
    charge_efficiency: float = 0.92
    min_kw: float = 0.0

    def __post_init__(self) -> None:
        if self.capacity_kw <= 0 or self.aggregate_charger_kw <= 0:
            raise ValueError("site capacity and charger power must be positive")
        if not 0.0 < self.headroom_quantile < 1.0:
            raise ValueError(f"headroom_quantile {self.headroom_quantile} must lie in (0, 1)")
        if not 0.0 <= self.reserve_soc < 1.0 or not 0.0 <= self.surplus_soc <= 1.0:
            raise ValueError("reserve_soc and surplus_soc must be fractions")

    @property
    def household_counts(self) -> dict[str, int]:
        """Households per tariff group."""
        return dict(self.households)


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetDay:
    """One overnight window: real and forecast inputs for every car and slot.

    Arrays per car (N,) and per slot (T = 96). `*_forecast` fields are what a planner that
    plans on forecasts knows; the others are what really happens.
    """

    day: date
    start: datetime  # UTC, local noon of `day`
    vehicles: tuple[Vehicle, ...]
    charger_kw: float
    capacity_kw: float
    price_eur_per_kwh: FloatArray  # (2T,) real day-ahead prices (the span and one more day)
    headroom_forecast_kw: FloatArray  # (2T,) assured at the site's quantile
    base_load_kw: FloatArray  # (2T,) realised household load (a GAM sample path)
    arrival_slot: NDArray[np.int64]  # (N,) first slot plugged in
    departure_slot: NDArray[np.int64]  # (N,) first slot gone, T when after the window
    energy_kwh: FloatArray  # (N,) battery content at arrival
    target_kwh: FloatArray  # (N,) reserve + realised next-day trip
    target_forecast_kwh: FloatArray  # (N,) reserve + forecast next-day trip
    price_spread_eur_per_kwh: float = field(default=0.0)

    @property
    def n_cars(self) -> int:
        """N."""
        return len(self.vehicles)

    @property
    def headroom_real_kw(self) -> FloatArray:
        """(2T,) realised head-room: capacity minus the realised base load."""
        result: FloatArray = self.capacity_kw - self.base_load_kw
        return result

    @property
    def need_kwh(self) -> FloatArray:
        """(N,) energy each car must gain (realised targets)."""
        result: FloatArray = np.maximum(0.0, self.target_kwh - self.energy_kwh)
        return result


def local_noon(day: date) -> datetime:
    """Local noon of `day` in UTC (slot-aligned: the zone's offsets are whole hours)."""
    return datetime.combine(day, time(12), tzinfo=ZoneInfo(ZONE)).astimezone(UTC)


def load_models(data_dir: Path, cache_dir: Path | None = None) -> ForecastModels:
    """The fitted forecast models: from `cache_dir` when a fit is stored there, else fit now.

    A fresh fit (about 20 s) is saved to `cache_dir` (when given) for the next run.
    """
    from adapters.datasets import model_files
    from adapters.datasets.fitting import fit_all

    if cache_dir is not None and (cache_dir / "LATEST").is_file():
        try:
            return model_files.load_models(cache_dir)
        except model_files.ModelFileError as exc:
            log.warning("refitting: %s", exc)
    outcome = fit_all(data_dir)
    if cache_dir is not None:
        root = data_dir.resolve().parent
        digest, files = model_files.data_hash(outcome.data_files, root)
        cache_dir.mkdir(parents=True, exist_ok=True)
        model_files.save_models(
            outcome.models,
            cache_dir,
            data_sha256=digest,
            data_files=files,
            inputs=outcome.inputs,
            metrics={"fit_seconds_total": outcome.metrics.get("fit_seconds_total", 0.0)},
        )
    return outcome.models


def seed_fleet(data_dir: Path, cars: int | None, aggregate_charger_kw: float) -> list[Vehicle]:
    """The seed's fleet (278 cars), or `cars` of it: scaled by model shares when more or fewer.

    Every car gets the same charger, the aggregate divided by the seed's 278 cars (3.6 kW), so a
    fleet of another size keeps the per-car charger and the chargers add up in proportion.
    """
    from adapters.datasets.fleet import load_seed_fleet

    rows = load_seed_fleet(data_dir / "fleet" / "seed_fleet.csv")
    full = synthetic_fleet(rows, aggregate_charger_kw=aggregate_charger_kw)
    if cars is None or cars == len(full):
        return full
    if cars < 1:
        raise ValueError(f"cars {cars} must be at least 1")
    # Spread over the table's order so every model keeps its share; repeat it for big fleets.
    width = max(3, len(str(cars)))
    picks = (np.arange(cars) * len(full)) // cars if cars <= len(full) else np.arange(cars)
    chosen: list[Vehicle] = []
    for k, index in enumerate(picks):
        base = full[int(index) % len(full)]
        chosen.append(replace(base, vehicle_id=f"ev-{k + 1:0{width}d}"))
    return chosen


class DayFactory:
    """Builds `FleetDay`s for one fleet over one year of trips, prices and household load."""

    def __init__(
        self,
        models: ForecastModels,
        vehicles: Sequence[Vehicle],
        site: SiteSpec,
        *,
        first_day: date,
        days: int,
        seed: int = 7,
        households_scale: float = 1.0,
    ) -> None:
        if models.prices is None:
            raise ValueError("the forecast models carry no price history")
        self.models = models
        self.vehicles = tuple(vehicles)
        self.site = site
        self.first_day = first_day
        self.cars: list[FleetCar] = fleet_cars(list(vehicles))
        self.seed = seed
        self.households = {g: round(n * households_scale) for g, n in site.household_counts.items()}
        rng = np.random.default_rng(seed)
        # Trips from the day before the first to the day after the last.
        self.trips: TripYear = simulate_trip_year(
            models.trips, self.cars, first_day - timedelta(days=1), rng, days=days + 2
        )
        self.surplus = rng.random((len(vehicles), days + 2)) * site.surplus_soc
        self.charger_kw = float(vehicles[0].max_charge_kw) if vehicles else 0.0

    def _window_index(
        self, start: datetime, day: date, slot_of_day: NDArray[np.int64]
    ) -> NDArray[np.int64]:
        """Index, in the window from `start`, of the local 15-minute slot `slot_of_day` of `day`."""
        midnight = datetime.combine(day, time(0), tzinfo=ZoneInfo(ZONE)).astimezone(UTC)
        offset = int((midnight - start).total_seconds() // 900)
        return np.asarray(offset + slot_of_day, dtype=np.int64)

    def day(self, d: date) -> FleetDay:
        """The window from local noon of `d` to local noon of `d` + 1."""
        k = (d - self.trips.first_day).days  # column of d in the trip year
        if k < 1 or k + 1 >= self.trips.days:
            raise ValueError(f"{d} is outside the simulated trips")
        site = self.site
        start = local_noon(d)
        cap = np.array([v.capacity_kwh for v in self.vehicles])
        drove = self.trips.energy_kwh[:, k]
        tomorrow = self.trips.energy_kwh[:, k + 1]
        back = self.trips.arrival_slot[:, k]
        leaves = self.trips.departure_slot[:, k + 1]
        arrival = np.where(back >= 0, np.maximum(0, self._window_index(start, d, back)), 0)
        next_day = d + timedelta(days=1)
        departure = np.where(
            leaves >= 0, np.minimum(self._window_index(start, next_day, leaves), SLOTS), SLOTS
        )
        departure = np.maximum(departure, arrival + 1)
        reserve = site.reserve_soc * cap
        before = np.minimum(cap, reserve + drove + self.surplus[:, k] * cap)
        energy = np.maximum(0.05 * cap, before - drove)
        target = np.minimum(cap, reserve + tomorrow)
        forecast = trip_needs(self.models.trips, self.cars, d + timedelta(days=1))
        expected = (1.0 - forecast.p_zero) * forecast.mean_kwh
        target_forecast = np.minimum(cap, reserve + expected)
        slots2 = 2 * SLOTS
        times_s = int(start.timestamp()) + 900 * np.arange(slots2, dtype=np.int64)
        price = prices_on_slots(self.models.prices.history, times_s)  # type: ignore[union-attr]
        outlook = headroom_outlook(
            self.models,
            start,
            slots2,
            site.capacity_kw,
            households=self.households,
            price_eur_per_kwh=price,
        )
        assured = np.maximum(outlook.assured_kw(site.headroom_quantile), 0.0)
        rng = np.random.default_rng([self.seed, k])
        base = np.maximum(outlook.base.sample_paths(rng, 1)[0], 0.0)
        window = price[:SLOTS]
        return FleetDay(
            day=d,
            start=start,
            vehicles=self.vehicles,
            charger_kw=self.charger_kw,
            capacity_kw=site.capacity_kw,
            price_eur_per_kwh=price,
            headroom_forecast_kw=assured,
            base_load_kw=base,
            arrival_slot=arrival.astype(np.int64),
            departure_slot=departure.astype(np.int64),
            energy_kwh=energy,
            target_kwh=np.maximum(target, 0.0),
            target_forecast_kwh=np.maximum(target_forecast, 0.0),
            price_spread_eur_per_kwh=float(window.max() - window.min()),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ProblemOptions:
    """How a `FleetDay` becomes a planning problem."""

    forecast_targets: bool = False  # plan on forecast next-day trips instead of realised ones
    real_headroom: bool = False  # plan on the realised head-room (hindsight)
    v2g_share: float = 0.0  # fraction of cars that may discharge
    import_adder_eur_per_kwh: float = 0.0  # grid fee + taxes on every imported kWh
    export_adder_eur_per_kwh: float = 0.0  # what export earns on top of spot (refund rules)
    degradation_eur_per_kwh: float = 0.0  # battery wear per kWh discharged
    # Every strategy delivers the same energy: a car charges up to its target (or what it came
    # with), not to a full battery, so savings come from timing alone and not from buying extra
    # energy at negative prices whose later value nobody counts. False: the real battery.
    cap_at_target: bool = True
    # The controller asks every car for this much more than its target (settings'
    # `target_margin_kwh`, against dispatch rounding); the demo's computed rows use the same.
    target_margin_kwh: float = 0.0


def build_problem(day: FleetDay, options: ProblemOptions | None = None) -> PlanningProblem:
    """The planner's problem for `day`: cars present from arrival to departure, 96 slots."""
    opt = options or ProblemOptions()
    n, t = day.n_cars, SLOTS
    slots = np.arange(t)
    present = (slots[None, :] >= day.arrival_slot[:, None]) & (
        slots[None, :] < day.departure_slot[:, None]
    )
    cap = np.array([v.capacity_kwh for v in day.vehicles])
    upper = np.where(present, day.charger_kw, 0.0)
    v2g = np.zeros(n, dtype=bool)
    if opt.v2g_share > 0:
        v2g[: round(opt.v2g_share * n)] = True
    headroom = day.headroom_real_kw[:t] if opt.real_headroom else day.headroom_forecast_kw[:t]
    target = day.target_forecast_kwh if opt.forecast_targets else day.target_kwh
    target = np.minimum(cap, target + opt.target_margin_kwh)
    # A car that may discharge leaves with at least what it came with: V2G may not sell the
    # energy it brought (bought on earlier days), only cycle energy bought in this window.
    target = np.where(v2g, np.maximum(target, day.energy_kwh), target)
    price = day.price_eur_per_kwh[:t]
    if opt.cap_at_target:
        cap = np.minimum(cap, np.maximum(target, day.energy_kwh))
    return PlanningProblem(
        start=day.start,
        dt_h=np.full(t, DT_H),
        vehicle_ids=tuple(v.vehicle_id for v in day.vehicles),
        charger_ids=tuple(f"CP-{i + 1:04d}" for i in range(n)),
        energy_kwh=day.energy_kwh.copy(),
        capacity_kwh=cap,
        target_kwh=np.asarray(target, dtype=float),
        departure_slot=day.departure_slot.copy(),
        upper_kw=upper,
        lower_kw=np.zeros((n, t)),
        min_kw=np.zeros(n),
        eta_ch=np.full(n, 0.92),
        eta_dis=np.full(n, 0.92),
        v2g=v2g,
        max_discharge_kw=np.where(v2g, day.charger_kw, 0.0),
        floor_kwh=np.minimum(0.2 * cap, day.energy_kwh),
        price_eur_per_kwh=price + opt.import_adder_eur_per_kwh,
        export_price_eur_per_kwh=price + opt.export_adder_eur_per_kwh,
        headroom_kw=np.maximum(headroom, 0.0),
        export_limit_kw=float(day.capacity_kw) if opt.v2g_share > 0 else 0.0,
        degradation_eur_per_kwh=opt.degradation_eur_per_kwh,
    )


def day_inputs(day: FleetDay, *, hours: float = 24.0, v2g: bool = False) -> DayInputs:
    """The protocol scenario's inputs for `day` (the first `hours` of the window)."""
    step = timedelta(minutes=15)
    cars = []
    end_slot = int(np.ceil(hours * 4))
    for i, v in enumerate(day.vehicles):
        arrival = int(day.arrival_slot[i])
        if arrival >= end_slot:
            continue
        departure = int(day.departure_slot[i])
        cap = v.capacity_kwh
        cars.append(
            CarDay(
                vehicle_id=v.vehicle_id,
                model=v.model,
                capacity_kwh=cap,
                arrival=day.start + step * arrival,
                departure=day.start + step * departure,
                arrival_soc=float(day.energy_kwh[i] / cap),
                target_soc=float(min(1.0, day.target_kwh[i] / cap)),
                max_charge_kw=day.charger_kw,
                charge_efficiency=0.92,
                v2g=v2g,
                max_discharge_kw=day.charger_kw if v2g else 0.0,
            )
        )
    return DayInputs(
        start=day.start,
        hours=hours,
        site_capacity_kw=day.capacity_kw,
        charger_kw=day.charger_kw,
        price_eur_per_kwh=day.price_eur_per_kwh,
        headroom_forecast_kw=day.headroom_forecast_kw,
        base_load_kw=day.base_load_kw,
        cars=tuple(cars),
        v2g_mode="discharge" if v2g else "none",
        # The seed's 3.6 kW is a 16 A single-phase wallbox (3-phase minimum: 6 A x 3 = 4.1 kW).
        charger_phases=1 if day.charger_kw <= 7.4 else 3,
    )
