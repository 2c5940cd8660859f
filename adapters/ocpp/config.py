"""Configuration of the OCPP central system and of the lease dispatcher.

Plain frozen dataclasses that refuse impossible values when built; the composition root fills
them from `controller.settings.Settings` (host, port) and its own options (TLS context).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from adapters.security.tls import check_minimum_version
from controller.errors import InvalidEvent

BootStatus: TypeAlias = Literal["Accepted", "Pending", "Rejected"]

FRAME_CAP_BYTES = 64 * 1024  # RELIABILITY O-16: far below websockets' 1 MiB default


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class OcppConfig:
    """How the central system listens and how strict it is with charge points.

    `require_auth=False` (OCPP security profile 0) is allowed only on a loopback address;
    `ssl_context` turns on TLS (profile 2 with Basic auth); a context that requires client
    certificates (`adapters.security.tls.server_context(..., client_ca=...)`) is profile 3, where
    the certificate's CN must be the charge point id. TLS below 1.2 is refused.
    """

    host: str = "127.0.0.1"
    port: int = 0
    path_prefix: str = "/ocpp"
    require_auth: bool = True
    ssl_context: ssl.SSLContext | None = None
    heartbeat_interval_s: int = 300
    # What BootNotification answers a charge point that has no credentials and is not in the
    # fleet state (only reachable with require_auth=False).
    unknown_boot_status: BootStatus = "Rejected"
    pending_retry_s: int = 60
    max_frame_bytes: int = FRAME_CAP_BYTES
    call_timeout_s: float = 30.0
    max_event_ahead_s: float = 300.0
    accept_unknown_id_tags: bool = True
    id_window: int = 1024  # CALL ids remembered per connection, to refuse duplicates
    ping_interval_s: float | None = 20.0
    ping_timeout_s: float | None = 20.0
    open_timeout_s: float = 10.0
    # After a failed ping the closing handshake cannot complete with a dead peer: keep it short
    # so detection is about ping_interval + ping_timeout + this (S-09).
    close_timeout_s: float = 2.0
    bcrypt_rounds: int = 12
    log_every_s: float = 10.0  # at most one bad-frame log line per charge point per period
    # SEC-05: a token bucket per connection on frames received (wall time: it protects CPU);
    # the burst leaves room for an offline charger replaying its queue after a reconnect.
    max_frames_per_s: float = 20.0
    frame_burst: int = 500
    max_connections_per_ip: int = 0  # 0: no cap (chargers behind one NAT share an address)
    node: str = field(default_factory=socket.gethostname)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidEvent(f"ocpp: port {self.port} is outside 0..65535")
        if not self.path_prefix.startswith("/") or self.path_prefix.endswith("/"):
            raise InvalidEvent(f"ocpp: path prefix {self.path_prefix!r} must be like '/ocpp'")
        if not self.require_auth and not _is_loopback(self.host):
            raise InvalidEvent(
                f"ocpp: charge points without credentials (security profile 0) may only "
                f"connect on loopback, not on {self.host!r}"
            )
        if not 1 <= self.heartbeat_interval_s <= 86_400:
            raise InvalidEvent(f"ocpp: heartbeat interval {self.heartbeat_interval_s} s")
        if not 1024 <= self.max_frame_bytes <= 16 * 1024 * 1024:
            raise InvalidEvent(f"ocpp: frame cap {self.max_frame_bytes} bytes")
        if not 0.01 <= self.call_timeout_s <= 600:
            raise InvalidEvent(f"ocpp: call timeout {self.call_timeout_s} s")
        if not 4 <= self.bcrypt_rounds <= 16:
            raise InvalidEvent(f"ocpp: bcrypt rounds {self.bcrypt_rounds} outside 4..16")
        if self.id_window < 1:
            raise InvalidEvent("ocpp: the duplicate-id window must hold at least one id")
        if self.max_event_ahead_s < 0:
            raise InvalidEvent("ocpp: max_event_ahead_s is negative")
        if self.max_frames_per_s <= 0 or self.frame_burst < 1:
            raise InvalidEvent("ocpp: the frame rate limit needs a positive rate and burst")
        if self.max_connections_per_ip < 0:
            raise InvalidEvent("ocpp: max_connections_per_ip is negative")
        if self.ssl_context is not None:
            try:
                check_minimum_version(self.ssl_context)
            except ValueError as exc:
                raise InvalidEvent(f"ocpp: {exc}") from exc

    @property
    def scheme(self) -> str:
        """`wss` with TLS, else `ws`."""
        return "wss" if self.ssl_context is not None else "ws"


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseConfig:
    """How the dispatcher turns plans into SetChargingProfile leases."""

    lease_window_s: int = 900  # the plan is sent for this long, then min(plan, safe share)
    refresh_margin_s: int = 120  # re-send a lease this long before it ends
    deadband_kw: float = 0.5  # send only when a limit moves by more than this
    retry_base_s: float = 5.0
    retry_max_s: float = 300.0
    max_periods: int = 24  # schedule periods per profile (chargers often cap this at 24)
    stack_level: int = 0
    default_profile_id: int = 1
    max_profile_id: int = 2
    tx_profile_id_base: int = 100  # TxProfile id = base + connector id
    discharge_vendor_id: str = "org.voltpool"
    discharge_message_id: str = "DischargeLimit"
    # "when_needed": a lease is re-sent before it ends only if what the charger falls back to
    # after it (min(plan, safe share)) differs from the plan beyond the deadband; otherwise it
    # lapses, and the charger keeps doing what the plan says anyway. "always": every lease is
    # re-sent before it ends (the behaviour before; the benchmark compares the two).
    refresh: Literal["when_needed", "always"] = "when_needed"
    # False: a plan wakes only the chargers whose inputs it changed (setpoints from now on,
    # running transactions, safe share, budget); True: every charger (for comparison).
    wake_all_on_plan: bool = False
    # A connector switched off is not switched on again within this time (reductions are never
    # held): RELIABILITY A7 "too many switches", evcc's guard duration (5-10 min there). 0: no
    # guard, the default for now: the planner does not know of it, so the energy a held switch
    # costs is not made up later (the simulated depot day left 9 of 20 cars short with 300 s).
    guard_time_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.guard_time_s <= 3600.0:
            raise InvalidEvent(f"guard time {self.guard_time_s} s outside 0..3600")
        if self.refresh not in ("when_needed", "always"):
            raise InvalidEvent(f"lease refresh {self.refresh!r}: when_needed or always")
        if not 60 <= self.lease_window_s <= 86_400:
            raise InvalidEvent(f"lease window {self.lease_window_s} s outside 60..86400")
        if not 0 <= self.refresh_margin_s < self.lease_window_s:
            raise InvalidEvent("lease refresh margin must be shorter than the lease window")
        if self.deadband_kw < 0:
            raise InvalidEvent(f"deadband {self.deadband_kw} kW is negative")
        if not 0 < self.retry_base_s <= self.retry_max_s:
            raise InvalidEvent("retry back-off: need 0 < base <= max")
        if self.max_periods < 2:
            raise InvalidEvent("a lease needs at least two schedule periods")
        if self.stack_level < 0:
            raise InvalidEvent("stack level is negative")
