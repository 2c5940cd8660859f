"""Loaders on the shipped real data, and every refusal naming its line and column."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from adapters.datasets.chargers import load_charger_logs
from adapters.datasets.errors import DataFileError
from adapters.datasets.fleet import load_seed_fleet
from adapters.datasets.households import load_household_panel, write_household_panel
from adapters.datasets.panel import HouseholdSources, PanelSpec, panel_sample
from adapters.datasets.tables import load_day_ahead_prices, load_profile_table
from controller.forecast.fleet import synthetic_fleet
from controller.forecast.household import HouseholdPanel

DATA = Path(__file__).resolve().parents[2] / "data"


def write(tmp_path: Path, text: str, name: str = "file.csv") -> Path:
    """A small CSV file with `text` (leading spaces of each line removed)."""
    path = tmp_path / name
    path.write_text("\n".join(line.strip() for line in text.strip().splitlines()) + "\n")
    return path


def test_shipped_prices_are_hourly_utc_and_complete() -> None:
    """The cleaned NL day-ahead file loads as 87,840 regular hours from 2015 on, in EUR/kWh."""
    prices = load_day_ahead_prices(DATA / "prices" / "nl_dayahead_2015_2024.csv.gz")
    assert prices.step_s == 3600
    assert prices.start_s == 1420070400  # 2015-01-01T00:00Z
    assert prices.price_eur_per_kwh.shape == (87_840,)
    # DATA.md measured the source's range as -500 to 873 EUR/MWh.
    assert prices.price_eur_per_kwh.min() == pytest.approx(-0.5)
    assert prices.price_eur_per_kwh.max() == pytest.approx(0.873, abs=1e-3)


def test_shipped_household_profiles_are_regular_quarter_hours() -> None:
    """The SimBench extract is a leap year of quarter-hours with five peak-1 profiles."""
    table = load_profile_table(DATA / "households" / "simbench_h0_2016.csv.gz")
    assert table.names == ("H0-A", "H0-B", "H0-C", "H0-G", "H0-L")
    assert table.step_s == 900
    assert table.values.shape == (5, 366 * 96)
    assert np.allclose(table.values.max(axis=1), 1.0)


def test_prices_with_a_missing_hour_are_refused_naming_the_line(tmp_path: Path) -> None:
    """A gap is an error naming the record after it, never a silent NaN."""
    path = write(
        tmp_path,
        """timestamp,price_eur_per_mwh
        2024-01-01T00:00:00Z,50
        2024-01-01T01:00:00Z,51
        2024-01-01T03:00:00Z,52
        2024-01-01T04:00:00Z,53""",
    )
    with pytest.raises(DataFileError, match=r"line 4, column 'timestamp': 1 interval\(s\) missing"):
        load_day_ahead_prices(path)


def test_a_repeated_time_is_refused_naming_both_lines(tmp_path: Path) -> None:
    """A duplicate sample names its line and the line it repeats."""
    path = write(
        tmp_path,
        """timestamp,price_eur_per_mwh
        2024-01-01T00:00:00Z,50
        2024-01-01T01:00:00Z,51
        2024-01-01T01:00:00Z,51
        2024-01-01T02:00:00Z,53""",
    )
    with pytest.raises(DataFileError, match=r"line 4, .*already on line 3") as info:
        load_day_ahead_prices(path)
    assert info.value.line == 4
    assert info.value.column == "timestamp"


def test_an_empty_price_is_refused_not_read_as_nan(tmp_path: Path) -> None:
    """An empty cell is a missing value and is refused where it is."""
    path = write(
        tmp_path,
        """timestamp,price_eur_per_kwh
        2024-01-01T00:00:00Z,0.05
        2024-01-01T01:00:00Z,
        2024-01-01T02:00:00Z,0.05""",
    )
    with pytest.raises(DataFileError, match=r"line 3, column 'price_eur_per_kwh': price is empty"):
        load_day_ahead_prices(path)


def test_times_without_offset_are_refused(tmp_path: Path) -> None:
    """A naive time could be any zone: the loader asks for the offset."""
    path = write(
        tmp_path,
        """timestamp,price_eur_per_mwh
        2024-01-01 00:00,50
        2024-01-01 01:00,51""",
    )
    with pytest.raises(DataFileError, match=r"line 2, column 'timestamp': .* has no UTC offset"):
        load_day_ahead_prices(path)


def test_a_local_time_skipped_by_daylight_saving_is_refused(tmp_path: Path) -> None:
    """On the spring DST day 02:30 does not exist in Berlin; the line is named."""
    path = write(
        tmp_path,
        """timestamp,H0
        2016-03-27T01:30:00,0.1
        2016-03-27T02:30:00,0.1
        2016-03-27T03:30:00,0.1""",
    )
    with pytest.raises(DataFileError, match=r"line 3, .* does not exist .* daylight-saving day"):
        load_profile_table(path, local_tz="Europe/Berlin")


def test_a_local_time_repeated_by_daylight_saving_is_refused(tmp_path: Path) -> None:
    """On the autumn DST day 02:15 happens twice in Berlin; the line is named."""
    path = write(
        tmp_path,
        """timestamp,H0
        2016-10-30T01:45:00,0.1
        2016-10-30T02:15:00,0.1""",
    )
    with pytest.raises(DataFileError, match=r"line 3, .* happens twice .* daylight-saving day"):
        load_profile_table(path, local_tz="Europe/Berlin")


def test_local_times_on_ordinary_days_are_accepted_with_their_zone(tmp_path: Path) -> None:
    """With a named zone, local times convert to UTC (Berlin is UTC+1 in January)."""
    path = write(
        tmp_path,
        """timestamp,H0
        2016-01-04T00:00:00,0.1
        2016-01-04T00:15:00,0.2""",
    )
    table = load_profile_table(path, local_tz="Europe/Berlin")
    assert table.times_s[0] == 1451862000  # 2016-01-03T23:00Z
    assert table.step_s == 900


def test_negative_values_in_a_profile_are_refused(tmp_path: Path) -> None:
    """Loads cannot be negative; the cell is named."""
    path = write(
        tmp_path,
        """timestamp,a,b
        2016-01-04T00:00:00Z,0.1,0.2
        2016-01-04T00:15:00Z,0.1,-0.2""",
    )
    with pytest.raises(DataFileError, match=r"line 3, column 'b': b -0.2 is below 0"):
        load_profile_table(path)


def panel_text(rows: list[str]) -> str:
    """A household panel CSV with the given records."""
    return "timestamp,household_id,tariff,energy_kwh\n" + "\n".join(rows)


def test_a_panel_round_trips_through_its_file_format(tmp_path: Path) -> None:
    """What `write_household_panel` writes, `load_household_panel` reads back (to 0.1 Wh)."""
    rng = np.random.default_rng(7)
    times = 1451862000 + 900 * np.arange(8, dtype=np.int64)
    panel = HouseholdPanel(
        household_ids=("a", "b", "c"),
        tariffs=("fixed", "market", "fixed"),
        times_s=times,
        step_s=900,
        load_kw=rng.uniform(0.0, 2.0, size=(3, 8)),
    )
    path = tmp_path / "panel.csv.gz"
    write_household_panel(path, panel)
    back = load_household_panel(path)
    assert back.household_ids == panel.household_ids
    assert back.tariffs == panel.tariffs
    assert np.array_equal(back.times_s, times)
    assert np.allclose(back.load_kw, panel.load_kw, atol=4 * 0.00005 + 1e-12)


def test_negative_household_energy_is_refused(tmp_path: Path) -> None:
    """A negative meter reading is refused with its line and column."""
    path = tmp_path / "p.csv"
    path.write_text(
        panel_text(
            [
                "2016-01-04T00:00:00Z,a,fixed,0.1",
                "2016-01-04T00:00:00Z,b,fixed,0.1",
                "2016-01-04T00:15:00Z,a,fixed,-0.05",
                "2016-01-04T00:15:00Z,b,fixed,0.1",
            ]
        )
    )
    with pytest.raises(DataFileError, match=r"line 4, column 'energy_kwh': .*negative energy"):
        load_household_panel(path)


def test_a_gap_in_one_household_is_refused_naming_it(tmp_path: Path) -> None:
    """One household missing an interval is named, with the line after the gap."""
    path = tmp_path / "p.csv"
    path.write_text(
        panel_text(
            [
                "2016-01-04T00:00:00Z,a,fixed,0.1",
                "2016-01-04T00:00:00Z,b,market,0.1",
                "2016-01-04T00:15:00Z,a,fixed,0.1",
                "2016-01-04T00:30:00Z,a,fixed,0.1",
                "2016-01-04T00:30:00Z,b,market,0.1",
            ]
        )
    )
    with pytest.raises(DataFileError, match=r"line 6, .*household 'b': 1 interval\(s\) missing"):
        load_household_panel(path)


def test_a_household_changing_tariff_is_refused(tmp_path: Path) -> None:
    """A household's tariff label must not change within the file."""
    path = tmp_path / "p.csv"
    path.write_text(
        panel_text(
            [
                "2016-01-04T00:00:00Z,a,fixed,0.1",
                "2016-01-04T00:15:00Z,a,market,0.1",
            ]
        )
    )
    with pytest.raises(DataFileError, match=r"line 3, column 'tariff': .*changes tariff"):
        load_household_panel(path)


def test_an_unknown_tariff_is_refused(tmp_path: Path) -> None:
    """Tariffs are 'fixed' or 'market'."""
    path = tmp_path / "p.csv"
    path.write_text(panel_text(["2016-01-04T00:00:00Z,a,dynamic,0.1"]))
    with pytest.raises(DataFileError, match=r"line 2, column 'tariff': tariff 'dynamic'"):
        load_household_panel(path)


def test_a_panel_without_a_load_column_is_refused(tmp_path: Path) -> None:
    """The header must name energy or power."""
    path = write(tmp_path, "timestamp,household_id,tariff,kwh\n2016-01-04T00:00:00Z,a,fixed,1")
    with pytest.raises(DataFileError, match=r"line 1: needs an 'energy_kwh' or a 'power_kw'"):
        load_household_panel(path)


def test_the_seed_fleet_table_has_278_cars_in_ten_models() -> None:
    """The table loads as the seed gives it, swapped-looking Leaf rows included."""
    rows = load_seed_fleet(DATA / "fleet" / "seed_fleet.csv")
    assert len(rows) == 10
    assert sum(r.vehicles for r in rows) == 278
    leaf40 = next(r for r in rows if r.model == "NISSAN LEAF 40KWH")
    assert leaf40.battery_kwh == 95.0
    assert rows[0].consumption_kwh_per_km == pytest.approx(0.139)


def test_a_fleet_table_with_a_fractional_car_count_is_refused(tmp_path: Path) -> None:
    """Vehicle counts are whole numbers."""
    text = (DATA / "fleet" / "seed_fleet.csv").read_text().replace(",64\n", ",64.5\n")
    path = tmp_path / "fleet.csv"
    path.write_text(text)
    with pytest.raises(
        DataFileError, match=r"line 2, column 'vehicles': vehicles 64.5 is not a whole"
    ):
        load_seed_fleet(path)


def test_the_synthetic_fleet_has_1_mw_of_chargers() -> None:
    """278 cars, ids ev-001..ev-278 in table order, chargers adding up to 1 MW."""
    vehicles = synthetic_fleet(load_seed_fleet(DATA / "fleet" / "seed_fleet.csv"))
    assert len(vehicles) == 278
    assert vehicles[0].vehicle_id == "ev-001"
    assert vehicles[-1].vehicle_id == "ev-278"
    assert len({v.vehicle_id for v in vehicles}) == 278
    assert sum(v.max_charge_kw for v in vehicles) == pytest.approx(1000.0)
    model_3 = [v for v in vehicles if v.model == "TESLA MODEL 3"]
    assert len(model_3) == 64
    assert {v.capacity_kwh for v in model_3} == {57.5}
    assert vehicles[-1].model == "VW ID.4 PRO 150 KW"
    assert vehicles[-1].consumption_kwh_per_km == pytest.approx(0.177)


def test_the_shipped_sample_panel_is_the_built_panel_in_the_file_format(
    household_sources: HouseholdSources,
) -> None:
    """data/samples: 12 households of the panel `voltpool fit` builds, two weeks, read strictly."""
    panel = load_household_panel(DATA / "samples" / "household_panel_sample.csv.gz")
    assert len(panel.household_ids) == 12
    assert panel.load_kw.shape == (12, 14 * 96)
    again = panel_sample(household_sources, replace(PanelSpec(), first_day=3, days=14), range(12))
    assert panel.tariffs == again.tariffs
    assert np.allclose(panel.load_kw, again.load_kw, atol=4 * 0.00005 + 1e-12)


def test_the_shipped_sample_charger_logs_load_strictly() -> None:
    """data/samples: three built cars, two weeks, with plug state and consumption."""
    logs = load_charger_logs(DATA / "samples" / "charger_logs_sample.csv.gz")
    assert [log.car_id for log in logs] == ["car-01", "car-02", "car-03"]
    assert all(log.plugged is not None and log.times_s.shape == (14 * 96,) for log in logs)
    assert logs[0].consumption_kwh_per_km == pytest.approx(0.139)
