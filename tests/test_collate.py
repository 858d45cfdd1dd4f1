"""The collate against an independent per-event pandas groupby, plus the edge cases of the packed layout."""

import numpy as np
import pandas as pd
import pytest
import torch

from iceaggr_lib.collate import (MIN_CHARGE_PE, POSITION_SCALE_M, TIME_OFFSET_NS, TIME_SCALE_NS, PulseTable,
                                 _sort_order, collate_events, concat_batches)
from iceaggr_lib.data.geometry import load_geometry
from iceaggr_lib.data.sample import generate_pulses

XYZ = load_geometry()


@pytest.fixture(scope="module")
def raw():
    """300 generated events as one pulse frame in the Kaggle file order."""
    g = generate_pulses(300, seed=11, sensor_xyz=XYZ)
    frame = pd.DataFrame({"event": g.event_index, "sensor_id": g.sensor_id.astype(np.int64), "time": g.time.astype(float),
                          "charge": g.charge, "auxiliary": g.auxiliary})
    return g, frame


def reference(frame: pd.DataFrame, event_ids, targets=None) -> dict:
    """The packed layout built the slow, obvious way: one pandas groupby per event."""
    features, dom_ids, dom_counts, dom_event, event_dom_counts, event_pulse_counts = [], [], [], [], [], []
    for k, (_, ev) in enumerate(frame.groupby("event", sort=True)):
        ev = ev.sort_values(["sensor_id", "time"], kind="mergesort")
        sizes = ev.groupby("sensor_id", sort=True).size()
        dom_ids += sizes.index.tolist()
        dom_counts += sizes.tolist()
        dom_event += [k] * len(sizes)
        event_dom_counts.append(len(sizes))
        event_pulse_counts.append(len(ev))
        pos = XYZ[ev["sensor_id"].to_numpy()]
        features.append(np.column_stack([pos / POSITION_SCALE_M, (ev["time"].to_numpy() - TIME_OFFSET_NS) / TIME_SCALE_NS,
                                         np.log10(np.maximum(ev["charge"].to_numpy(), MIN_CHARGE_PE)),
                                         ev["auxiliary"].to_numpy().astype(float)]))
    counts = np.array(dom_counts)
    return dict(features=np.concatenate(features), dom_ids=np.array(dom_ids), counts=counts,
                cu=np.concatenate([[0], np.cumsum(counts)]), dom_event=np.array(dom_event),
                pulse_to_dom=np.repeat(np.arange(len(counts)), counts), event_dom_counts=np.array(event_dom_counts),
                event_pulse_counts=np.array(event_pulse_counts), positions=XYZ[np.array(dom_ids)],
                event_ids=np.asarray(event_ids), targets=targets)


def check_against(batch, ref):
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == ref["cu"].tolist()
    assert batch.dom_pulse_counts.tolist() == ref["counts"].tolist()
    assert batch.max_dom_pulses == ref["counts"].max()
    assert batch.pulse_to_dom_idx.tolist() == ref["pulse_to_dom"].tolist()
    assert batch.dom_ids.tolist() == ref["dom_ids"].tolist()
    assert batch.dom_to_event_idx.tolist() == ref["dom_event"].tolist()
    assert batch.event_dom_counts.tolist() == ref["event_dom_counts"].tolist()
    assert batch.event_pulse_counts.tolist() == ref["event_pulse_counts"].tolist()
    assert batch.event_ids.tolist() == ref["event_ids"].tolist()
    np.testing.assert_allclose(batch.dom_positions.numpy(), ref["positions"], rtol=1e-6, atol=1e-4)
    assert batch.pulse_features.dtype == torch.float32
    np.testing.assert_allclose(batch.pulse_features.numpy(), ref["features"], rtol=1e-5, atol=1e-6)
    if ref["targets"] is None:
        assert batch.targets is None
    else:
        np.testing.assert_allclose(batch.targets.numpy(), ref["targets"], rtol=1e-6)
    assert batch.n_pulses == int(ref["cu"][-1]) and batch.n_doms == len(ref["counts"])


def events_from_frame(frame, g, event_slice):
    out = []
    for e in range(event_slice.start, event_slice.stop):
        ev = frame[frame["event"] == e]
        out.append(dict(event_id=int(g.event_ids[e]), sensor_id=ev["sensor_id"].to_numpy(), time=ev["time"].to_numpy(),
                        charge=ev["charge"].to_numpy(), auxiliary=ev["auxiliary"].to_numpy(),
                        azimuth=g.azimuth[e], zenith=g.zenith[e]))
    return out


def test_table_batch_matches_pandas_groupby(raw):
    g, frame = raw
    table = PulseTable.from_pulses(g.event_index, g.event_ids, g.sensor_id, g.time, g.charge, g.auxiliary, XYZ,
                                   targets=np.stack([g.azimuth, g.zenith], 1))
    e0, e1 = 37, 251  # a slice in the middle: offsets must be rebased
    sub = frame[(frame["event"] >= e0) & (frame["event"] < e1)]
    ref = reference(sub, g.event_ids[e0:e1], np.stack([g.azimuth, g.zenith], 1)[e0:e1])
    check_against(table.batch(e0, e1), ref)


def test_collate_events_from_shuffled_pulses_matches_pandas_groupby(raw):
    g, frame = raw
    shuffled = frame.sample(frac=1.0, random_state=3)  # unsorted times, sensors interleaved
    events = events_from_frame(shuffled, g, slice(0, 120))
    assert any(np.any(np.diff(e["time"]) < 0) for e in events)
    # the reference sorts the shuffled rows stably, so pulses tied in (event, sensor, time) keep the same order
    ref = reference(shuffled[shuffled["event"] < 120], g.event_ids[:120], np.stack([g.azimuth, g.zenith], 1)[:120])
    check_against(collate_events(events, sensor_xyz=XYZ), ref)
    # positions given per pulse instead of a geometry
    for e in events:
        e["pos"] = XYZ[e["sensor_id"]]
    check_against(collate_events(events), ref)


def test_sort_paths_agree(raw):
    """Already sorted, Kaggle order and arbitrary order all give the same table."""
    g, frame = raw
    kaggle = PulseTable.from_pulses(g.event_index, g.event_ids, g.sensor_id, g.time, g.charge, g.auxiliary, XYZ)
    assert _sort_order(g.event_index, g.sensor_id.astype(np.int64), g.time.astype(float), len(XYZ)) is not None
    sorted_event_index = np.repeat(np.arange(kaggle.n_events), np.diff(kaggle.event_pulse_offsets))
    assert _sort_order(sorted_event_index, kaggle.sensor_id, kaggle.time, len(XYZ)) is None
    again = PulseTable.from_pulses(sorted_event_index, kaggle.event_ids, kaggle.sensor_id, kaggle.time, kaggle.charge,
                                   kaggle.auxiliary, XYZ)
    perm = np.random.default_rng(0).permutation(len(g.time))
    shuffled = PulseTable.from_pulses(g.event_index[perm], g.event_ids, g.sensor_id[perm], g.time[perm],
                                      g.charge[perm], g.auxiliary[perm], XYZ)
    for other in (again, shuffled):
        for name in ("event_pulse_offsets", "event_dom_offsets", "dom_pulse_offsets", "dom_sensor_ids", "sensor_id",
                     "time"):
            assert np.array_equal(getattr(kaggle, name), getattr(other, name)), name
        # pulses tied in (event, sensor, time) may come in either order: compare rows in a canonical order
        assert np.array_equal(canonical_rows(kaggle), canonical_rows(other))


def canonical_rows(table):
    table.precompute()
    f = table.pulse_features
    dom = np.repeat(np.arange(table.n_doms), np.diff(table.dom_pulse_offsets))
    return f[np.lexsort((f[:, 5], f[:, 4], f[:, 3], dom))]


def one_event(sensors, times, event_id=0):
    sensors = np.asarray(sensors)
    return dict(event_id=event_id, sensor_id=sensors, time=np.asarray(times, dtype=float),
                charge=np.full(len(sensors), 1.0), auxiliary=np.zeros(len(sensors), bool))


def test_all_one_pulse_doms():
    events = [one_event(np.random.default_rng(e).choice(5160, 40, replace=False), np.arange(40), e) for e in range(5)]
    b = collate_events(events, sensor_xyz=XYZ)
    assert b.n_doms == b.n_pulses == 200 and b.max_dom_pulses == 1
    assert b.cu_seqlens.tolist() == list(range(201))
    assert b.pulse_to_dom_idx.tolist() == list(range(200))
    assert b.event_dom_counts.tolist() == [40] * 5


def test_one_455_pulse_dom():
    times = np.random.default_rng(1).uniform(9000, 20000, 455)  # unsorted
    b = collate_events([one_event(np.full(455, 4321), times, event_id=77)], sensor_xyz=XYZ)
    assert b.n_doms == 1 and b.max_dom_pulses == 455
    assert b.cu_seqlens.tolist() == [0, 455] and b.dom_ids.tolist() == [4321]
    t = b.pulse_features[:, 3].double().numpy()
    assert np.all(np.diff(t) >= 0)
    np.testing.assert_allclose(t * TIME_SCALE_NS + TIME_OFFSET_NS, np.sort(times), rtol=1e-6)


def test_same_sensor_in_two_events_is_two_doms():
    b = collate_events([one_event([9, 9, 3], [5.0, 1, 2], 1), one_event([9, 9], [0.0, 4], 2)], sensor_xyz=XYZ)
    assert b.dom_ids.tolist() == [3, 9, 9]
    assert b.dom_pulse_counts.tolist() == [1, 2, 2]
    assert b.dom_to_event_idx.tolist() == [0, 0, 1]
    assert b.event_ids.tolist() == [1, 2]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="event 7 has no pulses"):
        collate_events([one_event([1], [0.0]), one_event([], [], event_id=7)], sensor_xyz=XYZ)
    with pytest.raises(ValueError, match="sensor id 6000 is not in the geometry"):
        collate_events([one_event([1, 6000], [0.0, 1.0])], sensor_xyz=XYZ)
    with pytest.raises(ValueError, match="empty list"):
        collate_events([])


def test_concat_and_slice_agree_with_one_batch(raw):
    g, _ = raw
    table = PulseTable.from_pulses(g.event_index, g.event_ids, g.sensor_id, g.time, g.charge, g.auxiliary, XYZ,
                                   targets=np.stack([g.azimuth, g.zenith], 1))
    whole = table.batch(10, 90)
    joined = concat_batches([table.batch(10, 31), table.batch(31, 32), table.batch(32, 90)])
    sliced = table.slice_events(10, 90).batch(0, 80)
    for other in (joined, sliced):
        for name in ("pulse_features", "pulse_to_dom_idx", "dom_pulse_counts", "cu_seqlens", "dom_to_event_idx",
                     "dom_ids", "dom_positions", "event_dom_counts", "event_pulse_counts", "event_ids", "targets"):
            a, b = getattr(whole, name), getattr(other, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert other.max_dom_pulses == whole.max_dom_pulses


def test_batch_does_not_alias_the_table(raw):
    g, _ = raw
    table = PulseTable.from_pulses(g.event_index, g.event_ids, g.sensor_id, g.time, g.charge, g.auxiliary, XYZ)
    assert table.pulse_features is None  # computed on the first batch, not at load
    table.batch(0, 1)
    before = table.pulse_features[: table.event_pulse_offsets[3]].copy()
    b = table.batch(0, 3)
    b.pulse_features.zero_()
    b.dom_ids.zero_()
    assert np.array_equal(table.pulse_features[: table.event_pulse_offsets[3]], before)
    assert table.batch(0, 3).dom_ids.sum() > 0
    with pytest.raises(IndexError):
        table.batch(0, table.n_events + 1)
