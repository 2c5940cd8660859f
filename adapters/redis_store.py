"""`FleetStore` on Redis: records in per-kind hashes, an event log as a Stream, atomic commits.

Key schema: `adapters.redis_keys` (documented in docs/architecture.md). The log is read through
the consumer group `controller`; an entry stays pending until `commit` or `reject` settles it,
so an event taken but not applied before a crash is taken again after the restart. `commit`
writes the records, remembers the event id and acknowledges the entry in one Lua script: it is
atomic, and a second delivery of an applied event id writes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from adapters import redis_keys as keys
from adapters.codec import decode_event, decode_record, encode_event, encode_record
from controller.errors import InvalidEvent, StoreUnavailable
from controller.events import Event
from controller.planning.plan import Plan
from controller.ports import LogEntry
from controller.state import Change, FleetState, Record, RecordKind

log = logging.getLogger(__name__)

# KEYS: applied zset, events stream, then one key per write.
# ARGV: group, entry id, event id, score (ms), oldest score kept, n writes, then op/field/value.
COMMIT_LUA = """
local applied, stream = KEYS[1], KEYS[2]
local group, entry, event_id, score = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('ZSCORE', applied, event_id) then
  redis.call('XACK', stream, group, entry)
  return 0
end
local a = 7
for i = 1, tonumber(ARGV[6]) do
  local key, op, field, value = KEYS[2 + i], ARGV[a], ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  if op == 'hset' then redis.call('HSET', key, field, value)
  elseif op == 'hdel' then redis.call('HDEL', key, field)
  elseif op == 'set' then redis.call('SET', key, value)
  elseif op == 'del' then redis.call('DEL', key)
  end
end
redis.call('ZADD', applied, score, event_id)
redis.call('ZREMRANGEBYSCORE', applied, '-inf', '(' .. ARGV[5])
redis.call('XACK', stream, group, entry)
return 1
"""

APPLIED_RETENTION_MS = 7 * 24 * 3600 * 1000  # event ids are remembered for a week
REJECTED_MAXLEN = 10_000
CONSUMER = "controller-1"


class RedisFleetStore:
    """`controller.ports.FleetStore` on a Redis server."""

    def __init__(self, redis: Redis, site: str, *, consumer: str = CONSUMER) -> None:
        self._redis = redis
        self._site = site
        self._consumer = consumer
        self._commit = redis.register_script(COMMIT_LUA)
        self._recovering = True  # read our own pending entries before new ones
        self._group_ready = False

    @property
    def redis(self) -> Redis:
        """The client this store uses."""
        return self._redis

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(
                keys.events(self._site), keys.EVENTS_GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def durability(self) -> dict[str, str]:
        """The server's persistence settings (`appendonly`, `appendfsync`)."""
        try:
            config = await self._redis.config_get("append*")
        except RedisError as exc:
            raise StoreUnavailable("redis unreachable reading its configuration") from exc
        return {str(k): str(v) for k, v in config.items()}

    async def load(self) -> FleetState:
        """Read every record of the site."""
        try:
            await self._ensure_group()
            pipe = self._redis.pipeline(transaction=True)
            for kind in keys.RECORD_TABLES:
                pipe.hgetall(keys.table(self._site, kind))
            for kind in keys.SINGLE_RECORDS:
                pipe.get(keys.single(self._site, kind))
            replies = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"redis unreachable loading site {self._site!r}") from exc
        changes: list[Change] = []
        for kind, rows in zip(keys.RECORD_TABLES, replies, strict=False):
            for key, payload in rows.items():
                changes.append(Change(kind, _text(key), self._decode(kind, payload)))  # type: ignore[arg-type]
        for kind, payload in zip(
            keys.SINGLE_RECORDS, replies[len(keys.RECORD_TABLES) :], strict=True
        ):
            if payload is not None:
                changes.append(Change(kind, kind, self._decode(kind, payload)))  # type: ignore[arg-type]
        return FleetState().with_changes(tuple(changes))

    def _decode(self, kind: RecordKind, payload: str | bytes) -> Record:
        return decode_record(kind, payload)

    async def append(self, event: Event) -> str:
        """Append to the log; the entry is durable as far as the server's AOF policy makes it."""
        try:
            await self._ensure_group()
            entry_id = await self._redis.xadd(
                keys.events(self._site), {"event": encode_event(event)}
            )
        except RedisError as exc:
            raise StoreUnavailable(f"redis unreachable appending {event.event_id}") from exc
        return _text(entry_id)

    async def take(self, count: int) -> Sequence[LogEntry]:
        """Entries to apply: our own unsettled ones first (after a crash), then new ones."""
        try:
            await self._ensure_group()
            stream = keys.events(self._site)
            if self._recovering:
                reply = await self._redis.xreadgroup(
                    keys.EVENTS_GROUP, self._consumer, {stream: "0"}, count=count
                )
                entries = _entries(reply)
                if entries:
                    return [self._entry(i, f, redelivered=True) for i, f in entries]
                self._recovering = False
            reply = await self._redis.xreadgroup(
                keys.EVENTS_GROUP, self._consumer, {stream: ">"}, count=count
            )
        except RedisError as exc:
            self._recovering = True
            raise StoreUnavailable("redis unreachable reading the event log") from exc
        return [self._entry(i, f) for i, f in _entries(reply)]

    def _entry(self, entry_id: Any, fields: Any, *, redelivered: bool = False) -> LogEntry:
        raw = _text(fields.get("event", fields.get(b"event", b""))) if fields else ""
        try:
            event: Event | None = decode_event(raw)
        except InvalidEvent as exc:
            log.error("undecodable log entry %s: %s", _text(entry_id), exc)
            event = None
        return LogEntry(_text(entry_id), event, raw, 2 if redelivered else 1)

    async def commit(self, entry: LogEntry, event_id: str, changes: Sequence[Change]) -> bool:
        """Write, remember the event id and acknowledge, in one atomic script."""
        write_keys: list[str] = []
        args: list[str] = []
        for change in changes:
            key, op, field, value = self._write_for(change)
            write_keys.append(key)
            args += [op, field, value]
        score = int(entry.entry_id.split("-")[0])
        try:
            result = await self._commit(
                keys=[keys.applied(self._site), keys.events(self._site), *write_keys],
                args=[
                    keys.EVENTS_GROUP,
                    entry.entry_id,
                    event_id,
                    str(score),
                    str(score - APPLIED_RETENTION_MS),
                    str(len(changes)),
                    *args,
                ],
            )
        except RedisError as exc:
            self._recovering = True
            raise StoreUnavailable(f"redis unreachable committing {event_id}") from exc
        return int(result) == 1

    def _write_for(self, change: Change) -> tuple[str, str, str, str]:
        if change.kind in keys.SINGLE_RECORDS:
            key = keys.single(self._site, change.kind)
            if change.record is None:
                return key, "del", "", ""
            return key, "set", "", encode_record(change.kind, change.record)
        key = keys.table(self._site, change.kind)
        if change.record is None:
            return key, "hdel", change.key, ""
        return key, "hset", change.key, encode_record(change.kind, change.record)

    async def reject(self, entry: LogEntry, reason: str) -> None:
        """Acknowledge an entry that will not be applied and keep it with its reason."""
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.xadd(
                keys.rejected(self._site),
                {"entry": entry.entry_id, "reason": reason, "event": entry.raw},
                maxlen=REJECTED_MAXLEN,
                approximate=True,
            )
            pipe.xack(keys.events(self._site), keys.EVENTS_GROUP, entry.entry_id)
            await pipe.execute()
        except RedisError as exc:
            self._recovering = True
            raise StoreUnavailable(f"redis unreachable rejecting {entry.entry_id}") from exc

    async def count(self, name: str, by: int = 1) -> None:
        """Add to a counter in the site's counters hash."""
        try:
            await cast(Awaitable[int], self._redis.hincrby(keys.counters(self._site), name, by))
        except RedisError as exc:
            raise StoreUnavailable(f"redis unreachable counting {name}") from exc

    async def counters(self) -> dict[str, int]:
        """Every counter of the site."""
        raw = await cast(Awaitable[dict[Any, Any]], self._redis.hgetall(keys.counters(self._site)))
        return {_text(k): int(v) for k, v in raw.items()}

    async def save_plan(self, plan: Plan) -> None:
        """Store the plan's summary: what `voltpool status` shows and a restart starts from."""
        try:
            await self._redis.set(keys.plan(self._site), json.dumps(plan_summary(plan)))
        except RedisError as exc:
            raise StoreUnavailable("redis unreachable saving the plan") from exc

    async def latest_plan(self) -> dict[str, Any] | None:
        """The last plan's summary, if any."""
        raw = await self._redis.get(keys.plan(self._site))
        return None if raw is None else dict(json.loads(raw))

    async def rejected(self, count: int = 100) -> list[dict[str, str]]:
        """The most recent rejected entries with their reasons, newest first."""
        reply: Any = await self._redis.xrevrange(keys.rejected(self._site), count=count)
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in reply or []]


def plan_summary(plan: Plan) -> dict[str, Any]:
    """A JSON-able summary of a plan: totals, and each connector's setpoints."""
    schedule = plan.schedule
    return {
        "made_at": plan.made_at.isoformat(),
        "strategy": schedule.strategy,
        "solver": schedule.solver,
        "status": schedule.status,
        "fallback": plan.fallback,
        "note": plan.note,
        "solve_time_s": schedule.solve_time_s,
        "cost_eur": schedule.cost_eur,
        "peak_kw": schedule.peak_kw,
        "shortfall_kwh": float(schedule.shortfall_kwh.sum()),
        "slot_starts": [s.isoformat() for s in plan.slot_starts],
        "site_kw": [round(float(x), 3) for x in schedule.site_kw],
        "headroom_kw": [round(x, 3) for x in plan.headroom_kw],
        "price_eur_per_kwh": [round(x, 5) for x in plan.price_eur_per_kwh],
        "setpoints": [
            {
                "charger_id": s.charger_id,
                "connector_id": s.connector_id,
                "vehicle_id": s.vehicle_id,
                "kw": [round(x, 3) for x in s.kw],
            }
            for s in plan.setpoints
        ],
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """Flatten an XREADGROUP reply (RESP2 list or RESP3 dict) to (id, fields) pairs."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    out: list[tuple[Any, Any]] = []
    for _, messages in items:
        if (
            messages
            and isinstance(messages[0], list)
            and not isinstance(messages[0][0], bytes | str)
        ):
            messages = messages[0]
        for entry_id, fields in messages:
            if fields is None:  # an entry trimmed away while pending
                continue
            out.append((entry_id, fields))
    return out
