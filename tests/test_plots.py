"""Figures: the right panels and lines from a results table, PNGs written, empty inputs handled."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from iceaggr_lib import plots, results, sparsity  # noqa: E402
from iceaggr_lib.bench import CSV_COLUMNS  # noqa: E402


def fake_results():
    """A results table: 3 backends x 2 dtypes x 2 modes x 3 batch sizes, one OOM row."""
    rows = []
    for backend, speed in [("loop", 100.0), ("padded", 10.0), ("flex_dense", 5.0)]:
        for dtype in ("float32", "bfloat16"):
            for mode in ("forward", "forward_backward"):
                for b in (4, 16, 64):
                    t = speed * b / 4 * (3 if mode == "forward_backward" else 1)
                    rows.append(dict(backend=backend, dtype=dtype, mode=mode, n_heads=1, head_dim=128, batch_size=b,
                                     n_pulses=70 * b, n_doms=50 * b, max_dom_pulses=20, status="ok", message="",
                                     median_ms=t, p20_ms=0.9 * t, p80_ms=1.1 * t, prep_ms=0.1, first_call_ms=3 * t,
                                     peak_mem_mb=b * 1.5, rel_err=1e-7, device="cuda:0", torch_version="2.x"))
    rows[-1].update(status="oom", median_ms=np.nan, message="OutOfMemoryError: ...")
    df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    return results.with_derived(df, {"copy_bandwidth_gbps": 3000.0})


def lines_per_axis(fig):
    return [len(ax.get_lines()) for ax in fig.axes if ax.get_visible()]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_time_vs_batch_one_panel_per_group_with_floor():
    df = fake_results()
    fig = plots.time_vs_batch(df)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4  # 2 modes x 2 dtypes x 1 head
    titles = [ax.get_title() for ax in visible]
    assert titles[0].startswith("forward,") and titles[-1].startswith("forward_backward,")
    for ax in visible:
        labels = ax.get_legend_handles_labels()[1]
        assert "memory floor" in labels and {"loop", "padded", "flex_dense"} <= set(labels)
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_time_vs_batch_marks_per_batch_times_where_rows_have_them():
    df = fake_results()
    assert "mean of per-batch medians" not in plots.time_vs_batch(df).axes[0].get_legend_handles_labels()[1]
    plt.close("all")
    df["batch_mean_ms"] = 0.95 * df["median_ms"]
    ax = plots.time_vs_batch(df).axes[0]
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
    assert len(crosses) == 3  # one per backend
    assert "mean of per-batch medians" in ax.get_legend_handles_labels()[1]


def test_speedup_throughput_memory_and_save(tmp_path):
    df = fake_results()
    sp = results.speedups(df, "loop")
    fig = plots.speedup_vs(sp, "loop")
    ax = fig.axes[0]
    padded_line = [l for l in ax.get_lines() if l.get_label() == "padded"][0]
    np.testing.assert_allclose(padded_line.get_ydata(), 10.0)  # loop is 10x slower than padded everywhere
    for f in (plots.throughput_vs_batch(df), plots.memory_vs_batch(df)):
        assert all(n >= 3 for n in lines_per_axis(f))
    path = plots.save(fig, tmp_path, "speedup_vs_loop")
    assert path == tmp_path / "figures" / "speedup_vs_loop.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_inputs_give_a_labelled_placeholder():
    df = fake_results()
    none_ok = df.assign(status="error")
    for fig in (plots.time_vs_batch(none_ok), plots.throughput_vs_batch(none_ok),
                plots.speedup_vs(results.speedups(none_ok, "loop"), "loop"),
                plots.memory_vs_batch(df.assign(peak_mem_mb=np.nan))):
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert texts and texts[0]


def test_sparsity_figures():
    rng = np.random.default_rng(0)
    stats = sparsity.DomStats(pulses_per_event=rng.integers(1, 1000, 200), doms_per_event=rng.integers(1, 100, 200),
                              pulses_per_dom=rng.geometric(0.7, 3000).astype(np.int32),
                              charge_per_dom=rng.exponential(1.0, 3000).astype(np.float32),
                              time_span_per_dom=rng.exponential(1000.0, 3000).astype(np.float32))
    figs = plots.sparsity_figures(stats)
    assert set(figs) == {"pulses_per_dom", "doms_per_event", "pulses_per_event", "charge_per_dom", "time_span_per_dom"}
    ax = figs["pulses_per_dom"].axes[0]
    (stairs,) = ax.patches
    heights, edges = stairs.get_data().values, stairs.get_data().edges
    assert ax.get_xscale() == "log"
    assert np.sum(heights * np.diff(edges)) == pytest.approx(3000)  # count per integer x integers = all DOMs
    assert heights[0] == np.sum(stats.pulses_per_dom == 1)
    work = pd.DataFrame(dict(batch_size=[4, 16], pulses=[10.0, 40], dense_pairs=[100.0, 1600], dom_pairs=[20.0, 80],
                             padded_pairs=[50.0, 300], padded_slot_waste=[0.5, 0.7], padded_pair_waste=[0.6, 0.8]))
    fig = plots.attention_work_figure(work)
    assert len(fig.axes) == 2 and len(fig.axes[0].get_lines()) == 4
