"""The optimiser: cost-optimal, grid-safe charging plans for a fleet, on two solvers.

`solve(problem)` is the fast exact path the service uses; `solve_reference(problem)` solves the
same model with cvxpy and ECOS (the textbook form); `solve_reference_compact(problem)` states
the same LP for fleets without discharge in cvxpy's compact (transportation) form. All rank
plans lexicographically: least total shortfall, then the fairest shortfall (smallest largest
relative shortfall), then least money, then (by default) the lowest peak import and the smallest
ramps among the cost-optimal plans. See docs/optimiser.md for the formulation.
"""

from __future__ import annotations

from controller.optimiser.fast import FastSolver
from controller.optimiser.options import OptimiserOptions
from controller.optimiser.stages import OptimiserFailed
from controller.planning.problem import PlanningProblem, Schedule

_FAST = FastSolver()


def solve(problem: PlanningProblem, options: OptimiserOptions | None = None) -> Schedule:
    """The optimal schedule by the fast path (HiGHS, warm-started across calls)."""
    return _FAST.solve(problem, options)


def solve_reference(problem: PlanningProblem, options: OptimiserOptions | None = None) -> Schedule:
    """The optimal schedule by the reference formulation (cvxpy + ECOS, DPP-compiled once)."""
    from controller.optimiser.reference import solve_reference as _reference

    return _reference(problem, options)


def solve_reference_compact(
    problem: PlanningProblem, options: OptimiserOptions | None = None
) -> Schedule:
    """The optimal schedule by cvxpy + ECOS on the compact (transportation) form: fleets without
    discharge only (`CompactFormUnsupported` otherwise), DPP-compiled once per structure."""
    from controller.optimiser.reference_compact import solve_reference_compact as _compact

    return _compact(problem, options)


__all__ = [
    "FastSolver",
    "OptimiserFailed",
    "OptimiserOptions",
    "solve",
    "solve_reference",
    "solve_reference_compact",
]
