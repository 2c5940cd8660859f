"""Trips: charger logs -> sessions -> daily driving energy -> Gamma laws -> needs and trip years.

1. **Sessions.** A car's 15-minute charger log (energy per interval, and whether it was plugged
   in, when the log says so) becomes sessions from plug-in to plug-out. Samples are sorted and a
   repeated time keeps its first sample. A gap of at most `max_gap_slots` missing intervals
   inside a plugged-in stretch is bridged (the session goes on; the energy of the missing
   intervals is not invented); a longer gap ends what was going on and makes it incomplete.
   Without a plug-in column a session is a run of charging intervals (pauses of up to
   `max_pause_slots` bridged), so plug-out is the end of charging.
2. **Daily energy.** The energy of a session is what the car drove while it was away since the
   previous session: E_s is spread over the local days of that away interval
   [plug-out_{s-1}, plug-in_s) in proportion to the time away in each (pieces under an hour get
   nothing unless all are). A day the car spent plugged in is a zero day; a day touching a long
   gap, an incomplete session or the log's ends is unknown and not used.
3. **Gamma laws.** Daily distances (energy / the measured car's consumption) of driving days are
   fitted per car model m and weekday w by maximum likelihood, Gamma(k_{m,w}, theta_{m,w})
   (scipy.stats.gamma.fit, location 0), with the zero-day probability pi_{m,w} = zero days /
   known days. A cell with fewer than `min_days` driving days takes the pooled law of that
   weekday (all models), and that one the law pooled over all days.
4. **Use.** For a car i of model m with consumption eta_i the energy law of a driving day is
   Gamma(k_{m,w}, eta_i * theta_{m,w}); the seed's next-day forecast is its mean
   E~_{i,d+1} = k * theta (of a driving day), with Gamma quantiles for a cautious planner and
   pi the chance of not driving at all. A year of trips is drawn day by day with departure and
   arrival times from the measured sessions' plug-out and plug-in times.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from controller.errors import InvalidEvent
from controller.forecast.calendar import (
    DAY_S,
    SLOT_S,
    BoolArray,
    FloatArray,
    IntArray,
    calendar,
    check_zone,
)
from controller.forecast.fleet import FleetCar

SLOTS_PER_DAY = DAY_S // SLOT_S
WEEKDAYS = 7
POOLED = "*"
EPOCH_DATE = date(1970, 1, 1)


@dataclass(frozen=True, slots=True)
class CarLog:
    """One car's charger log: energy per interval, and the plug state when it was logged."""

    car_id: str
    model: str
    consumption_kwh_per_km: float
    times_s: IntArray  # (S,) interval starts; may be unsorted, repeated or have gaps
    energy_kwh: FloatArray  # (S,) energy charged in each interval
    plugged: BoolArray | None = None  # (S,) plugged in during the interval
    step_s: int = SLOT_S

    def __post_init__(self) -> None:
        ctx = f"car log {self.car_id!r}"
        n = self.times_s.shape[0]
        if n < 2:
            raise InvalidEvent(f"{ctx}: needs at least two samples")
        if self.energy_kwh.shape != (n,) or (
            self.plugged is not None and self.plugged.shape != (n,)
        ):
            raise InvalidEvent(f"{ctx}: times, energy and plug state differ in length")
        if not np.all(np.isfinite(self.energy_kwh)) or np.any(self.energy_kwh < 0):
            raise InvalidEvent(f"{ctx}: energies must be finite and non-negative")
        if self.step_s <= 0 or np.any((self.times_s - self.times_s.min()) % self.step_s != 0):
            raise InvalidEvent(f"{ctx}: samples are not on one {self.step_s}-second grid")
        if not 0.05 <= self.consumption_kwh_per_km <= 1.0:
            raise InvalidEvent(f"{ctx}: consumption {self.consumption_kwh_per_km} kWh/km")


@dataclass(frozen=True, slots=True)
class Session:
    """From plug-in to plug-out (epoch seconds), with the energy charged in between."""

    plug_in_s: int
    plug_out_s: int
    energy_kwh: float
    complete: bool  # both ends observed, no long gap inside
    gap_slots: int = 0  # missing intervals bridged inside the session


@dataclass(frozen=True, slots=True)
class SessionLog:
    """A car's sessions and what of its log could be seen."""

    car_id: str
    sessions: tuple[Session, ...]
    first_s: int  # start of the first sample
    end_s: int  # end of the last sample
    blind: tuple[tuple[int, int], ...]  # [start, end) of long gaps: state unknown
    duplicates_dropped: int = 0


def _fill_short_runs(mask: BoolArray, max_len: int) -> BoolArray:
    """`mask` with False runs of at most `max_len` between two True values set True."""
    out = mask.copy()
    idx = np.flatnonzero(mask)
    if idx.size < 2 or max_len < 1:
        return out
    gaps = np.diff(idx) - 1
    for k in np.flatnonzero((gaps > 0) & (gaps <= max_len)):
        out[idx[k] + 1 : idx[k + 1]] = True
    return out


def _runs(mask: BoolArray) -> list[tuple[int, int]]:
    """[start, end) index runs where `mask` is True."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def sessions_from_log(log: CarLog, max_gap_slots: int = 4, max_pause_slots: int = 2) -> SessionLog:
    """Segment a car's log into sessions (see the module docstring, step 1)."""
    order = np.argsort(log.times_s, kind="stable")
    times = log.times_s[order]
    first_of = np.concatenate([[True], np.diff(times) > 0])
    duplicates = int((~first_of).sum())
    times = times[first_of]
    energy = log.energy_kwh[order][first_of]
    step = log.step_s
    t0 = int(times[0])
    k = (times - t0) // step
    n = int(k[-1]) + 1
    observed = np.zeros(n, dtype=bool)
    observed[k] = True
    e = np.zeros(n)
    e[k] = energy
    if log.plugged is not None:
        plugged = np.zeros(n, dtype=bool)
        plugged[k] = log.plugged[order][first_of]
    else:
        plugged = _fill_short_runs(e > 1e-9, max_pause_slots)
    missing_runs = _runs(~observed)
    blind_runs = [(a, b) for a, b in missing_runs if b - a > max_gap_slots]
    for a, b in missing_runs:
        if b - a <= max_gap_slots and a > 0 and b < n and plugged[a - 1] and plugged[b]:
            plugged[a:b] = True  # a short gap inside a plugged stretch: the session goes on
    blind = np.zeros(n, dtype=bool)
    for a, b in blind_runs:
        blind[a:b] = True
    plugged &= ~blind
    sessions = []
    for a, b in _runs(plugged):
        touches_blind = (a > 0 and blind[a - 1]) or (b < n and blind[b])
        complete = a > 0 and b < n and not touches_blind
        sessions.append(
            Session(
                plug_in_s=t0 + a * step,
                plug_out_s=t0 + b * step,
                energy_kwh=float(e[a:b].sum()),
                complete=complete,
                gap_slots=int((~observed[a:b]).sum()),
            )
        )
    return SessionLog(
        car_id=log.car_id,
        sessions=tuple(sessions),
        first_s=t0,
        end_s=t0 + n * step,
        blind=tuple((t0 + a * step, t0 + b * step) for a, b in blind_runs),
        duplicates_dropped=duplicates,
    )


@dataclass(frozen=True, slots=True)
class DailyEnergy:
    """A car's driving energy per local day; `known` False where the log cannot tell."""

    car_id: str
    model: str
    consumption_kwh_per_km: float
    day: IntArray  # (D,) local days since 1970-01-01
    weekday: IntArray  # (D,) 0 = Monday
    energy_kwh: FloatArray  # (D,)
    known: BoolArray  # (D,)

    @property
    def driving(self) -> BoolArray:
        """Known days with driving energy."""
        return self.known & (self.energy_kwh > 0)

    @property
    def zero(self) -> BoolArray:
        """Known days without driving."""
        return self.known & (self.energy_kwh <= 0)


def local_midnights(first_day: int, last_day: int, tz: str) -> IntArray:
    """Epoch seconds of local midnight for local days first_day .. last_day + 1."""
    days = pd.date_range(
        EPOCH_DATE + timedelta(days=first_day),
        EPOCH_DATE + timedelta(days=last_day + 1),
        freq="D",
    )
    local = days.tz_localize(tz, ambiguous=True, nonexistent="shift_forward")
    return np.asarray(
        (local.tz_convert("UTC") - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1),
        dtype=np.int64,
    )


def daily_energy(
    sessions: SessionLog, model: str, consumption_kwh_per_km: float, tz: str
) -> DailyEnergy:
    """Driving energy per local day from a car's sessions (module docstring, step 2)."""
    check_zone(tz)
    cal = calendar(np.array([sessions.first_s, sessions.end_s - 1], dtype=np.int64), tz)
    first_day, last_day = int(cal.local_day[0]), int(cal.local_day[1])
    bounds = local_midnights(first_day, last_day, tz)
    n_days = last_day - first_day + 1
    energy = np.zeros(n_days)
    unknown = np.zeros(n_days, dtype=bool)
    # Days not wholly inside the log are unknown.
    unknown[bounds[:-1] < sessions.first_s] = True
    unknown[bounds[1:] > sessions.end_s] = True

    def days_touching(a: int, b: int) -> IntArray:
        return np.flatnonzero((bounds[:-1] < b) & (bounds[1:] > a))

    for a, b in sessions.blind:
        unknown[days_touching(a, b)] = True
    ss = sessions.sessions
    if ss:
        unknown[days_touching(sessions.first_s, ss[0].plug_in_s)] = True
        unknown[days_touching(ss[-1].plug_out_s, sessions.end_s)] = True
    else:
        unknown[:] = True
    for prev, cur in itertools.pairwise(ss):
        a, b = prev.plug_out_s, cur.plug_in_s
        touched = days_touching(a, b)
        if touched.size == 0:
            continue
        blind_inside = any(x < b and y > a for x, y in sessions.blind)
        if not (prev.complete and cur.complete) or blind_inside:
            unknown[touched] = True
            continue
        overlap = np.minimum(bounds[touched + 1], b) - np.maximum(bounds[touched], a)
        weight = np.where(overlap >= 3600, overlap, 0).astype(float)
        if weight.sum() == 0:
            weight = (overlap == overlap.max()).astype(float)
        energy[touched] += cur.energy_kwh * weight / weight.sum()
    days = first_day + np.arange(n_days, dtype=np.int64)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday
    return DailyEnergy(
        car_id=sessions.car_id,
        model=model,
        consumption_kwh_per_km=consumption_kwh_per_km,
        day=days,
        weekday=weekday,
        energy_kwh=np.where(unknown, 0.0, energy),
        known=~unknown,
    )


@dataclass(frozen=True, slots=True)
class GammaLaw:
    """Gamma(k, theta_km) of a driving day's distance, and the chance of a day without driving."""

    k: float
    theta_km: float
    p_zero: float
    driving_days: int
    zero_days: int
    source: str  # "model", "pooled weekday" or "pooled"

    def __post_init__(self) -> None:
        if not (self.k > 0 and self.theta_km > 0 and math.isfinite(self.k * self.theta_km)):
            raise InvalidEvent(f"Gamma law: k {self.k} and theta {self.theta_km} must be > 0")
        if not 0.0 <= self.p_zero < 1.0:
            raise InvalidEvent(f"Gamma law: zero-day probability {self.p_zero} outside [0, 1)")

    def mean_km(self) -> float:
        """Mean distance of a driving day."""
        return self.k * self.theta_km

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "k": self.k,
            "theta_km": self.theta_km,
            "p_zero": self.p_zero,
            "driving_days": self.driving_days,
            "zero_days": self.zero_days,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GammaLaw:
        """Inverse of `to_dict`."""
        return cls(
            k=float(data["k"]),
            theta_km=float(data["theta_km"]),
            p_zero=float(data["p_zero"]),
            driving_days=int(data["driving_days"]),
            zero_days=int(data["zero_days"]),
            source=str(data["source"]),
        )


def fit_gamma(distance_km: FloatArray) -> tuple[float, float]:
    """Maximum-likelihood Gamma(k, theta) of positive distances, location fixed at 0."""
    x = np.asarray(distance_km, dtype=float)
    if x.shape[0] < 2 or np.any(x <= 0) or np.ptp(x) == 0:
        raise InvalidEvent("a Gamma fit needs at least two different positive values")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k, _, theta = stats.gamma.fit(x, floc=0.0, method="MLE")
    return float(k), float(theta)


@dataclass(frozen=True, slots=True)
class TripModel:
    """Gamma laws per (model, weekday), pooled laws, and departure/arrival time-of-day laws."""

    tz: str
    laws: dict[tuple[str, int], GammaLaw]  # (model or POOLED, weekday) -> law
    pooled: GammaLaw  # over all models and days
    departure_pmf: FloatArray  # (2, 96) plug-out slot of day; row 0 working days, 1 weekends
    arrival_pmf: FloatArray  # (2, 96) plug-in slot of day
    measured_consumption: dict[str, float]  # model -> mean consumption of its measured cars

    def __post_init__(self) -> None:
        check_zone(self.tz)
        for name in ("departure_pmf", "arrival_pmf"):
            pmf = getattr(self, name)
            if pmf.shape != (2, SLOTS_PER_DAY) or np.any(pmf < 0):
                raise InvalidEvent(f"trip model: {name} must be (2, 96) and non-negative")
            if not np.allclose(pmf.sum(axis=1), 1.0):
                raise InvalidEvent(f"trip model: each row of {name} must sum to 1")

    def law(self, model: str, weekday: int) -> GammaLaw:
        """The law used for `model` on `weekday`: its own, else the pooled weekday's or all."""
        return self.laws.get((model, weekday)) or self.laws.get((POOLED, weekday)) or self.pooled

    def energy_law(self, car: FleetCar, weekday: int) -> tuple[float, float, float]:
        """(k, theta_kwh, p_zero) of `car`'s driving energy on `weekday`."""
        law = self.law(car.model, weekday)
        return law.k, law.theta_km * car.consumption_kwh_per_km, law.p_zero

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "tz": self.tz,
            "laws": [
                {"model": m, "weekday": w, **law.to_dict()} for (m, w), law in self.laws.items()
            ],
            "pooled": self.pooled.to_dict(),
            "departure_pmf": self.departure_pmf.tolist(),
            "arrival_pmf": self.arrival_pmf.tolist(),
            "measured_consumption": dict(self.measured_consumption),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TripModel:
        """Inverse of `to_dict`."""
        return cls(
            tz=str(data["tz"]),
            laws={
                (str(entry["model"]), int(entry["weekday"])): GammaLaw.from_dict(entry)
                for entry in data["laws"]
            },
            pooled=GammaLaw.from_dict(data["pooled"]),
            departure_pmf=np.asarray(data["departure_pmf"], dtype=float),
            arrival_pmf=np.asarray(data["arrival_pmf"], dtype=float),
            measured_consumption={
                str(k): float(v) for k, v in data["measured_consumption"].items()
            },
        )


def _law(distances: FloatArray, zeros: int, source: str) -> GammaLaw:
    k, theta = fit_gamma(distances)
    driving = int(distances.shape[0])
    return GammaLaw(
        k=k,
        theta_km=theta,
        p_zero=zeros / (zeros + driving),
        driving_days=driving,
        zero_days=zeros,
        source=source,
    )


def _time_pmf(times_s: Sequence[int], tz: str) -> FloatArray:
    """(2, 96) distribution of slot of day, working days and weekends (uniform if no data)."""
    pmf = np.zeros((2, SLOTS_PER_DAY))
    if times_s:
        cal = calendar(np.asarray(times_s, dtype=np.int64), tz)
        slot = np.floor(cal.hour * 4).astype(np.int64) % SLOTS_PER_DAY
        np.add.at(pmf, (cal.weekend.astype(np.int64), slot), 1.0)
    for row in range(2):
        if pmf[row].sum() == 0:
            pmf[row] = pmf[1 - row] if pmf[1 - row].sum() > 0 else 1.0
        pmf[row] /= pmf[row].sum()
    return pmf


def fit_trip_model(
    days: Sequence[DailyEnergy],
    sessions: Sequence[SessionLog],
    tz: str,
    min_days: int = 20,
) -> TripModel:
    """Gamma laws per model and weekday by maximum likelihood, with pooled fall-backs.

    Raises:
        InvalidEvent: when the logs hold fewer than `min_days` driving days in all.
    """
    check_zone(tz)
    if min_days < 2:
        raise InvalidEvent(f"min_days {min_days} must be at least 2")
    km: list[FloatArray] = []
    model_of: list[str] = []
    weekday_of: list[IntArray] = []
    zero_weekday: list[IntArray] = []
    zero_model: list[str] = []
    for d in days:
        drive = d.driving
        km.append(d.energy_kwh[drive] / d.consumption_kwh_per_km)
        model_of += [d.model] * int(drive.sum())
        weekday_of.append(d.weekday[drive])
        zero_weekday.append(d.weekday[d.zero])
        zero_model += [d.model] * int(d.zero.sum())
    dist = np.concatenate(km) if km else np.zeros(0)
    wd = np.concatenate(weekday_of) if weekday_of else np.zeros(0, dtype=np.int64)
    models = np.array(model_of, dtype=object)
    zwd = np.concatenate(zero_weekday) if zero_weekday else np.zeros(0, dtype=np.int64)
    zmodels = np.array(zero_model, dtype=object)
    if dist.shape[0] < min_days:
        raise InvalidEvent(f"the logs hold {dist.shape[0]} driving days, need {min_days}")
    pooled = _law(dist, int(zwd.shape[0]), "pooled")
    laws: dict[tuple[str, int], GammaLaw] = {}
    for w in range(WEEKDAYS):
        at = wd == w
        if at.sum() >= min_days:
            laws[(POOLED, w)] = _law(dist[at], int((zwd == w).sum()), "pooled weekday")
        for model in sorted(set(model_of)):
            cell = at & (models == model)
            if cell.sum() >= min_days:
                zeros = int(((zwd == w) & (zmodels == model)).sum())
                laws[(model, w)] = _law(dist[cell], zeros, "model")
    consumption: dict[str, list[float]] = {}
    for d in days:
        consumption.setdefault(d.model, []).append(d.consumption_kwh_per_km)
    plug_in = [s.plug_in_s for log in sessions for s in log.sessions if s.complete]
    plug_out = [s.plug_out_s for log in sessions for s in log.sessions if s.complete]
    return TripModel(
        tz=tz,
        laws=laws,
        pooled=pooled,
        departure_pmf=_time_pmf(plug_out, tz),
        arrival_pmf=_time_pmf(plug_in, tz),
        measured_consumption={m: float(np.mean(v)) for m, v in consumption.items()},
    )


@dataclass(frozen=True, slots=True)
class NextDayNeeds:
    """Per car: the seed's forecast k * theta of a driving day, its quantiles, P(no driving)."""

    day: date
    vehicle_ids: tuple[str, ...]
    mean_kwh: FloatArray  # (N,) E~_{i,d+1} = k * theta (a driving day)
    p_zero: FloatArray  # (N,)
    levels: tuple[float, ...]
    quantile_kwh: FloatArray  # (N, L) Gamma quantiles of a driving day's energy


def next_day_needs(
    model: TripModel,
    cars: Sequence[FleetCar],
    day: date,
    levels: Sequence[float] = (0.5, 0.9, 0.95),
) -> NextDayNeeds:
    """The energy each car is expected to drive on `day` (a driving day), and its quantiles."""
    if any(not 0.0 < q < 1.0 for q in levels):
        raise InvalidEvent(f"levels {list(levels)} must lie in (0, 1)")
    weekday = day.weekday()
    laws = np.array([model.energy_law(car, weekday) for car in cars]).reshape(len(cars), 3)
    k, theta, p_zero = laws[:, 0], laws[:, 1], laws[:, 2]
    mean = k * theta
    # Gamma(k, theta) quantiles are theta times those of Gamma(k, 1): one ppf per distinct k.
    unit = {kk: stats.gamma.ppf(np.asarray(levels), kk) for kk in set(k.tolist())}
    quantiles = np.array([unit[kk] for kk in k.tolist()]).reshape(len(cars), len(levels))
    quantiles = quantiles * theta[:, None]
    return NextDayNeeds(
        day=day,
        vehicle_ids=tuple(c.vehicle_id for c in cars),
        mean_kwh=mean,
        p_zero=p_zero,
        levels=tuple(float(q) for q in levels),
        quantile_kwh=quantiles,
    )


@dataclass(frozen=True, slots=True)
class TripYear:
    """Monte-Carlo trips: per car and day, energy driven and when it left and came back."""

    vehicle_ids: tuple[str, ...]
    first_day: date
    energy_kwh: FloatArray  # (N, D) 0 on days without driving
    departure_slot: IntArray  # (N, D) slot of the local day (0..95) it leaves; -1 if it stays
    arrival_slot: IntArray  # (N, D) slot it is back and plugged in; -1 if it stays

    @property
    def days(self) -> int:
        """Number of days simulated."""
        return int(self.energy_kwh.shape[1])


def _sample_slots(cdf: FloatArray, u: FloatArray) -> IntArray:
    return np.minimum(np.searchsorted(cdf, u, side="right"), SLOTS_PER_DAY - 1).astype(np.int64)


def simulate_trip_year(
    model: TripModel,
    cars: Sequence[FleetCar],
    first_day: date,
    rng: np.random.Generator,
    days: int = 365,
) -> TripYear:
    """Draw `days` days of trips for every car (module docstring, step 4).

    A car drives with probability 1 - pi_{m,w}; a driving day's energy is
    Gamma(k_{m,w}, eta_i * theta_{m,w}); it leaves at a slot drawn from the measured plug-out
    times and is back at a later slot drawn from the measured plug-in times.
    """
    if days < 1:
        raise InvalidEvent(f"days {days} must be at least 1")
    n = len(cars)
    weekdays = np.array([(first_day + timedelta(days=d)).weekday() for d in range(days)])
    k = np.zeros((n, days))
    theta = np.zeros((n, days))
    p_zero = np.zeros((n, days))
    for i, car in enumerate(cars):
        for w in range(WEEKDAYS):
            ki, ti, pi = model.energy_law(car, w)
            at = weekdays == w
            k[i, at], theta[i, at], p_zero[i, at] = ki, ti, pi
    drives = rng.random((n, days)) >= p_zero
    energy = np.where(drives, rng.gamma(k, theta), 0.0)
    weekend = (weekdays >= 5).astype(np.int64)
    dep_cdf = np.cumsum(model.departure_pmf, axis=1)
    arr_cdf = np.cumsum(model.arrival_pmf, axis=1)
    departure = np.empty((n, days), dtype=np.int64)
    arrival = np.empty((n, days), dtype=np.int64)
    u_dep = rng.random((n, days))
    u_arr = rng.random((n, days))
    for row in (0, 1):
        cols = weekend == row
        # The last slot of the day leaves no room to come back: leave at 23:30 at the latest.
        dep = np.minimum(_sample_slots(dep_cdf[row], u_dep[:, cols]), SLOTS_PER_DAY - 2)
        # Arrival after departure: draw from the arrival law above the departure's slot.
        low = arr_cdf[row][dep]
        arr = _sample_slots(arr_cdf[row], low + u_arr[:, cols] * (1.0 - low))
        departure[:, cols] = dep
        arrival[:, cols] = np.maximum(arr, dep + 1)
    departure[~drives] = -1
    arrival[~drives] = -1
    return TripYear(
        vehicle_ids=tuple(c.vehicle_id for c in cars),
        first_day=first_day,
        energy_kwh=energy,
        departure_slot=departure,
        arrival_slot=arrival,
    )
