"""The `voltpool` command: a thin driving adapter over the composition root."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from adapters import bootstrap
from adapters.codec import event_schema
from controller.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

SCHEMA_PATH = Path("docs/schemas/events.json")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("amqtt", "transitions", "websockets", "ocpp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_until_signalled(main: Coroutine[Any, Any, None]) -> None:
    """Run `main`; SIGINT or SIGTERM cancels it so every context exits and servers stop."""

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await main
        except asyncio.CancelledError:
            logging.getLogger("voltpool").info("stopped by signal")

    asyncio.run(guarded())


@app.command()
def run(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Run the controller (embedded Redis and MQTT broker unless REDIS_URL / MQTT_URL are set)."""
    settings = Settings()
    _configure_logging(verbose)

    async def ready(runtime: bootstrap.Runtime) -> None:
        # One machine-readable line, for scripts and tests that start the service.
        print(
            json.dumps(
                {
                    "ready": True,
                    "site": settings.site,
                    "redis": runtime.redis.url or f"unix://{runtime.redis.unix_socket}",
                    "redis_pid": runtime.redis.pid,
                    "mqtt": f"mqtt://{runtime.mqtt.host}:{runtime.mqtt.port}",
                    "ocpp": runtime.central.url(),
                }
            ),
            flush=True,
        )

    run_until_signalled(bootstrap.run(settings, on_ready=ready))


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Print the fleet, the latest plan and the counters, read from Redis."""
    from adapters.status import read_status

    settings = Settings()
    _configure_logging(False)
    report = asyncio.run(read_status(settings))
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    _print_status(report)


def _print_status(report: dict[str, Any]) -> None:
    fleet = Table(title=f"Fleet of site {report['site']}")
    for column in ("vehicle", "model", "SoC", "plugged into", "departure", "target kWh", "now kW"):
        fleet.add_column(column)
    for row in report["vehicles"]:
        fleet.add_row(
            row["vehicle_id"],
            row["model"],
            f"{row['soc']:.0%}",
            row["plugged_into"] or "-",
            row["departure"] or "-",
            "-" if row["target_kwh"] is None else f"{row['target_kwh']:.1f}",
            "-" if row["now_kw"] is None else f"{row['now_kw']:.2f}",
        )
    console.print(fleet)
    plan = report["plan"]
    if plan:
        console.print(
            f"Plan made {plan['made_at']} by {plan['solver'] or plan['strategy']}"
            f"{' (FALLBACK)' if plan['fallback'] else ''}: cost {plan['cost_eur']:.2f} EUR, "
            f"peak {plan['peak_kw']:.1f} kW, shortfall {plan['shortfall_kwh']:.1f} kWh"
        )
    else:
        console.print("No plan yet.")
    counters = Table(title="Counters")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for name, value in sorted(report["counters"].items()):
        counters.add_row(name, str(value))
    console.print(counters)


@app.command()
def schema(
    out: Annotated[Path, typer.Option(help="Where to write the JSON schema.")] = SCHEMA_PATH,
) -> None:
    """Write the JSON schemas: every event and command, and each MQTT topic's payload."""
    from adapters.mqtt_payloads import schemas

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(event_schema(), indent=2, sort_keys=True) + "\n")
    console.print(f"wrote {out}")
    topics = out.parent / "mqtt"
    topics.mkdir(exist_ok=True)
    for name, topic_schema in schemas().items():
        path = topics / f"{name}.json"
        path.write_text(json.dumps(topic_schema, indent=2, sort_keys=True) + "\n")
        console.print(f"wrote {path}")


@app.command()
def demo(
    cars: Annotated[int, typer.Option(help="Number of cars.")] = 6,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Start the service on embedded servers, feed it a handful of events, print the plan."""
    from simulators.quickdemo import run_quick_demo

    _configure_logging(verbose)
    run_until_signalled(run_quick_demo(cars=cars, console=console))


def main() -> None:
    """Entry point of the `voltpool` console script."""
    app()


if __name__ == "__main__":
    main()
