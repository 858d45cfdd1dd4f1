"""KaggleDataset: the generated Kaggle layout read back, the test split, other geometries, and every bad-input error."""

import pickle
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from iceaggr_lib.collate import collate_events
from iceaggr_lib.data.errors import DataFormatError
from iceaggr_lib.data.geometry import write_geometry
from iceaggr_lib.data.kaggle import KaggleDataset
from iceaggr_lib.data.sample import generate_table, write_dataset

N_EVENTS, PER_FILE, SEED = 500, 200, 5
BATCH_FIELDS = ("pulse_features", "pulse_to_dom_idx", "dom_pulse_counts", "cu_seqlens", "dom_to_event_idx", "dom_ids",
                "dom_positions", "event_dom_counts", "event_pulse_counts", "event_ids", "targets")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("kaggle") / "sample", N_EVENTS, seed=SEED, events_per_file=PER_FILE)


@pytest.fixture(scope="module")
def table():
    return generate_table(N_EVENTS, seed=SEED)


def assert_same_batch(a, b):
    for name in BATCH_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.max_dom_pulses == b.max_dom_pulses


def test_reads_back_what_was_generated(data_dir, table):
    ds = KaggleDataset(data_dir)
    assert len(ds) == ds.n_events == N_EVENTS and ds.batch_ids == [1, 2, 3]
    assert ds.sensor_xyz.shape == (5160, 3)
    assert_same_batch(ds.batch(0, 50), table.batch(0, 50))
    # a range crossing two file boundaries (events 199|200 and 399|400)
    assert_same_batch(ds.batch(150, 300), table.batch(150, 450))
    seen = [b.event_ids for b in ds.iter_batches(64)]
    assert torch.equal(torch.cat(seen), torch.from_numpy(table.event_ids))
    assert sum(b.n_events for b in ds.iter_batches(64, max_events=130)) == 130
    with pytest.raises(IndexError):
        ds.batch(N_EVENTS - 5, 10)


def test_event_dicts_work_with_a_dataloader(data_dir, table):
    ds = KaggleDataset(data_dir)
    event = ds[203]
    assert set(event) == {"event_id", "sensor_id", "time", "charge", "auxiliary", "pos", "azimuth", "zenith"}
    assert event["pos"].shape == (len(event["sensor_id"]), 3)
    assert event["event_id"] == table.event_ids[203]
    assert ds[-1]["event_id"] == table.event_ids[-1]
    loader = torch.utils.data.DataLoader(ds, batch_size=40, collate_fn=collate_events)
    for k, batch in enumerate(loader):
        assert_same_batch(batch, ds.batch(40 * k, batch.n_events))
        if k == 5:
            break


def test_pickles_without_its_cache(data_dir):
    ds = KaggleDataset(data_dir)
    ds.batch(0, 10)
    clone = pickle.loads(pickle.dumps(ds))  # as DataLoader workers receive it
    assert len(pickle.dumps(ds)) < 200_000 and not clone._cache
    assert_same_batch(clone.batch(0, 10), ds.batch(0, 10))


def test_cache_and_streaming_tables(data_dir):
    ds = KaggleDataset(data_dir, cache_files=1)
    first = ds.table(1)
    assert ds.table(1) is first  # cached
    ds.table(2)
    assert list(ds._cache) == [2]  # bounded: the least recently used file left
    tables = list(ds.iter_tables(max_events=450))
    assert [p.name for p, _ in tables] == ["batch_1.parquet", "batch_2.parquet", "batch_3.parquet"]
    assert [t.n_events for _, t in tables] == [200, 200, 50]
    only = KaggleDataset(data_dir, batch_ids=[2])
    assert len(only) == 200 and only[0]["event_id"] == ds[200]["event_id"]


def test_test_split_has_no_targets(data_dir, tmp_path):
    root = tmp_path / "with_test"
    shutil.copytree(data_dir, root)
    (root / "train").rename(root / "test")
    meta = pd.read_parquet(root / "train_meta.parquet").drop(columns=["azimuth", "zenith"])
    meta.to_parquet(root / "test_meta.parquet", index=False)
    ds = KaggleDataset(root, split="test")
    assert ds.batch(10, 20).targets is None
    assert "azimuth" not in ds[0] and "zenith" not in ds[0]
    assert collate_events([ds[i] for i in range(3)]).targets is None


def test_other_geometry_sizes_come_from_the_csv(tmp_path):
    strings = np.stack(np.meshgrid(np.arange(4) * 60.0, np.arange(3) * 60.0), -1).reshape(-1, 2)  # 12 strings
    z = np.arange(20) * -15.0 + 150
    demo = np.column_stack([np.repeat(strings, len(z), 0), np.tile(z, len(strings))])  # 240 modules
    root = write_dataset(tmp_path / "demo", 60, seed=1, events_per_file=25, sensor_xyz=demo)
    ds = KaggleDataset(root)
    assert ds.sensor_xyz.shape == (240, 3)
    batch = ds.batch(0, 60)
    assert int(batch.dom_ids.max()) < 240
    np.testing.assert_allclose(batch.dom_positions.numpy(), demo[batch.dom_ids.numpy()], rtol=1e-6)
    assert_same_batch(batch, generate_table(60, seed=1, sensor_xyz=demo).batch(0, 60))


# ---- bad input: each error names the file and the problem -----------------------------------------------

@pytest.fixture()
def small(tmp_path_factory, data_dir):
    """A fresh writable copy of a one-file data set (50 events) to corrupt."""
    root = tmp_path_factory.mktemp("bad") / "data"
    write_dataset(root, 50, seed=2, events_per_file=50)
    return root


def rewrite(path, change):
    """Apply ``change`` to the parquet file's pandas frame (index kept as a column) and write it back."""
    frame = pq.read_table(path).to_pandas()
    if frame.index.name == "event_id":  # batch files carry event_id as the pandas index
        frame = frame.reset_index()
    frame = change(frame)
    # column by column from numpy, so that a NaN stays a NaN (pandas -> arrow would make it a null)
    pq.write_table(pa.table({c: pa.array(frame[c].to_numpy()) for c in frame.columns}), path)


def expect(root, pattern, **kwargs):
    with pytest.raises(DataFormatError, match=pattern):
        KaggleDataset(root, **kwargs).batch(0, 50)


def test_missing_files_and_dirs(small, tmp_path):
    expect(tmp_path / "nowhere", "data directory not found")
    expect(small, "split directory not found", split="test")
    (small / "sensor_geometry.csv").rename(small / "geometry.bak")
    expect(small, r"sensor_geometry\.csv: geometry file not found")
    (small / "geometry.bak").rename(small / "sensor_geometry.csv")
    expect(small, r"batch_7\.parquet: file not found", batch_ids=[7])
    (small / "train_meta.parquet").unlink()
    expect(small, r"train_meta\.parquet: file not found")
    (small / "train" / "batch_1.parquet").unlink()
    expect(small, "no batch_<N>.parquet files")


def test_missing_column(small):
    rewrite(small / "train" / "batch_1.parquet", lambda f: f.drop(columns=["charge"]))
    expect(small, r"batch_1\.parquet: missing column 'charge'")


def test_mistyped_column(small):
    rewrite(small / "train" / "batch_1.parquet", lambda f: f.assign(charge=f["charge"].astype(str)))
    expect(small, r"batch_1\.parquet: column 'charge' has type (large_)?string, expected floating")


def test_mistyped_meta_column(small):
    rewrite(small / "train_meta.parquet", lambda f: f.assign(first_pulse_index=f["first_pulse_index"].astype(float)))
    expect(small, r"train_meta\.parquet: column 'first_pulse_index' has type double, expected integer")


def test_null_values(small):
    path = small / "train" / "batch_1.parquet"
    table = pq.read_table(path)
    charge = table.column("charge").to_numpy()
    with_null = pa.array(charge, mask=np.arange(len(charge)) == 3)
    pq.write_table(table.set_column(table.schema.get_field_index("charge"), "charge", with_null), path)
    expect(small, r"batch_1\.parquet: column 'charge' has 1 null values")


def test_meta_range_outside_the_file(small):
    rewrite(small / "train_meta.parquet", lambda f: f.assign(last_pulse_index=f["last_pulse_index"] + (f.index == 49) * 10))
    expect(small, r"batch_1\.parquet: meta \(train_meta\.parquet\) gives event \d+ pulse rows \d+\.\.\d+, outside")


def test_meta_not_matching_the_file(small):
    rewrite(small / "train_meta.parquet", lambda f: f.assign(event_id=f["event_id"] + 1))
    expect(small, r"batch_1\.parquet: rows 0\.\.\d+ should hold event \d+ \(meta train_meta\.parquet\), but row 0 has event_id \d+")


def test_one_row_of_another_event_inside_a_range(small):
    def move_row(f):
        f.loc[5, "event_id"] = f.loc[5, "event_id"] + 1  # the 6th pulse claims to be in another event
        return f
    rewrite(small / "train" / "batch_1.parquet", move_row)
    expect(small, r"batch_1\.parquet: rows 0\.\.\d+ should hold event \d+ .*but row 5 has event_id \d+ \(1 mismatched row")


def test_non_finite_target(small):
    def poison(f):
        f.loc[3, "zenith"] = np.nan
        return f
    rewrite(small / "train_meta.parquet", poison)
    expect(small, r"train_meta\.parquet: event \d+ has a non-finite azimuth/zenith")


def test_event_without_pulses(small):
    def drop_first_event_pulses(f):
        f.loc[0, "last_pulse_index"] = f.loc[0, "first_pulse_index"] - 1
        return f
    rewrite(small / "train_meta.parquet", drop_first_event_pulses)
    expect(small, r"train_meta\.parquet: event \d+ \(batch 1\) has no pulses")


def test_sensor_not_in_geometry(small):
    write_geometry(small / "sensor_geometry.csv", np.zeros((100, 3)))
    expect(small, r"batch_1\.parquet: sensor_id \d+ \(event \d+\) is not in the geometry .*sensor_geometry\.csv \(ids 0\.\.99\)")


@pytest.mark.parametrize("column, value", [("time", np.nan), ("time", np.inf), ("charge", np.nan), ("charge", -np.inf)])
def test_non_finite_time_or_charge(small, column, value):
    def poison(f):
        f[column] = f[column].astype(float)
        f.loc[7, column] = value
        return f
    rewrite(small / "train" / "batch_1.parquet", poison)
    expect(small, rf"batch_1\.parquet: column '{column}' has 1 NaN/inf value\(s\), first in event \d+")
