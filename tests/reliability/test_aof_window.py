"""R-02 at its narrowest: a kill -9 of redis-server while its background fsync is slow.

Redis 6.2 with `appendfsync everysec` postpones its AOF write while the previous background
fsync is still running (`flushAppendOnlyFile` in aof.c: up to 2 s) but sends the replies all
the same (`beforeSleep` in server.c writes the AOF buffer, or skips it, then answers the
clients). Acknowledged writes then wait in the server's memory (INFO `aof_buffer_length` > 0)
and a SIGKILL loses them. A 1,000-charger soak lost two acknowledged StopTransactions that
way (docs/reliability.md, Guarantee 1).

Each test makes the next fsync slow on purpose (a large value written just before, so the
background fsync has tens of MiB to write), waits until INFO shows it pending (only
`everysec` has a background fsync), does what must be durable, kills the server with
SIGKILL and starts it again on its files. The servers are real redis-server processes
(`tests/reliability/redis_process.py`) with the policy voltpool gives its embedded server,
except the control, which runs `everysec` to show the window is real.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from adapters.codec import decode_event
from adapters.embedded import REDIS_CONFIG, RedisEndpoint
from adapters.ocpp.transactions import BookedTransaction, TransactionBook, summarise
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.clock import SimClock
from controller.events import TransactionStopped
from tests.conftest import T0
from tests.reliability.redis_process import RedisProcess, service_on_server
from tests.reliability.test_store_outage import started_central

BLOB_MIB = 96  # what the background fsync has to write: ~50 ms on the test machine's disk
BLOB_LUA = "redis.call('SET', KEYS[1], string.rep('x', tonumber(ARGV[1]))) return 1"
PENDING_WAIT_S = 1.5  # everysec starts its background fsync within a second
ATTEMPTS = 8  # stops tried until one is acknowledged while the slow fsync still runs
TIMEOUT_S = 20.0
WINDOW = timedelta(seconds=0.2)
BOOT = {"chargePointVendor": "acme", "chargePointModel": "wallbox"}
SITE = "depot"


async def slow_fsync(client: Redis) -> bool:
    """Under `everysec`, make the server append BLOB_MIB MiB to its AOF (a script builds the
    value, so nothing that large crosses the socket; scripts go to the AOF as their effects)
    and wait until a background fsync of it is running; returns whether one was seen.

    The other policies have no background fsync to make slow (`always` fsyncs before it
    answers, `no` leaves the flushing to the kernel): False at once."""
    if (await client.config_get("appendfsync"))["appendfsync"] != "everysec":
        return False
    await cast(Awaitable[Any], client.eval(BLOB_LUA, 1, "blob", BLOB_MIB << 20))
    deadline = time.perf_counter() + PENDING_WAIT_S
    while time.perf_counter() < deadline:
        if int((await client.info("persistence"))["aof_pending_bio_fsync"]) > 0:
            return True
        await asyncio.sleep(0.002)
    return False


async def _buffered(client: Redis) -> int:
    """Bytes of the AOF that are only in the server's memory."""
    return int((await client.info("persistence"))["aof_buffer_length"])


async def _stop_then_kill(
    server: RedisProcess,
) -> tuple[bool, bool, list[BookedTransaction | None], int]:
    """What the central system makes durable for a StopTransaction, done while a background
    fsync is slow, then kill -9 and restart.

    Up to ATTEMPTS transactions are started and stopped until, under a policy with a
    background fsync, one stop's writes are still only in memory once it is acknowledged (the
    fsync can end first on a fast disk, or while this process waits for the CPU). Whether
    they are is read from the append-only file with the server frozen (SIGSTOP) at once
    after the acknowledgement, so it is what the kill -9 then finds: a reading of INFO before
    the kill could be overtaken by the write. Returns (a background fsync was seen pending,
    the last stop's writes were not in the file when the server was killed, each
    transaction's record after the restart, stop events in the log after the restart)."""
    client = RedisEndpoint(unix_socket=server.socket).client()
    ids: list[int] = []
    try:
        book = TransactionBook(client, SITE)
        store = RedisFleetStore(client, SITE, policy=LogPolicy(trim_every=0))
        pending, unwritten = False, False
        for attempt in range(ATTEMPTS):
            started_at = T0 + timedelta(hours=3 * attempt)
            start = BookedTransaction(
                charger_id="cp-1",
                connector_id=1,
                id_tag="ev-1",
                started_at=started_at.isoformat(),
                meter_start_wh=1000,
            )
            transaction_id, new = await book.start(start)
            assert new
            ids.append(transaction_id)
            pending = await slow_fsync(client)
            written = server.aof_file()
            stopped_at = started_at + timedelta(hours=2)
            summary = summarise(
                started_at, 1000.0, [], stopped_at=stopped_at, meter_stop_wh=12_000.0
            )
            # As on_stop_transaction does before its CALLRESULT: the settlement, the event.
            assert await book.settle(transaction_id, summary, "EVDisconnected") is not None
            await store.append(
                TransactionStopped(
                    event_id=f"cp-1:tx:{transaction_id}:stop",
                    at=stopped_at,
                    transaction_id=transaction_id,
                    meter_stop_wh=12_000.0,
                    reason="EVDisconnected",
                )
            )
            server.freeze()  # at once: the slow fsync may end any moment
            unwritten = server.aof_file() == written
            if unwritten or not pending:
                break
            server.thaw()
    finally:
        await client.aclose()
    server.kill9()
    server.start()
    client = RedisEndpoint(unix_socket=server.socket).client()
    try:
        book = TransactionBook(client, SITE)
        records = [await book.get(transaction_id) for transaction_id in ids]
        entries = await client.xrange(f"vp:{{{SITE}}}:events")
        stops = sum(
            isinstance(decode_event(fields["event"]), TransactionStopped) for _, fields in entries
        )
    finally:
        await client.aclose()
    return pending, unwritten, records, stops


async def test_an_acknowledged_stop_survives_a_kill_9_during_a_slow_fsync(
    tmp_path: Path,
) -> None:
    """Guarantee 1 with the embedded server's policy: every settled stop and its event,
    acknowledged while a background fsync would be slow, is there after kill -9."""
    server = RedisProcess(tmp_path)
    assert server.fsync == REDIS_CONFIG["appendfsync"]
    server.start()
    try:
        pending, unwritten, records, stops = await _stop_then_kill(server)
    finally:
        server.stop()
    # Under everysec the window is exercised here (and a stop is lost).
    assert pending or server.fsync != "everysec"
    for record in records:
        assert record is not None
        assert record.stopped, f"acknowledged stop lost (not in the AOF file: {unwritten})"
        assert record.meter_stop_wh == 12_000.0
    assert stops == len(records)


async def test_with_everysec_the_same_kill_loses_an_acknowledged_stop(tmp_path: Path) -> None:
    """The control, and the cause of the soak's two lost stops: with `appendfsync everysec`
    a stop is acknowledged while its bytes are only in the server's memory, and kill -9
    takes them; its start, written before the slow fsync began, is still there."""
    server = RedisProcess(tmp_path, fsync="everysec")
    server.start()
    try:
        pending, unwritten, records, stops = await _stop_then_kill(server)
    finally:
        server.stop()
    if not unwritten:
        pytest.skip(
            f"in {ATTEMPTS} attempts, this disk synced {BLOB_MIB} MiB before an acknowledged"
            " stop could be caught in memory"
        )
    assert pending
    assert records[-1] is not None  # the start
    assert not records[-1].stopped
    assert stops == len(records) - 1


# -- the same through the central system and the service, as a charger sees it ---------------


async def _ask(ws: ClientConnection, message: list[object]) -> list[Any]:
    await ws.send(json.dumps(message))
    async with asyncio.timeout(TIMEOUT_S):
        answer: list[Any] = json.loads(await ws.recv())
    return answer


async def test_a_stop_answered_with_callresult_is_in_the_state_after_a_kill_9(
    tmp_path: Path, clock: SimClock
) -> None:
    """T-08 in miniature, deterministic: a charger starts a transaction, a background fsync is
    made slow, the charger's StopTransaction gets its CALLRESULT (repeated, up to ATTEMPTS
    transactions, until one stop is acknowledged while the fsync still runs, under a policy
    that has one), redis-server is killed with SIGKILL and restarted on its files; the
    service recovers, and the transaction book and the fleet state (reloaded from Redis)
    both have every stop, with its meterStop."""
    async with service_on_server(
        tmp_path, clock, SITE, cars=1, coalesce_window_s=WINDOW.total_seconds(), timeout_s=TIMEOUT_S
    ) as run:
        central, token = await started_central(run.client, run.service, clock, SITE)
        stops: dict[int, int] = {}  # transaction id -> meterStop acknowledged
        try:
            async with connect(
                central.url("cp-1"),
                subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                additional_headers={"Authorization": f"Basic {token}"},
            ) as ws:
                boot = await _ask(ws, [2, "b1", "BootNotification", BOOT])
                assert boot[2]["status"] == "Accepted"
                for attempt in range(ATTEMPTS):
                    start = {
                        "connectorId": 1,
                        "idTag": "ev-1",
                        "meterStart": 1000 + 10_000 * attempt,
                        "timestamp": clock.now().isoformat(),
                    }
                    started = await _ask(ws, [2, f"s{attempt}", "StartTransaction", start])
                    assert started[0] == 3
                    transaction_id = started[2]["transactionId"]
                    async with asyncio.timeout(TIMEOUT_S):
                        await run.service.applied()  # before the clock moves: the plan
                        await clock.advance(timedelta(hours=1))  # is due a window after
                        await run.service.settled()  # its last event, in simulated time
                    pending = await slow_fsync(run.client)
                    stop = {
                        "transactionId": transaction_id,
                        "meterStop": 9000 + 10_000 * attempt,
                        "timestamp": clock.now().isoformat(),
                        "reason": "EVDisconnected",
                    }
                    stopped = await _ask(ws, [2, f"t{attempt}", "StopTransaction", stop])
                    buffered = await _buffered(run.client)
                    assert stopped[0] == 3  # CALLRESULT: the stop is acknowledged
                    stops[transaction_id] = int(stop["meterStop"])
                    if buffered > 0 or not pending:
                        break
                run.server.kill9()  # at once: the slow fsync may end any moment
                run.server.start()
        finally:
            await central.stop()
        assert pending or run.server.fsync != "everysec"
        buffered = run.server.last_kill.get("aof_buffer_length", 0)
        async with asyncio.timeout(TIMEOUT_S):
            await run.service.applied()
        book = TransactionBook(run.client, SITE)
        records = {tid: await book.get(tid) for tid in stops}
        stored = await RedisFleetStore(run.client, SITE).load()
    for transaction_id, meter_stop in stops.items():
        record = records[transaction_id]
        assert record is not None
        assert record.stopped, f"acknowledged stop lost ({buffered} bytes were only in memory)"
        transaction = stored.transactions[transaction_id]
        assert transaction.meter_stop_wh == meter_stop, f"{buffered} bytes only in memory"
