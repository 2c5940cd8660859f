"""A simulated OCPP 1.6-J charge point: a client on the `ocpp` library over a real WebSocket.

It does what a charger does: boots (once; a reconnect does not reboot it), heartbeats, reports
status, authorizes, starts and stops transactions when a car plugs in or leaves, and sends
MeterValues (energy register, power, SoC) every `meter_interval_s`: counted from the connection
(`meter_phase="connection"`, the default), or, as OCPP 1.6 describes MeterValueSampleInterval,
from each transaction's start (`meter_phase="transaction"`; chargers whose transactions began
at different times then sample at different moments, as a real fleet does). It keeps the charging
profiles it receives by OCPP's stacking rules (`simulators.chargepoints.profiles`) and applies
the combined limit to the car: power = min(limit, what the car accepts); below the minimum
current it delivers nothing. Energy and SoC advance on the `Clock`, piecewise between profile
changes, so a day runs as fast as the clock is advanced.

V2G (voltpool's extension of 1.6, see docs/ocpp.md): with `v2g_mode="negative_limit"` a
negative limit means "discharge at up to this"; with `"data_transfer"` a vendor DataTransfer
(`org.voltpool` / `DischargeLimit`) carries a discharge schedule; with `"none"` a profile with a
negative limit is rejected.

Fault injection: `Faults` (ignore profiles, reject SetChargingProfile, delay replies; and what
field chargers refuse, RELIABILITY P-06: some stack levels, a unit, a purpose, or every profile
with a CALLERROR) and the methods `drop()` (connection lost without a close frame; it
reconnects with back-off) and `send_raw()` (garbage frames). The stack levels and units a
charger takes show in its configuration (`ChargeProfileMaxStackLevel`,
`ChargingScheduleAllowedChargingRateUnit`) as a real one would report them.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar, cast

from ocpp.exceptions import NotImplementedError as OcppNotImplemented
from ocpp.exceptions import NotSupportedError, OCPPError
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint as LibraryChargePoint
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from adapters.ocpp.aio import stop_task
from controller.domain import RateUnit, V2gMode
from controller.ports import Clock
from simulators.chargepoints.car import SimCar
from simulators.chargepoints.profiles import (
    Electrical,
    ProfileRejected,
    ProfileStore,
    parse_profile,
)

log = logging.getLogger(__name__)

MeterPhase = Literal["connection", "transaction"]

VENDOR = "org.voltpool"
DISCHARGE_MESSAGE = "DischargeLimit"
MAX_STEP = timedelta(seconds=60)  # integration step bound, for the car's taper

F = TypeVar("F", bound=Callable[..., Any])

_CALLERRORS: dict[str, type[OCPPError]] = {
    "NotSupported": NotSupportedError,
    "NotImplemented": OcppNotImplemented,
}


def _on(action: str) -> Callable[[F], F]:
    return cast(Callable[[F], F], on(action))


def _after(action: str) -> Callable[[F], F]:
    return cast(Callable[[F], F], after(action))


def iso(at: datetime) -> str:
    """RFC 3339, UTC, 'Z'."""
    at = at.astimezone(UTC)
    spec = "milliseconds" if at.microsecond else "seconds"
    return at.isoformat(timespec=spec).replace("+00:00", "Z")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChargerSpec:
    """A simulated charger's identity and electrical data."""

    charger_id: str
    connectors: int = 1
    max_power_kw: float = 11.0  # circuit limit, and each connector's
    phases: int = 3
    voltage_v: float = 230.0
    rate_unit: RateUnit = "W"
    min_current_a: float = 6.0
    v2g_mode: V2gMode = "none"
    meter_interval_s: float = 60.0
    # when the sample interval starts: at the connection, or at each transaction's start
    meter_phase: MeterPhase = "connection"
    max_stack_level: int = 8
    max_periods: int = 24
    vendor: str = "voltpool"
    model: str = "SimCharger"

    def __post_init__(self) -> None:
        if self.connectors < 1 or self.phases not in (1, 3) or self.meter_interval_s <= 0:
            raise ValueError(f"charger {self.charger_id}: impossible specification")

    @property
    def min_power_kw(self) -> float:
        """The smallest power the charger can deliver (minimum current on every phase)."""
        return self.min_current_a * self.voltage_v * self.phases / 1000.0


@dataclass(slots=True)
class Faults:
    """Misbehaviour to inject; may be changed while the charger runs."""

    ignore_profiles: bool = False  # answer Accepted, apply nothing
    reject_profiles: bool = False  # answer SetChargingProfile with Rejected
    reply_delay_s: float = 0.0  # wait this long (on the clock) before answering any CALL
    # Field faults (RELIABILITY P-06), each answered Rejected unless said otherwise:
    refused_stack_levels: frozenset[int] = frozenset()  # e.g. ABB Terra AC and stackLevel 1
    # The chargingRateUnits it takes and reports; None: it takes both and reports its own only.
    units: frozenset[str] | None = None
    unsupported_purposes: frozenset[str] = frozenset()  # e.g. {"ChargePointMaxProfile"}
    profile_callerror: str | None = None  # answer every SetChargingProfile with this CALLERROR


@dataclass(slots=True)
class FleetStats:
    """Counters shared by the chargers of one run (the benchmark reads them)."""

    sent: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    rtt_s: list[float] = field(default_factory=list)
    online: int = 0
    connects: int = 0


@dataclass(slots=True)
class SimConnector:
    """One outlet with its meter and, when one is plugged in, a car."""

    connector_id: int
    status: str = "Available"
    car: SimCar | None = None
    transaction_id: int | None = None
    tx_start: datetime | None = None
    import_wh: float = 0.0
    export_wh: float = 0.0
    # data_transfer V2G: (start, period offsets s, discharge limits W)
    discharge: tuple[datetime, tuple[int, ...], tuple[float, ...]] | None = None


@dataclass(frozen=True, slots=True)
class Received:
    """A SetChargingProfile as it arrived, and what the charger answered."""

    at: datetime
    connector_id: int
    purpose: str
    status: str
    profile: dict[str, Any]


class NotOnline(RuntimeError):
    """The charger is not connected (or not booted) now."""


class SimChargePoint:
    """One simulated charge point; `run()` keeps it connected until cancelled."""

    def __init__(
        self,
        spec: ChargerSpec,
        clock: Clock,
        *,
        faults: Faults | None = None,
        stats: FleetStats | None = None,
        validate: bool = True,
        reconnect_base_s: float = 1.0,
        reconnect_max_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.clock = clock
        self.faults = faults or Faults()
        self.stats = stats or FleetStats()
        self.validate = validate
        self.reconnect_base_s = reconnect_base_s
        self.reconnect_max_s = reconnect_max_s
        self.rng = rng or random.Random(spec.charger_id)
        self.connectors = [SimConnector(i) for i in range(1, spec.connectors + 1)]
        self.store = ProfileStore(
            spec.connectors,
            Electrical(spec.voltage_v, spec.phases),
            max_stack_level=spec.max_stack_level,
            max_periods=spec.max_periods,
            allow_negative=spec.v2g_mode == "negative_limit",
        )
        self.configuration: dict[str, str] = {
            "HeartbeatInterval": "300",
            "MeterValueSampleInterval": str(int(spec.meter_interval_s)),
            "ChargeProfileMaxStackLevel": str(spec.max_stack_level),
            "ChargingScheduleAllowedChargingRateUnit": _allowed_units(
                spec.rate_unit, self.faults.units
            ),
            "ChargingScheduleMaxPeriods": str(spec.max_periods),
            "MaxChargingProfilesInstalled": "16",
            "NumberOfConnectors": str(spec.connectors),
            "StopTransactionOnEVSideDisconnect": "true",
            "VoltpoolV2gMode": spec.v2g_mode,
        }
        self.writable = {"HeartbeatInterval", "MeterValueSampleInterval", "AuthorizationKey"}
        self.authorization_key: str | None = None  # set by ChangeConfiguration(AuthorizationKey)
        self.received: list[Received] = []
        self.boot_status: str | None = None
        self.booted = False
        self.online = asyncio.Event()
        self.refused_status: int | None = None  # HTTP status of a refused handshake
        self.backing_off = False  # waiting (on the clock) before the next connection attempt
        self.ledger: list[dict[str, Any]] = []  # transactions as this charger saw them
        # RELIABILITY S-05, as the charger sees it: CALLs from the central system received and
        # not yet answered, now and at most; and its own CALLs made while one was.
        self.cs_calls_in_flight = 0
        self.max_cs_calls_in_flight = 0
        self.calls_during_cs_call = 0
        self.call_sent_at = 0.0  # perf_counter when our latest CALL frame went out
        self._t = clock.now()
        self._wire: _Wire | None = None
        self._ws: ClientConnection | None = None
        self._activity = asyncio.Event()

    # -- running --

    async def run(
        self, url: str, password: str | None = None, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Connect to `url` + charger id and stay connected (reconnecting) until cancelled."""
        target = url.rstrip("/") + "/" + self.spec.charger_id
        attempt = 0
        while True:
            headers = {}
            key = self.authorization_key or password  # a rotated key wins (TC_073)
            if key is not None:
                token = base64.b64encode(f"{self.spec.charger_id}:{key}".encode()).decode()
                headers["Authorization"] = f"Basic {token}"
            try:
                async with connect(
                    target,
                    subprotocols=[call_subprotocol()],
                    additional_headers=headers,
                    ssl=ssl_context,
                    open_timeout=60,
                    compression=None,
                    ping_interval=None,
                    max_size=2**20,
                ) as ws:
                    attempt = 0
                    self.refused_status = None
                    await self._session(ws)
            except InvalidStatus as exc:
                self.refused_status = exc.response.status_code
                self.stats.errors[f"http_{exc.response.status_code}"] += 1
            except (OSError, InvalidHandshake, InvalidURI, ConnectionClosed, TimeoutError) as exc:
                self.stats.errors[type(exc).__name__] += 1
            attempt += 1
            delay = min(self.reconnect_max_s, self.reconnect_base_s * 2 ** (attempt - 1))
            delay *= self.rng.uniform(0.5, 1.0)  # jitter: no thundering herd after a restart
            self.backing_off = True
            self._touch()
            try:
                await self.clock.sleep_until(self.clock.now() + timedelta(seconds=delay))
            finally:
                self.backing_off = False

    async def _session(self, ws: ClientConnection) -> None:
        wire = _Wire(self.spec.charger_id, ws, self)
        self._ws = ws
        self.cs_calls_in_flight = 0  # what was in flight went with the old connection
        reader = asyncio.ensure_future(wire.start())
        loops: list[asyncio.Task[None]] = []
        self.stats.connects += 1
        try:
            self._wire = wire
            if not self.booted:
                await self._boot()
            for connector in [0, *(c.connector_id for c in self.connectors)]:
                await self.send_status(connector)
            self.online.set()
            self._touch()  # `wait_for` on being online looks again
            self.stats.online += 1
            loops = [
                asyncio.ensure_future(self._heartbeats()),
                asyncio.ensure_future(self._meter_loop()),
            ]
            await reader
        finally:
            if self.online.is_set():
                self.stats.online -= 1
            self.online.clear()
            self._wire = None
            self._ws = None
            self._touch()  # offline now: `wait_for` looks again
            for task in (*loops, reader):
                await stop_task(task)

    async def _boot(self) -> None:
        while True:
            result = await self._call(
                call.BootNotification(
                    charge_point_model=self.spec.model, charge_point_vendor=self.spec.vendor
                )
            )
            self.boot_status = str(result.status)
            if self.boot_status == "Accepted":
                self.configuration["HeartbeatInterval"] = str(result.interval)
                self.booted = True
                return
            await self.clock.sleep_until(self.clock.now() + timedelta(seconds=result.interval))

    async def _heartbeats(self) -> None:
        while True:
            interval = max(1, int(self.configuration["HeartbeatInterval"]))
            await self.clock.sleep_until(self.clock.now() + timedelta(seconds=interval))
            await self._call(call.Heartbeat())

    async def _meter_loop(self) -> None:
        while True:
            interval = max(1, int(self.configuration["MeterValueSampleInterval"]))
            if self.spec.meter_phase == "connection":
                await self.clock.sleep_until(self.clock.now() + timedelta(seconds=interval))
                await self.send_meter_values()
                continue
            due = self.samples_due(self.clock.now(), interval)
            if not due:
                # No transaction: look again one interval on. A transaction that starts in
                # between is first sampled at its start + interval, which is not earlier.
                await self.clock.sleep_until(self.clock.now() + timedelta(seconds=interval))
                continue
            await self.clock.sleep_until(min(due.values()))
            now = self.clock.now()
            await self.send_meter_values({c for c, when in due.items() if when <= now})

    def samples_due(self, now: datetime, interval: int) -> dict[int, datetime]:
        """Each running transaction's next sample time (connector id -> time): its start +
        k * interval, the first such time after `now` (k >= 1)."""
        step = timedelta(seconds=interval)
        due: dict[int, datetime] = {}
        for connector in self.connectors:
            start = connector.tx_start
            if connector.transaction_id is None or start is None:
                continue
            due[connector.connector_id] = start + max(1, (now - start) // step + 1) * step
        return due

    async def _call(self, payload: Any) -> Any:
        wire = self._wire
        if wire is None:
            raise NotOnline(f"{self.spec.charger_id} is not connected")
        action = type(payload).__name__
        self.stats.sent[action] += 1
        if self.cs_calls_in_flight:
            self.calls_during_cs_call += 1
        started = time.perf_counter()
        result = await wire.call(payload, suppress=False, skip_schema_validation=not self.validate)
        self.stats.rtt_s.append(time.perf_counter() - started)
        self.stats.answered[action] += 1
        self._touch()
        return result

    async def wait_online(self) -> None:
        """Until the charger is connected and booted."""
        await self.online.wait()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Until `predicate()` holds, checked whenever the charger receives or sends something.

        Raises:
            TimeoutError: not within `timeout_s` (wall time: it waits for sockets).
        """
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._activity.clear()
                await self._activity.wait()

    def _touch(self) -> None:
        self._activity.set()

    # -- what a driver and the tests do --

    async def send_status(self, connector_id: int) -> None:
        """StatusNotification for a connector (0: the charge point)."""
        status = "Available" if connector_id == 0 else self.connector(connector_id).status
        await self._call(
            call.StatusNotification(
                connector_id=connector_id,
                error_code="NoError",
                status=status,
                timestamp=iso(self.clock.now()),
            )
        )

    def connector(self, connector_id: int) -> SimConnector:
        """The connector with this id."""
        return self.connectors[connector_id - 1]

    async def plug_in(self, connector_id: int, car: SimCar, *, start: bool = True) -> int | None:
        """A car arrives: Preparing, Authorize, StartTransaction, Charging. Returns the id."""
        connector = self.connector(connector_id)
        self.advance(self.clock.now())
        connector.car = car
        connector.status = "Preparing"
        await self.send_status(connector_id)
        if not start:
            return None
        return await self.start_transaction(connector_id, car.id_tag)

    async def start_transaction(
        self, connector_id: int, id_tag: str, profile: dict[str, Any] | None = None
    ) -> int | None:
        """Authorize and start a transaction on a connector with a car (None if refused).

        `profile` (from a RemoteStartTransaction) is installed as the transaction's TxProfile
        as soon as the transaction has its id.
        """
        connector = self.connector(connector_id)
        auth = await self._call(call.Authorize(id_tag=id_tag))
        if auth.id_tag_info["status"] != "Accepted":
            return None
        self.advance(self.clock.now())
        now = self.clock.now()
        result = await self._call(
            call.StartTransaction(
                connector_id=connector_id,
                id_tag=id_tag,
                meter_start=int(connector.import_wh),
                timestamp=iso(now),
            )
        )
        if result.id_tag_info["status"] != "Accepted":
            return None
        connector.transaction_id = int(result.transaction_id)
        connector.tx_start = now
        if profile is not None:
            self.set_profile(connector_id, {**profile, "transaction_id": connector.transaction_id})
        connector.status = "Charging"
        self.ledger.append(
            {
                "event": "start",
                "transaction_id": connector.transaction_id,
                "connector_id": connector_id,
                "meter_wh": int(connector.import_wh),
                "at": now,
            }
        )
        await self.send_status(connector_id)
        return connector.transaction_id

    async def stop_transaction(self, connector_id: int, reason: str = "Local") -> None:
        """Stop the connector's transaction (its TxProfiles go)."""
        connector = self.connector(connector_id)
        if connector.transaction_id is None:
            return
        self.advance(self.clock.now())
        transaction_id = connector.transaction_id
        connector.transaction_id = None
        connector.tx_start = None
        connector.discharge = None
        self.store.end_transaction(connector_id)
        now = self.clock.now()
        self.ledger.append(
            {
                "event": "stop",
                "transaction_id": transaction_id,
                "connector_id": connector_id,
                "meter_wh": int(connector.import_wh),
                "at": now,
            }
        )
        await self._call(
            call.StopTransaction(
                meter_stop=int(connector.import_wh),
                timestamp=iso(now),
                transaction_id=transaction_id,
                reason=reason,
            )
        )

    async def unplug(self, connector_id: int) -> None:
        """The car leaves: StopTransaction (EVDisconnected), then Available."""
        connector = self.connector(connector_id)
        await self.stop_transaction(connector_id, "EVDisconnected")
        connector.car = None
        connector.status = "Available"
        await self.send_status(connector_id)

    async def send_meter_values(self, connector_ids: set[int] | None = None) -> None:
        """MeterValues now, for every connector with a running transaction (of those in
        `connector_ids`, when given)."""
        now = self.clock.now()
        self.advance(now)
        powers = self.powers_kw(now)
        for connector in self.connectors:
            if connector.transaction_id is None:
                continue
            if connector_ids is not None and connector.connector_id not in connector_ids:
                continue
            power = powers[connector.connector_id]
            samples: list[dict[str, str]] = [
                {
                    "value": f"{connector.import_wh:.1f}",
                    "context": "Sample.Periodic",
                    "measurand": "Energy.Active.Import.Register",
                    "unit": "Wh",
                },
                {
                    "value": f"{max(power, 0.0) * 1000.0:.1f}",
                    "context": "Sample.Periodic",
                    "measurand": "Power.Active.Import",
                    "unit": "W",
                },
            ]
            if self.spec.v2g_mode != "none":
                samples.append(
                    {
                        "value": f"{max(-power, 0.0) * 1000.0:.1f}",
                        "context": "Sample.Periodic",
                        "measurand": "Power.Active.Export",
                        "unit": "W",
                    }
                )
            if connector.car is not None:
                samples.append(
                    {
                        "value": f"{connector.car.soc * 100.0:.1f}",
                        "context": "Sample.Periodic",
                        "measurand": "SoC",
                        "unit": "Percent",
                        "location": "EV",
                    }
                )
            await self._call(
                call.MeterValues(
                    connector_id=connector.connector_id,
                    transaction_id=connector.transaction_id,
                    meter_value=[{"timestamp": iso(now), "sampledValue": samples}],
                )
            )

    async def drop(self) -> None:
        """Lose the connection without a close frame; `run` reconnects after its back-off."""
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    async def send_raw(self, text: str | bytes) -> None:
        """Send a frame as it is (garbage, for fault injection)."""
        if self._ws is None:
            raise NotOnline(f"{self.spec.charger_id} is not connected")
        await self._ws.send(text)

    # -- physics --

    def limit_kw(self, connector: SimConnector, at: datetime) -> float:
        """The profiles' combined limit for a connector (kW; negative: discharge), capped by
        the hardware; the hardware's limit if no profile is in force or profiles are ignored."""
        hardware = self.spec.max_power_kw
        if self.faults.ignore_profiles:
            return hardware
        limit_w = self.store.connector_limit_w(
            connector.connector_id,
            at,
            transaction_id=connector.transaction_id,
            tx_start=connector.tx_start,
        )
        return hardware if limit_w is None else min(limit_w / 1000.0, hardware)

    def _discharge_kw(self, connector: SimConnector, at: datetime) -> float:
        if connector.discharge is None or self.faults.ignore_profiles:
            return 0.0
        start, offsets, limits = connector.discharge
        offset = (at - start).total_seconds()
        if offset < 0:
            return 0.0
        return limits[max(0, bisect.bisect_right(offsets, offset) - 1)] / 1000.0

    def _connector_kw(self, connector: SimConnector, at: datetime) -> float:
        car = connector.car
        if car is None or connector.transaction_id is None:
            return 0.0
        floor = self.spec.min_power_kw - 1e-6
        wanted_out = self._discharge_kw(connector, at)
        limit = self.limit_kw(connector, at)
        if limit < 0.0:
            wanted_out = max(wanted_out, -limit)
        if wanted_out > 0.0:
            out = min(wanted_out, car.discharge_kw(), self.spec.max_power_kw)
            return -out if out >= floor else 0.0
        if limit < floor:
            return 0.0  # below the minimum current the car is not offered anything
        return min(limit, car.acceptance_kw())

    def powers_kw(self, at: datetime) -> dict[int, float]:
        """Each connector's power at `at`; the ChargePointMaxProfile caps their sum."""
        powers = {c.connector_id: self._connector_kw(c, at) for c in self.connectors}
        cap_w = None if self.faults.ignore_profiles else self.store.charger_cap_w(at)
        drawn = sum(p for p in powers.values() if p > 0)
        if cap_w is not None and drawn > cap_w / 1000.0 and drawn > 0:
            scale = max(0.0, cap_w / 1000.0) / drawn
            powers = {k: (p * scale if p > 0 else p) for k, p in powers.items()}
        return powers

    def _breakpoints(self, begin: datetime, end: datetime) -> list[datetime]:
        times = set()
        for connector in self.connectors:
            times.update(self.store.breakpoints(begin, end, connector.tx_start))
            if connector.discharge is not None:
                start, offsets, _ = connector.discharge
                times.update(
                    start + timedelta(seconds=o)
                    for o in offsets
                    if begin <= start + timedelta(seconds=o) < end
                )
        return sorted(times)

    def advance(self, to: datetime) -> None:
        """Run the meters and the cars from the last time to `to`, piecewise."""
        t = self._t
        if to <= t:
            return
        edges = [b for b in self._breakpoints(t, to) if b > t]
        while t < to:
            while edges and edges[0] <= t:
                edges.pop(0)
            step_end = min(to, t + MAX_STEP, edges[0] if edges else to)
            hours = (step_end - t).total_seconds() / 3600.0
            for connector_id, power in self.powers_kw(t).items():
                connector = self.connector(connector_id)
                if power > 0:
                    connector.import_wh += power * hours * 1000.0
                elif power < 0:
                    connector.export_wh += -power * hours * 1000.0
                if connector.car is not None and power != 0.0:
                    connector.car.flow(power, hours)
            t = step_end
        self._t = to

    # -- CS -> CP, called by the wire's handlers --

    async def reply_delay(self) -> None:
        """Wait the injected reply delay (on the clock)."""
        if self.faults.reply_delay_s > 0:
            await self.clock.sleep_until(
                self.clock.now() + timedelta(seconds=self.faults.reply_delay_s)
            )

    def running(self) -> dict[int, int]:
        """Connector id -> running transaction id."""
        return {
            c.connector_id: c.transaction_id
            for c in self.connectors
            if c.transaction_id is not None
        }

    def refuses(self, raw: dict[str, Any]) -> bool:
        """Whether a field fault makes the charger refuse this profile (stack level, unit,
        purpose)."""
        faults = self.faults
        purpose = str(raw.get("charging_profile_purpose", raw.get("chargingProfilePurpose")))
        level = raw.get("stack_level", raw.get("stackLevel"))
        schedule = raw.get("charging_schedule", raw.get("chargingSchedule")) or {}
        unit = schedule.get("charging_rate_unit", schedule.get("chargingRateUnit"))
        return (
            level in faults.refused_stack_levels
            or (faults.units is not None and unit is not None and str(unit) not in faults.units)
            or purpose in faults.unsupported_purposes
        )

    def profile_arrived(self, connector_id: int, raw: dict[str, Any]) -> None:
        """A SetChargingProfile has arrived, before any reply delay and before it is
        installed (a hook for tests that check what is in flight; nothing here)."""

    def set_profile(self, connector_id: int, raw: dict[str, Any]) -> str:
        """Install a profile; returns Accepted or Rejected."""
        now = self.clock.now()
        purpose = str(raw.get("charging_profile_purpose", raw.get("chargingProfilePurpose")))
        if self.faults.reject_profiles or self.refuses(raw):
            status = "Rejected"
        elif self.faults.ignore_profiles:
            status = "Accepted"
        else:
            self.advance(now)
            try:
                self.store.install(parse_profile(connector_id, raw), self.running())
                status = "Accepted"
            except (ProfileRejected, KeyError, TypeError, ValueError) as exc:
                log.info("%s: profile rejected: %s", self.spec.charger_id, exc)
                status = "Rejected"
        self.received.append(Received(now, connector_id, purpose, status, raw))
        self._touch()
        return status

    def set_discharge(self, data: str | None) -> str:
        """A `DischargeLimit` DataTransfer; returns the DataTransfer status."""
        if self.spec.v2g_mode != "data_transfer":
            return "UnknownMessageId"
        try:
            body = json.loads(data or "")
            connector = self.connector(int(body["connectorId"]))
            if connector.transaction_id is None or body.get("transactionId") not in (
                None,
                connector.transaction_id,
            ):
                return "Rejected"
            start = datetime.fromisoformat(body["startSchedule"]).astimezone(UTC)
            per_w = (
                1.0 if body["chargingRateUnit"] == "W" else self.spec.voltage_v * self.spec.phases
            )
            periods = body["chargingSchedulePeriod"]
            offsets = tuple(int(p["startPeriod"]) for p in periods)
            limits = tuple(max(0.0, float(p["limit"])) * per_w for p in periods)
        except (ValueError, KeyError, TypeError, IndexError):
            return "Rejected"
        if not offsets or offsets[0] != 0:
            return "Rejected"
        if not self.faults.ignore_profiles:
            self.advance(self.clock.now())
            connector.discharge = (start, offsets, limits)
        self._touch()
        return "Accepted"

    def composite(self, connector_id: int, duration_s: int, unit: str | None) -> dict[str, Any]:
        """The GetCompositeSchedule answer for a connector from now on."""
        now = self.clock.now()
        unit = unit or self.spec.rate_unit
        per_unit = 1.0 if unit == "W" else self.spec.voltage_v * self.spec.phases
        end = now + timedelta(seconds=duration_s)
        connector = self.connector(connector_id) if connector_id > 0 else None
        tx_start = connector.tx_start if connector is not None else None
        periods: list[dict[str, Any]] = []
        for at in self.store.breakpoints(now, end, tx_start):
            limit_w = self.store.connector_limit_w(
                connector_id,
                at,
                transaction_id=connector.transaction_id if connector is not None else None,
                tx_start=tx_start,
            )
            if limit_w is None:
                limit_w = self.spec.max_power_kw * 1000.0
            limit = round(limit_w / per_unit, 1)
            if periods and periods[-1]["limit"] == limit:
                continue
            periods.append({"startPeriod": int((at - now).total_seconds()), "limit": limit})
        return {
            "status": "Accepted",
            "connector_id": connector_id,
            "schedule_start": iso(now),
            "charging_schedule": {
                "duration": duration_s,
                "startSchedule": iso(now),
                "chargingRateUnit": unit,
                "chargingSchedulePeriod": periods,
            },
        }


def _allowed_units(native: RateUnit, units: frozenset[str] | None) -> str:
    """`ChargingScheduleAllowedChargingRateUnit` as a charger reports it: its native unit first,
    then the other if it takes that too (None: its native unit only)."""
    names = {"W": "Power", "A": "Current"}
    if units is None:
        return names[native]
    order = [native, *(u for u in ("A", "W") if u != native)]
    return ",".join(names[u] for u in order if u in units) or names[native]


def call_subprotocol() -> Any:
    """The OCPP 1.6-J WebSocket subprotocol."""
    from websockets.typing import Subprotocol

    return Subprotocol("ocpp1.6")


TriggerKind = Literal["BootNotification", "Heartbeat", "MeterValues", "StatusNotification"]


class _Wire(LibraryChargePoint):  # type: ignore[misc]  # the library is untyped
    """One connection's OCPP router; the charger's state lives in `SimChargePoint`."""

    def __init__(self, charger_id: str, ws: ClientConnection, sim: SimChargePoint) -> None:
        super().__init__(charger_id, ws, response_timeout=30)
        self.sim = sim
        self._after: list[Callable[[], Any]] = []

    async def start(self) -> None:
        """The library's read loop, except that each CALL is handled in its own task, so a
        delayed reply (fault injection) does not hold up the answers to the charger's own
        CALLs. The central system has one CALL in flight at a time, so answers keep order."""
        handling: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await self._connection.recv()
                if isinstance(message, str) and message.lstrip().startswith("[2"):
                    sim = self.sim
                    sim.cs_calls_in_flight += 1
                    sim.max_cs_calls_in_flight = max(
                        sim.max_cs_calls_in_flight, sim.cs_calls_in_flight
                    )
                    task = asyncio.ensure_future(self.route_message(message))
                    handling.add(task)
                    task.add_done_callback(handling.discard)
                else:
                    await self.route_message(message)
        finally:
            for task in list(handling):
                task.cancel()

    async def _send(self, message: str) -> None:
        """Send a frame; an answer (CALLRESULT or CALLERROR) ends a central system's CALL. A
        CALL of ours stamps `sim.call_sent_at` (its round trip on the wire starts there, after
        any wait for the one call in flight before it). An answer wakes `sim.wait_for`: its
        handler has changed what the charger holds (a configuration key, a cleared profile),
        which no CALL of the charger's own would announce."""
        head = message.lstrip()
        answer = head.startswith(("[3", "[4"))
        if answer:
            self.sim.cs_calls_in_flight = max(0, self.sim.cs_calls_in_flight - 1)
        elif head.startswith("[2"):
            self.sim.call_sent_at = time.perf_counter()
        try:
            await super()._send(message)
        finally:
            if answer:
                self.sim._touch()

    async def _run_after(self) -> None:
        """Run the jobs an answer left (triggered messages, remote starts and stops). The
        library runs this as a task nobody awaits, so a job that gets a CALLERROR or no
        answer is counted in the fleet's errors (`after_<error>`) rather than raised."""
        jobs, self._after = self._after, []
        for job in jobs:
            try:
                await job()
            except (NotOnline, ConnectionClosed):
                return
            except (OCPPError, TimeoutError) as exc:
                self.sim.stats.errors[f"after_{type(exc).__name__}"] += 1
                return

    @_on(Action.set_charging_profile)
    async def on_set_charging_profile(
        self, connector_id: int, cs_charging_profiles: dict[str, Any], **_: Any
    ) -> call_result.SetChargingProfile:
        """SetChargingProfile: install by the stacking rules (or a fault's answer)."""
        self.sim.profile_arrived(connector_id, cs_charging_profiles)
        self.sim._touch()  # an arrival is something received: `wait_for` looks again
        await self.sim.reply_delay()
        code = self.sim.faults.profile_callerror
        if code is not None:
            self.sim.received.append(
                Received(
                    self.sim.clock.now(),
                    connector_id,
                    str(cs_charging_profiles.get("charging_profile_purpose")),
                    code,
                    cs_charging_profiles,
                )
            )
            self.sim._touch()
            raise _CALLERRORS[code](f"SetChargingProfile: {code} (injected fault)")
        return call_result.SetChargingProfile(
            status=self.sim.set_profile(connector_id, cs_charging_profiles)
        )

    @_on(Action.clear_charging_profile)
    async def on_clear_charging_profile(
        self,
        id: int | None = None,
        connector_id: int | None = None,
        charging_profile_purpose: str | None = None,
        stack_level: int | None = None,
        **_: Any,
    ) -> call_result.ClearChargingProfile:
        """ClearChargingProfile: Accepted if something matched, else Unknown."""
        await self.sim.reply_delay()
        self.sim.advance(self.sim.clock.now())
        removed = self.sim.store.clear(id, connector_id, charging_profile_purpose, stack_level)
        return call_result.ClearChargingProfile(status="Accepted" if removed else "Unknown")

    @_on(Action.get_composite_schedule)
    async def on_get_composite_schedule(
        self, connector_id: int, duration: int, charging_rate_unit: str | None = None, **_: Any
    ) -> call_result.GetCompositeSchedule:
        """GetCompositeSchedule from what is installed."""
        await self.sim.reply_delay()
        if not 0 <= connector_id <= self.sim.spec.connectors:
            return call_result.GetCompositeSchedule(status="Rejected")
        answer = self.sim.composite(connector_id, duration, charging_rate_unit)
        return call_result.GetCompositeSchedule(**answer)

    @_on(Action.remote_start_transaction)
    async def on_remote_start_transaction(
        self,
        id_tag: str,
        connector_id: int | None = None,
        charging_profile: dict[str, Any] | None = None,
        **_: Any,
    ) -> call_result.RemoteStartTransaction:
        """RemoteStartTransaction on a connector with a car and no transaction."""
        await self.sim.reply_delay()
        candidates = [
            c
            for c in self.sim.connectors
            if c.car is not None
            and c.transaction_id is None
            and connector_id in (None, c.connector_id)
        ]
        if not candidates:
            return call_result.RemoteStartTransaction(status="Rejected")
        chosen = candidates[0].connector_id

        async def start() -> None:
            """Start the transaction."""
            await self.sim.start_transaction(chosen, id_tag, charging_profile)

        self._after.append(start)
        return call_result.RemoteStartTransaction(status="Accepted")

    @_after(Action.remote_start_transaction)
    async def after_remote_start_transaction(self, **_: Any) -> None:
        """Start the transaction once the answer is out."""
        await self._run_after()

    @_on(Action.remote_stop_transaction)
    async def on_remote_stop_transaction(
        self, transaction_id: int, **_: Any
    ) -> call_result.RemoteStopTransaction:
        """RemoteStopTransaction of a running transaction."""
        await self.sim.reply_delay()
        match = [c for c in self.sim.connectors if c.transaction_id == transaction_id]
        if not match:
            return call_result.RemoteStopTransaction(status="Rejected")
        connector_id = match[0].connector_id

        async def stop() -> None:
            """Stop the transaction."""
            await self.sim.stop_transaction(connector_id, "Remote")

        self._after.append(stop)
        return call_result.RemoteStopTransaction(status="Accepted")

    @_after(Action.remote_stop_transaction)
    async def after_remote_stop_transaction(self, **_: Any) -> None:
        """Stop the transaction once the answer is out."""
        await self._run_after()

    @_on(Action.trigger_message)
    async def on_trigger_message(
        self, requested_message: str, connector_id: int | None = None, **_: Any
    ) -> call_result.TriggerMessage:
        """TriggerMessage for Boot, Heartbeat, MeterValues or StatusNotification."""
        await self.sim.reply_delay()
        sim = self.sim
        jobs: dict[str, Callable[[], Any]] = {
            "BootNotification": lambda: sim._call(
                call.BootNotification(
                    charge_point_model=sim.spec.model, charge_point_vendor=sim.spec.vendor
                )
            ),
            "Heartbeat": lambda: sim._call(call.Heartbeat()),
            "MeterValues": sim.send_meter_values,
            "StatusNotification": lambda: _statuses(sim, connector_id),
        }
        job = jobs.get(requested_message)
        if job is None:
            return call_result.TriggerMessage(status="NotImplemented")
        self._after.append(job)
        return call_result.TriggerMessage(status="Accepted")

    @_after(Action.trigger_message)
    async def after_trigger_message(self, **_: Any) -> None:
        """Send the triggered message once the answer is out."""
        await self._run_after()

    @_on(Action.change_configuration)
    async def on_change_configuration(
        self, key: str, value: str, **_: Any
    ) -> call_result.ChangeConfiguration:
        """ChangeConfiguration: writable keys only."""
        await self.sim.reply_delay()
        if key not in self.sim.configuration and key not in self.sim.writable:
            status = "NotSupported"
        elif key not in self.sim.writable or (
            key in ("HeartbeatInterval", "MeterValueSampleInterval") and not value.isdigit()
        ):
            status = "Rejected"
        else:
            if key != "AuthorizationKey":  # write-only: never read back
                self.sim.configuration[key] = value
            else:
                self.sim.authorization_key = value  # used from the next connection on
            status = "Accepted"
        return call_result.ChangeConfiguration(status=status)

    @_on(Action.get_configuration)
    async def on_get_configuration(
        self, key: list[str] | None = None, **_: Any
    ) -> call_result.GetConfiguration:
        """GetConfiguration: the keys asked for (all without a list), unknown ones apart."""
        await self.sim.reply_delay()
        config = self.sim.configuration
        names = key if key else sorted(config)
        known = [
            {"key": k, "readonly": k not in self.sim.writable, "value": config[k]}
            for k in names
            if k in config
        ]
        unknown = [k for k in names if k not in config]
        return call_result.GetConfiguration(configuration_key=known, unknown_key=unknown or None)

    @_on(Action.data_transfer)
    async def on_data_transfer(
        self, vendor_id: str, message_id: str | None = None, data: str | None = None, **_: Any
    ) -> call_result.DataTransfer:
        """DataTransfer: voltpool's DischargeLimit (data_transfer V2G), else unknown."""
        await self.sim.reply_delay()
        if vendor_id != VENDOR:
            status = "UnknownVendorId"
        elif message_id != DISCHARGE_MESSAGE:
            status = "UnknownMessageId"
        else:
            status = self.sim.set_discharge(data)
        return call_result.DataTransfer(status=status)


async def _statuses(sim: SimChargePoint, connector_id: int | None) -> None:
    ids = (
        [connector_id]
        if connector_id is not None
        else [0, *(c.connector_id for c in sim.connectors)]
    )
    for cid in ids:
        await sim.send_status(cid)
