"""A tiny full-stack chaos soak (RELIABILITY.md T-08, L-03, S-12 in small), and proof that the
ledger comparison of `benchmarks/soak.py` can fail.

Ten simulated chargers in a process of their own (`simulators.chaos_fleet`), on a simulated
clock paced by the wall like the controller's (a simulated afternoon and night in a few
seconds), run against the controller wired as in production (OCPP central system on a real
WebSocket, lease dispatcher, MQTT link, Redis store, planner), with one kill -9 of the
redis-server, one broker restart and one dropped socket. What the chargers were answered for
must be exactly what the controller recorded; removing or doubling one record must be seen.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest

from controller.planning.share import share_by_need
from simulators.chaos import (
    ControllerRecords,
    MeterRecord,
    SoakConfig,
    SoakReport,
    StackSoak,
    compare,
    meter_event_ids,
)
from tests.reliability.redis_process import RedisProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def soaked(tmp_path_factory: pytest.TempPathFactory) -> StackSoak:
    """One small soak with one fault of each kind, shared by the tests of this module."""
    workdir: Path = tmp_path_factory.mktemp("soak")
    config = SoakConfig(
        chargers=10,
        wall_s=6.0,
        sim_hours=10.0,
        redis_kills=1,
        redis_down_s=0.3,
        broker_restarts=1,
        broker_down_s=0.3,
        drop_fraction_per_min=0.1,
        minute_s=6.0,
        recovery_timeout_s=20.0,
        seed=3,
    )
    soak = StackSoak(config, RedisProcess(workdir / "redis"), solver=share_by_need)
    asyncio.run(soak.run())  # its own loop: the run is shared by the module's tests
    return soak


def _report(soak: StackSoak) -> SoakReport:
    assert soak.report.verdict is not None
    return soak.report


def test_the_ledger_matches_the_controller_through_every_kind_of_fault(
    soaked: StackSoak,
) -> None:
    """T-08 in small: 0 lost, 0 duplicated, with starts, stops and meter values to compare,
    and each fault injected once and recovered from."""
    report = _report(soaked)
    verdict = report.verdict
    assert verdict is not None
    assert verdict.details == ()
    assert (verdict.lost, verdict.duplicated) == (0, 0)
    assert verdict.starts >= 10  # every charger has its evening car, some an afternoon one
    # The simulated span ends after every departure; a stop still being re-sent when the run
    # ends is not acknowledged yet, and is not compared.
    assert verdict.stops >= 0.8 * verdict.starts
    assert verdict.meter_values > 0
    kinds = sorted(f.kind for f in report.faults)
    assert kinds == ["broker restart", "redis kill -9", "socket drop"]
    assert all(f.recovery_s is not None for f in report.faults), report.faults
    assert report.event_to_profile_s["n"] >= 1
    assert report.rtt_ms["p99"] > 0


def test_the_chargers_ran_in_their_own_process_and_were_measured_there(soaked: StackSoak) -> None:
    """L-01's split: the chargers' CPU, RSS and loop lag come from a process of their own, the
    controller's loop lag from this one, and every round trip has the chargers' lag beside it."""
    report = _report(soaked)
    assert len(report.charger_cpu_s) == soaked.config.charger_processes == 1
    assert report.charger_cpu_s[0] > 0
    assert report.charger_rss_mib[0][1] > 0
    assert report.charger_lag_ms["n"] > 0
    assert report.controller_lag_ms["n"] > 0
    assert len(soaked._rtt_charger_lag) == len(soaked.ledger.rtt_s) > 0
    assert report.rtt_calm_ms["n"] <= report.rtt_outside_faults_ms["n"]
    # Round trips by action add up to those outside faults; heartbeats and meter values came.
    by_action = report.rtt_by_action_ms
    assert sum(f["n"] for f in by_action.values()) == report.rtt_outside_faults_ms["n"]
    assert {"Heartbeat", "MeterValues", "StartTransaction"} <= set(by_action)
    assert report.queued_ms["n"] == len(soaked.ledger.rtt_s)
    # Both sides' clocks followed the same pace to the end of the simulated span.
    end = soaked.config.start + timedelta(hours=soaked.config.sim_hours)
    assert report.sim_reached == end.isoformat() == soaked.clock.now().isoformat()


def test_the_comparison_sees_a_lost_start_stop_and_meter_value(soaked: StackSoak) -> None:
    """Records removed from what the controller kept (or an acknowledgement it never saw) are
    counted as lost: the comparison is not vacuous."""
    records = soaked.records
    assert records is not None
    ledger = soaked.ledger
    victim = ledger.starts[0].transaction_id
    without_tx = dataclasses.replace(
        records,
        transactions={k: v for k, v in records.transactions.items() if k != victim},
    )
    verdict = compare(ledger, without_tx)
    # Its start and its stop are both gone.
    assert (verdict.lost, verdict.duplicated) == (2, 0)
    without_meter = dataclasses.replace(records, applied=frozenset())
    assert compare(ledger, without_meter).lost == sum(len(m.event_ids) for m in ledger.meters)
    phantom = MeterRecord(
        charger_id="CP-0001",
        connector_id=1,
        transaction_id=victim,
        event_ids=meter_event_ids(
            "CP-0001",
            1,
            victim,
            [
                {
                    "timestamp": "2024-03-04T12:00:01Z",
                    "sampledValue": [
                        {"value": "1.0", "measurand": "Energy.Active.Import.Register"}
                    ],
                }
            ],
        ),
    )
    assert len(phantom.event_ids) == 1
    ledger.meters.append(phantom)
    try:
        assert compare(ledger, records).lost == 1
    finally:
        ledger.meters.remove(phantom)


def test_the_comparison_sees_a_start_recorded_twice(soaked: StackSoak) -> None:
    """One charger start under a second transaction id (what T-03 prevents) is a duplicate."""
    records: ControllerRecords | None = soaked.records
    assert records is not None
    start = soaked.ledger.starts[0]
    original = records.transactions[start.transaction_id]
    twin_id = max(records.transactions) + 1
    twin = dataclasses.replace(original, transaction_id=twin_id)
    doubled = dataclasses.replace(records, transactions={**records.transactions, twin_id: twin})
    verdict = compare(soaked.ledger, doubled)
    assert (verdict.lost, verdict.duplicated) == (0, 1)
    assert compare(soaked.ledger, records).ok


async def test_a_controller_restart_brings_every_charger_back_and_resynced(
    tmp_path: Path,
) -> None:
    """S-12 in small: ten chargers charging, the controller down for 2 s; all reconnect with
    their back-off, get their default and circuit profiles again, no error after it is up."""
    config = SoakConfig(chargers=10, wall_s=60.0, restart_down_s=2.0, seed=5)
    soak = StackSoak(config, RedisProcess(tmp_path / "redis"), solver=share_by_need)
    report = await soak.run_restart()
    restart = report.restart
    assert restart["not_resynced"] == 0
    assert restart["all_resynced_sim_s"] is not None
    assert restart["all_resynced_sim_s"] <= 90.0
    assert restart["errors_after_ready"] == {}
    assert sum(restart["errors_while_down"].values()) >= 10  # they did lose the controller
    assert report.verdict is not None
    assert report.verdict.ok
    assert report.verdict.starts == 10
