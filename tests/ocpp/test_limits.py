"""Transport limits (RELIABILITY.md SEC-05): a per-connection frame rate limit and a cap on
connections per source address, over real sockets."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from adapters.ocpp.config import OcppConfig
from controller.clock import SimClock
from controller.errors import InvalidEvent
from tests.ocpp.conftest import (
    RECV_TIMEOUT_S,
    Harness,
    ask,
    charger,
    fleet,
    frame,
    running_central,
)


async def _read_until_closed(ws: ClientConnection) -> None:
    async with asyncio.timeout(RECV_TIMEOUT_S):
        while True:
            await ws.recv()


async def test_a_flooding_charger_is_closed_with_1008_and_the_others_are_served(
    redis: Redis, clock: SimClock
) -> None:
    """Burst 10, 1 frame/s: 40 Heartbeats at once close that socket (1008); a second charger
    connected at the same time keeps getting answers."""
    config = OcppConfig(bcrypt_rounds=4, max_frames_per_s=1.0, frame_burst=10)
    state = fleet([charger("CP-1"), charger("CP-2")])
    async with (
        running_central(redis, clock, state, config=config) as h,
        h.connect("CP-1") as flooder,
        h.connect("CP-2") as calm,
    ):
        for i in range(40):
            await flooder.send(frame(f"f{i}", "Heartbeat", {}))
        with pytest.raises(ConnectionClosed) as closed:
            await _read_until_closed(flooder)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert h.central.metrics["closed_rate_limit"] == 1
        answer = await ask(calm, frame("c1", "Heartbeat", {}))
        assert answer[0] == 3


async def _connect_and_leave(h: Harness, charger_id: str) -> None:
    async with h.connect(charger_id):
        pass


async def test_connections_per_address_are_capped_with_503(redis: Redis, clock: SimClock) -> None:
    """Cap 2: a third simultaneous connection from 127.0.0.1 is refused; after one leaves, a new
    one is accepted again."""
    config = OcppConfig(bcrypt_rounds=4, max_connections_per_ip=2)
    state = fleet([charger(f"CP-{i}") for i in (1, 2, 3)])
    async with (
        running_central(redis, clock, state, config=config) as h,
        h.connect("CP-1"),
        h.connect("CP-2") as second,
    ):
        with pytest.raises(InvalidStatus) as refused:
            await _connect_and_leave(h, "CP-3")
        assert refused.value.response.status_code == 503
        assert h.central.metrics["handshakes_refused_ip_cap"] == 1
        await second.close()
        await second.wait_closed()
        await h.recorder.wait_for(lambda: not h.central.is_online("CP-2"))
        async with h.connect("CP-3") as third:
            assert (await ask(third, frame("h", "Heartbeat", {})))[0] == 3


def test_nonsense_limits_are_refused() -> None:
    """A zero rate or a negative cap is a configuration error."""
    with pytest.raises(InvalidEvent):
        OcppConfig(max_frames_per_s=0.0)
    with pytest.raises(InvalidEvent):
        OcppConfig(max_connections_per_ip=-1)
