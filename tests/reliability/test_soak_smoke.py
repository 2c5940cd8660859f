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

from adapters.ocpp.translate import event_id
from controller.planning.share import share_by_need
from simulators.chaos import (
    RESTART_STALLED_STEPS,
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
    # 10 s of wall time: at 6 s, a starved charger process (load 9-14, 2026-11-27) ended its
    # cars before the departures and samples due in the run went out, and the fault windows
    # (recovery + 1 s each) covered most of its second half (7 of 11 loaded module runs).
    # One "minute" of socket drops per run, as before.
    config = SoakConfig(
        chargers=10,
        wall_s=10.0,
        sim_hours=10.0,
        redis_kills=1,
        redis_down_s=0.3,
        broker_restarts=1,
        broker_down_s=0.3,
        drop_fraction_per_min=0.1,
        minute_s=10.0,
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
    # The controller's memory and Redis pool were sampled alongside its RSS.
    assert len(report.memory_mib) == len(report.redis_connections) == len(report.rss_mib) > 0
    assert all(
        m[1] == pytest.approx(r, rel=0.05)
        for m, (_, r) in zip(report.memory_mib, report.rss_mib, strict=True)
    )
    assert max(n for _, n in report.redis_connections) >= 1
    # Both sides' clocks followed the same pace to the end of the simulated span.
    end = soaked.config.start + timedelta(hours=soaked.config.sim_hours)
    assert report.sim_reached == end.isoformat() == soaked.clock.now().isoformat()


def test_the_comparison_sees_a_lost_start_stop_and_meter_value(soaked: StackSoak) -> None:
    """Records removed from what the controller kept (or an acknowledgement it never saw) are
    counted as lost: the comparison is not vacuous."""
    records = soaked.records
    assert records is not None
    ledger = soaked.ledger
    # A transaction whose stop was acknowledged too (the first start's may not have been by
    # the run's end, on a machine slow enough: then only its start would be lost).
    stopped = {s.transaction_id for s in ledger.stops}
    victims = [s.transaction_id for s in ledger.starts if s.transaction_id in stopped]
    assert victims, "no transaction was both started and stopped"
    victim = victims[0]
    without_tx = dataclasses.replace(
        records,
        transactions={k: v for k, v in records.transactions.items() if k != victim},
    )
    verdict = compare(ledger, without_tx)
    # Its start and its stop are both gone.
    assert (verdict.lost, verdict.duplicated) == (2, 0)
    # A lost stop says where its event went: here it was applied (the state lost it) ...
    (stop,) = [s for s in ledger.stops if s.transaction_id == victim]
    stop_id = event_id(stop.charger_id, "tx", victim, "stop")
    (detail,) = [d for d in verdict.details if d.startswith(f"stop {stop.charger_id} tx {victim}:")]
    assert detail.endswith("its event applied)")
    # ... or refused (with the dead letter's reason), or only in the log, or nowhere.
    refused = dataclasses.replace(
        without_tx,
        applied=without_tx.applied - {stop_id},
        refused=frozenset({stop_id}),
        reasons={stop_id: "why not"},
    )
    assert any(d.endswith("its event refused: why not)") for d in compare(ledger, refused).details)
    nowhere = dataclasses.replace(refused, refused=frozenset(), logged=frozenset())
    assert any(
        d.endswith("its event in neither the log nor the applied ids)")
        for d in compare(ledger, nowhere).details
    )
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


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> StackSoak:
    """S-12 in small, shared by the tests below: ten chargers charging, in a process of their
    own, the controller down for 2 s simulated and up again on the same Redis, broker and
    port."""
    config = SoakConfig(chargers=10, wall_s=60.0, restart_down_s=2.0, seed=5)
    workdir: Path = tmp_path_factory.mktemp("restart")
    soak = StackSoak(config, RedisProcess(workdir / "redis"), solver=share_by_need)
    asyncio.run(soak.run_restart())  # its own loop: the run is shared by the module's tests
    return soak


def test_a_controller_restart_brings_every_charger_back_and_resynced(
    restarted: StackSoak,
) -> None:
    """S-12 in small: all ten reconnect with their back-off, get their default and circuit
    profiles again, with no error after the controller is up; the figure is whole simulated
    seconds, one per step, and the chargers ran (and were measured) in their own process."""
    report = restarted.report
    figures = report.restart
    assert figures is not None
    assert figures.failures(report.verdict) == []
    assert figures.not_resynced == 0
    assert figures.all_resynced_sim_s is not None
    assert figures.all_resynced_sim_s == figures.steps <= 90.0
    assert figures.all_online_sim_s is not None
    assert figures.all_online_sim_s <= figures.all_resynced_sim_s
    assert figures.errors_after_ready == {}
    assert sum(figures.errors_while_down.values()) >= 10  # they did lose the controller
    assert figures.connects >= 20  # each charger connected before and after
    assert figures.transactions_running == 10
    assert report.verdict is not None
    assert report.verdict.ok
    assert report.verdict.starts == 10
    assert figures.charger_processes == len(report.charger_cpu_s) == 1
    assert report.charger_rss_mib[0][1] > 0
    # Down for whole simulated seconds, stepped like the rest; no step needed the wall cap.
    assert figures.down_sim_s == restarted.config.restart_down_s
    assert figures.steps_at_cap == figures.down_steps_at_cap == 0


def test_the_restart_check_sees_chargers_not_resynced_and_errors(restarted: StackSoak) -> None:
    """The S-12 check is not vacuous: at the moment the controller was ready, the chargers'
    own status (from their process) had none of them re-synced; the same figures with a
    charger never re-synced, too late, an error after the restart or a lost record fail."""
    report = restarted.report
    figures = report.restart
    assert figures is not None
    at_ready, *_, last = figures.timeline
    assert at_ready[0] == 0.0
    assert at_ready[2] == 0 < last[2] == figures.chargers
    assert [point[2] for point in figures.timeline] == sorted(p[2] for p in figures.timeline)
    stuck = dataclasses.replace(
        figures, all_resynced_sim_s=None, not_resynced=1, not_resynced_ids=("CP-0003",)
    )
    assert stuck.failures(report.verdict) == ["1 chargers never re-synced"]
    late = dataclasses.replace(figures, all_resynced_sim_s=91.0)
    assert len(late.failures(report.verdict)) == 1
    herd = dataclasses.replace(figures, errors_after_ready={"TimeoutError": 1})
    assert len(herd.failures(report.verdict)) == 1
    assert report.verdict is not None
    lost = dataclasses.replace(report.verdict, lost=1)
    assert len(figures.failures(lost)) == 1


async def test_a_charger_that_never_resyncs_fails_the_restart_check(tmp_path: Path) -> None:
    """S-12's check fails for real: three chargers, the first rejecting every charging profile
    from the stop on; the run stops once its steps stall, names that charger as never
    re-synced, and the others are back and re-synced."""
    config = SoakConfig(
        chargers=3,
        wall_s=60.0,
        restart_down_s=1.0,
        restart_settle_wall_s=0.3,
        restart_rejecting=1,
        seed=5,
    )
    soak = StackSoak(config, RedisProcess(tmp_path / "redis"), solver=share_by_need)
    report = await soak.run_restart()
    figures = report.restart
    assert figures is not None
    assert figures.all_resynced_sim_s is None
    assert (figures.not_resynced, figures.not_resynced_ids) == (1, ("CP-0001",))
    assert figures.all_online_sim_s is not None  # online, but without its profiles
    assert figures.timeline[-1][1:3] == (3, 2)
    assert figures.steps_at_cap >= RESTART_STALLED_STEPS
    assert figures.failures(report.verdict) == ["1 chargers never re-synced"]
