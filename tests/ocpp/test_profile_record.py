"""The record of accepted profiles in Redis (`vp:{site}:cp_profiles`), written behind.

Each accepted profile used to cost two Redis round trips awaited by the charger's worker (read
the charger's record, write it back); a plan changes a few hundred chargers' profiles at once.
Now the record is kept in memory and every charger changed within one pass of the event loop
is written by one HSET. Counted from the server's own `INFO commandstats` (no mock).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.asyncio import Redis

from adapters import redis_keys as keys
from adapters.ocpp import central as central_module
from adapters.ocpp.aio import redis_call
from tests.ocpp.conftest import SITE, Harness


async def _stored(redis: Redis) -> dict[str, Any]:
    raw = await redis_call(redis.hgetall(keys.charger_profiles(SITE)))
    return {cid: json.loads(text) for cid, text in raw.items()}


async def _calls(redis: Redis, command: str) -> int:
    stats = await redis_call(redis.info("commandstats"))
    row = stats.get(f"cmdstat_{command}")
    return int(row["calls"]) if row else 0


def _profile(limit_w: float) -> dict[str, Any]:
    return {"connectorId": 1, "profile": {"limit": limit_w}, "leaseEnd": None}


async def test_a_pass_of_remembered_profiles_is_one_write_and_slots_merge_with_the_stored_record(
    harness: Harness,
) -> None:
    """CP-1 has a record from before (a `max` slot); 50 chargers' profiles remembered in one
    pass are written by one HSET, CP-1's merged with its old slots; a removed slot is gone
    from the next write."""
    redis, central = harness.redis, harness.central
    await redis_call(
        redis.hset(keys.charger_profiles(SITE), "CP-1", json.dumps({"max": _profile(22_000.0)}))
    )
    before = await _calls(redis, "hset")
    for n in range(1, 51):
        await central.remember_profile(f"CP-{n}", "tx:1", _profile(1_000.0 * n))
    await central.flush_profiles()
    assert await _calls(redis, "hset") - before == 1
    stored = await _stored(redis)
    assert len(stored) == 50
    assert stored["CP-1"] == {"max": _profile(22_000.0), "tx:1": _profile(1_000.0)}
    assert stored["CP-37"] == {"tx:1": _profile(37_000.0)}

    await central.remember_profile("CP-1", "tx:1", None)
    await central.remember_profile("CP-2", "tx:1", _profile(500.0))
    await central.flush_profiles()
    stored = await _stored(redis)
    assert stored["CP-1"] == {"max": _profile(22_000.0)}
    assert stored["CP-2"] == {"tx:1": _profile(500.0)}
    assert await _calls(redis, "hset") - before == 2
    assert central.metrics["profile_writes"] == 2


async def test_a_refused_write_is_kept_and_written_once_redis_takes_writes_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis refusing writes (maxmemory 1, noeviction): the write fails, is counted and
    logged, and nothing is lost: once Redis takes writes the record is complete. Stopping the
    central system writes what is still due."""
    monkeypatch.setattr(central_module, "PROFILE_RETRY_S", 0.05)
    redis, central = harness.redis, harness.central
    await central.remember_profile("CP-1", "default", _profile(7_000.0))
    await central.flush_profiles()
    policy = (await redis_call(redis.config_get("maxmemory-policy")))["maxmemory-policy"]
    await redis_call(redis.config_set("maxmemory-policy", "noeviction"))
    await redis_call(redis.config_set("maxmemory", "1"))
    try:
        await central.remember_profile("CP-1", "tx:1", _profile(3_000.0))
        await central.remember_profile("CP-2", "tx:1", _profile(4_000.0))
        await central.metrics.wait_for(lambda: central.metrics["profile_writes_failed"] >= 2)
        assert await _stored(redis) == {"CP-1": {"default": _profile(7_000.0)}}
    finally:
        await redis_call(redis.config_set("maxmemory", "0"))
        await redis_call(redis.config_set("maxmemory-policy", policy))
    await central.flush_profiles()
    assert await _stored(redis) == {
        "CP-1": {"default": _profile(7_000.0), "tx:1": _profile(3_000.0)},
        "CP-2": {"tx:1": _profile(4_000.0)},
    }

    await central.remember_profile("CP-3", "max", _profile(11_000.0))
    await central.stop()
    assert (await _stored(redis))["CP-3"] == {"max": _profile(11_000.0)}
