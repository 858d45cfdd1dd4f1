"""Geometry: the shipped IC86 file (Kaggle format, derived from GraphNeT's table) and load_geometry's checks."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from iceaggr_lib.data.errors import DataFormatError
from iceaggr_lib.data.geometry import default_geometry_path, load_geometry, string_index, write_geometry

REPO = Path(__file__).resolve().parents[1]
GRAPHNET_TABLE = Path("/work/shared/data/icecube86_geometry.parquet")


def test_shipped_ic86_geometry():
    path = default_geometry_path()
    assert path.is_file() and path.parent.name == "geometry"
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["sensor_id", "x", "y", "z"]
    xyz = load_geometry()
    assert xyz.shape == (5160, 3) and xyz.dtype == np.float64 and np.isfinite(xyz).all()
    strings = string_index(xyz)
    assert strings.max() + 1 == 86 and (np.bincount(strings) == 60).all()
    # modules hang top to bottom along each string, at most ~260 m apart (DeepCore's dust-layer gap), never overlapping
    dz = np.diff(xyz[:, 2].reshape(86, 60), axis=1)
    assert (dz < -5).all() and (dz > -260).all()
    assert np.abs(xyz[:, :2]).max() < 700 and np.abs(xyz[:, 2]).max() < 600


@pytest.mark.skipif(not GRAPHNET_TABLE.is_file(), reason="GraphNeT geometry table not on this machine")
def test_matches_graphnet_table_and_interpolates_missing_modules():
    table = pd.read_parquet(GRAPHNET_TABLE)
    in_ice = table[table["dom_type"] == 20]
    ids = ((in_ice["string"] - 1) * 60 + in_ice["dom_number"] - 1).to_numpy()
    xyz = load_geometry()
    np.testing.assert_allclose(xyz[ids], in_ice[["dom_x", "dom_y", "dom_z"]].to_numpy(), atol=0.006)
    missing = np.setdiff1d(np.arange(5160), ids)
    assert len(missing) == 77
    # each filled module sits where the spacing of its string section puts it: its vertical gaps to the
    # modules above and below equal a spacing seen on that string (17 m standard, 7 m / 10 m DeepCore)
    z = xyz[:, 2]
    for sid in missing:
        string_ids = np.arange(sid // 60 * 60, sid // 60 * 60 + 60)
        present = np.intersect1d(string_ids, ids)
        spacings = np.unique(np.round(-np.diff(z[present])[np.diff(present) == 1], 1))
        for nb in (sid - 1, sid + 1):
            if nb // 60 == sid // 60:  # the module above / below on the same string
                gap = abs(z[nb] - z[sid])
                assert np.min(np.abs(spacings - gap)) < 0.1, (sid, gap, spacings)


@pytest.mark.skipif(not GRAPHNET_TABLE.is_file(), reason="GraphNeT geometry table not on this machine")
def test_script_reproduces_the_shipped_file():
    spec = importlib.util.spec_from_file_location("make_geometry", REPO / "scripts" / "make_geometry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    derived, n_filled = module.derive(pd.read_parquet(GRAPHNET_TABLE))
    assert n_filled == 77
    np.testing.assert_allclose(derived[["x", "y", "z"]].to_numpy(), load_geometry(), atol=1e-9)


def test_demo_geometry_any_size_and_row_order(tmp_path):
    xyz = np.random.default_rng(0).uniform(-100, 100, (7, 3))
    path = write_geometry(tmp_path / "demo.csv", xyz)
    np.testing.assert_array_equal(load_geometry(path), xyz)
    frame = pd.read_csv(path).sample(frac=1.0, random_state=1)  # rows in any order: indexed by sensor_id
    frame.to_csv(path, index=False)
    np.testing.assert_array_equal(load_geometry(path), xyz)


@pytest.mark.parametrize("content, problem", [
    ("sensor_id,x,y\n0,1,2\n", r"lacks column\(s\) \['z'\]"),
    ("sensor_id,x,y,z\n0,a,2,3\n", "column 'x' has dtype"),
    ("sensor_id,x,y,z\n0,1,2,3\n2,1,2,3\n", "sensor_id must be exactly 0..1"),
    ("sensor_id,x,y,z\n0,1,2,3\n0,1,2,3\n", "sensor_id must be exactly 0..1"),
    ("sensor_id,x,y,z\n0,1,2,3\n1,1,nan,3\n", "sensor 1 has a non-finite position"),
    ("sensor_id,x,y,z\n", "no rows"),
])
def test_bad_geometry_files(tmp_path, content, problem):
    path = tmp_path / "sensor_geometry.csv"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=rf"sensor_geometry\.csv: .*{problem}"):
        load_geometry(path)


def test_missing_geometry_file(tmp_path):
    with pytest.raises(DataFormatError, match=r"nope\.csv: geometry file not found"):
        load_geometry(tmp_path / "nope.csv")
