"""The embedded sample: calibration against the real batch file, determinism, and the exact Kaggle file layout."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from iceaggr_lib import sample as sample_cli
from iceaggr_lib.data.sample import generate_pulses, generate_table, sample_statistics, write_dataset


@pytest.mark.slow
def test_calibrated_to_the_real_batch_file():
    """20,000 events land near kaggle_batch_statistics.md (targets from issue 2)."""
    s = sample_statistics(generate_table(20_000, seed=0))
    assert 63 * 0.8 <= s["pulses_per_event_median"] <= 63 * 1.2, s
    assert 49 * 0.8 <= s["doms_per_event_median"] <= 49 * 1.2, s
    assert s["pulses_per_dom_p50"] == 1 and s["pulses_per_dom_p75"] == 1, s
    assert 2 <= s["pulses_per_dom_p90"] <= 4, s
    assert 25 <= s["pulses_per_dom_p99"] <= 70, s
    assert 150 <= s["pulses_per_dom_max"] <= 600, s
    assert 0.72 <= s["one_pulse_dom_fraction"] <= 0.85, s
    assert 0.75 <= s["events_under_100_fraction"] <= 0.85, s  # real: 80.1 %
    assert 0.005 <= s["events_over_1k_fraction"] <= 0.02, s  # real: 1.1 %
    assert s["events_over_10k"] >= 1, s


def test_deterministic_for_a_seed():
    a, b, c = generate_pulses(300, seed=4), generate_pulses(300, seed=4), generate_pulses(300, seed=5)
    for name in ("event_ids", "event_pulse_counts", "sensor_id", "time", "charge", "auxiliary", "azimuth", "zenith"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not np.array_equal(a.event_pulse_counts, c.event_pulse_counts)


def test_pulses_are_physical():
    g = generate_pulses(400, seed=1)
    assert g.sensor_id.dtype == np.int16 and g.time.dtype == np.int64
    assert (g.event_pulse_counts >= 1).all() and g.event_pulse_counts.sum() == len(g.time)
    assert np.all(np.diff(g.event_ids) > 0)
    event = g.event_index
    assert np.all(np.diff(g.time)[np.diff(event) == 0] >= 0)  # time-ordered inside each event, as Kaggle's files
    assert (g.charge > 0).all() and np.allclose(g.charge / 0.025, np.rint(g.charge / 0.025))
    assert 0.02 < g.auxiliary.mean() < 0.9
    assert ((g.azimuth >= 0) & (g.azimuth < 2 * np.pi)).all() and ((g.zenith >= 0) & (g.zenith <= np.pi)).all()
    # light falls with distance: pulses concentrate on few modules, not spread uniformly like noise
    table = generate_table(400, seed=1)
    assert np.diff(table.dom_pulse_offsets).max() > 20
    dom_charge = np.add.reduceat(table.charge, table.dom_pulse_offsets[:-1])
    assert 0.5 < np.median(dom_charge) < 2.0 and dom_charge.max() < 3.1e4  # real: median 1 p.e., tail to ~3e4


def test_tiny_demo_detector():
    xyz = np.array([[x, y, z] for x in (0.0, 50.0) for y in (0.0, 50.0) for z in np.arange(10) * -20.0])  # 40 modules
    table = generate_table(50, seed=2, sensor_xyz=xyz)
    assert table.n_events == 50 and table.sensor_id.max() < 40


def test_write_dataset_is_the_kaggle_layout(tmp_path):
    root = write_dataset(tmp_path / "d", 120, seed=3, events_per_file=50)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["batch_1.parquet", "batch_2.parquet", "batch_3.parquet"]
    batch = pd.read_parquet(root / "train" / "batch_2.parquet")
    assert batch.index.name == "event_id"
    assert dict(batch.dtypes.astype(str)) == {"sensor_id": "int16", "time": "int64", "charge": "float64", "auxiliary": "bool"}
    meta = pd.read_parquet(root / "train_meta.parquet")
    assert list(meta.columns) == ["batch_id", "event_id", "first_pulse_index", "last_pulse_index", "azimuth", "zenith"]
    assert [str(t) for t in meta.dtypes] == ["int64"] * 4 + ["float64"] * 2
    m2 = meta[meta["batch_id"] == 2]
    assert m2["first_pulse_index"].iloc[0] == 0 and m2["last_pulse_index"].iloc[-1] == len(batch) - 1
    assert (m2["first_pulse_index"].to_numpy()[1:] == m2["last_pulse_index"].to_numpy()[:-1] + 1).all()
    for k in (0, 17, len(m2) - 1):  # inclusive ranges hold exactly that event's rows
        first, last, event_id = (int(m2[c].iloc[k]) for c in ("first_pulse_index", "last_pulse_index", "event_id"))
        rows = batch.iloc[first: last + 1]
        assert (rows.index == event_id).all() and (batch.index == event_id).sum() == len(rows)
    geometry = pd.read_csv(root / "sensor_geometry.csv")
    assert list(geometry.columns) == ["sensor_id", "x", "y", "z"] and len(geometry) == 5160
    assert pq.read_schema(root / "train" / "batch_1.parquet").field("sensor_id").type == "int16"


def test_command_line(tmp_path, capsys):
    sample_cli.main(["--out", str(tmp_path / "cli"), "--events", "30", "--seed", "9"])
    assert "wrote 30 events (seed 9)" in capsys.readouterr().out
    assert len(pd.read_parquet(tmp_path / "cli" / "train_meta.parquet")) == 30
