"""The OCPP 1.6-J central system: a WebSocket server on the `ocpp` library.

`ws[s]://HOST:PORT/ocpp/{charge_point_id}`, subprotocol `ocpp1.6` (a handshake offering none of
ours is refused with HTTP 400). Security profile 1 (HTTP Basic auth, user = charge point id,
password checked against a bcrypt hash) and profile 2 (the same over TLS when a certificate is
configured); unknown ids and wrong passwords get HTTP 401 at the handshake, and a handshake the
credential store cannot answer (Redis down) gets 503 with Retry-After.

Every inbound frame passes `adapters.ocpp.frames.FrameChecker` before the library's router sees
it, so each bad input gets the OCPP-J 1.6 answer. Each CALL a charge point sends becomes typed
events handed to the `EventSink`. Connection state (online/offline) goes to Redis
(`redis_keys.charger_connections`) and into the sink as `ChargerConnected` /
`ChargerDisconnected`. The CS->CP calls (SetChargingProfile, GetCompositeSchedule, ...) are
methods here; the lease dispatcher uses them.

Transactions (RELIABILITY.md B3): every sample of a transaction goes to its ledger in the
transaction book before the CALLRESULT (each once, whatever the replays); a stop is settled
from the registers, with gaps and anomalies flagged; a stop that contradicts its start (lost
clock or register after a power failure) or a new start on a connector whose stop never came
still closes the session. Nothing is sent to a charge point while it is Rejected (S-04).
Refused handshakes, TLS failures, rate-limit and oversized-frame closures and key rotations
are security events (`adapters.security.events`, SEC-11).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import decimal
import functools
import http
import inspect
import json
import logging
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

from ocpp.charge_point import (
    camel_to_snake_case,
    remove_nones,
    serialize_as_dict,
    snake_to_camel_case,
)
from ocpp.exceptions import OCPPError, PropertyConstraintViolationError
from ocpp.messages import Call, MessageType, validate_payload
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint as LibraryChargePoint
from ocpp.v16 import call, call_result, datatypes
from ocpp.v16.enums import Action
from redis.asyncio import Redis
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHeader
from websockets.headers import build_www_authenticate_basic, parse_authorization_basic
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from adapters import redis_keys as keys
from adapters.ocpp.aio import Metrics, redis_call, stop_task
from adapters.ocpp.config import OcppConfig
from adapters.ocpp.credentials import CredentialStore, valid_charger_id
from adapters.ocpp.errors import CallFailed, CallTimedOut, ChargerUnreachable
from adapters.ocpp.frames import FrameChecker, Verdict, outbound_valid
from adapters.ocpp.ports import (
    ChargerListener,
    ChargerLookup,
    EventSink,
    MeterListener,
    VehicleForTag,
)
from adapters.ocpp.timing import HandlingTimes
from adapters.ocpp.transactions import (
    BookedTransaction,
    SessionSummary,
    TransactionBook,
    summarise,
)
from adapters.ocpp.translate import event_id, iso, meter_events, timestamp
from adapters.ocpp.translate import timestamp as timestamp_of
from adapters.security.events import (
    MAX_PRINCIPAL,
    SecurityEventKind,
    SecurityLog,
    observe_tls_handshakes,
)
from adapters.security.redaction import install_log_redaction
from adapters.security.tls import common_name, requires_client_certificate
from controller.domain import ChargerId, ConnectorId, ConnectorStatus, TransactionId
from controller.errors import InvalidEvent, Refused
from controller.events import (
    ChargerConnected,
    ChargerDisconnected,
    ConnectorStatusChanged,
    Event,
    MeterSampled,
    TransactionStarted,
    TransactionStopped,
    VehiclePluggedIn,
    VehicleUnplugged,
)
from controller.ports import Clock

log = logging.getLogger(__name__)

PROFILE_RETRY_S = 1.0  # a failed write of the remembered profiles is tried again after this

SUBPROTOCOL = Subprotocol("ocpp1.6")
UNKNOWN_OR_WRONG = "unknown charge point or wrong password"
# The credential store could not be asked: the charger is told to retry (HTTP 503), not refused.
STORE_UNAVAILABLE = "credential store unavailable"
HANDSHAKE_RETRY_AFTER_S = 10
VOLTPOOL_VENDOR = "org.voltpool"


F = TypeVar("F", bound=Callable[..., Any])


def _on(action: str) -> Callable[[F], F]:
    """The library's `@on` (typed): the frame checker has validated the payload already."""
    return cast(Callable[[F], F], on(action, skip_schema_validation=True))


def _after(action: str) -> Callable[[F], F]:
    """The library's `@after` (typed)."""
    return cast(Callable[[F], F], after(action))


def _floats(value: Any) -> Any:
    """The library parses some responses with Decimal; voltpool works in floats."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return value


@functools.lru_cache(maxsize=4096)  # payload keys are schema property names: a few hundred
def _snake_key(key: str) -> str:
    """The library's snake_case of one camelCase key, computed once per distinct key."""
    converted: str = next(iter(camel_to_snake_case({key: None})))
    return converted


def snake_keys(data: Any) -> Any:
    """`ocpp.charge_point.camel_to_snake_case` (every dict key, at every depth, snake_case),
    with each key's conversion cached: the same result, without two regular expressions per key
    per CALL."""
    if isinstance(data, dict):
        return {_snake_key(k): snake_keys(v) for k, v in data.items()}
    if isinstance(data, list):
        return [snake_keys(v) for v in data]
    return data


@functools.lru_cache(maxsize=4096)  # payload keys are schema property names: a few hundred
def _camel_key(key: str) -> str:
    """The library's camelCase of one snake_case key, computed once per distinct key."""
    converted: str = next(iter(snake_to_camel_case({key: None})))
    return converted


class _Nested(Exception):
    """A payload holds a dataclass: the library's own serialisation is used."""


def _camel_plain(data: Any) -> Any:
    """`snake_to_camel_case` of plain JSON data (dicts, lists, scalars), each key's conversion
    cached; new containers throughout, as `serialize_as_dict`'s deep copy gives."""
    if isinstance(data, dict):
        return {_camel_key(k): _camel_plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_camel_plain(v) for v in data]
    if dataclasses.is_dataclass(data):
        raise _Nested
    return data


def outgoing_payload(payload: Any) -> Any:
    """What the library's `call` sends for a request dataclass:
    `remove_nones(snake_to_camel_case(serialize_as_dict(payload)))`, the same result without
    `dataclasses.asdict`'s deep copy and the two regular expressions per key: ~260 us for a
    SetChargingProfile of 24 periods, most of the central system's work on one. A payload
    holding a dataclass goes the library's way."""
    fields = {f.name: getattr(payload, f.name) for f in dataclasses.fields(payload)}
    try:
        converted = _camel_plain(fields)
    except _Nested:
        converted = snake_to_camel_case(serialize_as_dict(payload))
    return remove_nones(converted)


def _takes_unique_id(handler: Any) -> bool:
    """Whether a handler declares `call_unique_id` (the library's rule), read once per
    handler function."""
    return _declares_unique_id(getattr(handler, "__func__", handler))


@functools.cache
def _declares_unique_id(function: Any) -> bool:
    return "call_unique_id" in inspect.signature(function).parameters


class RateLimited(Exception):
    """A charge point sent frames faster than its bucket allows; its session ends (1008)."""


def _peer_ip(connection: ServerConnection) -> str:
    """The remote address of a connection ("" when the transport does not say)."""
    address = connection.remote_address
    return str(address[0]) if address else ""


class GuardedConnection:
    """The connection the library reads from: only checked frames come out of `recv`."""

    def __init__(
        self, websocket: ServerConnection, checker: FrameChecker, session: ChargerSession
    ) -> None:
        self._ws = websocket
        self._checker = checker
        self._session = session
        config = session.central.config
        self._rate = config.max_frames_per_s
        self._burst = float(config.frame_burst)
        self._tokens = self._burst
        self._refilled = time.monotonic()
        self.last: Verdict | None = None  # the verdict of the frame `recv` returned last

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    async def recv(self) -> str:
        """The next frame the library may route; bad frames are answered or dropped here."""
        while True:
            raw = await self._ws.recv()
            if not self._take_token():
                # SEC-05: a flooding charger is cut off (1008 policy violation); others go on.
                central = self._session.central
                central.metrics["closed_rate_limit"] += 1
                central.security_event(
                    SecurityEventKind.RATE_LIMITED,
                    principal=self._session.id,
                    remote=_peer_ip(self._ws),
                    reason=f"over {self._rate:.0f} frames/s (burst {int(self._burst)}); "
                    "closed with 1008",
                )
                raise RateLimited(self._session.id)
            verdict = self._checker.check(raw)
            if verdict.kind in ("call", "result", "error"):
                self._session.central.metrics[f"frames_{verdict.kind}"] += 1
                self.last = verdict
                return verdict.text
            if verdict.kind == "reply":
                await self._ws.send(verdict.text)
            self._session.bad_frame(verdict)

    async def send(self, message: str) -> None:
        """Send a frame as it is."""
        await self._ws.send(message)


class ChargerSession(LibraryChargePoint):  # type: ignore[misc]  # the library is untyped
    """One connected charge point: the library's router with voltpool's handlers."""

    def __init__(
        self,
        charger_id: ChargerId,
        websocket: ServerConnection,
        central: CentralSystem,
        session_id: str,
    ) -> None:
        self.central = central
        self.session_id = session_id
        self.websocket = websocket
        self.checker = FrameChecker(
            now=central.clock.now,
            max_ahead_s=central.config.max_event_ahead_s,
            connectors=lambda: central.connector_ids(charger_id),
            id_window=central.config.id_window,
        )
        self.closed = asyncio.Event()
        self.ip_released = False  # counted out of the per-address connection total
        self.boot_status: str | None = None
        self._last_log = float("-inf")
        self._suppressed = 0
        self.guard = GuardedConnection(websocket, self.checker, self)
        self._after_tasks: set[asyncio.Future[Any]] = set()
        super().__init__(charger_id, self.guard, response_timeout=central.config.call_timeout_s)

    # -- the library's router, without its per-CALL costs (issue #8) --

    async def route_message(self, raw_msg: str) -> None:
        """Route a frame `recv` returned. A CALL the frame checker passed is not decoded a
        second time: its parsed payload goes to `_handle_call` (the library's `route_message`
        would `json.loads` it again); answers and anything else go the library's way."""
        verdict = self.guard.last
        if verdict is None or verdict.kind != "call" or verdict.text is not raw_msg:
            await super().route_message(raw_msg)
            return
        msg = Call(verdict.unique_id, verdict.action, verdict.payload)
        routed = time.perf_counter()
        try:
            await self._handle_call(msg)
        except OCPPError as error:  # as the library's router does
            self.logger.exception("Error while handling request '%s'", msg)
            await self._send(msg.create_call_error(error).to_json())
        self.central.handling.record(verdict.action, time.perf_counter() - routed)

    async def _handle_call(self, msg: Call) -> Any:
        """The library's `_handle_call` steps for a CALL whose payload the frame checker has
        validated: the on-handler with snake_case arguments, its answer as CALLRESULT (or its
        exception as CALLERROR), then the after-handler as a task. Two per-CALL costs of the
        library are cut: keys are converted through a cache (`snake_keys`; the library's two
        regular expressions per key took ~107 us for a MeterValues of four samples) and each
        handler's signature is read once, not at every CALL (~21 us). A route the library
        would validate itself (none of ours: `_on` skips validation) goes to the library."""
        handlers = self.route_map.get(msg.action)
        if (
            handlers is None
            or "_on_action" not in handlers
            or not handlers.get("_skip_schema_validation", False)
        ):
            return await super()._handle_call(msg)
        arguments = snake_keys(msg.payload)
        handler = handlers["_on_action"]
        try:
            if _takes_unique_id(handler):
                response = handler(**arguments, call_unique_id=msg.unique_id)
            else:
                response = handler(**arguments)
            if inspect.isawaitable(response):
                response = await response
        except Exception as e:
            self.logger.exception("Error while handling request '%s'", msg)
            await self._send(msg.create_call_error(e).to_json())
            return None
        payload = snake_to_camel_case(remove_nones(serialize_as_dict(response)))
        await self._send(msg.create_call_result(payload).to_json())
        after = handlers.get("_after_action")
        if after is None:
            return response
        if _takes_unique_id(after):
            followed = after(**arguments, call_unique_id=msg.unique_id)
        else:
            followed = after(**arguments)
        if inspect.isawaitable(followed):
            # A task, as the library does, so a CALL made in the after-handler cannot block
            # the router (held here until it ends).
            task = asyncio.ensure_future(followed)
            self._after_tasks.add(task)
            task.add_done_callback(self._after_tasks.discard)
        return followed

    # -- bookkeeping --

    def bad_frame(self, verdict: Verdict) -> None:
        """Count a rejected frame; log at most one line per period per charge point."""
        self.central.metrics[f"frames_{verdict.kind}"] += 1
        if verdict.counter:
            self.central.metrics[verdict.counter] += 1
        if verdict.code:
            self.central.metrics[f"callerror_{verdict.code}"] += 1
        now = time.monotonic()
        if now - self._last_log >= self.central.config.log_every_s:
            log.warning(
                "%s: bad frame (%s%s): %s%s",
                self.id,
                verdict.kind,
                f" {verdict.code}" if verdict.code else "",
                verdict.reason,
                f" (+{self._suppressed} not logged)" if self._suppressed else "",
            )
            self._last_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    async def request(self, payload: Any) -> Any:
        """Send a CALL and wait for its answer, or raise why there is none.

        Raises:
            ChargerUnreachable: the connection closed before an answer came.
            CallTimedOut: no answer within the configured timeout.
            CallFailed: the charge point answered with a CALLERROR.
        """
        action = type(payload).__name__
        rejected = self.boot_status == "Rejected" or (
            self.boot_status is None and self.id in self.central.rejected_until
        )
        if rejected:
            # OCPP 1.6 §4.2: while a charge point is Rejected the central system sends nothing
            # (also on a new connection of it, until a boot is answered otherwise).
            self.central.metrics["calls_withheld_rejected"] += 1
            raise ChargerUnreachable(f"{self.id}: boot Rejected, {action} not sent")
        unique_id = str(uuid.uuid4())
        self.checker.sent_call(unique_id)
        calling = asyncio.ensure_future(self._call(payload, unique_id))
        closing = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait({calling, closing}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The requester was cancelled (a dispatcher worker stopped or replaced): the CALL
            # stops with it instead of running on unobserved (its failure on a closed
            # connection was logged as "Task exception was never retrieved"); a late answer is
            # dropped as unmatched, as after a timeout.
            calling.cancel()
            calling.add_done_callback(_observed)
            self.checker.forget_call(unique_id)
            raise
        finally:
            closing.cancel()
        if not calling.done():
            calling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await calling
            self.checker.forget_call(unique_id)
            raise ChargerUnreachable(f"{self.id}: connection closed during {action}")
        try:
            return _floats(calling.result())
        except TimeoutError as exc:
            self.checker.forget_call(unique_id)
            self.central.metrics["calls_timed_out"] += 1
            raise CallTimedOut(f"{self.id}: no answer to {action} in time") from exc
        except OCPPError as exc:
            self.central.metrics["calls_failed"] += 1
            raise CallFailed(self.id, action, exc.code, str(exc.description)) from exc
        except ConnectionClosed as exc:
            self.checker.forget_call(unique_id)
            raise ChargerUnreachable(f"{self.id}: connection closed during {action}") from exc

    async def _call(self, payload: Any, unique_id: str) -> Any:
        """The library's `call(payload, suppress=False, unique_id=...)`, without its per-call
        costs: the payload is converted through a key cache (`outgoing_payload`), and the
        CALL and its CALLRESULT are checked against the 1.6 schemas by the compiled checks
        (`frames.outbound_valid`) on the event loop, where the library validated each with
        jsonschema in a thread (still holding the interpreter lock) and re-parsed the floats
        of a SetChargingProfile as Decimal: ~1 ms per 24-period profile. Nothing unchecked
        goes out and nothing unchecked comes back: a payload the compiled check does not
        pass goes to the library's own `validate_payload`, which raises the library's error
        for it as before (an invalid CALL is not sent; an invalid answer raises its
        OCPPError, as `request` reports) or, passing it, leaves it as the library would
        (a SetChargingProfile then goes out through the library's Decimal encoding). A
        payload the compiled check passes is sent as the library would send it: its limits
        are multiples of 0.1, whose JSON the library's Decimal round trip gives back
        unchanged (`tests/ocpp/test_outbound_checks.py`)."""
        action = type(payload).__name__
        message = Call(unique_id, action, outgoing_payload(payload))
        if not outbound_valid(action, message.payload, answer=False):
            await validate_payload(message, self._ocpp_version)
        async with self._call_lock:
            await self._send(message.to_json())
            try:
                response = await self._get_specific_response(unique_id, self._response_timeout)
            except TimeoutError as exc:
                raise TimeoutError(
                    f"Waited {self._response_timeout}s for response on {message.to_json()}."
                ) from exc
        if response.message_type_id == MessageType.CallError:
            self.logger.warning("Received a CALLError: %s'", response)
            raise response.to_exception()
        if not outbound_valid(action, response.payload, answer=True):
            response.action = action
            await validate_payload(response, self._ocpp_version)
        result_type = getattr(self._call_result, action)
        return result_type(**snake_keys(response.payload))

    async def _emit(self, event: Event) -> None:
        """Hand an event to the sink; a refusal is counted (the fact still happened)."""
        try:
            await self.central.sink.submit(event)
        except Refused as refusal:
            self.central.metrics["events_refused"] += 1
            log.info("%s: %s %s refused: %s", self.id, event.kind, event.event_id, refusal.reason)
        except InvalidEvent as exc:
            raise PropertyConstraintViolationError(description=str(exc)[:200]) from exc
        else:
            self.central.metrics["events_submitted"] += 1

    async def _emit_many(self, events: Sequence[Event]) -> None:
        """Hand an ordered batch to the sink in one append when it takes batches
        (`EventSink.submit_many`), else one event after the other; refusals are counted
        event by event, as `_emit` counts them."""
        submit_many = getattr(self.central.sink, "submit_many", None)
        if submit_many is None:
            for event in events:
                await self._emit(event)
            return
        try:
            outcomes: list[Refused | None] = await submit_many(events)
        except InvalidEvent as exc:
            raise PropertyConstraintViolationError(description=str(exc)[:200]) from exc
        for event, refusal in zip(events, outcomes, strict=True):
            if refusal is None:
                self.central.metrics["events_submitted"] += 1
            else:
                self.central.metrics["events_refused"] += 1
                log.info(
                    "%s: %s %s refused: %s", self.id, event.kind, event.event_id, refusal.reason
                )

    def _now_iso(self) -> str:
        return iso(self.central.clock.now())

    # -- handlers (the frame checker has validated every payload already) --

    @_on(Action.boot_notification)
    async def on_boot_notification(
        self, charge_point_vendor: str, charge_point_model: str, **_: Any
    ) -> call_result.BootNotification:
        """Accept known charge points; unknown ones get the configured status.

        S-04: a charge point Rejected less than the retry interval ago is Rejected again
        without a second look (and counted); nothing is sent to it while it is Rejected.
        """
        central = self.central
        now = central.clock.now()
        not_before = central.rejected_until.get(self.id)
        if not_before is not None and now < not_before:
            central.metrics["boots_before_retry_interval"] += 1
            status = "Rejected"
        else:
            known = await central.is_known(self.id)
            status = "Accepted" if known else central.config.unknown_boot_status
        self.boot_status = status
        # A new boot starts the registration afresh: only Accepted lets other calls in (S-03).
        self.checker.boot_accepted = status == "Accepted"
        if status == "Rejected":
            central.rejected_until[self.id] = now + timedelta(
                seconds=central.config.pending_retry_s
            )
        else:
            central.rejected_until.pop(self.id, None)
        await central.record_connection(self, online=True)
        log.info("%s: boot %s (%s %s)", self.id, status, charge_point_vendor, charge_point_model)
        interval = (
            self.central.config.heartbeat_interval_s
            if status == "Accepted"
            else self.central.config.pending_retry_s
        )
        return call_result.BootNotification(
            current_time=self._now_iso(), interval=interval, status=status
        )

    @_after(Action.boot_notification)
    async def after_boot_notification(self, **_: Any) -> None:
        """Once the answer is out: bring the charge point to the current plan."""
        if self.boot_status == "Accepted":
            await self.central.notify_ready(self, rebooted=True)

    @_on(Action.heartbeat)
    async def on_heartbeat(self, **_: Any) -> call_result.Heartbeat:
        """The central system's time."""
        return call_result.Heartbeat(current_time=self._now_iso())

    @_on(Action.status_notification)
    async def on_status_notification(
        self,
        connector_id: int,
        error_code: str,
        status: str,
        timestamp: str | None = None,
        **_: Any,
    ) -> call_result.StatusNotification:
        """A connector's status; `Available` after a car's session means it left."""
        at = _at(timestamp, self.central.clock.now())
        emitted = self._emit(
            ConnectorStatusChanged(
                event_id=event_id(self.id, "st", connector_id, status, iso(at)),
                at=at,
                charger_id=self.id,
                connector_id=connector_id,
                status=ConnectorStatus(status),
                error_code=error_code,
            )
        )
        if status == "Available" and connector_id > 0:
            # The connector's latest transaction is read while the event is written (neither
            # depends on the other): one round trip of latency, not two.
            both = await asyncio.gather(
                emitted, self.central.transactions.latest_on(self.id, connector_id)
            )
            latest = both[1]
            self.central.status_seen(self.id, connector_id, status, at)
            if latest is not None:
                await self._unplugged(latest[0], latest[1], at)
        else:
            await emitted
            self.central.status_seen(self.id, connector_id, status, at)
        return call_result.StatusNotification()

    async def _unplugged(
        self, transaction_id: TransactionId, record: BookedTransaction, at: Any
    ) -> None:
        if record.vehicle_id is None or record.unplugged:
            return
        await self._emit(
            VehicleUnplugged(
                event_id=event_id(self.id, "unplug", transaction_id),
                at=at,
                vehicle_id=record.vehicle_id,
            )
        )
        await self.central.transactions.update(transaction_id, unplugged=True)

    @_on(Action.authorize)
    async def on_authorize(self, id_tag: str, **_: Any) -> call_result.Authorize:
        """Accept idTags that belong to a vehicle (or any, when so configured)."""
        return call_result.Authorize(
            id_tag_info=datatypes.IdTagInfo(status=self.central.authorize(id_tag))
        )

    @_on(Action.start_transaction)
    async def on_start_transaction(
        self, connector_id: int, id_tag: str, meter_start: int, timestamp: str, **_: Any
    ) -> call_result.StartTransaction:
        """Hand out a transaction id (the same one for a replay) and report the start."""
        at = _at(timestamp, self.central.clock.now())
        vehicle_id = self.central.vehicle_for_tag(id_tag)
        transaction_id, new, previous = await self.central.transactions.allocate(
            BookedTransaction(
                charger_id=self.id,
                connector_id=connector_id,
                id_tag=id_tag,
                started_at=iso(at),
                meter_start_wh=meter_start,
                vehicle_id=vehicle_id,
            )
        )
        if not new:
            self.central.metrics["transactions_replayed"] += 1
        if previous is not None:
            await self._close_superseded(previous, transaction_id, at)
        events: list[Event] = []
        if vehicle_id is not None:
            events.append(
                VehiclePluggedIn(
                    event_id=event_id(self.id, "plug", transaction_id),
                    at=at,
                    vehicle_id=vehicle_id,
                    charger_id=self.id,
                    connector_id=connector_id,
                )
            )
        events.append(
            TransactionStarted(
                event_id=event_id(self.id, "tx", transaction_id, "start"),
                at=at,
                transaction_id=transaction_id,
                charger_id=self.id,
                connector_id=connector_id,
                id_tag=id_tag,
                meter_start_wh=float(meter_start),
                vehicle_id=vehicle_id,
            )
        )
        await self._emit_many(events)  # the plug-in, then the start: one append, in order
        self.central.open_transaction(self.id, connector_id, transaction_id)
        return call_result.StartTransaction(
            transaction_id=transaction_id,
            id_tag_info=datatypes.IdTagInfo(status=self.central.authorize(id_tag)),
        )

    async def _close_superseded(
        self, previous: TransactionId, successor: TransactionId, at: datetime
    ) -> None:
        """T-07: a new start on a connector whose transaction never stopped (its stop was lost
        in a power failure) closes that one, so no session stays open for ever. Its end is the
        new start, its register the last reading; a stop arriving later is a duplicate."""
        book = self.central.transactions
        record, ledger = await book.view(previous)
        if record is None or record.stopped:
            return
        started = timestamp_of(record.started_at)
        samples = book.ledger_after(ledger, [])
        last = [r for s in samples if (r := s.register_wh) is not None and s.at >= started]
        summary = summarise(
            started,
            float(record.meter_start_wh),
            samples,
            stopped_at=max(at, started),
            meter_stop_wh=max([float(record.meter_start_wh), *last]),
        )
        note = f"never stopped; closed by transaction {successor} on the same connector"
        summary = replace(summary, anomalies=(*summary.anomalies, note))
        await book.settle(previous, summary, "Other", record=record)
        self.central.close_transaction(self.id, record.connector_id, previous)
        self.central.metrics["transactions_superseded"] += 1
        log.warning("%s: transaction %s %s", self.id, previous, note)
        await self._emit(
            self._stopped(previous, summary.stopped_at, summary.meter_stop_wh, "Other")
        )

    @_on(Action.stop_transaction)
    async def on_stop_transaction(
        self,
        meter_stop: int,
        timestamp: str,
        transaction_id: int,
        reason: str | None = None,
        id_tag: str | None = None,
        transaction_data: list[dict[str, Any]] | None = None,
        **_: Any,
    ) -> call_result.StopTransaction:
        """Settle the stop from the stored samples and report it (with the samples it carries);
        an unknown id is accepted and counted (a charge point must not retry it for ever)."""
        at = _at(timestamp, self.central.clock.now())
        reason = reason or "Local"
        book = self.central.transactions
        # Two round trips: the record and its ledger read together (one script); then, side by
        # side, one write (the transactionData rows, the settled record with its `unplugged`
        # flag when the car left, the ledger's expiry: one MULTI) and one append of the
        # events (the samples, the stop, the unplugging when due, in that order). The ledger
        # the stop settles on is the one read plus those rows (not read again).
        record, ledger = await book.view(transaction_id)
        if record is None:
            self.central.metrics["stops_of_unknown_transactions"] += 1
            log.warning("%s: StopTransaction for unknown transaction %s", self.id, transaction_id)
            await self._emit_many([self._stopped(transaction_id, at, float(meter_stop), reason)])
            return call_result.StopTransaction(id_tag_info=self._tag_info(id_tag))
        data = transaction_data or []
        events: list[Event] = list(self._samples(record.connector_id, transaction_id, data))
        rows = book.rows(record.connector_id, data)
        # The car left: the stop says so, or (a replayed stop of a charger that reported its
        # present status before replaying its offline queue) its connector reported Available.
        leaving = record.vehicle_id is not None and (
            reason == "EVDisconnected"
            or self.central.vacated_after(self.id, record.connector_id, record.started_at)
        )
        summary: SessionSummary | None = None
        write: Awaitable[object]
        if record.stopped and record.stopped_at is not None:
            # Re-sent (its answer lost) or a second stop: the first one settled it.
            stopped_at = timestamp_of(record.stopped_at)
            stop_wh = float(record.meter_stop_wh or record.meter_start_wh)
            if leaving and not record.unplugged:
                write = book.write_settled(transaction_id, replace(record, unplugged=True), rows)
            else:
                write = book.record_samples(transaction_id, record.connector_id, data, settled=True)
        else:
            summary = summarise(
                timestamp_of(record.started_at),
                float(record.meter_start_wh),
                book.ledger_after(ledger, rows),
                stopped_at=at,
                meter_stop_wh=float(meter_stop),
            )
            stopped_at, stop_wh = summary.stopped_at, summary.meter_stop_wh
            write = book.settle(
                transaction_id, summary, reason, record=record, rows=rows, unplugged=leaving
            )
        events.append(self._stopped(transaction_id, stopped_at, stop_wh, reason))
        # The unplugging, unless a StatusNotification reported it already (it writes the flag
        # only after its event is in the log). A repeated stop offers it again whatever the
        # flag says: its first attempt may have written the flag and failed to append the
        # event; the log drops a second copy by its event id.
        if leaving and record.vehicle_id is not None and (record.stopped or not record.unplugged):
            events.append(
                VehicleUnplugged(
                    event_id=event_id(self.id, "unplug", transaction_id),
                    at=stopped_at,
                    vehicle_id=record.vehicle_id,
                )
            )
        # Both must hold before the CALLRESULT and neither depends on the other; both are
        # idempotent (HSETNX rows, the same settled record, event ids the log de-duplicates),
        # so a failure of either (InternalError, the charger re-sends) is safe.
        for outcome in await asyncio.gather(write, self._emit_many(events), return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
        if summary is None:
            self.central.metrics["stops_repeated"] += 1
        else:
            self._report_settlement(transaction_id, summary)
        self.central.close_transaction(self.id, record.connector_id, transaction_id)
        return call_result.StopTransaction(id_tag_info=self._tag_info(id_tag))

    def _stopped(
        self, transaction_id: TransactionId, at: datetime, meter_stop_wh: float, reason: str
    ) -> TransactionStopped:
        """The event of a transaction's stop (its id is the same for every copy of the stop)."""
        return TransactionStopped(
            event_id=event_id(self.id, "tx", transaction_id, "stop"),
            at=at,
            transaction_id=transaction_id,
            meter_stop_wh=meter_stop_wh,
            reason=reason,
        )

    def _tag_info(self, id_tag: str | None) -> datatypes.IdTagInfo | None:
        """The idTagInfo a StopTransaction answers: the tag's status, when it names one."""
        return datatypes.IdTagInfo(status=self.central.authorize(id_tag)) if id_tag else None

    def _samples(
        self,
        connector_id: ConnectorId,
        transaction_id: TransactionId | None,
        entries: list[dict[str, Any]],
    ) -> list[MeterSampled]:
        """The events of a meterValue list, before anything is written. A value the event
        model refuses (a power beyond +-10 MW passes the schema) is answered
        PropertyConstraintViolation, not InternalError, so the charger does not retry it."""
        try:
            return meter_events(self.id, connector_id, transaction_id, entries)
        except InvalidEvent as exc:
            self.central.metrics["samples_refused"] += 1
            raise PropertyConstraintViolationError(description=str(exc)[:200]) from exc

    def _report_settlement(self, transaction_id: TransactionId, summary: SessionSummary) -> None:
        """Count and log what a stop's settlement found wrong (gaps, anomalies)."""
        metrics = self.central.metrics
        if summary.gaps:
            metrics["transactions_with_gaps"] += 1
            log.warning(
                "%s: transaction %s has %d gap(s) in its readings (first %s..%s); energy from "
                "the registers: %.0f Wh",
                self.id,
                transaction_id,
                len(summary.gaps),
                iso(summary.gaps[0].start),
                iso(summary.gaps[0].end),
                summary.energy_wh,
            )
        if summary.anomalies:
            metrics["transactions_with_anomalies"] += 1
            log.warning(
                "%s: transaction %s: %s", self.id, transaction_id, "; ".join(summary.anomalies)
            )

    @_on(Action.meter_values)
    async def on_meter_values(
        self,
        connector_id: int,
        meter_value: list[dict[str, Any]],
        transaction_id: int | None = None,
        **_: Any,
    ) -> call_result.MeterValues:
        """Samples of a transaction go to its ledger (each once); one `MeterSampled` per
        sample time goes to the sink."""
        samples = self._samples(connector_id, transaction_id, meter_value)

        async def to_the_ledger() -> None:
            if transaction_id is None:
                return
            new = await self.central.transactions.record_samples(
                transaction_id, connector_id, meter_value
            )
            if new is None:
                self.central.metrics["samples_of_unknown_transactions"] += 1

        async def to_the_sink() -> None:
            for sample in samples:
                if sample.power_kw is not None:
                    self.central.meter_sampled(self.id, connector_id, sample.at, sample.power_kw)
            await self._emit_many(samples)  # one append, in the order they were taken

        # Both must hold before the CALLRESULT; they do not depend on each other, so they run
        # side by side (one Redis round trip of latency, not two). Both are idempotent, so a
        # failure of either (InternalError, the charger re-sends) is safe.
        await asyncio.gather(to_the_ledger(), to_the_sink())
        return call_result.MeterValues()

    @_on(Action.data_transfer)
    async def on_data_transfer(
        self, vendor_id: str, message_id: str | None = None, **_: Any
    ) -> call_result.DataTransfer:
        """voltpool takes no vendor data from charge points."""
        status = "UnknownMessageId" if vendor_id == VOLTPOOL_VENDOR else "UnknownVendorId"
        return call_result.DataTransfer(status=status)

    @_on(Action.diagnostics_status_notification)
    async def on_diagnostics_status_notification(
        self, status: str, **_: Any
    ) -> call_result.DiagnosticsStatusNotification:
        """Logged and counted."""
        self.central.metrics[f"diagnostics_{status}"] += 1
        log.info("%s: diagnostics %s", self.id, status)
        return call_result.DiagnosticsStatusNotification()

    @_on(Action.firmware_status_notification)
    async def on_firmware_status_notification(
        self, status: str, **_: Any
    ) -> call_result.FirmwareStatusNotification:
        """Logged and counted."""
        self.central.metrics[f"firmware_{status}"] += 1
        log.info("%s: firmware %s", self.id, status)
        return call_result.FirmwareStatusNotification()


def _at(text: str | None, now: Any) -> Any:
    return timestamp(text) if text else now


class CentralSystem:
    """The OCPP 1.6-J server for one site.

    Args:
        redis: text-mode client (credentials, connection state, transaction book).
        sink: where translated events go (the controller service's `submit`).
        clock: the time stamped on events without a timestamp and sent in replies.
        chargers: the fleet's configuration of a charge point, if known (connector ids).
        vehicle_for_tag: the vehicle an idTag belongs to.
        security: the security event log (SEC-11); by default one stamped by `clock`. Failed
            handshakes (credentials, ids, certificates, TLS downgrades), rate-limit and
            oversized-frame closures and key rotations are recorded there and counted in
            `metrics` as `security_{kind}`.
    """

    def __init__(
        self,
        *,
        redis: Redis,
        site: str,
        sink: EventSink,
        clock: Clock,
        config: OcppConfig | None = None,
        chargers: ChargerLookup | None = None,
        vehicle_for_tag: VehicleForTag | None = None,
        credentials: CredentialStore | None = None,
        security: SecurityLog | None = None,
        commits: Redis | None = None,
    ) -> None:
        self.config = config or OcppConfig()
        # SEC-11: refusals, closures and key changes go to the security event log.
        self.security = security or SecurityLog(now=clock.now)
        self.redis = redis
        self.site = site
        self.sink = sink
        self.clock = clock
        self.chargers: ChargerLookup = chargers or (lambda _cid: None)
        self.vehicle_for_tag: VehicleForTag = vehicle_for_tag or (lambda _tag: None)
        self.credentials = credentials or CredentialStore(
            redis, site, rounds=self.config.bcrypt_rounds
        )
        # `commits`: the MeterValues ledger's group commit on a client of its own (bootstrap).
        self.transactions = TransactionBook(redis, site, commits=commits)
        self.metrics = Metrics()
        # How long each CALL took from the router to its answer, by action (the central
        # system's share of a charger's round trip).
        self.handling = HandlingTimes()
        self._sessions: dict[ChargerId, ChargerSession] = {}
        self._listeners: list[ChargerListener] = []
        self._meter_listeners: list[MeterListener] = []
        self._per_ip: Counter[str] = Counter()  # open connections per remote address
        # The latest status each connector reported, with its timestamp (replayed stops).
        self._status: dict[tuple[ChargerId, ConnectorId], tuple[str, datetime]] = {}
        # S-04: charge points answered Rejected, and when they may boot again.
        self.rejected_until: dict[ChargerId, datetime] = {}
        install_log_redaction()  # websockets logs handshake headers (Authorization) at DEBUG
        # Running transactions by charger, then connector (the dispatcher asks per charger for
        # every charger at every plan: a scan of all of them each time was quadratic).
        self._open: dict[ChargerId, dict[ConnectorId, TransactionId]] = {}
        self._loaded: set[ChargerId] = set()  # chargers whose running transactions we know
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        # Accepted profiles by charger and slot, written behind (`remember_profile`).
        self._kept_profiles: dict[ChargerId, dict[str, Any]] = {}
        self._profiles_due: set[ChargerId] = set()
        self._profile_writer: asyncio.Future[None] | None = None
        self._profiles_read: asyncio.Future[None] | None = None

    # -- lifecycle --

    def security_event(
        self, kind: SecurityEventKind, *, principal: str = "", remote: str = "", reason: str = ""
    ) -> None:
        """Record a security event (SEC-11) and count it (`security_{kind}`)."""
        self.security.record(kind, principal=principal, remote=remote, reason=reason)
        self.metrics[f"security_{kind.value}"] += 1

    def _tls_failed(self, kind: SecurityEventKind, reason: str) -> None:
        self.security_event(kind, reason=reason)

    async def start(self) -> None:
        """Listen; `port` holds the bound port (useful with port 0)."""
        cfg = self.config
        if cfg.ssl_context is not None:
            observe_tls_handshakes(cfg.ssl_context, self._tls_failed)
        self._server = await serve(
            self._serve_connection,
            cfg.host,
            cfg.port,
            process_request=self._check_handshake,
            subprotocols=[SUBPROTOCOL],
            max_size=cfg.max_frame_bytes,
            ssl=cfg.ssl_context,
            ping_interval=cfg.ping_interval_s,
            ping_timeout=cfg.ping_timeout_s,
            open_timeout=cfg.open_timeout_s,
            close_timeout=cfg.close_timeout_s,
            compression=None,  # deflate state costs ~100 KiB per connection; chargers rarely use it
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        log.info(
            "OCPP central system on %s://%s:%s%s/", cfg.scheme, cfg.host, self.port, cfg.path_prefix
        )

    async def stop(self) -> None:
        """Close every connection and stop listening; write the remembered profiles once more
        (not waiting for a Redis that does not answer)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            await stop_task(task)
        writer = self._profile_writer
        if writer is not None and not writer.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROFILE_RETRY_S):
                    await asyncio.shield(writer)
            await stop_task(writer)

    async def __aenter__(self) -> CentralSystem:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def url(self, charger_id: ChargerId = "") -> str:
        """The URL a charge point connects to."""
        host = self.config.host
        return f"{self.config.scheme}://{host}:{self.port}{self.config.path_prefix}/{charger_id}"

    def add_listener(self, listener: ChargerListener) -> None:
        """Tell `listener` when charge points become ready and when they leave."""
        self._listeners.append(listener)

    def add_meter_listener(self, listener: MeterListener) -> None:
        """Tell `listener` every measured connector power (kW) as it arrives (P-05)."""
        self._meter_listeners.append(listener)

    def meter_sampled(
        self, charger_id: ChargerId, connector_id: int, at: datetime, power_kw: float
    ) -> None:
        """A validated MeterValues sample carried a power: pass it to the meter listeners."""
        for listener in self._meter_listeners:
            try:
                listener(charger_id, connector_id, at, power_kw)
            except Exception:  # a listener's bug must not fail the charger's MeterValues
                log.exception("%s: meter listener failed", charger_id)

    # -- what other parts ask --

    def online(self) -> list[ChargerId]:
        """The charge points connected now."""
        return sorted(self._sessions)

    def is_online(self, charger_id: ChargerId) -> bool:
        """Whether the charge point is connected now."""
        return charger_id in self._sessions

    def session(self, charger_id: ChargerId) -> ChargerSession:
        """The live session of a charge point.

        Raises:
            ChargerUnreachable: it is not connected.
        """
        session = self._sessions.get(charger_id)
        if session is None:
            raise ChargerUnreachable(f"charge point {charger_id!r} is not connected")
        return session

    def connector_ids(self, charger_id: ChargerId) -> frozenset[int] | None:
        """The connector ids the fleet configured for a charge point, if it knows them."""
        charger = self.chargers(charger_id)
        if charger is None or not charger.connectors:
            return None
        return frozenset(c.connector_id for c in charger.connectors)

    async def is_known(self, charger_id: ChargerId) -> bool:
        """A charge point with credentials, or one the fleet configuration names."""
        if self.chargers(charger_id) is not None:
            return True
        return await self.credentials.known(charger_id)

    def authorize(self, id_tag: str | None) -> str:
        """`Accepted` for an idTag of a vehicle (or any idTag, if so configured)."""
        if id_tag is not None and self.vehicle_for_tag(id_tag) is not None:
            return "Accepted"
        return "Accepted" if self.config.accept_unknown_id_tags else "Invalid"

    def status_seen(
        self, charger_id: ChargerId, connector_id: ConnectorId, status: str, at: datetime
    ) -> None:
        """Remember a connector's reported status unless a later one is known."""
        known = self._status.get((charger_id, connector_id))
        if known is None or at >= known[1]:
            self._status[(charger_id, connector_id)] = (status, at)

    def vacated_after(self, charger_id: ChargerId, connector_id: ConnectorId, since: str) -> bool:
        """Whether the connector reported Available later than `since` (a transaction's start,
        RFC 3339): its car has left, whatever order the messages came in."""
        known = self._status.get((charger_id, connector_id))
        return known is not None and known[0] == "Available" and known[1] > timestamp(since)

    def open_transaction(
        self, charger_id: ChargerId, connector_id: ConnectorId, transaction_id: TransactionId
    ) -> None:
        """Remember the running transaction of a connector (for TxProfiles)."""
        self._open.setdefault(charger_id, {})[connector_id] = transaction_id
        self._loaded.add(charger_id)

    def close_transaction(
        self, charger_id: ChargerId, connector_id: ConnectorId, transaction_id: TransactionId
    ) -> None:
        """Forget a connector's transaction once it stopped."""
        running = self._open.get(charger_id)
        if running is not None and running.get(connector_id) == transaction_id:
            del running[connector_id]
            if not running:
                del self._open[charger_id]

    def active_transactions(self, charger_id: ChargerId) -> dict[ConnectorId, TransactionId] | None:
        """The running transactions of a charge point, per connector; None when this process
        has not read them from the transaction book yet (then only the fleet state knows)."""
        if charger_id not in self._loaded:
            return None
        return dict(self._open.get(charger_id, {}))

    # -- handshake --

    def _charger_id_of(self, path: str) -> str | None:
        prefix = self.config.path_prefix + "/"
        path = urlsplit(path).path
        if not path.startswith(prefix):
            return None
        charger_id = unquote(path[len(prefix) :])
        return charger_id if valid_charger_id(charger_id) else None

    async def _check_handshake(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        charger_id = self._charger_id_of(request.path)
        if charger_id is None:
            return self._refused(
                connection,
                "handshakes_refused_path",
                SecurityEventKind.INVALID_ID,
                urlsplit(request.path).path[-MAX_PRINCIPAL:],
                "path is not /ocpp/{id} with a valid id (HTTP 404, no lookup)",
                http.HTTPStatus.NOT_FOUND,
                "No such charge point path\n",
            )
        cap = self.config.max_connections_per_ip
        if cap and self._per_ip[_peer_ip(connection)] >= cap:
            return self._refused(
                connection,
                "handshakes_refused_ip_cap",
                SecurityEventKind.RATE_LIMITED,
                charger_id,
                f"{cap} connections from its address already; refused with 503",
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "Too many connections\n",
            )
        if requires_client_certificate(self.config.ssl_context):
            # Profile 3: the TLS layer verified the chain; the certificate must name this id.
            peercert = connection.transport.get_extra_info("peercert")
            cn = common_name(peercert)
            if cn == charger_id:
                return None
            return self._refused(
                connection,
                "handshakes_refused_cert",
                SecurityEventKind.INVALID_CERTIFICATE,
                charger_id,
                f"client certificate CN {cn!r} is not the charge point id",
                http.HTTPStatus.FORBIDDEN,
                "Certificate does not match\n",
            )
        if not self.config.require_auth:
            return None
        refusal = await self._authenticate(charger_id, request.headers)
        if refusal is None:
            return None
        if refusal == STORE_UNAVAILABLE:
            # Not the charger's fault: 503 says "come back", where a 401 reads as a wrong
            # password and some chargers then stop trying.
            self.metrics["handshakes_deferred_store"] += 1
            log.warning("handshake of %s deferred: %s (HTTP 503)", charger_id, refusal)
            response = connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "Credential store unavailable\n"
            )
            response.headers["Retry-After"] = str(HANDSHAKE_RETRY_AFTER_S)
            return response
        kind = SecurityEventKind.AUTH_FAILED
        if refusal == UNKNOWN_OR_WRONG:
            with contextlib.suppress(RedisError):
                if not await self.credentials.known(charger_id):
                    kind, refusal = SecurityEventKind.UNKNOWN_ID, "no such charge point"
        response = self._refused(
            connection,
            "handshakes_refused_auth",
            kind,
            charger_id,
            f"at the handshake: {refusal} (HTTP 401)",
            http.HTTPStatus.UNAUTHORIZED,
            "Invalid credentials\n",
        )
        response.headers["WWW-Authenticate"] = build_www_authenticate_basic("voltpool")
        return response

    def _refused(
        self,
        connection: ServerConnection,
        metric: str,
        kind: SecurityEventKind,
        principal: str,
        reason: str,
        status: http.HTTPStatus,
        body: str,
    ) -> Response:
        """Count a refused handshake, record its security event, and answer it."""
        self.metrics[metric] += 1
        self.security_event(kind, principal=principal, remote=_peer_ip(connection), reason=reason)
        return connection.respond(status, body)

    async def _authenticate(self, charger_id: str, headers: Headers) -> str | None:
        """None when the Basic credentials are this charge point's; else why not."""
        try:
            header = headers["Authorization"]
        except KeyError:
            return "no credentials"
        try:
            user, password = parse_authorization_basic(header)
        except InvalidHeader:
            return "malformed Authorization header"
        if user != charger_id:
            return "user is not the charge point id"
        try:
            ok = await self.credentials.verify(charger_id, password)
        except RedisError:
            return STORE_UNAVAILABLE
        return None if ok else UNKNOWN_OR_WRONG

    # -- connections --

    async def _serve_connection(self, websocket: ServerConnection) -> None:
        charger_id = self._charger_id_of(websocket.request.path if websocket.request else "")
        if charger_id is None or websocket.subprotocol != SUBPROTOCOL:
            await websocket.close(1002, "ocpp1.6 subprotocol required")
            return
        session = ChargerSession(charger_id, websocket, self, uuid.uuid4().hex[:12])
        self._per_ip[_peer_ip(websocket)] += 1
        try:
            await self._serve_session(charger_id, session, websocket)
        finally:
            self._release_ip(session)

    def _release_ip(self, session: ChargerSession) -> None:
        """Count the session's connection out of its address's total (once)."""
        if session.ip_released:
            return
        session.ip_released = True
        peer = _peer_ip(session.websocket)
        self._per_ip[peer] -= 1
        if self._per_ip[peer] <= 0:
            del self._per_ip[peer]

    async def _serve_session(
        self, charger_id: ChargerId, session: ChargerSession, websocket: ServerConnection
    ) -> None:
        previous = self._sessions.get(charger_id)
        self._sessions[charger_id] = session
        self.metrics["connections"] += 1
        if previous is not None:
            # S-08/S-10: the newest authenticated connection wins; the old one is closed.
            self.metrics["connections_replaced"] += 1
            previous.closed.set()
            await previous.websocket.close(1000, "replaced by a newer connection")
        accepted_before = await self._accepted_before(charger_id)
        if accepted_before:
            session.checker.boot_accepted = True
        try:
            await self.record_connection(session, online=True)
        except RedisError:
            self.metrics["connection_state_unwritten"] += 1
            log.warning("%s: could not write its connection state", charger_id)
        await self._submit_quietly(
            ChargerConnected(
                event_id=event_id(charger_id, "up", session.session_id),
                at=self.clock.now(),
                charger_id=charger_id,
            )
        )
        if accepted_before:
            self._spawn(self.notify_ready(session, rebooted=False))
        try:
            await session.start()
        except RateLimited:
            # The flood fills the receive queue, so the peer's Close frame would never be read:
            # send ours, wait a moment, then drop the TCP connection.
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                await asyncio.wait_for(websocket.close(1008, "frame rate limit exceeded"), 1.0)
            websocket.transport.abort()
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            sent = exc.sent.code if exc.sent is not None else None
            if 1009 in (code, sent):
                self.metrics["frames_oversized"] += 1
                self.security_event(
                    SecurityEventKind.OVERSIZED_FRAME,
                    principal=charger_id,
                    remote=_peer_ip(websocket),
                    reason=f"a frame over {self.config.max_frame_bytes} bytes; closed with 1009",
                )
        finally:
            self._release_ip(session)  # before it shows offline: a reconnect may come at once
            session.closed.set()
            if self._sessions.get(charger_id) is session:
                del self._sessions[charger_id]
                await self._went_offline(session)

    async def _went_offline(self, session: ChargerSession) -> None:
        with contextlib.suppress(RedisError):
            await self.record_connection(session, online=False)
        await self._submit_quietly(
            ChargerDisconnected(
                event_id=event_id(session.id, "down", session.session_id),
                at=self.clock.now(),
                charger_id=session.id,
            )
        )
        for listener in self._listeners:
            try:
                await listener.charger_gone(session.id)
            except Exception:
                log.exception("%s: listener failed on disconnect", session.id)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def notify_ready(self, session: ChargerSession, *, rebooted: bool) -> None:
        """Tell the listeners that a charge point takes commands (if still connected)."""
        if self._sessions.get(session.id) is not session:
            return
        if session.id not in self._loaded:
            await self._load_open(session.id)
        for listener in self._listeners:
            try:
                await listener.charger_ready(session.id, rebooted=rebooted)
            except Exception:
                log.exception("%s: listener failed on ready", session.id)

    async def _load_open(self, charger_id: ChargerId) -> None:
        connector_ids = sorted(self.connector_ids(charger_id) or {1})
        try:
            running = await self.transactions.open_on(charger_id, connector_ids)
        except RedisError:
            log.warning("%s: could not read its running transactions", charger_id)
            return
        for connector_id, tx in running.items():
            self._open.setdefault(charger_id, {}).setdefault(connector_id, tx)
        self._loaded.add(charger_id)

    async def _submit_quietly(self, event: Event) -> None:
        try:
            await self.sink.submit(event)
        except (Refused, InvalidEvent) as exc:
            self.metrics["events_refused"] += 1
            log.info("%s refused: %s", event.event_id, exc)
        except Exception:
            self.metrics["events_lost"] += 1
            log.exception("could not submit %s", event.event_id)

    async def _accepted_before(self, charger_id: ChargerId) -> bool:
        try:
            raw = await redis_call(self.redis.hget(keys.charger_connections(self.site), charger_id))
        except RedisError:
            return False
        if not raw:
            return False
        return bool(json.loads(raw).get("accepted", False))

    async def record_connection(self, session: ChargerSession, *, online: bool) -> None:
        """Write the charge point's connection state to Redis."""
        key = keys.charger_connections(self.site)
        accepted = session.boot_status == "Accepted" or session.checker.boot_accepted
        state = {
            "online": online,
            "since": iso(self.clock.now()),
            "node": self.config.node,
            "session": session.session_id,
            "accepted": accepted,
            "boot_status": session.boot_status,
        }
        await redis_call(self.redis.hset(key, session.id, json.dumps(state)))

    async def connection_state(self, charger_id: ChargerId) -> dict[str, Any] | None:
        """What Redis holds about a charge point's connection."""
        raw = await redis_call(self.redis.hget(keys.charger_connections(self.site), charger_id))
        return json.loads(raw) if raw else None

    async def remember_profile(
        self, charger_id: ChargerId, slot: str, profile: Mapping[str, Any] | None
    ) -> None:
        """Keep the last accepted profile of a slot (`default`, `max`, `tx:{connector}`).

        Written behind: the record is kept in memory (read from Redis, every charger's, at
        the first remember) and every charger changed within one pass of the event loop is
        written by one HSET (`_write_profiles`). The record is for operators and the next
        engineer; no decision waits for it, and each plan changes a few hundred chargers'
        profiles at once (the 1,000-charger soak: two Redis round trips per profile were ~4 %
        of the loop).
        """
        if self._profiles_read is None:
            self._profiles_read = asyncio.ensure_future(self._read_profiles())
        try:
            await asyncio.shield(self._profiles_read)
        except RedisError:
            self._profiles_read = None  # read again at the next remember
            raise
        profiles = self._kept_profiles.setdefault(charger_id, {})
        if profile is None:
            profiles.pop(slot, None)
        else:
            profiles[slot] = dict(profile)
        self._profiles_due.add(charger_id)
        if self._profile_writer is None or self._profile_writer.done():
            self._profile_writer = asyncio.ensure_future(self._write_profiles())

    async def _read_profiles(self) -> None:
        raw = await redis_call(self.redis.hgetall(keys.charger_profiles(self.site)))
        for charger_id, text in raw.items():
            self._kept_profiles.setdefault(charger_id, json.loads(text))

    async def _write_profiles(self) -> None:
        """Write the chargers whose kept profiles changed, one HSET for all of them; on a
        Redis error, keep them due and try again after `PROFILE_RETRY_S`."""
        await asyncio.sleep(0)  # the rest of this pass's remembers join the write
        while self._profiles_due:
            due, self._profiles_due = self._profiles_due, set()
            mapping = {cid: json.dumps(self._kept_profiles[cid]) for cid in due}
            try:
                await redis_call(self.redis.hset(keys.charger_profiles(self.site), mapping=mapping))
            except RedisError as exc:
                self._profiles_due |= due
                self.metrics["profile_writes_failed"] += 1
                log.warning("accepted profiles of %d chargers not stored yet: %s", len(due), exc)
                await asyncio.sleep(PROFILE_RETRY_S)  # wall time: it waits for the server
                continue
            self.metrics["profile_writes"] += 1

    async def flush_profiles(self) -> None:
        """Wait until every remembered profile is written (or the writer gave up at stop)."""
        writer = self._profile_writer
        if writer is not None and not writer.done():
            await asyncio.shield(writer)

    async def profiles(self, charger_id: ChargerId) -> dict[str, Any]:
        """The last accepted profiles of a charge point, by slot."""
        raw = await redis_call(self.redis.hget(keys.charger_profiles(self.site), charger_id))
        return json.loads(raw) if raw else {}

    # -- CS -> CP calls --

    async def set_charging_profile(
        self, charger_id: ChargerId, connector_id: ConnectorId, profile: Mapping[str, Any]
    ) -> str:
        """SetChargingProfile; returns the charge point's status (Accepted, Rejected, ...)."""
        result = await self.session(charger_id).request(
            call.SetChargingProfile(connector_id=connector_id, cs_charging_profiles=dict(profile))
        )
        return str(result.status)

    async def clear_charging_profile(
        self,
        charger_id: ChargerId,
        *,
        profile_id: int | None = None,
        connector_id: ConnectorId | None = None,
        purpose: str | None = None,
        stack_level: int | None = None,
    ) -> str:
        """ClearChargingProfile with the given filters; returns Accepted or Unknown."""
        result = await self.session(charger_id).request(
            call.ClearChargingProfile(
                id=profile_id,
                connector_id=connector_id,
                charging_profile_purpose=purpose,
                stack_level=stack_level,
            )
        )
        return str(result.status)

    async def get_composite_schedule(
        self,
        charger_id: ChargerId,
        connector_id: ConnectorId,
        duration_s: int,
        unit: str | None = None,
    ) -> dict[str, Any]:
        """GetCompositeSchedule; the answer as a camelCase dict (status, chargingSchedule...)."""
        result = await self.session(charger_id).request(
            call.GetCompositeSchedule(
                connector_id=connector_id,
                duration=duration_s,
                charging_rate_unit=unit,
            )
        )
        answer: dict[str, Any] = {"status": str(result.status)}
        if result.connector_id is not None:
            answer["connectorId"] = result.connector_id
        if result.schedule_start is not None:
            answer["scheduleStart"] = result.schedule_start
        if result.charging_schedule is not None:
            answer["chargingSchedule"] = _camel(result.charging_schedule)
        return answer

    async def remote_start_transaction(
        self,
        charger_id: ChargerId,
        id_tag: str,
        connector_id: ConnectorId | None = None,
        profile: Mapping[str, Any] | None = None,
    ) -> str:
        """RemoteStartTransaction; returns Accepted or Rejected."""
        result = await self.session(charger_id).request(
            call.RemoteStartTransaction(
                id_tag=id_tag,
                connector_id=connector_id,
                charging_profile=dict(profile) if profile is not None else None,
            )
        )
        return str(result.status)

    async def remote_stop_transaction(
        self, charger_id: ChargerId, transaction_id: TransactionId
    ) -> str:
        """RemoteStopTransaction; returns Accepted or Rejected."""
        result = await self.session(charger_id).request(
            call.RemoteStopTransaction(transaction_id=transaction_id)
        )
        return str(result.status)

    async def trigger_message(
        self, charger_id: ChargerId, requested: str, connector_id: ConnectorId | None = None
    ) -> str:
        """TriggerMessage; returns Accepted, Rejected or NotImplemented."""
        result = await self.session(charger_id).request(
            call.TriggerMessage(requested_message=requested, connector_id=connector_id)
        )
        return str(result.status)

    async def rotate_password(self, charger_id: ChargerId) -> str:
        """TC_073: a new random AuthorizationKey (20 bytes, 40 hex digits) via
        ChangeConfiguration. The new key is staged first, so the charger can reconnect with it
        at once; the old one works until the new one is first used. Returns the charger's
        answer; on anything but Accepted the staged key is dropped. The key is never logged."""
        new = secrets.token_hex(20)
        await self.credentials.stage_password(charger_id, new)
        try:
            status = await self.change_configuration(charger_id, "AuthorizationKey", new)
        except BaseException:
            await self.credentials.discard_staged(charger_id)
            raise
        if status != "Accepted":
            await self.credentials.discard_staged(charger_id)
        self.metrics[f"password_rotations_{status.lower()}"] += 1
        self.security_event(
            SecurityEventKind.KEY_ROTATION,
            principal=charger_id,
            remote=_peer_ip(self.session(charger_id).websocket)
            if self.is_online(charger_id)
            else "",
            reason=f"ChangeConfiguration(AuthorizationKey) answered {status}",
        )
        return status

    async def change_configuration(self, charger_id: ChargerId, key: str, value: str) -> str:
        """ChangeConfiguration; returns Accepted, Rejected, RebootRequired or NotSupported."""
        result = await self.session(charger_id).request(
            call.ChangeConfiguration(key=key, value=value)
        )
        return str(result.status)

    async def get_configuration(
        self, charger_id: ChargerId, keys_wanted: Sequence[str] | None = None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """GetConfiguration; returns (known keys as camelCase dicts, unknown key names)."""
        result = await self.session(charger_id).request(
            call.GetConfiguration(key=list(keys_wanted) if keys_wanted else None)
        )
        known = [_camel(k) for k in (result.configuration_key or [])]
        return known, list(result.unknown_key or [])

    async def data_transfer(
        self, charger_id: ChargerId, vendor_id: str, message_id: str | None, data: str | None
    ) -> tuple[str, str | None]:
        """DataTransfer; returns (status, data)."""
        result = await self.session(charger_id).request(
            call.DataTransfer(vendor_id=vendor_id, message_id=message_id, data=data)
        )
        return str(result.status), result.data


def _observed(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a CALL nobody waits for any more (its error is not news)."""
    if not task.cancelled():
        task.exception()


def _camel(value: Any) -> Any:
    """snake_case keys (as the library hands answers over) back to OCPP's camelCase; floats
    for the Decimals the library parses some answers into."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            head, *rest = str(key).split("_")
            out[head + "".join(p[:1].upper() + p[1:] for p in rest)] = _camel(item)
        return out
    if isinstance(value, list):
        return [_camel(v) for v in value]
    return value
