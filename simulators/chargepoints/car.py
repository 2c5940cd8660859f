"""A simulated car at a charger: a battery that accepts power up to a limit and tapers when full."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, kw_only=True)
class SimCar:
    """A car's battery as the charger sees it. Powers are at the grid side of the charger.

    Charging adds `charge_efficiency * P * dt` to the battery; discharging takes
    `P * dt / discharge_efficiency` from it. Above `taper_from_soc` the car accepts less, down
    to nothing when full; it gives nothing back below `soc_floor`.
    """

    vehicle_id: str
    id_tag: str
    capacity_kwh: float
    energy_kwh: float
    max_charge_kw: float = 11.0
    max_discharge_kw: float = 0.0
    charge_efficiency: float = 0.92
    discharge_efficiency: float = 0.92
    taper_from_soc: float = 0.8
    soc_floor: float = 0.2

    def __post_init__(self) -> None:
        if self.capacity_kwh <= 0 or not 0 <= self.energy_kwh <= self.capacity_kwh:
            raise ValueError(f"car {self.vehicle_id}: energy must be within 0..capacity")
        if not 0 < self.charge_efficiency <= 1 or not 0 < self.discharge_efficiency <= 1:
            raise ValueError(f"car {self.vehicle_id}: efficiencies must be in (0, 1]")
        if not 0 < self.taper_from_soc <= 1:
            raise ValueError(f"car {self.vehicle_id}: taper_from_soc must be in (0, 1]")

    @property
    def soc(self) -> float:
        """State of charge, 0..1."""
        return self.energy_kwh / self.capacity_kwh

    def acceptance_kw(self) -> float:
        """The most the car draws now."""
        soc = self.soc
        if soc >= 1.0:
            return 0.0
        if soc <= self.taper_from_soc or self.taper_from_soc >= 1.0:
            return self.max_charge_kw
        return self.max_charge_kw * (1.0 - soc) / (1.0 - self.taper_from_soc)

    def discharge_kw(self) -> float:
        """The most the car gives back now."""
        return self.max_discharge_kw if self.soc > self.soc_floor else 0.0

    def flow(self, power_kw: float, hours: float) -> None:
        """Apply `power_kw` (negative: discharge) for `hours`, clamped to the battery's range."""
        if power_kw >= 0:
            self.energy_kwh = min(
                self.capacity_kwh, self.energy_kwh + self.charge_efficiency * power_kw * hours
            )
        else:
            floor = self.soc_floor * self.capacity_kwh
            self.energy_kwh = max(
                min(floor, self.energy_kwh),
                self.energy_kwh + power_kw * hours / self.discharge_efficiency,
            )
