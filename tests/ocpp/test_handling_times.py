"""The central system's own share of a round trip (adapters/ocpp/timing.py): each routed CALL
is timed from the router to its answer, by action, in a fixed ring per action; frames the
checker answers itself are not routed and not timed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from adapters.ocpp.timing import HandlingTimes
from tests.ocpp.conftest import BOOT, Harness, ask, frame


def test_the_ring_keeps_the_last_durations_and_counts_them_all() -> None:
    """After more CALLs than it keeps, the percentiles are those of the last `keep` durations
    (numpy on the same values), and the count is of every CALL recorded."""
    times = HandlingTimes(keep=4)
    for ms in (900.0, 800.0, 1.0, 2.0, 3.0, 4.0):
        times.record("Heartbeat", ms / 1000.0)
    times.record("MeterValues", 0.010)
    figures = times.percentiles_ms()
    assert times.count("Heartbeat") == 6
    assert times.count("StopTransaction") == 0
    kept = np.array([1.0, 2.0, 3.0, 4.0])
    assert figures["Heartbeat"]["n"] == 4
    assert figures["Heartbeat"]["max"] == pytest.approx(4.0)
    assert figures["Heartbeat"]["p50"] == pytest.approx(float(np.percentile(kept, 50)))
    assert figures["Heartbeat"]["p99"] == pytest.approx(float(np.percentile(kept, 99)))
    assert figures["MeterValues"]["p50"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="keep"):
        HandlingTimes(keep=0)


async def test_each_routed_call_is_timed_within_its_round_trip(harness: Harness) -> None:
    """A BootNotification and two Heartbeats are timed under their actions, each no longer than
    the round trip the charger saw; a frame the checker refuses is answered but not timed."""
    handling = harness.central.handling
    async with harness.connect("CP-1", boot=False) as ws:
        began = time.perf_counter()
        assert (await ask(ws, frame("b1", "BootNotification", BOOT)))[0] == 3
        boot_rtt_ms = (time.perf_counter() - began) * 1000.0
        for n in range(2):
            assert (await ask(ws, frame(f"h{n}", "Heartbeat", {})))[0] == 3
        refused = await ask(ws, '[2, "bad", "Heartbeat"]')  # no payload: a CALLERROR
    assert refused[0] == 4
    # The server times a CALL once its answer is written, before it reads the next frame: the
    # answer to the refused frame means every CALL before it is counted.
    assert handling.count("BootNotification") == 1
    assert handling.count("Heartbeat") == 2
    figures = handling.percentiles_ms()
    assert set(figures) == {"BootNotification", "Heartbeat"}
    assert 0.0 < figures["BootNotification"]["max"] <= boot_rtt_ms
