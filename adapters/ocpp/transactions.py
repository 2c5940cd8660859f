"""The central system's transaction book in Redis: ids handed out once, replays recognised.

Transaction ids come from a Redis counter (`INCR`), so they are unique and survive restarts; the
content of a StartTransaction (charger, connector, timestamp, meterStart) is remembered with its
id, so a charge point that re-sends a StartTransaction whose answer it lost gets the same id
(RELIABILITY T-03). Allocation is one Lua script: atomic, one round trip.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from redis.asyncio import Redis

from adapters import redis_keys as keys
from adapters.ocpp.aio import redis_call
from controller.domain import ChargerId, ConnectorId, TransactionId, VehicleId

# KEYS: book hash, id counter. ARGV: start field, record JSON, connector field.
ALLOCATE_LUA = """
local known = redis.call('HGET', KEYS[1], ARGV[1])
if known then return {tonumber(known), 0} end
local id = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], id, 'tx:' .. id, ARGV[2], ARGV[3], id)
return {id, 1}
"""


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


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None


class TransactionBook:
    """Transaction ids and records of one site, in the hash `redis_keys.ocpp_transactions`."""

    def __init__(self, redis: Redis, site: str) -> None:
        self._redis = redis
        self._book = keys.ocpp_transactions(site)
        self._seq = keys.transaction_seq(site)
        self._allocate = redis.register_script(ALLOCATE_LUA)

    async def start(self, record: BookedTransaction) -> tuple[TransactionId, bool]:
        """The id for this start: a new one, or the one a replay of it got (then False)."""
        start_field = (
            f"start:{record.charger_id}:{record.connector_id}:{record.started_at}:"
            f"{record.meter_start_wh}"
        )
        conn_field = f"conn:{record.charger_id}:{record.connector_id}"
        result = await self._allocate(
            keys=[self._book, self._seq],
            args=[start_field, json.dumps(asdict(record)), conn_field],
        )
        return int(result[0]), bool(int(result[1]))

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
        """The latest transaction on a connector (running or stopped), if any."""
        raw_id = _text(
            await redis_call(self._redis.hget(self._book, f"conn:{charger_id}:{connector_id}"))
        )
        if raw_id is None:
            return None
        record = await self.get(int(raw_id))
        return None if record is None else (int(raw_id), record)

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
