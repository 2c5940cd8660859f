"""The built household panel: thousands of households made from real load profiles.

No package ships a tariff-labelled smart-meter panel, so voltpool builds one the seed's way
(docs/data.md explains every choice):

- Each household has a type: one of SimBench's five household profiles `H0-A/B/C/G/L`, drawn with
  the shares of SimBench's 28,777 low-voltage loads that use them, or (with `uci_share`) the UCI
  home in Sceaux, the only real metered European home a package ships.
- Scale: a SimBench household's load is its profile (peak 1) times a peak power drawn from the
  peak powers SimBench gives the loads of that type (1-12 kW). A UCI household is the Sceaux
  home scaled to the annual energy of a randomly drawn SimBench household.
- Days: every household takes each day from its profile's own year, but from a day of the same
  kind (working day, or weekend day) of the same week, chosen at random, and shifted by up to
  `shift_slots` quarter-hours; UCI households take the matching day of one of 2007-2009 (same
  weekday, nearest date). Households thus differ while the group keeps the week's real weather.
- Tariff: each household is in the market group with probability `market_share`, independent of
  its type. Market households respond to the day-ahead price: they add
  beta_i * (p_t - p_bar) kW, with beta_i = beta * E_i / mean(E) (E the annual energies), so the
  group's mean response is exactly `beta`. Loads are floored at 0 kW; the share floored is
  reported (it biases the response a little).

Households are generated in chunks and only the groups' sums are kept, so 5,000 households over a
year take a few seconds and little memory; any household can be generated again on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from adapters.datasets._csv import FloatArray, IntArray, line_of, parse_numbers, read_table
from adapters.datasets.errors import DataFileError
from adapters.datasets.tables import ProfileTable, load_day_ahead_prices, load_profile_table
from controller.errors import InvalidEvent
from controller.forecast.calendar import DAY_S, SLOT_S, calendar, from_epoch_s
from controller.forecast.household import (
    GROUPS,
    GroupLoad,
    GroupLoadAccumulator,
    HouseholdPanel,
    TariffGroup,
)
from controller.forecast.prices import PriceHistory, prices_on_slots

PROFILE_ZONE = "Europe/Berlin"  # SimBench's clock
SLOTS_PER_DAY = DAY_S // SLOT_S
UCI = "UCI"
UCI_YEARS = (2007, 2008, 2009)
UCI_FIRST_DAY = date(2006, 12, 17)  # first whole local day of the UCI extract
CHUNK = 200


@dataclass(frozen=True, slots=True)
class PanelSpec:
    """How the panel is built; with the sources it fixes every household exactly."""

    households: int = 5000
    market_share: float = 0.5
    beta_kw_per_eur_per_kwh: float = -2.0
    shift_slots: int = 8
    uci_share: float = 0.1
    seed: int = 2016
    first_day: int = 0  # first day of the profile year to build
    days: int | None = None  # None: to the end of the profile year

    def __post_init__(self) -> None:
        if self.households < 4:
            raise InvalidEvent(f"panel: {self.households} households; at least 4 are needed")
        if not 0.0 < self.market_share < 1.0:
            raise InvalidEvent(f"panel: market share {self.market_share} is outside (0, 1)")
        if not 0.0 <= self.uci_share < 1.0:
            raise InvalidEvent(f"panel: UCI share {self.uci_share} is outside [0, 1)")
        if not 0 <= self.shift_slots <= 48:
            raise InvalidEvent(f"panel: shift of {self.shift_slots} slots is outside 0..48")
        if self.first_day < 0 or (self.days is not None and self.days < 8):
            raise InvalidEvent("panel: first_day must be >= 0 and days at least 8")


@dataclass(frozen=True, slots=True)
class PeakTable:
    """SimBench's peak powers per household type: values (kW) and how many loads have each."""

    by_type: dict[str, tuple[FloatArray, FloatArray]]  # type -> (peak_kw, loads)

    def type_weights(self) -> dict[str, float]:
        """Share of SimBench's loads using each type."""
        totals = {k: float(v[1].sum()) for k, v in self.by_type.items()}
        whole = sum(totals.values())
        return {k: t / whole for k, t in totals.items()}


def load_peak_table(path: Path) -> PeakTable:
    """`profile,p_load_kw,loads`: how many SimBench loads of each type have each peak power."""
    frame = read_table(path, ["profile", "p_load_kw", "loads"])
    peak = parse_numbers(path, frame, "p_load_kw", low=0.0, what="peak power", unit=" kW")
    loads = parse_numbers(path, frame, "loads", low=0.0, what="count")
    names = frame["profile"].astype(str).str.strip().to_numpy()
    zero = np.flatnonzero(peak <= 0)
    if zero.size:
        raise DataFileError(
            path, "peak power must be positive", line=line_of(int(zero[0])), column="p_load_kw"
        )
    by_type: dict[str, tuple[FloatArray, FloatArray]] = {}
    for name in dict.fromkeys(names):
        rows = names == name
        by_type[str(name)] = (peak[rows], loads[rows])
    return PeakTable(by_type=by_type)


@dataclass(frozen=True, slots=True)
class HouseholdSources:
    """The real data the panel is built from."""

    profiles: ProfileTable  # SimBench H0-* (15 min, peak 1), one profile year
    peaks: PeakTable
    uci: ProfileTable | None  # the Sceaux home, kW per 15 min
    prices: PriceHistory
    files: tuple[Path, ...] = ()


def load_household_sources(data_dir: Path) -> HouseholdSources:
    """Read the shipped extracts under `data_dir` (households/, prices/)."""
    files = (
        data_dir / "households" / "simbench_h0_2016.csv.gz",
        data_dir / "households" / "simbench_h0_loads.csv",
        data_dir / "households" / "uci_sceaux_15min.csv.gz",
        data_dir / "prices" / "nl_dayahead_2015_2024.csv.gz",
    )
    profiles = load_profile_table(files[0])
    peaks = load_peak_table(files[1])
    missing = [n for n in profiles.names if n not in peaks.by_type]
    if missing:
        raise DataFileError(files[1], f"no peak powers for profile(s) {', '.join(missing)}")
    if profiles.step_s != SLOT_S:
        raise DataFileError(files[0], "household profiles must be every 15 minutes")
    uci = load_profile_table(files[2]) if files[2].is_file() else None
    prices = load_day_ahead_prices(files[3])
    used = tuple(f for f in files if f.is_file())
    return HouseholdSources(profiles=profiles, peaks=peaks, uci=uci, prices=prices, files=used)


@dataclass(frozen=True, slots=True)
class _Households:
    types: IntArray  # index into type names; len(profiles.names) is UCI
    market: np.ndarray  # bool
    scale: FloatArray  # kW per unit of the type's series
    energy_kwh: FloatArray  # annual energy
    uci_year: IntArray  # index into UCI_YEARS (UCI households only)


@dataclass(frozen=True, slots=True)
class BuiltPanel:
    """The built panel's groups and what is true about them by construction."""

    loads: dict[TariffGroup, GroupLoad]
    beta_kw_per_eur_per_kwh: float
    price_mean_eur_per_kwh: float
    floored_share: float  # share of market-household values floored at 0 kW
    type_counts: dict[str, int]
    spec: PanelSpec


class _Builder:
    def __init__(self, sources: HouseholdSources, spec: PanelSpec) -> None:
        self.sources = sources
        self.spec = spec
        profiles = sources.profiles
        self.names = list(profiles.names)
        n_all = profiles.times_s.shape[0]
        if n_all % SLOTS_PER_DAY != 0:
            raise InvalidEvent("household profiles must cover whole days")
        self.days_all = n_all // SLOTS_PER_DAY
        days = spec.days if spec.days is not None else self.days_all - spec.first_day
        if spec.first_day + days > self.days_all:
            raise InvalidEvent(
                f"panel: days {spec.first_day}..{spec.first_day + days} exceed the profiles' "
                f"{self.days_all} days"
            )
        self.first_day = spec.first_day
        self.days = days
        first = spec.first_day * SLOTS_PER_DAY
        self.times = profiles.times_s[first : first + days * SLOTS_PER_DAY]
        self.prices = prices_on_slots(sources.prices, self.times)
        self.price_mean = float(np.mean(self.prices))
        starts = profiles.times_s[::SLOTS_PER_DAY]
        cal = calendar(starts, PROFILE_ZONE)
        weekend = cal.weekend
        week = (cal.local_day - cal.weekday) // 7  # Monday-started weeks
        pools = [
            np.flatnonzero((week == week[b]) & (weekend == weekend[b]))
            for b in range(self.days_all)
        ]
        self.pool_len = np.array([p.shape[0] for p in pools], dtype=np.int64)
        self.pool_start = np.concatenate([[0], np.cumsum(self.pool_len)[:-1]])
        self.pool_flat = np.concatenate(pools)
        self.uci_map = self._uci_map(cal.local_day) if sources.uci is not None else None
        self.households = self._draw_households()

    def _uci_map(self, local_days: IntArray) -> IntArray:
        """(years, days) UCI day block for each profile day, same weekday, nearest date."""
        uci = self.sources.uci
        assert uci is not None
        n_days = uci.times_s.shape[0] // SLOTS_PER_DAY
        out = np.zeros((len(UCI_YEARS), local_days.shape[0]), dtype=np.int64)
        for y, year in enumerate(UCI_YEARS):
            for b, day in enumerate(local_days):
                d = date(1970, 1, 1) + timedelta(days=int(day))
                target = date(year, d.month, min(d.day, 28 if d.month == 2 else d.day))
                shift = (d.weekday() - target.weekday() + 3) % 7 - 3
                block = (target + timedelta(days=shift) - UCI_FIRST_DAY).days
                if not 0 <= block < n_days:
                    raise InvalidEvent(f"UCI data does not cover {target + timedelta(days=shift)}")
                out[y, b] = block
        return out

    def _draw_households(self) -> _Households:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, 0])
        weights = self.sources.peaks.type_weights()
        p = np.array([weights[n] for n in self.names])
        share_uci = spec.uci_share if self.sources.uci is not None else 0.0
        p = np.append(p * (1.0 - share_uci), share_uci)
        types = rng.choice(len(p), size=spec.households, p=p / p.sum())
        market = rng.random(spec.households) < spec.market_share
        mean_unit = self.sources.profiles.values.mean(axis=1)  # mean of each peak-1 profile
        year_h = self.days_all * 24.0

        def simbench_draw(k: np.ndarray) -> FloatArray:
            out = np.empty(k.shape[0])
            for j, name in enumerate(self.names):
                rows = k == j
                if rows.any():
                    values, loads = self.sources.peaks.by_type[name]
                    out[rows] = rng.choice(values, size=int(rows.sum()), p=loads / loads.sum())
            return out

        scale = np.zeros(spec.households)
        energy = np.zeros(spec.households)
        is_uci = types == len(self.names)
        sb = ~is_uci
        scale[sb] = simbench_draw(types[sb])
        energy[sb] = scale[sb] * mean_unit[types[sb]] * year_h
        uci_year = rng.integers(0, len(UCI_YEARS), size=spec.households)
        if is_uci.any():
            uci = self.sources.uci
            assert uci is not None
            twin = rng.choice(len(self.names), size=int(is_uci.sum()), p=p[:-1] / p[:-1].sum())
            twin_energy = simbench_draw(twin) * mean_unit[twin] * year_h
            uci_energy = float(uci.values[0].mean()) * year_h
            scale[is_uci] = twin_energy / uci_energy
            energy[is_uci] = twin_energy
        return _Households(
            types=types, market=market, scale=scale, energy_kwh=energy, uci_year=uci_year
        )

    def beta_of(self, rows: IntArray) -> FloatArray:
        h = self.households
        market_energy = h.energy_kwh[h.market]
        beta = self.spec.beta_kw_per_eur_per_kwh * h.energy_kwh[rows] / market_energy.mean()
        return np.asarray(beta, dtype=float)

    def chunks(self, indices: IntArray) -> Iterator[tuple[IntArray, FloatArray, int]]:
        """(household indices, loads (c, T) kW, values floored) per chunk of households."""
        h = self.households
        n = self.times.shape[0]
        t_local = np.arange(n) + self.first_day * SLOTS_PER_DAY
        block = t_local // SLOTS_PER_DAY
        within = t_local % SLOTS_PER_DAY
        profiles = self.sources.profiles.values
        n_all = profiles.shape[1]
        uci_values = None if self.sources.uci is None else self.sources.uci.values[0]
        dev = self.prices - self.price_mean
        for c0 in range(0, indices.shape[0], CHUNK):
            rows = indices[c0 : c0 + CHUNK]
            src = np.empty((rows.shape[0], self.days_all), dtype=np.int64)
            shift = np.empty((rows.shape[0], self.days_all), dtype=np.int64)
            for r, i in enumerate(rows):
                g = np.random.default_rng([self.spec.seed, 1, int(i)])
                pick = (g.random(self.days_all) * self.pool_len).astype(np.int64)
                src[r] = self.pool_flat[self.pool_start + pick]
                shift[r] = g.integers(
                    -self.spec.shift_slots, self.spec.shift_slots + 1, self.days_all
                )
            day = src[:, block]
            offset = within[None, :] + shift[:, block]
            loads = np.empty((rows.shape[0], n))
            types = h.types[rows]
            sb = types < len(self.names)
            if sb.any():
                idx = np.clip(day[sb] * SLOTS_PER_DAY + offset[sb], 0, n_all - 1)
                loads[sb] = profiles[types[sb][:, None], idx] * h.scale[rows[sb]][:, None]
            if (~sb).any():
                assert uci_values is not None
                assert self.uci_map is not None
                years = h.uci_year[rows[~sb]]
                uci_day = self.uci_map[years[:, None], day[~sb]]
                idx = np.clip(uci_day * SLOTS_PER_DAY + offset[~sb], 0, uci_values.shape[0] - 1)
                loads[~sb] = uci_values[idx] * h.scale[rows[~sb]][:, None]
            market = h.market[rows]
            floored = 0
            if market.any():
                loads[market] += self.beta_of(rows[market])[:, None] * dev[None, :]
                below = loads[market] < 0.0
                floored = int(below.sum())
                loads[market] = np.maximum(loads[market], 0.0)
            yield rows, loads, floored


def build_panel(sources: HouseholdSources, spec: PanelSpec) -> BuiltPanel:
    """Build the panel and return its tariff groups' loads (see the module docstring)."""
    builder = _Builder(sources, spec)
    accumulators = {
        g: GroupLoadAccumulator(g, builder.times, SLOT_S, builder.prices) for g in GROUPS
    }
    market = builder.households.market
    floored = 0
    market_values = 0
    for rows, loads, floor_count in builder.chunks(np.arange(spec.households)):
        in_market = market[rows]
        if (~in_market).any():
            accumulators["fixed"].add(loads[~in_market])
        if in_market.any():
            accumulators["market"].add(loads[in_market])
            market_values += int(in_market.sum()) * loads.shape[1]
        floored += floor_count
    names = [*builder.names, UCI]
    counts = np.bincount(builder.households.types, minlength=len(names))
    return BuiltPanel(
        loads={g: accumulators[g].result() for g in GROUPS},
        beta_kw_per_eur_per_kwh=spec.beta_kw_per_eur_per_kwh,
        price_mean_eur_per_kwh=builder.price_mean,
        floored_share=floored / market_values if market_values else 0.0,
        type_counts={n: int(c) for n, c in zip(names, counts, strict=True)},
        spec=spec,
    )


def panel_sample(
    sources: HouseholdSources, spec: PanelSpec, indices: Sequence[int]
) -> HouseholdPanel:
    """Households `indices` of the built panel, in full: exactly what `build_panel` sums."""
    builder = _Builder(sources, spec)
    wanted = np.asarray(indices, dtype=np.int64)
    if wanted.size == 0 or wanted.min() < 0 or wanted.max() >= spec.households:
        raise InvalidEvent(f"panel sample: indices must lie in 0..{spec.households - 1}")
    parts = [loads for _, loads, _ in builder.chunks(wanted)]
    market = builder.households.market[wanted]
    return HouseholdPanel(
        household_ids=tuple(f"hh-{int(i) + 1:05d}" for i in wanted),
        tariffs=tuple("market" if m else "fixed" for m in market),
        times_s=builder.times.copy(),
        step_s=SLOT_S,
        load_kw=np.vstack(parts),
    )


def describe(panel: BuiltPanel) -> str:
    """A one-paragraph summary of a built panel, for logs and reports."""
    loads = panel.loads
    start = from_epoch_s(int(loads["fixed"].times_s[0])).date()
    return (
        f"{panel.spec.households} households from {start} over "
        f"{loads['fixed'].times_s.shape[0] // SLOTS_PER_DAY} days: "
        f"{loads['fixed'].households} fixed, {loads['market'].households} market; types "
        + ", ".join(f"{k} {v}" for k, v in panel.type_counts.items())
        + f"; beta {panel.beta_kw_per_eur_per_kwh} kW per EUR/kWh, "
        f"{100 * panel.floored_share:.2f} % of market values floored at 0"
    )
