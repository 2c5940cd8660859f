"""The lease dispatcher: plans become SetChargingProfile leases on the connected chargers.

It is a `controller.ports.PlanSink` (`publish`) and an `adapters.ocpp.ports.ChargerListener`
(`charger_ready`, `charger_gone`). Each connected charger has one worker task that reconciles
what voltpool wants installed (from the latest plan and fleet state, at the current time) with
what the charger accepted:

- at boot and on every reconnect nothing is assumed installed, and the TxDefaultProfile (safe
  share) and ChargePointMaxProfile (circuit limit) go first, before any TxProfile;
- a profile is sent only when it differs beyond the deadband (or switches on/off), or when its
  lease ends within the refresh margin *and* what the charger falls back to after the lease
  (min(plan, safe share)) differs from the plan; a lease whose fallback is the plan anyway
  lapses, and the charger is looked at again every lease window minus the margin, so a plan
  value above the safe share still reaches it at least the margin before it applies;
- a plan wakes only the chargers whose inputs it changed (their setpoints from now on, their
  running transactions, safe share, budget); what a charger wants is built once per plan and
  second (`wanted`), not once per look;
- decreases go before increases, and an increase only within the site budget (RELIABILITY
  P-04, A7 "in-flight reserve"). Every charger is *booked* at what its steered connectors may
  draw now: per connector with a running transaction, the limit it applies by what it holds
  (`applied_limit_kw`: the running transaction's TxProfile, else the TxDefaultProfile, capped
  by the ChargePointMaxProfile, in kW by its own unit, phases and voltage; the circuit limit
  if it holds nothing), and for a profile in flight or whose answer was lost (a time-out, a
  connection closed with it in flight) the larger of the limit with and without it. A charger
  gone keeps its booking (what it held, and what was in flight) until it is back (P-08); after
  a lease's end its TxProfile's own fallback is what it applies. Connectors without a
  transaction are booked at 0; non-compliant connectors and uncontrollable chargers are not
  booked but reserved (measured draw, circuit limit). The *budget* is the plan's head-room for
  the current slot less that reserve. Decreases, default and max profiles are never held. An
  increase goes if the bookings with it in flight fit the budget (`increases_fit_early` when
  others were still lowering); otherwise it waits (`increases_held`), and the worker is woken
  when an acknowledged decrease (or a lease's own schedule, or the next slot's head-room)
  makes room for it, in the order they were held. If the plan's setpoints fit its head-room,
  every increase fits once the decreases land, so nothing waits for ever. When nothing can
  make room any more, because no other charger has a decrease due or in flight and no plan
  is being looked through, a held increase goes anyway: the rule before the budget (the plan
  asked for it: setpoints over the head-room, a transaction the plan does not know yet drawing
  its safe share, a decrease that failed, booked at its old limit), counted as
  `increases_over_budget`; so the gate never holds an increase longer than that rule did. A
  decrease that fails is retried later and no longer holds the others (it is counted and the
  charger marked);
- one call in flight per charger (the worker is sequential; the library's call lock too), and
  the latest plan wins: a worker always builds from the newest plan when it sends;
- workers take turns (`_Pacer`): at most `reconciles_per_pass` of them begin a look (build
  their profiles, send what is due) in one pass of the event loop, bring-ups and decreases
  first, then a running transaction still without its TxProfile, then the rest (increases,
  moves, lease refreshes, retries), each class in the order asked. A plan, a slot boundary's
  lease refreshes or a wave of answers wakes hundreds at once; without turns their steps
  stood in one pass of the loop ahead of every OCPP call that arrived meanwhile;
- a Rejected answer, a CALLERROR or a timeout is counted, the charger is marked as not
  following, and the profile is retried with exponential back-off on the clock;
- a fallback ladder (RELIABILITY P-06): a profile answered Rejected, NotSupported or
  NotImplemented is tried at once in the next form the charger may take: other stack levels
  (<= its `ChargeProfileMaxStackLevel`), the other unit (if its
  `ChargingScheduleAllowedChargingRateUnit` allows), a TxProfile as a TxDefaultProfile on its
  connector; both keys are read with GetConfiguration at the first refusal. When every form is
  refused: a ChargePointMaxProfile is given up (counted; the TxProfiles still steer), a
  TxDefaultProfile or TxProfile makes the charger *uncontrollable*: alarm (error log), counted,
  its circuit limit budgeted in full like a rogue connector's draw, and the ladder is tried
  again after the back-off;
- `Accepted` is a claim: every measured power from MeterValues is compared with the limit in
  force (`adapters.ocpp.compliance`); a connector over it on two consecutive samples is flagged,
  its *measured* draw is budgeted, and the other connectors' setpoints are scaled down so that
  measured + planned stays within the plan's head-room (RELIABILITY.md P-05/P-07). The limit in
  force is the one the charger applies by OCPP's rules: the TxProfile *of the running
  transaction* (a charger deletes a transaction's TxProfiles when it ends; the next
  transaction on the connector gets the TxDefaultProfile until its own TxProfile is accepted),
  and after a reconnect without a reboot, what it accepted on the previous connection for each
  slot the new one has not had accepted yet (it keeps its profiles). A sample may show a
  profile other than the accepted one at work, and is judged by the largest limit they give:
  the one an acceptance seen after the sample replaced, the one in flight since it was sent
  (a charger installs before it answers), one whose answer was lost. Whether a TxProfile
  raises or lowers a connector's limit is judged against the accepted ones.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from adapters.ocpp.aio import stop_task
from adapters.ocpp.central import CentralSystem
from adapters.ocpp.compliance import ComplianceConfig, ComplianceMonitor
from adapters.ocpp.config import LeaseConfig
from adapters.ocpp.errors import CallFailed, CallTimedOut, ChargerUnreachable
from adapters.ocpp.profiles import (
    OutgoingProfile,
    apply_guard,
    band_in_unit,
    circuits_kw,
    default_profile,
    differs,
    from_limit,
    in_form,
    last_off_edge,
    max_profile,
    safe_share_per_connector_kw,
    tx_profile,
)
from controller.domain import ChargePoint, ChargerId, RateUnit
from controller.planning.plan import Plan, Setpoint
from controller.ports import Clock
from controller.state import FleetState

log = logging.getLogger(__name__)

ORDER = {"default": 0, "max": 1}
LADDER_ERRORS = frozenset({"NotSupported", "NotImplemented"})  # CALLERRORs that climb the ladder
UNITS: dict[str, RateUnit] = {"Current": "A", "Power": "W", "A": "A", "W": "W"}


@dataclass(frozen=True, slots=True)
class Form:
    """One rung of the fallback ladder: how a profile is sent."""

    stack_level: int
    unit: RateUnit
    purpose: str


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a charger said it takes (GetConfiguration)."""

    max_stack_level: int
    units: frozenset[RateUnit]


COURSE_TOLERANCE_KW = 1e-3  # setpoint moves smaller than this do not wake a charger


@dataclass(frozen=True, slots=True)
class _Basis:
    """What a charger's wanted profiles are built from, besides the time. The plan's slot
    starts, not the plan: a charger whose basis did not change at the next plans would
    otherwise keep its old plan (every connector's setpoints) alive; the split soak found 42
    such plans at 1,000 chargers."""

    slot_starts: tuple[datetime, ...] | None
    setpoints: dict[int, Setpoint]
    charger: ChargePoint | None
    safe_kw: float
    running: tuple[tuple[int, int], ...]
    factor: float
    epoch: int


# Chargers `LeaseDispatcher.publish` looks at between two yields to the event loop (building
# one charger's profiles takes up to ~1 ms: a step stays near 20 ms).
PUBLISH_CHUNK = 20

# Workers woken in one pass of the event loop (`LeaseDispatcher._wake`). A plan wakes a few
# hundred at once at 1,000 chargers; each one's first step builds and sends a profile (~0.5-1
# ms). Woken all together, they stood in the loop's ready queue ahead of every OCPP call that
# arrived meanwhile (a heartbeat's answer waited for ~300 worker steps); in chunks, the calls
# that arrive are served between two chunks.
WAKE_CHUNK = 20


# Worker reconciles begun in one pass of the event loop (`_Pacer`). Each builds a charger's
# wanted profiles and sends what is due (~0.5-1 ms at 1,000 chargers). A plan wakes a few
# hundred workers, a slot boundary's lease refreshes as many (on timers: not through `_wake`),
# and every answer to a SetChargingProfile resumes its worker for another look: unpaced, the
# loop's passes carried dozens of these steps, and each pass an inbound CALL needs (its frame,
# its handler, its Redis replies, its answer) waited behind them.
RECONCILES_PER_PASS = 16

# `_Pacer` priorities: lower goes first.
PRIORITY_FIRST = 0  # bring-up (default and max profiles, P-01) or a decrease due (P-04)
PRIORITY_NEW_TRANSACTION = 1  # a running transaction without its TxProfile (the re-plan time)
PRIORITY_OTHER = 2  # increases, moves, lease refreshes, retries


class _Pacer:
    """Turns for the dispatcher's workers: at most `per_pass` are granted in one pass of the
    event loop, by priority (lower first), then in the order they were asked for.

    Every turn is granted by a tick, a callback that runs once per pass while anyone waits:
    it grants up to `per_pass` waiting turns, whose tasks then run in the next pass, and
    schedules itself again. So a pass runs at most `per_pass` granted turns, whatever the
    number of workers woken at once; a turn asked for when nobody waits costs one pass.
    A waiter cancelled before its turn is skipped; one cancelled after it was granted loses it.
    """

    def __init__(self, per_pass: int) -> None:
        if per_pass < 1:
            raise ValueError(f"per_pass must be at least 1, not {per_pass}")
        self.per_pass = per_pass
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._ticking = False
        self.queued_max = 0  # the longest queue seen (for the benchmarks)

    def waiting(self) -> int:
        """How many turns are asked for and not granted yet (cancelled ones included)."""
        return len(self._waiting)

    async def turn(self, priority: int) -> None:
        """Wait for a turn (granted in a later pass of the loop)."""
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), granted))
        self.queued_max = max(self.queued_max, len(self._waiting))
        if not self._ticking:
            self._ticking = True
            loop.call_soon(self._tick)
        await granted

    def _tick(self) -> None:
        granted = 0
        while self._waiting and granted < self.per_pass:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():  # not cancelled meanwhile
                future.set_result(None)
                granted += 1
        if self._waiting:
            asyncio.get_running_loop().call_soon(self._tick)
        else:
            self._ticking = False


def _slot_at(plan: Plan, at: datetime) -> int:
    return _slot_index_at(plan.slot_starts, at)


def _slot_index_at(slot_starts: Sequence[datetime], at: datetime) -> int:
    return max(0, bisect.bisect_right(slot_starts, at) - 1)


def _same_course(old: _Basis, new: _Basis, now: datetime) -> bool:
    """Whether both plans ask the same of the charger's connectors from `now` on (the part of
    the horizon both cover, within `COURSE_TOLERANCE_KW`)."""
    if old.setpoints.keys() != new.setpoints.keys():
        return False
    if not new.setpoints:
        return True
    a, b = old.slot_starts, new.slot_starts
    if a is None or b is None:
        return a is b
    i, j = _slot_index_at(a, now), _slot_index_at(b, now)
    if i + 1 < len(a) and j + 1 < len(b) and a[i + 1] != b[j + 1]:
        return False  # slot boundaries that do not line up
    for connector_id, setpoint in new.setpoints.items():
        before, after = old.setpoints[connector_id].kw[i:], setpoint.kw[j:]
        if any(abs(x - y) > COURSE_TOLERANCE_KW for x, y in zip(before, after, strict=False)):
            return False
    return True


def _electrical(charger: ChargePoint | None) -> tuple[object, ...] | None:
    """What the profiles are built from of a charger (not its status or when it was seen)."""
    if charger is None:
        return None
    return (
        charger.max_power_kw,
        charger.phases,
        charger.voltage_v,
        charger.rate_unit,
        charger.min_current_a,
        charger.v2g_mode,
        len(charger.connectors),
    )


def _same_basis(old: _Basis, new: _Basis, now: datetime) -> bool:
    return (
        _electrical(old.charger) == _electrical(new.charger)
        and old.safe_kw == new.safe_kw
        and old.running == new.running
        and old.epoch == new.epoch
        and (old.factor == new.factor or not new.setpoints)
        and _same_course(old, new, now)
    )


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
    # TxProfile slots whose lease was let lapse (its fallback is the plan), and when to look
    # at each again.
    lapsed: set[str] = field(default_factory=set)
    recheck_at: dict[str, datetime] = field(default_factory=dict)
    basis: _Basis | None = None  # the inputs of the last plan that woke the worker
    held: bool = False  # an increase waits for the others' decreases
    # The fallback ladder: the rung each slot is sent at, what the charger takes, the slots
    # whose every form was refused, and the max profile given up.
    rung: dict[str, int] = field(default_factory=dict)
    capabilities: Capabilities | None = None
    exhausted: set[str] = field(default_factory=set)
    max_given_up: bool = False
    off_at: dict[str, datetime] = field(default_factory=dict)  # last switch off, per tx slot
    # What the charger accepted on its previous connection (a reconnect without a reboot: it
    # keeps its profiles), per slot; a slot accepted on this connection replaces it.
    kept: dict[str, OutgoingProfile] = field(default_factory=dict)
    # The profile sent and not answered yet (one call in flight per charger), and profiles
    # whose answer never came (timed out, or the connection closed with them in flight): the
    # charger may apply them, so the budget books them (until the slot is accepted again).
    in_flight: OutgoingProfile | None = None
    # When the profile in flight was sent: a sample taken from then on may show it at work
    # (the charger installs it before it answers, and its answer can reach us after samples it
    # took later, P-05).
    in_flight_at: datetime | None = None
    held_since: float | None = None  # time.monotonic() when its increase was first held
    unsure: dict[str, OutgoingProfile] = field(default_factory=dict)
    # Per slot, when its current profile was accepted and what it replaced: a meter sample
    # taken before the acceptance is judged by either (P-05).
    accepted_at: dict[str, datetime] = field(default_factory=dict)
    replaced: dict[str, OutgoingProfile | None] = field(default_factory=dict)


def _installed(link: _Link, slot: str) -> OutgoingProfile | None:
    """What the charger holds for a slot: accepted on this connection, else kept from the
    previous one."""
    profile = link.sent.get(slot)
    return profile if profile is not None else link.kept.get(slot)


def _unsure(link: _Link) -> dict[str, OutgoingProfile]:
    """The profiles the charger may hold without our knowing: answers lost, and the one in
    flight (when its connection goes)."""
    unsure = dict(link.unsure)
    if link.in_flight is not None:
        unsure[link.in_flight.slot] = link.in_flight
    return unsure


def _before(link: _Link, profile: OutgoingProfile) -> OutgoingProfile | None:
    """What the charger applies to the connector of a TxProfile lease before it is installed:
    the slot's profile if still in force (one of the same transaction, or the slot sent as a
    TxDefaultProfile), else the TxDefaultProfile (a charger deletes a transaction's TxProfiles
    when it ends)."""
    old = _installed(link, profile.slot)
    if (
        old is not None
        and old.purpose == "TxProfile"
        and old.transaction_id != profile.transaction_id
    ):
        old = None
    return old if old is not None else _installed(link, "default")


Lookup = Callable[[str], OutgoingProfile | None]


def applied_limit_kw(
    charger: ChargePoint, profile_of: Lookup, connector_id: int, running: int | None, at: datetime
) -> float | None:
    """The limit a charger applies to a connector at `at` by OCPP 1.6's rules, in kW, from the
    profiles it holds (`profile_of(slot)`): the TxProfile of the running transaction (a
    TxProfile of another transaction was deleted at its end; `running` None: not known, kept),
    else the TxDefaultProfile, capped by the ChargePointMaxProfile; None if it holds neither."""
    tx = profile_of(f"tx:{connector_id}")
    if (
        tx is not None
        and tx.purpose == "TxProfile"
        and tx.transaction_id is not None
        and running is not None
        and running != tx.transaction_id
    ):
        tx = None
    base = tx if tx is not None else profile_of("default")
    if base is None:
        return None
    limit = from_limit(base.limit_at(at), charger, base.unit)
    cap = profile_of("max")
    if cap is not None:
        limit = min(limit, from_limit(cap.limit_at(at), charger, cap.unit))
    return max(0.0, limit)


def next_change(profile: OutgoingProfile, at: datetime) -> datetime | None:
    """When the profile's limit next moves after `at` (its next period start), if ever."""
    offsets = profile.offsets_s
    k = bisect.bisect_right(offsets, (at - profile.start).total_seconds())
    return profile.start + timedelta(seconds=offsets[k]) if k < len(offsets) else None


class LeaseDispatcher:
    """Sends each connected charger the profiles the latest plan asks for, as leases.

    Args:
        central: the central system the chargers are connected to.
        clock: for lease times, refreshes and retry back-off.
        state: where to read the fleet state between plans (e.g. the service's `state`);
            without it, the state of the last `publish` is used.
        reconciles_per_pass: how many workers may begin a look (build and send) in one pass
            of the event loop (`_Pacer`); the others wait their turn, bring-ups and decreases
            first, then new transactions.

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
        reconciles_per_pass: int = RECONCILES_PER_PASS,
    ) -> None:
        self.central = central
        self._pacer = _Pacer(reconciles_per_pass)
        self.clock = clock
        self.config = config or LeaseConfig()
        self._state_fn = state
        self._state = FleetState()
        self._plan: Plan | None = None
        self._links: dict[ChargerId, _Link] = {}
        self.counters: Counter[str] = Counter()
        self.not_following: set[ChargerId] = set()
        self.uncontrollable: set[ChargerId] = set()  # every form of a profile refused (P-06)
        self._activity = asyncio.Event()
        self.compliance = ComplianceMonitor(compliance or ComplianceConfig())
        self.budget_factor = 1.0  # the scale applied to compliant setpoints (1: none)
        self._decreasing: set[ChargerId] = set()  # chargers with a decrease not yet settled
        self._index: dict[ChargerId, dict[int, Setpoint]] = {}  # the plan's setpoints
        self._circuits: tuple[object, float] = (None, 0.0)  # (chargers mapping, their sum)
        self._factor_key: tuple[int, int, int] | None = None  # (plan number, slot, epoch)
        self._epoch = 0  # bumped when the budget's rogue draw changes
        # Per charger: (the plan's sequence number, the other inputs, the profiles built from
        # them). A number, not the plan: a charger whose worker lags would otherwise pin an old
        # plan (the 5,000-charger soak found 53 of them alive).
        self._plan_seq = 0
        self._publishing = False  # `publish` is looking through the chargers (it yields)
        self._wanted: dict[ChargerId, tuple[int, tuple[object, ...], list[OutgoingProfile]]] = {}
        self._retiring: set[asyncio.Future[None]] = set()  # replaced workers being stopped
        # What each disconnected charger had accepted, until it is back (or reboots).
        self._gone: dict[ChargerId, dict[str, OutgoingProfile]] = {}
        # ... and the profiles it may have applied without our knowing (in flight when it went).
        self._gone_unsure: dict[ChargerId, dict[str, OutgoingProfile]] = {}
        # The budget gate (P-04): per charger, the kW its connectors may draw by what it holds
        # and what is in flight to it (`_booking`), their sum, when each booking next moves
        # with its profiles' schedules (a heap of (time, charger)), and the room each held
        # increase needs (in the order they were held).
        self._booked: dict[ChargerId, float] = {}
        self._booked_total = 0.0
        self._book_until: dict[ChargerId, datetime] = {}
        self._book_heap: list[tuple[datetime, ChargerId]] = []
        self._held_need: dict[ChargerId, float] = {}
        self._reserve: tuple[int, float] = (-1, 0.0)  # (epoch, rogue + uncontrollable kW)
        central.add_listener(self)
        central.add_meter_listener(self.meter_sampled)

    # -- PlanSink --

    async def publish(self, plan: Plan, state: FleetState) -> None:
        """Take a new plan: every connected charger's worker reconciles against it."""
        self._plan = plan
        self._plan_seq += 1
        self._state = state
        index: dict[ChargerId, dict[int, Setpoint]] = {}
        for setpoint in plan.setpoints:
            index.setdefault(setpoint.charger_id, {})[setpoint.connector_id] = setpoint
        self._index = index
        self.counters["plans"] += 1
        now = self.clock.now()
        woken: list[_Link] = []
        # Looking at every charger is the longest step of a plan (the 1,000-charger soak saw
        # ~180 ms without a yield, every plan): give the loop back every PUBLISH_CHUNK
        # chargers. Meanwhile the workers hold their increases (`_publishing`), since the
        # decreases of this plan are not all known yet (P-04).
        self._publishing = True
        try:
            for n, (charger_id, known) in enumerate(list(self._links.items())):
                if n and n % PUBLISH_CHUNK == 0:
                    await asyncio.sleep(0)
                if self._links.get(charger_id) is known:
                    self._rebook(charger_id, now)  # its transactions may have changed
                    self._look(known, now, woken)
        finally:
            self._publishing = False
        for charger_id in list(self._gone):
            self._rebook(charger_id, now)
        self._booked_total = sum(self._booked.values())  # afresh once per plan: no drift
        # Decreases first (P-04): the increases of this plan wait for them in any case.
        woken.sort(key=lambda link: link.charger_id not in self._decreasing)
        self._wake(woken)
        if not self._decreasing:
            self._wake_held()
        else:
            self._wake_fitting(now)  # the new head-room may have room for some
        for charger_id in self.central.online():
            if charger_id not in self._links:
                # Connected before the dispatcher knew it (or before any plan): bring it up now.
                self._start_link(charger_id, trigger_status=False)

    def _look(self, known: _Link, now: datetime, woken: list[_Link]) -> None:
        """One charger at a new plan: wake its worker unless nothing it depends on changed;
        note a due decrease."""
        charger_id = known.charger_id
        basis = self._basis(charger_id, now)
        if (
            not self.config.wake_all_on_plan
            and known.basis is not None
            and _same_basis(known.basis, basis, now)
        ):
            self.counters["plan_chargers_unchanged"] += 1
            return
        known.basis = basis
        woken.append(known)
        wanted = self._wanted_in_form(known, now) or []
        if any(self._due(known, p, now) and self._change(known, p, now) < 0 for p in wanted):
            self._decreasing.add(charger_id)

    # -- ChargerListener --

    async def charger_ready(self, charger_id: ChargerId, *, rebooted: bool) -> None:
        """(Re)connected or rebooted: assume nothing is installed and bring it to the plan."""
        self.counters["bring_ups"] += 1
        self._start_link(charger_id, trigger_status=not rebooted, rebooted=rebooted)

    async def charger_gone(self, charger_id: ChargerId) -> None:
        """Disconnected: stop its worker; what it accepted last stays in Redis. `wait_for`
        looks again afterwards (nothing else announces a worker gone)."""
        try:
            await self._forget(charger_id)
        finally:
            self._activity.set()

    async def _forget(self, charger_id: ChargerId) -> None:
        """Stop a gone charger's worker and book what it may still apply (P-08)."""
        link = self._links.pop(charger_id, None)
        self._wanted.pop(charger_id, None)
        self._held_need.pop(charger_id, None)
        if link is None:
            self._release(charger_id)
            return
        # A decrease it had due or in flight still counts as coming (P-08): at its reconnect
        # it goes out, and at its leases' end the charger falls back by itself
        # (`_rebook_due`); until then the increases that do not fit wait for it.
        # P-08: booked at what it may apply (what it held, and what was in flight to it) until
        # it is back; after a lease's end its TxProfile's own fallback is what it applies.
        self._gone[charger_id] = {**link.kept, **link.sent}
        self._gone_unsure[charger_id] = _unsure(link)
        if link.task is not None:
            await stop_task(link.task)
        if self._links.get(charger_id) is None and charger_id in self._gone:
            self._gone_unsure[charger_id] = _unsure(link)
        now = self.clock.now()
        self._rebook(charger_id, now)
        if self._leases_over(charger_id, now):
            self._release(charger_id)  # no lease of it will end: nothing more will land

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
        if changed or self.compliance.is_flagged(charger_id):
            self._epoch += 1  # the measured draw the budget counts has moved
        if not changed:
            return
        if self.compliance.is_flagged(charger_id):
            self.counters["non_compliant_flags"] += 1
            self.not_following.add(charger_id)
        else:
            self.counters["non_compliant_cleared"] += 1
        self._rebook(charger_id, self.clock.now())  # in the reserve now, or out of it
        for other in self._links.values():  # every charger's budget changed
            other.idle.clear()
            other.wake.set()

    def _limit_in_force_kw(self, link: _Link, connector_id: int, at: datetime) -> float | None:
        """The composite limit the charger may apply to the connector at `at`, in kW, as far as
        we know what it holds (None: not known, or it may hold no profile at all).

        Each slot of the composite (the connector's TxProfile, the TxDefaultProfile, the
        ChargePointMaxProfile) holds its accepted profile, but a sample can show another one
        at work, and is judged by the largest limit any of them gives:
        - the profile an acceptance replaced, for a sample taken before that acceptance was
          seen (it reaches us after it: a charger's own CALLs queue one at a time);
        - the profile in flight, for a sample taken since it was sent (a charger installs a
          profile before it answers, and its answer can reach us after samples it took
          later: a lease's refresh accepted late was judged by the old lease's fallback, the
          soak's "4.27 kW against a 0.00 kW limit");
        - a profile whose answer was lost (it may have taken it)."""
        charger = self.state.chargers.get(link.charger_id)
        if charger is None:
            return None
        running = self._running(link.charger_id, charger).get(connector_id)
        now = applied_limit_kw(
            charger, lambda slot: _installed(link, slot), connector_id, running, at
        )
        flight, sent_at = link.in_flight, link.in_flight_at
        if flight is not None and (sent_at is None or at < sent_at):
            flight = None
        others: dict[str, tuple[OutgoingProfile | None, ...]] = {}
        for slot in (f"tx:{connector_id}", "default", "max"):
            options = [
                *([link.replaced.get(slot)] if link.accepted_at.get(slot, at) > at else []),
                *([link.unsure[slot]] if slot in link.unsure else []),
                *([flight] if flight is not None and flight.slot == slot else []),
            ]
            if options:
                others[slot] = (_installed(link, slot), *options)
        if now is None or not others:
            return now
        limits = [now]
        for combination in itertools.product(*others.values()):
            held = dict(zip(others, combination, strict=True))

            def holds(
                slot: str, held: dict[str, OutgoingProfile | None] = held
            ) -> OutgoingProfile | None:
                return held[slot] if slot in held else _installed(link, slot)

            limit = applied_limit_kw(charger, holds, connector_id, running, at)
            if limit is None:
                return None  # it may hold none of them: no limit to judge by
            limits.append(limit)
        most = max(limits)
        if most > now:
            # The accepted profiles alone would have judged it harder (P-05: a profile replaced
            # after it was taken, in flight, or whose answer was lost gave a larger limit).
            self.counters["samples_judged_by_other_profiles"] += 1
        return most

    # -- the budget gate (P-04) --

    def _reserved_kw(self) -> float:
        """What the budget sets aside for draw voltpool does not steer: the measured draw of
        non-compliant connectors and the circuit limit of uncontrollable chargers (computed
        once per change of either)."""
        if self._reserve[0] != self._epoch:
            rogue = self._rogue()
            self._reserve = (self._epoch, sum(max(0.0, kw) for kw in rogue.values()))
        return self._reserve[1]

    def _rogue(self) -> dict[tuple[ChargerId, int], float]:
        """Draw voltpool does not steer, per connector (connector 0: a whole uncontrollable
        charger at its circuit limit)."""
        rogue = dict(self.compliance.non_compliant())
        chargers = self.state.chargers
        for charger_id in self.uncontrollable:
            # No profile of any form is taken: it may draw its circuit limit.
            charger = chargers.get(charger_id)
            rogue[(charger_id, 0)] = charger.max_power_kw if charger is not None else 0.0
        return rogue

    def _budget_kw(self, now: datetime) -> float | None:
        """What the steered connectors may draw together now: the plan's head-room for the
        current slot less the reserve for rogue and uncontrollable draw (None: no plan)."""
        plan = self._plan
        if plan is None or not plan.slot_starts:
            return None
        t = _slot_at(plan, now)
        if t >= len(plan.headroom_kw):
            return None
        return plan.headroom_kw[t] - self._reserved_kw()

    def _booking(
        self, charger_id: ChargerId, now: datetime, extra: OutgoingProfile | None = None
    ) -> tuple[float, datetime | None]:
        """What the charger's steered connectors may draw now, in kW, and when that next moves.

        Per connector with a running transaction, the limit it applies (`applied_limit_kw`)
        by what it holds (accepted on this connection or kept from the previous one; for a
        charger gone, what it held when it went: P-08); for a profile in flight, whose answer
        was lost, or `extra` (an increase about to go), the larger of that limit with and
        without it. A connector holding no profile at all is booked at the circuit limit;
        connectors without a transaction draw nothing; non-compliant connectors and
        uncontrollable chargers are in the reserve (`_reserved_kw`), not here.
        """
        charger = self.state.chargers.get(charger_id)
        if charger is None or charger_id in self.uncontrollable:
            return 0.0, None
        link = self._links.get(charger_id)
        held: dict[str, OutgoingProfile] | None
        if link is not None:
            held, unsure = None, list(link.unsure.values())
            if link.in_flight is not None:
                unsure.append(link.in_flight)
        else:
            held = self._gone.get(charger_id)
            if held is None:
                return 0.0, None  # never connected to this process: nothing known
            unsure = list(self._gone_unsure.get(charger_id, {}).values())
        if extra is not None:
            unsure.append(extra)
        running = self._running(charger_id, charger)
        if not running:
            return 0.0, None

        def holds(slot: str) -> OutgoingProfile | None:
            if link is not None:
                return _installed(link, slot)
            assert held is not None
            return held.get(slot)

        rogue = self.compliance.non_compliant() if self.compliance.is_flagged(charger_id) else {}
        total = 0.0
        slots = {"default", "max"}
        for connector_id, transaction_id in running.items():
            if (charger_id, connector_id) in rogue:
                continue
            slots.add(f"tx:{connector_id}")
            limit = applied_limit_kw(charger, holds, connector_id, transaction_id, now)
            booked = charger.max_power_kw if limit is None else limit
            for profile in unsure:
                if profile.connector_id not in (0, connector_id):
                    continue

                def with_it(slot: str, p: OutgoingProfile = profile) -> OutgoingProfile | None:
                    return p if slot == p.slot else holds(slot)

                other = applied_limit_kw(charger, with_it, connector_id, transaction_id, now)
                if other is not None:
                    booked = max(booked, other)
            total += booked
        changes = [
            t
            for p in (*(holds(slot) for slot in slots), *unsure)
            if p is not None and (t := next_change(p, now)) is not None
        ]
        return total, min(changes) if changes else None

    def _rebook(self, charger_id: ChargerId, now: datetime) -> float:
        """Book the charger again at `now`; returns the change of its booking (kW)."""
        kw, until = self._booking(charger_id, now)
        old = self._booked.pop(charger_id, 0.0)
        if kw:
            self._booked[charger_id] = kw
        self._booked_total += kw - old
        if until is None:
            self._book_until.pop(charger_id, None)
        elif self._book_until.get(charger_id) != until:
            self._book_until[charger_id] = until
            heapq.heappush(self._book_heap, (until, charger_id))
        return kw - old

    def _rebook_due(self, now: datetime) -> bool:
        """Book again every charger whose profiles' schedules moved since it was booked;
        True if a booking went down."""
        freed = False
        heap = self._book_heap
        while heap and heap[0][0] <= now:
            at, charger_id = heapq.heappop(heap)
            if self._book_until.get(charger_id) == at:
                del self._book_until[charger_id]
                freed = self._rebook(charger_id, now) < 0 or freed
                if charger_id in self._decreasing and self._leases_over(charger_id, now):
                    self._release(charger_id)
        return freed

    def _leases_over(self, charger_id: ChargerId, now: datetime) -> bool:
        """A charger gone whose every TxProfile lease (held or in flight) has ended: it
        applies min(plan, safe share) by itself, its decreases have landed (P-08)."""
        if charger_id in self._links:
            return False
        held = [*self._gone.get(charger_id, {}).values()]
        held += self._gone_unsure.get(charger_id, {}).values()
        return all(p.lease_end is None or p.lease_end <= now for p in held)

    def _fits(self, link: _Link, profile: OutgoingProfile, now: datetime) -> bool:
        """Whether the increase fits the budget with everything booked (in-flight increases
        at their new limit, in-flight decreases at their old one); if not, note the room it
        needs (for `_wake_fitting`)."""
        budget = self._budget_kw(now)
        self._rebook_due(now)
        charger_id = link.charger_id
        current = self._booked.get(charger_id, 0.0)
        with_it, _ = self._booking(charger_id, now, profile)
        need = with_it - current
        if budget is not None and self._booked_total + need <= budget + 1e-6:
            return True
        self._held_need[charger_id] = need
        return False

    def _wake_fitting(self, now: datetime) -> None:
        """Wake the held workers whose increase now fits, in the order they were held (each
        woken one's need counted against the room, so a freed kW wakes one worker, not all)."""
        if not self._held_need:
            return
        budget = self._budget_kw(now)
        if budget is None:
            return
        self._rebook_due(now)
        room = budget - self._booked_total
        woken: list[_Link] = []
        for charger_id, need in list(self._held_need.items()):
            if need > room + 1e-6:
                continue
            room -= need
            del self._held_need[charger_id]
            link = self._links.get(charger_id)
            if link is not None and link.held:
                link.held = False
                woken.append(link)
        self._wake(woken)

    def _may_raise(self, link: _Link, profile: OutgoingProfile) -> bool:
        """Whether an increase may go now: it fits the budget, or nobody else has a decrease
        due or in flight and no plan is being looked through (the rule before the budget gate:
        what is left can only be met by the increases themselves; counted)."""
        now = self.clock.now()
        others_lowering = self._publishing or bool(self._decreasing - {link.charger_id})
        if self._fits(link, profile, now):
            self._held_need.pop(link.charger_id, None)
            if others_lowering:
                self.counters["increases_fit_early"] += 1
            return True
        if others_lowering:
            return False
        self._held_need.pop(link.charger_id, None)
        self.counters["increases_over_budget"] += 1
        return True

    def _budget(self, plan: Plan, now: datetime) -> float:
        """The factor on compliant setpoints so that measured rogue draw + plan <= head-room."""
        rogue = self._rogue()
        if not rogue or not plan.slot_starts:
            return 1.0
        t = max(0, bisect.bisect_right(plan.slot_starts, now) - 1)
        if t >= len(plan.headroom_kw):
            return 1.0
        measured = sum(max(0.0, kw) for kw in rogue.values())
        compliant = sum(
            max(0.0, s.kw[t])
            for s in plan.setpoints
            if (s.charger_id, s.connector_id) not in rogue
            and s.charger_id not in self.uncontrollable
            and t < len(s.kw)
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
        """Stop every worker (and the replaced ones still stopping)."""
        for charger_id in list(self._links):
            await self.charger_gone(charger_id)
        while self._retiring:
            await asyncio.wait(set(self._retiring))

    # -- what is wanted --

    @property
    def state(self) -> FleetState:
        """The fleet state the profiles are built from."""
        return self._state_fn() if self._state_fn is not None else self._state

    def _safe_kw(self, state: FleetState, charger_id: ChargerId) -> float:
        """The charger's safe share per connector, the fleet's circuit sum cached per state."""
        if self._circuits[0] is not state.chargers:
            self._circuits = (state.chargers, circuits_kw(state))
        return safe_share_per_connector_kw(state, charger_id, self._circuits[1])

    def _running(self, charger_id: ChargerId, charger: ChargePoint | None) -> dict[int, int]:
        # The central system's book is fresher than the fleet state (a stop it took may not be
        # applied yet); the state is the fallback when the book could not be read.
        running = self.central.active_transactions(charger_id)
        if running is None:
            connectors = charger.connectors if charger is not None else ()
            running = {
                c.connector_id: c.transaction_id for c in connectors if c.transaction_id is not None
            }
        return running

    def _factor(self, now: datetime) -> float:
        """The budget factor on compliant setpoints now, computed once per plan, slot and
        change of the rogue draw."""
        plan = self._plan
        if plan is None:
            return 1.0
        key = (self._plan_seq, _slot_at(plan, now), self._epoch)
        old = self._factor_key
        if old != key:
            factor = self._budget(plan, now)
            if factor < self.budget_factor - 1e-9:
                self.counters["budget_reductions"] += 1
            self.budget_factor = factor
            self._factor_key = key
        return self.budget_factor

    def _offs(self, charger_id: ChargerId, now: datetime) -> dict[int, datetime]:
        """Per connector, the last time its installed lease switched it off (for the guard
        time), if within the guard time of `now`."""
        link = self._links.get(charger_id)
        if link is None or self.config.guard_time_s <= 0:
            return {}
        guard = timedelta(seconds=self.config.guard_time_s)
        out: dict[int, datetime] = {}
        for slot in {*link.off_at, *link.sent}:
            if not slot.startswith("tx:"):
                continue
            sent = link.sent.get(slot)
            edges = [link.off_at.get(slot), last_off_edge(sent, now) if sent else None]
            known = [e for e in edges if e is not None and now - e < guard]
            if known:
                out[int(slot[3:])] = max(known)
        return out

    def _basis(self, charger_id: ChargerId, now: datetime) -> _Basis:
        state = self.state
        charger = state.chargers.get(charger_id)
        return _Basis(
            slot_starts=None if self._plan is None else self._plan.slot_starts,
            setpoints=self._index.get(charger_id, {}),
            charger=charger,
            safe_kw=self._safe_kw(state, charger_id) if charger is not None else 0.0,
            running=tuple(sorted(self._running(charger_id, charger).items())),
            factor=self._factor(now),
            epoch=self._epoch,
        )

    def wanted(self, charger_id: ChargerId, now: datetime) -> list[OutgoingProfile] | None:
        """The profiles voltpool wants on a charger now, in sending order; None if unknown.

        Built once per plan, whole second and inputs (a charger's worker looks more than once
        per plan: the plan's own decrease check, each pass of its reconcile loop).
        """
        basis = self._basis(charger_id, now)
        charger = basis.charger
        if charger is None:
            return None
        plan = self._plan
        second = now.replace(microsecond=0)
        offs = self._offs(charger_id, now)
        key = (
            _electrical(charger),
            basis.safe_kw,
            basis.running,
            basis.factor,
            basis.epoch,
            second,
            offs,
        )
        cached = self._wanted.get(charger_id)
        if cached is not None and cached[0] == self._plan_seq and cached[1] == key:
            return list(cached[2])
        self.counters["wanted_built"] += 1
        safe_kw = basis.safe_kw
        profiles = [
            default_profile(charger, safe_kw, now, self.config),
            max_profile(charger, now, self.config),
        ]
        factor = basis.factor
        rogue = self.compliance.non_compliant() if factor < 1.0 else {}
        steerable = charger_id not in self.uncontrollable
        for connector_id, transaction_id in basis.running:
            setpoint = basis.setpoints.get(connector_id)
            if (
                setpoint is not None
                and factor < 1.0
                and steerable
                and (charger_id, connector_id) not in rogue
            ):
                # Budget the rogue connectors' measured draw: scale this one down (charging only).
                setpoint = replace(
                    setpoint, kw=tuple(kw * factor if kw > 0.0 else kw for kw in setpoint.kw)
                )
            lease = tx_profile(
                charger, connector_id, transaction_id, setpoint, plan, safe_kw, now, self.config
            )
            off_at = offs.get(connector_id)
            guarded = apply_guard(lease, off_at, self.config.guard_time_s, self.config.max_periods)
            if guarded != lease:
                self.counters["switches_held"] += 1
            profiles.append(guarded)
        self._wanted[charger_id] = (self._plan_seq, key, profiles)
        return list(profiles)

    # -- the fallback ladder (P-06) --

    def _wanted_in_form(self, link: _Link, now: datetime) -> list[OutgoingProfile] | None:
        """`wanted`, each profile in the form its slot's rung says; a given-up max left out."""
        wanted = self.wanted(link.charger_id, now)
        if wanted is None or (not link.rung and not link.max_given_up):
            return wanted
        charger = self.state.chargers.get(link.charger_id)
        if charger is None:
            return wanted
        out = []
        for profile in wanted:
            if profile.slot == "max" and link.max_given_up:
                continue
            rung = link.rung.get(profile.slot, 0)
            if rung:
                form = self._ladder(link, profile, charger)[rung]
                profile = in_form(
                    profile,
                    charger,
                    stack_level=form.stack_level,
                    unit=form.unit,
                    purpose=form.purpose,
                )
            out.append(profile)
        return out

    def _ladder(self, link: _Link, profile: OutgoingProfile, charger: ChargePoint) -> list[Form]:
        """The forms to try for a slot, in order: as configured, other stack levels, the other
        unit, another purpose."""
        caps = link.capabilities or Capabilities(self.config.stack_level, frozenset())
        level, unit = self.config.stack_level, charger.rate_unit
        purpose = "TxProfile" if profile.slot.startswith("tx:") else profile.purpose
        forms = [Form(level, unit, purpose)]
        for other in sorted({0, 1, caps.max_stack_level}):
            if other != level and 0 <= other <= caps.max_stack_level:
                forms.append(Form(other, unit, purpose))
        for other_unit in sorted(caps.units - {unit}):
            forms.append(Form(level, other_unit, purpose))
        if purpose == "TxProfile":
            forms.append(Form(level, unit, "TxDefaultProfile"))
        return forms

    async def _capabilities(self, charger_id: ChargerId) -> Capabilities:
        """ChargeProfileMaxStackLevel and ChargingScheduleAllowedChargingRateUnit, as far as
        the charger tells (nothing more than the configured form if it does not)."""
        level, units = self.config.stack_level, frozenset[RateUnit]()
        try:
            known, _ = await self.central.get_configuration(
                charger_id,
                ["ChargeProfileMaxStackLevel", "ChargingScheduleAllowedChargingRateUnit"],
            )
        except (CallFailed, CallTimedOut) as exc:
            log.info("%s: GetConfiguration for the fallback ladder failed: %s", charger_id, exc)
            return Capabilities(level, units)
        self.counters["capabilities_read"] += 1
        for item in known:
            value = str(item.get("value") or "")
            if item.get("key") == "ChargeProfileMaxStackLevel" and value.strip().isdigit():
                level = int(value)
            elif item.get("key") == "ChargingScheduleAllowedChargingRateUnit":
                names = (part.strip() for part in value.split(","))
                units = frozenset(UNITS[n] for n in names if n in UNITS)
        return Capabilities(level, units)

    async def _climb(self, link: _Link, profile: OutgoingProfile, problem: str) -> bool:
        """One rung up after a refusal; True if there is a next form to send at once."""
        charger = self.state.chargers.get(link.charger_id)
        if charger is None:
            return False
        if link.capabilities is None:
            link.capabilities = await self._capabilities(link.charger_id)
        ladder = self._ladder(link, profile, charger)
        rung = link.rung.get(profile.slot, 0) + 1
        if rung < len(ladder):
            link.rung[profile.slot] = rung
            self.counters["ladder_steps"] += 1
            form = ladder[rung]
            log.warning(
                "%s: %s %s; trying stack level %d, unit %s, purpose %s",
                link.charger_id,
                profile.slot,
                problem,
                form.stack_level,
                form.unit,
                form.purpose,
            )
            return True
        link.rung.pop(profile.slot, None)  # after the back-off, from the first form again
        if profile.slot == "max":
            link.max_given_up = True
            link.failures.pop("max", None)
            link.retry_at.pop("max", None)
            self.counters["max_profiles_given_up"] += 1
            log.warning(
                "%s: no form of ChargePointMaxProfile is taken; its circuit limit is left to "
                "the other profiles",
                link.charger_id,
            )
            return True
        self._settle_exhausted(link, profile.slot, refused=True)
        return False

    def _settle_exhausted(self, link: _Link, slot: str, *, refused: bool) -> None:
        """Record that every form of `slot` was refused (or no longer is); the charger is
        uncontrollable while any slot is, and its circuit limit is budgeted."""
        if refused:
            link.exhausted.add(slot)
        else:
            link.exhausted.discard(slot)
        charger_id = link.charger_id
        was = charger_id in self.uncontrollable
        now_uncontrollable = bool(link.exhausted) and self._links.get(charger_id) is link
        if now_uncontrollable == was:
            return
        if now_uncontrollable:
            self.uncontrollable.add(charger_id)
            self.counters["chargers_uncontrollable"] += 1
            log.error(
                "%s is uncontrollable: every form of %s was refused; budgeting its circuit "
                "limit in full",
                charger_id,
                ", ".join(sorted(link.exhausted)),
            )
        else:
            self.uncontrollable.discard(charger_id)
            link.max_given_up = False  # it may have refused that one with all the others
            self.counters["chargers_controllable_again"] += 1
            log.warning("%s takes its profiles again", charger_id)
        self._epoch += 1
        self._rebook(charger_id, self.clock.now())  # in the reserve now, or out of it
        for other in self._links.values():  # every charger's budget changed
            other.idle.clear()
            other.wake.set()

    async def _clear(self, charger_id: ChargerId, profile: OutgoingProfile) -> None:
        """ClearChargingProfile of a profile the charger would otherwise keep."""
        try:
            await self.central.clear_charging_profile(charger_id, profile_id=profile.profile_id)
            self.counters["profiles_cleared"] += 1
        except (CallFailed, CallTimedOut) as exc:
            log.info("%s: ClearChargingProfile(%d) failed: %s", charger_id, profile.profile_id, exc)

    # -- the worker --

    def _start_link(
        self, charger_id: ChargerId, *, trigger_status: bool, rebooted: bool = False
    ) -> None:
        old = self._links.pop(charger_id, None)
        gone = self._gone.pop(charger_id, None)
        if old is not None and old.task is not None:
            self._retire(old.task)
        gone_unsure = self._gone_unsure.pop(charger_id, None)
        link = _Link(charger_id, trigger_status=trigger_status)
        if not rebooted:
            # It kept what it accepted before (a replaced half-open connection, or a
            # reconnect): that is what it applies until this connection's profiles replace it.
            link.kept = gone if gone is not None else {**old.kept, **old.sent} if old else {}
            # ... and may have taken what was in flight then: booked until replaced.
            link.unsure = gone_unsure if gone_unsure is not None else _unsure(old) if old else {}
        self._links[charger_id] = link
        self._held_need.pop(charger_id, None)
        self._rebook(charger_id, self.clock.now())
        link.task = asyncio.ensure_future(self._work(link))

    def _retire(self, task: asyncio.Task[None]) -> None:
        """Stop a replaced worker for good, holding a reference until it has stopped.

        One cancel is not enough: Python 3.11's `wait_for` (the ocpp library awaits a reply
        with it) can swallow a cancellation that arrives with the reply, and the worker then
        ran on, referenced by nothing, as a second worker of the charger (woken by its lease
        refresh timer), or was destroyed while pending (the soak logged "Task was destroyed
        but it is pending" for such workers). `stop_task` repeats the cancel until it is done.
        """
        stopper = asyncio.ensure_future(stop_task(task))
        self._retiring.add(stopper)
        stopper.add_done_callback(self._retiring.discard)

    def _due(self, link: _Link, profile: OutgoingProfile, now: datetime) -> bool:
        """Whether the profile must be sent now: it differs beyond the deadband from what the
        charger has, or its lease ends within the margin and the fallback after it is not the
        plan (any lease, with `refresh="always"`)."""
        retry = link.retry_at.get(profile.slot)
        if retry is not None and retry > now:
            return False
        old = link.sent.get(profile.slot)
        charger = self.state.chargers.get(link.charger_id)
        band = band_in_unit(self.config.deadband_kw, charger) if charger is not None else 0.0
        lapsed = profile.slot in link.lapsed
        if differs(old, profile, now, band, lease_moves=not lapsed):
            return True
        if not self._lease_ending(link, profile, now):
            return False
        if self.config.refresh == "always":
            return True
        assert old is not None
        # Exactly (no deadband): a fallback a little under the plan would hold for hours.
        return differs(old, profile, now, 0.0, lease_moves=False)

    def _lease_ending(self, link: _Link, profile: OutgoingProfile, now: datetime) -> bool:
        """The installed lease of this slot ends within the refresh margin (and has not been
        let lapse already)."""
        old = link.sent.get(profile.slot)
        if old is None or old.lease_end is None or profile.slot in link.lapsed:
            return False
        return old.lease_end - now <= timedelta(seconds=self.config.refresh_margin_s)

    def _change(self, link: _Link, profile: OutgoingProfile, now: datetime) -> float:
        """How much a TxProfile raises (> 0) or lowers (< 0) the connector's limit now, in its
        unit; 0 for the default and max profiles (caps: never an increase in draw)."""
        if profile.slot in ORDER:
            return 0.0
        old = _before(link, profile)
        return profile.limit_at(now) - (old.limit_at(now) if old is not None else 0.0)

    def _release(self, charger_id: ChargerId) -> None:
        """The charger has no decrease left: once nobody has, the held increases may go."""
        if charger_id not in self._decreasing:
            return
        self._decreasing.discard(charger_id)
        if not self._decreasing:
            self._wake_held()

    def _wake_held(self) -> None:
        """Wake every worker that holds an increase (unless a plan is being published)."""
        if self._publishing:
            return
        self._held_need.clear()
        woken = [other for other in self._links.values() if other.held]
        for other in woken:
            other.held = False
        self._wake(woken)

    def _wake(self, links: list[_Link]) -> None:
        """Wake the workers of `links`, WAKE_CHUNK of them per pass of the event loop, in
        order. Each is marked busy (`idle` cleared) at once, so whoever waits for the
        dispatcher to settle waits for the later chunks too."""
        for link in links:
            link.idle.clear()
        self._wake_chunk(links, 0)

    def _wake_chunk(self, links: list[_Link], start: int) -> None:
        end = start + WAKE_CHUNK
        for link in links[start:end]:
            link.wake.set()
        if end < len(links):
            # call_soon: after the steps of the workers just woken (and any I/O callback
            # already due), so calls that arrived meanwhile are served between two chunks.
            asyncio.get_running_loop().call_soon(self._wake_chunk, links, end)

    def _order(
        self, link: _Link, profiles: list[OutgoingProfile], now: datetime
    ) -> list[OutgoingProfile]:
        def key(p: OutgoingProfile) -> tuple[int, float, str]:
            """Sort key: default, max, then TxProfiles by change (decreases first)."""
            rank = ORDER.get(p.slot, 2)
            return rank, self._change(link, p, now) if rank == 2 else 0.0, p.slot

        return sorted(profiles, key=key)

    def _next_wake(self, link: _Link) -> datetime | None:
        times = list(link.retry_at.values())
        plan = self._plan
        if link.held and plan is not None:
            # The head-room moves at the next slot, the bookings with the profiles' schedules
            # (a gone charger's lease ends): a held increase may fit then.
            t = _slot_at(plan, self.clock.now()) + 1
            if t < len(plan.slot_starts):
                times.append(plan.slot_starts[t])
            if self._book_heap:
                times.append(self._book_heap[0][0])
        margin = timedelta(seconds=self.config.refresh_margin_s)
        for slot, profile in link.sent.items():
            if slot in link.lapsed:
                times.append(link.recheck_at[slot])
            elif profile.lease_end is not None:
                times.append(profile.lease_end - margin)
        return min(times) if times else None

    async def _work(self, link: _Link) -> None:
        try:
            while True:
                try:
                    # A turn first: a burst of workers (a plan, a slot's lease refreshes, the
                    # answers of many profiles) is spread over passes of the loop, so the
                    # OCPP calls arriving meanwhile are not queued behind all of it.
                    await self._pacer.turn(self._priority(link))
                    self.counters["pacer_queue_max"] = self._pacer.queued_max
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
            self._activity.set()

    def _priority(self, link: _Link) -> int:
        """The worker's place in the queue for a turn (`_Pacer`): a bring-up (nothing accepted
        on this connection yet: the default and max profiles go first, P-01) or a decrease due
        (P-04) first, then a running transaction whose TxProfile is not accepted yet (a new
        transaction waits for its first TxProfile: the re-plan time), then the rest."""
        charger_id = link.charger_id
        if not link.sent or charger_id in self._decreasing:
            self.counters["turns_first"] += 1
            return PRIORITY_FIRST
        running = self.central.active_transactions(charger_id) or {}
        for connector_id, transaction_id in running.items():
            tx = link.sent.get(f"tx:{connector_id}")
            if tx is None or tx.transaction_id != transaction_id:
                self.counters["turns_new_transaction"] += 1
                return PRIORITY_NEW_TRANSACTION
        self.counters["turns_other"] += 1
        return PRIORITY_OTHER

    async def _reconcile(self, link: _Link) -> bool:
        """Send what is due now; True if something was sent (look again at once)."""
        now = self.clock.now()
        wanted = self._wanted_in_form(link, now)
        if wanted is None:
            self.counters["chargers_unknown"] += 1
            wanted = []
        slots = {p.slot for p in wanted}
        for slot in [s for s in (*link.sent, *link.rung, *link.exhausted) if s not in slots]:
            # The transaction ended: the charger drops its TxProfile by itself (one sent as a
            # TxDefaultProfile on the connector, a rung of the ladder, is cleared).
            old = link.sent.pop(slot, None)
            link.accepted_at.pop(slot, None)
            link.replaced.pop(slot, None)
            link.failures.pop(slot, None)
            link.retry_at.pop(slot, None)
            link.lapsed.discard(slot)
            link.recheck_at.pop(slot, None)
            link.rung.pop(slot, None)
            link.off_at.pop(slot, None)
            link.unsure.pop(slot, None)
            self._settle_exhausted(link, slot, refused=False)
            if old is not None and old.purpose == "TxDefaultProfile" and slot != "default":
                await self._clear(link.charger_id, old)
            if old is not None:
                await self._remember(link.charger_id, slot, None)
        due = [p for p in self._order(link, wanted, now) if self._due(link, p, now)]
        recheck = now + timedelta(seconds=self.config.lease_window_s - self.config.refresh_margin_s)
        due_slots = {p.slot for p in due}
        for profile in wanted:
            if (
                profile.slot not in due_slots
                and profile.slot not in link.retry_at
                and self._lease_ending(link, profile, now)
            ):
                # Its fallback is the plan: let the lease lapse rather than re-send it.
                link.lapsed.add(profile.slot)
                self.counters["leases_lapsed"] += 1
        for slot in link.lapsed:
            # Looked at now: the next look is due before a plan value above the fallback
            # could come within the margin of applying.
            link.recheck_at[slot] = recheck
        changes = [self._change(link, p, now) for p in due]
        if not any(change < 0 for change in changes):
            self._release(link.charger_id)
        if self._rebook(link.charger_id, now) < 0:  # a transaction of it may have ended
            self._wake_fitting(now)
        held = sent = False
        for profile, change in zip(due, changes, strict=True):
            if change > 0 and not self._may_raise(link, profile):
                # It does not fit the budget while others still lower their draw: it waits
                # until their acknowledged decreases make room (`_wake_fitting`).
                held = True
                continue
            if change > 0 and link.held_since is not None:
                self._note_wait(link)
            link.idle.clear()
            await self._send(link, profile)
            sent = True
        if held:
            link.held = True
            self.counters["increases_held"] += 1
            if link.held_since is None:
                link.held_since = time.monotonic()
        elif link.held_since is not None and not any(c > 0 for c in changes):
            link.held_since = None  # the increase it waited with is no longer asked for
        if sent:
            return True
        if held and not self._publishing and not self._decreasing - {link.charger_id}:
            return True  # released while we looked: go again rather than sleep
        if link.trigger_status:
            link.trigger_status = False
            await self._trigger_status(link.charger_id)
        return False

    def _note_wait(self, link: _Link) -> None:
        """A held increase goes: count how long (wall ms) it waited, for the benchmarks."""
        assert link.held_since is not None
        waited_ms = int((time.monotonic() - link.held_since) * 1000.0)
        link.held_since = None
        self.counters["increases_waited"] += 1
        self.counters["increase_wait_ms_total"] += waited_ms
        if waited_ms > self.counters["increase_wait_ms_max"]:
            self.counters["increase_wait_ms_max"] = waited_ms

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
        link.in_flight = profile
        link.in_flight_at = self.clock.now()
        self._rebook(charger_id, self.clock.now())  # an increase is booked from now on
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
            link.unsure[profile.slot] = profile  # it may have taken it
            self._answered(link)
        except CallFailed as exc:
            self.counters["profiles_callerror"] += 1
            problem = f"CALLERROR {exc.code}"
            self._answered(link)
        else:
            if status == "Accepted":
                link.unsure.pop(profile.slot, None)
                self.counters["profiles_accepted"] += 1
                self._note_switch(link, profile)
                link.replaced[profile.slot] = _installed(link, profile.slot)
                link.accepted_at[profile.slot] = self.clock.now()
                link.sent[profile.slot] = profile
                link.failures.pop(profile.slot, None)
                link.retry_at.pop(profile.slot, None)
                link.lapsed.discard(profile.slot)
                link.recheck_at.pop(profile.slot, None)
                self._settle_exhausted(link, profile.slot, refused=False)
                if not link.failures:
                    self.not_following.discard(charger_id)
                self._answered(link)
                await self._remember(charger_id, profile.slot, profile)
                return
            self.counters["profiles_rejected"] += 1
            problem = status
            self._answered(link)
        self.not_following.add(charger_id)
        if problem == "Rejected" or problem.removeprefix("CALLERROR ") in LADDER_ERRORS:
            if await self._climb(link, profile, problem):
                return  # the next form goes out at once
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

    def _answered(self, link: _Link) -> None:
        """The call in flight is answered: book the charger by what it holds now, and wake the
        held increases the room it freed lets go."""
        link.in_flight = None
        link.in_flight_at = None
        if self._links.get(link.charger_id) is not link:
            return  # a replaced worker's late answer: the new link books the charger
        now = self.clock.now()
        if self._rebook(link.charger_id, now) < 0:
            self._wake_fitting(now)

    def _note_switch(self, link: _Link, profile: OutgoingProfile) -> None:
        """Before `profile` replaces the slot's lease: remember when the connector was last
        switched off (inside the old lease, or by this one now), for the guard time."""
        if not profile.slot.startswith("tx:"):
            return
        now = self.clock.now()
        old = link.sent.get(profile.slot)
        edges = [link.off_at.get(profile.slot)]
        if old is not None:
            edges.append(last_off_edge(old, now))
            if old.limit_at(now) != 0.0 and profile.limit_at(now) == 0.0:
                edges.append(now)
        known = [e for e in edges if e is not None]
        if known:
            link.off_at[profile.slot] = max(known)

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
