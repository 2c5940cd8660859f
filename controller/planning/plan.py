"""A plan: the schedule a planner chose, with what the dispatcher needs to act on it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from controller.planning.problem import Schedule


@dataclass(frozen=True, slots=True, kw_only=True)
class Setpoint:
    """The power one connector should deliver, per slot of the plan (kW, negative: discharge)."""

    charger_id: str
    connector_id: int
    vehicle_id: str
    kw: tuple[float, ...]  # per slot, aligned with the plan's slots


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The latest decision: a schedule, when it was made, and per-connector setpoints."""

    made_at: datetime
    schedule: Schedule
    setpoints: tuple[Setpoint, ...]
    slot_starts: tuple[datetime, ...]  # (T,) start of each slot; the first is `made_at`
    headroom_kw: tuple[float, ...]  # (T,) the limit the plan was made under
    price_eur_per_kwh: tuple[float, ...]  # (T,)
    fallback: bool = False  # True when the optimiser failed and a safe share was used
    note: str = ""

    @property
    def total_first_slot_kw(self) -> float:
        """The chargers' summed setpoint for the current slot."""
        return sum(s.kw[0] for s in self.setpoints)
