"""AuthorizationKey rotation (TC_073, RELIABILITY.md SEC-02) with an overlap window, over real
sockets with a simulated charger that adopts the new key on its next connection."""

from __future__ import annotations

from datetime import timedelta

import pytest
from websockets.exceptions import InvalidStatus

from adapters import redis_keys as keys
from adapters.ocpp.aio import redis_call
from tests.ocpp.conftest import SITE, Harness, simulated
from tests.ocpp.test_handshake import basic


async def test_a_rotated_key_is_used_on_reconnect_and_then_the_old_one_is_refused(
    harness: Harness,
) -> None:
    """Rotate: Accepted; during the overlap both keys open a session; the charger reconnects
    with the new key, which retires the old one (401)."""
    async with simulated(harness, "CP-1") as sim:
        assert await harness.central.rotate_password("CP-1") == "Accepted"
        new = sim.authorization_key
        assert new is not None
        assert len(new) == 40  # 20 random bytes in hex
        assert int(new, 16) >= 0
        async with harness.connect("CP-2"):  # another charger is not affected
            pass
        # Overlap: the old password still opens a session until the new one is used.
        assert await harness.central.credentials.verify("CP-1", harness.password)
        connected = len(harness.recorder.of("charger_connected"))
        await sim.drop()
        await sim.wait_for(lambda: sim.backing_off)
        await harness.clock.advance(timedelta(seconds=2))
        await harness.recorder.wait_for(
            lambda: len(harness.recorder.of("charger_connected")) > connected
        )
    stored = await redis_call(harness.redis.hgetall(keys.charger_credentials(SITE)))
    assert "next:CP-1" not in stored  # promoted
    assert not await harness.central.credentials.verify("CP-1", harness.password)
    with pytest.raises(InvalidStatus) as refused:
        async with harness.connect("CP-1", headers=basic("CP-1", harness.password)):
            pass
    assert refused.value.response.status_code == 401
    assert harness.central.metrics["password_rotations_accepted"] == 1


async def test_a_charger_that_refuses_the_new_key_keeps_the_old_one(harness: Harness) -> None:
    """A charger answering NotSupported: nothing staged remains, the old password still works."""
    async with simulated(harness, "CP-1") as sim:
        sim.writable.discard("AuthorizationKey")
        sim.configuration.pop("AuthorizationKey", None)
        status = await harness.central.rotate_password("CP-1")
        assert status in ("NotSupported", "Rejected")
        assert sim.authorization_key is None
    stored = await redis_call(harness.redis.hgetall(keys.charger_credentials(SITE)))
    assert "next:CP-1" not in stored
    assert await harness.central.credentials.verify("CP-1", harness.password)
