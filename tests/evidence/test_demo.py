"""The demo for a few simulated hours with 20 cars through OCPP, MQTT and Redis."""

from __future__ import annotations

import csv
import json
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from controller.forecast.models import ForecastModels
from simulators.demo import DemoDay, run_demo
from tests.evidence.conftest import DATA

HOURS = 4.0  # local noon to 16:00 on a sunny Saturday: negative prices at midday


@pytest.fixture(scope="module")
def demo(
    evidence_models: ForecastModels, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DemoDay, Path]:
    """One demo day of 20 cars, 4 simulated hours in 15-minute steps."""
    out = tmp_path_factory.mktemp("demo")
    days = run_demo(
        data_dir=DATA,
        out=out,
        cars=20,
        days=1,
        first=date(2024, 4, 6),
        hours=HOURS,
        step_s=900.0,
        models=evidence_models,
        models_cache=None,
    )
    return days[0], out


def test_the_report_files_exist(demo: tuple[DemoDay, Path]) -> None:
    """report.md (index and day), the CSVs, the JSON and two PNG plots."""
    day, out = demo
    tag = day.day.isoformat()
    for name in ("report.md", f"report-{tag}.md", f"steps-{tag}.csv", f"cars-{tag}.csv"):
        assert (out / name).stat().st_size > 0, name
    for png in (f"power-{tag}.png", f"soc-{tag}.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    text = (out / "report.md").read_text()
    assert "metered" in text
    assert "computed" in text
    assert "Cost basis" in text


def test_the_files_agree_with_what_the_chargers_metered(demo: tuple[DemoDay, Path]) -> None:
    """Steps, per-car figures and the table's managed row are the chargers' meter readings."""
    day, out = demo
    tag = day.day.isoformat()
    result = day.result
    assert result.cars, "no car plugged in during the span"
    with (out / f"steps-{tag}.csv").open() as fh:
        steps = list(csv.DictReader(fh))
    assert len(steps) == len(result.metered_kw) == int(HOURS * 4)
    metered = np.array([float(s["metered_kw"]) for s in steps])
    assert np.allclose(metered, result.metered_kw, atol=1e-4)
    energy = float(metered.sum() * 0.25)
    assert energy > 0.0
    written = json.loads((out / f"demo-{tag}.json").read_text())
    managed = written["rows"][0]
    assert managed["name"] == "managed"
    assert managed["source"] == "metered"
    assert managed["energy_kwh"] == pytest.approx(energy, abs=1e-3)
    assert written["metered_energy_kwh"] == pytest.approx(energy, abs=1e-3)
    with (out / f"cars-{tag}.csv").open() as fh:
        cars = list(csv.DictReader(fh))
    gained = sum(float(c["metered_delivered_kwh"]) for c in cars)
    assert written["sum_car_delivered_kwh"] == pytest.approx(gained, abs=1e-3)
    # Independent of the meters: what the cars' batteries gained is the energy metered times
    # the charge efficiency (no taper, no discharge in this run).
    assert gained == pytest.approx(0.92 * energy, rel=1e-3)
    shortfall = sum(float(c["metered_shortfall_kwh"]) for c in cars)
    assert shortfall >= managed["shortfall_kwh"] - 1e-6  # the table counts cars that left
    assert written["dispatch"].get("profiles_sent", 0) > 0


def test_every_plug_in_gets_its_first_profile_within_its_step(demo: tuple[DemoDay, Path]) -> None:
    """Event-to-profile latency, measured at the simulated chargers, is in the report."""
    day, out = demo
    result = day.result
    written = json.loads((out / f"demo-{day.day.isoformat()}.json").read_text())
    latency = written["profile_latency"]
    # One event per car that plugged in during the span; every one was answered by a profile.
    assert latency["events"] == len(result.profile_latency) == len(result.cars) > 0
    assert latency["answered"] == latency["events"]
    for x in result.profile_latency:
        assert x.sim_s is not None
        assert x.wall_s is not None
        # The runner waits for quiet after each step: the profile comes within the step.
        assert 0.0 <= x.sim_s <= result.step_s, x
        assert x.wall_s > 0.0, x
    assert latency["wall_p50_s"] <= latency["wall_p95_s"] <= latency["wall_max_s"]
    # Every profile the dispatcher sent reached a charger, and nothing else did.
    assert written["profiles_received"] == written["dispatch"]["profiles_sent"]
    assert "Event-to-profile latency" in (out / "report.md").read_text()
