"""Energy prices over the planning horizon: published day-ahead prices, then a forecast.

Day-ahead prices for delivery day D are published around 12:45 CET on D - 1 (the EPEX/Nord Pool
auction closes at 12:00). At time `now`, prices are therefore known up to the end of today, or
of tomorrow once `publish_hour` has passed locally. For the rest of the horizon the price of a
slot is forecast as the mean of the known prices at the same local hour on days of the same type
(working day, or weekend) over the recent `weeks` weeks. The outlook says from which slot on its
values are forecasts (`forecast_from`, as `controller.events.PriceUpdated` carries it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import numpy as np

from controller.domain import slot_floor
from controller.errors import InvalidEvent
from controller.events import PriceUpdated
from controller.forecast.calendar import (
    DAY_S,
    HOUR_S,
    SLOT_S,
    FloatArray,
    IntArray,
    calendar,
    check_zone,
    epoch_s,
    from_epoch_s,
    slot_times,
)

DEFAULT_PRICE_ZONE = "Europe/Amsterdam"


@dataclass(frozen=True, slots=True)
class PriceHistory:
    """Known day-ahead prices: a regular series from `start_s` (epoch seconds), EUR/kWh."""

    start_s: int
    step_s: int
    price_eur_per_kwh: FloatArray

    def __post_init__(self) -> None:
        if self.step_s not in (SLOT_S, HOUR_S):
            raise InvalidEvent(f"price history: step {self.step_s} s is neither 900 nor 3600")
        if self.start_s % self.step_s != 0:
            raise InvalidEvent("price history: start is not on the step's grid")
        values = self.price_eur_per_kwh
        if values.ndim != 1 or values.shape[0] == 0:
            raise InvalidEvent("price history: needs a non-empty 1-D series")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise InvalidEvent(f"price history: value {bad[0]} is not finite")

    @property
    def end_s(self) -> int:
        """End of the last interval with a price (epoch seconds)."""
        return self.start_s + self.step_s * int(self.price_eur_per_kwh.shape[0])

    def values_at(self, times_s: IntArray) -> tuple[FloatArray, np.ndarray]:
        """Prices of the intervals containing `times_s`, and a mask of which are covered."""
        index = (np.asarray(times_s, dtype=np.int64) - self.start_s) // self.step_s
        covered = (index >= 0) & (index < self.price_eur_per_kwh.shape[0])
        values = np.zeros(index.shape[0])
        values[covered] = self.price_eur_per_kwh[index[covered]]
        return values, covered

    def window(self, start_s: int, end_s: int) -> PriceHistory:
        """The part of the history in [start_s, end_s) (at least one interval)."""
        first = max(0, (start_s - self.start_s) // self.step_s)
        last = min(self.price_eur_per_kwh.shape[0], -(-(end_s - self.start_s) // self.step_s))
        if last <= first:
            raise InvalidEvent("price history: no prices in the requested window")
        return PriceHistory(
            start_s=self.start_s + first * self.step_s,
            step_s=self.step_s,
            price_eur_per_kwh=self.price_eur_per_kwh[first:last].copy(),
        )


@dataclass(frozen=True, slots=True)
class PriceOutlook:
    """Prices per 15-minute slot from `start`; values from `forecast_from` on are forecasts."""

    start: datetime
    price_eur_per_kwh: FloatArray  # (slots,)
    forecast_from: int | None

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.start != slot_floor(self.start):
            raise InvalidEvent(f"price outlook: start {self.start} is not an aware slot start")
        n = self.price_eur_per_kwh.shape[0]
        if self.forecast_from is not None and not 0 <= self.forecast_from < n:
            raise InvalidEvent(f"price outlook: forecast_from {self.forecast_from} outside 0..{n}")

    def to_event(self, event_id: str, at: datetime) -> PriceUpdated:
        """The outlook as the event the controller consumes."""
        return PriceUpdated(
            event_id=event_id,
            at=at,
            start=self.start,
            price_eur_per_kwh=tuple(float(v) for v in self.price_eur_per_kwh),
            forecast_from=self.forecast_from,
        )


class PriceSource(Protocol):
    """Where the planner's prices come from: known where published, forecast beyond."""

    def outlook(self, now: datetime, start: datetime, slots: int) -> PriceOutlook:
        """Prices for `slots` 15-minute slots from `start`, as known at `now`."""
        ...


def published_until(now: datetime, tz: str = DEFAULT_PRICE_ZONE, publish_hour: int = 13) -> int:
    """Epoch second up to which day-ahead prices are published at `now`.

    That is the end of today (local), or of tomorrow once the local clock has passed
    `publish_hour` (results are out around 12:45 CET; 13:00 leaves a margin).
    """
    zone = ZoneInfo(check_zone(tz).key)
    local = now.astimezone(zone)
    days = 2 if local.hour >= publish_hour else 1
    end_day = (local + timedelta(days=days)).date()
    return epoch_s(datetime(end_day.year, end_day.month, end_day.day, tzinfo=zone))


def _day_type(weekday: IntArray) -> IntArray:
    return (weekday >= 5).astype(np.int64)


def price_series(
    history: PriceHistory,
    now: datetime,
    start: datetime,
    slots: int,
    *,
    tz: str = DEFAULT_PRICE_ZONE,
    weeks: int = 4,
    publish_hour: int = 13,
) -> PriceOutlook:
    """Known prices where published at `now`, then a same-hour, same-day-type forecast.

    Raises:
        InvalidEvent: when no price at all is known before the first slot to forecast.
    """
    if slots < 1:
        raise InvalidEvent(f"price series: slots {slots} must be at least 1")
    if weeks < 1:
        raise InvalidEvent(f"price series: weeks {weeks} must be at least 1")
    start = slot_floor(start)
    times = slot_times(start, slots)
    known_until = min(published_until(now, tz, publish_hour), history.end_s)
    values, covered = history.values_at(times)
    known = covered & (times < known_until)
    unknown = np.flatnonzero(~known)
    if unknown.size == 0:
        return PriceOutlook(start=start, price_eur_per_kwh=values, forecast_from=None)
    forecast_from = int(unknown[0])
    values[forecast_from:] = _forecast(history, times[forecast_from:], known_until, tz, weeks)
    return PriceOutlook(start=start, price_eur_per_kwh=values, forecast_from=forecast_from)


def _forecast(
    history: PriceHistory, times_s: IntArray, known_until: int, tz: str, weeks: int
) -> FloatArray:
    window_start = max(history.start_s, known_until - weeks * 7 * DAY_S)
    if known_until <= history.start_s:
        raise InvalidEvent(
            f"price series: no published price before {from_epoch_s(known_until).isoformat()}"
        )
    past = history.window(window_start, known_until)
    past_times = past.start_s + past.step_s * np.arange(past.price_eur_per_kwh.shape[0])
    per_day = DAY_S // past.step_s
    past_cal = calendar(past_times, tz)
    past_key = _day_type(past_cal.weekday) * per_day + np.floor(
        past_cal.hour * per_day / 24.0
    ).astype(np.int64)
    sums = np.bincount(past_key, weights=past.price_eur_per_kwh, minlength=2 * per_day)
    counts = np.bincount(past_key, minlength=2 * per_day)
    # A key never seen (a short history) falls back to the same hour on any day, then to all.
    hour_sums = sums[:per_day] + sums[per_day:]
    hour_counts = counts[:per_day] + counts[per_day:]
    overall = float(np.mean(past.price_eur_per_kwh))
    cal = calendar(times_s, tz)
    slot_of_day = np.floor(cal.hour * per_day / 24.0).astype(np.int64)
    key = _day_type(cal.weekday) * per_day + slot_of_day
    out = np.full(times_s.shape[0], overall)
    by_hour = hour_counts[slot_of_day] > 0
    out[by_hour] = hour_sums[slot_of_day[by_hour]] / hour_counts[slot_of_day[by_hour]]
    by_key = counts[key] > 0
    out[by_key] = sums[key[by_key]] / counts[key[by_key]]
    return out


@dataclass(frozen=True, slots=True)
class DayAheadPriceSource:
    """`PriceSource` over a known day-ahead history (a file, or a feed that appends to it)."""

    history: PriceHistory
    tz: str = DEFAULT_PRICE_ZONE
    weeks: int = 4
    publish_hour: int = 13

    def outlook(self, now: datetime, start: datetime, slots: int) -> PriceOutlook:
        """Prices for `slots` slots from `start`, known where published at `now`."""
        return price_series(
            self.history,
            now,
            start,
            slots,
            tz=self.tz,
            weeks=self.weeks,
            publish_hour=self.publish_hour,
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings (not the history) in JSON-ready form."""
        return {"tz": self.tz, "weeks": self.weeks, "publish_hour": self.publish_hour}

    @classmethod
    def from_dict(cls, history: PriceHistory, data: Mapping[str, Any]) -> DayAheadPriceSource:
        """Inverse of `to_dict`, given the history."""
        return cls(
            history=history,
            tz=str(data["tz"]),
            weeks=int(data["weeks"]),
            publish_hour=int(data["publish_hour"]),
        )


def prices_on_slots(history: PriceHistory, times_s: IntArray) -> FloatArray:
    """The known price of each slot (for fitting: every slot must be covered)."""
    values, covered = history.values_at(times_s)
    if not covered.all():
        first = int(np.flatnonzero(~covered)[0])
        raise InvalidEvent(
            f"no known price at {from_epoch_s(int(times_s[first])).isoformat()}: "
            f"the price history covers {from_epoch_s(history.start_s).isoformat()} to "
            f"{from_epoch_s(history.end_s).isoformat()}"
        )
    return values
