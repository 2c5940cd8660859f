"""Hot paths the 1,000-charger soak found in the controller process (benchmarks/soak.py,
docs/reliability.md): kept fast without changing what they return.

- `CentralSystem.active_transactions` is asked for every charger at every plan by the lease
  dispatcher; it scanned every running transaction of the site each time (quadratic). It is
  now an index by charger, checked here against a plain model over random opens and closes.
- A new plan was looked at for every charger in one step of the event loop (~180 ms at 1,000
  chargers, every plan); the dispatcher now yields every `PUBLISH_CHUNK` chargers and holds
  increases while it does.
- A plan's summary was built and JSON-encoded twice per plan (Redis and MQTT), rounding each
  setpoint value one by one; it is now built once per plan, in one numpy pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from adapters.ocpp.config import LeaseConfig
from adapters.ocpp.dispatcher import WAKE_CHUNK, LeaseDispatcher, _Link
from adapters.redis_store import RedisFleetStore, plan_summary, plan_summary_json
from controller.clock import SimClock
from tests.ocpp.conftest import Harness, charger, fleet, plan_for, running_central


async def test_running_transactions_by_charger_follow_every_open_and_close(
    harness: Harness,
) -> None:
    """Random opens and closes (some with a stale id) on three chargers, two connectors each:
    each charger's running transactions equal a model kept beside them."""
    central = harness.central
    rng = random.Random(11)
    model: dict[tuple[str, int], int] = {}
    chargers = ["CP-1", "CP-2", "CP-3"]
    next_tx = 1
    for _ in range(600):
        charger_id, connector_id = rng.choice(chargers), rng.choice([1, 2])
        if rng.random() < 0.5:
            central.open_transaction(charger_id, connector_id, next_tx)
            model[(charger_id, connector_id)] = next_tx
            next_tx += 1
        else:
            running = model.get((charger_id, connector_id))
            stale = running is None or rng.random() < 0.3
            tx = rng.randrange(1, next_tx + 1) if stale else running
            assert tx is not None
            central.close_transaction(charger_id, connector_id, tx)
            if running == tx:
                del model[(charger_id, connector_id)]
        for cid in chargers:
            want = {c: t for (m, c), t in model.items() if m == cid}
            got = central.active_transactions(cid)
            assert got == want or (got is None and not want), (cid, got, want)
    # What it returns is a copy: changing it changes nothing inside.
    got = central.active_transactions("CP-1")
    assert got is not None
    got[9] = 999
    assert 9 not in (central.active_transactions("CP-1") or {})
    assert central.active_transactions("CP-unknown") is None


def test_the_summary_rounds_every_setpoint_to_the_millikilowatt() -> None:
    """Equal-length rows (the numpy pass) and a ragged plan (one value at a time) give each
    value within 0.5 W of the plan's, in order, for every connector."""
    now = datetime(2024, 3, 4, 12, 7, tzinfo=UTC)
    rng = random.Random(3)
    setpoints = {(f"CP-{i}", 1): [rng.uniform(-11, 11) for _ in range(8)] for i in range(50)}
    plan = plan_for(now, setpoints)
    summary = plan_summary(plan)
    assert [s["charger_id"] for s in summary["setpoints"]] == [s.charger_id for s in plan.setpoints]
    for row, setpoint in zip(summary["setpoints"], plan.setpoints, strict=True):
        assert len(row["kw"]) == len(setpoint.kw)
        assert all(
            abs(a - b) <= 0.0005 + 1e-12 for a, b in zip(row["kw"], setpoint.kw, strict=True)
        )
        assert all(a == round(a, 3) for a in row["kw"])
    ragged = dataclasses.replace(
        plan, setpoints=(plan.setpoints[0], dataclasses.replace(plan.setpoints[1], kw=(1.23456,)))
    )
    assert [s["kw"] for s in plan_summary(ragged)["setpoints"]][1] == [1.235]


async def test_one_plan_is_summarised_once_for_redis_and_mqtt(redis: Redis) -> None:
    """The Redis copy and the JSON published over MQTT are the same text, made once per plan
    (the same object back for the same plan, a new one for the next plan)."""
    now = datetime(2024, 3, 4, 12, 7, tzinfo=UTC)
    first = plan_for(now, {("CP-1", 1): [3.0, 4.0]})
    second = plan_for(now, {("CP-1", 1): [5.0]})
    text = plan_summary_json(first)
    assert plan_summary_json(first) is text
    assert json.loads(text) == json.loads(json.dumps(plan_summary(first)))
    store = RedisFleetStore(redis, "hot")
    await store.save_plan(first)
    assert await store.latest_plan() == json.loads(text)
    other = plan_summary_json(second)
    assert other is not text
    assert json.loads(other)["setpoints"][0]["kw"][0] == 5.0


async def test_a_plan_for_many_chargers_gives_the_loop_back_and_wakes_the_held_at_its_end(
    redis: Redis, clock: SimClock
) -> None:
    """Looking through 350 chargers at a new plan, the dispatcher yields to the event loop
    (other tasks run, and see it publishing, so workers hold their increases meanwhile: P-04);
    at the end every changed charger's worker is woken, and so is one that held an increase."""
    state = fleet([charger(f"CP-{i}") for i in range(350)], safe_limit_kw=1000.0)
    async with running_central(redis, clock, state) as harness:
        dispatcher = LeaseDispatcher(harness.central, clock, LeaseConfig(), state=lambda: state)
        # Links without workers (no charger connects here): only the look at the plan runs.
        for charger_id in state.chargers:
            dispatcher._links[charger_id] = _Link(charger_id)
        held = dispatcher._links["CP-7"]
        held.held = True
        seen: list[bool] = []

        async def ticker() -> None:
            while True:
                seen.append(dispatcher._publishing)
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        seen.clear()
        plan = plan_for(clock.now(), {(cid, 1): [5.0] for cid in state.chargers})
        await dispatcher.publish(plan, state)
        woken_at_once = sum(link.wake.is_set() for link in dispatcher._links.values())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sum(seen) >= 3  # at least once per 100 chargers, while publishing
        assert not dispatcher._publishing
        links = list(dispatcher._links.values())
        # Every changed charger is busy at once (a settle waits for all of them) ...
        assert not any(link.idle.is_set() for link in links)
        assert not held.held
        # ... but woken WAKE_CHUNK per pass of the loop, so calls arriving meanwhile are
        # served between chunks rather than behind 350 workers' steps.
        assert 0 < woken_at_once <= WAKE_CHUNK + 1
        assert held.wake.is_set()  # in the first chunk: the plan wakes in charger order
        passes = 0
        while not all(link.wake.is_set() for link in links):
            await asyncio.sleep(0)
            passes += 1
        assert passes >= len(links) // WAKE_CHUNK - 1
        await dispatcher.close()


def _reaches(root: object, target: object, depth: int = 6) -> bool:
    """Whether `target` is reachable from `root` through containers and object attributes."""
    if root is target:
        return True
    if depth == 0 or isinstance(root, str | int | float | bytes | datetime | asyncio.Event):
        return False
    if isinstance(root, dict):
        children: list[object] = [*root.keys(), *root.values()]
    elif isinstance(root, list | tuple | set | frozenset):
        children = list(root)
    elif dataclasses.is_dataclass(root):
        children = [getattr(root, f.name) for f in dataclasses.fields(root)]
    else:
        return False
    return any(_reaches(child, target, depth - 1) for child in children)


async def test_a_charger_left_alone_by_a_new_plan_keeps_no_old_plan_alive(
    redis: Redis, clock: SimClock
) -> None:
    """A charger whose inputs did not change at the next plan keeps what it was built from,
    but not the old plan itself (each plan holds every connector's setpoints: the soak found
    42 old plans alive at 1,000 chargers)."""
    state = fleet([charger(f"CP-{i}") for i in (1, 2, 3)], safe_limit_kw=100.0)
    async with running_central(redis, clock, state) as harness:
        dispatcher = LeaseDispatcher(harness.central, clock, LeaseConfig(), state=lambda: state)
        for charger_id in state.chargers:
            dispatcher._links[charger_id] = _Link(charger_id)
        old = plan_for(clock.now(), {(cid, 1): [5.0] for cid in state.chargers})
        await dispatcher.publish(old, state)
        assert all(link.basis is not None for link in dispatcher._links.values())
        new = plan_for(clock.now(), {("CP-1", 1): [7.0], ("CP-2", 1): [5.0], ("CP-3", 1): [5.0]})
        unchanged = dispatcher.counters["plan_chargers_unchanged"]
        await dispatcher.publish(new, state)
        assert dispatcher.counters["plan_chargers_unchanged"] == unchanged + 2  # CP-2, CP-3
        assert not _reaches(dispatcher._links, old)
        assert _reaches(dispatcher._links, new.setpoints[0])  # CP-1 was looked at again
        await dispatcher.close()
