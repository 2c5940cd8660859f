"""From OCPP 1.6 payloads (as the `ocpp` library hands them over, snake_case) to typed events.

Pure functions. Event ids derive from the message's content, not from the connection, so a
frame replayed after a reconnect (same meter timestamp, same measurands) is applied once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from adapters.ocpp.frames import parse_decimal, parse_timestamp
from controller.domain import ChargerId, ConnectorId, TransactionId
from controller.events import MeterSampled

MAX_EVENT_ID = 128


def iso(at: datetime) -> str:
    """RFC 3339 in UTC with a 'Z', milliseconds kept when present (the OCPP wire form)."""
    at = at.astimezone(UTC)
    spec = "milliseconds" if at.microsecond else "seconds"
    return at.isoformat(timespec=spec).replace("+00:00", "Z")


def timestamp(text: str) -> datetime:
    """A wire timestamp (already checked by the frame layer) as an aware UTC datetime."""
    value = parse_timestamp(text)
    if value is None:
        raise ValueError(f"{text!r} is not an RFC 3339 date-time")
    return value.astimezone(UTC)


def event_id(*parts: object) -> str:
    """Join parts with ':'; an id over 128 characters keeps its head and a digest of the rest."""
    text = ":".join(str(p) for p in parts)
    if len(text) <= MAX_EVENT_ID:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    return f"{text[: MAX_EVENT_ID - 33]}~{digest}"


_WH_PER = {"Wh": 1.0, "kWh": 1000.0}
_KW_PER = {"W": 0.001, "kW": 1.0}


def sample_values(
    sampled: Sequence[Mapping[str, Any]],
) -> tuple[float | None, float | None, float | None]:
    """(energy register Wh, net power kW, SoC fraction) from one meterValue's sampledValue list.

    Values without a phase win over per-phase ones; per-phase powers are summed when no total
    is given. Export power counts negative. Signed data and other measurands are ignored.
    """
    energy: float | None = None
    power_import: float | None = None
    power_export: float | None = None
    phase_import = 0.0
    phase_export = 0.0
    phased = False
    soc: float | None = None
    for sample in sampled:
        if sample.get("format") == "SignedData":
            continue
        value = parse_decimal(str(sample.get("value", "")))
        if value is None:
            continue
        measurand = sample.get("measurand", "Energy.Active.Import.Register")
        unit = sample.get("unit")
        phase = sample.get("phase")
        if measurand == "Energy.Active.Import.Register" and phase is None:
            energy = value * _WH_PER.get(unit or "Wh", 1.0)
        elif measurand in ("Power.Active.Import", "Power.Active.Export"):
            kw = value * _KW_PER.get(unit or "W", 0.001)
            if phase is not None:
                phased = True
                if measurand == "Power.Active.Import":
                    phase_import += kw
                else:
                    phase_export += kw
            elif measurand == "Power.Active.Import":
                power_import = kw
            else:
                power_export = kw
        elif measurand == "SoC":
            soc = value / 100.0
    power: float | None = None
    if power_import is not None or power_export is not None:
        power = (power_import or 0.0) - (power_export or 0.0)
    elif phased:
        power = phase_import - phase_export
    return energy, power, soc


def _measurands(sampled: Sequence[Mapping[str, Any]]) -> str:
    """A short digest of the (measurand, phase, location) set of one meterValue entry."""
    keys = sorted(
        {
            f"{s.get('measurand') or 'Energy.Active.Import.Register'}/{s.get('phase') or ''}/"
            f"{s.get('location') or 'Outlet'}"
            for s in sampled
        }
    )
    return hashlib.sha256("|".join(keys).encode()).hexdigest()[:8]


def meter_events(
    charger_id: ChargerId,
    connector_id: ConnectorId,
    transaction_id: TransactionId | None,
    meter_value: Sequence[Mapping[str, Any]],
) -> list[MeterSampled]:
    """One `MeterSampled` per meterValue entry that carries energy, power or SoC."""
    events: list[MeterSampled] = []
    used: set[str] = set()
    for entry in meter_value:
        at = timestamp(str(entry["timestamp"]))
        energy, power, soc = sample_values(entry.get("sampled_value") or [])
        if energy is None and power is None and soc is None:
            continue
        # The measurands are part of the identity: a charge point may send SoC and the
        # register in separate messages with the same timestamp, and both must be applied;
        # the same reading re-sent (with another message id) gets the same event id.
        base = event_id(
            charger_id, "mv", connector_id, iso(at), _measurands(entry.get("sampled_value") or [])
        )
        eid = base
        n = 1
        while eid in used:
            n += 1
            eid = event_id(base, n)
        used.add(eid)
        events.append(
            MeterSampled(
                event_id=eid,
                at=at,
                charger_id=charger_id,
                connector_id=connector_id,
                meter_wh=energy,
                power_kw=power,
                soc=soc,
                transaction_id=transaction_id,
            )
        )
    return events
