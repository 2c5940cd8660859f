"""Calendar features of UTC instants in a local time zone: what the household models see.

Times inside the forecasting code are numpy int64 seconds since the Unix epoch (UTC); people
live by the local clock, so hour of day, weekday and day of year are taken in the site's zone
(daylight saving time included).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np
from numpy.typing import NDArray

from controller.errors import InvalidEvent

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

SLOT_S = 900
HOUR_S = 3600
DAY_S = 86_400
WEEK_SLOTS = 7 * 96


def epoch_s(at: datetime) -> int:
    """Seconds since the Unix epoch of an aware datetime."""
    if at.tzinfo is None:
        raise InvalidEvent(f"time {at.isoformat()} has no time zone")
    return int(at.timestamp())


def from_epoch_s(seconds: int) -> datetime:
    """The aware UTC datetime of an epoch second."""
    return datetime.fromtimestamp(int(seconds), tz=UTC)


def slot_times(start: datetime, slots: int, step_s: int = SLOT_S) -> IntArray:
    """(slots,) epoch seconds of `slots` consecutive intervals of `step_s` from `start`."""
    if slots < 0:
        raise InvalidEvent(f"slots {slots} is negative")
    return epoch_s(start) + step_s * np.arange(slots, dtype=np.int64)


def check_zone(tz: str) -> ZoneInfo:
    """The zone called `tz`, or InvalidEvent naming it."""
    try:
        return ZoneInfo(tz)
    except (KeyError, ValueError) as exc:
        raise InvalidEvent(f"unknown time zone {tz!r}") from exc


@dataclass(frozen=True, slots=True)
class Calendar:
    """Local calendar features of a run of instants, one entry per instant."""

    hour: FloatArray  # local clock hour, fractional: 7.25 is 07:15
    weekday: IntArray  # 0 = Monday .. 6 = Sunday
    day_of_year: FloatArray  # 1 .. 366, fractional within the day
    local_day: IntArray  # days since 1970-01-01 of the local date

    @property
    def weekend(self) -> BoolArray:
        """Saturday or Sunday."""
        return self.weekday >= 5


def _offset_s(seconds: int, zone: ZoneInfo) -> int:
    offset = datetime.fromtimestamp(seconds, tz=UTC).astimezone(zone).utcoffset()
    return 0 if offset is None else int(offset.total_seconds())


def utc_offsets_s(times_s: IntArray, tz: str) -> IntArray:
    """(n,) the zone's UTC offset (seconds) at each instant, daylight saving time included.

    Offsets are looked up once per distinct UTC hour (zones change offset on whole hours), so
    a day-long horizon costs a few dozen lookups, not one pandas conversion.
    """
    zone = check_zone(tz)
    t = np.asarray(times_s, dtype=np.int64)
    hours, inverse = np.unique(t // HOUR_S, return_inverse=True)
    offsets = np.array([_offset_s(int(h) * HOUR_S, zone) for h in hours], dtype=np.int64)
    return offsets[inverse.reshape(-1)]


def calendar(times_s: IntArray, tz: str) -> Calendar:
    """The local calendar features of `times_s` (epoch seconds) in zone `tz`."""
    t = np.asarray(times_s, dtype=np.int64)
    local = t + utc_offsets_s(t, tz)
    local_day = local // DAY_S
    seconds = local - local_day * DAY_S
    hour = seconds / HOUR_S
    days = local_day.astype("datetime64[D]")
    year_start = days.astype("datetime64[Y]").astype("datetime64[D]")
    doy = (days - year_start).astype(np.int64) + 1
    return Calendar(
        hour=hour.astype(float),
        weekday=((local_day + 3) % 7).astype(np.int64),  # 1970-01-01 was a Thursday
        day_of_year=doy.astype(float) + hour / 24.0,
        local_day=local_day.astype(np.int64),
    )
