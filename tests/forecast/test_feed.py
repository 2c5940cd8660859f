"""The service fed from fitted models: head-room and prices every slot, new fits picked up."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis

from adapters.datasets.model_files import read_manifest, save_models
from adapters.forecast_feed import ForecastFeed
from adapters.redis_store import RedisFleetStore
from controller.clock import SimClock
from controller.forecast.models import ForecastModels
from controller.planning.planner import StatePlanner
from controller.service import ControllerService
from controller.settings import Settings
from tests.factories import PlanRecorder
from tests.forecast.test_models_cli import models  # noqa: F401  (the fitted-models fixture)

NOW = datetime(2024, 3, 12, 9, 7, tzinfo=UTC)  # before the 13:00 CET day-ahead auction


def _save(fitted: ForecastModels, directory: Path, tag: str) -> None:
    save_models(fitted, directory, data_sha256=tag * 32, data_files={}, inputs={}, metrics={})


async def test_the_feed_gives_the_service_headroom_and_prices_each_slot(
    models: ForecastModels,  # noqa: F811
    tmp_path: Path,
    redis: Redis,
) -> None:
    """At start and at the next slot boundary the service receives a 96-slot head-room at the
    planning quantile and prices with the forecast part marked; a new fit is picked up."""
    _save(models, tmp_path, "ab")
    clock = SimClock(NOW)
    service = ControllerService(
        store=RedisFleetStore(redis, "depot"),
        clock=clock,
        planner=StatePlanner(),
        sink=PlanRecorder(),
        settings=Settings(site="depot"),
    )
    feed = ForecastFeed(
        tmp_path, clock=clock, submit=service.submit, capacity_kw=1000.0, quantile=0.95, slots=96
    )
    await service.start()
    runner = asyncio.create_task(service.run())
    feeding = asyncio.create_task(feed.run())
    try:
        async with asyncio.timeout(30):
            await service.counted("events_applied", 2)
        headroom = service.state.headroom
        prices = service.state.prices
        assert headroom is not None
        assert prices is not None
        assert headroom.start == datetime(2024, 3, 12, 9, 0, tzinfo=UTC)
        assert len(headroom.values) == 96
        assert all(0.0 <= h <= 1000.0 for h in headroom.values)
        assert prices.forecast_from is not None
        assert 0 < prices.forecast_from < 96
        first_version = read_manifest(tmp_path)[0].name

        _save(models, tmp_path, "cd")  # a refit while the service runs
        await clock.advance(timedelta(minutes=8))  # to 09:15, the next slot
        async with asyncio.timeout(30):
            await service.counted("events_applied", 4)
        assert service.state.headroom is not None
        assert service.state.headroom.start == datetime(2024, 3, 12, 9, 15, tzinfo=UTC)
        assert read_manifest(tmp_path)[0].name != first_version
        assert feed.models is not None
    finally:
        for task in (runner, feeding):
            task.cancel()
        await asyncio.gather(runner, feeding, return_exceptions=True)


def test_without_models_the_feed_says_what_is_missing(tmp_path: Path) -> None:
    """A models directory with nothing fitted is an error that names the fix."""
    feed = ForecastFeed(
        tmp_path,
        clock=SimClock(NOW),
        submit=lambda event: asyncio.sleep(0),
        capacity_kw=1000.0,
        quantile=0.95,
        slots=96,
    )
    with pytest.raises(Exception, match="fit"):
        feed.events_for(NOW)
