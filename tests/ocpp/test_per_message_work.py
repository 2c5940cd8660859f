"""The controller's work per OCPP message, cut without weakening a guarantee (issue #8).

- The router keeps the library's steps but converts payload keys through a cache and reads each
  handler's signature once: the conversion is the library's, key for key.
- A transaction message is answered only once what it carries is in Redis; a StopTransaction
  reads its record and ledger in one round trip and writes its settlement in one MULTI, so a
  refused write (Redis out of memory) answers InternalError and leaves nothing half-written,
  and the re-sent stop settles once.

Redis command counts come from the server's own `INFO commandstats` (no mock): the deltas
around one message. The server counts the commands a script runs too (listed apart below).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

from ocpp.charge_point import camel_to_snake_case
from redis.asyncio import Redis

from adapters import redis_keys as keys
from adapters.ocpp.aio import redis_call
from adapters.ocpp.central import _takes_unique_id, snake_keys
from tests.conftest import T0
from tests.ocpp.conftest import SITE, Harness, ask, frame
from tests.ocpp.test_transactions import ENERGY, meter_frame, meter_value, start, stop


def _schema_property_names() -> set[str]:
    """Every property name in the library's OCPP 1.6 and 2.0.1 schemas."""
    import ocpp

    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict):
                    names.update(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    root = os.path.dirname(ocpp.__file__)
    for version in ("v16", "v201"):
        folder = os.path.join(root, version, "schemas")
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), encoding="utf-8-sig") as f:
                walk(json.load(f))
    return names


def test_the_cached_key_conversion_is_the_librarys_for_every_schema_property() -> None:
    """Key for key (over 250 property names) and on a nested payload, `snake_keys` gives what
    `ocpp.charge_point.camel_to_snake_case` gives, also when asked a second time (cached)."""
    names = sorted(_schema_property_names())
    assert len(names) > 250
    for _ in range(2):
        for name in names:
            assert snake_keys({name: 1}) == camel_to_snake_case({name: 1}), name
    payload = {
        "connectorId": 1,
        "transactionId": 7,
        "meterValue": [
            {
                "timestamp": "2024-03-04T15:00:00Z",
                "sampledValue": [{"value": "1", "measurand": "SoC", "unit": "Percent"}, "x", 3],
            }
        ],
    }
    assert snake_keys(payload) == camel_to_snake_case(payload)


def test_a_handlers_unique_id_parameter_is_read_from_its_signature() -> None:
    """The library passes `call_unique_id` only to handlers that declare it; the cached reading
    gives the same answer for functions and bound methods, every time."""

    class Handlers:
        def with_id(self, call_unique_id: str, **_: Any) -> None:
            """Declares it."""

        def without(self, **_: Any) -> None:
            """Does not."""

    one, two = Handlers(), Handlers()
    for _ in range(2):
        assert _takes_unique_id(one.with_id)
        assert _takes_unique_id(two.with_id)
        assert not _takes_unique_id(one.without)
        assert not _takes_unique_id(lambda **_: None)


async def _commands(redis: Redis) -> dict[str, int]:
    """Calls per command so far, from the server's statistics."""
    stats = await redis_call(redis.info("commandstats"))
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


async def test_a_meter_values_is_answered_only_after_its_ledger_row_is_in_redis(
    harness: Harness,
) -> None:
    """T-01: the moment the CALLRESULT is read, the register sample is in the transaction's
    ledger (read at once, no waiting) and its event was handed to the sink; the MeterValues
    cost one ledger script (no separate reads)."""
    began = T0 - timedelta(hours=1)
    async with harness.connect("CP-1") as ws:
        tx = await start(ws, "s", began, 5_000, "TAG-1")
        first = meter_value(began + timedelta(minutes=5), 5_500, 7_000)
        assert (await ask(ws, meter_frame("m0", tx, [first])))[0] == 3  # the script is loaded
        before = await _commands(harness.redis)
        entry = meter_value(began + timedelta(minutes=10), 6_000, 7_000)
        answer = await ask(ws, meter_frame("m1", tx, [entry]))
        ledger = await redis_call(harness.redis.hgetall(keys.transaction_samples(SITE, tx)))
        after = await _commands(harness.redis)
        last = harness.recorder.events[-1].kind  # before the close adds the disconnection
    assert answer == [3, "m1", {}]
    assert sorted(json.loads(v)["value"] for k, v in ledger.items() if ENERGY in k) == [
        "5500",
        "6000",
    ]
    assert last == "meter_sampled"
    spent = _delta(before, after)
    spent.pop("hgetall", None)  # the test's own read
    spent.pop("info", None)
    script = {"hexists": 1, "hsetnx": 1, "expire": 1}  # inside the ledger script
    assert spent == {"evalsha": 1, **script}, spent


async def test_a_stop_reads_once_and_writes_its_samples_and_settlement_in_one_multi(
    harness: Harness,
) -> None:
    """A StopTransaction (with transactionData) costs two round trips before its events: one
    script reading record and ledger, one MULTI (its reading, the settled record, the ledger's
    expiry); the settlement includes that reading without reading the ledger again. A repeated
    stop does not read the ledger."""
    began = T0 - timedelta(hours=1)
    async with harness.connect("CP-1") as ws:
        tx = await start(ws, "s", began, 5_000, "TAG-1")
        entry = meter_value(began + timedelta(minutes=10), 6_000, 7_000)
        assert (await ask(ws, meter_frame("m1", tx, [entry])))[0] == 3
        await harness.central.transactions.view(tx)  # the script is loaded
        before = await _commands(harness.redis)
        data = [meter_value(began + timedelta(minutes=20), 7_000, 7_000)]
        answer = await stop(ws, "x", tx, began + timedelta(minutes=30), 7_500, data=data)
        after = await _commands(harness.redis)
        repeated = await stop(ws, "y", tx, began + timedelta(minutes=30), 7_500, data=data)
        again = await _commands(harness.redis)
    assert answer == [3, "x", {}]
    assert repeated == [3, "y", {}]
    spent = _delta(before, after)
    spent.pop("info", None)
    assert spent == {
        "evalsha": 1,  # the view script: the record, then (not stopped) the ledger
        "hget": 1,
        "hgetall": 1,
        "multi": 1,  # the settlement: the one register row, the record, the ledger's expiry
        "hsetnx": 1,
        "hset": 1,
        "expire": 1,
        "exec": 1,
    }, spent
    # The repeat: the record only (stopped: its ledger of any size is not read), then its
    # reading offered again to the ledger script (stored already: nothing new).
    spent = _delta(after, again)
    spent.pop("info", None)
    ledger_script = {"hexists": 1, "hsetnx": 1, "expire": 1}
    assert spent == {"evalsha": 2, "hget": 1, **ledger_script}, spent
    record = await harness.central.transactions.get(tx)
    assert record is not None
    assert record.stopped
    assert record.energy_wh == 2_500
    assert record.gaps == []
    ttl = await redis_call(harness.redis.ttl(keys.transaction_samples(SITE, tx)))
    assert 0 < ttl <= 86_400


async def test_a_stop_refused_by_redis_answers_internal_error_and_stores_nothing_half(
    harness: Harness,
) -> None:
    """T-06: with Redis refusing writes (maxmemory 1, noeviction) a StopTransaction carrying
    transactionData gets InternalError; its record is still running, its ledger holds neither
    the new reading nor the settled expiry. The same stop re-sent once Redis takes writes again
    settles once, with the reading."""
    redis = harness.redis
    began = T0 - timedelta(hours=1)
    samples_key = keys.transaction_samples(SITE, 0)
    policy = (await redis_call(redis.config_get("maxmemory-policy")))["maxmemory-policy"]
    async with harness.connect("CP-1") as ws:
        tx = await start(ws, "s", began, 5_000, "TAG-1")
        samples_key = keys.transaction_samples(SITE, tx)
        entry = meter_value(began + timedelta(minutes=10), 6_000, 7_000)
        assert (await ask(ws, meter_frame("m1", tx, [entry])))[0] == 3
        ledger_before = await redis_call(redis.hgetall(samples_key))
        ttl_before = await redis_call(redis.ttl(samples_key))
        data = [meter_value(began + timedelta(minutes=20), 7_000, 7_000)]
        at = began + timedelta(minutes=30)
        await redis_call(redis.config_set("maxmemory-policy", "noeviction"))
        await redis_call(redis.config_set("maxmemory", "1"))
        try:
            failed = await stop(ws, "x1", tx, at, 7_500, data=data)
        finally:
            await redis_call(redis.config_set("maxmemory", "0"))
            await redis_call(redis.config_set("maxmemory-policy", policy))
        record = await harness.central.transactions.get(tx)
        assert record is not None
        assert not record.stopped
        assert await redis_call(redis.hgetall(samples_key)) == ledger_before
        assert ttl_before > 86_400  # a running transaction's ledger: kept a week
        assert await redis_call(redis.ttl(samples_key)) > 86_400  # not the settled day
        settled = await stop(ws, "x2", tx, at, 7_500, data=data)
        repeated = await stop(ws, "x3", tx, at, 7_500, data=data)
    assert failed[:3] == [4, "x1", "InternalError"]
    assert settled == [3, "x2", {}]
    assert repeated == [3, "x3", {}]
    record = await harness.central.transactions.get(tx)
    assert record is not None
    assert (record.stopped, record.energy_wh) == (True, 2_500)
    assert harness.central.metrics["stops_repeated"] == 1
    ledger = await redis_call(redis.hgetall(samples_key))
    assert sorted(json.loads(v)["value"] for k, v in ledger.items() if ENERGY in k) == [
        "6000",
        "7000",
    ]


async def test_the_latest_transaction_of_a_connector_is_one_script(harness: Harness) -> None:
    """A StatusNotification Available after a session finds the connector's latest transaction
    in one round trip (was two reads) and unplugs its car."""
    began = T0 - timedelta(hours=1)
    async with harness.connect("CP-1") as ws:
        tx = await start(ws, "s", began, 5_000, "TAG-1")
        assert (await stop(ws, "x", tx, began + timedelta(minutes=5), 5_100))[0] == 3
        assert await harness.central.transactions.latest_on("CP-1", 2) is None
        latest = await harness.central.transactions.latest_on("CP-1", 1)
        assert latest is not None
        assert latest[0] == tx
        assert latest[1].stopped
        available = {"connectorId": 1, "errorCode": "NoError", "status": "Available"}
        before = await _commands(harness.redis)
        assert (await ask(ws, frame("st", "StatusNotification", available)))[0] == 3
        after = await _commands(harness.redis)
        last = harness.recorder.events[-1].kind  # before the close adds the disconnection
    spent = _delta(before, after)
    spent.pop("info", None)
    # The script (its two HGETs), then the unplugged flag (a read and a write of the record).
    assert spent == {"evalsha": 1, "hget": 2 + 1, "hset": 1}, spent
    assert last == "vehicle_unplugged"


async def test_a_start_after_a_stopped_transaction_is_one_script(harness: Harness) -> None:
    """The allocation script reads the connector's previous record itself: a start after a
    stopped transaction costs that one script (no read of the old record from here), and the
    old transaction stays as it was settled; the superseding of one never stopped is shown by
    test_transactions.py (T-07)."""
    began = T0 - timedelta(hours=2)
    async with harness.connect("CP-1") as ws:
        first = await start(ws, "s1", began, 5_000, "TAG-1")
        assert (await stop(ws, "x1", first, began + timedelta(minutes=5), 5_100))[0] == 3
        settled = await harness.central.transactions.get(first)
        before = await _commands(harness.redis)
        second = await start(ws, "s2", began + timedelta(minutes=30), 5_100, "TAG-1")
        after = await _commands(harness.redis)
    spent = _delta(before, after)
    spent.pop("info", None)
    # Inside the script: the start's field, the connector's field, the previous record; the
    # counter; the new fields.
    assert spent == {"evalsha": 1, "hget": 3, "incr": 1, "hset": 1}, spent
    assert second == first + 1
    assert await harness.central.transactions.get(first) == settled
    assert harness.central.metrics["transactions_superseded"] == 0
