"""The benchmark harness: CSV contract, statuses, rotation, budgets, crash safety, the memory floor."""

import csv
import time

import numpy as np
import pandas as pd
import pytest
import torch

from iceaggr_lib import backends as backends_mod
from iceaggr_lib.backends import BackendSpec, MODES, get_backend
from iceaggr_lib.bench import (CSV_COLUMNS, BenchConfig, _make_inputs, _make_step, batch_mean_of_medians,
                               consecutive_batches, memory_floor_bytes, read_results, run_grid)
from iceaggr_lib.collate import PulseTable
from iceaggr_lib.testing import batch_from_dom_sizes

ALL = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})


def source(first_event, n_events):
    """Batches of n_events events with 5 DOMs each, DOM sizes varying with the first event."""
    rng = np.random.default_rng(first_event)
    sizes = rng.integers(1, 6, size=5 * n_events)
    return batch_from_dom_sizes(sizes, doms_per_event=5, seed=first_event)


def fake(name, attend, devices=("cpu", "cuda"), modes=MODES):
    return BackendSpec(name=name, description="test double", devices=frozenset(devices), dtypes=ALL,
                       modes=frozenset(modes), attend=attend)


def padded_attend(q, k, v, batch, prep, scale):
    spec = get_backend("padded")
    return spec.attend(q, k, v, batch, spec.prepare(batch, q.shape[1], q.shape[2], q.dtype), scale)


@pytest.fixture
def registry(monkeypatch):
    """Register test-double backends for one test (the registry's cache is consulted first)."""
    def add(spec):
        monkeypatch.setitem(backends_mod._cache, spec.name, spec)
    return add


def small_cfg(**kw):
    base = dict(backends=["padded"], batch_sizes=[2], modes=["forward"], d_model=16, repeats=3, n_batches=3,
                time_budget_s=0.05, device="cpu")
    base.update(kw)
    return BenchConfig(**base)


def test_csv_columns_exact_and_one_row_per_point(tmp_path):
    cfg = small_cfg(backends=["padded", "loop", "varlen", "no_such_backend"], batch_sizes=[2],
                    modes=["forward", "forward_backward"], n_heads=[1, 2])
    df = run_grid(source, cfg, tmp_path / "b.csv", progress=False)
    with open(tmp_path / "b.csv") as fh:
        header = next(csv.reader(fh))
    assert header == CSV_COLUMNS
    back = read_results(tmp_path / "b.csv")
    assert len(back) == len(df) == cfg.n_points() == 4 * 2 * 2
    assert set(back["status"]) <= {"ok", "oom", "unsupported", "error"}
    keys = back[["backend", "dtype", "mode", "n_heads", "batch_size"]].drop_duplicates()
    assert len(keys) == len(back)

    ok = back[back["backend"].isin(["padded", "loop"])]
    assert (ok["status"] == "ok").all(), ok["message"].tolist()
    assert (ok["rel_err"] < 1e-5).all()
    assert (ok["median_ms"] > 0).all() and (ok["first_call_ms"] > 0).all() and (ok["prep_ms"] >= 0).all()
    assert (ok["p20_ms"] <= ok["median_ms"] + 1e-9).all() and (ok["median_ms"] <= ok["p80_ms"] + 1e-9).all()
    assert ok["peak_mem_mb"].isna().all()  # not measured on the CPU, by design
    assert ok["host_ms"].isna().all()  # likewise: every CPU time is the host's
    assert ok["batch_mean_ms"].isna().all()  # blocked_autorange times blocks of calls, not one batch's call
    assert (ok["head_dim"] * ok["n_heads"] == 16).all()
    assert (ok["device"] == "cpu").all() and (ok["torch_version"] == torch.__version__).all()

    varlen = back[back["backend"] == "varlen"]
    assert (varlen["status"] == "unsupported").all() and varlen["message"].str.contains("cuda").all()
    unknown = back[back["backend"] == "no_such_backend"]
    assert (unknown["status"] == "error").all() and unknown["message"].str.contains("unknown").all()


def test_sizes_are_means_over_rotated_batches(tmp_path):
    df = run_grid(source, small_cfg(n_batches=3), tmp_path / "b.csv", progress=False)
    batches = [source(i * 2, 2) for i in range(3)]
    row = df.iloc[0]
    assert row["n_pulses"] == round(np.mean([b.n_pulses for b in batches]))
    assert row["n_doms"] == round(np.mean([b.n_doms for b in batches]))
    assert row["max_dom_pulses"] == max(b.max_dom_pulses for b in batches)


def test_rotation_uses_every_batch_in_timing(tmp_path, registry):
    seen = []

    def attend(q, k, v, batch, prep, scale):
        seen.append(int(batch.event_ids[0]) + 1000 * batch.n_pulses)
        return padded_attend(q, k, v, batch, prep, scale)

    registry(fake("spy", attend))
    run_grid(source, small_cfg(backends=["spy"], n_batches=3, min_calls=6, repeats=6), tmp_path / "b.csv",
             progress=False)
    assert len(set(seen)) == 3


def test_batch_mean_of_medians_sorts_calls_by_batch():
    """Call j ran batch (first + j) % n: per-batch medians, then their mean, whatever the starting batch."""
    per_batch = np.array([1.0, 2.0, 4.0])  # batch b's calls take per_batch[b] (+ one outlier in batch 2)
    first = 2
    times = np.array([per_batch[(first + j) % 3] for j in range(9)])
    times[3] = 40.0  # call 3 ran batch (2 + 3) % 3 = 2: an outlier the batch's median ignores
    assert batch_mean_of_medians(times, first, 3) == pytest.approx(per_batch.mean())
    assert np.median(times) == 2.0  # the median of all calls is the middle batch's time, not the mean batch's
    assert np.isnan(batch_mean_of_medians(times[:2], first, 3))  # a batch without a call: no per-batch mean


def test_step_state_names_the_next_batch():
    """run_point reads step.state["i"] % n before the timed calls to know which batch each call ran."""
    batches = [source(i * 2, 2) for i in range(3)]
    inputs = _make_inputs(batches, 1, 8, torch.float32, torch.device("cpu"), seed=0)
    seen = []
    spec = fake("spy", lambda q, k, v, batch, prep, scale: seen.append(batch) or padded_attend(q, k, v, batch,
                                                                                               prep, scale))
    step = _make_step(spec, inputs, "forward", 1.0, torch.float32)
    for _ in range(5):
        expected = batches[step.state["i"] % 3]
        step()
        assert seen[-1] is expected


def test_wrong_result_becomes_error_row_with_timings(tmp_path, registry):
    def wrong(q, k, v, batch, prep, scale):
        return padded_attend(q, k, v, batch, prep, scale) * 1.01

    registry(fake("wrong", wrong))
    df = run_grid(source, small_cfg(backends=["wrong", "padded"]), tmp_path / "b.csv", progress=False)
    row = df.set_index("backend").loc["wrong"]
    assert row["status"] == "error" and "wrong result" in row["message"]
    assert row["rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert row["median_ms"] > 0
    assert df.set_index("backend").loc["padded", "status"] == "ok"


def test_runtime_warnings_reach_the_message(tmp_path, registry):
    import warnings

    def fallback(q, k, v, batch, prep, scale):
        warnings.warn("compiled FlexAttention ran EAGER", RuntimeWarning)
        return padded_attend(q, k, v, batch, prep, scale)

    registry(fake("fallback", fallback))
    df = run_grid(source, small_cfg(backends=["fallback"]), tmp_path / "b.csv", progress=False)
    assert df["status"].iloc[0] == "ok"
    assert df["message"].iloc[0] == "warning: compiled FlexAttention ran EAGER"


def test_failures_become_rows_and_the_grid_goes_on(tmp_path, registry):
    def boom(q, k, v, batch, prep, scale):
        raise RuntimeError("kernel exploded\nsecond line")

    def oom(q, k, v, batch, prep, scale):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 72.75 GiB")

    registry(fake("boom", boom))
    registry(fake("oomer", oom))
    registry(fake("cuda_only", padded_attend, devices=("cuda",)))
    cfg = small_cfg(backends=["oomer", "boom", "cuda_only", "padded"], batch_sizes=[2, 4])
    df = run_grid(source, cfg, tmp_path / "b.csv", progress=False).set_index(["backend", "batch_size"])
    assert df.loc[("boom", 2), "status"] == "error"
    assert df.loc[("boom", 2), "message"] == "RuntimeError: kernel exploded second line"
    assert df.loc[("oomer", 2), "status"] == "oom"
    assert "72.75 GiB" in df.loc[("oomer", 2), "message"]
    # after an OOM the series' larger batch sizes are skipped, and say so
    assert df.loc[("oomer", 4), "status"] == "unsupported"
    assert df.loc[("oomer", 4), "message"].startswith("skipped: out of memory at 2 events")
    assert df.loc[("cuda_only", 2), "status"] == "unsupported"
    assert (df.loc["padded", "status"] == "ok").all()


def test_rows_are_flushed_before_a_crash(tmp_path, registry):
    def interrupt(q, k, v, batch, prep, scale):
        raise KeyboardInterrupt  # not a backend failure: stops the grid

    registry(fake("interrupt", interrupt))
    path = tmp_path / "b.csv"
    with pytest.raises(KeyboardInterrupt):
        run_grid(source, small_cfg(backends=["padded", "loop", "interrupt", "padded"]), path, progress=False)
    back = read_results(path)
    assert back["backend"].tolist() == ["padded", "loop"]
    assert (back["status"] == "ok").all()


def test_slow_series_and_time_limit_are_skipped_rows(tmp_path, registry):
    def slow(q, k, v, batch, prep, scale):
        time.sleep(0.03)
        return padded_attend(q, k, v, batch, prep, scale)

    registry(fake("slow", slow))
    cfg = small_cfg(backends=["slow"], batch_sizes=[2, 4, 8], max_call_ms=50.0, min_calls=1, repeats=1,
                    n_batches=1)
    df = run_grid(source, cfg, tmp_path / "b.csv", progress=False).set_index(["backend", "batch_size"])
    # 30 ms at 2 events: 4 events predicted ~60 ms > 50 ms, skipped, and 8 events too
    assert df.loc[("slow", 2), "status"] == "ok" and df.loc[("slow", 2), "median_ms"] >= 30
    assert (df.loc[[("slow", 4), ("slow", 8)], "status"] == "unsupported").all()
    assert df.loc[("slow", 4), "message"].startswith("skipped: a call would take about")

    cfg = small_cfg(backends=["padded"], batch_sizes=[2, 4], time_limit_s=0.0)
    df = run_grid(source, cfg, tmp_path / "c.csv", progress=False)
    assert (df["status"] == "unsupported").all() and df["message"].str.contains("time limit").all()


def test_too_few_events_is_an_error_row(tmp_path):
    table = _table(n_events=6)
    df = run_grid(table, small_cfg(batch_sizes=[2, 8]), tmp_path / "b.csv", progress=False).set_index("batch_size")
    assert df.loc[2, "status"] == "ok"
    assert df.loc[8, "status"] == "error" and "fewer than one batch" in df.loc[8, "message"]


def _table(n_events, seed=0):
    rng = np.random.default_rng(seed)
    n = 40 * n_events
    return PulseTable.from_pulses(
        event_index=np.sort(rng.integers(0, n_events, n)), event_ids=np.arange(100, 100 + n_events),
        sensor_id=rng.integers(0, 50, n), time=rng.uniform(0, 1e4, n), charge=rng.exponential(1, n),
        auxiliary=rng.random(n) < 0.3, sensor_xyz=rng.normal(size=(50, 3)))


def test_consecutive_batches_from_a_table():
    table = _table(n_events=10)
    batches = consecutive_batches(table, 3, 5)  # only 3 full batches fit in 10 events
    assert [b.event_ids.tolist() for b in batches] == [[100, 101, 102], [103, 104, 105], [106, 107, 108]]
    with pytest.raises(ValueError, match="fewer than one batch"):
        consecutive_batches(table, 11, 1)


def test_memory_floor_bytes():
    # forward: q, k, v of 10 pulses and 4 DOM outputs, 2 heads x 8 dims, bf16
    assert memory_floor_bytes(10, 4, 2, 8, "bfloat16", "forward") == (3 * 10 + 4) * 2 * 8 * 2
    assert memory_floor_bytes(10, 4, 2, 8, "float32", "forward_backward") == 2 * (3 * 10 + 4) * 2 * 8 * 4


def test_config_rejects_bad_grids():
    with pytest.raises(ValueError, match="mode"):
        BenchConfig(backends=["padded"], modes=["backward"])
    with pytest.raises(ValueError, match="divisible"):
        BenchConfig(backends=["padded"], d_model=30, n_heads=[4])
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(backends=["padded"], dtypes=["float8"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rows_measure_memory(tmp_path):
    cfg = small_cfg(backends=["padded"], device="cuda", dtypes=["float32", "bfloat16"])
    df = run_grid(source, cfg, tmp_path / "b.csv", progress=False)
    assert (df["status"] == "ok").all(), df["message"].tolist()
    assert (df["peak_mem_mb"] > 0).all() and df["device"].str.startswith("cuda").all()
    assert (df["host_ms"] > 0).all()  # the host's time per call while issuing the timed calls
    assert (df["batch_mean_ms"] > 0).all()  # one time per call on CUDA, so per-batch medians


def test_csv_from_before_host_ms_reads_with_nan(tmp_path):
    """A committed report's CSV written before the host_ms column reads with host_ms NaN (a later column), while
    a CSV missing any other column is rejected, naming the file."""
    cfg = small_cfg()
    run_grid(source, cfg, tmp_path / "b.csv", progress=False)
    old = pd.read_csv(tmp_path / "b.csv").drop(columns=["host_ms"])
    old.to_csv(tmp_path / "old.csv", index=False)
    back = read_results(tmp_path / "old.csv")
    assert list(back.columns[:len(old.columns)]) == list(old.columns) and back["host_ms"].isna().all()
    old.drop(columns=["prep_ms"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv.*prep_ms"):
        read_results(tmp_path / "bad.csv")
