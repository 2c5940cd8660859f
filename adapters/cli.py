"""The `voltpool` command: a thin driving adapter over the composition root."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from adapters import bootstrap, forecast_cli
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


def run_until_signalled(main: Coroutine[Any, Any, None], *, loop: str = "asyncio") -> None:
    """Run `main` on the event loop named `loop` (`Settings.event_loop`); SIGINT or SIGTERM
    cancels it so every context exits and servers stop."""

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

    with asyncio.Runner(loop_factory=bootstrap.event_loop_factory(loop)) as runner:
        runner.run(guarded())


@app.command()
def run(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Run the controller (embedded Redis and MQTT broker unless REDIS_URL / MQTT_URL are set)."""
    settings = Settings()
    _configure_logging(verbose)

    async def ready(runtime: bootstrap.Runtime) -> None:
        # One machine-readable line, for scripts and tests that start the service.
        line = (
            json.dumps(
                {
                    "ready": True,
                    "site": settings.site,
                    "redis": runtime.redis.url or f"unix://{runtime.redis.unix_socket}",
                    "redis_pid": runtime.redis.pid,
                    "mqtt": f"mqtt://{runtime.mqtt.host}:{runtime.mqtt.port}",
                    "ocpp": runtime.central.url(),
                    "event_loop": type(asyncio.get_running_loop()).__module__,
                }
            )
            + "\n"
        )
        # One write of less than PIPE_BUF bytes: a solver writing to the same stdout from its
        # thread cannot split the line.
        os.write(sys.stdout.fileno(), line.encode())

    run_until_signalled(bootstrap.run(settings, on_ready=ready), loop=settings.event_loop)


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
    cars: Annotated[int, typer.Option(help="Number of cars (the seed's fleet: 278).")] = 278,
    days: Annotated[int, typer.Option(help="Simulated days, one after the other.")] = 1,
    date: Annotated[str, typer.Option(help="First day (YYYY-MM-DD), its local noon.")] = (
        "2024-03-12"
    ),
    hours: Annotated[float, typer.Option(help="Hours simulated per day (at most 24).")] = 24.0,
    step_s: Annotated[
        float, typer.Option(help="Simulated seconds per step (900: one per plan slot).")
    ] = 900.0,
    out: Annotated[str | None, typer.Option(help="Run directory (default runs/<time>).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the seed's fleet for a day through OCPP, MQTT and Redis; report managed vs baselines."""
    from simulators.demo import run_demo_cli

    _configure_logging(verbose)
    run_demo_cli(
        cars=cars, days=days, first=date, hours=hours, step_s=step_s, out=out, console=console
    )


@app.command()
def study(
    cars: Annotated[int, typer.Option(help="Fleet size (the seed's: 278).")] = 278,
    year: Annotated[int, typer.Option(help="Year of prices and calendar.")] = 2024,
    days: Annotated[
        int, typer.Option(help="Days sampled evenly over the year (366: every day of any year).")
    ] = 366,
    sens_days: Annotated[int, typer.Option(help="Days per sensitivity variant (0: none).")] = 24,
    fee: Annotated[float, typer.Option(help="Grid fee + taxes, EUR per imported kWh.")] = 0.15,
    export_refund: Annotated[
        float, typer.Option(help="What an exported kWh earns on top of spot, EUR/kWh.")
    ] = 0.0,
    wear: Annotated[float, typer.Option(help="V2G battery wear, EUR per kWh discharged.")] = 0.03,
    v2g_share: Annotated[float, typer.Option(help="Share of cars allowed V2G.")] = 1.0,
    quantile: Annotated[float, typer.Option(help="Head-room quantile planned on.")] = 0.95,
    out: Annotated[
        str | None, typer.Option(help="Output directory (default runs/study-<time>).")
    ] = None,
    data_dir: Annotated[str, typer.Option(help="Data directory.")] = "data",
    workers: Annotated[
        int, typer.Option(help="Processes planning days in parallel (0: one per CPU core).")
    ] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The planner without the protocols over a year: cost, peak, savings, sensitivity."""
    import os
    from datetime import UTC, datetime
    from pathlib import Path

    from simulators.study import run_cli

    _configure_logging(verbose)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_cli(
        data_dir=Path(data_dir),
        out=Path(out or f"runs/study-{stamp}"),
        cars=cars,
        year=year,
        days=days,
        sens_days=sens_days,
        fee_eur_per_kwh=fee,
        export_refund_eur_per_kwh=export_refund,
        degradation_eur_per_kwh=wear,
        v2g_share=v2g_share,
        headroom_quantile=quantile,
        console=console,
        workers=workers if workers > 0 else os.cpu_count() or 1,
    )


@app.command(name="simulate-chargers")
def simulate_chargers(
    url: Annotated[str, typer.Option(help="Central system, ws[s]://host:port/ocpp")] = (
        "ws://127.0.0.1:9000/ocpp"
    ),
    count: Annotated[int, typer.Option(help="Number of simulated charge points.")] = 20,
    secret: Annotated[
        str | None,
        typer.Option(
            envvar="VOLTPOOL_SIM_SECRET",
            help="Each charger's Basic-auth password is derived from this secret and its id "
            "(none: security profile 0, loopback only).",
        ),
    ] = None,
    max_power_kw: Annotated[float, typer.Option(help="Each charger's circuit limit.")] = 11.0,
    meter_interval_s: Annotated[float, typer.Option(help="MeterValues interval (s).")] = 60.0,
    duration_s: Annotated[
        float | None, typer.Option(help="Stop after this long (default: until interrupted).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run simulated OCPP 1.6-J charge points (each with a car plugged in) against a central
    system; prints what they sent and how long the answers took."""
    from simulators.chargepoints.fleet import derived_password, run_chargers

    _configure_logging(verbose)

    async def main() -> None:
        report = await run_chargers(
            url,
            count,
            password_for=None if secret is None else (lambda cid: derived_password(secret, cid)),
            max_power_kw=max_power_kw,
            meter_interval_s=meter_interval_s,
            duration_s=duration_s,
        )
        console.print(report)

    run_until_signalled(main())


app.command(name="fit")(forecast_cli.fit)
app.command(name="forecast")(forecast_cli.forecast)


def main() -> None:
    """Entry point of the `voltpool` console script."""
    app()


if __name__ == "__main__":
    main()
