"""Errors the OCPP adapter raises on purpose, each with a reason an operator can act on."""

from __future__ import annotations

from controller.errors import VoltpoolError


class ChargerUnreachable(VoltpoolError):
    """The charge point is not connected, or its connection closed while we waited."""


class CallTimedOut(VoltpoolError):
    """The charge point did not answer a CALL within the configured time."""


class CallFailed(VoltpoolError):
    """The charge point answered a CALL with a CALLERROR; `code` is the OCPP error code."""

    def __init__(self, charger_id: str, action: str, code: str, description: str) -> None:
        super().__init__(f"{charger_id}: {action} answered {code}: {description}")
        self.charger_id = charger_id
        self.action = action
        self.code = code
        self.description = description


class BadCredential(VoltpoolError, ValueError):
    """A charge point id or password that may not be stored."""
