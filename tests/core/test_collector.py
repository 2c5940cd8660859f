"""The runtime's garbage-collector settings: frozen start-up objects, thresholds, restored."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters import bootstrap
from controller.settings import Settings


def test_the_collector_is_tuned_inside_and_put_back_after() -> None:
    """Inside: the settings' thresholds and the objects alive at entry frozen; after: both
    as they were."""
    before = gc.get_threshold()
    settings = Settings(gc_thresholds=(12_345, 7, 9))
    with bootstrap.collector_tuned(settings):
        assert gc.get_threshold() == (12_345, 7, 9)
        assert gc.get_freeze_count() > 1000  # at least this test's modules and their objects
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_switched_off_it_leaves_the_collector_alone() -> None:
    """`gc_freeze=False` and no thresholds: nothing frozen, Python's thresholds kept."""
    before = gc.get_threshold()
    with bootstrap.collector_tuned(Settings(gc_freeze=False, gc_thresholds=None)):
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0


def test_a_threshold_below_one_is_refused() -> None:
    """0 would switch a generation's collection off: refused with the reason."""
    with pytest.raises(ValidationError, match="at least 1"):
        Settings(gc_thresholds=(0, 10, 10))


async def test_the_running_service_has_its_start_up_objects_frozen(tmp_path: Path) -> None:
    """`bootstrap.run` tunes the collector once everything is wired, and puts it back."""
    settings = Settings(data_dir=str(tmp_path / "var"), ocpp_port=0, site="gc")
    before = gc.get_threshold()
    seen: asyncio.Future[tuple[tuple[int, int, int], int]] = (
        asyncio.get_running_loop().create_future()
    )

    async def on_ready(_: bootstrap.Runtime) -> None:
        seen.set_result((gc.get_threshold(), gc.get_freeze_count()))

    task = asyncio.create_task(bootstrap.run(settings, on_ready=on_ready))
    try:
        async with asyncio.timeout(60.0):
            thresholds, frozen = await seen
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert thresholds == settings.gc_thresholds
    assert frozen > 1000
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
