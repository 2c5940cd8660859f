"""Plain-numpy checks of a `Schedule` against its `PlanningProblem`, written apart from the solver.

Every function recomputes what it checks from the problem's own arrays (not from the
optimiser's prepared bounds), so a solver that misreads the problem fails here.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from controller.planning.problem import FloatArray, PlanningProblem, Schedule

TOL = 1e-6
START = datetime(2024, 3, 4, 22, 0, tzinfo=UTC)


def problem(
    *,
    dt_h: list[float],
    upper_kw: list[list[float]],
    energy_kwh: list[float],
    capacity_kwh: list[float],
    target_kwh: list[float],
    price: list[float],
    headroom_kw: list[float],
    departure_slot: list[int] | None = None,
    lower_kw: list[list[float]] | None = None,
    min_kw: list[float] | None = None,
    eta_ch: list[float] | None = None,
    eta_dis: list[float] | None = None,
    v2g: list[bool] | None = None,
    max_discharge_kw: list[float] | None = None,
    floor_kwh: list[float] | None = None,
    export_price: list[float] | None = None,
    export_limit_kw: float = 0.0,
    degradation_eur_per_kwh: float = 0.0,
    demand_charge_eur_per_kw: float = 0.0,
) -> PlanningProblem:
    """A `PlanningProblem` from lists, with neutral defaults (eta 1, no min rate, no V2G)."""
    n, t = len(energy_kwh), len(dt_h)

    def vec(values: list[float] | None, default: float) -> FloatArray:
        return np.array(values if values is not None else [default] * n, dtype=float)

    return PlanningProblem(
        start=START,
        dt_h=np.array(dt_h, dtype=float),
        vehicle_ids=tuple(f"ev-{i}" for i in range(n)),
        charger_ids=tuple(f"cp-{i}" for i in range(n)),
        energy_kwh=np.array(energy_kwh, dtype=float),
        capacity_kwh=np.array(capacity_kwh, dtype=float),
        target_kwh=np.array(target_kwh, dtype=float),
        departure_slot=np.array(departure_slot or [t] * n, dtype=np.int64),
        upper_kw=np.array(upper_kw, dtype=float).reshape(n, t),
        lower_kw=np.array(lower_kw, dtype=float).reshape(n, t)
        if lower_kw is not None
        else np.zeros((n, t)),
        min_kw=vec(min_kw, 0.0),
        eta_ch=vec(eta_ch, 1.0),
        eta_dis=vec(eta_dis, 1.0),
        v2g=np.array(v2g or [False] * n, dtype=bool),
        max_discharge_kw=vec(max_discharge_kw, 0.0),
        floor_kwh=vec(floor_kwh, 0.0),
        price_eur_per_kwh=np.array(price, dtype=float),
        export_price_eur_per_kwh=np.array(export_price or price, dtype=float),
        headroom_kw=np.array(headroom_kw, dtype=float),
        export_limit_kw=export_limit_kw,
        degradation_eur_per_kwh=degradation_eur_per_kwh,
        demand_charge_eur_per_kw=demand_charge_eur_per_kw,
    )


def energy(p: PlanningProblem, s: Schedule) -> FloatArray:
    """(N, T+1) battery content from the schedule's powers, by the balance equation."""
    step = (p.eta_ch[:, None] * s.charge_kw - s.discharge_kw / p.eta_dis[:, None]) * p.dt_h
    result: FloatArray = np.concatenate(
        [p.energy_kwh[:, None], p.energy_kwh[:, None] + np.cumsum(step, axis=1)], axis=1
    )
    return result


def violations(p: PlanningProblem, s: Schedule, *, min_rate: bool = True) -> dict[str, float]:
    """The largest violation of each constraint (0 where it holds), kW or kWh."""
    n, t = p.n_vehicles, p.n_slots
    slots = np.arange(t)
    present = slots[None, :] < p.departure_slot[:, None]
    charge, discharge = s.charge_kw, s.discharge_kw
    e = energy(p, s)
    site = charge.sum(axis=0) - discharge.sum(axis=0)
    headroom = np.maximum(p.headroom_kw, 0.0)
    found: dict[str, float] = {}
    found["negative"] = float(max(0.0, -charge.min(initial=0.0), -discharge.min(initial=0.0)))
    found["charge_above_bound"] = float(np.max(charge - p.upper_kw, initial=0.0))
    found["charge_when_gone"] = float(np.abs(np.where(present, 0.0, charge)).max(initial=0.0))
    may_discharge = p.v2g[:, None] & present & (p.upper_kw > 0) & (p.lower_kw <= 0)
    found["discharge_not_allowed"] = float(np.where(may_discharge, 0.0, discharge).max(initial=0))
    found["discharge_above_bound"] = float(
        np.max(discharge - p.max_discharge_kw[:, None], initial=0.0)
    )
    found["site_above_headroom"] = float(np.max(site - headroom, initial=0.0))
    export = p.export_limit_kw if p.v2g.any() else 0.0
    found["site_below_export_limit"] = float(np.max(-export - site, initial=0.0))
    found["energy_above_capacity"] = float(
        np.max(e - np.maximum(p.capacity_kwh, p.energy_kwh)[:, None], initial=0.0)
    )
    floor = np.minimum(p.floor_kwh, p.energy_kwh)
    below = np.where(p.v2g[:, None], floor[:, None] - e, 0.0)
    found["energy_below_floor"] = float(np.max(below, initial=0.0))
    # V2G never leaves a car with less than it came with, when it is below its target.
    at_departure = e[np.arange(n), p.departure_slot]
    worse = np.minimum(p.energy_kwh, p.target_kwh) - at_departure
    found["left_below_arrival"] = float(np.max(np.where(p.v2g, worse, 0.0), initial=0.0))
    # Time sharing: charge and discharge shares of one slot add up to at most the slot.
    unit = np.maximum(p.upper_kw.max(axis=1, initial=0.0), 1.0)
    dunit = np.maximum(p.max_discharge_kw, 1.0)
    share = charge / unit[:, None] + discharge / dunit[:, None]
    found["time_sharing"] = float(np.max(np.where(p.v2g[:, None], share - 1.0, 0.0), initial=0))
    found["forced_not_honoured"] = _forced_gap(p, s, e, site, headroom)
    if min_rate:
        forced = p.lower_kw > 0
        for name, power in (("charge_below_min", charge), ("discharge_below_min", discharge)):
            sliver = (power > TOL) & (power < p.min_kw[:, None] - TOL)
            if name == "charge_below_min":
                sliver &= ~forced
            found[name] = float(sliver.sum())
    return found


def _forced_gap(
    p: PlanningProblem, s: Schedule, e: FloatArray, site: FloatArray, headroom: FloatArray
) -> float:
    """How far forced power is missed where neither a full battery nor the site explains it.

    The documented rule (docs/optimiser.md, `prepare`): where the forced power of all cars is
    more than h_t, each is scaled down in proportion to fit h_t (V2G discharge in the same slot
    does not make room for it); what is owed is the scaled amount.
    """
    forced = np.minimum(p.lower_kw, p.upper_kw) * (
        np.arange(p.n_slots)[None, :] < p.departure_slot[:, None]
    )
    total = forced.sum(axis=0)
    share = np.where(total > headroom, headroom / np.maximum(total, 1e-12), 1.0)
    gap = forced * share[None, :] - s.charge_kw
    full_after = e[:, 1:] >= np.maximum(p.capacity_kwh, p.energy_kwh)[:, None] - 1e-6
    site_full = site >= headroom - 1e-6
    excused = full_after | site_full[None, :]
    return float(np.max(np.where(excused, 0.0, gap), initial=0.0))


def assert_valid(p: PlanningProblem, s: Schedule, *, min_rate: bool = True) -> None:
    """Fail with the list of broken constraints, if any."""
    broken = {k: v for k, v in violations(p, s, min_rate=min_rate).items() if v > TOL}
    assert not broken, f"{s.strategy}/{s.solver}: constraints broken: {broken}"


def money_of(p: PlanningProblem, s: Schedule) -> float:
    """EUR of a schedule, recomputed from its powers."""
    charge_kwh = s.charge_kw.sum(axis=0) * p.dt_h
    discharge_kwh = s.discharge_kw.sum(axis=0) * p.dt_h
    site = s.charge_kw.sum(axis=0) - s.discharge_kw.sum(axis=0)
    return float(
        p.price_eur_per_kwh @ charge_kwh
        - p.export_price_eur_per_kwh @ discharge_kwh
        + p.degradation_eur_per_kwh * discharge_kwh.sum()
        + p.demand_charge_eur_per_kw * max(0.0, site.max(initial=0.0))
    )


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    """Equal to `rel` relative, with a floor of one unit (EUR, kWh, kW)."""
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))
