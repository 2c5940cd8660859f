"""The central system's transaction book in Redis: ids handed out once, replays recognised,
every meter sample of a transaction stored once and read back in source-time order.

Transaction ids come from a Redis counter (`INCR`), so they are unique and survive restarts; the
content of a StartTransaction (charger, connector, timestamp, meterStart) is remembered with its
id, so a charge point that re-sends a StartTransaction whose answer it lost gets the same id
(RELIABILITY T-03). Allocation is one Lua script: atomic, one round trip.

The sample ledger (RELIABILITY T-01, T-02, T-05): each sampled value of a transaction's
MeterValues and StopTransaction `transactionData` is kept under its identity (timestamp,
connector, measurand, phase, location), written with HSETNX, so a sample a charge point re-sends
(its answer lost, an offline queue replayed twice) is stored once. Reading sorts by the
charge point's timestamp, not by arrival. At the stop, `summarise` derives the session's energy
from the energy registers (meterStop - meterStart, never from counting samples) and flags gaps
in the readings (a charge point that dropped queued samples) and anomalies (a register that went
down, a stop stamped before its start).
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from adapters import redis_keys as keys
from adapters.group_commit import GroupCommit
from adapters.ocpp.aio import redis_call
from adapters.ocpp.frames import parse_decimal
from adapters.ocpp.translate import iso, timestamp
from controller.domain import ChargerId, ConnectorId, TransactionId, VehicleId

# KEYS: book hash, id counter. ARGV: start field, record JSON, connector field.
# Returns {id, 1 if new, the connector's previous transaction id if it has not stopped, or 0}.
ALLOCATE_LUA = """
local known = redis.call('HGET', KEYS[1], ARGV[1])
if known then return {tonumber(known), 0, 0} end
local previous = tonumber(redis.call('HGET', KEYS[1], ARGV[3]) or '0')
if previous ~= 0 then
  local raw = redis.call('HGET', KEYS[1], 'tx:' .. previous)
  local ok, record = pcall(cjson.decode, raw or '')
  if ok and type(record) == 'table' and record['stopped'] == true then previous = 0 end
end
local id = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], id, 'tx:' .. id, ARGV[2], ARGV[3], id)
return {id, 1, previous}
"""

# KEYS: book hash, the transaction's sample hash. ARGV: 'tx:{id}', ttl s, field, value, ...
# Returns how many samples were new, or -1 when the book has no such transaction.
SAMPLES_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
local new = 0
for i = 3, #ARGV, 2 do
  new = new + redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return new
"""

# KEYS: book hash, the transaction's sample hash. ARGV: 'tx:{id}'.
# Returns {} for an unknown transaction, {record JSON} for a stopped one, else {record JSON,
# the ledger as HGETALL returns it}: a stop reads both at once, a repeated stop not the ledger.
VIEW_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {} end
local ok, record = pcall(cjson.decode, raw)
if ok and type(record) == 'table' and record['stopped'] == true then return {raw} end
return {raw, redis.call('HGETALL', KEYS[2])}
"""

# KEYS: book hash. ARGV: 'conn:{charger}:{connector}'.
# Returns {id, record JSON or false}, or false when the connector never had a transaction.
LATEST_LUA = """
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return false end
return {id, redis.call('HGET', KEYS[1], 'tx:' .. id)}
"""

SAMPLES_TTL_S = 7 * 86_400  # while the transaction runs (refreshed by every write)
SETTLED_SAMPLES_TTL_S = 86_400  # after its stop: the settlement is in the book record
DEFAULT_MEASURAND = "Energy.Active.Import.Register"  # OCPP 1.6 defaults of SampledValue
DEFAULT_LOCATION = "Outlet"
_WH_PER = {"Wh": 1.0, "kWh": 1000.0}


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredSample:
    """One sampled value of a transaction as the charge point sent it."""

    at: datetime
    connector_id: ConnectorId
    measurand: str
    phase: str | None
    location: str
    value: str  # as sent (signed data too)
    unit: str | None = None
    context: str | None = None

    @property
    def register_wh(self) -> float | None:
        """The reading in Wh if this is the connector's total import register, else None."""
        if (
            self.measurand != DEFAULT_MEASURAND
            or self.phase is not None
            or self.location != DEFAULT_LOCATION
        ):
            return None
        number = parse_decimal(self.value)
        if number is None:
            return None
        return number * _WH_PER.get(self.unit or "Wh", 1.0)


def ledger_measurand(measurand: str) -> bool:
    """The default of what the ledger keeps: energy registers (what a session is billed and
    settled on) and SoC. Powers, currents and voltages are left out: at about 150 bytes a
    sample in Redis they would triple its memory and settle nothing."""
    return measurand.endswith(".Register") or measurand == "SoC"


def sample_rows(
    connector_id: ConnectorId,
    meter_value: Sequence[Mapping[str, Any]],
    keep: Callable[[str], bool] = ledger_measurand,
) -> list[tuple[str, str]]:
    """(identity field, JSON) per kept sampled value of a MeterValues / transactionData list.

    The identity is (timestamp as UTC, connector, measurand, phase, location) with the OCPP
    defaults filled in, so the same reading written with or without its defaults, or with
    another time-zone offset, is one sample. Entries come as the library hands them over
    (snake_case keys); the frame checker has validated them.
    """
    rows: dict[str, str] = {}
    for entry in meter_value:
        at = iso(timestamp(str(entry["timestamp"])))
        for sample in entry.get("sampled_value") or entry.get("sampledValue") or []:
            measurand = sample.get("measurand") or DEFAULT_MEASURAND
            if not keep(measurand):
                continue
            phase = sample.get("phase")
            location = sample.get("location") or DEFAULT_LOCATION
            key = f"{at}|{connector_id}|{measurand}|{phase or ''}|{location}"
            body = {"value": str(sample.get("value", ""))}
            for name in ("unit", "context"):
                if sample.get(name) is not None:
                    body[name] = str(sample[name])
            rows.setdefault(key, json.dumps(body, separators=(",", ":")))
    return list(rows.items())


def parse_row(key: str, raw: str) -> StoredSample:
    """A stored sample from its hash field and value."""
    at, connector, measurand, phase, location = key.split("|")
    body = json.loads(raw)
    return StoredSample(
        at=timestamp(at),
        connector_id=int(connector),
        measurand=measurand,
        phase=phase or None,
        location=location,
        value=str(body["value"]),
        unit=body.get("unit"),
        context=body.get("context"),
    )


@dataclass(frozen=True, slots=True)
class Gap:
    """Two consecutive register readings further apart than the session's cadence explains."""

    start: datetime
    end: datetime
    energy_wh: float  # the register difference across the gap

    def to_json(self) -> list[Any]:
        """[start, end, energy Wh] as stored in the book."""
        return [iso(self.start), iso(self.end), self.energy_wh]


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSummary:
    """What a stop settles: when, the registers, the energy, gaps and anomalies.

    `stopped_at` and `meter_stop_wh` are the values the central system reports: the charge
    point's own unless they contradict the start (then the last reading, and an anomaly).
    """

    stopped_at: datetime
    meter_start_wh: float
    meter_stop_wh: float
    reported_stop_wh: float
    samples: int
    readings: int
    gaps: tuple[Gap, ...] = ()
    anomalies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.meter_stop_wh < self.meter_start_wh:
            raise ValueError("a session summary never has a stop register below its start")

    @property
    def energy_wh(self) -> float:
        """Energy delivered, from the registers."""
        return self.meter_stop_wh - self.meter_start_wh

    @property
    def gap_flagged(self) -> bool:
        """Whether readings are missing somewhere in the session."""
        return bool(self.gaps)


def summarise(
    started_at: datetime,
    meter_start_wh: float,
    samples: Sequence[StoredSample],
    *,
    stopped_at: datetime,
    meter_stop_wh: float,
    gap_factor: float = 3.0,
    min_gap_s: float = 300.0,
) -> SessionSummary:
    """Settle a session from its start, its stored samples and the charge point's stop.

    Energy is meterStop - meterStart. A gap is an interval between consecutive register
    readings (start and stop included) longer than both `min_gap_s` and `gap_factor` times the
    median interval. A stop stamped before the start, or a stop register below the start
    register (a charge point that lost its clock or its register in a power failure), is
    replaced by the last reading (or the start) and recorded as an anomaly, so the session is
    closed rather than left open.
    """
    anomalies: list[str] = []
    readings = sorted(
        (s.at, r) for s in samples if (r := s.register_wh) is not None and s.at >= started_at
    )
    for (t0, r0), (_, r1) in itertools.pairwise(readings):
        if r1 < r0:
            anomalies.append(f"register went down from {r0:g} Wh at {iso(t0)} to {r1:g} Wh")
    last_at, last_wh = readings[-1] if readings else (started_at, meter_start_wh)
    stop_at, stop_wh = stopped_at, meter_stop_wh
    if stop_at < started_at:
        anomalies.append(f"stop stamped {iso(stopped_at)}, before the start {iso(started_at)}")
        stop_at = max(last_at, started_at)
    if stop_wh < meter_start_wh:
        anomalies.append(f"meterStop {meter_stop_wh:g} Wh is below meterStart {meter_start_wh:g}")
        stop_wh = max(last_wh, meter_start_wh)
    points = [(started_at, meter_start_wh), *readings, (stop_at, stop_wh)]
    points.sort(key=lambda p: p[0])
    steps = [(a, b) for a, b in itertools.pairwise(points) if b[0] > a[0]]
    gaps: list[Gap] = []
    if steps:
        typical = statistics.median((b[0] - a[0]).total_seconds() for a, b in steps)
        limit = max(min_gap_s, gap_factor * typical)
        gaps = [
            Gap(a[0], b[0], b[1] - a[1]) for a, b in steps if (b[0] - a[0]).total_seconds() > limit
        ]
    return SessionSummary(
        stopped_at=stop_at,
        meter_start_wh=meter_start_wh,
        meter_stop_wh=stop_wh,
        reported_stop_wh=meter_stop_wh,
        samples=len(samples),
        readings=len(readings),
        gaps=tuple(gaps),
        anomalies=tuple(anomalies),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class BookedTransaction:
    """What the central system remembers of a transaction it handed an id to."""

    charger_id: ChargerId
    connector_id: ConnectorId
    id_tag: str
    started_at: str
    meter_start_wh: int
    vehicle_id: VehicleId | None = None
    stopped: bool = False
    unplugged: bool = False
    # Settled at the stop (absent in records written before the sample ledger existed).
    stopped_at: str | None = None
    meter_stop_wh: float | None = None
    energy_wh: float | None = None
    stop_reason: str | None = None
    gaps: list[list[Any]] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a script's integer reply
    return value if isinstance(value, str) else None


def _in_time_order(ledger: Mapping[Any, Any]) -> list[StoredSample]:
    """Parsed ledger rows, in the order of their source timestamps."""
    rows = [parse_row(_text(k) or "", _text(v) or "") for k, v in ledger.items()]
    rows.sort(key=lambda s: (s.at, s.connector_id, s.measurand, s.phase or "", s.location))
    return rows


class TransactionBook:
    """Transaction ids and records of one site, in the hash `redis_keys.ocpp_transactions`, and
    the sample ledger of each transaction (`redis_keys.transaction_samples`).

    The ledger keeps the measurands `keep_measurand` accepts (energy registers and SoC by
    default). Samples are kept `samples_ttl_s` after their last write while the transaction runs and
    `settled_samples_ttl_s` after its stop (its energy, gaps and anomalies stay in the book
    record); export them before that if they are needed for billing.
    """

    def __init__(
        self,
        redis: Redis,
        site: str,
        *,
        samples_ttl_s: int = SAMPLES_TTL_S,
        settled_samples_ttl_s: int = SETTLED_SAMPLES_TTL_S,
        keep_measurand: Callable[[str], bool] = ledger_measurand,
        commits: Redis | None = None,
    ) -> None:
        if samples_ttl_s < 1 or settled_samples_ttl_s < 1:
            raise ValueError("sample retention must be at least one second")
        self._samples_ttl_s = samples_ttl_s
        self._keep = keep_measurand
        self._settled_ttl_s = settled_samples_ttl_s
        self._redis = redis
        self._site = site
        self._book = keys.ocpp_transactions(site)
        self._seq = keys.transaction_seq(site)
        self._allocate = redis.register_script(ALLOCATE_LUA)
        self._add_samples = redis.register_script(SAMPLES_LUA)
        self._latest = redis.register_script(LATEST_LUA)
        self._view = redis.register_script(VIEW_LUA)
        # MeterValues' ledger writes that arrive while a pipeline of them is in flight go
        # together in the next one (each its own idempotent script, answered on its own), on
        # `commits`, a client of their own when given (see `RedisFleetStore`).
        self._ledger = GroupCommit(commits or redis)

    async def start(self, record: BookedTransaction) -> tuple[TransactionId, bool]:
        """The id for this start: a new one, or the one a replay of it got (then False)."""
        transaction_id, new, _previous = await self.allocate(record)
        return transaction_id, new

    async def allocate(
        self, record: BookedTransaction
    ) -> tuple[TransactionId, bool, TransactionId | None]:
        """(id, new, the transaction the connector had before if it never stopped) for this
        start (the script reads the previous record's `stopped`, so the usual start after a
        stop costs no further read).

        A replayed start gets its first id, `new` False and no previous transaction.
        """
        start_field = (
            f"start:{record.charger_id}:{record.connector_id}:{record.started_at}:"
            f"{record.meter_start_wh}"
        )
        conn_field = f"conn:{record.charger_id}:{record.connector_id}"
        result = await self._allocate(
            keys=[self._book, self._seq],
            args=[start_field, json.dumps(asdict(record)), conn_field],
        )
        previous = int(result[2])
        return int(result[0]), bool(int(result[1])), previous or None

    async def record_samples(
        self,
        transaction_id: TransactionId,
        connector_id: ConnectorId,
        meter_value: Sequence[Mapping[str, Any]],
        *,
        settled: bool = False,
    ) -> int | None:
        """Store each sampled value once; how many were new, or None for an unknown id.

        Answered once the server has the write; writes that arrive while another is in flight
        share the next pipeline (`adapters.group_commit`). A refused write raises its own
        error (a `redis.exceptions.RedisError`) to its own caller only.

        `settled`: the transaction has stopped (a repeated stop): the ledger keeps the shorter
        retention of a settled transaction."""
        rows = sample_rows(connector_id, meter_value, self._keep)
        if not rows:
            return 0
        ttl_s = self._settled_ttl_s if settled else self._samples_ttl_s
        args: list[str | int] = [f"tx:{transaction_id}", ttl_s]
        for key, value in rows:
            args.extend((key, value))
        script_keys = [self._book, keys.transaction_samples(self._site, transaction_id)]
        # Group-committed with the other writes of this pass of the loop (one pipeline, one
        # connection); the script's own answer comes back to this caller only.
        sent = ("EVALSHA", self._add_samples.sha, len(script_keys), *script_keys, *args)
        reply = (await self._ledger.send([sent]))[0]
        if isinstance(reply, NoScriptError):  # a restarted or flushed server: load it, once
            reply = await self._add_samples(keys=script_keys, args=args)
        elif isinstance(reply, Exception):
            raise reply
        new = int(reply)
        return None if new < 0 else new

    async def samples(self, transaction_id: TransactionId) -> list[StoredSample]:
        """The stored samples of a transaction, in the order of their source timestamps."""
        raw = await redis_call(
            self._redis.hgetall(keys.transaction_samples(self._site, transaction_id))
        )
        return _in_time_order(raw)

    async def view(
        self, transaction_id: TransactionId
    ) -> tuple[BookedTransaction | None, dict[str, str]]:
        """The record of a transaction and, unless it has stopped, its sample ledger as stored
        (field -> JSON; empty for a stopped one), in one round trip: a stop reads both (they
        were two reads, and a third inside `settle`); a repeated stop, which settles nothing,
        does not read a ledger of thousands of rows."""
        found = await self._view(
            keys=[self._book, keys.transaction_samples(self._site, transaction_id)],
            args=[f"tx:{transaction_id}"],
        )
        if not found:
            return None, {}
        record = BookedTransaction(**json.loads(_text(found[0]) or ""))
        flat = found[1] if len(found) > 1 else []
        ledger = {_text(flat[i]) or "": _text(flat[i + 1]) or "" for i in range(0, len(flat), 2)}
        return record, ledger

    def rows(
        self, connector_id: ConnectorId, meter_value: Sequence[Mapping[str, Any]]
    ) -> list[tuple[str, str]]:
        """The ledger rows (identity field, JSON) of a meterValue list, with this book's
        choice of measurands."""
        return sample_rows(connector_id, meter_value, self._keep)

    @staticmethod
    def ledger_after(
        ledger: Mapping[str, str], rows: Sequence[tuple[str, str]]
    ) -> list[StoredSample]:
        """The samples a ledger read by `view` holds once `rows` are written (the first write
        of an identity wins, as HSETNX does), in time order: a stop settles on them without
        reading the ledger again."""
        merged = dict(ledger)
        for key, value in rows:
            merged.setdefault(key, value)
        return _in_time_order(merged)

    async def settle(
        self,
        transaction_id: TransactionId,
        summary: SessionSummary,
        reason: str,
        *,
        record: BookedTransaction | None = None,
        rows: Sequence[tuple[str, str]] = (),
        unplugged: bool = False,
    ) -> BookedTransaction | None:
        """Mark a transaction stopped with what its stop settled; None if unknown.

        `record`: the transaction's record as just read (by `view`), so it is not read again.
        `rows`: ledger rows the stop carries (its transactionData), each written unless its
        identity is stored already (HSETNX). `unplugged`: the car left with the stop, so the
        record is marked unplugged in the same write (no later write of the flag). The rows,
        the settled record and the ledger's shorter expiry are written in one MULTI: all or
        nothing (a refused write, e.g. out of memory, aborts the whole transaction), one round
        trip."""
        if record is None:
            record = await self.get(transaction_id)
        if record is None:
            return None
        settled = replace(
            record,
            stopped=True,
            unplugged=record.unplugged or unplugged,
            stopped_at=iso(summary.stopped_at),
            meter_stop_wh=summary.meter_stop_wh,
            energy_wh=summary.energy_wh,
            stop_reason=reason,
            gaps=[g.to_json() for g in summary.gaps],
            anomalies=list(summary.anomalies),
        )
        await self.write_settled(transaction_id, settled, rows)
        return settled

    async def write_settled(
        self,
        transaction_id: TransactionId,
        record: BookedTransaction,
        rows: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Write a settled transaction's record as given, with `rows` added to its ledger
        (HSETNX: a stored identity keeps its first value) and the ledger's shorter expiry of a
        settled transaction, in one MULTI: all or nothing, one round trip. `settle` writes
        through it; a repeated stop that learns the car left writes the flag through it."""
        if not record.stopped:
            raise ValueError(f"transaction {transaction_id}: write_settled takes a stopped record")
        samples_key = keys.transaction_samples(self._site, transaction_id)
        pipe = self._redis.pipeline(transaction=True)
        for key, value in rows:
            pipe.hsetnx(samples_key, key, value)
        pipe.hset(self._book, f"tx:{transaction_id}", json.dumps(asdict(record)))
        pipe.expire(samples_key, self._settled_ttl_s)
        await pipe.execute()

    async def get(self, transaction_id: TransactionId) -> BookedTransaction | None:
        """The record of a transaction, or None if this book never handed out that id."""
        raw = _text(await redis_call(self._redis.hget(self._book, f"tx:{transaction_id}")))
        return BookedTransaction(**json.loads(raw)) if raw else None

    async def update(
        self,
        transaction_id: TransactionId,
        *,
        stopped: bool | None = None,
        unplugged: bool | None = None,
    ) -> BookedTransaction | None:
        """Mark a transaction stopped / its vehicle unplugged; None if unknown."""
        record = await self.get(transaction_id)
        if record is None:
            return None
        updated = replace(
            record,
            stopped=record.stopped if stopped is None else stopped,
            unplugged=record.unplugged if unplugged is None else unplugged,
        )
        await redis_call(
            self._redis.hset(self._book, f"tx:{transaction_id}", json.dumps(asdict(updated)))
        )
        return updated

    async def latest_on(
        self, charger_id: ChargerId, connector_id: ConnectorId
    ) -> tuple[TransactionId, BookedTransaction] | None:
        """The latest transaction on a connector (running or stopped), if any (one script:
        one round trip, where the connector's id and then its record were two)."""
        found = await self._latest(keys=[self._book], args=[f"conn:{charger_id}:{connector_id}"])
        if not found:
            return None
        raw_id, raw = _text(found[0]), _text(found[1])
        if raw_id is None or not raw:
            return None
        return int(raw_id), BookedTransaction(**json.loads(raw))

    async def open_on(
        self, charger_id: ChargerId, connector_ids: list[ConnectorId]
    ) -> dict[ConnectorId, TransactionId]:
        """The running transaction per connector, for the connectors given."""
        result: dict[ConnectorId, TransactionId] = {}
        for connector_id in connector_ids:
            latest = await self.latest_on(charger_id, connector_id)
            if latest is not None and not latest[1].stopped:
                result[connector_id] = latest[0]
        return result
