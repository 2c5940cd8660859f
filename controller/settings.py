"""One settings object, read once from the environment by the entry point and passed down."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class PlanningSettings(BaseModel):
    """What the planner assumes where the fleet state says nothing, and its tuning."""

    model_config = ConfigDict(frozen=True)

    horizon_slots: int = Field(default=96, ge=1, le=4 * 24 * 7)
    # Used only until the first head-room/price series arrives, or past their end.
    default_price_eur_per_kwh: float = Field(default=0.15)
    headroom_quantile: float = Field(default=0.95, gt=0.0, lt=1.0)
    degradation_eur_per_kwh: float = Field(default=0.05, ge=0.0)
    demand_charge_eur_per_kw: float = Field(default=0.0, ge=0.0)
    # Planned on top of each target: metering, the dispatch deadband and rounding of limits to
    # whole amperes all fall on the short side, and a car that misses its target by a few Wh
    # has still missed it.
    target_margin_kwh: float = Field(default=1.0, ge=0.0, le=10.0)
    # Cars without a departure are planned as leaving at this hour of the next morning (UTC).
    default_departure_hour_utc: int = Field(default=7, ge=0, le=23)
    # Plan the part of the slot a car leaves in (from half a slot; see docs/optimiser.md "The
    # slot a car leaves in"). Off: whole slots only, as before 2026-11-26 (on, the live day
    # left ev-20 short in 2 of 18 runs; not understood yet).
    partial_last_slot: bool = Field(default=False)
    # A head-room series older than this is not trusted: plan on the safe site limit instead.
    headroom_stale_s: float = Field(default=3600.0, gt=0.0)
    # A charger that dropped off runs its last lease this long (the dispatcher's lease window).
    offline_lease_s: float = Field(default=900.0, ge=0.0)
    # A measured site load this recent sets the current slot's head-room (capacity - load);
    # older, the slots until the next lease end are planned on the safe limit (P-03).
    site_load_fresh_s: float = Field(default=60.0, gt=0.0)
    # The composition root runs the optimiser in a worker process of its own (so its Python
    # work does not hold the interpreter lock the event loop needs) and gives a solve this long
    # (wall seconds, problem and schedule transfer included) before the worker is killed and
    # replaced and the plan falls back to the proportional share.
    solver_process: bool = Field(default=True)
    solve_deadline_s: float = Field(default=10.0, gt=0.0, le=300.0)
    # Added to the solver process's niceness: the controller answering chargers comes first.
    solver_nice: int = Field(default=10, ge=0, le=19)


class Settings(BaseSettings):
    """Everything voltpool reads from its environment (prefix `VOLTPOOL_`, nested with `__`)."""

    model_config = SettingsConfigDict(
        env_prefix="VOLTPOOL_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    site: str = Field(default="site-1", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    # None means "start the embedded server"; the names follow the usual conventions, unprefixed.
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    mqtt_url: str | None = Field(default=None, validation_alias="MQTT_URL")
    data_dir: str = Field(default="var")
    coalesce_window_s: float = Field(default=0.2, gt=0.0, le=60.0)
    max_event_ahead_s: float = Field(default=300.0, ge=0.0)
    site_capacity_kw: float = Field(default=1000.0, gt=0.0)
    mqtt_prefix: str = Field(default="voltpool", min_length=1)
    # The embedded MQTT broker (used without MQTT_URL), RELIABILITY.md SEC-07: anonymous only on
    # a loopback host; any other host needs a password file and TLS, or voltpool will not start.
    mqtt_host: str = Field(default="127.0.0.1")
    mqtt_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port
    # `user:argon2-hash` lines for the telemetry and operator principals (written by
    # `python -m adapters.security.mqtt_acl`); the controller's own password is made per run.
    mqtt_password_file: str | None = Field(default=None)
    # TLS of the embedded broker's listener (PEM chain and key); for an external `mqtts://`
    # broker, `mqtt_tls_ca` is the CA its certificate is checked against (None: system store).
    mqtt_tls_cert: str | None = Field(default=None)
    mqtt_tls_key: str | None = Field(default=None)
    mqtt_tls_ca: str | None = Field(default=None)
    # MQTT clean_session false: a broker that queues for offline clients (Mosquitto) delivers
    # what was published while the controller was away (M-09).
    mqtt_persistent_session: bool = Field(default=True)
    ocpp_host: str = Field(default="127.0.0.1")
    ocpp_port: int = Field(default=9000, ge=0, le=65535)
    # Basic auth per charge point (OCPP security profile 1); off only on a loopback address.
    ocpp_require_auth: bool = Field(default=True)
    ocpp_bcrypt_rounds: int = Field(default=12, ge=4, le=16)
    # TLS (security profile 2) when both are set: PEM certificate chain and private key.
    ocpp_tls_cert: str | None = Field(default=None)
    ocpp_tls_key: str | None = Field(default=None)
    # Dispatch: a charger's limit is re-sent only when it moves by more than this.
    deadband_kw: float = Field(default=0.5, ge=0.0)
    lease_window_s: int = Field(default=900, ge=60, le=86_400)
    http_port: int = Field(default=0, ge=0, le=65535)
    # Fault injection for crash tests: the name of a point at which the process kills itself.
    failpoint: str | None = Field(default=None)
    # Fitted forecast models (`voltpool fit --out-dir`): when set, head-room and prices come
    # from them, refreshed every slot; when not, from MQTT.
    models_dir: str | None = Field(default=None)
    # The process's cyclic garbage collector (docs/reliability.md, "Garbage collector"): after
    # start-up everything then alive is moved out of its reach (`gc.freeze`), and it runs at
    # these thresholds (Python's own are 700, 10, 10). Null keeps Python's thresholds.
    gc_freeze: bool = Field(default=True)
    gc_thresholds: tuple[int, int, int] | None = Field(default=(50_000, 20, 100))
    # glibc malloc, set at start-up (`adapters.memory.tune_malloc`; docs/reliability.md,
    # "The RSS growth, 2026-11-27"): the most arenas threads spread over, and the size (KiB)
    # from which a chunk is mapped on its own and given back when freed (fixed: glibc no
    # longer raises it, so copies of the fleet's larger tables do not stay in an arena).
    # 0 leaves glibc's own (8 arenas per core; 128 KiB, raised as mapped chunks are freed).
    malloc_arena_max: int = Field(default=2, ge=0, le=1024)
    malloc_mmap_threshold_kib: int = Field(default=64, ge=0, le=32 * 1024)
    # The event loop `voltpool run` runs on (docs/reliability.md, "The event loop and the Redis
    # parser"): the standard library's asyncio loop, or uvloop (libuv: less CPU per message,
    # but the 1,000-charger soak's round trips were longer on it; not the default).
    event_loop: Literal["uvloop", "asyncio"] = Field(default="asyncio")
    planning: PlanningSettings = Field(default_factory=PlanningSettings)

    @field_validator("gc_thresholds")
    @classmethod
    def _positive_thresholds(
        cls, value: tuple[int, int, int] | None
    ) -> tuple[int, int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError("every garbage-collector threshold must be at least 1")
        return value
