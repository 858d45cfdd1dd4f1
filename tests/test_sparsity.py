"""Sparsity statistics against an independent pandas groupby and brute-force attention work."""

import json

import numpy as np
import pandas as pd
import pytest

from iceaggr_lib import sparsity
from iceaggr_lib.collate import PulseTable


def raw_pulses(n_events=60, seed=0):
    """Random pulses (unsorted), heavy-ish DOM sizes: a few sensors per event, some hit many times."""
    rng = np.random.default_rng(seed)
    per_event = rng.integers(1, 40, n_events)
    event_index = np.repeat(np.arange(n_events), per_event)
    n = len(event_index)
    sensor = np.where(rng.random(n) < 0.3, rng.integers(0, 3, n), rng.integers(0, 200, n))
    perm = rng.permutation(n)
    return dict(event_index=event_index[perm], event_ids=np.arange(n_events) * 7 + 3, sensor_id=sensor[perm],
                time=rng.uniform(0, 2e4, n), charge=rng.exponential(1.0, n), auxiliary=rng.random(n) < 0.2,
                sensor_xyz=rng.normal(size=(200, 3)))


def groupby_reference(raw):
    df = pd.DataFrame({k: raw[k] for k in ("event_index", "sensor_id", "time", "charge")})
    dom = df.groupby(["event_index", "sensor_id"]).agg(n=("time", "size"), charge=("charge", "sum"),
                                                       tmin=("time", "min"), tmax=("time", "max"))
    events = df.groupby("event_index").agg(pulses=("time", "size"), doms=("sensor_id", "nunique"))
    return dom, events


def test_table_stats_match_pandas_groupby():
    raw = raw_pulses()
    stats = sparsity.table_stats(PulseTable.from_pulses(**raw))
    dom, events = groupby_reference(raw)  # groupby sorts by (event, sensor): the DOM order of the table
    np.testing.assert_array_equal(stats.pulses_per_event, events["pulses"].to_numpy())
    np.testing.assert_array_equal(stats.doms_per_event, events["doms"].to_numpy())
    np.testing.assert_array_equal(stats.pulses_per_dom, dom["n"].to_numpy())
    np.testing.assert_allclose(stats.charge_per_dom, dom["charge"].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(stats.time_span_per_dom, (dom["tmax"] - dom["tmin"]).to_numpy(), rtol=1e-5, atol=1e-3)


def test_summary_keys_and_values():
    raw = raw_pulses()
    stats = sparsity.table_stats(PulseTable.from_pulses(**raw))
    s = sparsity.summary(stats)
    dom, events = groupby_reference(raw)
    assert set(s) == {"n_events", "n_pulses", "n_doms", "pulses_per_event", "doms_per_event", "pulses_per_dom",
                      "singleton_dom_fraction"}
    assert set(s["pulses_per_event"]) == set(s["doms_per_event"]) == {"median", "p90", "p99", "max"}
    assert set(s["pulses_per_dom"]) == {"median", "p75", "p90", "p95", "p99", "p999", "max"}
    assert (s["n_events"], s["n_pulses"], s["n_doms"]) == (60, len(raw["time"]), len(dom))
    assert s["pulses_per_dom"]["max"] == dom["n"].max()
    assert s["pulses_per_dom"]["p90"] == pytest.approx(np.percentile(dom["n"], 90))
    assert s["doms_per_event"]["median"] == pytest.approx(events["doms"].median())
    assert s["singleton_dom_fraction"] == pytest.approx((dom["n"] == 1).mean())
    json.dumps(s)  # plain Python numbers only


def test_collect_streams_tables_and_stops_at_max_events(tmp_path):
    a, b = PulseTable.from_pulses(**raw_pulses(30, seed=1)), PulseTable.from_pulses(**raw_pulses(30, seed=2))
    whole = sparsity.collect([("a.parquet", a), ("b.parquet", b)])
    assert whole.n_events == 60
    part = sparsity.collect([a, b], max_events=40)
    assert part.n_events == 40
    np.testing.assert_array_equal(part.pulses_per_event[30:], sparsity.table_stats(b).pulses_per_event[:10])
    assert part.n_doms == sparsity.table_stats(a).n_doms + int(sparsity.table_stats(b).doms_per_event[:10].sum())
    path = sparsity.write_summary(tmp_path, sparsity.summary(part))
    assert json.loads(path.read_text())["n_events"] == 40


def test_attention_work_matches_brute_force():
    stats = sparsity.table_stats(PulseTable.from_pulses(**raw_pulses(50)))
    work = sparsity.attention_work(stats, [4, 16, 64]).set_index("batch_size")
    assert 64 not in work.index  # no full batch of 64 in 50 events
    dom_offsets = np.concatenate([[0], np.cumsum(stats.doms_per_event)])
    for b in (4, 16):
        per_batch = []
        for i in range(50 // b):
            n_d = stats.pulses_per_dom[dom_offsets[i * b]:dom_offsets[(i + 1) * b]].astype(float)
            per_batch.append((n_d.sum() ** 2, (n_d ** 2).sum(), len(n_d) * n_d.max() ** 2,
                              1 - n_d.sum() / (len(n_d) * n_d.max())))
        dense, dom_pairs, padded, waste = np.array(per_batch).T
        row = work.loc[b]
        assert row["n_batches"] == 50 // b
        assert row["dense_pairs"] == pytest.approx(dense.mean())
        assert row["dom_pairs"] == pytest.approx(dom_pairs.mean())
        assert row["padded_pairs"] == pytest.approx(padded.mean())
        assert row["padded_slot_waste"] == pytest.approx(waste.mean())
        assert row["dense_over_dom"] == pytest.approx((dense / dom_pairs).mean())


def test_percentile_table_and_headline():
    stats = sparsity.table_stats(PulseTable.from_pulses(**raw_pulses()))
    table = sparsity.percentile_table(stats)
    assert table.loc["pulses per DOM", "max"] == stats.pulses_per_dom.max()
    assert table.loc["pulses per event", "p50"] == pytest.approx(np.median(stats.pulses_per_event))
    classes = sparsity.event_size_classes(stats)
    assert classes.sum() == pytest.approx(1.0)
    text = sparsity.headline(sparsity.summary(stats), sparsity.attention_work(stats, [4, 16]))
    assert f"{stats.n_events:,} events" in text and "16 events per batch" in text


def test_no_events_is_a_clear_error():
    with pytest.raises(ValueError, match="no events"):
        sparsity.collect([])
