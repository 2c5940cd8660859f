"""A charger whose pongs never come is dropped and marked offline (RELIABILITY.md S-09).

WebSocket pings run on wall time (they detect dead TCP peers); the intervals are shortened to
a fraction of a second here. The charger's socket stops reading, so it never answers a ping.
"""

from __future__ import annotations

from redis.asyncio import Redis

from adapters.ocpp.config import OcppConfig
from controller.clock import SimClock
from tests.ocpp.conftest import charger, fleet, running_central


async def test_a_charger_that_stops_answering_pings_is_closed_and_offline(
    redis: Redis, clock: SimClock
) -> None:
    """ping 0.2 s + pong timeout 0.2 s + close timeout 0.2 s: offline well within 5 s."""
    config = OcppConfig(
        bcrypt_rounds=4, ping_interval_s=0.2, ping_timeout_s=0.2, close_timeout_s=0.2
    )
    state = fleet([charger("CP-1")])
    async with (
        running_central(redis, clock, state, config=config) as h,
        h.connect("CP-1") as ws,
    ):
        assert h.central.is_online("CP-1")
        ws.transport.pause_reading()  # a half-open peer: nothing it receives is read
        await h.recorder.wait_for(
            lambda: bool(h.recorder.of("charger_disconnected")), timeout_s=5.0
        )
        assert not h.central.is_online("CP-1")
        ws.transport.abort()  # the test client need not finish a closing handshake
