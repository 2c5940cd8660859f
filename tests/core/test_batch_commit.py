"""Group commit of appends and batch commit of the consumer, on a real redis-server.

The batched consumer must leave exactly what the one-entry-at-a-time consumer leaves (state,
counters, rejections) for any log: duplicates from earlier entries and within a batch, events
with a reused id and another payload, refusals and undecodable entries included, and a store
that settles only a prefix of a batch (the state in memory is then the committed prefix's).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from adapters import redis_keys as keys
from adapters.redis_store import APPEND_BATCH, RedisFleetStore
from controller.clock import SimClock
from controller.errors import RefusalCode, Refused, StoreUnavailable
from controller.events import Event, SocReported
from controller.planning.planner import StatePlanner
from controller.ports import BatchSettled, Settlement
from controller.service import ControllerService
from controller.settings import Settings
from controller.state import FleetState, apply_event
from tests.conftest import T0
from tests.factories import (
    PlanRecorder,
    ResultRecorder,
    consume_until_applied,
    small_site,
    soc_reported,
)

_sites = itertools.count(1)
GARBAGE = "not an event"


class PrefixFailingStore(RedisFleetStore):
    """A real store whose first batch longer than `fail_at` is settled only up to `fail_at`
    entries (written in Redis for real), answered as a store failing part-way answers. When
    the service, back from the outage, first writes again, its state in memory is compared
    with what the store committed: they must agree (the answered prefix, nothing more)."""

    def __init__(self, redis: Redis, site: str, fail_at: int) -> None:
        super().__init__(redis, site)
        self.fail_at = fail_at
        self.failed = False
        self.service: ControllerService | None = None
        self.state_at_failure: tuple[FleetState, FleetState] | None = None

    async def settle(self, settlements: Sequence[Settlement]) -> BatchSettled:
        """The first long enough batch: its prefix only, and an error."""
        if self.failed or len(settlements) <= self.fail_at:
            return await super().settle(settlements)
        self.failed = True
        done = await super().settle(settlements[: self.fail_at])
        assert done.error is None
        self._recovering = True  # as the store does when its script stops part-way
        return BatchSettled(done.done, error="injected failure after the prefix")

    async def count(self, name: str, by: int = 1) -> None:
        """On the recovery's first write, note the service's state and the committed one."""
        if name == "store_recoveries" and self.state_at_failure is None:
            assert self.service is not None
            self.state_at_failure = (self.service.state, await self.load())
        await super().count(name, by)


def _service(store: RedisFleetStore, site: str, *, batch: bool) -> ControllerService:
    return ControllerService(
        store=store,
        clock=SimClock(T0),
        planner=StatePlanner(),
        sink=PlanRecorder(),
        settings=Settings(site=site),
        results=ResultRecorder(),
        store_retry_s=0.02,
        batch_commit=batch,
    )


async def _consume(service: ControllerService) -> None:
    """Run the consumer (not the planner) until the log is drained."""
    await service.start()
    await consume_until_applied(service)


async def _append(redis: Redis, store: RedisFleetStore, site: str, log: Sequence[object]) -> None:
    """Append each item in order: an event, or GARBAGE as an undecodable entry."""
    for item in log:
        if item == GARBAGE:
            await redis.xadd(keys.events(site), {"event": "{broken"})
        else:
            await store.append(item)  # type: ignore[arg-type]


@dataclass
class Outcome:
    state: FleetState
    counters: Counter[str]
    rejected: list[str]


async def _run(
    redis: Redis,
    phases: Sequence[Sequence[object]],
    *,
    batch: bool,
    fail_at: int | None = None,
) -> Outcome:
    """Each phase appended, then consumed by a new process (service and store). With
    `fail_at`, each phase's store settles its first batch longer than that only in part."""
    site = f"s{next(_sites)}"
    counters: Counter[str] = Counter()
    for phase in phases:
        store = (
            RedisFleetStore(redis, site)
            if fail_at is None
            else PrefixFailingStore(redis, site, fail_at)
        )
        await store.load()  # makes the consumer group before garbage is appended
        await _append(redis, store, site, phase)
        service = _service(store, site, batch=batch)
        if isinstance(store, PrefixFailingStore):
            store.service = service
        await _consume(service)
        assert service.state == await store.load()  # memory agrees with what is committed
        if isinstance(store, PrefixFailingStore) and store.state_at_failure is not None:
            in_memory, committed = store.state_at_failure
            assert in_memory == committed  # the answered prefix, before the reload
        counters.update(service.counters)
    rejected = [r["reason"] for r in reversed(await RedisFleetStore(redis, site).rejected(1000))]
    keep: tuple[str, ...] = (
        "events_applied",
        "events_duplicate",
        "events_refused",
        "events_undecodable",
    )
    keep += ("events_batch_reloads",) if batch else ()
    return Outcome(
        await RedisFleetStore(redis, site).load(),
        Counter({k: counters[k] for k in keep}),
        rejected,
    )


@st.composite
def logs(draw: st.DrawFn) -> list[list[object]]:
    """A site's setup, then SoC reports, duplicates, reused ids and bad entries, in phases."""
    setup = small_site(T0, cars=2)
    items: list[object] = list(setup)
    for _n in range(draw(st.integers(0, 14))):
        choice = draw(st.sampled_from(["soc", "dup", "reuse", "unknown", "garbage"]))
        events = [i for i in items if isinstance(i, SocReported)]
        at = T0 + timedelta(minutes=draw(st.integers(0, 20)))
        soc = draw(st.integers(1, 99)) / 100
        if choice == "soc" or (choice in ("dup", "reuse") and not events):
            items.append(soc_reported(draw(st.sampled_from(["ev-1", "ev-2"])), soc, at))
        elif choice == "dup":
            items.append(draw(st.sampled_from(events)))
        elif choice == "reuse":  # the same event id, another payload
            earlier = draw(st.sampled_from(events))
            items.append(SocReported(event_id=earlier.event_id, at=at, vehicle_id="ev-1", soc=soc))
        elif choice == "unknown":
            items.append(soc_reported("ev-9", soc, at))  # refused: no such vehicle
        else:
            items.append(GARBAGE)
    cut = draw(st.integers(len(setup), len(items)))
    return [items[:cut], items[cut:]]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(phases=logs(), fail_at=st.none() | st.integers(0, 24))
async def test_the_batched_consumer_leaves_what_the_sequential_one_leaves(
    redis: Redis, phases: list[list[object]], fail_at: int | None
) -> None:
    """Same committed state, counters and rejections, for any log, with or without batching,
    and when the store settles only a prefix of a batch (`fail_at` entries) and recovers."""
    sequential = await _run(redis, phases, batch=False)
    batched = await _run(redis, phases, batch=True, fail_at=fail_at)
    assert batched.state == sequential.state
    assert batched.counters.pop("events_batch_reloads", 0) == 0
    assert batched.counters == sequential.counters
    assert batched.rejected == sequential.rejected


async def test_a_reused_event_id_in_one_batch_is_a_duplicate_and_changes_nothing(
    redis: Redis,
) -> None:
    """The second event with an id already in the batch is not applied: the state in memory and
    the store keep the first one's payload (a naive batch would apply both in memory)."""
    first = soc_reported("ev-1", 0.41, T0 + timedelta(minutes=1))
    again = SocReported(
        event_id=first.event_id, at=T0 + timedelta(minutes=2), vehicle_id="ev-1", soc=0.9
    )
    later = soc_reported("ev-2", 0.5, T0 + timedelta(minutes=3))
    outcome = await _run(redis, [[*small_site(T0, cars=2), first, again, later]], batch=True)
    expected = FleetState()
    for event in [*small_site(T0, cars=2), first, later]:
        expected = apply_event(expected, event).state  # type: ignore[arg-type]
    assert outcome.state == expected
    assert outcome.counters["events_duplicate"] == 1
    assert outcome.counters["events_batch_reloads"] == 0  # seen in the batch, not by luck


async def test_an_event_applied_from_another_entry_is_a_duplicate_in_the_next_batch(
    redis: Redis,
) -> None:
    """An id the applied set holds already (from an earlier entry) is settled as a duplicate."""
    setup = small_site(T0, cars=1)
    first = soc_reported("ev-1", 0.41, T0 + timedelta(minutes=1))
    again = SocReported(
        event_id=first.event_id, at=T0 + timedelta(minutes=2), vehicle_id="ev-1", soc=0.9
    )
    outcome = await _run(redis, [[*setup, first], [again]], batch=True)
    assert outcome.state.vehicles["ev-1"].energy_kwh == pytest.approx(0.41 * 60.0)
    assert outcome.counters["events_duplicate"] == 1
    assert outcome.counters["events_applied"] == len(setup) + 1
    assert outcome.counters["events_batch_reloads"] == 0  # found in the applied set first


async def test_settle_stops_at_a_failing_entry_and_writes_the_prefix_only(redis: Redis) -> None:
    """A failing commit inside a batch: those before it are written, none after it."""
    store = RedisFleetStore(redis, "depot")
    events: list[Event] = list(small_site(T0, cars=1))  # type: ignore[arg-type]
    await store.append_many(events)
    entries = list(await store.take(10))
    await redis.set(keys.table("depot", "vehicle"), "not a hash")  # HSET there fails
    state, batch = FleetState(), []
    for entry in entries:
        assert entry.event is not None
        outcome = apply_event(state, entry.event)
        state = outcome.state
        batch.append(Settlement(entry, entry.event.event_id, outcome.changes))
    settled = await store.settle(batch)
    failing = next(n for n, e in enumerate(events) if e.kind == "vehicle_registered")
    assert settled.done == (True,) * failing
    assert settled.error is not None
    assert "WRONGTYPE" in settled.error
    assert await store.applied_among([e.event_id for e in events]) == {
        e.event_id for e in events[:failing]
    }
    pending = await redis.xpending(keys.events("depot"), keys.EVENTS_GROUP)
    assert pending["pending"] == len(events) - failing


async def test_a_batch_that_fails_part_way_recovers_to_the_exact_state(redis: Redis) -> None:
    """The store refuses a write mid-batch; once it works again the consumer reloads, takes the
    unsettled entries again and ends where the sequential consumer ends."""
    site = "broken"
    events: list[object] = [*small_site(T0, cars=2), soc_reported("ev-1", 0.7, T0)]
    store = RedisFleetStore(redis, site)
    await store.append_many(events)  # type: ignore[arg-type]
    service = _service(store, site, batch=True)
    await service.start()
    await redis.set(keys.table(site, "vehicle"), "not a hash")
    task = asyncio.create_task(service._consume_forever())
    try:
        await service.counted("store_errors", 2)  # failed mid-batch, then the probe failed
        assert service.store_down_since is not None
        await redis.delete(keys.table(site, "vehicle"))
        await asyncio.wait_for(service.applied(), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    expected = await _run(redis, [events], batch=False)
    assert await store.load() == expected.state
    assert service.state == expected.state


async def test_concurrent_appends_keep_their_order_and_each_gets_its_own_ids(
    redis: Redis,
) -> None:
    """Appends queued in one pass of the loop (more than one pipeline's worth) are logged in
    the order they were queued; each caller gets the ids of its own events."""
    store = RedisFleetStore(redis, "depot")
    batches = [
        [soc_reported("ev-1", 0.5, T0) for _ in range(k % 5 + 1)] for k in range(APPEND_BATCH // 2)
    ]
    answers = await asyncio.gather(*(store.append_many(b) for b in batches))
    expected = [e.event_id for b in batches for e in b]
    assert [len(a) for a in answers] == [len(b) for b in batches]
    taken = await store.take(len(expected) + 10)
    assert [e.event.event_id for e in taken if e.event] == expected
    assert [e.entry_id for e in taken] == [i for a in answers for i in a]


async def test_a_cancelled_append_neither_loses_nor_holds_the_others(redis: Redis) -> None:
    """Cancelling one caller while its pipeline is in flight: the others get their ids."""
    store = RedisFleetStore(redis, "depot")
    events = [soc_reported("ev-1", 0.5, T0) for _ in range(20)]
    tasks = [asyncio.create_task(store.append(e)) for e in events]
    await asyncio.sleep(0)  # every append queued, the flusher started
    tasks[3].cancel()
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert isinstance(done[3], asyncio.CancelledError)
    assert all(isinstance(d, str) for n, d in enumerate(done) if n != 3)
    taken = await store.take(50)
    assert [e.event.event_id for e in taken if e.event] == [e.event_id for e in events]


async def test_a_cancelled_first_append_hands_the_queued_ones_over(redis: Redis) -> None:
    """The caller whose pipeline is in flight is cancelled: those queued behind it are still
    sent, in order, and answered."""
    store = RedisFleetStore(redis, "depot")
    events = [soc_reported("ev-1", 0.5, T0) for _ in range(10)]
    tasks = [asyncio.create_task(store.append(e)) for e in events]
    await asyncio.sleep(0)  # the first sends its own, the others queue behind it
    tasks[0].cancel()
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert isinstance(done[0], asyncio.CancelledError)
    assert all(isinstance(d, str) for d in done[1:])
    taken = [e.event.event_id for e in await store.take(50) if e.event]
    assert taken[-9:] == [e.event_id for e in events[1:]]
    assert await store.append(soc_reported("ev-1", 0.6, T0))  # nothing left stuck


async def test_appends_to_an_unreachable_server_all_fail_and_none_hangs(
    redis: Redis, tmp_path: object
) -> None:
    """Every queued caller gets StoreUnavailable when the pipeline cannot be sent."""
    # No retries: redis-py's default backs off up to 10 s between its 3 connection attempts.
    client = Redis(
        unix_socket_path=f"{tmp_path}/nobody.sock",
        socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    store = RedisFleetStore(client, "depot")
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(store.append(soc_reported("ev-1", 0.5, T0)) for _ in range(5)),
                return_exceptions=True,
            ),
            10,
        )
    finally:
        await client.aclose()
    assert all(isinstance(r, StoreUnavailable) for r in results)


async def test_submit_many_appends_the_admitted_in_order_and_refuses_the_others(
    redis: Redis,
) -> None:
    """A refused event (from the future) is answered and left out; the rest go in order."""
    store = RedisFleetStore(redis, "depot")
    service = _service(store, "depot", batch=True)
    ahead = timedelta(seconds=service.settings.max_event_ahead_s + 60)
    events = [
        soc_reported("ev-1", 0.2, T0),
        soc_reported("ev-1", 0.3, T0 + ahead),
        soc_reported("ev-2", 0.4, T0),
    ]
    outcomes = await service.submit_many(events)
    assert outcomes[0] is None
    assert outcomes[2] is None
    refusal = outcomes[1]
    assert isinstance(refusal, Refused)
    assert refusal.code is RefusalCode.FROM_THE_FUTURE
    taken = await store.take(10)
    assert [e.event for e in taken] == [events[0], events[2]]
    assert service.counters["events_received"] == 2
    assert service.counters["events_refused"] == 1
