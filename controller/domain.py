"""The fleet's domain model: vehicles, charge points and connectors, transactions, the site.

Every record is a frozen dataclass that refuses impossible values when it is built; state
changes produce new records (`dataclasses.replace`). Units live in the names: kW, kWh, EUR/kWh,
seconds. Times are aware datetimes in UTC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Literal, TypeAlias

from controller.errors import InvalidEvent

VehicleId: TypeAlias = str
ChargerId: TypeAlias = str
ConnectorId: TypeAlias = int
TransactionId: TypeAlias = int
SiteId: TypeAlias = str
OverrideId: TypeAlias = str

SLOT = timedelta(minutes=15)
SLOT_S = 900.0
SLOT_H = 0.25

RateUnit: TypeAlias = Literal["W", "A"]
V2gMode: TypeAlias = Literal["none", "negative_limit", "data_transfer"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def require_aware(name: str, value: datetime | None, context: str) -> None:
    """Refuse a naive datetime: every time inside voltpool carries its zone."""
    if value is not None and value.tzinfo is None:
        raise InvalidEvent(f"{context}: {name} {value.isoformat()} has no time zone")


def require_finite(name: str, value: float, context: str) -> None:
    """Refuse NaN and infinities, which compare false with every bound."""
    if not math.isfinite(value):
        raise InvalidEvent(f"{context}: {name} is {value}, not a finite number")


def require_range(
    name: str, value: float, context: str, low: float | None = None, high: float | None = None
) -> None:
    """Refuse a value outside [low, high]; either bound may be open (None)."""
    require_finite(name, value, context)
    if low is not None and value < low:
        raise InvalidEvent(f"{context}: {name} {value} is below {low}")
    if high is not None and value > high:
        raise InvalidEvent(f"{context}: {name} {value} is above {high}")


def slot_floor(at: datetime) -> datetime:
    """The start of the 15-minute slot that contains `at` (UTC)."""
    at = at.astimezone(UTC)
    return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)


class ConnectorStatus(StrEnum):
    """OCPP 1.6 ChargePointStatus values, as a connector reports them."""

    AVAILABLE = "Available"
    PREPARING = "Preparing"
    CHARGING = "Charging"
    SUSPENDED_EVSE = "SuspendedEVSE"
    SUSPENDED_EV = "SuspendedEV"
    FINISHING = "Finishing"
    RESERVED = "Reserved"
    UNAVAILABLE = "Unavailable"
    FAULTED = "Faulted"


@dataclass(frozen=True, slots=True, kw_only=True)
class Vehicle:
    """One car of the fleet, with what the planner needs to know about its battery and its day.

    `energy_kwh` is the battery's content at `energy_at`; `target_kwh` is the content it must have
    at `departure`. A car with no departure set is planned to the end of the horizon.
    """

    vehicle_id: VehicleId
    model: str
    capacity_kwh: float
    energy_kwh: float
    energy_at: datetime = EPOCH
    max_charge_kw: float = 11.0
    max_discharge_kw: float = 0.0
    charge_efficiency: float = 0.92
    discharge_efficiency: float = 0.92
    consumption_kwh_per_km: float = 0.17
    v2g_allowed: bool = False
    soc_floor: float = 0.2  # fraction of capacity V2G may not go below
    departure: datetime | None = None
    target_kwh: float | None = None
    charger_id: ChargerId | None = None
    connector_id: ConnectorId | None = None
    plugged_at: datetime | None = None
    # Register reading (Wh) of the connector when `energy_kwh` was last set, so metered energy
    # can be added to the car's last known content without counting any of it twice.
    meter_wh_at_energy: float | None = None

    def __post_init__(self) -> None:
        ctx = f"vehicle {self.vehicle_id!r}"
        if not self.vehicle_id:
            raise InvalidEvent("vehicle id is empty")
        require_range("capacity_kwh", self.capacity_kwh, ctx, low=0.0)
        if self.capacity_kwh <= 0.0:
            raise InvalidEvent(f"{ctx}: capacity_kwh {self.capacity_kwh} must be positive")
        require_range("energy_kwh", self.energy_kwh, ctx, low=0.0)
        if self.energy_kwh > self.capacity_kwh * (1 + 1e-9):
            raise InvalidEvent(
                f"{ctx}: energy_kwh {self.energy_kwh} is above its capacity {self.capacity_kwh}"
            )
        require_range("max_charge_kw", self.max_charge_kw, ctx, low=0.0, high=1000.0)
        require_range("max_discharge_kw", self.max_discharge_kw, ctx, low=0.0, high=1000.0)
        require_range("charge_efficiency", self.charge_efficiency, ctx, low=0.01, high=1.0)
        require_range("discharge_efficiency", self.discharge_efficiency, ctx, low=0.01, high=1.0)
        require_range("consumption_kwh_per_km", self.consumption_kwh_per_km, ctx, low=0.0)
        require_range("soc_floor", self.soc_floor, ctx, low=0.0, high=1.0)
        if self.target_kwh is not None:
            require_range("target_kwh", self.target_kwh, ctx, low=0.0)
            if self.target_kwh > self.capacity_kwh * (1 + 1e-9):
                raise InvalidEvent(
                    f"{ctx}: target_kwh {self.target_kwh} is above its capacity {self.capacity_kwh}"
                )
        for name in ("energy_at", "departure", "plugged_at"):
            require_aware(name, getattr(self, name), ctx)
        if (self.charger_id is None) != (self.connector_id is None):
            raise InvalidEvent(f"{ctx}: charger and connector must be set together")

    @property
    def soc(self) -> float:
        """State of charge as a fraction of capacity."""
        return self.energy_kwh / self.capacity_kwh

    @property
    def plugged_in(self) -> bool:
        """Whether the car is connected to a charger now."""
        return self.charger_id is not None

    @property
    def need_kwh(self) -> float:
        """Energy still to be added to reach the target (0 when there is none)."""
        if self.target_kwh is None:
            return 0.0
        return max(0.0, self.target_kwh - self.energy_kwh)


@dataclass(frozen=True, slots=True, kw_only=True)
class Connector:
    """One outlet of a charge point, with what it last metered."""

    connector_id: ConnectorId
    max_power_kw: float
    status: ConnectorStatus = ConnectorStatus.AVAILABLE
    vehicle_id: VehicleId | None = None
    transaction_id: TransactionId | None = None
    meter_wh: float | None = None  # energy register (Energy.Active.Import.Register)
    power_kw: float | None = None  # last metered power, negative when discharging
    meter_at: datetime | None = None

    def __post_init__(self) -> None:
        ctx = f"connector {self.connector_id}"
        if self.connector_id < 1:
            raise InvalidEvent(f"{ctx}: connector ids start at 1 (0 is the whole charge point)")
        require_range("max_power_kw", self.max_power_kw, ctx, low=0.0, high=1000.0)
        if self.meter_wh is not None:
            require_range("meter_wh", self.meter_wh, ctx, low=0.0)
        if self.power_kw is not None:
            require_finite("power_kw", self.power_kw, ctx)
        require_aware("meter_at", self.meter_at, ctx)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChargePoint:
    """A charge point (OCPP's 'charge box') with its electrical limits and connectors."""

    charger_id: ChargerId
    max_power_kw: float  # circuit limit of the whole charge point
    connectors: tuple[Connector, ...] = field(default_factory=tuple)
    phases: int = 3
    voltage_v: float = 230.0
    rate_unit: RateUnit = "W"
    min_current_a: float = 6.0  # IEC 61851: below 6 A a car does not charge
    v2g_mode: V2gMode = "none"
    online: bool = False
    last_seen: datetime | None = None

    def __post_init__(self) -> None:
        ctx = f"charger {self.charger_id!r}"
        if not self.charger_id:
            raise InvalidEvent("charger id is empty")
        require_range("max_power_kw", self.max_power_kw, ctx, low=0.0, high=10_000.0)
        if self.phases not in (1, 3):
            raise InvalidEvent(f"{ctx}: phases must be 1 or 3, not {self.phases}")
        require_range("voltage_v", self.voltage_v, ctx, low=100.0, high=1000.0)
        require_range("min_current_a", self.min_current_a, ctx, low=0.0, high=100.0)
        ids = [c.connector_id for c in self.connectors]
        if len(ids) != len(set(ids)):
            raise InvalidEvent(f"{ctx}: connector ids repeat: {ids}")
        require_aware("last_seen", self.last_seen, ctx)

    @property
    def min_power_kw(self) -> float:
        """The smallest non-zero power the charger can set (minimum current on every phase)."""
        return self.min_current_a * self.voltage_v * self.phases / 1000.0

    def connector(self, connector_id: ConnectorId) -> Connector | None:
        """The connector with this id, or None."""
        for c in self.connectors:
            if c.connector_id == connector_id:
                return c
        return None

    def with_connector(self, connector: Connector) -> ChargePoint:
        """A copy with `connector` replacing the one of the same id."""
        from dataclasses import replace

        rest = tuple(c for c in self.connectors if c.connector_id != connector.connector_id)
        ordered = tuple(sorted((*rest, connector), key=lambda c: c.connector_id))
        return replace(self, connectors=ordered)


@dataclass(frozen=True, slots=True, kw_only=True)
class Transaction:
    """An OCPP transaction: energy delivered through one connector between start and stop."""

    transaction_id: TransactionId
    charger_id: ChargerId
    connector_id: ConnectorId
    id_tag: str
    started_at: datetime
    meter_start_wh: float
    vehicle_id: VehicleId | None = None
    stopped_at: datetime | None = None
    meter_stop_wh: float | None = None
    stop_reason: str | None = None

    def __post_init__(self) -> None:
        ctx = f"transaction {self.transaction_id}"
        require_aware("started_at", self.started_at, ctx)
        require_aware("stopped_at", self.stopped_at, ctx)
        require_range("meter_start_wh", self.meter_start_wh, ctx, low=0.0)
        if self.meter_stop_wh is not None:
            require_range("meter_stop_wh", self.meter_stop_wh, ctx, low=self.meter_start_wh)
        if self.stopped_at is not None and self.stopped_at < self.started_at:
            raise InvalidEvent(f"{ctx}: stops at {self.stopped_at} before it starts")

    @property
    def energy_kwh(self) -> float | None:
        """Energy delivered, from the register readings (None while running)."""
        if self.meter_stop_wh is None:
            return None
        return (self.meter_stop_wh - self.meter_start_wh) / 1000.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Series:
    """A quantity per 15-minute slot from `start` on (prices, head-room)."""

    start: datetime
    values: tuple[float, ...]
    received_at: datetime
    forecast_from: int | None = None  # index of the first value that is a forecast, not known

    def __post_init__(self) -> None:
        require_aware("start", self.start, "series")
        require_aware("received_at", self.received_at, "series")
        if self.start != slot_floor(self.start):
            raise InvalidEvent(f"series: start {self.start} is not on a 15-minute boundary")
        if not self.values:
            raise InvalidEvent("series: no values")
        for i, v in enumerate(self.values):
            require_finite(f"value[{i}]", v, "series")

    @property
    def end(self) -> datetime:
        """The end of the last slot covered."""
        return self.start + SLOT * len(self.values)

    def value_at(self, at: datetime) -> float | None:
        """The value of the slot containing `at`, or None outside the series."""
        index = int((at - self.start) // SLOT)
        if 0 <= index < len(self.values):
            return self.values[index]
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Site:
    """The grid connection the fleet shares with the households behind it."""

    site_id: SiteId
    capacity_kw: float  # the connection's import limit
    export_limit_kw: float = 0.0
    # What the chargers may draw together when the controller knows nothing better (no fresh
    # head-room): the lease fallback that the chargers' TxDefaultProfiles add up to.
    safe_limit_kw: float = 0.0

    def __post_init__(self) -> None:
        ctx = f"site {self.site_id!r}"
        require_range("capacity_kw", self.capacity_kw, ctx, low=0.0)
        require_range("export_limit_kw", self.export_limit_kw, ctx, low=0.0)
        require_range("safe_limit_kw", self.safe_limit_kw, ctx, low=0.0, high=self.capacity_kw)


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteLoad:
    """The households' load behind the grid connection, as last measured (chargers excluded)."""

    load_kw: float
    at: datetime

    def __post_init__(self) -> None:
        require_range("load_kw", self.load_kw, "site load", low=-100_000.0, high=100_000.0)
        require_aware("at", self.at, "site load")


OverrideKind: TypeAlias = Literal[
    "force_charge",
    "pause_vehicle",
    "pause_charger",
    "cap_site",
    "pin_charger",
    "set_v2g",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Override:
    """An operator's standing order, in force from `created_at` until `expires_at`."""

    override_id: OverrideId
    kind: OverrideKind
    target_id: str  # vehicle id, charger id or site id, by kind
    created_at: datetime
    expires_at: datetime
    limit_kw: float | None = None  # cap_site, pin_charger
    enabled: bool | None = None  # set_v2g

    def __post_init__(self) -> None:
        ctx = f"override {self.override_id!r}"
        require_aware("created_at", self.created_at, ctx)
        require_aware("expires_at", self.expires_at, ctx)
        if self.expires_at <= self.created_at:
            raise InvalidEvent(f"{ctx}: expires at {self.expires_at}, not after its creation")
        if self.kind in ("cap_site", "pin_charger"):
            if self.limit_kw is None:
                raise InvalidEvent(f"{ctx}: {self.kind} needs limit_kw")
            require_range("limit_kw", self.limit_kw, ctx, low=0.0)
        if self.kind == "set_v2g" and self.enabled is None:
            raise InvalidEvent(f"{ctx}: set_v2g needs enabled")

    def active(self, at: datetime) -> bool:
        """Whether the override is in force at `at`."""
        return self.created_at <= at < self.expires_at
