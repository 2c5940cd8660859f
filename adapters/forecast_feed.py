"""Feeds the controller its head-room and prices from fitted forecast models.

With `VOLTPOOL_MODELS_DIR` set, the service loads the models `voltpool fit` wrote (following
`LATEST`) at start, and at every slot boundary submits a `HeadroomUpdated` (the configured
quantile of h_t, `PlanningSettings.headroom_quantile`) and a `PriceUpdated` (published
day-ahead prices, then the price source's forecast, marked) for the horizon. A new fit is
picked up at the next slot: refitting is `voltpool fit --out-dir <models dir>` while the
service runs. Without a models directory the feeds come from MQTT (`site/headroom`, `price`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

from adapters.datasets.model_files import load_models, read_manifest
from controller.domain import SLOT, slot_floor
from controller.errors import VoltpoolError
from controller.events import Event, HeadroomUpdated
from controller.forecast.models import ForecastModels, headroom_forecast, price_series
from controller.ports import Clock

log = logging.getLogger(__name__)


class ForecastFeed:
    """Submits model forecasts of head-room and prices once per slot."""

    def __init__(
        self,
        models_dir: Path,
        *,
        clock: Clock,
        submit: Callable[[Event], Awaitable[None]],
        capacity_kw: float,
        quantile: float,
        slots: int,
    ) -> None:
        self._dir = models_dir
        self._clock = clock
        self._submit = submit
        self._capacity_kw = capacity_kw
        self._quantile = quantile
        self._slots = slots
        self._version: str | None = None
        self.models: ForecastModels | None = None
        self.published = 0

    def _reload_if_new(self) -> None:
        version_dir, _ = read_manifest(self._dir)
        if version_dir.name != self._version:
            self.models = load_models(self._dir)
            self._version = version_dir.name
            log.info("forecast models %s loaded from %s", self._version, version_dir)

    def events_for(self, now: datetime) -> list[Event]:
        """The head-room and price events for the horizon starting in the slot of `now`."""
        self._reload_if_new()
        assert self.models is not None
        start = slot_floor(now)
        stamp = now.isoformat()
        headroom = headroom_forecast(
            self.models, start, self._slots, self._capacity_kw, self._quantile, now=now
        )
        events: list[Event] = [
            HeadroomUpdated(
                event_id=f"model-headroom:{stamp}",
                at=now,
                start=start,
                headroom_kw=tuple(float(h) for h in headroom),
            )
        ]
        if self.models.prices is not None:
            outlook = price_series(self.models, now, start, self._slots)
            events.append(outlook.to_event(f"model-price:{stamp}", now))
        return events

    async def publish_once(self) -> None:
        """Compute and submit this slot's forecasts (a failure is logged; the last stand)."""
        now = self._clock.now()
        try:
            events = await asyncio.to_thread(self.events_for, now)
        except (VoltpoolError, OSError, ValueError) as exc:
            log.error("no forecast from %s at %s: %s", self._dir, now.isoformat(), exc)
            return
        for event in events:
            await self._submit(event)
            self.published += 1

    async def run(self) -> None:
        """Publish now and at every slot boundary, until cancelled."""
        while True:
            await self.publish_once()
            await self._clock.sleep_until(slot_floor(self._clock.now()) + SLOT)
