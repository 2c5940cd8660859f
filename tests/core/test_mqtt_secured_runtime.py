"""The composition root with MQTT authentication on (SEC-07): the whole runtime, one process.

`adapters.bootstrap.run` starts the embedded Redis and broker from settings that name a password
file; the controller connects as its per-run principal, a telemetry principal reads the
retained status (with the link's counters) and its reading reaches the controller; an anonymous
client is refused.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from adapters import bootstrap
from adapters.security.mqtt_acl import TELEMETRY, add_user, generate_credentials
from controller.planning.share import share_by_need
from controller.settings import Settings

TIMEOUT_S = 20.0


async def test_the_runtime_with_a_password_file_serves_authenticated_principals_only(
    tmp_path: Path,
) -> None:
    """Telemetry (from the operator's file) reads the retained status and publishes; the
    controller (password made at start) receives it; anonymous is refused."""
    users = tmp_path / "mqtt-users"
    password = generate_credentials()[TELEMETRY].password
    add_user(users, TELEMETRY, password)
    settings = Settings(
        data_dir=str(tmp_path / "var"),
        mqtt_password_file=str(users),
        ocpp_port=0,
        site="secured",
    )
    ready: asyncio.Future[bootstrap.Runtime] = asyncio.get_running_loop().create_future()

    async def on_ready(runtime: bootstrap.Runtime) -> None:
        ready.set_result(runtime)

    task = asyncio.create_task(bootstrap.run(settings, solver=share_by_need, on_ready=on_ready))
    try:
        async with asyncio.timeout(TIMEOUT_S):
            runtime = await ready
            endpoint = runtime.mqtt
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client(endpoint.host, endpoint.port, identifier="anon"):
                    pass
            async with aiomqtt.Client(
                endpoint.host,
                endpoint.port,
                username=TELEMETRY,
                password=password,
                identifier="gateway",
            ) as gateway:
                await gateway.subscribe("voltpool/status", qos=1)
                status: dict[str, Any] = {}
                async for message in gateway.messages:
                    assert isinstance(message.payload, bytes)
                    status = json.loads(message.payload)
                    if status.get("state") == "online":
                        break
                reading = json.dumps({"at": "2024-03-04T16:00:00Z", "soc": 0.5})
                await gateway.publish("voltpool/vehicle/ev-1/soc", reading, qos=1)
                # The broker delivers in wall time and the link has no event per counter.
                while runtime.link.counters["received"] < 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert isinstance(status["mqtt"], dict)  # the link's counters (empty before any message)
    assert status["store_down_since"] is None
    assert runtime.link.counters["received"] >= 1
    assert endpoint.username == "voltpool"
