"""`FleetStore` on Redis: records in per-kind hashes, an event log as a Stream, atomic commits.

Key schema: `adapters.redis_keys` (documented in docs/architecture.md). The log is read through
the consumer group `controller`; an entry stays pending until `commit` or `reject` settles it,
so an event taken but not applied before a crash is taken again after the restart. `commit`
writes the records, remembers the event id and acknowledges the entry in one Lua script: it is
atomic, and a second delivery of an applied event id writes nothing.

Nothing lost, nothing doubled (docs/reliability.md, cases R-03..R-05):

- entries pending with another consumer for longer than `LogPolicy.claim_idle_ms` (a process
  that died under another consumer name) are taken over with XAUTOCLAIM;
- an entry delivered more than `LogPolicy.max_deliveries` times (a poison entry that crashes
  every consumer that takes it) is moved to the rejected stream with its reason and settled, in
  one MULTI, and counted as `events_dead_lettered`;
- the log is trimmed every `LogPolicy.trim_every` commits with XTRIM MINID, never above the
  oldest pending entry nor above the first entry not yet delivered to every group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from adapters import redis_keys as keys
from adapters.codec import decode_event, decode_record, encode_event, encode_record
from adapters.group_commit import GroupCommit
from controller.errors import InvalidEvent, StoreUnavailable
from controller.events import Event
from controller.planning.plan import Plan
from controller.ports import BatchSettled, LogEntry, Settlement
from controller.state import Change, FleetState, Record, RecordKind

log = logging.getLogger(__name__)

# A batch of settlements in one script, in order: each commit writes its changes, remembers
# its event id and acknowledges its entry; each reject acknowledges its entry and keeps it with
# its reason. A commit answers 1: applied now; 0: the event id was applied from another entry
# (a duplicate, nothing written); 2: this very entry was applied and settled already (the
# same commit sent again because its answer was lost, e.g. the client's retry after a dropped
# connection). A reject answers 1, or 2 when the entry was settled already. A single commit
# (`RedisFleetStore.commit`) is a batch of one.
# KEYS: applied zset, events stream, rejected stream, then the distinct keys written.
# ARGV: group, retention (ms), rejected maxlen, then per settlement either 'c', entry id,
# event id, score, n writes, n x (key index, op, field, value), or 'r', entry id, reason, raw
# event. Returns one answer per settlement run; when a settlement fails, the error text
# follows the answers of those before it and nothing after it runs, so the store always holds
# a prefix of the batch (what the consumer's recovery relies on).
SETTLE_LUA = """
local applied, stream, rejected = KEYS[1], KEYS[2], KEYS[3]
local group, retention, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}
local function commit(a)
  local entry, event_id, score = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local n = tonumber(ARGV[a + 4])
  local after = a + 5 + 4 * n
  if redis.call('ZSCORE', applied, event_id) then
    if redis.call('XACK', stream, group, entry) == 0 then return 2, after end
    return 0, after
  end
  local w = a + 5
  for i = 1, n do
    local key, op, field, value = KEYS[tonumber(ARGV[w])], ARGV[w + 1], ARGV[w + 2], ARGV[w + 3]
    w = w + 4
    if op == 'hset' then redis.call('HSET', key, field, value)
    elseif op == 'hdel' then redis.call('HDEL', key, field)
    elseif op == 'set' then redis.call('SET', key, value)
    elseif op == 'del' then redis.call('DEL', key)
    end
  end
  redis.call('ZADD', applied, score, event_id)
  redis.call('ZREMRANGEBYSCORE', applied, '-inf', '(' .. (score - retention))
  redis.call('XACK', stream, group, entry)
  return 1, after
end
local function reject(a)
  local entry = ARGV[a + 1]
  if redis.call('XACK', stream, group, entry) == 0 then return 2, a + 4 end
  redis.call('XADD', rejected, 'MAXLEN', '~', maxlen, '*',
    'entry', entry, 'reason', ARGV[a + 2], 'event', ARGV[a + 3])
  return 1, a + 4
end
local a = 4
while a <= #ARGV do
  local step = ARGV[a] == 'c' and commit or reject
  local ok, result, after = pcall(step, a)
  if not ok then
    out[#out + 1] = 'ERR ' .. tostring(type(result) == 'table' and result.err or result)
    return out
  end
  out[#out + 1] = result
  a = after
end
return out
"""

# At most this many events go to the server in one pipeline of appends.
APPEND_BATCH = 512

APPLIED_RETENTION_MS = 7 * 24 * 3600 * 1000  # event ids are remembered for a week
REJECTED_MAXLEN = 10_000
CONSUMER = "controller-1"


@dataclass(frozen=True, slots=True)
class LogPolicy:
    """How the store reads, hands over and trims its event log."""

    claim_idle_ms: int = 60_000  # another consumer's entry pending this long is taken over
    max_deliveries: int = 5  # an entry delivered more often than this is dead-lettered
    trim_every: int = 1_000  # commits between two trims of the log (0: never trim)
    keep_settled_ms: int = 24 * 3600 * 1000  # settled entries younger than this are kept

    def __post_init__(self) -> None:
        if self.claim_idle_ms < 0:
            raise ValueError(f"claim_idle_ms must be >= 0, got {self.claim_idle_ms}")
        if self.max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {self.max_deliveries}")
        if self.trim_every < 0:
            raise ValueError(f"trim_every must be >= 0, got {self.trim_every}")
        if self.keep_settled_ms < 0:
            raise ValueError(f"keep_settled_ms must be >= 0, got {self.keep_settled_ms}")


# How often (s) the consumer's `take` checks that the server is the one the state was loaded
# from (`RedisFleetStore._check_server`): one INFO per second at most.
RESTART_CHECK_S = 1.0


class RedisFleetStore:
    """`controller.ports.FleetStore` on a Redis server."""

    def __init__(
        self,
        redis: Redis,
        site: str,
        *,
        consumer: str = CONSUMER,
        policy: LogPolicy | None = None,
        group_appends: bool = True,
        restart_check_s: float | None = RESTART_CHECK_S,
        commits: Redis | None = None,
    ) -> None:
        self._redis = redis
        # The server the state was loaded from (its INFO run_id), compared at most every
        # `restart_check_s` seconds by `take` (None: never; see `_check_server`).
        if restart_check_s is not None and restart_check_s < 0:
            raise ValueError(f"restart_check_s must be >= 0, not {restart_check_s}")
        self._restart_check_s = restart_check_s
        self._run_id: str | None = None
        self._run_id_checked = float("-inf")
        # False: each append is its own XADD round trip (the behaviour before the group
        # commit; the benchmarks' baseline).
        self._group_appends = group_appends
        self._site = site
        self._consumer = consumer
        self._policy = policy or LogPolicy()
        self._recovering = True  # read our own pending entries before new ones
        self._claim_due = True  # look for other consumers' stale entries
        self._group_ready = False
        self._commits_since_trim = 0
        self._settle = redis.register_script(SETTLE_LUA)
        # Group commit of appends (`adapters.group_commit`): appends that arrive while a
        # pipeline of them is in flight go together in the next one, in the order they came.
        # `commits`: a client of its own for them (the composition root gives one), so that an
        # answer to a charger never waits for a connection of the shared, bounded pool.
        self._appends = GroupCommit(
            commits or redis, max_commands=APPEND_BATCH, before=self._ensure_group
        )

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
        """Read every record of the site (and note which server they came from)."""
        try:
            await self._ensure_group()
            # Before the records: a restart between the two reads is then seen as one at the
            # next take (one reload too many), never missed.
            run_id = await self._server_run_id() if self._restart_check_s is not None else None
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
        self._run_id, self._run_id_checked = run_id, time.monotonic()
        return FleetState().with_changes(tuple(changes))

    async def _server_run_id(self) -> str:
        info = await self._redis.info("server")
        return str(info["run_id"])

    async def _check_server(self) -> None:
        """Raise `StoreUnavailable` if the server is no longer the one the state was loaded
        from (its run_id changed: a restart, a fail-over).

        A server restarted between two calls fails none of them (the client reconnects), so
        without this the consumer would go on with its state in memory. Under the embedded
        server's `appendfsync no` a kill -9 loses nothing acknowledged, but an external server
        at `everysec` can lose the last second (docs/reliability.md, Guarantee 1): the records
        then differ from the consumer's state, and the commits that follow would write records
        derived from writes the server no longer has. The service answers the error as any
        outage: decreases only, then the committed state reloaded (`load` notes the new id)."""
        if self._restart_check_s is None or self._run_id is None:
            return
        now = time.monotonic()
        if now - self._run_id_checked < self._restart_check_s:
            return
        run_id = await self._server_run_id()
        self._run_id_checked = now
        if run_id == self._run_id:
            return
        previous, self._run_id = self._run_id, None
        self._recovering = True  # our own pending entries first, as after any outage
        self._claim_due = True
        await self.count("store_server_restarts")
        raise StoreUnavailable(
            f"redis server changed (run_id {previous[:8]}... -> {run_id[:8]}...): reloading the "
            "committed state, which may lack writes acknowledged before the restart"
        )

    def _decode(self, kind: RecordKind, payload: str | bytes) -> Record:
        return decode_record(kind, payload)

    async def append(self, event: Event) -> str:
        """Append to the log; the entry is durable as far as the server's AOF policy makes it.

        Goes to the server with the other appends queued in the same pass of the event loop
        (see `append_many`); answered only once the server acknowledged the XADD."""
        return (await self.append_many([event]))[0]

    async def append_many(self, events: Sequence[Event]) -> list[str]:
        """Append events in their order; returns their entry ids, once the server has them.

        Group commit: a caller that finds no append in flight sends its own events at once,
        from its own task (no added latency). Callers that come while a pipeline is in flight
        queue up; when it is answered, a flusher task sends everything queued meanwhile (up to
        `APPEND_BATCH` events, several callers' batches in the order they were queued) in one
        pipeline, then answers each caller with its own entry ids, or `StoreUnavailable` when
        one of its XADDs failed. One pipeline at a time, so the log keeps the callers' order.
        A cancelled caller does not cancel the others' flush nor leave them waiting (its own
        events may still be appended, as a cancelled XADD could be)."""
        if not events:
            return []
        encoded = [encode_event(event) for event in events]
        if not self._group_appends:
            pairs = zip(events, encoded, strict=True)
            return [await self._append_one(event, text) for event, text in pairs]
        stream = keys.events(self._site)
        try:
            replies = await self._appends.send([("XADD", stream, "*", "event", t) for t in encoded])
        except RedisError as exc:
            raise StoreUnavailable(f"redis unreachable appending {len(events)} events") from exc
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if failed is not None:
            raise StoreUnavailable(f"redis refused appending an event: {failed}") from failed
        return [_text(r) for r in replies]

    async def _append_one(self, event: Event, text: str) -> str:
        """One XADD, awaited (no group commit)."""
        try:
            await self._ensure_group()
            entry_id = await self._redis.xadd(keys.events(self._site), {"event": text})
        except RedisError as exc:
            raise StoreUnavailable(f"redis unreachable appending {event.event_id}") from exc
        return _text(entry_id)

    async def take(self, count: int) -> Sequence[LogEntry]:
        """Entries to apply: our own unsettled ones first (after a crash), then other consumers'
        stale ones (claimed), then new ones. Entries delivered too often are dead-lettered and
        not handed over; an empty answer means the log is drained."""
        stream = keys.events(self._site)
        try:
            await self._ensure_group()
            await self._check_server()
            while True:
                if self._recovering:
                    reply = await self._redis.xreadgroup(
                        keys.EVENTS_GROUP, self._consumer, {stream: "0"}, count=count
                    )
                    screened = await self._screen(_entries(reply, keep_deleted=True))
                    if screened is None:
                        self._recovering = False
                    elif screened:
                        return screened
                    continue  # all dead-lettered or settled: read our pending entries again
                if self._claim_due:
                    claimed = await self._claim(count)
                    if claimed:
                        return claimed
                    self._claim_due = False
                    continue
                mine, fresh = await self._read_next(count)
                if not mine:
                    taken = [self._entry(i, f) for i, f in fresh]
                    if not taken:
                        self._claim_due = True  # idle: look for stale entries on the next take
                    return taken
                # Delivered to this consumer before and never settled: a read whose reply was
                # lost (the client sent it again). Screened as any redelivery, and handed over
                # before the new entries (all above them). A full page may not be all of the
                # pending list: the new entries then wait in it (they are pending now) and come
                # back, in order, from the next reads.
                log.warning("%d log entries delivered before were taken again", len(mine))
                await self.count("events_redelivered", len(mine))
                taken = await self._screen(mine) or []
                if len(mine) < count:
                    taken += [self._entry(i, f) for i, f in fresh]
                if taken:
                    return taken
        except RedisError as exc:
            self._recovering = True
            self._claim_due = True
            # A server restarted without its data (no AOF) has no group any more: make it again.
            self._group_ready = False
            raise StoreUnavailable("redis unreachable reading the event log") from exc

    async def _read_next(self, count: int) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
        """(this consumer's pending entries, new entries): up to `count` of each, in one
        pipeline of two XREADGROUPs, its own pending list ('0') first, then new entries ('>';
        every one of them above every pending entry).

        Idempotent under the client's retry, which a plain XREADGROUP '>' is not: redis-py
        re-sends a request whose connection failed (`RedisEndpoint.client`: 3 retries), and when
        the first one ran (a server killed after writing its AOF but before its reply reached
        the client, a cut connection), '>' sent again hands over the entries *after* the ones
        it delivered. Those waited in the pending list for a claim (60 s idle) and were then
        applied out of order: a StopTransaction refused before its own start, the transaction
        open for ever (docs/reliability.md; tests/reliability/test_lost_stop.py). Sent again,
        this pipeline's pending read returns what the lost one delivered. Normally the pending
        list is empty here (each taken batch is settled before the next take): one round trip,
        as before, and an empty read more.

        An entry deleted while pending comes with empty fields (settled by `_screen`)."""
        stream = keys.events(self._site)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xreadgroup(keys.EVENTS_GROUP, self._consumer, {stream: "0"}, count=count)
        pipe.xreadgroup(keys.EVENTS_GROUP, self._consumer, {stream: ">"}, count=count)
        mine, fresh = await pipe.execute()
        return _entries(mine, keep_deleted=True), _entries(fresh)

    async def _claim(self, count: int) -> list[LogEntry]:
        """Take over entries idle longer than the policy allows (empty list: none usable)."""
        stream = keys.events(self._site)
        start = "0-0"
        while True:
            reply: Any = await self._redis.xautoclaim(
                stream,
                keys.EVENTS_GROUP,
                self._consumer,
                self._policy.claim_idle_ms,
                start_id=start,
                count=count,
            )
            start = _text(reply[0])
            # Redis 6.2 hands a deleted entry over as (nil, nil): it is now in our own pending
            # list, and reading that (recovering) settles it.
            if any(i is None for i, _ in reply[1]):
                self._recovering = True
            pairs = [(i, f) for i, f in reply[1] if i is not None]
            if pairs:
                log.warning("claimed %d stale log entries from other consumers", len(pairs))
                await self.count("events_claimed", len(pairs))
                screened = await self._screen(pairs)
                if screened:
                    return screened
            if start == "0-0":
                return []

    async def _screen(self, pairs: list[tuple[Any, Any]]) -> list[LogEntry] | None:
        """Redelivered entries with their delivery counts; poison and deleted ones settled.

        Returns None when `pairs` is empty (nothing pending), else the entries to apply (which
        may be empty when every one was dead-lettered)."""
        if not pairs:
            return None
        stream = keys.events(self._site)
        ids = [_text(i) for i, _ in pairs]
        pending: Any = await self._redis.xpending_range(
            stream, keys.EVENTS_GROUP, min=ids[0], max=ids[-1], count=len(ids) + 64
        )
        deliveries = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        out: list[LogEntry] = []
        for entry_id, fields in pairs:
            eid = _text(entry_id)
            if not fields:  # deleted from the stream while pending: nothing left to apply
                await self._redis.xack(stream, keys.EVENTS_GROUP, eid)
                await self.count("events_pending_deleted")
                log.error("log entry %s was deleted while pending; settled without applying", eid)
                continue
            entry = self._entry(eid, fields, deliveries=deliveries.get(eid, 2))
            if entry.deliveries > self._policy.max_deliveries:
                await self.dead_letter(entry)
                continue
            out.append(entry)
        return out

    async def dead_letter(self, entry: LogEntry) -> None:
        """Settle an entry delivered too often: rejected stream with the reason, counted."""
        reason = (
            f"dead-letter: delivered {entry.deliveries} times (limit {self._policy.max_deliveries})"
        )
        log.error("log entry %s %s", entry.entry_id, reason)
        await self.reject(entry, reason)
        await self.count("events_dead_lettered")

    def _entry(self, entry_id: Any, fields: Any, *, deliveries: int = 1) -> LogEntry:
        raw = _text(fields.get("event", fields.get(b"event", b""))) if fields else ""
        try:
            event: Event | None = decode_event(raw)
        except InvalidEvent as exc:
            log.error("undecodable log entry %s: %s", _text(entry_id), exc)
            event = None
        return LogEntry(_text(entry_id), event, raw, deliveries)

    async def trim(self) -> int:
        """Drop settled entries older than the policy keeps; returns how many went.

        The cut is the smallest of: the oldest entry pending in any group, the first entry not
        yet delivered to any group, and the retention horizon. Entries only ever join above
        the first two while this runs, so no unsettled entry can be lost to a race."""
        stream = keys.events(self._site)
        try:
            groups: Any = await self._redis.xinfo_groups(stream)
            seconds, micros = await self._redis.time()
            cut_ms = int(seconds) * 1000 + int(micros) // 1000 - self._policy.keep_settled_ms
            cut = (cut_ms, 0)
            for group in groups:
                last = _id(_text(group["last-delivered-id"]))
                cut = min(cut, (last[0], last[1] + 1))
                summary: Any = await self._redis.xpending(stream, _text(group["name"]))
                if summary["pending"]:
                    cut = min(cut, _id(_text(summary["min"])))
            if cut <= (0, 0):
                return 0
            removed = await self._redis.xtrim(stream, minid=f"{cut[0]}-{cut[1]}", approximate=False)
        except RedisError as exc:
            raise StoreUnavailable("redis unreachable trimming the event log") from exc
        if removed:
            await self.count("events_trimmed", int(removed))
        return int(removed)

    async def commit(self, entry: LogEntry, event_id: str, changes: Sequence[Change]) -> bool:
        """Write, remember the event id and acknowledge, in one atomic script (a batch of one).

        True when the changes are in the store from this entry: written now, or by this same
        commit sent before whose answer was lost (the client re-sends a command after a
        dropped connection; the first one may have run). False for a duplicate: the event
        id was applied from another entry, and nothing is written."""
        settled = await self.settle([Settlement(entry, event_id, changes)])
        if settled.error is not None:
            raise StoreUnavailable(f"redis refused committing {event_id}: {settled.error}")
        return settled.done[0]

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

    async def applied_among(self, event_ids: Sequence[str]) -> set[str]:
        """Those of `event_ids` already applied (the applied set remembers them a week)."""
        if not event_ids:
            return set()
        try:
            scores: list[Any] = await self._redis.zmscore(keys.applied(self._site), list(event_ids))
        except RedisError as exc:
            # The batch these ids came from was taken, not settled: read our own pending
            # entries first at the next take, or they would wait for a claim (minutes).
            self._recovering = True
            raise StoreUnavailable("redis unreachable reading the applied event ids") from exc
        return {e for e, score in zip(event_ids, scores, strict=True) if score is not None}

    async def settle(self, settlements: Sequence[Settlement]) -> BatchSettled:
        """Commit and reject a batch of entries in order, in one atomic script (`SETTLE_LUA`).

        Each commit behaves as `commit`, each reject as `reject`. If one fails (out of memory,
        say), those before it stay written, nothing after it runs, and the answer says where
        it stopped; a lost answer raises `StoreUnavailable` (the script ran wholly or not at
        all, and a re-sent script finds its commits written: they answer True)."""
        if not settlements:
            return BatchSettled(())
        written: dict[str, int] = {}
        args: list[str] = [keys.EVENTS_GROUP, str(APPLIED_RETENTION_MS), str(REJECTED_MAXLEN)]
        commits = 0
        for item in settlements:
            entry = item.entry
            if item.event_id is None:
                args += ["r", entry.entry_id, item.reason, entry.raw]
                continue
            commits += 1
            score = int(entry.entry_id.split("-")[0])
            args += ["c", entry.entry_id, item.event_id, str(score), str(len(item.changes))]
            for change in item.changes:
                key, op, field, value = self._write_for(change)
                index = written.setdefault(key, 4 + len(written))
                args += [str(index), op, field, value]
        site = self._site
        try:
            reply: list[Any] = await self._settle(
                keys=[keys.applied(site), keys.events(site), keys.rejected(site), *written],
                args=args,
            )
        except RedisError as exc:
            self._recovering = True
            raise StoreUnavailable(
                f"redis unreachable settling {len(settlements)} entries"
            ) from exc
        done: list[bool] = []
        error: str | None = None
        for answer, item in zip(reply, settlements, strict=False):
            if isinstance(answer, bytes | str):
                error = _text(answer)
                self._recovering = True
                break
            done.append(item.event_id is None or int(answer) in (1, 2))
        self._commits_since_trim += commits
        if self._policy.trim_every and self._commits_since_trim >= self._policy.trim_every:
            try:
                await self.trim()
                self._commits_since_trim = 0
            except StoreUnavailable as exc:
                # The batch is settled: its answers must reach the consumer. Trimming is tried
                # again after the next batch; the consumer meets the outage on its next call.
                log.warning("trimming the event log after a batch failed: %s", exc)
        return BatchSettled(tuple(done), error)

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
            # Built in a thread: at 1,000 connectors x 100 slots it is tens of ms of work,
            # which on the event loop would hold every OCPP answer that long.
            text = await asyncio.to_thread(plan_summary_json, plan)
            await self._redis.set(keys.plan(self._site), text)
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
                "kw": kw,
            }
            for s, kw in zip(plan.setpoints, _rounded_kw(plan), strict=True)
        ],
    }


def _rounded_kw(plan: Plan) -> list[list[float]]:
    """Each setpoint's kW rounded to 3 decimals: in one numpy pass when the rows are equally
    long (a plan of 1,000 connectors x 100 slots took ~50 ms one `round` at a time)."""
    rows = [s.kw for s in plan.setpoints]
    if rows and all(len(r) == len(rows[0]) for r in rows):
        table: list[list[float]] = np.round(np.asarray(rows, dtype=float), 3).tolist()
        return table
    return [[round(x, 3) for x in r] for r in rows]


# The last plan's summary as JSON: each plan is stored in Redis and published over MQTT, so it
# is built once, not once per sink (the plan itself keeps the cache entry honest: `is`).
_last_summary: list[tuple[Plan, str]] = []


def plan_summary_json(plan: Plan) -> str:
    """`plan_summary(plan)` as JSON text, built once for the latest plan."""
    if _last_summary and _last_summary[0][0] is plan:
        return _last_summary[0][1]
    text = json.dumps(plan_summary(plan))
    _last_summary[:] = [(plan, text)]
    return text


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a comparable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entries(reply: Any, *, keep_deleted: bool = False) -> list[tuple[Any, Any]]:
    """Flatten an XREADGROUP reply (RESP2 list or RESP3 dict) to (id, fields) pairs.

    An entry deleted while pending comes back with no fields; it is dropped unless
    `keep_deleted` (reading our own pending entries, which must settle it)."""
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
            if not fields and not keep_deleted:  # an entry deleted while pending
                continue
            out.append((entry_id, fields))
    return out
