"""The errors voltpool raises on purpose, each carrying a reason an operator can act on."""

from __future__ import annotations

from enum import Enum


class VoltpoolError(Exception):
    """Base of every error voltpool raises on purpose."""


class InvalidEvent(VoltpoolError, ValueError):
    """An event or record that must not enter the fleet state."""


class RefusalCode(Enum):
    """Why a request was refused; the value is what goes on the wire."""

    UNKNOWN_VEHICLE = "unknown_vehicle"
    UNKNOWN_CHARGER = "unknown_charger"
    UNKNOWN_CONNECTOR = "unknown_connector"
    UNKNOWN_TRANSACTION = "unknown_transaction"
    UNKNOWN_OVERRIDE = "unknown_override"
    EXPIRED = "expired"
    OUT_OF_RANGE = "out_of_range"
    CONFLICT = "conflict"
    STALE = "stale"
    FROM_THE_FUTURE = "from_the_future"


class Refused(VoltpoolError):
    """A request voltpool will not carry out; `reason` goes back to whoever asked."""

    def __init__(self, code: RefusalCode, reason: str) -> None:
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason


class StoreUnavailable(VoltpoolError):
    """The fleet store (Redis) could not be reached or refused the write."""


class PlanningFailed(VoltpoolError):
    """The planner could not produce a schedule; the caller falls back to a safe one."""
