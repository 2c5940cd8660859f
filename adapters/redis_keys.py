"""Every Redis key voltpool uses, in one place.

All keys of a site share the hash tag `{site}`, so one site lives on one Redis Cluster slot and
multi-key scripts (atomic commits) work on a cluster too.
"""

from __future__ import annotations

RECORD_TABLES = {
    "vehicle": "vehicles",
    "charger": "chargers",
    "transaction": "transactions",
    "override": "overrides",
}
SINGLE_RECORDS = ("site", "prices", "headroom", "site_load")

EVENTS_GROUP = "controller"


def _prefix(site: str) -> str:
    return f"vp:{{{site}}}"


def events(site: str) -> str:
    """Stream: the append-only event log, read through consumer group `controller`."""
    return f"{_prefix(site)}:events"


def rejected(site: str) -> str:
    """Stream (capped): events refused or undecodable, with the reason (dead letters)."""
    return f"{_prefix(site)}:rejected"


def applied(site: str) -> str:
    """Sorted set: ids of applied events, scored by log time in ms (idempotence window)."""
    return f"{_prefix(site)}:applied"


def table(site: str, kind: str) -> str:
    """Hash: one record kind (vehicles, chargers, transactions, overrides), id -> JSON."""
    return f"{_prefix(site)}:{RECORD_TABLES[kind]}"


def single(site: str, kind: str) -> str:
    """String: a record the site has one of (site, prices, headroom, site_load), as JSON."""
    if kind not in SINGLE_RECORDS:
        raise KeyError(kind)
    return f"{_prefix(site)}:{kind}"


def counters(site: str) -> str:
    """Hash: counters (events applied, refused, plans...) for `voltpool status`."""
    return f"{_prefix(site)}:counters"


def plan(site: str) -> str:
    """String: the latest plan's summary as JSON."""
    return f"{_prefix(site)}:plan"


def charger_credentials(site: str) -> str:
    """Hash: charge point id -> salted slow hash of its OCPP Basic-auth password."""
    return f"{_prefix(site)}:cp_credentials"


def charger_connections(site: str) -> str:
    """Hash: charge point id -> JSON of its connection state (online, since, node)."""
    return f"{_prefix(site)}:cp_connections"


def charger_profiles(site: str) -> str:
    """Hash: charge point id -> JSON of the last charging profiles it accepted."""
    return f"{_prefix(site)}:cp_profiles"


def transaction_seq(site: str) -> str:
    """String (INCR): the last OCPP transaction id the central system handed out."""
    return f"{_prefix(site)}:tx_seq"


def ocpp_transactions(site: str) -> str:
    """Hash: the central system's transaction book, three kinds of field.

    `start:{charger}:{connector}:{timestamp}:{meterStart}` -> transaction id (a replayed
    StartTransaction gets the same id); `tx:{id}` -> JSON of the transaction (charger,
    connector, idTag, vehicle, stopped); `conn:{charger}:{connector}` -> the connector's latest
    transaction id.
    """
    return f"{_prefix(site)}:ocpp_tx"


def transaction_samples(site: str, transaction_id: int) -> str:
    """Hash: the meter samples of one OCPP transaction, each stored once (RELIABILITY T-01/T-05).

    Field `{timestamp, RFC 3339 UTC}|{connector}|{measurand}|{phase}|{location}` (the sample's
    identity; readers sort by the timestamp) -> JSON of the sample (value, unit, context).
    Expires some weeks after its last write.
    """
    return f"{_prefix(site)}:tx_samples:{transaction_id}"
