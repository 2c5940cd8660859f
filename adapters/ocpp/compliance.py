"""Is a charger doing what its profile says? `Accepted` is a claim; meter values are the fact.

RELIABILITY.md P-05/P-07 (EVerest soft over-current, go-e accepting and ignoring): a connector
whose measured import exceeds the limit in force by more than `tolerance_fraction` plus
`tolerance_kw` on `samples` consecutive MeterValues is flagged non-compliant. While flagged, its
*measured* draw is what the dispatcher budgets for it (`BudgetedDraw`), and the others are
reduced so that the site stays within the plan's head-room. A sample within the tolerance clears
the flag (after `samples` good ones, so one lucky sample does not re-arm a rogue charger).

Pure bookkeeping: no I/O, no clock; the dispatcher feeds it samples with the limit in force.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from controller.domain import ChargerId

log = logging.getLogger(__name__)

ConnectorKey = tuple[ChargerId, int]


@dataclass(frozen=True, slots=True)
class ComplianceConfig:
    """How much over its limit a connector may draw, and for how many samples."""

    tolerance_fraction: float = 0.10
    tolerance_kw: float = 0.35  # 0.5 A on three phases at 230 V
    samples: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.tolerance_fraction < 1.0:
            raise ValueError(f"tolerance_fraction must be in [0, 1), got {self.tolerance_fraction}")
        if self.tolerance_kw < 0.0:
            raise ValueError(f"tolerance_kw must be >= 0, got {self.tolerance_kw}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@dataclass(slots=True)
class _Track:
    over: int = 0
    under: int = 0
    flagged: bool = False
    measured_kw: float = 0.0
    limit_kw: float = 0.0
    since: datetime | None = None


@dataclass(slots=True)
class ComplianceMonitor:
    """Per connector: consecutive samples over the limit, and the flag they raise."""

    config: ComplianceConfig = field(default_factory=ComplianceConfig)
    _tracks: dict[ConnectorKey, _Track] = field(default_factory=dict)
    flags_raised: int = 0
    # The flagged connectors of each charger, kept with the flags: `is_flagged` is asked at
    # every MeterValues sample, and a scan of every connector's track there made each sample
    # cost O(fleet) (6.5 % of the controller's event loop in a 1,000-charger soak).
    _flagged: dict[ChargerId, set[int]] = field(default_factory=dict)

    def observe(
        self, key: ConnectorKey, measured_kw: float, limit_kw: float | None, at: datetime
    ) -> bool:
        """Record one sample against the limit in force (None: no limit known, not judged).

        Returns True when the connector's flag changed (raised or cleared)."""
        track = self._tracks.setdefault(key, _Track())
        track.measured_kw = measured_kw
        if limit_kw is None:
            return False
        track.limit_kw = limit_kw
        allowed = limit_kw * (1.0 + self.config.tolerance_fraction) + self.config.tolerance_kw
        if measured_kw > allowed:
            track.over += 1
            track.under = 0
            if not track.flagged and track.over >= self.config.samples:
                track.flagged = True
                track.since = at
                self._flagged.setdefault(key[0], set()).add(key[1])
                self.flags_raised += 1
                log.error(
                    "%s connector %d does not follow its profile: %.2f kW against a %.2f kW "
                    "limit on %d samples; budgeting its measured draw",
                    key[0],
                    key[1],
                    measured_kw,
                    limit_kw,
                    track.over,
                )
                return True
            return False
        track.over = 0
        track.under += 1
        if track.flagged and track.under >= self.config.samples:
            track.flagged = False
            track.since = None
            self._unflag(key)
            log.warning("%s connector %d follows its profile again", key[0], key[1])
            return True
        return False

    def forget(self, charger_id: ChargerId) -> None:
        """The charger left; its next connection starts with a clean record."""
        for key in [k for k in self._tracks if k[0] == charger_id]:
            del self._tracks[key]
        self._flagged.pop(charger_id, None)

    def _unflag(self, key: ConnectorKey) -> None:
        connectors = self._flagged.get(key[0])
        if connectors is not None:
            connectors.discard(key[1])
            if not connectors:
                del self._flagged[key[0]]

    def non_compliant(self) -> dict[ConnectorKey, float]:
        """Flagged connectors with their latest measured draw (kW)."""
        return {k: t.measured_kw for k, t in self._tracks.items() if t.flagged}

    def is_flagged(self, charger_id: ChargerId) -> bool:
        """Whether any connector of the charger is flagged (without looking at the others)."""
        return charger_id in self._flagged
