"""Solve functions for the solver-process tests, importable by name in a fresh worker.

They stand for the ways an optimiser goes wrong in its own process: it crashes in native code
(the process dies), it never returns (a solver past every budget), or it raises.
"""

from __future__ import annotations

import os
import signal
import threading

from controller.planning.problem import PlanningProblem, Schedule


def crash(problem: PlanningProblem) -> Schedule:
    """The worker dies in the middle of the solve, as on a segfault in native code."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: the process was killed")


def hang(problem: PlanningProblem) -> Schedule:
    """The solve never returns (waits on an event nobody sets)."""
    threading.Event().wait()
    raise AssertionError("unreachable: nobody sets the event")


def fail(problem: PlanningProblem) -> Schedule:
    """The solve raises, as the optimiser does on a problem it cannot handle."""
    raise ValueError(f"cannot plan {problem.n_vehicles} cars")
