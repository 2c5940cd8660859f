"""The security event log (RELIABILITY.md SEC-11; OCPP 1.6 security whitepaper, "security events").

One structured record per event: what happened (`kind`), to whom (`principal`: a charge point
id, an MQTT or HTTP user), from where (`remote`: the peer address when known), why (`reason`)
and when (`at`, from the clock given). Every event is counted per kind and kept in a bounded
ring of recent records; log lines are rate-limited per (kind, principal): the first event of a
window is logged at WARNING on the logger `adapters.security.events` as one line, `security:
{verb} {principal}: {reason} {the record as JSON}`, the others in the same window are only
counted and the next logged line says how many were left out (`left_out`). So a charger
hammering the door with a wrong password costs one log line per window, not one per attempt,
and the counts stay exact.

No record carries a secret: the principal is cut to 64 printable characters, and principal and
reason pass through `adapters.security.redaction.redact` (Authorization headers,
AuthorizationKey values, URL passwords). Callers still never put a password into a reason.

Use:

    security = SecurityLog(now=clock.now)
    security.record(SecurityEventKind.AUTH_FAILED, principal="CP-7", remote="10.0.0.9",
                    reason="wrong password")
    security.counts["auth_failed"]    # 1
    security.recent()                 # [SecurityEvent(...)], newest last
"""

from __future__ import annotations

import json
import logging
import ssl
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from adapters.security.redaction import redact

LOGGER_NAME = "adapters.security.events"
MAX_PRINCIPAL = 64
MAX_REASON = 300


class SecurityEventKind(StrEnum):
    """The kinds of security event voltpool records."""

    AUTH_FAILED = "auth_failed"  # wrong password, wrong user, malformed or missing credentials
    UNKNOWN_ID = "unknown_id"  # a well-formed id nobody registered
    INVALID_ID = "invalid_id"  # an id (or path) that fails the charset/length rule
    DOWNGRADE = "downgrade_attempt"  # plain ws/HTTP to a TLS listener, TLS below 1.2
    INVALID_CERTIFICATE = "invalid_certificate"  # failed chain, expired, none, wrong CN
    TLS_FAILED = "tls_failed"  # any other failed TLS handshake
    RATE_LIMITED = "rate_limited"  # closed for flooding, or refused over a connection cap
    OVERSIZED_FRAME = "oversized_frame"  # a frame or payload over the cap
    KEY_ROTATION = "key_rotation"  # a credential changed (AuthorizationKey), with its outcome


# The verb of a log line per kind: "security: refused CP-7: wrong password {...}".
_VERBS = {
    SecurityEventKind.RATE_LIMITED: "cut off",
    SecurityEventKind.OVERSIZED_FRAME: "cut off",
    SecurityEventKind.KEY_ROTATION: "rotated the key of",
}


def _clean(text: str, limit: int) -> str:
    """Printable, bounded, redacted."""
    printable = "".join(ch if ch.isprintable() else "?" for ch in text[: limit * 2])
    return redact(printable)[:limit]


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityEvent:
    """One security event, ready for JSON."""

    kind: SecurityEventKind
    principal: str
    remote: str
    reason: str
    at: datetime

    def __post_init__(self) -> None:
        if self.at.tzinfo is None:
            raise ValueError("a security event needs an aware timestamp")

    def to_json(self) -> dict[str, str]:
        """The record as a JSON object (all strings; time in RFC 3339 UTC)."""
        return {
            "kind": self.kind.value,
            "principal": self.principal,
            "remote": self.remote,
            "reason": self.reason,
            "at": self.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        }


def _wall_clock() -> datetime:
    return datetime.now(UTC)


class SecurityLog:
    """Records, counts and (rate-limited) logs security events.

    Args:
        now: the clock stamped on events and used for the rate limit.
        interval_s: at most one log line per (kind, principal) per this many seconds.
        keep: how many recent records are kept in memory.
        max_keys: how many (kind, principal) windows are tracked; the oldest are forgotten
            first, so a flood of made-up ids cannot grow memory without bound.
    """

    def __init__(
        self,
        *,
        now: Callable[[], datetime] = _wall_clock,
        interval_s: float = 10.0,
        keep: int = 1_000,
        max_keys: int = 10_000,
    ) -> None:
        if interval_s < 0 or keep < 1 or max_keys < 1:
            raise ValueError("security log: interval >= 0, keep >= 1 and max_keys >= 1")
        self._now = now
        self._interval_s = interval_s
        self._recent: deque[SecurityEvent] = deque(maxlen=keep)
        self._windows: OrderedDict[tuple[str, str], tuple[datetime, int]] = OrderedDict()
        self._max_keys = max_keys
        self._log = logging.getLogger(LOGGER_NAME)
        self.counts: Counter[str] = Counter()  # events per kind
        self.logged: Counter[str] = Counter()  # log lines per kind
        self.suppressed: Counter[str] = Counter()  # events per kind not logged (rate limit)

    def record(
        self,
        kind: SecurityEventKind,
        *,
        principal: str = "",
        remote: str = "",
        reason: str = "",
    ) -> SecurityEvent:
        """Record one event; it is counted always and logged unless its window is used up."""
        event = SecurityEvent(
            kind=kind,
            principal=_clean(principal, MAX_PRINCIPAL),
            remote=_clean(remote, MAX_PRINCIPAL),
            reason=_clean(reason, MAX_REASON),
            at=self._now(),
        )
        self.counts[kind.value] += 1
        self._recent.append(event)
        key = (kind.value, event.principal)
        window = self._windows.get(key)
        if window is not None and (event.at - window[0]).total_seconds() < self._interval_s:
            self._windows[key] = (window[0], window[1] + 1)
            self.suppressed[kind.value] += 1
            return event
        left_out = window[1] if window is not None else 0
        self._windows[key] = (event.at, 0)
        self._windows.move_to_end(key)
        while len(self._windows) > self._max_keys:
            self._windows.popitem(last=False)
        line = event.to_json() | ({"left_out": str(left_out)} if left_out else {})
        self._log.warning(
            "security: %s %s: %s %s",
            _VERBS.get(kind, "refused"),
            event.principal or "-",
            event.reason,
            json.dumps(line, sort_keys=True),
        )
        self.logged[kind.value] += 1
        return event

    def recent(self, kind: SecurityEventKind | None = None) -> list[SecurityEvent]:
        """The kept records, oldest first (only those of `kind` when given)."""
        return [e for e in self._recent if kind is None or e.kind == kind]


# OpenSSL reasons of a failed server-side handshake that mean "not TLS, or TLS too old".
_DOWNGRADES = {
    "HTTP_REQUEST": "plain HTTP (ws://) sent to the TLS listener",
    "HTTPS_PROXY_REQUEST": "an HTTP proxy request sent to the TLS listener",
    "WRONG_VERSION_NUMBER": "not TLS, or a TLS version below 1.2",
    "UNSUPPORTED_PROTOCOL": "a TLS version below 1.2",
    "NO_PROTOCOLS_AVAILABLE": "a TLS version below 1.2",
    "VERSION_TOO_LOW": "a TLS version below 1.2",
    "TLSV1_ALERT_PROTOCOL_VERSION": "a TLS version below 1.2",
}


def classify_tls_failure(error: ssl.SSLError) -> tuple[SecurityEventKind, str]:
    """The kind and a reason for a TLS handshake the server refused."""
    reason = str(error.reason or "").upper()
    if reason in _DOWNGRADES:
        return SecurityEventKind.DOWNGRADE, _DOWNGRADES[reason]
    detail = getattr(error, "verify_message", None) or reason.lower().replace("_", " ")
    if "CERTIFICATE" in reason:
        return SecurityEventKind.INVALID_CERTIFICATE, f"client certificate refused: {detail}"
    return SecurityEventKind.TLS_FAILED, f"TLS handshake failed: {detail or error}"


def observe_tls_handshakes(
    context: ssl.SSLContext, on_failure: Callable[[SecurityEventKind, str], None]
) -> None:
    """Report every failed server-side TLS handshake made with `context`.

    asyncio drops such failures silently (logged only in debug mode), before any application
    code sees the connection; the context's `sslobject_class` is the one hook that sees them.
    The peer's address is not known at that layer. Changes `context` in place.
    """

    class ObservedSSLObject(ssl.SSLObject):
        """An SSLObject that reports a failed handshake before raising it."""

        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # not a failure: the handshake needs more bytes
            except ssl.SSLError as error:
                on_failure(*classify_tls_failure(error))
                raise

    context.sslobject_class = ObservedSSLObject
