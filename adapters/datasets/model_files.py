"""Versioned model files: JSON for the models, NPZ for the price history; never pickle.

A fit writes a version directory `forecast-<UTC time>-<first 12 hex of the data hash>/` with

- `manifest.json`: format name and schema version, the version id, when it was made, the SHA-256
  of every input data file and of all of them together (`data_sha256`), whether the household
  panel and charger logs were real files or built, the fit's metrics, and the SHA-256 of each
  model file;
- `households.json` (the tariff groups' GAMs and noise), `trips.json` (Gamma laws, time-of-day
  laws), `forecast.json` (defaults: households per group, price-source settings);
- `prices.npz`: the day-ahead price history (`start_s`, `step_s`, `price_eur_per_kwh`), read
  with `allow_pickle=False`;

and points `LATEST` in the output directory at it. `load_models(dir)` accepts a version
directory or the output directory (then it follows `LATEST`), and checks every hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from controller.errors import InvalidEvent, VoltpoolError
from controller.forecast.household import BaseLoadModel
from controller.forecast.models import ForecastModels
from controller.forecast.prices import DayAheadPriceSource, PriceHistory
from controller.forecast.trips import TripModel

FORMAT = "voltpool-forecast-models"
SCHEMA_VERSION = 1
LATEST = "LATEST"
MANIFEST = "manifest.json"


class ModelFileError(VoltpoolError, ValueError):
    """Model files that are missing, of another format or version, or do not match their hash."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_hash(files: Iterable[Path], root: Path) -> tuple[str, dict[str, str]]:
    """SHA-256 over the input files (path relative to `root` and content hash, sorted)."""
    hashes = {str(f.resolve().relative_to(root.resolve())): sha256_file(f) for f in files}
    digest = hashlib.sha256()
    for name in sorted(hashes):
        digest.update(f"{name}\0{hashes[name]}\n".encode())
    return digest.hexdigest(), hashes


def _write_json(path: Path, data: Mapping[str, Any]) -> str:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return sha256_file(path)


def save_models(
    models: ForecastModels,
    out_dir: Path,
    *,
    data_sha256: str,
    data_files: Mapping[str, str],
    inputs: Mapping[str, Any],
    metrics: Mapping[str, Any],
    created_at: datetime | None = None,
) -> Path:
    """Write a new version directory under `out_dir`, point `LATEST` at it, return it."""
    created = (created_at or datetime.now(UTC)).astimezone(UTC)
    version = f"forecast-{created:%Y%m%dT%H%M%SZ}-{data_sha256[:12]}"
    target = out_dir / version
    target.mkdir(parents=True, exist_ok=False)
    files = {
        "households.json": _write_json(target / "households.json", models.base_load.to_dict()),
        "trips.json": _write_json(target / "trips.json", models.trips.to_dict()),
        "forecast.json": _write_json(
            target / "forecast.json",
            {
                "households": dict(models.households),
                "prices": None if models.prices is None else models.prices.to_dict(),
            },
        ),
    }
    if models.prices is not None:
        history = models.prices.history
        np.savez(
            target / "prices.npz",
            start_s=np.int64(history.start_s),
            step_s=np.int64(history.step_s),
            price_eur_per_kwh=history.price_eur_per_kwh,
        )
        files["prices.npz"] = sha256_file(target / "prices.npz")
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "version": version,
        "created_at": created.isoformat(),
        "data_sha256": data_sha256,
        "data_files": dict(data_files),
        "inputs": dict(inputs),
        "metrics": dict(metrics),
        "files": files,
    }
    _write_json(target / MANIFEST, manifest)
    (out_dir / LATEST).write_text(version + "\n")
    return target


def read_manifest(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The version directory `directory` names (itself, or `LATEST`'s) and its manifest."""
    if not (directory / MANIFEST).is_file():
        pointer = directory / LATEST
        if not pointer.is_file():
            raise ModelFileError(f"{directory}: no {MANIFEST} and no {LATEST}; run `voltpool fit`")
        directory = directory / pointer.read_text().strip()
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: unreadable manifest: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ModelFileError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ModelFileError(
            f"{path}: schema version {manifest.get('schema_version')} is not {SCHEMA_VERSION}; "
            "refit with this voltpool"
        )
    for name, expected in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise ModelFileError(f"{file}: listed in the manifest but missing")
        if sha256_file(file) != expected:
            raise ModelFileError(f"{file}: content does not match the manifest's SHA-256")
    return directory, manifest


def load_models(directory: Path) -> ForecastModels:
    """The models in a version directory, or in the one `directory/LATEST` names.

    Raises:
        ModelFileError: for missing files, another format or schema, or a hash mismatch.
    """
    directory, manifest = read_manifest(directory)
    try:
        base = BaseLoadModel.from_dict(json.loads((directory / "households.json").read_text()))
        trips = TripModel.from_dict(json.loads((directory / "trips.json").read_text()))
        extra = json.loads((directory / "forecast.json").read_text())
        prices = None
        if "prices.npz" in manifest["files"]:
            with np.load(directory / "prices.npz", allow_pickle=False) as npz:
                history = PriceHistory(
                    start_s=int(npz["start_s"]),
                    step_s=int(npz["step_s"]),
                    price_eur_per_kwh=np.asarray(npz["price_eur_per_kwh"], dtype=float),
                )
            prices = DayAheadPriceSource.from_dict(history, extra["prices"])
    except (KeyError, TypeError, ValueError, InvalidEvent) as exc:
        raise ModelFileError(f"{directory}: model files are inconsistent: {exc}") from exc
    return ForecastModels(
        base_load=base,
        trips=trips,
        prices=prices,
        households={str(k): int(v) for k, v in extra["households"].items()},
        version=str(manifest["version"]),
    )
