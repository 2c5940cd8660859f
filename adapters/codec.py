"""JSON for events and records, on the wire and in Redis, through pydantic `TypeAdapter`s.

Parsing goes straight into the domain dataclasses, so their `__post_init__` checks run on every
payload; `InvalidEvent` is a `ValueError`, which pydantic reports as a field error.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import Field, TypeAdapter, ValidationError

from controller.domain import (
    ChargePoint,
    Override,
    Series,
    Site,
    SiteLoad,
    Transaction,
    Vehicle,
)
from controller.errors import InvalidEvent
from controller.events import Event
from controller.state import Record, RecordKind

EVENT: TypeAdapter[Event] = TypeAdapter(Annotated[Event, Field(discriminator="kind")])

RECORD_TYPES: dict[RecordKind, type[Any]] = {
    "site": Site,
    "vehicle": Vehicle,
    "charger": ChargePoint,
    "transaction": Transaction,
    "prices": Series,
    "headroom": Series,
    "site_load": SiteLoad,
    "override": Override,
}
_RECORD_ADAPTERS: dict[RecordKind, TypeAdapter[Any]] = {
    kind: TypeAdapter(cls) for kind, cls in RECORD_TYPES.items()
}

T = TypeVar("T")


def encode_event(event: Event) -> str:
    """The event as compact JSON."""
    return EVENT.dump_json(event).decode()


def decode_event(payload: str | bytes) -> Event:
    """Parse and validate an event.

    Raises:
        InvalidEvent: with pydantic's first error, location included.
    """
    try:
        return EVENT.validate_json(payload)
    except ValidationError as exc:
        raise InvalidEvent(describe(exc)) from exc


def encode_record(kind: RecordKind, record: Record) -> str:
    """A record as compact JSON."""
    return _RECORD_ADAPTERS[kind].dump_json(record).decode()


def decode_record(kind: RecordKind, payload: str | bytes) -> Record:
    """Parse a stored record of a given kind."""
    try:
        record: Record = _RECORD_ADAPTERS[kind].validate_json(payload)
    except ValidationError as exc:
        raise InvalidEvent(f"stored {kind}: {describe(exc)}") from exc
    return record


def describe(exc: ValidationError) -> str:
    """One line naming where a payload is wrong and why (the first error of several)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def event_schema() -> dict[str, Any]:
    """JSON schema of every event and command (written to docs/schemas/)."""
    return EVENT.json_schema()
