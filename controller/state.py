"""Fleet state and the pure reducer that applies one event to it.

`apply_event(state, event)` returns the new state and the records that changed, or raises
`Refused` with the reason. It reads no clock: everything it needs is in the event, so replaying
the same events gives the same state (the crash-recovery guarantee rests on this).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal, TypeAlias

from controller.domain import (
    ChargePoint,
    ChargerId,
    Connector,
    Override,
    OverrideId,
    Series,
    Site,
    SiteLoad,
    Transaction,
    TransactionId,
    Vehicle,
    VehicleId,
)
from controller.errors import RefusalCode, Refused
from controller.events import (
    CapSite,
    ChangeDeparture,
    ChargerConnected,
    ChargerDisconnected,
    ChargerRegistered,
    ConnectorStatusChanged,
    DepartureSet,
    Event,
    ForceCharge,
    HeadroomUpdated,
    MeterSampled,
    PauseCharger,
    PauseVehicle,
    PinCharger,
    PriceUpdated,
    Resume,
    SetV2g,
    SiteConfigured,
    SiteLoadReported,
    SocReported,
    TransactionStarted,
    TransactionStopped,
    VehiclePluggedIn,
    VehicleRegistered,
    VehicleUnplugged,
)

RecordKind: TypeAlias = Literal[
    "site", "vehicle", "charger", "transaction", "prices", "headroom", "site_load", "override"
]
Record: TypeAlias = Site | Vehicle | ChargePoint | Transaction | Series | SiteLoad | Override


@dataclass(frozen=True, slots=True)
class Change:
    """One record written (or deleted, when `record` is None) by applying an event."""

    kind: RecordKind
    key: str
    record: Record | None


@dataclass(frozen=True, slots=True)
class FleetState:
    """Everything the controller knows about its site, as of the last applied event.

    The mappings are never mutated: each applied event builds new ones for what it changes.
    """

    site: Site | None = None
    vehicles: Mapping[VehicleId, Vehicle] = field(default_factory=dict)
    chargers: Mapping[ChargerId, ChargePoint] = field(default_factory=dict)
    transactions: Mapping[TransactionId, Transaction] = field(default_factory=dict)
    prices: Series | None = None
    headroom: Series | None = None
    site_load: SiteLoad | None = None
    overrides: Mapping[OverrideId, Override] = field(default_factory=dict)

    def with_changes(self, changes: tuple[Change, ...]) -> FleetState:
        """A new state with `changes` written into it."""
        site, prices, headroom, load = self.site, self.prices, self.headroom, self.site_load
        tables: dict[str, dict[object, object]] = {}

        def table(name: str) -> dict[object, object]:
            if name not in tables:
                tables[name] = dict(getattr(self, name))
            return tables[name]

        for change in changes:
            if change.kind == "site":
                assert change.record is None or isinstance(change.record, Site)
                site = change.record
            elif change.kind == "prices":
                assert change.record is None or isinstance(change.record, Series)
                prices = change.record
            elif change.kind == "site_load":
                assert change.record is None or isinstance(change.record, SiteLoad)
                load = change.record
            elif change.kind == "headroom":
                assert change.record is None or isinstance(change.record, Series)
                headroom = change.record
            else:
                rows = table(_TABLE[change.kind])
                key = _typed_key(change.kind, change.key)
                if change.record is None:
                    rows.pop(key, None)
                else:
                    rows[key] = change.record
        return FleetState(
            site=site,
            vehicles=tables.get("vehicles", self.vehicles),  # type: ignore[arg-type]
            chargers=tables.get("chargers", self.chargers),  # type: ignore[arg-type]
            transactions=tables.get("transactions", self.transactions),  # type: ignore[arg-type]
            prices=prices,
            headroom=headroom,
            site_load=load,
            overrides=tables.get("overrides", self.overrides),  # type: ignore[arg-type]
        )

    def active_overrides(self, at: datetime) -> list[Override]:
        """The overrides in force at `at`, oldest first."""
        return sorted(
            (o for o in self.overrides.values() if o.active(at)), key=lambda o: o.created_at
        )

    def expired_overrides(self, at: datetime) -> list[Override]:
        """The overrides whose expiry has passed at `at` (to be pruned)."""
        return [o for o in self.overrides.values() if o.expires_at <= at]


_TABLE: dict[str, str] = {
    "vehicle": "vehicles",
    "charger": "chargers",
    "transaction": "transactions",
    "override": "overrides",
}


def _typed_key(kind: str, key: str) -> object:
    return int(key) if kind == "transaction" else key


def record_key(record: Record) -> tuple[RecordKind, str]:
    """The (kind, key) under which a record is stored."""
    if isinstance(record, Site):
        return "site", record.site_id
    if isinstance(record, Vehicle):
        return "vehicle", record.vehicle_id
    if isinstance(record, ChargePoint):
        return "charger", record.charger_id
    if isinstance(record, Transaction):
        return "transaction", str(record.transaction_id)
    if isinstance(record, Override):
        return "override", record.override_id
    raise TypeError(f"no key for {type(record).__name__}")


def _put(record: Record) -> Change:
    kind, key = record_key(record)
    return Change(kind, key, record)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying one event did: the new state and the records it wrote."""

    state: FleetState
    changes: tuple[Change, ...]


def _vehicle(state: FleetState, vehicle_id: VehicleId) -> Vehicle:
    vehicle = state.vehicles.get(vehicle_id)
    if vehicle is None:
        raise Refused(RefusalCode.UNKNOWN_VEHICLE, f"no vehicle {vehicle_id!r} at this site")
    return vehicle


def _charger(state: FleetState, charger_id: ChargerId) -> ChargePoint:
    charger = state.chargers.get(charger_id)
    if charger is None:
        raise Refused(RefusalCode.UNKNOWN_CHARGER, f"no charge point {charger_id!r} at this site")
    return charger


def _connector(charger: ChargePoint, connector_id: int) -> Connector:
    connector = charger.connector(connector_id)
    if connector is None:
        raise Refused(
            RefusalCode.UNKNOWN_CONNECTOR,
            f"charge point {charger.charger_id!r} has no connector {connector_id}",
        )
    return connector


def _stale(what: str, at: datetime, known: datetime) -> Refused:
    return Refused(
        RefusalCode.STALE,
        f"{what} stamped {at.isoformat()} is older than what is stored ({known.isoformat()})",
    )


def apply_event(state: FleetState, event: Event) -> Outcome:
    """Apply one event to the fleet state.

    Raises:
        Refused: the event names something unknown, contradicts the state, or is older than
            what is stored for the same thing (out-of-order telemetry).
    """
    changes = _changes_for(state, event)
    return Outcome(state.with_changes(changes), changes)


def _changes_for(state: FleetState, event: Event) -> tuple[Change, ...]:
    match event:
        case SiteConfigured(site=site):
            return (_put(site),)
        case VehicleRegistered(vehicle=new):
            return (_put(_merge_vehicle(state.vehicles.get(new.vehicle_id), new)),)
        case ChargerRegistered(charger=new):
            return (_put(_merge_charger(state.chargers.get(new.charger_id), new)),)
        case VehiclePluggedIn():
            return _plug_in(state, event)
        case VehicleUnplugged(vehicle_id=vehicle_id):
            return _unplug(state, _vehicle(state, vehicle_id))
        case SocReported(vehicle_id=vehicle_id, soc=soc, at=at):
            vehicle = _vehicle(state, vehicle_id)
            if at < vehicle.energy_at:
                raise _stale(f"soc of {vehicle_id!r}", at, vehicle.energy_at)
            meter = _connector_meter(state, vehicle)
            return (
                _put(
                    replace(
                        vehicle,
                        energy_kwh=soc * vehicle.capacity_kwh,
                        energy_at=at,
                        meter_wh_at_energy=meter,
                    )
                ),
            )
        case DepartureSet() | ChangeDeparture():
            vehicle = _vehicle(state, event.vehicle_id)
            if event.departure <= event.at:
                raise Refused(
                    RefusalCode.OUT_OF_RANGE,
                    f"departure {event.departure.isoformat()} of {event.vehicle_id!r} is not "
                    f"after {event.at.isoformat()}",
                )
            target = vehicle.target_kwh if event.target_kwh is None else event.target_kwh
            if isinstance(event, DepartureSet) and event.target_soc is not None:
                target = event.target_soc * vehicle.capacity_kwh
            if target is not None and target > vehicle.capacity_kwh:
                raise Refused(
                    RefusalCode.OUT_OF_RANGE,
                    f"target {target} kWh is above the battery of {event.vehicle_id!r} "
                    f"({vehicle.capacity_kwh} kWh)",
                )
            return (_put(replace(vehicle, departure=event.departure, target_kwh=target)),)
        case MeterSampled():
            return _meter(state, event)
        case PriceUpdated(at=at):
            if state.prices is not None and at < state.prices.received_at:
                raise _stale("price series", at, state.prices.received_at)
            series = Series(
                start=event.start,
                values=event.price_eur_per_kwh,
                received_at=at,
                forecast_from=event.forecast_from,
            )
            return (Change("prices", "prices", series),)
        case HeadroomUpdated(at=at):
            if state.headroom is not None and at < state.headroom.received_at:
                raise _stale("head-room series", at, state.headroom.received_at)
            series = Series(start=event.start, values=event.headroom_kw, received_at=at)
            return (Change("headroom", "headroom", series),)
        case SiteLoadReported(at=at, load_kw=load_kw):
            if state.site_load is not None and at < state.site_load.at:
                raise _stale("site load", at, state.site_load.at)
            return (Change("site_load", "site_load", SiteLoad(load_kw=load_kw, at=at)),)
        case ChargerConnected(charger_id=cid, at=at) | ChargerDisconnected(charger_id=cid, at=at):
            charger = _charger(state, cid)
            online = isinstance(event, ChargerConnected)
            if charger.last_seen is not None and at < charger.last_seen:
                raise _stale(f"connection state of {cid!r}", at, charger.last_seen)
            return (_put(replace(charger, online=online, last_seen=at)),)
        case ConnectorStatusChanged():
            charger = _charger(state, event.charger_id)
            if event.connector_id == 0:
                return (_put(replace(charger, last_seen=_later(charger.last_seen, event.at))),)
            connector = _connector(charger, event.connector_id)
            updated = charger.with_connector(replace(connector, status=event.status))
            return (_put(replace(updated, last_seen=_later(charger.last_seen, event.at))),)
        case TransactionStarted():
            return _start_transaction(state, event)
        case TransactionStopped():
            return _stop_transaction(state, event)
        case ForceCharge() | PauseVehicle() | SetV2g():
            _vehicle(state, event.vehicle_id)
            return (_put(_override_for(event, event.vehicle_id)),)
        case PauseCharger():
            _charger(state, event.charger_id)
            return (_put(_override_for(event, event.charger_id)),)
        case PinCharger():
            charger = _charger(state, event.charger_id)
            if event.limit_kw > charger.max_power_kw:
                raise Refused(
                    RefusalCode.OUT_OF_RANGE,
                    f"pin at {event.limit_kw} kW is above the circuit limit of "
                    f"{event.charger_id!r} ({charger.max_power_kw} kW)",
                )
            return (_put(_override_for(event, event.charger_id)),)
        case CapSite():
            site_id = state.site.site_id if state.site is not None else "site"
            return (_put(_override_for(event, site_id)),)
        case Resume(target_id=target):
            if target not in state.vehicles and target not in state.chargers:
                raise Refused(
                    RefusalCode.UNKNOWN_VEHICLE,
                    f"nothing called {target!r} to resume: no such vehicle or charge point",
                )
            ended = [
                o
                for o in state.overrides.values()
                if o.target_id == target
                and o.kind in ("force_charge", "pause_vehicle", "pause_charger")
            ]
            return tuple(Change("override", o.override_id, None) for o in ended)
    raise TypeError(f"no rule for event {type(event).__name__}")  # pragma: no cover


def _later(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


def _override_for(
    event: ForceCharge | PauseVehicle | SetV2g | PauseCharger | PinCharger | CapSite,
    target_id: str,
) -> Override:
    return Override(
        override_id=event.event_id,
        kind=event.kind,
        target_id=target_id,
        created_at=event.at,
        expires_at=event.expires_at,
        limit_kw=getattr(event, "limit_kw", None),
        enabled=getattr(event, "enabled", None),
    )


def _merge_vehicle(old: Vehicle | None, new: Vehicle) -> Vehicle:
    """A re-registration changes the specification, never where the car is or what it holds."""
    if old is None:
        return new
    keep_energy = old.energy_at > new.energy_at
    return replace(
        new,
        energy_kwh=min(old.energy_kwh, new.capacity_kwh) if keep_energy else new.energy_kwh,
        energy_at=old.energy_at if keep_energy else new.energy_at,
        meter_wh_at_energy=old.meter_wh_at_energy if keep_energy else new.meter_wh_at_energy,
        charger_id=old.charger_id,
        connector_id=old.connector_id,
        plugged_at=old.plugged_at,
        departure=new.departure if new.departure is not None else old.departure,
        target_kwh=new.target_kwh if new.target_kwh is not None else old.target_kwh,
    )


def _merge_charger(old: ChargePoint | None, new: ChargePoint) -> ChargePoint:
    """A re-registration changes limits and connectors, not what the connectors hold."""
    if old is None:
        return new
    merged = replace(new, online=old.online, last_seen=old.last_seen)
    for connector in new.connectors:
        before = old.connector(connector.connector_id)
        if before is not None:
            merged = merged.with_connector(
                replace(
                    connector,
                    status=before.status,
                    vehicle_id=before.vehicle_id,
                    transaction_id=before.transaction_id,
                    meter_wh=before.meter_wh,
                    power_kw=before.power_kw,
                    meter_at=before.meter_at,
                )
            )
    return merged


def _connector_meter(state: FleetState, vehicle: Vehicle) -> float | None:
    if vehicle.charger_id is None or vehicle.connector_id is None:
        return None
    charger = state.chargers.get(vehicle.charger_id)
    connector = charger.connector(vehicle.connector_id) if charger else None
    return connector.meter_wh if connector else None


def _unplug(state: FleetState, vehicle: Vehicle) -> tuple[Change, ...]:
    changes: list[Change] = []
    if vehicle.charger_id is not None and vehicle.connector_id is not None:
        charger = state.chargers.get(vehicle.charger_id)
        connector = charger.connector(vehicle.connector_id) if charger else None
        if charger is not None and connector is not None:
            if connector.vehicle_id == vehicle.vehicle_id:
                changes.append(_put(charger.with_connector(replace(connector, vehicle_id=None))))
    # A departure and target belong to one stay; the next stay brings its own.
    changes.append(
        _put(
            replace(
                vehicle,
                charger_id=None,
                connector_id=None,
                plugged_at=None,
                meter_wh_at_energy=None,
                departure=None,
                target_kwh=None,
            )
        )
    )
    return tuple(changes)


def _plug_in(state: FleetState, event: VehiclePluggedIn) -> tuple[Change, ...]:
    vehicle = _vehicle(state, event.vehicle_id)
    charger = _charger(state, event.charger_id)
    connector = _connector(charger, event.connector_id)
    if vehicle.plugged_at is not None and event.at < vehicle.plugged_at:
        raise _stale(f"plug-in of {event.vehicle_id!r}", event.at, vehicle.plugged_at)
    working = state
    changes: list[Change] = []
    if (
        vehicle.charger_id == event.charger_id
        and vehicle.connector_id == event.connector_id
        and connector.vehicle_id == vehicle.vehicle_id
    ):
        return (_put(replace(vehicle, plugged_at=vehicle.plugged_at or event.at)),)
    # The connector's new occupant wins: whoever was there, and wherever this car was, is gone.
    if connector.vehicle_id is not None and connector.vehicle_id != vehicle.vehicle_id:
        previous = working.vehicles.get(connector.vehicle_id)
        if previous is not None:
            step = _unplug(working, previous)
            working = working.with_changes(step)
            changes.extend(step)
    if vehicle.charger_id is not None:
        step = _unplug(working, working.vehicles[vehicle.vehicle_id])
        working = working.with_changes(step)
        changes.extend(step)
        vehicle = working.vehicles[vehicle.vehicle_id]
        # Keep the stay's departure and target that _unplug cleared: they came with this car.
        vehicle = replace(
            vehicle,
            departure=state.vehicles[vehicle.vehicle_id].departure,
            target_kwh=state.vehicles[vehicle.vehicle_id].target_kwh,
        )
    charger = working.chargers[event.charger_id]
    connector = _connector(charger, event.connector_id)
    changes.append(_put(charger.with_connector(replace(connector, vehicle_id=vehicle.vehicle_id))))
    changes.append(
        _put(
            replace(
                vehicle,
                charger_id=event.charger_id,
                connector_id=event.connector_id,
                plugged_at=event.at,
                meter_wh_at_energy=connector.meter_wh,
            )
        )
    )
    return tuple(changes)


def _meter(state: FleetState, event: MeterSampled) -> tuple[Change, ...]:
    charger = _charger(state, event.charger_id)
    if event.connector_id == 0:
        # Connector 0 meters the whole charge point; the planner works per connector.
        return (_put(replace(charger, last_seen=_later(charger.last_seen, event.at))),)
    connector = _connector(charger, event.connector_id)
    if connector.meter_at is not None and event.at < connector.meter_at:
        raise _stale(
            f"meter sample of {event.charger_id!r}/{event.connector_id}",
            event.at,
            connector.meter_at,
        )
    updated = replace(
        connector,
        meter_wh=event.meter_wh if event.meter_wh is not None else connector.meter_wh,
        power_kw=event.power_kw if event.power_kw is not None else connector.power_kw,
        meter_at=event.at,
    )
    changes = [
        _put(
            replace(charger.with_connector(updated), last_seen=_later(charger.last_seen, event.at))
        )
    ]
    vehicle = state.vehicles.get(connector.vehicle_id) if connector.vehicle_id else None
    if vehicle is not None and event.at >= vehicle.energy_at:
        if event.soc is not None:
            vehicle = replace(
                vehicle,
                energy_kwh=event.soc * vehicle.capacity_kwh,
                energy_at=event.at,
                meter_wh_at_energy=updated.meter_wh,
            )
            changes.append(_put(vehicle))
        elif event.meter_wh is not None:
            base = vehicle.meter_wh_at_energy
            delta_wh = 0.0 if base is None or event.meter_wh < base else event.meter_wh - base
            energy = min(
                vehicle.capacity_kwh,
                vehicle.energy_kwh + vehicle.charge_efficiency * delta_wh / 1000.0,
            )
            changes.append(
                _put(
                    replace(
                        vehicle,
                        energy_kwh=energy,
                        energy_at=event.at,
                        meter_wh_at_energy=event.meter_wh,
                    )
                )
            )
    return tuple(changes)


def _start_transaction(state: FleetState, event: TransactionStarted) -> tuple[Change, ...]:
    existing = state.transactions.get(event.transaction_id)
    if existing is not None:
        same = (existing.charger_id, existing.connector_id, existing.started_at) == (
            event.charger_id,
            event.connector_id,
            event.at,
        )
        if same:
            return ()
        raise Refused(
            RefusalCode.CONFLICT,
            f"transaction {event.transaction_id} already exists on "
            f"{existing.charger_id!r}/{existing.connector_id}",
        )
    charger = _charger(state, event.charger_id)
    connector = _connector(charger, event.connector_id)
    vehicle_id = event.vehicle_id or connector.vehicle_id
    transaction = Transaction(
        transaction_id=event.transaction_id,
        charger_id=event.charger_id,
        connector_id=event.connector_id,
        id_tag=event.id_tag,
        started_at=event.at,
        meter_start_wh=event.meter_start_wh,
        vehicle_id=vehicle_id,
    )
    updated = replace(
        connector,
        transaction_id=event.transaction_id,
        meter_wh=event.meter_start_wh if connector.meter_wh is None else connector.meter_wh,
    )
    return (_put(transaction), _put(charger.with_connector(updated)))


def _stop_transaction(state: FleetState, event: TransactionStopped) -> tuple[Change, ...]:
    transaction = state.transactions.get(event.transaction_id)
    if transaction is None:
        raise Refused(
            RefusalCode.UNKNOWN_TRANSACTION, f"no transaction {event.transaction_id} to stop"
        )
    if transaction.stopped_at is not None:
        return ()
    if event.meter_stop_wh < transaction.meter_start_wh:
        raise Refused(
            RefusalCode.OUT_OF_RANGE,
            f"transaction {event.transaction_id} stops at {event.meter_stop_wh} Wh, below its "
            f"start register {transaction.meter_start_wh} Wh",
        )
    if event.at < transaction.started_at:
        raise Refused(
            RefusalCode.OUT_OF_RANGE,
            f"transaction {event.transaction_id} stops before it starts",
        )
    stopped = replace(
        transaction,
        stopped_at=event.at,
        meter_stop_wh=event.meter_stop_wh,
        stop_reason=event.reason,
    )
    changes = [_put(stopped)]
    charger = state.chargers.get(transaction.charger_id)
    connector = charger.connector(transaction.connector_id) if charger else None
    if charger is not None and connector is not None:
        if connector.transaction_id == event.transaction_id:
            changes.append(_put(charger.with_connector(replace(connector, transaction_id=None))))
    return tuple(changes)
