"""P-02, the process-kill version: voltpool disappears mid-session without a goodbye, and the
chargers fall back on their own.

Four simulated chargers (W and A, one with two connectors) charge under leases well above their
safe share; one charger's lease has already lapsed (its plan is below the safe share). Then the
dispatcher's workers stop and every connection is aborted (no close frame, no last profile), and
the listener goes. The simulated chargers, which honour their profiles, keep running on the
simulated clock: by the end of the lease window every connector is at or below its safe share
and their sum at or below the site's safe limit, and stays there.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from redis.asyncio import Redis

from controller.clock import SimClock
from simulators.chargepoints.chargepoint import SimChargePoint
from tests.ocpp.conftest import charger, simulated
from tests.ocpp.test_dispatcher import a_car, brought_up, rig

SAFE_LIMIT_KW = 24.0
# Safe shares in proportion to circuit limits (22 + 22 + 11 + 11 = 66 kW): 8, 8, 4 and 4 kW;
# CP-2's 8 kW is split over its two connectors.
SHARE_KW = {("CP-1", 1): 8.0, ("CP-2", 1): 4.0, ("CP-2", 2): 4.0, ("CP-3", 1): 4.0}


def drawn_kw(sims: list[SimChargePoint], minutes: float) -> dict[tuple[str, int], float]:
    """What each connector may draw `minutes` from now by the charger's own profiles (kW; the
    cars, with energy to spare, take all of it)."""
    out = {}
    for sim in sims:
        at = sim.clock.now() + timedelta(minutes=minutes)
        for connector in sim.connectors:
            out[(sim.spec.charger_id, connector.connector_id)] = sim.limit_kw(connector, at)
    return out


async def test_killed_mid_session_every_connector_falls_to_its_safe_share_by_the_lease_end(
    redis: Redis, clock: SimClock
) -> None:
    """Plans 20, 9 + 9 and 9 kW (above the shares) and CP-4 at 3 kW (below its 4 kW share, its
    lease lapsed); killed at 16:20. Until its lease ends (refreshed around 16:13) CP-1 holds the
    plan (control: it did get it); from the last lease end on, at the latest 15 min after the
    kill, each connector <= its share, sum <= 24 kW."""
    chargers = [
        charger("CP-1", max_power_kw=22.0),
        charger("CP-2", max_power_kw=22.0, connectors=2),
        charger("CP-3", max_power_kw=11.0, rate_unit="A"),
        charger("CP-4", max_power_kw=11.0, phases=1),
    ]
    async with (
        rig(redis, clock, *chargers, safe_limit_kw=SAFE_LIMIT_KW) as r,
        simulated(r.harness, "CP-1", max_power_kw=22.0) as s1,
        simulated(r.harness, "CP-2", max_power_kw=22.0, connectors=2) as s2,
        simulated(r.harness, "CP-3", max_power_kw=11.0, rate_unit="A") as s3,
        simulated(r.harness, "CP-4", max_power_kw=11.0, phases=1) as s4,
    ):
        sims = [s1, s2, s3, s4]
        for sim in sims:
            await brought_up(r, sim)
            for connector in sim.connectors:
                await sim.plug_in(connector.connector_id, a_car(energy_kwh=5.0))
        plan = {
            ("CP-1", 1): [20.0],
            ("CP-2", 1): [9.0],
            ("CP-2", 2): [9.0],
            ("CP-3", 1): [9.0],
            ("CP-4", 1): [3.0],
        }
        await r.publish(plan)
        for sim in sims:
            await r.dispatcher.settled(sim.spec.charger_id)
        await clock.advance(timedelta(minutes=20))  # leases refreshed at 16:13; CP-4 lapsed
        for sim in sims:
            await r.dispatcher.settled(sim.spec.charger_id)
        assert r.dispatcher.counters["leases_lapsed"] >= 1
        now = drawn_kw(sims, 0)
        assert now[("CP-1", 1)] == pytest.approx(20.0)
        assert now[("CP-2", 1)] == pytest.approx(9.0)
        assert now[("CP-3", 1)] == pytest.approx(13.0 * 230 * 3 / 1000)  # 9 kW in A, 13.04 A down
        assert now[("CP-4", 1)] == pytest.approx(3.0)
        leases = [
            p.lease_end
            for sim in sims
            for p in r.dispatcher.sent(sim.spec.charger_id).values()
            if p.lease_end is not None
        ]
        cp1_lease_end = r.dispatcher.sent("CP-1")["tx:1"].lease_end
        assert cp1_lease_end is not None
        last_lease_end = max(leases)
        # The kill: no worker sends anything more, every socket dies without a close frame.
        central = r.harness.central
        await r.dispatcher.close()
        for charger_id in central.online():
            central.session(charger_id).websocket.transport.abort()
        await central.stop()
        # The leases (refreshed around 16:13) hold the plan until they end, then the shares.
        killed = clock.now()
        assert last_lease_end <= killed + timedelta(minutes=15)
        before_end = (cp1_lease_end - killed).total_seconds() / 60 - 0.5
        assert drawn_kw(sims, before_end)[("CP-1", 1)] == pytest.approx(20.0)
        after_end = (last_lease_end - killed).total_seconds() / 60
        for minutes in (after_end, 15, 16, 30, 60, 180):
            drawn = drawn_kw(sims, minutes)
            for key, share in SHARE_KW.items():
                assert drawn[key] <= share + 1e-6, (minutes, key, drawn[key])
            assert sum(drawn.values()) <= SAFE_LIMIT_KW + 1e-6
        await clock.advance(timedelta(minutes=30))  # the chargers run on, unconnected
        assert not any(sim.online.is_set() for sim in sims)
        drawn = drawn_kw(sims, 0)
        assert sum(drawn.values()) <= SAFE_LIMIT_KW + 1e-6
        assert drawn[("CP-1", 1)] == pytest.approx(8.0)  # the fallback, not nothing
        metered = {
            (sim.spec.charger_id, c): kw
            for sim in sims
            for c, kw in sim.powers_kw(clock.now()).items()
        }
        assert sum(metered.values()) <= SAFE_LIMIT_KW + 1e-6  # what the cars really draw
        assert metered[("CP-1", 1)] == pytest.approx(8.0)
