"""The optimiser in its own process (`adapters.solver_process`): P-09 across a process boundary.

Real worker processes throughout (a fresh interpreter each, started by the code under test):
the schedule that comes back is the one the same solve gives in this process; a worker killed
from outside or dying mid-solve, and one that hangs, are cut off, replaced, counted, and the
planner publishes the proportional share for that plan, then solves again; an exception in the
worker is raised here and the worker kept; nothing is left running after `close()` or after
the runtime stops. The failure cases run the cheap proportional share (or a misbehaving
function of `solver_targets`) in the worker, so each start costs an interpreter and numpy only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from redis.asyncio import Redis

import controller.optimiser
from adapters import bootstrap
from adapters.redis_store import RedisFleetStore
from adapters.solver_process import (
    SolverFailed,
    SolverProcess,
    SolverProcessConfig,
    SolverUnavailable,
    target_of,
)
from controller.clock import SimClock
from controller.optimiser.fast import FastSolver
from controller.planning.build import build_problem
from controller.planning.planner import StatePlanner
from controller.planning.share import share_by_need
from controller.service import ControllerService
from controller.settings import PlanningSettings, Settings
from controller.state import FleetState, apply_event
from tests.conftest import T0
from tests.factories import PlanRecorder, flat_headroom, flat_prices, small_site, soc_reported
from tests.reliability import solver_targets

SHARE = "controller.planning.share:share_by_need"


def _depot(cars: int = 4, headroom_kw: float = 30.0) -> FleetState:
    """A small depot, every car plugged in, prices and head-room known."""
    state = FleetState()
    events = [*small_site(T0, cars=cars), flat_prices(T0, T0), flat_headroom(T0, T0, headroom_kw)]
    for event in events:
        state = apply_event(state, event).state  # type: ignore[arg-type]
    return state


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (a zombie, not yet reaped, counts as existing)."""
    return Path(f"/proc/{pid}").exists()


def _children() -> list[int]:
    """The pids of this process's children running the solver worker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"adapters.solver_process" in cmdline:
            found.append(int(entry.name))
    return found


def test_the_worker_returns_the_schedule_the_same_solve_gives_here_and_stays_warm() -> None:
    """The fast optimiser in the worker and a fresh one in this process give the same
    schedule on the same problem (both start cold); the second solve runs in the same worker
    and, warm-started there, gives what a warm re-solve gives here."""
    problem, _ = build_problem(_depot(), T0, PlanningSettings())
    local = FastSolver()
    here = local.solve(problem)
    here_warm = local.solve(problem)
    solver = SolverProcess(controller.optimiser.solve)
    try:
        there = solver(problem)
        pid = solver.pid
        again = solver(problem)
        assert pid is not None
        assert pid != os.getpid()
        assert solver.pid == pid
        # and it runs below this process (SolverProcessConfig.nice, 10 by default)
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, ours + 10)
    finally:
        solver.close()
    assert there.vehicle_ids == here.vehicle_ids
    np.testing.assert_allclose(there.charge_kw, here.charge_kw, atol=1e-9)
    np.testing.assert_allclose(there.discharge_kw, here.discharge_kw, atol=1e-9)
    assert there.energy_cost_eur == pytest.approx(here.energy_cost_eur, abs=1e-9)
    assert there.solver == here.solver
    assert there.status == here.status
    # Flat prices leave ties: the warm re-solve may land on another optimal vertex, the same
    # one in both processes when the worker kept its warm state.
    np.testing.assert_allclose(again.charge_kw, here_warm.charge_kw, atol=1e-9)
    assert again.energy_cost_eur == pytest.approx(here.energy_cost_eur, abs=1e-6)
    assert solver.counters == {"worker_starts": 1, "solves": 2}


def test_a_niceness_outside_what_the_system_takes_is_refused() -> None:
    """0..19 is what `nice` can add; anything else is refused before a worker starts."""
    for nice in (-1, 20):
        with pytest.raises(ValueError, match="nice must be within 0..19"):
            SolverProcessConfig(nice=nice)


def test_a_worker_that_dies_mid_solve_raises_at_once_and_is_replaced() -> None:
    """A crash inside the solve (SIGKILL of itself, as a segfault in native code) is seen as
    end of file, not waited out to the deadline."""
    problem, _ = build_problem(_depot(), T0, PlanningSettings())
    solver = SolverProcess(solver_targets.crash, SolverProcessConfig(solve_deadline_s=30.0))
    try:
        solver.start()
        first = solver.pid
        started = time.monotonic()
        with pytest.raises(SolverUnavailable, match="died"):
            solver(problem)
        assert time.monotonic() - started < 20.0  # the start (< 20 s), not the 30 s deadline
        assert first is not None
        assert not _alive(first)
        assert solver.pid not in (None, first)
    finally:
        solver.close()
    assert solver.counters["worker_deaths"] == 1
    assert solver.counters["worker_starts"] == 2


def test_a_hung_worker_is_cut_off_at_its_deadline_and_the_planner_falls_back() -> None:
    """A solve that never returns is abandoned after `solve_deadline_s`: the worker is killed
    and reaped, the timeout counted, and the plan is the proportional share within head-room."""
    state = _depot(cars=4, headroom_kw=12.0)
    solver = SolverProcess(solver_targets.hang, SolverProcessConfig(solve_deadline_s=0.5))
    planner = StatePlanner(solve=solver)
    try:
        solver.start()
        hung = solver.pid
        started = time.monotonic()
        plan = planner(state, T0)
        waited = time.monotonic() - started
        assert plan.fallback
        assert "SolverTimedOut" not in plan.note  # the planner's note is the reason itself
        assert "no answer within 0.5 s" in plan.note
        site_kw = np.sum([s.kw for s in plan.setpoints], axis=0)
        assert site_kw.max() <= 12.0 + 1e-9
        assert site_kw.max() > 0.0
        assert 0.5 <= waited < 20.0  # the deadline after the worker's start
        assert hung is not None
        assert not _alive(hung)
        assert solver.pid not in (None, hung)
    finally:
        solver.close()
    assert solver.counters == {"worker_starts": 2, "timeouts": 1}


def test_an_error_in_the_worker_is_raised_here_and_close_leaves_no_worker() -> None:
    """The solve's exception comes back with its type and message and the worker stays; after
    `close()` it has exited and been reaped, and a solve raises."""
    problem, _ = build_problem(_depot(cars=3), T0, PlanningSettings())
    solver = SolverProcess(solver_targets.fail)
    try:
        with pytest.raises(SolverFailed, match="ValueError: cannot plan 3 cars"):
            solver(problem)
        pid = solver.pid
        with pytest.raises(SolverFailed):
            solver(problem)
        assert solver.pid == pid
        assert pid is not None
        assert pid in _children()
    finally:
        solver.close()
    assert not _alive(pid)
    assert _children() == []
    with pytest.raises(SolverUnavailable, match="closed"):
        solver(problem)
    assert solver.counters == {"worker_starts": 1, "solve_errors": 2}


def test_only_a_function_a_fresh_interpreter_can_import_is_taken() -> None:
    """Lambdas and closures have no importable name: refused here, not in the worker."""
    assert target_of(share_by_need) == SHARE
    with pytest.raises(ValueError, match="module-level"):
        target_of(lambda problem: share_by_need(problem))
    with pytest.raises(ValueError, match="module:qualname"):
        target_of("share_by_need")


async def test_the_service_counts_the_fallback_when_the_worker_is_killed(
    redis: Redis, clock: SimClock
) -> None:
    """kill -9 of the idle worker between two plans: the next plan is the proportional share
    (flagged with the reason, counted in `plans_fallback`), the dead worker is reaped and
    replaced, and the plan after is solved in the new one."""
    solver = SolverProcess(SHARE)
    plans = PlanRecorder()
    service = ControllerService(
        store=RedisFleetStore(redis, "depot"),
        clock=clock,
        planner=StatePlanner(solve=solver),
        sink=plans,
        settings=Settings(site="depot", coalesce_window_s=0.2),
    )
    task = asyncio.create_task(service.run())
    try:
        await service.settled()
        for event in _depot_events(clock.now()):
            await service.submit(event)  # type: ignore[arg-type]
        await service.applied()
        await clock.advance(timedelta(seconds=0.2))
        await service.settled()
        assert not plans.plans[-1].fallback
        assert plans.plans[-1].setpoints
        old = solver.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await service.submit(soc_reported("ev-1", 0.4, clock.now()))
        await service.applied()
        await clock.advance(timedelta(seconds=0.2))
        await service.settled()
        fallen = plans.plans[-1]
        assert fallen.fallback
        assert "died" in fallen.note
        assert fallen.schedule.solver == "share_by_need"
        assert service.counters["plans_fallback"] == 1
        assert not _alive(old)  # killed and reaped
        assert solver.pid not in (None, old)  # its successor
        await service.submit(soc_reported("ev-1", 0.45, clock.now()))
        await service.applied()
        await clock.advance(timedelta(seconds=0.2))
        await service.settled()
        assert not plans.plans[-1].fallback
        assert service.counters["plans_fallback"] == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(solver.close)
    assert solver.counters["worker_deaths"] == 1
    assert solver.counters["worker_starts"] == 2


def _depot_events(at: datetime) -> list[object]:
    return [*small_site(at, cars=3), flat_prices(at, at), flat_headroom(at, at, 20.0)]


async def test_the_runtime_plans_in_its_worker_and_leaves_no_process_behind(
    tmp_path: Path,
) -> None:
    """`bootstrap.run` with the default settings solves with the optimiser in a worker; when
    the runtime stops, the worker is gone."""
    settings = Settings(data_dir=str(tmp_path / "var"), ocpp_port=0, site="worker")
    assert settings.planning.solver_process
    ready: asyncio.Future[bootstrap.Runtime] = asyncio.get_running_loop().create_future()

    async def on_ready(runtime: bootstrap.Runtime) -> None:
        ready.set_result(runtime)

    task = asyncio.create_task(bootstrap.run(settings, on_ready=on_ready))
    try:
        async with asyncio.timeout(60.0):
            runtime = await ready
            assert runtime.solver is not None
            assert runtime.solver.target == "controller.optimiser:solve"
            await runtime.service.counted("plans", 1)
            await runtime.service.planner_idle()
            pid = runtime.solver.pid
            assert pid is not None
            assert pid in _children()
            assert runtime.solver.counters["solves"] >= 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not _alive(pid)
    assert _children() == []


def test_a_worker_whose_controller_is_killed_exits_by_itself() -> None:
    """kill -9 of the process that started the worker (no `close()`), the worker idle after a
    solve: it reads end of file on its input and exits; nothing is left running."""
    code = (
        "import time\n"
        "from datetime import UTC, datetime\n"
        "from adapters.solver_process import SolverProcess\n"
        "from controller.planning.build import build_problem\n"
        "from controller.settings import PlanningSettings\n"
        "from controller.state import FleetState\n"
        "now = datetime(2024, 3, 4, 16, 0, tzinfo=UTC)\n"
        "problem, _ = build_problem(FleetState(), now, PlanningSettings())\n"
        f"solver = SolverProcess({SHARE!r})\n"
        "solver(problem)  # the worker is up and waits for the next problem\n"
        "print(solver.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2]
    ) as parent:
        try:
            assert parent.stdout is not None
            worker = int(parent.stdout.readline())
            assert _running(worker)
        finally:
            parent.kill()
    deadline = time.monotonic() + 20.0
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)  # a real process exiting: wall time is what it takes
    assert not _running(worker)


def _running(pid: int) -> bool:
    """Whether `pid` exists and has not exited (an exited orphan may wait as a zombie for a
    reaper that never comes in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
