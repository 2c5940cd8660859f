"""The `voltpool` command: every sub-command the docs name is there and does its job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_every_documented_command_is_there() -> None:
    """run, status, schema, demo, study, fit, forecast and simulate-chargers answer --help."""
    runner = CliRunner()
    for command in (
        "run",
        "status",
        "schema",
        "demo",
        "study",
        "fit",
        "forecast",
        "simulate-chargers",
    ):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.output


def test_schema_writes_what_docs_publish(tmp_path: Path) -> None:
    """`voltpool schema --out` writes the event schema and one schema per MQTT input topic."""
    out = tmp_path / "events.json"
    result = CliRunner().invoke(app, ["schema", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == json.loads(
        (ROOT / "docs/schemas/events.json").read_text()
    )
    written = sorted(p.name for p in (tmp_path / "mqtt").iterdir())
    published = sorted(p.name for p in (ROOT / "docs/schemas/mqtt").iterdir())
    assert written == published


def test_a_bad_setting_stops_the_start_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """VOLTPOOL_COALESCE_WINDOW_S=-1 fails at start-up, naming the field."""
    monkeypatch.setenv("VOLTPOOL_COALESCE_WINDOW_S", "-1")
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code != 0
    assert "coalesce_window_s" in str(result.exception)
