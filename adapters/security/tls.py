"""TLS for the OCPP central system: security profiles 2 (server TLS) and 3 (mutual TLS).

Profile 2: the server presents a certificate, chargers authenticate with Basic auth over it.
Profile 3: chargers also present a client certificate chained to the configured CA, and its
subject CN must be the charge point id of the URL (RELIABILITY.md SEC-04). Both refuse TLS
below 1.2; a charger configured for TLS cannot fall back to `ws://` because the listener speaks
TLS only (no silent downgrade, SEC-03).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


def server_context(
    cert_chain: Path | str,
    key: Path | str | None = None,
    *,
    client_ca: Path | str | None = None,
) -> ssl.SSLContext:
    """A server context with TLS >= 1.2; with `client_ca`, client certificates are required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_chain), None if key is None else str(key))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
    return context


def requires_client_certificate(context: ssl.SSLContext | None) -> bool:
    """Whether `context` is security profile 3 (mutual TLS)."""
    return context is not None and context.verify_mode == ssl.CERT_REQUIRED


def check_minimum_version(context: ssl.SSLContext) -> None:
    """Refuse a context that would accept TLS below 1.2."""
    minimum = context.minimum_version
    allowed = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.MAXIMUM_SUPPORTED)
    if minimum not in allowed:
        raise ValueError(f"TLS minimum version {minimum.name} is below TLS 1.2")


def common_name(peercert: dict[str, Any] | None) -> str | None:
    """The subject CN of a certificate as `SSLSocket.getpeercert()` returns it."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
