"""The optimiser in a process of its own: a `SolveFn` that solves in one long-lived worker.

The planner runs off the event loop (`asyncio.to_thread`), but a thread of the controller
process still shares the interpreter lock with the loop that answers OCPP and MQTT: the
optimiser's Python work (problem preparation, rounding, repair) holds it for tens to hundreds of
milliseconds per plan at 1,000 cars. HiGHS itself releases the lock while it runs (measured:
a spinning thread keeps ~80 % of its rate during `Highs.run`), the Python around it does not.
`SolverProcess` sends the `PlanningProblem` to a worker process and waits for the `Schedule`;
the waiting thread sleeps in `poll(2)`, without the lock.

The worker is a fresh interpreter (`python -m adapters.solver_process`, never a fork of the
threaded asyncio process), started at the first solve (or by `start()`), and kept: the fast
solver's warm-start state (the last basis) lives in it, so a re-plan after a small change stays
warm. Messages go as `multiprocessing.connection.Connection` messages (length-framed pickles)
on two pipes of its own (not stdin and stdout, which a solver library may write to).

Failures (RELIABILITY.md: an optimiser error or time-out never blocks dispatch): a worker that
dies (killed, crashed in native code) or takes longer than `solve_deadline_s` is killed, reaped
and replaced at once (the new one imports while the plan goes out), and the call raises, so the
planner publishes the proportional share for that plan (`StatePlanner` falls back and marks the
plan). An exception inside the worker's solve is raised here as `SolverFailed` and the worker
is kept. Each case is counted in `counters`.

Shutdown: `close()` closes the worker's input; it exits at the end of file (and is killed if it
does not within a second). A worker whose parent dies without closing (kill -9) sees the same
end of file, after the solve in hand if any (bounded by the solver's own time limit).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the worker imports only what its target needs: it starts faster
    from controller.planning.planner import SolveFn
    from controller.planning.problem import PlanningProblem, Schedule

log = logging.getLogger(__name__)

_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


class SolverUnavailable(RuntimeError):
    """The worker could not be started, or died before answering."""


class SolverTimedOut(TimeoutError):
    """The worker did not answer within its deadline; it was killed."""


class SolverFailed(RuntimeError):
    """The solve raised inside the worker (the worker is kept)."""


@dataclass(frozen=True, slots=True)
class SolverProcessConfig:
    """Deadlines of the worker process, in wall seconds, and its scheduling priority.

    `solve_deadline_s` bounds one solve including the transfer of problem and schedule: the
    optimiser's own budget (`OptimiserOptions.time_limit_s`, 2 s for the LP stages) plus a
    margin for its repair rounds and a loaded machine. `start_deadline_s` bounds a new worker's
    start (a fresh interpreter importing numpy, scipy and highspy: 1-3 s, more under load).
    `nice` is added to the worker's niceness (0-19): when the cores are busy, the process that
    answers the chargers runs before the solve, which has its fallback; an idle core still
    goes to the solve.
    """

    solve_deadline_s: float = 10.0
    start_deadline_s: float = 60.0
    nice: int = 10

    def __post_init__(self) -> None:
        if self.solve_deadline_s <= 0.0:
            raise ValueError(f"solve_deadline_s must be positive, not {self.solve_deadline_s}")
        if self.start_deadline_s <= 0.0:
            raise ValueError(f"start_deadline_s must be positive, not {self.start_deadline_s}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be within 0..19, not {self.nice}")


def target_of(solve: SolveFn | str) -> str:
    """The `module:qualname` by which the worker imports `solve`.

    Raises:
        ValueError: `solve` is not a module-level function (a lambda, a closure, a bound
            method), so a fresh interpreter could not find it by name.
    """
    if isinstance(solve, str):
        resolve_target(solve)  # fail here, not in the worker
        return solve
    module = getattr(solve, "__module__", None)
    qualname = getattr(solve, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        raise ValueError(f"{solve!r} is not a module-level function a worker can import")
    target = f"{module}:{qualname}"
    if resolve_target(target) is not solve:
        raise ValueError(f"{target} does not name {solve!r}")
    return target


def resolve_target(target: str) -> SolveFn:
    """Import `module:qualname` and return the function it names.

    Raises:
        ValueError: `target` is not of the form `module:qualname` or names nothing callable.
    """
    module_name, _, qualname = target.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"solver target {target!r} is not 'module:qualname'")
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"solver target {target!r} is not callable")
    solve: SolveFn = found
    return solve


# --- transport: the standard library's pickled, length-framed messages over a pipe ------------


def _connection(fd: int, *, readable: bool) -> Connection:
    """One direction of a pipe as a `multiprocessing.connection.Connection` (it owns `fd`)."""
    return Connection(fd, readable=readable, writable=not readable)


def _read(conn: Connection, deadline: float | None) -> Any:
    """The next message; `TimeoutError` if none has started by `deadline` (monotonic s).

    `poll` waits in select(2), without the interpreter lock; the message is our own worker's
    (or parent's) answer on a pipe no one else holds, so unpickling it is safe."""
    if deadline is not None and not conn.poll(max(0.0, deadline - time.monotonic())):
        raise TimeoutError("no answer before the deadline")
    return conn.recv()


# --- the parent's side --------------------------------------------------------------------------


@dataclass(slots=True)
class _Worker:
    process: subprocess.Popen[bytes]
    to_worker: Connection  # our write end of its input pipe
    from_worker: Connection  # our read end of its output pipe
    ready: bool = False


class SolverProcess:
    """A `SolveFn` that runs `solve` in one long-lived worker process (see the module doc).

    Calls are serialised (one problem in the worker at a time); they block the calling thread,
    not the interpreter, so call it from a thread (the service's planner runs in one).

    Args:
        solve: a module-level function the worker imports by name, or its `module:qualname`.
        config: the deadlines.
    """

    def __init__(self, solve: SolveFn | str, config: SolverProcessConfig | None = None) -> None:
        self.target = target_of(solve)
        self.config = config or SolverProcessConfig()
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"SolverProcess({self.target!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """The worker's process id (None: no worker now)."""
        worker = self._worker
        return None if worker is None else worker.process.pid

    def start(self) -> None:
        """Start the worker now if there is none (it imports in the background)."""
        if self._closed:
            raise SolverUnavailable("the solver process was closed")
        if self._worker is None:
            self._worker = self._spawn()

    def __call__(self, problem: PlanningProblem) -> Schedule:
        """Solve `problem` in the worker.

        Raises:
            SolverUnavailable: the worker could not be started or died (it is replaced).
            SolverTimedOut: no answer within `solve_deadline_s` (the worker is replaced).
            SolverFailed: the solve raised in the worker.
        """
        with self._lock:
            worker = self._ready_worker()
            deadline = time.monotonic() + self.config.solve_deadline_s
            try:
                worker.to_worker.send(problem)
                kind, payload = _read(worker.from_worker, deadline)
            except TimeoutError as exc:
                self.counters["timeouts"] += 1
                self._replace(worker, "took longer than its deadline")
                raise SolverTimedOut(
                    f"the solver process gave no answer within {self.config.solve_deadline_s} s"
                ) from exc
            except (EOFError, OSError) as exc:
                self.counters["worker_deaths"] += 1
                code = self._replace(worker, "died")
                raise SolverUnavailable(f"the solver process died (exit status {code})") from exc
            if kind != "ok":
                self.counters["solve_errors"] += 1
                raise SolverFailed(f"in the solver process: {payload}")
            self.counters["solves"] += 1
            schedule: Schedule = payload
            return schedule

    def close(self) -> None:
        """Stop the worker (end of file on its input; killed after a second) and reap it.

        A solve in hand in another thread is cut short: the worker is killed, and that call
        raises `SolverUnavailable` (its thread reaps the worker)."""
        self._closed = True
        if not self._lock.acquire(blocking=False):
            worker = self._worker
            if worker is not None and worker.process.poll() is None:
                worker.process.kill()
            self._lock.acquire()  # the solving thread sees end of file at once
        try:
            worker, self._worker = self._worker, None
            if worker is not None:
                _stop(worker, grace_s=1.0)
        finally:
            self._lock.release()

    # -- internals --

    def _spawn(self) -> _Worker:
        to_read, to_write = os.pipe()
        from_read, from_write = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_PROJECT_ROOT, *filter(None, [env.get("PYTHONPATH")])])
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "adapters.solver_process",
                    self.target,
                    str(to_read),
                    str(from_write),
                    str(self.config.nice),
                ],
                pass_fds=(to_read, from_write),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            for fd in (to_read, to_write, from_read, from_write):
                os.close(fd)
            raise
        os.close(to_read)
        os.close(from_write)
        self.counters["worker_starts"] += 1
        log.info("solver process %d started for %s", process.pid, self.target)
        return _Worker(
            process,
            _connection(to_write, readable=False),
            _connection(from_read, readable=True),
        )

    def _ready_worker(self) -> _Worker:
        if self._closed:
            raise SolverUnavailable("the solver process was closed")
        worker = self._worker
        if worker is None:
            worker = self._worker = self._spawn()
        if worker.ready:
            return worker
        try:
            kind, detail = _read(
                worker.from_worker, time.monotonic() + self.config.start_deadline_s
            )
        except (TimeoutError, EOFError, OSError) as exc:
            self.counters["start_failures"] += 1
            self._worker = None
            _stop(worker, grace_s=0.0)
            raise SolverUnavailable(f"the solver process did not start: {exc}") from exc
        if kind != "ready":
            self.counters["start_failures"] += 1
            self._worker = None
            _stop(worker, grace_s=0.0)
            raise SolverUnavailable(f"the solver process did not start: {detail}")
        worker.ready = True
        return worker

    def _replace(self, worker: _Worker, why: str) -> int | None:
        """Kill and reap `worker`, start its successor; the exit status of the old one."""
        code = _stop(worker, grace_s=0.0)
        log.error("solver process %d %s; replaced", worker.process.pid, why)
        self._worker = None if self._closed else self._spawn()
        return code


def _stop(worker: _Worker, *, grace_s: float) -> int | None:
    """End `worker`: close its input, wait `grace_s` for it to exit, else kill; reap it."""
    for conn in (worker.to_worker, worker.from_worker):
        with contextlib.suppress(OSError):
            conn.close()
    process = worker.process
    if grace_s > 0:
        try:
            return process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    if process.poll() is None:
        process.kill()
    return process.wait()


# --- the worker's side --------------------------------------------------------------------------


def serve(target: str, from_parent_fd: int, to_parent_fd: int) -> None:
    """The worker's loop: import `target`, say ready, then solve each problem until EOF."""
    from_parent = _connection(from_parent_fd, readable=True)
    to_parent = _connection(to_parent_fd, readable=False)
    try:
        solve = resolve_target(target)
    except Exception as exc:
        with contextlib.suppress(BrokenPipeError):
            to_parent.send(("error", f"cannot import {target}: {type(exc).__name__}: {exc}"))
        return
    try:
        to_parent.send(("ready", os.getpid()))
    except BrokenPipeError:
        return  # the parent is gone already
    while True:
        try:
            problem = _read(from_parent, None)
        except EOFError:
            return  # the parent closed (or died): nothing more to do
        try:
            reply: tuple[str, object] = ("ok", solve(problem))
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            to_parent.send(reply)
        except BrokenPipeError:
            return
        except Exception as exc:  # the schedule would not pickle
            to_parent.send(("error", f"{type(exc).__name__}: {exc}"))


def main(argv: list[str]) -> None:
    """`python -m adapters.solver_process TARGET FROM_PARENT_FD TO_PARENT_FD [NICE]`."""
    # A Ctrl-C in the terminal reaches the whole process group: the parent decides when the
    # worker ends (by closing its input), so the worker does not die mid-answer on it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target, from_parent, to_parent = argv[0], int(argv[1]), int(argv[2])
    if len(argv) > 3 and int(argv[3]) > 0:
        os.nice(int(argv[3]))  # below the controller: see SolverProcessConfig.nice
    serve(target, from_parent, to_parent)


if __name__ == "__main__":
    main(sys.argv[1:])
