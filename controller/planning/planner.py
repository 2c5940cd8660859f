"""The planner the service calls: build the problem from the state, solve it, never fail."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from controller.planning.build import build_problem, make_plan
from controller.planning.plan import Plan
from controller.planning.problem import PlanningProblem, Schedule
from controller.planning.share import share_by_need
from controller.settings import PlanningSettings
from controller.state import FleetState

log = logging.getLogger(__name__)

SolveFn = Callable[[PlanningProblem], Schedule]


@dataclass(slots=True)
class StatePlanner:
    """Builds the `PlanningProblem` for now and solves it with `solve`.

    Should the solver raise, the proportional share (`share_by_need`), which satisfies the
    head-room by construction, is returned instead, marked as a fallback.
    """

    settings: PlanningSettings = field(default_factory=PlanningSettings)
    solve: SolveFn = share_by_need

    def __call__(self, state: FleetState, now: datetime) -> Plan:
        """A plan for the horizon that starts at `now`."""
        problem, starts = build_problem(state, now, self.settings)
        try:
            schedule = self.solve(problem)
        except Exception as exc:
            log.exception("planner %s failed; falling back to proportional share", self.solve)
            schedule = share_by_need(problem)
            return make_plan(state, problem, starts, schedule, fallback=True, note=str(exc))
        return make_plan(state, problem, starts, schedule)
