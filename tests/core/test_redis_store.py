"""The Redis fleet store on a real redis-server: atomic, idempotent, recoverable."""

from __future__ import annotations

from redis.asyncio import Redis

from adapters.redis_store import RedisFleetStore
from controller.events import Event
from controller.state import FleetState, apply_event
from tests.conftest import T0
from tests.factories import small_site, soc_reported


async def _apply_all(store: RedisFleetStore, events: list[Event]) -> FleetState:
    state = FleetState()
    for event in events:
        await store.append(event)
    for entry in await store.take(100):
        assert entry.event is not None
        outcome = apply_event(state, entry.event)
        assert await store.commit(entry, entry.event.event_id, outcome.changes)
        state = outcome.state
    return state


async def test_applying_an_event_twice_changes_nothing(redis: Redis) -> None:
    """The second delivery of the same event id is recognised and ignored."""
    store = RedisFleetStore(redis, "depot")
    state = await _apply_all(store, small_site(T0, cars=1))  # type: ignore[arg-type]
    event = soc_reported("ev-1", 0.4, T0)
    await store.append(event)
    await store.append(event)
    first, second = await store.take(10)
    outcome = apply_event(state, event)
    assert await store.commit(first, event.event_id, outcome.changes) is True
    assert await store.commit(second, event.event_id, outcome.changes) is False
    assert await redis.xpending("vp:{depot}:events", "controller") == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_loaded_state_equals_the_state_that_was_committed(redis: Redis) -> None:
    """Every record written by commits comes back from load() as it was."""
    store = RedisFleetStore(redis, "depot")
    state = await _apply_all(store, small_site(T0, cars=3))  # type: ignore[arg-type]
    loaded = await RedisFleetStore(redis, "depot").load()
    assert loaded == state
    assert len(loaded.vehicles) == 3
    assert loaded.vehicles["ev-2"].charger_id == "cp-2"


async def test_keys_are_grouped_per_site_with_a_hash_tag(redis: Redis) -> None:
    """Every key of a site carries `{site}`, so the site lives on one cluster slot."""
    store = RedisFleetStore(redis, "depot")
    await _apply_all(store, small_site(T0, cars=1))  # type: ignore[arg-type]
    assert sorted(await redis.keys("*")) == [
        "vp:{depot}:applied",
        "vp:{depot}:chargers",
        "vp:{depot}:events",
        "vp:{depot}:site",
        "vp:{depot}:vehicles",
    ]


async def test_an_entry_taken_but_not_settled_is_taken_again_by_the_next_process(
    redis: Redis,
) -> None:
    """A consumer that dies between take and commit leaves the entry pending for its successor."""
    first = RedisFleetStore(redis, "depot")
    event = soc_reported("ev-1", 0.5, T0)
    await first.append(event)
    taken = await first.take(10)
    assert [e.event for e in taken] == [event]
    successor = RedisFleetStore(redis, "depot")
    again = await successor.take(10)
    assert [e.entry_id for e in again] == [taken[0].entry_id]
    assert again[0].deliveries > 1


async def test_an_undecodable_entry_is_handed_over_as_none_and_can_be_rejected(
    redis: Redis,
) -> None:
    """Garbage written to the log by another writer does not stop the consumer."""
    store = RedisFleetStore(redis, "depot")
    await store.append(soc_reported("ev-1", 0.5, T0))
    await redis.xadd("vp:{depot}:events", {"event": "{not json"})
    entries = await store.take(10)
    assert [e.event is None for e in entries] == [False, True]
    await store.reject(entries[1], "undecodable")
    rejected = await store.rejected()
    assert rejected[0]["reason"] == "undecodable"
    assert rejected[0]["event"] == "{not json"


async def test_aof_is_on_for_the_test_server(redis: Redis) -> None:
    """The embedded server runs with an append-only file, as production does."""
    assert (await RedisFleetStore(redis, "depot").durability())["appendonly"] == "yes"
