"""Head-room h_t = site capacity - household base load: mean, quantiles and sample paths.

For tariff groups g with N_g households the base load in slot t is Gaussian with

    mean  sum_g N_g mu_g(t)
    var   sum_g N_g sigma_ind,g(h)^2                                  (independent households)
        + sum_g sum_g' N_g N_g' rho_gg' sigma_common,g(h) sigma_common,g'(h)   (shared part)

with h the slot's local hour. h_t has the same variance and mean C - base load. A planner that
wants to exceed the real head-room in at most 5 % of slots plans on `assured_kw(0.95)`, the 5 %
quantile of h_t. Sample paths keep each part's lag-one autocorrelation (AR(1) per 15-minute
slot), so a path's evening peak lasts as long as real ones do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from scipy.stats import norm

from controller.errors import InvalidEvent
from controller.forecast.calendar import FloatArray, IntArray, calendar, slot_times
from controller.forecast.household import BaseLoadModel

LEVELS = (0.5, 0.9, 0.95, 0.99)


@dataclass(frozen=True, slots=True)
class BaseLoadForecast:
    """The households' total load per slot: Gaussian, with its parts kept for sampling."""

    times_s: IntArray  # (T,)
    mean_kw: FloatArray  # (T,)
    sd_ind_kw: FloatArray  # (T,) independent-household part, all groups together
    sd_common_kw: FloatArray  # (G, T) shared part of each group (already times N_g)
    common_correlation: FloatArray  # (G, G)
    phi_ind: float
    phi_common: FloatArray  # (G,)

    @property
    def sd_kw(self) -> FloatArray:
        """(T,) total standard deviation."""
        s = self.sd_common_kw
        common = np.einsum("gt,gh,ht->t", s, self.common_correlation, s)
        return np.asarray(np.sqrt(self.sd_ind_kw**2 + np.maximum(common, 0.0)), dtype=float)

    def quantile_kw(self, level: float) -> FloatArray:
        """(T,) the `level` quantile of the base load."""
        _check_level(level)
        return self.mean_kw + float(norm.ppf(level)) * self.sd_kw

    def sample_paths(self, rng: np.random.Generator, paths: int) -> FloatArray:
        """(paths, T) base-load paths with the forecast's marginals and AR(1) persistence."""
        if paths < 1:
            raise InvalidEvent(f"paths {paths} must be at least 1")
        n_slots = self.mean_kw.shape[0]
        groups = self.sd_common_kw.shape[0]
        chol = _safe_cholesky(self.common_correlation)
        shocks = rng.standard_normal((paths, groups, n_slots))
        shocks = np.einsum("gh,pht->pgt", chol, shocks)
        common = _ar1(shocks, self.phi_common[None, :, None])
        ind = _ar1(rng.standard_normal((paths, 1, n_slots)), np.array(self.phi_ind))[:, 0, :]
        total = np.einsum("pgt,gt->pt", common, self.sd_common_kw) + ind * self.sd_ind_kw
        return np.asarray(self.mean_kw[None, :] + total, dtype=float)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise InvalidEvent(f"level {level} is outside (0, 1)")


def _safe_cholesky(corr: FloatArray) -> FloatArray:
    g = corr.shape[0]
    jitter = 0.0
    for _ in range(6):
        try:
            return np.asarray(np.linalg.cholesky(corr + jitter * np.eye(g)), dtype=float)
        except np.linalg.LinAlgError:
            jitter = 1e-9 if jitter == 0.0 else jitter * 100
    raise InvalidEvent("group correlation is not positive semi-definite")


def _ar1(shocks: FloatArray, phi: FloatArray) -> FloatArray:
    """Stationary unit-variance AR(1) along the last axis driven by standard normal shocks."""
    out = np.empty_like(shocks)
    out[..., 0] = shocks[..., 0]
    phi_b = np.broadcast_to(phi, shocks.shape)[..., 0]
    scale = np.sqrt(1.0 - phi_b**2)
    for t in range(1, shocks.shape[-1]):
        out[..., t] = phi_b * out[..., t - 1] + scale * shocks[..., t]
    return out


def base_load_forecast(
    model: BaseLoadModel,
    times_s: IntArray,
    households: Mapping[str, int],
    price_eur_per_kwh: FloatArray | None = None,
) -> BaseLoadForecast:
    """The base load of `households[g]` households of each group in the slots at `times_s`.

    Raises:
        InvalidEvent: for a group without a model, a negative count, or missing prices for
            the market group.
    """
    unknown = set(households) - {m.group for m in model.groups}
    if unknown:
        raise InvalidEvent(f"no household model for tariff group(s) {sorted(unknown)}")
    n_slots = times_s.shape[0]
    hour = np.floor(calendar(times_s, model.tz).hour).astype(np.int64)
    mean = np.zeros(n_slots)
    var_ind = np.zeros(n_slots)
    weighted_phi_ind = 0.0
    sd_common = np.zeros((len(model.groups), n_slots))
    for k, group in enumerate(model.groups):
        count = int(households.get(group.group, 0))
        if count < 0:
            raise InvalidEvent(f"household count for {group.group!r} is negative: {count}")
        if count == 0:
            continue
        mean += count * group.mean_kw(times_s, price_eur_per_kwh)
        part = count * group.sigma_ind_kw[hour] ** 2
        var_ind += part
        weighted_phi_ind += group.phi_ind * float(part.sum())
        sd_common[k] = count * group.sigma_common_kw[hour]
    total_ind = float(var_ind.sum())
    return BaseLoadForecast(
        times_s=np.asarray(times_s, dtype=np.int64),
        mean_kw=mean,
        sd_ind_kw=np.sqrt(var_ind),
        sd_common_kw=sd_common,
        common_correlation=model.common_correlation,
        phi_ind=weighted_phi_ind / total_ind if total_ind > 0 else 0.0,
        phi_common=np.array([g.phi_common for g in model.groups]),
    )


@dataclass(frozen=True, slots=True)
class HeadroomForecast:
    """h_t = capacity - base load per 15-minute slot from `start`."""

    start: datetime
    capacity_kw: float
    base: BaseLoadForecast

    @property
    def mean_kw(self) -> FloatArray:
        """(T,) expected head-room."""
        return self.capacity_kw - self.base.mean_kw

    @property
    def sd_kw(self) -> FloatArray:
        """(T,) standard deviation of the head-room."""
        return self.base.sd_kw

    def assured_kw(self, level: float) -> FloatArray:
        """(T,) head-room that is there with probability `level` (its 1 - level quantile)."""
        return self.capacity_kw - self.base.quantile_kw(level)

    def quantile_kw(self, level: float) -> FloatArray:
        """(T,) the `level` quantile of h_t itself."""
        return self.capacity_kw - self.base.quantile_kw(1.0 - level)

    def sample_paths(self, rng: np.random.Generator, paths: int) -> FloatArray:
        """(paths, T) head-room paths: capacity minus base-load paths."""
        return self.capacity_kw - self.base.sample_paths(rng, paths)


def forecast_headroom(
    model: BaseLoadModel,
    start: datetime,
    slots: int,
    capacity_kw: float,
    households: Mapping[str, int],
    price_eur_per_kwh: FloatArray | None = None,
) -> HeadroomForecast:
    """The head-room forecast for `slots` 15-minute slots from `start`."""
    if not capacity_kw >= 0.0:
        raise InvalidEvent(f"capacity {capacity_kw} kW must be a non-negative number")
    times = slot_times(start, slots)
    base = base_load_forecast(model, times, households, price_eur_per_kwh)
    return HeadroomForecast(start=start, capacity_kw=float(capacity_kw), base=base)
