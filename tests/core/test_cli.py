"""The `voltpool` command: every sub-command the docs name is there and does its job."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from adapters.bootstrap import event_loop_factory
from adapters.cli import app
from controller.settings import Settings

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


def test_the_event_loop_setting_names_the_loop_it_runs_on() -> None:
    """`Settings.event_loop` picks asyncio's loop (the default) or uvloop's; anything else is
    refused, by the settings and by the factory."""
    for name in ("uvloop", "asyncio"):
        loop = event_loop_factory(Settings(event_loop=name).event_loop)()
        try:
            assert type(loop).__module__.split(".")[0] == name
        finally:
            loop.close()
    assert Settings().event_loop == "asyncio"
    with pytest.raises(ValidationError):
        Settings(event_loop="trio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        event_loop_factory("trio")


async def test_the_tests_run_on_the_loop_voltpool_test_event_loop_names() -> None:
    """`VOLTPOOL_TEST_EVENT_LOOP=uvloop` runs the async tests on uvloop (tests/conftest.py)."""
    wanted = os.environ.get("VOLTPOOL_TEST_EVENT_LOOP", "asyncio")
    assert type(asyncio.get_running_loop()).__module__.split(".")[0] == wanted
