"""A taken batch holds a bounded number of fleet states, whatever its length.

Each applied event makes a new `FleetState` whose changed tables are fresh copies (at 1,000
chargers: 26 KB of chargers, 104 KB of vehicles, up to 148 KB of transactions). The batch
consumer once kept the state after every entry of a 256-entry batch until the store had
settled it: tens of MiB allocated per batch, and the controller's resident set grew with the
allocator's high-water mark (docs/reliability.md, "RSS"). These tests count the `FleetState`
objects alive (the garbage collector's view) while a full batch is settled and while its
commands' results are published, on a real Redis.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
from collections.abc import Sequence
from datetime import timedelta

from redis.asyncio import Redis

from adapters.redis_store import RedisFleetStore
from controller.clock import SimClock
from controller.events import PauseVehicle
from controller.planning.planner import StatePlanner
from controller.ports import BatchSettled, Settlement
from controller.service import TAKE_BATCH, ControllerService
from controller.settings import Settings
from controller.state import FleetState, apply_event
from tests.conftest import T0
from tests.factories import PlanRecorder, consume_until_applied, small_site, soc_reported

_sites = itertools.count(1)

# The batch's start state and its end state, and one being walked between them (a command's
# result); anything more grows with the batch.
MOST_STATES = 3


def states_alive() -> int:
    """How many `FleetState` objects are alive now (after a full collection)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, FleetState))


class CountingStore(RedisFleetStore):
    """A real store that counts the fleet states alive when a batch is settled."""

    def __init__(self, redis: Redis, site: str) -> None:
        super().__init__(redis, site)
        self.at_settle: list[tuple[int, int]] = []  # (entries settled, states alive)

    async def settle(self, settlements: Sequence[Settlement]) -> BatchSettled:
        """Count, then settle."""
        self.at_settle.append((len(settlements), states_alive()))
        return await super().settle(settlements)


class CountingResults:
    """Results port that counts the fleet states alive at each command's result."""

    def __init__(self) -> None:
        self.alive: dict[str, int] = {}

    async def command_result(self, command_id: str, ok: bool, reason: str) -> None:
        """Count, then yield as a real publish does."""
        self.alive[command_id] = states_alive() if ok else -1
        await asyncio.sleep(0)


def _batch(pauses: int) -> list[object]:
    """A full batch: a small depot, then SoC reports (each applied: a new state), with
    `pauses` operator commands spread evenly through the reports."""
    setup: list[object] = list(small_site(T0, cars=2))
    count = TAKE_BATCH - len(setup) - pauses
    reports: list[object] = [
        soc_reported(f"ev-{n % 2 + 1}", 0.2 + 0.7 * n / count, T0 + timedelta(seconds=n + 1))
        for n in range(count)
    ]
    expiry = T0 + timedelta(hours=1)
    for k in reversed(range(pauses)):
        reports.insert(
            (k + 1) * count // (pauses + 1),
            PauseVehicle(event_id=f"pause-{k}", at=T0, expires_at=expiry, vehicle_id="ev-1"),
        )
    events = setup + reports
    assert len(events) == TAKE_BATCH
    return events


async def _consume(
    redis: Redis, events: list[object]
) -> tuple[CountingStore, CountingResults, int]:
    """Append `events`, let a fresh batch consumer take them in one batch; return the store,
    the results port and the states alive before the consumer started."""
    site = f"states-{next(_sites)}"
    store = CountingStore(redis, site)
    await store.append_many(events)  # type: ignore[arg-type]
    results = CountingResults()
    service = ControllerService(
        store=store,
        clock=SimClock(T0),
        planner=StatePlanner(),
        sink=PlanRecorder(),
        settings=Settings(site=site),
        results=results,
    )
    await service.start()
    before = states_alive()
    await consume_until_applied(service)
    expected = FleetState()
    for event in events:
        expected = apply_event(expected, event).state  # type: ignore[arg-type]
    assert service.state == expected
    assert service.counters["events_applied"] == TAKE_BATCH
    return store, results, before


async def test_a_full_batch_is_settled_holding_its_start_and_end_states_only(
    redis: Redis,
) -> None:
    """256 applied entries in one batch: at settle time, at most a few states more than
    before the consumer ran (the old consumer held one per entry: ~256 more)."""
    store, _, before = await _consume(redis, _batch(pauses=0))
    assert [n for n, _ in store.at_settle] == [TAKE_BATCH]
    (_, alive), *_ = store.at_settle
    assert alive - before <= MOST_STATES


async def test_a_batchs_command_results_are_published_holding_few_states(redis: Redis) -> None:
    """Commands spread through a full batch: each result finds its pause in force (the state
    walked up to it) while a bounded number of states are alive."""
    store, results, before = await _consume(redis, _batch(pauses=3))
    assert [n for n, _ in store.at_settle] == [TAKE_BATCH]
    assert set(results.alive) == {"pause-0", "pause-1", "pause-2"}
    assert all(0 <= alive - before <= MOST_STATES for alive in results.alive.values())
    assert store.at_settle[0][1] - before <= MOST_STATES
