"""Held-out evaluation of the household model against a seasonal-naive baseline.

Weeks of the data are held out (every `every`-th week, counted from the start); the GAM is
fitted on the rest. On the held-out slots both forecasters give quantiles of the group's mean
load per household:

- the GAM: Gaussian with mean mu_g(t) and variance sigma_common^2 + sigma_ind^2 / N (N the
  households averaged);
- seasonal naive: the load at the same slot one week earlier, plus the empirical quantiles (by
  hour of day) of that forecast's errors on the training weeks.

Scores are the pinball (quantile) loss averaged over `PINBALL_LEVELS`, the mean absolute error of
the median, and the share of held-out slots inside the central 90 % interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from controller.errors import InvalidEvent
from controller.forecast.calendar import (
    DAY_S,
    BoolArray,
    FloatArray,
    IntArray,
    calendar,
)
from controller.forecast.household import GroupLoad, HouseholdModel

PINBALL_LEVELS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def pinball_loss(actual: FloatArray, predicted: FloatArray, level: float) -> float:
    """Mean pinball loss of `predicted` as the `level` quantile of `actual`."""
    if not 0.0 < level < 1.0:
        raise InvalidEvent(f"level {level} is outside (0, 1)")
    diff = np.asarray(actual, dtype=float) - np.asarray(predicted, dtype=float)
    return float(np.mean(np.maximum(level * diff, (level - 1.0) * diff)))


def interval_coverage(actual: FloatArray, low: FloatArray, high: FloatArray) -> float:
    """Share of `actual` inside [low, high]."""
    a = np.asarray(actual, dtype=float)
    return float(np.mean((a >= low) & (a <= high)))


def holdout_weeks(times_s: IntArray, every: int = 5, offset: int = 4) -> BoolArray:
    """Mask of held-out slots: whole 7-day blocks from the start with index % every == offset.

    The first block is never held out, so the seasonal-naive baseline always has a week before.
    """
    if every < 2 or not 0 < offset < every:
        raise InvalidEvent(f"hold-out every {every} weeks at offset {offset} is not usable")
    block = (np.asarray(times_s, dtype=np.int64) - int(times_s[0])) // (7 * DAY_S)
    return np.asarray(block % every == offset, dtype=bool)


@dataclass(frozen=True, slots=True)
class Score:
    """One forecaster's scores on one group's held-out slots (kW per household)."""

    forecaster: str  # "gam" or "seasonal_naive"
    group: str
    pinball_kw: float  # mean over PINBALL_LEVELS
    mae_kw: float
    coverage_90: float
    slots: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "forecaster": self.forecaster,
            "group": self.group,
            "pinball_kw": self.pinball_kw,
            "mae_kw": self.mae_kw,
            "coverage_90": self.coverage_90,
            "slots": self.slots,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Score:
        """Inverse of `to_dict`."""
        return cls(
            forecaster=str(data["forecaster"]),
            group=str(data["group"]),
            pinball_kw=float(data["pinball_kw"]),
            mae_kw=float(data["mae_kw"]),
            coverage_90=float(data["coverage_90"]),
            slots=int(data["slots"]),
        )


def _scores(
    name: str, group: str, actual: FloatArray, quantiles: Mapping[float, FloatArray]
) -> Score:
    pinball = float(np.mean([pinball_loss(actual, quantiles[q], q) for q in PINBALL_LEVELS]))
    return Score(
        forecaster=name,
        group=group,
        pinball_kw=pinball,
        mae_kw=float(np.mean(np.abs(actual - quantiles[0.5]))),
        coverage_90=interval_coverage(actual, quantiles[0.05], quantiles[0.95]),
        slots=int(actual.shape[0]),
    )


def evaluate_holdout(
    model: HouseholdModel, load: GroupLoad, held_out: BoolArray
) -> tuple[Score, Score]:
    """The GAM's and the seasonal-naive baseline's scores on the held-out slots.

    Raises:
        InvalidEvent: when nothing is held out, or a held-out slot has no week before it.
    """
    lag = 7 * DAY_S // load.step_s
    held = np.asarray(held_out, dtype=bool)
    if held.shape != load.mean_kw.shape or not held.any():
        raise InvalidEvent("evaluation: the hold-out mask is empty or of the wrong shape")
    if held[:lag].any():
        raise InvalidEvent("evaluation: a held-out slot has no week of data before it")
    train = ~held
    actual = load.mean_kw
    hour = np.floor(calendar(load.times_s, model.tz).hour).astype(np.int64)

    mu = model.mean_kw(load.times_s, load.price_eur_per_kwh)
    sd = np.sqrt(model.sigma_common_kw[hour] ** 2 + model.sigma_ind_kw[hour] ** 2 / load.households)
    gam_q = {q: mu + float(norm.ppf(q)) * sd for q in PINBALL_LEVELS}
    gam = _scores("gam", load.group, actual[held], {q: v[held] for q, v in gam_q.items()})

    naive = np.full(actual.shape[0], np.nan)
    naive[lag:] = actual[:-lag]
    errors = actual - naive
    fit_err = train & np.isfinite(errors)
    naive_q: dict[float, FloatArray] = {}
    for q in PINBALL_LEVELS:
        by_hour = np.array(
            [np.quantile(errors[fit_err & (hour == h)], q) for h in range(24)], dtype=float
        )
        naive_q[q] = naive + by_hour[hour]
    baseline = _scores(
        "seasonal_naive", load.group, actual[held], {q: v[held] for q, v in naive_q.items()}
    )
    return gam, baseline
