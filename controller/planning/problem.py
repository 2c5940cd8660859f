"""The planning contract: a `PlanningProblem` (plain arrays) goes in, a `Schedule` comes out.

Every planner (the rule-based baselines, the cvxpy reference, the fast exact path) takes the same
problem and returns the same `Schedule` type, so reports and tests can compare them. Arrays say
their axes: N vehicles, T slots. Powers are kW at the grid side of the charger; energies kWh in
the battery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from numpy.typing import NDArray

from controller.domain import require_aware
from controller.errors import InvalidEvent

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanningProblem:
    """One planning instance over a horizon of T slots for N vehicles.

    The energy balance is `E[i, t+1] = E[i, t] + eta_ch[i] * P[i, t] * dt_h[t]
    - D[i, t] * dt_h[t] / eta_dis[i]`; each car must hold `target_kwh[i]` at the start of slot
    `departure_slot[i]` (T when it leaves after the horizon, then the target is asked at the
    horizon's end). `upper_kw[i, t]` is 0 where the car is not plugged in (or paused).
    """

    start: datetime  # "now": the horizon's first slot may be partial
    dt_h: FloatArray  # (T,) slot lengths in hours; dt_h[0] may be shorter than 0.25
    vehicle_ids: tuple[str, ...]  # (N,)
    charger_ids: tuple[str | None, ...]  # (N,) the charge point each car is plugged into
    energy_kwh: FloatArray  # (N,) battery content now
    capacity_kwh: FloatArray  # (N,)
    target_kwh: FloatArray  # (N,) content wanted at departure (0: no target)
    departure_slot: IntArray  # (N,) index of the first slot the car is gone, in 0..T
    upper_kw: FloatArray  # (N, T) charge power bound (0 when absent, paused)
    lower_kw: FloatArray  # (N, T) forced charge power (force-charge, pin), as far as it fits
    min_kw: FloatArray  # (N,) smallest non-zero power the charger can set
    eta_ch: FloatArray  # (N,) charge efficiency
    eta_dis: FloatArray  # (N,) discharge efficiency
    v2g: BoolArray  # (N,) may discharge
    max_discharge_kw: FloatArray  # (N,)
    floor_kwh: FloatArray  # (N,) V2G may not take the battery below this
    price_eur_per_kwh: FloatArray  # (T,) import price
    export_price_eur_per_kwh: FloatArray  # (T,)
    headroom_kw: FloatArray  # (T,) the chargers' shared import limit h_t
    export_limit_kw: float = 0.0
    degradation_eur_per_kwh: float = 0.0  # per kWh of discharge throughput
    demand_charge_eur_per_kw: float = 0.0  # per kW of the horizon's peak import
    price_forecast_from: int | None = None  # slot index from which prices are forecasts

    def __post_init__(self) -> None:
        require_aware("start", self.start, "planning problem")
        n, t = len(self.vehicle_ids), len(self.dt_h)
        if t == 0:
            raise InvalidEvent("planning problem: empty horizon")
        expect = {
            "charger_ids": (len(self.charger_ids),),
            "energy_kwh": self.energy_kwh.shape,
            "capacity_kwh": self.capacity_kwh.shape,
            "target_kwh": self.target_kwh.shape,
            "departure_slot": self.departure_slot.shape,
            "min_kw": self.min_kw.shape,
            "eta_ch": self.eta_ch.shape,
            "eta_dis": self.eta_dis.shape,
            "v2g": self.v2g.shape,
            "max_discharge_kw": self.max_discharge_kw.shape,
            "floor_kwh": self.floor_kwh.shape,
        }
        for name, shape in expect.items():
            if shape != (n,):
                raise InvalidEvent(f"planning problem: {name} has shape {shape}, want ({n},)")
        for name in ("upper_kw", "lower_kw"):
            shape = getattr(self, name).shape
            if shape != (n, t):
                raise InvalidEvent(f"planning problem: {name} has shape {shape}, want ({n}, {t})")
        for name in ("price_eur_per_kwh", "export_price_eur_per_kwh", "headroom_kw"):
            shape = getattr(self, name).shape
            if shape != (t,):
                raise InvalidEvent(f"planning problem: {name} has shape {shape}, want ({t},)")
        if np.any(self.dt_h <= 0) or np.any(self.dt_h > 0.25 + 1e-12):
            raise InvalidEvent("planning problem: slot lengths must be in (0, 0.25] h")
        if np.any(self.departure_slot < 0) or np.any(self.departure_slot > t):
            raise InvalidEvent("planning problem: departure_slot outside 0..T")
        if np.any(self.upper_kw < 0) or np.any(self.lower_kw < 0):
            raise InvalidEvent("planning problem: negative power bounds")
        if np.any(self.energy_kwh > self.capacity_kwh * (1 + 1e-9)):
            raise InvalidEvent("planning problem: energy above capacity")
        above = np.flatnonzero(self.target_kwh > self.capacity_kwh * (1 + 1e-9))
        if above.size:
            i = int(above[0])
            raise InvalidEvent(
                f"planning problem: {self.vehicle_ids[i]} target {self.target_kwh[i]:.3f} kWh "
                f"above its capacity {self.capacity_kwh[i]:.3f} kWh (no battery can hold it)"
            )

    @property
    def n_vehicles(self) -> int:
        """N."""
        return len(self.vehicle_ids)

    @property
    def n_slots(self) -> int:
        """T."""
        return len(self.dt_h)


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """A plan: power per car per slot, the energy it leads to, its cost and what it leaves unmet.

    `cost_eur` is the objective's money part: energy bought minus export revenue plus degradation
    and demand charge. Penalties for shortfall are not money and are reported apart.
    """

    strategy: str  # "managed", "unmanaged", "edf", "llf", "share", ...
    start: datetime
    dt_h: FloatArray  # (T,)
    vehicle_ids: tuple[str, ...]  # (N,)
    charge_kw: FloatArray  # (N, T)
    discharge_kw: FloatArray  # (N, T)
    energy_kwh: FloatArray  # (N, T+1) battery content at each slot boundary
    shortfall_kwh: FloatArray  # (N,) target minus content at departure, when positive
    shortfall_reason: tuple[str, ...]  # (N,) "" when met, else "time", "headroom", ...
    energy_cost_eur: float
    export_revenue_eur: float = 0.0
    degradation_eur: float = 0.0
    demand_charge_eur: float = 0.0
    status: str = "optimal"
    solver: str = ""
    solve_time_s: float = 0.0
    headroom_price_eur_per_kw: FloatArray | None = None  # (T,) dual of the site constraint
    details: dict[str, float] = field(default_factory=dict)

    @property
    def site_kw(self) -> FloatArray:
        """(T,) the chargers' net import per slot."""
        result: FloatArray = self.charge_kw.sum(axis=0) - self.discharge_kw.sum(axis=0)
        return result

    @property
    def cost_eur(self) -> float:
        """Money: energy bought, minus export revenue, plus degradation and demand charge."""
        return (
            self.energy_cost_eur
            - self.export_revenue_eur
            + self.degradation_eur
            + self.demand_charge_eur
        )

    @property
    def peak_kw(self) -> float:
        """The largest net import of any slot."""
        return float(self.site_kw.max(initial=0.0))

    def first_slot_kw(self) -> dict[str, float]:
        """Per vehicle, the net power of the current slot (negative when discharging)."""
        now = self.charge_kw[:, 0] - self.discharge_kw[:, 0]
        return {vid: float(p) for vid, p in zip(self.vehicle_ids, now, strict=True)}


def energy_trajectory(
    problem: PlanningProblem, charge_kw: FloatArray, discharge_kw: FloatArray
) -> FloatArray:
    """(N, T+1) battery content that a power plan leads to, by the problem's balance."""
    delta = (
        problem.eta_ch[:, None] * charge_kw - discharge_kw / problem.eta_dis[:, None]
    ) * problem.dt_h[None, :]
    trajectory: FloatArray = np.concatenate(
        [problem.energy_kwh[:, None], problem.energy_kwh[:, None] + np.cumsum(delta, axis=1)],
        axis=1,
    )
    return trajectory


def shortfalls(problem: PlanningProblem, energy_kwh: FloatArray) -> FloatArray:
    """(N,) kWh by which each car misses its target at its departure slot (0 when met)."""
    at_departure = energy_kwh[np.arange(problem.n_vehicles), problem.departure_slot]
    result: FloatArray = np.maximum(0.0, problem.target_kwh - at_departure)
    return result


def money(
    problem: PlanningProblem, charge_kw: FloatArray, discharge_kw: FloatArray
) -> tuple[float, float, float, float]:
    """(energy cost, export revenue, degradation, demand charge) of a power plan, EUR."""
    charge_kwh = charge_kw.sum(axis=0) * problem.dt_h
    discharge_kwh = discharge_kw.sum(axis=0) * problem.dt_h
    energy_cost = float(problem.price_eur_per_kwh @ charge_kwh)
    revenue = float(problem.export_price_eur_per_kwh @ discharge_kwh)
    degradation = problem.degradation_eur_per_kwh * float(discharge_kwh.sum())
    net = charge_kw.sum(axis=0) - discharge_kw.sum(axis=0)
    demand = problem.demand_charge_eur_per_kw * float(max(0.0, net.max(initial=0.0)))
    return energy_cost, revenue, degradation, demand


def schedule_from_power(
    problem: PlanningProblem,
    charge_kw: FloatArray,
    discharge_kw: FloatArray | None = None,
    *,
    strategy: str,
    solver: str = "",
    status: str = "optimal",
    solve_time_s: float = 0.0,
) -> Schedule:
    """Build a `Schedule` from a power plan, computing energy, shortfalls and money from it."""
    if discharge_kw is None:
        discharge_kw = np.zeros_like(charge_kw)
    energy = energy_trajectory(problem, charge_kw, discharge_kw)
    missing = shortfalls(problem, energy)
    reasons = tuple(
        "" if m <= 1e-6 else _shortfall_reason(problem, i) for i, m in enumerate(missing)
    )
    cost, revenue, degradation, demand = money(problem, charge_kw, discharge_kw)
    return Schedule(
        strategy=strategy,
        start=problem.start,
        dt_h=problem.dt_h,
        vehicle_ids=problem.vehicle_ids,
        charge_kw=charge_kw,
        discharge_kw=discharge_kw,
        energy_kwh=energy,
        shortfall_kwh=missing,
        shortfall_reason=reasons,
        energy_cost_eur=cost,
        export_revenue_eur=revenue,
        degradation_eur=degradation,
        demand_charge_eur=demand,
        status=status,
        solver=solver,
        solve_time_s=solve_time_s,
    )


def _shortfall_reason(problem: PlanningProblem, i: int) -> str:
    """'time' if even full power on every available slot cannot reach the target, else head-room."""
    d = int(problem.departure_slot[i])
    reachable = problem.energy_kwh[i] + problem.eta_ch[i] * float(
        problem.upper_kw[i, :d] @ problem.dt_h[:d]
    )
    return "time" if reachable < problem.target_kwh[i] - 1e-6 else "headroom"
