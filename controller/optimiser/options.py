"""Tuning of the optimiser: which lexicographic stages run, tolerances, time budget."""

from __future__ import annotations

from dataclasses import dataclass

from controller.errors import InvalidEvent


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimiserOptions:
    """How `solve` and `solve_reference` rank schedules and post-process the LP's answer.

    The stages run in this order, each keeping the optimum of the ones before it (up to
    `stage_tolerance`): total shortfall, largest relative shortfall (`fairness`), money, peak
    import (`peak_flattening`), total ramping (`ramp_smoothing`).
    """

    peak_flattening: bool = True  # second stage: among cost-optimal plans, the lowest peak
    ramp_smoothing: bool = True  # then, among those, the smallest sum of |slot-to-slot change|
    fairness: bool = True  # share an unavoidable shortfall by relative size
    min_rate_repair: bool = True  # charger setpoints 0 or >= min_kw
    # Among the plans every stage finds optimal, the one that serves the cars in the order
    # `tiebreak_order` gives (`controller.optimiser.tiebreak`): a min-cost flow inside the final
    # plan's slot and car totals (cars that never discharge), its slivers removed by free moves;
    # kept only if no worse in any stage and in the min-rate step. Changes no optimum.
    tiebreak: bool = True
    # Its order: "laxity" (least laxity first: the latest start at full power for what the car
    # still needs) or "departure" (earliest departure first).
    tiebreak_order: str = "laxity"
    # Prices unmet energy in the report (`details["penalty_eur"]`); the ordering itself is
    # lexicographic, so no penalty, however small, can trade a kWh of shortfall for money.
    shortfall_penalty_eur_per_kwh: float = 1.0
    # Each stage may lose this much (relative, floor 1 unit) of the previous stage's optimum.
    stage_tolerance: float = 1e-7
    # Total shortfall (kWh) below which the fleet counts as fully served.
    feasibility_tolerance_kwh: float = 1e-6
    time_limit_s: float = 2.0  # per LP solve
    # The min-rate step's MIP (`controller.optimiser.residual`), run only when the cheap moves
    # would lose energy a car needs, may take this long (and never beyond `time_limit_s`).
    min_rate_mip_s: float = 0.3
    # Before the MIP, a dive on its relaxation (fix the slivers one by one, each the way that
    # leaves the least shortfall, by warm LPs): a starting plan that keeps most of the energy
    # when the MIP's time runs out before it finds one (`residual._dive`).
    min_rate_dive: bool = True
    # Fast path only: seed HiGHS with a min-cost-flow basis on a cold start, and carry the
    # previous solve's basis over to the next problem (matched by vehicle and slot time).
    flow_start: bool = True
    warm_start: bool = True
    # Fast path only, fleets without V2G: the shortfall and fairness stages of an
    # over-subscribed day by max flows (`flow_stages.py`) instead of HiGHS runs.
    flow_stages: bool = True
    # Fast path only: with at least this many charge columns of cars without V2G, HiGHS holds
    # only a working set of them and the rest are priced out exactly (`sifting.py`); 0: always.
    # From 5,000 (about 80 cars): at 278 cars it cuts a car event's re-plan p99 from ~22 to
    # ~15 ms (docs/optimiser.md); tiny fleets keep the whole model.
    sifting_min_columns: int = 5_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.stage_tolerance <= 1e-3:
            raise InvalidEvent(f"optimiser: stage_tolerance {self.stage_tolerance} not in 0..1e-3")
        if self.feasibility_tolerance_kwh < 0.0:
            raise InvalidEvent("optimiser: feasibility_tolerance_kwh must not be negative")
        if self.time_limit_s <= 0.0:
            raise InvalidEvent("optimiser: time_limit_s must be positive")
        if self.min_rate_mip_s < 0.0:
            raise InvalidEvent("optimiser: min_rate_mip_s must not be negative")
        if self.sifting_min_columns < 0:
            raise InvalidEvent("optimiser: sifting_min_columns must not be negative")
        if self.tiebreak_order not in ("laxity", "departure"):
            raise InvalidEvent(f"optimiser: tiebreak_order {self.tiebreak_order!r} unknown")
        if self.shortfall_penalty_eur_per_kwh < 0.0:
            raise InvalidEvent("optimiser: shortfall_penalty_eur_per_kwh must not be negative")

    def slack(self, value: float) -> float:
        """How far a later stage may move an earlier stage's optimum `value`."""
        return self.stage_tolerance * max(1.0, abs(value))


DEFAULT_OPTIONS = OptimiserOptions()
