"""Read what `voltpool status` shows from Redis: fleet, latest plan, counters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters.embedded import redis_endpoint
from adapters.redis_store import RedisFleetStore
from controller.settings import Settings


async def read_status(settings: Settings) -> dict[str, Any]:
    """The site's fleet, latest plan summary and counters, as plain data."""
    async with redis_endpoint(settings.redis_url, Path(settings.data_dir)) as endpoint:
        client = endpoint.client()
        try:
            store = RedisFleetStore(client, settings.site)
            state = await store.load()
            plan = await store.latest_plan()
            counters = await store.counters()
        finally:
            await client.aclose()
    now_kw: dict[str, float] = {}
    if plan:
        for setpoint in plan["setpoints"]:
            now_kw[setpoint["vehicle_id"]] = setpoint["kw"][0] if setpoint["kw"] else 0.0
    vehicles = [
        {
            "vehicle_id": v.vehicle_id,
            "model": v.model,
            "soc": v.soc,
            "energy_kwh": v.energy_kwh,
            "plugged_into": f"{v.charger_id}/{v.connector_id}" if v.plugged_in else None,
            "departure": v.departure.isoformat() if v.departure else None,
            "target_kwh": v.target_kwh,
            "now_kw": now_kw.get(v.vehicle_id),
        }
        for v in sorted(state.vehicles.values(), key=lambda v: v.vehicle_id)
    ]
    return {
        "site": settings.site,
        "vehicles": vehicles,
        "chargers": sorted(state.chargers),
        "plan": plan,
        "counters": counters,
    }
