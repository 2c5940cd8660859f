"""The controller's service loop: admit events, log them, apply them, re-plan, publish.

Flow of one event:

1. `submit()` checks it can enter (timestamp not from the future, command not yet expired) and
   appends it to the durable event log; a refusal is counted and, for a command, answered.
2. The consumer takes log entries (first any left unsettled by a crashed predecessor), applies
   each to the fleet state with the pure reducer, and commits the changes with the entry's
   settlement atomically and once per event id. A taken batch is applied in memory event after
   event and settled in one round trip (`_apply_batch`, `FleetStore.settle`); appends from
   concurrent submitters share a round trip too (the store's group commit, `submit_many`).
3. An applied event marks the plan dirty. Planning waits out the coalescing window, so a burst
   of events gives one plan, runs the planner off the event loop, and publishes the plan.
   Planning also runs at every slot boundary, when time alone changes the problem.

When the store fails (Redis unreachable, or out of memory with `noeviction`: RELIABILITY.md
R-07, R-08) the service does not stop. It counts the error, logs it at ERROR level and enters
*decreases only*: every plan made until the store is back is capped, connector by connector, at
the power the last plan gave it when the outage began, and never rises again in time, so no
charger is sent an increase while nothing can be recorded. `submit` raises `StoreUnavailable`
(the OCPP central system answers InternalError, the charger retries; the MQTT link keeps the
event and resubmits it). The consumer probes the store every `store_retry_s`; once a write
succeeds it reloads the committed state (reconciling whatever an answer lost in the outage
committed), re-takes the unsettled entries and plans without the cap.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timedelta

import numpy as np

from controller import failpoints
from controller.domain import SLOT, slot_floor
from controller.errors import InvalidEvent, RefusalCode, Refused, StoreUnavailable
from controller.events import Event, check_timely, is_command
from controller.planning.build import build_problem, inputs_expire_at, make_plan
from controller.planning.plan import Plan, Setpoint
from controller.planning.planner import StatePlanner
from controller.planning.share import share_by_need
from controller.ports import (
    Clock,
    CommandResults,
    FleetStore,
    LogEntry,
    Planner,
    PlanSink,
    Settlement,
)
from controller.settings import PlanningSettings, Settings
from controller.state import FleetState, apply_event

log = logging.getLogger(__name__)

TAKE_BATCH = 256


class ControllerService:
    """The asyncio service that keeps the fleet state and the plan current."""

    def __init__(
        self,
        *,
        store: FleetStore,
        clock: Clock,
        planner: Planner,
        sink: PlanSink,
        settings: Settings,
        results: CommandResults | None = None,
        plan_timeout_s: float = 30.0,
        store_retry_s: float = 0.5,
        batch_commit: bool = True,
    ) -> None:
        self.settings = settings
        self._store = store
        self._clock = clock
        self._planner = planner
        self._sink = sink
        self._results = results
        self._plan_timeout_s = plan_timeout_s
        self._state = FleetState()
        self._wake = asyncio.Event()
        self._dirty = asyncio.Event()
        self._dirty_since: datetime | None = None
        self._drained = asyncio.Event()
        self._planned = asyncio.Event()
        self._counted = asyncio.Event()
        self._planning = False
        self._received: deque[float] = deque()  # perf_counter of events awaiting a plan
        self._started = False
        self.counters: dict[str, int] = {}
        self.latencies_s: deque[float] = deque(maxlen=10_000)
        self.last_plan: Plan | None = None
        self._store_retry_s = store_retry_s
        self._store_down_since: datetime | None = None
        # While the store is down: the most each connector may be given (kW), never raised.
        self._outage_caps: dict[tuple[str, int], float] = {}
        # Stored counters of the log batch being applied, written once at its end.
        self._batch_counts: dict[str, int] = {}
        # Settle a taken batch in one round trip (False: one commit per entry, the behaviour
        # before batching; kept as the benchmarks' baseline and the tests' reference).
        self._batch_commit = batch_commit

    # --- public API -------------------------------------------------------------------------

    @property
    def state(self) -> FleetState:
        """The fleet state as of the last applied event."""
        return self._state

    @property
    def is_dirty(self) -> bool:
        """An applied event awaits its plan (the coalescing window may still be open)."""
        return self._dirty.is_set()

    @property
    def is_planning(self) -> bool:
        """The planner is running now."""
        return self._planning

    @property
    def is_drained(self) -> bool:
        """Every event submitted so far has been applied or refused."""
        return self._drained.is_set()

    @property
    def store_down_since(self) -> datetime | None:
        """When the current store outage began (None: the store works)."""
        return self._store_down_since

    @property
    def plans_made(self) -> int:
        """How many plans have been published."""
        return self.counters.get("plans", 0)

    async def start(self) -> None:
        """Load the committed state; call once before `run`."""
        self._state = await self._store.load()
        self._started = True
        self._wake.set()  # settle whatever a previous process left in the log

    async def submit(self, event: Event) -> None:
        """Admit an event into the durable log, or refuse it.

        Raises:
            Refused: the event is from the future or an already expired command. The refusal
                is counted and a command's result is published before raising.
        """
        try:
            self._check_timely(event)
        except Refused as refusal:
            await self._refused(event, refusal.reason)
            raise
        try:
            await self._store.append(event)
        except StoreUnavailable as exc:
            self._store_failed(exc, f"appending {event.event_id}")
            raise
        self._admitted(1)

    async def submit_many(self, events: Sequence[Event]) -> list[Refused | None]:
        """Admit an ordered batch into the durable log: one append round trip for all of it.

        Each event is checked as `submit` checks it. A refused event is counted (and a
        command's result published) as `submit` does, and left out; the others still go, in
        their order. Returns, per event, None when it was admitted or the `Refused` it got.

        Raises:
            StoreUnavailable: the append failed; none of the admitted events is known to be in
                the log (some may be: every event is idempotent by its id, so re-submit all).
        """
        outcomes: list[Refused | None] = []
        admitted: list[Event] = []
        for event in events:
            try:
                self._check_timely(event)
            except Refused as refusal:
                await self._refused(event, refusal.reason)
                outcomes.append(refusal)
                continue
            outcomes.append(None)
            admitted.append(event)
        if admitted:
            try:
                await self._store.append_many(admitted)
            except StoreUnavailable as exc:
                self._store_failed(exc, f"appending {len(admitted)} events")
                raise
            self._admitted(len(admitted))
        return outcomes

    def _check_timely(self, event: Event) -> None:
        """Raise `Refused` if the event is from the future or an already expired command."""
        now = self._clock.now()
        check_timely(event, now, timedelta(seconds=self.settings.max_event_ahead_s))
        expires_at = getattr(event, "expires_at", None)
        if expires_at is not None and expires_at <= now:
            raise Refused(
                RefusalCode.EXPIRED,
                f"{event.event_id}: expired at {expires_at.isoformat()}, before it arrived",
            )

    def _admitted(self, n: int) -> None:
        """`n` events are in the log: count them and wake the consumer."""
        received = time.perf_counter()
        self._received.extend([received] * n)
        self._count("events_received", n)
        self._drained.clear()
        self._wake.set()

    async def reject_invalid(self, source: str, error: InvalidEvent | ValueError) -> None:
        """Count (and log) a payload that could not even be built into an event."""
        self._count("payloads_rejected")
        self._count(f"payloads_rejected_{source}")
        await self._persist_count("payloads_rejected")
        log.warning("dropped invalid payload from %s: %s", source, error)

    async def run(self) -> None:
        """Consume the event log and plan, until cancelled."""
        if not self._started:
            await self.start()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._consume_forever())
            tasks.create_task(self._plan_forever())

    async def counted(self, name: str, at_least: int) -> None:
        """Wait until the counter `name` reaches `at_least` (for tests and scenario drivers)."""
        while self.counters.get(name, 0) < at_least:
            self._counted.clear()
            await self._counted.wait()

    async def planner_idle(self) -> None:
        """Wait until no plan is being made right now (one may still be due)."""
        while self._planning:
            self._planned.clear()
            await self._planned.wait()

    async def applied(self) -> None:
        """Wait until every submitted event has been applied (or refused)."""
        await self._drained.wait()

    async def settled(self) -> None:
        """Wait until every submitted event is applied and the plan reflects them.

        For tests and scenarios on a `SimClock`: advance the clock past the coalescing window
        first, or the plan will not be due.
        """
        await self._drained.wait()
        while self._dirty.is_set() or self._planning or self.plans_made == 0:
            self._planned.clear()
            await self._planned.wait()

    # --- consuming the log ------------------------------------------------------------------

    async def _consume_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while True:
                    # Before every batch, not only when the consumer wakes: an outage seen
                    # elsewhere (an append refused while the consumer's own commands went
                    # through) must end as soon as the store works, not when the log drains,
                    # which under a steady load can take minutes of decreases-only plans.
                    if self._store_down_since is not None:
                        await self._reconcile()
                    entries = await self._store.take(TAKE_BATCH)
                    if not entries:
                        break
                    # One entry: its commit alone is one round trip; the batch path would
                    # read the applied set first and take two.
                    if self._batch_commit and len(entries) > 1:
                        await self._apply_batch(entries)
                    else:
                        for entry in entries:
                            await self._apply(entry)
                    await self._persist_batch_counts()
            except StoreUnavailable as exc:
                self._store_failed(exc, "consuming the event log")
                # Wall time on purpose: this waits for a server, not for the simulated world.
                await asyncio.sleep(self._store_retry_s)
                self._wake.set()
                continue
            if not self._wake.is_set():
                self._drained.set()

    # --- store outages (R-07, R-08) ---------------------------------------------------------

    def _store_failed(self, exc: StoreUnavailable, doing: str) -> None:
        """Count a store error; on the first one of an outage, cap the plan at what runs now."""
        self._count("store_errors")
        self._wake.set()  # the consumer probes the store until it is back
        if self._store_down_since is not None:
            return
        now = self._clock.now()
        self._store_down_since = now
        self._outage_caps = _power_now(self.last_plan, now)
        self._count("store_outages")
        log.error(
            "store unavailable %s (%s: %s): decreases only until it is back",
            doing,
            type(exc.__cause__ or exc).__name__,
            exc.__cause__ or exc,
        )
        self._mark_dirty()  # re-plan under the cap now: it removes increases already leased

    async def _reconcile(self) -> None:
        """The store answers again: prove it takes writes, reload the committed state."""
        await self._store.count("store_recoveries")  # a write: refused while out of memory
        state = await self._store.load()
        since = self._store_down_since
        self._state = state
        self._store_down_since = None
        self._outage_caps = {}
        self._count("store_recoveries")
        log.warning(
            "store back (down since %s): committed state reloaded, planning without the cap",
            since.isoformat() if since else "?",
        )
        self._mark_dirty()

    async def _persist_count(self, name: str, by: int = 1) -> None:
        """Add to the stored counter; a store error is counted, not raised (best effort).

        While the store is down only the in-memory counter moves: waiting out the client's
        retries on every count would hold up planning."""
        if self._store_down_since is not None:
            return
        try:
            await self._store.count(name, by)
        except StoreUnavailable as exc:
            self._store_failed(exc, f"counting {name}")

    def _count_in_batch(self, name: str) -> None:
        """Count an applied (or duplicate) event in the stored counters at the end of the batch
        of log entries it came in: one HINCRBY per counter and batch, not one round trip per
        event (the consumer waited for one after each commit). Skipped while the store is down,
        as `_persist_count` does."""
        if self._store_down_since is None:
            self._batch_counts[name] = self._batch_counts.get(name, 0) + 1

    async def _persist_batch_counts(self) -> None:
        """Write the counts of the batch just applied (best effort, as `_persist_count`)."""
        counts, self._batch_counts = self._batch_counts, {}
        for name, by in counts.items():
            await self._persist_count(name, by)

    async def _apply_batch(self, entries: Sequence[LogEntry]) -> None:
        """Apply a taken batch in memory, event after event, then settle it in one round trip.

        Gives the state, counters, rejections and command results that applying the entries
        one at a time (`_apply`) gives:

        - an event id applied before (the store's applied set, read first in one round trip)
          or earlier in this batch is a duplicate: its commit writes nothing and the events
          after it are applied on the state without it;
        - a refused or undecodable entry is rejected with its reason and changes nothing;
        - results, counters and the dirty mark follow the store's answers, given after it
          answered. If a commit's answer is not the expected one (another consumer applied
          the same event meanwhile), the committed state is reloaded and the reload counted;
        - the store writes a prefix of the batch when it fails part-way (`FleetStore.settle`):
          the answered prefix is taken into the state, and the outage recovery (reload, then
          the unsettled entries taken again) does the rest.

        Memory: only the batch's start state and its end state are held while the store
        settles, never one state per entry (each is a copy of the tables its event changed:
        up to 256 of them, tens of MiB at 1,000 chargers, made the allocator's high-water
        mark; docs/reliability.md, "RSS"). A state between the two is rebuilt from the start
        state and the settlements' changes only when it is needed: a command's result is
        published once the state holds the command (as `_apply` does), and a batch settled
        only in part leaves the state after its answered prefix. Between its first and last
        answer the service shows the end state (or the re-applied one), not each entry's.
        """
        ids = [e.event.event_id for e in entries if e.event is not None]
        known = await self._store.applied_among(ids)
        seen: set[str] = set()
        start = state = self._state
        # (settlement, what it is, the event): no state per entry (see the docstring).
        items: list[tuple[Settlement, str, Event | None]] = []
        for entry in entries:
            event = entry.event
            if event is None:
                items.append((Settlement(entry, None, reason="undecodable log entry"), "", None))
                continue
            failpoints.hit("after_take")
            try:
                outcome = apply_event(state, event)
            except Refused as refusal:
                items.append((Settlement(entry, None, reason=refusal.reason), "refused", event))
                continue
            commit = Settlement(entry, event.event_id, outcome.changes)
            if event.event_id in known or event.event_id in seen:
                items.append((commit, "duplicate", event))
                continue
            seen.add(event.event_id)
            state = outcome.state  # the one before it is garbage now
            items.append((commit, "applied", event))
        settled = await self._store.settle([item[0] for item in items])
        answered = len(settled.done)
        complete = answered == len(items)
        # Walk a state forward (from `start`, by the settlements' changes) up to the last
        # answered command with a result to publish, or through the answered prefix of a
        # batch the store settled only in part; past it the state is the batch's end state.
        walk_to = answered - 1
        if complete:
            walk_to = -1
            if self._results is not None:
                walk_to = max(
                    (
                        n
                        for n, (_, what, event) in enumerate(items)
                        if what == "applied" and event is not None and is_command(event)
                    ),
                    default=-1,
                )
            if walk_to < 0:
                self._state = state
        walked = start
        reload = False
        for index, ((settlement, what, event), ok) in enumerate(
            zip(items, settled.done, strict=False)
        ):
            if what == "applied" and index <= walk_to:
                # The state first: a command's result, published below, must find it applied
                # (an operator reading the state on "accepted" sees the override), as `_apply`.
                walked = walked.with_changes(tuple(settlement.changes))
                self._state = walked
            if what == "":
                self._count("events_undecodable")
            elif what == "refused":
                assert event is not None
                await self._refused(event, settlement.reason, stored=True)
            elif what == "duplicate" or not ok:
                self._count("events_duplicate")
                self._count_in_batch("events_duplicate")
                reload = reload or ok != (what == "applied")
            else:
                assert event is not None
                self._count("events_applied")
                self._count_in_batch("events_applied")
                if is_command(event) and self._results is not None:
                    await self._results.command_result(event.event_id, True, "accepted")
                self._mark_dirty()
            if index == walk_to and complete:
                self._state = state
        if reload:
            self._state = await self._store.load()
            self._count("events_batch_reloads")
            await self._persist_count("events_batch_reloads")
            self._mark_dirty()
            log.warning("a batch commit's answers differed from the expected: state reloaded")
        if settled.error is not None:
            raise StoreUnavailable(f"settling a batch of {len(items)} entries: {settled.error}")

    async def _apply(self, entry: LogEntry) -> None:
        event = entry.event
        if event is None:
            self._count("events_undecodable")
            await self._store.reject(entry, "undecodable log entry")
            return
        failpoints.hit("after_take")
        try:
            outcome = apply_event(self._state, event)
        except Refused as refusal:
            await self._store.reject(entry, refusal.reason)
            await self._refused(event, refusal.reason, stored=True)
            return
        applied = await self._store.commit(entry, event.event_id, outcome.changes)
        if not applied:
            self._count("events_duplicate")
            self._count_in_batch("events_duplicate")
            return
        self._state = outcome.state
        self._count("events_applied")
        self._count_in_batch("events_applied")
        if is_command(event) and self._results is not None:
            await self._results.command_result(event.event_id, True, "accepted")
        self._mark_dirty()

    async def _refused(self, event: Event, reason: str, *, stored: bool = False) -> None:
        kind = "events_stale" if reason and "older than what is stored" in reason else None
        self._count("events_refused")
        await self._persist_count("events_refused")
        if kind:
            self._count(kind)
            await self._persist_count(kind)
        log.info("refused %s %s: %s", event.kind, event.event_id, reason)
        if is_command(event) and self._results is not None:
            await self._results.command_result(event.event_id, False, reason)

    def _count(self, name: str, by: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + by
        self._counted.set()

    def _mark_dirty(self) -> None:
        if not self._dirty.is_set():
            self._dirty_since = self._clock.now()
            self._dirty.set()

    # --- planning ---------------------------------------------------------------------------

    async def _plan_forever(self) -> None:
        await self._drained.wait()
        await self._plan_once()  # a plan for the state as loaded, before any new event
        while True:
            now = self._clock.now()
            boundary = slot_floor(now) + SLOT
            # An input turning stale (the site meter falling silent) changes the problem too.
            expiry = inputs_expire_at(self._state, now, _planning_settings(self._planner))
            if expiry is not None:
                boundary = min(boundary, expiry)
            dirty = asyncio.create_task(self._dirty.wait())
            tick = asyncio.create_task(self._clock.sleep_until(boundary))
            try:
                await asyncio.wait({dirty, tick}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Waiting with asyncio.wait (not awaiting the tasks under a suppress) keeps a
                # cancellation of this loop itself from being swallowed here.
                dirty.cancel()
                tick.cancel()
                await asyncio.wait({dirty, tick})
            if self._dirty.is_set() and self._dirty_since is not None:
                window = timedelta(seconds=self.settings.coalesce_window_s)
                await self._clock.sleep_until(self._dirty_since + window)
            await self._plan_once()

    async def _plan_once(self) -> None:
        self._planning = True
        self._dirty.clear()
        self._dirty_since = None
        pending = len(self._received)
        state, now = self._state, self._clock.now()
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives with the result, and the service would then not stop.
            async with asyncio.timeout(self._plan_timeout_s):
                plan = await asyncio.to_thread(self._planner, state, now)
        except Exception as exc:  # the plan must go out whatever went wrong in the planner
            log.exception("planning failed at %s; publishing the proportional share", now)
            self._count("plans_failed")
            await self._persist_count("plans_failed")
            plan = _fallback_plan(self._planner, state, now, exc)
        if plan.fallback:  # the planner's solver failed or timed out: the proportional share
            self._count("plans_fallback")
        solve_s = time.perf_counter() - started
        try:
            try:
                if self._store_down_since is None:  # while down, the consumer probes
                    await self._store.save_plan(plan)
            except StoreUnavailable as exc:
                self._store_failed(exc, "saving the plan")
            if self._store_down_since is not None:
                plan = _decreases_only(plan, now, self._outage_caps)
                self._count("plans_decreases_only")
            self.last_plan = plan
            await self._sink.publish(plan, state)
        finally:
            self._planning = False
            self._count("plans")
            await self._persist_count("plans")
            self.counters["last_solve_ms"] = round(solve_s * 1000)
            done = time.perf_counter()
            for _ in range(min(pending, len(self._received))):
                self.latencies_s.append(done - self._received.popleft())
            self._planned.set()
        log.debug(
            "plan at %s: %d setpoints, %.1f kW now, solve %.3f s",
            now.isoformat(),
            len(plan.setpoints),
            plan.total_first_slot_kw,
            solve_s,
        )


def _power_now(plan: Plan | None, now: datetime) -> dict[tuple[str, int], float]:
    """Each connector's planned power (kW, >= 0) in the slot of `plan` that contains `now`."""
    if plan is None or not plan.slot_starts:
        return {}
    t = max(0, bisect.bisect_right(plan.slot_starts, now) - 1)
    return {
        (s.charger_id, s.connector_id): max(0.0, s.kw[t]) if t < len(s.kw) else 0.0
        for s in plan.setpoints
    }


def _decreases_only(plan: Plan, now: datetime, caps: dict[tuple[str, int], float]) -> Plan:
    """`plan` with no increase: each connector's charging power is at most its cap and never
    rises from one slot to the next (discharge is left alone; after it, charging stays 0).

    `caps` is updated to the capped first slot, so the next plan cannot rise above this one. A
    connector the cap does not know (it was not charging when the outage began) gets 0."""
    setpoints: list[Setpoint] = []
    charge_kw = plan.schedule.charge_kw.copy()
    rows = {v: n for n, v in enumerate(plan.schedule.vehicle_ids)}
    for s in plan.setpoints:
        key = (s.charger_id, s.connector_id)
        limit = caps.get(key, 0.0)
        kw: list[float] = []
        for x in s.kw:
            x = min(x, limit)
            kw.append(x)
            limit = min(limit, max(x, 0.0))
        caps[key] = max(0.0, kw[0]) if kw else caps.get(key, 0.0)
        setpoints.append(dataclasses.replace(s, kw=tuple(kw)))
        n = rows.get(s.vehicle_id)
        if n is not None and len(kw) == charge_kw.shape[1]:
            charge_kw[n] = np.minimum(charge_kw[n], np.maximum(np.asarray(kw), 0.0))
    note = f"decreases only: store unavailable at {now.isoformat()}"
    return dataclasses.replace(
        plan,
        setpoints=tuple(setpoints),
        schedule=dataclasses.replace(plan.schedule, charge_kw=charge_kw),
        note=f"{plan.note}; {note}" if plan.note else note,
    )


def _fallback_plan(planner: Planner, state: FleetState, now: datetime, exc: Exception) -> Plan:
    """The proportional share for the same problem, built without the failed solver."""
    problem, starts = build_problem(state, now, _planning_settings(planner))
    schedule = share_by_need(problem)
    return make_plan(
        state, problem, starts, schedule, fallback=True, note=f"{type(exc).__name__}: {exc}"
    )


def _planning_settings(planner: Planner) -> PlanningSettings:
    """The planning settings the planner works with (the defaults for a foreign planner)."""
    return planner.settings if isinstance(planner, StatePlanner) else PlanningSettings()
