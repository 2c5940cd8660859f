"""The ports the core needs from the outside world, as small Protocols of domain types.

Adapters implement them (Redis, MQTT, OCPP); tests use the same adapters on real servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from controller.events import Event
from controller.planning.plan import Plan
from controller.state import Change, FleetState


class Clock(Protocol):
    """Where the core gets its time from."""

    def now(self) -> datetime:
        """The current (aware, UTC) time."""
        ...

    async def sleep_until(self, when: datetime) -> None:
        """Return once the clock has reached `when`."""
        ...


@dataclass(frozen=True, slots=True)
class LogEntry:
    """An event as taken from the durable event log, with the id the log gave it."""

    entry_id: str
    event: Event | None  # None: the entry could not be decoded (it is dead-lettered)
    raw: str = ""
    deliveries: int = 1


@dataclass(frozen=True, slots=True)
class Settlement:
    """How one taken log entry is settled inside a batch: committed with its changes under
    `event_id`, or (`event_id` None) rejected with `reason`."""

    entry: LogEntry
    event_id: str | None
    changes: Sequence[Change] = ()
    reason: str = ""

    def __post_init__(self) -> None:
        if self.event_id is None and not self.reason:
            raise ValueError(f"rejecting entry {self.entry.entry_id} needs a reason")
        if self.event_id is None and self.changes:
            raise ValueError(f"rejected entry {self.entry.entry_id} cannot write changes")


@dataclass(frozen=True, slots=True)
class BatchSettled:
    """What a batch of settlements did: `done[i]` answers settlement i as `FleetStore.commit`
    would (True for a reject), for the leading settlements that ran; when the store failed
    part-way, `done` is shorter than the batch and `error` says why (nothing after the first
    failure was written)."""

    done: tuple[bool, ...]
    error: str | None = None


class FleetStore(Protocol):
    """Durable fleet state and its append-only event log."""

    async def load(self) -> FleetState:
        """The fleet state as last committed."""
        ...

    async def append(self, event: Event) -> str:
        """Add an event to the log durably; returns its log entry id."""
        ...

    async def append_many(self, events: Sequence[Event]) -> list[str]:
        """Add events to the log durably, in their order; returns their entry ids."""
        ...

    async def take(self, count: int) -> Sequence[LogEntry]:
        """Up to `count` entries not yet applied: first those taken before and never settled
        (for instance by a process that crashed), then new ones. Never blocks."""
        ...

    async def commit(self, entry: LogEntry, event_id: str, changes: Sequence[Change]) -> bool:
        """Write the changes and settle the entry, atomically and once per event id.

        Returns False (and writes nothing but the settlement) if the event id was applied
        before from another entry; True when the changes are in the store from this entry,
        including a commit of the same entry sent again (its first answer lost) that finds
        them already written."""
        ...

    async def applied_among(self, event_ids: Sequence[str]) -> set[str]:
        """Those of `event_ids` already applied (from any entry): one read."""
        ...

    async def settle(self, settlements: Sequence[Settlement]) -> BatchSettled:
        """Commit or reject each entry as `commit` and `reject` would, in order, in one round
        trip. A prefix of the batch is written if the store fails part-way (see
        `BatchSettled`); raises `StoreUnavailable` when nothing is known to have run."""
        ...

    async def reject(self, entry: LogEntry, reason: str) -> None:
        """Settle an entry that will not be applied, recording why."""
        ...

    async def count(self, name: str, by: int = 1) -> None:
        """Add to a named counter (events, rejections, plans...) kept with the state."""
        ...

    async def save_plan(self, plan: Plan) -> None:
        """Keep the latest plan's summary with the state, for status and restarts."""
        ...


class PlanSink(Protocol):
    """Where a new plan goes: dispatch to chargers, publication to operators."""

    async def publish(self, plan: Plan, state: FleetState) -> None:
        """Act on a new plan."""
        ...


class CommandResults(Protocol):
    """Where the result of an operator command goes (accepted, or refused with a reason)."""

    async def command_result(self, command_id: str, ok: bool, reason: str) -> None:
        """Report the outcome of the command with this id."""
        ...


class Planner(Protocol):
    """Turns the fleet state into a plan; pure, so the service can run it in a thread."""

    def __call__(self, state: FleetState, now: datetime) -> Plan:
        """A plan for the horizon that starts now."""
        ...
