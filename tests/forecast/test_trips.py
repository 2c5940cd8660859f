"""Trips: segmentation robust to gaps and repeats, Gamma recovery, the fleet's year of trips."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from adapters.datasets.chargers import (
    build_charger_logs,
    load_charger_logs,
    load_connection_times,
    logs_from_trips,
    write_charger_logs,
)
from adapters.datasets.errors import DataFileError
from adapters.datasets.fleet import load_seed_fleet
from adapters.datasets.tables import load_profile_table
from controller.forecast.fleet import FleetCar, fleet_cars, synthetic_fleet
from controller.forecast.trips import (
    POOLED,
    CarLog,
    GammaLaw,
    TripModel,
    daily_energy,
    fit_trip_model,
    next_day_needs,
    sessions_from_log,
    simulate_trip_year,
)

DATA = Path(__file__).resolve().parents[2] / "data"
ZONE = "Europe/Berlin"


def morning_evening_pmfs() -> tuple[np.ndarray, np.ndarray]:
    """Departures 06:00-09:00 and arrivals 16:00-20:00, working days and weekends alike."""
    departure = np.zeros((2, 96))
    departure[:, 24:36] = 1.0
    arrival = np.zeros((2, 96))
    arrival[:, 64:80] = 1.0
    return departure / 12.0, arrival / 16.0


# Known laws per weekday: shape, scale (km) and zero-day probability differ by day.
TRUE_LAWS = {
    w: GammaLaw(
        k=1.5 + 0.25 * w,
        theta_km=12.0 + 2.0 * (w % 3),
        p_zero=0.1 + 0.03 * w,
        driving_days=0,
        zero_days=0,
        source="truth",
    )
    for w in range(7)
}


def true_model() -> TripModel:
    """A trip model with the known laws for model 'TEST' (and as the pooled law)."""
    departure, arrival = morning_evening_pmfs()
    return TripModel(
        tz=ZONE,
        laws={("TEST", w): law for w, law in TRUE_LAWS.items()},
        pooled=TRUE_LAWS[0],
        departure_pmf=departure,
        arrival_pmf=arrival,
        measured_consumption={"TEST": 0.2},
    )


@pytest.fixture(scope="module")
def simulated_logs() -> list[CarLog]:
    """Two years of 15-minute logs of six cars living trips drawn from the known laws."""
    cars = [FleetCar(f"sim-{i}", "TEST", 0.2) for i in range(6)]
    trips = simulate_trip_year(true_model(), cars, date(2021, 1, 4), np.random.default_rng(8), 730)
    return logs_from_trips(trips, cars, charger_kw=11.0, tz=ZONE)


def test_gamma_laws_are_recovered_from_simulated_logs(simulated_logs: list[CarLog]) -> None:
    """Segmented and fitted back, every weekday's law is within the stated tolerance.

    About 500 driving days per weekday: k within 20 % (its sampling error is about 6 %), the
    mean k * theta within 8 %, the zero-day probability within 0.05.
    """
    sessions = [sessions_from_log(log) for log in simulated_logs]
    days = [
        daily_energy(s, log.model, log.consumption_kwh_per_km, ZONE)
        for s, log in zip(sessions, simulated_logs, strict=True)
    ]
    fitted = fit_trip_model(days, sessions, ZONE)
    for w, truth in TRUE_LAWS.items():
        law = fitted.law("TEST", w)
        assert law.source == "model"
        assert law.driving_days > 400
        assert law.k == pytest.approx(truth.k, rel=0.20)
        assert law.mean_km() == pytest.approx(truth.mean_km(), rel=0.08)
        assert law.p_zero == pytest.approx(truth.p_zero, abs=0.05)
    # Departure and arrival laws come back from the sessions, too.
    assert fitted.departure_pmf[0, 24:36].sum() > 0.95
    assert fitted.arrival_pmf[0, 64:80].sum() > 0.95


def corrupt(log: CarLog, rng: np.random.Generator) -> CarLog:
    """The log with 5 % of samples sent twice, shuffled, and 40 two-slot gaps in sessions."""
    n = log.times_s.shape[0]
    plugged = log.plugged
    assert plugged is not None
    inside = np.flatnonzero(plugged[1:-3] & plugged[4:]) + 2
    drop = rng.choice(inside, size=40, replace=False)
    keep = np.ones(n, dtype=bool)
    keep[drop] = False
    keep[drop + 1] = False
    idx = np.flatnonzero(keep)
    repeat = rng.choice(idx, size=n // 20, replace=False)
    order = rng.permutation(np.concatenate([idx, repeat]))
    return replace(
        log, times_s=log.times_s[order], energy_kwh=log.energy_kwh[order], plugged=plugged[order]
    )


def test_gaps_and_repeated_samples_do_not_change_the_sessions(simulated_logs: list[CarLog]) -> None:
    """Same sessions (times, count) after repeats and short gaps; energy only loses the gaps'."""
    log = simulated_logs[0]
    clean = sessions_from_log(log)
    broken = sessions_from_log(corrupt(log, np.random.default_rng(2)))
    assert broken.duplicates_dropped == log.times_s.shape[0] // 20
    assert [(s.plug_in_s, s.plug_out_s) for s in broken.sessions] == [
        (s.plug_in_s, s.plug_out_s) for s in clean.sessions
    ]
    lost = sum(
        a.energy_kwh - b.energy_kwh for a, b in zip(clean.sessions, broken.sessions, strict=True)
    )
    assert lost >= 0
    assert sum(s.gap_slots for s in broken.sessions) == 80
    assert broken.blind == ()


def test_a_long_gap_makes_its_days_unknown_not_zero(simulated_logs: list[CarLog]) -> None:
    """Three missing days are unknown (not days without driving); other days are unchanged."""
    log = simulated_logs[1]
    cut = (log.times_s >= log.times_s[0] + 100 * 86400) & (
        log.times_s < log.times_s[0] + 103 * 86400
    )
    holed = replace(
        log,
        times_s=log.times_s[~cut],
        energy_kwh=log.energy_kwh[~cut],
        plugged=log.plugged[~cut] if log.plugged is not None else None,
    )
    before = daily_energy(sessions_from_log(log), "TEST", 0.2, ZONE)
    after = daily_energy(sessions_from_log(holed), "TEST", 0.2, ZONE)
    assert np.array_equal(before.day, after.day)
    lost = before.known & ~after.known
    assert 3 <= lost.sum() <= 6
    assert not (after.known & ~before.known).any()
    same = after.known
    assert np.allclose(after.energy_kwh[same], before.energy_kwh[same])


def test_built_logs_round_trip_through_the_file_format(tmp_path: Path) -> None:
    """The ten built cars' logs are written and read back strictly, energies to 0.1 Wh."""
    fleet = load_seed_fleet(DATA / "fleet" / "seed_fleet.csv")
    logs = build_charger_logs(
        load_profile_table(DATA / "chargers" / "simbench_chargers_2016.csv.gz"),
        load_connection_times(DATA / "elaad" / "distribution-of-connection-time.csv"),
        fleet,
    )
    path = tmp_path / "logs.csv.gz"
    write_charger_logs(path, logs[:2])
    back = load_charger_logs(path, fleet)
    assert [b.car_id for b in back] == ["car-01", "car-02"]
    assert np.allclose(back[0].energy_kwh, logs[0].energy_kwh, atol=1e-4)
    original = logs[0].plugged
    assert original is not None
    assert back[0].plugged is not None
    assert np.array_equal(back[0].plugged, original)


LOG_HEADER = "timestamp,car_id,model,energy_kwh,plugged_in"


def write_log(tmp_path: Path, rows: list[str]) -> Path:
    """A small charger log."""
    path = tmp_path / "log.csv"
    path.write_text(LOG_HEADER + "\n" + "\n".join(rows) + "\n")
    return path


def test_a_strict_log_refuses_a_repeated_sample(tmp_path: Path) -> None:
    """By default a duplicate is refused, naming both lines."""
    path = write_log(
        tmp_path,
        [
            "2024-01-01T00:00:00Z,c1,BMW I13,0.0,1",
            "2024-01-01T00:15:00Z,c1,BMW I13,2.7,1",
            "2024-01-01T00:15:00Z,c1,BMW I13,2.7,1",
        ],
    )
    fleet = load_seed_fleet(DATA / "fleet" / "seed_fleet.csv")
    with pytest.raises(DataFileError, match=r"line 4, .*already on line 3"):
        load_charger_logs(path, fleet)


def test_a_lenient_log_drops_agreeing_repeats_and_keeps_gaps(tmp_path: Path) -> None:
    """strict=False: an agreeing repeat is dropped, a gap is passed on (not filled)."""
    path = write_log(
        tmp_path,
        [
            "2024-01-01T00:00:00Z,c1,BMW I13,0.0,1",
            "2024-01-01T00:15:00Z,c1,BMW I13,2.7,1",
            "2024-01-01T00:15:00Z,c1,BMW I13,2.7,1",
            "2024-01-01T01:00:00Z,c1,BMW I13,1.0,1",
        ],
    )
    fleet = load_seed_fleet(DATA / "fleet" / "seed_fleet.csv")
    (log,) = load_charger_logs(path, fleet, strict=False)
    assert log.times_s.shape == (3,)
    assert log.consumption_kwh_per_km == pytest.approx(0.161)


def test_a_lenient_log_still_refuses_disagreeing_repeats(tmp_path: Path) -> None:
    """Two different values for one car and time cannot both be true."""
    path = write_log(
        tmp_path,
        [
            "2024-01-01T00:00:00Z,c1,BMW I13,0.0,1",
            "2024-01-01T00:00:00Z,c1,BMW I13,0.5,1",
        ],
    )
    with pytest.raises(DataFileError, match=r"line 3, .*different value than line 2"):
        load_charger_logs(path, load_seed_fleet(DATA / "fleet" / "seed_fleet.csv"), strict=False)


def test_negative_charged_energy_is_refused(tmp_path: Path) -> None:
    """A log cannot charge negative energy; the cell is named."""
    path = write_log(
        tmp_path,
        ["2024-01-01T00:00:00Z,c1,BMW I13,0.0,1", "2024-01-01T00:15:00Z,c1,BMW I13,-1,1"],
    )
    with pytest.raises(DataFileError, match=r"line 3, column 'energy_kwh': .*negative energy"):
        load_charger_logs(path, load_seed_fleet(DATA / "fleet" / "seed_fleet.csv"))


def test_a_car_of_unknown_model_needs_its_consumption(tmp_path: Path) -> None:
    """Without the model in the fleet table, the file must give the consumption."""
    path = write_log(
        tmp_path,
        ["2024-01-01T00:00:00Z,c1,RENAULT ZOE,0.0,1", "2024-01-01T00:15:00Z,c1,RENAULT ZOE,1,1"],
    )
    with pytest.raises(DataFileError, match=r"line 2, column 'model': .*not in the fleet table"):
        load_charger_logs(path, load_seed_fleet(DATA / "fleet" / "seed_fleet.csv"))


def test_models_without_a_measured_car_use_the_pooled_laws(shipped_trip_model: TripModel) -> None:
    """ID.3, e-tron and ID.4 have no built car; thin cells fall back to the pooled weekday law."""
    for w in range(7):
        assert shipped_trip_model.law("AUDI E-TRON 55", w).source == "pooled weekday"
        assert shipped_trip_model.law("TESLA MODEL 3", w).source == "model"
        assert shipped_trip_model.laws[(POOLED, w)].driving_days > 300


def test_a_year_of_trips_covers_the_whole_fleet_with_plausible_energy(
    shipped_trip_model: TripModel,
) -> None:
    """278 cars x 365 days; daily energy per model is plausible and scales with consumption."""
    fleet = load_seed_fleet(DATA / "fleet" / "seed_fleet.csv")
    cars = fleet_cars(synthetic_fleet(fleet))
    year = simulate_trip_year(shipped_trip_model, cars, date(2025, 1, 1), np.random.default_rng(4))
    assert year.energy_kwh.shape == (278, 365)
    assert len(set(year.vehicle_ids)) == 278
    drove = year.departure_slot >= 0
    assert np.array_equal(drove, year.energy_kwh > 0)
    assert np.all(year.arrival_slot[drove] > year.departure_slot[drove])
    models = np.array([c.model for c in cars])
    for row in fleet:
        mean = year.energy_kwh[models == row.model].mean()
        assert 0.5 < mean < 30.0, row.model  # kWh per day, between a short errand and 150 km
    # Pooled-law models differ only by consumption: e-tron / ID.3 = 0.237 / 0.166.
    etron = year.energy_kwh[models == "AUDI E-TRON 55"].mean()
    id3 = year.energy_kwh[models == "VW ID.3 PRO 150 KW"].mean()
    assert etron / id3 == pytest.approx(0.237 / 0.166, rel=0.15)


def test_next_day_needs_are_k_theta_with_gamma_quantiles(shipped_trip_model: TripModel) -> None:
    """E~ = k * theta of the car's model and tomorrow's weekday, scaled by its consumption."""
    cars = [
        FleetCar("ev-001", "TESLA MODEL 3", 0.139),
        FleetCar("ev-270", "VW ID.4 PRO 150 KW", 0.177),
    ]
    tuesday = date(2025, 3, 4)
    needs = next_day_needs(shipped_trip_model, cars, tuesday)
    law = shipped_trip_model.law("TESLA MODEL 3", 1)
    assert needs.mean_kwh[0] == pytest.approx(law.k * law.theta_km * 0.139)
    pooled = shipped_trip_model.law("VW ID.4 PRO 150 KW", 1)
    assert needs.mean_kwh[1] == pytest.approx(pooled.k * pooled.theta_km * 0.177)
    assert np.all(np.diff(needs.quantile_kwh, axis=1) > 0)
    assert needs.p_zero[0] == pytest.approx(law.p_zero)


def test_a_trip_model_survives_its_json_form(shipped_trip_model: TripModel) -> None:
    """to_dict/from_dict gives the same laws and time-of-day distributions."""
    import json

    again = TripModel.from_dict(json.loads(json.dumps(shipped_trip_model.to_dict())))
    assert again.laws == shipped_trip_model.laws
    assert np.array_equal(again.arrival_pmf, shipped_trip_model.arrival_pmf)
