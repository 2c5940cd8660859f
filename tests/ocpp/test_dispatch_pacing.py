"""The lease dispatcher's workers take turns: at most `reconciles_per_pass` begin a look (build
their profiles and send what is due) in one pass of the event loop, bring-ups and decreases
first, then new transactions, then the rest.

Why (issue #8, the 1,000-charger soak's round-trip tail): a plan wakes a few hundred workers, a
slot boundary's lease refreshes as many on their timers, and every answer to a profile resumes
its worker; each pass of the loop an inbound CALL needs (its frame, its handler, its Redis
replies, its answer) waited behind all of their steps. Counted here in passes of the loop and
in the order of events, never in wall time. Real central system, real WebSockets, simulated
chargers on a `SimClock`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import pytest
from ocpp.v16 import call
from redis.asyncio import Redis

from adapters.ocpp.config import LeaseConfig
from adapters.ocpp.dispatcher import (
    PRIORITY_FIRST,
    PRIORITY_NEW_TRANSACTION,
    PRIORITY_OTHER,
    LeaseDispatcher,
    _Link,
    _Pacer,
)
from controller.clock import SimClock
from simulators.chargepoints.chargepoint import ChargerSpec, SimChargePoint
from tests.ocpp.conftest import charger, connected, fleet, plan_for, running_central
from tests.ocpp.test_dispatcher import Rig, a_car, brought_up


class Passes:
    """Counts the passes of the event loop: a callback that schedules itself again runs
    exactly once per pass."""

    def __init__(self) -> None:
        self.n = 0
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.n += 1
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        """Stop counting."""
        self._handle.cancel()


def spy_on_reconciles(dispatcher: LeaseDispatcher, passes: Passes) -> list[tuple[int, str]]:
    """Record (pass, charger) each time a worker begins a look (`_reconcile`)."""
    begun: list[tuple[int, str]] = []
    original: Callable[[_Link], Awaitable[bool]] = dispatcher._reconcile

    async def reconcile(link: _Link) -> bool:
        begun.append((passes.n, link.charger_id))
        return await original(link)

    dispatcher._reconcile = reconcile  # type: ignore[method-assign]
    return begun


@asynccontextmanager
async def paced_rig(
    redis: Redis, clock: SimClock, n: int, per_pass: int, safe_kw: float = 12.0
) -> AsyncIterator[tuple[Rig, list[SimChargePoint]]]:
    """`n` simulated chargers CP-0..CP-(n-1) connected and brought up (default and max
    profiles accepted), a safe share of `safe_kw` each, a dispatcher with `per_pass` turns per
    pass of the loop."""
    state = fleet([charger(f"CP-{i}") for i in range(n)], safe_limit_kw=safe_kw * n)
    async with running_central(redis, clock, state) as harness, AsyncExitStack() as stack:
        dispatcher = LeaseDispatcher(
            harness.central, clock, LeaseConfig(), reconciles_per_pass=per_pass
        )
        await dispatcher.publish(plan_for(clock.now(), {}), state)
        r = Rig(harness, dispatcher, state)
        try:
            sims = []
            for i in range(n):
                sim = SimChargePoint(ChargerSpec(charger_id=f"CP-{i}", max_power_kw=22.0), clock)
                sims.append(await stack.enter_async_context(connected(harness, sim)))
            for sim in sims:
                await brought_up(r, sim)
            yield r, sims
        finally:
            await dispatcher.close()


def tx_profiles(sim: SimChargePoint) -> int:
    """TxProfiles the charger received."""
    return sum(1 for r in sim.received if r.purpose == "TxProfile")


async def test_the_pacer_grants_at_most_its_bound_per_pass_by_priority_then_order() -> None:
    """30 turns asked for at once, bound 4: at most 4 granted per pass of the loop; every
    turn of a lower priority number before any of a higher one, the same priority in the
    order asked; a waiter cancelled before its turn is skipped."""
    pacer = _Pacer(4)
    passes = Passes()
    granted: list[tuple[int, int, int]] = []  # (pass, priority, asked as)

    async def one(priority: int, k: int) -> None:
        await pacer.turn(priority)
        granted.append((passes.n, priority, k))

    priorities = [(k * 7) % 3 for k in range(30)]
    tasks = [asyncio.create_task(one(p, k)) for k, p in enumerate(priorities)]
    await asyncio.sleep(0)  # every task has asked
    assert pacer.waiting() == 30
    tasks[5].cancel()  # waits its turn: skipped, nobody else loses one
    await asyncio.gather(*tasks, return_exceptions=True)
    passes.stop()
    assert len(granted) == 29
    per_pass = Counter(p for p, _, _ in granted)
    assert max(per_pass.values()) == 4
    assert len(per_pass) == 8  # ceil(29 / 4) passes, one after the other
    assert [(pr, k) for _, pr, k in granted] == sorted(
        (pr, k) for k, pr in enumerate(priorities) if k != 5
    )
    with pytest.raises(ValueError, match="at least 1"):
        _Pacer(0)


async def test_a_plan_that_moves_every_charger_begins_at_most_the_bound_of_looks_per_pass(
    redis: Redis, clock: SimClock
) -> None:
    """40 chargers with a car each, a plan moving all of them: at most 4 workers begin a look
    in any pass of the loop (before, the plan woke them 20 per pass and each one's answer
    resumed it on top), and every charger still gets its TxProfile."""
    async with paced_rig(redis, clock, 40, per_pass=4) as (r, sims):
        for sim in sims:
            await sim.plug_in(1, a_car())
        await r.publish({(s.spec.charger_id, 1): [8.0] for s in sims}, headroom_kw=1000.0)
        for sim in sims:
            await sim.wait_for(lambda s=sim: tx_profiles(s) >= 1)  # type: ignore[misc]
        for sim in sims:
            await r.dispatcher.settled(sim.spec.charger_id)
        passes = Passes()
        begun = spy_on_reconciles(r.dispatcher, passes)
        await r.publish({(s.spec.charger_id, 1): [11.0] for s in sims}, headroom_kw=1000.0)
        for sim in sims:
            await sim.wait_for(lambda s=sim: tx_profiles(s) >= 2)  # type: ignore[misc]
        for sim in sims:
            await r.dispatcher.settled(sim.spec.charger_id)
        passes.stop()
        looked = {charger_id for _, charger_id in begun}
        assert looked == {s.spec.charger_id for s in sims}
        per_pass = Counter(p for p, _ in begun)
        assert max(per_pass.values()) <= 4, per_pass.most_common(3)
        # Each worker looks at least twice (it sends, then looks again at its answer).
        assert len(begun) >= 2 * len(sims)


async def test_a_workers_turn_is_asked_for_by_what_it_has_to_send(
    redis: Redis, clock: SimClock
) -> None:
    """The priority a worker asks its turn with: a bring-up (nothing accepted on this
    connection yet) or a decrease due first, then a running transaction without its TxProfile
    (a new transaction, whose first TxProfile is the re-plan time), then the rest; with the
    pacer's order (previous test), a new transaction's look goes ahead of the lease
    refreshes and plan moves queued before it."""
    state = fleet([charger("CP-1"), charger("CP-2")], safe_limit_kw=20.0)
    async with running_central(redis, clock, state) as harness:
        dispatcher = LeaseDispatcher(harness.central, clock, LeaseConfig(), state=lambda: state)
        plan = plan_for(clock.now(), {("CP-1", 1): [8.0]})
        await dispatcher.publish(plan, state)
        link = _Link("CP-1")
        assert dispatcher._priority(link) == PRIORITY_FIRST  # nothing accepted yet
        now = clock.now()
        default, cap = dispatcher.wanted("CP-1", now) or []
        link.sent = {"default": default, "max": cap}
        harness.central.open_transaction("CP-1", 1, 5)  # an earlier one, over
        harness.central.close_transaction("CP-1", 1, 5)
        assert dispatcher._priority(link) == PRIORITY_OTHER
        harness.central.open_transaction("CP-1", 1, 7)
        dispatcher._links["CP-1"] = link
        assert dispatcher._priority(link) == PRIORITY_NEW_TRANSACTION
        wanted = dispatcher.wanted("CP-1", now) or []
        tx = next(p for p in wanted if p.slot == "tx:1")
        link.sent["tx:1"] = tx
        assert dispatcher._priority(link) == PRIORITY_OTHER
        old = replace(tx, transaction_id=6)  # the previous transaction's lease
        link.sent["tx:1"] = old
        assert dispatcher._priority(link) == PRIORITY_NEW_TRANSACTION
        link.sent["tx:1"] = tx
        dispatcher._decreasing.add("CP-1")
        assert dispatcher._priority(link) == PRIORITY_FIRST
        counted = {k: v for k, v in dispatcher.counters.items() if k.startswith("turns_")}
        assert counted == {"turns_first": 2, "turns_other": 2, "turns_new_transaction": 2}


async def test_an_inbound_call_is_answered_while_a_burst_of_workers_waits_its_turn(
    redis: Redis, clock: SimClock
) -> None:
    """60 workers woken in one pass (as a slot boundary's lease refreshes wake them on their
    timers) while another charger sends a Heartbeat: its answer comes back after at most a
    few passes' turns, not behind all 60 looks (before, every woken worker looked in the
    first pass, ahead of the frame)."""
    async with paced_rig(redis, clock, 61, per_pass=2) as (r, sims):
        caller, burst = sims[0], sims[1:]
        for sim in burst:
            await sim.plug_in(1, a_car())
        await r.publish({(s.spec.charger_id, 1): [8.0] for s in burst}, headroom_kw=1000.0)
        for sim in burst:
            await sim.wait_for(lambda s=sim: tx_profiles(s) >= 1)  # type: ignore[misc]
            await r.dispatcher.settled(sim.spec.charger_id)
        passes = Passes()
        begun = spy_on_reconciles(r.dispatcher, passes)
        links = [r.dispatcher._links[s.spec.charger_id] for s in burst]
        for link in links:  # all at once, as timers that end together do
            link.idle.clear()
            link.wake.set()
        answered = asyncio.Event()
        looks_before: list[int] = []

        async def heartbeat() -> None:
            await caller._call(call.Heartbeat())
            looks_before.append(len(begun))
            answered.set()

        caller.validate = False  # the library's check runs in a thread: wall time, not passes
        task = asyncio.create_task(heartbeat())
        async with asyncio.timeout(5.0):
            await answered.wait()
        await task
        for sim in burst:
            await r.dispatcher.settled(sim.spec.charger_id)
        passes.stop()
        looked = {charger_id for _, charger_id in begun}
        assert {s.spec.charger_id for s in burst} <= looked  # every woken worker looked
        # Its frame, handler and answer took ~8 passes: ~16 looks at most ran meanwhile.
        assert looks_before[0] < len(burst) // 3, (looks_before, len(burst))
        assert max(Counter(p for p, _ in begun).values()) <= 2
