"""The compose file cannot run here (no Docker engine): it is checked against the code instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.settings import PlanningSettings, Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def _setting_names() -> set[str]:
    names = {"REDIS_URL", "MQTT_URL"}
    for field_name in Settings.model_fields:
        names.add(f"VOLTPOOL_{field_name.upper()}")
    for field_name in PlanningSettings.model_fields:
        names.add(f"VOLTPOOL_PLANNING__{field_name.upper()}")
    return names


def test_every_variable_given_to_the_controller_is_one_the_settings_read(
    compose: dict[str, Any],
) -> None:
    """A misspelt variable would be silently ignored by the service: none may be."""
    known = _setting_names()
    for name in ("controller", "simulator"):
        environment = compose["services"][name].get("environment", {})
        unknown = sorted(set(environment) - known)
        assert unknown == [], f"{name} sets variables no setting reads: {unknown}"


def test_the_controller_variables_validate_as_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values in the compose file are accepted by the settings class as they stand."""
    environment = compose["services"]["controller"]["environment"]
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value).replace("${MQTT_PASSWORD:?set MQTT_PASSWORD}", "pw"))
    settings = Settings()
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.mqtt_url is not None
    assert settings.mqtt_url.startswith("mqtts://")  # TLS off loopback (SEC-07)
    assert settings.mqtt_url.endswith("@mosquitto:8883")
    assert settings.ocpp_port == 9000


def test_images_ports_and_persistence(compose: dict[str, Any]) -> None:
    """Redis runs with AOF, Mosquitto with our config; the OCPP port is published."""
    services = compose["services"]
    assert services["redis"]["image"].startswith("redis:")
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == (
        "yes"
    )
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert "./deploy/mosquitto:/mosquitto/config:ro" in services["mosquitto"]["volumes"]
    port = Settings.model_fields["ocpp_port"].default
    assert f"{port}:{port}" in services["controller"]["ports"]
    assert services["simulator"]["image"] == services["controller"]["image"]


def test_the_broker_config_refuses_anonymous_clients() -> None:
    """Mosquitto in the compose file authenticates every client and applies the ACL file."""
    lines = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text().splitlines()
    settings = dict(line.split(None, 1) for line in lines if line and not line.startswith("#"))
    assert settings["allow_anonymous"] == "false"
    assert settings["acl_file"] == "/mosquitto/config/acl"
    assert (ROOT / "deploy/mosquitto/acl").exists()
    assert settings["persistence"] == "true"


def test_the_dockerfile_installs_the_packages_the_compose_file_runs() -> None:
    """The image copies every package and has the voltpool entry point."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("controller", "adapters", "simulators"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert 'ENTRYPOINT ["voltpool"]' in dockerfile
