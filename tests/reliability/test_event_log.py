"""Nothing lost, nothing doubled on the event log (RELIABILITY.md R-03, R-04, R-05).

Every test runs on the session's real redis-server. Consumers "die" by being dropped between
`take` and `commit`, which is exactly what a SIGKILL leaves behind in the consumer group.
"""

from __future__ import annotations

from redis.asyncio import Redis

from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.events import Event
from controller.state import FleetState, apply_event
from tests.conftest import T0
from tests.factories import small_site, soc_reported

STREAM = "vp:{depot}:events"
NO_TRIM = LogPolicy(trim_every=0)


async def _settle(store: RedisFleetStore, state: FleetState) -> FleetState:
    """Apply and commit everything the store hands over, until it says the log is drained."""
    while entries := await store.take(50):
        for entry in entries:
            assert entry.event is not None
            outcome = apply_event(state, entry.event)
            await store.commit(entry, entry.event.event_id, outcome.changes)
            state = outcome.state
    return state


async def _site(redis: Redis) -> FleetState:
    store = RedisFleetStore(redis, "depot", policy=NO_TRIM)
    for event in small_site(T0, cars=2):
        await store.append(event)  # type: ignore[arg-type]
    return await _settle(store, FleetState())


async def test_a_dead_consumers_stale_entry_is_claimed_by_another_and_applied_once(
    redis: Redis,
) -> None:
    """R-04: consumer `a` takes an entry and dies; `b` claims it once it is idle long enough."""
    state = await _site(redis)
    a = RedisFleetStore(redis, "depot", consumer="a", policy=NO_TRIM)
    event = soc_reported("ev-1", 0.61, T0)
    await a.append(event)
    [taken] = await a.take(10)
    patient = RedisFleetStore(
        redis, "depot", consumer="b", policy=LogPolicy(claim_idle_ms=3_600_000, trim_every=0)
    )
    assert await patient.take(10) == []  # not idle for an hour: a is presumed alive
    b = RedisFleetStore(redis, "depot", consumer="b", policy=LogPolicy(claim_idle_ms=0))
    [claimed] = await b.take(10)
    assert claimed.entry_id == taken.entry_id
    assert claimed.deliveries == 2
    assert claimed.event == event
    state = apply_event(state, event).state
    assert await b.commit(claimed, event.event_id, apply_event(state, event).changes)
    assert (await redis.xpending(STREAM, "controller"))["pending"] == 0
    assert (await b.counters())["events_claimed"] == 1
    assert await b.take(10) == []


async def test_an_entry_delivered_more_than_k_times_is_dead_lettered_with_its_reason(
    redis: Redis,
) -> None:
    """R-04: a poison entry that kills every consumer goes to the rejected stream after K."""
    await _site(redis)
    policy = LogPolicy(max_deliveries=3, trim_every=0)
    poison = soc_reported("ev-1", 0.2, T0)
    good = soc_reported("ev-2", 0.3, T0)
    await RedisFleetStore(redis, "depot").append(poison)
    for delivery in range(1, 4):  # three processes take it and crash before committing
        [entry] = await RedisFleetStore(redis, "depot", policy=policy).take(1)
        assert entry.deliveries == delivery
    await RedisFleetStore(redis, "depot").append(good)
    survivor = RedisFleetStore(redis, "depot", policy=policy)
    [entry] = await survivor.take(10)
    assert entry.event == good  # the poison entry was not handed over a fourth time
    [dead] = await survivor.rejected()
    assert dead["reason"] == "dead-letter: delivered 4 times (limit 3)"
    assert poison.event_id in dead["event"]
    assert (await survivor.counters())["events_dead_lettered"] == 1
    pending = await redis.xpending_range(STREAM, "controller", "-", "+", 10)
    assert [p["message_id"] for p in pending] == [entry.entry_id]


async def test_trimming_never_removes_a_pending_or_undelivered_entry(redis: Redis) -> None:
    """R-05: the cut stops at the oldest pending entry; everything above survives."""
    state = await _site(redis)
    store = RedisFleetStore(redis, "depot", policy=LogPolicy(trim_every=0, keep_settled_ms=0))
    events = [soc_reported(f"ev-{1 + i % 2}", 0.1 + i / 100, T0) for i in range(8)]
    for event in events[:6]:
        await store.append(event)
    taken = await store.take(6)
    settled = [taken[0], taken[1], taken[3], taken[5]]  # 2 and 4 stay pending (a crash)
    for entry in settled:
        assert entry.event is not None
        await store.commit(entry, entry.event.event_id, apply_event(state, entry.event).changes)
    for event in events[6:]:
        await store.append(event)  # never delivered
    before = await redis.xlen(STREAM)
    removed = await store.trim()
    assert removed == before - 6  # site events and taken[0..1] went; taken[2] is the cut
    remaining = [e[0] for e in await redis.xrange(STREAM)]
    assert remaining[0] == taken[2].entry_id
    successor = RedisFleetStore(redis, "depot", policy=NO_TRIM)
    again = await successor.take(10)
    assert [e.entry_id for e in again] == [taken[2].entry_id, taken[4].entry_id]
    for entry in again:
        assert entry.event is not None
        await successor.commit(entry, entry.event.event_id, apply_event(state, entry.event).changes)
    fresh = await successor.take(10)
    assert [e.event for e in fresh] == events[6:]


async def test_the_log_is_trimmed_as_commits_go_and_keeps_its_retention(redis: Redis) -> None:
    """R-05: automatic trimming every N commits; a retention window keeps recent entries."""
    await _site(redis)
    keeping = RedisFleetStore(redis, "depot", policy=LogPolicy(trim_every=1))
    for i in range(5):
        await keeping.append(soc_reported("ev-1", 0.1 * (i + 1), T0))
    await _settle(keeping, await keeping.load())
    assert await redis.xlen(STREAM) >= 5  # a day's retention keeps them
    cutting = RedisFleetStore(redis, "depot", policy=LogPolicy(trim_every=2, keep_settled_ms=0))
    for i in range(4):
        await cutting.append(soc_reported("ev-2", 0.1 * (i + 1), T0))
    await _settle(cutting, await cutting.load())
    assert await redis.xlen(STREAM) <= 2
    assert (await cutting.counters())["events_trimmed"] >= 7


async def test_an_entry_deleted_while_pending_is_settled_and_counted(redis: Redis) -> None:
    """A pending entry removed by another writer does not stay pending for ever."""
    await _site(redis)
    store = RedisFleetStore(redis, "depot", policy=NO_TRIM)
    first, second = soc_reported("ev-1", 0.4, T0), soc_reported("ev-2", 0.5, T0)
    await store.append(first)
    await store.append(second)
    taken = await store.take(10)
    await redis.xdel(STREAM, taken[0].entry_id)
    successor = RedisFleetStore(redis, "depot", policy=NO_TRIM)
    [entry] = await successor.take(10)
    assert entry.event == second
    assert (await successor.counters())["events_pending_deleted"] == 1


async def test_replaying_the_whole_log_twice_doubles_nothing(redis: Redis) -> None:
    """R-03: a consumer that dies after commit but before it knew is harmless."""
    store = RedisFleetStore(redis, "depot", policy=NO_TRIM)
    events: list[Event] = [*small_site(T0, cars=2), soc_reported("ev-1", 0.7, T0)]  # type: ignore[list-item]
    for event in events:
        await store.append(event)
        await store.append(event)  # every event delivered twice (QoS1 style)
    state = await _settle(store, FleetState())
    counters = await store.counters()
    assert await store.load() == state
    assert state.vehicles["ev-1"].soc == 0.7
    assert counters.get("events_claimed", 0) == 0
    assert await redis.zcard("vp:{depot}:applied") == len(events)


async def test_a_commit_sent_again_after_its_answer_was_lost_reports_its_changes_written(
    redis: Redis,
) -> None:
    """The client re-sends a command whose connection dropped before the answer came (the
    embedded endpoint retries 3 times), and the first one may have run: the commit is then
    sent twice for one entry. The second answer must say the changes are in the store
    (True), or the consumer keeps a state without them while Redis has them (it used to count
    a duplicate). A second entry with the same event id is still a duplicate (False)."""
    state = await _site(redis)
    store = RedisFleetStore(redis, "depot", policy=NO_TRIM)
    event = soc_reported("ev-1", 0.42, T0)
    await store.append(event)
    await store.append(event)  # the same event appended twice (a producer's retry)
    first, second = await store.take(10)
    changes = apply_event(state, event).changes
    assert await store.commit(first, event.event_id, changes)
    assert await store.commit(first, event.event_id, changes)  # the same commit, re-sent
    assert not await store.commit(second, event.event_id, changes)  # a duplicate entry
    assert (await redis.xpending(STREAM, "controller"))["pending"] == 0
    assert (await store.load()).vehicles["ev-1"].soc == 0.42
