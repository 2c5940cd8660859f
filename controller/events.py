"""Typed events (facts, past tense) and operator commands (requests, imperative).

Each is a frozen dataclass that refuses impossible values when it is built; every one carries an
`event_id` (idempotence key: the same id is applied once) and `at`, the aware time at which the
fact happened or the command was issued. `kind` is the wire discriminator.

Checks that need to know "now" (a timestamp far in the future) cannot run at construction; they
run once, where an event enters the service: `check_timely`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, TypeAlias

from controller.domain import (
    ChargePoint,
    ChargerId,
    ConnectorId,
    ConnectorStatus,
    Site,
    TransactionId,
    Vehicle,
    VehicleId,
    require_aware,
    require_finite,
    require_range,
    slot_floor,
)
from controller.errors import InvalidEvent, RefusalCode, Refused

MAX_SERIES_SLOTS = 4 * 24 * 8  # a week and a day of 15-minute values is more than any horizon


def _common(event_id: str, at: datetime) -> None:
    if not event_id or len(event_id) > 128:
        raise InvalidEvent(f"event id {event_id!r} must have 1 to 128 characters")
    require_aware("timestamp", at, event_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteConfigured:
    """The site's grid connection was configured (or reconfigured)."""

    kind: Literal["site_configured"] = "site_configured"
    event_id: str
    at: datetime
    site: Site

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)


@dataclass(frozen=True, slots=True, kw_only=True)
class VehicleRegistered:
    """A vehicle joined the fleet (or its specification changed)."""

    kind: Literal["vehicle_registered"] = "vehicle_registered"
    event_id: str
    at: datetime
    vehicle: Vehicle

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChargerRegistered:
    """A charge point was added to the site's configuration (or its limits changed)."""

    kind: Literal["charger_registered"] = "charger_registered"
    event_id: str
    at: datetime
    charger: ChargePoint

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)


@dataclass(frozen=True, slots=True, kw_only=True)
class VehiclePluggedIn:
    """A vehicle was connected to a connector of a charge point."""

    kind: Literal["vehicle_plugged_in"] = "vehicle_plugged_in"
    event_id: str
    at: datetime
    vehicle_id: VehicleId
    charger_id: ChargerId
    connector_id: ConnectorId

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        if self.connector_id < 1:
            raise InvalidEvent(f"{self.event_id}: connector id {self.connector_id} is below 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class VehicleUnplugged:
    """A vehicle was disconnected from its charger."""

    kind: Literal["vehicle_unplugged"] = "vehicle_unplugged"
    event_id: str
    at: datetime
    vehicle_id: VehicleId

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)


@dataclass(frozen=True, slots=True, kw_only=True)
class SocReported:
    """A vehicle reported its battery's state of charge."""

    kind: Literal["soc_reported"] = "soc_reported"
    event_id: str
    at: datetime
    vehicle_id: VehicleId
    soc: float  # fraction, 0..1

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        require_range("soc", self.soc, self.event_id, low=0.0, high=1.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class DepartureSet:
    """A vehicle (or its driver) said when it leaves and how much energy it wants by then."""

    kind: Literal["departure_set"] = "departure_set"
    event_id: str
    at: datetime
    vehicle_id: VehicleId
    departure: datetime
    target_kwh: float | None = None
    target_soc: float | None = None  # fraction; converted with the car's capacity

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        require_aware("departure", self.departure, self.event_id)
        if self.target_kwh is not None:
            require_range("target_kwh", self.target_kwh, self.event_id, low=0.0)
        if self.target_soc is not None:
            require_range("target_soc", self.target_soc, self.event_id, low=0.0, high=1.0)
        if self.target_kwh is not None and self.target_soc is not None:
            raise InvalidEvent(f"{self.event_id}: give target_kwh or target_soc, not both")


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterSampled:
    """A charger metered a connector: energy register, power, and the car's SoC if it knows it."""

    kind: Literal["meter_sampled"] = "meter_sampled"
    event_id: str
    at: datetime
    charger_id: ChargerId
    connector_id: ConnectorId
    meter_wh: float | None = None
    power_kw: float | None = None
    soc: float | None = None
    transaction_id: TransactionId | None = None

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        if self.connector_id < 0:
            raise InvalidEvent(f"{self.event_id}: connector id {self.connector_id} is negative")
        if self.meter_wh is not None:
            require_range("meter_wh", self.meter_wh, self.event_id, low=0.0)
        if self.power_kw is not None:
            require_range("power_kw", self.power_kw, self.event_id, low=-10_000.0, high=10_000.0)
        if self.soc is not None:
            require_range("soc", self.soc, self.event_id, low=0.0, high=1.0)
        if self.meter_wh is None and self.power_kw is None and self.soc is None:
            raise InvalidEvent(f"{self.event_id}: a meter sample with no value")


def _check_series(event_id: str, start: datetime, values: tuple[float, ...], name: str) -> None:
    require_aware("start", start, event_id)
    if start != slot_floor(start):
        raise InvalidEvent(f"{event_id}: start {start.isoformat()} is not on a 15-minute boundary")
    if not values:
        raise InvalidEvent(f"{event_id}: {name} has no values")
    if len(values) > MAX_SERIES_SLOTS:
        raise InvalidEvent(f"{event_id}: {name} has {len(values)} values, over {MAX_SERIES_SLOTS}")
    for i, v in enumerate(values):
        require_finite(f"{name}[{i}]", v, event_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceUpdated:
    """Energy prices per 15-minute slot from `start` on (EUR/kWh; negative prices are real)."""

    kind: Literal["price_updated"] = "price_updated"
    event_id: str
    at: datetime
    start: datetime
    price_eur_per_kwh: tuple[float, ...]
    forecast_from: int | None = None  # values from this index on are forecasts, not published

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        _check_series(self.event_id, self.start, self.price_eur_per_kwh, "price_eur_per_kwh")
        for i, v in enumerate(self.price_eur_per_kwh):
            require_range(f"price_eur_per_kwh[{i}]", v, self.event_id, low=-10.0, high=100.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadroomUpdated:
    """Head-room h_t per 15-minute slot: what the chargers may draw together (kW)."""

    kind: Literal["headroom_updated"] = "headroom_updated"
    event_id: str
    at: datetime
    start: datetime
    headroom_kw: tuple[float, ...]

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        _check_series(self.event_id, self.start, self.headroom_kw, "headroom_kw")


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteLoadReported:
    """The households' load behind the connection was measured (chargers excluded), in kW."""

    kind: Literal["site_load_reported"] = "site_load_reported"
    event_id: str
    at: datetime
    load_kw: float

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        require_range("load_kw", self.load_kw, self.event_id, low=-100_000.0, high=100_000.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChargerConnected:
    """A charge point connected (or reconnected) to the central system."""

    kind: Literal["charger_connected"] = "charger_connected"
    event_id: str
    at: datetime
    charger_id: ChargerId

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChargerDisconnected:
    """A charge point's connection to the central system closed."""

    kind: Literal["charger_disconnected"] = "charger_disconnected"
    event_id: str
    at: datetime
    charger_id: ChargerId

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectorStatusChanged:
    """A charge point reported a connector's status (OCPP StatusNotification)."""

    kind: Literal["connector_status_changed"] = "connector_status_changed"
    event_id: str
    at: datetime
    charger_id: ChargerId
    connector_id: ConnectorId
    status: ConnectorStatus
    error_code: str = "NoError"

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        if self.connector_id < 0:
            raise InvalidEvent(f"{self.event_id}: connector id {self.connector_id} is negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionStarted:
    """A charge point started a transaction on a connector."""

    kind: Literal["transaction_started"] = "transaction_started"
    event_id: str
    at: datetime
    transaction_id: TransactionId
    charger_id: ChargerId
    connector_id: ConnectorId
    id_tag: str
    meter_start_wh: float
    vehicle_id: VehicleId | None = None

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        if self.connector_id < 1:
            raise InvalidEvent(f"{self.event_id}: connector id {self.connector_id} is below 1")
        require_range("meter_start_wh", self.meter_start_wh, self.event_id, low=0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionStopped:
    """A charge point stopped a transaction."""

    kind: Literal["transaction_stopped"] = "transaction_stopped"
    event_id: str
    at: datetime
    transaction_id: TransactionId
    meter_stop_wh: float
    reason: str = "Local"

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        require_range("meter_stop_wh", self.meter_stop_wh, self.event_id, low=0.0)


# --- Operator commands: requests that become standing overrides (or are refused). ---


def _check_command(event_id: str, at: datetime, expires_at: datetime) -> None:
    _common(event_id, at)
    require_aware("expires_at", expires_at, event_id)
    if expires_at <= at:
        raise InvalidEvent(
            f"{event_id}: expires at {expires_at.isoformat()}, not after it was issued"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ForceCharge:
    """Charge this car at full power now, whatever it costs, until the expiry."""

    kind: Literal["force_charge"] = "force_charge"
    event_id: str
    at: datetime
    expires_at: datetime
    vehicle_id: VehicleId

    def __post_init__(self) -> None:
        _check_command(self.event_id, self.at, self.expires_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseVehicle:
    """Do not charge or discharge this car until the expiry (or a resume)."""

    kind: Literal["pause_vehicle"] = "pause_vehicle"
    event_id: str
    at: datetime
    expires_at: datetime
    vehicle_id: VehicleId

    def __post_init__(self) -> None:
        _check_command(self.event_id, self.at, self.expires_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseCharger:
    """Give this charge point zero power until the expiry (or a resume)."""

    kind: Literal["pause_charger"] = "pause_charger"
    event_id: str
    at: datetime
    expires_at: datetime
    charger_id: ChargerId

    def __post_init__(self) -> None:
        _check_command(self.event_id, self.at, self.expires_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class Resume:
    """End the pauses and force-charges standing on a vehicle or a charger."""

    kind: Literal["resume"] = "resume"
    event_id: str
    at: datetime
    target_id: str

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)


@dataclass(frozen=True, slots=True, kw_only=True)
class CapSite:
    """Keep the chargers' total power at or below `limit_kw` until the expiry."""

    kind: Literal["cap_site"] = "cap_site"
    event_id: str
    at: datetime
    expires_at: datetime
    limit_kw: float

    def __post_init__(self) -> None:
        _check_command(self.event_id, self.at, self.expires_at)
        require_range("limit_kw", self.limit_kw, self.event_id, low=0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class PinCharger:
    """Hold this charge point's limit at `limit_kw` until the expiry."""

    kind: Literal["pin_charger"] = "pin_charger"
    event_id: str
    at: datetime
    expires_at: datetime
    charger_id: ChargerId
    limit_kw: float

    def __post_init__(self) -> None:
        _check_command(self.event_id, self.at, self.expires_at)
        require_range("limit_kw", self.limit_kw, self.event_id, low=0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class SetV2g:
    """Allow or forbid discharging this car until the expiry."""

    kind: Literal["set_v2g"] = "set_v2g"
    event_id: str
    at: datetime
    expires_at: datetime
    vehicle_id: VehicleId
    enabled: bool

    def __post_init__(self) -> None:
        _check_command(self.event_id, self.at, self.expires_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeDeparture:
    """The operator changes a car's departure and, optionally, its energy target."""

    kind: Literal["change_departure"] = "change_departure"
    event_id: str
    at: datetime
    vehicle_id: VehicleId
    departure: datetime
    target_kwh: float | None = None

    def __post_init__(self) -> None:
        _common(self.event_id, self.at)
        require_aware("departure", self.departure, self.event_id)
        if self.target_kwh is not None:
            require_range("target_kwh", self.target_kwh, self.event_id, low=0.0)


Command: TypeAlias = (
    ForceCharge
    | PauseVehicle
    | PauseCharger
    | Resume
    | CapSite
    | PinCharger
    | SetV2g
    | ChangeDeparture
)

Fact: TypeAlias = (
    SiteConfigured
    | VehicleRegistered
    | ChargerRegistered
    | VehiclePluggedIn
    | VehicleUnplugged
    | SocReported
    | DepartureSet
    | MeterSampled
    | PriceUpdated
    | HeadroomUpdated
    | SiteLoadReported
    | ChargerConnected
    | ChargerDisconnected
    | ConnectorStatusChanged
    | TransactionStarted
    | TransactionStopped
)

Event: TypeAlias = Fact | Command

COMMAND_TYPES: tuple[type, ...] = (
    ForceCharge,
    PauseVehicle,
    PauseCharger,
    Resume,
    CapSite,
    PinCharger,
    SetV2g,
    ChangeDeparture,
)


def is_command(event: Event) -> bool:
    """Whether the event is an operator command (which gets a result message)."""
    return isinstance(event, COMMAND_TYPES)


def check_timely(event: Event, now: datetime, max_ahead: timedelta) -> None:
    """Refuse an event stamped further in the future than clock skew explains.

    Raises:
        Refused: with `FROM_THE_FUTURE` when `event.at` is more than `max_ahead` after `now`.
    """
    require_finite("max_ahead", max_ahead.total_seconds(), event.event_id)
    if event.at - now > max_ahead:
        raise Refused(
            RefusalCode.FROM_THE_FUTURE,
            f"{event.event_id}: stamped {event.at.isoformat()}, more than "
            f"{max_ahead.total_seconds():.0f} s after now ({now.isoformat()})",
        )
