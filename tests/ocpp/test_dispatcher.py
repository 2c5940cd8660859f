"""The lease dispatcher with simulated chargers over real sockets: order, units, retries,
deadband, refresh, V2G, and what the chargers then draw."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from adapters import redis_keys as keys
from adapters.ocpp.aio import redis_call
from adapters.ocpp.config import LeaseConfig, OcppConfig
from adapters.ocpp.dispatcher import LeaseDispatcher
from controller.clock import SimClock
from controller.state import FleetState
from simulators.chargepoints.car import SimCar
from simulators.chargepoints.chargepoint import Faults, SimChargePoint
from tests.ocpp.conftest import (
    SITE,
    Harness,
    charger,
    fleet,
    plan_for,
    running_central,
    simulated,
)


@dataclass
class Rig:
    """A central system, its dispatcher, and the fleet state both work from."""

    harness: Harness
    dispatcher: LeaseDispatcher
    state: FleetState

    @property
    def clock(self) -> SimClock:
        """The simulated clock."""
        return self.harness.clock

    async def publish(
        self, setpoints: dict[tuple[str, int], list[float]], *, headroom_kw: float = 0.0
    ) -> None:
        """Publish a plan made now with these setpoints (and head-room, see `plan_for`)."""
        plan = plan_for(self.clock.now(), setpoints, headroom_kw=headroom_kw)
        await self.dispatcher.publish(plan, self.state)


@asynccontextmanager
async def rig(
    redis: Redis,
    clock: SimClock,
    *chargers: Any,
    safe_limit_kw: float = 40.0,
    config: OcppConfig | None = None,
    lease: LeaseConfig | None = None,
) -> AsyncIterator[Rig]:
    """A central system with its dispatcher for these chargers (safe limit 40 kW)."""
    state = fleet(list(chargers), safe_limit_kw=safe_limit_kw)
    async with running_central(redis, clock, state, config=config) as harness:
        dispatcher = LeaseDispatcher(harness.central, clock, lease or LeaseConfig())
        await dispatcher.publish(plan_for(clock.now(), {}), state)
        try:
            yield Rig(harness, dispatcher, state)
        finally:
            await dispatcher.close()


def a_car(max_kw: float = 22.0, energy_kwh: float = 20.0, discharge_kw: float = 0.0) -> SimCar:
    """A 60 kWh car."""
    return SimCar(
        vehicle_id="ev",
        id_tag="TAG",
        capacity_kwh=60.0,
        energy_kwh=energy_kwh,
        max_charge_kw=max_kw,
        max_discharge_kw=discharge_kw,
    )


async def brought_up(r: Rig, sim: SimChargePoint) -> None:
    """Until the charger has its boot profiles and its worker is idle: a car plugged in before
    that would get a safe-share TxProfile from the bring-up, racing the test's own plan."""
    await sim.wait_for(lambda: len(sim.received) >= 2)
    await r.dispatcher.settled(sim.spec.charger_id)


def purposes(sim: SimChargePoint) -> list[str]:
    """The purposes of the profiles a charger received, in order."""
    return [r.purpose for r in sim.received]


async def test_at_boot_and_on_reconnect_default_and_max_go_before_the_tx_profile(
    redis: Redis, clock: SimClock
) -> None:
    """P-01: TxDefaultProfile (safe share) and ChargePointMaxProfile (circuit) first, at boot and
    again after a reconnect, then the transaction's TxProfile; the reconnect (without a boot)
    also asks for the connectors' status."""
    async with (
        rig(redis, clock, charger("CP-1", max_power_kw=22.0)) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as sim,
    ):
        await sim.wait_for(lambda: len(sim.received) == 2)
        assert purposes(sim) == ["TxDefaultProfile", "ChargePointMaxProfile"]
        limits = [
            p.profile["charging_schedule"]["charging_schedule_period"][0]["limit"]
            for p in sim.received
        ]
        assert limits == [22000.0, 22000.0]  # safe share min(22, 40 kW), circuit 22 kW
        await sim.plug_in(1, a_car())
        await r.publish({("CP-1", 1): [11.0]})
        await sim.wait_for(lambda: len(sim.received) == 3)
        assert purposes(sim)[2] == "TxProfile"
        statuses = len(r.harness.recorder.of("connector_status_changed"))
        await sim.drop()
        await r.harness.recorder.wait_for(
            lambda: (
                len(r.harness.recorder.of("charger_connected")) == 1
                and not r.harness.central.is_online("CP-1")
            )
        )
        await sim.wait_for(lambda: sim.backing_off)
        await clock.advance(timedelta(seconds=2))
        await sim.wait_for(lambda: len(sim.received) == 6)
        assert purposes(sim)[3:] == ["TxDefaultProfile", "ChargePointMaxProfile", "TxProfile"]
        assert all(r.status == "Accepted" for r in sim.received)
        await r.dispatcher.settled("CP-1")
        assert r.dispatcher.counters["status_triggered"] == 1
        await r.harness.recorder.wait_for(
            lambda: len(r.harness.recorder.of("connector_status_changed")) >= statuses + 4
        )


async def test_a_charger_in_amperes_gets_amperes_and_draws_their_watts(
    redis: Redis, clock: SimClock
) -> None:
    """A = W / (V * phases): 7 kW on a 3-phase A charger is 10.1 A, i.e. 6,969 W drawn."""
    async with (
        rig(redis, clock, charger("CP-A", max_power_kw=22.0, rate_unit="A")) as r,
        simulated(r.harness, "CP-A", max_power_kw=22.0, rate_unit="A") as sim,
    ):
        await sim.plug_in(1, a_car())
        await r.publish({("CP-A", 1): [7.0]})
        await sim.wait_for(lambda: purposes(sim)[-1:] == ["TxProfile"])
        await r.dispatcher.settled("CP-A")  # the latest plan, not the plug-in lease
        tx = sim.received[-1].profile["charging_schedule"]
        assert tx["charging_rate_unit"] == "A"
        assert float(tx["charging_schedule_period"][0]["limit"]) == 10.1
        assert sim.powers_kw(clock.now())[1] == pytest.approx(10.1 * 230 * 3 / 1000)


async def test_a_setpoint_under_the_minimum_rate_stops_the_car(
    redis: Redis, clock: SimClock
) -> None:
    """3 kW on a 3-phase charger (4.35 A < 6 A) is sent as 0 and the car draws nothing."""
    async with (
        rig(redis, clock, charger("CP-1")) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as sim,
    ):
        await sim.plug_in(1, a_car())
        await r.publish({("CP-1", 1): [3.0]})
        await sim.wait_for(lambda: purposes(sim)[-1:] == ["TxProfile"])
        await r.dispatcher.settled("CP-1")  # the latest plan, not the plug-in lease
        assert sim.powers_kw(clock.now())[1] == 0.0


async def test_a_rejected_profile_is_retried_with_back_off_and_counted(
    redis: Redis, clock: SimClock
) -> None:
    """Rejected -> counted, charger marked as not following; the fallback ladder (stack levels
    0, 1 and 8 of its configuration) is tried at once: the max profile is given up, the
    default's ladder is tried again after 5 s, then 10 s; once the charger accepts, the mark
    goes and the max profile is tried again."""
    async with (
        rig(redis, clock, charger("CP-1")) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0, faults=Faults(reject_profiles=True)) as sim,
    ):
        d = r.dispatcher
        await d.wait_for(lambda: d.counters["profiles_rejected"] == 6)  # 2 slots x 3 levels
        assert d.not_following == {"CP-1"}
        assert d.counters["ladder_steps"] == 4
        await clock.advance(timedelta(seconds=4))
        assert d.counters["profiles_sent"] == 6  # back-off not over yet
        await clock.advance(timedelta(seconds=1))
        await d.wait_for(lambda: d.counters["profiles_retried"] == 1)
        assert len(sim.received) == 9
        sim.faults.reject_profiles = False
        await clock.advance(timedelta(seconds=9))
        assert d.counters["profiles_sent"] == 9  # the second back-off is 10 s
        await clock.advance(timedelta(seconds=1))
        await d.wait_for(lambda: d.counters["profiles_accepted"] == 2)
        assert [x.status for x in sim.received] == ["Rejected"] * 9 + ["Accepted"] * 2
        assert [x.profile["stack_level"] for x in sim.received[-2:]] == [0, 0]
        assert d.not_following == set()
        assert d.counters["profiles_accepted"] == 2


async def test_a_charger_that_does_not_answer_is_counted_and_retried(
    redis: Redis, clock: SimClock
) -> None:
    """Timed out -> counted and marked; its late answers are dropped, never answered."""
    # Wall time: the first two calls wait it out, and the retries, answered at once, must come
    # within it on a loaded machine too (at 0.2 s a retry timed out again 3 times in 17 runs
    # with the event loop stalled 20 ms at a time).
    config = OcppConfig(bcrypt_rounds=4, call_timeout_s=1.0)
    async with (
        rig(redis, clock, charger("CP-1"), config=config) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0, faults=Faults(reply_delay_s=30)) as sim,
    ):
        await r.dispatcher.wait_for(lambda: r.dispatcher.counters["profiles_timed_out"] == 2)
        assert r.dispatcher.not_following == {"CP-1"}
        sim.faults.reply_delay_s = 0
        await clock.advance(timedelta(seconds=31))  # the late answers come now, then retries
        await r.dispatcher.wait_for(lambda: r.dispatcher.counters["profiles_accepted"] == 2)
        assert len(sim.received) == 4
        assert r.dispatcher.not_following == set()
        metrics = r.harness.central.metrics
        await metrics.wait_for(lambda: metrics["frames_drop"] == 2)


async def test_small_changes_stay_within_the_deadband_and_leases_are_refreshed(
    redis: Redis, clock: SimClock
) -> None:
    """7 -> 7.3 kW: nothing sent; 7 -> 8 kW: sent; 13 min later the lease is renewed (the
    fallback after it, the 5 kW safe share, is not the plan)."""
    async with (
        rig(redis, clock, charger("CP-1"), safe_limit_kw=5.0) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as sim,
    ):
        await brought_up(r, sim)
        await sim.plug_in(1, a_car())
        for kw in (7.0, 7.3):
            await r.publish({("CP-1", 1): [kw]})
            await r.dispatcher.settled("CP-1")
        assert purposes(sim).count("TxProfile") == 1
        await r.publish({("CP-1", 1): [8.0]})
        await sim.wait_for(lambda: purposes(sim).count("TxProfile") == 2)
        await r.dispatcher.settled("CP-1")
        await clock.advance(timedelta(minutes=12, seconds=59))
        assert purposes(sim).count("TxProfile") == 2
        await clock.advance(timedelta(seconds=1))
        await sim.wait_for(lambda: purposes(sim).count("TxProfile") == 3)
        renewed = sim.received[-1].profile["charging_schedule"]["start_schedule"]
        assert renewed == "2024-03-04T16:13:00Z"


async def test_decreases_are_sent_before_increases(redis: Redis, clock: SimClock) -> None:
    """Two connectors: 11 -> 4.5 kW goes out before 4.5 -> 11 kW."""
    cp = charger("CP-2", max_power_kw=22.0, connectors=2)
    async with (
        rig(redis, clock, cp) as r,
        simulated(r.harness, "CP-2", max_power_kw=22.0, connectors=2) as sim,
    ):
        await brought_up(r, sim)
        await sim.plug_in(1, a_car())
        await sim.plug_in(2, a_car())
        await r.publish({("CP-2", 1): [11.0], ("CP-2", 2): [4.5]})
        await sim.wait_for(lambda: purposes(sim).count("TxProfile") == 2)
        await r.dispatcher.settled("CP-2")
        await r.publish({("CP-2", 1): [4.5], ("CP-2", 2): [11.0]})
        await sim.wait_for(lambda: purposes(sim).count("TxProfile") == 4)
        assert [x.connector_id for x in sim.received[-2:]] == [1, 2]
        await r.publish({("CP-2", 1): [11.0], ("CP-2", 2): [4.5]})
        await sim.wait_for(lambda: purposes(sim).count("TxProfile") == 6)
        assert [x.connector_id for x in sim.received[-2:]] == [2, 1]


@pytest.mark.parametrize("mode", ["negative_limit", "data_transfer"])
async def test_a_discharge_setpoint_makes_a_v2g_charger_discharge(
    redis: Redis, clock: SimClock, mode: str
) -> None:
    """-6 kW planned: the simulated bidirectional charger meters -6 kW either way."""
    async with (
        rig(redis, clock, charger("CP-V", max_power_kw=11.0, v2g_mode=mode)) as r,
        simulated(r.harness, "CP-V", max_power_kw=11.0, v2g_mode=mode) as sim,
    ):
        await sim.plug_in(1, a_car(max_kw=11.0, energy_kwh=40.0, discharge_kw=11.0))
        await r.publish({("CP-V", 1): [-6.0]})
        await sim.wait_for(lambda: purposes(sim)[-1:] == ["TxProfile"])
        await r.dispatcher.settled("CP-V")
        assert sim.powers_kw(clock.now())[1] == pytest.approx(-6.0)
        await clock.advance(timedelta(seconds=60))
        await r.harness.recorder.wait_for(lambda: bool(r.harness.recorder.of("meter_sampled")))
        assert r.harness.recorder.of("meter_sampled")[-1].power_kw == pytest.approx(-6.0)
        assert sim.powers_kw(clock.now() + timedelta(minutes=16))[1] == 0.0  # lease over


async def test_a_discharge_setpoint_on_a_charger_without_v2g_is_sent_as_zero(
    redis: Redis, clock: SimClock
) -> None:
    """v2g_mode none: the charger gets 0, never a negative limit (it would reject it)."""
    async with (
        rig(redis, clock, charger("CP-1")) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as sim,
    ):
        await sim.plug_in(1, a_car(discharge_kw=11.0))
        await r.publish({("CP-1", 1): [-6.0]})
        await sim.wait_for(lambda: purposes(sim)[-1:] == ["TxProfile"])
        await r.dispatcher.settled("CP-1")  # the latest plan, not the plug-in lease
        assert sim.received[-1].status == "Accepted"
        assert sim.powers_kw(clock.now())[1] == 0.0


async def test_accepted_profiles_are_kept_in_redis(redis: Redis, clock: SimClock) -> None:
    """The last accepted profile per slot is what the planner assumes while a charger is away."""
    async with (
        rig(redis, clock, charger("CP-1")) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as sim,
    ):
        await sim.plug_in(1, a_car())
        await r.publish({("CP-1", 1): [9.0]})
        await sim.wait_for(lambda: purposes(sim)[-1:] == ["TxProfile"])
        await r.dispatcher.settled("CP-1")
    stored = json.loads(str(await redis_call(redis.hget(keys.charger_profiles(SITE), "CP-1"))))
    assert sorted(stored) == ["default", "max", "tx:1"]
    assert (
        stored["tx:1"]["profile"]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"]
        == 9000.0
    )


async def test_a_charger_missing_from_the_fleet_state_gets_no_profiles(
    redis: Redis, clock: SimClock
) -> None:
    """Without electrical data nothing sensible can be sent; it is counted instead."""
    async with rig(redis, clock, charger("CP-1")) as r:
        await r.harness.central.credentials.set_password("CP-X", r.harness.password)
        async with simulated(r.harness, "CP-X", max_power_kw=22.0) as sim:
            await r.dispatcher.settled("CP-X")
            assert sim.received == []
            assert r.dispatcher.counters["chargers_unknown"] >= 1


async def test_a_transaction_the_fleet_state_still_shows_but_the_book_closed_gets_no_profile(
    redis: Redis, clock: SimClock
) -> None:
    """The central system's transaction book wins over a fleet state that has not applied the
    stop yet: no TxProfile for a transaction the charger no longer runs (it would reject it)."""
    stale = charger("CP-1")
    connector = stale.connector(1)
    assert connector is not None
    stale = stale.with_connector(replace(connector, transaction_id=99))
    async with (
        rig(redis, clock, stale) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as sim,
    ):
        await r.publish({("CP-1", 1): [7.0]})
        await r.dispatcher.wait_for(lambda: r.dispatcher.counters["profiles_accepted"] == 2)
        await r.dispatcher.settled("CP-1")
        assert purposes(sim) == ["TxDefaultProfile", "ChargePointMaxProfile"]
        assert r.dispatcher.counters["profiles_rejected"] == 0


def _holds(root: object, target: object) -> bool:
    """Whether `target` is reachable from `root`'s attributes through plain containers."""
    seen: set[int] = set()
    todo: list[object] = list(vars(root).values())
    while todo:
        item = todo.pop()
        if item is target:
            return True
        if id(item) in seen or not isinstance(item, dict | list | tuple | set | frozenset):
            continue
        seen.add(id(item))
        todo.extend(item.values() if isinstance(item, dict) else item)
    return False


async def test_a_charger_that_lags_behind_does_not_pin_an_old_plan(
    redis: Redis, clock: SimClock
) -> None:
    """The per-charger cache of wanted profiles remembers which plan they came from by number,
    so a charger not looked at since (its worker lagging) keeps no old plan alive (the
    5,000-charger soak found 53 of them)."""
    async with rig(redis, clock, charger("CP-1"), charger("CP-2")) as r:
        old = plan_for(clock.now(), {("CP-1", 1): [11.0] * 8})
        await r.dispatcher.publish(old, r.state)
        assert r.dispatcher.wanted("CP-1", clock.now()) is not None
        assert r.dispatcher.wanted("CP-2", clock.now()) is not None
        await r.publish({("CP-1", 1): [5.0] * 8})
        assert r.dispatcher.wanted("CP-2", clock.now()) is not None  # CP-1 is not looked at
        assert not _holds(r.dispatcher, old)


async def test_a_replaced_worker_that_swallows_its_cancellation_is_stopped_anyway(
    redis: Redis, clock: SimClock
) -> None:
    """A reconnect replaces the charger's worker. If the old one swallows the cancellation
    (Python 3.11's `wait_for` in the ocpp library can, when a reply comes at the same moment),
    it is cancelled again until it has stopped, not left running as a second worker."""

    async def swallows_one_cancel() -> None:
        # Swallowed, as a reply arriving with the cancellation makes 3.11's wait_for do.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)

    async with rig(redis, clock, charger("CP-1")) as r:
        await r.dispatcher.charger_ready("CP-1", rebooted=True)
        link = r.dispatcher._links["CP-1"]
        assert link.task is not None
        link.task.cancel()
        old = asyncio.ensure_future(swallows_one_cancel())
        link.task = old
        await asyncio.sleep(0)  # the old worker is in its first sleep
        await r.dispatcher.charger_ready("CP-1", rebooted=True)
        await asyncio.wait({old}, timeout=5.0)  # wall time: the repeated cancel's pace
        assert old.done()
        assert old.cancelled()
        assert r.dispatcher._links["CP-1"].task is not old


async def test_a_waiter_is_woken_when_a_charger_goes(redis: Redis, clock: SimClock) -> None:
    """`LeaseDispatcher.wait_for` looks again when a charger disconnects: its worker stops and
    what it sent is forgotten with it, with no send or idle point to announce it (on the old
    dispatcher this wait timed out)."""
    async with (
        rig(redis, clock, charger("CP-1", max_power_kw=22.0)) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as sim,
    ):
        await brought_up(r, sim)
        assert r.dispatcher.sent("CP-1")

        def gone() -> bool:
            return not r.dispatcher.sent("CP-1")

        statuses = len(r.harness.recorder.of("connector_status_changed"))
        waiter = asyncio.ensure_future(r.dispatcher.wait_for(gone))
        await asyncio.sleep(0)  # the waiter has looked and waits
        assert not waiter.done()
        await sim.drop()
        await waiter
        assert not r.harness.central.is_online("CP-1")
        await sim.wait_for(lambda: sim.backing_off)
        await clock.advance(timedelta(seconds=1))  # the back-off: it comes back
        await r.dispatcher.wait_for(lambda: not gone())
        await r.harness.recorder.wait_for(  # its statuses at the reconnect, then triggered
            lambda: len(r.harness.recorder.of("connector_status_changed")) >= statuses + 4
        )
