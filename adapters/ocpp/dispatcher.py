"""The lease dispatcher: plans become SetChargingProfile leases on the connected chargers.

It is a `controller.ports.PlanSink` (`publish`) and an `adapters.ocpp.ports.ChargerListener`
(`charger_ready`, `charger_gone`). Each connected charger has one worker task that reconciles
what voltpool wants installed (from the latest plan and fleet state, at the current time) with
what the charger accepted:

- at boot and on every reconnect nothing is assumed installed, and the TxDefaultProfile (safe
  share) and ChargePointMaxProfile (circuit limit) go first, before any TxProfile;
- a profile is sent only when it differs beyond the deadband (or switches on/off), or when its
  lease ends within the refresh margin (leases are refreshed from the latest plan);
- decreases go before increases, across chargers too: while any charger still has a decrease
  to send (or in flight), no other charger is sent an increase; a decrease that fails is
  retried later and no longer holds the others (it is counted and the charger marked);
- one call in flight per charger (the worker is sequential; the library's call lock too), and
  the latest plan wins: a worker always builds from the newest plan when it sends;
- a Rejected answer, a CALLERROR or a timeout is counted, the charger is marked as not
  following, and the profile is retried with exponential back-off on the clock;
- `Accepted` is a claim: every measured power from MeterValues is compared with the limit in
  force (`adapters.ocpp.compliance`); a connector over it on two consecutive samples is flagged,
  its *measured* draw is budgeted, and the other connectors' setpoints are scaled down so that
  measured + planned stays within the plan's head-room (RELIABILITY.md P-05/P-07).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from adapters.ocpp.aio import stop_task
from adapters.ocpp.central import CentralSystem
from adapters.ocpp.compliance import ComplianceConfig, ComplianceMonitor
from adapters.ocpp.config import LeaseConfig
from adapters.ocpp.errors import CallFailed, CallTimedOut, ChargerUnreachable
from adapters.ocpp.profiles import (
    OutgoingProfile,
    band_in_unit,
    default_profile,
    differs,
    from_limit,
    max_profile,
    safe_share_per_connector_kw,
    tx_profile,
)
from controller.domain import ChargerId
from controller.planning.plan import Plan
from controller.ports import Clock
from controller.state import FleetState

log = logging.getLogger(__name__)

ORDER = {"default": 0, "max": 1}


@dataclass(slots=True)
class _Link:
    """What one connected charger has accepted, and its worker."""

    charger_id: ChargerId
    sent: dict[str, OutgoingProfile] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    retry_at: dict[str, datetime] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    trigger_status: bool = False
    task: asyncio.Task[None] | None = None


class LeaseDispatcher:
    """Sends each connected charger the profiles the latest plan asks for, as leases.

    Args:
        central: the central system the chargers are connected to.
        clock: for lease times, refreshes and retry back-off.
        state: where to read the fleet state between plans (e.g. the service's `state`);
            without it, the state of the last `publish` is used.

    It registers itself as a listener of `central` when built.
    """

    def __init__(
        self,
        central: CentralSystem,
        clock: Clock,
        config: LeaseConfig | None = None,
        *,
        state: Callable[[], FleetState] | None = None,
        compliance: ComplianceConfig | None = None,
    ) -> None:
        self.central = central
        self.clock = clock
        self.config = config or LeaseConfig()
        self._state_fn = state
        self._state = FleetState()
        self._plan: Plan | None = None
        self._links: dict[ChargerId, _Link] = {}
        self.counters: Counter[str] = Counter()
        self.not_following: set[ChargerId] = set()
        self._activity = asyncio.Event()
        self.compliance = ComplianceMonitor(compliance or ComplianceConfig())
        self.budget_factor = 1.0  # the scale applied to compliant setpoints (1: none)
        self._decreasing: set[ChargerId] = set()  # chargers with a decrease not yet settled
        central.add_listener(self)
        central.add_meter_listener(self.meter_sampled)

    # -- PlanSink --

    async def publish(self, plan: Plan, state: FleetState) -> None:
        """Take a new plan: every connected charger's worker reconciles against it."""
        self._plan = plan
        self._state = state
        self.counters["plans"] += 1
        now = self.clock.now()
        for charger_id, known in self._links.items():
            wanted = self.wanted(charger_id, now) or []
            if any(self._due(known, p, now) and self._change(known, p, now) < 0 for p in wanted):
                self._decreasing.add(charger_id)
        for charger_id in self.central.online():
            link = self._links.get(charger_id)
            if link is None:
                # Connected before the dispatcher knew it (or before any plan): bring it up now.
                self._start_link(charger_id, trigger_status=False)
            else:
                link.idle.clear()
                link.wake.set()

    # -- ChargerListener --

    async def charger_ready(self, charger_id: ChargerId, *, rebooted: bool) -> None:
        """(Re)connected or rebooted: assume nothing is installed and bring it to the plan."""
        self.counters["bring_ups"] += 1
        self._start_link(charger_id, trigger_status=not rebooted)

    async def charger_gone(self, charger_id: ChargerId) -> None:
        """Disconnected: stop its worker; what it accepted last stays in Redis."""
        link = self._links.pop(charger_id, None)
        self._release(charger_id)
        if link is not None and link.task is not None:
            await stop_task(link.task)

    # -- MeterListener: is each connector doing what it accepted? --

    def meter_sampled(
        self, charger_id: ChargerId, connector_id: int, at: datetime, power_kw: float
    ) -> None:
        """Judge one measured power against the limit in force; re-budget on a flag change."""
        link = self._links.get(charger_id)
        charger = self.state.chargers.get(charger_id)
        limit_kw = None
        if link is not None and charger is not None:
            limit_kw = self._limit_in_force_kw(link, connector_id, at)
        changed = self.compliance.observe((charger_id, connector_id), power_kw, limit_kw, at)
        if not changed:
            return
        if self.compliance.is_flagged(charger_id):
            self.counters["non_compliant_flags"] += 1
            self.not_following.add(charger_id)
        else:
            self.counters["non_compliant_cleared"] += 1
        for other in self._links.values():  # every charger's budget changed
            other.idle.clear()
            other.wake.set()

    def _limit_in_force_kw(self, link: _Link, connector_id: int, at: datetime) -> float | None:
        """The composite limit the charger accepted for the connector at `at`, in kW."""
        charger = self.state.chargers.get(link.charger_id)
        if charger is None:
            return None
        tx = link.sent.get(f"tx:{connector_id}")
        base = tx if tx is not None else link.sent.get("default")
        if base is None:
            return None
        limit = from_limit(base.limit_at(at), charger, base.unit)
        cap = link.sent.get("max")
        if cap is not None:
            limit = min(limit, from_limit(cap.limit_at(at), charger, cap.unit))
        return max(0.0, limit)

    def _budget(self, plan: Plan, now: datetime) -> float:
        """The factor on compliant setpoints so that measured rogue draw + plan <= head-room."""
        rogue = self.compliance.non_compliant()
        if not rogue or not plan.slot_starts:
            return 1.0
        t = max(0, bisect.bisect_right(plan.slot_starts, now) - 1)
        if t >= len(plan.headroom_kw):
            return 1.0
        measured = sum(max(0.0, kw) for kw in rogue.values())
        compliant = sum(
            max(0.0, s.kw[t])
            for s in plan.setpoints
            if (s.charger_id, s.connector_id) not in rogue and t < len(s.kw)
        )
        if compliant <= 0.0:
            return 1.0
        return min(1.0, max(0.0, (plan.headroom_kw[t] - measured) / compliant))

    # -- for tests, scenarios and shutdown --

    async def settled(self, charger_id: ChargerId) -> None:
        """Wait until the charger's worker has nothing to send now (retries may be scheduled)."""
        link = self._links.get(charger_id)
        if link is not None:
            await link.idle.wait()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Until `predicate()` holds, checked after every send and every idle point.

        Raises:
            TimeoutError: not within `timeout_s` (wall time: it waits for chargers' answers).
        """
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._activity.clear()
                await self._activity.wait()

    def sent(self, charger_id: ChargerId) -> dict[str, OutgoingProfile]:
        """What the charger accepted, by slot, as far as this process knows."""
        link = self._links.get(charger_id)
        return dict(link.sent) if link is not None else {}

    async def close(self) -> None:
        """Stop every worker."""
        for charger_id in list(self._links):
            await self.charger_gone(charger_id)

    # -- what is wanted --

    @property
    def state(self) -> FleetState:
        """The fleet state the profiles are built from."""
        return self._state_fn() if self._state_fn is not None else self._state

    def wanted(self, charger_id: ChargerId, now: datetime) -> list[OutgoingProfile] | None:
        """The profiles voltpool wants on a charger now, in sending order; None if unknown."""
        state = self.state
        charger = state.chargers.get(charger_id)
        if charger is None:
            return None
        safe_kw = safe_share_per_connector_kw(state, charger_id)
        profiles = [
            default_profile(charger, safe_kw, now, self.config),
            max_profile(charger, now, self.config),
        ]
        # The central system's book is fresher than the fleet state (a stop it took may not be
        # applied yet); the state is the fallback when the book could not be read.
        running = self.central.active_transactions(charger_id)
        if running is None:
            running = {
                c.connector_id: c.transaction_id
                for c in charger.connectors
                if c.transaction_id is not None
            }
        plan = self._plan
        factor = self._budget(plan, now) if plan is not None else 1.0
        if factor < self.budget_factor - 1e-9:
            self.counters["budget_reductions"] += 1
        self.budget_factor = factor
        for connector_id, transaction_id in sorted(running.items()):
            setpoint = None
            if plan is not None:
                setpoint = next(
                    (
                        s
                        for s in plan.setpoints
                        if s.charger_id == charger_id and s.connector_id == connector_id
                    ),
                    None,
                )
            if (
                setpoint is not None
                and factor < 1.0
                and (charger_id, connector_id) not in self.compliance.non_compliant()
            ):
                # Budget the rogue connectors' measured draw: scale this one down (charging only).
                setpoint = replace(
                    setpoint, kw=tuple(kw * factor if kw > 0.0 else kw for kw in setpoint.kw)
                )
            profiles.append(
                tx_profile(
                    charger, connector_id, transaction_id, setpoint, plan, safe_kw, now, self.config
                )
            )
        return profiles

    # -- the worker --

    def _start_link(self, charger_id: ChargerId, *, trigger_status: bool) -> None:
        old = self._links.pop(charger_id, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        link = _Link(charger_id, trigger_status=trigger_status)
        self._links[charger_id] = link
        link.task = asyncio.ensure_future(self._work(link))

    def _due(self, link: _Link, profile: OutgoingProfile, now: datetime) -> bool:
        retry = link.retry_at.get(profile.slot)
        if retry is not None and retry > now:
            return False
        old = link.sent.get(profile.slot)
        charger = self.state.chargers.get(link.charger_id)
        band = band_in_unit(self.config.deadband_kw, charger) if charger is not None else 0.0
        if differs(old, profile, now, band):
            return True
        if old is not None and old.lease_end is not None:
            margin = timedelta(seconds=self.config.refresh_margin_s)
            return old.lease_end - now <= margin
        return False

    def _change(self, link: _Link, profile: OutgoingProfile, now: datetime) -> float:
        """How much a TxProfile raises (> 0) or lowers (< 0) the connector's limit now, in its
        unit; 0 for the default and max profiles (caps: never an increase in draw)."""
        if profile.slot in ORDER:
            return 0.0
        old = link.sent.get(profile.slot) or link.sent.get("default")
        return profile.limit_at(now) - (old.limit_at(now) if old is not None else 0.0)

    def _release(self, charger_id: ChargerId) -> None:
        """The charger has no decrease left: once nobody has, the held increases may go."""
        if charger_id not in self._decreasing:
            return
        self._decreasing.discard(charger_id)
        if not self._decreasing:
            for other in self._links.values():
                other.idle.clear()
                other.wake.set()

    def _order(
        self, link: _Link, profiles: list[OutgoingProfile], now: datetime
    ) -> list[OutgoingProfile]:
        def key(p: OutgoingProfile) -> tuple[int, float, str]:
            """Sort key: default, max, then TxProfiles by change (decreases first)."""
            rank = ORDER.get(p.slot, 2)
            old = link.sent.get(p.slot)
            change = p.limit_at(now) - (old.limit_at(now) if old is not None else 0.0)
            return rank, change if rank == 2 else 0.0, p.slot

        return sorted(profiles, key=key)

    def _next_wake(self, link: _Link) -> datetime | None:
        times = list(link.retry_at.values())
        margin = timedelta(seconds=self.config.refresh_margin_s)
        times += [p.lease_end - margin for p in link.sent.values() if p.lease_end is not None]
        return min(times) if times else None

    async def _work(self, link: _Link) -> None:
        try:
            while True:
                try:
                    busy = await self._reconcile(link)
                except (ChargerUnreachable, asyncio.CancelledError):
                    raise
                except Exception:
                    # A bug in building one charger's profiles must not silence it for good:
                    # log, count, and try again at the next plan or wake-up.
                    log.exception("dispatch to %s failed", link.charger_id)
                    self.counters["worker_errors"] += 1
                    busy = False
                if busy:
                    continue
                link.idle.set()
                self._activity.set()
                link.wake.clear()
                await self._sleep(link)
        except ChargerUnreachable:
            link.idle.set()

    async def _reconcile(self, link: _Link) -> bool:
        """Send what is due now; True if something was sent (look again at once)."""
        now = self.clock.now()
        wanted = self.wanted(link.charger_id, now)
        if wanted is None:
            self.counters["chargers_unknown"] += 1
            wanted = []
        slots = {p.slot for p in wanted}
        for slot in [s for s in link.sent if s not in slots]:
            # The transaction ended: the charger drops its TxProfile by itself.
            del link.sent[slot]
            link.failures.pop(slot, None)
            link.retry_at.pop(slot, None)
            await self._remember(link.charger_id, slot, None)
        due = [p for p in self._order(link, wanted, now) if self._due(link, p, now)]
        if not any(self._change(link, p, now) < 0 for p in due):
            self._release(link.charger_id)
        held = False
        if self._decreasing - {link.charger_id}:
            # Others still lower their draw: our increases wait until they are acknowledged.
            kept = [p for p in due if self._change(link, p, now) <= 0]
            held = len(kept) < len(due)
            if held:
                self.counters["increases_held"] += 1
            due = kept
        if due:
            link.idle.clear()
            for profile in due:
                await self._send(link, profile)
            return True
        if held and not self._decreasing - {link.charger_id}:
            return True  # released while we looked: go again rather than sleep
        if link.trigger_status:
            link.trigger_status = False
            await self._trigger_status(link.charger_id)
        return False

    async def _sleep(self, link: _Link) -> None:
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(link.wake.wait())]
        deadline = self._next_wake(link)
        if deadline is not None:
            waiters.append(asyncio.ensure_future(self.clock.sleep_until(deadline)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    async def _send(self, link: _Link, profile: OutgoingProfile) -> None:
        try:
            await self._send_once(link, profile)
        finally:
            self._activity.set()

    async def _send_once(self, link: _Link, profile: OutgoingProfile) -> None:
        charger_id = link.charger_id
        self.counters["profiles_sent"] += 1
        problem: str
        try:
            status = await self.central.set_charging_profile(
                charger_id, profile.connector_id, profile.to_ocpp()
            )
            if status == "Accepted" and profile.discharge is not None:
                self.counters["discharge_leases_sent"] += 1
                status, _ = await self.central.data_transfer(
                    charger_id,
                    self.config.discharge_vendor_id,
                    self.config.discharge_message_id,
                    profile.discharge_data(),
                )
        except CallTimedOut:
            self.counters["profiles_timed_out"] += 1
            problem = "timed out"
        except CallFailed as exc:
            self.counters["profiles_callerror"] += 1
            problem = f"CALLERROR {exc.code}"
        else:
            if status == "Accepted":
                self.counters["profiles_accepted"] += 1
                link.sent[profile.slot] = profile
                link.failures.pop(profile.slot, None)
                link.retry_at.pop(profile.slot, None)
                if not link.failures:
                    self.not_following.discard(charger_id)
                await self._remember(charger_id, profile.slot, profile)
                return
            self.counters["profiles_rejected"] += 1
            problem = status
        failures = link.failures.get(profile.slot, 0) + 1
        link.failures[profile.slot] = failures
        delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (failures - 1))
        link.retry_at[profile.slot] = self.clock.now() + timedelta(seconds=delay)
        self.not_following.add(charger_id)
        if failures > 1:
            self.counters["profiles_retried"] += 1
        log.warning(
            "%s: %s %s %s (attempt %d); retry in %.0f s",
            charger_id,
            profile.purpose,
            profile.slot,
            problem,
            failures,
            delay,
        )

    async def _remember(
        self, charger_id: ChargerId, slot: str, profile: OutgoingProfile | None
    ) -> None:
        try:
            await self.central.remember_profile(
                charger_id,
                slot,
                None
                if profile is None
                else {
                    "connectorId": profile.connector_id,
                    "profile": profile.to_ocpp(),
                    "leaseEnd": profile.lease_end.isoformat() if profile.lease_end else None,
                },
            )
        except Exception:  # Redis trouble must not stop the dispatch itself
            log.exception("%s: could not store the accepted profile", charger_id)

    async def _trigger_status(self, charger_id: ChargerId) -> None:
        """After a reconnect without a boot: ask for the connectors' status again (S-11)."""
        try:
            await self.central.trigger_message(charger_id, "StatusNotification")
            self.counters["status_triggered"] += 1
        except (CallFailed, CallTimedOut) as exc:
            log.info("%s: TriggerMessage(StatusNotification) failed: %s", charger_id, exc)
