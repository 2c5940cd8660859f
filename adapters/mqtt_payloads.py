"""The MQTT payload schemas per topic, and their translation into typed events.

Each payload is JSON with a timestamp `at` (ISO 8601 with a zone). The event id of a telemetry
message is derived from its topic and timestamp, so a QoS 1 duplicate, which carries the same
payload, is recognised and applied once. Operator commands carry their own `command_id`.
Schemas: `docs/schemas/mqtt/*.json`, written by `voltpool schema` and checked by a test.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from adapters.codec import describe
from controller.errors import InvalidEvent
from controller.events import (
    CapSite,
    ChangeDeparture,
    Command,
    DepartureSet,
    Event,
    ForceCharge,
    HeadroomUpdated,
    PauseCharger,
    PauseVehicle,
    PinCharger,
    PriceUpdated,
    Resume,
    SetV2g,
    SiteLoadReported,
    SocReported,
)

_STRICT = ConfigDict(extra="forbid", frozen=True)


class SocPayload(BaseModel):
    """`{prefix}/vehicle/{vehicle_id}/soc`: the car's state of charge."""

    model_config = _STRICT
    at: AwareDatetime
    soc: float = Field(ge=0.0, le=1.0, description="fraction of the battery, 0..1")


class DeparturePayload(BaseModel):
    """`{prefix}/vehicle/{vehicle_id}/departure`: when the car leaves, and what it needs then."""

    model_config = _STRICT
    at: AwareDatetime
    departure: AwareDatetime
    target_kwh: float | None = Field(default=None, ge=0.0)
    target_soc: float | None = Field(default=None, ge=0.0, le=1.0)


class PricePayload(BaseModel):
    """`{prefix}/price`: energy prices from `start`, per 15 or 60 minutes (EUR/kWh)."""

    model_config = _STRICT
    at: AwareDatetime
    start: AwareDatetime
    resolution_min: Literal[15, 60] = 15
    price_eur_per_kwh: list[float] = Field(min_length=1, max_length=768)
    forecast_from: int | None = Field(
        default=None, ge=0, description="index of the first value that is a forecast"
    )


class HeadroomPayload(BaseModel):
    """`{prefix}/site/headroom`: what the chargers may draw together, per 15 minutes (kW)."""

    model_config = _STRICT
    at: AwareDatetime
    start: AwareDatetime
    headroom_kw: list[float] = Field(min_length=1, max_length=768)


class SiteLoadPayload(BaseModel):
    """`{prefix}/site/load`: the households' measured load now, chargers excluded (kW)."""

    model_config = _STRICT
    at: AwareDatetime
    load_kw: float


class _CommandBase(BaseModel):
    model_config = _STRICT
    command_id: str = Field(min_length=1, max_length=128)
    at: AwareDatetime
    expires_at: AwareDatetime | None = None
    duration_s: float | None = Field(default=None, gt=0.0, le=7 * 24 * 3600)

    def expiry(self) -> datetime:
        """`expires_at`, or `at + duration_s`; one of them is required."""
        if self.expires_at is not None:
            return self.expires_at
        if self.duration_s is not None:
            return self.at + timedelta(seconds=self.duration_s)
        raise InvalidEvent(f"{self.command_id}: give expires_at or duration_s")


class ForceChargeCommand(_CommandBase):
    """Charge a car at full power now, whatever it costs."""

    command: Literal["force_charge"]
    vehicle_id: str


class PauseVehicleCommand(_CommandBase):
    """Neither charge nor discharge a car."""

    command: Literal["pause_vehicle"]
    vehicle_id: str


class PauseChargerCommand(_CommandBase):
    """Give a charge point zero power."""

    command: Literal["pause_charger"]
    charger_id: str


class ResumeCommand(_CommandBase):
    """End pauses and force-charges on a car or a charge point."""

    command: Literal["resume"]
    target_id: str


class CapSiteCommand(_CommandBase):
    """Keep the chargers' total at or below a limit."""

    command: Literal["cap_site"]
    limit_kw: float


class PinChargerCommand(_CommandBase):
    """Hold a charge point's limit."""

    command: Literal["pin_charger"]
    charger_id: str
    limit_kw: float


class SetV2gCommand(_CommandBase):
    """Allow or forbid discharging a car."""

    command: Literal["set_v2g"]
    vehicle_id: str
    enabled: bool


class ChangeDepartureCommand(_CommandBase):
    """Change a car's departure and, optionally, its energy target."""

    command: Literal["change_departure"]
    vehicle_id: str
    departure: AwareDatetime
    target_kwh: float | None = None


CommandPayload = Annotated[
    ForceChargeCommand
    | PauseVehicleCommand
    | PauseChargerCommand
    | ResumeCommand
    | CapSiteCommand
    | PinChargerCommand
    | SetV2gCommand
    | ChangeDepartureCommand,
    Field(discriminator="command"),
]
COMMAND: TypeAdapter[Any] = TypeAdapter(CommandPayload)

TOPIC_SCHEMAS: dict[str, Any] = {
    "vehicle_soc": SocPayload,
    "vehicle_departure": DeparturePayload,
    "price": PricePayload,
    "site_headroom": HeadroomPayload,
    "site_load": SiteLoadPayload,
    "operator_command": COMMAND,
}


def _parse(model: type[BaseModel], payload: bytes | str) -> Any:
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise InvalidEvent(describe(exc)) from exc


def _iso(at: datetime) -> str:
    return at.isoformat()


def soc_event(vehicle_id: str, payload: bytes | str) -> SocReported:
    """`vehicle/{id}/soc` → `SocReported`."""
    msg: SocPayload = _parse(SocPayload, payload)
    return SocReported(
        event_id=f"soc:{vehicle_id}:{_iso(msg.at)}", at=msg.at, vehicle_id=vehicle_id, soc=msg.soc
    )


def departure_event(vehicle_id: str, payload: bytes | str) -> DepartureSet:
    """`vehicle/{id}/departure` → `DepartureSet`."""
    msg: DeparturePayload = _parse(DeparturePayload, payload)
    return DepartureSet(
        event_id=f"dep:{vehicle_id}:{_iso(msg.at)}",
        at=msg.at,
        vehicle_id=vehicle_id,
        departure=msg.departure,
        target_kwh=msg.target_kwh,
        target_soc=msg.target_soc,
    )


def price_event(payload: bytes | str) -> PriceUpdated:
    """`price` → `PriceUpdated`, hourly prices repeated over their four quarter-hours."""
    msg: PricePayload = _parse(PricePayload, payload)
    repeat = msg.resolution_min // 15
    values = tuple(p for p in msg.price_eur_per_kwh for _ in range(repeat))
    forecast_from = None if msg.forecast_from is None else msg.forecast_from * repeat
    return PriceUpdated(
        event_id=f"price:{_iso(msg.at)}",
        at=msg.at,
        start=msg.start,
        price_eur_per_kwh=values,
        forecast_from=forecast_from,
    )


def headroom_event(payload: bytes | str) -> HeadroomUpdated:
    """`site/headroom` → `HeadroomUpdated`."""
    msg: HeadroomPayload = _parse(HeadroomPayload, payload)
    return HeadroomUpdated(
        event_id=f"headroom:{_iso(msg.at)}",
        at=msg.at,
        start=msg.start,
        headroom_kw=tuple(msg.headroom_kw),
    )


def site_load_event(payload: bytes | str) -> SiteLoadReported:
    """`site/load` → `SiteLoadReported`."""
    msg: SiteLoadPayload = _parse(SiteLoadPayload, payload)
    return SiteLoadReported(event_id=f"load:{_iso(msg.at)}", at=msg.at, load_kw=msg.load_kw)


def command_id_of(payload: bytes | str) -> str | None:
    """The `command_id` of a command payload that may not parse, to answer it by id."""
    import json

    try:
        raw = json.loads(payload)
    except ValueError:
        return None
    value = raw.get("command_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


def command_event(payload: bytes | str) -> Command:
    """`operator/command` → the command event (its `event_id` is the `command_id`)."""
    try:
        msg = COMMAND.validate_json(payload)
    except ValidationError as exc:
        raise InvalidEvent(describe(exc)) from exc
    common: dict[str, Any] = {"event_id": msg.command_id, "at": msg.at}
    match msg:
        case ForceChargeCommand():
            return ForceCharge(**common, expires_at=msg.expiry(), vehicle_id=msg.vehicle_id)
        case PauseVehicleCommand():
            return PauseVehicle(**common, expires_at=msg.expiry(), vehicle_id=msg.vehicle_id)
        case PauseChargerCommand():
            return PauseCharger(**common, expires_at=msg.expiry(), charger_id=msg.charger_id)
        case ResumeCommand():
            return Resume(**common, target_id=msg.target_id)
        case CapSiteCommand():
            return CapSite(**common, expires_at=msg.expiry(), limit_kw=msg.limit_kw)
        case PinChargerCommand():
            return PinCharger(
                **common,
                expires_at=msg.expiry(),
                charger_id=msg.charger_id,
                limit_kw=msg.limit_kw,
            )
        case SetV2gCommand():
            return SetV2g(
                **common, expires_at=msg.expiry(), vehicle_id=msg.vehicle_id, enabled=msg.enabled
            )
        case ChangeDepartureCommand():
            return ChangeDeparture(
                **common,
                vehicle_id=msg.vehicle_id,
                departure=msg.departure,
                target_kwh=msg.target_kwh,
            )
    raise InvalidEvent(f"unknown command {msg!r}")  # pragma: no cover


def schemas() -> dict[str, Any]:
    """JSON schema of every topic's payload, by topic name."""
    out: dict[str, Any] = {}
    for name, schema in TOPIC_SCHEMAS.items():
        out[name] = (
            schema.json_schema() if isinstance(schema, TypeAdapter) else schema.model_json_schema()
        )
    return out


def event_for(topic_tail: list[str], payload: bytes | str) -> Event:
    """The event of a message on `{prefix}/<topic_tail...>`.

    Raises:
        InvalidEvent: the payload does not fit the topic's schema, or the topic is unknown.
    """
    match topic_tail:
        case ["vehicle", vehicle_id, "soc"]:
            return soc_event(vehicle_id, payload)
        case ["vehicle", vehicle_id, "departure"]:
            return departure_event(vehicle_id, payload)
        case ["price"]:
            return price_event(payload)
        case ["site", "headroom"]:
            return headroom_event(payload)
        case ["site", "load"]:
            return site_load_event(payload)
        case ["operator", "command"]:
            return command_event(payload)
    raise InvalidEvent(f"no input topic {'/'.join(topic_tail)!r}")
