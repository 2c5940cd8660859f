"""What the OCPP adapter needs from the rest of voltpool, as small Protocols.

`EventSink` is where translated events go: `controller.service.ControllerService.submit` has
this signature. `ChargerListener` is told when a charge point becomes ready for commands
(boot accepted, or a reconnect of a charge point accepted before) and when it goes away: the
lease dispatcher is one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol, TypeAlias

from controller.domain import ChargePoint, ChargerId, VehicleId
from controller.errors import Refused
from controller.events import Event


class EventSink(Protocol):
    """Takes typed events; may raise `controller.errors.Refused` or `InvalidEvent`."""

    async def submit(self, event: Event) -> None:
        """Admit one event (idempotent by `event.event_id`)."""
        ...


class BatchEventSink(EventSink, Protocol):
    """An `EventSink` that also admits an ordered batch in one append (the service does).

    The central system uses `submit_many` when its sink has it, else `submit` one event after
    the other: every `EventSink` keeps working."""

    async def submit_many(self, events: Sequence[Event]) -> list[Refused | None]:
        """Admit the events in order; per event None (admitted) or its refusal."""
        ...


class ChargerListener(Protocol):
    """Told about charge points that can take commands, and those that left."""

    async def charger_ready(self, charger_id: ChargerId, *, rebooted: bool) -> None:
        """The charge point is connected and accepted; `rebooted`: it sent a BootNotification."""
        ...

    async def charger_gone(self, charger_id: ChargerId) -> None:
        """The charge point's connection closed."""
        ...


ChargerLookup: TypeAlias = Callable[[ChargerId], ChargePoint | None]
"""The charge point's configuration (connectors, electrical data) if the fleet knows it."""

VehicleForTag: TypeAlias = Callable[[str], VehicleId | None]
"""The vehicle an idTag belongs to, if any (RFID card or Plug & Charge contract per car)."""

MeterListener: TypeAlias = Callable[[ChargerId, int, datetime, float], None]
"""Told each measured connector power: (charger, connector, sample time, kW, import positive)."""
