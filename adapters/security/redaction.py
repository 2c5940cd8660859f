"""Log redaction (RELIABILITY.md SEC-10): no Authorization header, AuthorizationKey or URL
password reaches a log line, whoever logs it.

`websockets` logs every handshake header at DEBUG, the Basic-auth `Authorization` header
included; `install_log_redaction()` puts a filter on its loggers (and voltpool's) that rewrites
such records before any handler sees them.
"""

from __future__ import annotations

import logging
import re

REDACTED = "<redacted>"
PATTERNS = (
    # "Authorization: Basic abc==", "authorization=Bearer x" (HTTP headers, reprs)
    re.compile(r"(?i)(authorization['\"]?\s*[:=,]\s*['\"]?)(?:basic|bearer|digest)?\s*[^\s'\",)]+"),
    # ChangeConfiguration(AuthorizationKey, value)
    re.compile(
        r"(?i)(authorizationkey['\"]?\s*[,:=]\s*(?:['\"]?value['\"]?\s*[:=]\s*)?['\"]?)[^\s'\",}]+"
    ),
    # URL passwords: scheme://user:<password>@host
    re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+(?=@)"),
)
# The ocpp library logs every frame it sends and receives at INFO, ChangeConfiguration included.
LOGGERS = (
    "websockets",
    "websockets.server",
    "websockets.client",
    "ocpp",
    "adapters",
    "controller",
    "simulators",
)


def redact(text: str) -> str:
    """`text` with every credential it carries replaced by `<redacted>`."""
    for pattern in PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record whose message carries a credential; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact in place; always keep the record."""
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's business
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_FILTER = RedactSecrets()


def install_log_redaction() -> None:
    """Attach the filter to the loggers that can carry credentials (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
