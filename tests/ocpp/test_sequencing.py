"""Decreases before increases across chargers (RELIABILITY.md P-04, A7 "in-flight reserve").

Charger A is lowered and B raised by the same plan. A answers slowly (its reply waits on the
simulated clock): B's increase must not leave before A's decrease is acknowledged, so the site
never carries the old high setpoint of A together with the new high setpoint of B.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from redis.asyncio import Redis

from adapters.ocpp.config import OcppConfig
from controller.clock import SimClock
from simulators.chargepoints.chargepoint import SimChargePoint
from tests.ocpp.conftest import charger, simulated
from tests.ocpp.test_dispatcher import a_car, rig


def tx_count(sim: SimChargePoint) -> int:
    """TxProfiles the charger received so far."""
    return [r.purpose for r in sim.received].count("TxProfile")


def last_tx_w(sim: SimChargePoint) -> float | None:
    """The first period's limit of the last TxProfile received (W)."""
    tx = [r for r in sim.received if r.purpose == "TxProfile"]
    if not tx:
        return None
    return float(tx[-1].profile["charging_schedule"]["charging_schedule_period"][0]["limit"])


@pytest.mark.parametrize("a_slow", [True, False])
async def test_an_increase_waits_for_the_other_chargers_decrease_to_be_acknowledged(
    redis: Redis, clock: SimClock, a_slow: bool
) -> None:
    """A: 11 -> 4.5 kW (slow reply), B: 4.5 -> 11 kW. While A's reply is pending B gets nothing
    and the sum of what is installed stays <= 15.5 kW; once A answers, B is raised. Control: a
    prompt A lets B go at once."""
    config = OcppConfig(bcrypt_rounds=4, call_timeout_s=30.0)
    async with (
        rig(redis, clock, charger("CP-A"), charger("CP-B"), config=config) as r,
        simulated(r.harness, "CP-A", max_power_kw=22.0) as a,
        simulated(r.harness, "CP-B", max_power_kw=22.0) as b,
    ):
        await a.plug_in(1, a_car())
        await b.plug_in(1, a_car())
        await r.publish({("CP-A", 1): [11.0], ("CP-B", 1): [4.5]})
        await a.wait_for(lambda: last_tx_w(a) == 11000.0)
        await b.wait_for(lambda: last_tx_w(b) == 4500.0)
        await r.dispatcher.settled("CP-A")
        await r.dispatcher.settled("CP-B")
        before = tx_count(b)
        if a_slow:
            a.faults.reply_delay_s = 30.0
        await r.publish({("CP-A", 1): [4.5], ("CP-B", 1): [11.0]})
        if not a_slow:
            await b.wait_for(lambda: last_tx_w(b) == 11000.0)
            assert last_tx_w(a) == 4500.0  # A had answered before B was raised
            return
        # A's SetChargingProfile must have reached A (its reply sleeping on the clock) before
        # the clock moves; this waits for the socket, not for simulated time.
        async with asyncio.timeout(5.0):
            while clock.next_deadline != clock.now() + timedelta(seconds=30):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        await r.dispatcher.settled("CP-B")
        assert tx_count(b) == before  # held: A's decrease is still in flight
        assert r.dispatcher.counters["increases_held"] >= 1
        installed_kw = a.powers_kw(clock.now())[1] + b.powers_kw(clock.now())[1]
        assert installed_kw <= 15.5 + 1e-6
        await clock.advance(timedelta(seconds=30))  # A answers Accepted
        await b.wait_for(lambda: last_tx_w(b) == 11000.0)
        assert a.powers_kw(clock.now())[1] == pytest.approx(4.5)
        assert b.powers_kw(clock.now())[1] == pytest.approx(11.0)
