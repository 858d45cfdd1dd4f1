"""Detector geometry in the Kaggle format: ``sensor_geometry.csv`` with columns ``sensor_id,x,y,z``.

The geometry is an (n_sensors, 3) float64 array of module positions in metres, indexed by sensor id,
so ``xyz[sensor_id]`` gathers the positions of pulses. Its size comes from the file: nothing in the
library assumes IceCube-86's 5160 modules, so an Upgrade, Gen2 or toy detector works the same way.

The IceCube-86 geometry ships with the package (``default_geometry_path()``); it is derived from
GraphNeT's geometry table by ``scripts/make_geometry.py`` (credit: the GraphNeT project).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from iceaggr_lib.data.errors import DataFormatError

GEOMETRY_COLUMNS = ("sensor_id", "x", "y", "z")
GEOMETRY_DIR = Path(__file__).resolve().parent / "geometry"
IC86_GEOMETRY_FILE = "icecube86_sensor_geometry.csv"


def default_geometry_path() -> Path:
    """The shipped IceCube-86 geometry (5160 in-ice modules, Kaggle numbering)."""
    return GEOMETRY_DIR / IC86_GEOMETRY_FILE


def load_geometry(path: str | Path | None = None) -> np.ndarray:
    """Read a ``sensor_id,x,y,z`` csv into an (n_sensors, 3) float64 array indexed by sensor id.

    Sensor ids must be exactly 0..n-1 (in any row order) and positions finite; anything else is a
    ``DataFormatError`` naming the file.
    """
    path = Path(default_geometry_path() if path is None else path)
    if not path.is_file():
        raise DataFormatError(f"{path}: geometry file not found (expected a csv with columns sensor_id,x,y,z)")
    try:
        frame = pd.read_csv(path)
    except Exception as err:  # an unreadable csv is a format problem of that file
        raise DataFormatError(f"{path}: cannot read the geometry csv: {err}") from err
    missing = [c for c in GEOMETRY_COLUMNS if c not in frame.columns]
    if missing:
        raise DataFormatError(f"{path}: geometry csv lacks column(s) {missing}; has {list(frame.columns)}")
    if len(frame) == 0:
        raise DataFormatError(f"{path}: geometry csv has no rows")
    for column in GEOMETRY_COLUMNS:
        kind = frame[column].dtype.kind
        if (column == "sensor_id" and kind not in "iu") or (column != "sensor_id" and kind not in "iuf"):
            raise DataFormatError(f"{path}: geometry column {column!r} has dtype {frame[column].dtype}, "
                                  f"expected {'integers' if column == 'sensor_id' else 'numbers'}")
    sensor_id = frame["sensor_id"].to_numpy(np.int64)
    n = len(frame)
    if sensor_id.min() != 0 or sensor_id.max() != n - 1 or len(np.unique(sensor_id)) != n:
        raise DataFormatError(f"{path}: sensor_id must be exactly 0..{n - 1} once each "
                              f"(found min {sensor_id.min()}, max {sensor_id.max()}, "
                              f"{n - len(np.unique(sensor_id))} duplicates)")
    xyz = np.empty((n, 3), dtype=np.float64)
    xyz[sensor_id] = frame[["x", "y", "z"]].to_numpy(np.float64)
    if not np.isfinite(xyz).all():
        bad = int(np.flatnonzero(~np.isfinite(xyz).all(axis=1))[0])
        raise DataFormatError(f"{path}: sensor {bad} has a non-finite position {xyz[bad].tolist()}")
    return xyz


def write_geometry(path: str | Path, sensor_xyz: np.ndarray) -> Path:
    """Write an (n, 3) geometry as the Kaggle ``sensor_id,x,y,z`` csv."""
    path = Path(path)
    xyz = np.asarray(sensor_xyz, dtype=np.float64)
    frame = pd.DataFrame({"sensor_id": np.arange(len(xyz)), "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]})
    frame.to_csv(path, index=False)  # full float precision: a round trip gives the same array
    return path


def string_index(sensor_xyz: np.ndarray, tolerance_m: float = 5.0) -> np.ndarray:
    """A string number per sensor: consecutive sensor ids within ``tolerance_m`` horizontally share a string.

    Works for any detector whose strings hang (nearly) vertically and number their modules
    consecutively, as the Kaggle numbering does (IceCube, Upgrade, Gen2, toys); the sample generator
    uses it to find a module's neighbours on its string.
    """
    xy = np.asarray(sensor_xyz, dtype=np.float64)[:, :2]
    new_string = np.ones(len(xy), dtype=bool)
    new_string[1:] = np.hypot(*(xy[1:] - xy[:-1]).T) > tolerance_m
    return np.cumsum(new_string) - 1
