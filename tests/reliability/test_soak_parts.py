"""The parts of the split chaos soak (`simulators.chaos`, `simulators.chaos_fleet`) a soak
cannot check on itself: the shared pace, the loop-lag window maximum, the ledger crossing a
process boundary, the shares of the fleet and the steady visit pattern of the memory check."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from controller.clock import SimClock
from simulators.chaos import (
    MEMORY_FIELDS,
    Ledger,
    LoopLag,
    MeterRecord,
    Pace,
    SoakConfig,
    StartRecord,
    StopRecord,
    Visit,
    fleet_visits,
    memory_breakdown,
    range_max,
)

START = datetime(2024, 3, 4, 12, 0, tzinfo=UTC)


def test_range_max_matches_a_plain_loop_on_random_ranges() -> None:
    """The sparse-table maximum equals max() of each slice, 0 for an empty one."""
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 17, 256, 1000):
        values = rng.random(n)
        lo = rng.integers(0, n + 1, 500)
        hi = np.minimum(n, lo + rng.integers(0, n + 1, 500))
        got = range_max(values, lo, hi)
        want = [values[a:b].max() if b > a else 0.0 for a, b in zip(lo, hi, strict=True)]
        assert np.array_equal(got, np.asarray(want))


def test_worst_lag_during_a_call_sees_only_samples_that_overlap_it() -> None:
    """A call gets the largest lag sampled from its sending to one period after its answer."""
    lag = LoopLag(period_s=0.02)
    for i, value in enumerate([0.0, 0.001, 0.3, 0.002, 0.0, 0.05]):
        lag.at.append(100.0 + 0.1 * i)
        lag.lag_s.append(value)
    begins = np.array([100.0, 100.25, 100.31, 99.0])
    ends = np.array([100.15, 100.29, 100.45, 99.5])
    # [100.0, 100.17] holds the samples at 100.0 and 100.1; [100.25, 100.31] the one at
    # 100.3; [100.31, 100.47] the one at 100.4; nothing before 100.
    assert lag.worst_between(begins, ends).tolist() == [0.001, 0.002, 0.0, 0.0]


def test_two_processes_with_the_same_paces_agree_on_the_simulated_time() -> None:
    """A pace read back from JSON gives the same time; before its start it holds, after the
    end it stops; a second pace takes over from where the first one was."""
    connect = Pace(wall0=1000.0, sim0=START, speed=1.0)
    again = Pace.from_json(connect.to_json())
    assert again == connect
    assert connect.at(999.0) == START
    assert connect.at(1010.0) == START + timedelta(seconds=10)
    go = Pace(wall0=1020.0, sim0=connect.at(1020.0), speed=144.0, end=START + timedelta(hours=24))
    assert Pace.from_json(go.to_json()) == go
    assert go.at(1021.0) == START + timedelta(seconds=20 + 144)
    assert go.at(10**6) == START + timedelta(hours=24)
    with pytest.raises(ValueError, match="positive speed"):
        Pace(wall0=0.0, sim0=START, speed=0.0)


def test_a_ledger_survives_json_and_merges_with_another() -> None:
    """Every field of a ledger comes back from its JSON; merging adds the records."""
    ledger = Ledger()
    ledger.starts.append(
        StartRecord(
            charger_id="CP-0001",
            connector_id=1,
            transaction_id=7,
            meter_start_wh=120,
            timestamp="2024-03-04T12:00:00Z",
        )
    )
    ledger.stops.append(
        StopRecord(
            charger_id="CP-0001",
            transaction_id=7,
            meter_stop_wh=9120,
            timestamp="2024-03-04T15:00:00Z",
        )
    )
    ledger.meters.append(
        MeterRecord(charger_id="CP-0001", connector_id=1, transaction_id=7, event_ids=("a", "b"))
    )
    ledger.retries["StartTransaction:InternalError"] += 2
    ledger.rtt_at.extend([1.0, 2.0])
    ledger.rtt_s.extend([0.01, 0.02])
    ledger.queued_s.extend([0.0, 0.5])
    ledger.rtt_kind.extend([3, 6])
    ledger.ack_at.append(1.5)
    ledger.event_to_profile_s.append(0.3)
    ledger.awaiting_profile[("CP-0002", 9)] = 4.0
    ledger.meter_values_unanswered = 3
    back = Ledger.from_json(ledger.to_json())
    assert back == ledger
    other = Ledger.from_json(ledger.to_json())
    back.merge(other)
    assert len(back.starts) == len(back.stops) == len(back.meters) == 2
    assert back.retries["StartTransaction:InternalError"] == 4
    assert list(back.rtt_s) == [0.01, 0.02, 0.01, 0.02]
    assert list(back.rtt_kind) == [3, 6, 3, 6]
    assert list(back.queued_s) == [0.0, 0.5, 0.0, 0.5]
    assert back.meter_values_unanswered == 6


def test_the_shares_of_the_fleet_cover_every_charger_once() -> None:
    """Charger processes split the fleet into contiguous shares with nothing left out."""
    for chargers, processes in ((10, 1), (10, 3), (5000, 2), (7, 7)):
        config = SoakConfig(chargers=chargers, charger_processes=processes)
        shares = config.shards()
        assert len(shares) == processes
        assert [i for share in shares for i in share] == list(range(chargers))
    assert SoakConfig.from_json(SoakConfig(chargers=3).to_json()) == SoakConfig(chargers=3)
    with pytest.raises(ValueError, match="charger_processes"):
        SoakConfig(chargers=2, charger_processes=3)


def _plugged_in(visits: list[Visit], at: datetime) -> int:
    return sum(1 for v in visits if v.arrival <= at < v.departure)


def test_the_steady_pattern_keeps_the_fleet_level_while_the_day_pattern_fills_up() -> None:
    """From 20 % of the day to its end the steady pattern's cars plugged in stay within a few
    per cent of their mean (as many arrivals as departures: a leak check can use it); the
    day pattern's rise several-fold over the same span (why it cannot)."""
    chargers, hours = 2000, 24.0
    times = [START + timedelta(hours=hours * f) for f in np.linspace(0.2, 0.9, 15)]
    steady = fleet_visits(chargers, START, hours, seed=4, pattern="steady")
    levels = np.array([_plugged_in(steady, t) for t in times])
    assert levels.mean() > 0.5 * chargers
    assert (np.abs(levels - levels.mean()) / levels.mean()).max() < 0.08, levels
    arrivals = sum(1 for v in steady if times[0] <= v.arrival < times[-1])
    departures = sum(1 for v in steady if times[0] <= v.departure < times[-1])
    assert abs(arrivals - departures) < 0.05 * arrivals
    day = fleet_visits(chargers, START, hours, seed=4, pattern="day")
    assert _plugged_in(day, times[-3]) > 3 * _plugged_in(day, times[0])
    per_charger = [v.charger_index for v in steady]
    assert set(per_charger) == set(range(chargers))
    for index in random.Random(1).sample(range(chargers), 50):  # no charger has two cars at once
        own = sorted((v for v in steady if v.charger_index == index), key=lambda v: v.arrival)
        assert all(a.departure <= b.arrival for a, b in itertools.pairwise(own))


async def test_a_paced_clock_wakes_each_sleeper_at_its_time_and_follows_a_new_pace() -> None:
    """Sleepers wake in deadline order, never before their time; a faster pace added while
    they sleep wakes them sooner; past the pace's end the clock stops and a sleeper waits."""
    import asyncio
    import time

    from simulators.chaos import PacedClock

    wall0 = time.time()
    clock = PacedClock(Pace(wall0=wall0, sim0=START, speed=100.0))  # 1 s simulated = 10 ms
    woke: list[tuple[int, datetime]] = []

    async def sleeper(n: int, seconds: float) -> None:
        await clock.sleep_until(START + timedelta(seconds=seconds))
        woke.append((n, clock.now()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in ((1, 3.0), (0, 1.0), (2, 600.0))]
    await asyncio.sleep(0.05)  # 5 s simulated: the first two are done, the third (6 s wall at
    assert [n for n, _ in woke] == [0, 1]  # this pace) is not
    assert woke[0][1] >= START + timedelta(seconds=1)
    assert woke[1][1] >= START + timedelta(seconds=3)
    now = time.time()
    clock.add(
        Pace(
            wall0=now, sim0=clock.pace(now).at(now), speed=50_000.0, end=START + timedelta(hours=1)
        )
    )
    async with asyncio.timeout(2.0):
        await tasks[2]  # 600 s simulated now takes about 12 ms
    assert woke[2][0] == 2
    assert woke[2][1] >= START + timedelta(seconds=600)
    await asyncio.sleep(0.1)  # 5,000 s simulated at the new pace: capped at its end
    assert clock.now() == START + timedelta(hours=1)
    late = asyncio.create_task(clock.sleep_until(START + timedelta(hours=2)))
    await asyncio.sleep(0.02)
    assert not late.done()  # never reached: the pace ended
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    with pytest.raises(ValueError, match="after the last"):
        clock.add(Pace(wall0=wall0, sim0=START, speed=1.0))


def test_a_fleet_status_counts_settled_chargers_and_combines_across_processes() -> None:
    """S-12's status from real ledger chargers: one never connected (neither backing off nor
    online) keeps its share unsettled and is named; backing off counts as settled; two shares
    read back from JSON add up, and shares at different simulated times are refused."""
    from simulators.chaos import FleetStatus, fleet_status, ledger_chargers
    from simulators.chargepoints.chargepoint import FleetStats

    config = SoakConfig(chargers=4, charger_processes=2)
    first, second = config.shards()
    clock_at = START + timedelta(minutes=5)
    statuses = []
    for share in (first, second):
        ledger, stats = Ledger(), FleetStats()
        chargers = ledger_chargers(config, share, SimClock(START), ledger, stats)
        stats.errors["ConnectionRefusedError"] += len(share)
        if share is second:
            for charger in chargers:
                charger.backing_off = True
        status = fleet_status(
            chargers, clock_at, START, waited_s=0.5, arriving=0, ledger=ledger, stats=stats
        )
        assert FleetStatus.from_json(status.to_json()) == status
        statuses.append(status)
    unsettled, backing_off = statuses
    assert (unsettled.settled, unsettled.online, unsettled.resynced) == (False, 0, 0)
    assert unsettled.not_resynced == ("CP-0001", "CP-0002")
    assert (backing_off.settled, backing_off.backing_off) == (True, 2)
    fleet = FleetStatus.combine(statuses)
    assert (fleet.chargers, fleet.backing_off, fleet.settled) == (4, 2, False)
    assert fleet.errors == {"ConnectionRefusedError": 4}
    assert not fleet.all_online
    assert not fleet.all_resynced
    assert fleet_status(
        [], clock_at, None, waited_s=0.0, arriving=0, ledger=Ledger(), stats=FleetStats()
    ).settled
    later = dataclasses.replace(backing_off, at=clock_at + timedelta(seconds=1))
    with pytest.raises(ValueError, match="different simulated times"):
        FleetStatus.combine([unsettled, later])
    with pytest.raises(ValueError, match="re-synced but only"):
        dataclasses.replace(unsettled, resynced=1)


async def test_the_soaks_chargers_sample_from_their_transactions_and_spread_their_heartbeats() -> (
    None
):
    """The soak compresses a fleet that connected within seconds into a fast day: its chargers
    must neither sample nor heartbeat in step. MeterValues are counted from each transaction's
    start (OCPP 1.6); the first heartbeat after a connection falls anywhere in the interval,
    the later ones an interval apart."""
    from simulators.chaos import ledger_chargers
    from simulators.chargepoints.chargepoint import FleetStats

    config = SoakConfig(chargers=200, heartbeat_s=3600.0)
    clock = SimClock(START)
    chargers = ledger_chargers(config, range(200), clock, Ledger(), FleetStats())
    assert {c.spec.meter_phase for c in chargers} == {"transaction"}
    beats: dict[str, list[datetime]] = {c.spec.charger_id: [] for c in chargers}

    def recorder(charger_id: str) -> Any:
        async def call(_: Any) -> None:
            beats[charger_id].append(clock.now())

        return call

    for charger in chargers:
        charger._call = recorder(charger.spec.charger_id)  # type: ignore[method-assign]
    tasks = [asyncio.ensure_future(charger._heartbeats()) for charger in chargers]
    try:
        await clock.advance(timedelta(hours=2))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    firsts = sorted((times[0] - START).total_seconds() for times in beats.values())
    assert len(firsts) == 200
    assert len(set(firsts)) == 200  # each charger its own phase...
    assert firsts[0] < 0.05 * 3600  # ...spread over the interval
    assert firsts[-1] > 0.95 * 3600
    assert all(
        (b - a).total_seconds() == 3600.0
        for times in beats.values()
        for a, b in itertools.pairwise(times)
    )


def test_the_memory_breakdown_sees_python_objects_and_malloc_chunks_grow() -> None:
    """Half a million small Python objects grow the allocated blocks; a 128 MiB buffer from
    malloc grows the bytes malloc handed out and the resident memory; the parts of the RSS
    add up to it."""
    gc.collect()
    fields = dict(zip(MEMORY_FIELDS, memory_breakdown(), strict=True))
    objects = [[i] for i in range(500_000)]
    buffer = bytearray(128 * 2**20)  # zero-filled: every page written, so resident
    after = dict(zip(MEMORY_FIELDS, memory_breakdown(), strict=True))
    assert after["python_blocks_m"] - fields["python_blocks_m"] >= 0.5
    assert after["malloc_used"] - fields["malloc_used"] >= 100.0
    assert after["rss"] - fields["rss"] >= 100.0
    parts = after["rss_heap"] + after["rss_anon"] + after["rss_file"]
    assert abs(parts - after["rss"]) < 0.05 * after["rss"]
    del objects, buffer
