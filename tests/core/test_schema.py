"""docs/schemas/events.json is the schema the code validates payloads against."""

from __future__ import annotations

import json
from pathlib import Path

from adapters.codec import event_schema

ROOT = Path(__file__).resolve().parents[2]


def test_the_published_event_schema_is_current() -> None:
    """Regenerate with `voltpool schema` when an event changes."""
    published = json.loads((ROOT / "docs/schemas/events.json").read_text())
    assert published == json.loads(json.dumps(event_schema(), sort_keys=True))


def test_the_schema_names_every_event_kind() -> None:
    """Each kind in the discriminated union appears in the schema's mapping."""
    mapping = event_schema()["discriminator"]["mapping"]
    assert {"soc_reported", "cap_site", "meter_sampled", "transaction_started"} <= set(mapping)
