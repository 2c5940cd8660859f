"""Chaos for the full stack: chargers that keep a ledger, faults, and the ledger comparison.

The pieces of the full-stack soak (`benchmarks/soak.py --mode stack`, RELIABILITY.md T-08, L-01..
L-03, S-12) that a test can use too:

- `LedgerChargePoint`: a `SimChargePoint` that behaves like a real charger about transaction
  messages (OCPP 1.6 section 4.x: StartTransaction and StopTransaction are re-sent, the same
  frame content each time, until the central system answers with a CALLRESULT, across
  reconnections) and writes what was acknowledged into a shared `Ledger`: each start with the
  transaction id it got, each stop, each MeterValues of a transaction. It also times the path
  from a StartTransaction's answer to the first TxProfile for that transaction (re-plan
  event-to-profile) and every round trip with its wall time.
- `RestartableBroker`: the embedded amqtt broker, stopped and started on the same port.
- `controller_records` and `compare`: what the controller recorded (the central system's
  transaction book, the fleet state's transactions, the applied event ids) against the ledger;
  `Verdict.lost` and `Verdict.duplicated` are the soak's two figures.
- `StackSoak`: one run: controller (`adapters.bootstrap` wiring, as in `simulators.scenario`), a
  redis-server that can be killed, a broker that can be restarted, and N ledger chargers with
  their cars' visits (`fleet_visits`: a simulated day, or a steady fleet). `run()` puts the
  chargers in processes of their own (`simulators.chaos_fleet`) so the controller's process is
  measured alone; both sides read a `PacedClock` (simulated time derived from the wall by shared
  `Pace`s). `run_restart()` (S-12) puts them in processes of their own too, on `SimClock`s it
  moves in lock-step with the controller's through their control channel (`FleetStatus`,
  `RestartFigures`).
- `LoopLag` and `SlowCallbacks`: how late an event loop runs, and which callbacks held it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import dataclasses
import gc
import itertools
import json
import logging
import os
import random
import resource
import sys
import tempfile
import time
import tracemalloc
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import aiomqtt
import numpy as np
from amqtt.broker import Broker
from ocpp.exceptions import OCPPError
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from adapters import bootstrap
from adapters import redis_keys as keys
from adapters.codec import encode_event
from adapters.embedded import broker_config, free_port, stop_broker
from adapters.memory import trim_every
from adapters.ocpp.aio import stop_task
from adapters.ocpp.credentials import CredentialStore
from adapters.ocpp.translate import event_id, meter_events
from adapters.redis_store import RedisFleetStore
from controller.clock import SimClock
from controller.domain import SLOT, ChargePoint, Connector, Site, Transaction, Vehicle
from controller.events import ChargerRegistered, Event, SiteConfigured, VehicleRegistered
from controller.planning.plan import Plan
from controller.planning.planner import SolveFn
from controller.ports import Clock
from controller.settings import PlanningSettings, Settings
from simulators.chargepoints.car import SimCar
from simulators.chargepoints.chargepoint import (
    ChargerSpec,
    FleetStats,
    NotOnline,
    SimChargePoint,
)
from simulators.scenario import ControllerUnderTest, charger_id_for, charger_password

log = logging.getLogger(__name__)

T = TypeVar("T")

# True in the tasks of one charger's connection (its boot, status, heartbeat and meter loops,
# the handlers of the central system's CALLs): those calls must not wait for a reconnection,
# since the reconnection waits for them to end.
_IN_SESSION: contextvars.ContextVar[bool] = contextvars.ContextVar("in_session", default=False)

SESSION_CALL_ATTEMPTS = 5
# The simulated span is run through in this share of the wall time; the rest is a tail in which
# the last messages (and re-sent stops) get through while the faults go on.
PACE_SHARE = 0.9  # a CALL of the connection's own that keeps failing: reconnect


# -- the ledger ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StartRecord:
    """A StartTransaction a charger got a CALLRESULT (with a transaction id) for."""

    charger_id: str
    connector_id: int
    transaction_id: int
    meter_start_wh: int
    timestamp: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StopRecord:
    """A StopTransaction a charger got a CALLRESULT for."""

    charger_id: str
    transaction_id: int
    meter_stop_wh: int
    timestamp: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterRecord:
    """A MeterValues of a transaction a charger got a CALLRESULT for: the ids of the events
    its samples must have become (`meter_event_ids`; the frame itself is not kept, so a long
    soak's ledger stays small)."""

    charger_id: str
    connector_id: int
    transaction_id: int
    event_ids: tuple[str, ...]


@dataclass(slots=True)
class Ledger:
    """What the chargers sent and got a CALLRESULT for, shared by a fleet of ledger chargers.

    `rtt_at`/`rtt_s` hold the wall time (`time.time()`, comparable across processes) at the
    answer and the round trip (s) of every answered CALL, from its frame going out to its
    answer; `queued_s` the time before that it waited for the charger's own call in flight
    (OCPP-J allows one) and `rtt_kind` its action (index into `RTT_ACTIONS`); `ack_at` the
    wall time of each acknowledged start, stop and MeterValues; `retries` counts re-sent
    transaction messages by action and cause; `event_to_profile_s` the wall time from a
    StartTransaction's answer to the first TxProfile for that transaction. A ledger crosses a
    process boundary as JSON (`to_json`, `from_json`) and the ledgers of several charger
    processes are `merge`d.
    """

    starts: list[StartRecord] = field(default_factory=list)
    stops: list[StopRecord] = field(default_factory=list)
    meters: list[MeterRecord] = field(default_factory=list)
    retries: Counter[str] = field(default_factory=Counter)
    meter_values_unanswered: int = 0
    rtt_at: array[float] = field(default_factory=lambda: array("d"))  # time.time() of answer
    rtt_s: array[float] = field(default_factory=lambda: array("d"))
    queued_s: array[float] = field(default_factory=lambda: array("d"))
    rtt_kind: array[int] = field(default_factory=lambda: array("B"))
    ack_at: array[float] = field(default_factory=lambda: array("d"))  # transaction records
    event_to_profile_s: list[float] = field(default_factory=list)
    awaiting_profile: dict[tuple[str, int], float] = field(default_factory=dict)
    last_ack_wall: float = 0.0

    def merge(self, other: Ledger) -> None:
        """Add another process's ledger to this one."""
        self.starts += other.starts
        self.stops += other.stops
        self.meters += other.meters
        self.retries.update(other.retries)
        self.meter_values_unanswered += other.meter_values_unanswered
        self.rtt_at.extend(other.rtt_at)
        self.rtt_s.extend(other.rtt_s)
        self.queued_s.extend(other.queued_s)
        self.rtt_kind.extend(other.rtt_kind)
        self.ack_at.extend(other.ack_at)
        self.event_to_profile_s += other.event_to_profile_s
        self.awaiting_profile.update(other.awaiting_profile)
        self.last_ack_wall = max(self.last_ack_wall, other.last_ack_wall)

    def to_json(self) -> dict[str, Any]:
        """The ledger as JSON-able data (`from_json` reads it back)."""
        return {
            "starts": [dataclasses.astuple(s) for s in self.starts],
            "stops": [dataclasses.astuple(s) for s in self.stops],
            "meters": [dataclasses.astuple(m) for m in self.meters],
            "retries": dict(self.retries),
            "meter_values_unanswered": self.meter_values_unanswered,
            "rtt_at": list(self.rtt_at),
            "rtt_s": list(self.rtt_s),
            "queued_s": list(self.queued_s),
            "rtt_kind": list(self.rtt_kind),
            "ack_at": list(self.ack_at),
            "event_to_profile_s": self.event_to_profile_s,
            "awaiting_profile": [[c, t, w] for (c, t), w in self.awaiting_profile.items()],
            "last_ack_wall": self.last_ack_wall,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ledger:
        """The ledger `to_json` wrote."""
        return cls(
            starts=[StartRecord(**_fields(StartRecord, row)) for row in data["starts"]],
            stops=[StopRecord(**_fields(StopRecord, row)) for row in data["stops"]],
            meters=[
                MeterRecord(charger_id=c, connector_id=n, transaction_id=t, event_ids=tuple(ids))
                for c, n, t, ids in data["meters"]
            ],
            retries=Counter(data["retries"]),
            meter_values_unanswered=int(data["meter_values_unanswered"]),
            rtt_at=array("d", data["rtt_at"]),
            rtt_s=array("d", data["rtt_s"]),
            queued_s=array("d", data["queued_s"]),
            rtt_kind=array("B", data["rtt_kind"]),
            ack_at=array("d", data["ack_at"]),
            event_to_profile_s=[float(x) for x in data["event_to_profile_s"]],
            awaiting_profile={(c, int(t)): float(w) for c, t, w in data["awaiting_profile"]},
            last_ack_wall=float(data["last_ack_wall"]),
        )


def _fields(kind: type[Any], row: Sequence[Any]) -> dict[str, Any]:
    """A dataclass's field names paired with the values of `row` (its `astuple`)."""
    return dict(zip((f.name for f in dataclasses.fields(kind)), row, strict=True))


RTT_ACTIONS = (
    "other",
    "BootNotification",
    "StatusNotification",
    "Heartbeat",
    "Authorize",
    "StartTransaction",
    "MeterValues",
    "StopTransaction",
)
ACTIONS = {name: n for n, name in enumerate(RTT_ACTIONS)}


class Disconnected(ConnectionError):
    """The connection a CALL went out on closed before its answer came."""


class LedgerChargePoint(SimChargePoint):
    """A simulated charger that re-sends transaction messages until answered and keeps a ledger.

    Calls made from outside the connection (a driver plugging a car in or out) are retried
    across reconnections until the central system answers: StartTransaction and
    StopTransaction with the same content (so a replay is recognised, T-03), and the Authorize
    and StatusNotification around them. Calls of the connection itself (boot, statuses after
    a reconnect, heartbeats) are retried a few times on a CALLERROR, then the connection is
    dropped and made again. A MeterValues that gets a CALLERROR is counted and not re-sent.

    Args:
        ledger: shared record of what was acknowledged.
        heartbeat_s: heartbeat interval on the clock, instead of the one the central system
            gives at boot (a fast simulated clock would otherwise flood it with heartbeats).
        retry_s: first delay (clock) before a transaction message is re-sent; doubles up to
            60 s.
    """

    def __init__(
        self,
        spec: ChargerSpec,
        clock: Clock,
        ledger: Ledger,
        *,
        heartbeat_s: float | None = None,
        retry_s: float = 2.0,
        stats: FleetStats | None = None,
        rng: random.Random | None = None,
        reconnect_base_s: float = 1.0,
        reconnect_max_s: float = 60.0,
    ) -> None:
        super().__init__(
            spec,
            clock,
            stats=stats,
            validate=False,
            rng=rng,
            reconnect_base_s=reconnect_base_s,
            reconnect_max_s=reconnect_max_s,
        )
        self.acks = ledger
        self.heartbeat_s = heartbeat_s
        self.retry_s = retry_s
        self.connected_at: list[datetime] = []  # simulated time of each connection's boot/sync
        self._closed: asyncio.Event | None = None

    async def _session(self, ws: Any) -> None:
        token = _IN_SESSION.set(True)
        closed = self._closed = asyncio.Event()
        self.connected_at.append(self.clock.now())
        try:
            await super()._session(ws)
        finally:
            closed.set()
            _IN_SESSION.reset(token)

    async def _heartbeats(self) -> None:
        if self.heartbeat_s is None:
            await super()._heartbeats()
            return
        # The first one at a random point of the interval: the fleet connects within seconds
        # at x1, and the same phase for all would put every heartbeat of the day into a burst
        # of ~30 ms of wall time at x160 (a real fleet's boots are spread over real time).
        first = self.heartbeat_s * self.rng.random()
        await self.clock.sleep_until(self.clock.now() + timedelta(seconds=first))
        while True:
            await self._call(_heartbeat())
            await self.clock.sleep_until(self.clock.now() + timedelta(seconds=self.heartbeat_s))

    async def _call(self, payload: Any) -> Any:
        action = type(payload).__name__
        if _IN_SESSION.get():
            return await self._session_call(action, payload)
        attempt = 0
        while True:
            closed = self._closed
            if self._wire is None or closed is None or closed.is_set():
                await self.online.wait()
                continue
            try:
                result = await self._answered(action, payload, closed)
            except (OCPPError, NotOnline, ConnectionClosed, TimeoutError, Disconnected) as exc:
                self.acks.retries[f"{action}:{type(exc).__name__}"] += 1
                attempt += 1
                delay = min(60.0, self.retry_s * 2 ** (attempt - 1)) * self.rng.uniform(0.5, 1.0)
                await self.clock.sleep_until(self.clock.now() + timedelta(seconds=delay))
                continue
            return result

    async def _session_call(self, action: str, payload: Any) -> Any:
        if action == "MeterValues":
            try:
                return await self._answered(action, payload, None)
            except (OCPPError, TimeoutError):
                self.acks.meter_values_unanswered += 1
                return None
        for attempt in range(1, SESSION_CALL_ATTEMPTS + 1):
            try:
                return await self._answered(action, payload, None)
            except OCPPError:
                self.acks.retries[f"{action}:session"] += 1
                delay = self.retry_s * attempt * self.rng.uniform(0.5, 1.0)
                await self.clock.sleep_until(self.clock.now() + timedelta(seconds=delay))
        raise TimeoutError(f"{self.spec.charger_id}: {action} kept failing; reconnecting")

    async def _answered(self, action: str, payload: Any, closed: asyncio.Event | None) -> Any:
        """One CALL; its answer recorded in the ledger. Raises `Disconnected` if `closed` is
        set before the answer comes."""
        started = time.perf_counter()
        if closed is None:
            result = await SimChargePoint._call(self, payload)
        else:
            result = await _unless(closed, SimChargePoint._call(self, payload))
        now = time.perf_counter()
        wall = time.time()
        ledger = self.acks
        sent = self.call_sent_at if self.call_sent_at >= started else started
        ledger.rtt_at.append(wall)
        ledger.rtt_s.append(now - sent)
        ledger.queued_s.append(sent - started)
        ledger.rtt_kind.append(ACTIONS.get(action, 0))
        ledger.last_ack_wall = wall
        if action in ("StartTransaction", "StopTransaction", "MeterValues"):
            ledger.ack_at.append(wall)
        charger_id = self.spec.charger_id
        if action == "StartTransaction" and result.id_tag_info["status"] == "Accepted":
            transaction_id = int(result.transaction_id)
            ledger.starts.append(
                StartRecord(
                    charger_id=charger_id,
                    connector_id=int(payload.connector_id),
                    transaction_id=transaction_id,
                    meter_start_wh=int(payload.meter_start),
                    timestamp=str(payload.timestamp),
                )
            )
            ledger.awaiting_profile[(charger_id, transaction_id)] = now
        elif action == "StopTransaction":
            ledger.stops.append(
                StopRecord(
                    charger_id=charger_id,
                    transaction_id=int(payload.transaction_id),
                    meter_stop_wh=int(payload.meter_stop),
                    timestamp=str(payload.timestamp),
                )
            )
        elif action == "MeterValues" and payload.transaction_id is not None:
            ledger.meters.append(
                MeterRecord(
                    charger_id=charger_id,
                    connector_id=int(payload.connector_id),
                    transaction_id=int(payload.transaction_id),
                    event_ids=meter_event_ids(
                        charger_id,
                        int(payload.connector_id),
                        int(payload.transaction_id),
                        payload.meter_value,
                    ),
                )
            )
        return result

    def set_profile(self, connector_id: int, raw: dict[str, Any]) -> str:
        """Install a profile; the first TxProfile of a transaction closes its latency clock."""
        status = super().set_profile(connector_id, raw)
        if len(self.received) > 64:  # the simulator keeps them all; the soak needs the latest
            del self.received[:32]
        purpose = raw.get("charging_profile_purpose", raw.get("chargingProfilePurpose"))
        transaction_id = raw.get("transaction_id", raw.get("transactionId"))
        if purpose == "TxProfile" and transaction_id is not None:
            since = self.acks.awaiting_profile.pop(
                (self.spec.charger_id, int(transaction_id)), None
            )
            if since is not None:
                self.acks.event_to_profile_s.append(time.perf_counter() - since)
        return status

    def resynced_since(self, at: datetime) -> bool:
        """Whether a TxDefaultProfile and a ChargePointMaxProfile arrived at or after `at`."""
        purposes = {r.purpose for r in self.received if r.at >= at and r.status == "Accepted"}
        return {"TxDefaultProfile", "ChargePointMaxProfile"} <= purposes

    async def arrive(self, car: SimCar) -> None:
        """A car plugs into connector 1 and charges (every message re-sent until answered)."""
        if self.connector(1).car is None:
            await self.plug_in(1, car)

    async def leave(self) -> None:
        """The car on connector 1 leaves (StopTransaction re-sent until answered)."""
        if self.connector(1).car is not None:
            await self.unplug(1)


def _heartbeat() -> Any:
    from ocpp.v16 import call

    return call.Heartbeat()


async def _unless(closed: asyncio.Event, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result, or `Disconnected` as soon as `closed` is set (the work is cancelled)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(closed.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise Disconnected("connection closed before the answer")
    finally:
        for pending in (task, waiter):
            if not pending.done():
                await stop_task(pending)


# -- what the controller recorded, and the comparison ------------------------------------------


@dataclass(frozen=True, slots=True)
class ControllerRecords:
    """What the controller keeps of transactions: the OCPP book, the fleet state, applied ids."""

    book: dict[int, dict[str, Any]]  # tx id -> booked transaction (charger, connector, ...)
    transactions: dict[int, Transaction]  # the fleet state's, built from the event log
    applied: frozenset[str]  # ids of applied events
    refused: frozenset[str]  # ids of events refused with a reason (dead letters)
    # For a lost record's detail: each dead letter's reason, and the ids of the events still
    # in the log (the stream, trimmed below its oldest pending entry; `logged_event_ids`, read
    # only when something was lost).
    reasons: dict[str, str] = field(default_factory=dict)
    logged: frozenset[str] = frozenset()

    def whereabouts(self, wanted: str) -> str:
        """Where the event `wanted` went: applied, refused (why), in the log or nowhere."""
        if wanted in self.applied:
            return "its event applied"
        if wanted in self.refused:
            return f"its event refused: {self.reasons.get(wanted, '?')}"
        if wanted in self.logged:
            return "its event in the log, neither applied nor refused"
        return "its event in neither the log nor the applied ids"


def _event_id_of(text: object) -> str | None:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return str(json.loads(str(text)).get("event_id"))
    return None


async def controller_records(redis: Redis, site: str) -> ControllerRecords:
    """Read the controller's records of `site` from Redis."""
    raw_book = await redis.hgetall(keys.ocpp_transactions(site))  # type: ignore[misc]
    book: dict[int, dict[str, Any]] = {}
    for name, value in raw_book.items():
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name.startswith("tx:"):
            book[int(name[3:])] = json.loads(value)
    state = await RedisFleetStore(redis, site).load()
    applied = await redis.zrange(keys.applied(site), 0, -1)
    reasons: dict[str, str] = {}
    for _, fields in await redis.xrange(keys.rejected(site)):
        rejected = _event_id_of(fields.get("event", ""))
        if rejected is not None:
            reasons[rejected] = str(fields.get("reason", ""))
    return ControllerRecords(
        book=book,
        transactions=dict(state.transactions),
        applied=frozenset(str(a) for a in applied),
        refused=frozenset(reasons),
        reasons=reasons,
    )


async def logged_event_ids(redis: Redis, site: str) -> frozenset[str]:
    """The ids of the events still in `site`'s log (every entry read and decoded: ~100,000
    after a 1,000-charger day, so only to say where a lost record's event went)."""
    return frozenset(
        logged_id
        for _, fields in await redis.xrange(keys.events(site))
        if (logged_id := _event_id_of(fields.get("event", ""))) is not None
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    """The ledger against the controller's records.

    `lost`: acknowledged records the controller does not have (a start without its
    transaction, a stop not reflected, an acknowledged meter sample not applied).
    `duplicated`: one charger start recorded under more than one transaction id (in the book
    or the fleet state), or one transaction id handed out for two different starts.
    `unacknowledged`: transactions the controller recorded that no charger got an answer for
    (allowed: at-least-once delivery, the charger may have given up).
    """

    starts: int
    stops: int
    meter_values: int
    lost: int
    duplicated: int
    refused: int
    unacknowledged: int
    details: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """0 lost and 0 duplicated."""
        return self.lost == 0 and self.duplicated == 0


def meter_event_ids(
    charger_id: str, connector_id: int, transaction_id: int, meter_value: Sequence[dict[str, Any]]
) -> tuple[str, ...]:
    """The ids of the `MeterSampled` events the central system makes of a MeterValues."""
    entries = [
        {
            "timestamp": entry["timestamp"],
            "sampled_value": entry.get("sampledValue", entry.get("sampled_value", [])),
        }
        for entry in meter_value
    ]
    return tuple(
        e.event_id for e in meter_events(charger_id, connector_id, transaction_id, entries)
    )


def _start_key(charger: str, connector: int, at: datetime | str, meter: float) -> tuple[Any, ...]:
    moment = at if isinstance(at, datetime) else datetime.fromisoformat(at.replace("Z", "+00:00"))
    return (charger, connector, moment.astimezone(UTC), round(float(meter), 3))


def compare(ledger: Ledger, records: ControllerRecords, *, details: int = 20) -> Verdict:
    """Each acknowledged record of the ledger against the controller's (see `Verdict`)."""
    lost: list[str] = []
    duplicated: list[str] = []
    refused = 0
    by_start: dict[tuple[Any, ...], set[int]] = defaultdict(set)
    for start in ledger.starts:
        key = _start_key(
            start.charger_id, start.connector_id, start.timestamp, start.meter_start_wh
        )
        by_start[key].add(start.transaction_id)
        booked = records.book.get(start.transaction_id)
        state = records.transactions.get(start.transaction_id)
        if booked is None or booked.get("charger_id") != start.charger_id:
            lost.append(f"start {start.charger_id} tx {start.transaction_id}: not in the book")
        elif state is None or state.charger_id != start.charger_id:
            lost.append(f"start {start.charger_id} tx {start.transaction_id}: not in the state")
        elif int(state.meter_start_wh) != start.meter_start_wh:
            lost.append(f"start {start.charger_id} tx {start.transaction_id}: meterStart differs")
    for stop in ledger.stops:
        state = records.transactions.get(stop.transaction_id)
        booked = records.book.get(stop.transaction_id)
        if state is None or state.meter_stop_wh is None or booked is None:
            stopped = event_id(stop.charger_id, "tx", stop.transaction_id, "stop")
            lost.append(
                f"stop {stop.charger_id} tx {stop.transaction_id}: not recorded (book: "
                f"{'none' if booked is None else 'stopped' if booked.get('stopped') else 'open'}, "
                f"state: {'none' if state is None else 'open'}; "
                f"{records.whereabouts(stopped)})"
            )
        elif int(state.meter_stop_wh) != stop.meter_stop_wh or not booked.get("stopped"):
            lost.append(f"stop {stop.charger_id} tx {stop.transaction_id}: meterStop differs")
    for meter in ledger.meters:
        for eid in meter.event_ids:
            if eid in records.applied:
                continue
            if eid in records.refused:
                refused += 1
            else:
                lost.append(f"meter value {eid}: not applied")
    # One start, several ids: in the ledger (the charger was given two) or in the controller.
    for key, ids in by_start.items():
        if len(ids) > 1:
            duplicated.append(f"start {key[0]} at {key[2].isoformat()}: ids {sorted(ids)}")
    recorded: dict[tuple[Any, ...], set[int]] = defaultdict(set)
    for tid, tx in records.transactions.items():
        recorded[_start_key(tx.charger_id, tx.connector_id, tx.started_at, tx.meter_start_wh)].add(
            tid
        )
    for tid, booked in records.book.items():
        key = _start_key(
            booked["charger_id"],
            int(booked["connector_id"]),
            booked["started_at"],
            booked["meter_start_wh"],
        )
        recorded[key].add(tid)
    unacknowledged = 0
    for key, ids in recorded.items():
        if len(ids) > 1:
            duplicated.append(f"start {key[0]} at {key[2].isoformat()}: recorded as {sorted(ids)}")
        elif key not in by_start:
            unacknowledged += 1
    acknowledged_ids = [s.transaction_id for s in ledger.starts]
    for tid, n in Counter(acknowledged_ids).items():
        if (
            n > 1
            and len({(s.charger_id, s.timestamp) for s in ledger.starts if s.transaction_id == tid})
            > 1
        ):
            duplicated.append(f"tx {tid} handed out for two different starts")
    return Verdict(
        starts=len(ledger.starts),
        stops=len(ledger.stops),
        meter_values=len(ledger.meters),
        lost=len(lost),
        duplicated=len(duplicated),
        refused=refused,
        unacknowledged=unacknowledged,
        details=tuple((lost + duplicated)[:details]),
    )


# -- the servers that fail ----------------------------------------------------------------------


class RedisServer(Protocol):
    """A redis-server process the soak can kill -9 and start again on the same files."""

    socket: str

    def start(self) -> None:
        """Start (replaying the AOF) and wait until it answers."""

    def kill9(self) -> None:
        """SIGKILL it."""

    def stop(self) -> None:
        """Stop it cleanly."""


class RestartableBroker:
    """The embedded amqtt broker (anonymous, loopback) that can be stopped and started again on
    the same port; like amqtt itself it keeps no session or retained message across a restart."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        """`mqtt://host:port`."""
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        """Start listening (retried for a moment while the old socket is released)."""
        for attempt in range(50):
            broker = Broker(broker_config(self.host, self.port))
            try:
                await broker.start()
            except Exception:  # amqtt wraps the bind error in its own exceptions
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
                continue
            self._broker = broker
            return

    async def stop(self) -> None:
        """Shut down; every client is disconnected, including one that reconnected while the
        broker was going away (`adapters.embedded.stop_broker`: amqtt alone left such a client
        connected to the old broker, deaf, which is why the controller was not resubscribed
        after the second restart of the soak)."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await stop_broker(broker)

    def clients(self) -> set[str]:
        """The client ids with a session on the running broker (empty while it is down)."""
        return set() if self._broker is None else set(self._broker._sessions)


class Publisher:
    """An MQTT client for the site's feeds that reconnects (and re-sends) after a broker loss."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self._host, self._port, self._prefix = host, port, prefix
        self._client: aiomqtt.Client | None = None
        self._lock = asyncio.Lock()
        self.published = 0
        self.failures = 0

    async def _connected(self) -> aiomqtt.Client:
        async with self._lock:
            if self._client is None:
                client = aiomqtt.Client(
                    self._host, self._port, identifier=f"chaos-feeds-{os.getpid()}", timeout=5
                )
                await client.__aenter__()
                self._client = client
            return self._client

    async def _drop(self, client: aiomqtt.Client) -> None:
        async with self._lock:
            if self._client is client:
                self._client = None
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)

    async def publish(self, topic: str, payload: dict[str, Any] | str) -> None:
        """Publish (QoS 1) under the prefix; on a broker loss reconnect and try again."""
        text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
        while True:
            client: aiomqtt.Client | None = None
            try:
                client = await self._connected()
                await client.publish(f"{self._prefix}/{topic}", text, qos=1)
                self.published += 1
                return
            except aiomqtt.MqttError:
                self.failures += 1
                if client is not None:
                    await self._drop(client)
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        """Disconnect."""
        client = self._client
        if client is not None:
            await self._drop(client)


# -- the simulated day --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Visit:
    """A car at a charger, from arrival to departure (simulated time)."""

    charger_index: int
    vehicle_id: str
    capacity_kwh: float
    arrival_soc: float
    target_soc: float
    arrival: datetime
    departure: datetime


def fleet_visits(
    chargers: int, start: datetime, hours: float, seed: int, pattern: str = "day"
) -> list[Visit]:
    """The cars of a simulated span, by `pattern`.

    "day": every charger gets an evening car that leaves in the morning; half of them also a
    short visit in the afternoon (arrivals are spread, so starts and stops come all day, but
    the number of cars plugged in rises until the morning). "steady": every charger sees a
    car after car (stays of 3-7 h, gaps of 1-3 h, scaled to a 24 h span), started at a random
    phase so about as many cars arrive as leave at every moment (the last ones stay to the end
    of the span): the fleet the memory check needs.
    """
    if pattern not in ("day", "steady"):
        raise ValueError(f"unknown visit pattern {pattern!r}: day or steady")
    rng = random.Random(seed)
    span = timedelta(hours=hours)
    visits: list[Visit] = []

    def visit(index: int, tag: str, arrive: float, leave: float) -> Visit:
        capacity = rng.choice([39.0, 57.5, 77.0])
        return Visit(
            charger_index=index,
            vehicle_id=f"ev-{index + 1:05d}-{tag}",
            capacity_kwh=capacity,
            arrival_soc=rng.uniform(0.2, 0.5),
            target_soc=0.8,
            arrival=start + span * arrive,
            departure=start + span * leave,
        )

    for index in range(chargers):
        if pattern == "steady":
            # fractions of the span: a 3-7 h stay and a 1-3 h gap in a 24 h day. The renewals
            # begin three cycles before the span, so it opens on the stationary mix (a car
            # already plugged in is there from the first moment); the last car stays to the
            # end of the span.
            stay, gap = (3 / 24, 7 / 24), (1 / 24, 3 / 24)
            arrive = -rng.uniform(0.0, 3 * (sum(stay) + sum(gap)) / 2)
            n = 0
            while arrive < 0.97:
                leave = arrive + rng.uniform(*stay)
                if leave > 0.002:
                    visits.append(visit(index, f"s{n}", max(arrive, 0.002), min(leave, 0.99)))
                    n += 1
                arrive = leave + rng.uniform(*gap)
            continue
        if rng.random() < 0.5:
            arrive = rng.uniform(0.01, 0.2)
            visits.append(visit(index, "a", arrive, arrive + rng.uniform(0.04, 0.1)))
        visits.append(visit(index, "b", rng.uniform(0.32, 0.55), rng.uniform(0.78, 0.97)))
    return visits


def site_series(chargers: int, start: datetime, slots: int) -> dict[str, list[float]]:
    """Prices and the head-room forecast per slot: an evening peak in both."""
    hour = (start.hour + np.arange(slots) / 4.0) % 24
    evening = np.exp(-((hour - 19.0) ** 2) / 6.0)
    capacity = 4.0 * chargers
    load = chargers * (1.0 + 1.5 * evening)
    return {
        "price": list(0.12 + 0.18 * evening - 0.07 * ((hour >= 0) & (hour < 6))),
        "headroom": list(capacity - load),
        "load": list(load),
    }


# -- one run ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SoakConfig:
    """A full-stack soak: fleet, duration, faults (wall time), simulated day.

    `drop_fraction_per_min` of the chargers lose their socket (no close frame) in each
    `minute_s` of wall time. Message rates are on the simulated clock, which runs
    `sim_hours * 3600 / wall_s` times faster than the wall. `visits` is the pattern of
    `fleet_visits` ("day" or "steady"); the chargers run in `charger_processes` processes of
    their own (`simulators.chaos_fleet`), each with a share of them.
    """

    chargers: int = 1000
    wall_s: float = 600.0
    sim_hours: float = 24.0
    redis_kills: int = 3
    redis_down_s: float = 0.5
    broker_restarts: int = 2
    broker_down_s: float = 1.0
    drop_fraction_per_min: float = 0.05
    minute_s: float = 60.0
    meter_interval_s: float = 900.0
    heartbeat_s: float = 3600.0
    connects_per_s: float = 200.0
    recovery_timeout_s: float = 60.0
    restart_down_s: float = 10.0  # S-12: simulated seconds the controller stays stopped
    # S-12: a simulated second's step ends when the fleet has settled, or after this (wall s);
    # the restart is given up after this many simulated seconds, or after
    # `RESTART_STALLED_STEPS` steps in a row ended by the cap with nothing changed.
    restart_settle_wall_s: float = 10.0
    restart_max_sim_s: int = 600
    # S-12's check shown to fail: the first this many chargers reject every charging profile
    # from the controller's stop on, so they never re-sync.
    restart_rejecting: int = 0
    # The service's coalescing window is on the simulated clock; this many wall seconds of it
    # (capped at 60 s simulated) keep the planner from re-planning after every event when the
    # day runs many times faster than the wall.
    coalesce_wall_s: float = 0.3
    trace_memory: bool = False  # tracemalloc: where the memory grew from 20 % of the run on
    # Objects by type at 20 % of the run and at its end (a collection and a walk of every
    # tracked object: two pauses of about a second; far lighter than `trace_memory`).
    census_memory: bool = False
    # > 0: give the allocator's free memory back every this many wall seconds
    # (`adapters.memory.trim_every`) in the controller process.
    malloc_trim_s: float = 0.0
    # glibc malloc's parameters in the controller process (`Settings.malloc_arena_max`,
    # `Settings.malloc_mmap_threshold_kib`): None keeps the settings' default, 0 glibc's own.
    malloc_arena_max: int | None = None
    malloc_mmap_threshold_kib: int | None = None
    visits: str = "day"
    charger_processes: int = 1
    slow_callback_ms: float = 0.0  # > 0: list this process's callbacks slower than this
    # The optimiser in a worker process of its own (as `voltpool serve` runs it); False: in
    # the planner's thread of the controller process. The proportional share is always solved
    # in the thread (`adapters.bootstrap.planning_solver`).
    solver_process: bool = True
    seed: int = 0
    start: datetime = datetime(2024, 3, 4, 12, 0, tzinfo=UTC)

    def __post_init__(self) -> None:
        if self.chargers < 1 or self.wall_s <= 0 or self.sim_hours <= 0:
            raise ValueError("a soak needs chargers, a duration and a simulated span")
        if not 0.0 <= self.drop_fraction_per_min <= 1.0:
            raise ValueError("drop_fraction_per_min must be within 0..1")
        if self.visits not in ("day", "steady"):
            raise ValueError(f"visits must be 'day' or 'steady', not {self.visits!r}")
        if not 1 <= self.charger_processes <= self.chargers:
            raise ValueError("charger_processes must be within 1..chargers")
        if self.restart_settle_wall_s <= 0 or self.restart_max_sim_s < 1:
            raise ValueError("a restart needs a positive settle cap and simulated limit")
        if not 0 <= self.restart_rejecting <= self.chargers:
            raise ValueError("restart_rejecting must be within 0..chargers")

    @property
    def speed(self) -> float:
        """Simulated seconds per wall second."""
        return self.sim_hours * 3600.0 / self.wall_s

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON-able data (for a charger process)."""
        data = dataclasses.asdict(self)
        data["start"] = self.start.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SoakConfig:
        """The configuration `to_json` wrote."""
        return cls(**{**data, "start": datetime.fromisoformat(data["start"])})

    def shards(self) -> list[range]:
        """The charger indices of each charger process (as even as can be)."""
        bounds = np.linspace(0, self.chargers, self.charger_processes + 1).round().astype(int)
        return [range(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Pace:
    """Simulated time as a function of the wall clock, the same in every process of a soak:
    `sim0 + (time.time() - wall0) * speed`, never before `sim0` nor after `end`."""

    wall0: float  # time.time()
    sim0: datetime
    speed: float
    end: datetime | None = None

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError(f"a pace needs a positive speed, not {self.speed}")
        if self.sim0.tzinfo is None:
            raise ValueError("a pace needs a time zone")

    def at(self, wall: float) -> datetime:
        """The simulated time at wall time `wall`."""
        sim = self.sim0 + timedelta(seconds=max(0.0, wall - self.wall0) * self.speed)
        return sim if self.end is None else min(sim, self.end)

    def to_json(self) -> dict[str, Any]:
        """As JSON-able data."""
        end = None if self.end is None else self.end.isoformat()
        return {"wall0": self.wall0, "sim0": self.sim0.isoformat(), "speed": self.speed, "end": end}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pace:
        """The pace `to_json` wrote."""
        end = data.get("end")
        return cls(
            wall0=float(data["wall0"]),
            sim0=datetime.fromisoformat(data["sim0"]),
            speed=float(data["speed"]),
            end=None if end is None else datetime.fromisoformat(end),
        )


class PacedClock:
    """A `Clock` whose time is derived from the wall by `Pace`s (`add` a new one to change
    speed): `now()` is the latest begun pace's `at(time.time())`, and a sleeper wakes on an
    event-loop timer at the wall time its deadline maps to, as `WallClock` does in production.

    Two processes given the same paces agree on the time without talking; and unlike a
    `SimClock` moved by a pacer task, nothing here steps through the sleepers' deadlines, so
    a busy process reads the right time (it only wakes its sleepers late, as a busy
    production controller would).
    """

    def __init__(self, first: Pace) -> None:
        self._paces = [first]
        self._sleepers: dict[asyncio.Future[None], tuple[datetime, asyncio.TimerHandle | None]]
        self._sleepers = {}

    @property
    def paces(self) -> tuple[Pace, ...]:
        """The paces so far, in order."""
        return tuple(self._paces)

    def pace(self, wall: float) -> Pace:
        """The pace in force at wall time `wall` (the first one before any has begun)."""
        current = self._paces[0]
        for candidate in self._paces:
            if candidate.wall0 <= wall:
                current = candidate
        return current

    def now(self) -> datetime:
        """The simulated time now."""
        wall = time.time()
        return self.pace(wall).at(wall)

    def add(self, pace: Pace) -> None:
        """A pace taking over at `pace.wall0` (later than the last one's); every sleeper's
        timer is set again."""
        if pace.wall0 < self._paces[-1].wall0:
            raise ValueError("a new pace must begin after the last one")
        self._paces.append(pace)
        for future, (when, handle) in list(self._sleepers.items()):
            if handle is not None:
                handle.cancel()
            self._arm(future, when)

    def _wake_at(self, when: datetime) -> float | None:
        """The wall time (`time.time()`) at which the paces reach `when`; None if never."""
        for index, pace in enumerate(self._paces):
            if pace.end is not None and when > pace.end:
                continue
            wall = pace.wall0 + max(0.0, (when - pace.sim0).total_seconds()) / pace.speed
            following = self._paces[index + 1].wall0 if index + 1 < len(self._paces) else None
            if following is None or wall <= following:
                return wall
        return None

    def _arm(self, future: asyncio.Future[None], when: datetime) -> None:
        wall = self._wake_at(when)
        handle = None
        if wall is not None:
            loop = future.get_loop()
            handle = loop.call_later(max(0.0, wall - time.time()), self._wake, future, when)
        self._sleepers[future] = (when, handle)

    def _wake(self, future: asyncio.Future[None], when: datetime) -> None:
        if future.done():
            self._sleepers.pop(future, None)
            return
        if self.now() >= when:
            self._sleepers.pop(future, None)
            future.set_result(None)
        else:  # the timer fired a hair early (float rounding): once more
            self._arm(future, when)

    async def sleep_until(self, when: datetime) -> None:
        """Return once the simulated time has reached `when`."""
        if when <= self.now():
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._arm(future, when)
        try:
            await future
        finally:
            entry = self._sleepers.pop(future, None)
            if entry is not None and entry[1] is not None:
                entry[1].cancel()


@dataclass(slots=True)
class LoopLag:
    """How late this process's event loop runs a timer: every `period_s` a task sleeps
    `period_s` and records by how much more it slept (`lag_s`, at `at` = `time.time()`).
    A lag is the time every ready callback (a socket's answer too) waited behind others."""

    period_s: float = 0.02
    at: array[float] = field(default_factory=lambda: array("d"))
    lag_s: array[float] = field(default_factory=lambda: array("d"))

    async def watch(self) -> None:
        """Sample until cancelled."""
        while True:
            began = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.lag_s.append(max(0.0, time.perf_counter() - began - self.period_s))
            self.at.append(time.time())

    def clear(self) -> None:
        """Forget the samples so far."""
        del self.at[:], self.lag_s[:]

    def worst_between(self, begins: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """The largest lag sampled in each wall interval [begin, end + period] (0 if none).

        A sample taken at t covers [t - period - lag, t]; a CALL sent at `begin` and answered
        at `end` waited on this loop at most about the largest lag that overlaps it.
        """
        at = np.asarray(self.at, dtype=float)
        lags = np.asarray(self.lag_s, dtype=float)
        lo = np.searchsorted(at, np.asarray(begins, dtype=float), side="left")
        hi = np.searchsorted(at, np.asarray(ends, dtype=float) + self.period_s, side="right")
        return range_max(lags, lo, hi)


def range_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """max(values[lo[i]:hi[i]]) for every i (0.0 for an empty range), by a sparse table."""
    out = np.zeros(len(lo), dtype=float)
    length = np.asarray(hi) - np.asarray(lo)
    if values.size == 0 or out.size == 0:
        return out
    table = [np.asarray(values, dtype=float)]
    while 2 ** len(table) <= values.size:
        prev, half = table[-1], 2 ** (len(table) - 1)
        table.append(np.maximum(prev[:-half], prev[half:]))
    full = length > 0
    level = np.zeros(len(lo), dtype=int)
    level[full] = np.floor(np.log2(length[full])).astype(int)
    for k in np.unique(level[full]):
        pick = full & (level == k)
        row = table[int(k)]
        a = row[np.asarray(lo)[pick]]
        b = row[np.asarray(hi)[pick] - 2 ** int(k)]
        out[pick] = np.maximum(a, b)
    return out


class SlowCallbacks:
    """Which event-loop callbacks of this process ran longer than `threshold_s`, by where they
    were: the coroutine a task step belongs to and the line it stopped at (the end of the long
    step), or the callback's name. A diagnostic (`--slow-callback-ms`): it wraps
    `asyncio.Handle._run` for the whole process while installed, at about a microsecond a
    callback.
    """

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self.seen: dict[str, list[float]] = defaultdict(list)
        self._original: Any = None

    def install(self) -> None:
        """Start timing every callback."""
        original = self._original = asyncio.events.Handle._run
        seen, threshold = self.seen, self.threshold_s

        def timed(handle: asyncio.events.Handle) -> None:
            began = time.perf_counter()
            original(handle)
            took = time.perf_counter() - began
            if took > threshold:
                seen[_where(handle)].append(took)

        asyncio.events.Handle._run = timed  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        """Stop timing."""
        if self._original is not None:
            asyncio.events.Handle._run = self._original  # type: ignore[method-assign]
            self._original = None

    def top(self, n: int = 15) -> list[str]:
        """The `n` places with the most time in slow callbacks: count, total and max."""
        ranked = sorted(self.seen.items(), key=lambda kv: -sum(kv[1]))[:n]
        return [
            f"{len(t)} x, {1000 * sum(t):.0f} ms in all, max {1000 * max(t):.0f} ms: {where}"
            for where, t in ranked
        ]


def _where(handle: asyncio.events.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        coro: Any = task.get_coro()
        # The innermost coroutine the task waits in: where the long step ended.
        while getattr(getattr(coro, "cr_await", None), "cr_frame", None) is not None:
            coro = coro.cr_await
        frame = getattr(coro, "cr_frame", None)
        name = getattr(coro, "__qualname__", repr(coro))
        if frame is not None:
            path = frame.f_code.co_filename.removeprefix(f"{REPO_ROOT}/")
            return f"{name} (stopped at {path}:{frame.f_lineno})"
        return f"{name} (finished)"
    return getattr(callback, "__qualname__", repr(callback))


# A round trip counts as "with the chargers' loop calm" when the chargers' event loop never ran
# a timer later than this during the call: what is left of its time is the controller's (and
# the kernel's).
CALM_LAG_S = 0.010


@dataclass(slots=True)
class FaultRecord:
    """One injected fault: what, when (wall s from the start), how long until recovered.

    `up_at` is the `time.time()` a killed server was up again (Redis kills), from which the
    first acknowledged transaction message is found in the ledger after the run.
    """

    kind: str
    at_s: float
    recovery_s: float | None = None
    detail: str = ""
    up_at: float | None = None


@dataclass(slots=True)
class SoakReport:
    """The figures of one run.

    With the chargers in processes of their own, `cpu_s` and `rss_mib` are the controller
    process's alone (it also runs the embedded MQTT broker and the feeds' publisher); the
    chargers' are in `charger_cpu_s` and `charger_rss_mib`. `controller_lag_ms` and
    `charger_lag_ms` are the two sides' event-loop lag (`LoopLag`); `rtt_calm_ms` the round
    trips outside fault windows during which the chargers' loop lag stayed under
    `CALM_LAG_S`.
    """

    config: SoakConfig
    verdict: Verdict | None = None
    faults: list[FaultRecord] = field(default_factory=list)
    rtt_ms: dict[str, float] = field(default_factory=dict)
    rtt_outside_faults_ms: dict[str, float] = field(default_factory=dict)
    rtt_calm_ms: dict[str, float] = field(default_factory=dict)
    rtt_by_action_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # outside faults
    queued_ms: dict[str, float] = field(default_factory=dict)  # behind the charger's own call
    # The central system's own share, by action: routed -> answered (adapters/ocpp/timing.py)
    handled_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    event_to_profile_s: dict[str, float] = field(default_factory=dict)
    transactions_without_profile: int = 0
    rss_mib: list[tuple[float, float]] = field(default_factory=list)
    # What the RSS is made of, every 5 s (`MemoryBreakdown`): wall s, then its fields.
    memory_mib: list[tuple[float, ...]] = field(default_factory=list)
    open_transactions: list[tuple[float, int]] = field(default_factory=list)
    # Connections in the controller's Redis pool (redis-py's default pool never closes one)
    redis_connections: list[tuple[float, int]] = field(default_factory=list)
    cpu_s: float = 0.0  # the controller process's CPU in the soak window (restart: whole run)
    # The optimiser's worker process (None: the solve ran in the controller process): its CPU
    # in the soak window and its counters (solves, timeouts, worker_deaths, ...).
    solver_cpu_s: float | None = None
    solver_counters: dict[str, int] = field(default_factory=dict)
    charger_cpu_s: list[float] = field(default_factory=list)  # each charger process, same window
    charger_rss_mib: list[tuple[float, float]] = field(default_factory=list)  # each: start, end
    controller_lag_ms: dict[str, float] = field(default_factory=dict)
    charger_lag_ms: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    sim_reached: str = ""
    calls: dict[str, int] = field(default_factory=dict)
    charger_errors: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    meter_values_unanswered: int = 0
    service_counters: dict[str, int] = field(default_factory=dict)
    dispatch_counters: dict[str, int] = field(default_factory=dict)
    mqtt_publish_failures: int = 0
    restart: RestartFigures | None = None  # S-12 (`run_restart`)
    memory_growth: list[str] = field(default_factory=list)  # with `trace_memory`
    slow_callbacks: list[str] = field(default_factory=list)  # with `slow_callback_ms`
    live_plans: int = 0  # `Plan` objects still referenced at the end (1 or 2 expected)
    plan_holders: dict[str, int] = field(default_factory=dict)  # attribute -> distinct plans

    def rss_growth(self, from_s: float) -> tuple[float, float, float] | None:
        """(RSS at `from_s`, at the end, growth %) from the samples, if there are any."""
        after = [r for t, r in self.rss_mib if t >= from_s]
        if len(after) < 2:
            return None
        return after[0], after[-1], 100.0 * (after[-1] - after[0]) / after[0]

    def open_between(self, from_s: float) -> tuple[int, int] | None:
        """Open transactions in the controller's state at `from_s` and at the end."""
        after = [n for t, n in self.open_transactions if t >= from_s]
        return (after[0], after[-1]) if len(after) >= 2 else None


def _percentiles(values: Iterable[float], scale: float = 1.0) -> dict[str, float]:
    array = np.asarray(list(values), dtype=float) * scale
    if array.size == 0:
        return {}
    return {
        "n": float(array.size),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "p99": float(np.percentile(array, 99)),
        "max": float(array.max()),
    }


def rss_mib() -> float:
    """This process's resident set size now (MiB)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            [
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            ]
        )
    ]


def _mallinfo2() -> _MallInfo2 | None:
    try:
        call = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None
    call.restype = _MallInfo2
    return cast(_MallInfo2, call())


MEMORY_FIELDS = (
    "rss",  # resident set
    "rss_heap",  # ... in the [heap] mapping (glibc's main arena, grown by brk)
    "rss_anon",  # ... in other anonymous mappings (pymalloc's arenas, threads' malloc
    # arenas, large malloc chunks, numpy buffers, thread stacks)
    "rss_file",  # ... in file mappings (the interpreter, shared libraries)
    "malloc_used",  # glibc malloc: bytes handed out and not freed (all arenas, mmapped chunks)
    "malloc_free",  # ... bytes free inside its arenas (kept, not returned: fragmentation)
    "python_blocks_m",  # sys.getallocatedblocks(), in millions (pymalloc and large objects)
)


def memory_breakdown() -> tuple[float, ...]:
    """This process's memory now, in MiB (a count for `python_blocks_m`), in the order of
    `MEMORY_FIELDS`: what a growing RSS is made of. A Python leak grows `python_blocks_m`;
    fragmentation grows the RSS (and `malloc_free`) with the blocks flat. Linux and glibc; 0
    where a figure cannot be read."""
    heap = anon = file = 0.0
    try:
        with open("/proc/self/smaps") as smaps:
            kind = "anon"
            for line in smaps:
                head = line.split(maxsplit=6)
                if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header
                    name = head[5].strip() if len(head) >= 6 else ""
                    kind = (
                        "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
                    )
                elif head and head[0] == "Rss:":
                    kib = float(head[1])
                    if kind == "heap":
                        heap += kib
                    elif kind == "file":
                        file += kib
                    else:
                        anon += kib
    except OSError:
        pass
    info = _mallinfo2()
    used = (info.uordblks + info.hblkhd) / 2**20 if info is not None else 0.0
    free = info.fordblks / 2**20 if info is not None else 0.0
    return (
        rss_mib(),
        heap / 1024,
        anon / 1024,
        file / 1024,
        used,
        free,
        sys.getallocatedblocks() / 1e6,
    )


def cpu_s() -> float:
    """This process's user + system CPU so far (s)."""
    return sum(os.times()[:2])


def process_cpu_s(pid: int | None) -> float | None:
    """Another process's user + system CPU so far (s), from /proc (None: no such process)."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ledger_chargers(
    config: SoakConfig,
    indices: Iterable[int],
    clock: Clock,
    ledger: Ledger,
    stats: FleetStats,
) -> list[LedgerChargePoint]:
    """The soak's ledger chargers with the given indices (each with its own seeded rng)."""
    return [
        LedgerChargePoint(
            ChargerSpec(
                charger_id=charger_id_for(index),
                max_power_kw=11.0,
                meter_interval_s=config.meter_interval_s,
                # OCPP 1.6: samples counted from each transaction's start. From the connection,
                # the whole fleet (connected within ~5 s at x1) would sample within 5 simulated
                # seconds, i.e. within ~30 ms of wall time once the day runs at x160.
                meter_phase="transaction",
            ),
            clock,
            ledger,
            heartbeat_s=config.heartbeat_s,
            stats=stats,
            rng=random.Random(config.seed * 1_000_003 + index),
        )
        for index in indices
    ]


async def connect_chargers(
    chargers: Sequence[LedgerChargePoint],
    url: str,
    tasks: list[asyncio.Task[None]],
    *,
    connects_per_s: float,
    stats: FleetStats,
) -> None:
    """Start each charger's connection (at `connects_per_s`) and wait until all are online;
    raises `RuntimeError` with what the chargers saw if they are not in time."""
    started = time.perf_counter()
    for index, charger in enumerate(chargers):
        charger_id = charger.spec.charger_id
        tasks.append(asyncio.create_task(charger.run(url, charger_password(charger_id))))
        pause = started + (index + 1) / connects_per_s - time.perf_counter()
        if pause > 0:
            await asyncio.sleep(pause)
    try:
        async with asyncio.timeout(120.0 + len(chargers) * 0.05):
            for charger in chargers:
                await charger.wait_online()
    except TimeoutError:
        online = sum(1 for c in chargers if c.online.is_set())
        boots = Counter(str(c.boot_status) for c in chargers)
        raise RuntimeError(
            f"only {online} of {len(chargers)} chargers online; boot answers {boots}, "
            f"errors {dict(stats.errors)}, sent {dict(stats.sent)}"
        ) from None


def sim_car(visit: Visit) -> SimCar:
    """The simulated car of a visit."""
    return SimCar(
        vehicle_id=visit.vehicle_id,
        id_tag=visit.vehicle_id,
        capacity_kwh=visit.capacity_kwh,
        energy_kwh=visit.arrival_soc * visit.capacity_kwh,
        max_charge_kw=11.0,
    )


async def until(done: Callable[[], bool], timeout_s: float) -> float | None:
    """Wall seconds until `done()` holds (polled every 10 ms), None after `timeout_s`."""
    started = time.perf_counter()
    while not done():
        if time.perf_counter() - started > timeout_s:
            return None
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


REPO_ROOT = Path(__file__).resolve().parents[1]
FOLLOW_PERIOD_S = 0.05  # S-12: how often the chargers' clocks are told the wall-paced time
FLEET_LINE = "@fleet "  # a charger process's protocol lines on its stdout start with this


@dataclass(slots=True)
class ChargerProcessHandle:
    """One charger process of a soak (`simulators.chaos_fleet`), seen from the controller's."""

    shard: int
    process: asyncio.subprocess.Process
    result_path: Path

    async def read(self, timeout_s: float) -> dict[str, Any]:
        """The next protocol line the process printed (other lines are passed on)."""
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    code = await self.process.wait()
                    raise RuntimeError(f"charger process {self.shard} ended ({code})")
                line = raw.decode(errors="replace").rstrip("\n")
                if line.startswith(FLEET_LINE):
                    message: dict[str, Any] = json.loads(line[len(FLEET_LINE) :])
                    return message
                print(f"[chargers {self.shard}] {line}", flush=True)

    async def send(self, message: dict[str, Any]) -> None:
        """One protocol line to the process's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        await self.process.stdin.drain()

    async def status(self, timeout_s: float) -> FleetStatus:
        """The `FleetStatus` the process answers next (S-12), after a `{"status": ...}`."""
        message = await self.read(timeout_s)
        if "status" not in message:
            raise RuntimeError(f"charger process {self.shard}: {message}")
        return FleetStatus.from_json(message["status"])

    async def end(self) -> None:
        """Wait a moment for the process to end; kill it (this one process) if it does not."""
        if self.process.returncode is None:
            try:
                async with asyncio.timeout(30.0):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


# -- S-12: the chargers' processes moved in lock-step from the controller's ----------------------


RESTART_TARGET_SIM_S = 90.0  # RELIABILITY.md S-12: every charger back and re-synced within this
# S-12 gives up after this many steps in a row that the settle cap ended with no charger's state
# changed (a charger that never re-syncs would otherwise hold every step for the whole cap).
RESTART_STALLED_STEPS = 3
NOT_RESYNCED_LISTED = 20  # a status names at most this many chargers not re-synced yet


def resynced_and_online(charger: LedgerChargePoint, since: datetime) -> bool:
    """Online, with a TxDefaultProfile and a ChargePointMaxProfile accepted at or after `since`."""
    return charger.online.is_set() and charger.resynced_since(since)


def fleet_settled(chargers: Iterable[LedgerChargePoint], since: datetime) -> bool:
    """Every charger either waits on the clock (its reconnection back-off) or is back and
    re-synced: nothing more happens until simulated time moves."""
    return all(c.backing_off or resynced_and_online(c, since) for c in chargers)


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetStatus:
    """Where (a share of) S-12's chargers stand at one simulated moment: a charger process's
    answer to `{"status": ...}`; `combine` adds the processes' shares.

    `resynced` counts the chargers online and re-synced since the moment asked about (0 when
    none was given); `settled` holds when every charger was backing off or back and re-synced
    (`fleet_settled`; True when no moment was given) after `waited_s` wall seconds of waiting
    for it (a status asked with a cap that was reached is not settled). `arriving` counts cars
    still plugging in, `awaiting_profile` the transactions whose first TxProfile has not come;
    `errors` are the chargers' connection and call errors so far (`FleetStats.errors`);
    `not_resynced` names the first `NOT_RESYNCED_LISTED` chargers not re-synced.
    """

    at: datetime  # the process's simulated time
    chargers: int
    online: int
    resynced: int
    backing_off: int
    settled: bool
    waited_s: float
    arriving: int
    awaiting_profile: int
    transactions: int
    connects: int
    errors: dict[str, int]
    not_resynced: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.at.tzinfo is None:
            raise ValueError(f"a fleet status needs an aware time, not {self.at}")
        counts = (self.online, self.resynced, self.backing_off, self.arriving)
        if self.chargers < 0 or any(not 0 <= n <= self.chargers for n in counts):
            raise ValueError(f"counts {counts} outside 0..{self.chargers} chargers")
        if self.resynced > self.online:
            raise ValueError(f"{self.resynced} re-synced but only {self.online} online")
        if self.waited_s < 0:
            raise ValueError(f"waited_s must be >= 0, not {self.waited_s}")

    @property
    def all_online(self) -> bool:
        """Every charger is connected and booted."""
        return self.online == self.chargers

    @property
    def all_resynced(self) -> bool:
        """Every charger is back and re-synced."""
        return self.resynced == self.chargers

    def to_json(self) -> dict[str, Any]:
        """As JSON-able data (`from_json` reads it back)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["at"] = self.at.isoformat()
        data["not_resynced"] = list(self.not_resynced)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FleetStatus:
        """The status `to_json` wrote."""
        return cls(
            **{
                **data,
                "at": datetime.fromisoformat(data["at"]),
                "errors": {str(k): int(v) for k, v in data["errors"].items()},
                "not_resynced": tuple(data["not_resynced"]),
            }
        )

    @classmethod
    def combine(cls, parts: Sequence[FleetStatus]) -> FleetStatus:
        """The whole fleet from its processes' shares (all taken at the same simulated time)."""
        if not parts:
            raise ValueError("no fleet status to combine")
        if len({p.at for p in parts}) > 1:
            raise ValueError(
                f"shares at different simulated times: {sorted({p.at for p in parts})}"
            )
        errors: Counter[str] = Counter()
        for part in parts:
            errors.update(part.errors)
        return cls(
            at=parts[0].at,
            chargers=sum(p.chargers for p in parts),
            online=sum(p.online for p in parts),
            resynced=sum(p.resynced for p in parts),
            backing_off=sum(p.backing_off for p in parts),
            settled=all(p.settled for p in parts),
            waited_s=max(p.waited_s for p in parts),
            arriving=sum(p.arriving for p in parts),
            awaiting_profile=sum(p.awaiting_profile for p in parts),
            transactions=sum(p.transactions for p in parts),
            connects=sum(p.connects for p in parts),
            errors=dict(errors),
            not_resynced=tuple(itertools.chain(*(p.not_resynced for p in parts)))[
                :NOT_RESYNCED_LISTED
            ],
        )


def fleet_status(
    chargers: Sequence[LedgerChargePoint],
    at: datetime,
    since: datetime | None,
    *,
    waited_s: float,
    arriving: int,
    ledger: Ledger,
    stats: FleetStats,
) -> FleetStatus:
    """The `FleetStatus` of `chargers` now (re-synced counted since `since`, if given)."""
    if since is None:
        resynced: list[bool] = [False] * len(chargers)
        settled = True
    else:
        resynced = [resynced_and_online(c, since) for c in chargers]
        settled = all(r or c.backing_off for r, c in zip(resynced, chargers, strict=True))
    return FleetStatus(
        at=at,
        chargers=len(chargers),
        online=sum(1 for c in chargers if c.online.is_set()),
        resynced=sum(resynced),
        backing_off=sum(1 for c in chargers if c.backing_off),
        settled=settled,
        waited_s=waited_s,
        arriving=arriving,
        awaiting_profile=len(ledger.awaiting_profile),
        transactions=len(ledger.starts),
        connects=stats.connects,
        errors=dict(stats.errors),
        not_resynced=tuple(
            c.spec.charger_id for c, r in zip(chargers, resynced, strict=True) if not r
        )[:NOT_RESYNCED_LISTED]
        if since is not None
        else (),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartFigures:
    """S-12's figures: the controller restarted under a fleet of connected, charging chargers.

    Times `*_sim_s` are simulated seconds from the moment the controller was ready again
    (None: not within the run's limit, or the run stalled: `RESTART_STALLED_STEPS`). After
    that moment simulated time moves one second per step, and a step ends when the whole
    fleet has settled (`fleet_settled`) or after
    `settle_cap_wall_s`; `steps_at_cap` counts the steps that hit the cap, in which this
    machine's speed (not only the back-off and the protocol) decided how far the fleet got.
    `timeline` is (simulated s from ready, online, re-synced, backing off) at ready and after
    each step.
    """

    chargers: int
    charger_processes: int
    transactions_running: int
    down_wall_s: float
    down_sim_s: float
    all_online_sim_s: float | None
    all_resynced_sim_s: float | None
    not_resynced: int
    not_resynced_ids: tuple[str, ...]
    errors_while_down: dict[str, int]
    errors_after_ready: dict[str, int]
    connects: int
    steps: int
    steps_at_cap: int
    down_steps_at_cap: int  # the same for the steps while the controller was down
    settle_cap_wall_s: float
    step_wall_s_max: float
    timeline: tuple[tuple[float, int, int, int], ...]
    target_sim_s: float = RESTART_TARGET_SIM_S

    def __post_init__(self) -> None:
        if not 0 <= self.not_resynced <= self.chargers:
            raise ValueError(f"not_resynced {self.not_resynced} outside 0..{self.chargers}")
        if not 0 <= self.steps_at_cap <= self.steps:
            raise ValueError(f"{self.steps_at_cap} capped steps of {self.steps}")
        if self.all_resynced_sim_s is not None and self.not_resynced:
            raise ValueError("all re-synced, yet some chargers are not")

    def failures(self, verdict: Verdict | None) -> list[str]:
        """Why the run misses S-12 (empty: it meets it): a charger not back and re-synced
        within `target_sim_s`, an error a charger saw after the controller was up (the
        thundering herd), or a transaction record lost or doubled."""
        reasons: list[str] = []
        if self.all_resynced_sim_s is None:
            reasons.append(f"{self.not_resynced} chargers never re-synced")
        elif self.all_resynced_sim_s > self.target_sim_s:
            reasons.append(
                f"re-synced after {self.all_resynced_sim_s:g} s > {self.target_sim_s:g} s"
            )
        if self.errors_after_ready:
            reasons.append(f"errors after the controller was up: {self.errors_after_ready}")
        if verdict is not None and not verdict.ok:
            reasons.append(f"{verdict.lost} lost, {verdict.duplicated} duplicated records")
        return reasons


class StackSoak:
    """One full-stack soak run (see the module docstring); `run()` returns its `SoakReport`.

    `run()` (T-08, L-01..L-03) runs the chargers in `config.charger_processes` processes of
    their own (`simulators.chaos_fleet`), so this process holds the controller alone; both
    sides move their simulated clocks by the same `Pace`s. `run_restart()` (S-12) runs them in
    processes of their own too, their `SimClock`s stepped from here with the fleet's state.
    """

    SITE = "chaos"

    def __init__(
        self,
        config: SoakConfig,
        redis_server: RedisServer,
        *,
        solver: SolveFn | None = None,
        data_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.redis_server = redis_server
        self.solver = solver
        self.data_dir = data_dir
        self.progress = progress or (lambda _: None)
        # S-12 moves a `SimClock` here and the charger processes' in lock-step; `run` replaces
        # `clock` with a `PacedClock` the charger processes share.
        self.sim_clock = SimClock(config.start)
        self.clock: Clock = self.sim_clock
        self.ledger = Ledger()
        self.stats = FleetStats()
        self.broker = RestartableBroker()
        self.report = SoakReport(config)
        self.visits = fleet_visits(
            config.chargers, config.start, config.sim_hours, config.seed, config.visits
        )
        self.controller: ControllerUnderTest | None = None
        self.publisher: Publisher | None = None
        self._fault_windows: list[tuple[float, float]] = []  # time.time()
        self._t0 = 0.0  # time.time() at the start of the soak window
        self._processes: list[ChargerProcessHandle] = []
        self._lag = LoopLag()
        self._charger_lags: list[float] = []
        self._rtt_charger_lag: array[float] = array("d")  # aligned with the ledger's round trips
        self.records: ControllerRecords | None = None

    # -- set-up --

    @property
    def runtime(self) -> bootstrap.Runtime:
        """The running controller."""
        assert self.controller is not None
        assert self.controller.runtime is not None
        return self.controller.runtime

    def _settings(self, data_dir: str) -> Settings:
        settings = Settings(
            site=self.SITE,
            data_dir=data_dir,
            redis_url=f"unix://{self.redis_server.socket}",
            mqtt_url=self.broker.url,
            ocpp_port=free_port(),
            ocpp_bcrypt_rounds=4,
            coalesce_window_s=min(60.0, max(0.2, self.config.coalesce_wall_s * self.config.speed)),
            max_event_ahead_s=3600.0,
            deadband_kw=0.5,
            site_capacity_kw=4.0 * self.config.chargers,
            planning=PlanningSettings(solver_process=self.config.solver_process),
        )
        return settings.model_copy(update=self._malloc_settings())

    def _malloc_settings(self) -> dict[str, int]:
        """The malloc settings the soak was asked for (0: glibc's own)."""
        asked = {
            "malloc_arena_max": self.config.malloc_arena_max,
            "malloc_mmap_threshold_kib": self.config.malloc_mmap_threshold_kib,
        }
        return {name: value for name, value in asked.items() if value is not None}

    def _configuration(self) -> list[Event]:
        at = self.clock.now()
        slots = int(self.config.sim_hours * 4) + 96
        series = site_series(self.config.chargers, self.config.start, slots)
        events: list[Event] = [
            SiteConfigured(
                event_id="chaos-site",
                at=at,
                site=Site(
                    site_id=self.SITE,
                    capacity_kw=4.0 * self.config.chargers,
                    safe_limit_kw=float(min(series["headroom"])),
                ),
            )
        ]
        for index in range(self.config.chargers):
            charger_id = charger_id_for(index)
            events.append(
                ChargerRegistered(
                    event_id=f"chaos-cp-{charger_id}",
                    at=at,
                    charger=ChargePoint(
                        charger_id=charger_id,
                        max_power_kw=11.0,
                        connectors=(Connector(connector_id=1, max_power_kw=11.0),),
                    ),
                )
            )
        for visit in self.visits:
            events.append(
                VehicleRegistered(
                    event_id=f"chaos-ev-{visit.vehicle_id}",
                    at=at,
                    vehicle=Vehicle(
                        vehicle_id=visit.vehicle_id,
                        model="chaos",
                        capacity_kwh=visit.capacity_kwh,
                        energy_kwh=visit.arrival_soc * visit.capacity_kwh,
                        energy_at=at,
                        max_charge_kw=11.0,
                    ),
                )
            )
        return events

    async def _feeds(self) -> None:
        """Prices and head-room forecast once, then the measured site load every slot."""
        assert self.publisher is not None
        slots = int(self.config.sim_hours * 4) + 96
        series = site_series(self.config.chargers, self.config.start, slots)
        start = self.config.start
        now = self.clock.now().isoformat()
        await self.publisher.publish(
            "price",
            {"at": now, "start": start.isoformat(), "price_eur_per_kwh": series["price"]},
        )
        await self.publisher.publish(
            "site/headroom",
            {"at": now, "start": start.isoformat(), "headroom_kw": series["headroom"]},
        )
        slot = 0
        while True:
            at = start + SLOT * slot
            await self.clock.sleep_until(at)
            load = series["load"][min(slot, slots - 1)]
            await self.publisher.publish(
                "site/load", {"at": self.clock.now().isoformat(), "load_kw": load}
            )
            slot += 1

    async def _provision(self) -> None:
        client = self.runtime.redis.client()
        try:
            store = CredentialStore(client, self.SITE, rounds=4)
            for index in range(self.config.chargers):
                charger_id = charger_id_for(index)
                await store.set_password(charger_id, charger_password(charger_id))
        finally:
            await client.aclose()
        assert self.publisher is not None
        for event in self._configuration():
            await self.publisher.publish("events", encode_event(event))
        service = self.runtime.service
        deadline = time.perf_counter() + 60.0 + self.config.chargers * 0.05
        while (
            len(service.state.vehicles) < len(self.visits)
            or len(service.state.chargers) < self.config.chargers
        ):
            if time.perf_counter() > deadline:
                raise RuntimeError("the controller did not take the fleet's configuration")
            await asyncio.sleep(0.05)

    async def _start_controller(self, data_dir: str) -> None:
        self.redis_server.start()
        await self.broker.start()
        # ControllerUnderTest only hands its clock to `bootstrap.run`, which takes any Clock.
        clock = cast(SimClock, self.clock)
        self.controller = ControllerUnderTest(self._settings(data_dir), clock, self.solver)
        await self.controller.start()
        link = self.runtime.link
        self.publisher = Publisher(self.broker.host, self.broker.port, link.topics.prefix)
        await self._provision()
        self.progress("configuration applied; connecting chargers")

    async def _spawn(self, workdir: Path, connect: Pace | None) -> None:
        """Start the charger processes and wait until each has its chargers online: on a
        `PacedClock` from the pace `connect` (`run`), or with `connect` None on a `SimClock`
        this process moves through their control channel (`run_restart`)."""
        link = self.runtime.link
        for shard, indices in enumerate(self.config.shards()):
            job = {
                "config": self.config.to_json(),
                "url": self.runtime.central.url().rstrip("/"),
                "broker": [self.broker.host, self.broker.port],
                "topic_prefix": link.topics.prefix,
                "first": indices.start,
                "count": len(indices),
                "shard": shard,
                "mode": "restart" if connect is None else "stack",
                "connect": None if connect is None else connect.to_json(),
            }
            job_path = workdir / f"fleet-{shard}.json"
            job_path.write_text(json.dumps(job))
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "simulators.chaos_fleet",
                str(job_path),
                str(workdir / f"fleet-{shard}-result.json"),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=REPO_ROOT,
            )
            self._processes.append(
                ChargerProcessHandle(shard, process, workdir / f"fleet-{shard}-result.json")
            )
        timeout = 180.0 + self.config.chargers * 0.06
        for handle in self._processes:
            message = await handle.read(timeout)
            if "online" not in message:
                raise RuntimeError(f"charger process {handle.shard}: {message}")

    async def _stop(self) -> None:
        for handle in self._processes:
            await handle.end()
        if self.publisher is not None:
            await self.publisher.close()
        if self.controller is not None:
            await self.controller.stop()
        await self.broker.stop()
        self.redis_server.stop()

    # -- the run --

    def _wall(self) -> float:
        return time.time() - self._t0

    async def _kill_redis(self) -> FaultRecord:
        record = FaultRecord("redis kill -9", self._wall())
        began = time.time()
        self.redis_server.kill9()
        await asyncio.sleep(self.config.redis_down_s)
        await asyncio.to_thread(self.redis_server.start)
        record.up_at = up = time.time()
        applied = self.runtime.service.counters.get("events_applied", 0)
        waited = await until(
            lambda: self.runtime.service.counters.get("events_applied", 0) > applied,
            self.config.recovery_timeout_s,
        )
        record.recovery_s = waited  # the chargers' side is added from the ledger (`_judge`)
        record.detail = f"down {up - began:.2f} s; restart -> first event applied {_fmt(waited)}"
        # What the kill took: AOF bytes only in the server's memory and whether a background
        # fsync was running (RedisProcess reads INFO persistence just before its SIGKILL).
        before = getattr(self.redis_server, "last_kill", None)
        if before:
            fsync = "running" if before.get("aof_pending_bio_fsync") else "idle"
            record.detail += (
                f"; at the kill {before.get('aof_buffer_length', '?')} AOF bytes only in "
                f"memory, background fsync {fsync}"
            )
        self._fault_windows.append((began, time.time() + 1.0))
        return record

    async def _restart_broker(self) -> FaultRecord:
        record = FaultRecord("broker restart", self._wall())
        began = time.time()
        link = self.runtime.link
        before = link.connections
        await self.broker.stop()
        await asyncio.sleep(self.config.broker_down_s)
        await self.broker.start()
        client_id = f"voltpool-{self.SITE}"
        # A session on the *new* broker, not only a new connection: a link that reconnected to
        # the broker while it was going away would pass the first two and hear nothing.
        waited = await until(
            lambda: (
                link.connections > before
                and link.connected.is_set()
                and client_id in self.broker.clients()
            ),
            self.config.recovery_timeout_s,
        )
        record.recovery_s = waited
        record.detail = f"broker up -> controller resubscribed {_fmt(waited)}"
        self._fault_windows.append((began, time.time() + 1.0))
        return record

    async def _chaos(self) -> None:
        """The controller side's faults (Redis kills, broker restarts) on a wall-time schedule
        spread over the run; the socket drops are the charger processes'."""
        config = self.config
        schedule: list[tuple[float, str]] = []
        for i in range(config.redis_kills):
            schedule.append(((i + 0.5) / config.redis_kills * config.wall_s, "redis"))
        for j in range(config.broker_restarts):
            at = (j + 0.75) / config.broker_restarts * 0.9 * config.wall_s
            schedule.append((at, "broker"))
        schedule.sort()
        for at, kind in schedule:
            pause = at - self._wall()
            if pause > 0:
                await asyncio.sleep(pause)
            if kind == "redis":
                self.progress(f"{self._wall():.0f} s: kill -9 redis-server")
                self.report.faults.append(await self._kill_redis())
            else:
                self.progress(f"{self._wall():.0f} s: restart the broker")
                self.report.faults.append(await self._restart_broker())

    async def _sample(self) -> None:
        """RSS and open transactions every 5 s (until cancelled); with `trace_memory`, the
        growth sites from 20 % of the run on."""
        first: tracemalloc.Snapshot | None = None
        census: Counter[str] | None = None
        traced0 = 0.0
        taken = False
        mark = 0.2 * self.config.wall_s
        try:
            while True:
                self.report.rss_mib.append((self._wall(), rss_mib()))
                self.report.memory_mib.append((self._wall(), *memory_breakdown()))
                self.report.redis_connections.append((self._wall(), self._redis_connections()))
                state = self.runtime.service.state
                open_now = sum(1 for tx in state.transactions.values() if tx.meter_stop_wh is None)
                self.report.open_transactions.append((self._wall(), open_now))
                if not taken and self._wall() >= mark:
                    taken = True
                    if self.config.trace_memory:
                        first = tracemalloc.take_snapshot()
                        traced0 = tracemalloc.get_traced_memory()[0]
                    if self.config.census_memory or self.config.trace_memory:
                        census = type_census()
                pause = 5.0 if self._wall() >= mark else max(0.01, min(5.0, mark - self._wall()))
                await asyncio.sleep(pause)
        finally:
            growth: list[str] = []
            if first is not None:
                last = tracemalloc.take_snapshot()
                traced = tracemalloc.get_traced_memory()[0]
                growth.append(f"traced by Python {traced0 / 2**20:.1f} -> {traced / 2**20:.1f} MiB")
                growth += [str(stat) for stat in last.compare_to(first, "lineno")[:15]]
                growth += [f"file {stat}" for stat in last.compare_to(first, "filename")[:10]]
                tracemalloc.stop()
            if census is not None:
                grown = type_census()
                grown.subtract(census)
                growth += [f"objects {name}: {n:+d}" for name, n in grown.most_common(15)]
            self.report.memory_growth = growth

    def _redis_connections(self) -> int:
        """Connections the controller's Redis client holds, idle or in use (-1: unknown)."""
        pool = getattr(getattr(self.runtime.store, "_redis", None), "connection_pool", None)
        idle = getattr(pool, "_available_connections", None)
        busy = getattr(pool, "_in_use_connections", None)
        if idle is None or busy is None:
            return -1
        return len(idle) + len(busy)

    async def _drain(self) -> None:
        """Wait until the controller has applied everything the chargers were answered for."""
        service = self.runtime.service
        deadline = time.perf_counter() + 120.0
        quiet_since = time.perf_counter()
        last = -1
        while time.perf_counter() < deadline:
            applied = service.counters.get("events_applied", 0)
            if applied != last or not service.is_drained:
                last, quiet_since = applied, time.perf_counter()
            elif time.perf_counter() - quiet_since > 1.0:
                return
            await asyncio.sleep(0.05)
        log.warning("the controller did not drain its log within 120 s")

    async def run(self) -> SoakReport:
        """Start the controller here and the chargers in their processes, run the day with its
        faults, collect the chargers' ledgers, compare, stop."""
        config, report = self.config, self.report
        with tempfile.TemporaryDirectory(prefix="voltpool-chaos-") as tmp:
            background: list[asyncio.Task[None]] = []
            slow: SlowCallbacks | None = None
            try:
                clock = PacedClock(Pace(wall0=time.time(), sim0=config.start, speed=1.0))
                self.clock = clock
                await self._start_controller(str(self.data_dir or tmp))
                await self._spawn(Path(tmp), clock.paces[0])
                self.progress(f"{config.chargers} chargers online")
                wall0 = time.time() + 0.5
                go = Pace(
                    wall0=wall0,
                    sim0=clock.paces[0].at(wall0),
                    speed=config.speed / PACE_SHARE,
                    end=config.start + timedelta(hours=config.sim_hours),
                )
                clock.add(go)
                for handle in self._processes:
                    await handle.send({"go": go.to_json()})
                await asyncio.sleep(max(0.0, wall0 - time.time()))
                self._t0 = wall0
                if config.trace_memory:
                    tracemalloc.start(8)
                if config.slow_callback_ms > 0:
                    slow = SlowCallbacks(config.slow_callback_ms / 1000.0)
                    slow.install()
                cpu0 = cpu_s()
                solver = self.runtime.solver
                solver_pid = solver.pid if solver is not None else None
                solver_cpu0 = process_cpu_s(solver_pid) or 0.0
                background += [
                    asyncio.create_task(self._sample()),
                    asyncio.create_task(self._feeds()),
                    asyncio.create_task(self._lag.watch()),
                ]
                if config.malloc_trim_s > 0:
                    background.append(asyncio.create_task(trim_every(config.malloc_trim_s)))
                await self._chaos()
                await asyncio.sleep(max(0.0, config.wall_s - self._wall()))
                report.wall_s = self._wall()
                report.cpu_s = cpu_s() - cpu0
                if solver is not None:
                    # A worker replaced in the window: its successor's CPU only (counted).
                    same = solver.pid == solver_pid
                    report.solver_cpu_s = (process_cpu_s(solver.pid) or 0.0) - (
                        solver_cpu0 if same else 0.0
                    )
                if slow is not None:
                    slow.uninstall()
                    report.slow_callbacks = slow.top()
                report.sim_reached = self.clock.now().isoformat()
                self.progress("soak window over; collecting the chargers' ledgers")
                results = [
                    await handle.read(config.recovery_timeout_s + 120.0)
                    for handle in self._processes
                ]
                for task in background:
                    await stop_task(task)
                background = []
                for handle, result in zip(self._processes, results, strict=True):
                    if "done" not in result:
                        raise RuntimeError(f"charger process {handle.shard}: {result}")
                    self._collect(json.loads(handle.result_path.read_text()))
                self.progress("draining the controller's log")
                await self._drain()
                await self._judge()
            finally:
                if slow is not None:
                    slow.uninstall()
                for task in background:
                    await stop_task(task)
                await self._stop()
        return report

    def _collect(self, result: dict[str, Any]) -> None:
        """Add one charger process's ledger, counters, faults and lag to this run's."""
        self.ledger.merge(Ledger.from_json(result["ledger"]))
        self._rtt_charger_lag.extend(result["rtt_charger_lag_s"])
        self._charger_lags += result["lag_s"]
        stats = result["stats"]
        self.stats.answered.update(stats["answered"])
        self.stats.errors.update(stats["errors"])
        self.stats.sent.update(stats["sent"])
        self.stats.connects += int(stats["connects"])
        self.report.faults += [FaultRecord(**f) for f in result["faults"]]
        self.report.charger_cpu_s.append(float(result["cpu_s"]))
        start_mib, end_mib = result["rss_mib"]
        self.report.charger_rss_mib.append((float(start_mib), float(end_mib)))
        self.report.sim_reached = max(self.report.sim_reached, str(result["sim_reached"]))

    async def _judge(self) -> None:
        """Read the controller's records, compare them with the ledger, compute the figures."""
        client = self.runtime.redis.client()
        try:
            records = await controller_records(client, self.SITE)
            verdict = compare(self.ledger, records)
            if verdict.lost:  # say where the lost records' events went: read the whole log
                logged = await logged_event_ids(client, self.SITE)
                records = dataclasses.replace(records, logged=logged)
                verdict = compare(self.ledger, records)
        finally:
            await client.aclose()
        self.records = records
        self.report.verdict = verdict
        self._redis_recoveries()
        self._figures()

    def _redis_recoveries(self) -> None:
        """Each Redis kill's recovery: the later of its first applied event and the first
        transaction message a charger was answered for after the restart (from the ledger)."""
        acks = np.sort(np.asarray(self.ledger.ack_at, dtype=float))
        for fault in self.report.faults:
            if fault.up_at is None:
                continue
            i = int(np.searchsorted(acks, fault.up_at, side="right"))
            answered = float(acks[i] - fault.up_at) if i < acks.size else None
            fault.detail += f", first transaction message answered {_fmt(answered)}"
            if fault.recovery_s is not None:
                fault.recovery_s = None if answered is None else max(fault.recovery_s, answered)

    # -- S-12: the restart, the chargers in their processes moved in lock-step --

    async def _tell(self, message: dict[str, Any]) -> None:
        """One control line to every charger process."""
        for handle in self._processes:
            await handle.send(message)

    async def _follow_wall(self) -> None:
        """Until cancelled: this process's `SimClock` at the wall's pace, and the charger
        processes' clocks told to the same time (`{"to": ...}`) every `FOLLOW_PERIOD_S`."""
        wall0, sim0 = time.perf_counter(), self.sim_clock.now()
        while True:
            to = sim0 + timedelta(seconds=time.perf_counter() - wall0)
            await self.sim_clock.run_until(to)
            await self._tell({"to": to.isoformat()})
            await asyncio.sleep(FOLLOW_PERIOD_S)

    async def _fleet_status(self, since: datetime | None, wait_s: float) -> FleetStatus:
        """Every charger process's status, combined: each waits up to `wait_s` wall seconds
        for its share to settle (`fleet_settled` since `since`) before it answers."""
        await self._tell(
            {"status": {"since": None if since is None else since.isoformat(), "wait_s": wait_s}}
        )
        parts = [await handle.status(wait_s + 120.0) for handle in self._processes]
        return FleetStatus.combine(parts)

    async def _step(self, since: datetime | None, wait_s: float) -> FleetStatus:
        """One simulated second on both sides (this process's clock first, then the chargers'),
        then the fleet's status once it has settled or after `wait_s` wall seconds."""
        to = self.sim_clock.now() + timedelta(seconds=1)
        await self.sim_clock.run_until(to)
        await self._tell({"to": to.isoformat()})
        return await self._fleet_status(since, wait_s)

    async def _charging(self) -> FleetStatus:
        """Every charger's first car plugs in; simulated seconds pass (a step each 10 ms of
        wall, not measured) until each transaction has had its first TxProfile."""
        await self._tell({"arrive": True})
        status = await self._step(None, 0.0)
        for _ in range(self.config.restart_max_sim_s):
            if not status.arriving and not status.awaiting_profile:
                break
            await asyncio.sleep(0.01)
            status = await self._step(None, 0.0)
        return status

    async def run_restart(self) -> SoakReport:
        """S-12: every charger connected with a car charging, then the controller restarts.

        The chargers run in `config.charger_processes` processes of their own (as in `run`),
        each on a `SimClock` that this process moves through their control channel (stdin), in
        lock-step with the controller's `SimClock`. While the fleet connects both clocks follow
        the wall (not measured). From the stop on, time moves one simulated second per step,
        and a step ends only when every charger is backing off or back and re-synced (or after
        `config.restart_settle_wall_s`, counted in `RestartFigures.steps_at_cap`); the clocks
        stand still while the controller stops and starts. The controller is down for
        `config.restart_down_s` simulated seconds. So the figure is the fleet's (back-off and
        protocol), not this machine's speed: with no step at the cap, a run's timeline depends
        on the seed, and only within a simulated second on the machine (a connection refused
        inside a step can back off from where the clock is when the refusal is seen: its
        sleeper's deadline or a later one of the same step). Re-synced: a TxDefaultProfile and
        a ChargePointMaxProfile accepted after the stop.
        """
        config, report = self.config, self.report
        cpu0 = cpu_s()
        with tempfile.TemporaryDirectory(prefix="voltpool-chaos-") as tmp:
            pacer: asyncio.Task[None] | None = None
            try:
                await self._start_controller(str(self.data_dir or tmp))
                self._t0 = time.time()
                pacer = asyncio.create_task(self._follow_wall())
                await self._spawn(Path(tmp), None)
                await stop_task(pacer)
                pacer = None
                self.progress(f"{config.chargers} chargers online; cars plugging in")
                charging = await self._charging()
                assert self.controller is not None
                stopped_at = self.sim_clock.now()
                stopped_wall = time.perf_counter()
                self.progress(
                    f"{charging.transactions} transactions running "
                    f"({charging.awaiting_profile} without a TxProfile); restarting the controller"
                )
                # Down: simulated seconds in steps like those after the restart (each ends when
                # every charger is backing off), so what the chargers' back-off has reached by
                # the restart does not depend on how long this machine takes to stop and start
                # the controller (the clock stands still meanwhile).
                await self.controller.stop()
                if config.restart_rejecting:
                    await self._tell({"reject_profiles": True})
                down = await self._fleet_status(stopped_at, config.restart_settle_wall_s)
                down_capped = int(not down.settled)  # each charger has seen the stop
                while (self.sim_clock.now() - stopped_at).total_seconds() < config.restart_down_s:
                    down = await self._step(stopped_at, config.restart_settle_wall_s)
                    down_capped += not down.settled
                await self.controller.start()
                ready_at = self.sim_clock.now()
                down_wall_s = time.perf_counter() - stopped_wall
                ready = await self._fleet_status(stopped_at, 0.0)
                self.progress("controller up again; stepping simulated seconds")
                timeline = [(0.0, ready.online, ready.resynced, ready.backing_off)]
                status = ready
                all_online: float | None = 0.0 if ready.all_online else None
                all_synced: float | None = 0.0 if ready.all_resynced else None
                steps = capped = stalled = 0
                slowest = 0.0
                while (
                    all_synced is None
                    and steps < config.restart_max_sim_s
                    and stalled < RESTART_STALLED_STEPS
                ):
                    before = (status.online, status.resynced, status.backing_off)
                    began = time.perf_counter()
                    status = await self._step(stopped_at, config.restart_settle_wall_s)
                    slowest = max(slowest, time.perf_counter() - began)
                    steps += 1
                    capped += not status.settled
                    now = (status.online, status.resynced, status.backing_off)
                    stalled = stalled + 1 if not status.settled and now == before else 0
                    elapsed = (self.sim_clock.now() - ready_at).total_seconds()
                    timeline.append((elapsed, status.online, status.resynced, status.backing_off))
                    if all_online is None and status.all_online:
                        all_online = elapsed
                    if status.all_resynced:
                        all_synced = elapsed
                report.restart = RestartFigures(
                    chargers=status.chargers,
                    charger_processes=len(self._processes),
                    transactions_running=charging.transactions,
                    down_wall_s=down_wall_s,
                    down_sim_s=(ready_at - stopped_at).total_seconds(),
                    all_online_sim_s=all_online,
                    all_resynced_sim_s=all_synced,
                    not_resynced=status.chargers - status.resynced,
                    not_resynced_ids=status.not_resynced,
                    errors_while_down=_counter_delta(ready.errors, charging.errors),
                    errors_after_ready=_counter_delta(status.errors, ready.errors),
                    connects=status.connects,
                    steps=steps,
                    steps_at_cap=capped,
                    down_steps_at_cap=down_capped,
                    settle_cap_wall_s=config.restart_settle_wall_s,
                    step_wall_s_max=slowest,
                    timeline=tuple(timeline),
                )
                report.wall_s = self._wall()
                report.sim_reached = self.sim_clock.now().isoformat()
                self.progress("collecting the chargers' ledgers")
                await self._tell({"end": True})
                for handle in self._processes:
                    result = await handle.read(120.0)
                    if "done" not in result:
                        raise RuntimeError(f"charger process {handle.shard}: {result}")
                    self._collect(json.loads(handle.result_path.read_text()))
                await self._drain()
                await self._judge()
            finally:
                if pacer is not None:
                    await stop_task(pacer)
                await self._stop()
        report.cpu_s = cpu_s() - cpu0
        return report

    def _figures(self) -> None:
        report, ledger = self.report, self.ledger
        report.rtt_ms = _percentiles(ledger.rtt_s, 1000.0)
        windows = self._fault_windows
        at = np.asarray(ledger.rtt_at, dtype=float)
        rtt = np.asarray(ledger.rtt_s, dtype=float)
        calm = np.ones(at.size, dtype=bool)
        for begin, end in windows:
            calm &= ~((at >= begin) & (at <= end))
        report.rtt_outside_faults_ms = _percentiles(rtt[calm], 1000.0)
        kinds = np.asarray(ledger.rtt_kind, dtype=int)
        if kinds.size == at.size:
            for n, action in enumerate(RTT_ACTIONS):
                picked = rtt[calm & (kinds == n)]
                if picked.size:
                    report.rtt_by_action_ms[action] = _percentiles(picked, 1000.0)
        report.queued_ms = _percentiles(ledger.queued_s, 1000.0)
        if len(self._rtt_charger_lag) == at.size and at.size:
            quiet = calm & (np.asarray(self._rtt_charger_lag) < CALM_LAG_S)
            report.rtt_calm_ms = _percentiles(rtt[quiet], 1000.0)
        report.controller_lag_ms = _percentiles(self._lag.lag_s, 1000.0)
        report.charger_lag_ms = _percentiles(self._charger_lags, 1000.0)
        report.event_to_profile_s = _percentiles(ledger.event_to_profile_s)
        report.transactions_without_profile = len(ledger.awaiting_profile)
        report.calls = dict(self.stats.answered)
        report.charger_errors = dict(self.stats.errors)
        report.retries = dict(ledger.retries)
        report.meter_values_unanswered = ledger.meter_values_unanswered
        report.service_counters = {
            k: v for k, v in self.runtime.service.counters.items() if isinstance(v, int)
        }
        report.dispatch_counters = dict(self.runtime.dispatcher.counters)
        report.handled_ms = self.runtime.central.handling.percentiles_ms()
        if self.runtime.solver is not None:
            report.solver_counters = dict(self.runtime.solver.counters)
        plans = {id(o) for o in gc.get_objects() if isinstance(o, Plan)}
        report.live_plans = len(plans)
        runtime = self.runtime
        report.plan_holders = plan_holders(
            {
                "dispatcher": runtime.dispatcher,
                "central": runtime.central,
                "service": runtime.service,
                "sink": runtime.sink,
            },
            plans,
        )
        assert self.publisher is not None
        report.mqtt_publish_failures = self.publisher.failures


def type_census() -> Counter[str]:
    """How many objects the collector tracks, by type (`module.qualname`): two censuses
    apart show which kinds of object grew (with `trace_memory`)."""
    gc.collect()
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


def plan_holders(owners: dict[str, object], plans: set[int]) -> dict[str, int]:
    """For each attribute of `owners` that reaches `Plan` objects (through dicts, lists and
    tuples, three levels deep): how many distinct plans it keeps alive."""

    def reach(value: object, depth: int, found: set[int]) -> None:
        if id(value) in plans:
            found.add(id(value))
            return
        if depth == 0:
            return
        if isinstance(value, dict):
            items: Iterable[object] = list(value.values())
        elif isinstance(value, list | tuple | set | frozenset):
            items = list(value)
        else:
            return
        for item in items:
            reach(item, depth - 1, found)

    held: dict[str, int] = {}
    for owner, obj in owners.items():
        for attr, value in getattr(obj, "__dict__", {}).items():
            found: set[int] = set()
            reach(value, 3, found)
            if found:
                held[f"{owner}.{attr}"] = len(found)
    return held


def _counter_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """The counts that grew from `before` to `after`, by how much."""
    return dict(Counter(after) - Counter(before))


def _fmt(value: float | None) -> str:
    return "n/a (timed out)" if value is None else f"{value:.2f} s"
