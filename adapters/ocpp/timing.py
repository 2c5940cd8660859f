"""How long the central system takes to answer the CALLs it receives, by action.

A charger measures the whole round trip: its own event loop, the wire, the central system's
event loop before the frame is read, the handler (with its Redis writes), the answer back.
The central system can only see its own part: from the moment the frame checker hands a CALL
to the router to the moment its CALLRESULT (or CALLERROR) is written. Comparing the two says
whether a slow round trip was spent in the handlers or in the queue in front of them
(docs/reliability.md, the soak's "handled in" rows).

The durations are kept in a preallocated ring per action (the last `keep` of each), so
recording allocates nothing per CALL and the memory is fixed from the first CALL of an action
on: the soak's memory-growth check must not see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KEEP = 65_536  # durations kept per action (512 KiB each)


@dataclass(slots=True)
class _Ring:
    values_s: np.ndarray
    count: int = 0


@dataclass(slots=True)
class HandlingTimes:
    """The last `keep` handling durations of each CALL action, and their percentiles."""

    keep: int = KEEP
    _rings: dict[str, _Ring] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"keep must be at least 1, not {self.keep}")

    def record(self, action: str, seconds: float) -> None:
        """One CALL of `action` answered `seconds` after it was routed."""
        ring = self._rings.get(action)
        if ring is None:
            # np.full writes every page now (np.zeros maps them lazily: RSS would grow as it fills)
            ring = self._rings[action] = _Ring(np.full(self.keep, 0.0))
        ring.values_s[ring.count % self.keep] = seconds
        ring.count += 1

    def count(self, action: str) -> int:
        """How many CALLs of `action` were recorded in all (not only those kept)."""
        ring = self._rings.get(action)
        return 0 if ring is None else ring.count

    def percentiles_ms(self) -> dict[str, dict[str, float]]:
        """Per action: n (kept), p50, p95, p99 and max of the kept durations, in ms."""
        out: dict[str, dict[str, float]] = {}
        for action, ring in sorted(self._rings.items()):
            kept = ring.values_s[: min(ring.count, self.keep)] * 1000.0
            if kept.size == 0:
                continue
            p50, p95, p99 = np.percentile(kept, (50, 95, 99))
            out[action] = {
                "n": float(kept.size),
                "p50": float(p50),
                "p95": float(p95),
                "p99": float(p99),
                "max": float(kept.max()),
            }
        return out
