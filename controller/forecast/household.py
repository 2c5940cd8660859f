"""Household base load per tariff group: a GAM of the mean load per household, and its noise.

For tariff group g the load of one household in interval t is modelled as

    y_{i,t} = mu_g(t) + c_{g,t} + e_{i,t}

    mu_g(t) = a + gamma_{weekday(t)} + f_h(hour) + f_we(hour | Saturday, Sunday)
              + f_s(day of year) + f_hs(hour) * cos(season) + f_hc(hour) * sin(season)
              [+ beta_g * (p_t - p_bar_g)  for the market group]

with every f a cyclic cubic regression spline (statsmodels' `CyclicCubicSplines`, centred by
`constraints="center"`) whose penalty weight statsmodels' GLMGam chooses by generalised
cross-validation. `e_{i,t}` is each household's own deviation, independent between households,
with standard deviation sigma_ind(hour); `c_{g,t}` is the part every household of the group
shares (weather, holidays, whatever the calendar does not explain), sigma_common(hour). The
group's load for N_g households then has

    mean N_g * mu_g(t),    variance N_g * sigma_ind^2 + N_g^2 * sigma_common^2.

The seed's method names only the first variance term (independent households). On every panel
we tried the shared term dominates for thousands of households, and an interval without it covers
far less than it claims; docs/forecasting.md has the numbers.

The GAM is fitted to hourly means of the group's per-household load (the average of N households
has the same least-squares fit as the N households themselves, and hourly rows keep statsmodels'
penalty search fast); it is evaluated at any time of day, so forecasts come per 15 minutes.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.linalg
from statsmodels.gam.api import CyclicCubicSplines, GLMGam
from statsmodels.gam.smooth_basis import GenericSmoothers, UnivariateGenericSmoother
from threadpoolctl import threadpool_limits

from controller.errors import InvalidEvent
from controller.forecast.calendar import (
    HOUR_S,
    SLOT_S,
    BoolArray,
    Calendar,
    FloatArray,
    IntArray,
    calendar,
    check_zone,
)

TariffGroup = Literal["fixed", "market"]
GROUPS: tuple[TariffGroup, ...] = ("fixed", "market")

HOURS = 24
DAYS_PER_CYCLE = 366.0


def _check_group(group: str) -> TariffGroup:
    if group == "fixed":
        return "fixed"
    if group == "market":
        return "market"
    raise InvalidEvent(f"tariff group {group!r} is neither 'fixed' nor 'market'")


@dataclass(frozen=True, slots=True)
class GroupLoad:
    """A tariff group's measured load, per household and interval: what the GAM is fitted to.

    `mean_kw[t]` is the mean over the group's households of their mean power in interval t;
    `within_var_kw2[t]` the variance between households in that interval; `within_lag_cov_kw2[t]`
    the covariance between a household's deviation in t and in t + 1 (T - 1 values). Prices are
    those the group's households saw, EUR/kWh (needed for the market group).
    """

    group: TariffGroup
    times_s: IntArray  # (T,) interval starts, epoch seconds, regular
    step_s: int  # 900 or 3600
    households: int
    mean_kw: FloatArray  # (T,)
    within_var_kw2: FloatArray  # (T,)
    within_lag_cov_kw2: FloatArray  # (T - 1,)
    price_eur_per_kwh: FloatArray | None = None  # (T,)

    def __post_init__(self) -> None:
        ctx = f"group load {self.group!r}"
        _check_group(self.group)
        if self.step_s not in (SLOT_S, HOUR_S):
            raise InvalidEvent(f"{ctx}: step {self.step_s} s is neither 900 nor 3600")
        n = self.times_s.shape[0]
        if n < 2:
            raise InvalidEvent(f"{ctx}: needs at least two intervals, has {n}")
        if not np.all(np.diff(self.times_s) == self.step_s):
            raise InvalidEvent(f"{ctx}: times are not regular every {self.step_s} s")
        if self.households < 2:
            raise InvalidEvent(f"{ctx}: needs at least two households, has {self.households}")
        shapes = {
            "mean_kw": (self.mean_kw, n),
            "within_var_kw2": (self.within_var_kw2, n),
            "within_lag_cov_kw2": (self.within_lag_cov_kw2, n - 1),
        }
        if self.price_eur_per_kwh is not None:
            shapes["price_eur_per_kwh"] = (self.price_eur_per_kwh, n)
        for name, (values, length) in shapes.items():
            if values.shape != (length,):
                raise InvalidEvent(f"{ctx}: {name} has shape {values.shape}, not ({length},)")
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise InvalidEvent(f"{ctx}: {name}[{bad[0]}] is {values[bad[0]]}, not finite")
        if np.any(self.within_var_kw2 < 0):
            raise InvalidEvent(f"{ctx}: a between-household variance is negative")


@dataclass(frozen=True, slots=True)
class HouseholdPanel:
    """Smart-meter loads of households over one period, each with its tariff group."""

    household_ids: tuple[str, ...]
    tariffs: tuple[TariffGroup, ...]
    times_s: IntArray  # (T,) interval starts, epoch seconds, regular
    step_s: int
    load_kw: FloatArray  # (H, T) mean power per interval

    def __post_init__(self) -> None:
        h = len(self.household_ids)
        if h == 0 or len(set(self.household_ids)) != h:
            raise InvalidEvent("household panel: household ids must be present and distinct")
        if len(self.tariffs) != h:
            raise InvalidEvent("household panel: one tariff per household is needed")
        for tariff in self.tariffs:
            _check_group(tariff)
        n = self.times_s.shape[0]
        if self.load_kw.shape != (h, n):
            raise InvalidEvent(
                f"household panel: loads have shape {self.load_kw.shape}, not {(h, n)}"
            )
        if n < 2 or not np.all(np.diff(self.times_s) == self.step_s):
            raise InvalidEvent(f"household panel: times are not regular every {self.step_s} s")
        if not np.all(np.isfinite(self.load_kw)) or np.any(self.load_kw < 0):
            raise InvalidEvent("household panel: loads must be finite and non-negative")

    def group_loads(
        self, price_eur_per_kwh: FloatArray | None = None
    ) -> dict[TariffGroup, GroupLoad]:
        """Each tariff group's load (groups with fewer than two households are left out)."""
        out: dict[TariffGroup, GroupLoad] = {}
        tariffs = np.array(self.tariffs)
        for group in GROUPS:
            rows = np.flatnonzero(tariffs == group)
            if rows.size < 2:
                continue
            acc = GroupLoadAccumulator(group, self.times_s, self.step_s, price_eur_per_kwh)
            acc.add(self.load_kw[rows])
            out[group] = acc.result()
        return out


class GroupLoadAccumulator:
    """Builds a `GroupLoad` from households added in chunks, without keeping them all.

    Sums, sums of squares and lagged cross-products per interval are enough for the mean, the
    between-household variance and its lag-one covariance.
    """

    def __init__(
        self,
        group: TariffGroup,
        times_s: IntArray,
        step_s: int,
        price_eur_per_kwh: FloatArray | None = None,
    ) -> None:
        self._group = _check_group(group)
        self._times = np.asarray(times_s, dtype=np.int64)
        self._step = step_s
        self._price = price_eur_per_kwh
        n = self._times.shape[0]
        self._count = 0
        self._sum = np.zeros(n)
        self._sumsq = np.zeros(n)
        self._sumlag = np.zeros(n - 1)

    def add(self, loads_kw: FloatArray) -> None:
        """Add households: (households, T) mean power per interval, kW."""
        loads = np.asarray(loads_kw, dtype=float)
        if loads.ndim != 2 or loads.shape[1] != self._times.shape[0]:
            raise InvalidEvent(
                f"group {self._group!r}: loads have shape {loads.shape}, "
                f"not (households, {self._times.shape[0]})"
            )
        if not np.all(np.isfinite(loads)):
            raise InvalidEvent(f"group {self._group!r}: loads contain NaN or infinity")
        self._count += loads.shape[0]
        self._sum += loads.sum(axis=0)
        self._sumsq += np.einsum("ht,ht->t", loads, loads)
        self._sumlag += np.einsum("ht,ht->t", loads[:, :-1], loads[:, 1:])

    @property
    def households(self) -> int:
        """Households added so far."""
        return self._count

    def result(self) -> GroupLoad:
        """The group's load over the households added."""
        n = self._count
        if n < 2:
            raise InvalidEvent(f"group {self._group!r}: needs at least two households, has {n}")
        mean = self._sum / n
        var = np.maximum((self._sumsq - n * mean**2) / (n - 1), 0.0)
        lag = (self._sumlag - n * mean[:-1] * mean[1:]) / (n - 1)
        return GroupLoad(
            group=self._group,
            times_s=self._times.copy(),
            step_s=self._step,
            households=n,
            mean_kw=mean,
            within_var_kw2=var,
            within_lag_cov_kw2=lag,
            price_eur_per_kwh=None if self._price is None else np.asarray(self._price, float),
        )


@dataclass(frozen=True, slots=True)
class GamSpec:
    """The GAM's terms and basis sizes (basis functions per smooth before centring)."""

    hour_df: int = 12
    weekend_df: int = 10
    season_df: int = 8
    season_shape_df: int = 6
    price_term: bool = False
    # Nelder-Mead budget for statsmodels' GCV search over the four log penalty weights.
    max_penalty_evaluations: int = 300

    def __post_init__(self) -> None:
        for name in ("hour_df", "weekend_df", "season_df", "season_shape_df"):
            value = getattr(self, name)
            if not 4 <= value <= 40:
                raise InvalidEvent(f"GAM spec: {name} {value} is outside 4..40")
        if self.max_penalty_evaluations < 1:
            raise InvalidEvent("GAM spec: max_penalty_evaluations must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "hour_df": self.hour_df,
            "weekend_df": self.weekend_df,
            "season_df": self.season_df,
            "season_shape_df": self.season_shape_df,
            "price_term": self.price_term,
            "max_penalty_evaluations": self.max_penalty_evaluations,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GamSpec:
        """Inverse of `to_dict`."""
        return cls(
            hour_df=int(data["hour_df"]),
            weekend_df=int(data["weekend_df"]),
            season_df=int(data["season_df"]),
            season_shape_df=int(data["season_shape_df"]),
            price_term=bool(data["price_term"]),
            max_penalty_evaluations=int(data["max_penalty_evaluations"]),
        )


@functools.lru_cache(maxsize=32)
def _cyclic_smoother(period: float, low: float, df: int) -> Any:
    """statsmodels' centred cyclic cubic spline on [low, low + period).

    The basis is set up on a fixed grid that includes both ends of the cycle, so its knots and
    centring depend only on (period, df): a model rebuilt from its file evaluates exactly as
    the fitted one, whatever data it was fitted on.
    """
    grid = np.linspace(low, low + period, round(period * 4) + 1)
    return CyclicCubicSplines(grid[:, None], df=[df], constraints="center").smoothers[0]


def _basis(period: float, low: float, df: int, x: FloatArray) -> FloatArray:
    smoother = _cyclic_smoother(period, low, df)
    wrapped = low + np.mod(np.asarray(x, dtype=float) - low, period)
    return np.asarray(smoother.transform(wrapped), dtype=float)


def _penalty(period: float, low: float, df: int) -> FloatArray:
    return np.asarray(_cyclic_smoother(period, low, df).cov_der2, dtype=float)


@dataclass(frozen=True, slots=True)
class _Design:
    exog: FloatArray  # (n, k) intercept, weekday dummies, [price deviation]
    smooths: tuple[tuple[str, FloatArray, FloatArray, FloatArray], ...]  # name, x, basis, penalty


def _season_angle(cal: Calendar, hour_offset: float) -> FloatArray:
    return 2.0 * np.pi * (cal.day_of_year - 1.0 + hour_offset / 24.0) / DAYS_PER_CYCLE


def _design(
    spec: GamSpec,
    cal: Calendar,
    price_dev: FloatArray | None,
    hour_offset: float = 0.0,
) -> _Design:
    """The GAM's design at the given calendar points (hour_offset: where in the interval)."""
    n = cal.hour.shape[0]
    hour = cal.hour + hour_offset
    doy = cal.day_of_year + hour_offset / 24.0
    columns = [np.ones(n)] + [(cal.weekday == d).astype(float) for d in range(1, 7)]
    if spec.price_term:
        if price_dev is None:
            raise InvalidEvent("the market group's GAM needs prices")
        columns.append(np.asarray(price_dev, dtype=float))
    exog = np.column_stack(columns)
    b_hour = _basis(24.0, 0.0, spec.hour_df, hour)
    b_week = _basis(24.0, 0.0, spec.weekend_df, hour)
    b_shape = _basis(24.0, 0.0, spec.season_shape_df, hour)
    b_season = _basis(DAYS_PER_CYCLE, 1.0, spec.season_df, doy)
    angle = _season_angle(cal, hour_offset)
    sat = (cal.weekday == 5).astype(float)[:, None]
    sun = (cal.weekday == 6).astype(float)[:, None]
    p_week = _penalty(24.0, 0.0, spec.weekend_df)
    p_shape = _penalty(24.0, 0.0, spec.season_shape_df)
    smooths = (
        ("hour", hour, b_hour, _penalty(24.0, 0.0, spec.hour_df)),
        ("hour_weekend", hour, np.hstack([b_week * sat, b_week * sun]), _block(p_week, p_week)),
        ("season", doy, b_season, _penalty(DAYS_PER_CYCLE, 1.0, spec.season_df)),
        (
            "hour_season",
            hour,
            np.hstack([b_shape * np.cos(angle)[:, None], b_shape * np.sin(angle)[:, None]]),
            _block(p_shape, p_shape),
        ),
    )
    return _Design(exog=exog, smooths=smooths)


def _block(a: FloatArray, b: FloatArray) -> FloatArray:
    return np.asarray(scipy.linalg.block_diag(a, b), dtype=float)


def _full_matrix(design: _Design) -> FloatArray:
    return np.column_stack([design.exog] + [basis for _, _, basis, _ in design.smooths])


@dataclass(frozen=True, slots=True)
class _Tables:
    """Each GAM term on the grid of slot starts: lookups instead of spline evaluation."""

    weekday: FloatArray  # (7,) intercept + weekday effect
    hour: FloatArray  # (96,) f_h at each quarter-hour
    weekend: FloatArray  # (3, 96) 0 on working days, f_we for Saturday and Sunday
    season: FloatArray  # (366 * 96,) f_s at each quarter-hour of the cycle
    shape_cos: FloatArray  # (96,) f_hs, to be multiplied by cos(season angle)
    shape_sin: FloatArray  # (96,) f_hc, to be multiplied by sin(season angle)


@functools.lru_cache(maxsize=16)
def _term_tables(spec: GamSpec, params_bytes: bytes) -> _Tables:
    params = np.frombuffer(params_bytes, dtype=float)
    quarter = np.arange(96) / 4.0
    widths = [
        spec.hour_df - 1,
        2 * (spec.weekend_df - 1),
        spec.season_df - 1,
        2 * (spec.season_shape_df - 1),
    ]
    first = 7 + int(spec.price_term)
    bounds = np.cumsum([first, *widths])
    p_hour, p_week, p_season, p_shape = (params[a:b] for a, b in itertools.pairwise(bounds))
    b_week = _basis(24.0, 0.0, spec.weekend_df, quarter)
    half = spec.weekend_df - 1
    weekend = np.zeros((3, 96))
    weekend[1] = b_week @ p_week[:half]
    weekend[2] = b_week @ p_week[half:]
    b_shape = _basis(24.0, 0.0, spec.season_shape_df, quarter)
    k = spec.season_shape_df - 1
    doy = 1.0 + np.arange(int(DAYS_PER_CYCLE) * 96) / 96.0
    return _Tables(
        weekday=params[0] + np.concatenate([[0.0], params[1:7]]),
        hour=_basis(24.0, 0.0, spec.hour_df, quarter) @ p_hour,
        weekend=weekend,
        season=_basis(DAYS_PER_CYCLE, 1.0, spec.season_df, doy) @ p_season,
        shape_cos=b_shape @ p_shape[:k],
        shape_sin=b_shape @ p_shape[k:],
    )


@dataclass(frozen=True, slots=True)
class GamFitReport:
    """How the fit went: statsmodels' convergence flags, the penalties and fit statistics."""

    pirls_converged: bool
    penalty_search_converged: bool
    penalty_evaluations: int
    alpha: tuple[float, ...]  # penalty weight per smooth term, as chosen by GCV
    gcv: float
    edf: float  # effective degrees of freedom
    rows: int  # hourly rows fitted
    households: int
    beta_se: float | None = None  # standard error of beta (kW per EUR/kWh), market group

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "pirls_converged": self.pirls_converged,
            "penalty_search_converged": self.penalty_search_converged,
            "penalty_evaluations": self.penalty_evaluations,
            "alpha": list(self.alpha),
            "gcv": self.gcv,
            "edf": self.edf,
            "rows": self.rows,
            "households": self.households,
            "beta_se": self.beta_se,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GamFitReport:
        """Inverse of `to_dict`."""
        return cls(
            pirls_converged=bool(data["pirls_converged"]),
            penalty_search_converged=bool(data["penalty_search_converged"]),
            penalty_evaluations=int(data["penalty_evaluations"]),
            alpha=tuple(float(a) for a in data["alpha"]),
            gcv=float(data["gcv"]),
            edf=float(data["edf"]),
            rows=int(data["rows"]),
            households=int(data["households"]),
            beta_se=None if data.get("beta_se") is None else float(data["beta_se"]),
        )


@dataclass(frozen=True, slots=True)
class HouseholdModel:
    """A fitted tariff group: mu_g(t), beta_g and the hour-dependent noise of its households."""

    group: TariffGroup
    tz: str
    spec: GamSpec
    params: FloatArray  # exog parameters, then each smooth's, in statsmodels' order
    price_mean_eur_per_kwh: float  # p_bar: the mean price over the fitting period
    sigma_ind_kw: FloatArray  # (24,) one household's own deviation, sd by local hour
    sigma_common_kw: FloatArray  # (24,) the deviation all households share, sd by local hour
    phi_ind: float  # lag-one (15-min) autocorrelation of a household's own deviation
    phi_common: float  # lag-one (15-min) autocorrelation of the shared deviation
    report: GamFitReport
    step_s: int = SLOT_S  # resolution of the data the noise was measured at

    def __post_init__(self) -> None:
        ctx = f"household model {self.group!r}"
        _check_group(self.group)
        check_zone(self.tz)
        width = 7 + int(self.spec.price_term) + _smooth_width(self.spec)
        if self.params.shape != (width,):
            raise InvalidEvent(f"{ctx}: {self.params.shape[0]} parameters, the spec needs {width}")
        for name in ("sigma_ind_kw", "sigma_common_kw"):
            values = getattr(self, name)
            if values.shape != (HOURS,) or np.any(~np.isfinite(values)) or np.any(values < 0):
                raise InvalidEvent(f"{ctx}: {name} must be 24 finite non-negative values")
        for name in ("phi_ind", "phi_common"):
            if not -1.0 < getattr(self, name) < 1.0:
                raise InvalidEvent(f"{ctx}: {name} {getattr(self, name)} is outside (-1, 1)")
        if not np.all(np.isfinite(self.params)):
            raise InvalidEvent(f"{ctx}: parameters are not finite")

    @property
    def beta_kw_per_eur_per_kwh(self) -> float | None:
        """beta_g: the change of a household's mean load per EUR/kWh of price above p_bar."""
        return float(self.params[7]) if self.spec.price_term else None

    def mean_kw(
        self, times_s: IntArray, price_eur_per_kwh: FloatArray | None = None, hour_offset: float = 0
    ) -> FloatArray:
        """mu_g(t): the mean load of one household in the intervals starting at `times_s`.

        `hour_offset` moves the evaluation point inside the interval (hours); the GAM was fitted
        on hourly means and is evaluated at interval starts for 15-minute forecasts.
        """
        cal = calendar(times_s, self.tz)
        dev = None
        if self.spec.price_term:
            if price_eur_per_kwh is None:
                raise InvalidEvent(f"group {self.group!r}: the forecast needs prices")
            dev = np.asarray(price_eur_per_kwh, dtype=float) - self.price_mean_eur_per_kwh
        quarter = cal.hour * 4.0
        if hour_offset == 0 and np.all(quarter == np.round(quarter)):
            # Slot starts on the local quarter-hour: read the terms from tables (exact there).
            return self._tabulated(cal, dev)
        design = _design(self.spec, cal, dev, hour_offset)
        return _full_matrix(design) @ self.params

    def _tabulated(self, cal: Calendar, dev: FloatArray | None) -> FloatArray:
        tables = _term_tables(self.spec, self.params.tobytes())
        slot = np.round(cal.hour * 4.0).astype(np.int64) % 96
        day_slot = (
            np.round((cal.day_of_year - 1.0) * 96.0).astype(np.int64) % tables.season.shape[0]
        )
        angle = _season_angle(cal, 0.0)
        weekday = np.asarray(cal.weekday, dtype=np.int64)
        out = (
            tables.weekday[weekday]
            + tables.hour[slot]
            + tables.weekend[np.clip(weekday - 4, 0, 2), slot]
            + tables.season[day_slot]
            + tables.shape_cos[slot] * np.cos(angle)
            + tables.shape_sin[slot] * np.sin(angle)
        )
        if dev is not None:
            out = out + float(self.params[7]) * dev
        return np.asarray(out, dtype=float)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the model file's `households.<group>` entry)."""
        return {
            "group": self.group,
            "tz": self.tz,
            "spec": self.spec.to_dict(),
            "params": self.params.tolist(),
            "price_mean_eur_per_kwh": self.price_mean_eur_per_kwh,
            "sigma_ind_kw": self.sigma_ind_kw.tolist(),
            "sigma_common_kw": self.sigma_common_kw.tolist(),
            "phi_ind": self.phi_ind,
            "phi_common": self.phi_common,
            "report": self.report.to_dict(),
            "step_s": self.step_s,
            "beta_kw_per_eur_per_kwh": self.beta_kw_per_eur_per_kwh,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HouseholdModel:
        """Inverse of `to_dict`."""
        return cls(
            group=_check_group(str(data["group"])),
            tz=str(data["tz"]),
            spec=GamSpec.from_dict(data["spec"]),
            params=np.asarray(data["params"], dtype=float),
            price_mean_eur_per_kwh=float(data["price_mean_eur_per_kwh"]),
            sigma_ind_kw=np.asarray(data["sigma_ind_kw"], dtype=float),
            sigma_common_kw=np.asarray(data["sigma_common_kw"], dtype=float),
            phi_ind=float(data["phi_ind"]),
            phi_common=float(data["phi_common"]),
            report=GamFitReport.from_dict(data["report"]),
            step_s=int(data["step_s"]),
        )


def _smooth_width(spec: GamSpec) -> int:
    # Centring removes one column of each cyclic basis of df functions (df - 1 remain).
    return (
        (spec.hour_df - 1)
        + 2 * (spec.weekend_df - 1)
        + (spec.season_df - 1)
        + 2 * (spec.season_shape_df - 1)
    )


def _hourly(load: GroupLoad, mask: BoolArray) -> tuple[IntArray, FloatArray, FloatArray | None]:
    """Hourly means of the group's load over whole hours all of whose intervals are in `mask`."""
    if load.step_s == HOUR_S:
        keep = mask
        price = None if load.price_eur_per_kwh is None else load.price_eur_per_kwh[keep]
        return load.times_s[keep], load.mean_kw[keep], price
    per = HOUR_S // load.step_s
    first = int(np.argmax(load.times_s % HOUR_S == 0))
    hours = (load.times_s.shape[0] - first) // per
    sl = slice(first, first + hours * per)
    whole = mask[sl].reshape(hours, per).all(axis=1)
    times = load.times_s[sl].reshape(hours, per)[:, 0][whole]
    mean = load.mean_kw[sl].reshape(hours, per).mean(axis=1)[whole]
    price = None
    if load.price_eur_per_kwh is not None:
        price = load.price_eur_per_kwh[sl].reshape(hours, per).mean(axis=1)[whole]
    return times, mean, price


def _lag1(z: FloatArray, valid: BoolArray) -> float:
    """Lag-one autocorrelation of `z` over consecutive pairs that are both valid."""
    pair = valid[:-1] & valid[1:]
    if pair.sum() < 3:
        return 0.0
    a, b = z[:-1][pair], z[1:][pair]
    denom = math.sqrt(float(np.sum(a * a) * np.sum(b * b)))
    if denom == 0.0:
        return 0.0
    return float(np.clip(np.sum(a * b) / denom, -0.99, 0.99))


def calibration_weeks(
    times_s: IntArray, train: BoolArray, every: int = 5, offset: int = 2
) -> BoolArray:
    """Training slots set aside to measure the noise out of sample: 7-day blocks from the
    start with index % every == offset (none if that would leave too little to fit)."""
    block = (np.asarray(times_s, dtype=np.int64) - int(times_s[0])) // (7 * 86_400)
    calib = np.asarray(train & (block % every == offset), dtype=bool)
    if calib.sum() < 7 * 86_400 // (int(times_s[1] - times_s[0])):
        return np.zeros_like(calib)
    return calib


@dataclass(frozen=True, slots=True)
class _Prepared:
    times_h: IntArray
    design: _Design
    mean_h: FloatArray
    smoother: Any


def _prepare(
    load: GroupLoad, tz: str, spec: GamSpec, mask: BoolArray, price_mean: float
) -> _Prepared:
    times_h, mean_h, price_h = _hourly(load, mask)
    width = 7 + int(spec.price_term) + _smooth_width(spec)
    if times_h.shape[0] < 2 * width:
        raise InvalidEvent(
            f"group {load.group!r}: {times_h.shape[0]} whole training hours, need {2 * width}"
        )
    offset = 0.0 if load.step_s == HOUR_S else (HOUR_S - load.step_s) / 2 / HOUR_S
    dev_h = None if price_h is None or not spec.price_term else price_h - price_mean
    design = _design(spec, calendar(times_h, tz), dev_h, offset)
    smoothers = [
        UnivariateGenericSmoother(x, basis, None, None, penalty, variable_name=name)
        for name, x, basis, penalty in design.smooths
    ]
    x_matrix = np.column_stack([x for _, x, _, _ in design.smooths])
    return _Prepared(times_h, design, mean_h, GenericSmoothers(x_matrix, smoothers))


def _search_penalties(prepared: _Prepared, spec: GamSpec) -> tuple[FloatArray, bool, int]:
    """statsmodels' GCV search for the penalty weights: (alpha, converged, evaluations)."""
    k = len(prepared.design.smooths)
    model = GLMGam(
        prepared.mean_h, exog=prepared.design.exog, smoother=prepared.smoother, alpha=np.ones(k)
    )
    with warnings.catch_warnings():
        # statsmodels warns when a penalty makes the design rank-deficient during the search.
        warnings.simplefilter("ignore", category=RuntimeWarning)
        first = model.fit()  # select_penweight needs the model's scale from one fit
        # Nelder-Mead on log(alpha) from alpha = 1 with a wide first simplex (a factor e^2 per
        # penalty; scipy's default step is 0.00025 at 0, which "converges" at once). It stops
        # when the simplex spans less than e^0.5 in every penalty and GCV changes by less
        # than 1e-5 of its value.
        alpha, search, history = model.select_penweight(
            criterion="gcv",
            method="nm",
            maxfun=spec.max_penalty_evaluations,
            disp=False,
            xtol=0.5,
            ftol=1e-5 * float(first.gcv),
            initial_simplex=np.vstack([np.zeros(k), 2.0 * np.eye(k)]),
        )
    return np.atleast_1d(np.asarray(alpha, dtype=float)), int(search[4]) == 0, len(history["alpha"])


def _fit(prepared: _Prepared, alpha: FloatArray) -> Any:
    model = GLMGam(
        prepared.mean_h, exog=prepared.design.exog, smoother=prepared.smoother, alpha=alpha
    )
    return model.fit()


def fit_household_model(
    load: GroupLoad,
    tz: str,
    train: BoolArray | None = None,
    spec: GamSpec | None = None,
) -> HouseholdModel:
    """Fit mu_g (GLMGam, penalties by GCV) and the noise model on the intervals in `train`.

    Every fifth training week (`calibration_weeks`) is first left out: the GAM's penalties are
    chosen (statsmodels' GCV search) and fitted on the other weeks, and the shared noise
    sigma_common(hour) is measured on the weeks left out, where the GAM has not seen the data.
    In-sample residuals understate it: with autocorrelated errors GCV lets the smooths follow
    part of the noise. The GAM is then refitted on all training weeks with those penalties.

    Raises:
        InvalidEvent: for a market group without prices, or too little data to fit.
    """
    # One BLAS thread: the fit is thousands of small SVDs, which threads only slow down (and
    # on a shared machine, by a factor of ten).
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_household_model(load, tz, train, spec)


def _fit_household_model(
    load: GroupLoad, tz: str, train: BoolArray | None, spec: GamSpec | None
) -> HouseholdModel:
    check_zone(tz)
    if spec is None:
        spec = GamSpec(price_term=load.group == "market")
    n = load.times_s.shape[0]
    mask = np.ones(n, dtype=bool) if train is None else np.asarray(train, dtype=bool)
    if mask.shape != (n,):
        raise InvalidEvent(f"training mask has shape {mask.shape}, not ({n},)")
    if spec.price_term and load.price_eur_per_kwh is None:
        raise InvalidEvent(f"group {load.group!r}: a price term needs the prices the group saw")
    price_mean = 0.0
    if spec.price_term and load.price_eur_per_kwh is not None:
        price_mean = float(np.mean(load.price_eur_per_kwh[mask]))
    calib = calibration_weeks(load.times_s, mask)
    search_mask = mask & ~calib
    alpha, search_ok, evaluations = _search_penalties(
        _prepare(load, tz, spec, search_mask, price_mean), spec
    )
    held_back_model = None
    if calib.any():
        held_back = _prepare(load, tz, spec, search_mask, price_mean)
        first = _fit(held_back, alpha)
        first_report = _report(first, alpha, search_ok, evaluations, 0, load, spec)
        held_back_model = _model(load, tz, spec, first, price_mean, first_report)
    prepared = _prepare(load, tz, spec, mask, price_mean)
    result = _fit(prepared, alpha)
    rows = int(prepared.times_h.shape[0])
    report = _report(result, alpha, search_ok, evaluations, rows, load, spec)
    model = _model(load, tz, spec, result, price_mean, report)
    noise_model = held_back_model if held_back_model is not None else model
    noise_mask = calib if held_back_model is not None else mask
    return _with_noise(model, noise_model, load, mask, noise_mask)


def _report(
    result: Any,
    alpha: FloatArray,
    search_ok: bool,
    evaluations: int,
    rows: int,
    load: GroupLoad,
    spec: GamSpec,
) -> GamFitReport:
    return GamFitReport(
        pirls_converged=bool(result.converged),
        penalty_search_converged=search_ok,
        penalty_evaluations=evaluations,
        alpha=tuple(float(a) for a in alpha),
        gcv=float(result.gcv),
        edf=float(np.sum(result.edf)),
        rows=rows,
        households=load.households,
        beta_se=float(np.asarray(result.bse)[7]) if spec.price_term else None,
    )


def _model(
    load: GroupLoad, tz: str, spec: GamSpec, result: Any, price_mean: float, report: GamFitReport
) -> HouseholdModel:
    return HouseholdModel(
        group=load.group,
        tz=tz,
        spec=spec,
        params=np.asarray(result.params, dtype=float),
        price_mean_eur_per_kwh=price_mean,
        sigma_ind_kw=np.zeros(HOURS),
        sigma_common_kw=np.zeros(HOURS),
        phi_ind=0.0,
        phi_common=0.0,
        report=report,
        step_s=load.step_s,
    )


def _with_noise(
    model: HouseholdModel,
    noise_model: HouseholdModel,
    load: GroupLoad,
    mask: BoolArray,
    noise_mask: BoolArray,
) -> HouseholdModel:
    """`model` with its noise: sigma_common from `noise_model`'s residuals on `noise_mask`,
    sigma_ind and the autocorrelations from the training intervals `mask`."""
    hour = np.floor(calendar(load.times_s, model.tz).hour).astype(np.int64)
    resid_noise = load.mean_kw - noise_model.mean_kw(load.times_s, load.price_eur_per_kwh)
    sigma_ind = np.zeros(HOURS)
    sigma_common = np.zeros(HOURS)
    for h in range(HOURS):
        at = mask & (hour == h)
        at_noise = noise_mask & (hour == h)
        if not at.any() or not at_noise.any():
            raise InvalidEvent(f"group {load.group!r}: no training data at {h:02d}:00")
        var_ind = float(np.mean(load.within_var_kw2[at]))
        # The group mean still carries var_ind / N of independent noise: take it out.
        var_common = float(np.mean(resid_noise[at_noise] ** 2)) - var_ind / load.households
        sigma_ind[h] = math.sqrt(var_ind)
        sigma_common[h] = math.sqrt(max(var_common, 0.0))
    resid = load.mean_kw - model.mean_kw(load.times_s, load.price_eur_per_kwh)
    z = resid / np.maximum(sigma_common[hour], 1e-12)
    phi_common = _lag1(z, mask)
    pair = mask[:-1] & mask[1:]
    var_mean = float(np.mean(load.within_var_kw2[:-1][pair])) if pair.any() else 0.0
    phi_ind = float(np.mean(load.within_lag_cov_kw2[pair])) / var_mean if var_mean > 0 else 0.0
    return HouseholdModel(
        group=model.group,
        tz=model.tz,
        spec=model.spec,
        params=model.params,
        price_mean_eur_per_kwh=model.price_mean_eur_per_kwh,
        sigma_ind_kw=sigma_ind,
        sigma_common_kw=sigma_common,
        phi_ind=float(np.clip(phi_ind, -0.99, 0.99)),
        phi_common=phi_common,
        report=model.report,
        step_s=model.step_s,
    )


def common_residuals(model: HouseholdModel, load: GroupLoad) -> FloatArray:
    """(T,) the group mean's deviation from mu_g: the shared part plus averaged-out noise."""
    return load.mean_kw - model.mean_kw(load.times_s, load.price_eur_per_kwh)


@dataclass(frozen=True, slots=True)
class BaseLoadModel:
    """The fitted tariff groups and how their shared deviations move together."""

    groups: tuple[HouseholdModel, ...]
    # (G, G) correlation of the groups' shared deviations, in the order of `groups`.
    common_correlation: FloatArray = field(default_factory=lambda: np.ones((1, 1)))

    def __post_init__(self) -> None:
        names = [m.group for m in self.groups]
        if not names or len(set(names)) != len(names):
            raise InvalidEvent(f"base load model: groups must be distinct and present: {names}")
        if len({m.tz for m in self.groups}) != 1:
            raise InvalidEvent("base load model: all groups must use one time zone")
        g = len(names)
        corr = self.common_correlation
        if corr.shape != (g, g) or not np.allclose(corr, corr.T) or np.any(np.abs(corr) > 1):
            raise InvalidEvent(f"base load model: correlation must be a ({g}, {g}) correlation")
        if not np.allclose(np.diag(corr), 1.0):
            raise InvalidEvent("base load model: correlation's diagonal must be 1")

    @property
    def tz(self) -> str:
        """The local zone of the households' calendar."""
        return self.groups[0].tz

    def group(self, name: str) -> HouseholdModel:
        """The model of tariff group `name`."""
        for model in self.groups:
            if model.group == name:
                return model
        raise InvalidEvent(f"no household model for tariff group {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "groups": [m.to_dict() for m in self.groups],
            "common_correlation": self.common_correlation.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaseLoadModel:
        """Inverse of `to_dict`."""
        return cls(
            groups=tuple(HouseholdModel.from_dict(g) for g in data["groups"]),
            common_correlation=np.asarray(data["common_correlation"], dtype=float),
        )


def correlate_groups(
    models: tuple[HouseholdModel, ...], loads: tuple[GroupLoad, ...], train: BoolArray
) -> FloatArray:
    """(G, G) correlation of the groups' standardised shared deviations on common intervals."""
    g = len(models)
    if g != len(loads):
        raise InvalidEvent("one group load per model is needed")
    if any(not np.array_equal(loads[0].times_s, load.times_s) for load in loads):
        raise InvalidEvent("the groups' loads must cover the same intervals")
    z = []
    hour = np.floor(calendar(loads[0].times_s, models[0].tz).hour).astype(np.int64)
    for model, load in zip(models, loads, strict=True):
        resid = common_residuals(model, load)
        z.append(resid[train] / np.maximum(model.sigma_common_kw[hour[train]], 1e-12))
    corr = np.corrcoef(np.vstack(z)) if g > 1 else np.ones((1, 1))
    corr = np.clip(np.asarray(corr, dtype=float), -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    return np.asarray(corr, dtype=float)
