"""The price source: published day-ahead prices, then a same-hour, same-day-type forecast."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest

from adapters.datasets.tables import load_day_ahead_prices
from controller.forecast.prices import DayAheadPriceSource, PriceHistory, price_series

DATA = Path(__file__).resolve().parents[2] / "data"
AMS = ZoneInfo("Europe/Amsterdam")


@pytest.fixture(scope="module")
def history() -> PriceHistory:
    """The shipped NL day-ahead prices."""
    return load_day_ahead_prices(DATA / "prices" / "nl_dayahead_2015_2024.csv.gz")


def test_before_publication_tomorrow_is_a_forecast(history: PriceHistory) -> None:
    """At 10:00 only today's prices are published: forecast_from is local midnight."""
    now = datetime(2023, 5, 9, 10, 0, tzinfo=AMS)  # a Tuesday
    start = now.replace(hour=0)
    outlook = price_series(history, now, start, 192)
    assert outlook.forecast_from == 96
    known, _ = history.values_at(int(start.timestamp()) + 900 * np.arange(96, dtype=np.int64))
    assert np.array_equal(outlook.price_eur_per_kwh[:96], known)


def test_after_publication_tomorrow_is_known(history: PriceHistory) -> None:
    """At 14:00 tomorrow's auction result is out: two days are known, the third is forecast."""
    now = datetime(2023, 5, 9, 14, 0, tzinfo=AMS)
    start = now.replace(hour=0)
    outlook = price_series(history, now, start, 3 * 96)
    assert outlook.forecast_from == 2 * 96


def test_the_forecast_is_the_recent_same_hour_same_day_type_mean(history: PriceHistory) -> None:
    """Checked against pandas: mean over the last 4 weeks' working days at the same hour."""
    now = datetime(2023, 5, 9, 10, 0, tzinfo=AMS)
    outlook = price_series(history, now, now.replace(hour=0), 192)
    known_until = datetime(2023, 5, 10, tzinfo=AMS)
    series = pd.Series(
        history.price_eur_per_kwh,
        index=pd.date_range(
            datetime.fromtimestamp(history.start_s, tz=UTC),
            periods=history.price_eur_per_kwh.shape[0],
            freq="1h",
        ),
    ).tz_convert(AMS)
    window = series[
        (series.index >= known_until - timedelta(weeks=4)) & (series.index < known_until)
    ]
    workdays = window[window.index.day_of_week < 5]
    expected = workdays.groupby(workdays.index.hour).mean()
    wednesday = outlook.price_eur_per_kwh[96:]
    for hour in (0, 7, 12, 19):
        assert wednesday[4 * hour] == pytest.approx(expected[hour])
        assert wednesday[4 * hour + 3] == pytest.approx(expected[hour])


def test_past_the_history_everything_is_forecast_from_its_last_weeks(history: PriceHistory) -> None:
    """In 2026 (beyond the file) all slots are forecast, from the last published weeks."""
    source = DayAheadPriceSource(history)
    now = datetime(2026, 1, 5, 9, tzinfo=UTC)
    outlook = source.outlook(now, now, 96)
    assert outlook.forecast_from == 0
    assert np.all(np.isfinite(outlook.price_eur_per_kwh))
    event = outlook.to_event("prices-1", now)
    assert event.forecast_from == 0
    assert len(event.price_eur_per_kwh) == 96
